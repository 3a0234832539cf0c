//! The tc program's pure decisions: total (never panic) and within their stated bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tproxy_common::decision::{
    assign_error, belongs_to_vlan_interface, counter_index, destination_scope, fragment_outcome,
    ipv4_destination_scope, ipv4_layout, ipv6_destination_scope, ipv6_step, carries_own_mark,
    socket_owns_flow, tc_action, with_routing_mark, FragmentPosition, Ipv6Step, Outcome, Protocol,
    TcAction,
};

fuzz_target!(|input: (u8, u16, u32, u32, u32, i64, [u8; 8], [u8; 16])| {
    let (version_ihl, fragment, a, b, c, errno, head, addr) = input;
    if let Some((offset, position)) = ipv4_layout(version_ihl, fragment) {
        assert!((20..=60).contains(&offset) && offset % 4 == 0);
        assert_eq!(version_ihl >> 4, 4);
        assert_eq!(
            position == FragmentPosition::Whole,
            fragment & 0x3fff == 0,
            "whole exactly when neither more fragments nor an offset"
        );
    }
    match ipv6_step(head[0], head) {
        Ipv6Step::Skip { len, .. } => assert!((8..=2048).contains(&len) && len % 4 == 0),
        Ipv6Step::Fragment { .. } => assert_eq!(head[0], 44),
        Ipv6Step::Transport(next) => assert_eq!(next, head[0]),
    }
    let marked = with_routing_mark(a, b, c);
    assert_eq!(marked & !c, a & !c, "bits outside the mask are kept");
    assert_eq!(marked & c, b & c, "bits under the mask are the mark's");
    assert_eq!(carries_own_mark(a, b), b != 0 && a == b);
    let _ = socket_owns_flow(a);
    let _ = belongs_to_vlan_interface(a, b);
    let outcome = assign_error(errno);
    for protocol in Protocol::ALL {
        assert!(counter_index(protocol, outcome) < Protocol::COUNT * Outcome::COUNT);
    }
    let outcome = Outcome::from_index(a % Outcome::COUNT).unwrap();
    let once = fragment_outcome(outcome);
    assert_eq!(fragment_outcome(once), once);
    if tc_action(outcome, 0) == TcAction::Drop {
        assert_eq!(
            tc_action(outcome, 1),
            TcAction::Drop,
            "what fails open is dropped closed too"
        );
    }
    let v6: std::net::Ipv6Addr = addr.into();
    let client: std::net::IpAddr = if a & 1 != 0 {
        std::net::Ipv6Addr::LOCALHOST.into()
    } else {
        v6.into()
    };
    let local = client.is_loopback();
    assert_eq!(
        ipv6_destination_scope(addr, local),
        destination_scope(v6.into(), client)
    );
    let v4 = [addr[0], addr[1], addr[2], addr[3]];
    let v4_addr: std::net::IpAddr = std::net::Ipv4Addr::from(v4).into();
    assert_eq!(
        ipv4_destination_scope(v4, local),
        destination_scope(v4_addr, client)
    );
});
