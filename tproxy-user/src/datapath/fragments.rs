//! The program's fragment tracking, seen from userspace: entries whose datagram the kernel
//! has given up reassembling are deleted, so that never-completed, forged or out-of-order
//! fragments leave nothing behind (the program already ignores such entries; this empties
//! them out instead of waiting for the LRU to evict them).

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{anyhow, Result};
use aya::{
    maps::{HashMap, MapData},
    Ebpf,
};
use tproxy_common::maps::{self, FragmentDecision, FragmentKey, ProtocolFlowKey, ReassembledFlow};

use crate::stats::FragmentEntries;

/// How often expired entries are deleted: a quarter of the shorter reassembly timeout, within
/// these bounds.
const SWEEP_INTERVAL: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(5));

/// The program's two fragment maps; shared, cheap to clone.
#[derive(Clone)]
pub(crate) struct FragmentTracking(Arc<Tracking>);

struct Tracking {
    maps: Mutex<Maps>,
    /// The namespace's reassembly timeouts (IPv4, IPv6), as the program has them.
    timeouts_ns: (u64, u64),
    /// What the last sweep left: read without waiting for a sweep in progress.
    datagrams_left: AtomicUsize,
    reassembled_flows_left: AtomicUsize,
}

struct Maps {
    datagrams: HashMap<MapData, FragmentKey, FragmentDecision>,
    reassembled: HashMap<MapData, ProtocolFlowKey, ReassembledFlow>,
}

/// The namespace's reassembly timeouts in nanoseconds (IPv4, IPv6), from
/// `net.ipv4.ipfrag_time` and `net.ipv6.ip6frag_time` (per network namespace); the kernel's
/// defaults where one cannot be read (IPv6 disabled).
pub(crate) fn reassembly_timeouts_ns() -> (u64, u64) {
    let (v4, v6) = maps::DEFAULT_FRAGMENT_TIMEOUTS_NS;
    (
        super::sysctl_seconds_ns("/proc/sys/net/ipv4/ipfrag_time", v4),
        super::sysctl_seconds_ns("/proc/sys/net/ipv6/ip6frag_time", v6),
    )
}

impl FragmentTracking {
    /// Takes the fragment maps out of the loaded object, whose program was loaded with
    /// `timeouts_ns`.
    pub(crate) fn take(ebpf: &mut Ebpf, timeouts_ns: (u64, u64)) -> Result<Self> {
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
        };
        let datagrams = HashMap::try_from(take(maps::FRAGMENTS)?)?;
        let reassembled = HashMap::try_from(take(maps::REASSEMBLED_FLOWS)?)?;
        Ok(FragmentTracking(Arc::new(Tracking {
            maps: Mutex::new(Maps {
                datagrams,
                reassembled,
            }),
            timeouts_ns,
            datagrams_left: AtomicUsize::new(0),
            reassembled_flows_left: AtomicUsize::new(0),
        })))
    }

    /// Deletes the entries whose reassembly time is up every few seconds, off the runtime's
    /// worker threads (a full map is thousands of syscalls), until the runtime stops.
    pub(crate) fn spawn_sweeper(&self) {
        let tracking = self.clone();
        tokio::spawn(async move {
            let (v4, v6) = tracking.0.timeouts_ns;
            let every =
                Duration::from_nanos(v4.min(v6) / 4).clamp(SWEEP_INTERVAL.0, SWEEP_INTERVAL.1);
            let mut interval = tokio::time::interval(every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let tracking = tracking.clone();
                match tokio::task::spawn_blocking(move || tracking.sweep()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => log::warn!("sweeping expired fragment entries: {error:#}"),
                    Err(error) => log::warn!("the fragment sweep failed: {error}"),
                }
            }
        });
    }

    /// What the last sweep left.
    pub(crate) fn entries(&self) -> FragmentEntries {
        FragmentEntries {
            datagrams: self.0.datagrams_left.load(Relaxed) as u64,
            reassembled_flows: self.0.reassembled_flows_left.load(Relaxed) as u64,
        }
    }

    fn sweep(&self) -> Result<()> {
        let timeouts = self.0.timeouts_ns;
        // A sweep that panicked left the maps as consistent as the kernel keeps them.
        let mut maps = self.0.maps.lock().unwrap_or_else(|e| e.into_inner());
        let now = monotonic_ns()?;
        let left = sweep_map(&mut maps.datagrams, |d| d.is_live(now, timeouts));
        self.0.datagrams_left.store(left, Relaxed);
        let now = monotonic_ns()?;
        let left = sweep_map(&mut maps.reassembled, |f| f.is_live(now, timeouts));
        self.0.reassembled_flows_left.store(left, Relaxed);
        Ok(())
    }
}

/// Deletes the entries that are not `live`; returns how many are left.
fn sweep_map<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    live: impl Fn(&V) -> bool,
) -> usize {
    // Keys first: deleting while iterating a BPF hash map restarts the walk. The program
    // inserts and the LRU evicts meanwhile, so a key can come up twice: count it once.
    let mut seen = std::collections::HashSet::new();
    let keys: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|key| seen.insert(pod_bytes(key)))
        .collect();
    let mut left = 0;
    for key in keys {
        // Read again just before deleting: the program may have written the key anew since
        // (a UDP flow's next fragmented datagram), and a live entry must stay.
        match map.get(&key, 0) {
            Ok(value) if live(&value) => left += 1,
            // Gone already when the program or the LRU removed it meanwhile.
            Ok(_) => {
                let _ = map.remove(&key);
            }
            Err(_) => {}
        }
    }
    left
}

/// A map key's bytes, to tell keys apart without requiring `Hash` of every key type.
fn pod_bytes<K: aya::Pod>(key: &K) -> Vec<u8> {
    // SAFETY: `Pod` types are plain bytes without padding or invalid values.
    unsafe { std::slice::from_raw_parts((key as *const K).cast::<u8>(), std::mem::size_of::<K>()) }
        .to_vec()
}

/// `bpf_ktime_get_ns`'s clock.
fn monotonic_ns() -> Result<u64> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for the call to fill.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) } != 0 {
        return Err(std::io::Error::last_os_error())
            .map_err(|e| anyhow!("reading CLOCK_MONOTONIC: {e}"));
    }
    Ok(now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64)
}
