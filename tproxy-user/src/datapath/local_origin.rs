//! Steering what local processes originate (`tproxy run --local`): the cgroup v2 hierarchy is
//! found in /proc/mounts, the selected cgroups are checked, and the `cgroup/connect4` and
//! `cgroup/connect6` programs are attached to them (to the root when some selection takes
//! every cgroup). Each rule for local connections has a selection (its `cgroup`, `uid` and
//! `classid`);
//! the programs find the selections a connecting process is in, and a connecting socket whose
//! destination the best of their steer rules takes gets the routing mark, and that rule's
//! listener in its socket storage; the policy routing (with `src 127.0.0.1`/`::1` on its
//! local routes) sends its packets over `lo`, where the loopback tc program hands them to that
//! listener (see `tproxy_common::local_origin`).
//!
//! An unconnected UDP socket's datagrams (`sendto`) cannot be steered by the socket's mark:
//! the kernel has taken the datagram's mark from the socket before a `cgroup/sendmsg`
//! program runs, and one socket may send to steered and unsteered destinations. The
//! `cgroup/sendmsg4` and `cgroup/sendmsg6` programs, attached next to the connect programs,
//! give each steered datagram a loopback source instead, which the policy routing's
//! `from 127.84.80.1 iif lo` rule sends over `lo` (see `routing`).
//!
//! While a UDP rule for local connections has `ct_direction`, the `cgroup/recvmsg4` and
//! `cgroup/recvmsg6` programs are attached beside them, to follow what each socket receives
//! (see `tproxy_common::local_udp`); they come and go with such rules.
//!
//! The attachments are links owned by this process: they go when it exits, or when a start
//! fails (the program, and with it every link, is dropped). With `--pin` they are pinned
//! instead, one file per program and cgroup (see `pin`), and a start over pinned state puts
//! its programs on the pinned links in one step, as on the TCX links.
//!
//! A selected cgroup that is removed and created again (systemd does that when it restarts a
//! unit) is a new directory, with a new id and without the programs: while serving, tproxy
//! follows the selected cgroups' parent directories (`daemon::cgroups`) and puts the
//! selections in force again with [`follow`], which attaches to the new directory and writes
//! its id; meanwhile a selected cgroup that is missing selects nobody.

use std::{
    collections::BTreeMap,
    fs::File,
    os::{
        fd::{AsFd, AsRawFd},
        unix::fs::MetadataExt,
    },
    path::{Component, Path, PathBuf},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::Array,
    programs::{
        cgroup_sock_addr::CgroupSockAddrLinkId, links::FdLink, CgroupAttachMode, CgroupSockAddr,
    },
};
use tproxy_common::local_origin::{
    ClassidRange, SelectedCgroup, Selection, UidRange, CONNECT4_PROGRAM_NAME,
    CONNECT6_PROGRAM_NAME, MAX_CLASSID_RANGES, MAX_GID_RANGES, MAX_SELECTIONS,
    MAX_SELECTION_CGROUPS, MAX_UID_RANGES, SELECTIONS_MAP, SENDMSG4_PROGRAM_NAME,
    SENDMSG6_PROGRAM_NAME,
};
use tproxy_common::local_udp::{
    DEFAULT_UDP_STREAM_TIMEOUT_NS, DEFAULT_UDP_TIMEOUT_NS, RECVMSG4_PROGRAM_NAME,
    RECVMSG6_PROGRAM_NAME,
};

use crate::{
    datapath::{pin, steering::Steering},
    stats::{LocalOriginCounts, LocalOriginStats},
};

/// The local processes whose connections the rules for local connections apply to (`--local
/// --cgroup --uid`, or the rules' `cgroup`, `uid`, `gid` and `classid`), and the interface
/// those connections' routes leave by (the rules' `out_interface`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalOrigin {
    /// cgroup v2 paths, relative to the hierarchy's root (`/app.slice/app.service`).
    pub cgroups: Vec<String>,
    /// The users whose processes are steered; empty: every user.
    pub uids: Vec<UidRange>,
    /// The cgroup v1 net_cls classes (class ids) whose processes are steered; empty: every
    /// process, in a class or not.
    pub classids: Vec<ClassidRange>,
    /// The groups (real group ids) whose processes are steered; empty: every group.
    pub gids: Vec<UidRange>,
    /// The name or pattern of the interface the route to a connection's destination must
    /// leave by; `None`: any route. Rules with an `out_interface` are a selection of their
    /// own, even with the processes of another one: the programs ask the selection's rules
    /// only about the connections whose route has its bit (see
    /// `tproxy_common::local_origin::route_selected`), so that these rules are looked up in
    /// the stages like any other rather than tried one by one (see `datapath::rules`).
    pub out_interface: Option<String>,
}

impl LocalOrigin {
    /// The selection of `cgroups` (none: the root, every process) and `uids` (none: every
    /// user), in one order whatever the order written, so that equal selections compare
    /// equal.
    pub fn new(cgroups: Vec<String>, mut uids: Vec<UidRange>) -> Self {
        // `/app/`, `//app` and `/app/.` are the cgroup `/app`. A path not from the root is
        // kept as written, for `check_cgroup_path` to refuse.
        let mut cgroups: Vec<String> = cgroups
            .into_iter()
            .map(|path| match path.starts_with('/') {
                true => {
                    let parts: Vec<String> = Path::new(&path)
                        .components()
                        .filter_map(|part| match part {
                            Component::RootDir => None,
                            part => Some(part.as_os_str().to_string_lossy().into_owned()),
                        })
                        .collect();
                    format!("/{}", parts.join("/"))
                }
                false => path,
            })
            .collect();
        if cgroups.is_empty() {
            cgroups.push("/".to_string());
        }
        cgroups.sort();
        cgroups.dedup();
        uids.sort_by_key(|range| (range.first, range.last));
        uids.dedup();
        LocalOrigin {
            cgroups,
            uids,
            classids: Vec::new(),
            gids: Vec::new(),
            out_interface: None,
        }
    }

    /// The selection taking only the connections of this one's processes whose route leaves
    /// by `out_interface` (a name or pattern; `None`: any route).
    pub fn with_out_interface(self, out_interface: Option<String>) -> Self {
        LocalOrigin {
            out_interface,
            ..self
        }
    }

    /// The selection taking only the processes of the groups `gids` (none: every group)
    /// among this one's, in one order whatever the order written.
    pub fn with_gids(mut self, mut gids: Vec<UidRange>) -> Self {
        gids.sort_by_key(|range| (range.first, range.last));
        gids.dedup();
        self.gids = gids;
        self
    }

    /// The selection taking only the processes of the net_cls classes `classids` (none:
    /// every process) among this one's, in one order whatever the order written.
    pub fn with_classids(mut self, mut classids: Vec<ClassidRange>) -> Self {
        classids.sort_by_key(|range| (range.first, range.last));
        classids.dedup();
        self.classids = classids;
        self
    }

    /// The selection of every process: what a rule without `cgroup` and `uid` has.
    pub fn everyone() -> Self {
        LocalOrigin::new(Vec::new(), Vec::new())
    }

    /// Whether the selection takes processes of every cgroup.
    fn every_cgroup(&self) -> bool {
        self.cgroups.iter().any(|cgroup| cgroup == "/")
    }

    /// Whether the selection takes every process: every cgroup, no user, group or class
    /// left out (whatever interface their connections' routes leave by).
    pub fn selects_every_process(&self) -> bool {
        self.every_cgroup()
            && self.uids.is_empty()
            && self.gids.is_empty()
            && self.classids.is_empty()
    }

    /// Refuses a selection with more cgroups, uid, gid or class id ranges than the programs
    /// try.
    pub fn check_size(&self) -> Result<()> {
        if self.gids.len() > MAX_GID_RANGES {
            bail!(
                "{self}: {} gid ranges selected; at most {MAX_GID_RANGES} are supported",
                self.gids.len()
            );
        }
        if self.classids.len() > MAX_CLASSID_RANGES {
            bail!(
                "{self}: {} net_cls class id ranges selected; at most {MAX_CLASSID_RANGES} are \
                 supported",
                self.classids.len()
            );
        }
        if self.uids.len() > MAX_UID_RANGES {
            bail!(
                "{self}: {} uid ranges selected; at most {MAX_UID_RANGES} are supported",
                self.uids.len()
            );
        }
        if !self.every_cgroup() && self.cgroups.len() > MAX_SELECTION_CGROUPS {
            bail!(
                "{self}: {} cgroups selected; at most {MAX_SELECTION_CGROUPS} are supported",
                self.cgroups.len()
            );
        }
        Ok(())
    }

    /// The selection's entry for the programs' map, the cgroup ids read under `root`; a
    /// cgroup that does not exist is refused, or, while it is `followed`, selects nobody.
    fn entry(&self, root: &Path, followed: bool) -> Result<Selection> {
        self.check_size()?;
        let mut entry = Selection {
            in_use: 1,
            uids_len: self.uids.len() as u32,
            ..Selection::default()
        };
        entry.uids[..self.uids.len()].copy_from_slice(&self.uids);
        entry.classids_len = self.classids.len() as u32;
        entry.classids[..self.classids.len()].copy_from_slice(&self.classids);
        entry.gids_len = self.gids.len() as u32;
        entry.gids[..self.gids.len()].copy_from_slice(&self.gids);
        if self.every_cgroup() {
            return Ok(entry);
        }
        for (slot, path) in entry.cgroups.iter_mut().zip(&self.cgroups) {
            let level = Path::new(path).components().count() as u64 - 1;
            let dir = match cgroup_dir(root, path) {
                Ok(dir) => dir,
                Err(error) if followed => {
                    log::warn!("{error:#}: its processes are not steered until it is back");
                    // No cgroup has id 0 (the root's is 1).
                    *slot = SelectedCgroup { id: 0, level };
                    continue;
                }
                Err(error) => return Err(error),
            };
            let id = std::fs::metadata(&dir)
                .with_context(|| format!("cgroup `{path}`: reading {}", dir.display()))?
                .ino();
            *slot = SelectedCgroup { id, level };
        }
        entry.cgroups_len = self.cgroups.len() as u32;
        Ok(entry)
    }
}

/// The selections of the rules for local connections: a rule's `selection` is its index
/// here, and its rules are looked up under `selection_ifindex(index)`. Selection 0 is every
/// process (the rules without `cgroup` and `uid`); the others come in the order the rules
/// first name them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalSelections {
    list: Vec<LocalOrigin>,
    /// Whether some rule has selection 0 (the others are there because a rule has them).
    everyone: bool,
    /// Whether a UDP rule for local connections has `ct_direction`: only then are the
    /// `recvmsg` programs attached, which follow what sockets receive (see
    /// `tproxy_common::local_udp`). Attached, they cost every UDP socket of the host that
    /// asks for its sender's address a socket lock per receive (the kernel's hook is one
    /// switch for all cgroups).
    follows_datagram_directions: bool,
}

impl Default for LocalSelections {
    fn default() -> Self {
        LocalSelections {
            list: vec![LocalOrigin::everyone()],
            everyone: false,
            follows_datagram_directions: false,
        }
    }
}

impl LocalSelections {
    /// The index of `selection`, added if it is new.
    pub fn index_of(&mut self, selection: LocalOrigin) -> Result<u32> {
        if let Some(index) = self.list.iter().position(|known| *known == selection) {
            self.everyone |= index == 0;
            return Ok(index as u32);
        }
        if self.list.len() == MAX_SELECTIONS {
            bail!(
                "{selection}: the rules for local connections select more than \
                 {MAX_SELECTIONS} different sets of processes, the most the programs evaluate \
                 (every process always takes one, and the same processes with another \
                 out_interface take another): give fewer distinct cgroup, uid, gid, classid \
                 and out_interface combinations"
            );
        }
        self.list.push(selection);
        Ok(self.list.len() as u32 - 1)
    }

    /// Has the `recvmsg` programs attached too (see `follows_datagram_directions`).
    pub fn follow_datagram_directions(&mut self, follow: bool) {
        self.follows_datagram_directions = follow;
    }

    /// The programs attached to each of [`LocalSelections::attach_points`].
    fn programs(&self) -> &'static [&'static str] {
        match self.follows_datagram_directions {
            true => &PROGRAMS,
            false => &PROGRAMS[..4],
        }
    }

    /// The selections some rule has, with their index.
    pub fn used(&self) -> impl Iterator<Item = (usize, &LocalOrigin)> {
        let everyone = self.everyone;
        self.list
            .iter()
            .enumerate()
            .filter(move |(index, _)| *index != 0 || everyone)
    }

    /// The selection with `index`.
    pub fn get(&self, index: u32) -> Option<&LocalOrigin> {
        self.list.get(index as usize)
    }

    /// The cgroups the programs are attached to: the root when a selection takes every
    /// cgroup; otherwise each selected cgroup that is not below another one (a process runs
    /// the programs of each attached cgroup it is in or below, once is enough: they test
    /// which selections it is in themselves).
    pub fn attach_points(&self) -> Vec<String> {
        if self.used().any(|(_, selection)| selection.every_cgroup()) {
            return vec!["/".to_string()];
        }
        let all: std::collections::BTreeSet<&String> = self
            .used()
            .flat_map(|(_, selection)| &selection.cgroups)
            .collect();
        let below = |path: &str, other: &str| {
            path.strip_prefix(other)
                .is_some_and(|rest| rest.starts_with('/'))
        };
        all.iter()
            .filter(|path| !all.iter().any(|other| below(path, other)))
            .map(|path| path.to_string())
            .collect()
    }

    /// The stats of these selections, attached with `cgroup_links` links.
    pub(crate) fn stats(&self, cgroup_links: u64) -> LocalOriginStats {
        let used: Vec<&LocalOrigin> = self.used().map(|(_, selection)| selection).collect();
        let mut cgroups: Vec<String> = used.iter().flat_map(|s| s.cgroups.clone()).collect();
        cgroups.sort();
        cgroups.dedup();
        let mut uids: Vec<UidRange> = used.iter().flat_map(|s| s.uids.clone()).collect();
        uids.sort_by_key(|range| (range.first, range.last));
        uids.dedup();
        LocalOriginStats {
            selections: used.iter().map(ToString::to_string).collect(),
            counts: LocalOriginCounts {
                used_selections: used.len() as u64,
                selected_cgroups: cgroups.len() as u64,
                selected_uid_ranges: uids.len() as u64,
                cgroup_links,
            },
            cgroups,
            uids: uids.iter().map(ToString::to_string).collect(),
        }
    }
}

impl std::fmt::Display for LocalSelections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let used: Vec<String> = self.used().map(|(_, s)| s.to_string()).collect();
        match used.is_empty() {
            true => f.write_str("none"),
            false => f.write_str(&used.join("; ")),
        }
    }
}

impl std::fmt::Display for LocalOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cgroup {}", self.cgroups.join(", "))?;
        match self.uids.as_slice() {
            [] => write!(f, ", every user")?,
            uids => {
                let uids: Vec<String> = uids.iter().map(ToString::to_string).collect();
                write!(f, ", uid {}", uids.join(", "))?;
            }
        }
        if !self.gids.is_empty() {
            let gids: Vec<String> = self.gids.iter().map(ToString::to_string).collect();
            write!(f, ", gid {}", gids.join(", "))?;
        }
        if !self.classids.is_empty() {
            let classids: Vec<String> = self.classids.iter().map(ToString::to_string).collect();
            write!(f, ", net_cls class {}", classids.join(", "))?;
        }
        match &self.out_interface {
            Some(out_interface) => write!(f, ", routed out of {out_interface}"),
            None => Ok(()),
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

/// The id of the cgroup v2 hierarchy's root: the kernel's root cgroup is inode 1 of the
/// cgroup2 file system.
const ROOT_CGROUP_ID: u64 = 1;

/// Refuses a cgroup2 mount at `root` that is not the whole hierarchy: in a cgroup namespace
/// (a container's default) or a bind mount of a subtree, `/app` is not the path the kernel
/// knows, and the programs, which compare ids at the levels counted from the real root,
/// would select no process, silently.
fn whole_hierarchy(root: &Path) -> Result<()> {
    let id = std::fs::metadata(root)
        .with_context(|| format!("reading the cgroup v2 root {}", root.display()))?
        .ino();
    if id != ROOT_CGROUP_ID {
        bail!(
            "the cgroup v2 hierarchy at {} is not the whole hierarchy (its root is cgroup {id},              not the host's root cgroup): tproxy runs in a cgroup namespace (a container              without --cgroupns=host) or sees a subtree, where a selected cgroup's path is not              the one the kernel matches; run tproxy in the host's cgroup namespace, or select              local processes by uid only",
            root.display()
        );
    }
    Ok(())
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

/// Checks `selections` against the system before anything is installed: the cgroup v2
/// root, each selected cgroup, and tproxy's own cgroup. Returns the root and the programs'
/// globals.
pub fn prepare(selections: &LocalSelections) -> Result<(PathBuf, LocalGlobals)> {
    let root = cgroup2_root()?;
    let names_cgroups = selections
        .used()
        .any(|(_, selection)| !selection.every_cgroup());
    if names_cgroups {
        whole_hierarchy(&root)?;
    }
    for (_, selection) in selections.used() {
        selection.entry(&root, false)?;
    }
    let globals = LocalGlobals {
        own_cgroup: own_cgroup_id(&root)?,
        own_netns: own_netns_cookie()?,
    };
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

/// The programs attached to each cgroup; the `recvmsg` ones only while a rule needs them
/// (see [`LocalSelections::programs`]).
const PROGRAMS: [&str; 6] = [
    CONNECT4_PROGRAM_NAME,
    CONNECT6_PROGRAM_NAME,
    SENDMSG4_PROGRAM_NAME,
    SENDMSG6_PROGRAM_NAME,
    RECVMSG4_PROGRAM_NAME,
    RECVMSG6_PROGRAM_NAME,
];

/// This namespace's conntrack UDP timeouts in nanoseconds (unreplied, stream), which the
/// programs follow local UDP flows by (see `tproxy_common::local_udp`): from
/// `net.netfilter.nf_conntrack_udp_timeout` and `…_stream`, conntrack's defaults where they
/// cannot be read (nf_conntrack not loaded). Read at start; a later change is not followed.
pub(crate) fn udp_conntrack_timeouts_ns() -> (u64, u64) {
    (
        super::sysctl_seconds_ns(
            "/proc/sys/net/netfilter/nf_conntrack_udp_timeout",
            DEFAULT_UDP_TIMEOUT_NS,
        ),
        super::sysctl_seconds_ns(
            "/proc/sys/net/netfilter/nf_conntrack_udp_timeout_stream",
            DEFAULT_UDP_STREAM_TIMEOUT_NS,
        ),
    )
}

/// One program's link on a cgroup.
pub(crate) enum CgroupLink {
    /// Owned by this process (without `--pin`): the program's link `id`.
    Owned(&'static str, CgroupSockAddrLinkId),
    /// Pinned at this path (`--pin`): attached until the file is removed.
    Pinned(PathBuf),
}

impl CgroupLink {
    /// The name of the program it attaches.
    fn program(&self) -> &str {
        match self {
            CgroupLink::Owned(name, _) => name,
            // `pin::PinnedState::cgroup_link`'s `cgroup-ID-PROGRAM`.
            CgroupLink::Pinned(pin) => pin
                .file_name()
                .and_then(|name| name.to_str())
                .and_then(|name| name.rsplit('-').next())
                .unwrap_or_default(),
        }
    }
}

/// The connect, sendmsg and recvmsg programs' links, by the cgroup path they are attached to.
pub(crate) type CgroupLinks = BTreeMap<String, Vec<CgroupLink>>;

/// Puts `selections` in force: tells the programs the selections (an entry each; the others
/// unused), and attaches the connect, sendmsg (and recvmsg) programs to their cgroups (see
/// [`LocalSelections::attach_points`]), detaching them from cgroups no longer among those.
/// At start, and on a reload that changes the rules' selections or whether a rule follows
/// datagrams' directions (the `recvmsg` programs). The links live as long as
/// the program (see the module's documentation).
pub fn apply(steering: &mut Steering, root: &Path, selections: &LocalSelections) -> Result<()> {
    put_in_force(steering, root, selections, false)
}

/// Puts `selections` in force again after the selected cgroups changed: the links on the
/// `removed` cgroups (gone, maybe already back as new directories) are dropped, and what is
/// there now is attached to and its ids written. A selected cgroup that is missing selects
/// nobody until it is back.
pub fn follow(
    steering: &mut Steering,
    root: &Path,
    selections: &LocalSelections,
    removed: &[String],
) -> Result<()> {
    // A removed cgroup takes the cgroups below it along.
    let below = |attached: &str, path: &str| {
        attached == path
            || attached
                .strip_prefix(path)
                .is_some_and(|rest| rest.starts_with('/'))
    };
    let gone: Vec<String> = steering
        .cgroup_links()
        .keys()
        .filter(|attached| removed.iter().any(|path| below(attached, path)))
        .cloned()
        .collect();
    for path in gone {
        log::info!("cgroup `{path}` was removed: its links go");
        drop_links(steering, &path)?;
    }
    put_in_force(steering, root, selections, true)
}

/// Makes the programs attached to cgroup `path` be `programs`: attaches the missing ones,
/// detaches the others.
fn change_programs(
    steering: &mut Steering,
    root: &Path,
    path: &str,
    programs: &'static [&'static str],
) -> Result<()> {
    let attached = steering.cgroup_links().get(path);
    let missing: Vec<&'static str> = programs
        .iter()
        .copied()
        .filter(|name| !attached.is_some_and(|links| links.iter().any(|l| l.program() == *name)))
        .collect();
    // What can be refused before a link changes: the cgroup's directory and id.
    let place = match missing.is_empty() {
        true => None,
        false => {
            let dir = cgroup_dir(root, path)?;
            let id = std::fs::metadata(&dir)
                .with_context(|| format!("cgroup `{path}`: reading {}", dir.display()))?
                .ino();
            Some((dir, id))
        }
    };
    let links = steering.cgroup_links_mut().remove(path).unwrap_or_default();
    let (mut links, extra): (Vec<CgroupLink>, Vec<CgroupLink>) = links
        .into_iter()
        .partition(|link| programs.contains(&link.program()));
    let mut result = Ok(());
    for link in extra {
        if let Err(error) = detach(steering, path, link) {
            result = Err(error);
        }
    }
    if let Some((dir, id)) = place {
        let pinned = steering.pinned().cloned();
        for name in missing {
            let pin = pinned.as_ref().map(|pinned| pinned.cgroup_link(id, name));
            match attach_program(steering, name, path, &dir, pin) {
                Ok(link) => links.push(link),
                Err(error) => {
                    result = Err(error);
                    break;
                }
            }
        }
    }
    // Every link still attached stays tracked, whatever failed.
    steering.cgroup_links_mut().insert(path.to_string(), links);
    result
}

/// Detaches (or unpins) the programs' links on cgroup `path`. On a removed cgroup the kernel
/// took them off already, and a detach error is expected.
fn drop_links(steering: &mut Steering, path: &str) -> Result<()> {
    let links = steering.cgroup_links_mut().remove(path).unwrap_or_default();
    for link in links {
        detach(steering, path, link)?;
    }
    Ok(())
}

/// Detaches (or unpins) `link` on cgroup `path`.
fn detach(steering: &mut Steering, path: &str, link: CgroupLink) -> Result<()> {
    match link {
        CgroupLink::Owned(name, link) => {
            if let Err(error) = sock_addr_program(steering, name)?.detach(link) {
                log::debug!("detaching {name} from cgroup `{path}`: {error}");
            }
        }
        CgroupLink::Pinned(pin) => unpin(&pin),
    }
    Ok(())
}

fn put_in_force(
    steering: &mut Steering,
    root: &Path,
    selections: &LocalSelections,
    followed: bool,
) -> Result<()> {
    // Everything that can be refused, before anything changes.
    let mut entries = [Selection::default(); MAX_SELECTIONS];
    for (index, selection) in selections.used() {
        entries[index] = selection.entry(root, followed)?;
    }
    // Every program verified before any link changes (the pinned links of a predecessor
    // are taken over one by one), and those only a later rule set may need too: at start,
    // while tproxy may still load programs (a reload runs with fewer privileges).
    for name in PROGRAMS {
        sock_addr_program(steering, name)?;
    }
    let wanted = selections.attach_points();
    let mut dirs: Vec<(String, PathBuf)> = Vec::new();
    for path in wanted
        .iter()
        .filter(|path| !steering.cgroup_links().contains_key(*path))
    {
        match cgroup_dir(root, path) {
            Ok(dir) => dirs.push((path.clone(), dir)),
            // Warned about with its entry.
            Err(_) if followed => {}
            Err(error) => return Err(error),
        }
    }
    // The selections first, the attachments after: a process of a new cgroup is decided by
    // the new selections from its first connect.
    let map = steering
        .ebpf_mut()
        .map_mut(SELECTIONS_MAP)
        .ok_or_else(|| anyhow!("map {SELECTIONS_MAP} missing from the eBPF object"))?;
    let mut map: Array<_, Selection> = Array::try_from(map)?;
    for (index, entry) in entries.into_iter().enumerate() {
        map.set(index as u32, entry, 0)
            .with_context(|| format!("setting selection {index}"))?;
    }
    let pinned = steering.pinned().cloned();
    for (path, dir) in &dirs {
        let id = std::fs::metadata(dir)
            .with_context(|| format!("cgroup `{path}`: reading {}", dir.display()))?
            .ino();
        let mut links = Vec::new();
        for name in selections.programs() {
            let pin = pinned.as_ref().map(|pinned| pinned.cgroup_link(id, name));
            match attach_program(steering, name, path, dir, pin) {
                Ok(link) => links.push(link),
                Err(error) => {
                    // None of a cgroup's programs without the others, and no link left
                    // untracked.
                    steering.cgroup_links_mut().insert(path.clone(), links);
                    drop_links(steering, path)?;
                    return Err(error);
                }
            }
        }
        if followed {
            log::info!("attached to cgroup `{path}`");
        }
        steering.cgroup_links_mut().insert(path.clone(), links);
    }
    let gone: Vec<String> = steering
        .cgroup_links()
        .keys()
        .filter(|path| !wanted.contains(path))
        .cloned()
        .collect();
    for path in gone {
        drop_links(steering, &path)?;
    }
    // The cgroups attached before, with the programs the rules now need (the `recvmsg`
    // ones come and go with the rules that follow datagrams' directions).
    let kept: Vec<String> = steering
        .cgroup_links()
        .keys()
        .filter(|path| !dirs.iter().any(|(new, _)| new == *path))
        .cloned()
        .collect();
    for path in kept {
        change_programs(steering, root, &path, selections.programs())?;
    }
    if let Some(pinned) = &pinned {
        // An earlier instance's links on cgroups no longer selected (or removed and created
        // again since, with another id).
        let ours: Vec<&PathBuf> = steering
            .cgroup_links()
            .values()
            .flatten()
            .filter_map(|link| match link {
                CgroupLink::Pinned(pin) => Some(pin),
                CgroupLink::Owned(..) => None,
            })
            .collect();
        for pin in pinned.cgroup_links() {
            if !ours.contains(&&pin) {
                unpin(&pin);
            }
        }
    }
    let links: usize = steering.cgroup_links().values().map(Vec::len).sum();
    steering.set_local_origin(selections.stats(links as u64));
    Ok(())
}

/// Attaches program `name` to cgroup `path` (directory `dir`); with `pin`, in place of the
/// program on the link pinned there if there is one, else with a new link pinned there.
fn attach_program(
    steering: &mut Steering,
    name: &'static str,
    path: &str,
    dir: &Path,
    pin: Option<PathBuf>,
) -> Result<CgroupLink> {
    let program = sock_addr_program(steering, name)?;
    if let Some(pin) = pin.as_ref().filter(|pin| pin.exists()) {
        let fd = program.fd()?.as_fd();
        match pin::replace_link_program(pin, fd) {
            Ok(()) => return Ok(CgroupLink::Pinned(pin.clone())),
            // Its cgroup went away (the kernel detached the link): attached anew below.
            Err(error) => {
                log::warn!(
                    "the pinned link of {name} on cgroup `{path}` is unusable ({error}); \
                     attaching anew"
                );
                std::fs::remove_file(pin)
                    .with_context(|| format!("unpinning {}", pin.display()))?;
            }
        }
    }
    let cgroup =
        File::open(dir).with_context(|| format!("cgroup `{path}`: opening {}", dir.display()))?;
    // A link (kernel 5.7+) always sits next to other programs at the same hook (systemd's, a
    // container runtime's), and takes no flags: `Single` passes none.
    let link = program
        .attach(cgroup, CgroupAttachMode::Single)
        .with_context(|| format!("attaching {name} to cgroup `{path}`"))?;
    let Some(pin) = pin else {
        return Ok(CgroupLink::Owned(name, link));
    };
    let link: FdLink = program.take_link(link)?.try_into()?;
    link.pin(&pin).with_context(|| {
        format!(
            "pinning {name}'s link on cgroup `{path}` at {}",
            pin.display()
        )
    })?;
    Ok(CgroupLink::Pinned(pin))
}

/// Removes the pinned cgroup link at `pin`, which detaches it.
fn unpin(pin: &Path) {
    if let Err(error) = std::fs::remove_file(pin) {
        log::warn!("unpinning {}: {error}", pin.display());
    }
}

/// The loaded program `name` (loaded here the first time).
fn sock_addr_program<'a>(steering: &'a mut Steering, name: &str) -> Result<&'a mut CgroupSockAddr> {
    let program: &mut CgroupSockAddr = steering
        .ebpf_mut()
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?
        .try_into()
        .with_context(|| format!("program {name} has the wrong type"))?;
    if program.fd().is_err() {
        program
            .load()
            .with_context(|| format!("the kernel's verifier rejected {name}"))?;
    }
    Ok(program)
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
            cgroups: vec!["/".to_string()],
            uids,
            classids: Vec::new(),
            gids: Vec::new(),
            out_interface: None,
        };
        let root = std::env::temp_dir();
        let entry = selection(vec![one]).entry(&root, false).unwrap();
        assert_eq!(
            (entry.uids[0], entry.uids_len, entry.cgroups_len),
            (one, 1, 0)
        );
        let error = selection(vec![one; MAX_UID_RANGES + 1])
            .entry(&root, false)
            .unwrap_err();
        assert!(error
            .to_string()
            .contains("17 uid ranges selected; at most 16"));
    }

    #[test]
    fn class_ids_go_into_the_entry_in_order_and_at_most_eight() {
        let range = |first, last| ClassidRange { first, last };
        let selection = LocalOrigin::everyone().with_classids(vec![
            range(2, u32::MAX),
            range(0, 0),
            range(0, 0),
        ]);
        assert_eq!(
            selection.to_string(),
            "cgroup /, every user, net_cls class 0, 2-4294967295"
        );
        let entry = selection.entry(&std::env::temp_dir(), false).unwrap();
        assert_eq!(
            (entry.classids_len, &entry.classids[..2]),
            (2, &[range(0, 0), range(2, u32::MAX)][..])
        );
        let error = LocalOrigin::everyone()
            .with_classids((1..=9).map(|n| range(n, n)).collect())
            .entry(&std::env::temp_dir(), false)
            .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("9 net_cls class id ranges selected; at most 8"),
            "{error}"
        );
        assert_ne!(selection, LocalOrigin::everyone(), "another selection");
    }

    #[test]
    fn selections_are_numbered_once_and_attached_where_none_is_below_another() {
        let cgroups = |paths: &[&str]| {
            LocalOrigin::new(paths.iter().map(|p| p.to_string()).collect(), Vec::new())
        };
        let mut selections = LocalSelections::default();
        assert_eq!(selections.index_of(cgroups(&["/a.slice"])).unwrap(), 1);
        assert_eq!(
            selections.index_of(cgroups(&["/a.slice/x", "/b"])).unwrap(),
            2
        );
        assert_eq!(selections.index_of(cgroups(&["/a.slice/"])).unwrap(), 1);
        assert_eq!(
            selections.used().count(),
            2,
            "every process is not selected yet"
        );
        assert_eq!(selections.attach_points(), ["/a.slice", "/b"]);
        let uid = LocalOrigin::new(Vec::new(), vec!["1000".parse().unwrap()]);
        assert_eq!(selections.index_of(uid).unwrap(), 3);
        assert_eq!(selections.attach_points(), ["/"], "a uid of any cgroup");
        assert_eq!(selections.index_of(LocalOrigin::everyone()).unwrap(), 0);
        assert_eq!(selections.used().count(), 4);
        for n in 4..MAX_SELECTIONS {
            selections.index_of(cgroups(&[&format!("/c{n}")])).unwrap();
        }
        let error = selections.index_of(cgroups(&["/one-more"])).unwrap_err();
        assert!(
            error.to_string().contains("more than 8 different sets"),
            "{error}"
        );
    }

    #[test]
    fn a_cgroup_entry_has_its_directory_id_and_level() {
        let root = std::env::temp_dir().join(format!("tproxy-selection-{}", std::process::id()));
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        let selection = LocalOrigin::new(vec!["/a/b".into()], Vec::new());
        let entry = selection.entry(&root, false).unwrap();
        let id = std::fs::metadata(root.join("a/b")).unwrap().ino();
        assert_eq!(
            (entry.cgroups_len, entry.cgroups[0]),
            (1, SelectedCgroup { id, level: 2 })
        );
        // Removed: refused at start and on a reload; while followed, it selects nobody.
        std::fs::remove_dir(root.join("a/b")).unwrap();
        assert!(selection.entry(&root, false).is_err());
        let entry = selection.entry(&root, true).unwrap();
        assert_eq!(
            (entry.cgroups_len, entry.cgroups[0]),
            (1, SelectedCgroup { id: 0, level: 2 })
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
