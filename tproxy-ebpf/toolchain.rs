//! Which nightly builds tproxy-ebpf: the dated one it is tested with, never whatever
//! `nightly` happens to be installed (a newer one may not build the program). Shared, as a
//! module of each, by tproxy-user's build script, which builds the program with it, and by
//! `cargo xtask setup`, which installs it, so the two always agree.

use std::{fmt, process::Command};

/// The pinned nightly, as rustup names it (and `rust-toolchain.toml` next to this file).
pub const PINNED: &str = "nightly-2026-05-20";
/// The commit of the compiler in [`PINNED`], from its `rustc -vV`. A plain `nightly` built
/// from it is the same compiler, and is used as it is where the dated one cannot be
/// downloaded.
pub const PINNED_COMMIT: &str = "e50aa6fba4e63ab34c72bf9acfd2c307c1155d1a";
/// How [`PINNED`]'s compiler names itself, for messages.
pub const PINNED_RUSTC: &str = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)";

/// An installed toolchain that builds the program.
pub struct Toolchain {
    /// rustup's name for it: [`PINNED`], or `nightly` when that is the same compiler.
    pub name: &'static str,
    /// Its `rustc -vV`.
    pub rustc: String,
}

impl Toolchain {
    /// The first line of `rustc -vV` ("rustc 1.97.0-nightly (e50aa6fba 2026-05-19)").
    pub fn version(&self) -> &str {
        self.rustc.lines().next().unwrap_or_default()
    }
}

/// Why no installed toolchain builds the program.
pub enum Missing {
    /// No `nightly` either.
    NoNightly,
    /// A plain `nightly` of another build; its `rustc -vV` first line.
    OtherNightly(String),
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tproxy-ebpf is built with {PINNED} ({PINNED_RUSTC}), which is not installed"
        )?;
        match self {
            Missing::NoNightly => Ok(()),
            Missing::OtherNightly(version) => write!(
                f,
                "; the installed `nightly` is another compiler ({version}), which is not used"
            ),
        }
    }
}

/// The toolchain to build the program with: [`PINNED`] if rustup has it, otherwise a plain
/// `nightly` built from [`PINNED_COMMIT`].
pub fn find() -> Result<Toolchain, Missing> {
    if installed(PINNED) {
        if let Some(rustc) = rustc_of(PINNED) {
            return Ok(Toolchain {
                name: PINNED,
                rustc,
            });
        }
    }
    if !installed("nightly") {
        return Err(Missing::NoNightly);
    }
    let rustc = rustc_of("nightly").ok_or(Missing::NoNightly)?;
    let commit = rustc
        .lines()
        .find_map(|line| line.strip_prefix("commit-hash: "))
        .map(str::trim);
    if commit == Some(PINNED_COMMIT) {
        return Ok(Toolchain {
            name: "nightly",
            rustc,
        });
    }
    let version = rustc.lines().next().unwrap_or_default().to_string();
    Err(Missing::OtherNightly(version))
}

/// Whether rustup has toolchain `name`. Asked first so that nothing is downloaded by asking.
fn installed(name: &str) -> bool {
    rustup(&["toolchain", "list"]).is_some_and(|list| lists(&list, name))
}

/// Whether `rustup toolchain list` output has `name` (e.g. `nightly` for
/// `nightly-x86_64-unknown-linux-gnu`, but not for `nightly-2026-05-20-x86_64-…`).
fn lists(list: &str, name: &str) -> bool {
    list.lines()
        .filter_map(|line| line.split_whitespace().next())
        .any(|toolchain| {
            toolchain
                .strip_prefix(name)
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(|host| !host.starts_with(|c: char| c.is_ascii_digit()))
        })
}

fn rustc_of(name: &str) -> Option<String> {
    rustup(&["run", name, "rustc", "-vV"])
}

fn rustup(args: &[&str]) -> Option<String> {
    let output = Command::new("rustup").args(args).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dated_nightly_is_not_the_plain_one() {
        let list = "stable-x86_64-unknown-linux-gnu (active, default)\n\
                    nightly-2026-05-20-x86_64-unknown-linux-gnu\n";
        assert!(lists(list, PINNED));
        assert!(!lists(list, "nightly"));
        assert!(lists("nightly-x86_64-unknown-linux-gnu\n", "nightly"));
        assert!(!lists("nightly-x86_64-unknown-linux-gnu\n", PINNED));
        assert!(!lists(
            "nightly-2026-05-21-x86_64-unknown-linux-gnu\n",
            PINNED
        ));
    }
}
