//! The answers to packets a `reject` rule took, as netfilter's REJECT writes them: a TCP
//! segment gets a reset (RFC 9293 3.10.7.1, as `nf_reject`'s `tcp-reset`), a UDP datagram an
//! ICMP or ICMPv6 port unreachable quoting its start. Built here as bytes from the bytes the
//! program read, so that every field and checksum is tested on the host; the program only
//! trims or grows the packet, writes the answer over it and sends it back out of the
//! interface it came in on.
//!
//! What is never answered, as the kernel's own rules for errors have it (RFC 1122 3.2.2,
//! RFC 4443 2.4): a reset, and a datagram from an address that names no single host
//! (unspecified, multicast, broadcast) or to a multicast or broadcast address. An IPv4
//! datagram with options is not answered either (its quote would not have a fixed length).
//! The program drops what it does not answer.
//!
//! ICMP answers are limited in rate as the kernel limits the ICMP errors it sends: in all
//! (its defaults: 1000 a second, bursts of 50; here per CPU) and per destination (one a
//! second, bursts of 6, as for IPv4; the kernel lets IPv6 destinations of short routes have
//! more): a flood of datagrams with a forged source would otherwise have the router send a
//! larger packet for each to whoever the source names. Resets are not (nor are
//! netfilter's): one answers one segment, never larger.
//!
//! A packet whose transport checksum is left for the device to finish (the kernel's
//! `CHECKSUM_PARTIAL`: from a veth or a tun with offloads, or merged by GRO) keeps that state
//! when it becomes its answer, and where the device finishes it (a NIC, a VM behind a tap)
//! it sums from where the packet's transport header was, into its checksum field. The
//! answer is written for that: a reset's checksum field holds the pseudo-header's sum, as
//! the kernel's own TCP leaves it (the program tells the two cases apart); an ICMP answer
//! ends with the quoted UDP header, where the datagram's was, and its checksum field is
//! given the value that a device summing that header into it writes again, so the answer
//! is whole whether a device finishes it or leaves it.

/// TCP's FIN, SYN, RST and ACK flags, in the flags byte (offset 13).
const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_ICMPV6: u8 = 58;
/// What the answers start with as their TTL or hop limit (the kernel's default).
const HOPS: u8 = 64;

/// An IPv4 reset: IPv4 header and TCP header.
pub const RESET_IPV4_LEN: usize = 40;
/// An IPv6 reset: IPv6 header and TCP header.
pub const RESET_IPV6_LEN: usize = 60;
/// What an ICMP error quotes of an IPv4 datagram: its header (without options) and 8 bytes.
pub const QUOTE_IPV4_LEN: usize = 28;
/// What an ICMPv6 error quotes of an IPv6 datagram: its header and 8 bytes.
pub const QUOTE_IPV6_LEN: usize = 48;
/// An IPv4 port unreachable: IPv4 header, ICMP header and the quote.
pub const UNREACHABLE_IPV4_LEN: usize = 20 + 8 + QUOTE_IPV4_LEN;
/// An IPv6 port unreachable: IPv6 header, ICMPv6 header and the quote.
pub const UNREACHABLE_IPV6_LEN: usize = 40 + 8 + QUOTE_IPV6_LEN;

/// How fast a budget of ICMP answers fills up and how many it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AnswerRate {
    /// Nanoseconds per answer earned.
    pub ns_per_answer: u64,
    /// Answers that may go at once after a quiet time.
    pub burst: u64,
}

/// In all, per CPU: the kernel's `net.ipv4.icmp_msgs_per_sec` and `icmp_msgs_burst` defaults.
pub const ICMP_ANSWERS_PER_CPU: AnswerRate = AnswerRate {
    ns_per_answer: 1_000_000,
    burst: 50,
};
/// Per destination (the forged source a flood names): the kernel's `icmp_ratelimit` default,
/// one a second, with its bursts of six.
pub const ICMP_ANSWERS_PER_DESTINATION: AnswerRate = AnswerRate {
    ns_per_answer: 1_000_000_000,
    burst: 6,
};
/// Destinations whose budgets are kept (the least recently answered go first).
pub const ICMP_ANSWER_DESTINATIONS: u32 = 4096;

/// A budget of ICMP answers: a token bucket (all zeros: full at its first use).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AnswerBudget {
    /// Answers that may go now.
    pub tokens: u64,
    /// Up to when the tokens were counted in.
    pub counted_ns: u64,
}

/// Whether an ICMP answer may go at `now_ns` (a monotonic clock) under `rate`: takes its token.
#[inline(always)]
pub fn take_icmp_answer(budget: &mut AnswerBudget, rate: AnswerRate, now_ns: u64) -> bool {
    let earned = match budget.counted_ns {
        // Never used: full.
        0 => rate.burst,
        counted => now_ns.saturating_sub(counted) / rate.ns_per_answer,
    };
    if earned > 0 {
        let tokens = budget.tokens.saturating_add(earned);
        if tokens >= rate.burst {
            budget.tokens = rate.burst;
            budget.counted_ns = now_ns;
        } else {
            budget.tokens = tokens;
            budget.counted_ns += earned * rate.ns_per_answer;
        }
    }
    if budget.tokens == 0 {
        return false;
    }
    budget.tokens -= 1;
    true
}

/// Whether an ICMP answer to a destination may go at `now_ns`: takes one of this CPU's
/// answers and one of the destination's, or neither (the CPU's is given back when the
/// destination's are spent, so that one flooded destination costs the others nothing).
#[inline(always)]
pub fn take_icmp_answer_to(
    per_cpu: &mut AnswerBudget,
    per_destination: &mut AnswerBudget,
    now_ns: u64,
) -> bool {
    if !take_icmp_answer(per_cpu, ICMP_ANSWERS_PER_CPU, now_ns) {
        return false;
    }
    if !take_icmp_answer(per_destination, ICMP_ANSWERS_PER_DESTINATION, now_ns) {
        per_cpu.tokens += 1;
        return false;
    }
    true
}

/// Whether an IPv4 header's checksum holds and its total length fits the `available` bytes
/// from it and its headers (`transport_header_len`: the TCP header's, or UDP's 8), as the
/// kernel checks them before it would answer.
#[inline(always)]
pub fn ipv4_header_holds(ip: &[u8; 20], transport_header_len: u32, available: u32) -> bool {
    let total = u32::from(u16::from_be_bytes([ip[2], ip[3]]));
    ip[0] == 0x45
        && fold(sum(ip, 0)) == 0
        && total >= 20 + transport_header_len
        && total <= available
}

/// As [`ipv4_header_holds`], for an IPv6 header.
#[inline(always)]
pub fn ipv6_header_holds(ip: &[u8; 40], transport_header_len: u32, available: u32) -> bool {
    let payload = u32::from(u16::from_be_bytes([ip[4], ip[5]]));
    ip[0] >> 4 == 6 && payload >= transport_header_len && payload + 40 <= available
}

/// The reset answering the TCP segment whose IPv4 header (without options) is `ip`, whose
/// TCP header is `tcp` (its first 20 bytes) and which carries `payload_len` bytes, written to
/// `out`: false (nothing written) for a segment that is not answered.
#[inline(always)]
pub fn reset_ipv4(
    ip: &[u8; 20],
    tcp: &[u8; 20],
    payload_len: u32,
    left_to_device: bool,
    out: &mut [u8; RESET_IPV4_LEN],
) -> bool {
    if !answerable_ipv4(ip) || !answerable_tcp(tcp) {
        return false;
    }
    // Every byte is written: the program builds each answer where it built the last one.
    *out = [0; RESET_IPV4_LEN];
    // Don't fragment, as `nf_reject` sends it.
    ipv4_header(ip, IPPROTO_TCP, RESET_IPV4_LEN as u16, 0, 0x40, out);
    // The pseudo-header: the addresses (in either order, the sum is the same), the protocol
    // and the TCP length.
    let pseudo_sum = sum(&ip[12..20], u32::from(IPPROTO_TCP) + 20);
    reset_header(tcp, payload_len, pseudo_sum, left_to_device, out, 20);
    true
}

/// As [`reset_ipv4`], for the segment whose IPv6 header is `ip` (the TCP header right after).
#[inline(always)]
pub fn reset_ipv6(
    ip: &[u8; 40],
    tcp: &[u8; 20],
    payload_len: u32,
    left_to_device: bool,
    out: &mut [u8; RESET_IPV6_LEN],
) -> bool {
    if !answerable_ipv6(ip) || !answerable_tcp(tcp) {
        return false;
    }
    *out = [0; RESET_IPV6_LEN];
    ipv6_header(ip, IPPROTO_TCP, 20, out);
    let pseudo_sum = ipv6_pseudo_sum(ip, IPPROTO_TCP, 20);
    reset_header(tcp, payload_len, pseudo_sum, left_to_device, out, 40);
    true
}

/// The port unreachable answering the IPv4 datagram whose first 28 bytes are `quote`,
/// written to `out`: false for one that is not answered (see the module's documentation).
#[inline(always)]
pub fn port_unreachable_ipv4(
    quote: &[u8; QUOTE_IPV4_LEN],
    out: &mut [u8; UNREACHABLE_IPV4_LEN],
) -> bool {
    if quote[0] != 0x45 || !answerable_ipv4(quote) {
        return false;
    }
    *out = [0; UNREACHABLE_IPV4_LEN];
    // The Internet Control precedence, as the kernel's own ICMP errors have it.
    ipv4_header(
        quote,
        IPPROTO_ICMP,
        UNREACHABLE_IPV4_LEN as u16,
        0xc0,
        0,
        out,
    );
    // Destination unreachable, port unreachable; the checksum covers the message alone.
    out[20] = 3;
    out[21] = 3;
    out[28..].copy_from_slice(quote);
    quote_udp_checksum_as_its_own_sum(out);
    let checksum = fold(sum(&out[20..], 0));
    put_u16(out, 22, checksum);
    true
}

/// As [`port_unreachable_ipv4`], for IPv6 (an ICMPv6 port unreachable).
#[inline(always)]
pub fn port_unreachable_ipv6(
    quote: &[u8; QUOTE_IPV6_LEN],
    out: &mut [u8; UNREACHABLE_IPV6_LEN],
) -> bool {
    if !answerable_ipv6(quote) {
        return false;
    }
    let len = (UNREACHABLE_IPV6_LEN - 40) as u16;
    *out = [0; UNREACHABLE_IPV6_LEN];
    ipv6_header(quote, IPPROTO_ICMPV6, len, out);
    // Destination unreachable, port unreachable; the checksum covers a pseudo-header too.
    out[40] = 1;
    out[41] = 4;
    out[48..].copy_from_slice(quote);
    quote_udp_checksum_as_its_own_sum(out);
    let pseudo_sum = ipv6_pseudo_sum(quote, IPPROTO_ICMPV6, len);
    let checksum = fold(sum(&out[40..], pseudo_sum));
    put_u16(out, 42, checksum);
    true
}

/// Gives the quoted UDP header that ends `answer` the checksum X that a device summing the
/// header into its checksum field writes again: X = !(S + X) in ones' complement, where S
/// is the sum of the header's other bytes, is 2X = !S, and 2's inverse modulo 0xffff is
/// 0x8000. (The quote's checksum is the original datagram's only where it fit; nobody reads
/// it back.)
#[inline(always)]
fn quote_udp_checksum_as_its_own_sum(answer: &mut [u8]) {
    let udp = answer.len() - 8;
    let others = !fold(sum(&answer[udp..udp + 6], 0));
    let fixed_point = (u32::from(!others) * 0x8000) % 0xffff;
    put_u16(answer, udp + 6, fixed_point as u16);
}

/// The reset's TCP header at `out[at..at + 20]`, answering `tcp` as `nf_reject` does: a
/// segment with an ACK is answered from the number it acknowledged, one without
/// acknowledges everything it occupied (a SYN and a FIN take a number each). Its checksum
/// is whole, or when `left_to_device` the pseudo-header's sum (see the module's
/// documentation).
#[inline(always)]
fn reset_header(
    tcp: &[u8; 20],
    payload_len: u32,
    pseudo_sum: u32,
    left_to_device: bool,
    out: &mut [u8],
    at: usize,
) {
    // The ports swapped.
    out[at] = tcp[2];
    out[at + 1] = tcp[3];
    out[at + 2] = tcp[0];
    out[at + 3] = tcp[1];
    let flags = tcp[13];
    if flags & ACK != 0 {
        out[at + 4..at + 8].copy_from_slice(&tcp[8..12]);
        out[at + 13] = RST;
    } else {
        let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        let occupied = payload_len + u32::from(flags & SYN != 0) + u32::from(flags & FIN != 0);
        out[at + 8..at + 12].copy_from_slice(&seq.wrapping_add(occupied).to_be_bytes());
        out[at + 13] = RST | ACK;
    }
    // Header length 5 words, no window, no urgent pointer.
    out[at + 12] = 5 << 4;
    let checksum = match left_to_device {
        true => !fold(pseudo_sum),
        false => fold(sum(&out[at..at + 20], pseudo_sum)),
    };
    put_u16(out, at + 16, checksum);
}

/// The answer's IPv4 header in `out[..20]`, for the packet whose header starts `original`:
/// from its destination to its source, with `tos` and the `flags` byte (its first three
/// bits).
#[inline(always)]
fn ipv4_header(original: &[u8], protocol: u8, total_len: u16, tos: u8, flags: u8, out: &mut [u8]) {
    out[0] = 0x45;
    out[1] = tos;
    put_u16(out, 2, total_len);
    out[6] = flags;
    out[8] = HOPS;
    out[9] = protocol;
    out[12..16].copy_from_slice(&original[16..20]);
    out[16..20].copy_from_slice(&original[12..16]);
    let checksum = fold(sum(&out[..20], 0));
    put_u16(out, 10, checksum);
}

/// The answer's IPv6 header in `out[..40]`, for the packet whose header starts `original`.
#[inline(always)]
fn ipv6_header(original: &[u8], next_header: u8, payload_len: u16, out: &mut [u8]) {
    out[0] = 0x60;
    put_u16(out, 4, payload_len);
    out[6] = next_header;
    out[7] = HOPS;
    out[8..24].copy_from_slice(&original[24..40]);
    out[24..40].copy_from_slice(&original[8..24]);
}

/// The one's-complement sum of IPv6's pseudo-header for an upper-layer packet of `len`
/// between the addresses of the IPv6 header `ip` (either way round: the sum is the same).
#[inline(always)]
fn ipv6_pseudo_sum(ip: &[u8], next_header: u8, len: u16) -> u32 {
    sum(&ip[8..40], u32::from(len) + u32::from(next_header))
}

/// Whether a TCP segment gets a reset: not one itself, and with a header of 20 bytes or more
/// (the kernel drops a shorter one unanswered).
#[inline(always)]
fn answerable_tcp(tcp: &[u8; 20]) -> bool {
    tcp[13] & RST == 0 && tcp[12] >> 4 >= 5
}

/// Whether the packet whose IPv4 header starts `ip` is between two hosts on the wire, and
/// not from the address it is sent to (a "land" packet would be answered to its target).
#[inline(always)]
fn answerable_ipv4(ip: &[u8]) -> bool {
    names_one_ipv4_host(&ip[12..16]) && names_one_ipv4_host(&ip[16..20]) && ip[12..16] != ip[16..20]
}

/// As [`answerable_ipv4`], for an IPv6 header.
#[inline(always)]
fn answerable_ipv6(ip: &[u8]) -> bool {
    names_one_ipv6_host(&ip[8..24]) && names_one_ipv6_host(&ip[24..40]) && ip[8..24] != ip[24..40]
}

/// Whether an IPv4 address names one host on the wire: not 0/8 (this network), loopback,
/// multicast, or 240/4 (reserved, the limited broadcast with it), which the kernel takes for
/// martians.
#[inline(always)]
fn names_one_ipv4_host(addr: &[u8]) -> bool {
    addr[0] != 0 && addr[0] != 127 && addr[0] < 224
}

/// Whether an IPv6 address names one host on the wire: not multicast, unspecified, loopback
/// or IPv4-mapped.
#[inline(always)]
fn names_one_ipv6_host(addr: &[u8]) -> bool {
    let v4_sized = addr[..10] == [0; 10];
    let mapped = v4_sized && addr[10] == 0xff && addr[11] == 0xff;
    let unspecified_or_loopback = v4_sized && addr[10..15] == [0; 5] && addr[15] <= 1;
    addr[0] != 0xff && !mapped && !unspecified_or_loopback
}

/// `initial` plus the big-endian 16-bit words of `bytes` (an even number of them), carries
/// not yet folded.
#[inline(always)]
fn sum(bytes: &[u8], initial: u32) -> u32 {
    let mut total = initial;
    let mut i = 0;
    while i + 1 < bytes.len() {
        total += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    total
}

/// The Internet checksum of a sum from [`sum`]: carries folded in, complemented.
#[inline(always)]
fn fold(mut total: u32) -> u16 {
    total = (total & 0xffff) + (total >> 16);
    total = (total & 0xffff) + (total >> 16);
    !(total as u16)
}

#[inline(always)]
fn put_u16(out: &mut [u8], at: usize, value: u16) {
    out[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the bytes, checksum included, sum to all ones: how a receiver checks.
    fn verifies(bytes: &[u8], initial: u32) -> bool {
        fold(sum(bytes, initial)) == 0
    }

    fn tcp(sport: u16, dport: u16, seq: u32, ack: u32, flags: u8) -> [u8; 20] {
        let mut header = [0u8; 20];
        header[..2].copy_from_slice(&sport.to_be_bytes());
        header[2..4].copy_from_slice(&dport.to_be_bytes());
        header[4..8].copy_from_slice(&seq.to_be_bytes());
        header[8..12].copy_from_slice(&ack.to_be_bytes());
        header[12] = 5 << 4;
        header[13] = flags;
        header
    }

    fn ipv4(src: [u8; 4], dst: [u8; 4], protocol: u8) -> [u8; 20] {
        let mut header = [0u8; 20];
        header[0] = 0x45;
        put_u16(&mut header, 2, 128);
        header[8] = 63;
        header[9] = protocol;
        header[12..16].copy_from_slice(&src);
        header[16..20].copy_from_slice(&dst);
        let checksum = fold(sum(&header, 0));
        put_u16(&mut header, 10, checksum);
        header
    }

    fn ipv6(src: [u8; 16], dst: [u8; 16], next_header: u8) -> [u8; 40] {
        let mut header = [0u8; 40];
        header[0] = 0x60;
        put_u16(&mut header, 4, 8);
        header[6] = next_header;
        header[7] = 64;
        header[8..24].copy_from_slice(&src);
        header[24..40].copy_from_slice(&dst);
        header
    }

    const CLIENT_V6: [u8; 16] = [0xfd, 0x77, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    const SERVER_V6: [u8; 16] = [0xfd, 0x77, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];

    fn field(bytes: &[u8], at: usize) -> u32 {
        u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
    }

    #[test]
    fn icmp_answers_come_in_bursts_of_50_then_1000_a_second() {
        let mut budget = AnswerBudget::default();
        let start = 5_000_000_000;
        let sent = (0..200)
            .filter(|_| take_icmp_answer(&mut budget, ICMP_ANSWERS_PER_CPU, start))
            .count();
        assert_eq!(sent, 50, "a burst at first use");
        // One more each millisecond, with nothing saved up for a burst in between.
        assert!(!take_icmp_answer(
            &mut budget,
            ICMP_ANSWERS_PER_CPU,
            start + 999_999
        ));
        assert!(take_icmp_answer(
            &mut budget,
            ICMP_ANSWERS_PER_CPU,
            start + 1_000_000
        ));
        assert!(!take_icmp_answer(
            &mut budget,
            ICMP_ANSWERS_PER_CPU,
            start + 1_000_001
        ));
        let second = (0..1000u64)
            .filter(|ms| {
                take_icmp_answer(
                    &mut budget,
                    ICMP_ANSWERS_PER_CPU,
                    start + 2_000_000 + ms * 1_000_000,
                )
            })
            .count();
        assert_eq!(second, 1000);
        // A quiet second fills the bucket to its burst, no more.
        let later = start + 10_000_000_000;
        let burst = (0..200)
            .filter(|_| take_icmp_answer(&mut budget, ICMP_ANSWERS_PER_CPU, later))
            .count();
        assert_eq!(burst, 50);
        // A clock that went back earns nothing.
        assert!(!take_icmp_answer(
            &mut budget,
            ICMP_ANSWERS_PER_CPU,
            later - 5_000_000
        ));
    }

    #[test]
    fn a_destination_gets_six_answers_then_one_a_second() {
        let mut budget = AnswerBudget::default();
        let rate = ICMP_ANSWERS_PER_DESTINATION;
        let start = 5_000_000_000;
        assert_eq!(
            (0..20)
                .filter(|_| take_icmp_answer(&mut budget, rate, start))
                .count(),
            6
        );
        assert!(!take_icmp_answer(&mut budget, rate, start + 999_999_999));
        assert!(take_icmp_answer(&mut budget, rate, start + 1_000_000_000));
        assert!(!take_icmp_answer(&mut budget, rate, start + 1_000_000_001));
    }

    #[test]
    fn an_answer_takes_a_token_of_both_budgets_or_of_neither() {
        let now = 5_000_000_000;
        let (mut cpu, mut flooded, mut other) = Default::default();
        let answered = (0..20)
            .filter(|_| take_icmp_answer_to(&mut cpu, &mut flooded, now))
            .count();
        assert_eq!(answered, 6, "the destination's burst");
        // What the flooded destination was refused left the CPU's budget to the others.
        assert_eq!(cpu.tokens, ICMP_ANSWERS_PER_CPU.burst - 6);
        let others = (0..100)
            .filter(|_| take_icmp_answer_to(&mut cpu, &mut other, now))
            .count();
        assert_eq!(others, 6);
        // A CPU's budget spent: the destination's is not touched.
        let mut spent = AnswerBudget {
            tokens: 0,
            counted_ns: now,
        };
        let mut fresh = AnswerBudget::default();
        assert!(!take_icmp_answer_to(&mut spent, &mut fresh, now));
        assert_eq!(fresh, AnswerBudget::default());
    }

    #[test]
    fn headers_that_do_not_hold_are_not_answered() {
        let ip = ipv4([10, 0, 0, 2], [192, 0, 2, 9], 17);
        // 128 bytes long, with a UDP header.
        assert!(ipv4_header_holds(&ip, 8, 128));
        assert!(!ipv4_header_holds(&ip, 8, 127), "longer than the frame");
        let mut bad = ip;
        bad[10] ^= 1;
        assert!(!ipv4_header_holds(&bad, 8, 128), "checksum");
        let mut short = ipv4([10, 0, 0, 2], [192, 0, 2, 9], 6);
        put_u16(&mut short, 2, 20);
        put_u16(&mut short, 10, 0);
        let checksum = fold(sum(&short, 0));
        put_u16(&mut short, 10, checksum);
        assert!(
            !ipv4_header_holds(&short, 20, 128),
            "no room for its TCP header"
        );
        let mut version = ip;
        version[0] = 0x55;
        assert!(!ipv4_header_holds(&version, 8, 128));
        let ip6 = ipv6(CLIENT_V6, SERVER_V6, 17);
        assert!(ipv6_header_holds(&ip6, 8, 48));
        assert!(!ipv6_header_holds(&ip6, 8, 47));
        assert!(!ipv6_header_holds(&ip6, 20, 48), "no room for a TCP header");
        let mut version = ip6;
        version[0] = 0x40;
        assert!(!ipv6_header_holds(&version, 8, 48));
        // From the address it is sent to.
        let mut out = [0u8; RESET_IPV4_LEN];
        let mut out6 = [0u8; RESET_IPV6_LEN];
        let land6 = ipv6(SERVER_V6, SERVER_V6, IPPROTO_TCP);
        assert!(!reset_ipv6(
            &land6,
            &tcp(1, 2, 3, 0, SYN),
            0,
            false,
            &mut out6
        ));
        // A TCP header shorter than 20 bytes.
        let ip = ipv4([10, 0, 0, 2], [192, 0, 2, 9], IPPROTO_TCP);
        let mut short = tcp(1, 2, 3, 0, SYN);
        short[12] = 4 << 4;
        assert!(!reset_ipv4(&ip, &short, 0, false, &mut out));
        let land = ipv4([192, 0, 2, 9], [192, 0, 2, 9], IPPROTO_TCP);
        assert!(!reset_ipv4(
            &land,
            &tcp(1, 2, 3, 0, SYN),
            0,
            false,
            &mut out
        ));
    }

    #[test]
    fn the_ipv4_header_checksum_is_the_textbook_one() {
        // The example of the checksum's usual explanations: 45 00 00 73 … c0 a8 00 c7.
        let mut header = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0, 0, 0xc0, 0xa8, 0x00,
            0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        let checksum = fold(sum(&header, 0));
        assert_eq!(checksum, 0xb861);
        put_u16(&mut header, 10, checksum);
        assert!(verifies(&header, 0));
    }

    #[test]
    fn a_syn_is_answered_with_a_reset_acknowledging_it() {
        let mut out = [0u8; RESET_IPV4_LEN];
        let syn = tcp(40000, 7893, 0xffff_ffff, 0, SYN);
        let ip = ipv4([10, 0, 0, 2], [192, 0, 2, 9], IPPROTO_TCP);
        assert!(reset_ipv4(&ip, &syn, 0, false, &mut out));
        // From the dialled address and port, to the client.
        assert_eq!(&out[12..20], &[192, 0, 2, 9, 10, 0, 0, 2]);
        assert_eq!(u16::from_be_bytes([out[20], out[21]]), 7893);
        assert_eq!(u16::from_be_bytes([out[22], out[23]]), 40000);
        assert_eq!(field(&out, 24), 0, "no sequence number of its own");
        assert_eq!(field(&out, 28), 0, "the SYN's number plus one, wrapped");
        assert_eq!(out[32], 5 << 4);
        assert_eq!(out[33], RST | ACK);
        assert_eq!(u16::from_be_bytes([out[2], out[3]]), 40);
        assert_eq!((out[8], out[9]), (HOPS, IPPROTO_TCP));
        assert!(verifies(&out[..20], 0));
        let mut pseudo = [0u8; 12];
        pseudo[..8].copy_from_slice(&out[12..20]);
        pseudo[9] = IPPROTO_TCP;
        pseudo[11] = 20;
        assert!(verifies(&out[20..], sum(&pseudo, 0)));
    }

    /// The program builds each answer where it built the last one: nothing of that may
    /// remain, checksums least of all.
    #[test]
    fn an_answer_built_over_an_earlier_one_is_the_same_as_one_built_fresh() {
        let ip = ipv4([10, 0, 0, 2], [192, 0, 2, 9], IPPROTO_TCP);
        let syn = tcp(40000, 7893, 7, 0, SYN);
        let (mut fresh, mut reused) = ([0u8; RESET_IPV4_LEN], [0xa5u8; RESET_IPV4_LEN]);
        assert!(
            reset_ipv4(&ip, &syn, 0, false, &mut fresh)
                && reset_ipv4(&ip, &syn, 0, false, &mut reused)
        );
        assert_eq!(fresh, reused);
        let ip6 = ipv6(CLIENT_V6, SERVER_V6, IPPROTO_TCP);
        let (mut fresh, mut reused) = ([0u8; RESET_IPV6_LEN], [0xa5u8; RESET_IPV6_LEN]);
        assert!(
            reset_ipv6(&ip6, &syn, 0, false, &mut fresh)
                && reset_ipv6(&ip6, &syn, 0, false, &mut reused)
        );
        assert_eq!(fresh, reused);
        let quote = udp_quote_ipv4([10, 0, 0, 2], [192, 0, 2, 9]);
        let (mut fresh, mut reused) = ([0u8; UNREACHABLE_IPV4_LEN], [0xa5u8; UNREACHABLE_IPV4_LEN]);
        assert!(port_unreachable_ipv4(&quote, &mut fresh));
        assert!(port_unreachable_ipv4(&quote, &mut reused));
        assert_eq!(fresh, reused);
        let mut quote = [0u8; QUOTE_IPV6_LEN];
        quote[..40].copy_from_slice(&ipv6(CLIENT_V6, SERVER_V6, 17));
        let (mut fresh, mut reused) = ([0u8; UNREACHABLE_IPV6_LEN], [0xa5u8; UNREACHABLE_IPV6_LEN]);
        assert!(port_unreachable_ipv6(&quote, &mut fresh));
        assert!(port_unreachable_ipv6(&quote, &mut reused));
        assert_eq!(fresh, reused);
    }

    /// What a device finishing a `CHECKSUM_PARTIAL` packet does: sums from where the
    /// transport header is to the end, into the checksum field at `field`.
    fn finished_by_device(packet: &mut [u8], start: usize, field: usize) {
        let checksum = fold(sum(&packet[start..], 0));
        put_u16(packet, field, checksum);
    }

    #[test]
    fn answers_left_to_the_device_come_out_whole_once_it_finished_them() {
        let ip = ipv4([10, 0, 0, 2], [192, 0, 2, 9], IPPROTO_TCP);
        let syn = tcp(40000, 7893, 7, 0, SYN);
        let (mut whole, mut left) = ([0u8; RESET_IPV4_LEN], [0u8; RESET_IPV4_LEN]);
        assert!(reset_ipv4(&ip, &syn, 0, false, &mut whole));
        assert!(reset_ipv4(&ip, &syn, 0, true, &mut left));
        assert_ne!(whole, left);
        finished_by_device(&mut left, 20, 36);
        assert_eq!(whole, left);
        let ip6 = ipv6(CLIENT_V6, SERVER_V6, IPPROTO_TCP);
        let (mut whole, mut left) = ([0u8; RESET_IPV6_LEN], [0u8; RESET_IPV6_LEN]);
        assert!(reset_ipv6(&ip6, &syn, 0, false, &mut whole));
        assert!(reset_ipv6(&ip6, &syn, 0, true, &mut left));
        finished_by_device(&mut left, 40, 56);
        assert_eq!(whole, left);
        // An ICMP answer is whole as written, and stays whole when a device sums its
        // quoted UDP header into that header's checksum field.
        // The fixed point depends on the ports and the length: zero ones too (the device
        // then writes the other zero).
        for (ports, length) in [((5353, 7893), 13), ((0, 0), 0), ((0xffff, 0xffff), 0xffff)] {
            let mut quote = udp_quote_ipv4([10, 0, 0, 2], [192, 0, 2, 9]);
            put_u16(&mut quote, 20, ports.0);
            put_u16(&mut quote, 22, ports.1);
            put_u16(&mut quote, 24, length);
            put_u16(&mut quote, 26, 0x1234);
            let mut out = [0u8; UNREACHABLE_IPV4_LEN];
            assert!(port_unreachable_ipv4(&quote, &mut out));
            assert!(verifies(&out[20..], 0));
            let written = out;
            finished_by_device(&mut out, 48, 54);
            assert!(verifies(&out[20..], 0), "{ports:?} {length}");
            assert!(
                out == written || (written[54..56] == [0; 2] && out[54..56] == [0xff; 2]),
                "the device writes the same checksum (or the other zero): {ports:?} {length}"
            );
        }
        let mut quote = [0u8; QUOTE_IPV6_LEN];
        quote[..40].copy_from_slice(&ipv6(CLIENT_V6, SERVER_V6, 17));
        put_u16(&mut quote, 46, 0x4321);
        let mut out = [0u8; UNREACHABLE_IPV6_LEN];
        assert!(port_unreachable_ipv6(&quote, &mut out));
        let mut pseudo = [0u8; 40];
        pseudo[..32].copy_from_slice(&out[8..40]);
        pseudo[35] = 56;
        pseudo[39] = IPPROTO_ICMPV6;
        assert!(verifies(&out[40..], sum(&pseudo, 0)));
        finished_by_device(&mut out, 88, 94);
        assert!(verifies(&out[40..], sum(&pseudo, 0)));
    }

    #[test]
    fn a_segment_with_an_ack_is_answered_from_the_number_it_acknowledged() {
        let mut out = [0u8; RESET_IPV4_LEN];
        let ip = ipv4([10, 0, 0, 2], [192, 0, 2, 9], IPPROTO_TCP);
        assert!(reset_ipv4(
            &ip,
            &tcp(40000, 80, 1000, 5000, ACK | FIN),
            300,
            false,
            &mut out
        ));
        assert_eq!(field(&out, 24), 5000);
        assert_eq!(out[33], RST);
        // Without an ACK, the payload and the FIN are acknowledged.
        assert!(reset_ipv4(
            &ip,
            &tcp(40000, 80, 1000, 0, FIN),
            300,
            false,
            &mut out
        ));
        assert_eq!(field(&out, 28), 1301);
        assert_eq!(out[33], RST | ACK);
    }

    #[test]
    fn resets_and_packets_of_no_single_host_are_not_answered() {
        let mut out = [0u8; RESET_IPV4_LEN];
        let ip = ipv4([10, 0, 0, 2], [192, 0, 2, 9], IPPROTO_TCP);
        assert!(!reset_ipv4(&ip, &tcp(1, 2, 3, 4, RST), 0, false, &mut out));
        assert!(!reset_ipv4(
            &ip,
            &tcp(1, 2, 3, 4, RST | ACK),
            0,
            false,
            &mut out
        ));
        for nobody in [
            [0, 0, 0, 0],
            [127, 0, 0, 1],
            [224, 0, 0, 1],
            [239, 1, 2, 3],
            [240, 0, 0, 1],
            [255; 4],
        ] {
            let from = ipv4(nobody, [192, 0, 2, 9], IPPROTO_TCP);
            assert!(!reset_ipv4(
                &from,
                &tcp(1, 2, 3, 0, SYN),
                0,
                false,
                &mut out
            ));
            let to = ipv4([10, 0, 0, 2], nobody, IPPROTO_TCP);
            assert!(!reset_ipv4(&to, &tcp(1, 2, 3, 0, SYN), 0, false, &mut out));
        }
        assert_eq!(out, [0; RESET_IPV4_LEN], "nothing written");
        let mut out = [0u8; RESET_IPV6_LEN];
        let mut multicast = [0u8; 16];
        multicast[0] = 0xff;
        let syn = tcp(1, 2, 3, 0, SYN);
        assert!(!reset_ipv6(
            &ipv6(multicast, SERVER_V6, IPPROTO_TCP),
            &syn,
            0,
            false,
            &mut out
        ));
        assert!(!reset_ipv6(
            &ipv6(CLIENT_V6, [0; 16], IPPROTO_TCP),
            &syn,
            0,
            false,
            &mut out
        ));
        let mut loopback = [0u8; 16];
        loopback[15] = 1;
        let mut mapped = [0u8; 16];
        mapped[10..].copy_from_slice(&[0xff, 0xff, 10, 0, 0, 2]);
        for nobody in [loopback, mapped] {
            let from = ipv6(nobody, SERVER_V6, IPPROTO_TCP);
            assert!(!reset_ipv6(&from, &syn, 0, false, &mut out));
        }
        let reset = tcp(1, 2, 3, 0, RST);
        assert!(!reset_ipv6(
            &ipv6(CLIENT_V6, SERVER_V6, IPPROTO_TCP),
            &reset,
            0,
            false,
            &mut out
        ));
        assert_eq!(out, [0; RESET_IPV6_LEN], "nothing written");
    }

    #[test]
    fn an_ipv6_reset_checksums_with_its_pseudo_header() {
        let mut out = [0u8; RESET_IPV6_LEN];
        let ip = ipv6(CLIENT_V6, SERVER_V6, IPPROTO_TCP);
        assert!(reset_ipv6(
            &ip,
            &tcp(40000, 443, 77, 0, SYN),
            0,
            false,
            &mut out
        ));
        assert_eq!(out[0] >> 4, 6);
        assert_eq!(u16::from_be_bytes([out[4], out[5]]), 20);
        assert_eq!((out[6], out[7]), (IPPROTO_TCP, HOPS));
        assert_eq!(&out[8..24], &SERVER_V6);
        assert_eq!(&out[24..40], &CLIENT_V6);
        assert_eq!(u16::from_be_bytes([out[40], out[41]]), 443);
        assert_eq!(field(&out, 48), 78);
        let mut pseudo = [0u8; 40];
        pseudo[..32].copy_from_slice(&out[8..40]);
        pseudo[35] = 20;
        pseudo[39] = IPPROTO_TCP;
        assert!(verifies(&out[40..], sum(&pseudo, 0)));
    }

    fn udp_quote_ipv4(src: [u8; 4], dst: [u8; 4]) -> [u8; QUOTE_IPV4_LEN] {
        let mut quote = [0u8; QUOTE_IPV4_LEN];
        quote[..20].copy_from_slice(&ipv4(src, dst, 17));
        put_u16(&mut quote, 20, 5353);
        put_u16(&mut quote, 22, 7893);
        quote
    }

    #[test]
    fn a_datagram_is_answered_with_a_port_unreachable_quoting_it() {
        let mut out = [0u8; UNREACHABLE_IPV4_LEN];
        let quote = udp_quote_ipv4([10, 0, 0, 2], [192, 0, 2, 9]);
        assert!(port_unreachable_ipv4(&quote, &mut out));
        assert_eq!(&out[12..20], &[192, 0, 2, 9, 10, 0, 0, 2]);
        assert_eq!(out[9], IPPROTO_ICMP);
        assert_eq!(
            u16::from_be_bytes([out[2], out[3]]) as usize,
            UNREACHABLE_IPV4_LEN
        );
        assert_eq!((out[20], out[21]), (3, 3));
        assert_eq!(&out[24..28], &[0; 4]);
        // All of it but the quoted UDP checksum (see `quote_udp_checksum_as_its_own_sum`).
        assert_eq!(&out[28..54], &quote[..26]);
        assert!(verifies(&out[..20], 0));
        assert!(verifies(&out[20..], 0));
    }

    #[test]
    fn datagrams_with_options_or_of_no_single_host_are_not_answered() {
        let mut out = [0u8; UNREACHABLE_IPV4_LEN];
        let mut options = udp_quote_ipv4([10, 0, 0, 2], [192, 0, 2, 9]);
        options[0] = 0x46;
        assert!(!port_unreachable_ipv4(&options, &mut out));
        for (src, dst) in [
            ([0, 0, 0, 0], [192, 0, 2, 9]),
            ([10, 0, 0, 2], [255, 255, 255, 255]),
            ([10, 0, 0, 2], [239, 255, 255, 250]),
        ] {
            assert!(!port_unreachable_ipv4(&udp_quote_ipv4(src, dst), &mut out));
        }
        assert_eq!(out, [0; UNREACHABLE_IPV4_LEN]);
    }

    #[test]
    fn an_ipv6_datagram_is_answered_with_an_icmpv6_port_unreachable() {
        let mut quote = [0u8; QUOTE_IPV6_LEN];
        quote[..40].copy_from_slice(&ipv6(CLIENT_V6, SERVER_V6, 17));
        put_u16(&mut quote, 40, 5353);
        put_u16(&mut quote, 42, 7893);
        let mut out = [0u8; UNREACHABLE_IPV6_LEN];
        assert!(port_unreachable_ipv6(&quote, &mut out));
        assert_eq!(&out[8..24], &SERVER_V6);
        assert_eq!(&out[24..40], &CLIENT_V6);
        assert_eq!(out[6], IPPROTO_ICMPV6);
        assert_eq!(u16::from_be_bytes([out[4], out[5]]), 56);
        assert_eq!((out[40], out[41]), (1, 4));
        assert_eq!(&out[48..94], &quote[..46]);
        let mut pseudo = [0u8; 40];
        pseudo[..32].copy_from_slice(&out[8..40]);
        pseudo[35] = 56;
        pseudo[39] = IPPROTO_ICMPV6;
        assert!(verifies(&out[40..], sum(&pseudo, 0)));
        let mut multicast = quote;
        multicast[24] = 0xff;
        let mut untouched = [0u8; UNREACHABLE_IPV6_LEN];
        assert!(!port_unreachable_ipv6(&multicast, &mut untouched));
        assert_eq!(untouched, [0; UNREACHABLE_IPV6_LEN]);
    }
}
