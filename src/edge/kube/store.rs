//! The state store of a cluster: one `TernaVolume` object per volume, so
//! Kubernetes is the database. Placement lives in `spec`, health in
//! `status`; every write carries the resourceVersion it was computed from,
//! so two writers never overwrite each other's change (a conflict re-reads
//! and re-applies).
//!
//! A record is written in one request: the status subresource cannot be
//! written together with the spec, so the authoritative status travels in
//! the `terna.dev/status` annotation of the main object, and `.status` is a
//! mirror of it for `kubectl` and watchers, written right after. Two
//! requests would leave a half-written record when the process dies between
//! them (a new spec beside the old health), and a conflict on the second
//! would re-apply a change whose first half had already landed. `list` answers from a watch-fed cache that also takes
//! this process's own writes at once, so placement never counts less than
//! it allocated itself.
//!
//! The trait is synchronous (engines and the controller core call it from
//! blocking threads); each call runs its request on the runtime `handle`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use kube::runtime::watcher;
use tracing::warn;

use crate::core::class::VolumeClass;
use crate::core::error::{Error, ErrorKind, Result};
use crate::core::extent_list::ExtentList;
use crate::core::store::StateStore;
use crate::core::volume::{Phase, ReplicaRecord, ReplicaState, StagedOn, VolumeRecord};
use crate::edge::kube::crd::{
    ExtentListStatus, ReplicaPlacement, ReplicaStatus, StagedOnStatus, TernaVolume,
    TernaVolumeSpec, TernaVolumeStatus, human_bytes,
};

/// Conflicting writers retry this many times before giving up.
const CONFLICT_RETRIES: usize = 20;

/// Up to 2^attempt ms (at most 64), picked from the clock's nanoseconds.
fn conflict_backoff(attempt: usize) -> Duration {
    let most = 1u64 << attempt.min(6);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::from(d.subsec_nanos()))
        .unwrap_or(0);
    Duration::from_micros(nanos % (most * 1000) + 100)
}

pub struct KubeStore {
    api: Api<TernaVolume>,
    handle: tokio::runtime::Handle,
    cache: Arc<RwLock<Cache>>,
    /// The watch starts with the first `list`: engines never list.
    watching: std::sync::Once,
    /// Kept alive for as long as the store when the store brought its own.
    _runtime: Option<Arc<tokio::runtime::Runtime>>,
}

#[derive(Default)]
struct Cache {
    /// `None`: deleted at that resourceVersion (a late watch event for an
    /// older version must not bring it back).
    entries: HashMap<String, (u64, Option<VolumeRecord>)>,
    synced: bool,
}

impl Cache {
    fn offer(&mut self, id: &str, rv: u64, record: Option<VolumeRecord>) {
        match self.entries.get(id) {
            Some((known, _)) if *known > rv => {}
            _ => {
                self.entries.insert(id.to_string(), (rv, record));
            }
        }
    }
}

fn resource_version(meta: &ObjectMeta) -> u64 {
    meta.resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn api_error(context: String, e: kube::Error) -> Error {
    let kind = match &e {
        kube::Error::Api(s) if s.code == 404 => ErrorKind::NotFound,
        kube::Error::Api(s) if s.code == 409 => ErrorKind::Aborted,
        kube::Error::Api(s) if s.code == 422 || s.code == 400 => ErrorKind::InvalidArgument,
        _ => ErrorKind::Unavailable,
    };
    Error::with_source(kind, format!("{context}: {e}"), e)
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

impl KubeStore {
    /// Requests run on `handle`; the first `list` starts the cache's watch
    /// and waits for it to have listed everything once.
    pub fn new(client: kube::Client, handle: tokio::runtime::Handle) -> KubeStore {
        KubeStore {
            api: Api::all(client),
            handle,
            cache: Arc::new(RwLock::new(Cache::default())),
            watching: std::sync::Once::new(),
            _runtime: None,
        }
    }

    /// A store that runs its requests on `runtime` and keeps it alive (for
    /// processes with no runtime of their own, such as engines).
    pub fn with_runtime(client: kube::Client, runtime: Arc<tokio::runtime::Runtime>) -> KubeStore {
        KubeStore {
            _runtime: Some(runtime.clone()),
            ..KubeStore::new(client, runtime.handle().clone())
        }
    }

    fn cache_write(&self) -> std::sync::RwLockWriteGuard<'_, Cache> {
        self.cache.write().unwrap_or_else(|p| p.into_inner())
    }

    fn fetch(&self, id: &str) -> Result<Option<TernaVolume>> {
        self.handle
            .block_on(self.api.get_opt(id))
            .map_err(|e| api_error(format!("cannot read TernaVolume {id}"), e))
    }

    /// Writes `record` over `current` (None: create) in one request, spec
    /// and authoritative status together; `Aborted` on a resourceVersion
    /// conflict, with nothing of the record written. Then mirrors the status.
    fn write(&self, current: Option<TernaVolume>, record: &VolumeRecord) -> Result<()> {
        let (spec, status) = to_resource(record);
        let id = &record.id;
        let encoded = serde_json::to_string(&status)
            .map_err(|e| Error::internal(format!("cannot encode TernaVolume {id} status: {e}")))?;
        let obj = match current {
            None => {
                let mut obj = TernaVolume {
                    metadata: ObjectMeta {
                        name: Some(id.clone()),
                        ..Default::default()
                    },
                    spec,
                    status: None,
                };
                set_status_annotation(&mut obj, encoded);
                self.handle
                    .block_on(self.api.create(&PostParams::default(), &obj))
                    .map_err(|e| api_error(format!("cannot create TernaVolume {id}"), e))?
            }
            Some(mut obj)
                if obj.spec != spec || status_annotation(&obj) != Some(encoded.as_str()) =>
            {
                obj.spec = spec;
                set_status_annotation(&mut obj, encoded);
                self.handle
                    .block_on(self.api.replace(id, &PostParams::default(), &obj))
                    .map_err(|e| api_error(format!("cannot update TernaVolume {id}"), e))?
            }
            Some(obj) => obj,
        };
        let obj = self.mirror_status(obj, &status);
        let rv = resource_version(&obj.metadata);
        self.cache_write().offer(id, rv, Some(record.clone()));
        Ok(())
    }

    /// Brings `.status` in line with the record just written. Best effort:
    /// the record is already whole; if another writer came in between, its
    /// own write mirrors its status, and a failure only delays `kubectl`.
    fn mirror_status(&self, mut obj: TernaVolume, status: &TernaVolumeStatus) -> TernaVolume {
        let id = obj.metadata.name.clone().unwrap_or_default();
        for _ in 0..3 {
            if obj.status.as_ref() == Some(status) {
                return obj;
            }
            let mut next = obj.clone();
            next.status = Some(status.clone());
            match self
                .handle
                .block_on(self.api.replace_status(&id, &PostParams::default(), &next))
            {
                Ok(written) => return written,
                Err(e) if is_status(&e, 409) => match self.fetch(&id) {
                    // Still the record this process wrote: mirror it again.
                    Ok(Some(fresh)) if status_annotation(&fresh) == status_annotation(&obj) => {
                        obj = fresh;
                    }
                    _ => return obj,
                },
                Err(e) => {
                    warn!(volume_id = %id, error = %e, "cannot mirror TernaVolume status");
                    return obj;
                }
            }
        }
        obj
    }
}

/// The annotation holding a record's authoritative status.
pub const STATUS_ANNOTATION: &str = "terna.dev/status";

fn status_annotation(obj: &TernaVolume) -> Option<&str> {
    obj.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(STATUS_ANNOTATION))
        .map(String::as_str)
}

fn set_status_annotation(obj: &mut TernaVolume, encoded: String) {
    obj.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(STATUS_ANNOTATION.to_string(), encoded);
}

async fn watch(api: Api<TernaVolume>, cache: Arc<RwLock<Cache>>) {
    let mut stream = watcher(api, watcher::Config::default()).boxed();
    let mut listing: Vec<TernaVolume> = Vec::new();
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init) => listing.clear(),
            Ok(watcher::Event::InitApply(obj)) => listing.push(obj),
            Ok(watcher::Event::InitDone) => {
                let mut c = cache.write().unwrap_or_else(|p| p.into_inner());
                let listed: Vec<(String, u64, Option<VolumeRecord>)> = listing
                    .drain(..)
                    .filter_map(|o| {
                        let id = o.metadata.name.clone()?;
                        Some((id, resource_version(&o.metadata), from_resource(&o).ok()))
                    })
                    .collect();
                // Anything not listed is gone, unless this process wrote it
                // after the list was taken.
                let newest = listed.iter().map(|(_, rv, _)| *rv).max().unwrap_or(0);
                c.entries.retain(|_, (rv, _)| *rv > newest);
                for (id, rv, record) in listed {
                    c.offer(&id, rv, record);
                }
                c.synced = true;
            }
            Ok(watcher::Event::Apply(obj)) => {
                if let Some(id) = obj.metadata.name.clone() {
                    let rv = resource_version(&obj.metadata);
                    let record = from_resource(&obj).ok();
                    cache
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .offer(&id, rv, record);
                }
            }
            Ok(watcher::Event::Delete(obj)) => {
                if let Some(id) = obj.metadata.name.clone() {
                    let rv = resource_version(&obj.metadata);
                    cache
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .offer(&id, rv, None);
                }
            }
            Err(e) => {
                warn!(error = %e, "TernaVolume watch failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

impl StateStore for KubeStore {
    fn get(&self, id: &str) -> Result<Option<VolumeRecord>> {
        match self.fetch(id)? {
            Some(obj) => from_resource(&obj).map(Some),
            None => Ok(None),
        }
    }

    fn list(&self) -> Result<Vec<VolumeRecord>> {
        self.watching.call_once(|| {
            self.handle
                .spawn(watch(self.api.clone(), self.cache.clone()));
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            {
                let c = self.cache.read().unwrap_or_else(|p| p.into_inner());
                if c.synced {
                    let mut records: Vec<VolumeRecord> =
                        c.entries.values().filter_map(|(_, r)| r.clone()).collect();
                    records.sort_by(|a, b| a.id.cmp(&b.id));
                    return Ok(records);
                }
            }
            if std::time::Instant::now() > deadline {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    "cannot list TernaVolumes: the API server has not answered for 30 s",
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn put(&self, record: &VolumeRecord) -> Result<()> {
        for _ in 0..CONFLICT_RETRIES {
            let current = self.fetch(&record.id)?;
            match self.write(current, record) {
                Err(e) if e.kind == ErrorKind::Aborted => continue,
                other => return other,
            }
        }
        Err(Error::new(
            ErrorKind::Aborted,
            format!("TernaVolume {} keeps changing under us; retry", record.id),
        ))
    }

    fn insert(&self, record: &VolumeRecord) -> Result<()> {
        match self.write(None, record) {
            Err(e) if e.kind == ErrorKind::Aborted => Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("volume {} already has a record", record.id),
            )),
            other => other,
        }
    }

    fn remove(&self, id: &str) -> Result<()> {
        let rv = self
            .cache
            .read()
            .map_or(0, |c| c.entries.get(id).map_or(0, |(rv, _)| *rv));
        match self
            .handle
            .block_on(self.api.delete(id, &DeleteParams::default()))
        {
            Ok(_) => {}
            Err(e) if is_status(&e, 404) => {}
            Err(e) => return Err(api_error(format!("cannot delete TernaVolume {id}"), e)),
        }
        self.cache_write().offer(id, rv + 1, None);
        Ok(())
    }

    fn update(
        &self,
        id: &str,
        change: &mut dyn FnMut(&mut VolumeRecord) -> Result<bool>,
    ) -> Result<Option<VolumeRecord>> {
        for attempt in 0..CONFLICT_RETRIES {
            let Some(obj) = self.fetch(id)? else {
                return Ok(None);
            };
            let mut record = from_resource(&obj)?;
            if !change(&mut record)? {
                return Ok(Some(record));
            }
            match self.write(Some(obj), &record) {
                Ok(()) => return Ok(Some(record)),
                // Writers that collided back off by different amounts, so
                // they stop colliding rather than lose to each other in
                // lockstep until the retries run out.
                Err(e) if e.kind == ErrorKind::Aborted => {
                    std::thread::sleep(conflict_backoff(attempt))
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::new(
            ErrorKind::Aborted,
            format!("TernaVolume {id} keeps changing under us; retry"),
        ))
    }
}

/// A volume's health in one word: healthy, degraded, rebuilding (a
/// replacement is being filled) or faulted (no healthy replica).
pub fn volume_state(record: &VolumeRecord) -> &'static str {
    let healthy = record.healthy_count();
    if healthy == record.replicas.len() {
        "healthy"
    } else if healthy == 0 {
        "faulted"
    } else if record.rebuilding() {
        "rebuilding"
    } else {
        "degraded"
    }
}

fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Creating => "creating",
        Phase::Ready => "ready",
        Phase::Deleting => "deleting",
    }
}

pub fn to_resource(record: &VolumeRecord) -> (TernaVolumeSpec, TernaVolumeStatus) {
    let spec = TernaVolumeSpec {
        volume_name: record.name.clone(),
        capacity_bytes: record.capacity_bytes,
        size: human_bytes(record.capacity_bytes),
        parameters: record.parameters.clone(),
        tier: record.class.tier.map(|t| t.to_string()),
        replicas: record
            .replicas
            .iter()
            .map(|r| ReplicaPlacement {
                pool: r.pool.clone(),
                node: r.node.clone(),
                domain: r.domain.clone(),
                zone: r.zone.clone(),
            })
            .collect(),
        created_at_ns: record.created_at_ns,
        claim: record.claim.clone(),
    };
    let status = TernaVolumeStatus {
        phase: phase_name(record.phase).to_string(),
        state: volume_state(record).to_string(),
        message: record.degradation(),
        generation: record.generation,
        healthy_replicas: format!("{}/{}", record.healthy_count(), record.replicas.len()),
        replicas: record
            .replicas
            .iter()
            .map(|r| match &r.state {
                ReplicaState::Healthy => ReplicaStatus {
                    state: "healthy".into(),
                    last_catch_up_bytes: r.last_catch_up_bytes,
                    ..Default::default()
                },
                ReplicaState::Faulted {
                    generation,
                    reason,
                    since,
                    replaced,
                } => ReplicaStatus {
                    state: if *replaced { "rebuilding" } else { "faulted" }.into(),
                    faulted_at_generation: Some(*generation),
                    reason: Some(reason.clone()),
                    since: Some(*since),
                    last_catch_up_bytes: r.last_catch_up_bytes,
                    missed: r.missed.as_ref().map(extent_list_status),
                },
            })
            .collect(),
        staged_on: record.staged_on.as_ref().map(|s| StagedOnStatus {
            node: s.node.clone(),
            staging_path: s.staging_path.clone(),
            epoch: s.epoch,
            repair: s.repair,
            lists_missed: s.lists_missed,
        }),
        claims: record.claims,
        writing: record.writing.as_ref().map(extent_list_status),
        published: record.published.clone(),
    };
    (spec, status)
}

fn extent_list_status(list: &ExtentList) -> ExtentListStatus {
    ExtentListStatus {
        extent_bytes: list.extent_bytes,
        through_epoch: list.through_epoch,
        extents: crate::core::extent_list::ranges::encode(&list.extents),
    }
}

/// `None` when the status does not parse.
fn extent_list(status: &ExtentListStatus) -> Option<ExtentList> {
    Some(ExtentList {
        extent_bytes: status.extent_bytes,
        through_epoch: status.through_epoch,
        extents: crate::core::extent_list::ranges::decode(&status.extents).ok()?,
    })
    .filter(|m| m.extent_bytes.is_power_of_two())
}

/// The record a TernaVolume stands for. An object without status was
/// created but never finished: it is a record still `Creating`, with every
/// replica as placed.
pub fn from_resource(obj: &TernaVolume) -> Result<VolumeRecord> {
    let id = obj
        .metadata
        .name
        .clone()
        .ok_or_else(|| Error::internal("TernaVolume without a name"))?;
    let class = VolumeClass::parse(&obj.spec.parameters).map_err(|e| {
        Error::internal(format!(
            "TernaVolume {id} has parameters that no longer parse: {e}"
        ))
    })?;
    // The annotation is the truth; objects written before it existed have
    // only `.status`.
    let status = match status_annotation(obj) {
        Some(encoded) => serde_json::from_str::<TernaVolumeStatus>(encoded).map_err(|e| {
            Error::internal(format!(
                "TernaVolume {id} has a {STATUS_ANNOTATION} annotation that does not parse: {e}"
            ))
        })?,
        None => obj.status.clone().unwrap_or_default(),
    };
    let phase = match status.phase.as_str() {
        "ready" => Phase::Ready,
        "deleting" => Phase::Deleting,
        _ => Phase::Creating,
    };
    let replicas = obj
        .spec
        .replicas
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let s = status.replicas.get(i);
            // Only a replica recorded healthy is read from: one whose state
            // is missing or unknown (an object edited by hand, a newer
            // version's word) is copied in full from those that are.
            let unsure = |reason: String| ReplicaState::Faulted {
                generation: status.generation,
                reason,
                since: s.and_then(|s| s.since).unwrap_or(0),
                replaced: false,
            };
            let state = match s {
                Some(s) if s.state == "healthy" => ReplicaState::Healthy,
                Some(s) if s.state == "faulted" || s.state == "rebuilding" => {
                    ReplicaState::Faulted {
                        generation: s.faulted_at_generation.unwrap_or(status.generation),
                        reason: s.reason.clone().unwrap_or_default(),
                        since: s.since.unwrap_or(0),
                        replaced: s.state == "rebuilding",
                    }
                }
                Some(s) => unsure(format!(
                    "recorded state {:?} is not one this version knows",
                    s.state
                )),
                // A create that has not finished has written no states yet:
                // its replicas are new and empty.
                None if phase == Phase::Creating => ReplicaState::Healthy,
                None => unsure("no state recorded for this replica".into()),
            };
            ReplicaRecord {
                pool: p.pool.clone(),
                node: p.node.clone(),
                domain: p.domain.clone(),
                zone: p.zone.clone(),
                state,
                last_catch_up_bytes: s.and_then(|s| s.last_catch_up_bytes),
                // Only a replica recorded faulted keeps a list, and one that
                // does not parse is no list: everything is missed.
                missed: s
                    .filter(|s| s.state == "faulted" || s.state == "rebuilding")
                    .and_then(|s| s.missed.as_ref())
                    .and_then(extent_list),
            }
        })
        .collect();
    Ok(VolumeRecord {
        id,
        name: obj.spec.volume_name.clone(),
        capacity_bytes: obj.spec.capacity_bytes,
        class,
        parameters: obj.spec.parameters.clone(),
        phase,
        created_at_ns: obj.spec.created_at_ns,
        generation: status.generation.max(1),
        replicas,
        staged_on: status.staged_on.map(|s| StagedOn {
            node: s.node,
            staging_path: s.staging_path,
            epoch: s.epoch,
            repair: s.repair,
            lists_missed: s.lists_missed,
        }),
        claims: status.claims,
        // One that does not parse is the log of everything.
        writing: status.writing.as_ref().map(|w| {
            extent_list(w)
                .unwrap_or_else(|| ExtentList::everything(obj.spec.capacity_bytes, w.through_epoch))
        }),
        published: status.published,
        claim: obj.spec.claim.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A test record whose class is what its parameters say, as every
    /// record made by the controller is.
    fn record(replicas: usize) -> VolumeRecord {
        let mut r = crate::core::volume::tests::record(replicas);
        r.parameters = [("replicas".to_string(), replicas.to_string())].into();
        r.class = VolumeClass::parse(&r.parameters).unwrap();
        r
    }

    fn round_trip(r: &VolumeRecord) -> VolumeRecord {
        let (spec, status) = to_resource(r);
        let obj = TernaVolume {
            metadata: ObjectMeta {
                name: Some(r.id.clone()),
                ..Default::default()
            },
            spec,
            status: Some(status),
        };
        from_resource(&obj).unwrap()
    }

    #[test]
    fn records_survive_the_resource_form() {
        let mut r = record(3);
        r.phase = Phase::Ready;
        r.claim = Some("ns/claim/uid".into());
        assert_eq!(round_trip(&r), r);
        r.fault_replica(1, "agent unreachable");
        assert!(r.list_missed(1, 0, 1));
        assert!(r.list_missed(1, 3 << 23, 2 << 23));
        r.claim_staging("n1", "/s");
        r.published = vec!["/p".into()];
        assert_eq!(round_trip(&r), r);
        assert!(r.resume_write_log(r.staged_on.clone().as_ref()));
        assert_eq!(round_trip(&r), r);
        assert!(r.log_writes(crate::core::extent_list::MIN_EXTENT, &[0, 1, 2, 7]));
        assert_eq!(round_trip(&r), r);
        r.heal_replica(1, 4096);
        assert_eq!(round_trip(&r), r);
    }

    #[test]
    fn an_object_without_status_is_an_unfinished_create() {
        let mut r = record(2);
        r.phase = Phase::Ready;
        let (spec, _) = to_resource(&r);
        let obj = TernaVolume {
            metadata: ObjectMeta {
                name: Some(r.id.clone()),
                ..Default::default()
            },
            spec,
            status: None,
        };
        let back = from_resource(&obj).unwrap();
        assert_eq!(back.phase, Phase::Creating);
        assert_eq!(back.replicas.len(), 2);
        assert!(back.replicas.iter().all(|r| r.is_healthy()));
    }

    #[test]
    fn a_replica_without_a_known_recorded_state_is_not_read_from() {
        let mut r = record(3);
        r.phase = Phase::Ready;
        let (spec, mut status) = to_resource(&r);
        status.replicas[1].state = "Healthy ".into();
        status.replicas.truncate(2);
        let obj = TernaVolume {
            metadata: ObjectMeta {
                name: Some(r.id.clone()),
                ..Default::default()
            },
            spec,
            status: Some(status),
        };
        let back = from_resource(&obj).unwrap();
        assert!(back.replicas[0].is_healthy());
        for (i, why) in [(1, "not one this version knows"), (2, "no state recorded")] {
            match &back.replicas[i].state {
                ReplicaState::Faulted {
                    reason, replaced, ..
                } => {
                    assert!(reason.contains(why), "replica {i}: {reason}");
                    assert!(!replaced);
                }
                other => panic!("replica {i} read as {other:?}"),
            }
        }
    }

    #[test]
    fn state_words() {
        let mut r = record(3);
        assert_eq!(volume_state(&r), "healthy");
        r.fault_replica(0, "link cut");
        assert_eq!(volume_state(&r), "degraded");
        r.fault_replica(1, "replaced on pool p after pool q was lost");
        assert_eq!(volume_state(&r), "degraded", "prose decides nothing");
        if let ReplicaState::Faulted { replaced, .. } = &mut r.replicas[1].state {
            *replaced = true;
        }
        assert_eq!(volume_state(&r), "rebuilding");
        let (_, status) = to_resource(&r);
        assert_eq!(status.replicas[1].state, "rebuilding");
        r.fault_replica(2, "gone");
        assert_eq!(volume_state(&r), "faulted");
    }
}
