//! What the node's host provides: mounts, filesystems, the signals that
//! stop a process, and pool throughput probes.

pub mod filesystem;
pub mod mounts;
pub mod probe;
pub mod shutdown;
