//! The node's metrics endpoint scraped while a volume takes I/O: the
//! exposition text parses, counts what was written, and reports every
//! replica's health; the probes answer.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use common::Standalone;
use common::csi_client::{Csi, block_cap};

fn get(addr: &str, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// `name{labels}` → value, for every sample line.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (key, value) = l.rsplit_once(' ').unwrap();
            (key.to_string(), value.parse::<f64>().unwrap())
        })
        .collect()
}

#[tokio::test]
async fn metrics_count_the_io_of_a_staged_volume_and_probes_answer() {
    common::assert_root("metrics");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let listen = addr.clone();
    let terna = Standalone::start_with(move |data| {
        std::fs::create_dir_all(data).unwrap();
        let mut config = terna::core::config::Config::default_standalone();
        config.metrics_listen = Some(listen.parse().unwrap());
        std::fs::write(data.join("terna.toml"), toml::to_string(&config).unwrap()).unwrap();
    });
    let mut csi = Csi::connect(&terna.socket).await;
    let vol = csi
        .create("measured", 64 << 20, &[("replicas", "3")], block_cap())
        .await
        .unwrap();
    let id = vol.volume_id;
    let staging = terna.dir.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let target = terna.dir.path().join("dev");
    csi.stage(&id, &staging, block_cap()).await;
    csi.publish(&id, &staging, &target, block_cap()).await;

    let (status, body) = get(&addr, "/healthz");
    assert_eq!(
        (status.as_str(), body.as_str()),
        ("HTTP/1.1 200 OK", "ok\n")
    );
    let (status, _) = get(&addr, "/readyz");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let (status, _) = get(&addr, "/nope");
    assert!(status.contains("404"), "{status}");

    // 8 MiB written with O_DIRECT through the block device.
    {
        let buf = terna::datapath::replica::aligned::AlignedBuf::copy_of(&vec![0x5a; 1 << 20]);
        let mut dev = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&target)
            .unwrap();
        for _ in 0..8 {
            dev.write_all(buf.as_slice()).unwrap();
        }
        dev.sync_all().unwrap();
    }
    let written = format!("terna_volume_bytes_total{{volume=\"{id}\",op=\"write\"}}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let metrics = loop {
        let (status, body) = get(&addr, "/metrics");
        assert_eq!(status, "HTTP/1.1 200 OK");
        let m = samples(&body);
        if m.get(&written).copied().unwrap_or(0.0) >= (8 << 20) as f64 {
            break m;
        }
        assert!(Instant::now() < deadline, "writes never counted:\n{body}");
        std::thread::sleep(Duration::from_millis(300));
    };
    let count =
        metrics[&format!("terna_volume_latency_seconds_count{{volume=\"{id}\",op=\"write\"}}")];
    assert!(count >= 8.0, "{count}");
    assert!(metrics[&format!("terna_volume_ops_total{{volume=\"{id}\",op=\"flush\"}}")] >= 1.0);
    let healthy: Vec<f64> = metrics
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("terna_replica_healthy{{volume=\"{id}\"")))
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(healthy, vec![1.0, 1.0, 1.0]);

    // A replica is lost: it shows unhealthy, and what it has to catch up
    // grows with what is written meanwhile.
    std::fs::remove_file(terna.find_replica(&id, 2).unwrap()).unwrap();
    {
        let buf = terna::datapath::replica::aligned::AlignedBuf::copy_of(&vec![0x6b; 1 << 20]);
        let mut dev = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&target)
            .unwrap();
        // Past the first replica check (each second) the file is noticed
        // gone; keep writing until the engine has faulted it.
        let deadline = Instant::now() + Duration::from_secs(20);
        let unhealthy = format!("terna_replica_healthy{{volume=\"{id}\",replica=\"2\",pool=\"");
        loop {
            dev.write_all(buf.as_slice()).unwrap();
            dev.sync_all().unwrap();
            let (_, body) = get(&addr, "/metrics");
            let m = samples(&body);
            let faulted = m
                .iter()
                .any(|(k, v)| k.starts_with(&unhealthy) && *v == 0.0);
            let remaining = m
                .get(&format!(
                    "terna_replica_catch_up_remaining_bytes{{volume=\"{id}\",replica=\"2\"}}"
                ))
                .copied()
                .unwrap_or(0.0);
            if faulted && remaining >= (1 << 20) as f64 {
                break;
            }
            assert!(Instant::now() < deadline, "loss never showed:\n{body}");
            std::thread::sleep(Duration::from_millis(300));
            dev.seek(std::io::SeekFrom::Start(0)).unwrap();
        }
    }

    csi.unpublish(&id, &target).await;
    csi.unstage(&id, &staging).await;
    csi.delete_retrying(&id).await;
    drop(csi);
    terna.stop_and_check_clean();
}
