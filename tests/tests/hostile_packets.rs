//! Odd and hostile frames injected into the steered interface with a raw packet socket: the
//! program must steer what it can parse as a flow of a rule, and pass everything else
//! untouched — checked with its counters and with what reaches the relay and the server.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use tproxy_tests::{require_root, Netns, RouterTopology as Topo, Tproxy, UdpEcho};

const UDP_PORT: u16 = 5300;
const TCP_PORT: u16 = 80;

/// Sends raw Ethernet frames out of the client's `eth0`, to the router.
struct Injector {
    socket: i32,
    ifindex: i32,
    client_mac: [u8; 6],
    router_mac: [u8; 6],
}

fn mac_of(netns: &Netns, iface: &str) -> [u8; 6] {
    let text = netns.ip(&["link", "show", iface]).unwrap();
    let hex = text
        .split("link/ether ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(hex.split(':')) {
        *byte = u8::from_str_radix(part, 16).unwrap();
    }
    mac
}

impl Injector {
    fn new(topo: &Topo) -> Self {
        let (socket, ifindex) = topo.client.run(|| {
            let socket = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
            assert!(
                socket >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let ifindex = nix::net::if_::if_nametoindex("eth0").unwrap() as i32;
            (socket, ifindex)
        });
        Injector {
            socket,
            ifindex,
            client_mac: mac_of(&topo.client, "eth0"),
            router_mac: mac_of(&topo.router, Topo::ROUTER_CLIENT_IFACE),
        }
    }

    /// Sends `payload` after an Ethernet header with `ethertype` (and 802.1Q `vlan` tag).
    fn send(&self, ethertype: u16, vlan: Option<u16>, payload: &[u8]) {
        let mut frame = Vec::new();
        frame.extend_from_slice(&self.router_mac);
        frame.extend_from_slice(&self.client_mac);
        if let Some(tci) = vlan {
            frame.extend_from_slice(&0x8100u16.to_be_bytes());
            frame.extend_from_slice(&tci.to_be_bytes());
        }
        frame.extend_from_slice(&ethertype.to_be_bytes());
        frame.extend_from_slice(payload);
        let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_ifindex = self.ifindex;
        address.sll_halen = 6;
        address.sll_addr[..6].copy_from_slice(&self.router_mac);
        let sent = unsafe {
            libc::sendto(
                self.socket,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&address as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            sent,
            frame.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
    }
}

impl Drop for Injector {
    fn drop(&mut self) {
        unsafe { libc::close(self.socket) };
    }
}

fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    for chunk in chunks {
        for pair in chunk.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet: `options` (a multiple of 4 bytes) and the flags/fragment field as given.
fn ipv4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    options: &[u8],
    fragment: u16,
    payload: &[u8],
) -> Vec<u8> {
    let header_len = 20 + options.len();
    let mut header = vec![0u8; header_len];
    header[0] = 0x40 | (header_len / 4) as u8;
    header[2..4].copy_from_slice(&((header_len + payload.len()) as u16).to_be_bytes());
    header[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    header[6..8].copy_from_slice(&fragment.to_be_bytes());
    header[8] = 64;
    header[9] = protocol;
    header[12..16].copy_from_slice(&src.octets());
    header[16..20].copy_from_slice(&dst.octets());
    header[20..].copy_from_slice(options);
    let sum = checksum(&[&header]);
    header[10..12].copy_from_slice(&sum.to_be_bytes());
    header.extend_from_slice(payload);
    header
}

/// An IPv6 packet whose payload starts with `next_header`'s header.
fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, payload: &[u8]) -> Vec<u8> {
    let mut packet = vec![0u8; 40];
    packet[0] = 0x60;
    packet[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    packet[6] = next_header;
    packet[7] = 64;
    packet[8..24].copy_from_slice(&src.octets());
    packet[24..40].copy_from_slice(&dst.octets());
    packet.extend_from_slice(payload);
    packet
}

/// A UDP datagram with its checksum over the pseudo-header of `src` and `dst`.
fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let mut datagram = Vec::new();
    datagram.extend_from_slice(&sport.to_be_bytes());
    datagram.extend_from_slice(&dport.to_be_bytes());
    datagram.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    datagram.extend_from_slice(&[0, 0]);
    datagram.extend_from_slice(data);
    let sum = checksum(&[&pseudo_header(src, dst, 17, datagram.len()), &datagram]);
    datagram[6..8].copy_from_slice(&sum.to_be_bytes());
    datagram
}

/// A bare TCP header with `flags`.
fn tcp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut segment = vec![0u8; 20];
    segment[0..2].copy_from_slice(&sport.to_be_bytes());
    segment[2..4].copy_from_slice(&dport.to_be_bytes());
    segment[4..8].copy_from_slice(&1000u32.to_be_bytes());
    segment[12] = 5 << 4;
    segment[13] = flags;
    segment[14..16].copy_from_slice(&65535u16.to_be_bytes());
    let sum = checksum(&[&pseudo_header(src, dst, 6, segment.len()), &segment]);
    segment[16..18].copy_from_slice(&sum.to_be_bytes());
    segment
}

fn pseudo_header(src: IpAddr, dst: IpAddr, protocol: u8, len: usize) -> Vec<u8> {
    let mut pseudo = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, protocol]);
            pseudo.extend_from_slice(&(len as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&(len as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, protocol]);
        }
        _ => unreachable!(),
    }
    pseudo
}

/// An IPv6 extension header (hop-by-hop, routing, destination options) of 8 bytes.
fn extension(next_header: u8, kind: u8) -> Vec<u8> {
    match kind {
        // Routing header type 0 with no segments left: ignored by the receiver.
        43 => vec![next_header, 0, 0, 0, 0, 0, 0, 0],
        // Hop-by-hop / destination options: a PadN option filling the 8 bytes.
        _ => vec![next_header, 0, 1, 4, 0, 0, 0, 0],
    }
}

/// The counters tproxy reports for `protocol` ("tcp", "udp", "other").
fn counters(tproxy: &mut Tproxy, protocol: &str) -> (u64, u64, u64) {
    let header = format!("eBPF {protocol} packets:");
    let passed = tproxy.stat_line(&header, "passed").unwrap();
    let (new, established) = if protocol == "other" {
        (0, 0)
    } else {
        (
            tproxy.last_value(&header, "steered_new").unwrap(),
            tproxy.last_value(&header, "steered_established").unwrap(),
        )
    };
    (passed, new, established)
}

/// Injects one case and returns how the counters moved: packets of `protocol` passed, and
/// packets steered (TCP and UDP together: nothing else is sending them here).
fn inject(tproxy: &mut Tproxy, protocol: &str, send: impl FnOnce()) -> (u64, u64) {
    let steered = |tproxy: &mut Tproxy| {
        let (_, tcp_new, tcp_established) = counters(tproxy, "tcp");
        let (_, udp_new, udp_established) = counters(tproxy, "udp");
        tcp_new + tcp_established + udp_new + udp_established
    };
    let (passed_before, steered_before) = (counters(tproxy, protocol).0, steered(tproxy));
    send();
    std::thread::sleep(Duration::from_millis(100));
    let (passed_after, steered_after) = (counters(tproxy, protocol).0, steered(tproxy));
    (passed_after - passed_before, steered_after - steered_before)
}

fn wait_for_peer(server: &UdpEcho, peer: IpAddr) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if server.peer_ips().contains(&peer) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn odd_and_hostile_frames_are_steered_or_passed_as_documented() {
    require_root();
    let topo = Topo::new().unwrap();
    let server = UdpEcho::start(&topo.server, Topo::server_addr(false, UDP_PORT)).unwrap();
    let mut tproxy = topo
        .tproxy(&[
            "--udp",
            &UDP_PORT.to_string(),
            "--tcp",
            &TCP_PORT.to_string(),
        ])
        .unwrap();
    let injector = Injector::new(&topo);
    let (client, dst): (Ipv4Addr, Ipv4Addr) =
        ("10.10.1.2".parse().unwrap(), "10.10.2.2".parse().unwrap());
    let (c, d) = (IpAddr::V4(client), IpAddr::V4(dst));
    let (client6, dst6): (Ipv6Addr, Ipv6Addr) =
        ("fd00:1::2".parse().unwrap(), "fd00:2::2".parse().unwrap());
    let (c6, d6) = (IpAddr::V6(client6), IpAddr::V6(dst6));
    let router = Topo::router_as_seen_by_server(false);
    let mut sport = 40_000u16;
    let mut next_port = || {
        sport += 1;
        sport
    };

    // IPv4 with options (IHL 6: four NOPs): steered, and relayed to the server.
    let port = next_port();
    let datagram = udp(c, d, port, UDP_PORT, b"options");
    let moved = inject(&mut tproxy, "udp", || {
        injector.send(
            0x0800,
            None,
            &ipv4(client, dst, 17, &[1, 1, 1, 1], 0x4000, &datagram),
        )
    });
    assert_eq!(moved, (0, 1), "IPv4 with options");
    assert!(
        wait_for_peer(&server, router),
        "the datagram with options reached the server through the relay"
    );

    // Priority-tagged (VLAN 0) frame: steered like an untagged one.
    let port = next_port();
    let datagram = udp(c, d, port, UDP_PORT, b"vlan0");
    let moved = inject(&mut tproxy, "udp", || {
        injector.send(
            0x0800,
            Some(0x6000),
            &ipv4(client, dst, 17, &[], 0, &datagram),
        )
    });
    assert_eq!(moved, (0, 1), "VLAN 0 priority tag");

    // A frame of VLAN 5: belongs to a VLAN interface tproxy is not attached to.
    let port = next_port();
    let datagram = udp(c, d, port, UDP_PORT, b"vlan5");
    let moved = inject(&mut tproxy, "other", || {
        injector.send(0x0800, Some(5), &ipv4(client, dst, 17, &[], 0, &datagram))
    });
    assert!(
        moved.0 >= 1 && moved.1 == 0,
        "VLAN 5: passed, counted as other: {moved:?}"
    );

    // IPv4 fragments, first and later: passed untouched (the kernel reassembles them).
    let port = next_port();
    let datagram = udp(c, d, port, UDP_PORT, &[7u8; 64]);
    let moved = inject(&mut tproxy, "udp", || {
        injector.send(
            0x0800,
            None,
            &ipv4(client, dst, 17, &[], 0x2000, &datagram[..32]),
        )
    });
    assert_eq!(moved, (1, 0), "first fragment");
    let moved = inject(&mut tproxy, "udp", || {
        injector.send(
            0x0800,
            None,
            &ipv4(client, dst, 17, &[], 4, &datagram[32..]),
        )
    });
    assert_eq!(moved, (1, 0), "later fragment");

    // Truncated: an IPv4 header announcing UDP, then no UDP header; and a runt IPv4 header.
    let moved = inject(&mut tproxy, "udp", || {
        injector.send(0x0800, None, &ipv4(client, dst, 17, &[], 0, &[0xde, 0xad]))
    });
    assert_eq!(moved, (1, 0), "UDP header cut short");
    let moved = inject(&mut tproxy, "other", || {
        injector.send(0x0800, None, &[0x45, 0, 0, 20, 0, 0])
    });
    assert!(
        moved.0 >= 1 && moved.1 == 0,
        "IPv4 header cut short: {moved:?}"
    );

    // IPv6 with extension headers (hop-by-hop, routing, fragment): passed, as "other".
    for (kind, name) in [(0u8, "hop-by-hop"), (43, "routing"), (44, "fragment")] {
        let port = next_port();
        let datagram = udp(c6, d6, port, UDP_PORT, name.as_bytes());
        let mut payload = if kind == 44 {
            vec![17, 0, 0, 0, 0, 0, 0, 1]
        } else {
            extension(17, kind)
        };
        payload.extend_from_slice(&datagram);
        let moved = inject(&mut tproxy, "other", || {
            injector.send(0x86dd, None, &ipv6(client6, dst6, kind, &payload))
        });
        assert!(
            moved.0 >= 1 && moved.1 == 0,
            "IPv6 {name} header: {moved:?}"
        );
    }
    // Plain IPv6 UDP: steered.
    let port = next_port();
    let datagram = udp(c6, d6, port, UDP_PORT, b"plain6");
    let moved = inject(&mut tproxy, "udp", || {
        injector.send(0x86dd, None, &ipv6(client6, dst6, 17, &datagram))
    });
    assert_eq!(moved, (0, 1), "plain IPv6");

    // TCP with odd flags to a steered port: steered (flags are the listener's TCP stack's
    // business, as with the TPROXY target), and the stack accepts no connection from them.
    for (flags, name) in [
        (0x03u8, "SYN+FIN"),
        (0x00, "no flags"),
        (0x29, "FIN+PSH+URG"),
    ] {
        let port = next_port();
        let segment = tcp(c, d, port, TCP_PORT, flags);
        let moved = inject(&mut tproxy, "tcp", || {
            injector.send(0x0800, None, &ipv4(client, dst, 6, &[], 0x4000, &segment))
        });
        assert_eq!(moved, (0, 1), "TCP {name}");
    }
    let log = tproxy.log_text();
    let relay = log
        .lines()
        .rev()
        .find(|l| l.contains("tcp relay:"))
        .unwrap();
    assert!(
        relay.contains("tcp relay: 0 connections accepted"),
        "{relay}"
    );

    // Not IP at all (a local experimental ethertype, and ARP): passed.
    let moved = inject(&mut tproxy, "other", || {
        injector.send(0x88b5, None, b"not an IP packet at all")
    });
    assert!(moved.0 >= 1 && moved.1 == 0, "ethertype 0x88b5: {moved:?}");

    tproxy.stop().unwrap();
    assert_eq!(tproxy.final_counter("udp", "no_listener").unwrap(), 0);
}
