//! CSI Node: stage, publish, stats and expansion on this node.

use crate::core::error::Context;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::info_span;

use crate::core::capability::AccessType;
use crate::datapath::node::NodeCore;
use crate::edge::csi::{VolumeLocks, blocking, parse_capability, volume_id};
use crate::proto::csi as pb;
use pb::node_server::Node;

pub struct NodeService {
    pub core: Arc<NodeCore>,
    pub locks: VolumeLocks,
}

/// A path that is only compared with where the volume is (stats,
/// expansion): required, and otherwise NotFound unless it is the volume's.
fn volume_path(value: &str) -> Result<PathBuf, Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument("volume path is required"));
    }
    Ok(PathBuf::from(value))
}

/// A path from the request, checked and normalised (see `node::paths`).
fn path(value: &str, what: &str) -> Result<PathBuf, Status> {
    Ok(crate::datapath::node::paths::caller_path(value, what)?)
}

fn capability(
    cap: &Option<pb::VolumeCapability>,
) -> Result<crate::core::capability::Capability, Status> {
    let cap = cap
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("volume capability is required"))?;
    let parsed = parse_capability(cap)?;
    if let Some(reason) = parsed.unsupported_reason() {
        return Err(Status::invalid_argument(reason));
    }
    Ok(parsed)
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        req: Request<pb::NodeStageVolumeRequest>,
    ) -> Result<Response<pb::NodeStageVolumeResponse>, Status> {
        let req = req.into_inner();
        let id = volume_id(&req.volume_id)?;
        let staging = path(&req.staging_target_path, "staging target path")?;
        let cap = capability(&req.volume_capability)?;
        let _lock = self.locks.try_lock(&id)?;
        let core = self.core.clone();
        let span = info_span!("NodeStageVolume", volume_id = %id);
        blocking(span, move || {
            core.stage(&id, &staging, &cap).for_volume(&id)
        })
        .await?;
        Ok(Response::new(pb::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        req: Request<pb::NodeUnstageVolumeRequest>,
    ) -> Result<Response<pb::NodeUnstageVolumeResponse>, Status> {
        let req = req.into_inner();
        let id = volume_id(&req.volume_id)?;
        let staging = path(&req.staging_target_path, "staging target path")?;
        let _lock = self.locks.try_lock(&id)?;
        let core = self.core.clone();
        let span = info_span!("NodeUnstageVolume", volume_id = %id);
        blocking(span, move || core.unstage(&id, &staging).for_volume(&id)).await?;
        Ok(Response::new(pb::NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        req: Request<pb::NodePublishVolumeRequest>,
    ) -> Result<Response<pb::NodePublishVolumeResponse>, Status> {
        let req = req.into_inner();
        let id = volume_id(&req.volume_id)?;
        let target = path(&req.target_path, "target path")?;
        let staging = path(&req.staging_target_path, "staging target path")?;
        let cap = capability(&req.volume_capability)?;
        let read_only = req.readonly;
        let _lock = self.locks.try_lock(&id)?;
        let core = self.core.clone();
        let span = info_span!("NodePublishVolume", volume_id = %id);
        blocking(span, move || {
            core.publish(&id, &staging, &target, &cap, read_only)
                .for_volume(&id)
        })
        .await?;
        Ok(Response::new(pb::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<pb::NodeUnpublishVolumeResponse>, Status> {
        let req = req.into_inner();
        let id = volume_id(&req.volume_id)?;
        let target = path(&req.target_path, "target path")?;
        let _lock = self.locks.try_lock(&id)?;
        let core = self.core.clone();
        let span = info_span!("NodeUnpublishVolume", volume_id = %id);
        blocking(span, move || core.unpublish(&id, &target).for_volume(&id)).await?;
        Ok(Response::new(pb::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<pb::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<pb::NodeGetVolumeStatsResponse>, Status> {
        use pb::volume_usage::Unit;
        let req = req.into_inner();
        let id = volume_id(&req.volume_id)?;
        let volume_path = volume_path(&req.volume_path)?;
        let core = self.core.clone();
        let span = info_span!("NodeGetVolumeStats", volume_id = %id);
        let stats = blocking(span, move || core.stats(&id, &volume_path).for_volume(&id)).await?;
        let mut usage = vec![pb::VolumeUsage {
            available: stats.available_bytes as i64,
            total: stats.total_bytes as i64,
            used: stats.used_bytes as i64,
            unit: Unit::Bytes as i32,
        }];
        if let Some((total, available, used)) = stats.inodes {
            usage.push(pb::VolumeUsage {
                available: available as i64,
                total: total as i64,
                used: used as i64,
                unit: Unit::Inodes as i32,
            });
        }
        let volume_condition = Some(match stats.abnormal {
            Some(message) => pb::VolumeCondition {
                abnormal: true,
                message,
            },
            None => pb::VolumeCondition {
                abnormal: false,
                message: "all replicas healthy".to_string(),
            },
        });
        Ok(Response::new(pb::NodeGetVolumeStatsResponse {
            usage,
            volume_condition,
        }))
    }

    async fn node_expand_volume(
        &self,
        req: Request<pb::NodeExpandVolumeRequest>,
    ) -> Result<Response<pb::NodeExpandVolumeResponse>, Status> {
        let req = req.into_inner();
        let id = volume_id(&req.volume_id)?;
        let volume_path = volume_path(&req.volume_path)?;
        let block = match &req.volume_capability {
            Some(c) => parse_capability(c)?.access_type == AccessType::Block,
            None => false,
        };
        let _lock = self.locks.try_lock(&id)?;
        let core = self.core.clone();
        let span = info_span!("NodeExpandVolume", volume_id = %id);
        let size = blocking(span, move || {
            core.expand(&id, &volume_path, block).for_volume(&id)
        })
        .await?;
        Ok(Response::new(pb::NodeExpandVolumeResponse {
            capacity_bytes: size as i64,
        }))
    }

    async fn node_get_capabilities(
        &self,
        _req: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<pb::NodeGetCapabilitiesResponse>, Status> {
        use pb::node_service_capability::{Rpc, Type, rpc::Type as R};
        let capabilities = [
            R::StageUnstageVolume,
            R::GetVolumeStats,
            R::ExpandVolume,
            R::VolumeCondition,
            R::SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(|t| pb::NodeServiceCapability {
            r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(pb::NodeGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn node_get_info(
        &self,
        _req: Request<pb::NodeGetInfoRequest>,
    ) -> Result<Response<pb::NodeGetInfoResponse>, Status> {
        let node = self.core.node_id().to_string();
        Ok(Response::new(pb::NodeGetInfoResponse {
            node_id: node.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(pb::Topology {
                segments: HashMap::from([(crate::TOPOLOGY_NODE_KEY.to_string(), node)]),
            }),
        }))
    }
}
