//! Kubernetes as the database: the `terna.dev` CRDs, the state store on
//! them, the provisioner, leader election and node pool registration.

pub mod backing;
pub mod capacity;
pub mod client;
pub mod crd;
pub mod health_events;
pub mod leader;
pub mod pools;
pub mod provisioner;
pub mod quantity;
pub mod store;
