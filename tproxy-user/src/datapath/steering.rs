//! The eBPF data path seen from userspace: load the embedded program with the routing mark
//! baked in, install compiled rule sets into its maps (atomically, by generation), put our
//! listeners into its socket map, attach it at tc ingress, and read its counters. Dropping [`Steering`] detaches everything it attached.

use std::{
    collections::BTreeMap,
    os::fd::AsRawFd,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, MapInfo, PerCpuArray, SockMap},
    programs::{
        links::{FdLink, PinnedLink},
        tc::{self, SchedClassifierLink, SchedClassifierLinkId},
        SchedClassifier, SkLookup, TcAttachType,
    },
    util::KernelVersion,
    Ebpf, EbpfLoader,
};
use aya_log::EbpfLogger;
use tproxy_common::{
    decision::Protocol,
    local_origin,
    maps::{self, Verdict},
    Outcome,
};

use crate::{
    datapath::fragments::FragmentTracking,
    datapath::interfaces::{Framing, Link},
    datapath::local_origin::LocalGlobals,
    datapath::pin::PinnedState,
    datapath::rules::{CompiledRules, Entry},
    values::Mark,
};

/// The compiled tproxy-ebpf object, built by build.rs.
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tproxy-ebpf"));

/// How the program is hooked into an interface's ingress path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
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

/// The loaded program and its maps.
pub struct Steering {
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
    /// Where the program is attached, by ifindex.
    attached: BTreeMap<u32, Attachment>,
    interface_events: Arc<InterfaceEvents>,
}

/// The program on one interface.
struct Attachment {
    name: String,
    mode: AttachMode,
    /// Ours to detach (`None`: only pinned).
    link: Option<SchedClassifierLinkId>,
    /// Where its link is pinned (`--pin`).
    pin: Option<PathBuf>,
}

/// What attaching and detaching did since start, and the interfaces attached now; shared
/// with the stats snapshot.
#[derive(Default)]
pub struct InterfaceEvents {
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

/// How the program is loaded: fixed for its lifetime.
pub struct LoadSettings {
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
}

/// Every slot a listener has in the socket map.
const LISTENER_SLOTS: [maps::ListenerSlot; 4] = [
    maps::ListenerSlot::TcpV4,
    maps::ListenerSlot::TcpV6,
    maps::ListenerSlot::UdpV4,
    maps::ListenerSlot::UdpV6,
];

/// Packet counts per protocol (row) and outcome (column), summed over CPUs.
pub type Counters = [[u64; Outcome::COUNT as usize]; Protocol::COUNT as usize];

/// How long after switching generations the old one's entries are deleted. Programs read the
/// generation once and finish within microseconds; this is a wide margin.
const GENERATION_GRACE: Duration = Duration::from_millis(20);

/// The rule maps' size for a first rule set: room for two generations of a rule set up to
/// twice as large, so reloads that grow the rules still fit.
pub fn rule_map_capacity(first: &CompiledRules) -> u32 {
    let needed = u32::try_from(first.largest_map()).unwrap_or(u32::MAX);
    needed
        .saturating_mul(4)
        .clamp(1024, maps::MAX_RULE_MAP_ENTRIES)
}

impl Steering {
    /// Loads the program (not yet attached anywhere). Its rule maps are empty: nothing is
    /// steered until [`Steering::install_rules`].
    pub fn load(settings: &LoadSettings) -> Result<Self> {
        // Log records below the level the user asked for are not even produced in the kernel.
        let log_level = log::max_level() as u8;
        let fail_closed = u32::from(settings.fail_closed);
        let mut capacity = settings.rule_map_capacity;
        let mut loader = EbpfLoader::new();
        let mut adopting = false;
        if let Some(pinned) = &settings.pinned {
            pinned.prepare()?;
            adopting = pinned.exists();
            if adopting {
                pinned.discard_counters_of_another_layout()?;
                let rules = pinned.map(maps::RULES_DST_V4);
                capacity = MapInfo::from_pin(&rules)
                    .with_context(|| format!("opening the pinned map {}", rules.display()))?
                    .max_entries();
            }
            for name in maps::PINNED_MAPS {
                loader.map_pin_path(name, pinned.map(name));
            }
        }
        let fragment_timeouts = crate::datapath::fragments::reassembly_timeouts_ns();
        let local_origin = u32::from(settings.local_origin.is_some());
        let local = settings.local_origin.as_ref();
        let own_cgroup = local.map_or(0, |l| l.own_cgroup);
        let own_netns = local.map_or(0, |l| l.own_netns);
        let uid_ranges = local.map(|l| l.uid_ranges).unwrap_or_default();
        let uid_ranges_len = local.map_or(0, |l| l.uid_ranges_len);
        let ebpf = loader
            .override_global(local_origin::LOCAL_ORIGIN_GLOBAL, &local_origin, true)
            .override_global(local_origin::OWN_CGROUP_GLOBAL, &own_cgroup, true)
            .override_global(local_origin::OWN_NETNS_GLOBAL, &own_netns, true)
            .override_global(local_origin::UID_RANGES_GLOBAL, &uid_ranges, true)
            .override_global(local_origin::UID_RANGES_LEN_GLOBAL, &uid_ranges_len, true)
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
            .load(PROGRAM)
            .context("loading the eBPF object into the kernel")?;
        let mut ebpf = ebpf;
        let counters = ebpf
            .take_map(maps::COUNTERS)
            .ok_or_else(|| anyhow!("map {} missing from the eBPF object", maps::COUNTERS))?;
        let per_listener = ebpf.take_map(maps::LISTENER_COUNTERS).ok_or_else(|| {
            anyhow!(
                "map {} missing from the eBPF object",
                maps::LISTENER_COUNTERS
            )
        })?;
        let counters = CounterReader {
            outcomes: Arc::new(PerCpuArray::try_from(counters)?),
            per_listener: Some(Arc::new(PerCpuArray::try_from(per_listener)?)),
        };
        let fragments = FragmentTracking::take(&mut ebpf, fragment_timeouts)?;
        let mut steering = Steering {
            ebpf,
            active: None,
            capacity,
            counters,
            fragments,
            pinned: settings.pinned.clone(),
            adopted: None,
            attached: BTreeMap::new(),
            interface_events: Arc::default(),
        };
        if adopting {
            steering
                .forget_rules_in_force()
                .context("reading the pinned generation")?;
        }
        let program: &mut SchedClassifier = steering.program_mut()?;
        program
            .load()
            .context("the kernel's verifier rejected the steering program")?;
        let lookup = steering.lookup_program_mut()?;
        lookup
            .load()
            .context("the kernel's verifier rejected the sk_lookup program")?;
        // Network-namespace wide: it answers the listener lookups for SYNs that reuse the tuple
        // of a TIME_WAIT socket (see tproxy_common::decision::socket_owns_flow).
        let netns =
            std::fs::File::open("/proc/self/ns/net").context("opening this network namespace")?;
        let link = lookup
            .attach(netns)
            .context("attaching the sk_lookup program to this network namespace")?;
        if let Some(pinned) = &settings.pinned {
            let link: FdLink = lookup.take_link(link)?.into();
            let path = pinned.sk_lookup_link();
            // An earlier instance's link goes once its process, if still running, lets go:
            // until then both answer, from the same maps.
            let _ = std::fs::remove_file(&path);
            link.pin(&path)
                .with_context(|| format!("pinning the sk_lookup link at {}", path.display()))?;
        }
        Ok(steering)
    }

    fn lookup_program_mut(&mut self) -> Result<&mut SkLookup> {
        let name = maps::LOOKUP_PROGRAM_NAME;
        self.ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?
            .try_into()
            .context("sk_lookup program has the wrong type")
    }

    fn program_mut(&mut self) -> Result<&mut SchedClassifier> {
        self.ebpf
            .program_mut(maps::PROGRAM_NAME)
            .ok_or_else(|| {
                anyhow!(
                    "program {} missing from the eBPF object",
                    maps::PROGRAM_NAME
                )
            })?
            .try_into()
            .context("steering program has the wrong type")
    }

    /// The loaded object, for the programs other modules attach (`local_origin`).
    pub(crate) fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
    }

    /// The generation the next [`Steering::install_rules`] must be compiled for.
    pub fn next_generation(&self) -> u32 {
        self.active
            .as_ref()
            .map(|(generation, _)| *generation)
            .or(self.adopted)
            .map_or(0, |generation| generation ^ 1)
    }

    /// Makes `rules` (compiled for [`Steering::next_generation`]) the rule set in force, in
    /// one step: every entry is written first, then the generation switch. On error the rule
    /// set in force is unchanged.
    pub fn install_rules(&mut self, rules: CompiledRules) -> Result<()> {
        let generation = self.next_generation();
        let in_force = self.active.as_ref().map(|(_, rules)| rules);
        let sizes = [
            (
                maps::RULES_DST_V4,
                rules.dst_v4.len(),
                in_force.map_or(0, |r| r.dst_v4.len()),
            ),
            (
                maps::RULES_DST_V6,
                rules.dst_v6.len(),
                in_force.map_or(0, |r| r.dst_v6.len()),
            ),
            (
                maps::RULES_SRC_V4,
                rules.src_v4.len(),
                in_force.map_or(0, |r| r.src_v4.len()),
            ),
            (
                maps::RULES_SRC_V6,
                rules.src_v6.len(),
                in_force.map_or(0, |r| r.src_v6.len()),
            ),
        ];
        for (map, new, old) in sizes {
            if new + old > self.capacity as usize {
                if self.active.is_none() {
                    bail!(
                        "the rules need {new} entries in {map}, more than a rule map may hold \
                         ({}); split large port ranges or prefix lists into fewer rules",
                        self.capacity
                    );
                }
                bail!(
                    "the rules need {new} entries in {map}, and the {old} of the rules in force \
                     stay until the switch; the maps were sized for {} at start: restart tproxy \
                     to load a rule set this large",
                    self.capacity
                );
            }
        }
        if self.active.is_none() && self.adopted.is_some() {
            // Entries of an instance that stopped in the middle of a reload.
            self.erase_generation_by_scan(generation)?;
        }
        if let Err(error) = self.write_generation(generation, &rules) {
            let _ = self.erase_generation(generation, &rules);
            return Err(error);
        }
        let mut active: Array<_, u32> = Array::try_from(self.map_mut(maps::ACTIVE_GENERATION)?)?;
        active
            .set(0, generation, 0)
            .context("switching to the new rule set")?;
        if let Some((old_generation, old)) = self.active.replace((generation, rules)) {
            std::thread::sleep(GENERATION_GRACE);
            self.erase_generation(old_generation, &old)
                .context("removing the previous rule set's entries")?;
        } else if let Some(adopted) = self.adopted.take() {
            std::thread::sleep(GENERATION_GRACE);
            self.erase_generation_by_scan(adopted)
                .context("removing the pinned rule set's entries")?;
        }
        Ok(())
    }

    /// Removes every entry of `generation` from the rule maps, without knowing what was
    /// written: for rule sets that another process installed.
    fn erase_generation_by_scan(&mut self, generation: u32) -> Result<()> {
        let mut classes: Array<_, u32> = Array::try_from(self.map_mut(maps::PORT_CLASSES)?)?;
        for udp in [false, true] {
            for port in 0..=u16::MAX {
                let index = maps::port_class_index(generation, udp, port);
                if classes.get(&index, 0)? != 0 {
                    classes.set(index, 0, 0)?;
                }
            }
        }
        let of_generation = |id: u32| (id & maps::GENERATION_BIT != 0) == (generation & 1 == 1);
        self.erase_lpm_where(maps::RULES_DST_V4, |k: &maps::DstKey<4>| {
            of_generation(k.class)
        })?;
        self.erase_lpm_where(maps::RULES_DST_V6, |k: &maps::DstKey<16>| {
            of_generation(k.class)
        })?;
        self.erase_lpm_where(maps::RULES_SRC_V4, |k: &maps::SrcKey<4>| {
            of_generation(k.cell)
        })?;
        self.erase_lpm_where(maps::RULES_SRC_V6, |k: &maps::SrcKey<16>| {
            of_generation(k.cell)
        })
    }

    fn erase_lpm_where<K: aya::Pod>(
        &mut self,
        map: &str,
        doomed: impl Fn(&K) -> bool,
    ) -> Result<()> {
        let mut trie: LpmTrie<_, K, Verdict> = LpmTrie::try_from(self.map_mut(map)?)?;
        let keys: Vec<Key<K>> = trie
            .keys()
            .filter_map(Result::ok)
            .filter(|key| doomed(&key.data()))
            .collect();
        for key in keys {
            let _ = trie.remove(&key);
        }
        Ok(())
    }

    fn write_generation(&mut self, generation: u32, rules: &CompiledRules) -> Result<()> {
        // Sources before destinations, destinations before ports: whatever a later stage
        // points to exists by the time it can be reached.
        self.write_lpm(maps::RULES_SRC_V4, &rules.src_v4)?;
        self.write_lpm(maps::RULES_SRC_V6, &rules.src_v6)?;
        self.write_lpm(maps::RULES_DST_V4, &rules.dst_v4)?;
        self.write_lpm(maps::RULES_DST_V6, &rules.dst_v6)?;
        let mut classes: Array<_, u32> = Array::try_from(self.map_mut(maps::PORT_CLASSES)?)?;
        for (i, class) in rules.port_classes.iter().enumerate() {
            let (udp, port) = (i >= 65536, (i % 65536) as u16);
            // The region was zeroed when this generation was last retired.
            if *class != 0 {
                classes.set(maps::port_class_index(generation, udp, port), class, 0)?;
            }
        }
        Ok(())
    }

    fn erase_generation(&mut self, generation: u32, rules: &CompiledRules) -> Result<()> {
        let mut classes: Array<_, u32> = Array::try_from(self.map_mut(maps::PORT_CLASSES)?)?;
        for (i, class) in rules.port_classes.iter().enumerate() {
            let (udp, port) = (i >= 65536, (i % 65536) as u16);
            if *class != 0 {
                classes.set(maps::port_class_index(generation, udp, port), 0, 0)?;
            }
        }
        self.erase_lpm(maps::RULES_DST_V4, &rules.dst_v4)?;
        self.erase_lpm(maps::RULES_DST_V6, &rules.dst_v6)?;
        self.erase_lpm(maps::RULES_SRC_V4, &rules.src_v4)?;
        self.erase_lpm(maps::RULES_SRC_V6, &rules.src_v6)
    }

    fn write_lpm<K: aya::Pod>(&mut self, map: &str, entries: &[Entry<K>]) -> Result<()> {
        let mut trie: LpmTrie<_, K, Verdict> = LpmTrie::try_from(self.map_mut(map)?)?;
        for (key, prefix_len, verdict) in entries {
            trie.insert(&Key::new(*prefix_len, *key), *verdict, 0)
                .with_context(|| format!("writing a rule entry to {map}"))?;
        }
        Ok(())
    }

    fn erase_lpm<K: aya::Pod>(&mut self, map: &str, entries: &[Entry<K>]) -> Result<()> {
        let mut trie: LpmTrie<_, K, Verdict> = LpmTrie::try_from(self.map_mut(map)?)?;
        for (key, prefix_len, _) in entries {
            // Absent after a failed write: nothing to remove.
            let _ = trie.remove(&Key::new(*prefix_len, *key));
        }
        Ok(())
    }

    /// Puts a listening socket into the program's socket map.
    pub fn register_listener(
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
    pub fn unregister_listener(&mut self, listener: u32) -> Result<()> {
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
    pub fn set_external_listener(
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
    pub fn unregister_except(&mut self, kept: &[u32]) {
        for listener in (0..maps::MAX_LISTENERS).filter(|l| !kept.contains(l)) {
            let _ = self.unregister_listener(listener);
        }
    }

    /// Treats the rules in force as another process's (pinned by a predecessor, or replaced by
    /// a takeover that did not complete): the next install erases them by scanning.
    pub fn forget_rules_in_force(&mut self) -> Result<()> {
        let active: Array<_, u32> = Array::try_from(self.map_mut(maps::ACTIVE_GENERATION)?)?;
        self.adopted = Some(active.get(&0, 0)?);
        self.active = None;
        Ok(())
    }

    /// Starts forwarding the program's aya-log records to the `log` crate.
    pub fn spawn_log_forwarder(&mut self) -> Result<()> {
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

    /// Attaches the program at `link`'s ingress (nothing when it is attached there already).
    pub fn attach(&mut self, link: &Link) -> Result<AttachMode> {
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
            match tc::qdisc_detach_program(iface, TcAttachType::Ingress, maps::PROGRAM_NAME) {
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
                    mode,
                    link,
                    pin,
                });
            }
        }
        let program = self.program_mut()?;
        let link = program
            .attach(iface, TcAttachType::Ingress)
            .with_context(|| {
                format!("attaching the steering program to {iface} ingress ({mode})")
            })?;
        let Some(path) = pin else {
            let link = Some(link);
            return Ok(Attachment {
                name,
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
            mode,
            link,
            pin,
        })
    }

    /// Takes the program off the interface `ifindex` (gone, renamed, or no longer wanted),
    /// pinned link included; nothing when it is not attached there.
    pub fn detach(&mut self, ifindex: u32) {
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
            match self.program_mut().map(|program| program.detach(link)) {
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
    pub fn attached_interfaces(&self) -> Vec<(String, u32)> {
        self.attached
            .iter()
            .map(|(index, attachment)| (attachment.name.clone(), *index))
            .collect()
    }

    /// How the program is attached, per interface (`NAME (MODE)`).
    pub fn attached_descriptions(&self) -> Vec<String> {
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
    pub fn interface_events(&self) -> Arc<InterfaceEvents> {
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
        let program = self.program_mut()?;
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

    /// The program's fragment tracking (see [`FragmentTracking::spawn_sweeper`]).
    pub fn fragments(&self) -> &FragmentTracking {
        &self.fragments
    }

    /// A handle on the counters for other tasks (the metrics endpoint).
    pub fn counter_reader(&self) -> CounterReader {
        self.counters.clone()
    }
}

/// Reads the program's per-CPU counters; shared, cheap to clone.
#[derive(Clone)]
pub struct CounterReader {
    outcomes: Arc<PerCpuArray<MapData, u64>>,
    /// `None` when read from a pin (not pinned: counts start again with each instance).
    per_listener: Option<Arc<PerCpuArray<MapData, u64>>>,
}

impl CounterReader {
    /// Reads the counters map pinned at `path` (for `tproxy status`).
    pub fn from_pin(path: &std::path::Path) -> Result<Self> {
        let map = MapData::from_pin(path)
            .with_context(|| format!("opening the pinned map {}", path.display()))?;
        let entries = map.info()?.max_entries();
        if entries != maps::COUNTERS_LEN {
            bail!(
                "the pinned counters at {} have another layout ({entries} entries, {} in this \
                 version): the next `run --pin` of this version replaces them",
                path.display(),
                maps::COUNTERS_LEN
            );
        }
        let map = PerCpuArray::try_from(aya::maps::Map::from_map_data(map)?)?;
        Ok(CounterReader {
            outcomes: Arc::new(map),
            per_listener: None,
        })
    }

    /// The program id behind the link pinned at `path`.
    pub fn pinned_link_program(path: &std::path::Path) -> Result<u32> {
        let link = FdLink::from(PinnedLink::from_pin(path)?);
        Ok(link.info()?.program_id())
    }

    /// Packet counts per protocol and outcome, summed over CPUs.
    pub fn read(&self) -> Result<Counters> {
        let mut totals = Counters::default();
        for protocol in Protocol::ALL {
            for outcome in Outcome::ALL {
                let index = tproxy_common::decision::counter_index(protocol, outcome);
                totals[protocol as usize][outcome as usize] =
                    self.outcomes.get(&index, 0)?.iter().sum();
            }
        }
        Ok(totals)
    }

    /// The counts of listener `listener` (all its slots), summed over CPUs.
    pub fn listener_counts(&self, listener: u32) -> Result<crate::stats::ListenerPackets> {
        let mut counts = crate::stats::ListenerPackets::default();
        let Some(map) = &self.per_listener else {
            return Ok(counts);
        };
        for slot in LISTENER_SLOTS {
            let slot = maps::listener_slot(listener, slot);
            let sum = |no_listener| -> Result<u64> {
                let index = maps::listener_counter_index(slot, no_listener);
                Ok(map.get(&index, 0)?.iter().sum())
            };
            counts.steered_new += sum(false)?;
            counts.no_listener += sum(true)?;
        }
        Ok(counts)
    }
}
