//! Values as the configuration file writes them: text (or, where it makes sense, a number)
//! parsed with the same parser as the command-line flag, so file and flag accept and reject
//! the same things.

use std::{fmt, marker::PhantomData, net::SocketAddr, path::PathBuf, time::Duration};

use ipnet::IpNet;
use serde::{
    de::{self, Deserializer, SeqAccess, Visitor},
    Deserialize,
};

use tproxy_common::local_origin::{ClassidRange, UidRange};

use crate::{
    datapath::rules::Protocol,
    datapath::rules::{CtDirection, Origin, Ports},
    values::{self, FailMode, Mark, TcpRelayMode},
};

use super::ports_of;

/// How one kind of value is read from text. The type implementing it names the kind (a
/// timeout and a drain timeout are both durations, but only the latter may be zero).
pub trait Parse {
    /// What the text becomes.
    type Value;
    /// What the value should look like, for type errors.
    const EXPECTED: &'static str;
    /// Whether a bare number is taken as its text (`table = 100` as `table = "100"`).
    const FROM_NUMBER: bool = true;
    /// The value of `text`, or an error naming it.
    fn parse(text: &str) -> Result<Self::Value, String>;
}

macro_rules! parses {
    ($kind:ty => $value:ty, $expected:literal, $parse:expr) => {
        impl Parse for $kind {
            type Value = $value;
            const EXPECTED: &'static str = $expected;
            fn parse(text: &str) -> Result<$value, String> {
                $parse(text)
            }
        }
    };
    ($kind:ty, $expected:literal, $parse:expr) => {
        parses!($kind => $kind, $expected, $parse);
    };
}

/// A routing table id (not one of the kernel's reserved ones).
pub struct Table;
/// The priority of the policy routing rule.
pub struct RulePriority;
/// The mark of tproxy's own sockets.
pub struct SocketMark;
/// The packet mark a rule matches.
pub struct MarkMatch;
/// A duration greater than zero.
pub struct Timeout;
/// A duration, zero included.
pub struct DrainTimeout;
/// A count of connections or sessions, at least 1.
pub struct SessionCap;
/// A group id or range of them, in the uid ranges' form.
pub struct GidRange;

parses!(FailMode, "\"open\" or \"closed\"", values::parse_fail_mode);
parses!(
    TcpRelayMode,
    "\"kernel\", \"splice\" or \"copy\"",
    values::parse_tcp_relay
);
parses!(
    Mark,
    "a mark like \"0x1000000/0x1000000\"",
    values::parse_mark
);
parses!(
    MarkMatch => Mark,
    "a mark to match like \"0xff\" or \"0x10/0xf0\"",
    values::parse_mark_match
);
parses!(Table => u32, "a routing table number", values::parse_table);
parses!(
    RulePriority => u32,
    "a rule priority (1-32765)",
    |t: &str| match t.parse::<u32>() {
        Ok(p @ 1..=32765) => Ok(p),
        _ => Err(format!("`{t}` is not a rule priority between 1 and 32765")),
    }
);
parses!(
    SocketMark => u32,
    "a socket mark like \"0x2000000\"",
    values::parse_socket_mark
);
parses!(
    Timeout => Duration,
    "a duration like \"10s\" or \"500ms\"",
    values::parse_duration
);
parses!(
    DrainTimeout => Duration,
    "a duration like \"30s\" or \"0s\"",
    values::parse_drain_timeout
);
parses!(
    SessionCap => u32,
    "a session count of at least 1",
    |t: &str| match t.parse::<u32>() {
        Ok(n @ 1..) => Ok(n),
        _ => Err(format!("`{t}` is not a session count of at least 1")),
    }
);
parses!(
    SocketAddr,
    "an ADDR:PORT like \"127.0.0.1:8080\"",
    values::parse_socket_addr
);
parses!(IpNet, "a prefix like \"10.0.0.0/8\"", values::parse_prefix);
parses!(
    Protocol,
    "\"tcp\", \"udp\" or \"other\"",
    |t: &str| match t {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        "other" => Ok(Protocol::Other),
        _ => Err(format!(
            "`{t}` is not a protocol: use \"tcp\", \"udp\" or \"other\" (every IP protocol \
         besides TCP and UDP)"
        )),
    }
);
parses!(
    CtDirection,
    "\"original\" or \"reply\"",
    |t: &str| match t {
        "original" => Ok(CtDirection::Original),
        "reply" => Ok(CtDirection::Reply),
        _ => Err(format!(
            "`{t}` is not a connection's direction: use \"original\" (as its first packet \
             went) or \"reply\" (back)"
        )),
    }
);
parses!(
    Origin,
    "\"forwarded\", \"local\" or \"any\"",
    |t: &str| match t {
        "forwarded" => Ok(Origin::Forwarded),
        "local" => Ok(Origin::Local),
        "any" => Ok(Origin::Any),
        _ => Err(format!(
            "`{t}` is not an origin: use \"forwarded\" (arrivals on the interfaces), \"local\" \
             (this host's own connections) or \"any\""
        )),
    }
);
parses!(
    UidRange,
    "a uid or range like 1000 or \"1000-1999\"",
    values::parse_uid_range
);
parses!(
    GidRange => UidRange,
    "a gid or range like 23333 or \"1000-1999\"",
    values::parse_gid_range
);
parses!(
    ClassidRange,
    "a net_cls class id or range like 1, \"0x100001\" or \"2-9\"",
    values::parse_classid_range
);
parses!(
    RuleAction,
    "\"steer\", \"bypass\", \"drop\", \"reject\" or \"deliver\"",
    |t: &str| match t {
        "steer" => Ok(RuleAction::Steer),
        "bypass" => Ok(RuleAction::Bypass),
        "drop" => Ok(RuleAction::Drop),
        "deliver" => Ok(RuleAction::Deliver),
        "reject" => Ok(RuleAction::Reject),
        _ => Err(format!(
            "`{t}` is not an action: use \"steer\", \"bypass\", \"drop\", \"reject\" or \"deliver\""
        )),
    }
);
parses!(
    Ports,
    "a port or range like 80 or \"8000-8100\"",
    |t: &str| {
        let list = values::parse_port_list(t)?;
        match list.0.as_slice() {
            [range] => Ok(ports_of(*range.start(), *range.end())),
            _ => Err(format!(
                "`{t}`: give several ports as a list, like [80, 443]"
            )),
        }
    }
);

impl Parse for PathBuf {
    type Value = PathBuf;
    const EXPECTED: &'static str = "a path";
    const FROM_NUMBER: bool = false;
    fn parse(text: &str) -> Result<PathBuf, String> {
        Ok(PathBuf::from(text))
    }
}

impl Parse for String {
    type Value = String;
    const EXPECTED: &'static str = "a string";
    const FROM_NUMBER: bool = false;
    fn parse(text: &str) -> Result<String, String> {
        Ok(text.to_string())
    }
}

/// What a rule does with the packets it matches, as the file writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleAction {
    Steer,
    Bypass,
    Drop,
    Deliver,
    Reject,
}

/// One value.
pub struct Text<P: Parse>(pub P::Value);

/// One value or a list of them.
pub struct List<P: Parse>(pub Vec<P::Value>);

impl<P: Parse> fmt::Debug for Text<P>
where
    P::Value: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<P: Parse> fmt::Debug for List<P>
where
    P::Value: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

struct TextVisitor<P>(PhantomData<P>);

impl<P: Parse> TextVisitor<P> {
    fn parse<E: de::Error>(text: &str) -> Result<P::Value, E> {
        P::parse(text).map_err(E::custom)
    }

    fn parse_number<E: de::Error>(number: i64) -> Result<P::Value, E> {
        if !P::FROM_NUMBER {
            return Err(E::invalid_type(
                de::Unexpected::Signed(number),
                &P::EXPECTED,
            ));
        }
        Self::parse(&number.to_string())
    }
}

impl<'de, P: Parse> Visitor<'de> for TextVisitor<P> {
    type Value = P::Value;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(P::EXPECTED)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<P::Value, E> {
        Self::parse(v)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<P::Value, E> {
        Self::parse_number(v)
    }
}

impl<'de, P: Parse> Deserialize<'de> for Text<P> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TextVisitor::<P>(PhantomData)).map(Text)
    }
}

struct ListVisitor<P>(PhantomData<P>);

impl<'de, P: Parse> Visitor<'de> for ListVisitor<P> {
    type Value = Vec<P::Value>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}, or a list of them", P::EXPECTED)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<P::Value>, E> {
        TextVisitor::<P>::parse(v).map(|value| vec![value])
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Vec<P::Value>, E> {
        TextVisitor::<P>::parse_number(v).map(|value| vec![value])
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<P::Value>, A::Error> {
        let mut values = Vec::new();
        while let Some(Text(value)) = seq.next_element::<Text<P>>()? {
            values.push(value);
        }
        Ok(values)
    }
}

impl<'de, P: Parse> Deserialize<'de> for List<P> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ListVisitor::<P>(PhantomData)).map(List)
    }
}

/// `interfaces = "all"` or a list of names (which may be `all`, see
/// `Interfaces::from_names`).
#[derive(Debug)]
pub enum InterfaceList {
    All,
    Named(Vec<String>),
}

impl<'de> Deserialize<'de> for InterfaceList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct InterfacesVisitor;
        impl<'de> Visitor<'de> for InterfacesVisitor {
            type Value = InterfaceList;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of interface names, or \"all\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<InterfaceList, E> {
                match v {
                    "all" => Ok(InterfaceList::All),
                    other => Err(E::custom(format!(
                        "`{other}`: give a list like [\"{other}\"], or \"all\""
                    ))),
                }
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<InterfaceList, A::Error> {
                let mut names: Vec<String> = Vec::new();
                while let Some(name) = seq.next_element::<String>()? {
                    if names.contains(&name) {
                        return Err(de::Error::custom(format!(
                            "interface {name} is listed twice"
                        )));
                    }
                    names.push(name);
                }
                if names.is_empty() {
                    return Err(de::Error::custom(
                        "an empty list steers nothing; name at least one interface",
                    ));
                }
                // `["all"]` and `["all", "lo"]` are read as `--iface` reads them (see
                // `Interfaces::from_names`).
                Ok(InterfaceList::Named(names))
            }
        }
        d.deserialize_any(InterfacesVisitor)
    }
}

/// A rule's `dst`: prefixes, `"local"`, the host's own addresses, `"anycast"`, or
/// `"ipset:NAME"`, a kernel ipset's entries.
#[derive(Debug)]
pub enum Destinations {
    Prefixes(Vec<IpNet>),
    /// The addresses of this network namespace's interfaces, followed as they change: of
    /// both families (`"local"`), or one (`"local-ipv4"`, `"local-ipv6"`).
    Local {
        ipv4: bool,
        ipv6: bool,
    },
    /// The destinations the kernel gives the address type anycast (what `-m addrtype
    /// --dst-type ANYCAST` and nft's `fib daddr type anycast` match: IPv4 the local table's
    /// anycast routes, IPv6 also the subnet-router addresses), followed as they change: of
    /// both families (`"anycast"`), or one (`"anycast-ipv4"`, `"anycast-ipv6"`).
    Anycast {
        ipv4: bool,
        ipv6: bool,
    },
    /// The entries of the kernel ipset of this name (`hash:ip` or `hash:net`), followed as
    /// they change (what `-m set --match-set NAME dst` matches).
    Ipset(String),
}

/// The keyword of a rule's `dst` for the host's own addresses.
pub const LOCAL: &str = "local";
/// The keyword of a rule's `dst` for the anycast destinations.
pub const ANYCAST: &str = "anycast";

/// The families (IPv4, IPv6) that `text` names as `keyword` with an optional family suffix
/// (`"local"`: both, `"local-ipv4"`, `"local-ipv6"`: one); `None`: it is not that keyword.
pub(super) fn families_of(text: &str, keyword: &str) -> Option<(bool, bool)> {
    match text.strip_prefix(keyword)? {
        "" => Some((true, true)),
        "-ipv4" => Some((true, false)),
        "-ipv6" => Some((false, true)),
        _ => None,
    }
}

/// `keyword` as a rule's `dst` writes it for these families (see [`families_of`]).
pub fn with_families(keyword: &str, ipv4: bool, ipv6: bool) -> String {
    match (ipv4, ipv6) {
        (true, false) => format!("{keyword}-ipv4"),
        (false, true) => format!("{keyword}-ipv6"),
        _ => keyword.to_string(),
    }
}

/// What names a kernel ipset in a rule's `dst`: `"ipset:NAME"`.
pub(super) const IPSET_PREFIX: &str = "ipset:";

impl<'de> Deserialize<'de> for Destinations {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct DestinationsVisitor;
        impl<'de> Visitor<'de> for DestinationsVisitor {
            type Value = Destinations;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a prefix like \"10.0.0.0/8\", a list of them, \"local\" (\"local-ipv4\", \"local-ipv6\"), \"anycast\" (\"anycast-ipv4\", \"anycast-ipv6\") or \"ipset:NAME\"",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Destinations, E> {
                match v {
                    keyword if families_of(keyword, LOCAL).is_some() => {
                        let (ipv4, ipv6) = families_of(keyword, LOCAL).expect("just matched");
                        Ok(Destinations::Local { ipv4, ipv6 })
                    }
                    keyword if families_of(keyword, ANYCAST).is_some() => {
                        let (ipv4, ipv6) = families_of(keyword, ANYCAST).expect("just matched");
                        Ok(Destinations::Anycast { ipv4, ipv6 })
                    }
                    named if named.starts_with(IPSET_PREFIX) => {
                        let name = &named[IPSET_PREFIX.len()..];
                        // As the kernel takes them: IPSET_MAXNAMELEN with the NUL.
                        if name.is_empty()
                            || name.len() > 31
                            || name.chars().any(|c| c.is_whitespace() || c.is_control())
                        {
                            return Err(E::custom(format!(
                                "`{}`: an ipset name has 1 to 31 characters, without spaces",
                                named.escape_debug()
                            )));
                        }
                        Ok(Destinations::Ipset(name.to_string()))
                    }
                    prefix => ListVisitor::<IpNet>(PhantomData)
                        .visit_str(prefix)
                        .map(Destinations::Prefixes),
                }
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Destinations, A::Error> {
                ListVisitor::<IpNet>(PhantomData)
                    .visit_seq(seq)
                    .map(Destinations::Prefixes)
            }
        }
        d.deserialize_any(DestinationsVisitor)
    }
}
