//! CSI calls from the worst caller against `terna standalone`: ids that are
//! paths, paths that are not the volume's, unstaging under a live pod,
//! foreign mounts where Terna expects its own, a dead engine under a
//! staged volume, and the process-level mistakes (an endpoint that names
//! a file, two processes on one data dir, a repair claim left by a kill).
//! Each case was accepted by an earlier Terna; here each gets a specific
//! error and touches nothing that is not the volume's. Needs root.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::csi_client::{Csi, block_cap, mount_cap};
use terna::proto::csi as pb;
use tonic::Code;

const MIB: i64 = 1 << 20;

fn code<T>(r: Result<T, tonic::Status>) -> (Code, String) {
    match r {
        Ok(_) => (Code::Ok, String::new()),
        Err(s) => (s.code(), s.message().to_string()),
    }
}

fn tmpfs_at(path: &Path) {
    std::fs::create_dir_all(path).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        path,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .unwrap();
}

fn mounted(path: &Path) -> Option<terna::datapath::host::mounts::MountEntry> {
    terna::datapath::host::mounts::mount_at(path).unwrap()
}

fn write_direct(path: &Path, at: u64, data: &[u8]) {
    let mut dev = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap();
    dev.seek(SeekFrom::Start(at)).unwrap();
    dev.write_all(terna::datapath::replica::aligned::AlignedBuf::copy_of(data).as_slice())
        .unwrap();
    dev.sync_all().unwrap();
}

fn read_direct(path: &Path, at: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut back = terna::datapath::replica::aligned::AlignedBuf::zeroed(len);
    let mut dev = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    dev.seek(SeekFrom::Start(at))?;
    dev.read_exact(back.as_mut_slice())?;
    Ok(back.as_slice().to_vec())
}

async fn unstage(csi: &mut Csi, id: &str, staging: &Path) -> (Code, String) {
    code(
        csi.node
            .node_unstage_volume(pb::NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.to_string_lossy().into_owned(),
            })
            .await,
    )
}

async fn unpublish(csi: &mut Csi, id: &str, target: &Path) -> (Code, String) {
    code(
        csi.node
            .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: target.to_string_lossy().into_owned(),
            })
            .await,
    )
}

async fn stage(
    csi: &mut Csi,
    id: &str,
    staging: &Path,
    cap: pb::VolumeCapability,
) -> (Code, String) {
    code(
        csi.node
            .node_stage_volume(pb::NodeStageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.to_string_lossy().into_owned(),
                volume_capability: Some(cap),
                ..Default::default()
            })
            .await,
    )
}

async fn publish(
    csi: &mut Csi,
    id: &str,
    staging: &Path,
    target: &Path,
    cap: pb::VolumeCapability,
    readonly: bool,
) -> (Code, String) {
    code(
        csi.node
            .node_publish_volume(pb::NodePublishVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.to_string_lossy().into_owned(),
                target_path: target.to_string_lossy().into_owned(),
                volume_capability: Some(cap),
                readonly,
                ..Default::default()
            })
            .await,
    )
}

async fn stats(csi: &mut Csi, id: &str, path: &str) -> (Code, String) {
    code(
        csi.node
            .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                volume_id: id.into(),
                volume_path: path.into(),
                staging_target_path: String::new(),
            })
            .await,
    )
}

/// Kills a staged volume's engine, supervisor and worker, as a crash would,
/// and waits for it to be gone.
fn kill_engine(terna: &common::Standalone, id: &str) {
    let pid: i32 = std::fs::read_to_string(terna.data_dir.join("run").join(id).join("engine.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A new volume of `mib` MiB with `replicas` replicas: its id.
async fn create(
    csi: &mut Csi,
    name: &str,
    mib: i64,
    replicas: &str,
    cap: pb::VolumeCapability,
) -> String {
    csi.create(name, mib * MIB, &[("replicas", replicas)], cap)
        .await
        .unwrap()
        .volume_id
}

/// A directory tree outside the data dir that no call may touch.
fn victim(root: &Path, name: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(dir.join("fuse")).unwrap();
    std::fs::write(dir.join("precious"), b"keep me").unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_ids_that_are_paths_are_invalid_and_delete_nothing() {
    if !common::require_root("volume_ids_that_are_paths_are_invalid_and_delete_nothing") {
        return;
    }
    let terna = common::Standalone::start();
    let mut csi = Csi::connect(&terna.socket).await;
    let root = terna.dir.path();
    // `<data>/run/<id>` with these ids is the victim directory itself.
    let relative = victim(root, "victim-relative");
    let absolute = victim(root, "victim-absolute");
    let staging = root.join("staging");
    let ids = [
        "../../victim-relative".to_string(),
        absolute.to_string_lossy().into_owned(),
        format!("tv-{}", "\0".repeat(24)),
        "a".repeat(4096),
    ];
    for id in &ids {
        let (c, message) = unstage(&mut csi, id, &staging).await;
        assert_eq!(
            c,
            Code::InvalidArgument,
            "unstage {:?}: {message}",
            &id[..id.len().min(40)]
        );
        assert!(
            message.len() < 300,
            "message repeats the whole id: {message}"
        );
        assert!(
            !message.contains(&*terna.data_dir.to_string_lossy()),
            "message shows internal paths: {message}"
        );
        let (c, _) = unpublish(&mut csi, id, &root.join("target")).await;
        assert_eq!(c, Code::InvalidArgument);
        let (c, _) = stage(&mut csi, id, &staging, mount_cap("ext4")).await;
        assert_eq!(c, Code::InvalidArgument);
        let (c, _) = publish(
            &mut csi,
            id,
            &staging,
            &root.join("t"),
            mount_cap("ext4"),
            false,
        )
        .await;
        assert_eq!(c, Code::InvalidArgument);
        let (c, _) = stats(&mut csi, id, &staging.to_string_lossy()).await;
        assert_eq!(c, Code::InvalidArgument);
    }
    for dir in [&relative, &absolute] {
        assert_eq!(std::fs::read(dir.join("precious")).unwrap(), b"keep me");
    }
    // Well formed but never made by Terna: no such volume.
    let (c, _) = unstage(&mut csi, "fake-vol-id-0123456789", &staging).await;
    assert_eq!(c, Code::NotFound);
    let (c, _) = stats(
        &mut csi,
        "fake-vol-id-0123456789",
        &staging.to_string_lossy(),
    )
    .await;
    assert_eq!(c, Code::NotFound);
    // The controller side says the same of malformed ids.
    let got = csi
        .controller
        .controller_get_volume(pb::ControllerGetVolumeRequest {
            volume_id: "a\0b".into(),
        })
        .await;
    assert_eq!(code(got).0, Code::InvalidArgument);
    let created = csi
        .create(&"n".repeat(4096), MIB, &[], mount_cap("ext4"))
        .await;
    assert_eq!(code(created).0, Code::InvalidArgument);
    terna.stop_and_check_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_block_volume_is_never_torn_down_under_its_pod() {
    if !common::require_root("a_published_block_volume_is_never_torn_down_under_its_pod") {
        return;
    }
    let terna = common::Standalone::start();
    let mut csi = Csi::connect(&terna.socket).await;
    let root = terna.dir.path();
    let id = create(&mut csi, "pod-a", 16, "1", block_cap()).await;
    let staging = root.join("staging-a");
    let target = root.join("pods/a/dev");
    csi.stage(&id, &staging, block_cap()).await;
    csi.publish(&id, &staging, &target, block_cap()).await;
    let data = common::content(7, 64 << 10);
    write_direct(&target, 0, &data);

    // Not its staging path, and still published at its own: both refused.
    let (c, message) = unstage(&mut csi, &id, &root.join("elsewhere")).await;
    assert_eq!(c, Code::FailedPrecondition, "{message}");
    assert!(message.contains(&*staging.to_string_lossy()), "{message}");
    let (c, message) = unstage(&mut csi, &id, &staging).await;
    assert_eq!(c, Code::FailedPrecondition, "{message}");
    assert!(message.contains(&*target.to_string_lossy()), "{message}");

    // Another volume staged now must not inherit the pod's device.
    let other = create(&mut csi, "pod-b", 16, "1", block_cap()).await;
    let other_staging = root.join("staging-b");
    csi.stage(&other, &other_staging, block_cap()).await;
    assert_eq!(read_direct(&target, 0, data.len()).unwrap(), data);

    csi.unpublish(&id, &target).await;
    csi.unstage(&id, &staging).await;
    csi.unstage(&other, &other_staging).await;
    csi.delete(&id).await;
    csi.delete(&other).await;
    terna.stop_and_check_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_that_were_never_the_volumes_are_left_alone() {
    if !common::require_root("paths_that_were_never_the_volumes_are_left_alone") {
        return;
    }
    let terna = common::Standalone::start();
    let mut csi = Csi::connect(&terna.socket).await;
    let root = terna.dir.path();
    let id = create(&mut csi, "paths", 16, "1", mount_cap("ext4")).await;

    // Unstaged volume: an empty directory and a tmpfs at paths it never used.
    let empty = root.join("never-published");
    std::fs::create_dir_all(&empty).unwrap();
    let (c, m) = unpublish(&mut csi, &id, &empty).await;
    assert_eq!(c, Code::Ok, "{m}");
    assert!(
        empty.is_dir(),
        "unpublish removed a directory the volume never published"
    );
    let foreign = root.join("foreign-tmpfs");
    tmpfs_at(&foreign);
    std::fs::write(foreign.join("data"), b"not terna's").unwrap();
    let (c, m) = unpublish(&mut csi, &id, &foreign).await;
    assert_eq!(c, Code::Ok, "{m}");
    let (c, m) = unstage(&mut csi, &id, &foreign).await;
    assert_eq!(c, Code::Ok, "{m}");
    assert_eq!(
        mounted(&foreign).map(|m| m.fs_type),
        Some("tmpfs".to_string())
    );

    // Staging where something else is mounted is refused, not faked.
    let (c, m) = stage(&mut csi, &id, &foreign, mount_cap("ext4")).await;
    assert_eq!(c, Code::FailedPrecondition, "{m}");
    assert!(m.contains("tmpfs"), "{m}");
    assert_eq!(std::fs::read(foreign.join("data")).unwrap(), b"not terna's");

    // Staged and published: a foreign mount at another target stays, and a
    // tmpfs stacked on the volume's own target is not unmounted either.
    let staging = root.join("staging");
    csi.stage(&id, &staging, mount_cap("ext4")).await;
    let target = root.join("pods/p/volume");
    let (c, m) = publish(&mut csi, &id, &staging, &foreign, mount_cap("ext4"), false).await;
    assert_eq!(c, Code::FailedPrecondition, "{m}");
    assert_eq!(
        mounted(&foreign).map(|m| m.fs_type),
        Some("tmpfs".to_string())
    );
    csi.publish(&id, &staging, &target, mount_cap("ext4")).await;

    // Same target, read-only flipped: incompatible, not OK.
    let (c, m) = publish(&mut csi, &id, &staging, &target, mount_cap("ext4"), true).await;
    assert_eq!(c, Code::AlreadyExists, "{m}");
    let (c, _) = publish(&mut csi, &id, &staging, &target, mount_cap("ext4"), false).await;
    assert_eq!(c, Code::Ok);
    // A target with `..` could never be unpublished by the path it names.
    let climbing = format!("{}/pods/../pods/q", root.display());
    let (c, _) = publish(
        &mut csi,
        &id,
        &staging,
        Path::new(&climbing),
        mount_cap("ext4"),
        false,
    )
    .await;
    assert_eq!(c, Code::InvalidArgument);

    // Stats only where the volume is.
    for path in ["/", &*foreign.to_string_lossy(), &*empty.to_string_lossy()] {
        let (c, m) = stats(&mut csi, &id, path).await;
        assert!(
            c == Code::NotFound || c == Code::InvalidArgument,
            "stats at {path}: {c:?} {m}"
        );
    }
    assert_eq!(
        stats(&mut csi, &id, &target.to_string_lossy()).await.0,
        Code::Ok
    );
    assert_eq!(
        stats(&mut csi, &id, &staging.to_string_lossy()).await.0,
        Code::Ok
    );

    csi.unpublish(&id, &target).await;
    csi.unstage(&id, &staging).await;
    assert!(mounted(&foreign).is_some());
    nix::mount::umount2(&foreign, nix::mount::MntFlags::empty()).unwrap();
    csi.delete(&id).await;
    terna.stop_and_check_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_over_a_dead_engine_restages_and_io_works() {
    if !common::require_root("staging_over_a_dead_engine_restages_and_io_works") {
        return;
    }
    let terna = common::Standalone::start();
    let mut csi = Csi::connect(&terna.socket).await;
    let root = terna.dir.path();
    let id = create(&mut csi, "dead-engine", 32, "3", mount_cap("ext4")).await;
    let staging = root.join("staging");
    csi.stage(&id, &staging, mount_cap("ext4")).await;
    let data = common::content(3, 256 << 10);
    let sum = common::write_synced(&staging.join("file"), &data);

    // The engine's supervisor and worker die (the whole process group).
    kill_engine(&terna, &id);

    // The kubelet stages again: OK must mean the volume works.
    let (c, m) = stage(&mut csi, &id, &staging, mount_cap("ext4")).await;
    assert_eq!(c, Code::Ok, "{m}");
    let back = std::fs::read(staging.join("file")).unwrap();
    use sha2::Digest;
    assert_eq!(sha2::Sha256::digest(&back).to_vec(), sum);
    common::write_synced(&staging.join("after"), b"written after restage");

    csi.unstage(&id, &staging).await;
    csi.delete(&id).await;
    terna.stop_and_check_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_engine_under_a_published_volume_is_reported_not_hidden() {
    if !common::require_root("a_dead_engine_under_a_published_volume_is_reported_not_hidden") {
        return;
    }
    let terna = common::Standalone::start();
    let mut csi = Csi::connect(&terna.socket).await;
    let root = terna.dir.path();
    let id = create(&mut csi, "dead-published", 16, "1", block_cap()).await;
    let staging = root.join("staging");
    let target = root.join("pods/x/dev");
    csi.stage(&id, &staging, block_cap()).await;
    csi.publish(&id, &staging, &target, block_cap()).await;
    kill_engine(&terna, &id);
    let (c, m) = stage(&mut csi, &id, &staging, block_cap()).await;
    assert_eq!(c, Code::FailedPrecondition, "{m}");
    assert!(m.contains(&*target.to_string_lossy()), "{m}");
    // The way out the message names works.
    csi.unpublish(&id, &target).await;
    csi.unstage(&id, &staging).await;
    csi.stage(&id, &staging, block_cap()).await;
    csi.unstage(&id, &staging).await;
    csi.delete(&id).await;
    terna.stop_and_check_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requisite_topology_naming_an_unknown_node_is_resource_exhausted() {
    if !common::require_root("requisite_topology_naming_an_unknown_node_is_resource_exhausted") {
        return;
    }
    let terna = common::Standalone::start();
    let mut csi = Csi::connect(&terna.socket).await;
    let topology = |node: &str| pb::Topology {
        segments: [(terna::TOPOLOGY_NODE_KEY.to_string(), node.to_string())].into(),
    };
    let request = |name: &str, node: &str| pb::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: MIB,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap("ext4")],
        accessibility_requirements: Some(pb::TopologyRequirement {
            requisite: vec![topology(node)],
            preferred: vec![topology(node)],
        }),
        ..Default::default()
    };
    let got = csi
        .controller
        .create_volume(request("nowhere", "no-such-node"))
        .await;
    let (c, m) = code(got);
    assert_eq!(c, Code::ResourceExhausted, "{m}");
    assert!(m.contains("test-node"), "{m}");
    let made = csi
        .controller
        .create_volume(request("here", "test-node"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    csi.delete(&made.volume_id).await;
    terna.stop_and_check_clean();
}

fn spawn_standalone(data_dir: &Path, endpoint: &Path, log: &Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_terna"))
        .arg("standalone")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--endpoint")
        .arg(format!("unix://{}", endpoint.display()))
        .arg("--node-id")
        .arg("test-node")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

fn exits_within(child: &mut std::process::Child, secs: u64) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_is_a_file_and_a_second_process_on_a_data_dir_are_refused() {
    if !common::require_root(
        "an_endpoint_that_is_a_file_and_a_second_process_on_a_data_dir_are_refused",
    ) {
        return;
    }
    let terna = common::Standalone::start();
    let root = terna.dir.path();

    // --endpoint naming a regular file: refused, file intact.
    let file = root.join("notes.txt");
    std::fs::write(&file, b"my notes").unwrap();
    let mut other = spawn_standalone(&root.join("data-2"), &file, &root.join("file.log"));
    let status = exits_within(&mut other, 30).expect("terna kept running on a file endpoint");
    assert!(!status.success());
    assert_eq!(std::fs::read(&file).unwrap(), b"my notes");
    let log = std::fs::read_to_string(root.join("file.log")).unwrap();
    assert!(log.contains("not a socket"), "{log}");

    // A second standalone on the first one's data dir: refused before it
    // touches the first one's socket.
    let mut second = spawn_standalone(&terna.data_dir, &terna.socket, &root.join("second.log"));
    let status = exits_within(&mut second, 30).expect("a second terna ran on the same data dir");
    assert!(!status.success());
    let log = std::fs::read_to_string(root.join("second.log")).unwrap();
    assert!(log.contains("in use"), "{log}");
    let mut csi = Csi::connect(&terna.socket).await;
    csi.identity
        .probe(pb::ProbeRequest {})
        .await
        .expect("the first terna no longer answers on its socket");
    terna.stop_and_check_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_claim_left_by_a_killed_process_is_released_at_start() {
    if !common::require_root("a_repair_claim_left_by_a_killed_process_is_released_at_start") {
        return;
    }
    let mut terna = common::Standalone::start();
    let id = {
        let mut csi = Csi::connect(&terna.socket).await;
        csi.create("claimed", 16 * MIB, &[("replicas", "1")], mount_cap("ext4"))
            .await
            .unwrap()
            .volume_id
    };
    terna.kill_hard();
    // What a process killed in the middle of a repair leaves in the record.
    let store = terna::datapath::host::files::FileStore::open(&terna::core::data_dir::state_dir(
        &terna.data_dir,
    ))
    .unwrap();
    use terna::core::store::StateStore;
    store
        .update(&id, &mut |r| {
            r.claim_repair("test-node");
            Ok(true)
        })
        .unwrap();
    terna.restart();
    let mut csi = Csi::connect(&terna.socket).await;
    let staging = terna.dir.path().join("staging");
    let (c, m) = stage(&mut csi, &id, &staging, mount_cap("ext4")).await;
    assert_eq!(c, Code::Ok, "{m}");
    csi.unstage(&id, &staging).await;
    csi.delete(&id).await;
    terna.stop_and_check_clean();
}

/// An MBR with one Linux partition, as a Block-mode user would write.
fn partition_table() -> Vec<u8> {
    let mut mbr = vec![0u8; 4096];
    mbr[446 + 4] = 0x83;
    mbr[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
    mbr[446 + 12..446 + 16].copy_from_slice(&8192u32.to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    mbr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_block_volume_is_never_formatted() {
    if !common::require_root("a_partitioned_block_volume_is_never_formatted") {
        return;
    }
    let terna = common::Standalone::start();
    let mut csi = Csi::connect(&terna.socket).await;
    let root = terna.dir.path();
    let id = create(&mut csi, "partitioned", 16, "1", block_cap()).await;
    let staging = root.join("staging");
    let target = root.join("pods/p/dev");
    csi.stage(&id, &staging, block_cap()).await;
    csi.publish(&id, &staging, &target, block_cap()).await;
    let data = common::content(11, 1 << 20);
    write_direct(&target, 0, &partition_table());
    write_direct(&target, 2 << 20, &data);
    csi.unpublish(&id, &target).await;
    csi.unstage(&id, &staging).await;

    let (c, m) = stage(&mut csi, &id, &staging, mount_cap("ext4")).await;
    assert_eq!(c, Code::FailedPrecondition, "{m}");
    assert!(m.contains("partition table"), "{m}");
    let _ = unstage(&mut csi, &id, &staging).await;
    csi.stage(&id, &staging, block_cap()).await;
    csi.publish(&id, &staging, &target, block_cap()).await;
    assert_eq!(read_direct(&target, 2 << 20, data.len()).unwrap(), data);
    assert_eq!(read_direct(&target, 0, 4096).unwrap(), partition_table());
    csi.unpublish(&id, &target).await;
    csi.unstage(&id, &staging).await;
    csi.delete(&id).await;
    terna.stop_and_check_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_that_would_shadow_terna_or_lead_elsewhere_are_refused() {
    if !common::require_root("targets_that_would_shadow_terna_or_lead_elsewhere_are_refused") {
        return;
    }
    let terna = common::Standalone::start();
    let mut csi = Csi::connect(&terna.socket).await;
    let root = terna.dir.path();
    let id = create(&mut csi, "shadow", 16, "1", mount_cap("ext4")).await;
    // Above the data dir, or a pool: the volume would hide Terna's state.
    for path in [root.to_path_buf(), terna.data_dir.join("pools/disk-1")] {
        let (c, m) = stage(&mut csi, &id, &path, mount_cap("ext4")).await;
        assert_eq!(c, Code::InvalidArgument, "{}: {m}", path.display());
    }
    // A staging path that is a file: refused before the volume is claimed.
    let file = root.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let (c, m) = stage(&mut csi, &id, &file, mount_cap("ext4")).await;
    assert_eq!(c, Code::InvalidArgument, "{m}");

    let staging = root.join("staging");
    csi.stage(&id, &staging, mount_cap("ext4")).await;
    // Staged as ext4: asking for xfs or a block device is not the same request.
    let (c, m) = stage(&mut csi, &id, &staging, mount_cap("xfs")).await;
    assert_eq!(c, Code::AlreadyExists, "{m}");
    let (c, m) = stage(&mut csi, &id, &staging, block_cap()).await;
    assert_eq!(c, Code::AlreadyExists, "{m}");
    // Its raw device under its mounted filesystem: refused.
    let (c, m) = publish(
        &mut csi,
        &id,
        &staging,
        &root.join("raw"),
        block_cap(),
        false,
    )
    .await;
    assert_eq!(c, Code::FailedPrecondition, "{m}");

    // A target through a symlink would be mounted where the link leads.
    let real = root.join("real-target");
    std::fs::create_dir_all(&real).unwrap();
    let link = root.join("link-target");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let (c, m) = publish(&mut csi, &id, &staging, &link, mount_cap("ext4"), false).await;
    assert_eq!(c, Code::InvalidArgument, "{m}");
    assert!(
        !m.contains(&*real.to_string_lossy()),
        "says where the link leads: {m}"
    );
    assert!(mounted(&real).is_none());

    // A target that exists as the wrong kind of file is refused and kept.
    let empty_file = root.join("empty-file");
    std::fs::write(&empty_file, b"").unwrap();
    let (c, m) = publish(
        &mut csi,
        &id,
        &staging,
        &empty_file,
        mount_cap("ext4"),
        false,
    )
    .await;
    assert_eq!(c, Code::InvalidArgument, "{m}");
    assert!(empty_file.is_file());

    // readonly with `rw` among the flags stays read-only.
    let ro = root.join("pods/ro");
    let mut cap = mount_cap("ext4");
    if let Some(pb::volume_capability::AccessType::Mount(m)) = &mut cap.access_type {
        m.mount_flags = vec!["rw".into()];
    }
    let (c, m) = publish(&mut csi, &id, &staging, &ro, cap, true).await;
    assert_eq!(c, Code::Ok, "{m}");
    assert!(mounted(&ro).unwrap().read_only());
    assert!(std::fs::write(ro.join("x"), b"x").is_err());
    csi.unpublish(&id, &ro).await;

    // Flags that would make the host panic or stack another device.
    for flag in ["errors=panic", "loop", "journal_path=/dev/sda"] {
        let mut cap = mount_cap("ext4");
        if let Some(pb::volume_capability::AccessType::Mount(m)) = &mut cap.access_type {
            m.mount_flags = vec![flag.into()];
        }
        let (c, m) = publish(&mut csi, &id, &staging, &root.join("pods/f"), cap, false).await;
        assert_eq!(c, Code::InvalidArgument, "{flag}: {m}");
    }
    csi.unstage(&id, &staging).await;
    csi.delete(&id).await;
    terna.stop_and_check_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_over_a_dead_engine_is_refused() {
    if !common::require_root("publishing_over_a_dead_engine_is_refused") {
        return;
    }
    let terna = common::Standalone::start();
    let mut csi = Csi::connect(&terna.socket).await;
    let root = terna.dir.path();
    let id = create(&mut csi, "dead-publish", 16, "1", block_cap()).await;
    let staging = root.join("staging");
    csi.stage(&id, &staging, block_cap()).await;
    kill_engine(&terna, &id);
    let target = root.join("pods/x/dev");
    let (c, m) = publish(&mut csi, &id, &staging, &target, block_cap(), false).await;
    assert_eq!(c, Code::FailedPrecondition, "{m}");
    csi.stage(&id, &staging, block_cap()).await;
    csi.publish(&id, &staging, &target, block_cap()).await;
    read_direct(&target, 0, 4096).unwrap();
    csi.unpublish(&id, &target).await;
    csi.unstage(&id, &staging).await;
    csi.delete(&id).await;
    terna.stop_and_check_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_socket_is_never_taken_over() {
    if !common::require_root("a_live_socket_is_never_taken_over") {
        return;
    }
    let terna = common::Standalone::start();
    let root = terna.dir.path();
    let mut intruder =
        spawn_standalone(&root.join("other-data"), &terna.socket, &root.join("i.log"));
    let status = exits_within(&mut intruder, 30).expect("a second terna took over a live socket");
    assert!(!status.success());
    let log = std::fs::read_to_string(root.join("i.log")).unwrap();
    assert!(log.contains("in use"), "{log}");
    let mut csi = Csi::connect(&terna.socket).await;
    csi.identity.probe(pb::ProbeRequest {}).await.unwrap();
    terna.stop_and_check_clean();
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_staged_volume_leaves_on_disk_is_roots_only() {
    if !common::require_root("what_a_staged_volume_leaves_on_disk_is_roots_only") {
        return;
    }
    let mut terna = common::Standalone::start();
    let config = terna.data_dir.join("terna.toml");
    std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    terna.restart();
    assert_eq!(mode(&config), 0o600, "an old terna.toml was not tightened");
    assert_eq!(mode(&terna.data_dir.join("terna.lock")), 0o600);
    let mut csi = Csi::connect(&terna.socket).await;
    let id = create(&mut csi, "private", 16, "3", mount_cap("ext4")).await;
    let staging = terna.dir.path().join("staging");
    csi.stage(&id, &staging, mount_cap("ext4")).await;
    let run = terna.data_dir.join("run");
    for dir in [
        run.clone(),
        run.join(&id),
        terna.data_dir.join("dirty").join(&id),
    ] {
        assert_eq!(
            mode(&dir) & 0o077,
            0,
            "{} is {:o}",
            dir.display(),
            mode(&dir)
        );
    }
    assert_eq!(mode(&run.join(&id).join("engine.log")), 0o600);
    csi.unstage(&id, &staging).await;
    csi.delete(&id).await;
    terna.stop_and_check_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_first_stage_leaves_the_volume_free() {
    if !common::require_root("a_failed_first_stage_leaves_the_volume_free") {
        return;
    }
    let terna = common::Standalone::start();
    let mut csi = Csi::connect(&terna.socket).await;
    let root = terna.dir.path();
    let id = create(&mut csi, "fails-first", 16, "1", mount_cap("ext4")).await;
    // 16 MiB is too small for xfs: refused after the claim was taken.
    let first = root.join("first");
    let (c, m) = stage(&mut csi, &id, &first, mount_cap("xfs")).await;
    assert_eq!(c, Code::FailedPrecondition, "{m}");
    assert!(mounted(&first).is_none());
    // Nothing holds it: staging elsewhere and deleting afterwards both work.
    let staging = root.join("staging");
    let (c, m) = stage(&mut csi, &id, &staging, mount_cap("ext4")).await;
    assert_eq!(c, Code::Ok, "{m}");
    csi.unstage(&id, &staging).await;
    csi.delete(&id).await;
    terna.stop_and_check_clean();
}

/// A second volume's staging path or pod target inside (or above) the
/// first one's staging mount or pod target: the mount would land in the
/// first volume's filesystem, where its pod sees it and its unstage finds
/// a mount under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_is_never_mounted_inside_or_above_another() {
    if !common::require_root("a_volume_is_never_mounted_inside_or_above_another") {
        return;
    }
    let terna = common::Standalone::start();
    let mut csi = Csi::connect(&terna.socket).await;
    let root = terna.dir.path();
    let a = create(&mut csi, "nest-a", 16, "1", mount_cap("ext4")).await;
    let b = create(&mut csi, "nest-b", 16, "1", mount_cap("ext4")).await;
    let (staging_a, target_a) = (root.join("a/staging"), root.join("pods/1/a"));
    csi.stage(&a, &staging_a, mount_cap("ext4")).await;
    csi.publish(&a, &staging_a, &target_a, mount_cap("ext4"))
        .await;

    for staging_b in [staging_a.join("b"), target_a.join("b"), root.join("a")] {
        let (c, m) = stage(&mut csi, &b, &staging_b, mount_cap("ext4")).await;
        assert_eq!(c, Code::InvalidArgument, "{}: {m}", staging_b.display());
        assert!(m.contains(&a), "{m}");
        assert!(mounted(&staging_b).is_none());
    }
    let staging_b = root.join("b/staging");
    csi.stage(&b, &staging_b, mount_cap("ext4")).await;
    for target_b in [staging_a.join("t"), target_a.join("t"), root.join("pods/1")] {
        let (c, m) = publish(
            &mut csi,
            &b,
            &staging_b,
            &target_b,
            mount_cap("ext4"),
            false,
        )
        .await;
        assert_eq!(c, Code::InvalidArgument, "{}: {m}", target_b.display());
        assert!(m.contains(&a), "{m}");
        assert!(mounted(&target_b).is_none());
    }
    // Nor a volume inside its own staging mount.
    let (c, m) = publish(
        &mut csi,
        &a,
        &staging_a,
        &staging_a.join("t"),
        mount_cap("ext4"),
        false,
    )
    .await;
    assert_eq!(c, Code::InvalidArgument, "{m}");
    // Its own paths again are repeated calls, and side by side is fine.
    csi.stage(&a, &staging_a, mount_cap("ext4")).await;
    csi.publish(&a, &staging_a, &target_a, mount_cap("ext4"))
        .await;
    let target_b = root.join("pods/1/b");
    csi.publish(&b, &staging_b, &target_b, mount_cap("ext4"))
        .await;
    std::fs::write(target_b.join("f"), b"b").unwrap();
    assert!(!target_a.join("f").exists() && !staging_a.join("t").exists());

    csi.unpublish(&b, &target_b).await;
    csi.unstage(&b, &staging_b).await;
    csi.unpublish(&a, &target_a).await;
    csi.unstage(&a, &staging_a).await;
    csi.delete(&a).await;
    csi.delete(&b).await;
    terna.stop_and_check_clean();
}

/// A restage asking for other mount flags than the filesystem was staged
/// with is not the same request: the caller would believe it got them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restaging_with_other_mount_flags_is_already_exists() {
    if !common::require_root("restaging_with_other_mount_flags_is_already_exists") {
        return;
    }
    let terna = common::Standalone::start();
    let mut csi = Csi::connect(&terna.socket).await;
    let root = terna.dir.path();
    let with_flags = |flags: &[&str]| {
        let mut cap = mount_cap("ext4");
        if let Some(pb::volume_capability::AccessType::Mount(m)) = cap.access_type.as_mut() {
            m.mount_flags = flags.iter().map(|f| f.to_string()).collect();
        }
        cap
    };
    let id = create(&mut csi, "flags", 16, "1", mount_cap("ext4")).await;
    let staging = root.join("staging");
    csi.stage(&id, &staging, with_flags(&["noatime", "nodiratime"]))
        .await;
    assert!(mounted(&staging).unwrap().options.contains("noatime"));
    // The same set in another order is the same request.
    csi.stage(&id, &staging, with_flags(&["nodiratime", "noatime"]))
        .await;
    for other in [&["noatime"][..], &[], &["noatime", "nodiratime", "sync"]] {
        let (c, m) = stage(&mut csi, &id, &staging, with_flags(other)).await;
        assert_eq!(c, Code::AlreadyExists, "{other:?}: {m}");
        assert!(m.contains("noatime, nodiratime"), "{m}");
    }
    assert!(mounted(&staging).is_some(), "nothing was torn down");
    csi.unstage(&id, &staging).await;
    csi.stage(&id, &staging, with_flags(&["sync"])).await;
    csi.unstage(&id, &staging).await;
    csi.delete(&id).await;
    terna.stop_and_check_clean();
}

/// A process that holds `device` open until it is killed (`exec sleep`
/// keeps the shell's descriptor), or `for_secs` passed; returns once it
/// has the device open.
fn hold_open(device: &str, for_secs: u32) -> std::process::Child {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("exec 3<\"$1\"; echo held; exec sleep \"$2\"")
        .arg("sh")
        .arg(device)
        .arg(for_secs.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = [0u8; 5];
    child.stdout.take().unwrap().read_exact(&mut line).unwrap();
    assert_eq!(&line, b"held\n");
    child
}

fn recorded_device(terna: &common::Standalone, id: &str) -> String {
    std::fs::read_to_string(terna.data_dir.join("run").join(id).join("device"))
        .unwrap()
        .trim()
        .to_string()
}

/// The device is no longer attached to anything of this test's (another
/// test may have taken its number up since).
fn assert_detached(terna: &common::Standalone, device: &str) {
    let name = device.trim_start_matches("/dev/");
    let backing =
        std::fs::read_to_string(Path::new("/sys/block").join(name).join("loop/backing_file"));
    if let Ok(b) = backing {
        assert!(
            !Path::new(b.trim()).starts_with(terna.dir.path()) && b.trim() != "/volume",
            "{device} still attached to {}",
            b.trim()
        );
    }
}

/// A process holding the volume's loop device open for 25 s while it is
/// unstaged (as udev's blkid does after an unmount, only slower, as on a
/// loaded machine; longer than the engine's 15 s to exit, which once hid
/// an unstage that gave up on the device): NodeUnstageVolume waits for the
/// last close, then answers OK with the device detached and the volume
/// free for another stage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loop_device_held_open_briefly_is_detached_before_unstage_answers() {
    if !common::require_root("a_loop_device_held_open_briefly_is_detached_before_unstage_answers") {
        return;
    }
    let terna = common::Standalone::start();
    let mut csi = Csi::connect(&terna.socket).await;
    let root = terna.dir.path();
    let id = create(&mut csi, "held", 16, "1", mount_cap("ext4")).await;
    let staging = root.join("staging");
    csi.stage(&id, &staging, mount_cap("ext4")).await;
    let device = recorded_device(&terna, &id);
    let mut holder = hold_open(&device, 25);
    let (c, m) = unstage(&mut csi, &id, &staging).await;
    assert_eq!(c, Code::Ok, "{m}");
    assert_detached(&terna, &device);
    assert!(mounted(&staging).is_none());
    holder.wait().unwrap();
    // Nothing holds the volume: it stages elsewhere and deletes.
    let elsewhere = root.join("elsewhere");
    csi.stage(&id, &elsewhere, mount_cap("ext4")).await;
    csi.unstage(&id, &elsewhere).await;
    csi.delete(&id).await;
    terna.stop_and_check_clean();
}

/// A device that never lets go fails NodeUnstageVolume with Unavailable
/// naming the process holding it, and the volume stays claimed; the retry
/// finds the device the first call left waiting for its last close and
/// finishes once the holder goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loop_device_that_never_lets_go_fails_unstage_until_a_retry_finishes() {
    if !common::require_root(
        "a_loop_device_that_never_lets_go_fails_unstage_until_a_retry_finishes",
    ) {
        return;
    }
    let terna = common::Standalone::start();
    let mut csi = Csi::connect(&terna.socket).await;
    let root = terna.dir.path();
    let id = create(&mut csi, "stuck", 16, "1", block_cap()).await;
    let staging = root.join("staging");
    csi.stage(&id, &staging, block_cap()).await;
    let device = recorded_device(&terna, &id);
    let mut holder = hold_open(&device, 3600);
    let (c, m) = unstage(&mut csi, &id, &staging).await;
    assert_eq!(c, Code::Unavailable, "{m}");
    assert!(
        m.contains(&format!("process {} (sleep)", holder.id())),
        "{m}"
    );
    let (c, m) = stage(&mut csi, &id, &root.join("elsewhere"), block_cap()).await;
    assert_eq!(c, Code::FailedPrecondition, "still claimed: {m}");

    let pid = nix::unistd::Pid::from_raw(holder.id() as i32);
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(3));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    });
    let (c, m) = unstage(&mut csi, &id, &staging).await;
    assert_eq!(c, Code::Ok, "{m}");
    assert_detached(&terna, &device);
    killer.join().unwrap();
    holder.wait().unwrap();
    csi.stage(&id, &staging, block_cap()).await;
    csi.unstage(&id, &staging).await;
    csi.delete(&id).await;
    terna.stop_and_check_clean();
}

/// Another mount namespace (another node sharing this kernel, as the
/// nodes suite's do, or a container) with a loop device on a file at the
/// very path of this volume's FUSE file: the path reads the same from
/// here, but the device is not this node's. NodeUnstageVolume detaches
/// the volume's own device and leaves the stranger's attached (it once
/// took it for its own, and a node back from a crash waited a minute on
/// another node's mounted device, then tore it down under that node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_on_the_same_path_in_another_mount_namespace_is_not_touched() {
    if !common::require_root("a_device_on_the_same_path_in_another_mount_namespace_is_not_touched")
    {
        return;
    }
    let terna = common::Standalone::start();
    let mut csi = Csi::connect(&terna.socket).await;
    let root = terna.dir.path();
    let id = create(&mut csi, "twin", 16, "1", block_cap()).await;
    let staging = root.join("staging");
    csi.stage(&id, &staging, block_cap()).await;
    let own = recorded_device(&terna, &id);
    let fuse_dir = terna.data_dir.join("run").join(&id).join("fuse");
    let mut stranger = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            "set -e; mount -t tmpfs twin \"$1\"; truncate -s 16M \"$1/volume\"; \
             losetup -f --show \"$1/volume\"; exec sleep 3600",
        )
        .arg("sh")
        .arg(&fuse_dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(stranger.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let theirs = line.trim().to_string();
    assert!(theirs.starts_with("/dev/loop"), "losetup printed {line:?}");
    let backing = |dev: &str| {
        std::fs::read_to_string(
            Path::new("/sys/block")
                .join(dev.trim_start_matches("/dev/"))
                .join("loop/backing_file"),
        )
        .map(|b| b.trim().to_string())
    };
    assert_eq!(
        backing(&theirs).unwrap(),
        fuse_dir.join("volume").to_string_lossy(),
        "the stranger's device reads as this volume's path"
    );

    let (c, m) = unstage(&mut csi, &id, &staging).await;
    assert_eq!(c, Code::Ok, "{m}");
    assert_detached(&terna, &own);
    let still = backing(&theirs);
    let autoclear = std::fs::read_to_string(
        Path::new("/sys/block")
            .join(theirs.trim_start_matches("/dev/"))
            .join("loop/autoclear"),
    );
    stranger.kill().unwrap();
    stranger.wait().unwrap();
    let _ = Command::new("losetup").arg("-d").arg(&theirs).status();
    assert!(still.is_ok(), "the other namespace's {theirs} was detached");
    assert_eq!(
        autoclear.unwrap().trim(),
        "0",
        "the other namespace's {theirs} was set to detach at its last close"
    );
    csi.delete(&id).await;
    terna.stop_and_check_clean();
}

/// After a reboot (the node's mounts, loop devices and engines gone, its
/// claim still in the store), a NodeStage refused once it had started the
/// engine and attached the device (the filesystem will not mount with the
/// flags asked) stops the engine, detaches the device, unmounts the FUSE
/// session and releases the claim: nothing is left, and the volume stages
/// elsewhere with its data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_refused_after_the_engine_started_leaves_nothing_behind() {
    if !common::require_root("a_stage_refused_after_the_engine_started_leaves_nothing_behind") {
        return;
    }
    let mut terna = common::Standalone::start();
    let mut csi = Csi::connect(&terna.socket).await;
    let root = terna.dir.path().to_path_buf();
    let id = create(&mut csi, "rebooted", 16, "1", mount_cap("ext4")).await;
    let staging = root.join("staging");
    csi.stage(&id, &staging, mount_cap("ext4")).await;
    let sum = common::write_synced(&staging.join("kept"), &common::content(3, 1 << 20));

    terna.kill_hard();
    common::cleanup(&root);
    assert!(
        common::leftovers(&root).is_empty(),
        "the reboot left things"
    );
    terna.restart();
    let mut csi = Csi::connect(&terna.socket).await;

    let mut cap = mount_cap("ext4");
    if let Some(pb::volume_capability::AccessType::Mount(m)) = &mut cap.access_type {
        m.mount_flags = vec!["no_such_ext4_option".into()];
    }
    let (c, m) = stage(&mut csi, &id, &staging, cap).await;
    assert_ne!(c, Code::Ok, "{m}");
    assert!(m.contains("mount"), "{m}");
    assert!(mounted(&staging).is_none());
    let left: Vec<String> = common::leftovers(&root)
        .into_iter()
        .filter(|l| !l.contains(" standalone "))
        .collect();
    assert!(left.is_empty(), "a refused stage left {left:#?}");
    assert!(
        !terna.data_dir.join("run").join(&id).exists(),
        "its run dir stayed"
    );

    let elsewhere = root.join("elsewhere");
    let (c, m) = stage(&mut csi, &id, &elsewhere, mount_cap("ext4")).await;
    assert_eq!(c, Code::Ok, "the claim stayed: {m}");
    let read = std::fs::read(elsewhere.join("kept")).unwrap();
    assert_eq!(
        <sha2::Sha256 as sha2::Digest>::digest(&read).to_vec(),
        sum,
        "data lost"
    );
    csi.unstage(&id, &elsewhere).await;
    csi.delete(&id).await;
    terna.stop_and_check_clean();
}
