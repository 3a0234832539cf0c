//! The host's own connections: a client process in a cgroup on the host under test (the
//! router namespace) connects to the servers in the server namespace. Three ways: direct;
//! the classic iptables recipe for locally generated traffic (mangle OUTPUT marks the
//! cgroup's packets, `fwmark` routes them to `lo`, PREROUTING's TPROXY on `lo` hands them to
//! `tproxy run --relay-only`); and `tproxy run --local --cgroup` (connect programs mark the
//! sockets, tc on `lo` steers). Both proxying modes use the same relay (splice), so the
//! difference between them is the steering.

use std::{collections::BTreeMap, fmt::Write as _, process::Output};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use tproxy_tests::{
    cgroup::TestCgroup, remove_iptables_tproxy, restore_iptables, RouterTopology as Topo, Tproxy,
};

use super::{
    field, fresh_topology, median_and_spread, output_in, output_of, write_cell, Metric, HTTP_PORT,
    IPERF_PORT, METRICS, RELAY_PORT,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum LocalMode {
    /// No steering: the client's connections go straight to the server.
    Direct,
    /// mangle OUTPUT `-m cgroup --path … -j MARK`, TPROXY on `lo`, `tproxy --relay-only`.
    IptablesOutput,
    /// `tproxy run --local --cgroup …`.
    Ebpf,
}

/// Every local mode, in report order.
const LOCAL_MODES: [LocalMode; 3] = [
    LocalMode::Direct,
    LocalMode::IptablesOutput,
    LocalMode::Ebpf,
];

impl LocalMode {
    fn label(self) -> &'static str {
        match self {
            LocalMode::Direct => "direct (no steering)",
            LocalMode::IptablesOutput => "iptables OUTPUT mark + TPROXY on lo + tproxy relay",
            LocalMode::Ebpf => "eBPF `--local --cgroup` + tproxy relay",
        }
    }
}

/// Metric name → local mode → one value per round.
pub(super) type LocalSamples = BTreeMap<&'static str, BTreeMap<LocalMode, Vec<f64>>>;

/// What the local modes measure: one-stream throughput and new connections per second.
fn local_metrics() -> [&'static Metric; 2] {
    [&METRICS[0], &METRICS[2]]
}

/// The mark the iptables recipe sets in OUTPUT and routes by.
const RECIPE_MARK: u32 = 1;

/// Measures every local mode once, each on a fresh topology with a fresh client cgroup.
pub(super) fn measure_round(round: usize, rounds: usize, samples: &mut LocalSamples) -> Result<()> {
    for mode in LOCAL_MODES {
        println!("bench: round {round}/{rounds}: local, {}", mode.label());
        let (topo, _servers) = fresh_topology()?;
        let client = TestCgroup::new("bench-client")?;
        let mut proxy = start(&topo, mode, &client)?;
        let single = iperf_in(&topo, &client)?;
        let rate = connection_rate_in(&topo, &client)?;
        // A steering that took nothing would measure the direct path under another name.
        let steered = match mode {
            LocalMode::Direct => CONNECTIONS,
            LocalMode::IptablesOutput => tproxy_target_packets(&topo)?,
            LocalMode::Ebpf => proxy
                .as_ref()
                .map_or(Ok(0), |tproxy| tproxy.tcp_stat("accepted"))?,
        };
        ensure!(
            steered >= CONNECTIONS,
            "{}: {steered} connections (or packets) steered, fewer than the {CONNECTIONS} the \
             client made",
            mode.label()
        );
        if let Some(tproxy) = &mut proxy {
            tproxy.stop()?;
        }
        if mode == LocalMode::IptablesOutput {
            remove_iptables_tproxy(&topo.router)?;
        }
        for (metric, value) in local_metrics().into_iter().zip([single, rate]) {
            samples
                .entry(metric.name)
                .or_default()
                .entry(mode)
                .or_default()
                .push(value);
        }
    }
    Ok(())
}

/// The tproxy of `mode` on the router, steering the client cgroup's connections to the
/// iperf3 and HTTP ports (none for direct).
fn start(topo: &Topo, mode: LocalMode, client: &TestCgroup) -> Result<Option<Tproxy>> {
    let ports = format!("{IPERF_PORT},{HTTP_PORT}");
    Ok(match mode {
        LocalMode::Direct => None,
        LocalMode::IptablesOutput => {
            // The recipe as the guides give it for "proxy the host itself": OUTPUT marks,
            // the policy routing (`fwmark 1 lookup 100`, `local 0.0.0.0/0 dev lo table
            // 100`, installed by restore_iptables) reroutes the marked packets over lo, and
            // PREROUTING's TPROXY takes them there.
            let rules = format!(
                "*mangle\n\
                 -A OUTPUT -m cgroup --path {cgroup} -p tcp -m multiport --dports {ports} \
                 -j MARK --set-mark {RECIPE_MARK}\n\
                 -A PREROUTING -i lo -p tcp -m mark --mark {RECIPE_MARK} -j TPROXY \
                 --on-ip 127.0.0.1 --on-port {RELAY_PORT} --tproxy-mark {RECIPE_MARK}\n\
                 COMMIT\n",
                cgroup = client.path,
            );
            restore_iptables(&topo.router, &rules)?;
            let listen = format!("127.0.0.1:{RELAY_PORT}");
            let args = [
                "--relay-only",
                "--tcp",
                &ports,
                "--listen",
                &listen,
                "--tcp-relay",
                "splice",
            ];
            Some(Tproxy::start(&topo.router, &args)?)
        }
        LocalMode::Ebpf => {
            let args = [
                "--local",
                "--cgroup",
                &client.path,
                "--tcp",
                &ports,
                "--tcp-relay",
                "splice",
            ];
            Some(Tproxy::start_with_host_mounts(&topo.router, &args)?)
        }
    })
}

/// Packets the recipe's TPROXY rule took on the router (a relay-only tproxy has no status).
fn tproxy_target_packets(topo: &Topo) -> Result<u64> {
    let listing = output_in(
        &topo.router,
        &["iptables", "-t", "mangle", "-nvxL", "PREROUTING"],
    )?;
    listing
        .lines()
        .find(|line| line.contains("TPROXY"))
        .and_then(|line| line.split_whitespace().next())
        .and_then(|packets| packets.parse().ok())
        .with_context(|| format!("no TPROXY rule counter in:\n{listing}"))
}

/// New connections `ab` makes per measurement.
const CONNECTIONS: u64 = 20_000;

/// `program ARGS…` run to its end in the client cgroup on the router; its stdout.
fn output_in_cgroup(
    topo: &Topo,
    client: &TestCgroup,
    program: &str,
    args: &[&str],
) -> Result<String> {
    let Output {
        status,
        stdout,
        stderr,
    } = client.run(&topo.router, &[], program, args)?;
    if !status.success() {
        bail!(
            "{program} {args:?} in the client cgroup failed: {}{}",
            String::from_utf8_lossy(&stderr),
            String::from_utf8_lossy(&stdout)
        );
    }
    Ok(String::from_utf8_lossy(&stdout).into_owned())
}

/// Gbit/s of one iperf3 stream from the client cgroup to the server.
fn iperf_in(topo: &Topo, client: &TestCgroup) -> Result<f64> {
    let port = IPERF_PORT.to_string();
    let args = ["-c", Topo::SERVER_V4, "-p", &port, "-t", "3", "-J"];
    let report = output_in_cgroup(topo, client, "iperf3", &args)?;
    let report: Value = serde_json::from_str(&report).context("parsing iperf3 -J")?;
    let rate = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3: no rate")?;
    Ok(rate / 1e9)
}

/// Short HTTP requests per second from the client cgroup, one connection each.
fn connection_rate_in(topo: &Topo, client: &TestCgroup) -> Result<f64> {
    let url = format!("http://{}:{HTTP_PORT}/", Topo::SERVER_V4);
    let count = CONNECTIONS.to_string();
    let args = ["-q", "-n", &count, "-c", "32", &url];
    let report = output_in_cgroup(topo, client, "ab", &args)?;
    let failed = field(&report, "Failed requests:")?;
    ensure!(failed == 0.0, "ab: {failed} failed requests");
    field(&report, "Requests per second:")
}

/// The heading that starts the local modes' section of bench/results.md.
const HEADING: &str = "## The host's own connections (`--local`)";

/// `cargo xtask bench --local-modes-only`: only these modes; their section of
/// bench/results.md and key of bench/results.json are replaced, the rest is kept.
pub fn run_only(binary: &std::path::Path, rounds: usize) -> Result<()> {
    crate::require_root("the benchmark creates network namespaces and attaches BPF programs")?;
    crate::setup::install_commands(super::PACKAGES)?;
    std::env::set_var("TPROXY_BIN", binary);
    let mut samples = LocalSamples::new();
    for round in 1..=rounds {
        measure_round(round, rounds, &mut samples)?;
    }
    let date = output_of("date", &["-u", "+%Y-%m-%d %H:%M UTC"])?;
    let provenance = format!(
        "{date}, `cargo xtask bench --local-modes-only --rounds {rounds}` ({rounds} rounds)"
    );
    let (section, json_local) = report(&samples, Some(&provenance))?;
    super::interfaces::record_section(&section, replace_section, JSON_KEY, &json_local)?;
    println!("\n{section}\nwritten into bench/results.md and bench/results.json");
    Ok(())
}

/// The key of the local modes' results in results.json.
pub(super) const JSON_KEY: &str = "local_origin";

/// `md` with the local modes' section replaced by `section`: from its heading to the next
/// heading or the chart. Without one, `section` goes before the chart, or at the end.
fn replace_section(md: &str, section: &str) -> String {
    let end_from = |at: usize| {
        md[at..]
            .match_indices('\n')
            .map(|(i, _)| at + i + 1)
            .find(|&line| md[line..].starts_with("## ") || md[line..].starts_with("!["))
    };
    // `section` starts with the blank line before its heading: it goes after the end of a
    // line, and what follows it keeps the blank line before its own heading or chart.
    let after_last_line = |at: usize| {
        let content = md[..at].trim_end_matches('\n').len();
        (content + 1).min(at)
    };
    let (start, end) = match md.find(HEADING) {
        Some(heading) => (
            after_last_line(heading),
            end_from(heading).map_or(md.len(), |end| end - 1),
        ),
        None => {
            let at = md.find("\n![").unwrap_or_else(|| after_last_line(md.len()));
            (at, at)
        }
    };
    format!("{}{}{}", &md[..start], section, &md[end..])
}

/// The local modes' section of the report, as markdown (a blank line, then the section
/// heading; no trailing blank line) and JSON. `provenance`: when and how it was measured,
/// when that is not the report's own run.
pub(super) fn report(samples: &LocalSamples, provenance: Option<&str>) -> Result<(String, Value)> {
    if samples.is_empty() {
        return Ok((String::new(), Value::Null));
    }
    let mut md = format!(
        "\n{HEADING}\n\nA client process in a cgroup on the router connects to the server: \
         direct; iptables mangle OUTPUT `-m cgroup --path` `MARK` + `fwmark` → `local \
         0.0.0.0/0 dev lo` + PREROUTING TPROXY on lo to `tproxy run --relay-only`; `tproxy \
         run --local --cgroup`. Both proxying modes relay with splice. Median [min–max]; ratio \
         to direct below."
    );
    if let Some(provenance) = provenance {
        write!(md, " Measured {provenance}.")?;
    }
    md.push_str("\n\n| metric |");
    for mode in LOCAL_MODES {
        write!(md, " {} |", mode.label())?;
    }
    md.push_str("\n| --- |");
    md.push_str(&" --- |".repeat(LOCAL_MODES.len()));
    md.push('\n');
    let mut json_metrics = Vec::new();
    for metric in local_metrics() {
        let Some(by_mode) = samples.get(metric.name) else {
            continue;
        };
        let direct = by_mode
            .get(&LocalMode::Direct)
            .map(|values| median_and_spread(values).0);
        write!(md, "| {} ({}) |", metric.name, metric.unit)?;
        let mut json_modes = serde_json::Map::new();
        for mode in LOCAL_MODES {
            let Some(values) = by_mode.get(&mode) else {
                md.push_str(" – |");
                continue;
            };
            let shown = direct.filter(|_| mode != LocalMode::Direct);
            let (median, low, high, ratio) = write_cell(&mut md, values, shown, "direct");
            let ratio = ratio.or_else(|| direct.filter(|d| *d > 0.0).map(|d| median / d));
            json_modes.insert(
                format!("{mode:?}"),
                json!({"median": median, "min": low, "max": high, "ratio_to_direct": ratio, "runs": values}),
            );
        }
        md.push('\n');
        json_metrics.push(json!({
            "metric": metric.name, "unit": metric.unit,
            "higher_is_better": metric.higher_is_better, "modes": json_modes,
        }));
    }
    Ok((md, Value::Array(json_metrics)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECTION: &str = "\n## The host's own connections (`--local`)\n\nnew\n";

    #[test]
    fn the_section_replaces_its_old_self_and_nothing_else() {
        let md = "# t\n\n| a |\n\n## The host's own connections (`--local`)\n\nold\n| x |\n\n\
                  ## Loading\n\nrest\n\n![ratios to direct](results.png)\n";
        assert_eq!(
            replace_section(md, SECTION),
            "# t\n\n| a |\n\n## The host's own connections (`--local`)\n\nnew\n\n## Loading\n\n\
             rest\n\n![ratios to direct](results.png)\n"
        );
    }

    #[test]
    fn without_a_section_it_goes_before_the_chart_or_at_the_end() {
        assert_eq!(
            replace_section("# t\n\n| a |\n\n![c](results.png)\n", SECTION),
            "# t\n\n| a |\n\n## The host's own connections (`--local`)\n\nnew\n\n![c](results.png)\n"
        );
        assert_eq!(
            replace_section("# t\n\n| a |\n", SECTION),
            "# t\n\n| a |\n\n## The host's own connections (`--local`)\n\nnew\n"
        );
    }
}
