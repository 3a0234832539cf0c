//! The tc program's pure decisions: total (never panic) and within their stated bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tproxy_common::decision::{
    assign_error, belongs_to_vlan_interface, counter_index, ipv4_transport_offset,
    is_own_udp_socket, socket_owns_flow, with_routing_mark, Outcome, Protocol,
};

fuzz_target!(|input: (u8, u16, u32, u32, u32, i64)| {
    let (version_ihl, fragment, a, b, c, errno) = input;
    if let Some(offset) = ipv4_transport_offset(version_ihl, fragment) {
        assert!((20..=60).contains(&offset) && offset % 4 == 0);
        assert_eq!(version_ihl >> 4, 4);
        assert_eq!(fragment & 0x3fff, 0, "fragments are never steered");
    }
    let marked = with_routing_mark(a, b, c);
    assert_eq!(marked & !c, a & !c, "bits outside the mask are kept");
    assert_eq!(marked & c, b & c, "bits under the mask are the mark's");
    assert_eq!(is_own_udp_socket(a, b), b != 0 && a == b);
    let _ = socket_owns_flow(a);
    let _ = belongs_to_vlan_interface(a, b);
    let outcome = assign_error(errno);
    for protocol in Protocol::ALL {
        assert!(counter_index(protocol, outcome) < Protocol::COUNT * Outcome::COUNT);
    }
});
