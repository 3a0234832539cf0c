//! Where `tproxy run --pin` keeps the state that outlives its process: the program's maps and
//! its links, as files on a bpf filesystem. One directory per instance (network namespace and
//! routing table, as for the instance lock):
//!
//! ```text
//! <pin dir>/netns-<inode>-table-<table>/
//!     ACTIVE_GENERATION, PORT_CLASSES, MARK_RULES, RULES_*, LISTENERS,
//!     TIME_WAIT_FLOWS, COUNTERS, LOCAL_SELECTIONS, LOCAL_DECISIONS, LOCAL_ROUTES_*,
//!     LOCAL_UDP_FLOWS                                                                  maps
//!     tc-ingress-<interface>                                                           TCX links
//!     sk-lookup                                                                        netns link
//!     cgroup-<cgroup id>-<program>                                    cgroup links (`--local`)
//! ```
//!
//! A link stays attached for as long as its file exists, whoever holds it open; removing the
//! files (`tproxy cleanup`) is what detaches a pinned program.

use std::{
    ffi::CString,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::MetadataExt},
    },
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

/// File-name prefix of the TCX link pinned for an interface.
const TC_LINK_PREFIX: &str = "tc-ingress-";
/// File name of the pinned sk_lookup link.
const SK_LOOKUP_LINK: &str = "sk-lookup";
/// File-name prefix of the links pinned for the connect, sendmsg and recvmsg programs on a
/// cgroup.
const CGROUP_LINK_PREFIX: &str = "cgroup-";

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
    /// would misread (the counts start again from zero), and the rules tried one by one and
    /// the local selections with entries of another size, which the programs cannot be
    /// loaded with (both are written again anyway), and the local UDP flows of another size
    /// or count (the flows followed are lost: see `tproxy_common::local_udp`). The next load
    /// creates and pins new ones.
    pub fn discard_maps_of_another_layout(&self) -> Result<()> {
        use tproxy_common::{
            local_origin::{Selection, SELECTIONS_MAP},
            local_udp::{UdpFlow, MAX_UDP_FLOWS, UDP_FLOWS_MAP},
            maps::{MarkRules, COUNTERS, COUNTERS_LEN, MARK_RULES},
        };
        let rules_size = std::mem::size_of::<MarkRules>() as u32;
        let selection_size = std::mem::size_of::<Selection>() as u32;
        let flow_size = std::mem::size_of::<UdpFlow>() as u32;
        let checks = [
            (COUNTERS, "packet counters", "entries", COUNTERS_LEN, true),
            (
                MARK_RULES,
                "rules tried one by one",
                "bytes an entry",
                rules_size,
                false,
            ),
            (
                SELECTIONS_MAP,
                "local selections",
                "bytes an entry",
                selection_size,
                false,
            ),
            (
                UDP_FLOWS_MAP,
                "local UDP flows",
                "bytes an entry",
                flow_size,
                false,
            ),
            (
                UDP_FLOWS_MAP,
                "local UDP flows",
                "entries",
                MAX_UDP_FLOWS,
                true,
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

    /// Where the link of `program` on the cgroup with id `cgroup_id` (its directory's inode)
    /// is pinned: a cgroup removed and created again has another id, so its old links are
    /// not mistaken for its own.
    pub fn cgroup_link(&self, cgroup_id: u64, program: &str) -> PathBuf {
        self.dir
            .join(format!("{CGROUP_LINK_PREFIX}{cgroup_id}-{program}"))
    }

    /// The files of the pinned cgroup links.
    pub fn cgroup_links(&self) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut links: Vec<PathBuf> = entries
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let name = entry.file_name();
                name.as_bytes()
                    .starts_with(CGROUP_LINK_PREFIX.as_bytes())
                    .then(|| entry.path())
            })
            .collect();
        links.sort();
        links
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

/// Puts `program` on the link pinned at `path` in one step (`BPF_LINK_UPDATE`): no moment
/// without a program at the link's hook. For cgroup links, on which aya 0.14 replaces no
/// program.
pub fn replace_link_program(path: &Path, program: BorrowedFd<'_>) -> std::io::Result<()> {
    let link = pinned_object(path)?;
    /// `union bpf_attr` for `BPF_LINK_UPDATE`.
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let attr = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &attr).map(drop)
}

/// `enum bpf_cmd` values (include/uapi/linux/bpf.h).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// A descriptor of the bpf object pinned at `path`.
fn pinned_object(path: &Path) -> std::io::Result<OwnedFd> {
    let name = CString::new(path.as_os_str().as_bytes())?;
    /// `union bpf_attr` for `BPF_OBJ_GET`.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let attr = ObjGet {
        pathname: name.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = bpf(BPF_OBJ_GET, &attr)?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor, ours alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The bpf(2) system call with command `cmd` and its attributes `attr`.
fn bpf<T>(cmd: libc::c_long, attr: &T) -> std::io::Result<i32> {
    // SAFETY: `attr` is a `bpf_attr` prefix for `cmd`, valid for the call, of the size given;
    // the kernel reads no further.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            std::mem::size_of::<T>(),
        )
    };
    match ret {
        ret if ret < 0 => Err(std::io::Error::last_os_error()),
        ret => Ok(ret as i32),
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
