//! The operator's commands besides `run`: [`status`], [`doctor`], [`cleanup`] and
//! [`translate`] (iptables and nft rule sets into configurations).

pub mod cleanup;
pub mod doctor;
pub mod status;
pub mod translate;
