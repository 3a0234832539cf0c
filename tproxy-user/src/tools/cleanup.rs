//! `tproxy cleanup`: removes everything of tproxy's that no running instance owns in this
//! network namespace — state pinned by `run --pin` (which detaches its links), policy routing
//! rules and routes tagged with its routing protocol, tc filters named after its program — and
//! nothing else; and, host-wide, the lock files, control sockets and pinned-state records
//! that killed instances left in /run/tproxy, and the state pinned under the pin directory,
//! for network namespaces that no longer exist. Refused while an instance is running for the table.

use anyhow::{bail, Result};
use aya::programs::{tc, TcAttachType};
use futures::TryStreamExt;

use crate::{daemon::instance, datapath::pin::PinnedState, datapath::routing};

/// Cleans up after instances that used routing table `table` (and pinned under `pin_dir`).
pub async fn run(table: u32, pin_dir: &std::path::Path) -> Result<()> {
    // Held while cleaning up, so that no instance starts under it; letting go of it removes
    // the lock file and control socket a killed instance left.
    let _lock = match instance::InstanceLock::try_acquire(table)? {
        Ok(lock) => lock,
        Err(instance::Held { pid }) => bail!(
            "tproxy (pid {pid}) is running with routing table {table} in this network namespace: \
             stop it (it removes everything itself) instead of cleaning up under it"
        ),
    };
    // The links first: with them goes the program, before the routing it relies on.
    let pinned = PinnedState::locate(pin_dir, table)?;
    let unpinned = pinned.remove()?;
    instance::PinnedBy::remove(table)?;
    if unpinned > 0 {
        println!(
            "removed {unpinned} pinned links and maps from {}",
            pinned.dir().display()
        );
    }
    let handle = routing::connect()?;
    let routes = routing::remove_ours(&handle, table).await?;
    println!("removed {routes} policy routing rules and routes of table {table}");

    // TCX links die with their process; a clsact filter (kernels before 6.6) does not.
    let links: Vec<_> = handle.link().get().execute().try_collect().await?;
    let mut filters = 0;
    for link in links {
        let Some(name) = link.attributes.iter().find_map(|a| match a {
            rtnetlink::packet_route::link::LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        }) else {
            continue;
        };
        // The loopback program is on `lo` in place of the main one with local origin.
        let programs = [
            tproxy_common::maps::PROGRAM_NAME,
            tproxy_common::local_origin::LOOPBACK_PROGRAM_NAME,
        ];
        for program in programs {
            if tc::qdisc_detach_program(&name, TcAttachType::Ingress, program).is_ok() {
                println!("removed tproxy's tc filter from {name} ingress");
                filters += 1;
            }
        }
    }
    let gone = PinnedState::remove_of_gone_namespaces(pin_dir);
    if gone > 0 {
        println!(
            "removed the pinned state of {gone} instances in network namespaces that no longer \
             exist"
        );
    }
    let stale = instance::remove_stale_of_gone_namespaces()?;
    if stale > 0 {
        println!(
            "removed the lock files and control sockets of {stale} killed instances in network \
             namespaces that no longer exist"
        );
    }
    if unpinned + routes + filters + gone == 0 {
        println!("nothing of tproxy's was left in this network namespace");
    }
    Ok(())
}
