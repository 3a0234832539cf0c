//! How rules relate under the two orders: iptables applies the first matching rule, tproxy
//! the most specific one (see `rules`).

use std::collections::HashMap;

use ipnet::IpNet;

use tproxy_common::local_origin::{ClassidRange, UidRange};

use super::{Family, Match};
use crate::{
    datapath::{
        interfaces::{is_pattern, matches},
        rules::Ports,
    },
    values::Transport,
};

fn transports_of(m: &Match) -> Vec<Transport> {
    if m.transports.is_empty() {
        vec![Transport::Tcp, Transport::Udp]
    } else {
        m.transports.clone()
    }
}

fn families_of(m: &Match) -> Vec<Family> {
    match m.family {
        Some(family) => vec![family],
        None => vec![Family::V4, Family::V6],
    }
}

fn prefixes_of(list: &[IpNet], family: Family) -> Vec<IpNet> {
    if list.is_empty() {
        return vec![match family {
            Family::V4 => "0.0.0.0/0".parse().unwrap(),
            Family::V6 => "::/0".parse().unwrap(),
        }];
    }
    list.iter()
        .copied()
        .filter(|p| p.addr().is_ipv4() == (family == Family::V4))
        .collect()
}

pub(super) fn port_bounds(p: Ports) -> (u16, u16) {
    match p {
        Ports::One(port) => (port, port),
        Ports::Range(first, last) => (first, last),
        Ports::Any => (1, 65535),
    }
}

fn ports_of_match(m: &Match) -> Vec<Ports> {
    if m.ports.is_empty() {
        vec![Ports::Any]
    } else {
        m.ports.clone()
    }
}

/// The loopback prefixes, which the local table routes to the host whatever its
/// interfaces' addresses.
pub(super) fn loopback_prefixes() -> [IpNet; 2] {
    [
        "127.0.0.0/8".parse().expect("a prefix"),
        "::1/128".parse().expect("a prefix"),
    ]
}

/// The multicast and broadcast prefixes, which tproxy's programs never steer.
pub(super) fn group_prefixes() -> [IpNet; 3] {
    [
        "224.0.0.0/4".parse().expect("a prefix"),
        "255.255.255.255/32".parse().expect("a prefix"),
        "ff00::/8".parse().expect("a prefix"),
    ]
}

/// Whether some packet matches both.
pub(super) fn overlaps(a: &Match, b: &Match) -> bool {
    let transports = transports_of(a)
        .iter()
        .any(|t| transports_of(b).contains(t));
    let ports = ports_of_match(a).iter().any(|pa| {
        let (a1, a2) = port_bounds(*pa);
        ports_of_match(b).iter().any(|pb| {
            let (b1, b2) = port_bounds(*pb);
            a1 <= b2 && b1 <= a2
        })
    });
    let sports = a.sports.is_empty()
        || b.sports.is_empty()
        || a.sports.iter().any(|pa| {
            let (a1, a2) = port_bounds(*pa);
            b.sports.iter().any(|pb| {
                let (b1, b2) = port_bounds(*pb);
                a1 <= b2 && b1 <= a2
            })
        });
    let iface = match (&a.iface, &b.iface) {
        (Some(x), Some(y)) => ifaces_overlap(x, y),
        _ => true,
    } && match (&a.out_iface, &b.out_iface) {
        (Some(x), Some(y)) => ifaces_overlap(x, y),
        _ => true,
    };
    let nets = |x: &[IpNet], y: &[IpNet], family| {
        prefixes_of(x, family).iter().any(|p| {
            prefixes_of(y, family)
                .iter()
                .any(|q| p.contains(q) || q.contains(p))
        })
    };
    let addresses = families_of(a)
        .into_iter()
        .filter(|f| families_of(b).contains(f))
        .any(|family| nets(&a.dst, &b.dst, family) && nets(&a.src, &b.src, family));
    let marks = match (a.mark, b.mark) {
        (Some(a), Some(b)) => (a.value ^ b.value) & a.mask & b.mask == 0,
        _ => true,
    } && match (a.ct_direction, b.ct_direction) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    };
    let selectors = a.local == b.local
        && ids_overlap(&id_bounds(&a.uids), &id_bounds(&b.uids))
        && ids_overlap(&id_bounds(&a.gids), &id_bounds(&b.gids))
        && (a.cgroups.is_empty()
            || b.cgroups.is_empty()
            || a.cgroups
                .iter()
                .any(|x| b.cgroups.iter().any(|y| within(x, y) || within(y, x))))
        && ids_overlap(&class_bounds(&a.classids), &class_bounds(&b.classids));
    transports && ports && sports && iface && addresses && marks && selectors
}

/// Whether cgroup `inner` is `outer` or inside it (the processes of a cgroup's descendants
/// are selected with it).
pub(super) fn within(inner: &str, outer: &str) -> bool {
    let outer = outer.trim_end_matches('/');
    inner == outer
        || outer.is_empty()
        || inner
            .strip_prefix(outer)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// The `eth` of a pattern `eth*` (what iptables' `eth+` and nft's `"eth*"` become); `None`
/// for a name or another pattern.
fn prefix_pattern(iface: &str) -> Option<&str> {
    iface.strip_suffix('*').filter(|prefix| !is_pattern(prefix))
}

/// Whether an interface may match both input interfaces (names or patterns). Two patterns
/// other than prefixes are taken to overlap: the rules are then reported, not merged.
pub(super) fn ifaces_overlap(a: &str, b: &str) -> bool {
    match (is_pattern(a), is_pattern(b)) {
        (false, false) => a == b,
        (true, false) => matches(a, b),
        (false, true) => matches(b, a),
        (true, true) => match (prefix_pattern(a), prefix_pattern(b)) {
            (Some(a), Some(b)) => a.starts_with(b) || b.starts_with(a),
            _ => true,
        },
    }
}

/// Whether every interface that `inner` matches, `outer` matches too.
pub(super) fn iface_covers(outer: &str, inner: &str) -> bool {
    match (is_pattern(outer), is_pattern(inner)) {
        (_, false) => matches(outer, inner),
        (false, true) => false,
        (true, true) => match (prefix_pattern(outer), prefix_pattern(inner)) {
            (Some(o), Some(i)) => i.starts_with(o),
            _ => outer == inner,
        },
    }
}

/// Whether every packet that `inner` matches, `outer` matches too.
pub(super) fn covers(outer: &Match, inner: &Match) -> bool {
    // The host's addresses may lie anywhere: only the same match, or no destination at
    // all, covers them.
    if outer.dst_local && !inner.dst_local || outer.dst_anycast && !inner.dst_anycast {
        return false;
    }
    // Which of inner's destinations are the host's addresses is known only at run time.
    if outer.excludes_dst_local && !inner.excludes_dst_local {
        return false;
    }
    // A set's entries are known only at run time: only the same set covers them.
    if outer.dst_set.is_some() && outer.dst_set != inner.dst_set {
        return false;
    }
    // A rule written for other protocols too has packets that one for TCP and UDP lacks.
    let transports = transports_of(inner)
        .iter()
        .all(|t| transports_of(outer).contains(t))
        && (!inner.other_protocols || outer.other_protocols);
    let ports = ports_of_match(inner).iter().all(|pi| {
        let (i1, i2) = port_bounds(*pi);
        ports_of_match(outer).iter().any(|po| {
            let (o1, o2) = port_bounds(*po);
            o1 <= i1 && i2 <= o2
        })
    });
    let sports = outer.sports.is_empty()
        || (!inner.sports.is_empty()
            && inner.sports.iter().all(|pi| {
                let (i1, i2) = port_bounds(*pi);
                outer.sports.iter().any(|po| {
                    let (o1, o2) = port_bounds(*po);
                    o1 <= i1 && i2 <= o2
                })
            }));
    let iface = match (&outer.iface, &inner.iface) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(o), Some(i)) => iface_covers(o, i),
    } && match (&outer.out_iface, &inner.out_iface) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(o), Some(i)) => iface_covers(o, i),
    };
    let nets = |o: &[IpNet], i: &[IpNet], family| {
        prefixes_of(i, family)
            .iter()
            .all(|p| prefixes_of(o, family).iter().any(|q| q.contains(p)))
    };
    let addresses = families_of(inner).into_iter().all(|family| {
        families_of(outer).contains(&family)
            && nets(&outer.dst, &inner.dst, family)
            && nets(&outer.src, &inner.src, family)
    });
    let marks = match (outer.mark, inner.mark) {
        (None, _) => true,
        (Some(outer), Some(inner)) => {
            outer.mask & !inner.mask == 0 && inner.value & outer.mask == outer.value
        }
        (Some(_), None) => false,
    } && outer
        .ct_direction
        .is_none_or(|outer| inner.ct_direction == Some(outer));
    let uids = ids_within(&id_bounds(&outer.uids), &id_bounds(&inner.uids));
    let gids = ids_within(&id_bounds(&outer.gids), &id_bounds(&inner.gids));
    let cgroups = outer.cgroups.is_empty()
        || (!inner.cgroups.is_empty()
            && inner
                .cgroups
                .iter()
                .all(|i| outer.cgroups.iter().any(|o| within(i, o))));
    let classids = ids_within(
        &class_bounds(&outer.classids),
        &class_bounds(&inner.classids),
    );
    transports
        && ports
        && sports
        && iface
        && addresses
        && marks
        && outer.local == inner.local
        && uids
        && gids
        && cgroups
        && classids
}

/// Inclusive id ranges (of uids, gids or class ids) as bounds.
fn id_bounds(ranges: &[UidRange]) -> Vec<(u32, u32)> {
    ranges.iter().map(|r| (r.first, r.last)).collect()
}

fn class_bounds(ranges: &[ClassidRange]) -> Vec<(u32, u32)> {
    ranges.iter().map(|r| (r.first, r.last)).collect()
}

/// Whether two id selectors (empty: every id) share an id.
fn ids_overlap(a: &[(u32, u32)], b: &[(u32, u32)]) -> bool {
    a.is_empty() || b.is_empty() || a.iter().any(|x| b.iter().any(|y| x.0 <= y.1 && y.0 <= x.1))
}

/// Whether every id `inner` selects (empty: every id) is one `outer` selects.
fn ids_within(outer: &[(u32, u32)], inner: &[(u32, u32)]) -> bool {
    outer.is_empty()
        || (!inner.is_empty()
            && inner
                .iter()
                .all(|i| outer.iter().any(|o| o.0 <= i.0 && i.1 <= o.1)))
}

/// Whether tproxy's precedence could prefer `later` over `earlier` for a packet both match:
/// a longer destination prefix, or the same with a more specific port. Each prefix and
/// port spec of a rule is a rule of its own in tproxy (`multiport`, a set), so the most
/// specific part of `later` is weighed against the least specific part of `earlier`.
pub(super) fn more_specific(later: &Match, earlier: &Match) -> bool {
    // A packet is of one family: the prefixes of the other do not rank for it.
    families_of(later)
        .into_iter()
        .filter(|family| families_of(earlier).contains(family))
        .any(|family| more_specific_in(later, earlier, family))
}

/// [`more_specific`] for the packets of `family`.
fn more_specific_in(later: &Match, earlier: &Match, family: Family) -> bool {
    let (later_lengths, earlier_lengths) = (
        destination_lengths(later, family),
        destination_lengths(earlier, family),
    );
    let (Some(&longest), Some(&shortest)) =
        (later_lengths.iter().max(), earlier_lengths.iter().min())
    else {
        // One of them has no destination of this family.
        return false;
    };
    // 0: a single port, 1: a range, 2: any port (as tproxy ranks them).
    let specificities = |m: &Match| -> Vec<u8> {
        ports_of_match(m)
            .iter()
            .map(|p| match port_bounds(*p) {
                (a, b) if a == b => 0,
                (1, 65535) => 2,
                _ => 1,
            })
            .collect()
    };
    let most_specific = specificities(later).into_iter().min().unwrap_or(2);
    let least_specific = specificities(earlier).into_iter().max().unwrap_or(2);
    longest > shortest || (longest == shortest && most_specific < least_specific)
}

/// The lengths of `m`'s destination prefixes of `family`: the host's addresses are
/// full-length ones, the anycast routes' (IPv4) of any length, so both the shortest and the
/// longest, and a followed set's entries of any length but 0 (the kernel refuses a `/0`
/// entry).
fn destination_lengths(m: &Match, family: Family) -> Vec<u8> {
    if m.dst_set.is_some() {
        return match family {
            Family::V4 => vec![1, 32],
            Family::V6 => vec![1, 128],
        };
    }
    if m.dst_anycast {
        return match family {
            Family::V4 => vec![0, 32],
            Family::V6 => Vec::new(),
        };
    }
    if m.dst_local {
        return vec![match family {
            Family::V4 => 32,
            Family::V6 => 128,
        }];
    }
    prefixes_of(&m.dst, family)
        .iter()
        .map(IpNet::prefix_len)
        .collect()
}

/// The destination prefixes of `m` in each of its families (`0/0` where it names none).
fn destination_prefixes(m: &Match) -> Vec<IpNet> {
    families_of(m)
        .into_iter()
        .flat_map(|family| prefixes_of(&m.dst, family))
        .collect()
}

fn truncated(prefix: IpNet, len: u8) -> Option<IpNet> {
    IpNet::new(prefix.addr(), len).ok().map(|n| n.trunc())
}

/// The rules kept so far, by destination prefix: comparing each rule with every earlier one
/// made translating quadratic in the number of rules.
#[derive(Default)]
pub(super) struct ShadowIndex {
    by_prefix: HashMap<IpNet, Vec<usize>>,
}

impl ShadowIndex {
    /// Files kept rule `index` under its destination prefixes, each cut to the rule's
    /// shortest one: a later rule outranks it (see [`more_specific`]) only with prefixes at
    /// least that long, whose ancestors then include the key.
    pub(super) fn add(&mut self, m: &Match, index: usize) {
        let prefixes = destination_prefixes(m);
        let shortest = prefixes.iter().map(IpNet::prefix_len).min().unwrap_or(0);
        for prefix in prefixes {
            let len = prefix.prefix_len().min(shortest);
            if let Some(key) = truncated(prefix, len) {
                self.by_prefix.entry(key).or_default().push(index);
            }
        }
    }

    /// In order, the first `count` kept rules that `m` may overlap and outrank: every one
    /// that it does, and some that it does not.
    pub(super) fn candidates(&self, m: &Match, count: usize) -> Vec<usize> {
        let prefixes = destination_prefixes(m);
        // The host's addresses, and a set's entries, may lie inside any rule's prefixes.
        if m.dst_local
            || m.dst_anycast
            || m.dst_set.is_some()
            || prefixes
                .iter()
                .any(|p| p.prefix_len() != prefixes[0].prefix_len())
        {
            // With prefixes of several lengths, its longest can outrank rules inside its
            // shorter ones, which the keys do not lead to.
            return (0..count).collect();
        }
        let mut found: Vec<usize> = prefixes
            .iter()
            .flat_map(|&p| (0..=p.prefix_len()).filter_map(move |len| truncated(p, len)))
            .filter_map(|key| self.by_prefix.get(&key))
            .flatten()
            .copied()
            .collect();
        found.sort_unstable();
        found.dedup();
        found
    }
}
