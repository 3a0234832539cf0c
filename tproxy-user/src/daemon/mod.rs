//! The process around the data path: the `serve` loop (serving, draining, handed over, and
//! the signals between), `reload`, one [`instance`] per network namespace and table, its
//! `control` socket (status, reload, handover to a successor), the `privileges` it
//! keeps once set up, how it says it is `ready`, and the `policy` routing it keeps in place.

pub(crate) mod addresses;
pub(crate) mod cgroups;
pub(crate) mod control;
pub mod instance;
pub(crate) mod ipsets;
pub(crate) mod links;
pub(crate) mod policy;
pub(crate) mod privileges;
pub(crate) mod ready;
pub(crate) mod reload;
pub(crate) mod routes;
pub(crate) mod serve;
