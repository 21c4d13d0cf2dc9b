//! A checksummed writer and the checks around it, shared by the fault
//! tests (agents, NFS servers): what fsync acknowledged must read back.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use terna::proto::csi as pb;

use super::csi_client::Csi;

/// Writes checksummed files until stopped; remembers only what fsync acknowledged.
pub struct Writer {
    stop: Arc<AtomicBool>,
    pub written: Arc<AtomicU64>,
    acked: Arc<Mutex<HashMap<PathBuf, Vec<u8>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    pub fn start(dir: &Path) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let acked = Arc::new(Mutex::new(HashMap::new()));
        let (s, w, a, dir) = (
            stop.clone(),
            written.clone(),
            acked.clone(),
            dir.to_path_buf(),
        );
        let thread = std::thread::spawn(move || {
            let mut i = 0u64;
            while !s.load(Ordering::SeqCst) {
                // Reuse 64 names so the filesystem stays small and rewrites happen.
                let path = dir.join(format!("f{}", i % 64));
                let data: Vec<u8> = (0..256 * 1024u64)
                    .map(|b| (b * 131 + i * 7) as u8)
                    .collect();
                let mut f = std::fs::File::create(&path).unwrap();
                f.write_all(&data).unwrap();
                f.sync_all().unwrap();
                a.lock()
                    .unwrap()
                    .insert(path, Sha256::digest(&data).to_vec());
                w.fetch_add(data.len() as u64, Ordering::SeqCst);
                i += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Writer {
            stop,
            written,
            acked,
            thread: Some(thread),
        }
    }

    pub fn stop(&mut self) -> HashMap<PathBuf, Vec<u8>> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("writer saw an I/O error");
        }
        self.acked.lock().unwrap().clone()
    }
}

pub fn verify(sums: &HashMap<PathBuf, Vec<u8>>) {
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    for (path, want) in sums {
        let got = Sha256::digest(std::fs::read(path).unwrap()).to_vec();
        assert_eq!(&got, want, "{} lost acknowledged data", path.display());
    }
}

pub async fn wait_condition(
    csi: &mut Csi,
    id: &str,
    abnormal: bool,
    what: &str,
) -> pb::VolumeCondition {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let c = csi.condition(id).await;
        if c.abnormal == abnormal {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: volume condition stayed {c:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn record(terna: &super::Standalone, id: &str) -> serde_json::Value {
    let text =
        std::fs::read_to_string(terna.data_dir.join(format!("state/volumes/{id}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}
