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
        let netns = std::fs::metadata("/proc/self/ns/net")
            .context("reading this process's network namespace")?
            .ino();
        std::fs::create_dir_all(LOCK_DIR).with_context(|| format!("creating {LOCK_DIR}"))?;
        let path = PathBuf::from(LOCK_DIR).join(format!("netns-{netns}-table-{table}.lock"));
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
