//! One tproxy per routing table per network namespace. The lock is what lets a new start
//! tell "rules left by an instance that was killed" (remove them) from "rules of an instance
//! that is still running" (refuse to start).

use std::{
    fs::{File, OpenOptions},
    io::{Read, Seek, Write},
    os::unix::fs::MetadataExt,
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

impl InstanceLock {
    /// Takes the lock for `table` in the current network namespace, or explains who has it.
    pub fn acquire(table: u32) -> Result<Self> {
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
                bail!(
                    "another tproxy (pid {}) is running with routing table {table} in this network \
                     namespace; stop it or pick another --table",
                    owner.trim()
                );
            }
            Err((_, errno)) => bail!("locking {}: {errno}", path.display()),
        };
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}", std::process::id())?;
        Ok(InstanceLock { _file: file })
    }
}

fn lock_path(table: u32) -> Result<PathBuf> {
    let netns = std::fs::metadata("/proc/self/ns/net")
        .context("reading this process's network namespace")?
        .ino();
    Ok(PathBuf::from(LOCK_DIR).join(format!("netns-{netns}-table-{table}.lock")))
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
