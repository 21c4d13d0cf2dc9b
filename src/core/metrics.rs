//! Prometheus metrics. Each engine counts its volume's I/O (operations,
//! bytes, latency histograms) and leaves a snapshot in its run dir every
//! second; the node process renders those snapshots and the volume records
//! (replica health, catch-up) as the text exposition format on /metrics.
//! Counting and rendering are pure; the file and HTTP parts are thin.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::core::volume::VolumeRecord;

/// Latency bucket bounds, seconds.
pub const BUCKETS: [f64; 12] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
];

#[derive(Default)]
pub struct Histogram {
    /// Per bucket (not cumulative), plus one for above the last bound.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            counts: self
                .counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
            sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HistogramSnapshot {
    pub counts: Vec<u64>,
    pub sum_seconds: f64,
}

#[derive(Clone, Copy)]
pub enum Op {
    Read,
    Write,
    Flush,
}

/// One volume's I/O counters, shared by the FUSE threads.
#[derive(Default)]
pub struct IoStats {
    ops: [AtomicU64; 3],
    bytes: [AtomicU64; 3],
    errors: [AtomicU64; 3],
    latency: [Histogram; 3],
}

impl IoStats {
    pub fn record(&self, op: Op, bytes: usize, elapsed: Duration, ok: bool) {
        let i = op as usize;
        self.ops[i].fetch_add(1, Ordering::Relaxed);
        self.bytes[i].fetch_add(bytes as u64, Ordering::Relaxed);
        if !ok {
            self.errors[i].fetch_add(1, Ordering::Relaxed);
        }
        self.latency[i].observe(elapsed);
    }

    pub fn snapshot(&self) -> IoSnapshot {
        let get = |a: &[AtomicU64; 3]| -> [u64; 3] {
            std::array::from_fn(|i| a[i].load(Ordering::Relaxed))
        };
        IoSnapshot {
            ops: get(&self.ops),
            bytes: get(&self.bytes),
            errors: get(&self.errors),
            latency: std::array::from_fn(|i| self.latency[i].snapshot()),
        }
    }
}

/// Read, write, flush; in that order in every array.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IoSnapshot {
    pub ops: [u64; 3],
    pub bytes: [u64; 3],
    pub errors: [u64; 3],
    pub latency: [HistogramSnapshot; 3],
}

const OPS: [&str; 3] = ["read", "write", "flush"];

/// Histogram sample lines for `name` with `labels` (`k="v",` pairs, may be
/// empty).
pub fn histogram_lines(name: &str, labels: &str, h: &HistogramSnapshot) -> String {
    let mut out = String::new();
    let mut cumulative = 0;
    for (b, bound) in BUCKETS.iter().enumerate() {
        cumulative += h.counts.get(b).copied().unwrap_or(0);
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{bound}\"}} {cumulative}");
    }
    let total: u64 = h.counts.iter().sum();
    let bare = labels.trim_end_matches(',');
    let bare = if bare.is_empty() {
        String::new()
    } else {
        format!("{{{bare}}}")
    };
    let _ = writeln!(
        out,
        "{name}_bucket{{{labels}le=\"+Inf\"}} {total}\n{name}_sum{bare} {}\n{name}_count{bare} {total}",
        h.sum_seconds
    );
    out
}

/// The exposition text for these volumes' I/O and these records' health.
pub fn render(io: &[(String, IoSnapshot)], records: &[VolumeRecord]) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, body: String| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        out.push_str(&body);
    };
    let per_op = |f: &dyn Fn(&IoSnapshot, usize) -> u64, name: &str| {
        let mut body = String::new();
        for (volume, s) in io {
            for (i, op) in OPS.iter().enumerate() {
                let _ = writeln!(
                    body,
                    "{name}{{volume=\"{volume}\",op=\"{op}\"}} {}",
                    f(s, i)
                );
            }
        }
        body
    };
    family(
        "terna_volume_ops_total",
        "counter",
        "I/O requests served by the volume's engine.",
        per_op(&|s, i| s.ops[i], "terna_volume_ops_total"),
    );
    family(
        "terna_volume_bytes_total",
        "counter",
        "Bytes read and written through the volume's engine.",
        per_op(&|s, i| s.bytes[i], "terna_volume_bytes_total"),
    );
    family(
        "terna_volume_errors_total",
        "counter",
        "I/O requests that failed (no healthy replica could serve them).",
        per_op(&|s, i| s.errors[i], "terna_volume_errors_total"),
    );
    let mut body = String::new();
    for (volume, s) in io {
        for (i, op) in OPS.iter().enumerate() {
            body += &histogram_lines(
                "terna_volume_latency_seconds",
                &format!("volume=\"{volume}\",op=\"{op}\","),
                &s.latency[i],
            );
        }
    }
    family(
        "terna_volume_latency_seconds",
        "histogram",
        "Latency of I/O requests as the engine served them.",
        body,
    );
    let mut body = String::new();
    for r in records {
        for (i, rep) in r.replicas.iter().enumerate() {
            let _ = writeln!(
                body,
                "terna_replica_healthy{{volume=\"{}\",replica=\"{i}\",pool=\"{}\",node=\"{}\"}} {}",
                r.id,
                rep.pool,
                rep.node,
                u8::from(rep.is_healthy())
            );
        }
    }
    family(
        "terna_replica_healthy",
        "gauge",
        "1 when the replica holds every acknowledged write, 0 while faulted.",
        body,
    );
    let mut body = String::new();
    for r in records {
        for (i, rep) in r.replicas.iter().enumerate() {
            if let Some(bytes) = rep.last_catch_up_bytes {
                let _ = writeln!(
                    body,
                    "terna_replica_last_catch_up_bytes{{volume=\"{}\",replica=\"{i}\"}} {bytes}",
                    r.id
                );
            }
        }
    }
    family(
        "terna_replica_last_catch_up_bytes",
        "gauge",
        "Bytes copied the last time the replica caught up or was rebuilt.",
        body,
    );
    out
}

/// Bytes each catching-up replica still has to copy: (volume, replica,
/// bytes).
pub fn render_catch_up(remaining: &[(String, usize, u64)]) -> String {
    let mut out = String::from(
        "# HELP terna_replica_catch_up_remaining_bytes Bytes a faulted replica still has to copy to rejoin (rebuild progress).\n# TYPE terna_replica_catch_up_remaining_bytes gauge\n",
    );
    for (volume, replica, bytes) in remaining {
        let _ = writeln!(
            out,
            "terna_replica_catch_up_remaining_bytes{{volume=\"{volume}\",replica=\"{replica}\"}} {bytes}"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_renders_in_the_exposition_format() {
        let stats = IoStats::default();
        stats.record(Op::Write, 4096, Duration::from_micros(70), true);
        stats.record(Op::Write, 4096, Duration::from_millis(2), true);
        stats.record(Op::Read, 512, Duration::from_secs(1), false);
        let snap = stats.snapshot();
        assert_eq!(snap.ops, [1, 2, 0]);
        assert_eq!(snap.bytes, [512, 8192, 0]);
        assert_eq!(snap.errors, [1, 0, 0]);
        let mut record = crate::core::volume::tests::record(2);
        record.fault_replica(1, "gone");
        let text = render(&[("tv-a".into(), snap)], &[record.clone()]);
        assert!(text.contains("terna_volume_bytes_total{volume=\"tv-a\",op=\"write\"} 8192"));
        assert!(text.contains(
            "terna_volume_latency_seconds_bucket{volume=\"tv-a\",op=\"write\",le=\"0.0001\"} 1"
        ));
        assert!(text.contains(
            "terna_volume_latency_seconds_bucket{volume=\"tv-a\",op=\"write\",le=\"+Inf\"} 2"
        ));
        assert!(text.contains(
            "terna_volume_latency_seconds_bucket{volume=\"tv-a\",op=\"read\",le=\"0.5\"} 0"
        ));
        assert!(text.contains(&format!(
            "terna_replica_healthy{{volume=\"{}\",replica=\"1\",pool=\"p1\",node=\"n\"}} 0",
            record.id
        )));
        // Every sample line is `name{labels} value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').unwrap();
            value.parse::<f64>().unwrap();
        }
    }
}
