//! The selected cgroups while serving: systemd removes a unit's cgroup and creates it again
//! when it restarts the unit, and the new directory has a new id and none of the programs.
//! tproxy watches the directories the selected cgroups are in (inotify) and, when a
//! directory is created or removed there, puts the selections in force again
//! (`local_origin::follow`): attached to what is there now, with its id.
//!
//! As with links and addresses, an event only says that something changed: what is there is
//! read again, so that bursts and a full event queue are handled the same way.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::{AsFd, AsRawFd, RawFd},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::io::unix::AsyncFd;

use crate::datapath::{
    local_origin::{self, LocalSelections},
    steering::Steering,
};

/// The inotify instance, as tokio wants a file descriptor.
struct Watches(Inotify);

impl AsRawFd for Watches {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// What changed among the watched directories' cgroups since the last look.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Changes {
    /// The cgroups removed (paths from the hierarchy's root).
    pub(crate) removed: Vec<String>,
    /// Whether events were lost: any cgroup may have been removed.
    pub(crate) overflowed: bool,
    /// Whether a selected cgroup or one above it was created or removed.
    relevant: bool,
}

/// A watch on the directories the selected cgroups are in.
pub(crate) struct CgroupWatch {
    fd: AsyncFd<Watches>,
    root: PathBuf,
    /// The watched directories, as cgroup paths (`/` for the root), by watch.
    parents: BTreeMap<WatchDescriptor, String>,
    /// The selected cgroups and the cgroups above them: only their creation or removal is
    /// a change (the root's other children come and go all the time).
    on_path: BTreeSet<String>,
}

impl CgroupWatch {
    /// Watches the directories of `selections`' cgroups under the hierarchy's `root`. Made
    /// before the programs are attached, so that no re-creation goes unseen in between.
    pub(crate) fn subscribe(root: &Path, selections: &LocalSelections) -> Result<Self> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .context("watching the selected cgroups (inotify_init)")?;
        // SAFETY: the inotify instance owns its descriptor, and the AsyncFd owns the
        // instance: nothing closes or replaces the descriptor while it is registered.
        let fd = unsafe { AsyncFd::register(Watches(inotify)) }
            .context("watching the selected cgroups")?;
        let mut watch = CgroupWatch {
            fd,
            root: root.to_path_buf(),
            parents: BTreeMap::new(),
            on_path: BTreeSet::new(),
        };
        watch.watch(selections)?;
        Ok(watch)
    }

    /// Adds the directories of `selections`' cgroups that are not watched yet: after a
    /// reload, and after a watched directory was removed and maybe created again (those of
    /// earlier selections stay watched: their events only cause a look). A directory that is
    /// not there is watched once it is.
    pub(crate) fn watch(&mut self, selections: &LocalSelections) -> Result<()> {
        for (_, selection) in selections.used() {
            for cgroup in &selection.cgroups {
                // Every directory above it: an ancestor removed and created again takes the
                // watches below it along, and its creation is seen only from above.
                self.on_path.insert(cgroup.clone());
                let mut child = cgroup.clone();
                while let Some(parent) = parent_of(&child) {
                    self.on_path.insert(parent.clone());
                    child = parent.clone();
                    self.watch_dir(cgroup, parent)?;
                }
            }
        }
        Ok(())
    }

    /// Watches the directory of cgroup path `parent` (for the selected `cgroup`) unless it is
    /// watched already or not there.
    fn watch_dir(&mut self, cgroup: &str, parent: String) -> Result<()> {
        let dir = self.root.join(parent.trim_start_matches('/'));
        if self.parents.values().any(|watched| *watched == parent) || !dir.is_dir() {
            return Ok(());
        }
        let descriptor = self
            .fd
            .get_ref()
            .0
            .add_watch(
                &dir,
                AddWatchFlags::IN_CREATE
                    | AddWatchFlags::IN_DELETE
                    | AddWatchFlags::IN_MOVED_FROM
                    | AddWatchFlags::IN_MOVED_TO
                    | AddWatchFlags::IN_ONLYDIR,
            )
            .with_context(|| format!("watching {} for cgroup `{cgroup}`", dir.display()))?;
        self.parents.insert(descriptor, parent);
        Ok(())
    }
}

/// The cgroup path of the directory `cgroup` is in; `None` for the root.
fn parent_of(cgroup: &str) -> Option<String> {
    let trimmed = cgroup.trim_end_matches('/');
    let (parent, _) = trimmed.rsplit_once('/')?;
    Some(match parent {
        "" => "/".to_string(),
        parent => parent.to_string(),
    })
}

/// Whether cgroup path `path` is `dir` or below it.
fn within(path: &str, dir: &str) -> bool {
    path.strip_prefix(dir)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The cgroup path of `name` in the watched directory `parent`.
fn child_of(parent: &str, name: &str) -> String {
    match parent {
        "/" => format!("/{name}"),
        parent => format!("{parent}/{name}"),
    }
}

/// Waits for the next events, and takes those queued with them. Never ready without a
/// watch.
pub(crate) async fn changed(watch: &mut Option<CgroupWatch>) -> Option<Changes> {
    let Some(watch) = watch else {
        return std::future::pending().await;
    };
    let mut changes = Changes::default();
    loop {
        let mut ready = watch.fd.readable().await.ok()?;
        match ready.try_io(|fd| fd.get_ref().0.read_events().map_err(std::io::Error::from)) {
            Ok(Ok(events)) => {
                for event in events {
                    if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                        changes.overflowed = true;
                    }
                    if event.mask.contains(AddWatchFlags::IN_IGNORED) {
                        // The directory itself went (a selected cgroup's parent, removed
                        // with it): watched again, if it comes back, by the next `watch`.
                        watch.parents.remove(&event.wd);
                        continue;
                    }
                    let (Some(parent), Some(name)) = (watch.parents.get(&event.wd), &event.name)
                    else {
                        continue;
                    };
                    let child = child_of(parent, &name.to_string_lossy());
                    if !watch.on_path.contains(&child) {
                        continue;
                    }
                    changes.relevant = true;
                    let gone = AddWatchFlags::IN_DELETE | AddWatchFlags::IN_MOVED_FROM;
                    if event.mask.intersects(gone) {
                        // The removed directory's own IN_IGNORED comes only once nothing
                        // holds it any more, which may be after it is made again: its
                        // watches (and those below it) are forgotten now, so that `watch`
                        // watches the new one (else what is made in it went unseen).
                        let gone: Vec<WatchDescriptor> = watch
                            .parents
                            .iter()
                            .filter(|(_, watched)| within(watched, &child))
                            .map(|(descriptor, _)| *descriptor)
                            .collect();
                        for descriptor in gone {
                            watch.parents.remove(&descriptor);
                            // A renamed directory's watch would stay in the kernel; a removed
                            // one's goes by itself (and this one fails then: nothing to do).
                            let _ = watch.fd.get_ref().0.rm_watch(descriptor);
                        }
                        changes.removed.push(child);
                    }
                }
                if changes.relevant || changes.overflowed {
                    return Some(changes);
                }
            }
            Ok(Err(error)) => {
                log::warn!("reading the selected cgroups' events: {error}");
                return None;
            }
            // Not readable after all: wait again.
            Err(_would_block) => continue,
        }
    }
}

/// Puts the selections in force again for the cgroups there now, watching the directories
/// that came back first (so that nothing made in them afterwards goes unseen).
pub(crate) fn follow(
    watch: &mut Option<CgroupWatch>,
    selections: &LocalSelections,
    steering: &mut Steering,
    changes: Changes,
) {
    let Some(watch) = watch else {
        return;
    };
    if let Err(error) = watch.watch(selections) {
        log::warn!("{error:#}: its re-creation is not followed");
    }
    let removed = match changes.overflowed {
        // Events were lost: take every link off, and attach again to what is there.
        true => steering.cgroup_links().keys().cloned().collect(),
        false => changes.removed,
    };
    let followed = tokio::task::block_in_place(|| {
        local_origin::follow(steering, &watch.root, selections, &removed)
    });
    if let Err(error) = followed {
        log::error!("putting the local selections in force for the cgroups there now: {error:#}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cgroup_is_watched_in_the_directory_it_is_in() {
        assert_eq!(
            parent_of("/app.slice/app.service").as_deref(),
            Some("/app.slice")
        );
        assert_eq!(parent_of("/app").as_deref(), Some("/"));
        assert_eq!(parent_of("/"), None);
        assert!(within("/app.slice/app.service", "/app.slice"));
        assert!(within("/app.slice", "/app.slice"));
        assert!(!within("/app.slice2", "/app.slice"));
        assert_eq!(child_of("/", "app"), "/app");
        assert_eq!(
            child_of("/app.slice", "app.service"),
            "/app.slice/app.service"
        );
    }
}
