//! `cargo xtask`: everything from a fresh machine to a tested binary.
//!
//! - `setup`: install what building the eBPF program and running the tests need (idempotent;
//!   quick when everything is there).
//! - `build`: setup, then the release binary at `target/release/tproxy`.
//! - `test`: build, then every unit and kernel test.
//! - `image`: build, then the container image `tproxy:latest` (no base image to pull).
//! - `demo`: build, then a real interception on a throwaway namespace topology.
//! - `fuzz`: run the cargo-fuzz targets for a while each (a short run is part of `test`).
//! - `soak`: mixed TCP/UDP load with churn for a while, then check nothing leaked (a short
//!   soak is part of `test`).

mod bench;
mod demo;
#[path = "../../tproxy-ebpf/toolchain.rs"]
mod ebpf_toolchain;
mod fuzz;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tproxy_tests::containers as tproxy_containers;

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the pinned nightly with rust-src, bpf-linker for its LLVM, and the Debian
    /// tools the tests use.
    Setup,
    /// Build the release binary (eBPF program embedded) at target/release/tproxy.
    Build,
    /// Build, then run the unit tests and the kernel tests (needs root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build, then the container image tproxy:latest with the local engine (`docker`): the
    /// binary and the libraries `ldd` lists for it, FROM scratch (deploy/Containerfile).
    Image,
    /// Build, then intercept real TCP traffic between throwaway namespaces (needs root).
    Demo,
    /// Build, then compare tproxy with iptables TPROXY and HAProxy on one topology; writes
    /// bench/results.{md,json,png} (needs root; installs the load tools).
    Bench {
        /// Rounds over all modes; the report gives each metric's median and spread.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Only the table of modes (direct, the relays, HAProxy), without the rule-scaling,
        /// rule-load and interface runs.
        #[arg(long)]
        relay_modes_only: bool,
        /// Only the interface cases (steering on a bridge; 100 veths by pattern against
        /// one): their section of the report is replaced, the rest kept.
        #[arg(long, conflicts_with = "relay_modes_only")]
        interfaces_only: bool,
        /// Only the host's own connections (a client in a cgroup on the router: direct, the
        /// iptables OUTPUT-mark recipe, `tproxy run --local`): their section of the report is
        /// replaced, the rest kept.
        #[arg(long, conflicts_with_all = ["relay_modes_only", "interfaces_only"])]
        local_modes_only: bool,
    },
    /// Run each fuzz target (cargo fuzz, nightly) from its corpus in fuzz/corpus; installs
    /// cargo-fuzz if missing. New findings stay out of the repository (a temporary corpus).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u32,
    },
    /// Build, then run the soak test for longer than `test` does (needs root).
    Soak {
        /// Seconds of load.
        #[arg(long, default_value_t = 600)]
        seconds: u32,
    },
}

/// Seconds per fuzz target in `cargo xtask test`.
const TEST_FUZZ_SECONDS: u32 = 10;

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::run(),
        Task::Build => build().map(drop),
        Task::Test { args } => test(&args),
        Task::Image => image(),
        Task::Demo => {
            let binary = build()?;
            demo::run(&binary)
        }
        Task::Bench {
            rounds,
            relay_modes_only,
            interfaces_only,
            local_modes_only,
        } => {
            let binary = build()?;
            match (interfaces_only, local_modes_only) {
                (true, _) => bench::interfaces::run_only(&binary, rounds.max(1)),
                (_, true) => bench::local::run_only(&binary, rounds.max(1)),
                _ => bench::run(&binary, rounds.max(1), relay_modes_only),
            }
        }
        Task::Fuzz { seconds } => fuzz::run(seconds),
        Task::Soak { seconds } => {
            require_root("the soak test creates network namespaces")?;
            let binary = build()?;
            check(
                cargo()
                    .args([
                        "test",
                        "--release",
                        "--locked",
                        "-p",
                        "tproxy-tests",
                        "--test",
                        "soak",
                    ])
                    .args(["--", "--nocapture"])
                    .env("TPROXY_BIN", binary)
                    .env("TPROXY_SOAK_SECONDS", seconds.to_string()),
            )
        }
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs a command to completion, failing with its name when it fails.
fn check(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("starting {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(workspace_root());
    command
}

fn build() -> Result<PathBuf> {
    setup::run()?;
    check(cargo().args(["build", "--release", "--locked", "-p", "tproxy"]))?;
    let binary = workspace_root().join("target/release/tproxy");
    println!("built {}", binary.display());
    Ok(binary)
}

fn test(extra: &[String]) -> Result<()> {
    require_root("the kernel tests create network namespaces and attach BPF programs")?;
    let binary = build()?;
    check(
        cargo()
            .args(["test", "--release", "--locked", "--workspace"])
            .args(extra)
            .env("TPROXY_BIN", binary),
    )?;
    // A filtered run is someone iterating on a test; the full run fuzzes briefly too.
    if extra.is_empty() {
        fuzz::run(TEST_FUZZ_SECONDS)?;
    }
    Ok(())
}

fn image() -> Result<()> {
    let binary = build()?;
    let context = workspace_root().join("target/image");
    tproxy_containers::build_tproxy_image(
        &tproxy_containers::Docker::default_daemon(),
        &binary,
        &context,
    )
    .context("building the image (is a container engine running? `docker version` tells)")?;
    println!(
        "built the image {} from {}",
        tproxy_containers::IMAGE,
        context.display()
    );
    Ok(())
}

fn require_root(why: &str) -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("run as root: {why}");
    }
    Ok(())
}
