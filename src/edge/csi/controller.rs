//! CSI Controller: create, delete, expand, list and inspect volumes.

use crate::core::error::Context;
use std::collections::HashMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::info_span;

use crate::core::controller::{
    ControllerCore, CreateRequest, list_key, list_token, parse_list_token,
};
use crate::core::volume::VolumeRecord;
use crate::edge::csi::{VolumeLocks, blocking, parse_capability, sorted, volume_id};
use crate::proto::csi as pb;
use pb::controller_server::Controller;

pub struct ControllerService {
    pub core: Arc<ControllerCore>,
    /// Where volumes are reachable from. Standalone: its one node.
    pub topology_node: Option<String>,
    pub locks: VolumeLocks,
}

impl ControllerService {
    fn topology(&self) -> Vec<pb::Topology> {
        self.topology_node
            .iter()
            .map(|n| pb::Topology {
                segments: HashMap::from([(crate::TOPOLOGY_NODE_KEY.to_string(), n.clone())]),
            })
            .collect()
    }

    /// A requisite topology must name somewhere our volumes are reachable
    /// from: the standalone's one node, or in a cluster any node (every
    /// node reaches every replica), and no topology key but ours.
    fn check_requisite(&self, req: &Option<pb::TopologyRequirement>) -> Result<(), Status> {
        let Some(req) = req else { return Ok(()) };
        if req.requisite.is_empty() {
            return Ok(());
        }
        let reachable = |t: &pb::Topology| {
            t.segments.iter().all(|(k, v)| {
                k == crate::TOPOLOGY_NODE_KEY && self.topology_node.as_ref().is_none_or(|n| n == v)
            })
        };
        if req.requisite.iter().any(reachable) {
            return Ok(());
        }
        let named: Vec<String> = req
            .requisite
            .iter()
            .flat_map(|t| t.segments.iter().map(|(k, v)| format!("{k}={v}")))
            .take(8)
            .map(|s| crate::core::volume::shown(&s))
            .collect();
        Err(Status::resource_exhausted(format!(
            "no volume can be reachable from the requisite topology ({}): {}",
            named.join(", "),
            match &self.topology_node {
                Some(n) => format!("volumes are reachable from node {n} only"),
                None => format!("the only topology key is {}", crate::TOPOLOGY_NODE_KEY),
            }
        )))
    }

    fn volume(&self, r: &VolumeRecord) -> pb::Volume {
        pb::Volume {
            capacity_bytes: r.capacity_bytes as i64,
            volume_id: r.id.clone(),
            volume_context: HashMap::new(),
            content_source: None,
            accessible_topology: self.topology(),
        }
    }
}

fn condition(r: &VolumeRecord) -> pb::VolumeCondition {
    match r.degradation() {
        Some(message) => pb::VolumeCondition {
            abnormal: true,
            message,
        },
        None => pb::VolumeCondition {
            abnormal: false,
            message: format!("all {} replicas healthy", r.replicas.len()),
        },
    }
}

fn published_nodes(r: &VolumeRecord) -> Vec<String> {
    r.staged_on.iter().map(|s| s.node.clone()).collect()
}

/// The CreateVolume name: required, at most 128 bytes (the CSI spec's limit
/// for strings), and printable.
fn volume_name(name: &str) -> Result<String, Status> {
    if name.is_empty() {
        return Err(Status::invalid_argument("volume name is required"));
    }
    if name.len() > crate::core::volume::MAX_ID_BYTES || name.chars().any(char::is_control) {
        return Err(Status::invalid_argument(format!(
            "volume name {} is not valid: at most 128 bytes, no control characters",
            crate::core::volume::shown(name)
        )));
    }
    Ok(name.to_string())
}

fn preferred_node(req: &Option<pb::TopologyRequirement>) -> Option<String> {
    req.as_ref()?
        .preferred
        .iter()
        .find_map(|t| t.segments.get(crate::TOPOLOGY_NODE_KEY).cloned())
}

fn capacity_range(range: &Option<pb::CapacityRange>) -> Result<(u64, u64), Status> {
    let Some(r) = range else { return Ok((0, 0)) };
    if r.required_bytes < 0 || r.limit_bytes < 0 {
        return Err(Status::invalid_argument(
            "capacity range bytes must not be negative",
        ));
    }
    if r.limit_bytes != 0 && r.limit_bytes < r.required_bytes {
        return Err(Status::invalid_argument(format!(
            "capacity limit {} is below the required {}",
            r.limit_bytes, r.required_bytes
        )));
    }
    Ok((r.required_bytes as u64, r.limit_bytes as u64))
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let req = req.into_inner();
        let name = volume_name(&req.name)?;
        if req.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume capabilities are required"));
        }
        let capabilities = req
            .volume_capabilities
            .iter()
            .map(parse_capability)
            .collect::<Result<Vec<_>, _>>()?;
        if req.volume_content_source.is_some() {
            return Err(Status::invalid_argument(
                "volume content sources (snapshots, clones) are not supported yet",
            ));
        }
        let (required_bytes, limit_bytes) = capacity_range(&req.capacity_range)?;
        self.check_requisite(&req.accessibility_requirements)?;
        let create = CreateRequest {
            name: name.clone(),
            required_bytes,
            limit_bytes,
            parameters: sorted(&req.parameters),
            capabilities,
            preferred_node: preferred_node(&req.accessibility_requirements),
            // Every node can reach every replica, so the requisite topology
            // never narrows placement.
            allowed_nodes: None,
            claim: None,
        };
        // The key DeleteVolume locks too: the two must never interleave.
        let _lock = self
            .locks
            .try_lock(&crate::core::volume::volume_id_for(&name))?;
        let core = self.core.clone();
        let span = info_span!("CreateVolume", volume_name = %name);
        let record = blocking(span, move || core.create(&create)).await?;
        Ok(Response::new(pb::CreateVolumeResponse {
            volume: Some(self.volume(&record)),
        }))
    }

    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let req = req.into_inner();
        let id = volume_id(&req.volume_id)?;
        let _lock = self.locks.try_lock(&id)?;
        let core = self.core.clone();
        let span = info_span!("DeleteVolume", volume_id = %id);
        blocking(span, move || core.delete(&id).for_volume(&id)).await?;
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        _req: Request<pb::ControllerPublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerPublishVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "ControllerPublishVolume is not needed: Terna enforces single-node staging itself",
        ))
    }

    async fn controller_unpublish_volume(
        &self,
        _req: Request<pb::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerUnpublishVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "ControllerUnpublishVolume is not needed: Terna enforces single-node staging itself",
        ))
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<pb::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<pb::ValidateVolumeCapabilitiesResponse>, Status> {
        let req = req.into_inner();
        let id = volume_id(&req.volume_id)?;
        if req.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume capabilities are required"));
        }
        let core = self.core.clone();
        let lookup = id.clone();
        let span = info_span!("ValidateVolumeCapabilities", volume_id = %id);
        let record = blocking(span, move || core.get(&lookup))
            .await?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "volume {} does not exist",
                    crate::core::volume::shown(&id)
                ))
            })?;
        let mut problems = Vec::new();
        for cap in &req.volume_capabilities {
            match parse_capability(cap) {
                Ok(c) => problems.extend(c.unsupported_reason()),
                Err(s) => problems.push(s.message().to_string()),
            }
        }
        if !req.parameters.is_empty() && sorted(&req.parameters) != record.parameters {
            problems.push("parameters differ from those the volume was created with".to_string());
        }
        let confirmed =
            problems
                .is_empty()
                .then(|| pb::validate_volume_capabilities_response::Confirmed {
                    volume_context: req.volume_context.clone(),
                    volume_capabilities: req.volume_capabilities.clone(),
                    parameters: req.parameters.clone(),
                    mutable_parameters: req.mutable_parameters.clone(),
                });
        Ok(Response::new(pb::ValidateVolumeCapabilitiesResponse {
            confirmed,
            message: problems.join("; "),
        }))
    }

    async fn list_volumes(
        &self,
        req: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let req = req.into_inner();
        if req.max_entries < 0 {
            return Err(Status::invalid_argument("max_entries must not be negative"));
        }
        let after = if req.starting_token.is_empty() {
            None
        } else {
            Some(parse_list_token(&req.starting_token).ok_or_else(|| {
                Status::aborted(format!(
                    "starting_token {} is not valid",
                    crate::core::volume::shown(&req.starting_token)
                ))
            })?)
        };
        let core = self.core.clone();
        let records = blocking(info_span!("ListVolumes"), move || core.list()).await?;
        // Tokens name the last volume returned, so deleting it or creating
        // volumes between pages neither skips nor repeats an entry.
        let rest: Vec<&VolumeRecord> = records
            .iter()
            .filter(|r| after.as_ref().is_none_or(|a| &list_key(r) > a))
            .collect();
        let max = if req.max_entries == 0 {
            usize::MAX
        } else {
            req.max_entries as usize
        };
        let page: Vec<&VolumeRecord> = rest.iter().take(max).copied().collect();
        let next_token = match page.last() {
            Some(last) if rest.len() > page.len() => list_token(last),
            _ => String::new(),
        };
        let entries = page
            .into_iter()
            .map(|r| pb::list_volumes_response::Entry {
                volume: Some(self.volume(r)),
                status: Some(pb::list_volumes_response::VolumeStatus {
                    published_node_ids: published_nodes(r),
                    volume_condition: Some(condition(r)),
                }),
            })
            .collect();
        Ok(Response::new(pb::ListVolumesResponse {
            entries,
            next_token,
        }))
    }

    async fn get_capacity(
        &self,
        req: Request<pb::GetCapacityRequest>,
    ) -> Result<Response<pb::GetCapacityResponse>, Status> {
        let req = req.into_inner();
        for cap in &req.volume_capabilities {
            if let Some(reason) = parse_capability(cap)?.unsupported_reason() {
                return Err(Status::invalid_argument(reason));
            }
        }
        if let (Some(node), Some(topo)) = (&self.topology_node, &req.accessible_topology)
            && topo
                .segments
                .get(crate::TOPOLOGY_NODE_KEY)
                .is_some_and(|n| n != node)
        {
            return Ok(Response::new(pb::GetCapacityResponse {
                available_capacity: 0,
                maximum_volume_size: Some(0),
                minimum_volume_size: Some(crate::core::volume::SIZE_UNIT as i64),
            }));
        }
        let core = self.core.clone();
        let params = sorted(&req.parameters);
        let (available, max) =
            blocking(info_span!("GetCapacity"), move || core.capacity(&params)).await?;
        Ok(Response::new(pb::GetCapacityResponse {
            available_capacity: available as i64,
            maximum_volume_size: Some(max as i64),
            minimum_volume_size: Some(crate::core::volume::SIZE_UNIT as i64),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _req: Request<pb::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<pb::ControllerGetCapabilitiesResponse>, Status> {
        use pb::controller_service_capability::{Rpc, Type, rpc::Type as R};
        let capabilities = [
            R::CreateDeleteVolume,
            R::ListVolumes,
            R::GetCapacity,
            R::ExpandVolume,
            R::VolumeCondition,
            R::GetVolume,
            R::SingleNodeMultiWriter,
        ]
        .into_iter()
        // LIST_VOLUMES_PUBLISHED_NODES requires PUBLISH_UNPUBLISH_VOLUME by the
        // spec; both come with ControllerPublish (attach tracking) later.
        .map(|t| pb::ControllerServiceCapability {
            r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(pb::ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn create_snapshot(
        &self,
        _req: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::CreateSnapshotResponse>, Status> {
        Err(Status::unimplemented("snapshots are not supported yet"))
    }

    async fn delete_snapshot(
        &self,
        _req: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        Err(Status::unimplemented("snapshots are not supported yet"))
    }

    async fn list_snapshots(
        &self,
        _req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        Err(Status::unimplemented("snapshots are not supported yet"))
    }

    async fn controller_expand_volume(
        &self,
        req: Request<pb::ControllerExpandVolumeRequest>,
    ) -> Result<Response<pb::ControllerExpandVolumeResponse>, Status> {
        let req = req.into_inner();
        let id = volume_id(&req.volume_id)?;
        if req.capacity_range.is_none() {
            return Err(Status::invalid_argument("capacity range is required"));
        }
        let (required, limit) = capacity_range(&req.capacity_range)?;
        let _lock = self.locks.try_lock(&id)?;
        let core = self.core.clone();
        let span = info_span!("ControllerExpandVolume", volume_id = %id);
        let size = blocking(span, move || {
            core.expand(&id, required, limit).for_volume(&id)
        })
        .await?;
        Ok(Response::new(pb::ControllerExpandVolumeResponse {
            capacity_bytes: size as i64,
            node_expansion_required: true,
        }))
    }

    async fn controller_get_volume(
        &self,
        req: Request<pb::ControllerGetVolumeRequest>,
    ) -> Result<Response<pb::ControllerGetVolumeResponse>, Status> {
        let req = req.into_inner();
        let id = volume_id(&req.volume_id)?;
        let core = self.core.clone();
        let lookup = id.clone();
        let span = info_span!("ControllerGetVolume", volume_id = %id);
        let record = blocking(span, move || core.get(&lookup))
            .await?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "volume {} does not exist",
                    crate::core::volume::shown(&id)
                ))
            })?;
        Ok(Response::new(pb::ControllerGetVolumeResponse {
            volume: Some(self.volume(&record)),
            status: Some(pb::controller_get_volume_response::VolumeStatus {
                published_node_ids: published_nodes(&record),
                volume_condition: Some(condition(&record)),
            }),
        }))
    }

    async fn controller_modify_volume(
        &self,
        _req: Request<pb::ControllerModifyVolumeRequest>,
    ) -> Result<Response<pb::ControllerModifyVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "ControllerModifyVolume is not supported yet",
        ))
    }

    async fn get_snapshot(
        &self,
        _req: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::GetSnapshotResponse>, Status> {
        Err(Status::unimplemented("snapshots are not supported yet"))
    }
}
