//! A 3-replica volume staged through the real engine, FUSE export and loop
//! device: checksummed data written through the mounted filesystem survives
//! the removal of one replica's file, and the volume reports itself degraded.
//! Needs root (mounts, loop devices, FUSE).

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::csi_client::Csi;
use sha2::{Digest, Sha256};
use terna::proto::csi as pb;

fn mount_cap() -> pb::VolumeCapability {
    common::csi_client::mount_cap("ext4")
}

fn write_files(dir: &Path, from: u64, count: u64, sums: &mut HashMap<PathBuf, Vec<u8>>) {
    use std::io::Write;
    for i in from..from + count {
        let path = dir.join(format!("file-{i}"));
        let data = common::content(i, 1 << 20);
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        sums.insert(path, Sha256::digest(&data).to_vec());
    }
}

fn verify(sums: &HashMap<PathBuf, Vec<u8>>) {
    for (path, want) in sums {
        let got = Sha256::digest(std::fs::read(path).unwrap()).to_vec();
        assert_eq!(&got, want, "{} reads back wrong", path.display());
    }
}

fn drop_caches() {
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_replica_file_loses_no_acknowledged_write() {
    if !common::require_root("removed_replica_file_loses_no_acknowledged_write") {
        return;
    }
    let terna = common::Standalone::start();
    let mut csi = Csi::connect(&terna.socket).await;

    let created = csi
        .controller
        .create_volume(pb::CreateVolumeRequest {
            name: "fault-test".into(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: 256 << 20,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount_cap()],
            parameters: HashMap::from([("replicas".to_string(), "3".to_string())]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let id = created.volume_id.clone();
    assert_eq!(created.capacity_bytes, 256 << 20);

    let staging = terna.dir.path().join("staging");
    let target = terna.dir.path().join("target");
    std::fs::create_dir_all(&staging).unwrap();
    csi.stage(&id, &staging, mount_cap()).await;
    csi.publish(&id, &staging, &target, mount_cap()).await;

    let mut sums = HashMap::new();
    write_files(&target, 0, 24, &mut sums);

    // Remove replica 1's file from under the running engine.
    let replica = terna.find_replica(&id, 1).expect("replica 1 file exists");
    std::fs::remove_file(&replica).unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    let condition = loop {
        let c = csi.condition(&id).await;
        if c.abnormal {
            break c;
        }
        assert!(Instant::now() < deadline, "volume never reported degraded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        condition.message.contains("2 of 3"),
        "{}",
        condition.message
    );
    assert!(
        condition.message.contains("replica 1"),
        "{}",
        condition.message
    );
    assert!(
        condition.message.contains("removed"),
        "{}",
        condition.message
    );

    // Still writable on the remaining replicas.
    write_files(&target, 24, 24, &mut sums);
    drop_caches();
    verify(&sums);

    let stats = csi
        .node
        .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.to_string_lossy().into_owned(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stats.volume_condition.unwrap().abnormal);

    // Restage: a fresh engine serves from the two healthy replicas only,
    // with nothing left in any cache.
    csi.unpublish(&id, &target).await;
    csi.unstage(&id, &staging).await;
    drop_caches();
    csi.stage(&id, &staging, mount_cap()).await;
    csi.publish(&id, &staging, &target, mount_cap()).await;
    verify(&sums);

    csi.unpublish(&id, &target).await;
    csi.unstage(&id, &staging).await;
    csi.controller
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: id.clone(),
            secrets: Default::default(),
        })
        .await
        .unwrap();
    assert!(
        terna.find_replica(&id, 0).is_none(),
        "replica files removed on delete"
    );
    terna.stop_and_check_clean();
}
