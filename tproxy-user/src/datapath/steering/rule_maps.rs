//! Rule sets into the program's lookup maps: each generation written whole, then the
//! switch, then the previous generation's entries erased.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use aya::maps::{lpm_trie::Key, Array, LpmTrie};
use tproxy_common::maps::{self, MarkRules, Verdict};

use crate::datapath::rules::{CompiledRules, Entry};

use super::Steering;

/// How long after switching generations the old one's entries are deleted. Programs read the
/// generation once and finish within microseconds; this is a wide margin.
const GENERATION_GRACE: Duration = Duration::from_millis(20);

/// A rule set written as the generation not in force (see [`Steering::stage_rules`]): put
/// in force with [`Steering::switch_to`], or erased with [`Steering::discard`].
#[must_use]
pub struct StagedRules {
    generation: u32,
    rules: CompiledRules,
}

impl Steering {
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
        let staged = self.stage_rules(rules)?;
        self.switch_to(staged)
    }

    /// Writes `rules` (compiled for [`Steering::next_generation`]) as the generation not in
    /// force, which no program reads until [`Steering::switch_to`]. On error nothing of
    /// them is left.
    pub fn stage_rules(&mut self, rules: CompiledRules) -> Result<StagedRules> {
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
        // The pinned rules in force, whose entries are not counted here, stay until the
        // switch as well.
        let adopted_advice = "the pinned maps were sized at the first `tproxy run --pin`, and \
                              the pinned rules in force stay until the switch: `tproxy cleanup` \
                              and start again to load a rule set this large";
        for (map, new, old) in sizes {
            if new + old > self.capacity as usize {
                if self.active.is_none() && self.adopted.is_some() {
                    bail!(
                        "the rules need {new} entries in {map}, more than the {} the pinned \
                         maps hold; {adopted_advice}",
                        self.capacity
                    );
                }
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
        // Entries of an instance that stopped in the middle of a reload, or of a failed erase.
        if self.active.is_none() && self.adopted.is_some() || self.unerased == Some(generation) {
            self.erase_generation_by_scan(generation)?;
            self.unerased = None;
        }
        if let Err(error) = self.write_generation(generation, &rules) {
            self.erase_or_mark(generation, &rules);
            return match self.active.is_none() && self.adopted.is_some() {
                true => Err(error.context(adopted_advice)),
                false => Err(error),
            };
        }
        Ok(StagedRules { generation, rules })
    }

    /// Puts `staged` in force in one step, then erases the generation it replaces. On error
    /// the rule set in force is unchanged and `staged` is erased.
    pub fn switch_to(&mut self, staged: StagedRules) -> Result<()> {
        let StagedRules { generation, rules } = staged;
        // The new rules' out-interface bits on the routes, just before the switch: an adopter
        // does not know the names of the rules in force, whose bits the mirror clears.
        let switched = self
            .mirror_routes_for(generation, &rules.out_interfaces)
            .and_then(|()| {
                Array::try_from(self.map_mut(maps::ACTIVE_GENERATION)?).map_err(Into::into)
            })
            .and_then(|mut active: Array<_, u32>| {
                active
                    .set(0, generation, 0)
                    .context("switching to the new rule set")
            });
        if let Err(error) = switched {
            self.erase_or_mark(generation, &rules);
            return Err(error);
        }
        // In force now, whatever follows: what is left of the old generation is scanned clean
        // before its parity is written again.
        let erased = match self.active.replace((generation, rules)) {
            Some((old_generation, old)) => {
                std::thread::sleep(GENERATION_GRACE);
                self.erase_generation(old_generation, &old)
                    .or_else(|_| self.erase_generation_by_scan(old_generation))
            }
            None => match self.adopted.take() {
                Some(adopted) => {
                    std::thread::sleep(GENERATION_GRACE);
                    self.erase_generation_by_scan(adopted)
                }
                None => Ok(()),
            },
        };
        if let Err(error) = erased {
            log::warn!("removing the previous rule set's entries: {error:#}");
            self.unerased = Some(generation ^ 1);
        }
        Ok(())
    }

    /// Erases `staged`, never put in force.
    pub fn discard(&mut self, staged: StagedRules) {
        self.erase_or_mark(staged.generation, &staged.rules);
    }

    /// Erases `rules` of `generation`, not in force; what a failure leaves is scanned clean
    /// before the parity is written again.
    fn erase_or_mark(&mut self, generation: u32, rules: &CompiledRules) {
        if self.erase_generation(generation, rules).is_err() {
            self.unerased = Some(generation);
        }
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
        self.write_mark_rules(generation, MarkRules::default())?;
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
        let marks = rules.mark_table().map_err(anyhow::Error::msg)?;
        self.write_mark_rules(generation, marks)?;
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

    /// The mark stage's table of `generation` (its own entry: nothing to erase entry by entry).
    fn write_mark_rules(&mut self, generation: u32, table: MarkRules) -> Result<()> {
        let arrivals_ask = table.ct_direction & maps::CT_ASKED_BY_ARRIVALS != 0;
        if arrivals_ask && !self.kfuncs.conntrack() {
            anyhow::bail!(
                "rules for arrivals with `ct_direction` need the kernel's conntrack kfuncs \
                 (bpf_skb_ct_lookup, bpf_ct_release: Linux 5.19 or later with nf_conntrack \
                 built in, CONFIG_NF_CONNTRACK=y), which this kernel's own BTF \
                 (/sys/kernel/btf/vmlinux) does not have, or which could not be read"
            );
        }
        if arrivals_ask && tracked_connections() == Some(0) {
            log::warn!(
                "rules for arrivals with `ct_direction`: no connection is tracked in this network namespace \
                 now; the kernel tracks them only while something uses it (NAT, a conntrack \
                 match in iptables or nft), and until then every packet is original to them"
            );
        }
        let mut marks: Array<_, MarkRules> = Array::try_from(self.map_mut(maps::MARK_RULES)?)?;
        marks
            .set(generation & 1, table, 0)
            .context("writing the mark rules")
    }

    fn erase_generation(&mut self, generation: u32, rules: &CompiledRules) -> Result<()> {
        self.write_mark_rules(generation, MarkRules::default())?;
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
}

/// How many connections the kernel tracks in this network namespace
/// (`net.netfilter.nf_conntrack_count`); `None` when it cannot tell.
fn tracked_connections() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count")
        .ok()?
        .trim()
        .parse()
        .ok()
}
