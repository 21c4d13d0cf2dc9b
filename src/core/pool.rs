//! Where replica bytes live, as the core sees it: a `Pool` creates, sizes
//! and deletes replicas; a `ReplicaIo` reads and writes one; `Pools` is the
//! set a process can reach, with the labels placement needs. The backends
//! are in `datapath::replica`.

use std::collections::BTreeMap;

use std::io;

use crate::core::class::Tier;
use crate::core::error::{Error, Result};

/// The longest pool name: a Kubernetes object name (StoragePools are named
/// `<node>-<pool>`), and never more than one path component.
pub const MAX_POOL_NAME: usize = 253;

/// Whether `name` is a replica file name as `volume::replica_file_name`
/// makes them: `tv-<24 lower-case hex digits>.r<index>.img`. Nothing else
/// is ever created, opened or deleted in a pool, so no caller can reach a
/// path outside it (`/`, `..`, NUL, or another file of the node).
pub fn is_replica_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("tv-") else {
        return false;
    };
    let Some((hex, rest)) = rest.split_at_checked(24) else {
        return false;
    };
    let Some(index) = rest.strip_prefix(".r").and_then(|r| r.strip_suffix(".img")) else {
        return false;
    };
    hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        && (1..=5).contains(&index.len())
        && index.bytes().all(|b| b.is_ascii_digit())
        && (index == "0" || !index.starts_with('0'))
}

/// `InvalidArgument` unless `name` is a replica file name (`is_replica_name`).
pub fn check_replica_name(name: &str) -> Result<()> {
    if is_replica_name(name) {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "replica name {} is not a replica file name (tv-<24 hex digits>.r<index>.img)",
            shown(name)
        )))
    }
}

/// `InvalidArgument` unless `name` can name a pool: 1 to 253 bytes of ASCII
/// letters, digits, `-`, `_` and `.`, and not `.` or `..` (a pool name is a
/// directory of claim floors on the agent's node).
pub fn check_pool_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_POOL_NAME
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "pool name {} must be 1 to {MAX_POOL_NAME} ASCII letters, digits, '-', '_' or '.', and not '.' or '..'",
            shown(name)
        )))
    }
}

/// A caller's name for an error message: escaped, and cut short so a 4 KiB
/// name does not become a 4 KiB log line.
fn shown(value: &str) -> String {
    const SHOWN: usize = 64;
    if value.len() <= SHOWN {
        return format!("{value:?}");
    }
    let mut end = SHOWN;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &value[..end], value.len())
}

/// One replica's data. Called from many threads at once.
pub trait ReplicaIo: Send + Sync {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Returns once the replica has the data (in its device cache at least;
    /// `flush` makes it durable).
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn flush(&self) -> io::Result<()>;
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Cheap liveness probe: `Err` says why the replica can no longer be trusted
    /// (its file was removed, its server is gone).
    fn check(&self) -> std::result::Result<(), String>;
    /// Makes sure no write issued before this call can still land, so what
    /// is copied afterwards is not overwritten by a late delivery.
    fn fence(&self) -> io::Result<()> {
        Ok(())
    }
    /// Fences, then empties the replica under a new file, for one about to
    /// be rebuilt in full: a writer still holding the old file (an engine
    /// on the replica's own node, frozen mid-write before a takeover) can
    /// then only write to a file nobody reads. Where no such writer can
    /// exist (this node's own files), fencing is enough.
    fn fence_empty(&self) -> io::Result<()> {
        self.fence()
    }
    /// The replica's file, opened with O_DIRECT, when it is local.
    fn direct_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// The replica's size, when the backend knows it without a round trip
    /// (a local file); `None` asks the pool instead.
    fn size(&self) -> Option<io::Result<u64>> {
        None
    }
}

/// A place replicas live: a directory on a disk, an agent, an NFS export.
pub trait Pool: Send + Sync {
    /// Creates a sparse replica of `size` bytes. Idempotent: an existing
    /// replica of that size is success.
    fn create(&self, name: &str, size: u64) -> Result<()>;
    /// Grows (never shrinks) the replica to `size` bytes.
    fn grow(&self, name: &str, size: u64) -> Result<()>;
    /// Deleting what is already gone is success.
    fn delete(&self, name: &str) -> Result<()>;
    /// `None` when the replica does not exist.
    fn size_of(&self, name: &str) -> Result<Option<u64>>;
    fn open(&self, name: &str) -> Result<Box<dyn ReplicaIo>>;
    /// Replaces the replica by an empty one of its size under a new file,
    /// so whoever still has the old one open writes to a file nobody reads.
    /// Pools that can swap atomically do; the fallback deletes and creates.
    fn recreate_empty(&self, name: &str) -> Result<()> {
        let size = self.size_of(name)?.ok_or_else(|| {
            crate::core::error::Error::not_found(format!("replica {name} does not exist"))
        })?;
        self.delete(name)?;
        self.create(name, size)
    }
    /// Total bytes of the storage behind the pool.
    fn capacity(&self) -> Result<u64>;
    /// Replicas opened from now on write under staging claim `epoch`, so a
    /// newer claim can fence them out (remote pools; a local pool is only
    /// ever written by its own node).
    fn act_under_claim(&self, _epoch: u64) {}
    /// Bytes the storage itself says are still free, where it is shared
    /// with others (an NFS export); `None` when only our accounting counts.
    fn available(&self) -> Option<Result<u64>> {
        None
    }
}

pub struct PoolEntry {
    pub name: String,
    pub node: String,
    pub tier: Tier,
    pub domain: String,
    pub zone: String,
    /// Overrides the controller's overcommit ratio for this pool.
    pub overcommit_ratio: Option<f64>,
    pub backend: Box<dyn Pool>,
}

pub struct Pools {
    entries: BTreeMap<String, PoolEntry>,
}

/// The node an NFS pool is recorded on: its server, which is also its
/// failure domain unless the admin names another.
pub fn nfs_node(server: &str) -> String {
    format!("nfs:{server}")
}

impl Pools {
    pub fn from_entries(entries: Vec<PoolEntry>) -> Pools {
        Pools {
            entries: entries.into_iter().map(|e| (e.name.clone(), e)).collect(),
        }
    }

    pub fn get(&self, name: &str) -> Result<&PoolEntry> {
        self.entries.get(name).ok_or_else(|| {
            Error::precondition(format!(
                "pool {name:?} is not configured on this node (known: {})",
                self.entries.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = &PoolEntry> {
        self.entries.values()
    }

    /// Every replica write through these pools acts under claim `epoch`.
    pub fn act_under_claim(&self, epoch: u64) {
        for e in self.entries.values() {
            e.backend.act_under_claim(epoch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_replica_file_names_and_plain_pool_names_pass() {
        let id = crate::core::volume::volume_id_for("x");
        for index in [0, 1, 2, 17, 99999] {
            let name = crate::core::volume::replica_file_name(&id, index);
            assert!(is_replica_name(&name), "{name}");
            check_replica_name(&name).unwrap();
        }
        let long = "a".repeat(4096);
        for bad in [
            "",
            ".",
            "..",
            "../../etc/passwd",
            "/etc/passwd",
            "a/b",
            "x",
            "tv-0123456789abcdef01234567.r0.img\0",
            "tv-0123456789abcdef01234567.r0.img\0x",
            "tv-0123456789ABCDEF01234567.r0.img",
            "tv-0123456789abcdef0123456.r0.img",
            "tv-0123456789abcdef012345678.r0.img",
            "tv-0123456789abcdef01234567.r.img",
            "tv-0123456789abcdef01234567.r01.img",
            "tv-0123456789abcdef01234567.r123456.img",
            "tv-0123456789abcdef01234567.r0.img/..",
            "tv-0123456789abcdef01234567.r0.img.claim",
            "tv-0123456789abcdef01234567.r-1.img",
            "tv-0123456789abcdef0123456é.r0.img",
            long.as_str(),
        ] {
            assert!(!is_replica_name(bad), "{bad:?}");
            let err = check_replica_name(bad).unwrap_err();
            assert_eq!(err.kind, crate::core::error::ErrorKind::InvalidArgument);
            assert!(err.message.len() < 300, "{}", err.message);
        }
        for good in ["p", "disk-1", "node-a-fast", "a.b_c"] {
            check_pool_name(good).unwrap();
        }
        for bad in ["", ".", "..", "a/b", "/", "a\0", "é", long.as_str()] {
            assert!(check_pool_name(bad).is_err(), "{bad:?}");
        }
    }
}
