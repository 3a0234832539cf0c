//! `tproxy doctor`: why would traffic not be steered here? Checks the kernel, the sysctls,
//! the firewall and other transparent-proxy users, and says for each problem what to run.
//! The exit status says whether anything is wrong (warnings do not count).

use std::process::Command;

use anyhow::Result;
use aya::{
    programs::{SchedClassifier, TcAttachType},
    util::KernelVersion,
};
use futures::TryStreamExt;

use crate::{
    config::{External, Interfaces, Settings},
    datapath::interfaces,
    datapath::local_origin::LocalSelections,
    datapath::routing,
    datapath::steering::{LoadSettings, Steering},
    relay::external::{self, Presence},
    values::Mark,
};

/// How bad a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Severity {
    Ok,
    Warning,
    Problem,
}

/// One thing the doctor checked.
#[derive(Debug)]
struct Finding {
    severity: Severity,
    what: String,
    /// What to run to fix it.
    fix: Option<String>,
}

impl Finding {
    fn ok(what: impl Into<String>) -> Self {
        Finding {
            severity: Severity::Ok,
            what: what.into(),
            fix: None,
        }
    }
    fn warning(what: impl Into<String>, fix: Option<String>) -> Self {
        Finding {
            severity: Severity::Warning,
            what: what.into(),
            fix,
        }
    }
    fn problem(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Finding {
            severity: Severity::Problem,
            what: what.into(),
            fix: Some(fix.into()),
        }
    }
}

/// A proxy that tproxy does not run, which an external listener hands flows to.
#[derive(Clone, Debug)]
pub struct ExternalCheck {
    /// The listener's name, or the flag that named the proxy.
    pub listener: String,
    pub external: External,
    pub tcp: bool,
    pub udp: bool,
    /// Whether the proxy's transports are unknown (`--external` names none): a transport
    /// with nothing there is then only a warning while the other has the proxy.
    pub either_transport: bool,
}

impl ExternalCheck {
    /// The external listeners of a configuration.
    pub fn of_config(config: &crate::config::Config) -> Vec<Self> {
        config
            .listeners
            .iter()
            .filter_map(|listener| {
                Some(ExternalCheck {
                    listener: listener.name.clone(),
                    external: listener.external.clone()?,
                    tcp: listener.tcp,
                    udp: listener.udp,
                    either_transport: false,
                })
            })
            .collect()
    }

    /// The proxies named by `--external` (none when it is not given), TCP, UDP or both.
    pub fn of_flag(addrs: &[std::net::SocketAddr]) -> Option<Self> {
        (!addrs.is_empty()).then(|| ExternalCheck {
            listener: "--external".into(),
            external: External::At(addrs.to_vec()),
            tcp: true,
            udp: true,
            either_transport: true,
        })
    }
}

/// What `doctor` examines: the settings (interfaces, mark, pinning), the external proxies,
/// and the local processes a configuration's rules for local connections select.
pub struct Examined {
    pub settings: Settings,
    pub externals: Vec<ExternalCheck>,
    pub local: Option<LocalSelections>,
}

/// Runs every check for the interfaces and mark of the settings, the external proxies and
/// the local selection; prints the findings; fails when any is a problem.
pub async fn run(examined: &Examined) -> Result<()> {
    let mut findings = examine(&examined.settings).await;
    for check in &examined.externals {
        findings.extend(external_proxy(check));
    }
    findings.extend(local_origin(examined.local.as_ref()));
    for finding in &findings {
        let label = match finding.severity {
            Severity::Ok => "ok     ",
            Severity::Warning => "warning",
            Severity::Problem => "PROBLEM",
        };
        println!("{label} {}", finding.what);
        if let Some(fix) = &finding.fix {
            println!("        fix: {fix}");
        }
    }
    let problems = findings
        .iter()
        .filter(|f| f.severity == Severity::Problem)
        .count();
    if problems > 0 {
        anyhow::bail!("{problems} problems found");
    }
    println!("no problems found");
    Ok(())
}

async fn examine(settings: &Settings) -> Vec<Finding> {
    let mut findings = vec![kernel(), program(settings)];
    findings.push(ipv6_policy_routing().await);
    let (names, unmatched) = attached_now(&settings.interfaces);
    for pattern in unmatched {
        findings.push(Finding::ok(format!(
            "{pattern}: no interface matches it yet; tproxy attaches to those that appear"
        )));
    }
    for iface in &names {
        findings.extend(interface(iface));
    }
    findings.push(forwarding());
    findings.extend(container_host(&names));
    findings.extend(firewall(settings.mark));
    findings.extend(other_tproxy_users());
    if settings.pin {
        findings.push(pin_dir(&settings.pin_dir));
    }
    findings
}

/// An external listener's proxy must be there, with IP_TRANSPARENT (what Squid's `tproxy`
/// and HAProxy's `transparent` set): without it, the kernel cannot give it connections
/// addressed to other hosts. Read from sock_diag, as `ss -O` shows it.
fn external_proxy(check: &ExternalCheck) -> Vec<Finding> {
    let name = &check.listener;
    let presences = external::presences(&check.external, check.tcp, check.udp);
    let listening_at = |addr: std::net::SocketAddr| {
        presences
            .iter()
            .any(|(at, _, presence)| *at == addr && matches!(presence, Ok(p) if p.listening))
    };
    let served: Vec<bool> = presences
        .iter()
        .map(|(addr, ..)| check.either_transport && listening_at(*addr))
        .collect();
    presences
        .into_iter()
        .zip(served)
        .map(|((addr, transport, presence), served)| {
            let at = format!("listener `{name}`: {addr} ({transport:?})");
            match presence {
                Ok(Presence {
                    listening: false, ..
                }) if served => Finding::warning(
                    format!("{at}: nothing listens there; its {transport:?} flows would get the fail mode (fine for a proxy of the other transport only)"),
                    None,
                ),
                Ok(Presence {
                    listening: false, ..
                }) => Finding::problem(
                    format!("{at}: nothing listens there; its flows get the fail mode"),
                    "start the proxy, or point `external` (--on-port/--on-ip) at where it listens",
                ),
                Ok(Presence {
                    transparent: false, ..
                }) => Finding::problem(
                    format!("{at}: the socket there has no IP_TRANSPARENT"),
                    "make the port transparent in the proxy (Squid: `http_port PORT tproxy`; \
                     HAProxy: `bind ADDR:PORT transparent`)",
                ),
                Ok(_) => Finding::ok(format!("{at}: listening, with IP_TRANSPARENT")),
                Err(error) => Finding::warning(
                    format!("{at}: could not read the sockets (sock_diag): {error:#}"),
                    None,
                ),
            }
        })
        .collect()
}

/// Steering local connections (`run --local`, rules with origin `local`) needs the cgroup v2
/// hierarchy (to attach to) and the namespace cookie (to leave other namespaces' sockets
/// alone), and the cgroups it selects must exist when tproxy starts. Without a selection
/// to check, what is missing only makes `--local` unavailable.
fn local_origin(selections: Option<&LocalSelections>) -> Vec<Finding> {
    use crate::datapath::local_origin::{cgroup2_root, cgroup_dir, own_netns_cookie};
    let missing = |error: anyhow::Error| match selections {
        None => Finding::warning(
            format!("--local is unavailable: {error:#}"),
            Some("only needed to steer this host's own connections".into()),
        ),
        Some(_) => Finding::problem(
            format!("the rules for local connections cannot be served: {error:#}"),
            "mount the cgroup v2 hierarchy (e.g. `mount -t cgroup2 none /sys/fs/cgroup/unified`) \
             and run on kernel 5.14 or later",
        ),
    };
    let root = match cgroup2_root() {
        Ok(root) => root,
        Err(error) => return vec![missing(error)],
    };
    if let Err(error) = own_netns_cookie() {
        return vec![missing(error)];
    }
    let mut findings = vec![Finding::ok(format!(
        "cgroup v2 is mounted at {}: --local can select processes by cgroup",
        root.display()
    ))];
    let used = selections.iter().flat_map(|selections| selections.used());
    for (index, selection) in used {
        findings.push(Finding::ok(format!(
            "selection {index} of the rules for local connections: {selection}"
        )));
        let paths = selection.cgroups.iter().filter(|path| *path != "/");
        findings.extend(paths.map(|path| match cgroup_dir(&root, path) {
            Ok(dir) => Finding::ok(format!("cgroup `{path}` exists ({})", dir.display())),
            Err(error) => Finding::problem(
                format!("{error:#}"),
                "start the service first (systemd creates a unit's cgroup when it starts), or \
                 fix the path; tproxy attaches to the cgroups it selects when it starts",
            ),
        }));
    }
    findings
}

/// `run --pin` needs a bpf filesystem that outlives the process.
fn pin_dir(dir: &std::path::Path) -> Finding {
    match crate::datapath::pin::on_bpffs(dir) {
        Ok(true) => Finding::ok(format!("{} is on a bpf filesystem: --pin can keep its state there", dir.display())),
        Ok(false) => Finding::problem(
            format!("{} is not on a bpf filesystem: `run --pin` cannot pin its state there", dir.display()),
            "mount -t bpf bpf /sys/fs/bpf (systemd does this at boot; in a container, mount the host's /sys/fs/bpf), or give --pin-dir a directory on one",
        ),
        Err(error) => Finding::problem(format!("{error:#}"), "give --pin-dir an existing directory on a bpf filesystem"),
    }
}

fn kernel() -> Finding {
    match KernelVersion::current() {
        Ok(v) if v >= KernelVersion::new(6, 6, 0) => Finding::ok(format!("kernel {v}: the program attaches with TCX")),
        Ok(v) => Finding::warning(
            format!("kernel {v}: older than 6.6, the program attaches as a clsact filter (survives a killed process until the next start removes it)"),
            None,
        ),
        Err(error) => Finding::warning(format!("kernel version unknown: {error}"), None),
    }
}

/// Loads the real program: the verifier accepting it proves bpf_sk_assign at tc ingress,
/// the socket lookups and sk_lookup are all there.
fn program(settings: &Settings) -> Finding {
    let load = LoadSettings {
        mark: settings.mark,
        socket_mark: settings.socket_mark,
        rule_map_capacity: 1024,
        fail_closed: false,
        pinned: None,
        local_origin: None,
        steer_loopback: false,
    };
    match Steering::load(&load) {
        Ok(steering) => {
            drop(steering);
            Finding::ok("the steering program loads (bpf_sk_assign at tc ingress, socket lookups, sk_lookup)")
        }
        Err(error) => Finding::problem(
            format!("the steering program does not load: {error:#}"),
            "run as root on a kernel with BPF, bpf_sk_assign (5.7+) and sk_lookup (5.9+); see the error",
        ),
    }
}

async fn ipv6_policy_routing() -> Finding {
    let result = async {
        let handle = routing::connect()?;
        let rules: Vec<_> = handle
            .rule()
            .get(rtnetlink::IpVersion::V6)
            .execute()
            .try_collect()
            .await?;
        anyhow::Ok(rules.len())
    }
    .await;
    match result {
        Ok(_) => Finding::ok("IPv6 policy routing is available"),
        Err(error) => Finding::warning(
            format!("IPv6 policy routing is not available ({error:#}): IPv6 cannot be steered"),
            Some("enable IPv6 (CONFIG_IPV6_MULTIPLE_TABLES) or steer IPv4 only".into()),
        ),
    }
}

fn sysctl(path: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/sys/{path}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The interfaces a run would attach to now: names as given (a missing one is a problem
/// [`interface`] reports), patterns and `all` expanded over this namespace's interfaces as
/// the run selects them (never `lo` but by name); with the patterns that match none.
fn attached_now(interfaces: &Interfaces) -> (Vec<String>, Vec<String>) {
    let entries = interfaces.entries();
    let present: Vec<String> = nix::net::if_::if_nameindex()
        .map(|list| {
            list.iter()
                .map(|link| link.name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let (mut names, mut unmatched) = (Vec::new(), Vec::new());
    for entry in entries {
        if !interfaces::is_pattern(&entry) {
            if !names.contains(&entry) {
                names.push(entry);
            }
            continue;
        }
        let selected: Vec<&String> = present
            .iter()
            .filter(|name| interfaces::selects(&entry, name))
            .collect();
        if selected.is_empty() {
            unmatched.push(entry);
        }
        for name in selected {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
    }
    (names, unmatched)
}

fn interface(iface: &str) -> Vec<Finding> {
    if nix::net::if_::if_nametoindex(iface).is_err() {
        return vec![Finding::problem(
            format!("interface {iface} does not exist in this network namespace"),
            "check the name with `ip link`",
        )];
    }
    let mut findings = Vec::new();
    // The kernel uses the larger of `all` and the interface's own value.
    let strict = [
        "net/ipv4/conf/all/rp_filter".to_string(),
        format!("net/ipv4/conf/{iface}/rp_filter"),
    ]
    .iter()
    .filter_map(|path| sysctl(path))
    .max();
    match strict {
        Some(1) => findings.push(Finding::problem(
            format!("strict reverse-path filtering (rp_filter 1) on {iface}: packets whose source routes back through another interface are dropped before they can be steered"),
            format!("sysctl -w net.ipv4.conf.{iface}.rp_filter=2 net.ipv4.conf.all.rp_filter=2"),
        )),
        _ => findings.push(Finding::ok(format!("{iface}: reverse-path filtering is off or loose"))),
    }
    findings.push(ingress_programs(iface));
    findings
}

/// What else runs at `iface`'s TCX ingress. tproxy hands what is not its own to the next
/// program (TCX_NEXT), so others still see those packets, but whatever runs before tproxy's
/// program may drop or redirect steered packets, and another tproxy (another table) steers
/// its own ports on the same interface.
fn ingress_programs(iface: &str) -> Finding {
    let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
    if !tcx {
        return Finding::ok(format!(
            "{iface}: no TCX before kernel 6.6 (tproxy attaches with clsact; `tc filter show dev {iface} ingress` lists the filters)"
        ));
    }
    let programs = match SchedClassifier::query_tcx(iface, TcAttachType::Ingress) {
        Ok((_, programs)) => programs,
        Err(error) => {
            return Finding::warning(
                format!("{iface}: could not list the programs at ingress ({error})"),
                Some("bpftool link".into()),
            )
        }
    };
    let described: Vec<String> = programs
        .iter()
        .map(|p| format!("{} (id {})", p.name_as_str().unwrap_or("?"), p.id()))
        .collect();
    let ours = programs
        .iter()
        .filter(|p| {
            let ours = [
                tproxy_common::maps::PROGRAM_NAME,
                tproxy_common::local_origin::LOOPBACK_PROGRAM_NAME,
            ];
            p.name_as_str().is_some_and(|name| ours.contains(&name))
        })
        .count();
    let others = programs.len() - ours;
    if others == 0 && ours <= 1 {
        return Finding::ok(match ours {
            0 => format!("{iface}: no program at ingress yet"),
            _ => format!("{iface}: only tproxy's program at ingress"),
        });
    }
    let mut problem = format!(
        "{iface}: {} programs at TCX ingress, in order: {}.",
        programs.len(),
        described.join(", ")
    );
    if ours > 1 {
        problem
            .push_str(" More than one tproxy instance steers here (each its own table and ports).");
    }
    if others > 0 {
        problem.push_str(" Programs before tproxy's may drop or redirect packets it would steer; those after it see only what it leaves.");
    }
    Finding::warning(
        problem,
        Some(format!("bpftool link; bpftool net show dev {iface}")),
    )
}

fn forwarding() -> Finding {
    match sysctl("net/ipv4/ip_forward") {
        Some(0) => Finding::warning(
            "IPv4 forwarding is off: fine for a sidecar, but a router forwards nothing, so there is no traffic to other hosts to steer",
            Some("on a router: sysctl -w net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1".into()),
        ),
        _ => Finding::ok("IPv4 forwarding is on"),
    }
}

/// What bites on a container host. Docker sets the FORWARD policy to DROP when it turns
/// forwarding on, and accepts only its own bridges' traffic: steered flows are delivered
/// locally (INPUT) and unaffected, but everything tproxy leaves alone is forwarded, or not,
/// by that policy. br_netfilter hands the frames a bridge switches to iptables as well.
/// And a bridge's ingress hook sees only what the bridge passes up to be routed.
fn container_host(interfaces: &[String]) -> Vec<Finding> {
    let mut findings = Vec::new();
    let forward_drops = output_of("iptables-save", &["-t", "filter"]).is_some_and(|rules| {
        rules
            .lines()
            .any(|l| l.starts_with(":FORWARD DROP") || l.starts_with(":FORWARD REJECT"))
    });
    let forwarding = sysctl("net/ipv4/ip_forward") == Some(1);
    let accept_where = if interfaces.is_empty() {
        "IFACE".to_string()
    } else {
        interfaces.join("/")
    };
    if forward_drops && forwarding {
        findings.push(Finding::warning(
            "the IPv4 FORWARD policy is DROP (Docker sets it when it turns forwarding on): steered flows are delivered locally and not affected, but what tproxy does not steer (other ports, bypassed destinations, every new flow while failing open with no instance running) is forwarded only where a FORWARD rule accepts it, and Docker accepts only its own bridges' traffic",
            Some(format!("iptables -I DOCKER-USER -i {accept_where} -j ACCEPT for each interface this host routes for (Docker evaluates DOCKER-USER first and leaves it alone; without Docker, -I FORWARD)")),
        ));
    } else {
        findings.push(Finding::ok(
            "no FORWARD policy drops what tproxy leaves to be forwarded",
        ));
    }
    findings.push(match sysctl("net/bridge/bridge-nf-call-iptables") {
        None => Finding::ok("br_netfilter is not loaded: frames a bridge switches bypass iptables"),
        Some(0) => Finding::ok("br_netfilter hands no bridged IPv4 frames to iptables (bridge-nf-call-iptables=0)"),
        Some(_) if forward_drops => Finding::warning(
            "br_netfilter hands the frames bridges switch to iptables (bridge-nf-call-iptables=1) and the FORWARD policy drops: frames switched between the ports of a bridge no FORWARD rule accepts (one Docker does not manage, such as a router's LAN bridge) are dropped",
            Some("iptables -I DOCKER-USER -m physdev --physdev-is-bridged -j ACCEPT, or sysctl -w net.bridge.bridge-nf-call-iptables=0 where nothing needs bridged frames filtered (Docker's network isolation and Kubernetes do)".into()),
        ),
        Some(_) => Finding::ok("br_netfilter hands the frames bridges switch to iptables (bridge-nf-call-iptables=1); no FORWARD policy drops them"),
    });
    for iface in interfaces {
        if std::path::Path::new(&format!("/sys/class/net/{iface}/bridge")).is_dir() {
            findings.push(Finding::warning(
                format!("{iface} is a bridge: what it routes (its containers or hosts to anywhere else) is steered; what it switches between its own ports (container to container on it) never reaches its ingress hook, so it is not steered"),
                None,
            ));
        }
    }
    findings
}

/// `command args…`'s stdout, or `None` when it is not installed or fails.
fn output_of(command: &str, args: &[&str]) -> Option<String> {
    let output = Command::new(command).args(args).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// An INPUT policy of DROP without an accept for the mark drops every steered packet: they
/// are delivered locally, so they traverse INPUT.
fn firewall(mark: Mark) -> Vec<Finding> {
    let mut findings = Vec::new();
    let fix = format!("iptables -I INPUT -m mark --mark {mark} -j ACCEPT (and ip6tables)");
    for (tool, family) in [("iptables-save", "IPv4"), ("ip6tables-save", "IPv6")] {
        let Some(rules) = output_of(tool, &["-t", "filter"]) else {
            continue;
        };
        let drops = rules
            .lines()
            .any(|l| l.starts_with(":INPUT DROP") || l.starts_with(":INPUT REJECT"));
        let accepts_mark = rules.lines().any(|l| {
            l.starts_with("-A INPUT")
                && l.contains("--mark")
                && l.contains("-j ACCEPT")
                && mark_in(l, mark)
        });
        if drops && !accepts_mark {
            findings.push(Finding::problem(
                format!("the {family} INPUT policy drops, and no rule accepts tproxy's mark {mark}: steered packets are dropped"),
                fix.clone(),
            ));
        }
    }
    if let Some(ruleset) = output_of("nft", &["list", "ruleset"]) {
        let drops = ruleset
            .lines()
            .any(|l| l.contains("hook input") && l.contains("policy drop"));
        let accepts = ruleset
            .lines()
            .any(|l| l.contains("meta mark") && l.contains("accept") && mark_in(l, mark));
        if drops && !accepts {
            findings.push(Finding::problem(
                format!("an nft input chain drops by default, and no rule accepts tproxy's mark {mark}: steered packets are dropped"),
                format!("nft insert rule <family> <table> <input chain> meta mark and {:#x} == {:#x} accept", mark.mask, mark.value),
            ));
        }
    }
    if findings.is_empty() {
        findings.push(Finding::ok(
            "no firewall input policy drops steered packets",
        ));
    }
    findings
}

/// Whether a rule's text mentions `mark` (as VALUE/MASK or VALUE, in hex or decimal).
fn mark_in(line: &str, mark: Mark) -> bool {
    let forms = [
        format!("{:#x}/{:#x}", mark.value, mark.mask),
        format!("{:#x}", mark.value),
        format!("{:#010x}", mark.value),
        mark.value.to_string(),
    ];
    forms.iter().any(|form| line.contains(form.as_str()))
}

/// Another transparent proxy steering the same flows would compete with tproxy.
fn other_tproxy_users() -> Vec<Finding> {
    let mut findings = Vec::new();
    for tool in ["iptables-save", "ip6tables-save"] {
        if let Some(rules) = output_of(tool, &["-t", "mangle"]) {
            let count = rules.lines().filter(|l| l.contains("-j TPROXY")).count();
            if count > 0 {
                findings.push(Finding::problem(
                    format!("{tool}: {count} TPROXY rule(s) are active; they and tproxy compete for the same flows"),
                    format!("{tool} | tproxy translate > tproxy.toml, then remove the TPROXY rules (iptables -t mangle -F/-X)"),
                ));
            }
        }
    }
    if let Some(ruleset) = output_of("nft", &["list", "ruleset"]) {
        let count = ruleset
            .lines()
            .filter(|l| l.contains(" tproxy ") || l.trim_start().starts_with("tproxy "))
            .count();
        if count > 0 {
            findings.push(Finding::problem(
                format!("nft: {count} tproxy rule(s) are active; they and tproxy compete for the same flows"),
                "nft list ruleset | tproxy translate > tproxy.toml, then delete those rules",
            ));
        }
    }
    if findings.is_empty() {
        findings.push(Finding::ok("no other TPROXY rules (iptables, nft)"));
    }
    findings
}
