//! The program's packet counters, read from a running instance's map or a pinned one.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use aya::{
    maps::{MapData, PerCpuArray},
    programs::links::{FdLink, PinnedLink},
};
use tproxy_common::{
    decision::Protocol,
    maps::{self},
    Outcome,
};

use super::LISTENER_SLOTS;

/// Packet counts per protocol (row) and outcome (column), summed over CPUs.
pub(super) type Counters = [[u64; Outcome::COUNT as usize]; Protocol::COUNT as usize];

/// Reads the program's per-CPU counters; shared, cheap to clone.
#[derive(Clone)]
pub(crate) struct CounterReader {
    pub(super) outcomes: Arc<PerCpuArray<MapData, u64>>,
    /// `None` when read from a pin (not pinned: counts start again with each instance).
    pub(super) per_listener: Option<Arc<PerCpuArray<MapData, u64>>>,
}

impl CounterReader {
    /// Reads the counters map pinned at `path` (for `tproxy status`).
    pub(crate) fn from_pin(path: &std::path::Path) -> Result<Self> {
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
    pub(crate) fn pinned_link_program(path: &std::path::Path) -> Result<u32> {
        let link = FdLink::from(PinnedLink::from_pin(path)?);
        Ok(link.info()?.program_id())
    }

    /// Packet counts per protocol and outcome, summed over CPUs.
    pub(crate) fn read(&self) -> Result<Counters> {
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
    pub(crate) fn listener_counts(&self, listener: u32) -> Result<crate::stats::ListenerPackets> {
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
