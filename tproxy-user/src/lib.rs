//! tproxy: transparent proxying with a tc ingress eBPF program instead of the iptables
//! socket match and TPROXY target.
//!
//! The data path, one module each:
//! packet → [`steering`] (the eBPF program's decision) → [`listener`] (transparent socket)
//! → [`relay`] (TCP: accept, original destination, connect onward, copy) or [`udp`] (a session
//! per client and original destination) → upstream.
//! [`routing`] installs the policy routing that makes assigned packets local, and [`run`]
//! puts the pieces together in the order that leaves nothing behind.

//!
//! Also here, for the operator's commands: [`config`] (TOML file and flags), [`rules`] (the
//! rule model and its compilation into the program's maps) and [`translate`] (iptables/nft
//! rule sets into configurations).

pub mod cleanup;
pub mod cli;
pub mod config;
mod control;
pub mod doctor;
mod fragments;
pub mod instance;
mod listener;
pub mod logging;
mod metrics;
mod pin;
mod privileges;
mod relay;
mod routing;
pub mod rules;
pub mod run;
mod splice;
pub mod status;
mod steering;
pub mod translate;
mod udp;
