//! What mutual TLS costs the remote replica data path: the same replica
//! agent and client (the library's, in one process, over loopback), once
//! with `Transport::Plain` (the protocol as it was before TLS) and once
//! with TLS 1.3, in alternating rounds of the same run; medians of each.
//! Throughput of 1 MiB writes and reads (one connection, and four at once,
//! as an engine's fan-out uses several) and latency of 4 KiB writes. The
//! replica lives in /dev/shm, so the figures are the network path's.
//! `bench/run` runs it; `--quick` makes it short. Results in
//! bench/results/agent-tls[-quick].md.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use terna::core::pool::{Pool, ReplicaIo};
use terna::datapath::agent::server::{AgentState, serve};
use terna::datapath::agent::transport::Transport;
use terna::datapath::replica::local::LocalPool;
use terna::datapath::replica::remote::{Client, RemotePool};
use terna::datapath::tls::Identity;
use terna::datapath::tls::ca::{CA_LIFETIME, CaSet};

const TOKEN: &[u8] = b"bench-agent-tls-token-0123456789";
const MIB: usize = 1 << 20;
const REPLICA: u64 = 256 << 20;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// An agent over `transport` with one pool in `dir`; a replica opened
/// through a client over the same kind of transport.
fn replica(dir: &std::path::Path, transport: Transport, client: Transport) -> Arc<dyn ReplicaIo> {
    let mut pools: BTreeMap<String, Box<dyn Pool>> = BTreeMap::new();
    pools.insert("p".into(), Box::new(LocalPool::new(dir, None).unwrap()));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(AgentState::new("bench-agent", TOKEN, transport, pools));
    std::thread::spawn(move || serve(listener, state));
    let client = Arc::new(Client::new(
        addr,
        "bench-agent",
        TOKEN,
        "bench-engine",
        Duration::from_secs(10),
        client,
    ));
    let pool = RemotePool::new(client, "p");
    let name = terna::core::volume::replica_file_name(
        &terna::core::volume::volume_id_for("agent-tls-bench"),
        0,
    );
    pool.create(&name, REPLICA).unwrap();
    Arc::from(pool.open(&name).unwrap())
}

/// MiB/s of 1 MiB writes (or reads) from `threads` threads for `secs`.
fn throughput(r: &Arc<dyn ReplicaIo>, threads: usize, write: bool, secs: f64) -> f64 {
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let moved: usize = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let r = r.clone();
                s.spawn(move || {
                    let mut buf = terna::datapath::replica::aligned::AlignedBuf::zeroed(MIB);
                    buf.as_mut_slice().fill(t as u8 + 1);
                    let slots = (REPLICA as usize / MIB / threads) as u64;
                    let (mut n, mut i) = (0usize, 0u64);
                    while Instant::now() < until {
                        let offset = ((t as u64 * slots) + i % slots) * MIB as u64;
                        if write {
                            r.write_at(buf.as_slice(), offset).unwrap();
                        } else {
                            r.read_at(buf.as_mut_slice(), offset).unwrap();
                        }
                        n += MIB;
                        i += 1;
                    }
                    n
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    moved as f64 / MIB as f64 / start.elapsed().as_secs_f64()
}

/// p50 and p99 of one 4 KiB write, µs, over `secs`.
fn latency(r: &Arc<dyn ReplicaIo>, secs: f64) -> (f64, f64) {
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let buf = terna::datapath::replica::aligned::AlignedBuf::copy_of(&[7u8; 4096]);
    let mut samples = Vec::new();
    let mut i = 0u64;
    while Instant::now() < until {
        let t = Instant::now();
        r.write_at(buf.as_slice(), (i % 4096) * 4096).unwrap();
        samples.push(t.elapsed().as_secs_f64() * 1e6);
        i += 1;
    }
    samples.sort_by(f64::total_cmp);
    (percentile(&samples, 50.0), percentile(&samples, 99.0))
}

#[derive(Default)]
struct Figures {
    write1: Vec<f64>,
    write4: Vec<f64>,
    read1: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
}

fn measure(r: &Arc<dyn ReplicaIo>, f: &mut Figures, secs: f64) {
    f.write1.push(throughput(r, 1, true, secs));
    f.write4.push(throughput(r, 4, true, secs));
    f.read1.push(throughput(r, 1, false, secs));
    let (p50, p99) = latency(r, secs);
    f.p50.push(p50);
    f.p99.push(p99);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("agent TLS benchmark: run it with bench/run");
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_default();
    let (rounds, secs) = if quick { (3, 1.0) } else { (5, 4.0) };
    let work = tempfile::Builder::new()
        .prefix("terna-bench-tls-")
        .tempdir_in("/dev/shm")
        .unwrap();
    let set = CaSet::create(terna::datapath::tls::unix_now(), CA_LIFETIME).unwrap();
    let tls = |name: &str| Transport::Tls(Identity::in_memory(name, set.clone()));
    let (plain_dir, tls_dir) = (work.path().join("plain"), work.path().join("tls"));
    std::fs::create_dir_all(&plain_dir).unwrap();
    std::fs::create_dir_all(&tls_dir).unwrap();
    let plain = replica(&plain_dir, Transport::Plain, Transport::Plain);
    let secure = replica(&tls_dir, tls("bench-agent"), tls("bench-engine"));
    let (mut p, mut t) = (Figures::default(), Figures::default());
    for round in 0..rounds {
        measure(&plain, &mut p, secs);
        measure(&secure, &mut t, secs);
        println!("round {} of {rounds} done", round + 1);
    }
    let row = |what: &str, plain: Vec<f64>, tls: Vec<f64>, unit: &str| {
        let (a, b) = (median(plain), median(tls));
        format!(
            "| {what} | {a:.0} {unit} | {b:.0} {unit} | {:.2} |\n",
            b / a
        )
    };
    let mut md = format!(
        "# Remote replica: plain TCP vs mutual TLS 1.3\n\n{} rounds of {secs} s per figure, alternating, medians; agent and client in one process over loopback, replica in /dev/shm, {} CPUs, load average {} at the start (both ends share the CPUs, so TLS pays encryption and decryption on each).\n\n| figure | plain | TLS | TLS / plain |\n|---|---|---|---|\n",
        rounds,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load
    );
    md += &row("1 MiB writes, 1 connection", p.write1, t.write1, "MiB/s");
    md += &row("1 MiB writes, 4 connections", p.write4, t.write4, "MiB/s");
    md += &row("1 MiB reads, 1 connection", p.read1, t.read1, "MiB/s");
    md += &row("4 KiB write latency p50", p.p50, t.p50, "µs");
    md += &row("4 KiB write latency p99", p.p99, t.p99, "µs");
    print!("{md}");
    let name = if quick {
        "agent-tls-quick"
    } else {
        "agent-tls"
    };
    let out =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("bench/results/{name}.md"));
    std::fs::write(&out, md).unwrap();
    println!("written: {}", out.display());
}
