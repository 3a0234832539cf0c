//! Hand-made frames for the tests that probe the program with what ordinary sockets do not
//! send: options, extension headers, fragments, special destinations. They go out of the
//! client's `eth0` through a raw packet socket, addressed to the router.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::{Netns, RouterTopology};

/// Sends raw Ethernet frames out of the client's `eth0`, to the router.
pub struct Injector {
    socket: i32,
    ifindex: i32,
    client_mac: [u8; 6],
    router_mac: [u8; 6],
}

pub fn mac_of(netns: &Netns, iface: &str) -> [u8; 6] {
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
    pub fn new(topo: &RouterTopology) -> Self {
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
            router_mac: mac_of(&topo.router, RouterTopology::ROUTER_CLIENT_IFACE),
        }
    }

    /// Sends `payload` after an Ethernet header with `ethertype` (and 802.1Q `vlan` tag).
    pub fn send(&self, ethertype: u16, vlan: Option<u16>, payload: &[u8]) {
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

pub fn checksum(chunks: &[&[u8]]) -> u16 {
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

/// An IPv4 packet: `options` (a multiple of 4 bytes) and the flags/fragment field as given,
/// identification 0x1234.
pub fn ipv4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    options: &[u8],
    fragment: u16,
    payload: &[u8],
) -> Vec<u8> {
    ipv4_with_id(src, dst, protocol, 0x1234, options, fragment, payload)
}

/// [`ipv4`] with identification `id`: fragments of one datagram share it.
pub fn ipv4_with_id(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    id: u16,
    options: &[u8],
    fragment: u16,
    payload: &[u8],
) -> Vec<u8> {
    let header_len = 20 + options.len();
    let mut header = vec![0u8; header_len];
    header[0] = 0x40 | (header_len / 4) as u8;
    header[2..4].copy_from_slice(&((header_len + payload.len()) as u16).to_be_bytes());
    header[4..6].copy_from_slice(&id.to_be_bytes());
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
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, payload: &[u8]) -> Vec<u8> {
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
pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
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
pub fn tcp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
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

pub fn pseudo_header(src: IpAddr, dst: IpAddr, protocol: u8, len: usize) -> Vec<u8> {
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
pub fn extension(next_header: u8, kind: u8) -> Vec<u8> {
    match kind {
        // Routing header type 0 with no segments left: ignored by the receiver.
        43 => vec![next_header, 0, 0, 0, 0, 0, 0, 0],
        // Hop-by-hop / destination options: a PadN option filling the 8 bytes.
        _ => vec![next_header, 0, 1, 4, 0, 0, 0, 0],
    }
}

/// An IPv6 fragment header: `offset` in bytes (a multiple of 8), `more` fragments to come.
pub fn fragment_header(next_header: u8, offset: usize, more: bool, id: u32) -> Vec<u8> {
    let field = (offset as u16) | u16::from(more);
    let mut header = vec![next_header, 0];
    header.extend_from_slice(&field.to_be_bytes());
    header.extend_from_slice(&id.to_be_bytes());
    header
}

/// IPv4 flags/fragment-offset field: `offset` in bytes (a multiple of 8), `more` to come.
pub fn ipv4_fragment_field(offset: usize, more: bool) -> u16 {
    (offset / 8) as u16 | if more { 0x2000 } else { 0 }
}

/// A counter of `netns`'s IP stack, from `/proc/net/snmp` or `/proc/net/snmp6`: e.g.
/// (`"Tcp:"`, `"InSegs"`), (`"Ip:"`, `"ReasmReqds"`), or (`""`, `"Ip6ReasmReqds"`).
pub fn snmp(netns: &Netns, group: &'static str, name: &'static str) -> u64 {
    netns.run(move || {
        // thread-self: /proc/self/net is the main thread's namespace, not this one's.
        if group.is_empty() {
            let text = std::fs::read_to_string("/proc/thread-self/net/snmp6").unwrap();
            return text
                .lines()
                .find_map(|line| {
                    let (key, value) = line.split_once(char::is_whitespace)?;
                    (key == name).then(|| value.trim().parse().unwrap())
                })
                .unwrap_or_else(|| panic!("{name} missing from snmp6"));
        }
        let text = std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap();
        let mut rows = text.lines().filter(|line| line.starts_with(group));
        let (names, values) = (rows.next().unwrap(), rows.next().unwrap());
        let index = names
            .split_whitespace()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("{group} {name} missing from snmp"));
        values
            .split_whitespace()
            .nth(index)
            .unwrap()
            .parse()
            .unwrap()
    })
}
