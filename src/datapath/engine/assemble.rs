//! Builds a volume's engine on the store and pools its role hands over:
//! every replica opened (faulted ones with what they missed), and the
//! replacement hook. Shared by the engine process and offline repair.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tracing::warn;

use crate::core::config::Config;
use crate::core::controller::ControllerCore;
use crate::core::dirty::{DEFAULT_REGION, DirtyMap};
use crate::core::error::{Error, ErrorKind, Result};
use crate::core::extent_list::ExtentList;
use crate::core::pool::Pools;
use crate::core::pool::ReplicaIo;
use crate::core::store::StateStore;
use crate::core::volume::{ReplicaState, replica_file_name, unix_now};
use crate::datapath::dirty_maps::DirtyMapFiles;
use crate::datapath::engine::gate::{LeaseReader, WriteGate};
use crate::datapath::engine::{Engine, EngineOptions, EngineReplica, RebuildPolicy, Replacer};
use crate::datapath::host::files::FileStore;

type Opener = Box<dyn Fn() -> Result<Box<dyn ReplicaIo>> + Send + Sync>;

/// A faulted replica that could not be opened when the engine started (its
/// node away, its file gone): every call tries to open it again, so one
/// whose node comes back catches up on what it missed instead of waiting
/// out the grace period to be replaced and rebuilt in full.
struct Reopening {
    what: String,
    open: Opener,
    io: OnceLock<Box<dyn ReplicaIo>>,
}

impl Reopening {
    fn get(&self) -> std::io::Result<&dyn ReplicaIo> {
        if self.io.get().is_none() {
            let io = (self.open)()
                .map_err(|e| std::io::Error::other(format!("{}: {}", self.what, e.report())))?;
            // A racing caller may have opened it first; either copy serves.
            let _ = self.io.set(io);
        }
        self.io
            .get()
            .map(|io| io.as_ref())
            .ok_or_else(|| std::io::Error::other(self.what.clone()))
    }
}

impl ReplicaIo for Reopening {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.get()?.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.get()?.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.get()?.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.get()?.discard(offset, len)
    }
    fn check(&self) -> std::result::Result<(), String> {
        self.get().map_err(|e| e.to_string())?.check()
    }
    fn fence(&self) -> std::io::Result<()> {
        self.get()?.fence()
    }
    fn fence_empty(&self) -> std::io::Result<()> {
        self.get()?.fence_empty()
    }
}

fn reopening(pools: &Arc<Pools>, volume_id: &str, index: usize, pool: &str) -> Box<dyn ReplicaIo> {
    let (pools, name, pool_name) = (
        pools.clone(),
        replica_file_name(volume_id, index),
        pool.to_string(),
    );
    Box::new(Reopening {
        what: format!("replica {index} on pool {pool}"),
        open: Box::new(move || pools.get(&pool_name)?.backend.open(&name)),
        io: OnceLock::new(),
    })
}

/// What an engine is built on, handed over by the role that starts it: a
/// standalone's files and configured pools, or a cluster's TernaVolumes and
/// StoragePools. The engine never decides which.
#[derive(Clone)]
pub struct Backing {
    pub store: Arc<dyn StateStore>,
    pub pools: Arc<Pools>,
    /// The nodes' liveness Leases, where other nodes may take a volume
    /// over (a cluster); engines then write only through a `WriteGate`.
    pub leases: Option<Arc<dyn LeaseReader>>,
}

impl Backing {
    /// A standalone data dir's: the file store and the configured pools,
    /// other nodes' reached with `token` over `transport`.
    pub fn standalone(
        data_dir: &std::path::Path,
        node_id: &str,
        config: &Config,
        token: &[u8],
        transport: &crate::datapath::agent::transport::Transport,
    ) -> Result<Backing> {
        Ok(Backing {
            store: Arc::new(FileStore::open(&crate::core::data_dir::state_dir(
                data_dir,
            ))?),
            pools: Arc::new(crate::datapath::pools::from_config(
                config, data_dir, node_id, token, transport,
            )?),
            leases: None,
        })
    }
}

/// What a faulted replica missed: what this node's map says (it may be
/// from an earlier stay of the volume here) and what the record lists
/// (every holder since the fault); everything when the record keeps no
/// list.
fn missed_by(local: Option<DirtyMap>, listed: Option<&ExtentList>, size: u64) -> DirtyMap {
    let mut map = match local {
        Some(m) if m.region_size() == DEFAULT_REGION => m,
        _ => DirtyMap::new(size, DEFAULT_REGION),
    };
    map.resize(size);
    match listed {
        Some(listed) => listed.mark_into(&mut map),
        None => map.mark_all(),
    }
    map
}

/// `gate`: what the engine's writes wait at, kept by the caller from the
/// node's Lease; `None` only where no other node can take the volume over
/// while this engine runs.
pub fn assemble(
    data_dir: &std::path::Path,
    node_id: &str,
    volume_id: &str,
    io_threads: usize,
    config: &Config,
    backing: &Backing,
    gate: Option<Arc<WriteGate>>,
) -> Result<Arc<Engine>> {
    let (store, pools) = (backing.store.clone(), backing.pools.clone());
    let record = store
        .get(volume_id)?
        .ok_or_else(|| Error::not_found(format!("volume {volume_id} does not exist")))?;
    // Replicas are written under this node's claim on the volume, so once
    // another node takes it over, this engine's writes are fenced out.
    let claim = record.staged_on.clone().filter(|s| s.node == node_id);
    // This engine keeps the faulted replicas' lists of what they missed
    // from now on (one a claim before it did not keep is dropped first),
    // and the write log.
    let resume = |r: &mut crate::core::volume::VolumeRecord| {
        let lists = r.keep_missed_lists(claim.as_ref());
        r.resume_write_log(claim.as_ref()) | lists
    };
    let record = if resume(&mut record.clone()) {
        store
            .update(volume_id, &mut |r| {
                if claim.is_some() && r.staged_on != claim {
                    return Err(Error::precondition(format!(
                        "volume {volume_id} is no longer claimed by node {node_id}"
                    )));
                }
                Ok(resume(r))
            })?
            .ok_or_else(|| Error::not_found(format!("volume {volume_id} does not exist")))?
    } else {
        record
    };
    pools.act_under_claim(claim.as_ref().map_or(0, |s| s.epoch));
    let dirty_maps = DirtyMapFiles::new(data_dir).volume(volume_id);
    dirty_maps.create_dir()?;

    let mut replicas = Vec::new();
    for (index, replica) in record.replicas.iter().enumerate() {
        let opened = pools
            .get(&replica.pool)
            .and_then(|p| p.backend.open(&replica_file_name(volume_id, index)));
        if let ReplicaState::Faulted { since, .. } = &replica.state {
            // A faulted replica that is still there can catch up: on what
            // its dirty map says, or on everything when the map is lost. One
            // that cannot be opened stays in the engine as unreachable, so
            // it is replaced once its grace period is over.
            let io = opened.unwrap_or_else(|e| {
                warn!(volume_id, replica = index, error = %e.report(), "faulted replica cannot be opened yet");
                reopening(&pools, volume_id, index, &replica.pool)
            });
            let map = dirty_maps.load(index).unwrap_or_else(|e| {
                warn!(volume_id, replica = index, error = %e.report(), "dirty map unreadable; catching up on everything");
                None
            });
            let map = missed_by(map, replica.missed.as_ref(), record.capacity_bytes);
            let ago = Duration::from_secs(unix_now().saturating_sub(*since));
            replicas.push(EngineReplica {
                index,
                io,
                missed: Some(map),
                faulted_since: Instant::now().checked_sub(ago),
                listed: replica.missed.clone(),
            });
            continue;
        }
        match opened {
            Ok(io) => replicas.push(EngineReplica {
                index,
                io,
                missed: None,
                faulted_since: None,
                listed: None,
            }),
            Err(e) => {
                // Nothing has been written through this engine yet, so
                // recording the fault now is in time.
                warn!(volume_id, replica = index, error = %e.report(), "replica cannot be opened");
                // Only where the last engine may have had writes in flight
                // (its write log) can it differ from the others.
                let in_flight = record
                    .writing
                    .as_ref()
                    .map(|log| log.byte_runs(record.capacity_bytes))
                    .unwrap_or_default();
                let reason = format!("cannot open at engine start: {}", e.report());
                let faulted = store.update(volume_id, &mut |r| {
                    let mut changed = r.fault_replica(index, &reason);
                    for &(start, len) in &in_flight {
                        changed |= r.list_missed(index, start, len);
                    }
                    Ok(changed)
                })?;
                let mut map = DirtyMap::new(record.capacity_bytes, DEFAULT_REGION);
                for &(start, len) in &in_flight {
                    map.mark(start, len);
                }
                replicas.push(EngineReplica {
                    index,
                    io: reopening(&pools, volume_id, index, &replica.pool),
                    missed: Some(map),
                    faulted_since: None,
                    listed: faulted.and_then(|r| r.missed_of(index)),
                });
            }
        }
    }
    let healthy = replicas.iter().filter(|r| r.missed.is_none()).count();
    let min_healthy = usize::from(record.class.min_healthy);
    if healthy < min_healthy {
        return Err(Error::new(
            ErrorKind::Unavailable,
            format!(
                "volume {volume_id} has {healthy} usable replica(s), its class needs {min_healthy}"
            ),
        ));
    }
    let controller = Arc::new(ControllerCore::new(
        store.clone(),
        pools.clone(),
        config.overcommit_ratio,
    ));
    let replacer: Replacer = {
        let volume_id = volume_id.to_string();
        Box::new(move |index| {
            let pool = controller
                .replace_replica(&volume_id, index)
                .map_err(|e| std::io::Error::other(e.report().to_string()))?;
            pools
                .get(&pool)
                .and_then(|p| p.backend.open(&replica_file_name(&volume_id, index)))
                .map_err(|e| std::io::Error::other(e.report().to_string()))
        })
    };
    let engine = Engine::new(
        volume_id,
        record.capacity_bytes,
        replicas,
        store.clone(),
        EngineOptions {
            min_healthy,
            worker_threads: io_threads,
            dirty_dir: Some(dirty_maps.dir().to_path_buf()),
            rebuild: RebuildPolicy {
                replace_after: Duration::from_secs(config.replace_after_secs),
                bytes_per_sec: config.rebuild_mib_per_sec << 20,
                replacer: Some(replacer),
            },
            claim,
            gate,
            write_log: record.writing.clone(),
        },
    )
    .map_err(|e| Error::io("cannot start replica I/O threads", e))?;
    Ok(Arc::new(engine))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::pool::{Pool, PoolEntry};
    use crate::core::volume::{VolumeRecord, replica_file_name};
    use crate::datapath::frontend::BlockDevice;
    use crate::datapath::replica::local::LocalPool;

    const SIZE: u64 = 160 << 20;
    const MIB: u64 = 1 << 20;

    struct Cluster {
        _dirs: Vec<tempfile::TempDir>,
        pool_dirs: Vec<std::path::PathBuf>,
        /// One data dir per node: each has its own dirty maps.
        data: Vec<std::path::PathBuf>,
        backing: Backing,
        id: String,
    }

    fn cluster() -> Cluster {
        let dirs: Vec<tempfile::TempDir> = (0..6).map(|_| tempfile::tempdir().unwrap()).collect();
        let store = Arc::new(FileStore::open(dirs[0].path()).unwrap());
        let pool_dirs: Vec<_> = (1..4).map(|i| dirs[i].path().to_path_buf()).collect();
        let mut record: VolumeRecord = crate::core::volume::tests::record(3);
        record.capacity_bytes = SIZE;
        let id = record.id.clone();
        let entries = pool_dirs
            .iter()
            .enumerate()
            .map(|(i, dir)| {
                let pool = LocalPool::new(dir, None).unwrap();
                pool.create(&replica_file_name(&id, i), SIZE).unwrap();
                PoolEntry {
                    name: format!("p{i}"),
                    node: format!("n{i}"),
                    tier: crate::core::class::Tier::Standard,
                    domain: format!("d{i}"),
                    zone: "z".into(),
                    overcommit_ratio: None,
                    backend: Box::new(pool),
                }
            })
            .collect();
        store.put(&record).unwrap();
        Cluster {
            data: (4..6).map(|i| dirs[i].path().to_path_buf()).collect(),
            pool_dirs,
            _dirs: dirs,
            backing: Backing {
                store,
                pools: Arc::new(Pools::from_entries(entries)),
                leases: None,
            },
            id,
        }
    }

    impl Cluster {
        fn update(&self, change: impl Fn(&mut VolumeRecord)) {
            self.backing
                .store
                .update(&self.id, &mut |r| {
                    change(r);
                    Ok(true)
                })
                .unwrap();
        }

        /// Node `n` stages the volume (a new claim) and starts its engine.
        fn stage_on(&self, n: usize) -> Arc<Engine> {
            self.update(|r| r.claim_staging(&format!("node-{n}"), "/staging"));
            assemble(
                &self.data[n],
                &format!("node-{n}"),
                &self.id,
                2,
                &Config::default_node(),
                &self.backing,
                None,
            )
            .unwrap()
        }

        /// Replica `i` is recorded faulted: its node is away.
        fn away(&self, i: usize) {
            self.update(|r| {
                r.fault_replica(i, "its node is away");
            });
        }

        fn replica(&self, i: usize) -> Vec<u8> {
            std::fs::read(self.pool_dirs[i].join(replica_file_name(&self.id, i))).unwrap()
        }

        fn caught_up_bytes(&self, i: usize) -> Option<u64> {
            let r = self.backing.store.get(&self.id).unwrap().unwrap();
            assert!(r.replicas[i].is_healthy(), "replica {i} rejoined");
            r.replicas[i].last_catch_up_bytes
        }
    }

    fn write(engine: &Engine, offset: u64, byte: u8) {
        let mut block = crate::datapath::replica::aligned::AlignedBuf::zeroed(4096);
        block.as_mut_slice().fill(byte);
        engine.write_at(block.as_slice(), offset).unwrap();
        engine.flush().unwrap();
    }

    /// Replica 2 is away (recorded faulted) while node 0 writes one block,
    /// then node 1 takes the volume over: it has none of node 0's dirty
    /// maps, yet copies only the region written, from the record's list.
    #[test]
    fn a_takeover_catches_a_returning_replica_up_on_what_it_missed_only() {
        let c = cluster();
        c.away(2);
        let a = c.stage_on(0);
        write(&a, 5 * MIB + 8192, 0xa5);
        drop(a);
        let b = c.stage_on(1);
        let extent = crate::core::extent_list::MIN_EXTENT;
        assert_eq!(b.catch_up(), extent, "one extent, not the whole volume");
        assert_eq!(c.caught_up_bytes(2), Some(extent));
        assert!(c.replica(2) == c.replica(0), "replica 2 equals replica 0");
    }

    /// The volume leaves node 0 and comes back while replica 2 stays away:
    /// node 0's own map is from its first stay and lacks what node 1
    /// wrote; the record's list has it.
    #[test]
    fn a_volume_back_on_a_node_catches_up_on_what_other_nodes_wrote_meanwhile() {
        let c = cluster();
        let a = c.stage_on(0);
        let away = a.slots().into_iter().find(|s| s.index == 2).unwrap();
        a.fault(&away, "its node is away").unwrap();
        write(&a, 5 * MIB, 1);
        drop(a);
        assert!(
            DirtyMapFiles::new(&c.data[0])
                .load(&c.id, 2)
                .unwrap()
                .is_some(),
            "node 0 keeps its own map"
        );
        let b = c.stage_on(1);
        write(&b, 9 * MIB, 2);
        drop(b);
        let a = c.stage_on(0);
        // Node 0's extent (0..8 MiB) and node 1's (8..16 MiB).
        assert_eq!(a.catch_up(), 2 * crate::core::extent_list::MIN_EXTENT);
        assert!(c.replica(2) == c.replica(0), "replica 2 equals replica 0");
    }

    fn logged(c: &Cluster) -> Vec<u64> {
        let r = c.backing.store.get(&c.id).unwrap().unwrap();
        r.writing
            .map(|l| l.extents.into_iter().collect())
            .unwrap_or_default()
    }

    /// Writes at `offset` straight into replica `i`'s file: one that
    /// reached that replica alone before its engine died.
    fn land_on(c: &Cluster, i: usize, offset: u64, byte: u8) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(c.pool_dirs[i].join(replica_file_name(&c.id, i)))
            .unwrap();
        f.write_all_at(&[byte; 4096], offset).unwrap();
    }

    /// An engine killed with writes in flight: some reached one replica
    /// only. The next engine compares just the extents its log lists,
    /// and makes every replica agree there before it serves.
    #[test]
    fn the_next_engine_makes_replicas_agree_where_writes_were_in_flight() {
        let c = cluster();
        let a = c.stage_on(0);
        write(&a, 5 * MIB, 1);
        write(&a, 40 * MIB, 2);
        assert_eq!(logged(&c), vec![0, 5], "listed before they went out");
        drop(a);
        land_on(&c, 1, 5 * MIB + 4096, 0xee);
        land_on(&c, 2, 41 * MIB, 0xdd);
        // Somewhere no write was in flight: the log rightly leaves it be.
        land_on(&c, 1, 100 * MIB, 0xcc);
        let b = c.stage_on(0);
        b.start_resync().unwrap();
        // Until resynchronised, reads there all come from one replica.
        let mut block = crate::datapath::replica::aligned::AlignedBuf::zeroed(4096);
        for _ in 0..8 {
            b.read_at(block.as_mut_slice(), 41 * MIB).unwrap();
            assert!(
                block.as_slice().iter().all(|&x| x == 0),
                "read from replica 0"
            );
        }
        let done = b.resync_step();
        let extent = crate::core::extent_list::MIN_EXTENT;
        assert_eq!(done.compared, 2 * extent);
        assert_eq!(done.rewritten, 2 * MIB, "one chunk on each of two replicas");
        let (r0, r1, r2) = (c.replica(0), c.replica(1), c.replica(2));
        let upto = (100 * MIB) as usize;
        assert!(r0[..upto] == r1[..upto] && r0 == r2, "they agree");
        assert!(
            r0[upto..] != r1[upto..],
            "an unlisted extent is not compared"
        );
        assert_eq!(logged(&c), vec![0, 5], "listed until a sweep");
        b.sweep_write_log(Duration::ZERO);
        assert!(logged(&c).is_empty(), "nothing left to compare");
        // Idle, flushed extents leave the log; others stay.
        let mut block = crate::datapath::replica::aligned::AlignedBuf::zeroed(4096);
        block.as_mut_slice().fill(3);
        b.write_at(block.as_slice(), 70 * MIB).unwrap();
        assert_eq!(logged(&c), vec![8]);
        b.sweep_write_log(Duration::ZERO);
        assert_eq!(logged(&c), vec![8], "not flushed since");
        b.flush().unwrap();
        b.sweep_write_log(Duration::from_secs(3600));
        assert_eq!(logged(&c), vec![8], "not idle long enough");
        b.sweep_write_log(Duration::ZERO);
        assert!(logged(&c).is_empty());
    }

    /// A replica that cannot be opened when the next engine starts may
    /// have missed a write in flight: it counts the log's extents as
    /// missed, and catches up on just those once it is back.
    #[test]
    fn a_replica_away_when_the_next_engine_starts_misses_the_logged_extents() {
        let c = cluster();
        let a = c.stage_on(0);
        write(&a, 5 * MIB, 1);
        write(&a, 40 * MIB, 2);
        drop(a);
        let file = c.pool_dirs[2].join(replica_file_name(&c.id, 2));
        let aside = file.with_extension("aside");
        std::fs::rename(&file, &aside).unwrap();
        let b = c.stage_on(1);
        let r = c.backing.store.get(&c.id).unwrap().unwrap();
        assert!(!r.replicas[2].is_healthy());
        let missed = r.replicas[2].missed.clone().unwrap().extents;
        assert_eq!(missed, [0, 5].into());
        std::fs::rename(&aside, &file).unwrap();
        assert_eq!(b.catch_up(), 2 * crate::core::extent_list::MIN_EXTENT);
        assert!(c.replica(2) == c.replica(0));
    }

    /// Replicas faulted while extents are not agreed on yet count those as
    /// missed; when the replica reads came from faults, another takes over.
    #[test]
    fn a_replica_faulted_before_the_resync_misses_what_is_not_agreed_on() {
        let c = cluster();
        let a = c.stage_on(0);
        write(&a, 5 * MIB, 1);
        drop(a);
        land_on(&c, 1, 5 * MIB, 0xee);
        let b = c.stage_on(1);
        b.start_resync().unwrap();
        let source = b.unsynced_source(5 * MIB, 4096).unwrap();
        let slot = b.slots().into_iter().find(|s| s.index == source).unwrap();
        b.fault(&slot, "test").unwrap();
        let r = c.backing.store.get(&c.id).unwrap().unwrap();
        assert_eq!(
            r.replicas[source].missed.clone().unwrap().extents,
            [0].into()
        );
        let next = b.unsynced_source(5 * MIB, 4096).unwrap();
        assert_ne!(next, source);
        let mut block = crate::datapath::replica::aligned::AlignedBuf::zeroed(4096);
        b.read_at(block.as_mut_slice(), 5 * MIB).unwrap();
        assert_eq!(
            b.resync_step().compared,
            crate::core::extent_list::MIN_EXTENT
        );
        assert_eq!(b.catch_up(), crate::core::extent_list::MIN_EXTENT);
        assert!(c.replica(0) == c.replica(1) && c.replica(1) == c.replica(2));
    }

    /// The node holding the volume dies mid-write; another takes it over.
    /// The other two replicas are made to agree where the log says writes
    /// were in flight; the dead node's is copied whole (its engine may
    /// still write it), and what reached it alone is overwritten.
    #[test]
    fn a_takeover_makes_the_survivors_agree_and_rebuilds_the_dead_holders_replica() {
        let c = cluster();
        let on = |node: &str, data: usize| {
            assemble(
                &c.data[data],
                node,
                &c.id,
                2,
                &Config::default_node(),
                &c.backing,
                None,
            )
            .unwrap()
        };
        c.update(|r| {
            for (i, replica) in r.replicas.iter_mut().enumerate() {
                replica.node = format!("n{i}");
            }
            r.claim_staging("n0", "/staging");
        });
        let a = on("n0", 0);
        write(&a, 5 * MIB, 1);
        write(&a, 90 * MIB, 2);
        drop(a);
        land_on(&c, 0, 90 * MIB + 8192, 0xee);
        land_on(&c, 1, 5 * MIB, 0xdd);
        c.update(|r| {
            let dead = r.staged_on.clone().unwrap();
            r.take_over(&dead, "n1", "/staging");
        });
        let b = on("n1", 1);
        b.start_resync().unwrap();
        let done = b.resync_step();
        assert_eq!(done.rewritten, MIB, "replica 1 or 2 differed in one chunk");
        assert_eq!(done.compared, 2 * crate::core::extent_list::MIN_EXTENT);
        assert_eq!(b.catch_up(), SIZE, "the dead holder's replica, whole");
        assert!(c.replica(0) == c.replica(1) && c.replica(1) == c.replica(2));
    }

    /// Wraps a real pool: its replicas' writes fail once `left` runs out
    /// (a disk or link that dies mid-rebuild).
    struct Dying {
        pool: LocalPool,
        left: Arc<std::sync::atomic::AtomicI64>,
    }

    struct DyingReplica {
        io: Box<dyn ReplicaIo>,
        left: Arc<std::sync::atomic::AtomicI64>,
    }

    impl DyingReplica {
        fn spend(&self) -> std::io::Result<()> {
            if self.left.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) <= 0 {
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            Ok(())
        }
    }

    impl ReplicaIo for DyingReplica {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            self.io.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            self.spend()?;
            self.io.write_at(buf, offset)
        }
        fn flush(&self) -> std::io::Result<()> {
            self.io.flush()
        }
        fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
            self.spend()?;
            self.io.discard(offset, len)
        }
        fn check(&self) -> std::result::Result<(), String> {
            self.io.check()
        }
        fn fence(&self) -> std::io::Result<()> {
            self.io.fence()
        }
        fn fence_empty(&self) -> std::io::Result<()> {
            self.io.fence_empty()
        }
    }

    impl Pool for Dying {
        fn create(&self, name: &str, size: u64) -> Result<()> {
            self.pool.create(name, size)
        }
        fn grow(&self, name: &str, size: u64) -> Result<()> {
            self.pool.grow(name, size)
        }
        fn delete(&self, name: &str) -> Result<()> {
            self.pool.delete(name)
        }
        fn size_of(&self, name: &str) -> Result<Option<u64>> {
            self.pool.size_of(name)
        }
        fn open(&self, name: &str) -> Result<Box<dyn ReplicaIo>> {
            Ok(Box::new(DyingReplica {
                io: self.pool.open(name)?,
                left: self.left.clone(),
            }))
        }
        fn capacity(&self) -> Result<u64> {
            self.pool.capacity()
        }
    }

    /// A replacement whose rebuild dies two thirds of the way, then is
    /// finished by another node: that node copies only what was left.
    #[test]
    fn a_rebuild_interrupted_on_one_node_resumes_on_the_next() {
        let mut c = cluster();
        let left = Arc::new(std::sync::atomic::AtomicI64::new(i64::MAX));
        let mut entries: Vec<PoolEntry> = Vec::new();
        for (i, dir) in c.pool_dirs.iter().enumerate() {
            entries.push(PoolEntry {
                name: format!("p{i}"),
                node: format!("n{i}"),
                tier: crate::core::class::Tier::Standard,
                domain: format!("d{i}"),
                zone: "z".into(),
                overcommit_ratio: None,
                backend: Box::new(Dying {
                    pool: LocalPool::new(dir, None).unwrap(),
                    left: if i == 2 {
                        left.clone()
                    } else {
                        Arc::new(std::sync::atomic::AtomicI64::new(i64::MAX))
                    },
                }),
            });
        }
        c.backing.pools = Arc::new(Pools::from_entries(entries));
        let a = c.stage_on(0);
        for n in 0..64 {
            write(&a, n * MIB, n as u8 + 1);
        }
        drop(a);
        // Replica 2 is replaced (here, on its own pool: the only one left).
        ControllerCore::new(c.backing.store.clone(), c.backing.pools.clone(), 1.0)
            .replace_replica(&c.id, 2)
            .unwrap();
        let listed = |c: &Cluster| {
            let r = c.backing.store.get(&c.id).unwrap().unwrap();
            r.replicas[2].missed.clone().map(|m| m.extents.len())
        };
        assert_eq!(listed(&c), Some(20), "a replacement misses everything");
        left.store(100, std::sync::atomic::Ordering::SeqCst);
        let b = c.stage_on(1);
        assert_eq!(b.catch_up(), 0, "the rebuild dies before it finishes");
        drop(b);
        let after_first = listed(&c).unwrap();
        assert_eq!(after_first, 12, "progress recorded every 64 regions");
        left.store(i64::MAX, std::sync::atomic::Ordering::SeqCst);
        let a = c.stage_on(0);
        assert_eq!(a.catch_up(), 96 * MIB, "only what was left");
        assert!(c.replica(2) == c.replica(0), "replica 2 equals replica 0");
    }

    /// A claim whose engine kept no list (an older version's, or one that
    /// never started) breaks the chain: everything is copied.
    #[test]
    fn a_claim_that_kept_no_list_means_everything_is_copied() {
        let c = cluster();
        c.away(2);
        let a = c.stage_on(0);
        write(&a, 5 * MIB, 1);
        drop(a);
        c.update(|r| r.claim_staging("node-9", "/elsewhere"));
        let b = c.stage_on(1);
        assert_eq!(b.catch_up(), SIZE);
        assert!(c.replica(2) == c.replica(0), "replica 2 equals replica 0");
        let r = c.backing.store.get(&c.id).unwrap().unwrap();
        assert!(r.replicas[2].missed.is_none(), "healed: no list kept");
    }
}
