//! The replica backends, each a `core::pool::Pool` with its `ReplicaIo`:
//! local files, another node's agent, an NFS export.

pub mod agent_fenced;
pub mod aligned;
pub mod conformance;
pub mod local;
pub mod nfs;
pub mod remote;
