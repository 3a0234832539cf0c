//! The transparent listeners that steered connections arrive on. They are bound to loopback
//! by default, so no packet can reach them by addressing them; the eBPF program hands them
//! SYNs for any destination through the socket map, and IP_TRANSPARENT is what lets the kernel
//! answer those SYNs from the original, non-local destination address.

use std::net::SocketAddr;

use anyhow::{bail, Context, Result};
use socket2::{Domain, Protocol, Socket, Type};
use tproxy_common::maps::ListenerSlot;

/// Pending connections the kernel may queue per listener; clamped by net.core.somaxconn.
const BACKLOG: i32 = 4096;

/// A bound, listening transparent socket and the socket-map slot it serves.
pub struct TransparentListener {
    pub slot: ListenerSlot,
    pub socket: std::net::TcpListener,
}

/// Binds one transparent TCP listener per address. At most one per address family (the
/// program has one slot per family). Addresses with port 0 all share the port the kernel
/// picks for the first of them, so the listeners are "one port" to an operator.
pub fn bind_tcp(addrs: &[SocketAddr]) -> Result<Vec<TransparentListener>> {
    let mut listeners: Vec<TransparentListener> = Vec::new();
    let mut chosen_port = None;
    for &requested in addrs {
        let slot = match requested {
            SocketAddr::V4(_) => ListenerSlot::TcpV4,
            SocketAddr::V6(_) => ListenerSlot::TcpV6,
        };
        if listeners.iter().any(|l| l.slot == slot) {
            bail!("--listen {requested}: only one listener per address family is supported");
        }
        let mut addr = requested;
        if addr.port() == 0 {
            if let Some(port) = chosen_port {
                addr.set_port(port);
            }
        }
        let socket = bind_transparent(addr).with_context(|| format!("--listen {requested}"))?;
        let local = socket.local_addr()?;
        chosen_port.get_or_insert(local.port());
        if !local.ip().is_loopback() {
            log::warn!("listener {local} is not on loopback: clients can connect to it directly");
        }
        listeners.push(TransparentListener { slot, socket });
    }
    Ok(listeners)
}

fn bind_transparent(addr: SocketAddr) -> Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .context("creating socket")?;
    match addr {
        SocketAddr::V4(_) => socket.set_ip_transparent_v4(true),
        SocketAddr::V6(_) => {
            socket.set_only_v6(true)?;
            socket.set_ip_transparent_v6(true)
        }
    }
    .context("setting IP_TRANSPARENT (needs CAP_NET_ADMIN)")?;
    // A restart must not wait for the previous instance's TIME_WAIT connections. Not
    // SO_REUSEPORT: before Linux 6.6 bpf_sk_assign refuses reuseport listeners.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into()).context("binding")?;
    socket.listen(BACKLOG).context("listening")?;
    Ok(socket.into())
}
