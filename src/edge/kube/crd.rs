//! The custom resources of group `terna.dev`: where a cluster keeps what
//! standalone keeps in files. `StoragePool` is a disk directory (or export)
//! that may hold replicas; `TernaVolume` is one volume: its request and
//! placement in `spec`, its health in `status`.
//!
//! Both are cluster-scoped: pools belong to nodes and volumes to
//! PersistentVolumes, neither to a namespace. `terna crds` prints them;
//! `deploy/crds/` holds that output and a test keeps the two equal.

// kube's derive takes one `printcolumn(type_ = ...)` per column, which
// clippy reads as a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use kube::CustomResource;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::core::class::Tier;

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "terna.dev",
    version = "v1alpha1",
    kind = "StoragePool",
    plural = "storagepools",
    shortname = "tpool",
    category = "terna",
    status = "StoragePoolStatus",
    doc = "A directory on a node's disk that may hold Terna replicas.",
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.node"),
    printcolumn(name = "Tier", type_ = "string", json_path = ".spec.tier"),
    printcolumn(name = "Zone", type_ = "string", json_path = ".status.zone"),
    printcolumn(name = "Capacity", type_ = "string", json_path = ".status.capacity"),
    printcolumn(name = "Allocated", type_ = "string", json_path = ".status.allocated"),
    printcolumn(name = "Health", type_ = "string", json_path = ".status.health"),
    printcolumn(
        name = "Write MiB/s",
        type_ = "number",
        json_path = ".status.measuredWriteMibPerSec"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct StoragePoolSpec {
    /// The node whose disk this is; its replica agent serves the pool.
    /// Empty for an NFS pool, which every node reaches directly.
    #[serde(default)]
    pub node: String,
    /// Directory on that node holding the replica files (local pools).
    #[serde(default)]
    pub path: String,
    /// An NFS export instead of a node's disk: replicas are files on it,
    /// reached by every node's engine through Terna's own NFSv3 client.
    /// Its failure domain defaults to the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nfs: Option<NfsPoolSpec>,
    pub tier: Tier,
    /// Failure domain label; replicas of one volume never share one.
    /// Defaults to the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Allocatable bytes = capacity × this (thin provisioning). Defaults to
    /// the controller's setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overcommit_ratio: Option<f64>,
    /// Caps the capacity below the filesystem's size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_bytes: Option<u64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NfsPoolSpec {
    /// Host name or IP address of the server.
    pub server: String,
    /// NFS port (default 2049).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// MOUNT port; absent asks the server's portmapper.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_port: Option<u16>,
    /// The exported path.
    pub export: String,
    /// Directory inside the export for this pool's replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subdir: Option<String>,
}

impl NfsPoolSpec {
    pub fn from_config(c: &crate::core::config::NfsPoolConfig) -> NfsPoolSpec {
        NfsPoolSpec {
            server: c.server.clone(),
            port: c.port,
            mount_port: c.mount_port,
            export: c.export.clone(),
            subdir: c.subdir.clone(),
        }
    }

    pub fn to_config(&self) -> crate::core::config::NfsPoolConfig {
        crate::core::config::NfsPoolConfig {
            server: self.server.clone(),
            port: self.port,
            mount_port: self.mount_port,
            export: self.export.clone(),
            subdir: self.subdir.clone(),
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoragePoolStatus {
    /// host:port of the node's replica agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(default)]
    pub capacity_bytes: u64,
    #[serde(default)]
    pub used_bytes: u64,
    /// Bytes promised to volumes (thin: not all of it is written).
    #[serde(default)]
    pub allocated_bytes: u64,
    /// Human-readable forms of the above, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated: Option<String>,
    /// The zone placement uses (the spec's, or "default").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Ready, or NotReady with `message` saying why.
    #[serde(default)]
    pub health: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Sequential bandwidth measured by the node when it began serving the
    /// pool (1 MiB direct I/O), MiB/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured_write_mib_per_sec: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured_read_mib_per_sec: Option<f64>,
    /// Last time the node confirmed the pool (RFC 3339); a node that stops
    /// confirming leaves its pools out of new placements.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat: Option<String>,
}

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "terna.dev",
    version = "v1alpha1",
    kind = "TernaVolume",
    plural = "ternavolumes",
    shortname = "tvol",
    category = "terna",
    status = "TernaVolumeStatus",
    doc = "One replicated Terna volume: what was asked for, where its replicas live, and how they are.",
    printcolumn(name = "Volume", type_ = "string", json_path = ".spec.volumeName"),
    printcolumn(name = "Size", type_ = "string", json_path = ".spec.size"),
    printcolumn(name = "Tier", type_ = "string", json_path = ".spec.tier"),
    printcolumn(
        name = "Replicas",
        type_ = "string",
        json_path = ".status.healthyReplicas"
    ),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(name = "Node", type_ = "string", json_path = ".status.stagedOn.node"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TernaVolumeSpec {
    /// The CSI volume name (for provisioned claims, the PV's name).
    pub volume_name: String,
    pub capacity_bytes: u64,
    /// Human-readable size, for `kubectl get`.
    #[serde(default)]
    pub size: String,
    /// The class parameters as given; the class is derived from them.
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    /// Derived from the parameters, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    pub replicas: Vec<ReplicaPlacement>,
    /// Nanoseconds since the epoch: the ListVolumes order.
    #[serde(default)]
    pub created_at_ns: u64,
    /// The claim this volume was provisioned for, "namespace/name/uid"; the
    /// provisioner removes volumes whose claim and PV are both gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaPlacement {
    pub pool: String,
    pub node: String,
    pub domain: String,
    pub zone: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TernaVolumeStatus {
    /// creating, ready or deleting.
    #[serde(default)]
    pub phase: String,
    /// healthy, degraded, rebuilding or faulted (no healthy replica).
    #[serde(default)]
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Bumped whenever the set of healthy replicas changes.
    #[serde(default)]
    pub generation: u64,
    /// "healthy/total", for `kubectl get`.
    #[serde(default)]
    pub healthy_replicas: String,
    /// One entry per `spec.replicas` entry, same order.
    #[serde(default)]
    pub replicas: Vec<ReplicaStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged_on: Option<StagedOnStatus>,
    /// Staging claims ever made; each claim's epoch is the count at the time.
    #[serde(default)]
    pub claims: u64,
    /// The write log: extents where the engine may have writes in flight,
    /// made to agree on every healthy replica before the next engine serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writing: Option<ExtentListStatus>,
    #[serde(default)]
    pub published: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    /// healthy, faulted (missed writes; catches up when back) or rebuilding
    /// (an empty replacement being filled in full).
    pub state: String,
    /// The generation from which a faulted replica missed writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub faulted_at_generation: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Seconds since the epoch when it faulted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_catch_up_bytes: Option<u64>,
    /// What a faulted replica missed, so any node catches it up on only
    /// that: absent when not known (then everything).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missed: Option<ExtentListStatus>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExtentListStatus {
    /// The size of each extent listed.
    pub extent_bytes: u64,
    /// The last claim epoch whose engine listed every extent it wrote.
    pub through_epoch: u64,
    /// Extent indexes as ranges, "0-3,17".
    pub extents: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StagedOnStatus {
    pub node: String,
    pub staging_path: String,
    /// The claim's epoch (see `claims`).
    #[serde(default)]
    pub epoch: u64,
    /// Held by background repair rather than a NodeStage.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub repair: bool,
    /// Made by a version whose engines list what faulted replicas miss.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lists_missed: bool,
}

/// The CRDs as YAML documents, in a stable order: what `terna crds` prints
/// and `deploy/crds/` holds.
pub fn crd_yaml() -> Result<Vec<(&'static str, String)>, serde_yaml::Error> {
    Ok(vec![
        (
            "storagepools.terna.dev.yaml",
            serde_yaml::to_string(&StoragePool::crd())?,
        ),
        (
            "ternavolumes.terna.dev.yaml",
            serde_yaml::to_string(&TernaVolume::crd())?,
        ),
    ])
}

/// Bytes for people: 1.5Gi, 300Mi.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["", "Ki", "Mi", "Gi", "Ti"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() == 0.0 || unit == 0 {
        format!("{value:.0}{}", UNITS[unit])
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_reads_well() {
        assert_eq!(human_bytes(0), "0");
        assert_eq!(human_bytes(1 << 20), "1Mi");
        assert_eq!(human_bytes(3 << 29), "1.5Gi");
        assert_eq!(human_bytes(300 << 20), "300Mi");
    }

    #[test]
    fn committed_crds_match_the_types() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/crds");
        for (file, yaml) in crd_yaml().unwrap() {
            let committed = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
            assert!(
                committed == yaml,
                "deploy/crds/{file} differs from the Rust types: run `terna crds --out deploy/crds`"
            );
        }
    }
}
