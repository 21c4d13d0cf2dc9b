//! Degraded volumes that are not staged anywhere are repaired in the
//! background: missing replica files are noticed, returning replicas catch
//! up, and lost ones are replaced and rebuilt, with no pod attached.
//!
//! While a volume is being repaired it is claimed (`staged_on` names this
//! node, marked `repair`), so a NodeStage meanwhile gets Aborted and is
//! retried; the claim is released when the pass ends.

use std::path::Path;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::core::dirty::{DEFAULT_REGION, DirtyMap};
use crate::core::error::{Error, Result};
use crate::core::pool::Pools;
use crate::core::store::StateStore;
use crate::core::volume::{Phase, VolumeRecord, replica_file_name};
use crate::datapath::dirty_maps::DirtyMapFiles;
use crate::datapath::engine::assemble::{Backing, assemble};

/// One volume's repair gives up (and retries next pass) after this long.
const PASS_LIMIT: Duration = Duration::from_secs(120);
const IO_THREADS: usize = 8;

/// Faults replicas of an unstaged volume whose files are gone. Nothing has
/// been written since it was unstaged, so each gets an empty dirty map.
fn notice_missing(
    data_dir: &Path,
    store: &dyn StateStore,
    pools: &Pools,
    record: &VolumeRecord,
) -> Result<()> {
    for (index, replica) in record.replicas.iter().enumerate() {
        if !replica.is_healthy() {
            continue;
        }
        let present = pools
            .get(&replica.pool)
            .and_then(|p| p.backend.size_of(&replica_file_name(&record.id, index)));
        let reason = match present {
            Ok(Some(_)) => continue,
            Ok(None) => format!("replica file missing on pool {}", replica.pool),
            Err(e) => format!("pool {} unreachable: {}", replica.pool, e.report()),
        };
        let map = DirtyMap::new(record.capacity_bytes, DEFAULT_REGION);
        DirtyMapFiles::new(data_dir).save(&record.id, index, &map)?;
        store.update(&record.id, &mut |r| Ok(r.fault_replica(index, &reason)))?;
        warn!(volume_id = %record.id, replica = index, %reason, "replica of unstaged volume faulted");
    }
    Ok(())
}

fn repair_one(data_dir: &Path, node: &str, backing: &Backing, id: &str) -> Result<()> {
    let store = &backing.store;
    let claimed = store.update(id, &mut |r| {
        if r.staged_on.is_some() || r.phase != Phase::Ready {
            return Ok(false);
        }
        r.claim_repair(node);
        Ok(true)
    })?;
    let Some(ours) = claimed
        .and_then(|r| r.staged_on)
        .filter(|s| s.is_repair() && s.node == node)
    else {
        return Ok(());
    };
    let result = (|| -> Result<()> {
        let config = crate::datapath::host::config_file::load_or_init(data_dir)?;
        let engine = assemble(data_dir, node, id, IO_THREADS, &config, backing, None)?;
        // Under the repair claim, which is newer than whoever wrote the
        // replicas last: NFS replicas refuse even reads until fenced for it.
        // Catch-up copies from the healthy replicas: until they agree, it
        // reads where writes were in flight from one of them only.
        engine
            .start_resync()
            .map_err(|e| Error::io("cannot take over the write log", e))?;
        engine
            .fence_replicas()
            .map_err(|e| Error::io("cannot fence the volume's replicas", e))?;
        let started = Instant::now();
        let want = store.get(id)?.map(|r| r.replicas.len()).unwrap_or(0);
        // Hold the claim only while repair gets somewhere: a replica that
        // cannot come back yet (unreachable, replacement not due) must not
        // keep the volume from being staged or deleted; the next pass
        // tries again.
        while engine.healthy_count() < want && started.elapsed() < PASS_LIMIT {
            if !engine.maintain(|| {}) {
                break;
            }
        }
        if engine.healthy_count() >= want {
            info!(volume_id = id, "unstaged volume repaired");
        }
        Ok(())
    })();
    // Only this pass's own claim: another node's repair may have claimed
    // the volume since, and its engine must keep acting under it.
    store.update(id, &mut |r| {
        if r.staged_on.as_ref() == Some(&ours) {
            r.staged_on = None;
            Ok(true)
        } else {
            Ok(false)
        }
    })?;
    result
}

/// Releases the repair claims a previous run of this node left behind
/// (killed mid-repair): no repair of this node is under way at start, and
/// such a claim would keep the volume from being staged or deleted forever.
pub fn release_claims(store: &dyn StateStore, node: &str) {
    let records = match store.list() {
        Ok(records) => records,
        Err(e) => {
            warn!(error = %e.report(), "cannot look for repair claims left by an earlier run");
            return;
        }
    };
    for record in records {
        let stale = |r: &VolumeRecord| {
            r.staged_on
                .as_ref()
                .is_some_and(|s| s.node == node && s.is_repair())
        };
        if !stale(&record) {
            continue;
        }
        let released = store.update(&record.id, &mut |r| {
            if stale(r) {
                r.staged_on = None;
                Ok(true)
            } else {
                Ok(false)
            }
        });
        match released {
            Ok(_) => {
                info!(volume_id = %record.id, "released the repair claim an earlier run left behind")
            }
            Err(e) => {
                warn!(volume_id = %record.id, error = %e.report(), "cannot release a stale repair claim")
            }
        }
    }
}

/// One pass over every unstaged volume.
pub fn pass(data_dir: &Path, node: &str, backing: &Backing) {
    pass_over(data_dir, node, backing, |_| true);
}

/// Whether `node` looks after `record` in a cluster: it holds one of its
/// healthy replicas. So a volume is checked by the few nodes that have a
/// stake in it (its claim lets one repair at a time), and one of them is
/// alive as long as any healthy replica is.
pub fn looks_after(record: &VolumeRecord, node: &str) -> bool {
    record
        .replicas
        .iter()
        .any(|r| r.node == node && r.is_healthy())
}

/// One pass over the unstaged volumes `mine` picks.
pub fn pass_over(
    data_dir: &Path,
    node: &str,
    backing: &Backing,
    mine: impl Fn(&VolumeRecord) -> bool,
) {
    let (store, pools) = (&backing.store, backing.pools.as_ref());
    let Ok(records) = store.list() else { return };
    for record in records {
        if record.phase != Phase::Ready || record.staged_on.is_some() || !mine(&record) {
            continue;
        }
        if let Err(e) = notice_missing(data_dir, store.as_ref(), pools, &record) {
            warn!(volume_id = %record.id, error = %e.report(), "cannot check replicas of unstaged volume");
            continue;
        }
        let degraded = store
            .get(&record.id)
            .ok()
            .flatten()
            .is_some_and(|r| r.degradation().is_some());
        if degraded && let Err(e) = repair_one(data_dir, node, backing, &record.id) {
            warn!(volume_id = %record.id, error = %e.report(), "repair of unstaged volume failed; will retry");
        }
    }
}
