//! The data path: the engine and its FUSE frontend, the replica backends,
//! the replica agent's protocol and server, the node's host work (mounts,
//! filesystems, files) and background repair.

pub mod agent;
pub mod dirty_maps;
pub mod engine;
pub mod frontend;
pub mod host;
pub mod node;
pub mod pools;
pub mod repair;
pub mod replica;
