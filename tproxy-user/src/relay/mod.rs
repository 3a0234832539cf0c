//! Where a steered flow goes next: a transparent `listener` takes it, and the `tcp` relay
//! (with `splice` moving the bytes) or the `udp` sessions carry it to its upstream.
//! `listeners` keeps the set of listeners in line with the configuration, committing what
//! `plan` works out.

pub(crate) mod external;
pub(crate) mod kernel;
pub(crate) mod listener;
pub(crate) mod listeners;
pub(crate) mod plan;
pub(crate) mod splice;
pub(crate) mod tcp;
pub(crate) mod udp;
