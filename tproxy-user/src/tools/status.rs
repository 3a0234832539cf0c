//! `tproxy status`: what the instance for a routing table is doing, from three sources that
//! do not depend on one another — the running process (over its control socket), the state
//! pinned under the pin directory (links and the program's counters), and the policy routing
//! in the kernel. Any of them can be there without the others (a pinned instance between
//! processes, routing a killed instance left), and the report says which.

use anyhow::Result;
use serde_json::{json, Value};
use tproxy_common::{decision::Protocol, Outcome};

use crate::{
    cli::StatusArgs,
    daemon::control,
    daemon::instance::PinnedBy,
    datapath::pin::PinnedState,
    datapath::routing,
    datapath::steering::CounterReader,
    stats::{Packets, Stats},
};

/// The control socket refused `status` (it is root's only): whether an instance runs is
/// unknown, which is not the same as "not running".
pub use crate::daemon::control::PermissionDenied;

/// The exit status of `tproxy status` when the running instance could not be asked
/// ([`PermissionDenied`]): LSB's "status unknown".
pub const EXIT_UNKNOWN: u8 = 4;

/// Prints the status; `Ok(false)` when no instance is running.
pub async fn run(args: &StatusArgs) -> Result<bool> {
    let instance = control::request_status(args.instance.table)?;
    let pinned = PinnedState::locate(&args.instance.pin_dir, args.instance.table)?;
    let pinned = pinned
        .exists()
        .then(|| pinned_report(&pinned, PinnedBy::read(args.instance.table)));
    let handle = routing::connect()?;
    let routing = routing::describe(&handle, args.instance.table).await?;
    let running = instance.is_some();
    let report = json!({
        "table": args.instance.table,
        "running": running,
        "instance": instance,
        "pinned": pinned,
        "routing": routing,
    });
    if args.json {
        println!("{report:#}");
    } else {
        print_text(&report, instance.as_ref().map(|instance| &instance.stats));
    }
    Ok(running)
}

fn pinned_report(pinned: &PinnedState, by: Option<PinnedBy>) -> Value {
    let links: Vec<Value> = pinned
        .tc_links()
        .into_iter()
        .map(|(iface, path)| {
            let program = CounterReader::pinned_link_program(&path).ok();
            json!({ "interface": iface, "program_id": program })
        })
        .collect();
    let cgroup_links: Vec<Value> = pinned
        .cgroup_links()
        .into_iter()
        .map(|path| {
            let program = CounterReader::pinned_link_program(&path).ok();
            let name = path
                .file_name()
                .map(|name| name.to_string_lossy().into_owned());
            json!({ "name": name, "program_id": program })
        })
        .collect();
    let packets = CounterReader::from_pin(&pinned.map(tproxy_common::maps::COUNTERS))
        .and_then(|reader| reader.read())
        .ok()
        .map(Packets);
    json!({
        "dir": pinned.dir().display().to_string(),
        "links": links,
        "cgroup_links": cgroup_links,
        "packets": packets,
        "pinned_by_pid": by.as_ref().map(|by| by.pid),
        "fail_mode": by.map(|by| by.fail_mode),
    })
}

/// `stats`: the running instance's counters, if one runs.
fn print_text(report: &Value, stats: Option<&Stats>) {
    let table = &report["table"];
    let instance = &report["instance"];
    let pinned = &report["pinned"];
    if instance.is_null() {
        println!("tproxy (table {table}): not running in this network namespace");
    } else {
        print_instance(table, instance, stats);
    }
    print_pinned(pinned, instance.is_null());
    print_routing(report);
    print_packets(instance, pinned);
}

/// A listener tproxy does not run: its proxy's sockets now, and its new flows.
fn print_external(listener: &Value, transports: &str, external: &str) {
    let packets = &listener["packets"];
    let counts = match packets.is_object() {
        true => format!(
            " (new flows: steered_new={} no_listener={})",
            packets["steered_new"], packets["no_listener"]
        ),
        false => String::new(),
    };
    println!(
        "  listener {}: {transports} to the external proxy at {external}{counts}",
        text(&listener["name"])
    );
    for socket in listener["external_sockets"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let state = match (
            socket["listening"].as_bool(),
            socket["transparent"].as_bool(),
            socket["error"].as_str(),
        ) {
            (_, _, Some(error)) => format!("unknown ({error})"),
            (Some(true), Some(true), _) => "listening, IP_TRANSPARENT".to_string(),
            (Some(true), _, _) => "listening WITHOUT IP_TRANSPARENT".to_string(),
            _ => "NOT listening".to_string(),
        };
        println!(
            "    {} {}: {state}",
            text(&socket["transport"]),
            text(&socket["address"])
        );
    }
}

/// The running instance: where it is attached, its listeners and rules, its relay counters.
fn print_instance(table: &Value, instance: &Value, stats: Option<&Stats>) {
    println!(
        "tproxy (table {table}): running, pid {}, {}",
        instance["pid"],
        text(&instance["phase"])
    );
    println!("  attached:   {}", join(&instance["attached"]));
    println!(
        "  mark {} rule priority {}, fail mode {}",
        text(&instance["mark"]),
        instance["rule_priority"],
        text(&instance["fail_mode"])
    );
    for listener in instance["listeners"].as_array().into_iter().flatten() {
        let transports = match (listener["tcp"].as_bool(), listener["udp"].as_bool()) {
            (Some(true), Some(true)) => "TCP+UDP",
            (Some(true), _) => "TCP",
            (_, Some(true)) => "UDP",
            _ => "not serving",
        };
        if let Some(external) = listener["external"].as_str() {
            print_external(listener, transports, external);
            continue;
        }
        let upstream = match listener["upstream"].as_str() {
            Some(upstream) => upstream.to_string(),
            None => "the original destination".to_string(),
        };
        println!(
            "  listener {}: {transports} on {}, relaying to {upstream}",
            text(&listener["name"]),
            join(&listener["addresses"])
        );
    }
    for rule in instance["rules"].as_array().into_iter().flatten() {
        println!("  rule:       {}", text(rule));
    }
    // Every relay counter and the fragment tracking, as the log shows them; the packet
    // counts follow, from the instance or else from the pinned map.
    if let Some(stats) = stats {
        let without_packets = Stats {
            packets: None,
            ..stats.clone()
        };
        for line in without_packets.log_lines() {
            println!("  {line}");
        }
    }
}

/// What is pinned, and what it does with no process behind it.
fn print_pinned(pinned: &Value, no_instance: bool) {
    if pinned.is_null() {
        println!("  pinned:     nothing");
    } else {
        println!("  pinned:     {}", text(&pinned["dir"]));
        for link in pinned["links"].as_array().into_iter().flatten() {
            println!(
                "    tcx link on {} (program id {})",
                text(&link["interface"]),
                link["program_id"]
            );
        }
        for link in pinned["cgroup_links"].as_array().into_iter().flatten() {
            println!(
                "    cgroup link {} (program id {})",
                text(&link["name"]),
                link["program_id"]
            );
        }
        if no_instance {
            let effect = match pinned["fail_mode"].as_str() {
                Some("closed") => "fail-closed: what steer rules take is dropped",
                Some("open") => "fail-open: what steer rules take passes unproxied",
                _ => "its fail mode decides what steered traffic does",
            };
            println!(
                "    steering stays in force with no process (pinned by pid {}): {effect}",
                pinned["pinned_by_pid"]
            );
        }
    }
}

fn print_routing(report: &Value) {
    let routing: Vec<&str> = report["routing"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if routing.is_empty() {
        println!("  routing:    none installed");
    }
    for line in routing {
        println!("  routing:    {line}");
    }
}

/// The program's packet counts, from the instance or else from the pinned map.
fn print_packets(instance: &Value, pinned: &Value) {
    let packets = if instance["packets"].is_object() {
        &instance["packets"]
    } else {
        &pinned["packets"]
    };
    for protocol in Protocol::ALL {
        let row = &packets[protocol.name()];
        if row.is_null() {
            continue;
        }
        let counts: Vec<String> = Outcome::ALL
            .iter()
            .filter(|o| o.applies_to(protocol))
            .map(|o| format!("{}={}", o.name(), row[o.name()]))
            .collect();
        println!("  {} packets: {}", protocol.name(), counts.join(" "));
    }
}

fn text(value: &Value) -> String {
    value
        .as_str()
        .map_or_else(|| value.to_string(), str::to_string)
}

fn join(value: &Value) -> String {
    let items: Vec<String> = value.as_array().into_iter().flatten().map(text).collect();
    items.join(", ")
}
