//! The core: what a volume, a class and a placement are, the traits every
//! store and pool implements, the data-dir layout and the controller's
//! decisions. Pure, or I/O only through its traits (ARCHITECTURE.md,
//! Architecture Invariant).
#![forbid(unsafe_code)]

pub mod capability;
pub mod class;
pub mod config;
pub mod controller;
pub mod data_dir;
pub mod dirty;
pub mod error;
pub mod extent_list;
pub mod lease;
pub mod metrics;
pub mod placement;
pub mod pool;
pub mod store;
pub mod volume;
