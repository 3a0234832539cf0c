//! `tproxy`: the command line. The work is done by the `tproxy_user` library next to it.

use tproxy_user::{
    cli, config,
    daemon::instance,
    datapath::rules,
    logging, run,
    tools::{cleanup, doctor, status, translate},
};

use std::process::ExitCode;

use clap::Parser;

/// The settings `doctor` examines: the configuration file's (if given), then the flags; and
/// the external proxies it checks: the file's external listeners, then `--external`.
fn doctor_settings(args: &cli::DoctorArgs) -> anyhow::Result<doctor::Examined> {
    let mut externals = Vec::new();
    let mut local = None;
    let mut settings = match &args.config {
        Some(path) => {
            let config = config::Config::from_file(path)?;
            externals = doctor::ExternalCheck::of_config(&config);
            local = config.local;
            config.settings
        }
        None => config::Settings::default(),
    };
    if !args.ifaces.is_empty() {
        settings.interfaces = config::Interfaces::from_names(&args.ifaces);
    }
    if let Some(mark) = args.mark {
        settings.mark = mark;
    }
    if let Some(dir) = &args.pin_dir {
        settings.pin = true;
        settings.pin_dir = dir.clone();
    }
    externals.extend(doctor::ExternalCheck::of_flag(&args.external));
    Ok(doctor::Examined {
        settings,
        externals,
        local,
    })
}

/// `tproxy check`: everything `run` would check before touching the system.
fn check(args: &config::RunArgs) -> anyhow::Result<()> {
    let config = config::Config::build(args)?;
    // Stand-in interface indices: the counts depend on how many interfaces there are.
    let named: Vec<String> = match &config.settings.interfaces {
        config::Interfaces::Named(names) => names.clone(),
        config::Interfaces::All { .. } => {
            let mut names: Vec<String> = config
                .rules
                .iter()
                .filter_map(|r| r.iface.clone())
                .collect();
            names.dedup();
            names
        }
    };
    let interfaces: Vec<(String, u32)> = named.into_iter().zip(1..).collect();
    let rules = rules::compile(&config.rules, 0, &interfaces);
    print!("{}", config.describe());
    println!(
        "maps: {} rule groups; entries: destination IPv4 {}, IPv6 {}; source IPv4 {}, IPv6 {}; \
         mark {}",
        rules.groups(),
        rules.dst_v4.len(),
        rules.dst_v6.len(),
        rules.src_v4.len(),
        rules.src_v6.len(),
        rules.marks.len()
    );
    println!("configuration OK");
    Ok(())
}

/// Raises the soft open-files limit to the hard one, before any default is worked out from
/// it: the relay holds two descriptors a connection and a session, and a soft limit of 1024
/// (what most shells and service managers hand out unless told otherwise) would cap the
/// default `--max-connections` at 384 whatever the system allows. As Go's runtime and
/// systemd's own services do; a limit that cannot be raised stays as it is.
fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => log::debug!("open-files limit raised from {soft} to {hard}"),
            Err(error) => log::debug!("open-files limit left at {soft}: {error}"),
        }
    }
}

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let verbose = matches!(&cli.command, cli::Command::Run(args) if args.verbose);
    logging::init(verbose);
    if !matches!(&cli.command, cli::Command::Run(_)) {
        // A report piped into `head` ends quietly, as other command-line tools do, instead
        // of panicking on the broken pipe. `run` keeps ignoring SIGPIPE: a peer that goes
        // away must not end the relay.
        // SAFETY: setting a signal's disposition to the default, before any thread is started.
        let _ = unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            )
        };
    }
    raise_open_files_limit();
    // Known exactly, because dropping privileges must reach every worker thread.
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("tproxy: error: starting the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        cli::Command::Run(args) => runtime.block_on(run::run(args, workers)),
        cli::Command::Check(args) => check(&args),
        cli::Command::Reload(args) => {
            instance::reload(args.table).map(|in_force| println!("{in_force}"))
        }
        cli::Command::Translate(args) => translate::run(&args),
        cli::Command::Cleanup(args) => runtime.block_on(cleanup::run(args.table, &args.pin_dir)),
        cli::Command::Status(args) => match runtime.block_on(status::run(&args)) {
            Ok(true) => Ok(()),
            // Said so already; the status code is for scripts.
            Ok(false) => return ExitCode::from(3),
            Err(error) if error.is::<status::PermissionDenied>() => {
                eprintln!("tproxy: error: {error:#}");
                return ExitCode::from(status::EXIT_UNKNOWN);
            }
            Err(error) => Err(error),
        },
        cli::Command::Doctor(args) => {
            doctor_settings(&args).and_then(|examined| runtime.block_on(doctor::run(&examined)))
        }
    };
    // In-flight relays end with the runtime; steering and routing are already gone by now.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    logging::log_held_back();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tproxy: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
