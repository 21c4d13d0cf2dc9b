use super::*;
use crate::core::volume::{ReplicaState, VolumeRecord};
use crate::datapath::host::files::FileStore;
use std::sync::atomic::{AtomicBool, AtomicUsize};

/// A replica in memory whose failures the test switches on.
#[derive(Clone)]
struct MemReplica {
    data: Arc<Mutex<Vec<u8>>>,
    fail: Arc<AtomicBool>,
    gone: Arc<AtomicBool>,
    reads: Arc<AtomicUsize>,
    /// A file standing for the replica's own, so that the engine takes it
    /// for a local one the kernel may read directly (passthrough).
    direct: Option<Arc<std::fs::File>>,
}

impl MemReplica {
    fn new(size: usize) -> MemReplica {
        MemReplica {
            data: Arc::new(Mutex::new(vec![0; size])),
            fail: Arc::new(AtomicBool::new(false)),
            gone: Arc::new(AtomicBool::new(false)),
            reads: Arc::new(AtomicUsize::new(0)),
            direct: None,
        }
    }
    fn err(&self) -> io::Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            Err(io::Error::from_raw_os_error(libc::EIO))
        } else {
            Ok(())
        }
    }
}

impl ReplicaIo for MemReplica {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.err()?;
        self.reads.fetch_add(1, Ordering::SeqCst);
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.err()?;
        let mut d = self.data.lock().unwrap();
        d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.err()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.err()?;
        let mut d = self.data.lock().unwrap();
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn check(&self) -> Result<(), String> {
        if self.gone.load(Ordering::SeqCst) {
            Err("gone".into())
        } else {
            Ok(())
        }
    }
    fn direct_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.direct.as_ref().map(|f| f.as_raw_fd())
    }
}

const SIZE: usize = 1 << 20;

fn setup(
    n: usize,
    min_healthy: usize,
) -> (tempfile::TempDir, Arc<FileStore>, Vec<MemReplica>, Engine) {
    setup_with((0..n).map(|_| MemReplica::new(SIZE)).collect(), min_healthy)
}

fn setup_with(
    mems: Vec<MemReplica>,
    min_healthy: usize,
) -> (tempfile::TempDir, Arc<FileStore>, Vec<MemReplica>, Engine) {
    let n = mems.len();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FileStore::open(dir.path()).unwrap());
    let mut rec: VolumeRecord = crate::core::volume::tests::record(n);
    rec.id = "tv-test".into();
    store.put(&rec).unwrap();
    let replicas = mems
        .iter()
        .enumerate()
        .map(|(index, m)| EngineReplica {
            index,
            io: Box::new(m.clone()),
            missed: None,
            faulted_since: None,
            listed: None,
        })
        .collect();
    let engine = Engine::new(
        "tv-test",
        SIZE as u64,
        replicas,
        store.clone(),
        EngineOptions {
            min_healthy,
            worker_threads: 4,
            dirty_dir: None,
            rebuild: RebuildPolicy::default(),
            claim: None,
            gate: None,
            write_log: None,
        },
    )
    .unwrap();
    (dir, store, mems, engine)
}

const BIG: usize = 8 << 20;

type BigSetup = (
    tempfile::TempDir,
    Arc<FileStore>,
    Vec<MemReplica>,
    Arc<Engine>,
);

/// Like `setup`, with 8 regions and dirty maps persisted under `run/`.
fn setup_big(n: usize) -> BigSetup {
    setup_big_with(n, RebuildPolicy::default())
}

fn setup_big_with(n: usize, policy: RebuildPolicy) -> BigSetup {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FileStore::open(dir.path()).unwrap());
    let mut rec: VolumeRecord = crate::core::volume::tests::record(n);
    rec.id = "tv-test".into();
    rec.capacity_bytes = BIG as u64;
    store.put(&rec).unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let mems: Vec<MemReplica> = (0..n).map(|_| MemReplica::new(BIG)).collect();
    let replicas = mems
        .iter()
        .enumerate()
        .map(|(index, m)| EngineReplica {
            index,
            io: Box::new(m.clone()),
            missed: None,
            faulted_since: None,
            listed: None,
        })
        .collect();
    let engine = Engine::new(
        "tv-test",
        BIG as u64,
        replicas,
        store.clone(),
        EngineOptions {
            min_healthy: 1,
            worker_threads: 4,
            dirty_dir: Some(run),
            rebuild: policy,
            claim: None,
            gate: None,
            write_log: None,
        },
    )
    .unwrap();
    (dir, store, mems, Arc::new(engine))
}

#[test]
fn returning_replica_catches_up_on_exactly_what_it_missed() {
    let (dir, store, mems, e) = setup_big(3);
    e.write_at(&[1u8; 4096], 0).unwrap();
    mems[1].fail.store(true, Ordering::SeqCst);
    e.write_at(&[2u8; 4096], 2 << 20).unwrap();
    e.write_at(&[3u8; 8192], (5 << 20) + 4096).unwrap();
    e.write_at(&[4u8; 10], (5 << 20) + 100).unwrap();
    // The map on disk already covers every acknowledged write it missed.
    let map = crate::core::dirty::DirtyMap::decode(
        &std::fs::read(dir.path().join("run/dirty-1.map")).unwrap(),
    )
    .unwrap();
    assert_eq!(map.dirty_regions().collect::<Vec<_>>(), [2, 5]);
    // Still unreachable: nothing happens.
    mems[1].gone.store(true, Ordering::SeqCst);
    assert_eq!(e.catch_up(), 0);
    assert_eq!(e.healthy_count(), 2);
    // Back: exactly the two dirty regions are copied.
    mems[1].gone.store(false, Ordering::SeqCst);
    mems[1].fail.store(false, Ordering::SeqCst);
    assert_eq!(e.catch_up(), 2 << 20);
    assert_eq!(e.healthy_count(), 3);
    assert!(*mems[1].data.lock().unwrap() == *mems[0].data.lock().unwrap());
    let rec = store.get("tv-test").unwrap().unwrap();
    assert!(rec.replicas[1].is_healthy());
    assert_eq!(rec.replicas[1].last_catch_up_bytes, Some(2 << 20));
    assert!(!dir.path().join("run/dirty-1.map").exists());
    // It takes writes again.
    e.write_at(&[9u8; 4096], 0).unwrap();
    assert_eq!(mems[1].data.lock().unwrap()[0], 9);
}

#[test]
fn catch_up_under_concurrent_writes_converges_to_identical_replicas() {
    let (_dir, _store, mems, e) = setup_big(3);
    mems[2].fail.store(true, Ordering::SeqCst);
    for i in 0..8u64 {
        e.write_at(&[i as u8 + 1; 4096], i << 20).unwrap();
    }
    mems[2].fail.store(false, Ordering::SeqCst);
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3u64)
        .map(|t| {
            let e = e.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = t * 7919 + 1;
                while !stop.load(Ordering::SeqCst) {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    // Each writer owns every third block: overlapping
                    // concurrent writes have no defined order on any device.
                    let block = (x >> 33) % (BIG as u64 / 4096 / 3) * 3 + t;
                    let off = block * 4096;
                    e.write_at(&[(x >> 20) as u8; 4096], off).unwrap();
                }
            })
        })
        .collect();
    let mut copied = 0;
    while e.healthy_count() < 3 {
        copied += e.catch_up();
    }
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }
    assert!(copied >= 8 << 20);
    let a = mems[0].data.lock().unwrap().clone();
    assert!(*mems[1].data.lock().unwrap() == a);
    assert!(
        *mems[2].data.lock().unwrap() == a,
        "caught-up replica diverged"
    );
}

#[test]
fn writes_reach_every_replica_and_read_back() {
    let (_d, _s, mems, e) = setup(3, 1);
    e.write_at(&[7u8; 5000], 100).unwrap();
    e.flush().unwrap();
    for m in &mems {
        assert!(m.data.lock().unwrap()[100..5100].iter().all(|&b| b == 7));
    }
    let mut back = vec![0u8; 5000];
    e.read_at(&mut back, 100).unwrap();
    assert!(back.iter().all(|&b| b == 7));
    e.discard(0, 4096).unwrap();
    for m in &mems {
        assert!(m.data.lock().unwrap()[100..4096].iter().all(|&b| b == 0));
    }
}

#[test]
fn out_of_range_io_is_einval() {
    let (_d, _s, _m, e) = setup(1, 1);
    let err = e.write_at(&[1], SIZE as u64).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    let mut b = [0u8; 2];
    assert!(e.read_at(&mut b, u64::MAX).is_err());
}

#[test]
fn failed_replica_is_recorded_before_the_write_is_acknowledged() {
    let (_d, store, mems, e) = setup(3, 1);
    mems[1].fail.store(true, Ordering::SeqCst);
    e.write_at(&[9u8; 4096], 0).unwrap();
    // The acknowledged write's missing replica is already faulted on disk.
    let rec = store.get("tv-test").unwrap().unwrap();
    assert!(matches!(
        rec.replicas[1].state,
        ReplicaState::Faulted { generation: 2, .. }
    ));
    assert!(rec.replicas[0].is_healthy() && rec.replicas[2].is_healthy());
    assert_eq!(e.healthy_count(), 2);
    // A returning replica is not used again: its reads never happen.
    mems[1].fail.store(false, Ordering::SeqCst);
    let before = mems[1].reads.load(Ordering::SeqCst);
    for _ in 0..20 {
        let mut b = [0u8; 4096];
        e.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [9u8; 4096]);
    }
    assert_eq!(mems[1].reads.load(Ordering::SeqCst), before);
    e.write_at(&[3u8; 10], 0).unwrap();
    assert_eq!(
        mems[1].data.lock().unwrap()[0],
        0,
        "a faulted replica gets no more writes"
    );
}

#[test]
fn reads_fall_over_to_another_replica() {
    let (_d, store, mems, e) = setup(2, 1);
    e.write_at(&[4u8; 512], 0).unwrap();
    mems[0].fail.store(true, Ordering::SeqCst);
    mems[1].fail.store(false, Ordering::SeqCst);
    for _ in 0..4 {
        let mut b = [0u8; 512];
        e.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [4u8; 512]);
    }
    let rec = store.get("tv-test").unwrap().unwrap();
    assert_eq!(rec.healthy_count(), 1);
}

#[test]
fn each_region_is_read_from_one_replica_and_regions_spread_over_all() {
    let (_d, _s, mems, e) = setup_big(3);
    let reads = |m: &MemReplica| m.reads.load(Ordering::SeqCst);
    let mut b = [0u8; 4096];
    for region in 0..(BIG as u64 / READ_REGION) {
        let before: Vec<usize> = mems.iter().map(reads).collect();
        for i in 0..16 {
            e.read_at(&mut b, region * READ_REGION + i * 4096).unwrap();
        }
        let served: Vec<usize> = mems
            .iter()
            .zip(&before)
            .map(|(m, b)| reads(m) - b)
            .collect();
        assert!(served.contains(&16), "region {region}: {served:?}");
    }
    // 8 regions over 3 equally fast replicas: 3, 3 and 2 regions each.
    let mut per: Vec<usize> = mems.iter().map(|m| reads(m) / 16).collect();
    per.sort();
    assert_eq!(per, [2, 3, 3]);
}

#[test]
fn too_few_healthy_replicas_fail_the_write() {
    let (_d, _s, mems, e) = setup(3, 2);
    mems[0].fail.store(true, Ordering::SeqCst);
    mems[2].fail.store(true, Ordering::SeqCst);
    assert!(e.write_at(&[1u8; 512], 0).is_err());
    assert!(e.write_at(&[1u8; 512], 0).is_err());
}

#[test]
fn a_fault_that_cannot_be_recorded_fails_the_write() {
    let (dir, _s, mems, e) = setup(3, 1);
    // The record vanishes: persisting the fault is impossible... but update
    // of a missing record is a no-op, so break the store instead.
    std::fs::remove_dir_all(dir.path()).unwrap();
    mems[0].fail.store(true, Ordering::SeqCst);
    assert!(e.write_at(&[1u8; 512], 0).is_err());
    assert_eq!(
        e.healthy_count(),
        3,
        "an unrecorded fault keeps the replica in use"
    );
}

#[test]
fn check_replicas_faults_a_removed_replica() {
    let (_d, store, mems, e) = setup(3, 1);
    mems[2].gone.store(true, Ordering::SeqCst);
    e.check_replicas();
    assert_eq!(e.healthy_count(), 2);
    let rec = store.get("tv-test").unwrap().unwrap();
    assert!(rec.degradation().unwrap().contains("gone"));
}

#[test]
fn the_check_faults_a_passthrough_replica_whose_disk_fails_reads() {
    let file = tempfile::tempfile().unwrap();
    let mut only = MemReplica::new(SIZE);
    only.direct = Some(Arc::new(file));
    let (_d, store, mems, e) = setup_with(vec![only], 1);
    assert!(e.passthrough_fd().is_some());
    e.check_replicas();
    assert_eq!(e.healthy_count(), 1);
    assert!(mems[0].reads.load(Ordering::SeqCst) >= 2, "the check reads");
    mems[0].fail.store(true, Ordering::SeqCst);
    e.check_replicas();
    assert_eq!(e.healthy_count(), 0);
    let rec = store.get("tv-test").unwrap().unwrap();
    let reason = rec.degradation().unwrap();
    assert!(reason.contains("read check"), "{reason}");
    assert!(
        e.passthrough_fd().is_none(),
        "no passthrough of a faulted one"
    );
}

#[test]
fn the_check_reads_nothing_of_replicas_whose_io_the_engine_sees() {
    // Three replicas, one of them a local file: every I/O goes through the
    // engine, which faults on the error itself.
    let mut local = MemReplica::new(SIZE);
    local.direct = Some(Arc::new(tempfile::tempfile().unwrap()));
    let (_d, _store, mems, e) =
        setup_with(vec![local, MemReplica::new(SIZE), MemReplica::new(SIZE)], 1);
    e.check_replicas();
    assert!(mems.iter().all(|m| m.reads.load(Ordering::SeqCst) == 0));
    assert_eq!(e.healthy_count(), 3);
}

mod model {
    //! The engine against a reference model: one plain byte array holding
    //! every acknowledged write. Replicas fail and return at random; reads
    //! must always match the model, and once every replica is back and
    //! caught up, every replica must equal it.
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Write {
            block: u64,
            len_blocks: u64,
            byte: u8,
        },
        Discard {
            block: u64,
        },
        Read {
            block: u64,
        },
        Fail {
            replica: usize,
        },
        Return {
            replica: usize,
        },
        CatchUp,
    }

    const BLOCK: u64 = 64 * 1024;
    const BLOCKS: u64 = BIG as u64 / BLOCK;

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..BLOCKS, 1u64..4, any::<u8>())
                .prop_map(|(block, len_blocks, byte)| Op::Write { block, len_blocks, byte }),
            1 => (0..BLOCKS).prop_map(|block| Op::Discard { block }),
            2 => (0..BLOCKS).prop_map(|block| Op::Read { block }),
            1 => (0usize..3).prop_map(|replica| Op::Fail { replica }),
            1 => (0usize..3).prop_map(|replica| Op::Return { replica }),
            1 => Just(Op::CatchUp),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn acknowledged_writes_survive_any_sequence_of_faults(ops in proptest::collection::vec(op(), 1..60)) {
            let (_dir, store, mems, e) = setup_big(3);
            let mut model = vec![0u8; BIG];
            for op in ops {
                match op {
                    Op::Write { block, len_blocks, byte } => {
                        let off = block * BLOCK;
                        let len = (len_blocks * BLOCK).min(BIG as u64 - off) as usize;
                        if e.write_at(&vec![byte; len], off).is_ok() {
                            model[off as usize..off as usize + len].fill(byte);
                        } else {
                            // Failed writes leave the range undefined; only
                            // possible with no healthy replica left.
                            prop_assert_eq!(e.healthy_count(), 0);
                            return Ok(());
                        }
                    }
                    Op::Discard { block } => {
                        let off = block * BLOCK;
                        if e.discard(off, BLOCK).is_ok() {
                            model[off as usize..(off + BLOCK) as usize].fill(0);
                        } else {
                            prop_assert_eq!(e.healthy_count(), 0);
                            return Ok(());
                        }
                    }
                    Op::Read { block } => {
                        let off = block * BLOCK;
                        let mut buf = vec![0u8; BLOCK as usize];
                        if e.read_at(&mut buf, off).is_ok() {
                            prop_assert!(buf[..] == model[off as usize..(off + BLOCK) as usize]);
                        } else {
                            prop_assert_eq!(e.healthy_count(), 0);
                            return Ok(());
                        }
                    }
                    Op::Fail { replica } => {
                        mems[replica].fail.store(true, Ordering::SeqCst);
                        mems[replica].gone.store(true, Ordering::SeqCst);
                    }
                    Op::Return { replica } => {
                        mems[replica].fail.store(false, Ordering::SeqCst);
                        mems[replica].gone.store(false, Ordering::SeqCst);
                    }
                    Op::CatchUp => {
                        e.catch_up();
                    }
                }
                // What the store says is healthy is exactly what the engine uses.
                let rec = store.get("tv-test").unwrap().unwrap();
                prop_assert_eq!(rec.healthy_count(), e.healthy_count());
            }
            // Everyone back: catch-up converges, every replica equals the model.
            for m in &mems {
                m.fail.store(false, Ordering::SeqCst);
                m.gone.store(false, Ordering::SeqCst);
            }
            e.catch_up();
            prop_assert_eq!(e.healthy_count(), 3);
            for m in &mems {
                prop_assert!(*m.data.lock().unwrap() == model, "a replica differs from the model");
            }
        }
    }
}

#[test]
fn a_lost_replica_is_replaced_and_rebuilt_in_full_with_a_bandwidth_limit() {
    let spare = MemReplica::new(BIG);
    let handed = spare.clone();
    let policy = RebuildPolicy {
        replace_after: std::time::Duration::ZERO,
        bytes_per_sec: 64 << 20,
        replacer: Some(Box::new(move |index| {
            assert_eq!(index, 1);
            Ok(Box::new(handed.clone()) as Box<dyn ReplicaIo>)
        })),
    };
    let (_dir, store, mems, e) = setup_big_with(3, policy);
    e.write_at(&[5u8; 4096], 3 << 20).unwrap();
    mems[1].fail.store(true, Ordering::SeqCst);
    mems[1].gone.store(true, Ordering::SeqCst);
    e.write_at(&[6u8; 4096], 0).unwrap();
    assert_eq!(e.healthy_count(), 2);
    // Unreachable past the (zero) grace period: replaced, then rebuilt.
    e.replace_lost();
    let started = Instant::now();
    assert_eq!(e.catch_up(), BIG as u64, "a replacement copies everything");
    // 8 MiB at 64 MiB/s takes at least ~125 ms.
    assert!(started.elapsed() >= std::time::Duration::from_millis(100));
    assert_eq!(e.healthy_count(), 3);
    assert!(*spare.data.lock().unwrap() == *mems[0].data.lock().unwrap());
    assert!(store.get("tv-test").unwrap().unwrap().replicas[1].is_healthy());
    // The replacement takes writes; the lost replica does not.
    mems[1].fail.store(false, Ordering::SeqCst);
    e.write_at(&[7u8; 4096], 0).unwrap();
    assert_eq!(spare.data.lock().unwrap()[0], 7);
    assert_eq!(mems[1].data.lock().unwrap()[0], 0);
}

/// A replica whose writes take a different while each, as over a network.
struct Jittery {
    mem: MemReplica,
    turn: AtomicUsize,
}

impl ReplicaIo for Jittery {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let turn = self.turn.fetch_add(1, Ordering::SeqCst) as u64;
        let micros = turn.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 55;
        std::thread::sleep(std::time::Duration::from_micros(micros));
        self.mem.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.mem.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.mem.discard(offset, len)
    }
    fn check(&self) -> Result<(), String> {
        self.mem.check()
    }
}

/// Overlapping writes at once from many threads: each replica would apply
/// them in its own order; they go out one after the other, so every
/// replica ends up the same and a read is the same from any of them.
#[test]
fn concurrent_overlapping_writes_leave_every_replica_the_same() {
    let mems: Vec<MemReplica> = (0..3).map(|_| MemReplica::new(SIZE)).collect();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FileStore::open(dir.path()).unwrap());
    let mut rec: VolumeRecord = crate::core::volume::tests::record(3);
    rec.id = "tv-test".into();
    store.put(&rec).unwrap();
    let replicas = mems
        .iter()
        .enumerate()
        .map(|(index, m)| EngineReplica {
            index,
            io: Box::new(Jittery {
                mem: m.clone(),
                turn: AtomicUsize::new(index * 7),
            }),
            missed: None,
            faulted_since: None,
            listed: None,
        })
        .collect();
    let opts = EngineOptions {
        min_healthy: 1,
        worker_threads: 8,
        dirty_dir: None,
        rebuild: RebuildPolicy::default(),
        claim: None,
        gate: None,
        write_log: Some(crate::core::extent_list::ExtentList {
            extent_bytes: 16 << 10,
            through_epoch: 0,
            extents: Default::default(),
        }),
    };
    let engine =
        Arc::new(Engine::new("tv-test", SIZE as u64, replicas, store.clone(), opts).unwrap());
    let writers: Vec<_> = (0..6u8)
        .map(|t| {
            let engine = engine.clone();
            std::thread::spawn(move || {
                for n in 0..40u64 {
                    let offset = ((n * 3 + t as u64) % 8) * 4096;
                    engine.write_at(&[t + 1; 16384], offset).unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let logged = store.get("tv-test").unwrap().unwrap().writing.unwrap();
    assert!(
        (0..3).all(|e| logged.extents.contains(&e)),
        "every extent written is listed: {:?}",
        logged.extents
    );
    let first = mems[0].data.lock().unwrap().clone();
    for (i, m) in mems.iter().enumerate().skip(1) {
        assert!(*m.data.lock().unwrap() == first, "replica {i} differs");
    }
}
