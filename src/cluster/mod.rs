//! Kubernetes as the database: the `terna.dev` CRDs, the state store on
//! them, the provisioner, leader election and node pool registration.

pub mod backing;
pub mod capacity;
pub mod client;
pub mod controller;
pub mod crd;
pub mod health_events;
pub mod leader;
pub mod metrics;
pub mod node;
pub mod pools;
pub mod probe;
pub mod provisioner;
pub mod quantity;
pub mod registration;
pub mod store;
