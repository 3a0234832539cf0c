//! What decides where a packet goes: the eBPF program and everything that configures it.
//!
//! packet → `steering` (the program's decision, with the rules [`rules`] compiled into its
//! maps) → `routing` (the mark's policy routing delivers it locally) → a listener.
//! `interfaces` resolves where it attaches; `ipset` reads the kernel ipsets rules follow; `local_origin` attaches the connect programs that
//! send selected local processes' connections over `lo` to it (`out_routes` mirrors the
//! host's routes for their rules' `out_interface`); `pin` keeps the program, maps and links across
//! restarts; `fragments` empties the program's fragment tracking of datagrams whose time is
//! up; `kfuncs` makes the program's conntrack kfunc calls real before it is loaded.

pub(crate) mod fragments;
pub(crate) mod interfaces;
pub mod ipset;
pub(crate) mod kfuncs;
pub(crate) mod local_origin;
pub(crate) mod out_routes;
pub(crate) mod pin;
pub(crate) mod routing;
pub mod rules;
pub(crate) mod steering;
