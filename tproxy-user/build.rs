//! Builds the eBPF program (tproxy-ebpf, its own workspace) with nightly for
//! bpfel-unknown-none and leaves the object in OUT_DIR, where `src/steering.rs` embeds it.

use std::{env, path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

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
        .args(["run", "nightly", "cargo", "build", "--release", "--locked"])
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
    let status = cargo.status().context(
        "running `rustup run nightly cargo build` for tproxy-ebpf (is rustup installed?)",
    )?;
    if !status.success() {
        bail!(
            "building tproxy-ebpf failed ({status}); `cargo xtask setup` installs nightly's rust-src and bpf-linker"
        );
    }
    let object = target_dir.join("bpfel-unknown-none/release/tproxy-ebpf");
    std::fs::copy(&object, out_dir.join("tproxy-ebpf"))
        .with_context(|| format!("copying {}", object.display()))?;
    Ok(())
}
