//! External listeners as configured: `--on-port`/`--on-ip`, or a `[[listener]]`'s
//! `external`, checked.

use std::net::SocketAddr;

use anyhow::{bail, Result};

use super::file::Location;
use crate::{cli::RunArgs, relay::external::External};

/// The external listener of `--on-port`/`--on-ip`, if given.
pub(super) fn of_flags(args: &RunArgs) -> Result<Option<External>> {
    let Some(port) = args.on_port else {
        if !args.on_ip.is_empty() {
            bail!("--on-ip names the address of --on-port's proxy; give --on-port too");
        }
        return Ok(None);
    };
    if !args.listen.is_empty() || args.upstream.is_some() {
        bail!("--on-port hands flows to a proxy tproxy does not run: --listen and --upstream describe tproxy's own listener; give one or the other");
    }
    if port == 0 {
        bail!("--on-port 0: the port a proxy listens on is never 0");
    }
    if args.on_ip.is_empty() {
        return Ok(Some(External::OnPort(port)));
    }
    for (i, ip) in args.on_ip.iter().enumerate() {
        if args.on_ip[..i]
            .iter()
            .any(|earlier| earlier.is_ipv4() == ip.is_ipv4())
        {
            bail!("--on-ip {ip}: at most one address per address family");
        }
    }
    Ok(Some(External::At(
        args.on_ip
            .iter()
            .map(|ip| SocketAddr::new(*ip, port))
            .collect(),
    )))
}

/// The external listener of `[[listener]]` `name` with `external = …` (`own`: it has
/// `listen` or `upstream` too).
pub(super) fn of_entry(
    name: &str,
    own: bool,
    addrs: &[SocketAddr],
    where_: &Location,
) -> Result<External> {
    if own {
        bail!("{where_}: listener `{name}`: external is a proxy tproxy does not run; listen and upstream describe tproxy's own listener; give one or the other");
    }
    if addrs.is_empty() {
        bail!("{where_}: listener `{name}`: external: give the proxy's address, e.g. \"127.0.0.1:3129\"");
    }
    for (i, addr) in addrs.iter().enumerate() {
        if addr.port() == 0 {
            bail!("{where_}: listener `{name}`: external {addr}: the port a proxy listens on is never 0");
        }
        if addrs[..i]
            .iter()
            .any(|earlier| earlier.is_ipv4() == addr.is_ipv4())
        {
            bail!("{where_}: listener `{name}`: external: at most one address per address family");
        }
    }
    Ok(External::At(addrs.to_vec()))
}
