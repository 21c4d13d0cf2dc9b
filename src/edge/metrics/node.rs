//! The node's /metrics and probes: the I/O snapshots the engines of this
//! node leave in their run dirs, with the health of those volumes (and, in
//! standalone, of every volume) from the state store.

use std::path::PathBuf;
use std::sync::Arc;

use crate::core::data_dir::{RunDir, run_root};
use crate::core::metrics::{IoSnapshot, render};
use crate::core::store::StateStore;
use crate::datapath::dirty_maps::DirtyMapFiles;

pub struct NodeMetrics {
    pub data_dir: PathBuf,
    pub store: Arc<dyn StateStore>,
    /// Standalone knows every volume; a cluster node reports the ones it
    /// stages.
    pub all_volumes: bool,
    /// The CSI socket; ready once it exists.
    pub socket: PathBuf,
}

impl NodeMetrics {
    fn snapshots(&self) -> Vec<(String, IoSnapshot)> {
        let mut out: Vec<(String, IoSnapshot)> = std::fs::read_dir(run_root(&self.data_dir))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let id = e.file_name().to_str()?.to_string();
                let bytes = std::fs::read(RunDir::at(e.path()).stats_file()).ok()?;
                Some((id, serde_json::from_slice(&bytes).ok()?))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

impl crate::edge::metrics::http::Probe for NodeMetrics {
    fn metrics(&self) -> String {
        let io = self.snapshots();
        let records = if self.all_volumes {
            self.store.list().unwrap_or_default()
        } else {
            io.iter()
                .filter_map(|(id, _)| self.store.get(id).ok().flatten())
                .collect()
        };
        let mut remaining = Vec::new();
        let maps = DirtyMapFiles::new(&self.data_dir);
        for r in &records {
            for (i, rep) in r.replicas.iter().enumerate() {
                if rep.is_healthy() {
                    continue;
                }
                if let Ok(Some(map)) = maps.load(&r.id, i) {
                    remaining.push((r.id.clone(), i, map.count() * map.region_size()));
                }
            }
        }
        render(&io, &records) + &crate::core::metrics::render_catch_up(&remaining)
    }

    fn ready(&self) -> Result<(), String> {
        if self.socket.exists() {
            Ok(())
        } else {
            Err(format!(
                "CSI socket {} not served yet",
                self.socket.display()
            ))
        }
    }
}
