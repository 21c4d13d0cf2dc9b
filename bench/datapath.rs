//! The benchmark driver behind `bench/run`: the same fio jobs on the raw
//! disk (a plain directory, direct I/O) and inside Terna volumes staged by
//! `terna standalone` (filesystem and block mode, 1 and 3 replicas),
//! alternating raw and Terna for every round, medians reported as ratios.
//! Then a full rebuild of a lost replica, as a ratio of the raw disk's
//! sequential write bandwidth.
//!
//! Durability of every figure: fio uses direct I/O (no page cache above the
//! volume); the loop device runs with direct I/O, and the engine writes and
//! reads every replica with O_DIRECT (no page cache below; the FUSE readers'
//! io_uring reads and a 1-replica volume's passthrough I/O use the engine's
//! O_DIRECT descriptor of the replica), so nothing is measured from memory.

#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
#[path = "../tests/common/csi_client.rs"]
mod csi_client;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use csi_client::{Csi, block_cap, mount_cap};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

struct Job {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    depth: u32,
    /// What the figure is: bandwidth (bytes/s), IOPS, or p50 latency (µs).
    metric: &'static str,
    writes: bool,
}

const JOBS: [Job; 5] = [
    Job {
        name: "seq read 1M qd16",
        rw: "read",
        bs: "1M",
        depth: 16,
        metric: "MiB/s",
        writes: false,
    },
    Job {
        name: "seq write 1M qd16",
        rw: "write",
        bs: "1M",
        depth: 16,
        metric: "MiB/s",
        writes: true,
    },
    Job {
        name: "rand read 4k qd32",
        rw: "randread",
        bs: "4k",
        depth: 32,
        metric: "IOPS",
        writes: false,
    },
    Job {
        name: "rand write 4k qd32",
        rw: "randwrite",
        bs: "4k",
        depth: 32,
        metric: "IOPS",
        writes: true,
    },
    Job {
        name: "rand write 4k qd1 p50",
        rw: "randwrite",
        bs: "4k",
        depth: 1,
        metric: "µs",
        writes: true,
    },
];

/// Runs one fio job; returns its figure and the bytes it moved.
/// fio with direct, asynchronous I/O on the first `size` bytes of `target`.
fn fio_on(target: &Path, size: u64) -> Command {
    let mut fio = Command::new("fio");
    fio.args(["--name=bench", "--ioengine=libaio", "--direct=1"])
        .arg(format!("--filename={}", target.display()))
        .arg(format!("--size={size}"));
    fio
}

fn fio(target: &Path, size: u64, job: &Job, runtime: u32) -> (f64, u64) {
    let out = fio_on(target, size)
        .args([
            "--time_based",
            "--output-format=json",
            "--randrepeat=0",
            "--norandommap",
        ])
        .arg(format!("--rw={}", job.rw))
        .arg(format!("--bs={}", job.bs))
        .arg(format!("--iodepth={}", job.depth))
        .arg(format!("--runtime={runtime}"))
        .output()
        .expect("run fio");
    assert!(
        out.status.success(),
        "fio failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("fio json");
    let side = &v["jobs"][0][if job.writes { "write" } else { "read" }];
    let figure = match job.metric {
        "MiB/s" => side["bw_bytes"].as_f64().unwrap() / MIB as f64,
        "IOPS" => side["iops"].as_f64().unwrap(),
        _ => side["clat_ns"]["percentile"]["50.000000"].as_f64().unwrap() / 1000.0,
    };
    (figure, side["io_bytes"].as_u64().unwrap())
}

/// Writes `size` bytes from the start of `target` once, as fio's layout of
/// a file does.
fn fill(target: &Path, size: u64) {
    let status = fio_on(target, size)
        .args(["--rw=write", "--bs=1M", "--iodepth=16"])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run fio");
    assert!(status.success(), "fio could not fill {}", target.display());
}

/// The engine worker serving a staged volume (`terna engine ... <id> ...
/// --fuse-fd N`): the process doing the replica I/O, not its supervisor.
fn engine_pid(volume_id: &str) -> u32 {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
            args.get(1) == Some(&&b"engine"[..])
                && args.contains(&volume_id.as_bytes())
                && args.contains(&&b"--fuse-fd"[..])
        })
        .expect("engine process of a staged volume")
}

/// User + system CPU seconds a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf only reads a constant of the running system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks as f64 / hz as f64
}

/// A `/proc/<pid>/status` memory line (VmRSS, VmHWM) in MiB.
fn memory_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"));
    let kib: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib / 1024.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Terna {
    child: Child,
    socket: PathBuf,
}

impl Drop for Terna {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

fn start_terna(dir: &Path) -> Terna {
    let mut config = terna::core::config::Config::default_standalone();
    config.replace_after_secs = 0;
    config.rebuild_mib_per_sec = 0;
    start_terna_with(dir, &toml::to_string(&config).unwrap())
}

fn start_terna_with(dir: &Path, config: &str) -> Terna {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("terna.toml"), config).unwrap();
    let socket = dir.join("csi.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_terna"))
        .args(["standalone", "--node-id", "bench"])
        .arg("--data-dir")
        .arg(&data)
        .arg("--endpoint")
        .arg(format!("unix://{}", socket.display()))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("terna.log")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "terna did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Terna { child, socket }
}

/// A replica agent on loopback, stopped (SIGKILL) on drop.
struct Agent {
    dir: PathBuf,
    addr: String,
    name: String,
    child: Option<Child>,
}

impl Agent {
    fn start(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_terna"))
            .arg("agent")
            .arg("--data-dir")
            .arg(&self.dir)
            .args(["--listen", &self.addr, "--node-id", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&self.addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "agent {} did not start",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Incremental catch-up: a 3-replica block volume on three replica agents;
/// one agent is killed, `away` bytes are written at spread-out offsets, the
/// agent returns, and the replica catches up. Returns (written while away,
/// bytes the catch-up copied).
async fn catch_up_after_absence(work: &Path, size: u64, away: u64) -> (u64, u64) {
    let base = work.join("catch-up");
    let token = "bench-cluster-token-0123456789abcdef";
    // One cluster CA for the agents and the standalone.
    let ca = base.join("cluster-ca.json");
    std::fs::create_dir_all(&base).unwrap();
    terna::datapath::tls::store::ensure(&ca).unwrap();
    let mut agents: Vec<Agent> = (1..=3)
        .map(|i| {
            let name = format!("a{i}");
            let dir = base.join(&name);
            std::fs::create_dir_all(dir.join("pool")).unwrap();
            std::fs::write(dir.join("token"), token).unwrap();
            std::fs::write(
                dir.join("terna.toml"),
                format!("cluster_token_file = \"token\"\ncluster_ca_file = {ca:?}\n[[pools]]\nname = \"{name}-disk\"\npath = \"pool\"\ntier = \"standard\"\n"),
            )
            .unwrap();
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            Agent { dir, addr: format!("127.0.0.1:{port}"), name, child: None }
        })
        .collect();
    for a in &mut agents {
        a.start();
    }
    std::fs::create_dir_all(base.join("data")).unwrap();
    std::fs::write(base.join("data/token"), token).unwrap();
    let mut config = format!(
        "cluster_token_file = \"token\"\ncluster_ca_file = {ca:?}\nagent_timeout_ms = 1500\nreplace_after_secs = 3600\nrebuild_mib_per_sec = 0\n",
    );
    for a in &agents {
        config += &format!("[[nodes]]\nname = \"{}\"\nagent = \"{}\"\n", a.name, a.addr);
    }
    for a in &agents {
        config += &format!(
            "[[pools]]\nname = \"{0}-disk\"\nnode = \"{0}\"\npath = \"pool\"\ntier = \"standard\"\n",
            a.name
        );
    }
    let terna = start_terna_with(&base, &config);
    let mut csi = Csi::connect(&terna.socket).await;
    let vol = csi
        .create("catch-up", size as i64, &[("replicas", "3")], block_cap())
        .await
        .unwrap();
    let staging = base.join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let device = base.join("device");
    csi.stage(&vol.volume_id, &staging, block_cap()).await;
    csi.publish(&vol.volume_id, &staging, &device, block_cap())
        .await;
    let write = |offsets: &mut dyn Iterator<Item = u64>| {
        use std::io::{Seek, SeekFrom, Write};
        use std::os::unix::fs::OpenOptionsExt;
        let buf =
            terna::datapath::replica::aligned::AlignedBuf::copy_of(&vec![0xa5u8; MIB as usize]);
        let mut dev = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&device)
            .unwrap();
        for off in offsets {
            dev.seek(SeekFrom::Start(off)).unwrap();
            dev.write_all(buf.as_slice()).unwrap();
        }
        dev.sync_all().unwrap();
    };
    // Fill it, so a full copy would be `size`.
    write(&mut (0..size / MIB).map(|i| i * MIB));
    agents[2].kill();
    // Every 8th MiB: the dirty regions are spread over the whole volume.
    let stride = (size / away).max(1) * MIB;
    write(&mut (0..away / MIB).map(|i| (i * stride) % size));
    let record_path = base.join(format!("data/state/volumes/{}.json", vol.volume_id));
    let rec =
        || -> Value { serde_json::from_slice(&std::fs::read(&record_path).unwrap()).unwrap() };
    assert_eq!(
        rec()["replicas"][2]["state"]["state"],
        "faulted",
        "the absence was not noticed"
    );
    agents[2].start();
    let deadline = Instant::now() + Duration::from_secs(120);
    while rec()["replicas"][2]["state"]["state"] != "healthy" {
        assert!(Instant::now() < deadline, "the replica never caught up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let copied = rec()["replicas"][2]["last_catch_up_bytes"]
        .as_u64()
        .unwrap();
    csi.unpublish(&vol.volume_id, &device).await;
    csi.unstage(&vol.volume_id, &staging).await;
    csi.delete(&vol.volume_id).await;
    drop(csi);
    drop(terna);
    (away, copied)
}

struct Target {
    label: String,
    replicas: u32,
    path: PathBuf,
    id: String,
    staging: PathBuf,
    publish: PathBuf,
    block: bool,
    engine: u32,
    /// Engine CPU seconds and bytes fio moved, over every job and round.
    cpu_s: f64,
    bytes: u64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo test --all-targets` runs this binary without `--bench`: the
    // benchmark belongs to bench/run, not to the test suite.
    if !args.iter().any(|a| a == "--bench") {
        println!("datapath benchmark: run it with bench/run");
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let (runtime, rounds, size) = if quick {
        (1, 3, 256 * MIB)
    } else {
        (10, 5, 1024 * MIB)
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let results = root.join("bench/results");
    std::fs::create_dir_all(&results).unwrap();
    // On the same disk as the repo, never tmpfs.
    let work = tempfile::Builder::new()
        .prefix("terna-bench-")
        .tempdir_in(root.join("target"))
        .unwrap();
    let raw_dir = work.path().join("raw");
    std::fs::create_dir_all(&raw_dir).unwrap();
    let raw_file = raw_dir.join("fio.dat");

    let terna = start_terna(work.path());
    let mut csi = Csi::connect(&terna.socket).await;
    let mut targets = Vec::new();
    for replicas in [1u32, 3] {
        for block in [false, true] {
            let name = format!("bench-r{replicas}-{}", if block { "block" } else { "fs" });
            let cap = if block {
                block_cap()
            } else {
                mount_cap("ext4")
            };
            let vol = csi
                .create(
                    &name,
                    (size + 512 * MIB) as i64,
                    &[("replicas", &replicas.to_string())],
                    cap.clone(),
                )
                .await
                .unwrap();
            let staging = work.path().join(format!("{name}-staging"));
            let publish = work.path().join(format!("{name}-pub"));
            std::fs::create_dir_all(&staging).unwrap();
            csi.stage(&vol.volume_id, &staging, cap.clone()).await;
            csi.publish(&vol.volume_id, &staging, &publish, cap).await;
            let path = if block {
                publish.clone()
            } else {
                publish.join("fio.dat")
            };
            let engine = engine_pid(&vol.volume_id);
            targets.push(Target {
                label: format!(
                    "{} replica{}, {}",
                    replicas,
                    if replicas > 1 { "s" } else { "" },
                    if block { "block" } else { "ext4" }
                ),
                replicas,
                path,
                id: vol.volume_id,
                staging,
                publish,
                block,
                engine,
                cpu_s: 0.0,
                bytes: 0,
            });
        }
    }

    // Idle: every volume staged, nothing written yet.
    let node_rss_idle = memory_mib(terna.child.id(), "VmRSS");
    let engine_rss_idle: Vec<f64> = targets
        .iter()
        .map(|t| memory_mib(t.engine, "VmRSS"))
        .collect();

    // fio lays out the files it reads (raw, ext4) by writing them; a block
    // volume gets the same, or the first round would read holes, which
    // replicas answer without touching the disk.
    for t in targets.iter().filter(|t| t.block) {
        fill(&t.path, size);
    }

    // figures[job][target label] = per-round values; "raw" is the disk.
    let mut figures: BTreeMap<&str, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    for round in 0..rounds {
        for job in &JOBS {
            let (raw, _) = fio(&raw_file, size, job, runtime);
            figures
                .entry(job.name)
                .or_default()
                .entry("raw".into())
                .or_default()
                .push(raw);
            for t in &mut targets {
                let cpu_before = cpu_seconds(t.engine);
                let (v, bytes) = fio(&t.path, size, job, runtime);
                t.cpu_s += cpu_seconds(t.engine) - cpu_before;
                t.bytes += bytes;
                figures
                    .entry(job.name)
                    .or_default()
                    .entry(t.label.clone())
                    .or_default()
                    .push(v);
            }
            eprintln!("round {} {}: done", round + 1, job.name);
        }
    }

    let mut md = String::from(
        "| job | target | value | ratio to raw | physical limit | ratio to limit |\n|---|---|---:|---:|---:|---:|\n",
    );
    let mut json_rows = Vec::new();
    for job in &JOBS {
        let per = &figures[job.name];
        let raw = median(per["raw"].clone());
        md += &format!(
            "| {} | raw disk | {raw:.1} {} | 1.00 | | |\n",
            job.name, job.metric
        );
        for t in &targets {
            let v = median(per[&t.label].clone());
            let latency = job.metric == "µs";
            // Every replica shares this one disk: writes can reach raw/replicas.
            let limit = if job.writes {
                if latency {
                    raw * t.replicas as f64
                } else {
                    raw / t.replicas as f64
                }
            } else {
                raw
            };
            let (to_raw, to_limit) = if latency {
                (raw / v, limit / v)
            } else {
                (v / raw, v / limit)
            };
            md += &format!(
                "| {} | {} | {v:.1} {} | {to_raw:.2} | {limit:.1} | {to_limit:.2} |\n",
                job.name, t.label, job.metric
            );
            json_rows.push(json!({
                "job": job.name, "target": t.label, "replicas": t.replicas, "block": t.block,
                "unit": job.metric, "median": v, "raw_median": raw, "rounds": per[&t.label],
                "raw_rounds": per["raw"], "ratio_to_raw": to_raw, "physical_limit": limit,
                "ratio_to_limit": to_limit,
            }));
        }
    }

    // CPU and memory. The engine serves FUSE and drives every replica, so its
    // CPU covers the whole user-space data path; the kernel's share (loop
    // device, FUSE queue, filesystem) is not in it.
    const GIB: f64 = (1u64 << 30) as f64;
    md += "\n| target | engine CPU s per GiB moved | engine RSS idle | engine RSS peak under load |\n|---|---:|---:|---:|\n";
    let mut resources = Vec::new();
    for (t, idle) in targets.iter().zip(&engine_rss_idle) {
        let per_gib = t.cpu_s / (t.bytes as f64 / GIB);
        let peak = memory_mib(t.engine, "VmHWM");
        md += &format!(
            "| {} | {per_gib:.2} | {idle:.1} MiB | {peak:.1} MiB |\n",
            t.label
        );
        resources.push(json!({
            "target": t.label, "engine_cpu_s": t.cpu_s, "bytes": t.bytes,
            "engine_cpu_s_per_gib": per_gib, "engine_rss_idle_mib": idle,
            "engine_rss_peak_mib": peak,
        }));
    }
    let node_rss_load = memory_mib(terna.child.id(), "VmHWM");
    md += &format!(
        "\nNode process (`terna standalone`, control plane and CSI): RSS {node_rss_idle:.1} MiB idle, {node_rss_load:.1} MiB peak. Each staged volume has its own engine process.\n"
    );

    // Ratios to the physical limit, one row per job, one column per target,
    // for bench/plot.gp.
    let mut tsv = String::from("job");
    for t in &targets {
        tsv += &format!("\t{}", t.label);
    }
    tsv += "\n";
    for job in &JOBS {
        tsv += &format!("\"{}\"", job.name);
        for t in &targets {
            let row = json_rows
                .iter()
                .find(|r| r["job"] == job.name && r["target"] == t.label.as_str())
                .unwrap();
            tsv += &format!("\t{:.3}", row["ratio_to_limit"].as_f64().unwrap());
        }
        tsv += "\n";
    }
    std::fs::write(
        results.join(if quick { "quick.tsv" } else { "latest.tsv" }),
        tsv,
    )
    .unwrap();

    // Full rebuild: the 3-replica block volume, unstaged, loses a replica file;
    // the background repair replaces and rebuilds it.
    let seq_write_raw = median(figures["seq write 1M qd16"]["raw"].clone());
    for t in &targets {
        csi.unpublish(&t.id, &t.publish).await;
        csi.unstage(&t.id, &t.staging).await;
    }
    let vol = targets.iter().find(|t| t.replicas == 3 && t.block).unwrap();
    let pools = work.path().join("data/pools");
    let lost = std::fs::read_dir(&pools)
        .unwrap()
        .flatten()
        .map(|p| p.path().join(format!("{}.r2.img", vol.id)))
        .find(|p| p.exists())
        .unwrap();
    let record_path = work
        .path()
        .join(format!("data/state/volumes/{}.json", vol.id));
    let rec =
        || -> Value { serde_json::from_slice(&std::fs::read(&record_path).unwrap()).unwrap() };
    std::fs::remove_file(&lost).unwrap();
    let deadline = Instant::now() + Duration::from_secs(600);
    // Wait for the replacement to start, then time it to completion.
    while !rec()["replicas"][2]["state"]["reason"]
        .as_str()
        .unwrap_or("")
        .contains("rebuilding")
    {
        assert!(Instant::now() < deadline, "rebuild never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    while rec()["replicas"][2]["state"]["state"] != "healthy" {
        assert!(Instant::now() < deadline, "rebuild never finished");
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = started.elapsed().as_secs_f64();
    let bytes = rec()["replicas"][2]["last_catch_up_bytes"]
        .as_u64()
        .unwrap();
    let rebuild_mib_s = bytes as f64 / MIB as f64 / took;
    md += &format!(
        "\n**Full rebuild** of a {} MiB replica (3 replicas, written by fio): {rebuild_mib_s:.1} MiB/s in {took:.1} s = {:.2} of the raw sequential write bandwidth ({seq_write_raw:.1} MiB/s). Zero regions are punched, not written, so a rebuilt replica stays thin.\n",
        bytes / MIB,
        rebuild_mib_s / seq_write_raw
    );

    let (away, copied) = catch_up_after_absence(work.path(), size, size / 8).await;
    md += &format!(
        "\n**Incremental catch-up**: a 3-replica volume of {} MiB on three replica agents; one agent killed, {} MiB written at spread-out offsets while it was away, the agent restarted: the catch-up copied {} MiB ({:.2} × what was written while away; a full rebuild would copy {} MiB).\n",
        size / MIB,
        away / MIB,
        copied / MIB,
        copied as f64 / away as f64,
        size / MIB
    );

    let header = format!(
        "# Terna data path benchmark\n\n{} run, {rounds} rounds alternating raw and Terna, {runtime} s per fio job, {} MiB working set, medians.\nDurability: fio direct I/O, loop device with direct I/O, replicas written and read with O_DIRECT (the FUSE readers' io_uring reads use the replica's O_DIRECT descriptor); flushes reach every replica. Every target is written in full before the first round (fio lays out its files; block volumes are filled the same way), so no read is of a hole. 1-replica volumes are FUSE passthrough: the kernel reads and writes the replica file itself, still with O_DIRECT, so their engine CPU is only opens and flushes. All replicas share this machine's one disk, so a write's physical limit is raw / replicas.\n\n",
        if quick { "Quick" } else { "Full" },
        size / MIB
    );
    let report = header + &md;
    std::fs::write(
        results.join(if quick { "quick.md" } else { "latest.md" }),
        &report,
    )
    .unwrap();
    std::fs::write(
        results.join(if quick { "quick.json" } else { "latest.json" }),
        serde_json::to_string_pretty(&json!({
            "quick": quick, "rounds": rounds, "runtime_s": runtime, "size_bytes": size,
            "results": json_rows, "resources": resources,
            "catch_up": {"written_while_away_bytes": away, "copied_bytes": copied},
            "node_rss_idle_mib": node_rss_idle, "node_rss_peak_mib": node_rss_load, "rebuild": {"bytes": bytes, "seconds": took, "mib_per_s": rebuild_mib_s,
            "raw_seq_write_mib_per_s": seq_write_raw, "ratio": rebuild_mib_s / seq_write_raw},
        }))
        .unwrap(),
    )
    .unwrap();
    println!("{report}");
    for t in &targets {
        csi.delete(&t.id).await;
    }
    // Hang up before stopping terna: its graceful shutdown waits for clients.
    drop(csi);
    drop(terna);
}
