//! The process around the data path: one [`instance`] per network namespace and table, its
//! [`control`] socket (status, reload, handover to a successor), and the [`privileges`] it
//! keeps once set up.

pub(crate) mod control;
pub mod instance;
pub(crate) mod privileges;
