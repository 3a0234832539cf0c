//! The values an operator writes (marks, ports, prefixes, addresses, durations, the fail
//! mode) and their parsers, which turn text into a checked value or an error naming the bad
//! text. The command line and the configuration file both parse with these, so they accept
//! and reject the same things.

use std::{net::SocketAddr, ops::RangeInclusive, time::Duration};

use ipnet::IpNet;
use tproxy_common::local_origin::{ClassidRange, UidRange, UidRangeError};

/// What steering does with a packet for which there is no listener.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FailMode {
    /// Pass it on untouched: unproxied traffic flows while no listener is there.
    #[default]
    Open,
    /// Drop it: nothing a steer rule takes ever bypasses the proxy.
    Closed,
}

impl std::fmt::Display for FailMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FailMode::Open => "open",
            FailMode::Closed => "closed",
        })
    }
}

/// `open` or `closed`.
pub fn parse_fail_mode(text: &str) -> Result<FailMode, String> {
    match text {
        "open" => Ok(FailMode::Open),
        "closed" => Ok(FailMode::Closed),
        _ => Err(format!(
            "`{text}` is not a fail mode: use \"open\" or \"closed\""
        )),
    }
}

/// How the TCP relay moves bytes (`--tcp-relay`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TcpRelayMode {
    /// A stream-verdict program redirects each socket's bytes to its peer in the kernel.
    Kernel,
    /// splice(2) through a pipe, copying where splice is refused.
    #[default]
    Splice,
    /// read/write through a userspace buffer.
    Copy,
}

impl std::fmt::Display for TcpRelayMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TcpRelayMode::Kernel => "kernel",
            TcpRelayMode::Splice => "splice",
            TcpRelayMode::Copy => "copy",
        })
    }
}

/// `kernel`, `splice` or `copy`.
pub fn parse_tcp_relay(text: &str) -> Result<TcpRelayMode, String> {
    match text {
        "kernel" => Ok(TcpRelayMode::Kernel),
        "splice" => Ok(TcpRelayMode::Splice),
        "copy" => Ok(TcpRelayMode::Copy),
        _ => Err(format!(
            "`{text}` is not a TCP relay mode: use \"kernel\", \"splice\" or \"copy\""
        )),
    }
}

/// A set of ports given as a list of inclusive ranges (a single port is a range of one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortList(pub Vec<RangeInclusive<u16>>);

impl std::fmt::Display for PortList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, range) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if range.start() == range.end() {
                write!(f, "{}", range.start())?;
            } else {
                write!(f, "{}-{}", range.start(), range.end())?;
            }
        }
        Ok(())
    }
}

fn parse_port(text: &str) -> Result<u16, String> {
    let port: u32 = text
        .trim()
        .parse()
        .map_err(|_| match text.split_once(':') {
            // iptables' and ipset's way of writing a range.
            Some((first, last)) => format!(
                "`{text}` is not a port number (a range is written `{}-{}`)",
                first.trim(),
                last.trim()
            ),
            None => format!("`{text}` is not a port number"),
        })?;
    match port {
        0 => Err("port 0 is no packet's port (ports are 1-65535: start a range at 1)".into()),
        1..=65535 => Ok(port as u16),
        _ => Err(format!("port {port} is above 65535")),
    }
}

/// Parses `80,443,8000-8100`.
pub fn parse_port_list(text: &str) -> Result<PortList, String> {
    let ranges = text
        .split(',')
        .map(|item| match item.split_once('-') {
            _ if item.trim().is_empty() => Err(format!("empty entry in port list `{text}`")),
            None => parse_port(item).map(|port| port..=port),
            Some((first, last)) => {
                let (first, last) = (parse_port(first)?, parse_port(last)?);
                if first > last {
                    return Err(format!(
                        "range `{}` runs backwards ({first} > {last})",
                        item.trim()
                    ));
                }
                Ok(first..=last)
            }
        })
        .collect::<Result<_, _>>()?;
    Ok(PortList(ranges))
}

/// Parses an IPv4 or IPv6 prefix; a bare address is a host prefix. Host bits are cleared, so
/// `10.1.2.3/8` means `10.0.0.0/8`.
pub fn parse_prefix(text: &str) -> Result<IpNet, String> {
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    text.parse::<std::net::IpAddr>()
        .map(IpNet::from)
        .map_err(|_| {
            format!("`{text}` is not an IPv4/IPv6 prefix (like 10.0.0.0/8 or 2001:db8::/32)")
        })
}

/// Parses `ADDR:PORT` (IPv6 in brackets: `[::1]:8080`).
pub fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| {
        format!("`{text}` is not an ADDR:PORT socket address (like 127.0.0.1:8080 or [::1]:8080)")
    })
}

/// A routing mark and the mask of mark bits it may change; as a rule's match, the bits under
/// `mask` that a packet's mark must have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mark {
    pub value: u32,
    pub mask: u32,
}

impl std::fmt::Display for Mark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x}/{:#x}", self.value, self.mask)
    }
}

fn parse_u32(text: &str, what: &str) -> Result<u32, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed
        .map_err(|_| format!("`{text}` is not a valid {what} (a 32-bit number, decimal or 0x-hex)"))
}

/// Parses `MARK` or `MARK/MASK`; a bare mark's mask is the mark itself.
pub fn parse_mark(text: &str) -> Result<Mark, String> {
    let (value, mask) = match text.split_once('/') {
        Some((value, mask)) => (parse_u32(value, "mark")?, parse_u32(mask, "mark mask")?),
        None => {
            let value = parse_u32(text, "mark")?;
            (value, value)
        }
    };
    if value == 0 || value & mask == 0 {
        return Err(format!(
            "mark `{text}` sets no bits under its mask: steered packets would be indistinguishable"
        ));
    }
    if value & !mask != 0 {
        return Err(format!("mark `{text}` has bits outside its mask"));
    }
    Ok(Mark { value, mask })
}

/// Parses a mark to match, `VALUE` or `VALUE/MASK`, as iptables' `-m mark --mark` reads it:
/// a bare value is matched whole (mask 0xffffffff).
pub fn parse_mark_match(text: &str) -> Result<Mark, String> {
    let (value, mask) = match text.split_once('/') {
        Some((value, mask)) => (parse_u32(value, "mark")?, parse_u32(mask, "mark mask")?),
        None => (parse_u32(text, "mark")?, u32::MAX),
    };
    if mask == 0 {
        return Err(format!(
            "mark `{text}` has mask 0 and so matches every packet: leave `mark` out instead"
        ));
    }
    if value & !mask != 0 {
        return Err(format!(
            "mark `{text}` has bits outside its mask, so no packet matches it"
        ));
    }
    Ok(Mark { value, mask })
}

/// Parses a non-zero socket mark.
pub fn parse_socket_mark(text: &str) -> Result<u32, String> {
    match parse_u32(text, "socket mark")? {
        0 => Err("--socket-mark 0 would make every unmarked local socket look like ours".into()),
        mark => Ok(mark),
    }
}

/// Parses a routing table id, refusing the kernel's reserved tables.
pub fn parse_table(text: &str) -> Result<u32, String> {
    let table = parse_u32(text, "routing table")?;
    match table {
        0 | 253..=255 => Err(format!(
            "table {table} is reserved by the kernel (unspec/default/main/local); pick another"
        )),
        _ => Ok(table),
    }
}

/// Parses `10s`, `500ms`, `5m`, …; zero is refused.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = parse_drain_timeout(text)?;
    if duration.is_zero() {
        return Err(format!("duration `{text}` must be greater than zero"));
    }
    Ok(duration)
}

/// A drain timeout: any duration, zero included (what is in flight is reset at once).
pub fn parse_drain_timeout(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("`{text}` is not a duration like 10s or 500ms ({e})"))
}

/// Parses a uid or an inclusive range of uids (`1000-1999`).
pub(crate) fn parse_uid_range(text: &str) -> Result<UidRange, String> {
    text.parse()
        .map_err(|error| format!("uid `{text}`: {error}"))
}

/// Parses a group id or an inclusive range of them (`1000-1999`), in the uid ranges' form.
pub(crate) fn parse_gid_range(text: &str) -> Result<UidRange, String> {
    text.parse().map_err(|error| {
        let why = match error {
            UidRangeError::NotAUid => {
                "not a gid (0 to 4294967294) or a range of them like 1000-1999"
            }
            UidRangeError::Reversed => "the range's first gid is above its last",
        };
        format!("gid `{text}`: {why}")
    })
}

/// Parses a cgroup v1 net_cls class id or an inclusive range of them (`2-9`).
pub(crate) fn parse_classid_range(text: &str) -> Result<ClassidRange, String> {
    text.parse()
        .map_err(|error| format!("net_cls class id `{text}`: {error}"))
}

/// Which transport a listener serves (defined with the status report, which names it).
pub use tproxy_common::stats::Transport;

/// A duration as an operator writes one: `0s`, `500ms`, `30s`, `1.5s`, `5m`, `2h`.
pub struct Human(pub Duration);

impl std::fmt::Display for Human {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let duration = self.0;
        let whole = duration.subsec_nanos() == 0;
        let secs = duration.as_secs();
        if duration.is_zero() {
            f.write_str("0s")
        } else if whole && secs.is_multiple_of(3600) {
            write!(f, "{}h", secs / 3600)
        } else if whole && secs.is_multiple_of(60) {
            write!(f, "{}m", secs / 60)
        } else if secs > 0 {
            let text = format!("{:.3}", duration.as_secs_f64());
            write!(f, "{}s", text.trim_end_matches('0').trim_end_matches('.'))
        } else if duration.subsec_nanos().is_multiple_of(1_000_000) {
            write!(f, "{}ms", duration.subsec_millis())
        } else {
            write!(f, "{}µs", duration.subsec_micros())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_lists_and_ranges() {
        let list = parse_port_list("80,443,8000-8002").unwrap();
        assert_eq!(list.0, [80..=80, 443..=443, 8000..=8002]);
        assert_eq!(list.to_string(), "80,443,8000-8002");
        assert_eq!(parse_port_list("65535").unwrap().0, [65535..=65535]);
    }

    #[test]
    fn port_errors_name_the_bad_value() {
        assert!(parse_port_list("0").unwrap_err().contains("port 0"));
        assert!(parse_port_list("65536").unwrap_err().contains("65536"));
        assert!(parse_port_list("90-80").unwrap_err().contains("90-80"));
        assert_eq!(
            parse_port_list("8000:8100").unwrap_err(),
            "`8000:8100` is not a port number (a range is written `8000-8100`)"
        );
        assert!(parse_port_list("http").unwrap_err().contains("`http`"));
        assert!(parse_port_list("80,,81")
            .unwrap_err()
            .contains("empty entry"));
    }

    #[test]
    fn prefixes_and_hosts() {
        assert_eq!(
            parse_prefix("10.1.2.3/8").unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            parse_prefix("2001:db8::1").unwrap().to_string(),
            "2001:db8::1/128"
        );
        assert!(parse_prefix("10.0.0.0/33")
            .unwrap_err()
            .contains("10.0.0.0/33"));
        assert!(parse_prefix("example.com")
            .unwrap_err()
            .contains("example.com"));
    }

    #[test]
    fn marks() {
        assert_eq!(
            parse_mark("0x10").unwrap(),
            Mark {
                value: 0x10,
                mask: 0x10
            }
        );
        assert_eq!(
            parse_mark("1/0xff").unwrap(),
            Mark {
                value: 1,
                mask: 0xff
            }
        );
        assert!(parse_mark("0").unwrap_err().contains("sets no bits"));
        assert!(parse_mark("0x3/0x1")
            .unwrap_err()
            .contains("outside its mask"));
        assert!(parse_mark("0xzz").unwrap_err().contains("0xzz"));
        assert_eq!(
            parse_mark_match("0xff").unwrap(),
            Mark {
                value: 0xff,
                mask: u32::MAX
            }
        );
        assert_eq!(
            parse_mark_match("0/0xff00").unwrap(),
            Mark {
                value: 0,
                mask: 0xff00
            },
            "unmarked packets"
        );
        assert!(parse_mark_match("1/0")
            .unwrap_err()
            .contains("every packet"));
        assert!(parse_mark_match("0x3/0x1")
            .unwrap_err()
            .contains("outside its mask"));
    }

    #[test]
    fn tables_and_durations() {
        assert_eq!(parse_table("100").unwrap(), 100);
        assert!(parse_table("254").unwrap_err().contains("reserved"));
        assert_eq!(
            parse_duration("1500ms").unwrap(),
            Duration::from_millis(1500)
        );
        assert!(parse_duration("0s")
            .unwrap_err()
            .contains("greater than zero"));
        assert!(parse_duration("soon").unwrap_err().contains("`soon`"));
        assert_eq!(parse_drain_timeout("0s").unwrap(), Duration::ZERO);
        assert!(parse_drain_timeout("later")
            .unwrap_err()
            .contains("`later`"));
    }

    #[test]
    fn durations_print_as_an_operator_writes_them() {
        for (duration, text) in [
            (Duration::ZERO, "0s"),
            (Duration::from_millis(500), "500ms"),
            (Duration::from_secs(30), "30s"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_secs(300), "5m"),
            (Duration::from_secs(7200), "2h"),
            (Duration::from_micros(250), "250µs"),
        ] {
            assert_eq!(Human(duration).to_string(), text);
        }
    }
}
