//! The fallback reply path. A UDP reply must leave from the original destination's address
//! *and port*; normally a transparent socket bound there sends it. When that bind fails (a
//! local socket holds the port without SO_REUSEADDR), the reply is built as a whole IP packet
//! and sent on a transparent raw socket, which is bound to nothing.
//!
//! The kernel neither fragments what a raw socket sends with its own header nor fits it to
//! the path: a packet above the interface MTU fails with EMSGSIZE. So a datagram goes out
//! whole when the interface takes it (IPv4 without "don't fragment", so routers further on
//! may still fragment it), and otherwise in fragments of [`MAX_PACKET`] bytes built here.

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
/// IPv6's Fragment extension header.
const IPPROTO_FRAGMENT: u8 = 44;
const TTL: u8 = 64;
/// The largest fragment sent, when the datagram does not fit the interface whole: IPv6's
/// minimum link MTU (RFC 8200), which every IPv6 path carries and IPv4 paths carry in
/// practice.
const MAX_PACKET: usize = 1280;
/// The send buffer of each raw socket: one batch of 32 replies of 64 KiB, fragmented, must
/// fit without EAGAIN halfway through a datagram.
const SEND_BUFFER: usize = 32 * 64 * 1024 * 2;
const IPV4_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
const FRAGMENT_HEADER: usize = 8;
const UDP_HEADER: usize = 8;
/// IPv4 "more fragments" flag, in the flags-and-offset field.
const MORE_FRAGMENTS_V4: u16 = 0x2000;

/// Raw sockets for replies whose transparent socket could not be bound, opened on first use.
#[derive(Default)]
pub(super) struct RawReplier {
    v4: OnceLock<io::Result<Socket>>,
    v6: OnceLock<io::Result<Socket>>,
}

impl RawReplier {
    /// Sends `payload` to `to` as a UDP datagram from `from` (address and port): whole if
    /// the interface takes it, otherwise in fragments of at most [`MAX_PACKET`] bytes.
    pub(super) fn send(&self, from: SocketAddr, to: SocketAddr, payload: &[u8]) -> io::Result<()> {
        match self.send_in(from, to, payload, usize::MAX) {
            Err(error) if error.raw_os_error() == Some(libc::EMSGSIZE) => {
                self.send_in(from, to, payload, MAX_PACKET)
            }
            sent => sent,
        }
    }

    /// Sends the datagram in packets of at most `max_packet` bytes.
    fn send_in(
        &self,
        from: SocketAddr,
        to: SocketAddr,
        payload: &[u8],
        max_packet: usize,
    ) -> io::Result<()> {
        let (socket, packets) = match (from.ip(), to.ip()) {
            (IpAddr::V4(_), IpAddr::V4(_)) => (
                self.v4.get_or_init(|| open(Domain::IPV4)),
                ipv4_udp_packets(from, to, payload, max_packet)?,
            ),
            (IpAddr::V6(_), IpAddr::V6(_)) => (
                self.v6.get_or_init(|| open(Domain::IPV6)),
                ipv6_udp_packets(from, to, payload, max_packet)?,
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
        for packet in packets {
            socket.send_to(&packet, &dst)?;
        }
        Ok(())
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
    let size = SEND_BUFFER as libc::c_int;
    // SAFETY: a valid socket, option and c_int-sized value. SO_SNDBUFFORCE (CAP_NET_ADMIN)
    // goes past net.core.wmem_max; without it, the plain option gets what the limit allows.
    let forced = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if forced != 0 {
        socket.set_send_buffer_size(SEND_BUFFER)?;
    }
    Ok(socket)
}

/// A fragment identification: unpredictable, so that no one off the path can slip a
/// fragment of their own into a reply.
fn random_id() -> io::Result<u32> {
    let mut id = [0u8; 4];
    // SAFETY: writes at most `id.len()` bytes into `id`.
    let read = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if read != id.len() as isize {
        return Err(io::Error::last_os_error());
    }
    Ok(u32::from_ne_bytes(id))
}

fn too_long() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "datagram too long")
}

/// The IPv4 packets carrying one UDP datagram: one if it fits in `max_packet` bytes,
/// otherwise fragments identified by a random ID. The kernel fills in the IPv4 header
/// checksum (and the ID of an unfragmented packet).
fn ipv4_udp_packets(
    from: SocketAddr,
    to: SocketAddr,
    payload: &[u8],
    max_packet: usize,
) -> io::Result<Vec<Vec<u8>>> {
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (from.ip(), to.ip()) else {
        unreachable!("checked by the caller")
    };
    let udp_len = u16::try_from(UDP_HEADER + payload.len()).map_err(|_| too_long())?;
    u16::try_from(IPV4_HEADER + usize::from(udp_len)).map_err(|_| too_long())?;
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, IPPROTO_UDP]);
    pseudo.extend_from_slice(&udp_len.to_be_bytes());
    let datagram = udp_datagram(&pseudo, from.port(), to.port(), udp_len, payload);
    let header = |total: usize, id: u16, flags_and_offset: u16| {
        let mut header = Vec::with_capacity(total);
        header.extend_from_slice(&[0x45, 0]);
        header.extend_from_slice(&(total as u16).to_be_bytes());
        header.extend_from_slice(&id.to_be_bytes());
        header.extend_from_slice(&flags_and_offset.to_be_bytes());
        header.extend_from_slice(&[TTL, IPPROTO_UDP, 0, 0]);
        header.extend_from_slice(&src.octets());
        header.extend_from_slice(&dst.octets());
        header
    };
    if IPV4_HEADER + datagram.len() <= max_packet {
        // No "don't fragment": there is no path-MTU discovery on this path, so a router
        // with a smaller MTU further on must be free to fragment it.
        let mut packet = header(IPV4_HEADER + datagram.len(), 0, 0);
        packet.extend_from_slice(&datagram);
        return Ok(vec![packet]);
    }
    // Zero would ask the kernel for an ID of its own, per fragment.
    let id = (random_id()? as u16).max(1);
    let chunk = (max_packet - IPV4_HEADER) / 8 * 8;
    Ok(fragments(&datagram, chunk)
        .map(|(offset, piece, more)| {
            let flags_and_offset = (offset / 8) as u16 | if more { MORE_FRAGMENTS_V4 } else { 0 };
            let mut packet = header(IPV4_HEADER + piece.len(), id, flags_and_offset);
            packet.extend_from_slice(piece);
            packet
        })
        .collect())
}

/// The IPv6 packets carrying one UDP datagram (the UDP checksum is mandatory over IPv6): one
/// if it fits in `max_packet` bytes, otherwise fragments identified by a random ID.
fn ipv6_udp_packets(
    from: SocketAddr,
    to: SocketAddr,
    payload: &[u8],
    max_packet: usize,
) -> io::Result<Vec<Vec<u8>>> {
    let (IpAddr::V6(src), IpAddr::V6(dst)) = (from.ip(), to.ip()) else {
        unreachable!("checked by the caller")
    };
    let udp_len = u16::try_from(UDP_HEADER + payload.len()).map_err(|_| too_long())?;
    let mut pseudo = Vec::with_capacity(40);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&u32::from(udp_len).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, IPPROTO_UDP]);
    let datagram = udp_datagram(&pseudo, from.port(), to.port(), udp_len, payload);
    let header = |payload_len: usize, next_header: u8| {
        let mut header = Vec::with_capacity(IPV6_HEADER + payload_len);
        header.extend_from_slice(&[0x60, 0, 0, 0]);
        header.extend_from_slice(&(payload_len as u16).to_be_bytes());
        header.extend_from_slice(&[next_header, TTL]);
        header.extend_from_slice(&src.octets());
        header.extend_from_slice(&dst.octets());
        header
    };
    if IPV6_HEADER + datagram.len() <= max_packet {
        let mut packet = header(datagram.len(), IPPROTO_UDP);
        packet.extend_from_slice(&datagram);
        return Ok(vec![packet]);
    }
    let id = random_id()?;
    let chunk = (max_packet - IPV6_HEADER - FRAGMENT_HEADER) / 8 * 8;
    Ok(fragments(&datagram, chunk)
        .map(|(offset, piece, more)| {
            let mut packet = header(FRAGMENT_HEADER + piece.len(), IPPROTO_FRAGMENT);
            packet.extend_from_slice(&[IPPROTO_UDP, 0]);
            packet.extend_from_slice(&(offset as u16 | u16::from(more)).to_be_bytes());
            packet.extend_from_slice(&id.to_be_bytes());
            packet.extend_from_slice(piece);
            packet
        })
        .collect())
}

/// `datagram` in pieces of `chunk` bytes (a multiple of 8): each piece's byte offset, the
/// piece, and whether more follow.
fn fragments(datagram: &[u8], chunk: usize) -> impl Iterator<Item = (usize, &[u8], bool)> {
    datagram.chunks(chunk).enumerate().map(move |(i, piece)| {
        let offset = i * chunk;
        (offset, piece, offset + piece.len() < datagram.len())
    })
}

/// A UDP header and `payload`, with the checksum over `pseudo` (the IP pseudo-header) and both.
fn udp_datagram(pseudo: &[u8], sport: u16, dport: u16, len: u16, payload: &[u8]) -> Vec<u8> {
    let mut datagram = Vec::with_capacity(usize::from(len));
    datagram.extend_from_slice(&sport.to_be_bytes());
    datagram.extend_from_slice(&dport.to_be_bytes());
    datagram.extend_from_slice(&len.to_be_bytes());
    datagram.extend_from_slice(&[0, 0]);
    datagram.extend_from_slice(payload);
    let sum = !fold(sum16(pseudo) + sum16(&datagram));
    // A computed zero is sent as all ones: zero means "no checksum".
    let sum = if sum == 0 { 0xffff } else { sum };
    datagram[6..8].copy_from_slice(&sum.to_be_bytes());
    datagram
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
        let packets = ipv4_udp_packets(from, to, b"hello", usize::MAX).unwrap();
        let [packet] = packets.as_slice() else {
            panic!("{} packets", packets.len())
        };
        assert_eq!(packet.len(), 20 + 8 + 5);
        assert_eq!(&packet[2..4], &33u16.to_be_bytes());
        assert_eq!(&packet[6..8], &[0, 0], "no \"don't fragment\": routers may");
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
        let packets = ipv6_udp_packets(from, to, b"odd", usize::MAX).unwrap();
        let [packet] = packets.as_slice() else {
            panic!("{} packets", packets.len())
        };
        assert_eq!(packet.len(), 40 + 8 + 3);
        assert_eq!(&packet[4..6], &11u16.to_be_bytes());
        assert_eq!(packet[6], IPPROTO_UDP);
        let pseudo = [&packet[8..40], &[0, 0, 0, 11, 0, 0, 0, IPPROTO_UDP][..]].concat();
        assert!(verifies(&pseudo, &packet[40..]));
    }

    /// Reassembles IPv4 fragments as a receiver would, checking each header on the way.
    fn reassemble_v4(packets: &[Vec<u8>]) -> Vec<u8> {
        let mut datagram = Vec::new();
        for (i, packet) in packets.iter().enumerate() {
            assert!(
                packet.len() <= MAX_PACKET,
                "fragment {i}: {} bytes",
                packet.len()
            );
            assert_eq!(
                usize::from(u16::from_be_bytes([packet[2], packet[3]])),
                packet.len()
            );
            assert_eq!(&packet[4..6], &packets[0][4..6], "one ID for all fragments");
            assert_ne!(&packet[4..6], &[0, 0]);
            let field = u16::from_be_bytes([packet[6], packet[7]]);
            assert_eq!(field & 0x4000, 0, "no \"don't fragment\"");
            assert_eq!(field & MORE_FRAGMENTS_V4 != 0, i + 1 < packets.len());
            assert_eq!(usize::from(field & 0x1fff) * 8, datagram.len());
            datagram.extend_from_slice(&packet[20..]);
        }
        datagram
    }

    /// Reassembles IPv6 fragments as a receiver would, checking each header on the way.
    fn reassemble_v6(packets: &[Vec<u8>]) -> Vec<u8> {
        let mut datagram = Vec::new();
        for (i, packet) in packets.iter().enumerate() {
            assert!(
                packet.len() <= MAX_PACKET,
                "fragment {i}: {} bytes",
                packet.len()
            );
            assert_eq!(
                usize::from(u16::from_be_bytes([packet[4], packet[5]])),
                packet.len() - 40
            );
            assert_eq!(packet[6], IPPROTO_FRAGMENT);
            assert_eq!(packet[40], IPPROTO_UDP);
            assert_eq!(
                &packet[44..48],
                &packets[0][44..48],
                "one ID for all fragments"
            );
            let field = u16::from_be_bytes([packet[42], packet[43]]);
            assert_eq!(field & 1 == 1, i + 1 < packets.len());
            assert_eq!(usize::from(field & !7), datagram.len());
            datagram.extend_from_slice(&packet[48..]);
        }
        datagram
    }

    #[test]
    fn a_datagram_larger_than_one_packet_is_sent_in_fragments() {
        for len in [1252, 1253, 3000, 8000, 65507] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let from: SocketAddr = "10.0.0.1:53".parse().unwrap();
            let to: SocketAddr = "10.0.0.2:40000".parse().unwrap();
            let packets = ipv4_udp_packets(from, to, &payload, MAX_PACKET).unwrap();
            assert_eq!(packets.len() > 1, 20 + 8 + len > MAX_PACKET, "len={len}");
            let datagram = if packets.len() == 1 {
                packets[0][20..].to_vec()
            } else {
                reassemble_v4(&packets)
            };
            assert_eq!(&datagram[8..], &payload[..], "len={len}");
            let pseudo = [&packets[0][12..20], &[0, IPPROTO_UDP][..], &datagram[4..6]].concat();
            assert!(verifies(&pseudo, &datagram), "len={len}");

            let from: SocketAddr = "[fd00::1]:53".parse().unwrap();
            let to: SocketAddr = "[fd00::2]:40000".parse().unwrap();
            let packets = ipv6_udp_packets(from, to, &payload, MAX_PACKET).unwrap();
            assert_eq!(packets.len() > 1, 40 + 8 + len > MAX_PACKET, "len={len}");
            let datagram = if packets.len() == 1 {
                packets[0][40..].to_vec()
            } else {
                reassemble_v6(&packets)
            };
            assert_eq!(&datagram[8..], &payload[..], "len={len}");
            let udp_len = u32::try_from(datagram.len()).unwrap().to_be_bytes();
            let pseudo = [
                &packets[0][8..40],
                &udp_len[..],
                &[0, 0, 0, IPPROTO_UDP][..],
            ]
            .concat();
            assert!(verifies(&pseudo, &datagram), "len={len}");
        }
    }

    #[test]
    fn a_datagram_beyond_the_ip_length_field_is_refused() {
        let from: SocketAddr = "10.0.0.1:53".parse().unwrap();
        let to: SocketAddr = "10.0.0.2:40000".parse().unwrap();
        assert!(ipv4_udp_packets(from, to, &vec![0; 65508], MAX_PACKET).is_err());
        let from: SocketAddr = "[fd00::1]:53".parse().unwrap();
        let to: SocketAddr = "[fd00::2]:40000".parse().unwrap();
        assert!(ipv6_udp_packets(from, to, &vec![0; 65528], MAX_PACKET).is_err());
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
