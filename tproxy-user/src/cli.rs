//! Command line: what an operator can say. Each flag's text is turned into a checked value
//! (or an error naming the bad value) by the parsers of [`crate::values`] before anything
//! touches the system.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::{
    config::{RunArgs, Settings},
    values::{parse_mark, parse_socket_addr, parse_table, Mark},
};

/// Transparent proxying without iptables: a tc ingress eBPF program steers chosen TCP and UDP
/// flows into tproxy's own transparent listeners (the socket match and TPROXY target in one),
/// and tproxy relays them to their original destination.
#[derive(Debug, Parser)]
#[command(name = "tproxy", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach the steering program, install policy routing, and relay steered connections
    /// until SIGINT or SIGTERM; everything installed is removed on exit. SIGHUP reloads the
    /// configuration file's rules and listeners.
    Run(RunArgs),
    /// Check a configuration (file and flags, as `run` would take them) without touching the
    /// system, and print the effective rule table.
    Check(RunArgs),
    /// Make the running `tproxy run` of this network namespace re-read its configuration
    /// file (as SIGHUP does) and say what is in force now. Exits non-zero, with the reason,
    /// when the new configuration is rejected (the previous one stays in force).
    Reload(ReloadArgs),
    /// Check this host for what transparent proxying needs and for what breaks it (kernel
    /// support, rp_filter, forwarding, firewall policies, other TPROXY users and ingress
    /// programs); prints what to run for each problem. Exits non-zero if anything is wrong.
    Doctor(DoctorArgs),
    /// Show what the tproxy of this network namespace does: whether it runs, where it is
    /// attached, its listeners, rules, policy routing, pinned state and counters. Exits 3
    /// when no instance runs (like `systemctl status`), and 4 when it cannot tell: the
    /// running instance's control socket is root's only (permission denied).
    Status(StatusArgs),
    /// Remove everything of tproxy's in this network namespace that no running instance
    /// owns: state left pinned by `run --pin`, policy routing, tc filters of its program;
    /// and the lock files and control sockets that killed instances left for network
    /// namespaces that no longer exist. Nothing else is touched; refused while an instance
    /// runs for the table.
    Cleanup(InstanceArgs),
    /// Print an equivalent tproxy configuration for an iptables/ip6tables TPROXY rule set
    /// (`iptables-save` output) or an nft one (`nft list ruleset` output) read from stdin.
    Translate(TranslateArgs),
}

/// Flags of `tproxy doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Take the interfaces and mark from this configuration file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Interface to check (repeat for several); replaces the file's.
    #[arg(long = "iface", value_name = "IF")]
    pub ifaces: Vec<String>,

    /// The routing mark tproxy uses (as for `run`).
    #[arg(long, value_name = "MARK[/MASK]", value_parser = parse_mark)]
    pub mark: Option<Mark>,

    /// Check that this directory can hold `run --pin`'s state (implied by a configuration
    /// file that sets `pin`).
    #[arg(long = "pin-dir", value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,

    /// Check that a transparent proxy listens (TCP, UDP or both) at this address with
    /// IP_TRANSPARENT, as an external listener needs (repeat for several; the configuration
    /// file's external listeners are checked too).
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_socket_addr)]
    pub external: Vec<SocketAddr>,
}

/// Flags of `tproxy reload`.
#[derive(Debug, Args)]
pub struct ReloadArgs {
    /// The routing table of the instance (as given to its `run`).
    #[arg(long, value_name = "N", value_parser = parse_table, default_value_t = Settings::default().table)]
    pub table: u32,
}

/// Which instance `status` and `cleanup` are about.
#[derive(Debug, Args)]
pub struct InstanceArgs {
    /// The routing table of the instance (as given to its `run`).
    #[arg(long, value_name = "N", value_parser = parse_table, default_value_t = Settings::default().table)]
    pub table: u32,
    /// Where `run --pin` pins its state (as given to its `run`).
    #[arg(long = "pin-dir", value_name = "DIR", default_value_os_t = Settings::default().pin_dir)]
    pub pin_dir: PathBuf,
}

/// Flags of `tproxy status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `tproxy translate`.
#[derive(Debug, Args)]
pub struct TranslateArgs {
    /// Exit with status 0 even when some rules could not be translated (they are still
    /// listed on stderr).
    #[arg(long = "allow-skipped")]
    pub allow_skipped: bool,

    /// Keep the proxies that listen on the TPROXY ports in the path: each `--on-port P`
    /// becomes an external listener at P (its `--on-ip`, or the wildcard address), and the
    /// socket-match rules become bypass rules, so the rule set is replaced one for one.
    /// Without it, tproxy's own listeners relay the flows instead.
    #[arg(long = "keep-proxies")]
    pub keep_proxies: bool,

    /// The ipsets that `-m set --match-set NAME dst|src` rules name, as `ipset save` prints
    /// them (hash:net and hash:ip sets): their entries become the rules' prefixes, as they
    /// are in the file (later changes to the sets are not followed).
    #[arg(long = "ipset-file", value_name = "FILE")]
    pub ipset_file: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_says_both_transports_are_steered() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("steers chosen TCP and UDP"), "{help}");
    }

    #[test]
    fn run_flags_parse_and_leave_unset_settings_to_the_file_or_defaults() {
        let cli = Cli::try_parse_from(["tproxy", "run", "--iface", "eth0", "--tcp", "80"]).unwrap();
        let Command::Run(args) = cli.command else {
            panic!()
        };
        assert!(args.listen.is_empty() && args.settings.mark.is_none() && args.config.is_none());
        assert!(args.dst.is_empty());
        assert!(args.udp.is_none());
    }

    /// `status`, `cleanup` and `reload` find the instance a `run` without flags starts.
    #[test]
    fn instance_flags_default_to_the_settings_of_run() {
        let defaults = Settings::default();
        for command in ["status", "cleanup"] {
            let instance = match Cli::try_parse_from(["tproxy", command]).unwrap().command {
                Command::Status(args) => args.instance,
                Command::Cleanup(instance) => instance,
                _ => panic!(),
            };
            assert_eq!(instance.table, defaults.table, "{command}");
            assert_eq!(instance.pin_dir, defaults.pin_dir, "{command}");
        }
        let Command::Reload(args) = Cli::try_parse_from(["tproxy", "reload"]).unwrap().command
        else {
            panic!()
        };
        assert_eq!(args.table, defaults.table);
    }
}
