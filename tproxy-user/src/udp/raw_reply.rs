//! The fallback reply path. A UDP reply must leave from the original destination's address
//! *and port*; normally a transparent socket bound there sends it. When that bind fails (a
//! local socket holds the port without SO_REUSEADDR), the reply is built as a whole IP packet
//! and sent on a transparent raw socket, which is bound to nothing.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    sync::OnceLock,
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// `IPV6_HDRINCL` (linux/in6.h): we supply the IPv6 header ourselves.
const IPV6_HDRINCL: libc::c_int = 36;
const IPPROTO_UDP: u8 = 17;
const TTL: u8 = 64;

/// Raw sockets for replies whose transparent socket could not be bound, opened on first use.
#[derive(Default)]
pub struct RawReplier {
    v4: OnceLock<io::Result<Socket>>,
    v6: OnceLock<io::Result<Socket>>,
}

impl RawReplier {
    /// Sends `payload` to `to` as a UDP datagram from `from` (address and port).
    pub fn send(&self, from: SocketAddr, to: SocketAddr, payload: &[u8]) -> io::Result<()> {
        let (socket, packet) = match (from.ip(), to.ip()) {
            (IpAddr::V4(_), IpAddr::V4(_)) => (
                self.v4.get_or_init(|| open(Domain::IPV4)),
                ipv4_udp_packet(from, to, payload),
            ),
            (IpAddr::V6(_), IpAddr::V6(_)) => (
                self.v6.get_or_init(|| open(Domain::IPV6)),
                ipv6_udp_packet(from, to, payload),
            ),
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "mixed address families",
                ))
            }
        };
        let socket = socket
            .as_ref()
            .map_err(|e| io::Error::new(e.kind(), e.to_string()))?;
        // Raw sockets take no port in the destination address.
        let dst = SockAddr::from(SocketAddr::new(to.ip(), 0));
        socket.send_to(&packet?, &dst).map(drop)
    }
}

fn open(domain: Domain) -> io::Result<Socket> {
    let socket = Socket::new(domain, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW)))?;
    if domain == Domain::IPV6 {
        let on: libc::c_int = 1;
        // SAFETY: a valid socket, option and c_int-sized value.
        let ret = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IPV6,
                IPV6_HDRINCL,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        socket.set_ip_transparent_v6(true)?;
    } else {
        // IPPROTO_RAW implies IP_HDRINCL for IPv4.
        socket.set_ip_transparent_v4(true)?;
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

fn too_long() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "datagram too long")
}

/// An IPv4 packet carrying one UDP datagram. The kernel fills in the IPv4 checksum and ID.
fn ipv4_udp_packet(from: SocketAddr, to: SocketAddr, payload: &[u8]) -> io::Result<Vec<u8>> {
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (from.ip(), to.ip()) else {
        unreachable!("checked by the caller")
    };
    let total = u16::try_from(20 + 8 + payload.len()).map_err(|_| too_long())?;
    let mut packet = Vec::with_capacity(total.into());
    packet.extend_from_slice(&[0x45, 0]);
    packet.extend_from_slice(&total.to_be_bytes());
    packet.extend_from_slice(&[0, 0, 0x40, 0, TTL, IPPROTO_UDP, 0, 0]);
    packet.extend_from_slice(&src.octets());
    packet.extend_from_slice(&dst.octets());
    let udp_len = total - 20;
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, IPPROTO_UDP]);
    pseudo.extend_from_slice(&udp_len.to_be_bytes());
    append_udp(
        &mut packet,
        &pseudo,
        from.port(),
        to.port(),
        udp_len,
        payload,
    );
    Ok(packet)
}

/// An IPv6 packet carrying one UDP datagram (the UDP checksum is mandatory over IPv6).
fn ipv6_udp_packet(from: SocketAddr, to: SocketAddr, payload: &[u8]) -> io::Result<Vec<u8>> {
    let (IpAddr::V6(src), IpAddr::V6(dst)) = (from.ip(), to.ip()) else {
        unreachable!("checked by the caller")
    };
    let udp_len = u16::try_from(8 + payload.len()).map_err(|_| too_long())?;
    let mut packet = Vec::with_capacity(40 + usize::from(udp_len));
    packet.extend_from_slice(&[0x60, 0, 0, 0]);
    packet.extend_from_slice(&udp_len.to_be_bytes());
    packet.extend_from_slice(&[IPPROTO_UDP, TTL]);
    packet.extend_from_slice(&src.octets());
    packet.extend_from_slice(&dst.octets());
    let mut pseudo = Vec::with_capacity(40);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&u32::from(udp_len).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, IPPROTO_UDP]);
    append_udp(
        &mut packet,
        &pseudo,
        from.port(),
        to.port(),
        udp_len,
        payload,
    );
    Ok(packet)
}

fn append_udp(
    packet: &mut Vec<u8>,
    pseudo: &[u8],
    sport: u16,
    dport: u16,
    len: u16,
    payload: &[u8],
) {
    let start = packet.len();
    packet.extend_from_slice(&sport.to_be_bytes());
    packet.extend_from_slice(&dport.to_be_bytes());
    packet.extend_from_slice(&len.to_be_bytes());
    packet.extend_from_slice(&[0, 0]);
    packet.extend_from_slice(payload);
    let sum = !fold(sum16(pseudo) + sum16(&packet[start..]));
    // A computed zero is sent as all ones: zero means "no checksum".
    let sum = if sum == 0 { 0xffff } else { sum };
    packet[start + 6..start + 8].copy_from_slice(&sum.to_be_bytes());
}

/// One's-complement sum of big-endian 16-bit words (odd length padded with zero), unfolded.
fn sum16(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A datagram whose checksum is right sums, with its pseudo-header, to all ones.
    fn verifies(pseudo: &[u8], udp: &[u8]) -> bool {
        fold(sum16(pseudo) + sum16(udp)) == 0xffff
    }

    #[test]
    fn ipv4_packet_layout_and_checksum() {
        let from: SocketAddr = "10.0.0.1:53".parse().unwrap();
        let to: SocketAddr = "10.0.0.2:40000".parse().unwrap();
        let packet = ipv4_udp_packet(from, to, b"hello").unwrap();
        assert_eq!(packet.len(), 20 + 8 + 5);
        assert_eq!(&packet[2..4], &33u16.to_be_bytes());
        assert_eq!(packet[9], IPPROTO_UDP);
        assert_eq!(&packet[12..16], &[10, 0, 0, 1]);
        assert_eq!(&packet[20..22], &53u16.to_be_bytes());
        assert_eq!(&packet[22..24], &40000u16.to_be_bytes());
        let pseudo = [&packet[12..20], &[0, IPPROTO_UDP, 0, 13][..]].concat();
        assert!(verifies(&pseudo, &packet[20..]));
    }

    #[test]
    fn ipv6_packet_layout_and_checksum() {
        let from: SocketAddr = "[fd00::1]:53".parse().unwrap();
        let to: SocketAddr = "[fd00::2]:40000".parse().unwrap();
        let packet = ipv6_udp_packet(from, to, b"odd").unwrap();
        assert_eq!(packet.len(), 40 + 8 + 3);
        assert_eq!(&packet[4..6], &11u16.to_be_bytes());
        assert_eq!(packet[6], IPPROTO_UDP);
        let pseudo = [&packet[8..40], &[0, 0, 0, 11, 0, 0, 0, IPPROTO_UDP][..]].concat();
        assert!(verifies(&pseudo, &packet[40..]));
    }

    #[test]
    fn a_known_checksum() {
        // RFC 1071's example words sum to 0xddf2.
        assert_eq!(
            fold(sum16(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7])),
            0xddf2
        );
    }
}
