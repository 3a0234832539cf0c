//! Kernel ipsets that rules name (`dst = "ipset:NAME"`): their entries, read over netlink
//! (`NETLINK_NETFILTER`, the ipset subsystem's `IPSET_CMD_LIST`, what `ipset list` asks),
//! as the prefixes the rules are put in force for (see `Config::set_ipset_entries`).
//!
//! Only the set types whose entries are addresses or prefixes are read: `hash:ip` (with or
//! without `netmask`) and `hash:net`. Entries marked `nomatch` (exceptions inside a larger
//! entry) are refused: a prefix rule cannot leave a hole.

use anyhow::{bail, Context, Result};
use ipnet::IpNet;
use netlink_packet_core::{NetlinkBuffer, NlaBuffer, NlasIterator, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket};
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

/// How often the followed sets are read. An entry added just now (dnsmasq adds one as it
/// answers the query) is in force within this time: the first packets to a name just
/// resolved may go by unsteered until then. A read is one netlink dump (`ipset list` of a
/// set of 20000 entries, which asks the kernel the same, takes 22 ms with its own start);
/// the timer runs only when rules follow a set (a timer running while serving costs the
/// relays' round trips some microseconds, see `daemon::serve`).
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The set types tproxy reads, as `ipset` names them.
pub const SUPPORTED_TYPES: &[&str] = &["hash:ip", "hash:net"];

const NFNL_SUBSYS_IPSET: u16 = 6;
const IPSET_CMD_LIST: u16 = 7;
/// The protocol version spoken; kernels since 3.x accept 6 and 7 for listing.
const IPSET_PROTOCOL: u8 = 7;

const IPSET_ATTR_PROTOCOL: u16 = 1;
const IPSET_ATTR_SETNAME: u16 = 2;
const IPSET_ATTR_TYPENAME: u16 = 3;
const IPSET_ATTR_FAMILY: u16 = 5;
const IPSET_ATTR_DATA: u16 = 7;
const IPSET_ATTR_ADT: u16 = 8;
// Inside IPSET_ATTR_DATA.
const IPSET_ATTR_IP: u16 = 1;
const IPSET_ATTR_CIDR: u16 = 3;
const IPSET_ATTR_CADT_FLAGS: u16 = 8;
const IPSET_ATTR_NETMASK: u16 = 20;
// Inside IPSET_ATTR_IP.
const IPSET_ATTR_IPADDR_IPV4: u16 = 1;
const IPSET_ATTR_IPADDR_IPV6: u16 = 2;
const IPSET_FLAG_NOMATCH: u32 = 1 << 2;

const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

/// The entries of the kernel ipset `name` in this network namespace, as prefixes (sorted,
/// without duplicates); an error names the set and says why it cannot be read.
pub fn set_prefixes(name: &str) -> Result<Vec<IpNet>> {
    read(name).with_context(|| format!("reading ipset {name}"))
}

fn read(name: &str) -> Result<Vec<IpNet>> {
    let mut socket =
        Socket::new(NETLINK_NETFILTER).context("opening a netfilter netlink socket")?;
    socket.bind_auto().context("binding the netfilter socket")?;
    socket
        .connect(&netlink_sys::SocketAddr::new(0, 0))
        .context("connecting the netfilter socket")?;
    socket
        .send(&list_request(name)?, 0)
        .context("sending the ipset list request")?;
    let mut listing = Listing::default();
    let mut received = Vec::with_capacity(64 * 1024);
    loop {
        received.clear();
        let size = socket
            .recv(&mut received, 0)
            .context("reading the ipset listing")?;
        if listing.read_messages(&received[..size])? {
            break;
        }
    }
    listing.prefixes()
}

/// The `IPSET_CMD_LIST` dump request for set `name`.
fn list_request(name: &str) -> Result<Vec<u8>> {
    // IPSET_MAXNAMELEN is 32 with the terminating NUL.
    if name.is_empty() || name.len() > 31 || name.contains('\0') {
        bail!("`{name}` is not an ipset name (1 to 31 bytes)");
    }
    let mut setname = name.as_bytes().to_vec();
    setname.push(0);
    // nfgenmsg: family, version (NFNETLINK_V0), resource id.
    let mut payload = vec![NFPROTO_IPV4, 0, 0, 0];
    push_attribute(&mut payload, IPSET_ATTR_PROTOCOL, &[IPSET_PROTOCOL]);
    push_attribute(&mut payload, IPSET_ATTR_SETNAME, &setname);
    let length = 16 + payload.len();
    let mut message = vec![0u8; length];
    let mut buffer = NetlinkBuffer::new(&mut message[..]);
    buffer.set_length(length as u32);
    buffer.set_message_type(NFNL_SUBSYS_IPSET << 8 | IPSET_CMD_LIST);
    buffer.set_flags(NLM_F_REQUEST | NLM_F_DUMP);
    buffer.set_sequence_number(1);
    buffer.payload_mut().copy_from_slice(&payload);
    Ok(message)
}

fn push_attribute(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let length = 4 + value.len();
    out.extend_from_slice(&(length as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(out.len() + (4 - length % 4) % 4, 0);
}

/// A set's listing as its messages arrive.
#[derive(Debug, Default)]
struct Listing {
    type_name: Option<String>,
    family: Option<u8>,
    /// `hash:ip`'s `netmask`: each entry stands for the prefix of this length.
    netmask: Option<u8>,
    prefixes: Vec<IpNet>,
}

impl Listing {
    /// Reads one datagram's messages; returns whether the listing is complete.
    fn read_messages(&mut self, mut data: &[u8]) -> Result<bool> {
        while !data.is_empty() {
            let message =
                NetlinkBuffer::new_checked(data).context("a malformed netlink message")?;
            let length = (message.length() as usize).min(data.len());
            match message.message_type() {
                NLMSG_DONE => return Ok(true),
                NLMSG_ERROR => {
                    let code = message
                        .payload()
                        .get(..4)
                        .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
                        .context("a truncated netlink error")?;
                    match -code {
                        0 => return Ok(true),
                        libc::ENOENT => bail!("no such set (create it with `ipset create`)"),
                        errno => {
                            return Err(std::io::Error::from_raw_os_error(errno))
                                .context("the kernel refused to list it")
                        }
                    }
                }
                kind if kind == NFNL_SUBSYS_IPSET << 8 | IPSET_CMD_LIST => {
                    // After the 4 bytes of nfgenmsg.
                    let attributes = message.payload().get(4..).unwrap_or_default();
                    self.read_set(attributes)?;
                }
                _ => {}
            }
            // The last message of a datagram may end unpadded.
            data = &data[nla_align(length.max(16)).min(data.len())..];
        }
        Ok(false)
    }

    /// One message's attributes: the set's type and family, its header, its entries.
    fn read_set(&mut self, attributes: &[u8]) -> Result<()> {
        for attribute in NlasIterator::new(attributes) {
            let attribute = attribute.context("a malformed ipset attribute")?;
            let value = attribute.value();
            match attribute.kind() & KIND_MASK {
                IPSET_ATTR_TYPENAME => {
                    let type_name = String::from_utf8_lossy(value)
                        .trim_end_matches('\0')
                        .to_string();
                    if !SUPPORTED_TYPES.contains(&type_name.as_str()) {
                        bail!(
                            "it is of type {type_name}; tproxy reads sets of type {}",
                            SUPPORTED_TYPES.join(" and ")
                        );
                    }
                    self.type_name = Some(type_name);
                }
                IPSET_ATTR_FAMILY => self.family = value.first().copied(),
                IPSET_ATTR_DATA => {
                    for header in NlasIterator::new(value) {
                        let header = header.context("a malformed ipset header")?;
                        if header.kind() & KIND_MASK == IPSET_ATTR_NETMASK {
                            self.netmask = header.value().first().copied();
                        }
                    }
                }
                IPSET_ATTR_ADT => {
                    if self.type_name.is_none() {
                        bail!("its entries came before its type");
                    }
                    for entry in NlasIterator::new(value) {
                        let entry = entry.context("a malformed ipset entry")?;
                        let prefix = self.entry(entry.value())?;
                        self.prefixes.push(prefix);
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// One entry's prefix: its address, with its `cidr` or the set's `netmask`.
    fn entry(&self, attributes: &[u8]) -> Result<IpNet> {
        let mut address = None;
        let mut length = None;
        for attribute in NlasIterator::new(attributes) {
            let attribute = attribute.context("a malformed ipset entry attribute")?;
            let value = attribute.value();
            match attribute.kind() & KIND_MASK {
                IPSET_ATTR_IP => address = Some(ip_address(value)?),
                IPSET_ATTR_CIDR => length = value.first().copied(),
                IPSET_ATTR_CADT_FLAGS if value.len() >= 4 => {
                    let flags = u32::from_be_bytes(value[..4].try_into().expect("4 bytes"));
                    if flags & IPSET_FLAG_NOMATCH != 0 {
                        bail!(
                            "it has `nomatch` entries (exceptions inside other entries), which \
                             tproxy's prefix rules cannot express"
                        );
                    }
                }
                _ => {}
            }
        }
        let address = address.context("an entry without an address")?;
        let length = length.or(self.netmask).unwrap_or(match address {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        });
        IpNet::new(address, length)
            .map(|prefix| prefix.trunc())
            .with_context(|| format!("an entry {address}/{length} of no valid length"))
    }

    /// The prefixes, sorted and without duplicates, once the listing is complete.
    fn prefixes(mut self) -> Result<Vec<IpNet>> {
        if self.type_name.is_none() {
            bail!("the kernel listed no set");
        }
        if !matches!(self.family, Some(NFPROTO_IPV4 | NFPROTO_IPV6)) {
            bail!("it is of an address family other than inet and inet6");
        }
        self.prefixes.sort_unstable();
        self.prefixes.dedup();
        Ok(self.prefixes)
    }
}

/// An attribute's type without the nested and byte order flags.
const KIND_MASK: u16 = 0x3fff;

fn nla_align(length: usize) -> usize {
    (length + 3) & !3
}

/// The address in an `IPSET_ATTR_IP` (nested, in network byte order).
fn ip_address(nested: &[u8]) -> Result<IpAddr> {
    for attribute in NlasIterator::new(nested) {
        let attribute: NlaBuffer<&[u8]> = attribute.context("a malformed ipset address")?;
        let value = attribute.value();
        match (attribute.kind() & KIND_MASK, value.len()) {
            (IPSET_ATTR_IPADDR_IPV4, 4) => {
                let octets: [u8; 4] = value.try_into().expect("4 bytes");
                return Ok(IpAddr::V4(Ipv4Addr::from(octets)));
            }
            (IPSET_ATTR_IPADDR_IPV6, 16) => {
                let octets: [u8; 16] = value.try_into().expect("16 bytes");
                return Ok(IpAddr::V6(Ipv6Addr::from(octets)));
            }
            _ => {}
        }
    }
    bail!("an entry address of neither IPv4 nor IPv6")
}

#[cfg(test)]
mod tests {
    //! The listings below are what the kernel (6.x, `ipset` 7.17's protocol) answered this
    //! module's request with, captured in a network namespace after:
    //! `ipset create gfw hash:net; ipset add gfw 8.8.8.0/24; ipset add gfw 1.1.1.1;
    //! ipset add gfw 10.0.0.0/8 nomatch; ipset create hosts hash:ip family inet6;
    //! ipset add hosts 2001:db8::1; ipset create masked hash:ip netmask 24;
    //! ipset add masked 192.0.2.77; ipset create ports hash:net,port; ipset create empty
    //! hash:net`, and for a set that does not exist.
    use super::*;

    const GFW: &str = "dc0000000706020001000000a913000002000000050001000700000008000200676677000d000300686173683a6e6574000000000500050002000000050004000700000006000b40000000003c00078008001240000004000800134000010000050015000c00000008001140b3f09da5080019400000000008001a4000000258080018400000000354000880180007800c00018008000100010101010500030020000000200007800c000180080001000a00000005000300080000000800084000000004180007800c00018008000100080808000500030018000000140000000300020001000000a913000000000000";
    const HOSTS: &str = "a80000000706020001000000d21300000200000005000100070000000a000200686f7374730000000c000300686173683a697000050005000a000000050004000600000006000b40000100003c00078008001240000004000800134000010000050015000c00000008001140cd3b818f080019400000000008001a40000001200800184000000001200008801c000780180001801400020020010db8000000000000000000000001140000000300020001000000d213000000000000";
    const MASKED: &str = "a40000000706020001000000fb1300000200000005000100070000000b0002006d61736b656400000c000300686173683a6970000500050002000000050004000600000006000b400002000044000780080012400000040008001340000100000500140018000000050015000c000000080011408fe6bc31080019400000000008001a4000000100080018400000000114000880100007800c00018008000100c0000200140000000300020001000000fb13000000000000";
    const PORTS: &str = "940000000706020001000000241400000200000005000100070000000a000200706f72747300000012000300686173683a6e65742c706f72740000000500050002000000050004000800000006000b40000300003c00078008001240000004000800134000010000050015000c0000000800114004fca1e0080019400000000008001a40000001c80800184000000000040008801400000003000200010000002414000000000000";
    const EMPTY: &str = "9000000007060200010000004d1400000200000005000100070000000a000200656d7074790000000d000300686173683a6e6574000000000500050002000000050004000700000006000b40000400003c00078008001240000004000800134000010000050015000c0000000800114062389d9d080019400000000008001a40000001c80800184000000000040008801400000003000200010000004d14000000000000";
    const MISSING: &str = "3c000000020000000100000078140000feffffff280000000706010301000000000000000200000005000100070000000c0002006d697373696e6700";

    fn bytes(hex: &str) -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    fn listed(hex: &str) -> Result<Vec<IpNet>> {
        let mut listing = Listing::default();
        assert!(listing.read_messages(&bytes(hex))?, "the listing ends");
        listing.prefixes()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|p| p.parse().unwrap()).collect()
    }

    #[test]
    fn the_request_is_the_captures() {
        // The request the capture sent (built by hand, byte for byte).
        let request = list_request("gfw").unwrap();
        assert_eq!(
            request,
            bytes("240000000706010301000000000000000200000005000100070000000800020067667700")
        );
        assert!(list_request("").is_err());
        assert!(list_request(&"x".repeat(32)).is_err());
    }

    #[test]
    fn hash_ip_entries_are_full_length_or_the_netmask() {
        assert_eq!(listed(HOSTS).unwrap(), nets(&["2001:db8::1/128"]));
        assert_eq!(listed(MASKED).unwrap(), nets(&["192.0.2.0/24"]));
        assert_eq!(listed(EMPTY).unwrap(), Vec::<IpNet>::new());
    }

    #[test]
    fn nomatch_entries_other_types_and_missing_sets_are_refused() {
        let nomatch = listed(GFW).unwrap_err().to_string();
        assert!(nomatch.contains("nomatch"), "{nomatch}");
        let ports = listed(PORTS).unwrap_err().to_string();
        assert!(
            ports.contains("hash:net,port") && ports.contains("hash:ip and hash:net"),
            "{ports}"
        );
        let mut listing = Listing::default();
        let missing = listing.read_messages(&bytes(MISSING)).unwrap_err();
        assert!(missing.to_string().contains("no such set"), "{missing}");
    }

    #[test]
    fn a_datagram_cut_short_or_ending_unpadded_is_no_panic() {
        let whole = bytes(EMPTY);
        for end in 0..whole.len() {
            let mut listing = Listing::default();
            let _ = listing.read_messages(&whole[..end]);
        }
        // A message of another type, 17 bytes long and unpadded, last in the datagram.
        let mut unpadded = bytes(EMPTY);
        unpadded.truncate(0x90);
        unpadded.extend_from_slice(&bytes("110000000100000001000000000000000a"));
        let mut listing = Listing::default();
        assert!(!listing.read_messages(&unpadded).unwrap(), "not done yet");
    }

    #[test]
    fn hash_net_entries_keep_their_length() {
        // GFW without its nomatch entry: the second entry's CADT_FLAGS cleared.
        let mut data = bytes(GFW);
        let flags = bytes("0800084000000004");
        let at = data
            .windows(flags.len())
            .position(|w| w == flags.as_slice())
            .unwrap();
        data[at + 7] = 0;
        let mut listing = Listing::default();
        assert!(listing.read_messages(&data).unwrap());
        assert_eq!(
            listing.prefixes().unwrap(),
            nets(&["1.1.1.1/32", "8.8.8.0/24", "10.0.0.0/8"])
        );
    }
}
