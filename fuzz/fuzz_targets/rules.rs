//! Differential: for rule sets and packets built from the input, the compiled maps, looked
//! up the way the eBPF program does, give the answer of the definition (the first matching
//! rule in precedence order).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tproxy_common::local_origin::LOCAL_ORIGIN_IFINDEX;
use tproxy_user::{
    datapath::rules::{
        any_local, compile, decide, lookup, retire, Action, CtDirection, Origin, Packet, Ports, Protocol, Rule,
    },
    values::Mark,
};

const IFACES: [&str; 2] = ["eth0", "eth1"];

/// Reads values from the input, cycling when it runs out.
struct Bytes<'a>(&'a [u8], usize);

impl Bytes<'_> {
    fn next(&mut self) -> u8 {
        let byte = self.0.get(self.1 % self.0.len().max(1)).copied().unwrap_or(0);
        self.1 += 1;
        byte
    }
    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.next() as usize % from.len()]
    }
}

fn prefix(bytes: &mut Bytes<'_>, v6: bool) -> ipnet::IpNet {
    // Few distinct addresses so that rules and packets overlap often.
    let host = bytes.pick(&[1u8, 2, 3, 130]);
    let len = bytes.pick(&[0u8, 8, 16, 24, 25, 32]);
    let text = if v6 {
        format!("2001:db8::{host}/{}", len as u32 * 4)
    } else {
        format!("10.1.2.{host}/{len}")
    };
    text.parse::<ipnet::IpNet>().unwrap().trunc()
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let mut bytes = Bytes(data, 0);
    let count = 1 + bytes.next() as usize % 10;
    let mut rules: Vec<Rule> = (0..count)
        .map(|i| {
            let v6 = bytes.next() % 4 == 0;
            let ports = match bytes.next() % 4 {
                0 => Ports::One(bytes.pick(&[80, 81, 443])),
                1 => Ports::Range(70, bytes.pick(&[80, 90, 500])),
                2 => Ports::Range(bytes.pick(&[80, 400]), 1000),
                _ => Ports::Any,
            };
            let flags = bytes.next();
            Rule {
                protocol: bytes.pick(&[Protocol::Tcp, Protocol::Udp, Protocol::Other]),
                dst: prefix(&mut bytes, v6),
                ports,
                sport: (bytes.next() % 4 == 0).then(|| bytes.pick(&[Ports::One(7777), Ports::Range(1000, 2000)])),
                src: (flags & 1 != 0).then(|| prefix(&mut bytes, v6)),
                iface: (flags & 2 != 0).then(|| bytes.pick(&IFACES).to_string()),
                mark: (flags & 16 != 0).then(|| {
                    bytes.pick(&[Mark { value: 0x10, mask: 0xf0 }, Mark { value: 0, mask: 0xff }])
                }),
                action: match (flags & 4 != 0, flags & 128 != 0, flags & 64 != 0) {
                    (true, false, _) => Action::Bypass,
                    (true, true, false) if flags & 32 != 0 => Action::Reject,
                    (true, true, false) => Action::Drop,
                    (true, true, true) => Action::Deliver,
                    (false, ..) => Action::Steer(u32::from(flags >> 5)),
                },
                number: i + 1,
                retired: flags & 8 != 0,
                // Local rules name no source or interface (the configuration refuses them).
                origin: match (flags & 3, bytes.next() % 3) {
                    (0, 1) => Origin::Local,
                    (0, 2) => Origin::Any,
                    _ => Origin::Forwarded,
                },
                // Three selections: every process, and two others.
                selection: u32::from(bytes.next() % 3),
                out_iface: None,
                ct_direction: (bytes.next() % 5 == 0).then(|| bytes.pick(&[CtDirection::Original, CtDirection::Reply])),
            }
        })
        .collect();
    // Refused: a rule for other protocols with what only TCP and UDP have, or that steers,
    // delivers, rejects or is for local connections.
    for rule in rules.iter_mut().filter(|rule| rule.protocol == Protocol::Other) {
        rule.ports = Ports::Any;
        rule.sport = None;
        rule.mark = None;
        rule.ct_direction = None;
        rule.origin = Origin::Forwarded;
        if matches!(rule.action, Action::Steer(_) | Action::Deliver | Action::Reject) {
            rule.action = Action::Drop;
        }
    }
    // Left out: a local rule's mark (the socket's, tested apart); refused: a local rule
    // that drops, rejects or delivers. A local rule's source port is the socket's bound one.
    for rule in rules.iter_mut().filter(|rule| rule.origin.local()) {
        rule.mark = None;
        if matches!(rule.action, Action::Drop | Action::Deliver | Action::Reject) {
            rule.action = Action::Bypass;
        }
        // An out_interface makes a selection of its own (3, 4, 5: the processes of 0 through
        // each name). Not on retired rules: `retire` keeps no rule for local connections only
        // (see below).
        if rule.origin == Origin::Local && !rule.retired {
            let names = ["eth0", "eth*", "wg0"];
            let via = bytes.next() as usize % (names.len() + 2);
            if let Some(name) = names.get(via) {
                rule.out_iface = Some(name.to_string());
                rule.selection = 3 + via as u32;
            }
        }
    }
    // Retired rules as a reload retires them: their part for arrivals.
    let rules: Vec<Rule> = rules
        .into_iter()
        .map(|rule| match rule.retired {
            true => retire(std::slice::from_ref(&rule), &[]).pop().unwrap_or(Rule { retired: false, ..rule }),
            false => rule,
        })
        .collect();
    let interfaces: Vec<(String, u32)> = IFACES.iter().zip(2..).map(|(n, i)| (n.to_string(), i)).collect();
    let generation = u32::from(bytes.next() & 1);
    let compiled = compile(&rules, generation, &interfaces);
    for _ in 0..8 {
        let v6 = bytes.next() % 4 == 0;
        let addr = |bytes: &mut Bytes<'_>| -> std::net::IpAddr {
            let host = bytes.pick(&[1u8, 2, 3, 130, 200]);
            if v6 { format!("2001:db8::{host}").parse().unwrap() } else { format!("10.1.2.{host}").parse().unwrap() }
        };
        let iface = bytes.next() as usize % 2;
        let local = any_local(&rules) && bytes.next() % 3 == 0;
        let ifindex = if local { LOCAL_ORIGIN_IFINDEX } else { interfaces[iface].1 };
        let packet = Packet {
            protocol: bytes.pick(&[Protocol::Tcp, Protocol::Udp, Protocol::Other]),
            src: addr(&mut bytes),
            dst: addr(&mut bytes),
            port: bytes.pick(&[0, 70, 80, 81, 90, 443, 999, 1000, 1001]),
            // A local connection's: its bound port, 0 while unbound.
            sport: if local { bytes.pick(&[0, 0, 999, 2000, 7777]) } else { bytes.pick(&[0, 999, 1000, 1500, 2000, 7777, 40000]) },
            local,
            // Every process's selection always, and those through an out_interface; the
            // others as the process is in them.
            selections: 0b111001 | (u32::from(bytes.next()) & 6),
            iface: IFACES[iface],
            mark: bytes.pick(&[0, 0x10, 0x20, 0x1f0]),
            route: if local { bytes.pick(&[None, Some("eth0"), Some("eth1"), Some("wg0"), Some("lo")]) } else { None },
            // The tc program looks an arrival's direction up, the local programs follow a
            // datagram's: one or the other.
            ct_direction: Some(bytes.pick(&[CtDirection::Original, CtDirection::Reply])),
        };
        assert_eq!(
            lookup(&compiled, generation, &packet, ifindex),
            decide(&rules, &packet),
            "{packet:?} with {rules:#?}"
        );
    }
});
