//! The controller side of a volume: place replicas, create them, expand and
//! delete them, and answer what exists. The same core serves CSI
//! CreateVolume and (later) the Kubernetes provisioner.
//!
//! Create, step by step (each step idempotent, so a retry after a crash
//! resumes where the first attempt stopped):
//! 1. derive the volume id from the name; an existing record is the answer
//!    (if compatible) or the place to resume from;
//! 2. choose pools (`placement::choose`) against free space counted from
//!    every other record;
//! 3. write the record in phase `Creating` (fsynced) — from here on nothing
//!    can leak, since the record names every replica;
//! 4. create each replica file (sparse, fsynced);
//! 5. write the record in phase `Ready`.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use tracing::{info, warn};

use crate::core::capability::{AccessType, Capability};
use crate::core::class::{Tier, VolumeClass};
use crate::core::dirty::DirtyMapStore;
use crate::core::error::{Error, ErrorKind, Result};
use crate::core::placement::{self, Candidate, PlacementError};
use crate::core::pool::Pools;
use crate::core::store::StateStore;
use crate::core::volume::{
    DEFAULT_SIZE, Phase, ReplicaRecord, ReplicaState, VolumeRecord, is_valid_volume_id,
    replica_file_name, round_size, volume_id_for,
};

pub struct ControllerCore {
    store: Arc<dyn StateStore>,
    /// Replaced as a cluster's StoragePools come and go.
    pools: std::sync::RwLock<Arc<Pools>>,
    overcommit_ratio: f64,
    /// Placement reads free space and then claims it: one at a time.
    placing: Mutex<()>,
    /// Volume ids with a create, delete or expand under way in this
    /// process: a second one on the same volume is Aborted rather than
    /// interleaved (a delete between a create's replica files would leak
    /// the files made after it).
    busy: Arc<Mutex<HashSet<String>>>,
    /// Where deleted volumes' dirty maps are forgotten.
    dirty_maps: Option<Arc<dyn DirtyMapStore>>,
}

#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub name: String,
    pub required_bytes: u64,
    pub limit_bytes: u64,
    pub parameters: BTreeMap<String, String>,
    pub capabilities: Vec<Capability>,
    pub preferred_node: Option<String>,
    /// Replicas only on pools of these nodes (a class's allowedTopologies).
    pub allowed_nodes: Option<Vec<String>>,
    /// The claim being provisioned, "namespace/name/uid".
    pub claim: Option<String>,
}

/// A volume id marked busy in `ControllerCore::busy`, until dropped.
struct Busy {
    busy: Arc<Mutex<HashSet<String>>>,
    id: String,
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Ok(mut busy) = self.busy.lock() {
            busy.remove(&self.id);
        }
    }
}

impl From<PlacementError> for Error {
    fn from(e: PlacementError) -> Error {
        Error::new(ErrorKind::ResourceExhausted, e.to_string())
    }
}

impl From<crate::core::class::ClassError> for Error {
    fn from(e: crate::core::class::ClassError) -> Error {
        Error::invalid(e.to_string())
    }
}

/// The size a request gets: the required bytes (or the default) rounded up
/// to whole mebibytes, and never over the limit.
/// Grows `size` to what the filesystem the volume will be mounted with
/// needs (xfs: 300 MiB), within `limit`; a volume mkfs would refuse at
/// NodeStage is refused now, with the reason.
pub fn fit_filesystem(
    size: u64,
    limit: u64,
    caps: &[Capability],
    class_fs: crate::core::class::FsType,
) -> Result<u64> {
    let needed = caps
        .iter()
        .filter_map(|c| match &c.access_type {
            AccessType::Mount { fs_type, .. } => Some(fs_type.unwrap_or(class_fs)),
            AccessType::Block => None,
        })
        .map(|fs| (fs.min_bytes(), fs))
        .max_by_key(|(min, _)| *min);
    match needed {
        Some((min, _)) if size >= min => Ok(size),
        Some((min, _)) if limit == 0 || limit >= min => Ok(min),
        Some((min, fs)) => Err(Error::new(
            ErrorKind::OutOfRange,
            format!(
                "{} needs a volume of at least {min} bytes, but the limit is {limit}",
                fs.as_str()
            ),
        )),
        None => Ok(size),
    }
}

pub fn size_for(required: u64, limit: u64) -> Result<u64> {
    let wanted = if required == 0 {
        if limit != 0 {
            limit.min(DEFAULT_SIZE)
        } else {
            DEFAULT_SIZE
        }
    } else {
        required
    };
    let size = round_size(wanted).ok_or_else(|| {
        Error::new(
            ErrorKind::OutOfRange,
            format!("{wanted} bytes is too large"),
        )
    })?;
    if limit != 0 && size > limit {
        // Rounding up past the limit: fall back to the largest whole size under it.
        let down = limit / crate::core::volume::SIZE_UNIT * crate::core::volume::SIZE_UNIT;
        if down >= required && down > 0 {
            return Ok(down);
        }
        return Err(Error::new(
            ErrorKind::OutOfRange,
            format!(
                "required {required} bytes rounds up to {size} (whole MiB), above the limit of {limit} bytes"
            ),
        ));
    }
    Ok(size)
}

/// Position of a volume in listings; also the ListVolumes page token.
pub fn list_key(r: &VolumeRecord) -> (u64, String) {
    (r.created_at_ns, r.id.clone())
}

pub fn list_token(r: &VolumeRecord) -> String {
    format!("{}.{}", r.created_at_ns, r.id)
}

pub fn parse_list_token(token: &str) -> Option<(u64, String)> {
    let (ns, id) = token.split_once('.')?;
    is_valid_volume_id(id).then_some((ns.parse().ok()?, id.to_string()))
}

impl ControllerCore {
    pub fn new(
        store: Arc<dyn StateStore>,
        pools: Arc<Pools>,
        overcommit_ratio: f64,
    ) -> ControllerCore {
        ControllerCore {
            store,
            pools: std::sync::RwLock::new(pools),
            overcommit_ratio,
            placing: Mutex::new(()),
            busy: Arc::default(),
            dirty_maps: None,
        }
    }

    /// Also forgets volumes' dirty maps when they are deleted.
    pub fn with_dirty_maps(mut self, maps: Arc<dyn DirtyMapStore>) -> ControllerCore {
        self.dirty_maps = Some(maps);
        self
    }

    pub fn pools(&self) -> Arc<Pools> {
        match self.pools.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn set_pools(&self, pools: Arc<Pools>) {
        match self.pools.write() {
            Ok(mut p) => *p = pools,
            Err(poisoned) => *poisoned.into_inner() = pools,
        }
    }

    /// Marks `volume_id` busy until the guard drops; Aborted if it is.
    fn hold(&self, volume_id: &str) -> Result<Busy> {
        let mut busy = self
            .busy
            .lock()
            .map_err(|_| Error::internal("volume operation table poisoned"))?;
        if !busy.insert(volume_id.to_string()) {
            return Err(Error::new(
                ErrorKind::Aborted,
                format!("another operation on volume {volume_id} is in progress; retry"),
            ));
        }
        Ok(Busy {
            busy: self.busy.clone(),
            id: volume_id.to_string(),
        })
    }

    pub fn get(&self, volume_id: &str) -> Result<Option<VolumeRecord>> {
        if !is_valid_volume_id(volume_id) {
            return Ok(None);
        }
        self.store.get(volume_id)
    }

    /// Every record, whatever its phase.
    pub fn list_all(&self) -> Result<Vec<VolumeRecord>> {
        self.store.list()
    }

    /// Ready volumes in creation order.
    pub fn list(&self) -> Result<Vec<VolumeRecord>> {
        let mut records: Vec<VolumeRecord> = self
            .store
            .list()?
            .into_iter()
            .filter(|r| r.phase == Phase::Ready)
            .collect();
        records.sort_by_key(list_key);
        Ok(records)
    }

    /// Every pool with its allocatable bytes left, not counting `except`.
    pub fn candidates(&self, except: Option<&str>) -> Result<Vec<Candidate>> {
        Ok(self.candidates_and_left_out(except)?.0)
    }

    /// The candidates, and why each pool that cannot take replicas now
    /// (unreachable, read-only, refusing us) was left out.
    fn candidates_and_left_out(
        &self,
        except: Option<&str>,
    ) -> Result<(Vec<Candidate>, Vec<String>)> {
        let records = self.store.list()?;
        let mut allocated: BTreeMap<&str, u64> = BTreeMap::new();
        for r in records.iter().filter(|r| Some(r.id.as_str()) != except) {
            for rep in &r.replicas {
                *allocated.entry(rep.pool.as_str()).or_default() += r.capacity_bytes;
            }
        }
        let pools = self.pools();
        let mut out = Vec::new();
        let mut left_out = Vec::new();
        for p in pools.all() {
            // A pool that cannot say how big it is (its server or agent is
            // down) takes no new replicas; the others still do.
            let capacity = match p.backend.capacity() {
                Ok(c) => c,
                Err(e) => {
                    warn!(pool = %p.name, error = %e.report(), "pool unreachable; left out of placement");
                    left_out.push(format!("pool {}: {}", p.name, e.report()));
                    continue;
                }
            };
            let ratio = p.overcommit_ratio.unwrap_or(self.overcommit_ratio);
            let allocatable = (capacity as f64 * ratio) as u64;
            let mut free_bytes =
                allocatable.saturating_sub(*allocated.get(p.name.as_str()).unwrap_or(&0));
            // Storage shared with others (an NFS export) may hold less than
            // our own accounting says.
            match p.backend.available() {
                Some(Ok(available)) => free_bytes = free_bytes.min(available),
                Some(Err(e)) => {
                    warn!(pool = %p.name, error = %e.report(), "pool unreachable; left out of placement");
                    left_out.push(format!("pool {}: {}", p.name, e.report()));
                    continue;
                }
                None => {}
            }
            out.push(Candidate {
                pool: p.name.clone(),
                node: p.node.clone(),
                tier: p.tier,
                domain: p.domain.clone(),
                zone: p.zone.clone(),
                free_bytes,
            });
        }
        Ok((out, left_out))
    }

    pub fn create(&self, req: &CreateRequest) -> Result<VolumeRecord> {
        if req.name.is_empty() {
            return Err(Error::invalid("volume name is required"));
        }
        if req.capabilities.is_empty() {
            return Err(Error::invalid("at least one volume capability is required"));
        }
        for cap in &req.capabilities {
            cap.check()?;
        }
        let class = VolumeClass::parse(&req.parameters)?;
        let size = size_for(req.required_bytes, req.limit_bytes)?;
        let size = fit_filesystem(size, req.limit_bytes, &req.capabilities, class.fs_type)?;
        let id = volume_id_for(&req.name);
        let _busy = self.hold(&id)?;

        // Only choosing pools and recording the choice is serialised;
        // creating the replicas runs concurrently with other creates.
        let placing = self
            .placing
            .lock()
            .map_err(|_| Error::internal("placement lock poisoned"))?;
        let mut existing = self.store.get(&id)?;
        let record = loop {
            let Some(existing) = existing.take() else {
                match self.place(&id, req, &class, size) {
                    Ok(record) => break record,
                    // Another controller recorded it first: use theirs.
                    Err(e) if e.kind == ErrorKind::AlreadyExists => {
                        existing = self.store.get(&id)?;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            };
            self.check_compatible(&existing, req, &class)?;
            if existing.phase == Phase::Deleting {
                return Err(Error::new(
                    ErrorKind::Aborted,
                    format!("volume {:?} is being deleted; retry", req.name),
                ));
            }
            break existing;
        };
        drop(placing);
        if record.phase == Phase::Ready {
            return Ok(record);
        }
        for (index, replica) in record.replicas.iter().enumerate() {
            self.pools()
                .get(&replica.pool)?
                .backend
                .create(&replica_file_name(&id, index), record.capacity_bytes)?;
        }
        // Ready only if still being created: a controller elsewhere may have
        // deleted the volume meanwhile, and then what this call made goes.
        let ready = self.store.update(&id, &mut |r| match r.phase {
            Phase::Creating => {
                r.phase = Phase::Ready;
                Ok(true)
            }
            Phase::Ready | Phase::Deleting => Ok(false),
        })?;
        let Some(ready) = ready.filter(|r| r.phase == Phase::Ready) else {
            for (index, replica) in record.replicas.iter().enumerate() {
                self.pools()
                    .get(&replica.pool)?
                    .backend
                    .delete(&replica_file_name(&id, index))?;
            }
            return Err(Error::new(
                ErrorKind::Aborted,
                format!(
                    "volume {:?} was deleted while being created; retry",
                    req.name
                ),
            ));
        };
        let pools: Vec<&str> = ready.replicas.iter().map(|r| r.pool.as_str()).collect();
        info!(volume_id = %id, name = %req.name, bytes = size, pools = ?pools, "volume created");
        Ok(ready)
    }

    /// Chooses pools for a new volume and records the choice (phase
    /// `Creating`). `AlreadyExists` when another writer recorded it first.
    fn place(
        &self,
        id: &str,
        req: &CreateRequest,
        class: &VolumeClass,
        size: u64,
    ) -> Result<VolumeRecord> {
        let (candidates, left_out) = self.candidates_and_left_out(None)?;
        let chosen = placement::choose(
            &placement::Request {
                size,
                replicas: class.replicas,
                tier: class.tier,
                failure_domain: class.failure_domain,
                preferred_node: req.preferred_node.clone(),
                taken_domains: vec![],
            },
            &candidates
                .into_iter()
                .filter(|c| {
                    req.allowed_nodes
                        .as_ref()
                        .is_none_or(|nodes| nodes.contains(&c.node))
                })
                .collect::<Vec<_>>(),
        )
        .map_err(|e| {
            let mut message = e.to_string();
            if !left_out.is_empty() {
                message += &format!("; left out: {}", left_out.join("; "));
            }
            Error::new(ErrorKind::ResourceExhausted, message)
        })?;
        let record = VolumeRecord {
            id: id.to_string(),
            name: req.name.clone(),
            capacity_bytes: size,
            class: class.clone(),
            parameters: req.parameters.clone(),
            phase: Phase::Creating,
            created_at_ns: crate::core::volume::unix_now_ns(),
            generation: 1,
            replicas: chosen
                .into_iter()
                .map(|c| ReplicaRecord {
                    pool: c.pool,
                    node: c.node,
                    domain: c.domain,
                    zone: c.zone,
                    state: ReplicaState::Healthy,
                    last_catch_up_bytes: None,
                    missed: None,
                })
                .collect(),
            staged_on: None,
            claims: 0,
            writing: None,
            published: vec![],
            claim: req.claim.clone(),
        };
        self.store.insert(&record)?;
        Ok(record)
    }

    fn check_compatible(
        &self,
        existing: &VolumeRecord,
        req: &CreateRequest,
        class: &VolumeClass,
    ) -> Result<()> {
        let cap = existing.capacity_bytes;
        if cap < req.required_bytes || (req.limit_bytes != 0 && cap > req.limit_bytes) {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!(
                    "volume {:?} exists with {cap} bytes, outside the requested range {}..{}",
                    req.name, req.required_bytes, req.limit_bytes
                ),
            ));
        }
        if &existing.class != class || existing.parameters != req.parameters {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("volume {:?} exists with different parameters", req.name),
            ));
        }
        Ok(())
    }

    pub fn delete(&self, volume_id: &str) -> Result<()> {
        if !is_valid_volume_id(volume_id) {
            return Ok(());
        }
        let _busy = self.hold(volume_id)?;
        let Some(record) = self.get(volume_id)? else {
            return Ok(());
        };
        if let Some(s) = &record.staged_on {
            if s.is_repair() {
                return Err(Error::new(
                    ErrorKind::Aborted,
                    format!("volume {volume_id} is being repaired; retry shortly"),
                ));
            }
            return Err(Error::precondition(format!(
                "volume {volume_id} is staged on node {}; unstage it first",
                s.node
            )));
        }
        self.store.update(volume_id, &mut |r| {
            let changed = r.phase != Phase::Deleting;
            r.phase = Phase::Deleting;
            Ok(changed)
        })?;
        for (index, replica) in record.replicas.iter().enumerate() {
            self.pools()
                .get(&replica.pool)?
                .backend
                .delete(&replica_file_name(volume_id, index))?;
        }
        self.store.remove(volume_id)?;
        if let Some(maps) = &self.dirty_maps
            && let Err(e) = maps.forget(volume_id)
        {
            warn!(volume_id, error = %e.report(), "cannot remove a deleted volume's dirty maps");
        }
        info!(volume_id, "volume deleted");
        Ok(())
    }

    /// Grows every replica, then the record. Returns the new size.
    pub fn expand(&self, volume_id: &str, required: u64, limit: u64) -> Result<u64> {
        let _busy = self.hold(volume_id)?;
        let record = self
            .get(volume_id)?
            .ok_or_else(|| Error::not_found(format!("volume {volume_id} does not exist")))?;
        let size = size_for(required, limit)?;
        if size <= record.capacity_bytes {
            return Ok(record.capacity_bytes);
        }
        let _placing = self
            .placing
            .lock()
            .map_err(|_| Error::internal("placement lock poisoned"))?;
        let free = self.candidates(Some(volume_id))?;
        for replica in record.replicas.iter().filter(|r| r.is_healthy()) {
            let pool_free = free
                .iter()
                .find(|c| c.pool == replica.pool)
                .map(|c| c.free_bytes)
                .unwrap_or(0);
            if pool_free < size {
                return Err(Error::new(
                    ErrorKind::ResourceExhausted,
                    format!(
                        "pool {} has {pool_free} bytes free, cannot grow a replica to {size}",
                        replica.pool
                    ),
                ));
            }
        }
        for (index, replica) in record.replicas.iter().enumerate() {
            if replica.is_healthy() {
                self.pools()
                    .get(&replica.pool)?
                    .backend
                    .grow(&replica_file_name(volume_id, index), size)?;
            }
        }
        self.store.update(volume_id, &mut |r| {
            r.capacity_bytes = r.capacity_bytes.max(size);
            Ok(true)
        })?;
        info!(volume_id, bytes = size, "volume expanded");
        Ok(size)
    }

    /// Gives replica `index` of a volume a new, empty home on a pool in a
    /// failure domain none of the other replicas use (or, when there is no
    /// such pool, the same pool again if it answers), records it as faulted
    /// there (it must be rebuilt), and removes the old file if it can.
    /// Returns the pool chosen.
    pub fn replace_replica(&self, volume_id: &str, index: usize) -> Result<String> {
        let _placing = self
            .placing
            .lock()
            .map_err(|_| Error::internal("placement lock poisoned"))?;
        let record = self
            .get(volume_id)?
            .ok_or_else(|| Error::not_found(format!("volume {volume_id} does not exist")))?;
        let old =
            record.replicas.get(index).cloned().ok_or_else(|| {
                Error::invalid(format!("volume {volume_id} has no replica {index}"))
            })?;
        let fd = record.class.failure_domain;
        let key = |r: &ReplicaRecord| match fd {
            crate::core::class::FailureDomain::Node => r.domain.clone(),
            crate::core::class::FailureDomain::Zone => r.zone.clone(),
        };
        let taken: Vec<String> = record.replicas.iter().map(key).collect();
        let candidates = self.candidates(None)?;
        let request = placement::Request {
            size: record.capacity_bytes,
            replicas: 1,
            tier: record.class.tier,
            failure_domain: fd,
            preferred_node: None,
            taken_domains: taken,
        };
        let name = replica_file_name(volume_id, index);
        let chosen = match placement::choose(&request, &candidates) {
            Ok(mut c) if !c.is_empty() => c.remove(0),
            _ => candidates
                .into_iter()
                .find(|c| c.pool == old.pool)
                .ok_or_else(|| {
                    Error::new(ErrorKind::ResourceExhausted, "no pool can take the replica")
                })?,
        };
        self.pools()
            .get(&chosen.pool)?
            .backend
            .create(&name, record.capacity_bytes)?;
        let reason = format!(
            "replaced on pool {} after pool {} was lost; rebuilding",
            chosen.pool, old.pool
        );
        self.store.update(volume_id, &mut |r| {
            let next = r.generation + 1;
            if let Some(rep) = r.replicas.get_mut(index) {
                *rep = ReplicaRecord {
                    pool: chosen.pool.clone(),
                    node: chosen.node.clone(),
                    domain: chosen.domain.clone(),
                    zone: chosen.zone.clone(),
                    state: ReplicaState::Faulted {
                        generation: next,
                        reason: reason.clone(),
                        since: crate::core::volume::unix_now(),
                        replaced: true,
                    },
                    last_catch_up_bytes: None,
                    missed: Some(crate::core::extent_list::ExtentList::everything(
                        r.capacity_bytes,
                        r.claims,
                    )),
                };
                r.generation = next;
            }
            Ok(true)
        })?;
        if chosen.pool != old.pool
            && let Ok(p) = self.pools().get(&old.pool)
            && let Err(e) = p.backend.delete(&name)
        {
            tracing::warn!(volume_id, pool = %old.pool, error = %e.report(), "old replica left behind on an unreachable pool");
        }
        info!(volume_id, replica = index, from = %old.pool, to = %chosen.pool, "replica replaced");
        Ok(chosen.pool)
    }

    /// Bytes available to new volumes of this class, and the largest single
    /// volume that would fit now.
    pub fn capacity(&self, parameters: &BTreeMap<String, String>) -> Result<(u64, u64)> {
        let class = VolumeClass::parse(parameters)?;
        let candidates = self.candidates(None)?;
        let req = placement::Request {
            size: 0,
            replicas: class.replicas,
            tier: class.tier,
            failure_domain: class.failure_domain,
            preferred_node: None,
            taken_domains: vec![],
        };
        let max = placement::max_volume_size(&req, &candidates);
        let available = candidates
            .iter()
            .filter(|c| class.tier.is_none_or(|t: Tier| t == c.tier))
            .map(|c| c.free_bytes)
            .sum::<u64>()
            / u64::from(class.replicas.max(1));
        Ok((available, max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A local pool whose `create` of replica 1 waits until the test lets
    /// it go, so another caller can act in the middle of a create.
    struct GatedPool {
        inner: crate::datapath::replica::local::LocalPool,
        entered: std::sync::mpsc::SyncSender<()>,
        release: Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl crate::core::pool::Pool for GatedPool {
        fn create(&self, name: &str, size: u64) -> Result<()> {
            if name.ends_with(".r1.img") {
                let _ = self.entered.send(());
                if let Ok(rx) = self.release.lock() {
                    let _ = rx.recv();
                }
            }
            self.inner.create(name, size)
        }
        fn grow(&self, name: &str, size: u64) -> Result<()> {
            self.inner.grow(name, size)
        }
        fn delete(&self, name: &str) -> Result<()> {
            self.inner.delete(name)
        }
        fn size_of(&self, name: &str) -> Result<Option<u64>> {
            self.inner.size_of(name)
        }
        fn open(&self, name: &str) -> Result<Box<dyn crate::core::pool::ReplicaIo>> {
            self.inner.open(name)
        }
        fn capacity(&self) -> Result<u64> {
            Ok(1 << 40)
        }
    }

    /// Three one-pool nodes, all gated; returns the pools' directories
    /// and the channels that see and release a create of replica 1.
    #[allow(clippy::type_complexity)]
    fn gated_pools(
        root: &std::path::Path,
    ) -> (
        Arc<Pools>,
        Vec<std::path::PathBuf>,
        std::sync::mpsc::Receiver<()>,
        Vec<std::sync::mpsc::SyncSender<()>>,
    ) {
        let (entered_tx, entered_rx) = std::sync::mpsc::sync_channel(8);
        let mut releases = Vec::new();
        let mut dirs = Vec::new();
        let entries = (0..3)
            .map(|i| {
                let dir = root.join(format!("pool-{i}"));
                std::fs::create_dir_all(&dir).unwrap();
                dirs.push(dir.clone());
                let (release_tx, release_rx) = std::sync::mpsc::sync_channel(8);
                releases.push(release_tx);
                crate::core::pool::PoolEntry {
                    name: format!("p{i}"),
                    node: format!("n{i}"),
                    tier: Tier::Standard,
                    domain: format!("d{i}"),
                    zone: "z".into(),
                    overcommit_ratio: None,
                    backend: Box::new(GatedPool {
                        inner: crate::datapath::replica::local::LocalPool::new(&dir, Some(1 << 40))
                            .unwrap(),
                        entered: entered_tx.clone(),
                        release: Mutex::new(release_rx),
                    }),
                }
            })
            .collect();
        (
            Arc::new(Pools::from_entries(entries)),
            dirs,
            entered_rx,
            releases,
        )
    }

    fn request(name: &str) -> CreateRequest {
        CreateRequest {
            name: name.into(),
            required_bytes: 1 << 20,
            limit_bytes: 0,
            parameters: BTreeMap::new(),
            capabilities: vec![Capability {
                access_type: AccessType::Block,
                mode: crate::core::capability::AccessMode::SingleNodeWriter,
            }],
            preferred_node: None,
            allowed_nodes: None,
            claim: None,
        }
    }

    fn files_in(dirs: &[std::path::PathBuf]) -> Vec<String> {
        dirs.iter()
            .flat_map(|d| std::fs::read_dir(d).unwrap().flatten())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".img"))
            .collect()
    }

    #[test]
    fn delete_in_the_middle_of_a_create_leaks_no_replica() {
        let root = tempfile::tempdir().unwrap();
        let store: Arc<dyn StateStore> = Arc::new(
            crate::datapath::host::files::FileStore::open(&root.path().join("state")).unwrap(),
        );
        let (pools, dirs, entered, releases) = gated_pools(root.path());
        let here = Arc::new(ControllerCore::new(store.clone(), pools.clone(), 1.0));
        // Another controller process on the same records.
        let elsewhere = ControllerCore::new(store.clone(), pools, 1.0);
        let id = volume_id_for("racy");

        let creating = {
            let here = here.clone();
            std::thread::spawn(move || here.create(&request("racy")))
        };
        entered.recv().unwrap();
        // The same process refuses to interleave; another one deletes.
        assert_eq!(here.delete(&id).unwrap_err().kind, ErrorKind::Aborted);
        elsewhere.delete(&id).unwrap();
        for r in &releases {
            let _ = r.send(());
        }
        let created = creating.join().unwrap();
        assert_eq!(created.unwrap_err().kind, ErrorKind::Aborted);
        assert!(store.get(&id).unwrap().is_none());
        assert_eq!(
            files_in(&dirs),
            Vec::<String>::new(),
            "replica files leaked"
        );

        // The retry the caller makes creates the volume whole.
        for r in &releases {
            let _ = r.send(());
        }
        let record = here.create(&request("racy")).unwrap();
        assert_eq!(record.phase, Phase::Ready);
        assert_eq!(files_in(&dirs).len(), 3);
    }

    #[test]
    fn sizes_round_up_within_limits() {
        const MIB: u64 = 1 << 20;
        assert_eq!(size_for(0, 0).unwrap(), DEFAULT_SIZE);
        assert_eq!(size_for(1, 0).unwrap(), MIB);
        assert_eq!(size_for(MIB + 1, 0).unwrap(), 2 * MIB);
        assert_eq!(size_for(0, 10 * MIB).unwrap(), 10 * MIB);
        assert_eq!(size_for(5 * MIB, 5 * MIB).unwrap(), 5 * MIB);
        assert_eq!(size_for(MIB + 1, 2 * MIB).unwrap(), 2 * MIB);
        assert_eq!(
            size_for(MIB + 1, MIB + 10).unwrap_err().kind,
            ErrorKind::OutOfRange
        );
        assert_eq!(
            size_for(u64::MAX, 0).unwrap_err().kind,
            ErrorKind::OutOfRange
        );
    }

    #[test]
    fn xfs_volumes_are_made_big_enough_for_mkfs_or_refused() {
        use crate::core::capability::AccessMode;
        use crate::core::class::FsType;
        const MIB: u64 = 1 << 20;
        let mount = |fs: Option<FsType>| Capability {
            access_type: AccessType::Mount {
                fs_type: fs,
                mount_flags: vec![],
            },
            mode: AccessMode::SingleNodeWriter,
        };
        let block = Capability {
            access_type: AccessType::Block,
            mode: AccessMode::SingleNodeWriter,
        };
        let xfs = [mount(Some(FsType::Xfs))];
        let unnamed = [mount(None)];
        let block = [block];
        // (requested, capabilities, the class's filesystem, size made);
        // the class's filesystem counts when the capability names none.
        let cases: [(u64, &[Capability], FsType, u64); 5] = [
            (64 * MIB, &xfs, FsType::Ext4, 300 * MIB),
            (512 * MIB, &xfs, FsType::Ext4, 512 * MIB),
            (64 * MIB, &unnamed, FsType::Xfs, 300 * MIB),
            (64 * MIB, &unnamed, FsType::Ext4, 64 * MIB),
            (64 * MIB, &block, FsType::Xfs, 64 * MIB),
        ];
        for (requested, caps, class_fs, made) in cases {
            assert_eq!(
                fit_filesystem(requested, 0, caps, class_fs).unwrap(),
                made,
                "{requested} bytes, class {class_fs:?}"
            );
        }
        let refused = fit_filesystem(64 * MIB, 100 * MIB, &xfs, FsType::Ext4).unwrap_err();
        assert_eq!(refused.kind, ErrorKind::OutOfRange);
        assert!(refused.to_string().contains("xfs"), "{refused}");
    }
}
