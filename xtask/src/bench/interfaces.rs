//! Interfaces in the benchmark, on the same client → router → server topology re-plumbed:
//!
//! - A bridge: the router's client-facing veth is a port of a Linux bridge that holds the
//!   router's address, as a container host's docker0 or br-<id> holds the containers'
//!   gateway. Forwarding over the bridge against tproxy steering on it (`--iface BRIDGE`).
//! - Many interfaces: the client-facing veth is `veth0`, beside 99 more veths, as on a host
//!   running 100 containers. tproxy attached to the one carrying the traffic (`--iface
//!   veth0`) against attached to all of them by pattern (`--iface 'veth*'`); and the time
//!   to follow 99 veths that appear after start.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use tproxy_tests::{Netns, RouterTopology as Topo, Tproxy};

use super::{
    connection_rate, fresh_topology, iperf, latency, median_and_spread, output_of, status_kib,
    write_cell, Servers, HTTP_PORT, IDLE_CONNECTIONS, IPERF_PORT, SOCKPERF_PORT,
};

const BRIDGE: &str = "br-bench";
/// The router's client-facing veth in the many-interfaces cases.
const CLIENT_VETH: &str = "veth0";
const PATTERN: &str = "veth*";
/// Veths besides [`CLIENT_VETH`] matching [`PATTERN`].
const OTHER_VETHS: usize = 99;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Case {
    /// Forwarding over the bridge, nothing attached.
    BridgeDirect,
    /// tproxy steering on the bridge (`--iface br-bench`), relay splice.
    BridgeEbpf,
    /// 100 veths, tproxy attached to the one with the traffic.
    OneAttached,
    /// 100 veths, tproxy attached to all by pattern.
    HundredAttached,
}

impl Case {
    fn label(self) -> &'static str {
        match self {
            Case::BridgeDirect => "direct over the bridge (forwarding only)",
            Case::BridgeEbpf => "eBPF + tproxy relay on the bridge",
            Case::OneAttached => "`--iface veth0`: 1 attached",
            Case::HundredAttached => "`--iface 'veth*'`: 100 attached",
        }
    }
}

/// A metric's name and unit in the report.
type Metric = (&'static str, &'static str);

const THROUGHPUT: Metric = ("TCP throughput, 1 stream", "Gbit/s");
const CONNECTIONS: Metric = ("new connections/s (HTTP, no keep-alive)", "conn/s");
const P50: Metric = ("request/response latency p50", "µs");
const P99: Metric = ("request/response latency p99", "µs");
const READY: Metric = ("`tproxy run` start to ready", "s");
const RESIDENT: Metric = ("resident memory at ready", "MiB");
const FOLLOW: Metric = ("99 veths created after start, until all attached", "s");

/// Metric → case → one value per round.
#[derive(Default)]
pub(super) struct Samples(BTreeMap<Metric, BTreeMap<Case, Vec<f64>>>);

impl Samples {
    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn record(&mut self, metric: Metric, case: Case, value: f64) {
        let by_case = self.0.entry(metric).or_default();
        by_case.entry(case).or_default().push(value);
    }
}

/// One round of every case.
pub(super) fn round(samples: &mut Samples, round: usize, rounds: usize) -> Result<()> {
    for case in [Case::BridgeDirect, Case::BridgeEbpf] {
        println!("bench: round {round}/{rounds}: {}", case.label());
        let (topo, _servers) = bridged_topology()?;
        let mut tproxy = match case {
            Case::BridgeEbpf => Some(start_tproxy(&topo.router, BRIDGE)?),
            _ => None,
        };
        samples.record(THROUGHPUT, case, iperf(&topo, IPERF_PORT, 1)?.0);
        measure_connections(samples, &topo, case)?;
        if let Some(tproxy) = &mut tproxy {
            tproxy.stop()?;
        }
    }
    for (case, iface, attached) in [
        (Case::OneAttached, CLIENT_VETH, 1),
        (Case::HundredAttached, PATTERN, OTHER_VETHS + 1),
    ] {
        println!("bench: round {round}/{rounds}: {}", case.label());
        let (topo, _servers) = veth_topology()?;
        add_other_veths(&topo.router)?;
        let start = Instant::now();
        let mut tproxy = start_tproxy(&topo.router, iface)?;
        samples.record(READY, case, start.elapsed().as_secs_f64());
        let resident = status_kib(tproxy.pid(), "VmRSS:")?;
        samples.record(RESIDENT, case, resident as f64 / 1024.0);
        let status = tproxy.status()?;
        ensure!(
            status.attached.len() == attached,
            "{}: attached to {:?}",
            case.label(),
            status.attached
        );
        measure_connections(samples, &topo, case)?;
        tproxy.stop()?;
    }
    println!("bench: round {round}/{rounds}: {}", FOLLOW.0);
    let (topo, _servers) = veth_topology()?;
    let mut tproxy = start_tproxy(&topo.router, PATTERN)?;
    let start = Instant::now();
    add_other_veths(&topo.router)?;
    for _ in 0..OTHER_VETHS {
        tproxy.wait_for_line("attached to veth", Duration::from_secs(60))?;
    }
    samples.record(FOLLOW, Case::HundredAttached, start.elapsed().as_secs_f64());
    tproxy.stop()
}

/// `cargo xtask bench --interfaces-only`: only these cases; their section of
/// bench/results.md and key of bench/results.json are replaced, the rest is kept.
pub fn run_only(binary: &Path, rounds: usize) -> Result<()> {
    crate::require_root("the benchmark creates network namespaces and attaches BPF programs")?;
    crate::setup::install_commands(super::PACKAGES)?;
    std::env::set_var("TPROXY_BIN", binary);
    let mut samples = Samples::default();
    for round_number in 1..=rounds {
        round(&mut samples, round_number, rounds)?;
    }
    let date = output_of("date", &["-u", "+%Y-%m-%d %H:%M UTC"])?;
    let command = format!("`cargo xtask bench --interfaces-only --rounds {rounds}` ({date})");
    let (section, json_section) = report(&samples, Some(command.as_str()))?;
    record_section(&section, replace_section, JSON_KEY, &json_section)?;
    println!("\n{section}\nwritten to bench/results.md, bench/results.json");
    Ok(())
}

const HEADING: &str = "\n## Interfaces\n";
/// The key of these results in bench/results.json.
pub(super) const JSON_KEY: &str = "interfaces";

/// `json` (an object as `serde_json::to_string_pretty` writes it) with the entry `key` set
/// to `value`, the other entries kept as text: parsing and printing them again would
/// change the last digits of some numbers. Entries stay in key order, as serde_json's map
/// keeps them.
/// Writes one group of cases' results: `section` in bench/results.md, in place of its old
/// one (`replace`), and `value` under `key` in bench/results.json; the rest of both files is
/// kept as it is.
pub(super) fn record_section(
    section: &str,
    replace: fn(&str, &str) -> String,
    key: &str,
    value: &Value,
) -> Result<()> {
    let dir = crate::workspace_root().join("bench");
    fs::create_dir_all(&dir)?;
    let md_path = dir.join("results.md");
    let md = fs::read_to_string(&md_path).unwrap_or_default();
    fs::write(&md_path, replace(&md, section))?;
    let json_path = dir.join("results.json");
    let json = fs::read_to_string(&json_path).unwrap_or_else(|_| "{}".to_string());
    let json = set_json_entry(&json, key, value).context("updating bench/results.json")?;
    fs::write(&json_path, json)?;
    Ok(())
}

fn set_json_entry(json: &str, key: &str, value: &Value) -> Result<String> {
    let body = json
        .trim()
        .strip_prefix('{')
        .and_then(|body| body.strip_suffix('}'))
        .context("not a JSON object")?;
    // Pretty-printed, a line opening with two spaces and a quote starts a top-level entry.
    let mut entries: Vec<(String, String)> = Vec::new();
    for line in body.lines().filter(|line| !line.trim().is_empty()) {
        if let Some(rest) = line.strip_prefix("  \"") {
            let name = rest.split('"').next().unwrap_or_default();
            entries.push((name.to_string(), String::new()));
        }
        let (_, text) = entries
            .last_mut()
            .with_context(|| format!("not pretty-printed JSON: `{line}`"))?;
        text.push_str(line);
        text.push('\n');
    }
    let ours = serde_json::to_string_pretty(&json!({ key: value }))?;
    let ours = ours
        .trim()
        .strip_prefix('{')
        .and_then(|o| o.strip_suffix('}'));
    entries.retain(|(name, _)| name != key);
    entries.push((key.to_string(), ours.unwrap_or_default().to_string()));
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let texts: Vec<&str> = entries
        .iter()
        .map(|(_, text)| text.trim_matches('\n').trim_end_matches(','))
        .collect();
    Ok(format!("{{\n{}\n}}", texts.join(",\n")))
}

/// `md` with its interfaces section (from [`HEADING`] to the next section or the chart)
/// replaced by `section`, or `section` added before the chart if there was none.
fn replace_section(md: &str, section: &str) -> String {
    let next_part = |from: usize| {
        ["\n## ", "\n!["]
            .iter()
            .filter_map(|marker| md[from..].find(marker).map(|at| from + at))
            .min()
            .unwrap_or(md.len())
    };
    let (start, end) = match md.find(HEADING) {
        Some(start) => (start, next_part(start + HEADING.len())),
        None => {
            let chart = md.find("\n![").unwrap_or(md.len());
            (chart, chart)
        }
    };
    format!("{}{section}{}", &md[..start], &md[end..])
}

/// A table of the report.
struct Table {
    /// Its key in the JSON.
    key: &'static str,
    caption: &'static str,
    /// The first is the baseline of the ratios, called `baseline` in them.
    cases: &'static [Case],
    metrics: &'static [Metric],
    baseline: &'static str,
}

/// The interfaces section of the report, as markdown and JSON; `command` names the run
/// when it is not the whole benchmark's.
pub(super) fn report(samples: &Samples, command: Option<&str>) -> Result<(String, Value)> {
    let mut md = HEADING.to_string();
    if let Some(command) = command {
        writeln!(md, "\n{command}: median of the rounds, spread (min–max).")?;
    }
    let tables = [
        Table {
            key: "bridge",
            caption: "Steering on a bridge: the router's client-facing veth is a port of a \
                      Linux bridge holding the router's address (a container host's docker0 \
                      or br-<id>).",
            cases: &[Case::BridgeDirect, Case::BridgeEbpf],
            metrics: &[THROUGHPUT, CONNECTIONS, P50, P99],
            baseline: "direct",
        },
        Table {
            key: "pattern",
            caption: "100 veths on the router (a host with 100 containers), traffic on one \
                      of them.",
            cases: &[Case::OneAttached, Case::HundredAttached],
            metrics: &[CONNECTIONS, P50, P99, READY, RESIDENT, FOLLOW],
            baseline: "1 attached",
        },
    ];
    let mut json_tables = serde_json::Map::new();
    for Table {
        key,
        caption,
        cases,
        metrics,
        baseline,
    } in tables
    {
        write!(md, "\n{caption}\n\n| metric |")?;
        for case in cases {
            write!(md, " {} |", case.label())?;
        }
        writeln!(md, "\n| --- |{}", " --- |".repeat(cases.len()))?;
        let mut json_metrics = Vec::new();
        for metric in metrics {
            let Some(by_case) = samples.0.get(metric) else {
                continue;
            };
            write!(md, "| {} ({}) |", metric.0, metric.1)?;
            let mut json_cases = serde_json::Map::new();
            let base = by_case.get(&cases[0]).map(|v| median_and_spread(v).0);
            for case in cases {
                let Some(values) = by_case.get(case) else {
                    md.push_str(" – |");
                    continue;
                };
                let shown = base.filter(|_| case != &cases[0]);
                let (median, low, high, ratio) = write_cell(&mut md, values, shown, baseline);
                json_cases.insert(
                    format!("{case:?}"),
                    json!({"median": median, "min": low, "max": high, "ratio": ratio, "runs": values}),
                );
            }
            md.push('\n');
            json_metrics.push(json!({"metric": metric.0, "unit": metric.1, "cases": json_cases}));
        }
        json_tables.insert(key.to_string(), Value::Array(json_metrics));
    }
    Ok((md, Value::Object(json_tables)))
}

/// `tproxy run` on `iface`, steering the main table's TCP ports to its relay (splice), as
/// the main table's eBPF mode does.
fn start_tproxy(router: &Netns, iface: &str) -> Result<Tproxy> {
    let ports = format!("{IPERF_PORT},{HTTP_PORT},{SOCKPERF_PORT}");
    let per_source = (IDLE_CONNECTIONS * 2).to_string();
    let servers = format!("{}/24", Topo::SERVER_V4);
    Tproxy::start(
        router,
        &[
            "--iface",
            iface,
            "--tcp",
            &ports,
            "--max-connections-per-source",
            &per_source,
            "--dst",
            &servers,
        ],
    )
}

fn measure_connections(samples: &mut Samples, topo: &Topo, case: Case) -> Result<()> {
    samples.record(CONNECTIONS, case, connection_rate(topo)?);
    let (p50, p99) = latency(topo)?;
    samples.record(P50, case, p50);
    samples.record(P99, case, p99);
    Ok(())
}

/// The main topology with the router's client-facing veth moved into [`BRIDGE`], which
/// takes over the router's addresses on that side.
fn bridged_topology() -> Result<(Topo, Servers)> {
    let (topo, servers) = fresh_topology()?;
    let router = &topo.router;
    router.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
    router.ip(&["addr", "flush", "dev", Topo::ROUTER_CLIENT_IFACE])?;
    router.ip(&["link", "set", Topo::ROUTER_CLIENT_IFACE, "master", BRIDGE])?;
    for addr in ["10.10.1.1/24", "fd00:1::1/64"] {
        router.ip(&["addr", "add", addr, "dev", BRIDGE, "nodad"])?;
    }
    router.ip(&["link", "set", BRIDGE, "up"])?;
    forget_router_neighbour(&topo)?;
    Ok((topo, servers))
}

/// The main topology with the router's client-facing veth renamed [`CLIENT_VETH`].
fn veth_topology() -> Result<(Topo, Servers)> {
    let (topo, servers) = fresh_topology()?;
    let router = &topo.router;
    // A link is renamed only while down.
    router.ip(&["link", "set", Topo::ROUTER_CLIENT_IFACE, "down"])?;
    router.ip(&[
        "link",
        "set",
        Topo::ROUTER_CLIENT_IFACE,
        "name",
        CLIENT_VETH,
    ])?;
    router.ip(&["link", "set", CLIENT_VETH, "up"])?;
    forget_router_neighbour(&topo)?;
    Ok((topo, servers))
}

/// The client learnt the router's MAC address during the topology's warm-up; after
/// re-plumbing, it must ask again (on the bridge, the address may be the bridge's own).
fn forget_router_neighbour(topo: &Topo) -> Result<()> {
    topo.client.ip(&["neigh", "flush", "all"])?;
    Ok(())
}

/// `veth1`..`veth99` on the router, each paired with a `vpeerN` (which [`PATTERN`] does not
/// match), in one `ip -batch`.
fn add_other_veths(router: &Netns) -> Result<()> {
    let lines: String = (1..=OTHER_VETHS)
        .map(|i| format!("link add veth{i} up type veth peer name vpeer{i}\n"))
        .collect();
    let path = std::env::temp_dir().join(format!("tproxy-bench-{}-veths", std::process::id()));
    fs::write(&path, lines)?;
    let added = router.ip(&["-batch", path.to_str().context("temporary path")?]);
    let _ = fs::remove_file(&path);
    added.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_entry_is_set_and_the_rest_kept_as_text() {
        let old =
            json!({"date": "d", "interfaces": {"a": [1]}, "metrics": [{"x": 9.060102847826645}]});
        let text = serde_json::to_string_pretty(&old).unwrap();
        // Numbers as another program wrote them, which parsing would not give back.
        let text = text.replace("9.060102847826645", "9.0601028478266450");
        let new = json!({"b": 2.5});
        let set = set_json_entry(&text, "interfaces", &new).unwrap();
        let expected = serde_json::to_string_pretty(
            &json!({"date": "d", "interfaces": new, "metrics": [{"x": 1.0}]}),
        )
        .unwrap()
        .replace("1.0", "9.0601028478266450");
        assert_eq!(set, expected);
        assert_eq!(set_json_entry(&set, "interfaces", &new).unwrap(), set);
        let added = set_json_entry("{\n  \"date\": \"d\"\n}", "interfaces", &new).unwrap();
        assert_eq!(
            added,
            serde_json::to_string_pretty(&json!({"date": "d", "interfaces": new})).unwrap()
        );
        assert_eq!(
            set_json_entry("{}", "interfaces", &new).unwrap(),
            serde_json::to_string_pretty(&json!({"interfaces": new})).unwrap()
        );
    }

    #[test]
    fn the_interfaces_section_is_replaced_and_the_rest_kept() {
        let section = format!("{HEADING}\nnew\n");
        let before = "# t\n\n| a |\n\n## Loading\n\nx\n\n![chart](results.png)\n";
        let added = replace_section(before, &section);
        assert_eq!(
            added,
            "# t\n\n| a |\n\n## Loading\n\nx\n\n## Interfaces\n\nnew\n\n![chart](results.png)\n"
        );
        let again = replace_section(&added, &format!("{HEADING}\nnewer\n"));
        assert_eq!(again, added.replace("new\n", "newer\n"));
        let followed = "# t\n## Interfaces\nold\n\n## Local\ny\n";
        assert_eq!(
            replace_section(followed, &section),
            "# t\n## Interfaces\n\nnew\n\n## Local\ny\n"
        );
    }
}
