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
        "racing fencers: the older claim fenced first in {older_won} of {rounds} rounds, the newer one owns every file"
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
