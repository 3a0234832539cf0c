//! The transparent listeners that steered flows arrive on. They are bound to loopback by
//! default, so no packet can reach them by addressing them; the eBPF program hands them
//! packets for any destination through the socket map, and IP_TRANSPARENT is what lets the
//! kernel answer those from the original, non-local destination address.

use std::{net::SocketAddr, os::fd::AsFd};

use anyhow::{bail, Context, Result};
use nix::sys::socket::{setsockopt, sockopt};
use socket2::{Domain, Protocol, Socket, Type};
use tproxy_common::maps::ListenerSlot;

use crate::values::Transport;

/// Pending connections the kernel may queue per TCP listener; clamped by net.core.somaxconn.
const BACKLOG: i32 = 4096;
/// Receive buffer of a UDP listener: new flows' datagrams wait there until the relay reads
/// them. The default (net.core.rmem_default, often 208 KiB) holds about 200 small
/// datagrams, which a burst of new flows overflows; this holds thousands.
const UDP_RECEIVE_BUFFER: usize = 8 << 20;

/// A bound transparent socket (listening, for TCP) and the socket-map slot it serves.
pub(crate) struct TransparentListener {
    pub slot: ListenerSlot,
    pub socket: Socket,
}

/// One listening socket being handed over.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct HandedSocket {
    pub transport: Transport,
    pub ipv6: bool,
}

impl From<ListenerSlot> for HandedSocket {
    fn from(slot: ListenerSlot) -> Self {
        HandedSocket {
            transport: if slot.is_tcp() {
                Transport::Tcp
            } else {
                Transport::Udp
            },
            ipv6: slot.is_ipv6(),
        }
    }
}

impl HandedSocket {
    /// The socket-map slot it serves.
    pub(crate) fn slot(self) -> ListenerSlot {
        ListenerSlot::of(self.transport == Transport::Tcp, self.ipv6)
    }
}

/// One listener being handed over: its sockets follow, in this order, as descriptors.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct HandedListener {
    pub name: String,
    pub listen: Vec<SocketAddr>,
    pub bound: Vec<SocketAddr>,
    pub sockets: Vec<HandedSocket>,
}

/// Binds one transparent listener per address. At most one per address family (the program
/// has one slot per family and transport). Addresses with port 0 all share the port the
/// kernel picks for the first of them, so the listeners are "one port" to an operator.
pub(crate) fn bind_all(
    addrs: &[SocketAddr],
    transport: Transport,
) -> Result<Vec<TransparentListener>> {
    let mut listeners: Vec<TransparentListener> = Vec::new();
    let mut chosen_port = None;
    for &requested in addrs {
        let slot = ListenerSlot::of(transport == Transport::Tcp, requested.is_ipv6());
        if listeners.iter().any(|l| l.slot == slot) {
            bail!("--listen {requested}: only one listener per address family is supported");
        }
        let mut addr = requested;
        if addr.port() == 0 {
            if let Some(port) = chosen_port {
                addr.set_port(port);
            }
        }
        let socket = bind_transparent(addr, transport)
            .with_context(|| format!("--listen {requested} ({transport:?})"))?;
        let local = socket
            .local_addr()?
            .as_socket()
            .context("listener has no IP address")?;
        chosen_port.get_or_insert(local.port());
        listeners.push(TransparentListener { slot, socket });
    }
    Ok(listeners)
}

/// Whether `original` is a destination the relay must never connect to: loopback,
/// unspecified, IPv4-mapped, multicast, broadcast or IPv6 link-local (see
/// `tproxy_common::decision::DestinationScope`). The eBPF program never steers such flows;
/// this is the second line, for flows that reach a listener some other way (`--relay-only`
/// behind someone's iptables rules, an older pinned program).
pub(crate) fn refused_destination(original: SocketAddr, client: SocketAddr) -> bool {
    tproxy_common::decision::destination_scope(original.ip(), client.ip())
        != tproxy_common::decision::DestinationScope::Relayable
}

fn bind_transparent(addr: SocketAddr, transport: Transport) -> Result<Socket> {
    let (kind, protocol) = match transport {
        Transport::Tcp => (Type::STREAM, Protocol::TCP),
        Transport::Udp => (Type::DGRAM, Protocol::UDP),
    };
    let socket =
        Socket::new(Domain::for_address(addr), kind, Some(protocol)).context("creating socket")?;
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
    if transport == Transport::Udp {
        // A steered datagram's original destination arrives as a control message.
        match addr {
            SocketAddr::V4(_) => setsockopt(&socket.as_fd(), sockopt::Ipv4OrigDstAddr, &true),
            SocketAddr::V6(_) => setsockopt(&socket.as_fd(), sockopt::Ipv6OrigDstAddr, &true),
        }
        .context("enabling IP_RECVORIGDSTADDR")?;
        // Beyond net.core.rmem_max with CAP_NET_ADMIN; without it, as much as that allows.
        setsockopt(&socket.as_fd(), sockopt::RcvBufForce, &UDP_RECEIVE_BUFFER)
            .or_else(|_| setsockopt(&socket.as_fd(), sockopt::RcvBuf, &UDP_RECEIVE_BUFFER))
            .context("sizing the receive buffer")?;
        // What still overflows it is counted: each datagram carries the socket's drop count.
        setsockopt(&socket.as_fd(), sockopt::RxqOvfl, &1).context("enabling SO_RXQ_OVFL")?;
    }
    socket.bind(&addr.into()).context("binding")?;
    if transport == Transport::Tcp {
        socket.listen(BACKLOG).context("listening")?;
    }
    Ok(socket)
}
