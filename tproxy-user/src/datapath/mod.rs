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

/// A sysctl in seconds (`path` under /proc/sys) as nanoseconds, `default_ns` where it cannot
/// be read: the program's timeouts follow the namespace's own.
pub(crate) fn sysctl_seconds_ns(path: &str, default_ns: u64) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .map_or(default_ns, |seconds| seconds.saturating_mul(1_000_000_000))
}
