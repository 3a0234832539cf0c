//! tproxy: transparent proxying with a tc ingress eBPF program instead of the iptables
//! socket match and TPROXY target.
//!
//! The rooms follow the packet's way and the process's life:
//! - [`datapath`]: what decides where a packet goes. The eBPF program seen from userspace
//!   (`datapath::steering`), the rule model and its compilation into the program's maps
//!   ([`datapath::rules`]), the policy routing that makes assigned packets local
//!   (`datapath::routing`), the state pinned for restarts (`datapath::pin`) and the
//!   fragment tracking's upkeep (`datapath::fragments`).
//! - `relay`: where a steered flow goes next. The transparent listeners, the TCP relay
//!   (accept, original destination, connect onward, splice), and the UDP sessions.
//! - [`daemon`]: the process around them. The serve loop (phases, signals, drain), reload,
//!   the instance lock, the control socket (status, reload, handover) and the privilege drop.
//! - [`tools`]: the operator's commands besides `run`: status, doctor, cleanup, translate.
//! - [`run`] puts the pieces together in the order that leaves nothing behind, and takes them
//!   down again. [`cli`] and [`config`] read what the operator asked for, with the
//!   [`values`] both parse; [`config::settings`] defines each setting once. [`stats`] is the
//!   one snapshot of the counters that `status`, the log line and `metrics` render;
//!   `metrics` and [`logging`] report.
//!
//! Imports only point down this order, so each room can be read without the ones above it:
//! [`values`] and [`logging`] → [`stats`] → [`datapath`] → [`config`] → `relay` →
//! `metrics` and [`daemon`] → [`cli`], [`tools`] and [`run`].

pub mod cli;
pub mod config;
pub mod daemon;
pub mod datapath;
pub mod logging;
mod metrics;
pub(crate) mod relay;
pub mod run;
pub use tproxy_common::stats;
pub mod tools;
pub mod values;
