//! The built-in provisioner: claims of a Terna StorageClass become volumes
//! and pre-bound PersistentVolumes; released volumes are deleted or kept as
//! the class says.
//!
//! Exactly once, whatever is interrupted: the PV's name and the volume id
//! both derive from the claim's UID, so a retry after a crash finds what the
//! first attempt made (`ControllerCore::create` resumes, a PV that exists
//! is success). Volumes provisioned for a claim carry it; one whose claim
//! and PV are both gone (the claim was deleted between create and PV) is
//! removed by the sweep. PVs carry our finalizer, so a PV cannot vanish
//! before its replicas are handled.
//!
//! Binding itself is kube-controller-manager's: its PV controller completes
//! a PV whose claimRef names the claim. A bound claim that asks for more
//! storage is expanded (`expansion`), in the same claim reconcile.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    CSIPersistentVolumeSource, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    ObjectReference, PersistentVolume, PersistentVolumeClaim, PersistentVolumeSpec,
    VolumeNodeAffinity,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use tracing::{Instrument, info, info_span, warn};

use crate::core::capability::{AccessMode, AccessType, Capability};
use crate::core::class::VolumeClass;
use crate::core::controller::{ControllerCore, CreateRequest};
use crate::core::error::{Error, ErrorKind};
use crate::core::volume::VolumeRecord;
use crate::edge::kube::expansion::{self, Backoffs};
use crate::edge::kube::quantity::parse_quantity;

/// Our finalizer on the PVs we provision.
pub const PV_FINALIZER: &str = "terna.dev/provisioner";
/// Set on PVs we provisioned, as every provisioner does.
pub const PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
/// The scheduler's choice for WaitForFirstConsumer claims.
pub const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";

pub struct Provisioner {
    pub client: kube::Client,
    pub core: Arc<ControllerCore>,
    pub driver: String,
    pub recorder: Recorder,
    /// How many claims are provisioned at once.
    pub concurrency: u16,
    pub metrics: Arc<crate::edge::metrics::controller::ControllerMetrics>,
}

struct Ctx {
    prov: Arc<Provisioner>,
    classes: Store<StorageClass>,
    volumes: Store<PersistentVolume>,
    /// Failed expansions of bound claims, and when each is tried again.
    resizes: Backoffs,
}

/// Why a claim failed, for the Warning event: a message that says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(
        "StorageClass {class}: {message}; fix the class (its parameters cannot be edited: delete and recreate it) and the claim is provisioned"
    )]
    BadClass { class: String, message: String },
    #[error("{0}")]
    BadClaim(String),
    #[error("cannot provision: {}", .0.report())]
    Core(Error),
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
}

impl ProvisionError {
    fn reason(&self) -> &'static str {
        match self {
            ProvisionError::BadClass { .. } | ProvisionError::BadClaim(_) => "ProvisioningFailed",
            ProvisionError::Core(e) if e.kind == ErrorKind::ResourceExhausted => {
                "ProvisioningFailed"
            }
            _ => "ProvisioningRetrying",
        }
    }
}

/// `pvc-<uid>`: the PV (and CSI volume) name of a claim, as the standard
/// external-provisioner names them.
pub fn pv_name(pvc: &PersistentVolumeClaim) -> Option<String> {
    pvc.metadata.uid.as_ref().map(|uid| format!("pvc-{uid}"))
}

/// Pure: the CSI capabilities a claim asks for.
pub fn claim_capabilities(
    pvc: &PersistentVolumeClaim,
    class: &VolumeClass,
) -> Result<Vec<Capability>, ProvisionError> {
    let spec = pvc.spec.as_ref();
    let block = spec.and_then(|s| s.volume_mode.as_deref()) == Some("Block");
    let modes = spec
        .and_then(|s| s.access_modes.clone())
        .unwrap_or_default();
    if modes.is_empty() {
        return Err(ProvisionError::BadClaim(
            "the claim has no accessModes; set ReadWriteOnce".into(),
        ));
    }
    modes
        .iter()
        .map(|m| {
            let mode = match m.as_str() {
                "ReadWriteOnce" => AccessMode::SingleNodeWriter,
                "ReadWriteOncePod" => AccessMode::SingleNodeSingleWriter,
                "ReadOnlyMany" => AccessMode::MultiNodeReaderOnly,
                "ReadWriteMany" => AccessMode::MultiNodeMultiWriter,
                other => {
                    return Err(ProvisionError::BadClaim(format!(
                        "access mode {other:?} is unknown"
                    )));
                }
            };
            let access_type = if block {
                AccessType::Block
            } else {
                AccessType::Mount {
                    fs_type: Some(class.fs_type),
                    mount_flags: vec![],
                }
            };
            let cap = Capability { access_type, mode };
            cap.check().map_err(|e| {
                ProvisionError::BadClaim(format!(
                    "access mode {m} with volumeMode {}: {}",
                    if block { "Block" } else { "Filesystem" },
                    e.message
                ))
            })?;
            Ok(cap)
        })
        .collect()
}

/// Pure: the nodes a class's allowedTopologies allow, `None` for any.
pub fn allowed_nodes(class: &StorageClass) -> Option<Vec<String>> {
    let terms = class.allowed_topologies.as_ref()?;
    let nodes: Vec<String> = terms
        .iter()
        .flat_map(|t| t.match_label_expressions.iter().flatten())
        .filter(|e| e.key == crate::TOPOLOGY_NODE_KEY)
        .flat_map(|e| e.values.iter().cloned())
        .collect();
    (!nodes.is_empty()).then_some(nodes)
}

/// Pure: the PV for a claim's new volume, pre-bound to the claim.
pub fn build_pv(
    driver: &str,
    pvc: &PersistentVolumeClaim,
    class: &StorageClass,
    record: &VolumeRecord,
    name: &str,
) -> PersistentVolume {
    let spec = pvc.spec.clone().unwrap_or_default();
    let block = spec.volume_mode.as_deref() == Some("Block");
    let node_affinity = allowed_nodes(class).map(|nodes| VolumeNodeAffinity {
        required: Some(NodeSelector {
            node_selector_terms: vec![NodeSelectorTerm {
                match_expressions: Some(vec![NodeSelectorRequirement {
                    key: crate::TOPOLOGY_NODE_KEY.into(),
                    operator: "In".into(),
                    values: Some(nodes),
                }]),
                ..Default::default()
            }],
        }),
    });
    PersistentVolume {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            annotations: Some(BTreeMap::from([(
                PROVISIONED_BY.to_string(),
                driver.to_string(),
            )])),
            finalizers: Some(vec![PV_FINALIZER.to_string()]),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            capacity: Some(BTreeMap::from([(
                "storage".to_string(),
                Quantity(record.capacity_bytes.to_string()),
            )])),
            access_modes: spec.access_modes.clone(),
            volume_mode: spec.volume_mode.clone(),
            persistent_volume_reclaim_policy: Some(
                class
                    .reclaim_policy
                    .clone()
                    .unwrap_or_else(|| "Delete".into()),
            ),
            storage_class_name: Some(class.name_any()),
            mount_options: class.mount_options.clone(),
            csi: Some(CSIPersistentVolumeSource {
                driver: driver.to_string(),
                volume_handle: record.id.clone(),
                fs_type: (!block).then(|| record.class.fs_type.as_str().to_string()),
                volume_attributes: Some(BTreeMap::from([(
                    "terna.dev/replicas".to_string(),
                    record.replicas.len().to_string(),
                )])),
                ..Default::default()
            }),
            claim_ref: Some(ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("PersistentVolumeClaim".into()),
                namespace: pvc.metadata.namespace.clone(),
                name: pvc.metadata.name.clone(),
                uid: pvc.metadata.uid.clone(),
                ..Default::default()
            }),
            node_affinity,
            ..Default::default()
        }),
        status: None,
    }
}

impl Provisioner {
    pub fn reporter(instance: &str) -> Reporter {
        Reporter {
            controller: "terna-provisioner".into(),
            instance: Some(instance.to_string()),
        }
    }

    /// Runs until the watches end (they do not, short of the process).
    pub async fn run(self: Arc<Self>) {
        let (classes, class_writer) = reflector::store();
        let class_api: Api<StorageClass> = Api::all(self.client.clone());
        let class_watch = watcher(class_api, watcher::Config::default())
            .default_backoff()
            .reflect(class_writer)
            .for_each(|_| async {});
        let pv_api: Api<PersistentVolume> = Api::all(self.client.clone());
        let pvc_api: Api<PersistentVolumeClaim> = Api::all(self.client.clone());

        let pv_controller = Controller::new(pv_api, watcher::Config::default())
            .with_config(controller::Config::default().concurrency(self.concurrency));
        let volumes = pv_controller.store();
        let ctx = Arc::new(Ctx {
            prov: self.clone(),
            classes: classes.clone(),
            volumes: volumes.clone(),
            resizes: Backoffs::default(),
        });
        let pvs = pv_controller
            .run(reconcile_pv, retry_pv, ctx.clone())
            .for_each(|_| async {});
        // A PV that goes away lets a claim whose provisioning waited on it
        // move again; a class that appears lets its claims be provisioned.
        let pvc_controller = Controller::new(pvc_api, watcher::Config::default())
            .with_config(controller::Config::default().concurrency(self.concurrency));
        let claims = pvc_controller
            .run(reconcile_claim, retry_claim, ctx.clone())
            .for_each(|_| async {});
        let sweep = sweep_orphans(ctx.clone());
        let health =
            crate::edge::kube::health_events::run(self.client.clone(), self.recorder.clone());
        tokio::join!(class_watch, pvs, claims, sweep, health);
    }

    async fn warn_claim(&self, pvc: &PersistentVolumeClaim, reason: &str, note: String) {
        let event = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(note),
            action: "Provision".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &pvc.object_ref(&())).await {
            warn!(error = %e, "cannot publish event");
        }
    }

    async fn tell(&self, obj: ObjectReference, type_: EventType, reason: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Provision".into(),
            secondary: None,
        };
        self.publish(obj, event).await;
    }

    pub async fn publish(&self, obj: ObjectReference, event: Event) {
        if let Err(e) = self.recorder.publish(&event, &obj).await {
            warn!(error = %e, "cannot publish event");
        }
    }
}

/// A blocking core call off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> crate::core::error::Result<T> + Send + 'static,
) -> Result<T, ProvisionError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ProvisionError::Core(Error::internal(format!("task failed: {e}"))))?
        .map_err(ProvisionError::Core)
}

async fn reconcile_claim(
    pvc: Arc<PersistentVolumeClaim>,
    ctx: Arc<Ctx>,
) -> Result<Action, ProvisionError> {
    let prov = &ctx.prov;
    let Some(spec) = pvc.spec.clone() else {
        return Ok(Action::await_change());
    };
    if pvc.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    // Bound: provisioned already; it may be asking for more storage.
    if let Some(pv) = spec.volume_name.as_deref().filter(|v| !v.is_empty()) {
        let resizer = expansion::Resizer {
            client: &prov.client,
            core: &prov.core,
            driver: &prov.driver,
            recorder: &prov.recorder,
        };
        return Ok(expansion::reconcile(&resizer, &ctx.resizes, &ctx.volumes, &pvc, pv).await);
    }
    let Some(class_name) = spec.storage_class_name.clone() else {
        return Ok(Action::await_change());
    };
    let Some(class) = ctx.classes.get(&ObjectRef::new(&class_name)) else {
        // Maybe not ours, maybe not created yet: look again later.
        return Ok(Action::requeue(Duration::from_secs(10)));
    };
    if class.provisioner != prov.driver {
        return Ok(Action::await_change());
    }
    let annotations = pvc.metadata.annotations.clone().unwrap_or_default();
    let selected_node = annotations.get(SELECTED_NODE).cloned();
    if class.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer")
        && selected_node.is_none()
    {
        return Ok(Action::await_change());
    }
    let Some(name) = pv_name(&pvc) else {
        return Ok(Action::await_change());
    };
    if ctx.volumes.get(&ObjectRef::new(&name)).is_some() {
        return Ok(Action::await_change());
    }
    let claim = format!(
        "{}/{}/{}",
        pvc.namespace().unwrap_or_default(),
        pvc.name_any(),
        pvc.metadata.uid.clone().unwrap_or_default()
    );
    let span = info_span!("provision", claim = %claim, pv = %name);
    async move {
        let parameters: BTreeMap<String, String> = class.parameters.clone().unwrap_or_default();
        let volume_class =
            VolumeClass::parse(&parameters).map_err(|e| ProvisionError::BadClass {
                class: class_name.clone(),
                message: e.to_string(),
            })?;
        let capabilities = claim_capabilities(&pvc, &volume_class)?;
        let resources = spec.resources.clone().unwrap_or_default();
        let quantity = |m: &Option<BTreeMap<String, Quantity>>| -> Result<u64, ProvisionError> {
            match m.as_ref().and_then(|m| m.get("storage")) {
                None => Ok(0),
                Some(q) => parse_quantity(&q.0).ok_or_else(|| {
                    ProvisionError::BadClaim(format!(
                        "storage quantity {:?} is not a whole number of bytes",
                        q.0
                    ))
                }),
            }
        };
        let required_bytes = quantity(&resources.requests)?;
        let limit_bytes = quantity(&resources.limits)?;
        if required_bytes == 0 {
            return Err(ProvisionError::BadClaim(
                "the claim requests no storage; set spec.resources.requests.storage".into(),
            ));
        }
        let request = CreateRequest {
            name: name.clone(),
            required_bytes,
            limit_bytes,
            parameters,
            capabilities,
            preferred_node: selected_node,
            allowed_nodes: allowed_nodes(&class),
            claim: Some(claim.clone()),
        };
        let started = std::time::Instant::now();
        let core = prov.core.clone();
        let record = blocking(move || core.create(&request)).await?;
        let pv = build_pv(&prov.driver, &pvc, &class, &record, &name);
        let api: Api<PersistentVolume> = Api::all(prov.client.clone());
        match api.create(&PostParams::default(), &pv).await {
            Ok(_) => {}
            // An earlier pass made it (this one ran before the PV reached
            // the watch cache): counted and announced then, not again.
            Err(kube::Error::Api(s)) if s.code == 409 => return Ok(Action::await_change()),
            Err(e) => return Err(e.into()),
        }
        prov.metrics.provisioned(started.elapsed());
        let pools: Vec<&str> = record.replicas.iter().map(|r| r.pool.as_str()).collect();
        info!(volume_id = %record.id, pools = ?pools, "claim provisioned");
        prov.tell(
            pvc.object_ref(&()),
            EventType::Normal,
            "Provisioned",
            format!(
                "volume {} ({} bytes) with {} replica(s) on pools {}",
                record.id,
                record.capacity_bytes,
                pools.len(),
                pools.join(", ")
            ),
        )
        .await;
        Ok(Action::await_change())
    }
    .instrument(span)
    .await
}

fn retry_claim(pvc: Arc<PersistentVolumeClaim>, error: &ProvisionError, ctx: Arc<Ctx>) -> Action {
    warn!(claim = %pvc.name_any(), error = %error, "provisioning failed");
    let ctx = ctx.clone();
    let reason = error.reason();
    ctx.prov.metrics.failed(reason);
    let note = error.to_string();
    tokio::spawn(async move { ctx.prov.warn_claim(&pvc, reason, note).await });
    match error {
        ProvisionError::BadClass { .. } | ProvisionError::BadClaim(_) => {
            Action::requeue(Duration::from_secs(60))
        }
        _ => Action::requeue(Duration::from_secs(5)),
    }
}

/// Released PVs with reclaim Delete: delete the volume, then the PV. A PV
/// being deleted: delete the volume unless it is retained, then let the PV
/// go.
async fn reconcile_pv(pv: Arc<PersistentVolume>, ctx: Arc<Ctx>) -> Result<Action, ProvisionError> {
    let prov = &ctx.prov;
    let ours = pv
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(PROVISIONED_BY))
        == Some(&prov.driver);
    let Some(spec) = pv.spec.as_ref() else {
        return Ok(Action::await_change());
    };
    let Some(csi) = spec.csi.as_ref().filter(|c| c.driver == prov.driver) else {
        return Ok(Action::await_change());
    };
    if !ours {
        return Ok(Action::await_change());
    }
    let name = pv.name_any();
    let delete_policy = spec.persistent_volume_reclaim_policy.as_deref() != Some("Retain");
    let released = pv.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Released");
    let api: Api<PersistentVolume> = Api::all(prov.client.clone());
    let volume_id = csi.volume_handle.clone();
    let span = info_span!("reclaim", pv = %name, volume_id = %volume_id);
    async move {
        if pv.metadata.deletion_timestamp.is_some() {
            if !pv.finalizers().iter().any(|f| f == PV_FINALIZER) {
                return Ok(Action::await_change());
            }
            if delete_policy {
                let core = prov.core.clone();
                let id = volume_id.clone();
                blocking(move || core.delete(&id)).await?;
                info!("volume deleted");
            }
            let finalizers: Vec<String> = pv
                .finalizers()
                .iter()
                .filter(|f| *f != PV_FINALIZER)
                .cloned()
                .collect();
            let patch = serde_json::json!({
                "metadata": {
                    "finalizers": finalizers,
                    "resourceVersion": pv.metadata.resource_version,
                }
            });
            api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            return Ok(Action::await_change());
        }
        if released && delete_policy {
            let core = prov.core.clone();
            let id = volume_id.clone();
            blocking(move || core.delete(&id)).await?;
            prov.metrics.deleted();
            info!("claim released; volume deleted");
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Action::await_change())
    }
    .instrument(span)
    .await
}

fn retry_pv(pv: Arc<PersistentVolume>, error: &ProvisionError, ctx: Arc<Ctx>) -> Action {
    warn!(pv = %pv.name_any(), error = %error, "reclaiming failed");
    let note = error.to_string();
    tokio::spawn(async move {
        ctx.prov
            .tell(
                pv.object_ref(&()),
                EventType::Warning,
                "VolumeDeleteFailed",
                note,
            )
            .await
    });
    Action::requeue(Duration::from_secs(5))
}

/// Volumes made for a claim whose claim and PV are both gone: the claim was
/// deleted after its volume was created but before the PV was. Checked
/// against the API server, not the caches, before anything is deleted.
async fn sweep_orphans(ctx: Arc<Ctx>) {
    const EVERY: Duration = Duration::from_secs(30);
    const GRACE_NS: u64 = 60 * 1_000_000_000;
    loop {
        tokio::time::sleep(EVERY).await;
        let core = ctx.prov.core.clone();
        let records = match blocking(move || core.list_all()).await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "orphan sweep cannot list volumes");
                continue;
            }
        };
        let now = crate::core::volume::unix_now_ns();
        for record in records {
            let Some(claim) = record.claim.clone() else {
                continue;
            };
            if now.saturating_sub(record.created_at_ns) < GRACE_NS
                || ctx.volumes.get(&ObjectRef::new(&record.name)).is_some()
            {
                continue;
            }
            if let Err(e) = sweep_one(&ctx, &record, &claim).await {
                warn!(volume_id = %record.id, error = %e, "orphan sweep failed");
            }
        }
    }
}

async fn sweep_one(ctx: &Ctx, record: &VolumeRecord, claim: &str) -> Result<(), ProvisionError> {
    let mut parts = claim.splitn(3, '/');
    let (Some(ns), Some(name), Some(uid)) = (parts.next(), parts.next(), parts.next()) else {
        return Ok(());
    };
    let pv_api: Api<PersistentVolume> = Api::all(ctx.prov.client.clone());
    if pv_api.get_opt(&record.name).await?.is_some() {
        return Ok(());
    }
    let pvc_api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.prov.client.clone(), ns);
    let live = pvc_api
        .get_opt(name)
        .await?
        .is_some_and(|p| p.metadata.uid.as_deref() == Some(uid));
    if live {
        return Ok(());
    }
    let core = ctx.prov.core.clone();
    let id = record.id.clone();
    blocking(move || core.delete(&id)).await?;
    info!(volume_id = %record.id, claim = %claim, "orphaned volume of a deleted claim removed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PersistentVolumeClaimSpec, VolumeResourceRequirements};
    use k8s_openapi::api::core::v1::{TopologySelectorLabelRequirement, TopologySelectorTerm};

    fn claim(modes: &[&str], block: bool) -> PersistentVolumeClaim {
        PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some("data".into()),
                namespace: Some("apps".into()),
                uid: Some("1234".into()),
                ..Default::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(modes.iter().map(|m| m.to_string()).collect()),
                volume_mode: block.then(|| "Block".to_string()),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([(
                        "storage".to_string(),
                        Quantity("1Gi".into()),
                    )])),
                    ..Default::default()
                }),
                storage_class_name: Some("terna-fast".into()),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn class(topology: Option<Vec<&str>>) -> StorageClass {
        StorageClass {
            metadata: ObjectMeta {
                name: Some("terna-fast".into()),
                ..Default::default()
            },
            provisioner: crate::DRIVER_NAME.into(),
            reclaim_policy: Some("Retain".into()),
            mount_options: Some(vec!["noatime".into()]),
            allowed_topologies: topology.map(|nodes| {
                vec![TopologySelectorTerm {
                    match_label_expressions: Some(vec![TopologySelectorLabelRequirement {
                        key: crate::TOPOLOGY_NODE_KEY.into(),
                        values: nodes.into_iter().map(String::from).collect(),
                    }]),
                }]
            }),
            ..Default::default()
        }
    }

    fn volume_class() -> VolumeClass {
        VolumeClass::parse(&BTreeMap::new()).unwrap()
    }

    #[test]
    fn access_modes_map_to_capabilities() {
        let caps = claim_capabilities(&claim(&["ReadWriteOnce"], false), &volume_class()).unwrap();
        assert_eq!(caps.len(), 1);
        assert_eq!(caps[0].mode, AccessMode::SingleNodeWriter);
        assert!(matches!(
            caps[0].access_type,
            AccessType::Mount {
                fs_type: Some(crate::core::class::FsType::Ext4),
                ..
            }
        ));
        let caps =
            claim_capabilities(&claim(&["ReadWriteOncePod"], true), &volume_class()).unwrap();
        assert_eq!(caps[0].access_type, AccessType::Block);
        let err =
            claim_capabilities(&claim(&["ReadWriteMany"], false), &volume_class()).unwrap_err();
        assert!(err.to_string().contains("ReadWriteMany"), "{err}");
        assert!(claim_capabilities(&claim(&[], false), &volume_class()).is_err());
        assert!(claim_capabilities(&claim(&["Sometimes"], false), &volume_class()).is_err());
    }

    #[test]
    fn topology_narrows_nodes() {
        assert_eq!(allowed_nodes(&class(None)), None);
        assert_eq!(
            allowed_nodes(&class(Some(vec!["n1", "n2"]))),
            Some(vec!["n1".to_string(), "n2".to_string()])
        );
    }

    #[test]
    fn pv_is_pre_bound_and_carries_the_class() {
        let pvc = claim(&["ReadWriteOnce"], false);
        let mut record = crate::core::volume::tests::record(3);
        record.capacity_bytes = 1 << 30;
        let pv = build_pv(
            "csi.terna.dev",
            &pvc,
            &class(Some(vec!["n1"])),
            &record,
            "pvc-1234",
        );
        let spec = pv.spec.unwrap();
        let claim_ref = spec.claim_ref.unwrap();
        assert_eq!(claim_ref.uid.as_deref(), Some("1234"));
        assert_eq!(claim_ref.namespace.as_deref(), Some("apps"));
        assert_eq!(
            spec.persistent_volume_reclaim_policy.as_deref(),
            Some("Retain")
        );
        assert_eq!(spec.mount_options, Some(vec!["noatime".to_string()]));
        assert_eq!(
            spec.capacity.unwrap()["storage"].0,
            (1u64 << 30).to_string()
        );
        let csi = spec.csi.unwrap();
        assert_eq!(csi.volume_handle, record.id);
        assert_eq!(csi.fs_type.as_deref(), Some("ext4"));
        assert!(spec.node_affinity.is_some());
        assert_eq!(pv.metadata.finalizers, Some(vec![PV_FINALIZER.to_string()]));
    }

    #[test]
    fn pv_names_follow_the_claim_uid() {
        assert_eq!(
            pv_name(&claim(&["ReadWriteOnce"], false)).as_deref(),
            Some("pvc-1234")
        );
    }
}
