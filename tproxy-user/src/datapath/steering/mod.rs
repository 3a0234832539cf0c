//! The eBPF data path seen from userspace: load the embedded program with the routing mark
//! baked in, install compiled rule sets into its maps (atomically, by generation), put our
//! listeners into its socket map, attach it at tc ingress, and read its counters. Dropping [`Steering`] detaches everything it attached.

use std::{collections::BTreeMap, os::fd::AsRawFd, sync::Arc};

use anyhow::{anyhow, Context, Result};
use aya::{
    maps::{Array, LpmTrie, MapInfo, PerCpuArray, SockMap},
    programs::{links::FdLink, SchedClassifier, SkLookup},
    Ebpf, EbpfLoader,
};
use aya_log::EbpfLogger;
use tproxy_common::{
    local_origin, local_udp,
    maps::{self},
};

use crate::{
    datapath::fragments::FragmentTracking,
    datapath::kfuncs::Kfuncs,
    datapath::local_origin::{CgroupLinks, LocalGlobals},
    datapath::out_routes::RouteMirror,
    datapath::pin::PinnedState,
    datapath::rules::CompiledRules,
    stats::LocalOriginStats,
    values::Mark,
};

/// The compiled tproxy-ebpf object, built by build.rs.
mod attach;
mod counters;
mod rule_maps;
pub use rule_maps::StagedRules;

use attach::Attachment;
pub(crate) use attach::InterfaceEvents;
pub(crate) use counters::CounterReader;

pub(crate) static PROGRAM: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tproxy-ebpf"));

/// The loaded program and its maps.
pub(crate) struct Steering {
    ebpf: Ebpf,
    /// The rule-set generation in force (see `maps::ACTIVE_GENERATION`), and what it wrote.
    active: Option<(u32, CompiledRules)>,
    /// Entries each rule map can hold, both generations together.
    capacity: u32,
    counters: CounterReader,
    fragments: FragmentTracking,
    /// Where the maps and links are pinned (`--pin`).
    pinned: Option<PinnedState>,
    /// The generation in force in maps an earlier instance left pinned, until our first
    /// rule set replaces it.
    adopted: Option<u32>,
    /// A generation whose entries a failed erase may have left: scanned clean before it is
    /// written again.
    unerased: Option<u32>,
    /// Where the program is attached, by ifindex.
    attached: BTreeMap<u32, Attachment>,
    interface_events: Arc<InterfaceEvents>,
    /// What the connect programs select and how many cgroup links they have, once attached.
    local_origin: Option<LocalOriginStats>,
    /// Whether local origin is steered: `lo` then gets the loopback program.
    loopback: bool,
    /// The connect, sendmsg and recvmsg programs' links (see `local_origin::apply`).
    cgroup_links: CgroupLinks,
    /// The host's routes for the connect programs, when local origin is steered.
    routes: Option<RouteMirror>,
    /// The kfuncs the program was loaded with.
    kfuncs: Kfuncs,
}

/// How the program is loaded: fixed for its lifetime.
pub(crate) struct LoadSettings {
    pub mark: Mark,
    /// SO_MARK of tproxy's own UDP sockets.
    pub socket_mark: u32,
    /// Entries each rule map can hold (see [`rule_map_capacity`]); pinned maps keep the
    /// size they were created with.
    pub rule_map_capacity: u32,
    /// Drop what steer rules take when there is no listener (see `FailMode`).
    pub fail_closed: bool,
    /// Pin the maps and links here, adopting what an earlier instance pinned.
    pub pinned: Option<PinnedState>,
    /// Steer local processes' connections (`--local`): the connect programs' globals.
    pub local_origin: Option<LocalGlobals>,
    /// Steer local connections to loopback addresses to external proxies (`steer_loopback`).
    pub steer_loopback: bool,
}

/// Every slot a listener has in the socket map.
const LISTENER_SLOTS: [maps::ListenerSlot; 4] = [
    maps::ListenerSlot::TcpV4,
    maps::ListenerSlot::TcpV6,
    maps::ListenerSlot::UdpV4,
    maps::ListenerSlot::UdpV6,
];

/// The rule maps' size for a first rule set: room for two generations of a rule set up to
/// twice as large, so reloads that grow the rules still fit.
pub(crate) fn rule_map_capacity(first: &CompiledRules) -> u32 {
    let needed = u32::try_from(first.largest_map()).unwrap_or(u32::MAX);
    needed
        .saturating_mul(4)
        .clamp(1024, maps::MAX_RULE_MAP_ENTRIES)
}

/// Prepares `--pin`'s directory; when an earlier instance left maps there, they are adopted
/// as they are: their size, which the rule maps must be loaded with.
fn pinned_capacity(pinned: &PinnedState, udp_flows: u32) -> Result<Option<u32>> {
    pinned.prepare()?;
    if !pinned.exists() {
        return Ok(None);
    }
    pinned.discard_maps_of_another_layout(udp_flows)?;
    let rules = pinned.map(maps::RULES_DST_V4);
    let capacity = MapInfo::from_pin(&rules)
        .with_context(|| format!("opening the pinned map {}", rules.display()))?
        .max_entries();
    Ok(Some(capacity))
}

/// The places of the local UDP flows' map: conntrack's default table while local origin is
/// steered, one otherwise (nothing is followed).
fn udp_flow_places(settings: &LoadSettings) -> u32 {
    match settings.local_origin {
        Some(_) => local_udp::MAX_UDP_FLOWS,
        None => 1,
    }
}

/// Loads the object with the settings baked into its globals and the rule maps sized to
/// `capacity` (pinned maps are reused rather than created).
fn load_object(
    settings: &LoadSettings,
    capacity: u32,
    fragment_timeouts: (u64, u64),
    kfuncs: &Kfuncs,
) -> Result<Ebpf> {
    let object = AlignedObject::new(&kfuncs.patch(PROGRAM)?);
    // Log records below the level the user asked for are not even produced in the kernel.
    let log_level = log::max_level() as u8;
    let fail_closed = u32::from(settings.fail_closed);
    let mut loader = EbpfLoader::new();
    if let Some(pinned) = &settings.pinned {
        for name in maps::PINNED_MAPS {
            loader.map_pin_path(name, pinned.map(name));
        }
    }
    let local = settings.local_origin.as_ref();
    let own_cgroup = local.map_or(0, |l| l.own_cgroup);
    let own_netns = local.map_or(0, |l| l.own_netns);
    let steer_loopback = u32::from(settings.steer_loopback);
    let (udp_timeout, udp_stream_timeout) =
        crate::datapath::local_origin::udp_conntrack_timeouts_ns();
    loader
        .override_global(local_udp::UDP_TIMEOUT_GLOBAL, &udp_timeout, true)
        .override_global(
            local_udp::UDP_STREAM_TIMEOUT_GLOBAL,
            &udp_stream_timeout,
            true,
        )
        .override_global(local_origin::STEER_LOOPBACK_GLOBAL, &steer_loopback, true)
        .override_global(local_origin::OWN_CGROUP_GLOBAL, &own_cgroup, true)
        .override_global(local_origin::OWN_NETNS_GLOBAL, &own_netns, true)
        .override_global(maps::FRAGMENT_TIMEOUT_V4_GLOBAL, &fragment_timeouts.0, true)
        .override_global(maps::FRAGMENT_TIMEOUT_V6_GLOBAL, &fragment_timeouts.1, true)
        .override_global(maps::MARK_GLOBAL, &settings.mark.value, true)
        .override_global(maps::FAIL_CLOSED_GLOBAL, &fail_closed, true)
        .override_global(maps::MARK_MASK_GLOBAL, &settings.mark.mask, true)
        .override_global(maps::OWN_SOCKET_MARK_GLOBAL, &settings.socket_mark, true)
        .override_global("AYA_LOG_LEVEL", &log_level, true)
        .map_max_entries(maps::RULES_DST_V4, capacity)
        .map_max_entries(maps::RULES_DST_V6, capacity)
        .map_max_entries(maps::RULES_SRC_V4, capacity)
        .map_max_entries(maps::RULES_SRC_V6, capacity)
        .map_max_entries(
            local_origin::ROUTES_V4_MAP,
            local_origin::MAX_MIRRORED_ROUTES,
        )
        .map_max_entries(
            local_origin::ROUTES_V6_MAP,
            local_origin::MAX_MIRRORED_ROUTES,
        )
        .map_max_entries(local_udp::UDP_FLOWS_MAP, udp_flow_places(settings))
        .load(object.bytes())
        .context("loading the eBPF object into the kernel")
}

/// An object's bytes at an address aligned as the ELF parser reads its headers (a `Vec<u8>`
/// promises byte alignment only).
struct AlignedObject {
    words: Vec<u64>,
    len: usize,
}

impl AlignedObject {
    fn new(bytes: &[u8]) -> Self {
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        for (word, chunk) in words.iter_mut().zip(bytes.chunks(8)) {
            let mut padded = [0u8; 8];
            padded[..chunk.len()].copy_from_slice(chunk);
            *word = u64::from_ne_bytes(padded);
        }
        AlignedObject {
            words,
            len: bytes.len(),
        }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `len` bytes lie within the words, which are initialized and live as long
        // as the borrow of `self`.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }
}

/// Takes the packet counters (by outcome, and per listener) out of the object.
fn take_counters(ebpf: &mut Ebpf) -> Result<CounterReader> {
    let mut take = |name: &str| {
        ebpf.take_map(name)
            .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
    };
    let outcomes = take(maps::COUNTERS)?;
    let per_listener = take(maps::LISTENER_COUNTERS)?;
    Ok(CounterReader {
        outcomes: Arc::new(PerCpuArray::try_from(outcomes)?),
        per_listener: Some(Arc::new(PerCpuArray::try_from(per_listener)?)),
    })
}

/// Takes the route maps (see `out_routes`) out of the object.
fn take_route_maps(ebpf: &mut Ebpf) -> Result<RouteMirror> {
    let mut take = |name: &str| {
        ebpf.take_map(name)
            .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
    };
    let v4 = LpmTrie::try_from(take(local_origin::ROUTES_V4_MAP)?)?;
    let v6 = LpmTrie::try_from(take(local_origin::ROUTES_V6_MAP)?)?;
    RouteMirror::new(v4, v6)
}

impl Steering {
    /// Mirrors the host's routes again (they changed), when local connections are steered.
    pub(crate) fn follow_routes(&mut self) -> Result<()> {
        match &mut self.routes {
            Some(mirror) => mirror.follow(),
            None => Ok(()),
        }
    }

    /// Mirrors the host's routes for the `out_interface` names of the rules of
    /// `generation`, unless they are mirrored for those already.
    fn mirror_routes_for(&mut self, generation: u32, names: &[String]) -> Result<()> {
        match &mut self.routes {
            Some(mirror) => mirror
                .mirror_for(generation, names)
                .context("mirroring the host's routes for the rules for local connections"),
            None => Ok(()),
        }
    }

    /// Loads the program (not yet attached anywhere). Its rule maps are empty: nothing is
    /// steered until [`Steering::install_rules`].
    pub(crate) fn load(settings: &LoadSettings) -> Result<Self> {
        let adopted_capacity = match &settings.pinned {
            Some(pinned) => pinned_capacity(pinned, udp_flow_places(settings))?,
            None => None,
        };
        let capacity = adopted_capacity.unwrap_or(settings.rule_map_capacity);
        let fragment_timeouts = crate::datapath::fragments::reassembly_timeouts_ns();
        let kfuncs = Kfuncs::of_running_kernel();
        let mut ebpf = load_object(settings, capacity, fragment_timeouts, &kfuncs)?;
        let counters = take_counters(&mut ebpf)?;
        let fragments = FragmentTracking::take(&mut ebpf, fragment_timeouts)?;
        let routes = match settings.local_origin {
            Some(_) => Some(take_route_maps(&mut ebpf)?),
            None => None,
        };
        let mut steering = Steering {
            ebpf,
            active: None,
            capacity,
            counters,
            fragments,
            pinned: settings.pinned.clone(),
            adopted: None,
            unerased: None,
            attached: BTreeMap::new(),
            interface_events: Arc::default(),
            local_origin: None,
            loopback: settings.local_origin.is_some(),
            cgroup_links: CgroupLinks::new(),
            routes,
            kfuncs,
        };
        if let (Some(pinned), None) = (&settings.pinned, &settings.local_origin) {
            // An earlier instance's connect programs would go on steering local connections
            // to `lo`, where no program of ours takes them any more.
            for pin in pinned.cgroup_links() {
                std::fs::remove_file(&pin)
                    .with_context(|| format!("unpinning {}", pin.display()))?;
            }
        }
        if adopted_capacity.is_some() {
            steering
                .forget_rules_in_force()
                .context("reading the pinned generation")?;
        }
        steering.load_programs()?;
        steering.attach_lookup(settings.pinned.as_ref())?;
        Ok(steering)
    }

    /// Has the kernel's verifier check the programs (the loopback one only for local
    /// origin).
    fn load_programs(&mut self) -> Result<()> {
        self.classifier_mut(maps::PROGRAM_NAME)?
            .load()
            .context("the kernel's verifier rejected the steering program")?;
        if self.loopback {
            self.classifier_mut(local_origin::LOOPBACK_PROGRAM_NAME)?
                .load()
                .context("the kernel's verifier rejected the loopback program")?;
        }
        self.lookup_program_mut()?
            .load()
            .context("the kernel's verifier rejected the sk_lookup program")
    }

    /// Attaches the sk_lookup program to this network namespace; with `--pin`, pins its link
    /// in place of an earlier instance's.
    fn attach_lookup(&mut self, pinned: Option<&PinnedState>) -> Result<()> {
        let lookup = self.lookup_program_mut()?;
        // Network-namespace wide: it answers the listener lookups for SYNs that reuse the tuple
        // of a TIME_WAIT socket (see tproxy_common::decision::socket_owns_flow).
        let netns =
            std::fs::File::open("/proc/self/ns/net").context("opening this network namespace")?;
        let link = lookup
            .attach(netns)
            .context("attaching the sk_lookup program to this network namespace")?;
        if let Some(pinned) = pinned {
            let link: FdLink = lookup.take_link(link)?.into();
            let path = pinned.sk_lookup_link();
            // An earlier instance's link goes once its process, if still running, lets go:
            // until then both answer, from the same maps.
            let _ = std::fs::remove_file(&path);
            link.pin(&path)
                .with_context(|| format!("pinning the sk_lookup link at {}", path.display()))?;
        }
        Ok(())
    }

    fn lookup_program_mut(&mut self) -> Result<&mut SkLookup> {
        let name = maps::LOOKUP_PROGRAM_NAME;
        self.ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?
            .try_into()
            .context("sk_lookup program has the wrong type")
    }

    /// The tc program for interface `iface`: on `lo` while local origin is steered, the
    /// loopback program (see tproxy-ebpf's `loopback`), elsewhere the main one.
    fn program_for(&self, iface: &str) -> &'static str {
        match self.loopback && iface == crate::datapath::interfaces::LOOPBACK {
            true => local_origin::LOOPBACK_PROGRAM_NAME,
            false => maps::PROGRAM_NAME,
        }
    }

    fn classifier_mut(&mut self, name: &str) -> Result<&mut SchedClassifier> {
        self.ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?
            .try_into()
            .with_context(|| format!("program {name} has the wrong type"))
    }

    /// The loaded object, for the programs other modules attach (`local_origin`).
    /// Where the maps and links are pinned (`--pin`).
    pub(crate) fn pinned(&self) -> Option<&PinnedState> {
        self.pinned.as_ref()
    }

    pub(crate) fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Records what the connect programs select and where they are attached (for status,
    /// metrics and the log).
    pub(crate) fn set_local_origin(&mut self, stats: LocalOriginStats) {
        self.local_origin = Some(stats);
    }

    /// The connect, sendmsg and recvmsg programs' links, by cgroup.
    pub(crate) fn cgroup_links(&self) -> &CgroupLinks {
        &self.cgroup_links
    }

    pub(crate) fn cgroup_links_mut(&mut self) -> &mut CgroupLinks {
        &mut self.cgroup_links
    }

    /// What the connect programs select, once attached.
    pub(crate) fn local_origin(&self) -> Option<&LocalOriginStats> {
        self.local_origin.as_ref()
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
    }

    /// Puts a listening socket into the program's socket map.
    pub(crate) fn register_listener(
        &mut self,
        listener: u32,
        slot: maps::ListenerSlot,
        socket: &impl AsRawFd,
    ) -> Result<()> {
        let mut sockets = SockMap::try_from(self.map_mut(maps::LISTENERS)?)?;
        sockets
            .set(maps::listener_slot(listener, slot), socket, 0)
            .with_context(|| {
                format!("putting listener {listener}'s {slot:?} socket into the socket map")
            })
    }

    /// Takes a listener's sockets out of the socket map, and forgets its external address.
    pub(crate) fn unregister_listener(&mut self, listener: u32) -> Result<()> {
        let mut sockets = SockMap::try_from(self.map_mut(maps::LISTENERS)?)?;
        for slot in LISTENER_SLOTS {
            // Absent when the listener has no socket of that transport or family.
            let _ = sockets.clear_index(&maps::listener_slot(listener, slot));
        }
        self.set_external_listener(listener, &[])
    }

    /// Tells the program where listener `listener`'s proxy listens: `entries` (socket-map
    /// index, where to look) from `External::entries`; its other slots are not external.
    /// Each slot is overwritten in place, so a packet sees the old entry or the new one.
    pub(crate) fn set_external_listener(
        &mut self,
        listener: u32,
        entries: &[(u32, maps::ExternalListener)],
    ) -> Result<()> {
        let mut external: Array<_, maps::ExternalListener> =
            Array::try_from(self.map_mut(maps::EXTERNAL_LISTENERS)?)?;
        for slot in LISTENER_SLOTS {
            let index = maps::listener_slot(listener, slot);
            let entry = entries
                .iter()
                .find(|(at, _)| *at == index)
                .map_or_else(Default::default, |(_, entry)| *entry);
            external.set(index, entry, 0).with_context(|| {
                format!("setting listener {listener}'s external {slot:?} address")
            })?;
        }
        Ok(())
    }

    /// Empties every socket-map slot of listeners other than `kept` (those a previous
    /// instance used, or all of them when stopping).
    pub(crate) fn unregister_except(&mut self, kept: &[u32]) {
        for listener in (0..maps::MAX_LISTENERS).filter(|l| !kept.contains(l)) {
            let _ = self.unregister_listener(listener);
        }
    }

    /// Treats the rules in force as another process's (pinned by a predecessor, or replaced by
    /// a takeover that did not complete): the next install erases them by scanning.
    pub(crate) fn forget_rules_in_force(&mut self) -> Result<()> {
        let active: Array<_, u32> = Array::try_from(self.map_mut(maps::ACTIVE_GENERATION)?)?;
        self.adopted = Some(active.get(&0, 0)?);
        self.active = None;
        // The other process may have mirrored the routes for its own rules, over ours.
        if let Some(mirror) = &mut self.routes {
            mirror.reread()?;
        }
        Ok(())
    }

    /// Starts forwarding the program's aya-log records to the `log` crate.
    pub(crate) fn spawn_log_forwarder(&mut self) -> Result<()> {
        let logger = EbpfLogger::init(&mut self.ebpf).context("initialising eBPF logging")?;
        // SAFETY: the logger owns the ring buffer's descriptor and keeps it open, unchanged,
        // for as long as the AsyncFd holds the logger.
        let mut logger = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        }
        .context("registering the eBPF log ring buffer")?;
        tokio::spawn(async move {
            loop {
                let Ok(mut ready) = logger.readable_mut().await else {
                    return;
                };
                ready.get_inner_mut().flush();
                ready.clear_ready();
            }
        });
        Ok(())
    }

    /// The program's fragment tracking (see [`FragmentTracking::spawn_sweeper`]).
    pub(crate) fn fragments(&self) -> &FragmentTracking {
        &self.fragments
    }

    /// A handle on the counters for other tasks (the metrics endpoint).
    pub(crate) fn counter_reader(&self) -> CounterReader {
        self.counters.clone()
    }
}
