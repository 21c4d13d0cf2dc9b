//! A volume's engine process killed with SIGKILL, again and again, under
//! concurrent direct I/O: the volume stays attached, every write the
//! device acknowledged reads back, no write fails, and the three replicas
//! end up identical (requests the dead engine had read were resent by the
//! kernel to its successor and written everywhere). Needs root.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::csi_client::{Csi, block_cap};
use terna::datapath::replica::aligned::AlignedBuf;

const MIB: u64 = 1 << 20;
const VOLUME: u64 = 64 * MIB;
const WRITERS: u64 = 8;
const BLOCK: usize = 64 * 1024;
const KILLS: usize = 3;
/// Whole-engine kills at most, waiting for ones that leave replicas
/// different (about one in three does).
const MAX_WHOLE_KILLS: usize = 24;

/// Deterministic content of one block write, so a stale or torn block shows.
fn pattern(seed: u64) -> Vec<u8> {
    common::content(seed, BLOCK)
}

/// A 3-replica block volume `name`, created and staged; with its staging
/// path and where to publish it.
async fn staged(
    csi: &mut Csi,
    terna: &common::Standalone,
    name: &str,
) -> (String, PathBuf, PathBuf) {
    let id = csi
        .create(name, VOLUME as i64, &[("replicas", "3")], block_cap())
        .await
        .unwrap()
        .volume_id;
    let staging = terna.dir.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    csi.stage(&id, &staging, block_cap()).await;
    (id, staging, terna.dir.path().join("dev"))
}

fn pid_in(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// Each writer owns one slice of the device and rewrites its blocks in
/// turn with O_DIRECT, reading back the block it wrote before each write.
/// `acked` holds, per offset, the seed of the last write that returned.
fn start_writers(
    device: &Path,
    stop: &Arc<AtomicBool>,
    done: &Arc<AtomicU64>,
    acked: &Arc<Mutex<HashMap<u64, u64>>>,
) -> Vec<std::thread::JoinHandle<()>> {
    let slice = VOLUME / WRITERS;
    (0..WRITERS)
        .map(|w| {
            let (device, stop, done, acked) = (
                device.to_path_buf(),
                stop.clone(),
                done.clone(),
                acked.clone(),
            );
            std::thread::spawn(move || {
                let dev = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&device)
                    .unwrap();
                let mut check = AlignedBuf::zeroed(BLOCK);
                let mut last: Option<(u64, u64)> = None;
                let mut round = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let offset = w * slice + (round * BLOCK as u64) % slice;
                    let seed = (w << 48) | round;
                    let data = AlignedBuf::copy_of(&pattern(seed));
                    dev.write_all_at(data.as_slice(), offset)
                        .unwrap_or_else(|e| panic!("write at {offset} failed: {e}"));
                    acked.lock().unwrap().insert(offset, seed);
                    if let Some((off, s)) = last {
                        dev.read_exact_at(check.as_mut_slice(), off)
                            .unwrap_or_else(|e| panic!("read at {off} failed: {e}"));
                        assert!(
                            check.as_slice() == pattern(s).as_slice(),
                            "block at {off} reads back wrong"
                        );
                    }
                    last = Some((offset, seed));
                    done.fetch_add(1, Ordering::SeqCst);
                    round += 1;
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_killed_under_io_loses_no_write_and_fails_none() {
    if !common::require_root("engine_killed_under_io_loses_no_write_and_fails_none") {
        return;
    }
    let terna = common::Standalone::start();
    let mut csi = Csi::connect(&terna.socket).await;
    let (id, staging, target) = staged(&mut csi, &terna, "restarted").await;
    csi.publish(&id, &staging, &target, block_cap()).await;

    let run_dir: PathBuf = terna.data_dir.join("run").join(&id);
    let supervisor = pid_in(&run_dir.join("engine.pid")).unwrap();
    let worker_file = run_dir.join("engine-worker.pid");

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(Mutex::new(HashMap::new()));
    let writers = start_writers(&target, &stop, &done, &acked);
    tokio::time::sleep(Duration::from_millis(500)).await;

    for kill in 1..=KILLS {
        let worker = pid_in(&worker_file).unwrap();
        assert!(alive(worker), "worker {worker} is not running");
        let before = done.load(Ordering::SeqCst);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(worker),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let successor = loop {
            if let Some(p) = pid_in(&worker_file).filter(|p| *p != worker && alive(*p)) {
                break p;
            }
            assert!(Instant::now() < deadline, "kill {kill}: no new worker");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // Progress after the restart, not just before the kill.
        let deadline = Instant::now() + Duration::from_secs(30);
        while done.load(Ordering::SeqCst) < before + 200 {
            assert!(
                Instant::now() < deadline,
                "kill {kill}: I/O did not resume on worker {successor}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        println!(
            "kill {kill}: worker {worker} -> {successor}, {} writes so far",
            done.load(Ordering::SeqCst)
        );
    }
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().expect("a writer saw a failed or wrong I/O");
    }
    assert_eq!(
        pid_in(&run_dir.join("engine.pid")),
        Some(supervisor),
        "the supervisor itself stayed"
    );
    let log = std::fs::read_to_string(run_dir.join("engine.log")).unwrap();
    assert_eq!(
        log.matches("restarted on the same session").count(),
        KILLS,
        "{log}"
    );

    // Every acknowledged block, read back through a fresh open.
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 100, "too few writes: {}", acked.len());
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&target)
        .unwrap();
    let mut buf = AlignedBuf::zeroed(BLOCK);
    for (offset, seed) in &acked {
        dev.read_exact_at(buf.as_mut_slice(), *offset).unwrap();
        assert!(
            buf.as_slice() == pattern(*seed).as_slice(),
            "acknowledged block at {offset} lost"
        );
    }
    drop(dev);
    let c = csi.condition(&id).await;
    assert!(!c.abnormal, "no replica was at fault: {}", c.message);

    // Resent writes reached every replica: they are identical.
    csi.unpublish(&id, &target).await;
    csi.unstage(&id, &staging).await;
    let files: Vec<Vec<u8>> = (0..3)
        .map(|i| std::fs::read(terna.find_replica(&id, i).unwrap()).unwrap())
        .collect();
    assert!(
        files[0] == files[1] && files[1] == files[2],
        "replicas differ"
    );
    assert!(!alive(supervisor), "supervisor outlived unstage");

    csi.delete(&id).await;
    terna.stop_and_check_clean();
}

/// Writers that all rewrite the same few blocks at once, each with its own
/// patterns, until stopped or until a write fails (the whole engine gone).
fn start_overlapping_writers(
    device: &Path,
    stop: &Arc<AtomicBool>,
    done: &Arc<AtomicU64>,
) -> Vec<std::thread::JoinHandle<Result<(), String>>> {
    (0..WRITERS)
        .map(|w| {
            let (device, stop, done) = (device.to_path_buf(), stop.clone(), done.clone());
            std::thread::spawn(move || {
                let dev = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&device)
                    .map_err(|e| e.to_string())?;
                let mut round = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    // Half-block steps over 32 blocks: many writes at once,
                    // some of them overlapping.
                    let offset = ((round * 7 + w * 13) % 63) * BLOCK as u64 / 2;
                    let data = AlignedBuf::copy_of(&pattern((w << 48) | round));
                    dev.write_all_at(data.as_slice(), offset)
                        .map_err(|e| format!("write at {offset}: {e}"))?;
                    done.fetch_add(1, Ordering::SeqCst);
                    round += 1;
                }
                Ok(())
            })
        })
        .collect()
}

fn replicas_identical(terna: &common::Standalone, id: &str) {
    let files: Vec<Vec<u8>> = (0..3)
        .map(|i| std::fs::read(terna.find_replica(id, i).unwrap()).unwrap())
        .collect();
    for i in 1..3 {
        let differing: Vec<usize> = files[0]
            .chunks(4096)
            .zip(files[i].chunks(4096))
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(n, _)| n)
            .collect();
        let differ = differing.len();
        if differ > 0 {
            println!("replica {i} differs at blocks {differing:?}");
        }
        assert_eq!(
            differ, 0,
            "replica {i} differs from replica 0 in {differ} blocks"
        );
    }
}

async fn wait_for_writes(done: &AtomicU64, at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while done.load(Ordering::SeqCst) < at_least {
        assert!(Instant::now() < deadline, "writes did not get going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Overlapping writes at once, with the worker killed under them: every
/// replica applies overlapping writes in one order, so they end identical,
/// compared file against file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_writes_across_worker_kills_leave_every_replica_identical() {
    if !common::require_root("overlapping_writes_across_worker_kills_leave_every_replica_identical")
    {
        return;
    }
    let terna = common::Standalone::start();
    let mut csi = Csi::connect(&terna.socket).await;
    let (id, staging, target) = staged(&mut csi, &terna, "overlapped").await;
    csi.publish(&id, &staging, &target, block_cap()).await;
    let worker_file = terna
        .data_dir
        .join("run")
        .join(&id)
        .join("engine-worker.pid");

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writers = start_overlapping_writers(&target, &stop, &done);
    wait_for_writes(&done, 300).await;
    for _ in 0..KILLS {
        let worker = pid_in(&worker_file).unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(worker),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let before = done.load(Ordering::SeqCst);
        wait_for_writes(&done, before + 600).await;
    }
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join()
            .unwrap()
            .expect("no write fails across worker kills");
    }
    println!("{} overlapping writes", done.load(Ordering::SeqCst));
    csi.unpublish(&id, &target).await;
    csi.unstage(&id, &staging).await;
    replicas_identical(&terna, &id);
    csi.delete(&id).await;
    terna.stop_and_check_clean();
}

/// The whole engine (supervisor and worker) killed under overlapping
/// writes: no resend saves the writes it had in flight, so replicas may
/// differ there. The next engine to stage the volume compares where its
/// write log says writes were in flight, and makes them agree before
/// serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_killed_whole_mid_write_leaves_replicas_made_identical_by_the_next() {
    if !common::require_root(
        "an_engine_killed_whole_mid_write_leaves_replicas_made_identical_by_the_next",
    ) {
        return;
    }
    let terna = common::Standalone::start();
    let mut csi = Csi::connect(&terna.socket).await;
    let (id, staging, target) = staged(&mut csi, &terna, "killed-whole").await;
    let run_dir = terna.data_dir.join("run").join(&id);
    // A kill leaves replicas different only when it lands between one
    // replica's write and another's: kill until that has happened twice.
    let (mut rewritten, mut diverged) = (0, 0);
    for kill in 1..=MAX_WHOLE_KILLS {
        if diverged >= 2 {
            break;
        }
        csi.publish(&id, &staging, &target, block_cap()).await;
        let supervisor = pid_in(&run_dir.join("engine.pid")).unwrap();
        let worker = pid_in(&run_dir.join("engine-worker.pid")).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let writers = start_overlapping_writers(&target, &stop, &done);
        wait_for_writes(&done, 500).await;
        for pid in [supervisor, worker] {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            )
            .unwrap();
        }
        for w in writers {
            // They fail once the engine is gone: those writes were never
            // acknowledged.
            let _ = w.join().unwrap();
        }
        csi.unpublish(&id, &target).await;
        csi.unstage(&id, &staging).await;
        csi.stage(&id, &staging, block_cap()).await;
        // The next engine serves at once and resynchronises in the
        // background, reading those extents from one replica meanwhile.
        let deadline = Instant::now() + Duration::from_secs(60);
        let line = loop {
            let log = std::fs::read_to_string(run_dir.join("engine.log")).unwrap_or_default();
            if let Some(l) = log
                .lines()
                .rfind(|l| l.contains("replicas agree where writes were in flight"))
            {
                break l.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "the next engine compared nothing:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let bytes = line
            .split("rewritten=")
            .nth(1)
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap();
        println!(
            "kill {kill}: {} writes; the next engine: {line}",
            done.load(Ordering::SeqCst)
        );
        rewritten += bytes;
        diverged += usize::from(bytes > 0);
    }
    println!("{rewritten} bytes rewritten after {diverged} kills that left replicas different");
    assert!(
        diverged > 0,
        "no kill in {MAX_WHOLE_KILLS} left the replicas different: the test tests nothing"
    );
    csi.unstage(&id, &staging).await;
    replicas_identical(&terna, &id);
    csi.delete(&id).await;
    terna.stop_and_check_clean();
}
