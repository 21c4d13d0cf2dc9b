//! Volume lifecycles through CSI against `terna standalone`: Block mode,
//! xfs with online expansion, a crash of the plugin while a volume is in
//! use, and the errors bad requests get. Needs root.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;

use common::csi_client::{Csi, block_cap, mount_cap};
use terna::proto::csi as pb;
use tonic::Code;

const MIB: i64 = 1 << 20;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// 4 KiB-aligned buffer for O_DIRECT.
fn aligned(data: &[u8]) -> terna::datapath::replica::aligned::AlignedBuf {
    terna::datapath::replica::aligned::AlignedBuf::copy_of(data)
}

/// Writes `data` at `at` with O_DIRECT, then fsyncs.
fn write_direct(path: &std::path::Path, at: u64, data: &[u8]) -> std::io::Result<()> {
    let mut dev = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    dev.seek(SeekFrom::Start(at))?;
    dev.write_all(aligned(data).as_slice())?;
    dev.sync_all()
}

/// Reads `len` bytes at `at` with O_DIRECT.
fn read_direct(path: &std::path::Path, at: u64, len: usize) -> Vec<u8> {
    let mut back = terna::datapath::replica::aligned::AlignedBuf::zeroed(len);
    let mut dev = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap();
    dev.seek(SeekFrom::Start(at)).unwrap();
    dev.read_exact(back.as_mut_slice()).unwrap();
    back.as_slice().to_vec()
}

/// A new block volume of 64 MiB, staged and published: (id, staging, target).
async fn published_block(
    terna: &common::Standalone,
    csi: &mut Csi,
    name: &str,
    replicas: &str,
) -> (String, std::path::PathBuf, std::path::PathBuf) {
    let vol = csi
        .create(name, 64 * MIB, &[("replicas", replicas)], block_cap())
        .await
        .unwrap();
    let id = vol.volume_id;
    let staging = terna.dir.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let target = terna.dir.path().join("pods/p1/dev");
    csi.stage(&id, &staging, block_cap()).await;
    csi.publish(&id, &staging, &target, block_cap()).await;
    (id, staging, target)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_volume_serves_raw_device_and_keeps_data_across_restage() {
    if !common::require_root("block_volume_serves_raw_device_and_keeps_data_across_restage") {
        return;
    }
    let terna = common::Standalone::start();
    let mut csi = Csi::connect(&terna.socket).await;
    let (id, staging, target) = published_block(&terna, &mut csi, "block-vol", "3").await;
    // Repeating both is success.
    csi.stage(&id, &staging, block_cap()).await;
    csi.publish(&id, &staging, &target, block_cap()).await;

    let data = pattern(7, 4 * MIB as usize);
    let mut dev = std::fs::File::open(&target).unwrap();
    assert_eq!(dev.seek(SeekFrom::End(0)).unwrap(), 64 * MIB as u64);
    drop(dev);
    write_direct(&target, 8 * MIB as u64, &data).unwrap();
    csi.unpublish(&id, &target).await;
    assert!(!target.exists(), "unpublish removes the target file");
    csi.unstage(&id, &staging).await;
    csi.unstage(&id, &staging).await;

    csi.stage(&id, &staging, block_cap()).await;
    csi.publish(&id, &staging, &target, block_cap()).await;
    assert!(
        read_direct(&target, 8 * MIB as u64, data.len()) == data,
        "block data differs after restage"
    );
    // Each replica file holds the data too.
    for i in 0..3 {
        let f = std::fs::read(terna.find_replica(&id, i).unwrap()).unwrap();
        assert!(
            f[8 * MIB as usize..12 * MIB as usize] == data[..],
            "replica {i} differs"
        );
    }
    csi.unpublish(&id, &target).await;
    csi.unstage(&id, &staging).await;
    csi.delete(&id).await;
    csi.delete(&id).await;
    terna.stop_and_check_clean();
}

/// A volume of one local replica is served by the kernel straight from the
/// replica file (FUSE passthrough): data lands there, the engine sees none of
/// it, and I/O goes on while the engine's worker is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_volume_is_served_by_the_kernel_from_its_replica_file() {
    if !common::require_root("one_replica_volume_is_served_by_the_kernel_from_its_replica_file") {
        return;
    }
    let terna = common::Standalone::start();
    let mut csi = Csi::connect(&terna.socket).await;
    let (id, staging, target) = published_block(&terna, &mut csi, "single", "1").await;
    let run_dir = terna.data_dir.join("run").join(&id);
    let write = |seed: u8, at: u64| {
        let data = pattern(seed, 4 * MIB as usize);
        write_direct(&target, at, &data).unwrap();
        data
    };
    let first = write(1, 8 * MIB as u64);
    let worker: i32 = std::fs::read_to_string(run_dir.join("engine-worker.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(worker),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let second = write(2, 32 * MIB as u64);

    let replica = std::fs::read(terna.find_replica(&id, 0).unwrap()).unwrap();
    assert!(
        replica[8 << 20..12 << 20] == first[..],
        "first write not in the replica file"
    );
    assert!(
        replica[32 << 20..36 << 20] == second[..],
        "second write not in the replica file"
    );
    // The engine (its restarted worker, whose counters start at zero, and
    // its log) saw no write: the kernel wrote the file itself.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let stats: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run_dir.join("stats.json")).unwrap()).unwrap();
    assert_eq!(stats["bytes"][1], 0, "engine counted writes: {stats}");
    let log = std::fs::read_to_string(run_dir.join("engine.log")).unwrap();
    assert!(log.contains("FUSE passthrough: the kernel serves"), "{log}");

    csi.unpublish(&id, &target).await;
    csi.unstage(&id, &staging).await;
    csi.stage(&id, &staging, block_cap()).await;
    csi.publish(&id, &staging, &target, block_cap()).await;
    assert!(
        read_direct(&target, 8 * MIB as u64, first.len()) == first,
        "data differs after restage"
    );

    // Losing the one replica ends passthrough: I/O fails instead of going
    // on into a removed file.
    std::fs::remove_file(terna.find_replica(&id, 0).unwrap()).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let err = loop {
        match write_direct(&target, 0, &first) {
            Err(e) => break e,
            Ok(()) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(200))
            }
            Ok(()) => panic!("writes still succeed 10 s after the replica file was removed"),
        }
    };
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let log = std::fs::read_to_string(run_dir.join("engine.log")).unwrap();
    assert!(log.contains("passthrough I/O revoked"), "{log}");
    csi.unpublish(&id, &target).await;
    csi.unstage(&id, &staging).await;
    csi.delete(&id).await;
    terna.stop_and_check_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xfs_volumes_are_sized_for_mkfs_or_refused_with_the_reason() {
    if !common::require_root("xfs_volumes_are_sized_for_mkfs_or_refused_with_the_reason") {
        return;
    }
    let terna = common::Standalone::start();
    let mut csi = Csi::connect(&terna.socket).await;
    // 64 MiB asked, xfs needs 300: made at 300 MiB, and it stages.
    let vol = csi
        .create("small-xfs", 64 * MIB, &[], mount_cap("xfs"))
        .await
        .unwrap();
    assert_eq!(vol.capacity_bytes, 300 * MIB);
    let staging = terna.dir.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    csi.stage(&vol.volume_id, &staging, mount_cap("xfs")).await;
    csi.unstage(&vol.volume_id, &staging).await;
    // A limit below that: refused, saying why.
    let refused = csi
        .controller
        .create_volume(pb::CreateVolumeRequest {
            name: "capped-xfs".into(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: 64 * MIB,
                limit_bytes: 100 * MIB,
            }),
            volume_capabilities: vec![mount_cap("xfs")],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    assert!(
        refused.message().contains("xfs needs"),
        "{}",
        refused.message()
    );
    // A small block volume later staged as xfs: a clear refusal, not mkfs's usage text.
    let small = csi
        .create("small-block", 64 * MIB, &[], block_cap())
        .await
        .unwrap();
    let refused = csi
        .node
        .node_stage_volume(pb::NodeStageVolumeRequest {
            volume_id: small.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(mount_cap("xfs")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("needs at least"),
        "{}",
        refused.message()
    );
    csi.unstage(&small.volume_id, &staging).await;
    csi.delete(&small.volume_id).await;
    csi.delete(&vol.volume_id).await;
    terna.stop_and_check_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xfs_volume_expands_online_with_data_intact() {
    if !common::require_root("xfs_volume_expands_online_with_data_intact") {
        return;
    }
    let terna = common::Standalone::start();
    let mut csi = Csi::connect(&terna.socket).await;
    let vol = csi
        .create("xfs-vol", 320 * MIB, &[("fsType", "xfs")], mount_cap(""))
        .await
        .unwrap();
    let id = vol.volume_id;
    let staging = terna.dir.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let target = terna.dir.path().join("target");
    csi.stage(&id, &staging, mount_cap("")).await;
    csi.publish(&id, &staging, &target, mount_cap("")).await;
    let fs = terna::datapath::host::mounts::mount_at(&staging)
        .unwrap()
        .unwrap();
    assert_eq!(fs.fs_type, "xfs");
    let data = pattern(3, 2 * MIB as usize);
    std::fs::write(target.join("before"), &data).unwrap();
    let before = nix::sys::statvfs::statvfs(&target).unwrap();

    let grown = csi
        .controller
        .controller_expand_volume(pb::ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: 640 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 640 * MIB);
    assert!(grown.node_expansion_required);
    let node = csi
        .node
        .node_expand_volume(pb::NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: target.to_string_lossy().into_owned(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: 640 * MIB,
                limit_bytes: 0,
            }),
            staging_target_path: staging.to_string_lossy().into_owned(),
            volume_capability: Some(mount_cap("")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(node.capacity_bytes, 640 * MIB);
    let after = nix::sys::statvfs::statvfs(&target).unwrap();
    assert!(
        after.blocks() * after.fragment_size()
            > before.blocks() * before.fragment_size() + 250 * MIB as u64,
        "filesystem did not grow"
    );
    assert_eq!(std::fs::read(target.join("before")).unwrap(), data);
    csi.unpublish(&id, &target).await;
    csi.unstage(&id, &staging).await;
    csi.delete(&id).await;
    terna.stop_and_check_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_crash_leaves_mounted_volume_serving_and_restart_adopts_it() {
    if !common::require_root("plugin_crash_leaves_mounted_volume_serving_and_restart_adopts_it") {
        return;
    }
    let mut terna = common::Standalone::start();
    let mut csi = Csi::connect(&terna.socket).await;
    let id = csi
        .create("crash-vol", 128 * MIB, &[], mount_cap("ext4"))
        .await
        .unwrap()
        .volume_id;
    let staging = terna.dir.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let target = terna.dir.path().join("target");
    csi.stage(&id, &staging, mount_cap("ext4")).await;
    csi.publish(&id, &staging, &target, mount_cap("ext4")).await;
    std::fs::write(target.join("a"), pattern(1, MIB as usize)).unwrap();

    terna.kill_hard();
    // The engine runs on: the pod's filesystem still works.
    let mut f = std::fs::File::create(target.join("b")).unwrap();
    f.write_all(&pattern(2, MIB as usize)).unwrap();
    f.sync_all().unwrap();
    drop(f);

    terna.restart();
    let mut csi = Csi::connect(&terna.socket).await;
    // The kubelet repeats stage and publish after a plugin restart.
    csi.stage(&id, &staging, mount_cap("ext4")).await;
    csi.publish(&id, &staging, &target, mount_cap("ext4")).await;
    assert_eq!(
        std::fs::read(target.join("a")).unwrap(),
        pattern(1, MIB as usize)
    );
    assert_eq!(
        std::fs::read(target.join("b")).unwrap(),
        pattern(2, MIB as usize)
    );
    // An engine the new process did not start is still stopped cleanly.
    csi.unpublish(&id, &target).await;
    csi.unstage(&id, &staging).await;
    // Restaging reads what the old engine wrote, from the replicas.
    csi.stage(&id, &staging, mount_cap("ext4")).await;
    csi.publish(&id, &staging, &target, mount_cap("ext4")).await;
    assert_eq!(
        std::fs::read(target.join("b")).unwrap(),
        pattern(2, MIB as usize)
    );
    csi.unpublish(&id, &target).await;
    csi.unstage(&id, &staging).await;
    csi.delete(&id).await;
    terna.stop_and_check_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_specific_codes_and_messages() {
    if !common::require_root("bad_requests_get_specific_codes_and_messages") {
        return;
    }
    let terna = common::Standalone::start();
    let mut csi = Csi::connect(&terna.socket).await;
    let err = csi
        .create(
            "bad-1",
            MIB,
            &[("replica", "3"), ("speed", "x")],
            mount_cap(""),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("replica, speed"),
        "{}",
        err.message()
    );

    let err = csi
        .create("bad-2", MIB, &[("replicas", "4")], mount_cap(""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("only 3 exist"), "{}", err.message());

    let err = csi
        .create("bad-3", MIB, &[("tier", "fast")], mount_cap(""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("tier fast"), "{}", err.message());

    let err = csi
        .create("bad-4", MIB, &[], mount_cap("btrfs"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("btrfs"), "{}", err.message());

    let err = csi
        .create("bad-5", 1 << 62, &[], mount_cap(""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);

    // Nothing was created by any of them.
    let list = csi
        .controller
        .list_volumes(pb::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.entries.is_empty());
    let pools = std::fs::read_dir(terna.data_dir.join("pools")).unwrap();
    for pool in pools {
        assert_eq!(std::fs::read_dir(pool.unwrap().path()).unwrap().count(), 0);
    }
    terna.stop_and_check_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unstaged_volume_with_a_lost_replica_is_rebuilt_in_the_background() {
    if !common::require_root("unstaged_volume_with_a_lost_replica_is_rebuilt_in_the_background") {
        return;
    }
    // The default three pools, and a short grace period before replacement.
    let terna = common::Standalone::start_with(|data_dir| {
        std::fs::create_dir_all(data_dir).unwrap();
        let mut config = terna::core::config::Config::default_standalone();
        config.replace_after_secs = 1;
        std::fs::write(
            data_dir.join("terna.toml"),
            toml::to_string(&config).unwrap(),
        )
        .unwrap();
    });
    let mut csi = Csi::connect(&terna.socket).await;
    let id = csi
        .create("repair-vol", 64 * MIB, &[], mount_cap("ext4"))
        .await
        .unwrap()
        .volume_id;
    let staging = terna.dir.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let target = terna.dir.path().join("target");
    csi.stage(&id, &staging, mount_cap("ext4")).await;
    csi.publish(&id, &staging, &target, mount_cap("ext4")).await;
    std::fs::write(target.join("data"), pattern(9, 8 * MIB as usize)).unwrap();
    csi.unpublish(&id, &target).await;
    csi.unstage(&id, &staging).await;

    // A disk loses the replica while no pod uses the volume.
    std::fs::remove_file(terna.find_replica(&id, 2).unwrap()).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut saw_degraded = false;
    loop {
        let c = csi.condition(&id).await;
        saw_degraded |= c.abnormal;
        if saw_degraded && !c.abnormal && terna.find_replica(&id, 2).is_some() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never repaired: {c:?}\n{}",
            terna.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let files: Vec<Vec<u8>> = (0..3)
        .map(|i| std::fs::read(terna.find_replica(&id, i).unwrap()).unwrap())
        .collect();
    assert!(
        files[0] == files[1] && files[0] == files[2],
        "rebuilt replica differs"
    );
    csi.stage(&id, &staging, mount_cap("ext4")).await;
    csi.publish(&id, &staging, &target, mount_cap("ext4")).await;
    assert_eq!(
        std::fs::read(target.join("data")).unwrap(),
        pattern(9, 8 * MIB as usize)
    );
    csi.unpublish(&id, &target).await;
    csi.unstage(&id, &staging).await;
    csi.delete(&id).await;
    assert!(
        !terna.data_dir.join("dirty").join(&id).exists(),
        "dirty maps removed with the volume"
    );
    terna.stop_and_check_clean();
}
