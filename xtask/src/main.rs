//! `cargo xtask`: everything from a fresh machine to a tested binary.
//!
//! - `setup`: install what building the eBPF program and running the tests need (idempotent;
//!   quick when everything is there).
//! - `build`: setup, then the release binary at `target/release/tproxy`.
//! - `test`: build, then every unit and kernel test.
//! - `demo`: build, then a real interception on a throwaway namespace topology.

mod bench;
mod demo;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install nightly's rust-src, bpf-linker for nightly's LLVM, and the Debian tools the
    /// tests use.
    Setup,
    /// Build the release binary (eBPF program embedded) at target/release/tproxy.
    Build,
    /// Build, then run the unit tests and the kernel tests (needs root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build, then intercept real TCP traffic between throwaway namespaces (needs root).
    Demo,
    /// Build, then compare tproxy with iptables TPROXY and HAProxy on one topology; writes
    /// bench/results.{md,json,png} (needs root; installs the load tools).
    Bench {
        /// Rounds over all modes; the report gives each metric's median and spread.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::run(),
        Task::Build => build().map(drop),
        Task::Test { args } => test(&args),
        Task::Demo => {
            let binary = build()?;
            demo::run(&binary)
        }
        Task::Bench { rounds } => {
            let binary = build()?;
            bench::run(&binary, rounds.max(1))
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
    )
}

fn require_root(why: &str) -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("run as root: {why}");
    }
    Ok(())
}
