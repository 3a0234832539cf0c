//! Builds the eBPF program (tproxy-ebpf, its own workspace) with the pinned nightly for
//! bpfel-unknown-none and leaves the objects in OUT_DIR, where `src/datapath/steering.rs` and
//! `src/relay/kernel.rs` embed them.

#[path = "../tproxy-ebpf/toolchain.rs"]
mod toolchain;

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{anyhow, bail, Context, Result};

fn main() -> Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir.join("../tproxy-ebpf").canonicalize()?;
    let common_dir = manifest_dir.join("../tproxy-common").canonicalize()?;
    for dir in [&ebpf_dir, &common_dir] {
        println!("cargo::rerun-if-changed={}", dir.join("src").display());
        println!(
            "cargo::rerun-if-changed={}",
            dir.join("Cargo.toml").display()
        );
    }
    for file in ["toolchain.rs", "rust-toolchain.toml"] {
        println!("cargo::rerun-if-changed={}", ebpf_dir.join(file).display());
    }
    check_toolchain_file(&ebpf_dir)?;
    let nightly = toolchain::find()
        .map_err(|missing| anyhow!("{missing}: run `cargo xtask setup`, which installs it"))?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let target_dir = out_dir.join("ebpf-target");

    // The same flags aya-build passes: BTF lets the verifier explain itself and aya-log work;
    // bpf_target_arch tells aya-ebpf which architecture's kernel structs to use.
    let arch = env::var("CARGO_CFG_TARGET_ARCH")?;
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
    ]
    .join("\x1f");

    let mut cargo = Command::new("rustup");
    cargo
        .args([
            "run",
            nightly.name,
            "cargo",
            "build",
            "--release",
            "--locked",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        // tproxy-ebpf/.cargo/config.toml (target, build-std) is found from the working dir.
        .current_dir(&ebpf_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags);
    // The outer (stable) build's settings must not leak into the nightly one.
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTUP_TOOLCHAIN",
    ] {
        cargo.env_remove(var);
    }
    let status = cargo.status().with_context(|| {
        format!(
            "running `rustup run {} cargo build` for tproxy-ebpf (is rustup installed?)",
            nightly.name
        )
    })?;
    if !status.success() {
        bail!(
            "building tproxy-ebpf with {} ({}) failed ({status}); `cargo xtask setup` installs its rust-src and bpf-linker",
            nightly.name,
            nightly.version()
        );
    }
    // The steering program, and the in-kernel TCP relay's verdict program (loaded apart, only
    // in that relay mode).
    for name in ["tproxy-ebpf", "tproxy-relay-ebpf"] {
        let object = target_dir.join("bpfel-unknown-none/release").join(name);
        std::fs::copy(&object, out_dir.join(name))
            .with_context(|| format!("copying {}", object.display()))?;
    }
    Ok(())
}

/// The toolchain file (what cargo uses when run inside tproxy-ebpf) must name the nightly
/// this build uses.
fn check_toolchain_file(ebpf_dir: &Path) -> Result<()> {
    let path = ebpf_dir.join("rust-toolchain.toml");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let wanted = format!("channel = \"{}\"", toolchain::PINNED);
    if !text.lines().any(|line| line.trim() == wanted) {
        bail!(
            "{} does not say `{wanted}` as tproxy-ebpf/toolchain.rs does: change both together",
            path.display()
        );
    }
    Ok(())
}
