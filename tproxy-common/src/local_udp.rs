//! The direction of a local process's UDP datagrams, for rules for local connections with
//! `ct_direction` (iptables' `-m conntrack --ctdir` and nft's `ct direction` in OUTPUT).
//!
//! A TCP connection that a local process opens is always the original direction: the
//! connect programs see only `connect()`, and the kernel's conntrack gives a connection's
//! direction by who sent its first packet. UDP has no such moment. A local server answers
//! with `sendto()` on the socket its request came in on, and conntrack reads that answer as
//! the reply of the flow the request started; the `sendmsg` programs run before conntrack
//! sees the datagram, and a `cgroup/sendmsg` program cannot ask conntrack (its kfuncs take a
//! packet). So the programs keep the little conntrack they need themselves: per socket
//! (cookie) and peer, who sent first and when the flow expires, by conntrack's own UDP
//! timing. `cgroup/recvmsg4` and `cgroup/recvmsg6` see what a socket receives (with the
//! peer it came from), the `sendmsg` and connect programs what it sends; each datagram moves
//! the flow on with [`UdpFlow::step`], whose answer is the datagram's direction.
//!
//! Where this differs from conntrack: it is per socket, not per address tuple (a server
//! answering from a second socket bound to the same port starts a flow of its own); an
//! entry the map's LRU pushed out starts again as original; the receive side is seen when
//! the process reads the datagram, not when it arrives.

use crate::{
    local_origin::ipv4_mapped,
    maps::{CT_ORIGINAL, CT_REPLY},
};

/// LRU hash map of [`UdpPeer`] to [`UdpFlow`].
pub const UDP_FLOWS_MAP: &str = "LOCAL_UDP_FLOWS";
/// Its size while local origin is steered (otherwise the loader makes it 1): the flows
/// tracked at once, as many as conntrack's default table holds (a 32-byte key and a 24-byte
/// value each, about 7 MB of kernel memory with the LRU's own). A server with more flows
/// within the timeouts loses some to the LRU, and their answers read as original.
pub const MAX_UDP_FLOWS: u32 = 65536;
/// Name of the `cgroup/recvmsg4` program in the object file.
pub const RECVMSG4_PROGRAM_NAME: &str = "tproxy_recvmsg4";
/// Name of the `cgroup/recvmsg6` program in the object file.
pub const RECVMSG6_PROGRAM_NAME: &str = "tproxy_recvmsg6";
/// Global (`u64`): conntrack's timeout of a UDP flow that has not seen both directions for
/// two seconds, in nanoseconds (`net.netfilter.nf_conntrack_udp_timeout`).
pub const UDP_TIMEOUT_GLOBAL: &str = "UDP_TIMEOUT_NS";
/// Global (`u64`): its timeout of one that has (`nf_conntrack_udp_timeout_stream`).
pub const UDP_STREAM_TIMEOUT_GLOBAL: &str = "UDP_STREAM_TIMEOUT_NS";
/// conntrack's defaults for the two (30 s, 120 s), used where the sysctls cannot be read.
pub const DEFAULT_UDP_TIMEOUT_NS: u64 = 30_000_000_000;
pub const DEFAULT_UDP_STREAM_TIMEOUT_NS: u64 = 120_000_000_000;
/// How long a flow must have lasted before a datagram with replies seen extends it by the
/// stream timeout (conntrack's `stream_ts`, two seconds after the first packet).
pub const UDP_STREAM_AFTER_NS: u64 = 2_000_000_000;

/// A socket and one of its peers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpPeer {
    /// The socket's cookie.
    pub cookie: u64,
    /// The peer's address; an IPv4 one IPv4-mapped, as a dual-stack socket sees it.
    pub addr: [u8; 16],
    /// The peer's port, as the context holds it (network order, low 16 bits).
    pub port: u32,
    pub _pad: u32,
}

impl UdpPeer {
    /// The peer of an IPv4 context (`addr` in network order).
    pub const fn ipv4(cookie: u64, addr: [u8; 4], port: u32) -> Self {
        UdpPeer {
            cookie,
            addr: ipv4_mapped(addr),
            port,
            _pad: 0,
        }
    }
}

/// What conntrack would hold of a socket's flow with a peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpFlow {
    /// When its first datagram went (`bpf_ktime_get_ns`).
    pub first_ns: u64,
    /// When it is forgotten unless another datagram comes.
    pub expires_ns: u64,
    /// 1 when the peer sent first: the socket's datagrams to it are replies.
    pub started_by_peer: u32,
    /// 1 once a datagram went the other way (conntrack's `IPS_SEEN_REPLY`).
    pub seen_reply: u32,
}

/// conntrack's UDP timeouts, in nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpTimeouts {
    pub unreplied_ns: u64,
    pub stream_ns: u64,
}

impl UdpFlow {
    /// The flow after one more datagram at `now` (`from_peer`: received from the peer, else
    /// sent to it), with that datagram's direction ([`CT_ORIGINAL`] or [`CT_REPLY`]). A
    /// datagram of no flow, or of an expired one, starts a new flow and is its original.
    /// Each later datagram extends the flow as conntrack's UDP tracker does: by the stream
    /// timeout once replies were seen and the flow has lasted two seconds, else by the
    /// unreplied one.
    pub const fn step(
        flow: Option<UdpFlow>,
        now: u64,
        from_peer: bool,
        timeouts: UdpTimeouts,
    ) -> (UdpFlow, u32) {
        let flow = match flow {
            Some(flow) if now < flow.expires_ns => flow,
            _ => {
                let started = UdpFlow {
                    first_ns: now,
                    expires_ns: now.saturating_add(timeouts.unreplied_ns),
                    started_by_peer: from_peer as u32,
                    seen_reply: 0,
                };
                return (started, CT_ORIGINAL);
            }
        };
        // conntrack extends by what it had seen before this datagram; a reply marks the
        // flow replied for the next.
        let stream =
            flow.seen_reply != 0 && now > flow.first_ns.saturating_add(UDP_STREAM_AFTER_NS);
        let timeout = if stream {
            timeouts.stream_ns
        } else {
            timeouts.unreplied_ns
        };
        let reply = (flow.started_by_peer != 0) != from_peer;
        let next = UdpFlow {
            first_ns: flow.first_ns,
            expires_ns: now.saturating_add(timeout),
            started_by_peer: flow.started_by_peer,
            seen_reply: (flow.seen_reply != 0 || reply) as u32,
        };
        (next, if reply { CT_REPLY } else { CT_ORIGINAL })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;
    const TIMEOUTS: UdpTimeouts = UdpTimeouts {
        unreplied_ns: 30 * S,
        stream_ns: 120 * S,
    };

    #[test]
    fn a_server_answering_its_request_replies() {
        let (flow, dir) = UdpFlow::step(None, 10 * S, true, TIMEOUTS);
        assert_eq!(dir, CT_ORIGINAL, "the request starts the flow");
        let (flow, dir) = UdpFlow::step(Some(flow), 11 * S, false, TIMEOUTS);
        assert_eq!(dir, CT_REPLY);
        assert_eq!(flow.seen_reply, 1);
        let (_, dir) = UdpFlow::step(Some(flow), 12 * S, true, TIMEOUTS);
        assert_eq!(dir, CT_ORIGINAL, "the next request");
    }

    #[test]
    fn a_client_hearing_back_stays_original() {
        let (flow, dir) = UdpFlow::step(None, S, false, TIMEOUTS);
        assert_eq!(dir, CT_ORIGINAL);
        let (flow, dir) = UdpFlow::step(Some(flow), 2 * S, true, TIMEOUTS);
        assert_eq!(dir, CT_REPLY, "the answer is the flow's reply");
        let (_, dir) = UdpFlow::step(Some(flow), 3 * S, false, TIMEOUTS);
        assert_eq!(dir, CT_ORIGINAL, "and the client's next datagram original");
    }

    #[test]
    fn an_expired_flow_starts_again_with_whoever_sends() {
        let (flow, _) = UdpFlow::step(None, S, true, TIMEOUTS);
        assert_eq!(flow.expires_ns, 31 * S);
        let (flow, dir) = UdpFlow::step(Some(flow), 31 * S, false, TIMEOUTS);
        assert_eq!(
            dir, CT_ORIGINAL,
            "30 s of silence: conntrack forgot the request"
        );
        assert_eq!(flow.started_by_peer, 0);
        assert_eq!(flow.first_ns, 31 * S);
    }

    #[test]
    fn replies_after_two_seconds_extend_by_the_stream_timeout() {
        let (flow, _) = UdpFlow::step(None, 0, true, TIMEOUTS);
        let (flow, _) = UdpFlow::step(Some(flow), S, false, TIMEOUTS);
        assert_eq!(
            flow.expires_ns,
            31 * S,
            "the first reply extends by the unreplied one"
        );
        let (flow, _) = UdpFlow::step(Some(flow), 2 * S, true, TIMEOUTS);
        assert_eq!(
            flow.expires_ns,
            32 * S,
            "not yet two seconds past the first"
        );
        let (flow, _) = UdpFlow::step(Some(flow), 3 * S, false, TIMEOUTS);
        assert_eq!(flow.expires_ns, 123 * S);
        let (_, dir) = UdpFlow::step(Some(flow), 100 * S, false, TIMEOUTS);
        assert_eq!(dir, CT_REPLY, "still the same flow after 97 s");
    }

    #[test]
    fn an_ipv4_peer_is_kept_mapped() {
        let peer = UdpPeer::ipv4(7, [192, 0, 2, 1], 53);
        assert_eq!(
            peer.addr,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 1]
        );
    }
}
