//! Least privilege once everything is set up: the program is loaded and attached, the
//! routing installed, the listeners bound. From then on tproxy keeps only
//!
//! - `CAP_NET_ADMIN`: IP_TRANSPARENT on the sockets it keeps creating (UDP reply sockets,
//!   transparent upstream connections, listeners added by a reload), attaching the loaded
//!   program to interfaces that appear and match a pattern, and removing its policy
//!   routing over netlink at exit, and listing the kernel ipsets that rules follow;
//! - `CAP_NET_BIND_SERVICE`: binding a UDP reply socket to its original destination's port,
//!   which is privileged for DNS (53), NTP (123) and the like; without it every session on
//!   such a port would fall back to raw replies;
//! - `CAP_NET_RAW`: the raw socket that sends UDP replies when a reply socket cannot be bound.
//!
//! Updating the program's maps (reloads, counters) goes through map descriptors it already
//! holds and needs no capability; detaching is closing the link descriptors. Optionally the
//! process also becomes an unprivileged user (`--user`).
//!
//! Capabilities belong to threads, not processes: the change is made on the main thread and
//! on every runtime worker thread (threads created later inherit it), and then checked for
//! every thread of the process in `/proc/self/task`.

use std::{
    sync::{Arc, Condvar, Mutex},
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use caps::{CapSet, Capability, CapsHashSet};
use nix::unistd::{Gid, Uid, User};

/// What tproxy keeps after setting up (see the module documentation).
pub(crate) const KEPT: [Capability; 3] = [
    Capability::CAP_NET_ADMIN,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_NET_RAW,
];

/// How long to wait for every worker thread to take part in a change.
const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(5);

/// Looks up the user to run as, before anything is touched.
pub(crate) fn resolve_user(name: &str) -> Result<User> {
    User::from_name(name)
        .with_context(|| format!("--user {name}: looking up the user"))?
        .ok_or_else(|| anyhow!("--user {name}: no such user"))
}

/// Drops every capability but [`KEPT`] on every thread, and becomes `user` if given.
/// `workers` is the number of runtime worker threads.
pub(crate) async fn drop_privileges(workers: usize, user: Option<&User>) -> Result<()> {
    let kept: CapsHashSet = KEPT.into_iter().collect();
    let held = caps::read(None, CapSet::Permitted).context("reading capabilities")?;
    let kept: CapsHashSet = kept.intersection(&held).copied().collect();
    if !kept.contains(&Capability::CAP_NET_BIND_SERVICE) {
        // A unit or manifest written before tproxy kept it grants it no more.
        log::warn!(
            "CAP_NET_BIND_SERVICE is not held: UDP replies on ports below 1024 (DNS, NTP) go \
             through the raw-socket fallback; grant it to the service"
        );
    }
    match user {
        None => {
            let keep = kept.clone();
            on_every_thread(workers, move || restrict(&keep)).await?;
        }
        Some(user) => {
            // Changing user clears the capabilities of every thread, unless it asked to keep
            // them (a per-thread flag); each thread needs CAP_SETUID/SETGID while glibc makes
            // all of them change user.
            let mut transition = kept.clone();
            transition.extend([Capability::CAP_SETUID, Capability::CAP_SETGID]);
            on_every_thread(workers, move || {
                nix::sys::prctl::set_keepcaps(true).context("PR_SET_KEEPCAPS")?;
                restrict(&transition)
            })
            .await?;
            become_user(user)?;
            let keep = kept.clone();
            on_every_thread(workers, move || {
                nix::sys::prctl::set_keepcaps(false).context("PR_SET_KEEPCAPS")?;
                restrict(&keep)
            })
            .await?;
        }
    }
    verify_all_threads(&kept)
}

/// Leaves exactly `keep` permitted and effective on the calling thread, nothing inheritable.
fn restrict(keep: &CapsHashSet) -> Result<()> {
    caps::clear(None, CapSet::Ambient).context("clearing ambient capabilities")?;
    caps::clear(None, CapSet::Inheritable).context("clearing inheritable capabilities")?;
    caps::set(None, CapSet::Effective, keep).context("setting effective capabilities")?;
    caps::set(None, CapSet::Permitted, keep).context("setting permitted capabilities")?;
    Ok(())
}

fn become_user(user: &User) -> Result<()> {
    let (uid, gid): (Uid, Gid) = (user.uid, user.gid);
    nix::unistd::setgroups(&[gid]).context("setgroups")?;
    nix::unistd::setresgid(gid, gid, gid).context("setresgid")?;
    nix::unistd::setresuid(uid, uid, uid).context("setresuid")?;
    Ok(())
}

/// Runs `change` on this thread and on each of the runtime's `workers` worker threads. The
/// workers' tasks wait for one another, so each occupies a different worker.
async fn on_every_thread(
    workers: usize,
    change: impl Fn() -> Result<()> + Send + Sync + 'static,
) -> Result<()> {
    let change = Arc::new(change);
    let arrived = Arc::new((Mutex::new(0usize), Condvar::new()));
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let (change, arrived) = (change.clone(), arrived.clone());
            tokio::spawn(async move {
                let (count, all_here) = &*arrived;
                let mut count = count.lock().unwrap();
                *count += 1;
                all_here.notify_all();
                let (count, timeout) = all_here
                    .wait_timeout_while(count, RENDEZVOUS_TIMEOUT, |count| *count < workers)
                    .unwrap();
                drop(count);
                if timeout.timed_out() {
                    bail!("not every runtime worker thread could be reached to change privileges");
                }
                change()
            })
        })
        .collect();
    change()?;
    for task in tasks {
        task.await.context("privilege change task")??;
    }
    Ok(())
}

/// Checks that every thread of the process ended up with exactly `kept`.
fn verify_all_threads(kept: &CapsHashSet) -> Result<()> {
    let expected: u64 = kept.iter().map(|cap| cap.bitmask()).fold(0, |a, b| a | b);
    for task in std::fs::read_dir("/proc/self/task").context("listing threads")? {
        let path = task?.path().join("status");
        let status = std::fs::read_to_string(&path)?;
        for field in ["CapEff:", "CapPrm:"] {
            let value = status
                .lines()
                .find_map(|line| line.strip_prefix(field))
                .map(str::trim)
                .and_then(|hex| u64::from_str_radix(hex, 16).ok())
                .with_context(|| format!("{field} in {}", path.display()))?;
            if value != expected {
                bail!(
                    "thread {}: {field} {value:#x}, expected {expected:#x}",
                    path.display()
                );
            }
        }
    }
    Ok(())
}
