//! Kubernetes as the database: the `terna.dev` CRDs, the state store on
//! them, the provisioner and what the controller does while it leads, leader
//! election, node pool registration and liveness, the cluster token's
//! Secret, and the CLI's cluster report.

pub mod allocation;
pub mod backing;
pub mod capacity;
pub mod client;
pub mod cluster_ca;
pub mod cluster_report;
pub mod cluster_token;
pub mod crd;
pub mod engine_credentials;
pub mod expansion;
pub mod health_events;
pub mod leader;
pub mod leading;
pub mod node_lease;
pub mod pool_list;
pub mod pool_registration;
pub mod pools;
pub mod provisioner;
pub mod quantity;
pub mod store;
