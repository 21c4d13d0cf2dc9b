//! Terna: a CSI driver and dynamic provisioner whose volumes are
//! synchronously replicated across failure domains. See ARCHITECTURE.md.

pub mod agent;
pub mod capability;
pub mod class;
pub mod cluster;
pub mod config;
pub mod controller;
pub mod csi;
pub mod data_dir;
pub mod dirty;
pub mod engine;
pub mod error;
pub mod frontend;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod node;
pub mod placement;
pub mod pools;
pub mod repair;
pub mod replica;
pub mod report;
pub mod shutdown;
pub mod standalone;
pub mod store;
pub mod volume;

pub mod proto {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    pub mod csi {
        tonic::include_proto!("csi.v1");
    }
    pub mod pluginregistration {
        tonic::include_proto!("pluginregistration");
    }
}

/// CSI driver name, as in the CSIDriver object and StorageClass provisioner.
pub const DRIVER_NAME: &str = "csi.terna.dev";
/// Topology key carrying the node id.
pub const TOPOLOGY_NODE_KEY: &str = "topology.terna.dev/node";
