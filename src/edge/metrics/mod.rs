//! `/metrics`, `/healthz` and `/readyz`: the HTTP server and what the
//! controller and the node report on it.

pub mod controller;
pub mod http;
pub mod node;
