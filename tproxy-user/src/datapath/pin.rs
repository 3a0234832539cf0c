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
    /// or count than `udp_flows` places (the flows followed are lost: see
    /// `tproxy_common::local_udp`). The next load creates and pins new ones.
    pub fn discard_maps_of_another_layout(&self, udp_flows: u32) -> Result<()> {
        use tproxy_common::{
            local_origin::{Selection, SELECTIONS_MAP},
            local_udp::{UdpFlow, UDP_FLOWS_MAP},
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
            (UDP_FLOWS_MAP, "local UDP flows", "entries", udp_flows, true),
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

    /// Whether the network namespace this state was pinned in no longer exists: its
    /// sk_lookup link, pinned by every `run --pin`, is detached by the kernel when its
    /// namespace goes (the link then names namespace 0). A namespace's inode number may be
    /// given to a new namespace later, and with it this directory's name: that namespace must
    /// not adopt a dead one's maps and links. Unknown (no link, unreadable): `false`.
    pub fn left_by_a_gone_namespace(&self) -> bool {
        pinned_object(&self.sk_lookup_link())
            .and_then(|link| netns_link_inode(&link))
            .is_ok_and(|inode| inode == Some(0))
    }

    /// The instances' directories under `pin_dir` whose network namespace no longer exists
    /// (see [`Self::left_by_a_gone_namespace`]).
    pub fn of_gone_namespaces(pin_dir: &Path) -> Vec<PinnedState> {
        let Ok(entries) = std::fs::read_dir(pin_dir) else {
            return Vec::new();
        };
        let mut gone: Vec<PinnedState> = entries
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let name = entry.file_name().into_string().ok()?;
                let (_, table) = name.strip_prefix("netns-")?.split_once("-table-")?;
                table.parse::<u32>().ok()?;
                Some(PinnedState { dir: entry.path() })
            })
            .filter(PinnedState::left_by_a_gone_namespace)
            .collect();
        gone.sort_by(|a, b| a.dir.cmp(&b.dir));
        gone
    }

    /// Removes the state of network namespaces that no longer exist under `pin_dir`
    /// (their links are detached already; their maps would stay in kernel memory for good),
    /// saying which; returns how many directories went. Another namespace's leftovers never
    /// fail the caller: one that cannot be removed (or that another start removes first) is
    /// only logged.
    pub fn remove_of_gone_namespaces(pin_dir: &Path) -> usize {
        let mut removed = 0;
        for state in Self::of_gone_namespaces(pin_dir) {
            // Again right before: another start may have removed it and a namespace with the
            // same inode made it anew (its link then names that namespace, or is not pinned
            // yet).
            if !state.left_by_a_gone_namespace() {
                continue;
            }
            match state.remove() {
                Ok(files) => {
                    removed += 1;
                    log::warn!(
                        "removed the state pinned in {} ({files} files): its network \
                         namespace no longer exists",
                        state.dir.display()
                    );
                }
                Err(_) if !state.dir.exists() => {}
                Err(error) => log::warn!("{error:#}"),
            }
        }
        removed
    }

    /// Unpins everything (detaching the links nobody else holds) and removes the directory;
    /// returns how many files went.
    pub fn remove(&self) -> Result<usize> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Ok(0);
        };
        let mut paths = entries
            .map(|entry| entry.map(|entry| entry.path()))
            .collect::<std::io::Result<Vec<_>>>()?;
        // The sk_lookup link last: while it is there, a directory left half removed is still
        // told for a dead namespace's (see `left_by_a_gone_namespace`), and removed again.
        paths.sort_by_key(|path| path.ends_with(SK_LOOKUP_LINK));
        let mut removed = 0;
        for path in paths {
            match std::fs::remove_file(&path) {
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                result => result.with_context(|| format!("unpinning {}", path.display()))?,
            }
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

/// The namespace inode a network-namespace link (`BPF_LINK_TYPE_NETNS`) is attached to (0
/// once its namespace is gone), from `BPF_OBJ_GET_INFO_BY_FD`; `None` for another kind.
fn netns_link_inode(link: &OwnedFd) -> std::io::Result<Option<u32>> {
    /// `BPF_LINK_TYPE_NETNS`.
    const NETNS_LINK: u32 = 5;
    // `struct bpf_link_info`: type, id, prog_id, then (8-byte aligned) the union whose
    // `netns` member is netns_ino, attach_type.
    let mut info = [0u32; 16];
    /// `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
    #[repr(C)]
    struct GetInfo {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let attr = GetInfo {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &attr)?;
    Ok((info[0] == NETNS_LINK).then_some(info[4]))
}

/// `enum bpf_cmd` values (include/uapi/linux/bpf.h).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
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
