//! The data path: the engine and its FUSE frontend, the replica backends,
//! the replica agent's protocol and server, the node's host work (mounts,
//! filesystems, files), background repair, and the TLS that agent
//! connections are made under.

// unsafe is for the calls into the kernel that need it; a module without
// such calls forbids it, so one does not slip in unreviewed.
#[forbid(unsafe_code)]
pub mod agent;
#[forbid(unsafe_code)]
pub mod dirty_maps;
pub mod engine;
pub mod frontend;
pub mod host;
#[forbid(unsafe_code)]
pub mod node;
#[forbid(unsafe_code)]
pub mod pools;
#[forbid(unsafe_code)]
pub mod repair;
#[forbid(unsafe_code)]
pub mod replica;
#[forbid(unsafe_code)]
pub mod tls;
