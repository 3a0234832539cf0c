//! Where the program is hooked: attaching (TCX, else clsact), pinning and detaching per
//! interface, as interfaces come and go.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{HashMap, MapData},
    programs::{
        links::{FdLink, PinnedLink},
        tc::{self, SchedClassifierLink, SchedClassifierLinkId},
        TcAttachType,
    },
    util::KernelVersion,
};
use tproxy_common::maps::{self};

use crate::datapath::interfaces::{Framing, Link};

use super::Steering;

/// How the program is hooked into an interface's ingress path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AttachMode {
    /// A TCX link (kernel 6.6+): owned by our file descriptor, gone when the process is.
    Tcx,
    /// A TCX link pinned in bpffs (`--pin`): attached until its file is removed.
    TcxPinned,
    /// A pinned TCX link an earlier instance left, whose program was replaced by ours in one
    /// step (`--pin`).
    TcxAdopted,
    /// A cls_bpf filter on the clsact qdisc (older kernels): survives the process, so a later
    /// start removes stale ones by program name.
    Clsact,
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttachMode::Tcx => "tcx",
            AttachMode::TcxPinned => "tcx, pinned",
            AttachMode::TcxAdopted => "tcx, adopted from the pinned state",
            AttachMode::Clsact => "clsact",
        })
    }
}

/// The program on one interface.
pub(super) struct Attachment {
    name: String,
    /// Which program: the main one, or on `lo` with local origin steered the loopback one.
    program: &'static str,
    mode: AttachMode,
    /// Ours to detach (`None`: only pinned).
    link: Option<SchedClassifierLinkId>,
    /// Where its link is pinned (`--pin`).
    pin: Option<PathBuf>,
}

/// What attaching and detaching did since start, and the interfaces attached now; shared
/// with the stats snapshot.
#[derive(Default)]
pub(crate) struct InterfaceEvents {
    pub(crate) attached: Mutex<Vec<String>>,
    pub(crate) attach_events: AtomicU64,
    pub(crate) detach_events: AtomicU64,
    pub(crate) attach_failures: AtomicU64,
}

impl InterfaceEvents {
    /// The counts now.
    pub(crate) fn snapshot(&self) -> crate::stats::InterfaceStats {
        crate::stats::InterfaceStats {
            attached: self.attached.lock().unwrap().len() as u64,
            attach_events: self.attach_events.load(Ordering::Relaxed),
            detach_events: self.detach_events.load(Ordering::Relaxed),
            attach_failures: self.attach_failures.load(Ordering::Relaxed),
        }
    }
}

impl Steering {
    /// Attaches the program at `link`'s ingress (nothing when it is attached there already).
    pub(crate) fn attach(&mut self, link: &Link) -> Result<AttachMode> {
        if let Some(attachment) = self.attached.get(&link.index) {
            return Ok(attachment.mode);
        }
        let mode = self.attach_new(link)?;
        self.interface_events
            .attach_events
            .fetch_add(1, Ordering::Relaxed);
        self.publish_attached();
        Ok(mode)
    }

    fn attach_new(&mut self, link: &Link) -> Result<AttachMode> {
        let ip_only = link.framing == Framing::Ip;
        if ip_only {
            // Before the program can see the interface's first packet.
            self.ip_interfaces()?
                .insert(link.index, 1, 0)
                .with_context(|| format!("recording {} as IP-only", link.name))?;
        }
        let attached = self.hook(&link.name);
        match attached {
            Ok(attachment) => {
                let mode = attachment.mode;
                self.attached.insert(link.index, attachment);
                Ok(mode)
            }
            Err(error) => {
                if ip_only {
                    let _ = self.ip_interfaces()?.remove(&link.index);
                }
                Err(error)
            }
        }
    }

    fn ip_interfaces(&mut self) -> Result<HashMap<&mut MapData, u32, u32>> {
        Ok(HashMap::try_from(self.map_mut(maps::IP_INTERFACES)?)?)
    }

    fn hook(&mut self, iface: &str) -> Result<Attachment> {
        let program_name = self.program_for(iface);
        let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        let mode = if tcx {
            AttachMode::Tcx
        } else {
            AttachMode::Clsact
        };
        if mode == AttachMode::Clsact {
            // Creating the qdisc fails harmlessly when it already exists.
            let _ = tc::qdisc_add_clsact(iface);
            // A filter left by an instance that was killed would run before ours.
            match tc::qdisc_detach_program(iface, TcAttachType::Ingress, program_name) {
                Ok(()) => log::warn!("removed a stale tproxy filter from {iface}"),
                Err(tc::TcError::IoError(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => log::warn!("could not look for stale tproxy filters on {iface}: {e}"),
            }
        }
        let name = iface.to_string();
        let pin = self.pinned.as_ref().map(|pinned| pinned.tc_link(iface));
        if let Some(path) = &pin {
            if mode != AttachMode::Tcx {
                bail!("--pin needs TCX links (kernel 6.6 or later); this kernel has clsact only");
            }
            if let Some(link) = self.replace_pinned_program(iface, path)? {
                let (mode, link) = (AttachMode::TcxAdopted, Some(link));
                return Ok(Attachment {
                    name,
                    program: program_name,
                    mode,
                    link,
                    pin,
                });
            }
        }
        let program = self.classifier_mut(program_name)?;
        let link = program
            .attach(iface, TcAttachType::Ingress)
            .with_context(|| {
                format!("attaching the steering program to {iface} ingress ({mode})")
            })?;
        let Some(path) = pin else {
            let link = Some(link);
            return Ok(Attachment {
                name,
                program: program_name,
                mode,
                link,
                pin,
            });
        };
        let link: FdLink = program.take_link(link)?.try_into()?;
        link.pin(&path)
            .with_context(|| format!("pinning the link on {iface} at {}", path.display()))?;
        let (mode, link, pin) = (AttachMode::TcxPinned, None, Some(path));
        Ok(Attachment {
            name,
            program: program_name,
            mode,
            link,
            pin,
        })
    }

    /// Takes the program off the interface `ifindex` (gone, renamed, or no longer wanted),
    /// pinned link included; nothing when it is not attached there.
    pub(crate) fn detach(&mut self, ifindex: u32) {
        let Some(attachment) = self.attached.remove(&ifindex) else {
            return;
        };
        self.interface_events
            .detach_events
            .fetch_add(1, Ordering::Relaxed);
        self.publish_attached();
        let name = &attachment.name;
        if let Some(link) = attachment.link {
            // The kernel took a TCX link off a vanished device already, and a clsact filter
            // went with it: ENODEV is the expected answer then.
            let program = self.classifier_mut(attachment.program);
            match program.map(|program| program.detach(link)) {
                Ok(Ok(())) | Ok(Err(aya::programs::ProgramError::NetlinkError(_))) => {}
                Ok(Err(error)) => log::warn!("detaching from {name}: {error}"),
                Err(error) => log::warn!("detaching from {name}: {error:#}"),
            }
        }
        if let Some(path) = &attachment.pin {
            if let Err(error) = std::fs::remove_file(path) {
                log::warn!(
                    "unpinning the link on {name} at {}: {error}",
                    path.display()
                );
            }
        }
        if let Ok(mut ip_interfaces) = self.ip_interfaces() {
            // Absent for an Ethernet interface.
            let _ = ip_interfaces.remove(&ifindex);
        }
    }

    /// The interfaces the program is attached to, by name and ifindex (what rules naming an
    /// interface are compiled for).
    pub(crate) fn attached_interfaces(&self) -> Vec<(String, u32)> {
        self.attached
            .iter()
            .map(|(index, attachment)| (attachment.name.clone(), *index))
            .collect()
    }

    /// How the program is attached, per interface (`NAME (MODE)`).
    pub(crate) fn attached_descriptions(&self) -> Vec<String> {
        self.interface_events.attached.lock().unwrap().clone()
    }

    fn publish_attached(&self) {
        *self.interface_events.attached.lock().unwrap() = self
            .attached
            .values()
            .map(|attachment| format!("{} ({})", attachment.name, attachment.mode))
            .collect();
    }

    /// A handle on the attach and detach counts, for the stats snapshot.
    pub(crate) fn interface_events(&self) -> Arc<InterfaceEvents> {
        self.interface_events.clone()
    }

    /// Puts our program on the TCX link pinned at `path`, in one step; `None` when there is
    /// no usable link there (none, or its interface went away and maybe came back under the
    /// same name — then its file is removed).
    fn replace_pinned_program(
        &mut self,
        iface: &str,
        path: &std::path::Path,
    ) -> Result<Option<SchedClassifierLinkId>> {
        let Ok(link) = PinnedLink::from_pin(path) else {
            return Ok(None);
        };
        // The program this instance has for the interface (the loopback one on `lo` with
        // local origin), whichever the earlier instance had there.
        let program = self.classifier_mut(self.program_for(iface))?;
        let replaced = SchedClassifierLink::try_from(FdLink::from(link))
            .map_err(anyhow::Error::from)
            .and_then(|link| Ok(program.attach_to_link(link)?));
        match replaced {
            Ok(link) => Ok(Some(link)),
            Err(error) => {
                log::warn!("the pinned link on {iface} is unusable ({error:#}); attaching anew");
                std::fs::remove_file(path)
                    .with_context(|| format!("unpinning {}", path.display()))?;
                Ok(None)
            }
        }
    }
}
