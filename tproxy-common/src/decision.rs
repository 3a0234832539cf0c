//! The decisions the tc program takes, as pure functions over the values it has read.

use crate::maps::{
    Verdict, VERDICT_BYPASS, VERDICT_BY_SOURCE, VERDICT_BY_SOURCE_AND_IFACE, VERDICT_STEER,
};

/// What the program did with one packet. The discriminant is the packet's index in the
/// `COUNTERS` map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// No rule matched (or the packet could not be parsed that far): left untouched.
    Passed = 0,
    /// Assigned to tproxy's listener: the start of a new proxied flow.
    SteeredNew = 1,
    /// Assigned to the socket that already owns the flow (established or SYN-RECV).
    SteeredEstablished = 2,
    /// In the steering set, but no listening socket was in the socket map: passed.
    NoListener = 3,
    /// `bpf_sk_assign` refused: the socket is in another network namespace.
    AssignErrorNetns = 4,
    /// `bpf_sk_assign` refused: the socket type cannot be assigned (e.g. reuseport before 6.6).
    AssignErrorSocketType = 5,
    /// `bpf_sk_assign` refused: not supported at this hook.
    AssignErrorNotSupported = 6,
    /// `bpf_sk_assign` refused for any other reason.
    AssignErrorOther = 7,
    /// A `bypass` rule matched (and no socket already owned the flow): left untouched.
    Bypassed = 8,
}

impl Outcome {
    /// Number of outcomes, the length of the `COUNTERS` map.
    pub const COUNT: u32 = 9;

    /// Every outcome, in counter-index order.
    pub const ALL: [Outcome; Self::COUNT as usize] = [
        Outcome::Passed,
        Outcome::SteeredNew,
        Outcome::SteeredEstablished,
        Outcome::NoListener,
        Outcome::AssignErrorNetns,
        Outcome::AssignErrorSocketType,
        Outcome::AssignErrorNotSupported,
        Outcome::AssignErrorOther,
        Outcome::Bypassed,
    ];

    /// Stable snake_case name, for logs and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Outcome::Passed => "passed",
            Outcome::SteeredNew => "steered_new",
            Outcome::SteeredEstablished => "steered_established",
            Outcome::NoListener => "no_listener",
            Outcome::AssignErrorNetns => "assign_error_netns",
            Outcome::AssignErrorSocketType => "assign_error_socket_type",
            Outcome::AssignErrorNotSupported => "assign_error_not_supported",
            Outcome::AssignErrorOther => "assign_error_other",
            Outcome::Bypassed => "bypassed",
        }
    }
}

/// The transport protocol a counted packet had, the row of its counter.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp = 0,
    Udp = 1,
    /// Not TCP or UDP, or not parsed that far: only ever [`Outcome::Passed`].
    Other = 2,
}

impl Protocol {
    /// Number of protocols, the rows of the `COUNTERS` map.
    pub const COUNT: u32 = 3;

    /// Every protocol, in row order.
    pub const ALL: [Protocol; Self::COUNT as usize] =
        [Protocol::Tcp, Protocol::Udp, Protocol::Other];

    /// Lower-case name, for logs and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Other => "other",
        }
    }
}

/// The `COUNTERS` index of `outcome` for a packet of `protocol`.
pub const fn counter_index(protocol: Protocol, outcome: Outcome) -> u32 {
    protocol as u32 * Outcome::COUNT + outcome as u32
}

/// What the rules decided for a flow, once every lookup stage has answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleMatch {
    /// No rule matches.
    None,
    /// A `steer` rule matches: to the listener with this index.
    Steer(u32),
    /// A `bypass` rule matches.
    Bypass,
}

/// Whether a destination-stage `verdict` needs the source stage, and with which ifindex in
/// the key.
pub const fn source_stage_ifindex(verdict: &Verdict, ifindex: u32) -> Option<u32> {
    match verdict.action {
        VERDICT_BY_SOURCE => Some(0),
        VERDICT_BY_SOURCE_AND_IFACE => Some(ifindex),
        _ => None,
    }
}

/// Whether a final verdict `candidate` beats `best` so far: only a match counts, and of two
/// matches the lower rank wins.
pub const fn outranks(candidate: &Verdict, best: &Verdict) -> bool {
    is_match(candidate) && (!is_match(best) || candidate.rank < best.rank)
}

const fn is_match(verdict: &Verdict) -> bool {
    matches!(verdict.action, VERDICT_STEER | VERDICT_BYPASS)
}

/// The match a final verdict stands for.
pub const fn rule_match(verdict: &Verdict) -> RuleMatch {
    match verdict.action {
        VERDICT_STEER => RuleMatch::Steer(verdict.listener),
        VERDICT_BYPASS => RuleMatch::Bypass,
        _ => RuleMatch::None,
    }
}

const ENETUNREACH: i64 = 101;
const ESOCKTNOSUPPORT: i64 = 94;
const EOPNOTSUPP: i64 = 95;

/// Classifies the negative errno that `bpf_sk_assign` returned.
pub const fn assign_error(ret: i64) -> Outcome {
    // Compared as negatives: negating `ret` itself would overflow for i64::MIN (found by
    // the `decisions` fuzz target).
    match ret {
        ret if ret == -ENETUNREACH => Outcome::AssignErrorNetns,
        ret if ret == -ESOCKTNOSUPPORT => Outcome::AssignErrorSocketType,
        ret if ret == -EOPNOTSUPP => Outcome::AssignErrorNotSupported,
        _ => Outcome::AssignErrorOther,
    }
}

/// `TCP_LISTEN` from the kernel's `enum tcp_state`.
pub const TCP_LISTEN: u32 = 10;
/// `TCP_TIME_WAIT` from the kernel's `enum tcp_state`.
pub const TCP_TIME_WAIT: u32 = 6;

/// Whether a socket found by an exact-tuple lookup owns the packet's flow, as the iptables
/// socket match decides it. A listener is not the flow's own socket: a wildcard service (sshd
/// on 0.0.0.0:22) matches every destination. Everything else is assigned as found:
/// established and closing connections, SYN-RECV request sockets, and TIME_WAIT sockets.
///
/// A TIME_WAIT socket is assigned even a new SYN reusing its tuple, because only the kernel
/// can retire it: handed the listener directly, the new request would collide with the
/// TIME_WAIT entry and be dropped. The kernel's TIME_WAIT handling accepts the SYN, retires
/// the old socket and looks up a listener for the destination, which the `sk_lookup` program
/// answers with tproxy's listener (what the TPROXY target does for iptables).
pub const fn socket_owns_flow(tcp_state: u32) -> bool {
    tcp_state != TCP_LISTEN
}

/// Whether a UDP socket found by an exact-tuple lookup is one of tproxy's own per-flow
/// sockets (which carry `own_mark` as their `SO_MARK`). Anything else bound to the port — a
/// local wildcard service — must not capture steered flows.
pub const fn is_own_udp_socket(socket_mark: u32, own_mark: u32) -> bool {
    own_mark != 0 && socket_mark == own_mark
}

/// Whether a packet was sent by one of tproxy's own sockets (it carries their `SO_MARK`; only
/// seen at ingress on `lo`): never steered, so the relay cannot re-enter its own steering.
pub const fn sent_by_tproxy(packet_mark: u32, own_mark: u32) -> bool {
    own_mark != 0 && packet_mark == own_mark
}

/// The packet mark after setting tproxy's routing mark: only the bits under `mask` change, so
/// marks that other tools keep in the other bits survive.
pub const fn with_routing_mark(current: u32, mark: u32, mask: u32) -> u32 {
    (current & !mask) | (mark & mask)
}

/// Whether a packet arrived with an 802.1Q tag (taken off by the kernel before tc sees the
/// packet) for a VLAN other than 0: it belongs to that VLAN's interface, and is steered there
/// if tproxy is attached there, not on the parent. VLAN 0 only carries a priority.
pub const fn belongs_to_vlan_interface(vlan_present: u32, vlan_tci: u32) -> bool {
    vlan_present != 0 && vlan_tci & 0x0fff != 0
}

/// Where the transport header starts in an IPv4 packet, from the header's first byte
/// (version and IHL) and its flags/fragment-offset field (host byte order). `None` for
/// anything whose transport header is not there to steer by: not version 4, a header length
/// below the minimum, or a fragment (later fragments carry no transport header, and a first
/// fragment is left alone as the kernel's own reassembly will see it whole).
pub const fn ipv4_transport_offset(version_ihl: u8, flags_fragment: u16) -> Option<usize> {
    const MORE_FRAGMENTS: u16 = 0x2000;
    const OFFSET_MASK: u16 = 0x1fff;
    if version_ihl >> 4 != 4 {
        return None;
    }
    let header_words = (version_ihl & 0x0f) as usize;
    if header_words < 5 || flags_fragment & (MORE_FRAGMENTS | OFFSET_MASK) != 0 {
        return None;
    }
    Some(header_words * 4)
}

/// Whether the program drops a packet instead of passing it on: only in fail-closed mode
/// (`fail_closed` ≠ 0), and only for a packet a steer rule took that no socket could get —
/// no listener registered, as while no tproxy process runs over pinned state. Everything
/// else, bypassed or unmatched traffic included, always passes.
pub const fn drops_packet(outcome: Outcome, fail_closed: u32) -> bool {
    fail_closed != 0 && matches!(outcome, Outcome::NoListener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_steered_packets_without_a_listener_are_dropped_and_only_when_failing_closed() {
        for outcome in Outcome::ALL {
            assert!(
                !drops_packet(outcome, 0),
                "fail-open dropped {}",
                outcome.name()
            );
            assert_eq!(
                drops_packet(outcome, 1),
                outcome == Outcome::NoListener,
                "fail-closed and {}",
                outcome.name()
            );
        }
    }

    #[test]
    fn counter_indices_match_table_order() {
        for (index, outcome) in Outcome::ALL.iter().enumerate() {
            assert_eq!(*outcome as usize, index, "{}", outcome.name());
        }
    }

    #[test]
    fn counter_rows_do_not_overlap() {
        let mut seen = [false; (Protocol::COUNT * Outcome::COUNT) as usize];
        for protocol in Protocol::ALL {
            assert_eq!(Protocol::ALL[protocol as usize], protocol);
            for outcome in Outcome::ALL {
                let index = counter_index(protocol, outcome) as usize;
                assert!(!seen[index], "{} {}", protocol.name(), outcome.name());
                seen[index] = true;
            }
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn a_listener_never_owns_the_flow() {
        assert!(!socket_owns_flow(TCP_LISTEN));
    }

    #[test]
    fn connected_closing_request_and_time_wait_sockets_own_the_flow() {
        const ESTABLISHED: u32 = 1;
        const SYN_RECV: u32 = 3;
        const FIN_WAIT1: u32 = 4;
        const CLOSE_WAIT: u32 = 8;
        const NEW_SYN_RECV: u32 = 12;
        for state in [
            ESTABLISHED,
            SYN_RECV,
            FIN_WAIT1,
            TCP_TIME_WAIT,
            CLOSE_WAIT,
            NEW_SYN_RECV,
        ] {
            assert!(socket_owns_flow(state), "state {state}");
        }
    }

    #[test]
    fn only_sockets_with_our_mark_are_ours() {
        assert!(is_own_udp_socket(0x200_0000, 0x200_0000));
        assert!(
            !is_own_udp_socket(0, 0x200_0000),
            "an unmarked local service"
        );
        assert!(
            !is_own_udp_socket(0x300_0000, 0x200_0000),
            "someone else's mark"
        );
        assert!(
            !is_own_udp_socket(0, 0),
            "an unset own mark matches nothing"
        );
    }

    #[test]
    fn packets_of_our_own_sockets_are_recognised_by_their_mark() {
        assert!(sent_by_tproxy(0x200_0000, 0x200_0000));
        assert!(!sent_by_tproxy(0, 0x200_0000));
        assert!(!sent_by_tproxy(0, 0), "an unset own mark matches nothing");
    }

    #[test]
    fn routing_mark_only_touches_masked_bits() {
        assert_eq!(with_routing_mark(0, 0x100_0000, 0x100_0000), 0x100_0000);
        assert_eq!(
            with_routing_mark(0xffff, 0x100_0000, 0x100_0000),
            0x100_ffff
        );
        assert_eq!(
            with_routing_mark(0x0f00_00ff, 0x0100_0000, 0x0f00_0000),
            0x0100_00ff
        );
        // Mark bits outside the mask are never written.
        assert_eq!(with_routing_mark(0, 0xffff_ffff, 0x10), 0x10);
    }

    #[test]
    fn only_tagged_packets_of_a_real_vlan_belong_to_another_interface() {
        assert!(!belongs_to_vlan_interface(0, 0));
        assert!(
            !belongs_to_vlan_interface(1, 0x6000),
            "VLAN 0 with a priority"
        );
        assert!(belongs_to_vlan_interface(1, 5));
        assert!(
            belongs_to_vlan_interface(1, 0xe005),
            "VLAN 5 with a priority"
        );
        assert!(!belongs_to_vlan_interface(0, 5), "no tag present");
    }

    #[test]
    fn ipv4_plain_header_and_options() {
        assert_eq!(ipv4_transport_offset(0x45, 0), Some(20));
        assert_eq!(ipv4_transport_offset(0x4f, 0), Some(60));
        // Don't-fragment alone is not a fragment.
        assert_eq!(ipv4_transport_offset(0x46, 0x4000), Some(24));
    }

    #[test]
    fn ipv4_fragments_bad_lengths_and_versions_are_not_steered() {
        assert_eq!(ipv4_transport_offset(0x45, 0x2000), None, "first fragment");
        assert_eq!(ipv4_transport_offset(0x45, 0x0001), None, "later fragment");
        assert_eq!(ipv4_transport_offset(0x44, 0), None, "IHL below 5");
        assert_eq!(ipv4_transport_offset(0x65, 0), None, "version 6");
    }

    #[test]
    fn rule_stages_end_in_a_match_or_ask_for_the_source() {
        let verdict = |action, rank| Verdict {
            action,
            listener: 3,
            cell: 7,
            rank,
        };
        assert_eq!(
            source_stage_ifindex(&verdict(VERDICT_BY_SOURCE, 0), 9),
            Some(0)
        );
        assert_eq!(
            source_stage_ifindex(&verdict(VERDICT_BY_SOURCE_AND_IFACE, 0), 9),
            Some(9)
        );
        assert_eq!(source_stage_ifindex(&verdict(VERDICT_STEER, 0), 9), None);
        assert_eq!(rule_match(&verdict(VERDICT_STEER, 0)), RuleMatch::Steer(3));
        assert_eq!(rule_match(&verdict(VERDICT_BYPASS, 0)), RuleMatch::Bypass);
        assert_eq!(rule_match(&verdict(0, 0)), RuleMatch::None);
        assert_eq!(
            rule_match(&verdict(77, 0)),
            RuleMatch::None,
            "unknown action"
        );
    }

    #[test]
    fn the_lower_rank_wins_and_no_match_never_does() {
        let verdict = |action, rank| Verdict {
            action,
            listener: 0,
            cell: 0,
            rank,
        };
        let none = Verdict::default();
        assert!(outranks(&verdict(VERDICT_BYPASS, 9), &none));
        assert!(!outranks(&none, &verdict(VERDICT_BYPASS, 9)));
        assert!(outranks(
            &verdict(VERDICT_STEER, 3),
            &verdict(VERDICT_BYPASS, 4)
        ));
        assert!(!outranks(
            &verdict(VERDICT_STEER, 4),
            &verdict(VERDICT_BYPASS, 4)
        ));
        assert!(
            !outranks(&verdict(VERDICT_BY_SOURCE, 0), &none),
            "not final"
        );
    }

    #[test]
    fn assign_errors_by_reason() {
        assert_eq!(assign_error(-101), Outcome::AssignErrorNetns);
        assert_eq!(assign_error(-94), Outcome::AssignErrorSocketType);
        assert_eq!(assign_error(-95), Outcome::AssignErrorNotSupported);
        assert_eq!(assign_error(-22), Outcome::AssignErrorOther);
        assert_eq!(assign_error(i64::MIN), Outcome::AssignErrorOther);
    }
}
