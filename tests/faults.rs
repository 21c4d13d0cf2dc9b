//! Replicas on other nodes, under real faults. Three replica agents run in
//! their own network namespaces (veth links to this one); `terna standalone`
//! here stages a 3-replica volume whose replicas all live on those agents,
//! and a writer keeps writing checksummed files through the mounted
//! filesystem while agents are killed with SIGKILL and links are cut.
//! Nothing acknowledged may be lost, the volume must report itself degraded
//! and heal by itself, catch-up must copy only dirty regions, and in the end
//! all three replica files must be byte-identical. The engine itself is
//! killed too, while a replica is away: its successor must carry on from
//! the persisted dirty map. Needs root.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::csi_client::{Csi, mount_cap};
use common::writer::{Writer, record, verify, wait_condition};
use sha2::{Digest, Sha256};

const TOKEN: &str = "faults-test-token";
const MIB: u64 = 1 << 20;
const VOLUME: u64 = 256 * MIB;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Test traffic must never leave this machine: while a link is down, a
/// blackhole route catches what would otherwise follow the default route.
struct Blackhole;

impl Blackhole {
    fn install() -> Blackhole {
        let _ = Command::new("ip")
            .args(["route", "del", "blackhole", "10.231.0.0/16"])
            .output();
        ip(&[
            "route",
            "add",
            "blackhole",
            "10.231.0.0/16",
            "metric",
            "4000",
        ]);
        Blackhole
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["route", "del", "blackhole", "10.231.0.0/16"])
            .output();
    }
}

/// The cluster CA the agents and the standalone share.
fn shared_ca(base: &Path) -> PathBuf {
    base.join("cluster-ca.json")
}

/// One replica agent in its own network namespace.
struct AgentNode {
    ns: String,
    host_if: String,
    node_if: String,
    addr: String,
    dir: PathBuf,
    name: String,
    child: Option<Child>,
}

impl AgentNode {
    fn new(base: &Path, i: u32) -> AgentNode {
        let tag = std::process::id() % 10_000;
        let ns = format!("terna-f{tag}-{i}");
        let host_if = format!("tf{tag}h{i}");
        let node_if = format!("tf{tag}n{i}");
        ip(&["netns", "add", &ns]);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &node_if,
        ]);
        ip(&["link", "set", &node_if, "netns", &ns]);
        ip(&["addr", "add", &format!("10.231.{i}.1/24"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("10.231.{i}.2/24"),
            "dev",
            &node_if,
        ]);
        ip(&["-n", &ns, "link", "set", &node_if, "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        let name = format!("a{i}");
        let dir = base.join(&name);
        std::fs::create_dir_all(dir.join("pool")).unwrap();
        std::fs::write(dir.join("token"), TOKEN).unwrap();
        std::fs::write(
            dir.join("terna.toml"),
            format!(
                "cluster_token_file = \"token\"\ncluster_ca_file = {:?}\n[[pools]]\nname = \"{name}-disk\"\npath = \"pool\"\ntier = \"standard\"\n{}",
                shared_ca(base),
                // The spare (a4) reports less space, so placement leaves it
                // free until a replica must be replaced.
                if i == 4 { "capacity_bytes = 629145600\n" } else { "" }
            ),
        )
        .unwrap();
        let mut node = AgentNode {
            ns,
            host_if,
            node_if,
            addr: format!("10.231.{i}.2:7420"),
            dir,
            name,
            child: None,
        };
        node.start();
        node
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .unwrap();
        // nsenter switches only the network namespace (`ip netns exec` would
        // also copy our mount table, pinning the volume's mounts) and execs
        // terna in place: the child's pid is the agent's.
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns))
            .args([env!("CARGO_BIN_EXE_terna"), "agent"])
            .arg("--data-dir")
            .arg(&self.dir)
            .args(["--listen", &self.addr, "--node-id", &self.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect_timeout(
            &self.addr.parse().unwrap(),
            Duration::from_millis(200),
        )
        .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "agent {} did not listen",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Puts the pool on a tmpfs of its own, so it can be filled.
    fn pool_on_tmpfs(&self) {
        let pool = self.dir.join("pool");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1g", "terna-test-pool"])
            .arg(&pool)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount tmpfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Takes every free byte of the pool's filesystem. tmpfs undoes a
    /// fallocate that does not fit whole, so it is filled in shrinking steps.
    fn fill_pool(&self) {
        let f = std::fs::File::create(self.dir.join("pool/filler")).unwrap();
        let mut offset = 0i64;
        for step in [16 << 20, 1 << 20, 4096] {
            while nix::fcntl::fallocate(&f, nix::fcntl::FallocateFlags::empty(), offset, step)
                .is_ok()
            {
                offset += step;
            }
        }
        let st = nix::sys::statvfs::statvfs(&self.dir.join("pool")).unwrap();
        assert_eq!(st.blocks_available(), 0, "pool not full");
    }

    fn free_pool(&self) {
        std::fs::remove_file(self.dir.join("pool/filler")).unwrap();
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Cuts (or restores) the link from the agent's side: our side keeps its
    /// route, so packets to the agent are dropped, never sent elsewhere.
    fn link(&self, up: bool) {
        ip(&[
            "-n",
            &self.ns,
            "link",
            "set",
            &self.node_if,
            if up { "up" } else { "down" },
        ]);
    }

    fn replica_file(&self, volume_id: &str, index: usize) -> PathBuf {
        self.dir
            .join("pool")
            .join(format!("{volume_id}.r{index}.img"))
    }
}

impl Drop for AgentNode {
    fn drop(&mut self) {
        self.kill9();
        let _ = nix::mount::umount2(&self.dir.join("pool"), nix::mount::MntFlags::MNT_DETACH);
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_lose_no_acknowledged_write_and_heal_by_catching_up_dirty_regions() {
    if !common::require_root(
        "faults_lose_no_acknowledged_write_and_heal_by_catching_up_dirty_regions",
    ) {
        return;
    }
    let _blackhole = Blackhole::install();
    let base = tempfile::Builder::new()
        .prefix("terna-faults-")
        .tempdir()
        .unwrap();
    terna::datapath::tls::store::ensure(&shared_ca(base.path())).unwrap();
    let mut agents: Vec<AgentNode> = (1..=4).map(|i| AgentNode::new(base.path(), i)).collect();
    agents[0].pool_on_tmpfs();

    // The engine side: no pools of its own, the three agents' pools.
    let mut config = format!(
        "cluster_token_file = \"token\"\ncluster_ca_file = {:?}\nagent_timeout_ms = 1500\nreplace_after_secs = 6\nrebuild_mib_per_sec = 128\n",
        shared_ca(base.path())
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
    let terna = common::Standalone::start_with(|data_dir| {
        std::fs::create_dir_all(data_dir).unwrap();
        std::fs::write(data_dir.join("terna.toml"), &config).unwrap();
        std::fs::write(data_dir.join("token"), TOKEN).unwrap();
    });
    let mut csi = Csi::connect(&terna.socket).await;
    let id = csi
        .create(
            "faults",
            VOLUME as i64,
            &[("replicas", "3")],
            mount_cap("ext4"),
        )
        .await
        .unwrap()
        .volume_id;
    let staging = terna.dir.path().join("staging");
    let target = terna.dir.path().join("target");
    std::fs::create_dir_all(&staging).unwrap();
    csi.stage(&id, &staging, mount_cap("ext4")).await;
    csi.publish(&id, &staging, &target, mount_cap("ext4")).await;

    // Which replica index lives on which agent.
    let rec = record(&terna, &id);
    let index_of = |agent: &str| -> usize {
        rec["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .position(|r| r["node"] == agent)
            .unwrap()
    };

    let mut writer = Writer::start(&target);
    let mut extra = HashMap::new();
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Fault 1: an agent killed with SIGKILL, then restarted.
    // Fault 2: the link to an agent cut, then restored.
    // Fault 3: the pool of an agent runs out of space, then space is freed.
    for (fault, a) in [
        ("kill -9", 1usize),
        ("link cut", 2usize),
        ("disk full", 0usize),
    ] {
        let replica = index_of(&agents[a].name);
        match fault {
            "kill -9" => agents[a].kill9(),
            "link cut" => agents[a].link(false),
            _ => {
                agents[a].fill_pool();
                // New blocks for the filesystem, so the full pool is hit now.
                let data: Vec<u8> = (0..48 * MIB).map(|b| (b * 17 + 3) as u8).collect();
                let path = target.join("big-during-disk-full");
                let mut f = std::fs::File::create(&path).unwrap();
                f.write_all(&data).unwrap();
                f.sync_all().unwrap();
                extra.insert(path, Sha256::digest(&data).to_vec());
            }
        }
        let c = wait_condition(&mut csi, &id, true, fault).await;
        assert!(
            c.message.contains(&format!("replica {replica}")),
            "{fault}: {}",
            c.message
        );
        let before = writer.written.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let away = writer.written.load(Ordering::SeqCst) - before;
        assert!(away > 0, "{fault}: writes stopped while degraded");
        match fault {
            "kill -9" => agents[a].start(),
            "link cut" => agents[a].link(true),
            _ => agents[a].free_pool(),
        }
        wait_condition(&mut csi, &id, false, &format!("{fault} recovery")).await;
        let copied = record(&terna, &id)["replicas"][replica]["last_catch_up_bytes"]
            .as_u64()
            .unwrap();
        println!("{fault}: {away} bytes written while away, catch-up copied {copied} bytes");
        assert!(copied > 0, "{fault}: nothing copied");
        assert!(
            copied <= VOLUME / 2,
            "{fault}: catch-up copied {copied} of {VOLUME}: not incremental"
        );
    }

    // Fault 4: the engine killed with SIGKILL while a replica is away. Its
    // supervisor starts another on the same FUSE session; that one learns
    // what the away replica missed from the persisted dirty map.
    let away = index_of(&agents[2].name);
    agents[2].link(false);
    wait_condition(&mut csi, &id, true, "link cut before engine kill").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let worker_file = terna.data_dir.join(format!("run/{id}/engine-worker.pid"));
    let pid_of = || -> i32 {
        std::fs::read_to_string(&worker_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let worker = pid_of();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(worker),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while pid_of() == worker {
        assert!(Instant::now() < deadline, "engine was not restarted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = writer.written.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_restart = writer.written.load(Ordering::SeqCst) - before;
    assert!(after_restart > 0, "writes stopped after the engine restart");
    let c = wait_condition(&mut csi, &id, true, "still degraded after restart").await;
    assert!(
        c.message.contains(&format!("replica {away}")),
        "{}",
        c.message
    );
    agents[2].link(true);
    wait_condition(&mut csi, &id, false, "engine restart recovery").await;
    let copied = record(&terna, &id)["replicas"][away]["last_catch_up_bytes"]
        .as_u64()
        .unwrap();
    println!(
        "engine kill -9 while replica {away} away: worker {worker} -> {}, catch-up copied {copied} bytes",
        pid_of()
    );
    assert!(copied > 0, "engine restart: nothing copied");
    assert!(
        copied <= VOLUME / 2,
        "engine restart: catch-up copied {copied} of {VOLUME}: the dirty map was lost"
    );

    // Fault 5: a replica's file is deleted under its agent. It cannot come
    // back, so after the grace period it is replaced on the spare agent and
    // rebuilt in full while the writer goes on.
    let lost = index_of("a1");
    std::fs::remove_file(agents[0].replica_file(&id, lost)).unwrap();
    let c = wait_condition(&mut csi, &id, true, "replica deleted").await;
    assert!(
        c.message.contains(&format!("replica {lost}")),
        "{}",
        c.message
    );
    wait_condition(&mut csi, &id, false, "replacement rebuild").await;
    let rec_after = record(&terna, &id);
    assert_eq!(
        rec_after["replicas"][lost]["node"], "a4",
        "replaced on the spare"
    );
    let rebuilt = rec_after["replicas"][lost]["last_catch_up_bytes"]
        .as_u64()
        .unwrap();
    println!("replica deleted: replaced on a4, rebuild copied {rebuilt} bytes");
    // Everything, plus what the writer dirtied again during the copy.
    assert!(
        rebuilt >= VOLUME,
        "a replacement is rebuilt in full: {rebuilt}"
    );

    let mut sums = writer.stop();
    assert!(sums.len() >= 32, "writer made too little progress");
    sums.extend(extra);
    verify(&sums);

    // With every replica healthy and the volume unstaged, the replica files
    // must be identical: the caught-up and rebuilt ones hold every write too.
    csi.unpublish(&id, &target).await;
    csi.unstage(&id, &staging).await;
    let placed: Vec<(usize, &AgentNode)> = rec_after["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, r)| {
            (
                i,
                agents
                    .iter()
                    .find(|a| r["node"] == a.name.as_str())
                    .unwrap(),
            )
        })
        .collect();
    let files: Vec<Vec<u8>> = placed
        .iter()
        .map(|(i, a)| std::fs::read(a.replica_file(&id, *i)).unwrap())
        .collect();
    for (k, f) in files.iter().enumerate().skip(1) {
        assert!(
            *f == files[0],
            "replica {} on {} differs",
            placed[k].0,
            placed[k].1.name
        );
    }

    csi.stage(&id, &staging, mount_cap("ext4")).await;
    csi.publish(&id, &staging, &target, mount_cap("ext4")).await;
    verify(&sums);
    csi.unpublish(&id, &target).await;
    csi.unstage(&id, &staging).await;
    csi.delete(&id).await;
    for (i, a) in &placed {
        assert!(
            !a.replica_file(&id, *i).exists(),
            "replica left on {}",
            a.name
        );
    }
    terna.stop_and_check_clean();
    drop(agents);
}
