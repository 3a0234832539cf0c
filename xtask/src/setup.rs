//! Installs what a fresh machine lacks, and nothing it already has.
//!
//! The eBPF crate is built by the pinned nightly (`tproxy-ebpf/toolchain.rs`), whose LLVM
//! must match the one bpf-linker was built against: the LLVM major is read from that
//! nightly's `rustc -vV`, never assumed.

use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};

use crate::{
    check,
    ebpf_toolchain::{self, Toolchain, PINNED},
};

/// bpf-linker release known to build against the LLVM versions nightly uses here.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages the kernel tests and the demo call, by the command they provide.
const TEST_PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("iptables", "iptables"),
    ("nft", "nftables"),
    // The sets of `-m set` rules that `translate --ipset-file` reads.
    ("ipset", "ipset"),
    // The deployment recipes' checks: the systemd unit and the Kubernetes manifest.
    ("systemd-analyze", "systemd"),
    ("python3", "python3"),
    ("prlimit", "util-linux"),
    // The container tests: a real engine (the daemon and its client) started in a namespace.
    ("dockerd", "docker.io"),
    ("docker", "docker.io"),
    ("nsenter", "util-linux"),
    // Pinned maps of an earlier layout, made by hand in the restart tests.
    ("bpftool", "bpftool"),
    // Checksum offload turned off, so that the answers to rejected packets are checked.
    ("ethtool", "ethtool"),
    // The transparent proxies that tproxy hands flows to in the external-listener tests.
    ("squid", "squid"),
    ("haproxy", "haproxy"),
    ("curl", "curl"),
    // A real DNS client for the tests of local processes' UDP.
    ("dig", "bind9-dnsutils"),
];

pub fn run() -> Result<()> {
    let nightly = ensure_nightly()?;
    let llvm = llvm_major(&nightly)?;
    let which = match nightly.name {
        PINNED => PINNED.to_string(),
        name => format!("the installed `{name}`, which is the pinned {PINNED}"),
    };
    println!(
        "setup: tproxy-ebpf builds with {which} ({}, LLVM {llvm})",
        nightly.version()
    );
    ensure_bpf_linker(llvm)?;
    ensure_test_tools()
}

fn output(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("starting {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The pinned nightly with rust-src: installed unless it, or a plain `nightly` that is the
/// same compiler, is there already (so a machine that cannot download it still builds).
fn ensure_nightly() -> Result<Toolchain> {
    output(Command::new("rustup").arg("--version"))
        .context("rustup is needed to build the eBPF program with nightly")?;
    let nightly = match ebpf_toolchain::find() {
        Ok(nightly) => nightly,
        Err(missing) => {
            println!("setup: {missing}; installing it");
            check(Command::new("rustup").args([
                "toolchain",
                "install",
                PINNED,
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]))
            .with_context(|| format!("{missing}, and installing it failed"))?;
            ebpf_toolchain::find().map_err(|missing| anyhow!("{missing} after installing it"))?
        }
    };
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        nightly.name,
        "--installed",
    ]))?;
    if !installed.lines().any(|c| c.starts_with("rust-src")) {
        println!("setup: adding rust-src to {}", nightly.name);
        check(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            nightly.name,
        ]))?;
    }
    Ok(nightly)
}

fn llvm_major(nightly: &Toolchain) -> Result<u32> {
    nightly
        .rustc
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|major| major.trim().parse().ok())
        .ok_or_else(|| {
            anyhow!(
                "no `LLVM version:` in `rustc -vV` of {}:\n{}",
                nightly.name,
                nightly.rustc
            )
        })
}

/// Whether the installed bpf-linker was linked against LLVM `major`.
fn bpf_linker_matches(major: u32) -> bool {
    let Ok(path) = output(Command::new("sh").args(["-c", "command -v bpf-linker"])) else {
        return false;
    };
    let Ok(libraries) = output(Command::new("ldd").arg(path.trim())) else {
        return false;
    };
    libraries.contains(&format!("libLLVM.so.{major}"))
        || libraries.contains(&format!("libLLVM-{major}"))
}

fn ensure_bpf_linker(major: u32) -> Result<()> {
    if bpf_linker_matches(major) {
        return Ok(());
    }
    let dev = format!("llvm-{major}-dev");
    apt_install(&[&dev])?;
    println!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {major} (a few minutes)"
    );
    check(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--force",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
            ])
            // llvm-N-dev installs under /usr/lib/llvm-N; bpf-linker's build finds it from here.
            .env("LLVM_PREFIX", format!("/usr/lib/llvm-{major}")),
    )?;
    if !bpf_linker_matches(major) {
        bail!("bpf-linker was installed but is not linked against LLVM {major}; is ~/.cargo/bin on PATH?");
    }
    Ok(())
}

fn ensure_test_tools() -> Result<()> {
    install_commands(TEST_PACKAGES)?;
    // A module, not a command: the manifest test parses YAML with it. busybox-static, not
    // whatever `busybox` is on PATH: the container tests' client image has no libraries.
    apt_install(&["python3-yaml", "busybox-static"])
}

/// Installs the Debian package of every command in `commands` that is not on PATH.
pub fn install_commands(commands: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = commands
        .iter()
        .filter(|(command, _)| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {command}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(_, package)| *package)
        .collect();
    apt_install(&missing)
}

fn dpkg_installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f", "${Status}", package]))
        .is_ok_and(|status| status.contains("install ok installed"))
}

/// Installs Debian packages that are not installed yet, refreshing the package lists first
/// when a package is not known (fresh machines have stale or empty lists).
pub fn apt_install(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("setup: apt-get install {}", missing.join(" "));
    let install = || {
        let mut command = Command::new("apt-get");
        command
            .args(["install", "-y", "-q"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive");
        command
    };
    if install().status().is_ok_and(|s| s.success()) {
        return Ok(());
    }
    check(Command::new("apt-get").args(["update", "-q"]))?;
    check(&mut install())
}
