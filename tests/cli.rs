//! `terna pools`, `terna volumes` and `terna status` on a standalone data
//! dir: what an admin reads, checked against what the data dir holds.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::Standalone;
use common::csi_client::{Csi, block_cap};

fn terna(args: &[&str], data_dir: &std::path::Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_terna"))
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "terna {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn pools_volumes_and_status_tell_the_story_of_a_data_dir() {
    let terna_proc = Standalone::start_with(|data| {
        std::fs::create_dir_all(data).unwrap();
        let mut config = terna::core::config::Config::default_standalone();
        // Keep the lost replica faulted (not replaced) while we look.
        config.replace_after_secs = 3600;
        std::fs::write(data.join("terna.toml"), toml::to_string(&config).unwrap()).unwrap();
    });
    let data = terna_proc.data_dir.clone();
    let mut csi = Csi::connect(&terna_proc.socket).await;
    let a = csi
        .create("alpha", 64 << 20, &[("replicas", "3")], block_cap())
        .await
        .unwrap();
    let b = csi
        .create("beta", 32 << 20, &[("replicas", "2")], block_cap())
        .await
        .unwrap();

    // Pools: three, each allocated what its replicas promise.
    let pools: serde_json::Value =
        serde_json::from_str(&terna(&["pools", "-o", "json"], &data)).unwrap();
    let pools = pools.as_array().unwrap();
    assert_eq!(pools.len(), 3);
    let allocated: u64 = pools
        .iter()
        .map(|p| p["allocated_bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(allocated, 3 * (64 << 20) + 2 * (32 << 20));
    assert!(pools.iter().all(|p| p["health"] == "Ready"));
    let table = terna(&["pools"], &data);
    assert!(
        table.starts_with("POOL") && table.contains("disk-1"),
        "{table}"
    );

    // Volumes: both healthy.
    let table = terna(&["volumes"], &data);
    assert!(
        table.contains(&a.volume_id) && table.contains("3/3"),
        "{table}"
    );
    assert!(
        table.contains(&b.volume_id) && table.contains("2/2"),
        "{table}"
    );
    let status = terna(&["status"], &data);
    assert!(status.contains("pools:   3/3 ready"), "{status}");
    assert!(status.contains("volumes: 2 (2 healthy)"), "{status}");

    // A replica file is lost: the volume turns degraded, with the reason
    // and how far its catch-up has come.
    std::fs::remove_file(terna_proc.find_replica(&a.volume_id, 1).unwrap()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let status = terna(&["status"], &data);
        if status.contains("1 degraded") {
            break status;
        }
        assert!(Instant::now() < deadline, "never degraded:\n{status}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(status.contains(&a.volume_id), "{status}");
    assert!(status.contains("replica 1"), "{status}");
    let volumes: serde_json::Value =
        serde_json::from_str(&terna(&["volumes", "-o", "json"], &data)).unwrap();
    let alpha = volumes
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] == a.volume_id.as_str())
        .unwrap()
        .clone();
    assert_eq!(alpha["state"], "degraded");
    assert_eq!(alpha["healthy_replicas"], 2);

    // A bad output format is refused, naming the choices.
    let out = Command::new(env!("CARGO_BIN_EXE_terna"))
        .args(["volumes", "-o", "yaml", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("table or json"));
    // A directory that is not a data dir says so.
    let out = Command::new(env!("CARGO_BIN_EXE_terna"))
        .args(["status", "--data-dir", "/nonexistent-terna"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a Terna data dir"));

    // The degraded volume may be held by the repair loop a moment.
    csi.delete_retrying(&a.volume_id).await;
    csi.delete(&b.volume_id).await;
    drop(csi);
    terna_proc.stop_and_check_clean();
}
