//! One tproxy per routing table per network namespace. The lock is what lets a new start
//! tell "rules left by an instance that was killed" (remove them) from "rules of an instance
//! that is still running" (refuse to start).

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

/// Held for as long as this instance owns its table's policy routing. The file itself is
/// kept after exit (unlinking a lock file races with the next instance opening it); it holds
/// only the owner's pid.
pub struct InstanceLock {
    _file: Flock<File>,
}

/// Who holds the lock when [`InstanceLock::try_acquire`] cannot take it.
pub struct Held {
    pub pid: String,
}

impl InstanceLock {
    /// Takes the lock for `table` in the current network namespace, or explains who has it.
    pub fn acquire(table: u32) -> Result<Self> {
        match Self::try_acquire(table)? {
            Ok(lock) => Ok(lock),
            Err(Held { pid }) => bail!(
                "another tproxy (pid {pid}) is running with routing table {table} in this network \
                 namespace; stop it or pick another --table"
            ),
        }
    }

    /// Takes the lock for `table` in the current network namespace, or says who has it.
    pub fn try_acquire(table: u32) -> Result<std::result::Result<Self, Held>> {
        std::fs::create_dir_all(LOCK_DIR).with_context(|| format!("creating {LOCK_DIR}"))?;
        let path = lock_path(table)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut owner = String::new();
                let _ = file.read_to_string(&mut owner);
                return Ok(Err(Held {
                    pid: owner.trim().to_string(),
                }));
            }
            Err((_, errno)) => bail!("locking {}: {errno}", path.display()),
        };
        write_pid(&mut file)?;
        Ok(Ok(InstanceLock { _file: file }))
    }

    /// The lock a running instance handed over (see `control`): the same open file, so the
    /// lock is already ours; it now names this process.
    pub fn from_handover(fd: OwnedFd) -> Result<Self> {
        // Locking again through the same open file description only confirms the lock.
        let mut file = Flock::lock(File::from(fd), FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| anyhow::anyhow!("confirming the handed-over lock: {errno}"))?;
        write_pid(&mut file)?;
        Ok(InstanceLock { _file: file })
    }

    /// The descriptor to hand to a successor.
    pub fn raw_fd(&self) -> RawFd {
        self._file.as_raw_fd()
    }

    /// Lets go of the lock without releasing it: the successor holds it through the same
    /// open file. (Dropping it would unlock it for both.)
    pub fn hand_over(self) {
        std::mem::forget(self);
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
pub fn path(table: u32, ext: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(LOCK_DIR).with_context(|| format!("creating {LOCK_DIR}"))?;
    let netns = std::fs::metadata("/proc/self/ns/net")
        .context("reading this process's network namespace")?
        .ino();
    Ok(PathBuf::from(LOCK_DIR).join(format!("netns-{netns}-table-{table}.{ext}")))
}

/// Sends `signal` to the tproxy that holds the lock for `table` in this network namespace;
/// returns its pid. A lock file whose lock nobody holds names no running instance.
pub fn signal_running(table: u32, signal: nix::sys::signal::Signal) -> Result<i32> {
    let pid = running(table)?.with_context(|| {
        format!("no tproxy is running with routing table {table} in this network namespace")
    })?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
        .with_context(|| format!("signalling tproxy pid {pid}"))?;
    Ok(pid)
}

/// The pid of the tproxy holding the lock for `table` in this network namespace, if one runs.
pub fn running(table: u32) -> Result<Option<i32>> {
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
