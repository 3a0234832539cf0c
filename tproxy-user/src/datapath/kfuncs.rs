//! The kfunc calls of the program, made real before it is loaded.
//!
//! aya 0.14 resolves no kfunc, so the program calls placeholder helper numbers where it means
//! the conntrack kfuncs (`maps::KFUNC_CT_LOOKUP` and `maps::KFUNC_CT_RELEASE`, see the
//! program's `conntrack` module). [`Kfuncs::patch`] rewrites each such call into the kfunc
//! call with the function's id in the running kernel's BTF. On a kernel without them each
//! becomes `r0 = 0`: the lookup finds no connection, so every packet is read as original, and
//! there is nothing to release. The rules that need them are refused there (see
//! [`Kfuncs::conntrack`]). Without them means: older than 5.19 (5.18 has the lookup but does
//! not say the direction), nf_conntrack a module (as most distributions build it: its BTF is
//! not the kernel's own, which the program is loaded with), or the kernel's BTF unreadable.

use anyhow::{bail, Context, Result};
use aya::Btf;
use aya_obj::btf::BtfKind;
use object::{Object, ObjectSection, SectionKind};
use tproxy_common::maps::{KFUNC_CT_LOOKUP, KFUNC_CT_RELEASE};

/// `BPF_JMP | BPF_CALL`: a call instruction's opcode.
const CALL: u8 = 0x85;
/// A call's source register field (the high nibble of the register byte) for a kfunc in the
/// kernel's own BTF (`BPF_PSEUDO_KFUNC_CALL`).
const PSEUDO_KFUNC_CALL: u8 = 0x20;
/// `BPF_ALU64 | BPF_MOV | BPF_K` into r0: `r0 = imm`.
const MOV_R0_IMM: u8 = 0xb7;

/// The conntrack kfuncs' ids in the running kernel's BTF, where it has them.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Kfuncs {
    ct_lookup: Option<u32>,
    ct_release: Option<u32>,
}

impl Kfuncs {
    /// Looks the kfuncs up in the kernel's BTF (`/sys/kernel/btf/vmlinux`); none when it
    /// cannot be read.
    pub(crate) fn of_running_kernel() -> Kfuncs {
        let release = nix::sys::utsname::uname()
            .map(|uts| uts.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        if !says_direction(&release) {
            return Kfuncs::default();
        }
        let Ok(btf) = Btf::from_sys_fs() else {
            return Kfuncs::default();
        };
        let id = |name| btf.id_by_type_name_kind(name, BtfKind::Func).ok();
        Kfuncs {
            ct_lookup: id("bpf_skb_ct_lookup"),
            ct_release: id("bpf_ct_release"),
        }
    }

    /// Whether the program can look a packet's connection up (rules with `ct_direction`).
    pub(crate) fn conntrack(&self) -> bool {
        self.ct_lookup.is_some() && self.ct_release.is_some()
    }

    /// `object` with every placeholder call in its code rewritten (see the module's
    /// documentation).
    pub(crate) fn patch(&self, object: &[u8]) -> Result<Vec<u8>> {
        let mut patched = object.to_vec();
        let file = object::File::parse(object).context("reading the eBPF object")?;
        let mut found = 0;
        for section in file.sections().filter(|s| s.kind() == SectionKind::Text) {
            let Some((start, size)) = section.file_range() else {
                continue;
            };
            let (start, size) = (start as usize, size as usize);
            for at in (start..start + size).step_by(8) {
                let Some(instruction) = patched.get_mut(at..at + 8) else {
                    bail!(
                        "the eBPF object's section {:?} ends past the file",
                        section.name()
                    );
                };
                if instruction[0] != CALL || instruction[1] != 0 {
                    continue;
                }
                let imm = u32::from_le_bytes([
                    instruction[4],
                    instruction[5],
                    instruction[6],
                    instruction[7],
                ]);
                let id = match imm {
                    KFUNC_CT_LOOKUP => self.ct_lookup,
                    KFUNC_CT_RELEASE => self.ct_release,
                    _ => continue,
                };
                found += 1;
                let (code, regs, imm) = match id {
                    Some(id) => (CALL, PSEUDO_KFUNC_CALL, id),
                    None => (MOV_R0_IMM, 0, 0),
                };
                instruction[..4].copy_from_slice(&[code, regs, 0, 0]);
                instruction[4..].copy_from_slice(&imm.to_le_bytes());
            }
        }
        if found == 0 {
            bail!("the eBPF object has no conntrack kfunc call to resolve: it was not built from this source");
        }
        Ok(patched)
    }
}

/// Whether a kernel of this release (`uname -r`) writes the direction of the connection
/// `bpf_skb_ct_lookup` finds: from 5.19.
fn says_direction(release: &str) -> bool {
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let (major, minor) = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    (major, minor) >= (5, 19)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_direction_is_said_from_5_19() {
        for (release, says) in [
            ("6.18.0-1-amd64", true),
            ("5.19.0", true),
            ("5.18.19-generic", false),
            ("4.19.0", false),
            ("", false),
        ] {
            assert_eq!(says_direction(release), says, "{release}");
        }
    }

    /// The embedded program's placeholders all become kfunc calls, or `r0 = 0` without the
    /// kfuncs, and nothing else changes.
    #[test]
    fn every_placeholder_call_and_nothing_else_is_rewritten() {
        let object = crate::datapath::steering::PROGRAM;
        let with = Kfuncs {
            ct_lookup: Some(1234),
            ct_release: Some(5678),
        };
        let patched = with.patch(object).unwrap();
        let without = Kfuncs::default().patch(object).unwrap();
        assert_eq!(patched.len(), object.len());
        let changed: Vec<usize> = (0..object.len())
            .step_by(8)
            .filter(|&at| object[at..at + 8] != patched[at..at + 8])
            .collect();
        assert!(changed.len() >= 2, "{changed:?}");
        for at in changed {
            let imm = u32::from_le_bytes(object[at + 4..at + 8].try_into().unwrap());
            let expected = if imm == KFUNC_CT_LOOKUP {
                1234u32
            } else {
                5678
            };
            assert_eq!(&object[at..at + 4], &[CALL, 0, 0, 0]);
            assert!(imm == KFUNC_CT_LOOKUP || imm == KFUNC_CT_RELEASE);
            assert_eq!(patched[at..at + 4], [CALL, PSEUDO_KFUNC_CALL, 0, 0]);
            assert_eq!(patched[at + 4..at + 8], expected.to_le_bytes());
            assert_eq!(without[at..at + 8], [MOV_R0_IMM, 0, 0, 0, 0, 0, 0, 0]);
        }
    }
}
