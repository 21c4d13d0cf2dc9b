//! What the node's host provides: mounts, filesystems, the signals that
//! stop a process, child processes, private files, the data dir's owner,
//! `terna.toml` on disk, pool throughput probes, and the hostname.

pub mod config_file;
pub mod files;
pub mod filesystem;
pub mod hostname;
pub mod lock;
pub mod mounts;
pub mod probe;
pub mod process;
pub mod shutdown;
