//! The program's fragment tracking, seen from userspace: entries whose datagram the kernel
//! has given up reassembling are deleted, so that never-completed, forged or out-of-order
//! fragments leave nothing behind (the program already ignores such entries; this empties
//! them out instead of waiting for the LRU to evict them).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{anyhow, Result};
use aya::{
    maps::{HashMap, MapData},
    Ebpf,
};
use tproxy_common::maps::{self, FragmentDecision, FragmentKey, ProtocolFlowKey, ReassembledFlow};

/// How often expired entries are deleted: a fraction of the shortest reassembly timeout.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Entries left in the fragment maps after a sweep.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragmentEntries {
    /// Datagrams whose first fragment was decided and whose time is not up.
    pub datagrams: usize,
    /// Reassembled flows waiting for their socket lookup.
    pub reassembled_flows: usize,
}

/// The program's two fragment maps; shared, cheap to clone.
#[derive(Clone)]
pub struct FragmentTracking(Arc<Mutex<Maps>>);

struct Maps {
    datagrams: HashMap<MapData, FragmentKey, FragmentDecision>,
    reassembled: HashMap<MapData, ProtocolFlowKey, ReassembledFlow>,
    last: FragmentEntries,
}

impl FragmentTracking {
    /// Takes the fragment maps out of the loaded object.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self> {
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
        };
        let datagrams = HashMap::try_from(take(maps::FRAGMENTS)?)?;
        let reassembled = HashMap::try_from(take(maps::REASSEMBLED_FLOWS)?)?;
        Ok(FragmentTracking(Arc::new(Mutex::new(Maps {
            datagrams,
            reassembled,
            last: FragmentEntries::default(),
        }))))
    }

    /// Deletes the entries whose reassembly time is up every few seconds, off the runtime's
    /// worker threads (a full map is thousands of syscalls), until the runtime stops.
    pub fn spawn_sweeper(&self) {
        let tracking = self.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(SWEEP_INTERVAL);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let tracking = tracking.clone();
                let swept = tokio::task::spawn_blocking(move || tracking.sweep()).await;
                if let Ok(Err(error)) = swept {
                    log::warn!("sweeping expired fragment entries: {error:#}");
                }
            }
        });
    }

    /// What the last sweep left.
    pub fn entries(&self) -> FragmentEntries {
        self.0.lock().map(|maps| maps.last).unwrap_or_default()
    }

    fn sweep(&self) -> Result<FragmentEntries> {
        let now = monotonic_ns()?;
        let mut maps = self
            .0
            .lock()
            .map_err(|_| anyhow!("fragment maps poisoned"))?;
        let datagrams = sweep_map(&mut maps.datagrams, |d| d.is_live(now))?;
        let reassembled_flows = sweep_map(&mut maps.reassembled, |f| f.is_live(now))?;
        maps.last = FragmentEntries {
            datagrams,
            reassembled_flows,
        };
        Ok(maps.last)
    }
}

/// Deletes the entries that are not `live`; returns how many are left.
fn sweep_map<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    live: impl Fn(&V) -> bool,
) -> Result<usize> {
    let mut left = 0;
    // Collected first: deleting while iterating a BPF hash map restarts the walk.
    let entries: Vec<(K, V)> = map.iter().filter_map(Result::ok).collect();
    for (key, value) in entries {
        if live(&value) {
            left += 1;
        } else {
            // Gone already when the program or the LRU removed it meanwhile.
            let _ = map.remove(&key);
        }
    }
    Ok(left)
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
