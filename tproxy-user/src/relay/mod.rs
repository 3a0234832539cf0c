//! Where a steered flow goes next: a transparent `listener` takes it, and the `tcp` relay
//! (with `splice` moving the bytes) or the `udp` sessions carry it to its upstream.
//! `listeners` keeps the set of listeners in line with the configuration, committing what
//! `plan` works out.

pub(crate) mod external;
pub(crate) mod kernel;
pub(crate) mod listener;
pub(crate) mod listeners;
pub(crate) mod plan;
pub(crate) mod splice;
pub(crate) mod tcp;
pub(crate) mod udp;

use std::net::IpAddr;

/// Whether the per-source caps count a client at `source`. A loopback source is the host's
/// own processes, many clients behind one address: every steered local connection comes
/// from 127.0.0.1 or ::1, every steered `sendto()` datagram from 127.84.80.1 or ::1 (see
/// `datapath::routing`), so a cap per address would be one cap for the whole host. They are
/// held to the overall caps only. Only the loopback addresses themselves: the IPv6
/// listeners take IPv6 alone (`IPV6_V6ONLY`), so an IPv4-mapped loopback source
/// (`::ffff:127.0.0.1`) on them is a datagram forged elsewhere, which the kernel lets in
/// where it drops `127.0.0.1` and `::1` arriving from outside: such a client is capped.
pub(crate) fn capped_per_source(source: IpAddr) -> bool {
    !source.is_loopback()
}

#[cfg(test)]
mod tests {
    use super::capped_per_source;

    #[test]
    fn loopback_clients_are_held_to_the_overall_caps_only() {
        for host in ["127.0.0.1", "127.84.80.1", "::1"] {
            assert!(!capped_per_source(host.parse().unwrap()), "{host}");
        }
        // Found by the hostile tester: forged IPv6 datagrams from a mapped loopback source
        // took every UDP session past the per-source cap.
        for client in [
            "192.168.1.20",
            "fd00::20",
            "::ffff:192.168.1.20",
            "::ffff:127.0.0.1",
            "::ffff:127.84.80.1",
        ] {
            assert!(capped_per_source(client.parse().unwrap()), "{client}");
        }
    }
}
