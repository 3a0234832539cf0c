//! `cargo xtask fuzz`: every cargo-fuzz target in fuzz/, for a while each, starting from the
//! corpus kept in fuzz/corpus/TARGET.

use std::process::Command;

use anyhow::{Context, Result};

use crate::{check, workspace_root};

/// The targets in fuzz/fuzz_targets.
const TARGETS: [&str; 4] = ["decisions", "rules", "config", "translate"];

pub fn run(seconds: u32) -> Result<()> {
    ensure_cargo_fuzz()?;
    let fuzz_dir = workspace_root().join("fuzz");
    for target in TARGETS {
        // New inputs go to the first corpus directory: keep them out of the repository.
        let scratch = std::env::temp_dir().join(format!("tproxy-fuzz-{target}"));
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("creating {}", scratch.display()))?;
        println!("fuzz: {target} for {seconds} s");
        check(
            nightly_cargo()
                .current_dir(&fuzz_dir)
                .args(["fuzz", "run", target])
                .arg(&scratch)
                .arg(fuzz_dir.join("corpus").join(target))
                .args(["--", &format!("-max_total_time={seconds}")]),
        )
        .with_context(|| {
            format!("fuzz target {target} failed: its input is in fuzz/artifacts/{target}/")
        })?;
    }
    Ok(())
}

fn ensure_cargo_fuzz() -> Result<()> {
    let installed = nightly_cargo()
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        println!("installing cargo-fuzz");
        check(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}

/// `rustup run nightly cargo`, without the outer (stable) cargo's settings.
fn nightly_cargo() -> Command {
    let mut command = Command::new("rustup");
    command.args(["run", "nightly", "cargo"]);
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
        command.env_remove(var);
    }
    command
}
