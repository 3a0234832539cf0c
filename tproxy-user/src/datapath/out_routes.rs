//! The host's routes, for rules for local connections with an `out_interface` (iptables'
//! `-o eth0` in OUTPUT, nft's `oifname != "eth0" accept` ahead of an output chain's
//! marking): a connect program runs before the kernel looks the socket's route up, and has
//! no route lookup of its own, so tproxy mirrors the routes into the LPM maps
//! `tproxy_common::local_origin::ROUTES_V4_MAP` and `ROUTES_V6_MAP`, each destination prefix
//! with the bits of the rules' out-interface names and patterns that the interface its route
//! leaves by matches.
//!
//! What a lookup without tproxy would find is mirrored: the `local` table, consulted first
//! (its local routes leave by `lo`; a `main` route inside one of its prefixes is never
//! used), then `main`; of a prefix's routes the lowest metric; a route of several next hops
//! has a name's bit only when every next hop leaves by an interface it matches (the kernel
//! picks one per flow, skipping dead ones); a dead route (its interface without carrier, with
//! `ignore_routes_with_linkdown` set on it; every next hop dead) is no route at all, as the
//! kernel's lookup skips it for the next one, of a higher metric or a shorter prefix (the
//! mirror follows carrier changes as link events; a change of the sysctl alone, which it
//! does not follow, at the next one); an IPv4 prefix's equal routes (`ip route
//! append`) by the first, which is the one the kernel uses; `unreachable`, `blackhole` and
//! `prohibit` routes leave by none; IPv6 routes for some sources only (`from`) are left out,
//! as a connect's source is not chosen yet. Each generation of rules has its own byte of
//! bits (see `route_bits_shift`).
//! Other tables, which policy rules of the host's own may consult first, are not read
//! (`tproxy run` warns when such rules exist).
//!
//! Whenever local connections are steered, the local table's broadcast routes are mirrored
//! too, with `ROUTE_BROADCAST`: the programs never steer a connection to one (see there).
//! Without `out_interface` rules, only the local table is (a router's main table may be
//! large).

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use aya::maps::{lpm_trie::Key, LpmTrie, MapData};
use ipnet::IpNet;
use rtnetlink::packet_route::{
    route::{RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteNextHopFlags, RouteType},
    rule::RuleMessage,
    AddressFamily,
};
use tproxy_common::local_origin::{route_bits_shift, MAX_MIRRORED_ROUTES, ROUTE_BROADCAST};

use crate::datapath::{
    routing::{dump_routes, route_table, LOCAL_TABLE},
    rules::route_bits,
};

const MAIN_TABLE: u32 = 254;

/// One route as the mirror needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HostRoute {
    pub prefix: IpNet,
    /// From the `local` table (else `main`).
    pub local_table: bool,
    pub metric: u32,
    /// A `broadcast` route (what the local table holds for a subnet's broadcast address).
    pub broadcast: bool,
    /// The interfaces it leaves by: one, one per next hop, or none (`unreachable` and the
    /// like).
    pub interfaces: Vec<String>,
    /// Whether it leaves by interfaces the kernel did not list (a nexthop object's).
    pub unknown_interface: bool,
}

/// The out-interface bits of every destination prefix that `routes` decide, for each
/// generation's rules' `names` (see `rules::out_interfaces`), with `ROUTE_BROADCAST` on the
/// local table's broadcast routes.
pub(crate) fn bits_by_prefix(
    routes: &[HostRoute],
    names: &[Vec<String>; 2],
) -> HashMap<IpNet, u32> {
    let bits_of = |iface: &str| interface_bits(names, iface);
    // The route a lookup finds for each prefix: the local table's, then the lowest metric.
    let mut chosen: HashMap<IpNet, Vec<&HostRoute>> = HashMap::new();
    for route in routes {
        let entry = chosen.entry(route.prefix.trunc()).or_default();
        let rank = |r: &HostRoute| (!r.local_table, r.metric);
        match entry.first().map(|first| rank(first).cmp(&rank(route))) {
            // IPv4's equal routes are aliases: the first is used.
            Some(std::cmp::Ordering::Equal) if route.prefix.addr().is_ipv4() => {}
            None | Some(std::cmp::Ordering::Equal) => entry.push(route),
            Some(std::cmp::Ordering::Greater) => *entry = vec![route],
            Some(std::cmp::Ordering::Less) => {}
        }
    }
    let local_prefixes: Vec<IpNet> = chosen
        .iter()
        .filter(|(_, routes)| routes[0].local_table)
        .map(|(prefix, _)| *prefix)
        .collect();
    chosen
        .into_iter()
        // The local table answers for all of its prefixes before main is consulted.
        .filter(|(prefix, routes)| {
            routes[0].local_table
                || !local_prefixes
                    .iter()
                    .any(|local| local.prefix_len() < prefix.prefix_len() && local.contains(prefix))
        })
        .map(|(prefix, routes)| {
            // Equal routes (IPv6's per-interface fe80::/64, next hops): a bit every one has.
            let bits = routes
                .iter()
                .flat_map(|route| {
                    if route.interfaces.is_empty() {
                        vec![0]
                    } else {
                        route
                            .interfaces
                            .iter()
                            .map(|iface| bits_of(iface))
                            .collect()
                    }
                })
                .fold(u32::MAX, |all, bits| all & bits);
            let broadcast = match routes.iter().all(|route| route.broadcast) {
                true => ROUTE_BROADCAST,
                false => 0,
            };
            (prefix, bits | broadcast)
        })
        .collect()
}

/// The bits of a route by `iface` for each generation's `names`, each in its byte.
fn interface_bits(names: &[Vec<String>; 2], iface: &str) -> u32 {
    route_bits(&names[0], iface) << route_bits_shift(0)
        | route_bits(&names[1], iface) << route_bits_shift(1)
}

/// The host's interfaces' names by index.
fn interface_names() -> Result<HashMap<u32, String>> {
    Ok(nix::net::if_::if_nameindex()
        .context("listing the interfaces")?
        .iter()
        .map(|iface| (iface.index(), iface.name().to_string_lossy().into_owned()))
        .collect())
}

/// The host's `local` and `main` routes of both families, with their interfaces' names.
fn host_routes(names: &HashMap<u32, String>) -> Result<Vec<HostRoute>> {
    let mut routes = Vec::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        for table in [LOCAL_TABLE, MAIN_TABLE] {
            let dumped = dump_routes(family, Some(table)).context("listing the routes")?;
            routes.extend(dumped.iter().filter_map(|route| host_route(route, names)));
        }
    }
    Ok(routes)
}

fn host_route(route: &RouteMessage, names: &HashMap<u32, String>) -> Option<HostRoute> {
    let table = route_table(route);
    // A route for a TOS only is no lookup's without one (a connect's has none), nor one
    // for some sources only.
    // A dead route is skipped by the kernel's lookup. Its flag is set on a route of one next
    // hop whose interface has lost its carrier while `ignore_routes_with_linkdown` is on
    // there (the dump sets it exactly when the lookup skips the hop).
    if (table != LOCAL_TABLE && table != MAIN_TABLE)
        || route.header.tos != 0
        || route.header.source_prefix_length != 0
        || route.header.flags.contains(RouteFlags::Dead)
    {
        return None;
    }
    let mut prefix = None;
    let mut metric = 0;
    let mut interfaces = Vec::new();
    let mut nexthop_object = false;
    let mut every_hop_dead = false;
    let name = |index: &u32| names.get(index).cloned().unwrap_or_default();
    for attribute in &route.attributes {
        match attribute {
            RouteAttribute::Destination(RouteAddress::Inet(address)) => {
                prefix = Some(IpNet::from(std::net::IpAddr::V4(*address)))
            }
            RouteAttribute::Destination(RouteAddress::Inet6(address)) => {
                prefix = Some(IpNet::from(std::net::IpAddr::V6(*address)))
            }
            RouteAttribute::Priority(priority) => metric = *priority,
            RouteAttribute::Oif(index) => interfaces.push(name(index)),
            RouteAttribute::NhId(_) => nexthop_object = true,
            RouteAttribute::MultiPath(hops) => {
                // A linkdown hop is still used (ignore_routes_with_linkdown is off by
                // default); a dead one is not.
                let live: Vec<String> = hops
                    .iter()
                    .filter(|hop| !hop.flags.contains(RouteNextHopFlags::Dead))
                    .map(|hop| name(&hop.interface_index))
                    .collect();
                every_hop_dead = live.is_empty() && !hops.is_empty();
                interfaces.extend(live);
            }
            _ => {}
        }
    }
    if every_hop_dead {
        return None;
    }
    let unspecified = match route.header.address_family {
        AddressFamily::Inet6 => IpNet::from(std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)),
        _ => IpNet::from(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
    };
    let prefix = IpNet::new(
        prefix.unwrap_or(unspecified).addr(),
        route.header.destination_prefix_length,
    )
    .ok()?;
    match route.header.kind {
        // What the host delivers to itself goes over lo.
        RouteType::Local | RouteType::Anycast => interfaces = vec!["lo".to_string()],
        RouteType::Unicast | RouteType::Broadcast | RouteType::Multicast => {}
        _ => interfaces.clear(),
    }
    Some(HostRoute {
        prefix,
        local_table: table == LOCAL_TABLE,
        metric,
        broadcast: route.header.kind == RouteType::Broadcast,
        // With net.ipv4.nexthop_compat_mode=0 a route by a nexthop object (`ip nexthop`)
        // is listed with the object's id alone.
        unknown_interface: nexthop_object && interfaces.is_empty(),
        interfaces,
    })
}

/// Warns when the host's policy rules consult tables that `out_interface` does not read.
pub(crate) async fn warn_of_other_tables(handle: &rtnetlink::Handle) {
    use futures::TryStreamExt;
    let mut rules = Vec::new();
    for version in [rtnetlink::IpVersion::V4, rtnetlink::IpVersion::V6] {
        match handle
            .rule()
            .get(version)
            .execute()
            .try_collect::<Vec<_>>()
            .await
        {
            Ok(listed) => rules.extend(listed),
            Err(error) => {
                log::warn!("listing the policy rules, for out_interface: {error}");
                return;
            }
        }
    }
    let tables = other_tables_consulted(&rules, crate::datapath::routing::ROUTE_PROTOCOL);
    if !tables.is_empty() {
        log::warn!(
            "policy rules send some route lookups to tables {tables:?}: out_interface decides by \
             the local and main tables only, so a connection such a rule routes elsewhere is \
             decided by the interface main would send it by (and one whose rule comes ahead of \
             tproxy's is not steered at all)"
        );
    }
}

/// The host's policy rules that consult a table other than `local`, `main` and `default`,
/// which `out_interface` does not read (tproxy's own, of protocol `proto`, aside).
fn other_tables_consulted(rules: &[RuleMessage], proto: u8) -> Vec<u32> {
    use rtnetlink::packet_route::rule::RuleAttribute;
    let mut tables: Vec<u32> = rules
        .iter()
        .filter(|rule| {
            !rule
                .attributes
                .iter()
                .any(|attr| matches!(attr, RuleAttribute::Protocol(p) if u8::from(*p) == proto))
        })
        .map(|rule| {
            rule.attributes
                .iter()
                .find_map(|attr| match attr {
                    RuleAttribute::Table(table) => Some(*table),
                    _ => None,
                })
                .unwrap_or(rule.header.table.into())
        })
        .filter(|table| ![0, 253, MAIN_TABLE, LOCAL_TABLE].contains(table))
        .collect();
    tables.sort_unstable();
    tables.dedup();
    tables
}

/// The route maps of the loaded object, and what was written to them.
pub(crate) struct RouteMirror {
    v4: LpmTrie<MapData, [u8; 4], u32>,
    v6: LpmTrie<MapData, [u8; 16], u32>,
    written: HashMap<IpNet, u32>,
    /// Each generation parity's names, whose bits `written` holds (`None`: nothing mirrored
    /// yet).
    names: Option<[Vec<String>; 2]>,
    /// Whether routes by nexthop objects were warned of: once per run (a refresh follows
    /// every route change), not again when such routes come back.
    warned_of_nexthop_objects: bool,
}

impl RouteMirror {
    /// The mirror of maps as loaded: pinned ones an earlier instance filled hold its
    /// entries, which the first refresh replaces.
    pub(crate) fn new(
        v4: LpmTrie<MapData, [u8; 4], u32>,
        v6: LpmTrie<MapData, [u8; 16], u32>,
    ) -> Result<Self> {
        let mut mirror = RouteMirror {
            v4,
            v6,
            written: HashMap::new(),
            names: None,
            warned_of_nexthop_objects: false,
        };
        mirror.reread()?;
        Ok(mirror)
    }

    /// Takes the maps as they are for what is written, and no names as mirrored: after
    /// another process wrote them (a successor that switched, then failed), the next
    /// [`RouteMirror::mirror_for`] refreshes every entry.
    pub(crate) fn reread(&mut self) -> Result<()> {
        let mut written = HashMap::new();
        for entry in self.v4.iter() {
            let (key, value) = entry.context("reading the pinned IPv4 route map")?;
            let net = ipnet::Ipv4Net::new(key.data().into(), key.prefix_len() as u8)?;
            written.insert(IpNet::V4(net), value);
        }
        for entry in self.v6.iter() {
            let (key, value) = entry.context("reading the pinned IPv6 route map")?;
            let net = ipnet::Ipv6Net::new(key.data().into(), key.prefix_len() as u8)?;
            written.insert(IpNet::V6(net), value);
        }
        self.written = written;
        self.names = None;
        Ok(())
    }

    /// Mirrors the routes for the names of the rules of `generation` (the other
    /// generation's keep their bits).
    pub(crate) fn mirror_for(&mut self, generation: u32, names: &[String]) -> Result<()> {
        let mut all = self.names.clone().unwrap_or_default();
        if self.names.is_some() && all[(generation & 1) as usize] == names {
            return Ok(());
        }
        let interfaces = interface_names()?;
        for name in names {
            if !interfaces
                .values()
                .any(|iface| crate::datapath::interfaces::matches(name, iface))
            {
                log::warn!(
                    "out_interface {name} matches no interface now: its rules take no \
                     connection until one appears (a pattern is written with `*`, not `+`)"
                );
            }
        }
        all[(generation & 1) as usize] = names.to_vec();
        self.refresh(all)
    }

    /// Mirrors the routes again (they changed), once mirrored at all.
    pub(crate) fn follow(&mut self) -> Result<()> {
        match self.names.clone() {
            Some(names) => self.refresh(names),
            None => Ok(()),
        }
    }

    /// Mirrors the host's routes now for each generation's `names` (none: the local table
    /// only).
    fn refresh(&mut self, names: [Vec<String>; 2]) -> Result<()> {
        let interfaces = interface_names()?;
        let mut routes = host_routes(&interfaces)?;
        if names.iter().all(Vec::is_empty) {
            routes.retain(|route| route.local_table);
        }
        let unknown: Vec<&HostRoute> = routes.iter().filter(|r| r.unknown_interface).collect();
        if let (Some(first), false) = (unknown.first(), self.warned_of_nexthop_objects) {
            self.warned_of_nexthop_objects = true;
            log::warn!(
                "out_interface: the route to {} ({} such routes) leaves by a nexthop object, \
                 whose interfaces the kernel does not list with net.ipv4.nexthop_compat_mode=0 \
                 (IPv6 routes too): out_interface rules take none of its connections; set it \
                 to 1 for them to",
                first.prefix,
                unknown.len()
            );
        }
        self.write(bits_by_prefix(&routes, &names))?;
        self.names = Some(names);
        Ok(())
    }

    /// Makes the maps hold `bits`: what changed only, new and changed entries before the
    /// removals (a route that moves to another prefix is never missing in between), and
    /// `written` kept to what the maps hold after every step, so that a refresh after an
    /// error repairs what failed.
    fn write(&mut self, bits: HashMap<IpNet, u32>) -> Result<()> {
        let (v4, v6) = bits.keys().fold((0, 0), |(v4, v6), prefix| match prefix {
            IpNet::V4(_) => (v4 + 1, v6),
            IpNet::V6(_) => (v4, v6 + 1),
        });
        if v4.max(v6) > MAX_MIRRORED_ROUTES as usize {
            bail!(
                "the host has {v4} IPv4 and {v6} IPv6 routes in its local and main tables; \
                 out_interface mirrors at most {MAX_MIRRORED_ROUTES} of each"
            );
        }
        let mut changed = 0;
        for (prefix, value) in &bits {
            if self.written.get(prefix) == Some(value) {
                continue;
            }
            let inserted = match prefix {
                IpNet::V4(net) => self.v4.insert(&ipv4_key(net), value, 0),
                IpNet::V6(net) => self.v6.insert(&ipv6_key(net), value, 0),
            };
            inserted.with_context(|| format!("writing the route {prefix} into the route maps"))?;
            self.written.insert(*prefix, *value);
            changed += 1;
        }
        let gone: Vec<IpNet> = self
            .written
            .keys()
            .filter(|prefix| !bits.contains_key(prefix))
            .copied()
            .collect();
        for prefix in &gone {
            let removed = match prefix {
                IpNet::V4(net) => self.v4.remove(&ipv4_key(net)),
                IpNet::V6(net) => self.v6.remove(&ipv6_key(net)),
            };
            removed.with_context(|| format!("removing the route {prefix} from the route maps"))?;
            self.written.remove(prefix);
        }
        log::debug!(
            "route mirror: {} prefixes, {changed} written, {} removed",
            bits.len(),
            gone.len()
        );
        Ok(())
    }
}

fn ipv4_key(net: &ipnet::Ipv4Net) -> Key<[u8; 4]> {
    Key::new(u32::from(net.prefix_len()), net.addr().octets())
}

fn ipv6_key(net: &ipnet::Ipv6Net) -> Key<[u8; 16]> {
    Key::new(u32::from(net.prefix_len()), net.addr().octets())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(prefix: &str, local_table: bool, metric: u32, interfaces: &[&str]) -> HostRoute {
        HostRoute {
            prefix: prefix.parse().unwrap(),
            local_table,
            metric,
            broadcast: false,
            interfaces: interfaces.iter().map(|s| s.to_string()).collect(),
            unknown_interface: false,
        }
    }

    fn names() -> [Vec<String>; 2] {
        [vec!["eth0".into(), "wg*".into()], Vec::new()]
    }

    /// A main-table unicast route to 10.1.0.0/16 as a dump lists it.
    fn listed(attributes: Vec<RouteAttribute>, flags: RouteFlags) -> RouteMessage {
        let mut message = RouteMessage::default();
        message.header.address_family = AddressFamily::Inet;
        message.header.table = MAIN_TABLE as u8;
        message.header.kind = RouteType::Unicast;
        message.header.destination_prefix_length = 16;
        message.header.flags = flags;
        message.attributes = attributes;
        message
            .attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet(
                "10.1.0.0".parse().unwrap(),
            )));
        message
    }

    /// `ignore_routes_with_linkdown` on an interface without carrier: the kernel skips the
    /// route (a lookup finds the next metric's, or a shorter prefix's), and so does the
    /// mirror; a multipath route only when every hop is dead.
    #[test]
    fn a_dead_route_is_no_route() {
        use rtnetlink::packet_route::route::RouteNextHop;
        let names: HashMap<u32, String> = [(2, "lan0".to_string()), (3, "wan0".to_string())].into();
        let alive = listed(vec![RouteAttribute::Oif(2)], RouteFlags::Linkdown);
        assert_eq!(host_route(&alive, &names).unwrap().interfaces, ["lan0"]);
        let dead = listed(
            vec![RouteAttribute::Oif(2)],
            RouteFlags::Dead | RouteFlags::Linkdown,
        );
        assert_eq!(host_route(&dead, &names), None);
        let hop = |index: u32, flags: RouteNextHopFlags| {
            let mut hop = RouteNextHop::default();
            hop.interface_index = index;
            hop.flags = flags;
            hop
        };
        let dead_hop = RouteNextHopFlags::Dead | RouteNextHopFlags::Linkdown;
        let half = listed(
            vec![RouteAttribute::MultiPath(vec![
                hop(2, dead_hop),
                hop(3, RouteNextHopFlags::empty()),
            ])],
            RouteFlags::empty(),
        );
        assert_eq!(host_route(&half, &names).unwrap().interfaces, ["wan0"]);
        let all = listed(
            vec![RouteAttribute::MultiPath(vec![
                hop(2, dead_hop),
                hop(3, dead_hop),
            ])],
            RouteFlags::empty(),
        );
        assert_eq!(host_route(&all, &names), None);
    }

    #[test]
    fn each_prefix_gets_the_bits_of_the_route_a_lookup_finds() {
        let routes = [
            route("0.0.0.0/0", false, 0, &["eth0"]),
            route("0.0.0.0/0", false, 100, &["wg0"]),
            route("10.0.0.0/8", false, 0, &["wg1"]),
            route("10.9.0.0/16", false, 0, &[]),
            route("192.168.1.0/24", false, 0, &["eth0"]),
            route("192.168.1.5/32", true, 0, &["lo"]),
            route("127.0.0.0/8", true, 0, &["lo"]),
            // Inside a local-table prefix: never used.
            route("127.1.0.0/16", false, 0, &["eth0"]),
            route("198.51.100.0/24", false, 0, &["eth0", "wg0"]),
            route("fe80::/64", false, 256, &["eth0"]),
            route("fe80::/64", false, 256, &["wg0"]),
            route("2001:db8::/32", false, 1024, &["eth0"]),
        ];
        let bits = bits_by_prefix(&routes, &names());
        let of = |prefix: &str| bits.get(&prefix.parse::<IpNet>().unwrap()).copied();
        assert_eq!(of("0.0.0.0/0"), Some(0b01), "the lowest metric");
        assert_eq!(of("10.0.0.0/8"), Some(0b10), "a pattern's bit");
        assert_eq!(of("10.9.0.0/16"), Some(0), "no interface: unreachable");
        assert_eq!(of("192.168.1.0/24"), Some(0b01));
        assert_eq!(of("192.168.1.5/32"), Some(0), "the host's own address: lo");
        assert_eq!(of("127.1.0.0/16"), None, "shadowed by the local table");
        assert_eq!(of("198.51.100.0/24"), Some(0), "next hops by both");
        assert_eq!(of("fe80::/64"), Some(0), "one per interface: none has both");
        assert_eq!(of("2001:db8::/32"), Some(0b01));
        assert_eq!(bits.len(), 9);
    }

    #[test]
    fn the_local_tables_broadcast_routes_have_the_broadcast_bit() {
        let broadcast = HostRoute {
            broadcast: true,
            ..route("192.168.1.255/32", true, 0, &["eth0"])
        };
        let routes = [broadcast, route("192.168.1.0/24", false, 0, &["eth0"])];
        let bits = bits_by_prefix(&routes, &names());
        let of = |prefix: &str| bits[&prefix.parse::<IpNet>().unwrap()];
        assert_eq!(of("192.168.1.255/32"), ROUTE_BROADCAST | 0b01);
        assert_eq!(of("192.168.1.0/24"), 0b01);
        let no_names = [Vec::new(), Vec::new()];
        assert_eq!(
            bits_by_prefix(&routes, &no_names)[&"192.168.1.255/32".parse().unwrap()],
            ROUTE_BROADCAST
        );
    }

    #[test]
    fn a_route_by_an_interface_of_both_names_has_both_bits() {
        let bits = bits_by_prefix(
            &[route("0.0.0.0/0", false, 0, &["wg0"])],
            &[
                vec!["wg*".to_string(), "wg0".to_string()],
                vec!["wg0".to_string()],
            ],
        );
        assert_eq!(
            bits[&"0.0.0.0/0".parse::<IpNet>().unwrap()],
            0b11 | 0b01 << 8,
            "each generation's names in its byte"
        );
    }
}
