//! Steering what local processes originate (`tproxy run --local`): the cgroup v2 hierarchy is
//! found in /proc/mounts, the selected cgroups are checked, and the `cgroup/connect4` and
//! `cgroup/connect6` programs are attached to each of them. A connecting socket of a selected
//! process whose destination a steer rule takes gets the routing mark; the policy routing
//! (with `src 127.0.0.1`/`::1` on its local routes) sends its packets over `lo`, where the tc
//! program steers them to the listener (see `tproxy_common::local_origin`).
//!
//! An unconnected UDP socket's datagrams (`sendto`) cannot be steered by the socket's mark:
//! the kernel has taken the datagram's mark from the socket before a `cgroup/sendmsg`
//! program runs, and one socket may send to steered and unsteered destinations. The
//! `cgroup/sendmsg4` and `cgroup/sendmsg6` programs, attached next to the connect programs,
//! give each steered datagram a loopback source instead, which the policy routing's
//! `from 127.84.80.1 iif lo` rule sends over `lo` (see `routing`).
//!
//! The attachments are links owned by this process: they go when it exits, or when a start
//! fails (the program, and with it every link, is dropped).

use std::{
    fs::File,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Component, Path, PathBuf},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use tproxy_common::local_origin::{
    UidRange, CONNECT4_PROGRAM_NAME, CONNECT6_PROGRAM_NAME, MAX_UID_RANGES, SENDMSG4_PROGRAM_NAME,
    SENDMSG6_PROGRAM_NAME,
};

use crate::{
    datapath::steering::Steering,
    stats::{LocalOriginCounts, LocalOriginStats},
};

/// The local processes whose connections the rules for local connections apply to (`--local
/// --cgroup --uid`, or the rules' `cgroup` and `uid`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalOrigin {
    /// cgroup v2 paths, relative to the hierarchy's root (`/app.slice/app.service`).
    pub cgroups: Vec<String>,
    /// The users whose processes are steered; empty: every user.
    pub uids: Vec<UidRange>,
}

impl LocalOrigin {
    /// The selection of `cgroups` (none: the root, every process) and `uids` (none: every
    /// user), in one order whatever the order written, so that equal selections compare
    /// equal.
    pub fn new(cgroups: Vec<String>, mut uids: Vec<UidRange>) -> Self {
        // `/app/` and `/app` are one cgroup.
        let mut cgroups: Vec<String> = cgroups
            .into_iter()
            .map(|path| match path.trim_end_matches('/') {
                "" if path.starts_with('/') => "/".to_string(),
                trimmed => trimmed.to_string(),
            })
            .collect();
        if cgroups.is_empty() {
            cgroups.push("/".to_string());
        }
        cgroups.sort();
        cgroups.dedup();
        uids.sort_by_key(|range| (range.first, range.last));
        uids.dedup();
        LocalOrigin { cgroups, uids }
    }

    /// The stats of this selection attached with `cgroup_links` links.
    pub(crate) fn stats(&self, cgroup_links: u64) -> LocalOriginStats {
        LocalOriginStats {
            cgroups: self.cgroups.clone(),
            uids: self.uids.iter().map(ToString::to_string).collect(),
            counts: LocalOriginCounts {
                selected_cgroups: self.cgroups.len() as u64,
                selected_uid_ranges: self.uids.len() as u64,
                cgroup_links,
            },
        }
    }
}

impl std::fmt::Display for LocalOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cgroup {}", self.cgroups.join(", "))?;
        match self.uids.as_slice() {
            [] => write!(f, ", every user"),
            uids => {
                let uids: Vec<String> = uids.iter().map(ToString::to_string).collect();
                write!(f, ", uid {}", uids.join(", "))
            }
        }
    }
}

/// The connect programs' globals, fixed at load.
#[derive(Clone, Copy, Debug)]
pub struct LocalGlobals {
    /// tproxy's own cgroup (see [`own_cgroup_id`]).
    pub own_cgroup: u64,
    /// tproxy's network namespace (see [`own_netns_cookie`]).
    pub own_netns: u64,
    pub uid_ranges: [UidRange; MAX_UID_RANGES],
    /// How many of `uid_ranges` are used (0: every user).
    pub uid_ranges_len: u32,
}

impl LocalGlobals {
    /// The globals for `selection`, for a process in cgroup `own_cgroup`.
    pub fn new(selection: &LocalOrigin, own_cgroup: u64, own_netns: u64) -> Result<Self> {
        let uids = &selection.uids;
        if uids.len() > MAX_UID_RANGES {
            bail!(
                "{} uid ranges selected; at most {MAX_UID_RANGES} are supported",
                uids.len()
            );
        }
        let mut uid_ranges = [UidRange::default(); MAX_UID_RANGES];
        uid_ranges[..uids.len()].copy_from_slice(uids);
        Ok(LocalGlobals {
            own_cgroup,
            own_netns,
            uid_ranges,
            uid_ranges_len: uids.len() as u32,
        })
    }
}

/// Where the cgroup v2 hierarchy is mounted, from /proc/mounts.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    cgroup2_root_in(&mounts).ok_or_else(|| {
        anyhow!(
            "no cgroup v2 hierarchy is mounted (no `cgroup2` line in /proc/mounts): --local \
             selects processes by cgroup v2 path; mount it, e.g. \
             `mount -t cgroup2 none /sys/fs/cgroup/unified` (under `ip netns exec`, which \
             mounts a /sys of its own without it, start tproxy with `nsenter \
             --net=/run/netns/NAME` instead)"
        )
    })
}

/// The mount point of the first `cgroup2` file system in a /proc/mounts text (octal escapes
/// such as `\040` for a space decoded).
fn cgroup2_root_in(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (kind == "cgroup2").then(|| PathBuf::from(unescape_mount_field(target)))
    })
}

fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            let text = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Refuses a cgroup path that is not written from the hierarchy's root
/// (`/app.slice/app.service`) or leaves it (`.`, `..`): what `check` can tell without the
/// hierarchy.
pub fn check_cgroup_path(path: &str) -> Result<()> {
    if !path.starts_with('/') {
        bail!("cgroup `{path}`: give the path from the cgroup v2 root, starting with `/` (e.g. /system.slice/app.service)");
    }
    if Path::new(path)
        .components()
        .any(|c| !matches!(c, Component::RootDir | Component::Normal(_)))
    {
        bail!("cgroup `{path}`: `.` and `..` are not allowed in a cgroup path");
    }
    Ok(())
}

/// The directory of cgroup `path` (relative to the hierarchy's `root`): it must be written
/// from the root, stay inside the hierarchy (see [`check_cgroup_path`]), and exist.
pub fn cgroup_dir(root: &Path, path: &str) -> Result<PathBuf> {
    check_cgroup_path(path)?;
    let relative = Path::new(path);
    let dir = root.join(relative.strip_prefix("/").unwrap_or(relative));
    match std::fs::metadata(&dir) {
        Ok(meta) if meta.is_dir() => Ok(dir),
        Ok(_) => bail!("cgroup `{path}`: {} is not a directory", dir.display()),
        Err(error) => Err(error).with_context(|| {
            format!(
                "cgroup `{path}`: no such cgroup under the cgroup v2 root {} ({})",
                root.display(),
                dir.display()
            )
        }),
    }
}

/// The id of this process's own cgroup v2 (the inode of its directory), whose sockets the
/// connect programs never mark.
pub fn own_cgroup_id(root: &Path) -> Result<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    let path = own
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or_else(|| anyhow!("/proc/self/cgroup names no cgroup v2 (no `0::` line)"))?;
    let dir = root.join(path.trim_start_matches('/'));
    let meta = std::fs::metadata(&dir)
        .with_context(|| format!("reading tproxy's own cgroup {}", dir.display()))?;
    Ok(meta.ino())
}

/// Checks `selection` against the system before anything is installed: the cgroup v2 root,
/// each selected cgroup, and tproxy's own cgroup. Returns the root and the programs' globals.
pub fn prepare(selection: &LocalOrigin) -> Result<(PathBuf, LocalGlobals)> {
    let root = cgroup2_root()?;
    for path in &selection.cgroups {
        cgroup_dir(&root, path)?;
    }
    let globals = LocalGlobals::new(selection, own_cgroup_id(&root)?, own_netns_cookie()?)?;
    Ok((root, globals))
}

/// The cookie of this process's network namespace, as `bpf_get_netns_cookie` reports it.
pub fn own_netns_cookie() -> Result<u64> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
        .context("opening a socket to read this network namespace's cookie")?;
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, which outlives the call.
    let ret = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error()).context(
            "reading this network namespace's cookie (SO_NETNS_COOKIE, kernel 5.14 or later): \
             --local marks only the sockets of tproxy's own namespace",
        );
    }
    Ok(cookie)
}

/// Attaches the connect and sendmsg programs to each selected cgroup. The links live as long
/// as the program (see the module's documentation).
pub fn attach(steering: &mut Steering, root: &Path, selection: &LocalOrigin) -> Result<()> {
    let mut links = 0;
    let dirs: Vec<(String, PathBuf)> = selection
        .cgroups
        .iter()
        .map(|path| Ok((path.clone(), cgroup_dir(root, path)?)))
        .collect::<Result<_>>()?;
    for name in [
        CONNECT4_PROGRAM_NAME,
        CONNECT6_PROGRAM_NAME,
        SENDMSG4_PROGRAM_NAME,
        SENDMSG6_PROGRAM_NAME,
    ] {
        let program: &mut CgroupSockAddr = steering
            .ebpf_mut()
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?
            .try_into()
            .with_context(|| format!("program {name} has the wrong type"))?;
        program
            .load()
            .with_context(|| format!("the kernel's verifier rejected {name}"))?;
        for (path, dir) in &dirs {
            let cgroup = File::open(dir)
                .with_context(|| format!("cgroup `{path}`: opening {}", dir.display()))?;
            // A link (kernel 5.7+) always sits next to other programs at the same hook
            // (systemd's, a container runtime's), and takes no flags: `Single` passes none.
            program
                .attach(cgroup, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to cgroup `{path}`"))?;
            links += 1;
        }
    }
    steering.set_local_origin(selection.stats(links));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_in_a_hybrid_layout() {
        let mounts = "\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";
        assert_eq!(
            cgroup2_root_in(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_root_in("none /mnt/cg\\040two cgroup2 rw 0 0\n"),
            Some(PathBuf::from("/mnt/cg two"))
        );
        assert_eq!(
            cgroup2_root_in("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"),
            None
        );
    }

    #[test]
    fn cgroup_paths_are_checked_and_errors_name_them() {
        let root = std::env::temp_dir();
        let error = |path: &str| format!("{:#}", cgroup_dir(&root, path).unwrap_err());
        assert!(error("app.slice")
            .contains("cgroup `app.slice`: give the path from the cgroup v2 root"));
        assert!(error("/a/../../etc").contains("cgroup `/a/../../etc`: `.` and `..`"));
        assert!(
            error("/no-such-cgroup-here").contains("cgroup `/no-such-cgroup-here`: no such cgroup")
        );
        assert_eq!(cgroup_dir(&root, "/").unwrap(), root);
    }

    #[test]
    fn at_most_sixteen_uid_ranges() {
        let one = UidRange {
            first: 1000,
            last: 1999,
        };
        let selection = |uids: Vec<UidRange>| LocalOrigin {
            cgroups: Vec::new(),
            uids,
        };
        let globals = LocalGlobals::new(&selection(vec![one]), 7, 9).unwrap();
        assert_eq!((globals.uid_ranges[0], globals.uid_ranges_len), (one, 1));
        let error = LocalGlobals::new(&selection(vec![one; MAX_UID_RANGES + 1]), 7, 9).unwrap_err();
        assert!(error
            .to_string()
            .contains("17 uid ranges selected; at most 16"));
    }
}
