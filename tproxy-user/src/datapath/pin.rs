//! Where `tproxy run --pin` keeps the state that outlives its process: the program's maps and
//! its links, as files on a bpf filesystem. One directory per instance (network namespace and
//! routing table, as for the instance lock):
//!
//! ```text
//! <pin dir>/netns-<inode>-table-<table>/
//!     ACTIVE_GENERATION, PORT_CLASSES, MARK_RULES, RULES_*, LISTENERS,
//!     TIME_WAIT_FLOWS, COUNTERS                                                        maps
//!     tc-ingress-<interface>                                                           TCX links
//!     sk-lookup                                                                        netns link
//! ```
//!
//! A link stays attached for as long as its file exists, whoever holds it open; removing the
//! files (`tproxy cleanup`) is what detaches a pinned program.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

/// File-name prefix of the TCX link pinned for an interface.
const TC_LINK_PREFIX: &str = "tc-ingress-";
/// File name of the pinned sk_lookup link.
const SK_LOOKUP_LINK: &str = "sk-lookup";

/// One instance's pinned-state directory.
#[derive(Clone, Debug)]
pub struct PinnedState {
    dir: PathBuf,
}

impl PinnedState {
    /// The directory for routing table `table` in this network namespace under `pin_dir`.
    pub fn locate(pin_dir: &Path, table: u32) -> Result<Self> {
        let netns = std::fs::metadata("/proc/self/ns/net")
            .context("reading this process's network namespace")?
            .ino();
        Ok(PinnedState {
            dir: pin_dir.join(format!("netns-{netns}-table-{table}")),
        })
    }

    /// The directory itself.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether an earlier `run --pin` left state here.
    pub fn exists(&self) -> bool {
        self.dir
            .join(tproxy_common::maps::ACTIVE_GENERATION)
            .exists()
    }

    /// Creates the directory, after checking that it is on a bpf filesystem: pinning
    /// anywhere else fails, and a bpffs mounted only in this process's mount namespace (as
    /// under `ip netns exec` without one) would vanish with the process.
    pub fn prepare(&self) -> Result<()> {
        let base = self.dir.parent().unwrap_or(&self.dir);
        if !on_bpffs(base)? {
            bail!(
                "--pin-dir {}: not on a bpf filesystem, so nothing can be pinned there; mount \
                 one first (mount -t bpf bpf /sys/fs/bpf) or name a directory on one",
                base.display()
            );
        }
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))
    }

    /// Where map `name` is pinned.
    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Unpins the maps an earlier version pinned with another layout: the counters map with
    /// another length (the program counts more outcomes now), whose numbers today's layout
    /// would misread (the counts start again from zero), and the rules tried one by one with
    /// entries of another size, which the program cannot be loaded with (the rules are
    /// written again anyway). The next load creates and pins new ones.
    pub fn discard_maps_of_another_layout(&self) -> Result<()> {
        use tproxy_common::maps::{MarkRules, COUNTERS, COUNTERS_LEN, MARK_RULES};
        let rules_size = std::mem::size_of::<MarkRules>() as u32;
        let checks = [
            (COUNTERS, "packet counters", "entries", COUNTERS_LEN, true),
            (
                MARK_RULES,
                "rules tried one by one",
                "bytes an entry",
                rules_size,
                false,
            ),
        ];
        for (name, what, unit, now, by_length) in checks {
            let path = self.map(name);
            let Ok(info) = aya::maps::MapInfo::from_pin(&path) else {
                continue;
            };
            let pinned = if by_length {
                info.max_entries()
            } else {
                info.value_size()
            };
            if pinned == now {
                continue;
            }
            log::warn!(
                "the pinned {what} have another layout ({pinned} {unit}, {now} now): \
                 starting them again"
            );
            std::fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
        }
        Ok(())
    }

    /// Where the TCX link on `iface` is pinned.
    pub fn tc_link(&self, iface: &str) -> PathBuf {
        self.dir.join(format!("{TC_LINK_PREFIX}{iface}"))
    }

    /// Where the sk_lookup link is pinned.
    pub fn sk_lookup_link(&self) -> PathBuf {
        self.dir.join(SK_LOOKUP_LINK)
    }

    /// The interfaces with a pinned TCX link, and the link files.
    pub fn tc_links(&self) -> Vec<(String, PathBuf)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut links: Vec<(String, PathBuf)> = entries
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let name = entry.file_name().into_string().ok()?;
                let iface = name.strip_prefix(TC_LINK_PREFIX)?.to_string();
                Some((iface, entry.path()))
            })
            .collect();
        links.sort();
        links
    }

    /// Unpins everything (detaching the links nobody else holds) and removes the directory;
    /// returns how many files went.
    pub fn remove(&self) -> Result<usize> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Ok(0);
        };
        let mut removed = 0;
        for entry in entries {
            let path = entry?.path();
            std::fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
            removed += 1;
        }
        std::fs::remove_dir(&self.dir)
            .with_context(|| format!("removing {}", self.dir.display()))?;
        Ok(removed)
    }
}

/// Whether `dir` (or, while it does not exist, the nearest ancestor that does) is on a bpf
/// filesystem.
pub fn on_bpffs(dir: &Path) -> Result<bool> {
    let mut existing = dir;
    while !existing.exists() {
        existing = existing.parent().unwrap_or(Path::new("/"));
    }
    let fs = nix::sys::statfs::statfs(existing)
        .with_context(|| format!("--pin-dir {}: statfs", dir.display()))?;
    Ok(fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}
