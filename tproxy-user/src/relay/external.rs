//! Listeners tproxy does not own: a transparent proxy already running on this host (Squid's
//! `http_port 3129 tproxy`, HAProxy's `bind … transparent`), to which the program hands the
//! new flows of the rules that name it, as `-j TPROXY --on-ip --on-port` does. tproxy binds
//! nothing for them; it tells the program where to look up their sockets, and reads from
//! the kernel's sock_diag interface whether something listens there now.

use std::net::SocketAddr;

use anyhow::{bail, Context, Result};
// The trait, for the raw attributes the crate does not parse.
use netlink_packet_core::Nla as _;
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP},
    inet::{nlas::Nla, ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags},
    SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket};

use crate::{config::External, stats::ExternalSocketStatus, values::Transport};

/// What sock_diag says about the sockets the program would find at an external address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Presence {
    /// A socket listens there (TCP) or is bound there unconnected (UDP).
    pub listening: bool,
    /// One of them has IP_TRANSPARENT, without which it cannot accept flows to other
    /// hosts' addresses.
    pub transparent: bool,
}

/// The state of each address of `external`, for the transports its rules use.
pub(crate) fn socket_statuses(
    external: &External,
    tcp: bool,
    udp: bool,
) -> Vec<ExternalSocketStatus> {
    presences(external, tcp, udp)
        .into_iter()
        .map(|(addr, transport, presence)| {
            let (presence, error) = match presence {
                Ok(presence) => (presence, None),
                Err(error) => (Default::default(), Some(format!("{error:#}"))),
            };
            ExternalSocketStatus {
                address: addr.to_string(),
                transport,
                listening: presence.listening,
                transparent: presence.transparent,
                error,
            }
        })
        .collect()
}

/// Whether each of `external`'s addresses has its proxy's socket now, per transport the
/// rules use: (address, transport, presence).
pub(crate) fn presences(
    external: &External,
    tcp: bool,
    udp: bool,
) -> Vec<(SocketAddr, Transport, Result<Presence>)> {
    let transports = [(tcp, Transport::Tcp), (udp, Transport::Udp)];
    let mut out = Vec::new();
    for (_, transport) in transports.into_iter().filter(|(wanted, _)| *wanted) {
        for addr in external.addresses() {
            out.push((addr, transport, presence(addr, transport)));
        }
    }
    out
}

/// For the ready line: listener `name` and its proxy's state now. Warns when the proxy is
/// not listening (its flows get the fail mode until it is) or lacks IP_TRANSPARENT.
pub(crate) fn describe(name: &str, external: &External, tcp: bool, udp: bool) -> String {
    for (addr, transport, presence) in presences(external, tcp, udp) {
        match presence {
            Ok(Presence {
                listening: false, ..
            }) => log::warn!(
                "listener `{name}`: nothing listens at {addr} ({transport:?}) yet: its flows get \
                 the fail mode, and go to the proxy once it listens"
            ),
            Ok(Presence {
                transparent: false, ..
            }) => log::warn!(
                "listener `{name}`: the socket at {addr} ({transport:?}) has no IP_TRANSPARENT: \
                 the proxy cannot answer for other hosts' addresses"
            ),
            Ok(_) => {}
            Err(error) => log::warn!("listener `{name}`: checking {addr}: {error:#}"),
        }
    }
    let transports = match (tcp, udp) {
        (true, true) => "TCP+UDP",
        (true, false) => "TCP",
        (false, true) => "UDP",
        (false, false) => "unused",
    };
    format!("{name} {transports} to the external proxy at {external}")
}

/// `INET_DIAG_SOCKOPT` (Linux 5.10+): the socket's boolean options, `transparent` in bit 5
/// of the first byte.
const INET_DIAG_SOCKOPT: u16 = 22;
const SOCKOPT_TRANSPARENT: u8 = 1 << 5;

/// The sockets in this network namespace that a lookup for `addr` would find: listening
/// (TCP) or unconnected (UDP), on `addr`'s port, bound to its address or to a wildcard that
/// covers it (a dual-stack IPv6 wildcard covers IPv4 too).
pub(crate) fn presence(addr: SocketAddr, transport: Transport) -> Result<Presence> {
    let mut presence = Presence::default();
    for family in [AF_INET, AF_INET6] {
        if addr.is_ipv6() && family == AF_INET {
            continue;
        }
        for socket in dump(family, transport)? {
            let id = &socket.header.socket_id;
            if id.source_port != addr.port() {
                continue;
            }
            let v6_only = socket
                .nlas
                .iter()
                .any(|nla| matches!(nla, Nla::SkV6Only(true)));
            let covers = id.source_address == addr.ip()
                || (id.source_address.is_unspecified()
                    && (id.source_address.is_ipv6() == addr.is_ipv6() || !v6_only));
            let connected =
                socket.header.state == netlink_packet_sock_diag::constants::TCP_ESTABLISHED;
            if !covers || (transport == Transport::Udp && connected) {
                continue;
            }
            presence.listening = true;
            presence.transparent |= socket.nlas.iter().any(|nla| match nla {
                Nla::Other(option) if option.kind() == INET_DIAG_SOCKOPT => {
                    let mut value = vec![0u8; option.value_len()];
                    option.emit_value(&mut value);
                    value
                        .first()
                        .is_some_and(|flags| flags & SOCKOPT_TRANSPARENT != 0)
                }
                _ => false,
            });
        }
    }
    Ok(presence)
}

/// Every listening TCP socket, or every UDP socket, of a family in this network namespace.
fn dump(family: u8, transport: Transport) -> Result<Vec<InetResponse>> {
    let mut socket =
        Socket::new(NETLINK_SOCK_DIAG).context("opening a sock_diag netlink socket")?;
    socket.bind_auto().context("binding the sock_diag socket")?;
    socket
        .connect(&netlink_sys::SocketAddr::new(0, 0))
        .context("connecting the sock_diag socket")?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let (protocol, states) = match transport {
        Transport::Tcp => (IPPROTO_TCP, StateFlags::LISTEN),
        Transport::Udp => (IPPROTO_UDP, StateFlags::all()),
    };
    let socket_id = match family {
        AF_INET => SocketId::new_v4(),
        _ => SocketId::new_v6(),
    };
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol,
            extensions: ExtensionFlags::empty(),
            states,
            socket_id,
        })
        .into(),
    );
    request.finalize();
    let mut buffer = vec![0; request.buffer_len()];
    request.serialize(&mut buffer);
    socket
        .send(&buffer, 0)
        .context("sending a sock_diag request")?;
    let mut sockets = Vec::new();
    let mut received = Vec::with_capacity(64 * 1024);
    loop {
        received.clear();
        let size = socket
            .recv(&mut received, 0)
            .context("reading the sock_diag answer")?;
        let mut offset = 0;
        while offset < size {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(&received[offset..size])
                .context("parsing the sock_diag answer")?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    sockets.push(*response)
                }
                NetlinkPayload::Done(_) => return Ok(sockets),
                NetlinkPayload::Error(error) => bail!("sock_diag: {error}"),
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}
