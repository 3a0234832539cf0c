//! Steering what local processes originate (`tproxy run --local`): what the `cgroup/connect4`
//! and `cgroup/connect6` programs and their loader must agree on, and the decisions those
//! programs make.
//!
//! Each rule for local connections (origin `local` or `any`) has a selection of processes
//! ([`Selection`]: cgroups and users), and its entries are looked up under that selection's
//! index ([`selection_ifindex`]). A socket of a process in some selections that connects to a
//! destination the best of their steer rules takes gets tproxy's routing mark as its
//! `SO_MARK` before the kernel looks up its route, and the rule's listener in its socket
//! storage ([`LocalDecision`]). The policy routing sends marked sockets to the `local … dev lo
//! src 127.0.0.1` (and `::1`) routes, so its packets travel over `lo`, where the loopback tc
//! program ([`LOOPBACK_PROGRAM_NAME`]) finds the client socket and hands them to that
//! listener. Nothing is rewritten: the application keeps the peer it dialled. A datagram that
//! a selected process sends from an unconnected socket (`sendto`) is decided on its own by the
//! `cgroup/sendmsg4` and `cgroup/sendmsg6` programs: a steered one gets a loopback source
//! ([`LOOPBACK_SOURCE_V4`], [`LOOPBACK_SOURCE_V6`]) instead of a mark, and a policy rule for
//! that source sends it to the same routes.

use core::{fmt, str::FromStr};

use crate::decision::with_routing_mark;

/// Name of the `cgroup/connect4` program in the object file.
pub const CONNECT4_PROGRAM_NAME: &str = "tproxy_connect4";
/// Name of the `cgroup/connect6` program in the object file.
pub const CONNECT6_PROGRAM_NAME: &str = "tproxy_connect6";
/// Name of the `cgroup/sendmsg4` program in the object file.
pub const SENDMSG4_PROGRAM_NAME: &str = "tproxy_sendmsg4";
/// Name of the `cgroup/sendmsg6` program in the object file.
pub const SENDMSG6_PROGRAM_NAME: &str = "tproxy_sendmsg6";

/// The source the `sendmsg4` program gives a steered datagram of an unconnected socket
/// (network order); the policy routing's `from 127.84.80.1 iif lo` rule sends it to `lo`.
/// A loopback address of its own (every 127/8 address is the host's), not 127.0.0.1: a
/// socket bound to 127.0.0.1 sending to one of the host's own addresses, or a connection
/// that `route_localnet` NAT sends on with source 127.0.0.1, must not be taken for one.
pub const LOOPBACK_SOURCE_V4: [u8; 4] = [127, 84, 80, 1];
/// The source the `sendmsg6` program gives a steered datagram (`::1`).
pub const LOOPBACK_SOURCE_V6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// Name of the tc program attached to `lo` in place of the main one while local origin is
/// steered: it takes a packet on `lo` from a local process to the listener the connect (or
/// sendmsg) program chose for its socket (see [`LocalDecision`]).
pub const LOOPBACK_PROGRAM_NAME: &str = "tproxy_loopback";
/// Global (`u32`): non-zero to steer local connections to loopback addresses when the rule's
/// listener is an external proxy (`steer_loopback`).
pub const STEER_LOOPBACK_GLOBAL: &str = "STEER_LOOPBACK";
/// Global (`u64`): the cgroup v2 id of tproxy's own cgroup, whose sockets are never marked.
pub const OWN_CGROUP_GLOBAL: &str = "OWN_CGROUP_ID";
/// Global (`u64`): the cookie of tproxy's network namespace. A cgroup holds processes of any
/// namespace (containers); only sockets of tproxy's own are marked, since only there does
/// the mark lead to tproxy's routing and program.
pub const OWN_NETNS_GLOBAL: &str = "OWN_NETNS_COOKIE";
/// Array map of [`Selection`]s, [`MAX_SELECTIONS`] entries: which processes each
/// selection's rules apply to, filled by the loader before the programs are attached.
pub const SELECTIONS_MAP: &str = "LOCAL_SELECTIONS";
/// Socket storage of [`LocalDecision`]s: what the connect and sendmsg programs decided for
/// a socket, which the loopback program reads. Pinned with the rest, so that an instance
/// that adopts the pinned programs' places reads what its predecessor's programs recorded.
pub const DECISIONS_MAP: &str = "LOCAL_DECISIONS";

/// The interface index under which the rule maps' source stage holds what the rules say
/// about local connections (rules with origin `local` or `any`) of selection 0, every
/// process: selection `k` has [`selection_ifindex`]`(k)`. The connect programs look rules up
/// with it. No interface has it (the kernel's indices are positive `int`s), so forwarded
/// rules, which are written under the indices of the interfaces they apply to, never answer
/// for a local connection, and local rules never for an arrival.
pub const LOCAL_ORIGIN_IFINDEX: u32 = u32::MAX;

/// Most distinct selections (`cgroup`/`uid` sets) the rules for local connections may
/// have, selection 0 (every process) included: the connect programs try them all, in a
/// bounded loop, each with its own rule lookups.
pub const MAX_SELECTIONS: usize = 8;

/// Most cgroups one selection may name.
pub const MAX_SELECTION_CGROUPS: usize = 8;

/// LPM trie (`[u8; 4]` destination to `u32` bits): the host's routes, for rules for local
/// connections with an `out_interface` (iptables' `-o` in OUTPUT, nft's `oifname` in an
/// output chain). A connect program cannot look a route up itself, so the loader mirrors the
/// `local` and `main` routing tables here, each prefix with the bits of the
/// [`MAX_OUT_INTERFACES`] rules' out-interface names and patterns that the interface its
/// route leaves by matches (see [`route_selected`]), and follows their changes. Empty
/// without such rules.
pub const ROUTES_V4_MAP: &str = "LOCAL_ROUTES_V4";
/// As [`ROUTES_V4_MAP`], for IPv6 destinations (`[u8; 16]`).
pub const ROUTES_V6_MAP: &str = "LOCAL_ROUTES_V6";
/// Most distinct `out_interface` names and patterns the rules may have: one bit each, in
/// each generation's byte of a route's value (see [`route_bits_shift`]).
pub const MAX_OUT_INTERFACES: usize = 8;

/// Where the out-interface bits of the rules of `generation` are in a route's value: each
/// parity has a byte of its own, so that mirroring the routes for a new rule set's names
/// (written before the switch) does not change what the rules in force read.
pub const fn route_bits_shift(generation: u32) -> u32 {
    (generation & 1) * 8
}
/// Whether a selection whose rules have an `out_interface` with bits `required` (its
/// entry in `MarkRules::selection_routes`; 0: the rules have none) is asked about a
/// connection whose destination's route has `routes` (from [`ROUTES_V4_MAP`]). The rules
/// with an `out_interface` are a selection of their own, with the processes of theirs, so
/// that they are looked up in the stages like the others rather than tried one by one.
/// The bit is the rule's own name's: a pattern's is set on the routes by the interfaces it
/// matches, not by the other names it matches.
#[inline(always)]
pub const fn route_selected(required: u32, routes: u32) -> bool {
    required == 0 || routes & required != 0
}

/// Route-map bit of an IPv4 destination that the `local` table routes as broadcast (a
/// subnet's broadcast address): never steered. The local table is looked up before
/// tproxy's routing rule, so such a socket's packets never reach `lo`, whatever its mark,
/// and an unconnected socket's datagram given the loopback source would be refused
/// (EINVAL) instead of broadcast. (255.255.255.255 and 0.0.0.0/8 are never steered by
/// their address alone.) The loader mirrors the local table whenever local connections
/// are steered, rules with an `out_interface` or not.
pub const ROUTE_BROADCAST: u32 = 1 << 31;
/// Most routes (of each family) the route maps mirror.
pub const MAX_MIRRORED_ROUTES: u32 = 1 << 18;

/// The source stage's interface index of selection `k`'s rules.
pub const fn selection_ifindex(k: u32) -> u32 {
    LOCAL_ORIGIN_IFINDEX - k
}

/// Most uid ranges one selection may name (the connect programs try them all, in a bounded
/// loop).
pub const MAX_UID_RANGES: usize = 16;

/// An inclusive range of user ids, e.g. `1000-1999`, or a single uid (`1000`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UidRange {
    pub first: u32,
    pub last: u32,
}

impl UidRange {
    /// Whether `uid` is in the range.
    pub const fn contains(&self, uid: u32) -> bool {
        self.first <= uid && uid <= self.last
    }
}

impl fmt::Display for UidRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// Why a uid range did not parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UidRangeError {
    /// A bound is not a number from 0 to 4294967294.
    NotAUid,
    /// The first uid is above the last.
    Reversed,
}

impl fmt::Display for UidRangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UidRangeError::NotAUid => {
                "not a uid (0 to 4294967294) or a range of them like 1000-1999"
            }
            UidRangeError::Reversed => "the range's first uid is above its last",
        })
    }
}

/// The kernel's "no uid" (`(uid_t)-1`), which no process runs as.
const INVALID_UID: u32 = u32::MAX;

impl FromStr for UidRange {
    type Err = UidRangeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let uid = |part: &str| match part.trim().parse::<u32>() {
            Ok(uid) if uid != INVALID_UID => Ok(uid),
            _ => Err(UidRangeError::NotAUid),
        };
        let (first, last) = match text.split_once('-') {
            Some((first, last)) => (uid(first)?, uid(last)?),
            None => {
                let only = uid(text)?;
                (only, only)
            }
        };
        if first > last {
            return Err(UidRangeError::Reversed);
        }
        Ok(UidRange { first, last })
    }
}

/// Whether a process whose user (or group) id is `id` is selected by the first `len` of
/// `ranges` (every one when `len` is 0). Group ids take the uid ranges' form: both are
/// `u32`s whose all-ones value no process runs as.
#[inline(always)]
pub fn id_selected<const N: usize>(id: u32, ranges: &[UidRange; N], len: u32) -> bool {
    if len == 0 {
        return true;
    }
    let mut i = 0;
    while i < N {
        if i as u32 >= len {
            break;
        }
        if ranges[i].contains(id) {
            return true;
        }
        i += 1;
    }
    false
}

/// Most group id ranges one selection may name (the connect programs try them all, in a
/// bounded loop).
pub const MAX_GID_RANGES: usize = 8;

/// Most net_cls class id ranges one selection may name (the connect programs try them all,
/// in a bounded loop).
pub const MAX_CLASSID_RANGES: usize = 8;

/// An inclusive range of cgroup v1 net_cls class ids (what a process's `net_cls.classid`
/// holds, 0 outside any class), e.g. `1`, `0x100001` or `2-4294967295`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassidRange {
    pub first: u32,
    pub last: u32,
}

impl ClassidRange {
    /// Whether `classid` is in the range.
    pub const fn contains(&self, classid: u32) -> bool {
        self.first <= classid && classid <= self.last
    }
}

impl fmt::Display for ClassidRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// Why a class id range did not parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClassidRangeError {
    /// A bound is not a number from 0 to 4294967295 (decimal, or hex with `0x`).
    NotAClassid,
    /// The first class id is above the last.
    Reversed,
}

impl fmt::Display for ClassidRangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ClassidRangeError::NotAClassid => {
                "not a net_cls class id (0 to 4294967295, or hex like 0x100001) or a range of \
                 them like 1-9"
            }
            ClassidRangeError::Reversed => "the range's first class id is above its last",
        })
    }
}

impl FromStr for ClassidRange {
    type Err = ClassidRangeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let classid = |part: &str| {
            let part = part.trim();
            match part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
                Some(hex) => u32::from_str_radix(hex, 16),
                None => part.parse::<u32>(),
            }
            .map_err(|_| ClassidRangeError::NotAClassid)
        };
        let (first, last) = match text.split_once('-') {
            Some((first, last)) => (classid(first)?, classid(last)?),
            None => {
                let only = classid(text)?;
                (only, only)
            }
        };
        if first > last {
            return Err(ClassidRangeError::Reversed);
        }
        Ok(ClassidRange { first, last })
    }
}

/// Whether a process in net_cls class `classid` is selected by the first `len` of `ranges`
/// (every class, and none, when `len` is 0).
#[inline(always)]
pub fn classid_selected(
    classid: u32,
    ranges: &[ClassidRange; MAX_CLASSID_RANGES],
    len: u32,
) -> bool {
    if len == 0 {
        return true;
    }
    let mut i = 0;
    while i < MAX_CLASSID_RANGES {
        if i as u32 >= len {
            break;
        }
        if ranges[i].contains(classid) {
            return true;
        }
        i += 1;
    }
    false
}

/// One cgroup of a [`Selection`]: a process is in it (or below it) when its cgroup's
/// ancestor at `level` (the root is level 0) has the id `id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SelectedCgroup {
    /// The cgroup's id (the inode of its directory in the cgroup v2 hierarchy).
    pub id: u64,
    /// How many directories below the root it is.
    pub level: u64,
}

/// The processes one selection's rules apply to (an entry of [`SELECTIONS_MAP`]): those in
/// one of its cgroups (or below) that run as one of its users, in one of its groups, and
/// are in one of its net_cls classes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// Non-zero when some rule has this selection.
    pub in_use: u32,
    /// How many of `cgroups` are used; 0: every cgroup.
    pub cgroups_len: u32,
    /// How many of `uids` are used; 0: every user.
    pub uids_len: u32,
    /// How many of `classids` are used; 0: every net_cls class.
    pub classids_len: u32,
    /// How many of `gids` are used; 0: every group.
    pub gids_len: u32,
    /// Keeps `cgroups` 8-byte aligned with no hidden padding.
    pub _reserved: u32,
    pub cgroups: [SelectedCgroup; MAX_SELECTION_CGROUPS],
    pub uids: [UidRange; MAX_UID_RANGES],
    pub classids: [ClassidRange; MAX_CLASSID_RANGES],
    /// The processes' (real) group ids, in the uid ranges' form.
    pub gids: [UidRange; MAX_GID_RANGES],
}

impl Selection {
    /// Whether a process of `uid` and group `gid` in net_cls class `classid` is selected;
    /// `ancestor(level)` is the id of its cgroup's ancestor at `level` (the process's own
    /// cgroup at its own level; 0 above it).
    #[inline(always)]
    pub fn selects(&self, uid: u32, gid: u32, classid: u32, ancestor: impl Fn(u32) -> u64) -> bool {
        if self.in_use == 0
            || !id_selected(uid, &self.uids, self.uids_len)
            || !id_selected(gid, &self.gids, self.gids_len)
            || !classid_selected(classid, &self.classids, self.classids_len)
        {
            return false;
        }
        if self.cgroups_len == 0 {
            return true;
        }
        let mut i = 0;
        while i < MAX_SELECTION_CGROUPS {
            if i as u32 >= self.cgroups_len {
                break;
            }
            let cgroup = &self.cgroups[i];
            if ancestor(cgroup.level as u32) == cgroup.id {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// What the connect (or sendmsg) program decided for a socket of a local process, kept in
/// the socket's storage for the tc program on `lo`, which cannot tell which process a packet
/// there comes from: the listener, and the destination it was decided for. A connected
/// socket has one destination; an unconnected UDP socket's record is that of its last
/// steered datagram, so the tc program takes a datagram only when its destination is the
/// record's (see [`LocalDecision::listener_for`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalDecision {
    /// The destination address, as the packet carries it (IPv4: the first word, the others
    /// 0).
    pub destination: [u32; 4],
    /// The destination port, host order.
    pub port: u16,
    /// 1 for an IPv6 destination.
    pub ipv6: u16,
    /// The listener's index plus one; 0: none.
    pub listener: u32,
}

impl LocalDecision {
    /// The record of a steer to `listener` for `destination` (4 bytes: IPv4, 16: IPv6) and
    /// `port` (host order).
    pub fn new(destination: &[u8], port: u16, listener: u32) -> Self {
        let mut words = [0u32; 4];
        let mut i = 0;
        while i < 4 && i * 4 + 4 <= destination.len() {
            let at = i * 4;
            words[i] = u32::from_ne_bytes([
                destination[at],
                destination[at + 1],
                destination[at + 2],
                destination[at + 3],
            ]);
            i += 1;
        }
        LocalDecision {
            destination: words,
            port,
            ipv6: (destination.len() == 16) as u16,
            listener: listener + 1,
        }
    }

    /// The listener for an IPv4 packet to `destination` (as the packet carries it) and
    /// `port` (host order), if this record was made for it.
    #[inline(always)]
    pub fn listener_for_v4(&self, destination: u32, port: u16) -> Option<u32> {
        let same = self.ipv6 == 0 && self.destination[0] == destination;
        self.listener_if(same, port)
    }

    /// As [`LocalDecision::listener_for_v4`], for an IPv6 packet.
    #[inline(always)]
    pub fn listener_for_v6(&self, destination: &[u32; 4], port: u16) -> Option<u32> {
        let same = self.ipv6 != 0
            && self.destination[0] == destination[0]
            && self.destination[1] == destination[1]
            && self.destination[2] == destination[2]
            && self.destination[3] == destination[3];
        self.listener_if(same, port)
    }

    #[inline(always)]
    fn listener_if(&self, same_address: bool, port: u16) -> Option<u32> {
        if same_address && self.port == port && self.listener != 0 {
            Some(self.listener - 1)
        } else {
            None
        }
    }
}

/// Whether a connecting socket is tproxy's own, and so never marked: it carries tproxy's
/// socket mark (the relay's upstream connections), or its process is in tproxy's cgroup.
pub const fn is_own_socket(socket_mark: u32, own_mark: u32, cgroup: u64, own_cgroup: u64) -> bool {
    (own_mark != 0 && socket_mark == own_mark) || (own_cgroup != 0 && cgroup == own_cgroup)
}

/// Whether a socket is in tproxy's network namespace (`own`: its cookie, never 0).
pub const fn in_own_namespace(cookie: u64, own: u64) -> bool {
    own != 0 && cookie == own
}

/// The `SO_MARK` a connecting socket should get, or `None` to leave it as it is. A steered
/// connection gets the routing mark (only the bits under `mask`); a socket that an earlier
/// connect of its own marked (a UDP socket connected again, elsewhere) loses it, so that its
/// new destination is reached directly.
pub const fn socket_mark_for(current: u32, steered: bool, mark: u32, mask: u32) -> Option<u32> {
    let marked = current & mask == mark & mask;
    match (steered, marked) {
        (true, true) => None,
        (true, false) => Some(with_routing_mark(current, mark, mask)),
        (false, true) => Some(current & !mask),
        (false, false) => None,
    }
}

/// Whether a packet on `lo` carries tproxy's routing mark: a socket the connect programs
/// marked sent it. The loopback program takes only those, and the datagrams the `sendmsg`
/// programs steered (see [`steered_datagram_v4`]), which carry no mark: the other local
/// processes' traffic on `lo` (to 127.0.0.1, to the host's own addresses) is theirs.
pub const fn marked_by_connect(packet_mark: u32, mark: u32, mask: u32) -> bool {
    packet_mark & mask == mark & mask
}

/// Whether an IPv4 header (its first 20 bytes) is that of a datagram the `sendmsg4` program
/// steered: UDP from [`LOOPBACK_SOURCE_V4`] to a non-loopback address. The tc program on
/// `lo` takes it although it carries no mark. Nothing else looks like it there: without
/// tproxy's `from 127.84.80.1 iif lo` rule the kernel refuses a loopback source for a route
/// that leaves the host (EINVAL), one arriving on another interface is a martian, dropped
/// before routing, and only a socket bound to that very address could send one otherwise.
pub const fn steered_datagram_v4(ip: &[u8; 20]) -> bool {
    let source = u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]);
    ip[9] == IPPROTO_UDP && source == u32::from_ne_bytes(LOOPBACK_SOURCE_V4) && ip[16] != 127
}

/// As [`steered_datagram_v4`], for an IPv6 header: UDP (no extension header: the program's
/// datagrams carry none, and `lo`'s MTU leaves them unfragmented) from `::1` to another
/// address. IPv6 does not refuse a loopback source for a route that leaves the host (the
/// datagram would go out with it and be dropped by its receiver, which discards a loopback
/// source from the wire), so without tproxy's rule no such datagram reaches `lo` either.
pub const fn steered_datagram_v6(ip: &[u8; 40]) -> bool {
    ip[6] == IPPROTO_UDP && is_ipv6_loopback_at(ip, 8) && !is_ipv6_loopback_at(ip, 24)
}

const IPPROTO_UDP: u8 = 17;

/// Whether the 16 bytes of `ip` from `at` are `::1` (compared in place: the tc program's
/// stack has no room for a copy).
const fn is_ipv6_loopback_at(ip: &[u8; 40], at: usize) -> bool {
    let mut i = 0;
    while i < 16 {
        if ip[at + i] != LOOPBACK_SOURCE_V6[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// `addr` as an IPv4-mapped IPv6 address, the inverse of [`mapped_ipv4`].
pub const fn ipv4_mapped(addr: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, addr[0], addr[1], addr[2], addr[3],
    ]
}

/// The IPv4 address inside an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`): a dual-stack
/// socket connecting to one sends IPv4, so the IPv4 rules decide.
pub const fn mapped_ipv4(addr: [u8; 16]) -> Option<[u8; 4]> {
    let mut i = 0;
    while i < 10 {
        if addr[i] != 0 {
            return None;
        }
        i += 1;
    }
    if addr[10] == 0xff && addr[11] == 0xff {
        Some([addr[12], addr[13], addr[14], addr[15]])
    } else {
        None
    }
}

#[cfg(feature = "user")]
// SAFETY: plain `repr(C)` data of two u32 fields, no padding.
unsafe impl aya::Pod for UidRange {}
#[cfg(feature = "user")]
// SAFETY: plain `repr(C)` data of two u32 fields, no padding.
unsafe impl aya::Pod for ClassidRange {}
#[cfg(feature = "user")]
// SAFETY: plain `repr(C)` data of two u64 fields, no padding.
unsafe impl aya::Pod for SelectedCgroup {}
#[cfg(feature = "user")]
// SAFETY: plain `repr(C)` data: four u32, then arrays of 8-byte-aligned plain structs, no
// padding.
unsafe impl aya::Pod for Selection {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_selection_with_an_out_interface_takes_connections_whose_route_has_its_bit() {
        let via_wan = 0b10 << route_bits_shift(1);
        let routes = |bits: u32| bits << route_bits_shift(1);
        assert!(route_selected(via_wan, routes(0b10)));
        assert!(route_selected(via_wan, routes(0b110)), "other bits too");
        assert!(
            !route_selected(via_wan, routes(0b01)),
            "another interface's route"
        );
        assert!(!route_selected(via_wan, 0), "no route");
        assert!(
            !route_selected(via_wan, 0b10 << route_bits_shift(0)),
            "the other generation's bits"
        );
        assert!(route_selected(0, 0), "a selection without out_interface");
        assert!(route_selected(0, routes(0b1)));
    }

    #[test]
    fn uid_ranges_parse_and_name_what_is_wrong() {
        assert_eq!(
            "1000".parse(),
            Ok(UidRange {
                first: 1000,
                last: 1000
            })
        );
        assert_eq!(
            " 0-999 ".parse(),
            Ok(UidRange {
                first: 0,
                last: 999
            })
        );
        assert_eq!(
            "2000-1000".parse::<UidRange>(),
            Err(UidRangeError::Reversed)
        );
        for bad in [
            "",
            "-",
            "x",
            "1000-",
            "-5",
            "4294967295",
            "1-4294967295",
            "1.5",
        ] {
            assert_eq!(
                bad.parse::<UidRange>(),
                Err(UidRangeError::NotAUid),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn only_the_used_ranges_select_and_none_selects_everyone() {
        let mut ranges = [UidRange::default(); MAX_UID_RANGES];
        ranges[0] = UidRange {
            first: 1000,
            last: 1999,
        };
        ranges[1] = UidRange {
            first: 33,
            last: 33,
        };
        assert!(id_selected(12345, &ranges, 0));
        assert!(id_selected(1000, &ranges, 2) && id_selected(1999, &ranges, 2));
        assert!(id_selected(33, &ranges, 2));
        assert!(!id_selected(2000, &ranges, 2) && !id_selected(34, &ranges, 2));
        // Unused entries are zero: uid 0 must not slip through them.
        assert!(!id_selected(0, &ranges, 2));
        ranges[MAX_UID_RANGES - 1] = UidRange { first: 7, last: 7 };
        assert!(id_selected(7, &ranges, MAX_UID_RANGES as u32));
    }

    #[test]
    fn own_sockets_are_known_by_mark_or_cgroup_and_zero_means_unset() {
        assert!(is_own_socket(0x2000000, 0x2000000, 5, 9));
        assert!(is_own_socket(0, 0x2000000, 9, 9));
        assert!(!is_own_socket(0, 0x2000000, 5, 9));
        assert!(!is_own_socket(0, 0, 0, 0));
    }

    #[test]
    fn only_tproxys_namespace_and_an_unknown_one_is_none() {
        assert!(in_own_namespace(4096, 4096));
        assert!(!in_own_namespace(4097, 4096));
        assert!(!in_own_namespace(0, 0));
    }

    #[test]
    fn a_steered_socket_gets_the_mark_and_a_reconnected_one_loses_it() {
        let (mark, mask) = (0x1000000, 0x1000000);
        assert_eq!(socket_mark_for(0, true, mark, mask), Some(0x1000000));
        // Other tools' bits stay.
        assert_eq!(socket_mark_for(0x5, true, mark, mask), Some(0x1000005));
        assert_eq!(socket_mark_for(0x1000005, true, mark, mask), None);
        assert_eq!(socket_mark_for(0x1000005, false, mark, mask), Some(0x5));
        assert_eq!(socket_mark_for(0x5, false, mark, mask), None);
    }

    #[test]
    fn on_loopback_only_marked_packets_are_steered() {
        let (mark, mask) = (0x1000000, 0x1000000);
        assert!(!marked_by_connect(0, mark, mask));
        assert!(marked_by_connect(0x1000001, mark, mask));
    }

    #[test]
    fn only_udp_from_loopback_to_elsewhere_is_a_steered_datagram() {
        let v4 = |protocol: u8, source: [u8; 4], destination: [u8; 4]| {
            let mut ip = [0u8; 20];
            ip[9] = protocol;
            ip[12..16].copy_from_slice(&source);
            ip[16..20].copy_from_slice(&destination);
            steered_datagram_v4(&ip)
        };
        assert!(v4(17, LOOPBACK_SOURCE_V4, [10, 10, 2, 2]));
        assert!(!v4(6, LOOPBACK_SOURCE_V4, [10, 10, 2, 2]), "TCP");
        assert!(
            !v4(17, LOOPBACK_SOURCE_V4, [127, 0, 0, 53]),
            "loopback to loopback"
        );
        assert!(
            !v4(17, [127, 0, 0, 1], [10, 10, 2, 2]),
            "a socket bound to 127.0.0.1, or route_localnet NAT"
        );
        assert!(!v4(17, [10, 10, 1, 1], [10, 10, 2, 2]));
        let v6 = |next: u8, source: [u8; 16], destination: [u8; 16]| {
            let mut ip = [0u8; 40];
            ip[6] = next;
            ip[8..24].copy_from_slice(&source);
            ip[24..40].copy_from_slice(&destination);
            steered_datagram_v6(&ip)
        };
        let mut elsewhere = [0u8; 16];
        elsewhere[..2].copy_from_slice(&[0xfd, 0]);
        elsewhere[15] = 2;
        assert!(v6(17, LOOPBACK_SOURCE_V6, elsewhere));
        assert!(!v6(6, LOOPBACK_SOURCE_V6, elsewhere), "TCP");
        assert!(!v6(17, LOOPBACK_SOURCE_V6, LOOPBACK_SOURCE_V6));
        assert!(!v6(17, elsewhere, elsewhere));
    }

    #[test]
    fn a_selection_takes_its_users_in_its_cgroups_or_below() {
        let mut selection = Selection {
            in_use: 1,
            ..Selection::default()
        };
        // Process in /a (id 10, level 1)/b (id 11, level 2), uid 1000.
        let ancestors = |level: u32| match level {
            0 => 1,
            1 => 10,
            2 => 11,
            _ => 0,
        };
        assert!(selection.selects(1000, 0, 0, ancestors), "every process");
        selection.cgroups[0] = SelectedCgroup { id: 20, level: 1 };
        selection.cgroups[1] = SelectedCgroup { id: 10, level: 1 };
        selection.cgroups_len = 1;
        assert!(!selection.selects(1000, 0, 0, ancestors), "another cgroup");
        selection.cgroups_len = 2;
        assert!(
            selection.selects(1000, 0, 0, ancestors),
            "below a selected cgroup"
        );
        selection.cgroups[1] = SelectedCgroup { id: 10, level: 2 };
        assert!(
            !selection.selects(1000, 0, 0, ancestors),
            "the id must be at its own level"
        );
        selection.cgroups_len = 0;
        selection.uids[0] = UidRange {
            first: 1000,
            last: 1000,
        };
        selection.uids_len = 1;
        assert!(selection.selects(1000, 0, 0, ancestors));
        assert!(!selection.selects(1001, 0, 0, ancestors));
        // Groups narrow it further: uid 1000 and one of the groups.
        selection.gids[0] = UidRange {
            first: 23333,
            last: 23333,
        };
        selection.gids_len = 1;
        assert!(selection.selects(1000, 23333, 0, ancestors));
        assert!(
            !selection.selects(1000, 1000, 0, ancestors),
            "another group"
        );
        selection.uids_len = 0;
        assert!(selection.selects(0, 23333, 0, ancestors), "the group alone");
        selection.uids_len = 1;
        selection.in_use = 0;
        assert!(!selection.selects(1000, 0, 0, ancestors), "an unused entry");
    }

    #[test]
    fn classid_ranges_parse_decimal_or_hex_and_name_what_is_wrong() {
        assert_eq!("1".parse(), Ok(ClassidRange { first: 1, last: 1 }));
        assert_eq!(
            "0x100001".parse(),
            Ok(ClassidRange {
                first: 0x100001,
                last: 0x100001
            })
        );
        assert_eq!(
            "2-4294967295".parse(),
            Ok(ClassidRange {
                first: 2,
                last: u32::MAX
            })
        );
        assert_eq!(
            "5-4".parse::<ClassidRange>(),
            Err(ClassidRangeError::Reversed)
        );
        for bad in ["", "-", "x", "1-", "4294967296", "0x", "1.5", "0xg"] {
            assert_eq!(
                bad.parse::<ClassidRange>(),
                Err(ClassidRangeError::NotAClassid),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_selection_with_classes_takes_only_their_processes() {
        let mut selection = Selection {
            in_use: 1,
            ..Selection::default()
        };
        let root = |_: u32| 1;
        assert!(selection.selects(0, 0, 7, root), "every class");
        // `! --cgroup 1`: every class id but 1, 0 (no class) included.
        selection.classids[0] = ClassidRange { first: 0, last: 0 };
        selection.classids[1] = ClassidRange {
            first: 2,
            last: u32::MAX,
        };
        selection.classids_len = 2;
        assert!(selection.selects(0, 0, 0, root), "a process in no class");
        assert!(!selection.selects(0, 0, 1, root), "class 1");
        assert!(selection.selects(0, 0, 2, root) && selection.selects(0, 0, u32::MAX, root));
        selection.classids_len = 1;
        assert!(!selection.selects(0, 0, 2, root), "an unused range");
        selection.uids[0] = UidRange { first: 5, last: 5 };
        selection.uids_len = 1;
        assert!(
            !selection.selects(0, 0, 0, root),
            "the class and the user both"
        );
        assert!(selection.selects(5, 0, 0, root));
    }

    #[test]
    fn a_decision_answers_only_for_its_destination() {
        let v4 = LocalDecision::new(&[10, 0, 0, 2], 80, 1);
        let word = u32::from_ne_bytes;
        assert_eq!(v4.listener_for_v4(word([10, 0, 0, 2]), 80), Some(1));
        assert_eq!(v4.listener_for_v4(word([10, 0, 0, 3]), 80), None);
        assert_eq!(v4.listener_for_v4(word([10, 0, 0, 2]), 81), None);
        assert_eq!(
            v4.listener_for_v6(&[word([10, 0, 0, 2]), 0, 0, 0], 80),
            None,
            "another family"
        );
        let mut addr = [0u8; 16];
        addr[0] = 0xfd;
        addr[15] = 2;
        let v6 = LocalDecision::new(&addr, 443, 0);
        let mut words = v6.destination;
        assert_eq!(v6.listener_for_v6(&words, 443), Some(0));
        assert_eq!(v6.listener_for_v4(words[0], 443), None, "another family");
        words[3] ^= 1;
        assert_eq!(v6.listener_for_v6(&words, 443), None, "last word");
        assert_eq!(
            LocalDecision::default().listener_for_v4(0, 0),
            None,
            "no record"
        );
    }

    #[test]
    fn mapped_addresses_are_ipv4() {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12..].copy_from_slice(&[192, 0, 2, 1]);
        assert_eq!(mapped_ipv4(addr), Some([192, 0, 2, 1]));
        addr[0] = 0x20;
        assert_eq!(mapped_ipv4(addr), None);
        assert_eq!(mapped_ipv4([0; 16]), None);
    }
}
