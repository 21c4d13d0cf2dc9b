//! What the node's host provides: mounts, filesystems, who holds a device, the signals that
//! stop a process, child processes, private files, the data dir's owner,
//! `terna.toml` on disk, pool throughput probes, and the hostname.

#[forbid(unsafe_code)]
pub mod cgroup;
#[forbid(unsafe_code)]
pub mod config_file;
#[forbid(unsafe_code)]
pub mod files;
#[forbid(unsafe_code)]
pub mod filesystem;
#[forbid(unsafe_code)]
pub mod holders;
#[forbid(unsafe_code)]
pub mod hostname;
#[forbid(unsafe_code)]
pub mod lock;
#[forbid(unsafe_code)]
pub mod mounts;
#[forbid(unsafe_code)]
pub mod probe;
pub mod process;
#[forbid(unsafe_code)]
pub mod shutdown;
