//! What the tproxy eBPF program and its loader must agree on: map names, map key and value
//! layouts, counter indices, and the pure decisions the program makes, kept here so that they
//! are unit-tested on the host instead of only observed through a verifier.
#![no_std]

pub mod decision;
pub mod local_origin;
pub mod maps;

pub use decision::Outcome;
