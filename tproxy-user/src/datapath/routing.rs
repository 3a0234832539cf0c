//! The policy routing that makes assigned packets local: `bpf_sk_assign` picks the socket but
//! does not route, so a packet to a non-local address would still be forwarded. Every packet
//! the program assigns carries our mark, and
//!
//! ```text
//! ip rule  add fwmark MARK/MASK lookup TABLE priority PRIORITY        (IPv4 and IPv6)
//! ip route add local 0.0.0.0/0 dev lo table TABLE
//! ip route add local ::/0      dev lo table TABLE
//! ```
//!
//! delivers it locally. When local processes' connections are steered (`--local`), the
//! routes also name their preferred source, `src 127.0.0.1` and `src ::1`: a socket the
//! connect program marked looks its route up in TABLE, and without a source on the route the
//! kernel would pick the destination itself, which is not a local address (the connect fails
//! with ENETUNREACH). The datagrams that unconnected sockets send to steered destinations
//! carry no mark (the `sendmsg` programs give them a loopback source instead, see
//! `local_origin`), so two more rules take them there:
//!
//! ```text
//! ip rule  add from 127.84.80.1 iif lo lookup TABLE priority PRIORITY
//! ip rule  add from ::1       iif lo lookup TABLE priority PRIORITY
//! ```
//!
//! Nothing else matches the IPv4 rule: `iif lo` is the host's own traffic only, 127.84.80.1
//! is a loopback address nothing else uses (127.0.0.1, used by local services and by
//! `route_localnet` NAT, is left alone), and without the rule the kernel refuses a route from
//! a loopback source that leaves the host (EINVAL). IPv6 has one loopback address: its rule
//! takes a datagram from `::1` that would otherwise go out with it, for the receiver to drop.
//! Everything here is added over rtnetlink tagged with our own routing
//! protocol number, which is how a later start recognises (and removes) what a killed
//! instance left behind, without touching anyone else's rules or routes.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};
use tproxy_common::local_origin::LOOPBACK_SOURCE_V4;

use anyhow::{bail, Context, Result};
use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::{
    packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST},
    packet_route::{
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType},
        rule::{RuleAction, RuleAttribute, RuleMessage},
        AddressFamily, RouteNetlinkMessage,
    },
    sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr},
    Handle, IpVersion, RouteMessageBuilder,
};

/// The `protocol` tag on our rules and routes (`ip rule`/`ip route` show it as `proto 116`).
/// Not one of the numbers in iproute2's rt_protos list.
pub(crate) const ROUTE_PROTOCOL: u8 = 116;

/// What to install.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RoutingSpec {
    pub mark: u32,
    pub mask: u32,
    pub table: u32,
    pub priority: u32,
    /// Give the local routes the loopback addresses as preferred source, for the sockets of
    /// local processes that carry the mark, and add the rules for loopback-sourced datagrams
    /// (see `local_origin`).
    pub local_origin: bool,
}

/// Policy routing that this process installed; [`PolicyRouting::remove`] takes it away.
#[derive(Clone)]
pub(crate) struct PolicyRouting {
    handle: Handle,
    spec: RoutingSpec,
}

/// Opens an rtnetlink connection driven by the current tokio runtime.
pub(crate) fn connect() -> Result<Handle> {
    let (connection, handle, _) =
        rtnetlink::new_connection().context("opening rtnetlink socket")?;
    tokio::spawn(connection);
    Ok(handle)
}

impl PolicyRouting {
    /// Installs the rule and the two local routes. When any step fails, what was already
    /// added is removed before the error is returned.
    pub(crate) async fn install(handle: &Handle, spec: RoutingSpec) -> Result<Self> {
        let installed = PolicyRouting {
            handle: handle.clone(),
            spec,
        };
        if let Err(error) = installed.add_all().await {
            if let Err(cleanup) = remove_ours(handle, spec.table).await {
                log::error!("removing partially installed policy routing: {cleanup:#}");
            }
            return Err(error);
        }
        Ok(installed)
    }

    async fn add_all(&self) -> Result<()> {
        for v6 in [false, true] {
            self.add_route(v6).await?;
        }
        for v6 in [false, true] {
            self.add_mark_rule(v6).await?;
        }
        if self.spec.local_origin {
            for v6 in [false, true] {
                self.add_loopback_source_rule(v6).await?;
            }
        }
        Ok(())
    }

    /// Puts back what of the rules and routes is gone (`ip link set lo down` takes the
    /// routes through `lo` away, an operator may flush the table or delete the rule), and
    /// names each: without them every steered packet would be forwarded or dropped, not
    /// delivered.
    pub(crate) async fn restore_missing(&self) -> Result<Vec<String>> {
        let table = self.spec.table;
        let (rules, routes) = ours(&self.handle, table).await?;
        let mut restored = Vec::new();
        for (v6, family) in [(false, AddressFamily::Inet), (true, AddressFamily::Inet6)] {
            let name = if v6 { "IPv6" } else { "IPv4" };
            if !routes
                .iter()
                .any(|route| route.header.address_family == family)
            {
                self.add_route(v6).await?;
                restored.push(format!(
                    "the {name} route `local default dev lo table {table}`"
                ));
            }
            let rules_of = |marked: bool| {
                rules
                    .iter()
                    .any(|rule| rule.header.family == family && has_fw_mark(rule) == marked)
            };
            if !rules_of(true) {
                self.add_mark_rule(v6).await?;
                restored.push(format!("the {name} rule `fwmark … lookup {table}`"));
            }
            if self.spec.local_origin && !rules_of(false) {
                self.add_loopback_source_rule(v6).await?;
                restored.push(format!("the {name} rule `from … iif lo lookup {table}`"));
            }
        }
        Ok(restored)
    }

    /// `local 0.0.0.0/0 dev lo table TABLE` (`::/0` with `v6`).
    async fn add_route(&self, v6: bool) -> Result<()> {
        let RoutingSpec {
            table,
            local_origin,
            ..
        } = self.spec;
        let lo =
            nix::net::if_::if_nametoindex("lo").context("looking up the loopback interface")?;
        let (family, route) = if v6 {
            let mut route = RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
                .output_interface(lo);
            if local_origin {
                route = route.pref_source(Ipv6Addr::LOCALHOST);
            }
            ("IPv6", route.build())
        } else {
            let mut route = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                .output_interface(lo);
            if local_origin {
                route = route.pref_source(Ipv4Addr::LOCALHOST);
            }
            ("IPv4", route.build())
        };
        self.handle
            .route()
            .add(local_route(route, table))
            .execute()
            .await
            .with_context(|| format!("adding `local {family} default dev lo table {table}`"))
    }

    /// `fwmark MARK/MASK lookup TABLE priority PRIORITY` (IPv6's with `v6`).
    async fn add_mark_rule(&self, v6: bool) -> Result<()> {
        let RoutingSpec {
            mark,
            mask,
            table,
            priority,
            ..
        } = self.spec;
        let mut request = self
            .handle
            .rule()
            .add()
            .table_id(table)
            .priority(priority)
            .fw_mark(mark)
            .action(RuleAction::ToTable);
        let message = request.message_mut();
        message.attributes.push(RuleAttribute::FwMask(mask));
        message
            .attributes
            .push(RuleAttribute::Protocol(RouteProtocol::Other(
                ROUTE_PROTOCOL,
            )));
        let (family, added) = match v6 {
            false => ("IPv4", request.v4().execute().await),
            true => ("IPv6", request.v6().execute().await),
        };
        added.with_context(|| {
            format!(
                "adding {family} rule `fwmark {mark:#x}/{mask:#x} lookup {table} priority {priority}`"
            )
        })
    }

    /// `from 127.84.80.1 iif lo lookup TABLE`, or with `v6` `from ::1 iif lo lookup TABLE`.
    async fn add_loopback_source_rule(&self, v6: bool) -> Result<()> {
        let RoutingSpec {
            table, priority, ..
        } = self.spec;
        let mut request = self
            .handle
            .rule()
            .add()
            .table_id(table)
            .priority(priority)
            .input_interface("lo")
            .action(RuleAction::ToTable);
        request
            .message_mut()
            .attributes
            .push(RuleAttribute::Protocol(RouteProtocol::Other(
                ROUTE_PROTOCOL,
            )));
        let rule = |source: &str| {
            format!("adding rule `from {source} iif lo lookup {table} priority {priority}`")
        };
        match v6 {
            false => request
                .v4()
                .source_prefix(Ipv4Addr::from(LOOPBACK_SOURCE_V4), 32)
                .execute()
                .await
                .with_context(|| rule("127.84.80.1")),
            true => request
                .v6()
                .source_prefix(Ipv6Addr::LOCALHOST, 128)
                .execute()
                .await
                .with_context(|| rule("::1")),
        }
    }

    /// The routing table it installs its routes in.
    pub(crate) fn table(&self) -> u32 {
        self.spec.table
    }

    /// Removes what [`PolicyRouting::install`] added.
    pub(crate) async fn remove(self) -> Result<()> {
        remove_ours(&self.handle, self.spec.table).await.map(drop)
    }
}

fn local_route(mut route: RouteMessage, table: u32) -> RouteMessage {
    route.header.kind = RouteType::Local;
    route.header.scope = RouteScope::Host;
    route.header.protocol = RouteProtocol::Other(ROUTE_PROTOCOL);
    set_route_table(&mut route, table);
    route
}

fn set_route_table(route: &mut RouteMessage, table: u32) {
    // The header holds 8 bits; larger ids go in RTA_TABLE, which the kernel prefers anyway.
    route.header.table = u8::try_from(table).unwrap_or(RouteMessage::default().header.table);
    route.attributes.push(RouteAttribute::Table(table));
}

fn has_preferred_source(route: &RouteMessage) -> bool {
    route
        .attributes
        .iter()
        .any(|attr| matches!(attr, RouteAttribute::PrefSource(_)))
}

fn has_fw_mark(rule: &RuleMessage) -> bool {
    rule.attributes
        .iter()
        .any(|attr| matches!(attr, RuleAttribute::FwMark(_)))
}

fn family_name(version: &IpVersion) -> &'static str {
    match version {
        IpVersion::V4 => "IPv4",
        IpVersion::V6 => "IPv6",
    }
}

pub(crate) fn route_table(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|attr| match attr {
            RouteAttribute::Table(table) => Some(*table),
            _ => None,
        })
        .unwrap_or(route.header.table.into())
}

pub(crate) fn rule_table(rule: &RuleMessage) -> u32 {
    rule.attributes
        .iter()
        .find_map(|attr| match attr {
            RuleAttribute::Table(table) => Some(*table),
            _ => None,
        })
        .unwrap_or(rule.header.table.into())
}

fn is_ours_rule(rule: &RuleMessage, table: u32) -> bool {
    rule_table(rule) == table
        && rule
            .attributes
            .contains(&RuleAttribute::Protocol(RouteProtocol::Other(
                ROUTE_PROTOCOL,
            )))
}

/// The rules and routes tagged with [`ROUTE_PROTOCOL`] that point at or live in `table`, in
/// both address families.
async fn ours(handle: &Handle, table: u32) -> Result<(Vec<RuleMessage>, Vec<RouteMessage>)> {
    let (mut our_rules, mut our_routes) = (Vec::new(), Vec::new());
    for version in [IpVersion::V4, IpVersion::V6] {
        let family = family_name(&version);
        let rules: Vec<RuleMessage> = handle
            .rule()
            .get(version.clone())
            .execute()
            .try_collect()
            .await
            .with_context(|| format!("listing {family} policy routing rules"))?;
        our_rules.extend(rules.into_iter().filter(|rule| is_ours_rule(rule, table)));
        let any = match version {
            IpVersion::V4 => RouteMessageBuilder::<Ipv4Addr>::new().build(),
            IpVersion::V6 => RouteMessageBuilder::<Ipv6Addr>::new().build(),
        };
        let routes: Vec<RouteMessage> = handle
            .route()
            .get(any)
            .execute()
            .try_collect()
            .await
            .with_context(|| format!("listing {family} routes"))?;
        our_routes.extend(routes.into_iter().filter(|route| {
            route_table(route) == table
                && route.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL)
        }));
    }
    Ok((our_rules, our_routes))
}

/// Removes every rule and route tagged with [`ROUTE_PROTOCOL`] that points at or lives in
/// `table`, in both address families, and returns how many there were. Used at start-up to
/// clear what a killed instance left, and at shutdown.
pub(crate) async fn remove_ours(handle: &Handle, table: u32) -> Result<usize> {
    let (rules, routes) = ours(handle, table).await?;
    let removed = rules.len() + routes.len();
    for rule in rules {
        handle
            .rule()
            .del(rule)
            .execute()
            .await
            .with_context(|| format!("removing our rule to table {table}"))?;
    }
    for route in routes {
        handle
            .route()
            .del(route)
            .execute()
            .await
            .with_context(|| format!("removing our route in table {table}"))?;
    }
    Ok(removed)
}

impl PolicyRouting {
    /// Takes over the policy routing a pinned instance left in place when it is exactly what
    /// `spec` says (so steered packets never meet a moment without it); otherwise replaces it.
    pub(crate) async fn adopt(handle: &Handle, spec: RoutingSpec) -> Result<Self> {
        let (rules, routes) = ours(handle, spec.table).await?;
        let rule_matches = |rule: &RuleMessage| {
            rule.attributes.contains(&RuleAttribute::FwMark(spec.mark))
                && rule.attributes.contains(&RuleAttribute::FwMask(spec.mask))
                && rule
                    .attributes
                    .contains(&RuleAttribute::Priority(spec.priority))
        };
        let route_matches = |route: &RouteMessage| has_preferred_source(route) == spec.local_origin;
        let (marked, sourced): (Vec<_>, Vec<_>) = rules.iter().partition(|rule| has_fw_mark(rule));
        let sourced_matches = |rule: &&RuleMessage| {
            rule.attributes
                .contains(&RuleAttribute::Priority(spec.priority))
        };
        if marked.len() == 2
            && marked.into_iter().all(rule_matches)
            && sourced.len() == if spec.local_origin { 2 } else { 0 }
            && sourced.iter().all(sourced_matches)
            && routes.len() == 2
            && routes.iter().all(route_matches)
        {
            return Ok(PolicyRouting {
                handle: handle.clone(),
                spec,
            });
        }
        if !rules.is_empty() || !routes.is_empty() {
            log::warn!(
                "the policy routing left in table {} differs from this configuration's; replacing it",
                spec.table
            );
            remove_ours(handle, spec.table).await?;
        }
        Self::install(handle, spec).await
    }
}

/// Our rules and routes of `table`, one line each, for `tproxy status`.
pub(crate) async fn describe(handle: &Handle, table: u32) -> Result<Vec<String>> {
    let (rules, routes) = ours(handle, table).await?;
    let mut lines = Vec::new();
    for rule in &rules {
        let family = if rule.header.family == AddressFamily::Inet6 {
            "IPv6"
        } else {
            "IPv4"
        };
        let find = |want: fn(&RuleAttribute) -> Option<u32>| rule.attributes.iter().find_map(want);
        let mark = find(|a| match a {
            RuleAttribute::FwMark(m) => Some(*m),
            _ => None,
        });
        let mask = find(|a| match a {
            RuleAttribute::FwMask(m) => Some(*m),
            _ => None,
        });
        let priority = find(|a| match a {
            RuleAttribute::Priority(p) => Some(*p),
            _ => None,
        });
        let source = rule.attributes.iter().find_map(|a| match a {
            RuleAttribute::Source(addr) => Some(*addr),
            _ => None,
        });
        lines.push(match source {
            Some(source) => format!(
                "{family} rule: priority {} from {source} iif lo lookup {table}",
                priority.unwrap_or(0)
            ),
            None => format!(
                "{family} rule: priority {} fwmark {:#x}/{:#x} lookup {table}",
                priority.unwrap_or(0),
                mark.unwrap_or(0),
                mask.unwrap_or(u32::MAX)
            ),
        });
    }
    for route in &routes {
        let family = if route.header.address_family == AddressFamily::Inet6 {
            "IPv6"
        } else {
            "IPv4"
        };
        let source = match (has_preferred_source(route), family) {
            (false, _) => "",
            (true, "IPv4") => " src 127.0.0.1",
            (true, _) => " src ::1",
        };
        lines.push(format!(
            "{family} route: local default dev lo{source} table {table}"
        ));
    }
    Ok(lines)
}

/// The kernel's local routing table (`ip route show table local`).
pub(crate) const LOCAL_TABLE: u32 = 255;

/// The kernel's main routing table (`ip route show`).
pub(crate) const MAIN_TABLE: u32 = 254;

/// A route as far as the type of address a lookup that finds it gives goes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TypedRoute {
    pub prefix: IpNet,
    /// Of the routes for one prefix, a lookup finds the lowest.
    pub priority: u32,
    pub kind: RouteKind,
}

/// What of a route decides whether the addresses it takes are anycast ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RouteKind {
    /// An `anycast` route: every address it takes is one.
    Anycast,
    /// A route without a gateway (a connected prefix, `dev eth0` alone, a `local` or
    /// `multicast` route): for IPv6, the prefix's first address is an anycast one when the
    /// prefix is shorter than /127 (the subnet-router anycast address, RFC 4291 2.6.1, as
    /// the kernel's `ipv6_anycast_destination` has it).
    Direct,
    /// Any other: a route through a gateway (or nexthop objects), or one that rejects.
    Other,
}

/// The destinations the kernel gives the address type anycast: what `-m addrtype
/// --dst-type ANYCAST` and nft's `fib daddr type anycast` match. IPv4: xt_addrtype and
/// nft_fib look the address up in the local table alone, so it is in [`anycast_regions`] of
/// those routes (only `ip route add anycast …` adds one). IPv6: the route a lookup finds in
/// the local table, or else in main (the tables the kernel's default rules consult for a
/// packet without a mark), is an anycast route (a forwarding host's subnet-router
/// addresses, which the kernel adds itself), or its prefix, shorter than /127 and without
/// a gateway, begins at the address: [`ipv6_anycast_destinations`].
/// Only the families asked for (IPv4, IPv6) are listed: a router's IPv6 main table may be
/// large, and a host without IPv6 has none to list.
pub(crate) fn anycast_destinations((ipv4, ipv6): (bool, bool)) -> Result<Vec<IpNet>> {
    let mut destinations = Vec::new();
    if ipv4 {
        let local = typed_routes(AddressFamily::Inet, LOCAL_TABLE)
            .context("listing the local table's IPv4 routes")?;
        destinations.extend(anycast_regions(&local));
    }
    if ipv6 {
        let local = typed_routes(AddressFamily::Inet6, LOCAL_TABLE)
            .context("listing the local table's IPv6 routes")?;
        let main = typed_routes(AddressFamily::Inet6, MAIN_TABLE)
            .context("listing the main table's IPv6 routes")?;
        destinations.extend(ipv6_anycast_destinations(&local, &main));
    }
    destinations.sort_unstable();
    Ok(destinations)
}

/// The routes of `family` in `table`, typed.
fn typed_routes(family: AddressFamily, table: u32) -> Result<Vec<TypedRoute>> {
    let routes = dump_routes(family, Some(table))?;
    Ok(routes
        .iter()
        // A route for a TOS only is no lookup's without one (xt_addrtype's has none).
        .filter(|route| {
            route.header.address_family == family
                && route_table(route) == table
                && route.header.tos == 0
        })
        .filter_map(typed_route)
        .collect())
}

fn typed_route(route: &RouteMessage) -> Option<TypedRoute> {
    let ipv6 = route.header.address_family == AddressFamily::Inet6;
    let mut address = if ipv6 {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    };
    let mut priority = 0;
    let mut gateway = false;
    for attr in &route.attributes {
        match attr {
            RouteAttribute::Destination(RouteAddress::Inet(a)) => address = IpAddr::V4(*a),
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => address = IpAddr::V6(*a),
            RouteAttribute::Priority(p) => priority = *p,
            RouteAttribute::Gateway(_)
            | RouteAttribute::Via(_)
            | RouteAttribute::MultiPath(_)
            | RouteAttribute::NhId(_) => gateway = true,
            _ => {}
        }
    }
    let kind = match route.header.kind {
        RouteType::Anycast => RouteKind::Anycast,
        RouteType::Unicast | RouteType::Local | RouteType::Multicast | RouteType::Broadcast
            if !gateway =>
        {
            RouteKind::Direct
        }
        _ => RouteKind::Other,
    };
    Some(TypedRoute {
        prefix: IpNet::new(address, route.header.destination_prefix_length).ok()?,
        priority,
        kind,
    })
}

/// The route a lookup finds for each prefix among `routes`: the lowest priority's.
fn found_routes(routes: &[TypedRoute]) -> HashMap<IpNet, TypedRoute> {
    let mut found: HashMap<IpNet, TypedRoute> = HashMap::new();
    for route in routes {
        let entry = found.entry(route.prefix.trunc()).or_insert(*route);
        if route.priority < entry.priority {
            *entry = *route;
        }
    }
    found
}

/// The destinations whose longest-prefix match among `routes` is an anycast route: each
/// anycast route's prefix less the longer prefixes of routes of other types inside it.
pub(crate) fn anycast_regions(routes: &[TypedRoute]) -> Vec<IpNet> {
    let found = found_routes(routes);
    let mut regions: Vec<IpNet> = found
        .values()
        .filter(|route| route.kind == RouteKind::Anycast)
        .flat_map(|route| without(route.prefix.trunc(), &others_inside(&found, route.prefix)))
        .collect();
    regions.sort_unstable();
    regions
}

/// The prefixes of the routes in `found` longer than `prefix` and inside it that are not
/// anycast routes.
fn others_inside(found: &HashMap<IpNet, TypedRoute>, prefix: IpNet) -> Vec<IpNet> {
    found
        .iter()
        .filter(|(other, route)| {
            route.kind != RouteKind::Anycast
                && other.prefix_len() > prefix.prefix_len()
                && prefix.contains(*other)
        })
        .map(|(other, _)| *other)
        .collect()
}

/// The route a lookup of `address` finds among `found` (the longest prefix holding it).
fn longest_match(found: &HashMap<IpNet, TypedRoute>, address: IpAddr) -> Option<TypedRoute> {
    let bits = if address.is_ipv6() { 128 } else { 32 };
    (0..=bits).rev().find_map(|len| {
        let prefix = IpNet::new(address, len).ok()?.trunc();
        found.get(&prefix).copied()
    })
}

/// Whether a lookup of `address` that finds `route` gives it the type anycast (the kernel's
/// `ipv6_anycast_destination`).
fn ipv6_anycast(route: TypedRoute, address: IpAddr) -> bool {
    route.kind == RouteKind::Anycast
        || route.kind == RouteKind::Direct
            && route.prefix.prefix_len() < 127
            && route.prefix.network() == address
}

/// The IPv6 destinations that a lookup in the local table, or where that finds nothing in
/// main, gives the type anycast (see [`anycast_destinations`]).
pub(crate) fn ipv6_anycast_destinations(local: &[TypedRoute], main: &[TypedRoute]) -> Vec<IpNet> {
    let local = found_routes(local);
    let main = found_routes(main);
    let local_prefixes: Vec<IpNet> = local.keys().copied().collect();
    let mut destinations = Vec::new();
    for (table, holes) in [(&local, Vec::new()), (&main, local_prefixes)] {
        for route in table.values() {
            if route.kind == RouteKind::Anycast {
                let mut inside = others_inside(table, route.prefix);
                inside.extend(holes.iter().copied());
                destinations.extend(without(route.prefix.trunc(), &inside));
            }
            let first = route.prefix.network();
            let decided_before = holes.iter().any(|hole| hole.contains(&first));
            if route.kind == RouteKind::Direct
                && !decided_before
                && longest_match(table, first).is_some_and(|found| ipv6_anycast(found, first))
            {
                destinations.push(IpNet::from(first));
            }
        }
    }
    destinations.sort_unstable();
    destinations.dedup();
    destinations
}

/// The routes of `family` in `table` (on kernels before 4.20, of every table) or of every
/// table, over a blocking rtnetlink socket.
pub(crate) fn dump_routes(family: AddressFamily, table: Option<u32>) -> Result<Vec<RouteMessage>> {
    let mut socket = Socket::new(NETLINK_ROUTE).context("opening an rtnetlink socket")?;
    socket.bind_auto().context("binding the rtnetlink socket")?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .context("connecting the rtnetlink socket")?;
    // Strict checking lets the kernel dump the local table alone (a router's main table may
    // be large, and route events bring the routes here again); a kernel without it dumps
    // every table, which the caller's filter takes the local table from.
    let strict = table.is_some() && socket.set_netlink_get_strict_chk(true).is_ok();
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut query = RouteMessage::default();
    query.header.address_family = family;
    if let (true, Some(table)) = (strict, table) {
        query.header.table = table as u8;
    }
    let mut request = NetlinkMessage::new(header, RouteNetlinkMessage::GetRoute(query).into());
    request.finalize();
    let mut buffer = vec![0; request.buffer_len()];
    request.serialize(&mut buffer);
    socket.send(&buffer, 0).context("asking for the routes")?;
    let mut routes = Vec::new();
    let mut received = Vec::with_capacity(64 * 1024);
    loop {
        received.clear();
        let size = socket
            .recv(&mut received, 0)
            .context("reading the routes")?;
        let mut offset = 0;
        while offset < size {
            let message =
                NetlinkMessage::<RouteNetlinkMessage>::deserialize(&received[offset..size])
                    .context("parsing the routes")?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(route)) => {
                    routes.push(route)
                }
                NetlinkPayload::Done(_) => return Ok(routes),
                NetlinkPayload::Error(error) => bail!("rtnetlink: {error}"),
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}

/// `prefix` less the `holes` inside it, as prefixes.
fn without(prefix: IpNet, holes: &[IpNet]) -> Vec<IpNet> {
    if holes.iter().any(|hole| hole.contains(&prefix)) {
        return Vec::new();
    }
    if !holes.iter().any(|hole| prefix.contains(hole)) {
        return vec![prefix];
    }
    prefix
        .subnets(prefix.prefix_len() + 1)
        .into_iter()
        .flatten()
        .flat_map(|half| without(half, holes))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(prefix: &str, priority: u32, anycast: bool) -> TypedRoute {
        TypedRoute {
            prefix: prefix.parse().unwrap(),
            priority,
            kind: if anycast {
                RouteKind::Anycast
            } else {
                RouteKind::Other
            },
        }
    }

    fn typed(prefix: &str, kind: RouteKind) -> TypedRoute {
        TypedRoute {
            prefix: prefix.parse().unwrap(),
            priority: 0,
            kind,
        }
    }

    #[test]
    fn anycast_regions_are_where_the_longest_match_is_anycast() {
        let routes = [
            route("127.0.0.0/8", 0, false),
            route("10.7.0.1/32", 0, true),
            route("10.8.0.0/30", 0, true),
            route("10.8.0.3/32", 0, false),
            route("10.9.0.0/24", 0, true),
            route("10.9.0.0/24", 5, false),
            route("10.10.0.0/24", 0, false),
            route("10.10.0.0/24", 5, true),
        ];
        let regions: Vec<String> = anycast_regions(&routes)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            regions,
            ["10.7.0.1/32", "10.8.0.0/31", "10.8.0.2/32", "10.9.0.0/24"]
        );
        assert!(anycast_regions(&[route("127.0.0.0/8", 0, false)]).is_empty());
    }

    /// As the kernel answered nft's `fib daddr type` on a forwarding host (fd00:1::/64 on
    /// one link, a default route through a gateway): fd00:1:: anycast, fd00:1::1 local,
    /// others unicast.
    #[test]
    fn ipv6_anycast_is_the_found_routes_anycast_or_the_first_address_of_a_direct_prefix() {
        use RouteKind::*;
        let local = [
            typed("::1/128", Direct),
            typed("fd00:1::/128", Anycast),
            typed("fd00:1::1/128", Direct),
            typed("fe80::/128", Anycast),
            typed("ff00::/8", Direct),
            // An anycast route by hand, with a longer route of another type inside it.
            typed("fd00:9::/120", Anycast),
            typed("fd00:9::80/121", Other),
        ];
        let main = [
            typed("fd00:1::/64", Direct),
            typed("fe80::/64", Direct),
            // A connected prefix whose first address a longer route through a gateway takes.
            typed("fd00:2::/64", Direct),
            typed("fd00:2::/80", Other),
            // One without a gateway whose first address a longer one without a gateway
            // shares: anycast all the same.
            typed("fd00:3::/48", Direct),
            typed("fd00:3::/64", Direct),
            // Too long to have a subnet-router address.
            typed("fd00:4::/127", Direct),
            // A connected prefix where the local table decides its first address.
            typed("ff00::/16", Direct),
            typed("::/0", Other),
            // An anycast route in main, partly where the local table decides.
            typed("fd00:9::/119", Anycast),
        ];
        let found: Vec<String> = ipv6_anycast_destinations(&local, &main)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            found,
            [
                "fd00:1::/128",
                "fd00:3::/128",
                "fd00:9::/121",
                "fd00:9::100/120",
                "fe80::/128",
                "ff00::/128"
            ]
        );
        assert!(ipv6_anycast_destinations(&[], &[typed("::/0", Direct)])
            .iter()
            .any(|d| d.to_string() == "::/128"));
    }
}
