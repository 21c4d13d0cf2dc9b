//! The roles `terna` runs as: each wires the layers below for one job and
//! none imports another.
#![forbid(unsafe_code)]

pub mod agent;
pub mod ca;
pub mod controller;
pub mod engine;
pub mod node;
pub mod report;
pub mod standalone;
