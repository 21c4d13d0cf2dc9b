//! Terna: a CSI driver and dynamic provisioner whose volumes are
//! synchronously replicated across failure domains. See ARCHITECTURE.md.

pub mod core;
pub mod datapath;
pub mod edge;
pub mod roles;

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
