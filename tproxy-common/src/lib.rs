//! What the tproxy eBPF program and its loader must agree on: map names, map key and value
//! layouts, counter indices, and the pure decisions the program makes, kept here so that they
//! are unit-tested on the host instead of only observed through a verifier. With the `stats`
//! feature (std), also the counters' snapshot the loader reports, so that what reads
//! `tproxy status --json` reads it typed without building the loader.
#![no_std]

#[cfg(feature = "stats")]
extern crate std;

pub mod decision;
pub mod local_origin;
pub mod local_udp;
pub mod maps;
pub mod reject;
#[cfg(feature = "stats")]
pub mod stats;

pub use decision::Outcome;
