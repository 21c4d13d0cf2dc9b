//! What `terna pools`, `terna volumes` and `terna status --cluster` read:
//! the cluster's StoragePools, and its TernaVolumes as volume records.

use std::path::Path;

use kube::api::{Api, ListParams};

use crate::core::error::{Error, ErrorKind, Result};
use crate::core::volume::VolumeRecord;
use crate::edge::kube::crd::{StoragePool, TernaVolume};

pub struct ClusterReport {
    pub pools: Vec<StoragePool>,
    /// TernaVolumes that do not read as a record are left out.
    pub volumes: Vec<VolumeRecord>,
}

/// Lists both, through `kubeconfig` or the usual places.
pub async fn fetch(kubeconfig: Option<&Path>) -> Result<ClusterReport> {
    let client = crate::edge::kube::client::client(kubeconfig).await?;
    let unavailable = |what: &str, e: kube::Error| {
        Error::new(ErrorKind::Unavailable, format!("cannot list {what}: {e}"))
    };
    let pools: Api<StoragePool> = Api::all(client.clone());
    let volumes: Api<TernaVolume> = Api::all(client);
    let pools = pools
        .list(&ListParams::default())
        .await
        .map_err(|e| unavailable("StoragePools", e))?
        .items;
    let volumes = volumes
        .list(&ListParams::default())
        .await
        .map_err(|e| unavailable("TernaVolumes", e))?
        .items
        .iter()
        .filter_map(|v| crate::edge::kube::store::from_resource(v).ok())
        .collect();
    Ok(ClusterReport { pools, volumes })
}
