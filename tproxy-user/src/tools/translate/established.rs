//! Rules that hand established flows their socket other than by the socket match's divert
//! chain, built into tproxy like that chain where the kernel does the same.
//!
//! - `-m socket -j MARK` without a divert chain (Envoy's transparent-proxy guide): the
//!   packets go on, marked. Those a TPROXY rule takes are handed to their socket by its own
//!   lookup of established flows; the others leave with the mark, which the TPROXY rules'
//!   policy routing delivers locally, to their socket. Both are what tproxy's built-in socket
//!   match does, unless a later rule looks at the mark or drops them.
//! - `-m conntrack --ctstate RELATED,ESTABLISHED -j DIVERT`, the chain only setting the mark
//!   and accepting (istio): the flows conntrack has seen both ways are delivered locally. One
//!   with a socket reaches it, as tproxy's socket match has it; one without (the replies of
//!   a forwarded flow, say) reaches no socket. tproxy hands those on, so the two agree only
//!   where a later TPROXY rule takes all of them (its listener, like the local delivery,
//!   opens no connection for them), or a later bypass is of loopback destinations, delivered
//!   locally either way.
//!
//! Either way the mark must be the TPROXY rules' own, the one their policy routing delivers
//! locally. For UDP, tproxy's socket match hands a datagram only to its own flows' sockets
//! (a lookup by the datagram's tuple also finds sockets bound to the wildcard address, which
//! the kernel's socket match skips). The MARK form is translated for UDP too: the sockets it
//! finds there are the replaced proxy's own, whose place tproxy's relay takes, and a note says
//! what differs (another program's socket bound to a flow's destination). The conntrack form
//! stays TCP only: its UDP flows without a socket would differ for every reply.

use ipnet::IpNet;

use super::{
    flatten::Flat,
    precedence::{covers, overlaps},
    Established, Match, Parsed, Target,
};
use crate::values::{Mark, Transport};

/// `flat` with each [`Established`] rule made the built-in socket match where it is one, or
/// why it is not.
pub(super) fn resolve(flat: Vec<Flat>, notes: &mut Vec<String>) -> Vec<Flat> {
    let tproxy_marks: Vec<Option<Mark>> = flat
        .iter()
        .flatten()
        .filter_map(|rule| match rule.target {
            Target::Tproxy { mark, .. } => Some(mark),
            _ => None,
        })
        .collect();
    let mut out = Vec::with_capacity(flat.len());
    for (i, rule) in flat.iter().enumerate() {
        let (rule, kind) = match rule {
            Ok(
                rule @ Parsed {
                    target: Target::Established(kind),
                    ..
                },
            ) => (rule, *kind),
            other => {
                out.push(other.clone());
                continue;
            }
        };
        let checked = socket_match(&rule.matches, kind, &tproxy_marks).and_then(|()| match kind {
            Established::SocketMark(_) => goes_on(&rule.matches, &flat[i + 1..]),
            Established::Conntrack(_) => taken_later(&rule.matches, &flat[i + 1..]),
        });
        out.push(match checked {
            Ok(()) => {
                let mut note = match kind {
                    Established::SocketMark(_) => format!(
                        "line {}: `{}`: the packets it marks go on; those of flows with a \
                         socket still reach it (a TPROXY rule's own lookup of established \
                         flows, or the mark's policy routing), as with tproxy's built-in \
                         socket match",
                        rule.line, rule.text
                    ),
                    Established::Conntrack(_) => format!(
                        "line {}: `{}`: conntrack's established flows are delivered locally, to \
                         their socket; every one meets a TPROXY rule after it, which takes \
                         those without a socket: tproxy's built-in socket match does the same",
                        rule.line, rule.text
                    ),
                };
                if rule.matches.transports.contains(&Transport::Udp) {
                    note += "; for UDP, tproxy's socket match hands a datagram only to its own \
                             flows' sockets: a socket of another program bound to a flow's \
                             destination (which the kernel's socket match finds) does not get \
                             its datagrams. Here those were the proxy's, whose place tproxy's \
                             relay takes";
                }
                notes.push(note);
                Ok(Parsed {
                    target: Target::SocketDivert,
                    ..rule.clone()
                })
            }
            Err(reason) => Err(format!("line {}: {}: {reason}", rule.line, rule.text)),
        });
    }
    out
}

/// Whether the rule stands for tproxy's socket match: with the TPROXY rules' mark, and for
/// conntrack's flows only TCP.
fn socket_match(m: &Match, kind: Established, tproxy_marks: &[Option<Mark>]) -> Result<(), String> {
    let (Established::SocketMark(mark) | Established::Conntrack(mark)) = kind;
    if matches!(kind, Established::Conntrack(_)) && m.transports != [Transport::Tcp] {
        return Err(
            "handing established flows their socket for other protocols than TCP (tproxy's \
             socket match counts only its own UDP flows' sockets)"
                .into(),
        );
    }
    if tproxy_marks.is_empty() || tproxy_marks.iter().any(Option::is_none) {
        return Err(format!(
            "it sets the mark {mark}, and not every TPROXY rule sets one (--tproxy-mark) to \
             tell whether policy routing delivers it locally"
        ));
    }
    for routing in tproxy_marks.iter().flatten() {
        if routing.mask & !mark.mask != 0 || mark.value & routing.mask != routing.value {
            return Err(format!(
                "it sets the mark {mark}, not the TPROXY rules' {routing}, so policy routing \
                 may not deliver its packets to their socket"
            ));
        }
    }
    Ok(())
}

/// For `-m socket -j MARK`: whether the rules after it treat its packets, marked, as they
/// would unmarked, and drop none of them.
fn goes_on(m: &Match, later: &[Flat]) -> Result<(), String> {
    for rule in later {
        let Ok(rule) = rule else {
            return Err(
                "its packets go on, marked, to a rule that cannot be translated, which may \
                 look at the mark"
                    .into(),
            );
        };
        if !overlaps(m, &rule.matches) {
            continue;
        }
        if rule.matches.mark.is_some() || !rule.matches.not_marks.is_empty() {
            return Err(format!(
                "its packets go on with the mark it sets, and line {} matches marks",
                rule.line
            ));
        }
        if matches!(
            rule.target,
            Target::Drop
                | Target::Deliver
                | Target::Reject(_)
                | Target::SetMark(_)
                | Target::MarkThenAccept(_)
        ) {
            return Err(format!(
                "its packets go on to line {}, which drops or marks them (tproxy hands a flow's \
                 packets to its socket first)",
                rule.line
            ));
        }
    }
    Ok(())
}

/// For conntrack's established flows: whether a TPROXY rule after it takes all of them,
/// with at most bypass rules for loopback destinations ahead of it.
fn taken_later(m: &Match, later: &[Flat]) -> Result<(), String> {
    let loopback = |prefix: &IpNet| match prefix {
        IpNet::V4(net) => net.addr().is_loopback() && net.prefix_len() >= 8,
        IpNet::V6(net) => net.addr().is_loopback() && net.prefix_len() == 128,
    };
    for rule in later {
        let Ok(rule) = rule else {
            return Err(
                "its flows go on to a rule that cannot be translated: what that does with \
                 them is unknown"
                    .into(),
            );
        };
        if !overlaps(m, &rule.matches) {
            continue;
        }
        let r = &rule.matches;
        match rule.target {
            Target::Tproxy { .. }
                if r.not_src.is_empty()
                    && r.not_iface.is_empty()
                    && r.not_dst.iter().all(loopback)
                    && covers(r, m) =>
            {
                return Ok(())
            }
            Target::Tproxy { .. }
            | Target::Unsteered(_)
            | Target::Ignore
            | Target::SocketDivert
            | Target::Established(_) => {}
            Target::Bypass | Target::Return | Target::Reject(_)
                if r.dst_local || (!r.dst.is_empty() && r.dst.iter().all(loopback)) => {}
            _ => {
                return Err(format!(
                    "line {} takes some of its flows first; the divert chain delivers them \
                     locally, where one without a socket reaches none, and tproxy would hand \
                     those on",
                    rule.line
                ))
            }
        }
    }
    Err(
        "some of its flows meet no TPROXY rule after it; the divert chain delivers them \
         locally, where one without a socket reaches none, and tproxy would hand those on"
            .into(),
    )
}
