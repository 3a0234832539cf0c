//! The eBPF data path seen from userspace: load the embedded program with the routing mark
//! baked in, fill its steering-set maps, put our listeners into its socket map, attach it at
//! tc ingress, and read its counters. Dropping [`Steering`] detaches everything it attached.

use std::os::fd::AsRawFd;

use anyhow::{anyhow, Context, Result};
use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuArray, SockMap},
    programs::{tc, SchedClassifier, SkLookup, TcAttachType},
    util::KernelVersion,
    Ebpf, EbpfLoader,
};
use aya_log::EbpfLogger;
use ipnet::IpNet;
use tproxy_common::{decision::Protocol, maps, Outcome};

use crate::cli::{Mark, PortList};

/// The compiled tproxy-ebpf object, built by build.rs.
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tproxy-ebpf"));

/// How the program is hooked into an interface's ingress path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// A TCX link (kernel 6.6+): owned by our file descriptor, gone when the process is.
    Tcx,
    /// A cls_bpf filter on the clsact qdisc (older kernels): survives the process, so a later
    /// start removes stale ones by program name.
    Clsact,
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttachMode::Tcx => "tcx",
            AttachMode::Clsact => "clsact",
        })
    }
}

/// The loaded program and its maps.
pub struct Steering {
    ebpf: Ebpf,
}

/// What the program should steer.
pub struct SteeringSet<'a> {
    pub tcp: Option<&'a PortList>,
    pub udp: Option<&'a PortList>,
    /// Destination prefixes; empty means every destination.
    pub dst: &'a [IpNet],
    pub mark: Mark,
    /// SO_MARK of tproxy's own UDP sockets.
    pub socket_mark: u32,
}

/// Packet counts per protocol (row) and outcome (column), summed over CPUs.
pub type Counters = [[u64; Outcome::COUNT as usize]; Protocol::COUNT as usize];

impl Steering {
    /// Loads the program (not yet attached anywhere) and fills the steering set.
    pub fn load(set: &SteeringSet<'_>) -> Result<Self> {
        // Log records below the level the user asked for are not even produced in the kernel.
        let log_level = log::max_level() as u8;
        let ebpf = EbpfLoader::new()
            .override_global(maps::MARK_GLOBAL, &set.mark.value, true)
            .override_global(maps::MARK_MASK_GLOBAL, &set.mark.mask, true)
            .override_global(maps::OWN_SOCKET_MARK_GLOBAL, &set.socket_mark, true)
            .override_global("AYA_LOG_LEVEL", &log_level, true)
            .load(PROGRAM)
            .context("loading the eBPF object into the kernel")?;
        let mut steering = Steering { ebpf };
        steering.fill_ports(set.tcp, set.udp)?;
        steering.fill_destinations(set.dst)?;
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
        lookup
            .attach(netns)
            .context("attaching the sk_lookup program to this network namespace")?;
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

    fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
    }

    fn fill_ports(&mut self, tcp: Option<&PortList>, udp: Option<&PortList>) -> Result<()> {
        let mut protocols = vec![0u8; maps::STEERED_PORTS_LEN as usize];
        for (list, bit) in [(tcp, maps::PORT_TCP), (udp, maps::PORT_UDP)] {
            for port in list.into_iter().flat_map(PortList::ports) {
                protocols[usize::from(port)] |= bit;
            }
        }
        let mut ports: Array<_, u8> = Array::try_from(self.map_mut(maps::STEERED_PORTS)?)?;
        for (port, bits) in protocols
            .into_iter()
            .enumerate()
            .filter(|(_, bits)| *bits != 0)
        {
            ports
                .set(port as u32, bits, 0)
                .with_context(|| format!("adding port {port} to the steering set"))?;
        }
        Ok(())
    }

    fn fill_destinations(&mut self, dst: &[IpNet]) -> Result<()> {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for prefix in dst {
            match prefix {
                IpNet::V4(net) => v4.push((*prefix, net.addr().octets())),
                IpNet::V6(net) => v6.push((*prefix, net.addr().octets())),
            }
        }
        if dst.is_empty() {
            v4.push((IpNet::V4(Default::default()), [0; 4]));
            v6.push((IpNet::V6(Default::default()), [0; 16]));
        }
        self.insert_prefixes(maps::STEERED_DST_V4, &v4)?;
        self.insert_prefixes(maps::STEERED_DST_V6, &v6)
    }

    fn insert_prefixes<const N: usize>(
        &mut self,
        map: &str,
        prefixes: &[(IpNet, [u8; N])],
    ) -> Result<()> {
        let limit = maps::MAX_DST_PREFIXES as usize;
        if prefixes.len() > limit {
            return Err(anyhow!(
                "{} --dst prefixes of one address family given; at most {limit} fit",
                prefixes.len()
            ));
        }
        let mut trie: LpmTrie<_, [u8; N], u8> = LpmTrie::try_from(self.map_mut(map)?)?;
        for (net, octets) in prefixes {
            trie.insert(&Key::new(net.prefix_len().into(), *octets), 1, 0)
                .with_context(|| format!("adding --dst {net} to the steering set"))?;
        }
        Ok(())
    }

    /// Puts a listening socket into the program's socket map at `slot`.
    pub fn register_listener(
        &mut self,
        slot: maps::ListenerSlot,
        listener: &impl AsRawFd,
    ) -> Result<()> {
        let mut sockets = SockMap::try_from(self.map_mut(maps::LISTENERS)?)?;
        sockets
            .set(slot as u32, listener, 0)
            .with_context(|| format!("putting the {slot:?} listener into the socket map"))
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

    /// Attaches the program at `iface`'s ingress.
    pub fn attach(&mut self, iface: &str) -> Result<AttachMode> {
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
        let ifindex = nix::net::if_::if_nametoindex(iface)
            .with_context(|| format!("--iface {iface}: no such interface"))?;
        let mut ifaces: HashMap<_, u32, u8> =
            HashMap::try_from(self.map_mut(maps::STEERED_IFACES)?)?;
        ifaces
            .insert(ifindex, 1, 0)
            .with_context(|| format!("adding {iface} to the steered interfaces"))?;
        self.program_mut()?
            .attach(iface, TcAttachType::Ingress)
            .with_context(|| {
                format!("attaching the steering program to {iface} ingress ({mode})")
            })?;
        Ok(mode)
    }

    /// Packet counts per protocol and outcome, summed over CPUs.
    pub fn counters(&self) -> Result<Counters> {
        let map = self
            .ebpf
            .map(maps::COUNTERS)
            .ok_or_else(|| anyhow!("map {} missing from the eBPF object", maps::COUNTERS))?;
        let counters: PerCpuArray<_, u64> = PerCpuArray::try_from(map)?;
        let mut totals = Counters::default();
        for protocol in Protocol::ALL {
            for outcome in Outcome::ALL {
                let index = tproxy_common::decision::counter_index(protocol, outcome);
                totals[protocol as usize][outcome as usize] = counters.get(&index, 0)?.iter().sum();
            }
        }
        Ok(totals)
    }
}
