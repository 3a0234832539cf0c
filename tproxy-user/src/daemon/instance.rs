//! One tproxy per routing table per network namespace. The lock is what lets a new start
//! tell "rules left by an instance that was killed" (remove them) from "rules of an instance
//! that is still running" (refuse to start). A killed instance leaves its lock file (unlocked)
//! behind; one that exits removes it.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Seek, Write},
    os::{
        fd::{AsRawFd, OwnedFd, RawFd},
        unix::fs::MetadataExt,
    },
    path::PathBuf,
};

use anyhow::{bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};

/// Where the lock files live (a tmpfs: they do not outlive a reboot).
const LOCK_DIR: &str = "/run/tproxy";

/// Held for as long as this instance owns its table's policy routing. The file holds only
/// the owner's pid. When the lock goes, so do its file and the control socket's (nothing is
/// left in /run/tproxy), unless another process may hold the lock through the same open
/// file (see [`Drop`]).
pub(crate) struct InstanceLock {
    file: Option<Flock<File>>,
    table: u32,
    /// Whether this process alone holds the lock: taken by itself, or handed over by an
    /// instance that has since been told it is relieved ([`InstanceLock::confirm_handover`]).
    sole: std::cell::Cell<bool>,
    /// Whether a successor may hold the lock: offered to it ([`InstanceLock::offer_fd`])
    /// and not known to have declined ([`InstanceLock::offer_declined`]).
    offered: std::cell::Cell<bool>,
}

/// Who holds the lock when [`InstanceLock::try_acquire`] cannot take it.
pub(crate) struct Held {
    pub(crate) pid: String,
}

impl InstanceLock {
    /// Takes the lock for `table` in the current network namespace, or says who has it.
    pub(crate) fn try_acquire(table: u32) -> Result<std::result::Result<Self, Held>> {
        std::fs::create_dir_all(LOCK_DIR).with_context(|| format!("creating {LOCK_DIR}"))?;
        let path = lock_path(table)?;
        loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(locked) => locked,
                Err((file, nix::errno::Errno::EWOULDBLOCK)) if !still_at(&file, &path)? => {
                    // Its holder is removing it on the way out: lock the one there now.
                    continue;
                }
                Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                    let mut owner = String::new();
                    let _ = file.read_to_string(&mut owner);
                    return Ok(Err(Held {
                        pid: owner.trim().to_string(),
                    }));
                }
                Err((_, errno)) => bail!("locking {}: {errno}", path.display()),
            };
            if !still_at(&file, &path)? {
                // Removed by the instance that held it, between our open and our lock (see
                // `Drop`): a lock on a file that is no longer there excludes nobody.
                continue;
            }
            write_pid(&mut file)?;
            return Ok(Ok(InstanceLock {
                file: Some(file),
                table,
                sole: std::cell::Cell::new(true),
                offered: Default::default(),
            }));
        }
    }

    /// The lock a running instance handed over (see `control`): the same open file, so the
    /// lock is already ours; it now names this process. Shared with that instance until
    /// [`InstanceLock::confirm_handover`].
    pub(crate) fn from_handover(table: u32, fd: OwnedFd) -> Result<Self> {
        // Locking again through the same open file description only confirms the lock.
        let mut file = Flock::lock(File::from(fd), FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| anyhow::anyhow!("confirming the handed-over lock: {errno}"))?;
        write_pid(&mut file)?;
        Ok(InstanceLock {
            file: Some(file),
            table,
            sole: std::cell::Cell::new(false),
            offered: Default::default(),
        })
    }

    /// The previous instance has been told this one is in charge: it lets go of the lock
    /// without releasing it and exits, so the lock is this process's alone.
    pub(crate) fn confirm_handover(&self) {
        self.sole.set(true);
    }

    /// The descriptor to hand to a successor. From now on the successor may hold the lock
    /// through the same open file, so its file stays when this process lets go.
    pub(crate) fn offer_fd(&self) -> RawFd {
        self.offered.set(true);
        self.file.as_ref().expect("held until dropped").as_raw_fd()
    }

    /// The successor the lock was offered to failed: it will never act as the lock's owner
    /// (it lets go of its copy without unlocking), so the lock is this process's alone again.
    pub(crate) fn offer_declined(&self) {
        self.offered.set(false);
    }

    /// Lets go of the lock without releasing it: the successor holds it through the same
    /// open file. (Dropping it would unlock it for both.)
    pub(crate) fn hand_over(self) {
        std::mem::forget(self);
    }
}

impl Drop for InstanceLock {
    fn drop(&mut self) {
        let Some(file) = self.file.take() else {
            return;
        };
        if !self.sole.get() {
            // Handed over by an instance that is still in charge (the takeover did not
            // complete): unlocking would unlock it for that instance too, since it is the
            // same open file. The descriptor closes with the process.
            std::mem::forget(file);
            return;
        }
        if !self.offered.get() {
            // Unlinked while still locked, then unlocked (when `file` drops): whoever opened
            // the file before the unlink and locks it after finds it is no longer at its path
            // and starts over with a new file (`try_acquire`); whoever opens after the unlink
            // creates a new file. The other order would be wrong: a newcomer could lock the
            // file between the unlock and the unlink, and the next one would create and lock
            // another file beside it: two instances on one table. The control socket goes
            // first, while the lock still says no successor can have bound one. A lock that
            // was offered to a successor stays: the successor may hold it through this same
            // open file, and its control socket may be the one at the path now.
            if let Ok(path) = path(self.table, "sock") {
                let _ = std::fs::remove_file(path);
            }
            if let Ok(path) = lock_path(self.table) {
                let _ = std::fs::remove_file(path);
            }
        }
        drop(file);
    }
}

/// Whether `file` is still the file at `path` (not unlinked or replaced since it was opened).
fn still_at(file: &File, path: &std::path::Path) -> Result<bool> {
    let ours = file.metadata()?;
    match std::fs::metadata(path) {
        Ok(there) => Ok(there.dev() == ours.dev() && there.ino() == ours.ino()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(error).with_context(|| format!("checking {}", path.display())),
    }
}

fn write_pid(file: &mut File) -> Result<()> {
    file.set_len(0)?;
    file.rewind()?;
    write!(file, "{}", std::process::id())?;
    Ok(())
}

fn lock_path(table: u32) -> Result<PathBuf> {
    path(table, "lock")
}

/// The file with extension `ext` (lock, control socket) of the instance for `table` in this
/// network namespace.
pub(crate) fn path(table: u32, ext: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(LOCK_DIR).with_context(|| format!("creating {LOCK_DIR}"))?;
    let netns = std::fs::metadata("/proc/self/ns/net")
        .context("reading this process's network namespace")?
        .ino();
    Ok(PathBuf::from(LOCK_DIR).join(format!("netns-{netns}-table-{table}.{ext}")))
}

/// What the last instance that pinned its state was started with, for `tproxy status` to
/// tell while no process runs. A bpffs holds no regular files, so it lives next to the lock.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct PinnedBy {
    pub pid: u32,
    pub fail_mode: String,
}

impl PinnedBy {
    /// Records this process as the one whose program is pinned for `table`.
    pub fn record(table: u32, fail_mode: crate::values::FailMode) -> Result<()> {
        let record = PinnedBy {
            pid: std::process::id(),
            fail_mode: fail_mode.to_string(),
        };
        let path = path(table, "pinned.json")?;
        std::fs::write(&path, serde_json::to_string(&record)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// The record for `table`, if there is one.
    pub fn read(table: u32) -> Option<Self> {
        let path = path(table, "pinned.json").ok()?;
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
    }

    /// Forgets the record (the pinned state is gone).
    pub fn remove(table: u32) -> Result<()> {
        let path = path(table, "pinned.json")?;
        match std::fs::remove_file(&path) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                Err(error).with_context(|| format!("removing {}", path.display()))
            }
            _ => Ok(()),
        }
    }
}

/// Removes the lock files and control sockets that killed instances left in network
/// namespaces that no longer exist (no process is in one, and it is not mounted under
/// /run/netns): no `cleanup` can be run there. Only pairs whose lock nobody holds go, taken
/// the way [`InstanceLock`]'s `Drop` lets go of its own. Returns how many pairs went.
pub(crate) fn remove_stale_of_gone_namespaces() -> Result<usize> {
    let entries = match std::fs::read_dir(LOCK_DIR) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(error) => return Err(error).with_context(|| format!("reading {LOCK_DIR}")),
    };
    let live = live_namespaces();
    let mut stale = std::collections::BTreeSet::new();
    for entry in entries {
        let name = entry?.file_name();
        let Some((netns, stem)) = name.to_str().and_then(instance_of_file) else {
            continue;
        };
        if !live.contains(&netns) {
            stale.insert(stem.to_string());
        }
    }
    let mut removed = 0;
    for stem in stale {
        let lock = PathBuf::from(LOCK_DIR).join(format!("{stem}.lock"));
        let socket = PathBuf::from(LOCK_DIR).join(format!("{stem}.sock"));
        let held = match File::open(&lock) {
            Ok(file) => match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(locked) if still_at(&locked, &lock)? => Some(locked),
                // Held, or replaced since: someone else's.
                Ok(_) | Err(_) => continue,
            },
            // A socket whose lock went first: its instance was killed while letting go.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
            Err(error) => return Err(error).with_context(|| format!("opening {}", lock.display())),
        };
        let _ = std::fs::remove_file(&socket);
        // Its record of pinned state: a new namespace with the same inode must not read it.
        let _ = std::fs::remove_file(PathBuf::from(LOCK_DIR).join(format!("{stem}.pinned.json")));
        if held.is_some() {
            std::fs::remove_file(&lock).with_context(|| format!("removing {}", lock.display()))?;
        }
        removed += 1;
    }
    Ok(removed)
}

/// The network namespace and the name without extension (`netns-N-table-T`) of a file of
/// [`path`]'s naming.
fn instance_of_file(name: &str) -> Option<(u64, &str)> {
    let stem = name
        .strip_suffix(".lock")
        .or_else(|| name.strip_suffix(".sock"))
        .or_else(|| name.strip_suffix(".pinned.json"))?;
    let (netns, table) = stem.strip_prefix("netns-")?.split_once("-table-")?;
    table.parse::<u32>().ok()?;
    Some((netns.parse().ok()?, stem))
}

/// The network namespaces that exist as far as can be seen from here: those of the
/// processes, and those mounted under /run/netns (`ip netns add`). One missed is safe to
/// take for gone: its files go only when nobody holds their lock.
fn live_namespaces() -> std::collections::BTreeSet<u64> {
    let processes = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("ns/net"));
    let mounted = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path());
    processes
        .chain(mounted)
        .filter_map(|path| std::fs::metadata(path).ok())
        .map(|metadata| metadata.ino())
        .collect()
}

/// Makes the tproxy running for `table` in this network namespace re-read its configuration
/// and returns what it says is in force now; an error (with its reason) when it rejected the
/// new configuration, so that `tproxy reload` (and `systemctl reload`) can fail.
pub fn reload(table: u32) -> Result<String> {
    let pid = running(table)?.with_context(|| {
        format!("no tproxy is running with routing table {table} in this network namespace")
    })?;
    let answer = crate::daemon::control::request_reload(table)?.with_context(|| {
        format!(
            "tproxy (pid {pid}) does not answer on its control socket (still setting up?); \
             nothing was reloaded"
        )
    })?;
    match answer.outcome {
        Ok(in_force) => Ok(format!("tproxy (pid {}) reloaded: {in_force}", answer.pid)),
        Err(reason) => bail!(
            "tproxy (pid {}) rejected the reload, the previous configuration stays in force: {reason}",
            answer.pid
        ),
    }
}

/// The pid of the tproxy holding the lock for `table` in this network namespace, if one runs.
fn running(table: u32) -> Result<Option<i32>> {
    let path = lock_path(table)?;
    let Ok(mut file) = File::open(&path) else {
        return Ok(None);
    };
    let mut owner = String::new();
    file.read_to_string(&mut owner)?;
    if Flock::lock(file, FlockArg::LockSharedNonblock).is_ok() {
        return Ok(None);
    }
    Ok(owner.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_files_of_an_instance_name_its_namespace() {
        assert_eq!(
            instance_of_file("netns-4026531840-table-7470.lock"),
            Some((4026531840, "netns-4026531840-table-7470"))
        );
        assert_eq!(
            instance_of_file("netns-4026531840-table-7470.sock"),
            Some((4026531840, "netns-4026531840-table-7470"))
        );
        assert_eq!(
            instance_of_file("netns-4026531840-table-7470.pinned.json"),
            Some((4026531840, "netns-4026531840-table-7470"))
        );
        assert_eq!(instance_of_file("netns-x-table-7470.lock"), None);
        assert_eq!(instance_of_file("netns-1-table-7470.pid"), None);
        assert_eq!(instance_of_file("other"), None);
    }
}
