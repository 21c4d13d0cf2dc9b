//! NFS pools against real NFS servers: nfs-ganesha instances exporting
//! temporary directories on loopback, reached by Terna's own NFSv3 client
//! (nothing is mounted by the kernel). 3-replica volumes across three
//! servers and across local and NFS pools; a server killed mid-write and
//! started again; full and read-only exports. Needs root.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::io;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::csi_client::{Csi, mount_cap};
use common::nfs::Ganesha;
use common::writer::{Writer, record, verify, wait_condition};

const MIB: u64 = 1 << 20;
const VOLUME: u64 = 128 * MIB;
const TEST: &str = "nfs";

fn config(pools: &str) -> String {
    format!("agent_timeout_ms = 2000\nreplace_after_secs = 600\nrebuild_mib_per_sec = 0\n{pools}")
}

/// Checks the test runs as root and makes the directory its NFS servers
/// live in.
fn nfs_root() -> tempfile::TempDir {
    common::assert_root(TEST);
    tempfile::Builder::new()
        .prefix("terna-nfs-")
        .tempdir()
        .unwrap()
}

fn start_terna(pools: String) -> common::Standalone {
    common::Standalone::start_with(move |data_dir| {
        std::fs::create_dir_all(data_dir).unwrap();
        std::fs::write(data_dir.join("terna.toml"), config(&pools)).unwrap();
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_write_degrades_the_volume_and_catches_up_when_back() {
    let root = nfs_root();
    let mut servers = common::nfs::start_servers(root.path(), 3);
    let terna = start_terna(common::nfs::pools_toml(&servers));
    let mut csi = Csi::connect(&terna.socket).await;
    let id = csi
        .create(
            "on-nfs",
            VOLUME as i64,
            &[("replicas", "3")],
            mount_cap("ext4"),
        )
        .await
        .unwrap()
        .volume_id;
    let rec = record(&terna, &id);
    let nodes: Vec<String> = rec["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["node"].as_str().unwrap().to_string())
        .collect();
    let mut distinct = nodes.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "one replica per server: {nodes:?}");
    assert!(nodes.iter().all(|n| n.starts_with("nfs:")), "{nodes:?}");
    // Capacity comes from the servers (FSSTAT): never more than the
    // filesystem under the exports has available.
    let avail = nix::sys::statvfs::statvfs(&servers[0].export).unwrap();
    let avail = avail.blocks_available() * avail.fragment_size();
    let reported = csi
        .controller
        .get_capacity(terna::proto::csi::GetCapacityRequest {
            parameters: [("replicas".to_string(), "3".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let max = reported.maximum_volume_size.unwrap() as u64;
    assert!(
        max > 0 && max <= avail,
        "GetCapacity {reported:?}, the exports' filesystem has {avail} available"
    );

    let (staging, target) = (
        terna.dir.path().join("staging"),
        terna.dir.path().join("target"),
    );
    std::fs::create_dir_all(&staging).unwrap();
    csi.stage(&id, &staging, mount_cap("ext4")).await;
    csi.publish(&id, &staging, &target, mount_cap("ext4")).await;

    let mut writer = Writer::start(&target);
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Server 2 dies under the writer, then server 3 hangs (SIGSTOP: its
    // connections stay open, nothing answers): each time the volume goes on
    // with two replicas, and the third catches up on only what it missed.
    outage(
        &mut csi,
        &terna,
        &id,
        &writer,
        &nodes,
        &mut servers[1],
        "killed",
        Ganesha::kill,
        Ganesha::restart,
    )
    .await;
    outage(
        &mut csi,
        &terna,
        &id,
        &writer,
        &nodes,
        &mut servers[2],
        "hung",
        |s| s.set_running(false),
        |s| s.set_running(true),
    )
    .await;

    let sums = writer.stop();
    assert!(sums.len() >= 16, "writer made too little progress");
    verify(&sums);
    csi.unpublish(&id, &target).await;
    csi.unstage(&id, &staging).await;

    // The three servers hold identical replicas.
    let files: Vec<Vec<u8>> = (0..3)
        .map(|i| {
            let s = servers
                .iter()
                .find(|s| nodes[i] == format!("nfs:{}", s.addr))
                .unwrap();
            std::fs::read(s.replica_file(&id, i)).unwrap()
        })
        .collect();
    assert!(
        files[0] == files[1] && files[1] == files[2],
        "replicas differ"
    );
    csi.delete(&id).await;
    for (i, node) in nodes.iter().enumerate() {
        let s = servers
            .iter()
            .find(|s| *node == format!("nfs:{}", s.addr))
            .unwrap();
        assert!(
            !s.replica_file(&id, i).exists(),
            "replica {i} left on {}",
            s.addr
        );
    }
    terna.stop_and_check_clean();
}

/// Takes `server` away with `fault` under the writer, checks the volume
/// degrades and writes go on, brings it back with `heal`, and checks the
/// catch-up copied only part of the volume.
#[allow(clippy::too_many_arguments)]
async fn outage(
    csi: &mut Csi,
    terna: &common::Standalone,
    id: &str,
    writer: &Writer,
    nodes: &[String],
    server: &mut Ganesha,
    what: &str,
    fault: impl FnOnce(&mut Ganesha),
    heal: impl FnOnce(&mut Ganesha),
) {
    let replica = nodes
        .iter()
        .position(|n| *n == format!("nfs:{}", server.addr))
        .unwrap();
    fault(server);
    let c = wait_condition(csi, id, true, what).await;
    assert!(
        c.message.contains(&format!("replica {replica}")),
        "{what}: {}",
        c.message
    );
    let before = writer.written.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let away = writer.written.load(Ordering::SeqCst) - before;
    assert!(away > 0, "{what}: writes stopped while a server was out");
    heal(server);
    wait_condition(csi, id, false, &format!("{what}: back")).await;
    let copied = record(terna, id)["replicas"][replica]["last_catch_up_bytes"]
        .as_u64()
        .unwrap();
    println!("NFS server {what}: {away} bytes written meanwhile, catch-up copied {copied} bytes");
    assert!(
        copied > 0 && copied <= VOLUME / 2,
        "{what}: catch-up copied {copied} of {VOLUME}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_volume_mixes_local_and_nfs_replicas() {
    let root = nfs_root();
    let servers: Vec<Ganesha> = (1..=2)
        .map(|i| Ganesha::start(root.path(), &format!("m{i}")))
        .collect();
    let mut pools =
        String::from("[[pools]]\nname = \"local\"\npath = \"pools/local\"\ntier = \"standard\"\n");
    for (i, s) in servers.iter().enumerate() {
        pools += &s.pool_toml(&format!("nfs-{i}"), "standard");
    }
    let terna = start_terna(pools);
    let mut csi = Csi::connect(&terna.socket).await;
    let id = csi
        .create(
            "mixed",
            (64 * MIB) as i64,
            &[("replicas", "3")],
            mount_cap("ext4"),
        )
        .await
        .unwrap()
        .volume_id;
    let rec = record(&terna, &id);
    let mut pools_used: Vec<String> = rec["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["pool"].as_str().unwrap().to_string())
        .collect();
    pools_used.sort();
    assert_eq!(pools_used, ["local", "nfs-0", "nfs-1"]);

    let (staging, target) = (
        terna.dir.path().join("staging"),
        terna.dir.path().join("target"),
    );
    std::fs::create_dir_all(&staging).unwrap();
    csi.stage(&id, &staging, mount_cap("ext4")).await;
    csi.publish(&id, &staging, &target, mount_cap("ext4")).await;
    let mut sums = HashMap::new();
    for i in 0..4u64 {
        let data: Vec<u8> = (0..4 * MIB).map(|b| (b * 29 + i * 13) as u8).collect();
        let path = target.join(format!("mixed-{i}"));
        sums.insert(path.clone(), common::write_synced(&path, &data));
    }
    verify(&sums);
    csi.unpublish(&id, &target).await;
    csi.unstage(&id, &staging).await;
    let local = std::fs::read(
        terna
            .find_replica(&id, pools_used_index(&rec, "local"))
            .unwrap(),
    )
    .unwrap();
    for (i, s) in servers.iter().enumerate() {
        let index = pools_used_index(&rec, &format!("nfs-{i}"));
        let remote = std::fs::read(s.replica_file(&id, index)).unwrap();
        assert!(
            remote == local,
            "the replica on {} differs from the local one",
            s.addr
        );
    }
    csi.delete(&id).await;
    terna.stop_and_check_clean();
}

fn pools_used_index(rec: &serde_json::Value, pool: &str) -> usize {
    rec["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .position(|r| r["pool"] == pool)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_and_read_only_exports_give_clear_errors() {
    let root = nfs_root();
    // A read-only export.
    let ro = Ganesha::start_with(root.path(), "ro", true, None);
    // A full export: a 16 MiB tmpfs, already filled.
    let small = root.path().join("small");
    std::fs::create_dir_all(&small).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &small,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=16m"),
    )
    .unwrap();
    std::fs::create_dir_all(small.join("terna")).unwrap();
    let _ = std::fs::write(small.join("filler"), vec![7u8; 16 << 20]);
    let full = Ganesha::start_with(root.path(), "full", false, Some(small.clone()));

    let terna = start_terna(format!(
        "{}{}",
        ro.pool_toml("read-only", "fast"),
        full.pool_toml("full", "slow")
    ));
    let mut csi = Csi::connect(&terna.socket).await;
    for (name, tier, why) in [
        ("on-ro", "fast", "read-only"),
        ("on-full", "slow", "no room"),
    ] {
        let refused = csi
            .create(
                name,
                (32 * MIB) as i64,
                &[("replicas", "1"), ("tier", tier)],
                mount_cap("ext4"),
            )
            .await
            .unwrap_err();
        println!("{name}: {:?}: {}", refused.code(), refused.message());
        assert_eq!(
            refused.code(),
            tonic::Code::ResourceExhausted,
            "{refused:?}"
        );
        assert!(refused.message().contains(why), "{}", refused.message());
    }
    // GetCapacity reads the server's free space: none on the full export.
    let capacity = |tier: &str| terna::proto::csi::GetCapacityRequest {
        parameters: [
            ("replicas".to_string(), "1".to_string()),
            ("tier".to_string(), tier.to_string()),
        ]
        .into(),
        ..Default::default()
    };
    let full_capacity = csi
        .controller
        .get_capacity(capacity("slow"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        full_capacity.maximum_volume_size,
        Some(0),
        "{full_capacity:?}"
    );
    // Nothing was left on either export.
    assert_eq!(
        std::fs::read_dir(full.export.join("terna"))
            .unwrap()
            .count(),
        0
    );

    drop(terna);
    drop(full);
    drop(ro);
    nix::mount::umount(&small).unwrap();
}

/// An NFS pool of `server` as one engine process has it (its own
/// connections), acting under staging claim `epoch`.
fn pool_under_claim(server: &Ganesha, epoch: u64) -> terna::datapath::replica::nfs::NfsPool {
    use terna::core::pool::Pool;
    let pool = terna::datapath::replica::nfs::NfsPool::new(
        &terna::core::config::NfsPoolConfig {
            server: server.addr.clone(),
            port: Some(server.port),
            mount_port: Some(server.mount_port),
            export: "/export".into(),
            subdir: Some("terna".into()),
        },
        Duration::from_secs(10),
    );
    pool.act_under_claim(epoch);
    pool
}

fn owner_of(path: &std::path::Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(path).unwrap();
    (md.uid(), md.mode() & 0o7777)
}

const FENCE_VOLUME: &str = "tv-0123456789abcdef01234567";
const BLOCK: usize = 64 * 1024;

/// Claim N's engine writes a replica; claim N+1's fences it: from then on
/// every write, discard and read of N fails as fenced, on the connections
/// it already had too (ganesha checks the owner it was told by the
/// SETATTR, no attribute cache in between), while N keeps writing as fast
/// as it can during the fence; the file holds exactly N+1's bytes.
#[test]
fn fence_nfs_replica_stops_the_older_claims_writes() {
    use terna::core::pool::Pool;
    let root = nfs_root();
    let server = Ganesha::start(root.path(), "fence");
    let name = format!("{FENCE_VOLUME}.r0.img");
    let file = server.export.join("terna").join(&name);
    let (old_pool, new_pool) = (pool_under_claim(&server, 7), pool_under_claim(&server, 8));
    old_pool.create(&name, 4 * MIB).unwrap();
    assert_eq!(owner_of(&file), (0, 0o600), "created as root's");
    let old = std::sync::Arc::new(old_pool.open(&name).unwrap());
    // Unfenced, not even the claim that will own it may write.
    let unfenced = old.write_at(&vec![1u8; BLOCK], 0).unwrap_err();
    assert!(unfenced.to_string().contains("fenced"), "{unfenced}");
    old.fence().unwrap();
    old.fence().unwrap();
    let uid = terna::datapath::replica::nfs::claim_uid(7);
    assert_eq!(owner_of(&file), (uid, 0o600));
    old.write_at(&vec![1u8; BLOCK], 0).unwrap();

    // The old claim hammers the file from four threads while the new one
    // fences: the guarded SETATTR loses to some of those writes and tries
    // again, and once it is through none of them lands.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let landed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let hammers: Vec<_> = (0..4u64)
        .map(|t| {
            let (old, stop, landed) = (old.clone(), stop.clone(), landed.clone());
            std::thread::spawn(move || {
                let data = vec![0xa0 + t as u8; BLOCK];
                let mut i = 0u64;
                let mut refused = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let at = ((t * 16 + i % 16) * BLOCK as u64) % (4 * MIB);
                    match old.write_at(&data, at) {
                        Ok(()) => {
                            assert!(
                                refused.is_empty(),
                                "a write of the old claim landed after one was refused"
                            );
                            landed.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => refused.push(e),
                    }
                    i += 1;
                }
                refused
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let new = new_pool.open(&name).unwrap();
    new.fence().unwrap();
    let fenced_at = landed.load(Ordering::SeqCst);
    // What N+1 writes after its fence: every block of the file.
    let expected: Vec<u8> = (0..(4 * MIB as usize / BLOCK))
        .flat_map(|b| common::content(8_000 + b as u64, BLOCK))
        .collect();
    for (b, chunk) in expected.chunks(BLOCK).enumerate() {
        new.write_at(chunk, (b * BLOCK) as u64).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let refused: Vec<io::Error> = hammers
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    assert!(fenced_at > 0, "the old claim wrote before the fence");
    assert!(!refused.is_empty());
    for e in &refused {
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        assert!(e.to_string().contains("fenced"), "{e}");
    }
    println!(
        "old claim: {fenced_at} writes before the fence, {} refused after it; e.g. {}",
        refused.len(),
        refused[0]
    );
    // Pooled connections and new ones, every data-changing call, and reads.
    for _ in 0..20 {
        let e = old.write_at(&vec![0xee; BLOCK], 0).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
    }
    assert!(old.discard(0, MIB).is_err());
    assert!(old.read_at(&mut vec![0u8; BLOCK], 0).is_err());
    let late = pool_under_claim(&server, 7);
    let e = late
        .open(&name)
        .unwrap()
        .write_at(&vec![0xee; BLOCK], 0)
        .unwrap_err();
    assert!(e.to_string().contains("fenced"), "{e}");

    assert_eq!(
        owner_of(&file).0,
        terna::datapath::replica::nfs::claim_uid(8)
    );
    assert!(
        std::fs::read(&file).unwrap() == expected,
        "the file holds the old claim's bytes"
    );
    let mut back = vec![0u8; 4 * MIB as usize];
    new.read_at(&mut back, 0).unwrap();
    assert!(back == expected);
}

/// Fencing never goes backwards: claim N after N+1 is refused and leaves
/// the file N+1's; and two claims fencing at once (an old engine's
/// catch-up meeting the new one's start) always end with the newer one
/// owning the file, because each SETATTR is guarded by the ctime read.
#[test]
fn fence_nfs_replica_never_goes_backwards() {
    use terna::core::pool::Pool;
    let root = nfs_root();
    let server = Ganesha::start(root.path(), "backwards");
    let name = |i: usize| format!("{FENCE_VOLUME}.r{i}.img");
    let file = |i: usize| server.export.join("terna").join(name(i));
    let (older, newer) = (pool_under_claim(&server, 41), pool_under_claim(&server, 42));
    older.create(&name(0), MIB).unwrap();
    let new = newer.open(&name(0)).unwrap();
    new.fence().unwrap();
    let old = older.open(&name(0)).unwrap();
    let refused = old.fence().unwrap_err();
    println!("{refused}");
    assert_eq!(refused.kind(), io::ErrorKind::PermissionDenied);
    assert!(refused.to_string().contains("newer claim"), "{refused}");
    assert_eq!(
        owner_of(&file(0)).0,
        terna::datapath::replica::nfs::claim_uid(42)
    );
    new.write_at(&vec![4u8; BLOCK], 0).unwrap();
    assert!(old.write_at(&vec![3u8; BLOCK], 0).is_err());

    // Racing fencers, one fresh file a round.
    let rounds = 20;
    let (mut older_won, barrier) = (0, std::sync::Arc::new(std::sync::Barrier::new(2)));
    for i in 1..=rounds {
        older.create(&name(i), MIB).unwrap();
        let fencers: Vec<_> = [(older.clone(), 41u64), (newer.clone(), 42)]
            .into_iter()
            .map(|(pool, epoch)| {
                let (barrier, name) = (barrier.clone(), name(i));
                std::thread::spawn(move || {
                    let io = pool.open(&name).unwrap();
                    barrier.wait();
                    (epoch, io.fence())
                })
            })
            .collect();
        for f in fencers {
            match f.join().unwrap() {
                (42, r) => r.unwrap(),
                (_, Ok(())) => older_won += 1,
                (_, Err(e)) => assert!(e.to_string().contains("newer claim"), "{e}"),
            }
        }
        assert_eq!(
            owner_of(&file(i)),
            (terna::datapath::replica::nfs::claim_uid(42), 0o600),
            "round {i}"
        );
    }
    println!(
        "racing fencers: the older claim's fence held in {older_won} of {rounds} rounds (refused in the others), the newer one owns every file"
    );
}

/// An export that squashes root cannot be fenced: fencing fails and says
/// why, rather than leaving the replica writable by an older claim.
#[test]
fn fence_nfs_replica_on_a_root_squashing_export_fails_clearly() {
    use terna::core::pool::Pool;
    let root = nfs_root();
    let server = Ganesha::start_squashing_root(root.path(), "squash");
    let pool = pool_under_claim(&server, 3);
    let name = format!("{FENCE_VOLUME}.r0.img");
    pool.create(&name, MIB).unwrap();
    let e = pool.open(&name).unwrap().fence().unwrap_err();
    println!("{e}");
    assert!(e.to_string().contains("squashes root"), "{e}");
    let (uid, _) = owner_of(&server.export.join("terna").join(&name));
    assert_ne!(uid, terna::datapath::replica::nfs::claim_uid(3));
}

/// A `terna engine` process pair serving one volume, in its own process
/// group so the test can freeze both at once.
struct EngineProcess {
    child: std::process::Child,
    mountpoint: std::path::PathBuf,
    log: std::path::PathBuf,
}

impl EngineProcess {
    fn start(data_dir: &std::path::Path, node: &str, volume_id: &str) -> EngineProcess {
        use std::os::unix::process::CommandExt;
        let mountpoint = data_dir.join(format!("run-{node}")).join("fuse");
        std::fs::create_dir_all(&mountpoint).unwrap();
        let log = data_dir.join(format!("engine-{node}.log"));
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_terna"))
            .args(["engine", "--node-id", node, "--volume", volume_id])
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--mountpoint")
            .arg(&mountpoint)
            .env("TERNA_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .process_group(0)
            .spawn()
            .unwrap();
        assert!(
            terna::datapath::engine::ready::says_ready(&mut child, Duration::from_secs(30)),
            "engine of {node} did not start:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        EngineProcess {
            child,
            mountpoint,
            log,
        }
    }

    fn volume(&self) -> std::fs::File {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(self.mountpoint.join("volume"))
            .unwrap()
    }

    fn signal_group(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.child.id() as i32), signal)
            .unwrap();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for EngineProcess {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGCONT);
        let _ = nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGTERM);
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while self.child.try_wait().ok().flatten().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // An engine killed past its unmount leaves the session: requests
        // to it would wait for ever, so it is aborted before the unmount.
        if terna::datapath::frontend::fuse::is_mounted(&self.mountpoint) {
            terna::datapath::frontend::fuse::abort(&self.mountpoint);
            let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

fn write_blocks(file: &std::fs::File, seed: u64, blocks: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    for b in 0..blocks {
        let data = terna::datapath::replica::aligned::AlignedBuf::copy_of(&common::content(
            seed + b,
            BLOCK,
        ));
        file.write_all_at(data.as_slice(), b * BLOCK as u64)?;
    }
    file.sync_all()
}

fn expected_blocks(seed: u64, blocks: u64) -> Vec<u8> {
    (0..blocks)
        .flat_map(|b| common::content(seed + b, BLOCK))
        .collect()
}

/// Sets who holds `id`'s claim in the record of `data_dir`, as a takeover
/// does (no engine of this data dir is running a store update meanwhile).
fn set_claim(data_dir: &std::path::Path, id: &str, node: &str, epoch: u64) {
    let path = data_dir.join(format!("state/volumes/{id}.json"));
    let mut rec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    rec["staged_on"] =
        serde_json::json!({"node": node, "staging_path": "/staging", "epoch": epoch});
    rec["claims"] = epoch.into();
    std::fs::write(&path, serde_json::to_vec(&rec).unwrap()).unwrap();
}

/// A real engine with an NFS replica is frozen (SIGSTOP); a second engine
/// under the next claim starts on the same replica (it fences it) and
/// writes checksummed blocks; the first is resumed (SIGCONT) with writes
/// queued on its FUSE file and driven with more for seconds. Nothing it
/// writes reaches the replica: the server refuses its uid, every write of
/// it fails, and the file holds exactly the new holder's bytes.
///
/// `shared_store`: both engines read one state store, so the resumed one
/// also sees the claim moved, must not record the new holder's replica
/// faulted, and exits. Otherwise the old engine's store still names its
/// claim (a node cut off from the API server): only the NFS server's
/// fence stands between it and the replica.
fn stale_engine_is_fenced_off_its_nfs_replica(shared_store: bool) {
    const BLOCKS: u64 = 32;
    let root = nfs_root();
    let server = Ganesha::start(root.path(), "engines");
    let mut terna = start_terna(server.pool_toml("nfs-0", "standard"));
    let id = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut csi = Csi::connect(&terna.socket).await;
        csi.create(
            "fenced",
            (32 * MIB) as i64,
            &[("replicas", "1")],
            mount_cap("ext4"),
        )
        .await
        .unwrap()
        .volume_id
    });
    // The engines are the test's from here on: no repair pass, no lock.
    terna.kill_hard();
    let new_dir = terna.data_dir.clone();
    let old_dir = if shared_store {
        new_dir.clone()
    } else {
        let dir = terna.dir.path().join("old-node");
        let copied = std::process::Command::new("cp")
            .arg("-a")
            .arg(&new_dir)
            .arg(&dir)
            .status()
            .unwrap();
        assert!(copied.success());
        dir
    };
    let replica = server.replica_file(&id, 0);

    set_claim(&old_dir, &id, "node-a", 1);
    let old = EngineProcess::start(&old_dir, "node-a", &id);
    // No file of the old engine's stays open here while it is frozen: a
    // child spawned meanwhile would close its inherited copy at exec, and
    // that FLUSH would wait for the frozen engine (and every `ps` reading
    // the child with it).
    write_blocks(&old.volume(), 100, BLOCKS).unwrap();
    let len = (BLOCKS as usize) * BLOCK;
    assert!(std::fs::read(&replica).unwrap()[..len] == expected_blocks(100, BLOCKS));
    assert_eq!(
        owner_of(&replica).0,
        terna::datapath::replica::nfs::claim_uid(1)
    );

    old.signal_group(nix::sys::signal::Signal::SIGSTOP);
    // Frozen for a bounded time whatever happens to this test.
    let pgid = nix::unistd::Pid::from_raw(old.child.id() as i32);
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(90));
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGCONT);
    });
    set_claim(&new_dir, &id, "node-b", 2);
    let new = EngineProcess::start(&new_dir, "node-b", &id);
    write_blocks(&new.volume(), 200, BLOCKS).unwrap();
    let expected = expected_blocks(200, BLOCKS);
    assert!(std::fs::read(&replica).unwrap()[..len] == expected);
    assert_eq!(
        owner_of(&replica).0,
        terna::datapath::replica::nfs::claim_uid(2)
    );

    // Writes of the old engine's users wait in its FUSE queue while it is
    // frozen, and go on after it is resumed.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..4u64)
        .map(|t| {
            let (path, stop) = (old.mountpoint.join("volume"), stop.clone());
            std::thread::spawn(move || {
                use std::os::unix::fs::{FileExt, OpenOptionsExt};
                let (mut ok, mut failed, mut i) = (0u64, Vec::new(), 0u64);
                let mut file = None;
                while !stop.load(Ordering::SeqCst) {
                    let b = (t * 8 + i % 8) % BLOCKS;
                    let data = terna::datapath::replica::aligned::AlignedBuf::copy_of(
                        &common::content(300 + t * 1000 + i, BLOCK),
                    );
                    if file.is_none() {
                        file = std::fs::OpenOptions::new()
                            .write(true)
                            .custom_flags(libc::O_DIRECT)
                            .open(&path)
                            .map_err(|e| failed.push(e.to_string()))
                            .ok();
                    }
                    let written = match &file {
                        Some(f) => f.write_all_at(data.as_slice(), b * BLOCK as u64),
                        None => Err(io::Error::from_raw_os_error(libc::ENOTCONN)),
                    };
                    match written {
                        Ok(()) => ok += 1,
                        Err(e) => failed.push(e.to_string()),
                    }
                    i += 1;
                    if !failed.is_empty() {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    old.signal_group(nix::sys::signal::Signal::SIGCONT);
    std::thread::sleep(Duration::from_secs(5));
    stop.store(true, Ordering::SeqCst);
    let (mut ok, mut failed) = (0, Vec::new());
    for w in writers {
        let (o, f) = w.join().unwrap();
        ok += o;
        failed.extend(f);
    }
    let old_log = old.log();
    println!(
        "resumed engine: {ok} writes acknowledged, {} failed (first: {:?}); {} lines of its log mention the fence, first: {:?}",
        failed.len(),
        failed.first(),
        old_log.lines().filter(|l| l.contains("fenced")).count(),
        old_log.lines().find(|l| l.contains("fenced"))
    );
    assert_eq!(ok, 0, "the stale engine acknowledged writes:\n{old_log}");
    assert!(!failed.is_empty());
    assert!(
        std::fs::read(&replica).unwrap()[..len] == expected,
        "the replica holds bytes of the stale engine:\n{old_log}"
    );
    assert_eq!(
        owner_of(&replica).0,
        terna::datapath::replica::nfs::claim_uid(2)
    );
    let mut back = terna::datapath::replica::aligned::AlignedBuf::zeroed(len);
    std::os::unix::fs::FileExt::read_exact_at(&new.volume(), back.as_mut_slice(), 0).unwrap();
    assert!(back.as_slice() == expected.as_slice());
    // The new holder's record is untouched: its replica is healthy, its
    // claim stands.
    let rec: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(new_dir.join(format!("state/volumes/{id}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(rec["staged_on"]["epoch"], 2, "{rec}");
    assert_eq!(rec["replicas"][0]["state"]["state"], "healthy", "{rec}");
    if shared_store {
        let mut old = old;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while old.child.try_wait().unwrap().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "the stale engine goes on:\n{old_log}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    } else {
        // Nothing but the server stopped it.
        assert!(old_log.contains("fenced"), "{old_log}");
    }
    drop(new);
}

#[test]
fn fence_stale_engine_cut_off_from_the_store_writes_nothing_to_its_nfs_replica() {
    stale_engine_is_fenced_off_its_nfs_replica(false);
}

#[test]
fn fence_stale_engine_resumed_after_a_takeover_writes_nothing_to_its_nfs_replica() {
    stale_engine_is_fenced_off_its_nfs_replica(true);
}
