//! Where replica bytes live, as the core sees it: a `Pool` creates, sizes
//! and deletes replicas; a `ReplicaIo` reads and writes one; `Pools` is the
//! set a process can reach, with the labels placement needs. The backends
//! are in `datapath::replica`.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

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
    entries: RwLock<BTreeMap<String, Arc<PoolEntry>>>,
    /// The staging claim replicas opened through these pools write under.
    epoch: AtomicU64,
    rediscovery: Option<Rediscovery>,
}

/// Where a process that outlives the pool set it started with (an engine
/// serving for days) finds pools that were not usable then: a node that
/// was away when a volume moved comes back, and its replicas must catch
/// up rather than be given up.
pub trait PoolSource: Send + Sync {
    /// The pools usable now.
    fn usable(&self) -> Result<Vec<PoolEntry>>;
}

struct Rediscovery {
    source: Box<dyn PoolSource>,
    /// A name nobody knows is asked about every check: the source (an
    /// API server) is asked at most this often.
    every: Duration,
    last: Mutex<Option<Instant>>,
}

/// The node an NFS pool is recorded on: its server, which is also its
/// failure domain unless the admin names another.
pub fn nfs_node(server: &str) -> String {
    format!("nfs:{server}")
}

impl Pools {
    pub fn from_entries(entries: Vec<PoolEntry>) -> Pools {
        Pools {
            entries: RwLock::new(
                entries
                    .into_iter()
                    .map(|e| (e.name.clone(), Arc::new(e)))
                    .collect(),
            ),
            epoch: AtomicU64::new(0),
            rediscovery: None,
        }
    }

    /// Pools asked for by a name this set lacks are looked for in `source`,
    /// at most once per `every`.
    pub fn rediscovering(mut self, source: Box<dyn PoolSource>, every: Duration) -> Pools {
        self.rediscovery = Some(Rediscovery {
            source,
            every,
            last: Mutex::new(None),
        });
        self
    }

    fn entries(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<PoolEntry>>> {
        self.entries.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, name: &str) -> Result<Arc<PoolEntry>> {
        if let Some(e) = self.entries().get(name) {
            return Ok(e.clone());
        }
        self.rediscover();
        self.entries().get(name).cloned().ok_or_else(|| {
            Error::precondition(format!(
                "pool {name:?} is not configured on this node (known: {})",
                self.entries()
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }

    /// Adds the source's pools this set lacks. Those it has are kept as
    /// they are, with their connections and replicas open on them.
    fn rediscover(&self) {
        let Some(r) = &self.rediscovery else {
            return;
        };
        {
            let mut last = r.last.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < r.every) {
                return;
            }
            *last = Some(Instant::now());
        }
        let found = match r.source.usable() {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %e.report(), "cannot look for pools again");
                return;
            }
        };
        // Under the write lock, so a claim taken meanwhile reaches these too.
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        let epoch = self.epoch.load(Ordering::SeqCst);
        for e in found {
            if !entries.contains_key(&e.name) {
                e.backend.act_under_claim(epoch);
                tracing::info!(pool = %e.name, node = %e.node, "pool usable again");
                entries.insert(e.name.clone(), Arc::new(e));
            }
        }
    }

    /// Every pool, in name order.
    pub fn all(&self) -> Vec<Arc<PoolEntry>> {
        self.entries().values().cloned().collect()
    }

    /// Every replica write through these pools acts under claim `epoch`,
    /// also through pools found later.
    pub fn act_under_claim(&self, epoch: u64) {
        let entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        self.epoch.store(epoch, Ordering::SeqCst);
        for e in entries.values() {
            e.backend.act_under_claim(epoch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A pool that only remembers the claim it was told to act under.
    struct Labelled {
        claim: Arc<AtomicU64>,
    }

    impl Pool for Labelled {
        fn create(&self, _: &str, _: u64) -> Result<()> {
            Ok(())
        }
        fn grow(&self, _: &str, _: u64) -> Result<()> {
            Ok(())
        }
        fn delete(&self, _: &str) -> Result<()> {
            Ok(())
        }
        fn size_of(&self, _: &str) -> Result<Option<u64>> {
            Ok(None)
        }
        fn open(&self, name: &str) -> Result<Box<dyn ReplicaIo>> {
            Err(Error::not_found(name))
        }
        fn capacity(&self) -> Result<u64> {
            Ok(0)
        }
        fn act_under_claim(&self, epoch: u64) {
            self.claim.store(epoch, Ordering::SeqCst);
        }
    }

    fn entry(name: &str, claim: &Arc<AtomicU64>) -> PoolEntry {
        PoolEntry {
            name: name.into(),
            node: format!("node-of-{name}"),
            tier: Tier::Standard,
            domain: name.into(),
            zone: "default".into(),
            overcommit_ratio: None,
            backend: Box::new(Labelled {
                claim: claim.clone(),
            }),
        }
    }

    /// A node that comes back: its pool is listed from the `back`th ask on.
    struct Returning {
        asked: Arc<AtomicUsize>,
        back: usize,
        claim: Arc<AtomicU64>,
    }

    impl PoolSource for Returning {
        fn usable(&self) -> Result<Vec<PoolEntry>> {
            let n = self.asked.fetch_add(1, Ordering::SeqCst) + 1;
            let mut found = vec![entry("a", &Arc::new(AtomicU64::new(99)))];
            if n >= self.back {
                found.push(entry("b", &self.claim));
            }
            Ok(found)
        }
    }

    #[test]
    fn a_pool_missing_at_start_is_found_once_its_node_is_back_and_acts_under_the_claim() {
        let (asked, a_claim, b_claim) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let source = Returning {
            asked: asked.clone(),
            back: 2,
            claim: b_claim.clone(),
        };
        let pools = Pools::from_entries(vec![entry("a", &a_claim)])
            .rediscovering(Box::new(source), Duration::from_millis(200));
        pools.act_under_claim(7);
        assert_eq!(a_claim.load(Ordering::SeqCst), 7);
        // Known pools never ask the source.
        pools.get("a").unwrap();
        assert_eq!(asked.load(Ordering::SeqCst), 0);
        // The node is still away: asked once, then not again for a while,
        // however often the engine looks.
        let err = pools.get("b").err().unwrap();
        assert!(err.message.contains("\"b\""), "{}", err.message);
        for _ in 0..50 {
            assert!(pools.get("b").is_err());
        }
        assert_eq!(asked.load(Ordering::SeqCst), 1);
        std::thread::sleep(Duration::from_millis(250));
        let b = pools.get("b").unwrap();
        assert_eq!(b.node, "node-of-b");
        assert_eq!(asked.load(Ordering::SeqCst), 2);
        assert_eq!(b_claim.load(Ordering::SeqCst), 7, "found under the claim");
        // The pool already held was kept, not swapped for the listed copy.
        assert_eq!(a_claim.load(Ordering::SeqCst), 7);
        pools.act_under_claim(8);
        assert_eq!(b_claim.load(Ordering::SeqCst), 8);
        assert_eq!(
            pools
                .all()
                .iter()
                .map(|p| p.name.clone())
                .collect::<Vec<_>>(),
            vec!["a", "b"]
        );
    }

    #[test]
    fn without_a_source_a_missing_pool_is_an_error_naming_the_known_ones() {
        let pools = Pools::from_entries(vec![entry("a", &Arc::new(AtomicU64::new(0)))]);
        let err = pools.get("zz").err().unwrap();
        assert_eq!(err.kind, crate::core::error::ErrorKind::FailedPrecondition);
        assert!(err.message.contains("known: a"), "{}", err.message);
    }

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
