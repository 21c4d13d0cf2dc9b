//! Expanding a bound claim: what the external-resizer does for other CSI
//! drivers. When a claim of one of our PVs asks for more storage than it
//! has, the volume is grown (`ControllerCore::expand`: every healthy
//! replica, then the record), then the PV's capacity, then the claim's
//! status says `NodeResizePending` with the new size allocated; the kubelet
//! (v1.34, RecoverVolumeExpansionFailure GA) then calls NodeExpandVolume on
//! the node that has it staged, which makes the engine, the loop device and
//! the filesystem as large as the record, and sets `status.capacity` itself.
//!
//! Each step is idempotent and the order keeps every state safe: the PV
//! never says more than the replicas hold (it is written only after the
//! core has grown them), and the claim's status is written only after the
//! PV. A controller restarted anywhere in between finds the claim still
//! asking for more than its capacity and resumes: the core's expand of a
//! volume already that large returns at once, the PV patch is skipped, and
//! only the status is written. A claim already expanded (or waiting for its
//! node) is left alone.
//!
//! Failures: the claim's status says `ControllerResizeInProgress` with a
//! `ControllerResizeError` condition while the expansion is retried (a pool
//! without room, an agent down), `ControllerResizeInfeasible` when the size
//! can never be had (over the claim's limit, too large); a `VolumeResizeFailed`
//! event says why, and the claim is tried again with a growing delay. The
//! user may then lower the request (down to the claim's capacity, which the
//! API server allows for exactly this): the next attempt uses it, and a
//! request back at the capacity clears the status.
//!
//! What the API server does before we see anything: a class without
//! `allowVolumeExpansion` has the claim's patch refused (admission plugin
//! PersistentVolumeClaimResize), and so has a request below `status.capacity`.
//!
//! The top of the module is pure (what a claim needs, what its status
//! becomes); `reconcile` below does the I/O.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimCondition,
    PersistentVolumeClaimStatus,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{Instrument, info, info_span, warn};

use crate::core::controller::ControllerCore;
use crate::core::error::{Error, ErrorKind};
use crate::edge::kube::quantity::parse_quantity;

/// `status.allocatedResourceStatuses.storage` values (core/v1
/// ClaimResourceStatus).
pub const CONTROLLER_RESIZE_IN_PROGRESS: &str = "ControllerResizeInProgress";
pub const CONTROLLER_RESIZE_INFEASIBLE: &str = "ControllerResizeInfeasible";
pub const NODE_RESIZE_PENDING: &str = "NodeResizePending";
pub const NODE_RESIZE_IN_PROGRESS: &str = "NodeResizeInProgress";
pub const NODE_RESIZE_INFEASIBLE: &str = "NodeResizeInfeasible";

/// The claim condition types that belong to resizing; the kubelet drops
/// them all when it finishes.
pub const RESIZE_CONDITIONS: [&str; 4] = [
    "Resizing",
    "FileSystemResizePending",
    "ControllerResizeError",
    "NodeResizeError",
];

/// What the external-resizer says while the node has work to do.
const FS_RESIZE_PENDING_MESSAGE: &str =
    "Waiting for user to (re-)start a pod to finish file system resize of volume on node.";

/// A claim's sizes, in bytes, as its spec and status say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimSizes {
    /// `spec.resources.requests.storage`.
    pub requested: u64,
    /// `spec.resources.limits.storage`, 0 for none.
    pub limit: u64,
    /// `status.capacity.storage`; `None` until the claim is bound.
    pub capacity: Option<u64>,
    /// `status.allocatedResources.storage`.
    pub allocated: Option<u64>,
    /// `status.allocatedResourceStatuses.storage`.
    pub status: Option<String>,
}

fn storage(map: Option<&BTreeMap<String, Quantity>>) -> Result<Option<u64>, String> {
    match map.and_then(|m| m.get("storage")) {
        None => Ok(None),
        Some(q) => parse_quantity(&q.0)
            .map(Some)
            .ok_or_else(|| format!("storage quantity {:?} is not a number of bytes", q.0)),
    }
}

/// Pure: the sizes of a claim.
pub fn claim_sizes(pvc: &PersistentVolumeClaim) -> Result<ClaimSizes, String> {
    let resources = pvc.spec.as_ref().and_then(|s| s.resources.as_ref());
    let status = pvc.status.as_ref();
    Ok(ClaimSizes {
        requested: storage(resources.and_then(|r| r.requests.as_ref()))?.unwrap_or(0),
        limit: storage(resources.and_then(|r| r.limits.as_ref()))?.unwrap_or(0),
        capacity: storage(status.and_then(|s| s.capacity.as_ref()))?,
        allocated: storage(status.and_then(|s| s.allocated_resources.as_ref()))?,
        status: status
            .and_then(|s| s.allocated_resource_statuses.as_ref())
            .and_then(|m| m.get("storage"))
            .cloned(),
    })
}

/// Pure: the PV's `spec.capacity.storage`, in bytes.
pub fn pv_capacity(pv: &PersistentVolume) -> Result<u64, String> {
    Ok(storage(pv.spec.as_ref().and_then(|s| s.capacity.as_ref()))?.unwrap_or(0))
}

/// What a bound claim needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Nothing: it has what it asks for, or the node is growing it.
    Nothing,
    /// The node is growing the volume to an earlier size; a new expansion
    /// starts when it is done.
    WaitForNode,
    /// Grow the volume to `requested` bytes (within `limit`), then the PV,
    /// then the claim's status.
    Expand { requested: u64, limit: u64 },
    /// The volume and the PV already hold `size` bytes (a controller
    /// stopped before writing the claim's status): only the status is left.
    RecordPending { size: u64 },
    /// The request went back to the claim's capacity after a failed
    /// expansion: the expansion is over.
    Cancel { capacity: u64 },
}

impl ClaimSizes {
    /// Whether `plan` could ask for anything: false for every claim that is
    /// not being resized, so those need no PV lookup.
    pub fn may_need_work(&self) -> bool {
        match self.capacity {
            None => false,
            Some(c) => self.requested > c || self.controller_status(),
        }
    }

    fn controller_status(&self) -> bool {
        matches!(
            self.status.as_deref(),
            Some(CONTROLLER_RESIZE_IN_PROGRESS | CONTROLLER_RESIZE_INFEASIBLE)
        )
    }
}

/// Pure: what a bound claim of one of our PVs needs, given the PV's
/// capacity (always what the replicas hold, or less).
pub fn plan(claim: &ClaimSizes, pv_capacity: u64) -> Plan {
    let Some(capacity) = claim.capacity else {
        return Plan::Nothing;
    };
    if claim.requested <= capacity {
        return if claim.controller_status() {
            Plan::Cancel { capacity }
        } else {
            Plan::Nothing
        };
    }
    let volume_has_it = pv_capacity >= claim.requested;
    match claim.status.as_deref() {
        // The kubelet's turn: it grows the node's side to what is allocated.
        Some(NODE_RESIZE_PENDING | NODE_RESIZE_IN_PROGRESS) if volume_has_it => Plan::Nothing,
        // Asked for more while the node is at work: let it finish first.
        Some(NODE_RESIZE_IN_PROGRESS) => Plan::WaitForNode,
        // The kubelet gave up on this size; resetting it would only loop.
        // A larger request starts afresh.
        Some(NODE_RESIZE_INFEASIBLE) if volume_has_it => Plan::Nothing,
        _ if volume_has_it => Plan::RecordPending { size: pv_capacity },
        _ => Plan::Expand {
            requested: claim.requested,
            limit: claim.limit,
        },
    }
}

/// What the claim's status should say about its expansion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResizeState {
    /// Growing the volume to `allocated` bytes; `error` when the last
    /// attempt failed and another follows.
    ControllerInProgress {
        allocated: u64,
        error: Option<String>,
    },
    /// `allocated` bytes cannot be had; the user must change the request.
    ControllerInfeasible { allocated: u64, error: String },
    /// The volume holds `allocated` bytes; the node's side is next.
    NodePending { allocated: u64 },
    /// No expansion under way; the claim has `capacity`.
    Idle { capacity: u64 },
}

impl ResizeState {
    fn allocated(&self) -> u64 {
        match self {
            ResizeState::ControllerInProgress { allocated, .. }
            | ResizeState::ControllerInfeasible { allocated, .. }
            | ResizeState::NodePending { allocated } => *allocated,
            ResizeState::Idle { capacity } => *capacity,
        }
    }

    fn status(&self) -> Option<&'static str> {
        match self {
            ResizeState::ControllerInProgress { .. } => Some(CONTROLLER_RESIZE_IN_PROGRESS),
            ResizeState::ControllerInfeasible { .. } => Some(CONTROLLER_RESIZE_INFEASIBLE),
            ResizeState::NodePending { .. } => Some(NODE_RESIZE_PENDING),
            ResizeState::Idle { .. } => None,
        }
    }

    /// The resize condition (type, message), as the external-resizer sets it.
    fn condition(&self) -> Option<(&'static str, String)> {
        match self {
            ResizeState::ControllerInProgress { error: None, .. } => {
                Some(("Resizing", String::new()))
            }
            ResizeState::ControllerInProgress {
                error: Some(error), ..
            }
            | ResizeState::ControllerInfeasible { error, .. } => {
                Some(("ControllerResizeError", error.clone()))
            }
            ResizeState::NodePending { .. } => Some((
                "FileSystemResizePending",
                FS_RESIZE_PENDING_MESSAGE.to_string(),
            )),
            ResizeState::Idle { .. } => None,
        }
    }
}

/// Pure: the merge patch that makes a claim's status say `target`, or
/// `None` if it already does (so an unchanged state writes nothing and
/// wakes no watcher). Conditions other than resizing ones are kept; a
/// condition that stays keeps its transition time.
pub fn status_patch(
    current: Option<&PersistentVolumeClaimStatus>,
    target: &ResizeState,
    now: &Time,
) -> Option<serde_json::Value> {
    let allocated = current
        .and_then(|s| storage(s.allocated_resources.as_ref()).ok())
        .flatten();
    let status = current
        .and_then(|s| s.allocated_resource_statuses.as_ref())
        .and_then(|m| m.get("storage"))
        .map(String::as_str);
    let conditions: Vec<PersistentVolumeClaimCondition> = current
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let is_resize = |c: &PersistentVolumeClaimCondition| RESIZE_CONDITIONS.contains(&&*c.type_);
    let resize_now: Vec<(&str, &str)> = conditions
        .iter()
        .filter(|c| is_resize(c))
        .map(|c| (c.type_.as_str(), c.message.as_deref().unwrap_or("")))
        .collect();
    let wanted = target.condition();
    let resize_wanted: Vec<(&str, &str)> = wanted.iter().map(|(t, m)| (*t, m.as_str())).collect();
    if allocated == Some(target.allocated())
        && status == target.status()
        && resize_now == resize_wanted
    {
        return None;
    }
    let mut merged: Vec<PersistentVolumeClaimCondition> = conditions
        .iter()
        .filter(|c| !is_resize(c))
        .cloned()
        .collect();
    if let Some((type_, message)) = wanted {
        let since = conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == "True")
            .and_then(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| now.clone());
        merged.push(PersistentVolumeClaimCondition {
            type_: type_.to_string(),
            status: "True".into(),
            last_transition_time: Some(since),
            message: (!message.is_empty()).then_some(message),
            ..Default::default()
        });
    }
    Some(json!({
        "status": {
            "allocatedResources": { "storage": target.allocated().to_string() },
            "allocatedResourceStatuses": { "storage": target.status() },
            "conditions": merged,
        }
    }))
}

/// Pure: whether a failed expansion can never succeed as asked (the
/// claim's status then says Infeasible), as the external-resizer decides
/// from the CSI code.
pub fn infeasible(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::InvalidArgument | ErrorKind::OutOfRange | ErrorKind::NotFound
    )
}

/// Pure: how long to wait after the `failures`-th failure in a row: 5 s
/// doubling (60 s for an infeasible size), at most 5 minutes.
pub fn retry_after(failures: u32, infeasible: bool) -> Duration {
    let base: u64 = if infeasible { 60 } else { 5 };
    let doublings = failures.saturating_sub(1).min(16);
    Duration::from_secs(base.saturating_mul(1 << doublings).min(300))
}

/// Failed expansions per claim UID: to which size, how many in a row, and
/// when the next attempt may start. A status write wakes the claim's
/// reconcile at once; this keeps the retries to their delay anyway. A new
/// request starts afresh; success or a restart forgets (a restarted
/// controller tries once at once).
#[derive(Default)]
pub struct Backoffs(Mutex<HashMap<String, Failures>>);

struct Failures {
    requested: u64,
    count: u32,
    next: Instant,
}

impl Backoffs {
    fn waiting(&self, uid: &str, requested: u64) -> Option<Duration> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(uid)
            .filter(|f| f.requested == requested)
            .and_then(|f| f.next.checked_duration_since(Instant::now()))
            .filter(|d| !d.is_zero())
    }

    fn failed(&self, uid: &str, requested: u64, infeasible: bool) -> Duration {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let count = map
            .get(uid)
            .filter(|f| f.requested == requested)
            .map_or(0, |f| f.count)
            + 1;
        let delay = retry_after(count, infeasible);
        map.insert(
            uid.to_string(),
            Failures {
                requested,
                count,
                next: Instant::now() + delay,
            },
        );
        delay
    }

    fn clear(&self, uid: &str) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(uid);
    }
}

/// Why one pass could not finish; nothing of it is shown to the user
/// beyond the log: the pass is retried.
#[derive(Debug, thiserror::Error)]
enum PassError {
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("{0}")]
    Core(Error),
}

/// What a pass works with: the provisioner's client, core, driver name and
/// event recorder.
pub struct Resizer<'a> {
    pub client: &'a kube::Client,
    pub core: &'a Arc<ControllerCore>,
    pub driver: &'a str,
    pub recorder: &'a Recorder,
}

/// One pass over a bound claim whose PV is `pv_name`. Claims that are not
/// being resized return at once, without a request.
pub async fn reconcile(
    prov: &Resizer<'_>,
    backoffs: &Backoffs,
    pvs: &Store<PersistentVolume>,
    pvc: &PersistentVolumeClaim,
    pv_name: &str,
) -> Action {
    let sizes = match claim_sizes(pvc) {
        Ok(s) => s,
        Err(e) => {
            warn!(claim = %pvc.name_any(), error = %e, "cannot read the claim's sizes");
            return Action::await_change();
        }
    };
    if !sizes.may_need_work() {
        return Action::await_change();
    }
    // Another driver's claim: the cache says so without a request.
    let foreign = |pv: &PersistentVolume| {
        pv.spec
            .as_ref()
            .and_then(|s| s.csi.as_ref())
            .is_none_or(|c| c.driver != prov.driver)
    };
    if pvs
        .get(&ObjectRef::new(pv_name))
        .is_some_and(|pv| foreign(&pv))
    {
        return Action::await_change();
    }
    // The PV as it is now, not as the cache last saw it: a capacity we
    // wrote a moment ago must not start the expansion again.
    let pv_api: Api<PersistentVolume> = Api::all(prov.client.clone());
    let pv = match pv_api.get_opt(pv_name).await {
        Ok(Some(pv)) => pv,
        Ok(None) => return Action::await_change(),
        Err(e) => {
            warn!(pv = %pv_name, error = %e, "cannot read the claim's PV");
            return Action::requeue(Duration::from_secs(5));
        }
    };
    let bound_here = pv
        .spec
        .as_ref()
        .and_then(|s| s.claim_ref.as_ref())
        .is_some_and(|r| r.uid.is_some() && r.uid == pvc.metadata.uid);
    let Some(volume_id) = pv
        .spec
        .as_ref()
        .and_then(|s| s.csi.as_ref())
        .filter(|_| !foreign(&pv) && bound_here)
        .map(|c| c.volume_handle.clone())
    else {
        return Action::await_change();
    };
    let pv_bytes = match pv_capacity(&pv) {
        Ok(b) => b,
        Err(e) => {
            warn!(pv = %pv_name, error = %e, "cannot read the PV's capacity");
            return Action::await_change();
        }
    };
    let step = plan(&sizes, pv_bytes);
    if step == Plan::Nothing {
        return Action::await_change();
    }
    let claim = format!("{}/{}", pvc.namespace().unwrap_or_default(), pvc.name_any());
    let span = info_span!("resize", claim = %claim, pv = %pv_name, volume_id = %volume_id);
    let pass = Pass {
        prov,
        backoffs,
        pvc,
        pv: &pv,
        pv_bytes,
        volume_id: &volume_id,
    };
    async move {
        match pass.run(step).await {
            Ok(action) => action,
            Err(PassError::Api(kube::Error::Api(s))) if s.code == 409 => {
                // The claim changed under us: its new version comes next.
                Action::requeue(Duration::from_secs(1))
            }
            Err(e) => {
                warn!(error = %e, "resize pass failed; retrying");
                Action::requeue(Duration::from_secs(5))
            }
        }
    }
    .instrument(span)
    .await
}

struct Pass<'a> {
    prov: &'a Resizer<'a>,
    backoffs: &'a Backoffs,
    pvc: &'a PersistentVolumeClaim,
    pv: &'a PersistentVolume,
    pv_bytes: u64,
    volume_id: &'a str,
}

impl Pass<'_> {
    fn uid(&self) -> String {
        self.pvc.metadata.uid.clone().unwrap_or_default()
    }

    async fn run(&self, step: Plan) -> Result<Action, PassError> {
        match step {
            Plan::Nothing => Ok(Action::await_change()),
            Plan::WaitForNode => Ok(Action::requeue(Duration::from_secs(10))),
            Plan::Cancel { capacity } => {
                self.write_status(self.pvc.clone(), &ResizeState::Idle { capacity })
                    .await?;
                self.backoffs.clear(&self.uid());
                info!(
                    capacity,
                    "request back at the claim's capacity; expansion cancelled"
                );
                Ok(Action::await_change())
            }
            Plan::RecordPending { size } => {
                self.node_pending(self.pvc.clone(), size).await?;
                Ok(Action::await_change())
            }
            Plan::Expand { requested, limit } => self.expand(requested, limit).await,
        }
    }

    async fn expand(&self, requested: u64, limit: u64) -> Result<Action, PassError> {
        let uid = self.uid();
        if let Some(wait) = self.backoffs.waiting(&uid, requested) {
            return Ok(Action::requeue(wait));
        }
        let pvc = self
            .write_status(
                self.pvc.clone(),
                &ResizeState::ControllerInProgress {
                    allocated: requested,
                    error: None,
                },
            )
            .await?;
        self.event(
            EventType::Normal,
            "Resizing",
            format!(
                "resizing volume {} (PV {}) from {} to {requested} bytes",
                self.volume_id,
                self.pv.name_any(),
                self.pv_bytes
            ),
        )
        .await;
        let core = self.prov.core.clone();
        let id = self.volume_id.to_string();
        let grown = tokio::task::spawn_blocking(move || core.expand(&id, requested, limit))
            .await
            .map_err(|e| PassError::Core(Error::internal(format!("task failed: {e}"))))?;
        let size = match grown {
            Ok(size) => size,
            Err(e) => {
                let hopeless = infeasible(e.kind);
                let delay = self.backoffs.failed(&uid, requested, hopeless);
                let error = e.report().to_string();
                warn!(error = %error, retry_secs = delay.as_secs(), "expansion failed");
                let state = if hopeless {
                    ResizeState::ControllerInfeasible {
                        allocated: requested,
                        error: error.clone(),
                    }
                } else {
                    ResizeState::ControllerInProgress {
                        allocated: requested,
                        error: Some(error.clone()),
                    }
                };
                self.event(
                    EventType::Warning,
                    "VolumeResizeFailed",
                    format!(
                        "cannot expand volume {} to {requested} bytes: {error}; {}, next try in {} s",
                        self.volume_id,
                        if hopeless {
                            "this size cannot be had: lower the request"
                        } else {
                            "retrying"
                        },
                        delay.as_secs()
                    ),
                )
                .await;
                self.write_status(pvc, &state).await?;
                return Ok(Action::requeue(delay));
            }
        };
        // Only now that every healthy replica holds `size` may the PV say so.
        if self.pv_bytes < size {
            let api: Api<PersistentVolume> = Api::all(self.prov.client.clone());
            let patch = json!({ "spec": { "capacity": { "storage": size.to_string() } } });
            api.patch(
                &self.pv.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
        }
        self.backoffs.clear(&uid);
        info!(
            bytes = size,
            "volume and PV expanded; the node's side is next"
        );
        self.node_pending(pvc, size).await?;
        Ok(Action::await_change())
    }

    /// The volume and the PV hold `size`: the kubelet's turn.
    async fn node_pending(&self, pvc: PersistentVolumeClaim, size: u64) -> Result<(), PassError> {
        self.write_status(pvc, &ResizeState::NodePending { allocated: size })
            .await?;
        let block = self.pv.spec.as_ref().and_then(|s| s.volume_mode.as_deref()) == Some("Block");
        self.event(
            EventType::Normal,
            "FileSystemResizeRequired",
            format!(
                "volume {} holds {size} bytes; the node it is staged on grows the {} when the kubelet calls NodeExpandVolume",
                self.volume_id,
                if block { "device" } else { "filesystem" }
            ),
        )
        .await;
        Ok(())
    }

    /// Writes the claim's status (conditional on the version in hand) if it
    /// does not say `state` yet; returns the claim as it is now.
    async fn write_status(
        &self,
        pvc: PersistentVolumeClaim,
        state: &ResizeState,
    ) -> Result<PersistentVolumeClaim, PassError> {
        let Some(mut patch) = status_patch(pvc.status.as_ref(), state, &Time(Timestamp::now()))
        else {
            return Ok(pvc);
        };
        patch["metadata"] = json!({ "resourceVersion": pvc.metadata.resource_version });
        let api: Api<PersistentVolumeClaim> = Api::namespaced(
            self.prov.client.clone(),
            &pvc.namespace().unwrap_or_default(),
        );
        Ok(api
            .patch_status(
                &pvc.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?)
    }

    async fn event(&self, type_: EventType, reason: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Resize".into(),
            secondary: None,
        };
        if let Err(e) = self
            .prov
            .recorder
            .publish(&event, &self.pvc.object_ref(&()))
            .await
        {
            warn!(error = %e, "cannot publish event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PersistentVolumeClaimSpec, VolumeResourceRequirements};

    const MIB: u64 = 1 << 20;

    fn sizes(requested: u64, capacity: u64, status: Option<&str>) -> ClaimSizes {
        ClaimSizes {
            requested,
            limit: 0,
            capacity: Some(capacity),
            allocated: None,
            status: status.map(String::from),
        }
    }

    #[test]
    fn a_claim_asking_for_what_it_has_needs_nothing() {
        let s = sizes(64 * MIB, 64 * MIB, None);
        assert!(!s.may_need_work());
        assert_eq!(plan(&s, 64 * MIB), Plan::Nothing);
        // Not bound yet: no capacity, nothing to resize.
        let unbound = ClaimSizes {
            capacity: None,
            ..sizes(64 * MIB, 0, None)
        };
        assert!(!unbound.may_need_work());
        assert_eq!(plan(&unbound, 0), Plan::Nothing);
        // xfs made the volume larger than asked: still nothing.
        assert_eq!(
            plan(&sizes(100 * MIB, 300 * MIB, None), 300 * MIB),
            Plan::Nothing
        );
    }

    #[test]
    fn a_larger_request_expands_the_volume() {
        let s = sizes(256 * MIB, 64 * MIB, None);
        assert!(s.may_need_work());
        assert_eq!(
            plan(&s, 64 * MIB),
            Plan::Expand {
                requested: 256 * MIB,
                limit: 0
            }
        );
        // A failed attempt is tried again, to the current request (which
        // the user may have lowered since).
        for status in [CONTROLLER_RESIZE_IN_PROGRESS, CONTROLLER_RESIZE_INFEASIBLE] {
            assert_eq!(
                plan(&sizes(128 * MIB, 64 * MIB, Some(status)), 64 * MIB),
                Plan::Expand {
                    requested: 128 * MIB,
                    limit: 0
                }
            );
        }
    }

    #[test]
    fn an_expanded_volume_waits_for_its_node_and_is_not_expanded_again() {
        for status in [
            NODE_RESIZE_PENDING,
            NODE_RESIZE_IN_PROGRESS,
            NODE_RESIZE_INFEASIBLE,
        ] {
            assert_eq!(
                plan(&sizes(256 * MIB, 64 * MIB, Some(status)), 256 * MIB),
                Plan::Nothing,
                "{status}"
            );
        }
        // Asked for more again while the node is at work: after it.
        assert_eq!(
            plan(
                &sizes(512 * MIB, 64 * MIB, Some(NODE_RESIZE_IN_PROGRESS)),
                256 * MIB
            ),
            Plan::WaitForNode
        );
        // Before the node started: the controller may go on.
        assert_eq!(
            plan(
                &sizes(512 * MIB, 64 * MIB, Some(NODE_RESIZE_PENDING)),
                256 * MIB
            ),
            Plan::Expand {
                requested: 512 * MIB,
                limit: 0
            }
        );
        // Done by the kubelet: capacity caught up, status cleared.
        assert_eq!(
            plan(&sizes(256 * MIB, 256 * MIB, None), 256 * MIB),
            Plan::Nothing
        );
    }

    #[test]
    fn a_pv_already_grown_only_needs_the_claims_status() {
        // A controller stopped between the PV and the status.
        for status in [None, Some(CONTROLLER_RESIZE_IN_PROGRESS)] {
            assert_eq!(
                plan(&sizes(256 * MIB, 64 * MIB, status), 257 * MIB),
                Plan::RecordPending { size: 257 * MIB }
            );
        }
    }

    #[test]
    fn a_request_lowered_back_to_the_capacity_cancels_a_failed_expansion() {
        let s = sizes(64 * MIB, 64 * MIB, Some(CONTROLLER_RESIZE_INFEASIBLE));
        assert!(s.may_need_work());
        assert_eq!(plan(&s, 64 * MIB), Plan::Cancel { capacity: 64 * MIB });
    }

    fn claim(request: &str, status: Option<PersistentVolumeClaimStatus>) -> PersistentVolumeClaim {
        PersistentVolumeClaim {
            spec: Some(PersistentVolumeClaimSpec {
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([(
                        "storage".into(),
                        Quantity(request.into()),
                    )])),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            status,
            ..Default::default()
        }
    }

    fn bound(capacity: &str) -> PersistentVolumeClaimStatus {
        PersistentVolumeClaimStatus {
            phase: Some("Bound".into()),
            capacity: Some(BTreeMap::from([(
                "storage".into(),
                Quantity(capacity.into()),
            )])),
            conditions: Some(vec![PersistentVolumeClaimCondition {
                type_: "ModifyingVolume".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            ..Default::default()
        }
    }

    #[test]
    fn sizes_are_read_from_spec_and_status() {
        let mut status = bound("64Mi");
        status.allocated_resources = Some(BTreeMap::from([(
            "storage".into(),
            Quantity("256Mi".into()),
        )]));
        status.allocated_resource_statuses = Some(BTreeMap::from([(
            "storage".into(),
            NODE_RESIZE_PENDING.to_string(),
        )]));
        let s = claim_sizes(&claim("256Mi", Some(status))).unwrap();
        assert_eq!(
            s,
            ClaimSizes {
                requested: 256 * MIB,
                limit: 0,
                capacity: Some(64 * MIB),
                allocated: Some(256 * MIB),
                status: Some(NODE_RESIZE_PENDING.into()),
            }
        );
        assert!(claim_sizes(&claim("lots", None)).is_err());
    }

    fn apply(
        status: &PersistentVolumeClaimStatus,
        patch: &serde_json::Value,
    ) -> PersistentVolumeClaimStatus {
        let mut value = serde_json::to_value(status).unwrap();
        json_merge(&mut value, &patch["status"]);
        serde_json::from_value(value).unwrap()
    }

    /// RFC 7386, as the API server applies a merge patch.
    fn json_merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
        match patch {
            serde_json::Value::Object(p) => {
                if !target.is_object() {
                    *target = json!({});
                }
                let t = target.as_object_mut().unwrap();
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        json_merge(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
                    }
                }
            }
            other => *target = other.clone(),
        }
    }

    fn time(s: i64) -> Time {
        Time(Timestamp::from_second(s).unwrap())
    }

    #[test]
    fn the_status_follows_the_external_resizers_and_is_written_only_when_it_changes() {
        let start = bound("64Mi");
        let resizing = ResizeState::ControllerInProgress {
            allocated: 256 * MIB,
            error: None,
        };
        let patch = status_patch(Some(&start), &resizing, &time(10)).unwrap();
        let s1 = apply(&start, &patch);
        assert_eq!(
            s1.allocated_resources.as_ref().unwrap()["storage"].0,
            (256 * MIB).to_string()
        );
        assert_eq!(
            s1.allocated_resource_statuses.as_ref().unwrap()["storage"],
            CONTROLLER_RESIZE_IN_PROGRESS
        );
        let types: Vec<&str> = s1
            .conditions
            .iter()
            .flatten()
            .map(|c| c.type_.as_str())
            .collect();
        assert_eq!(
            types,
            ["ModifyingVolume", "Resizing"],
            "other conditions stay"
        );
        assert_eq!(
            status_patch(Some(&s1), &resizing, &time(20)),
            None,
            "unchanged: no write"
        );

        // A failure keeps InProgress with the error, then again: no write.
        let failing = ResizeState::ControllerInProgress {
            allocated: 256 * MIB,
            error: Some("pool n1-standard has 0 bytes free".into()),
        };
        let s2 = apply(&s1, &status_patch(Some(&s1), &failing, &time(30)).unwrap());
        let error = s2
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "ControllerResizeError")
            .unwrap();
        assert_eq!(
            error.message.as_deref(),
            Some("pool n1-standard has 0 bytes free")
        );
        assert_eq!(error.last_transition_time, Some(time(30)));
        assert!(
            !s2.conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Resizing")
        );
        assert_eq!(status_patch(Some(&s2), &failing, &time(40)), None);

        // Grown: what the kubelet's runPreCheck looks for.
        let pending = ResizeState::NodePending {
            allocated: 256 * MIB,
        };
        let s3 = apply(&s2, &status_patch(Some(&s2), &pending, &time(50)).unwrap());
        assert_eq!(
            s3.allocated_resource_statuses.as_ref().unwrap()["storage"],
            NODE_RESIZE_PENDING
        );
        let types: Vec<&str> = s3
            .conditions
            .iter()
            .flatten()
            .map(|c| c.type_.as_str())
            .collect();
        assert_eq!(types, ["ModifyingVolume", "FileSystemResizePending"]);
        assert_eq!(status_patch(Some(&s3), &pending, &time(60)), None);

        // Cancelled: the status is removed (null in the merge patch).
        let idle = ResizeState::Idle { capacity: 64 * MIB };
        let patch = status_patch(Some(&s2), &idle, &time(70)).unwrap();
        assert!(patch["status"]["allocatedResourceStatuses"]["storage"].is_null());
        let s4 = apply(&s2, &patch);
        assert!(
            s4.allocated_resource_statuses
                .unwrap_or_default()
                .is_empty()
        );
        let types: Vec<&str> = s4
            .conditions
            .iter()
            .flatten()
            .map(|c| c.type_.as_str())
            .collect();
        assert_eq!(types, ["ModifyingVolume"]);
    }

    #[test]
    fn after_the_kubelet_finished_the_status_is_left_alone() {
        // MarkNodeExpansionFinishedWithRecovery: capacity = allocated,
        // status and resize conditions gone.
        let mut done = bound("256Mi");
        done.allocated_resources = Some(BTreeMap::from([(
            "storage".into(),
            Quantity((256 * MIB).to_string()),
        )]));
        assert_eq!(
            status_patch(
                Some(&done),
                &ResizeState::Idle {
                    capacity: 256 * MIB
                },
                &time(1)
            ),
            None
        );
        let s = claim_sizes(&claim("256Mi", Some(done))).unwrap();
        assert!(!s.may_need_work());
    }

    #[test]
    fn failures_back_off_and_sizes_that_cannot_be_had_are_infeasible() {
        assert_eq!(retry_after(1, false), Duration::from_secs(5));
        assert_eq!(retry_after(2, false), Duration::from_secs(10));
        assert_eq!(retry_after(30, false), Duration::from_secs(300));
        assert_eq!(retry_after(1, true), Duration::from_secs(60));
        assert!(!infeasible(ErrorKind::ResourceExhausted));
        assert!(!infeasible(ErrorKind::Unavailable));
        assert!(infeasible(ErrorKind::OutOfRange));
        let b = Backoffs::default();
        assert_eq!(b.waiting("u", 1), None);
        assert_eq!(b.failed("u", 1, false), Duration::from_secs(5));
        assert_eq!(b.failed("u", 1, false), Duration::from_secs(10));
        assert!(b.waiting("u", 1).is_some());
        // Another request is tried at once, and counts afresh.
        assert_eq!(b.waiting("u", 2), None);
        assert_eq!(b.failed("u", 2, false), Duration::from_secs(5));
        b.clear("u");
        assert_eq!(b.waiting("u", 2), None);
    }
}
