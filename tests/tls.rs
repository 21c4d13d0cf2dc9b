//! The cluster CA rotated under a writer. Two `terna agent`s on loopback
//! hold a 2-replica volume staged by `terna standalone`; all three read
//! one shared `cluster_ca_file`. While a writer keeps writing checksummed
//! files through the mounted filesystem, the CA is rotated one step at a
//! time (`terna ca rotate`: stage, promote, retire), and after each step
//! the engine worker is killed so that its successor dials every agent
//! afresh under the certificates of the moment. No write may fail, no
//! replica may be faulted, everything acknowledged must read back, and the
//! replica files must end identical. After the rotation, certificates of
//! the retired CA are refused in both directions. Needs root.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::csi_client::{Csi, mount_cap};
use common::writer::{Writer, record, verify};
use terna::datapath::agent::transport::Transport;
use terna::datapath::tls::Identity;
use terna::datapath::tls::ca::{CaSet, RetiringCa};

const TOKEN: &str = "tls-test-token-0123456789abcdef";
const MIB: u64 = 1 << 20;
const VOLUME: u64 = 128 * MIB;

struct Agent {
    name: String,
    dir: PathBuf,
    addr: std::net::SocketAddr,
    child: Child,
}

impl Agent {
    fn start(base: &Path, name: &str, ca: &Path) -> Agent {
        let dir = base.join(name);
        std::fs::create_dir_all(dir.join("pool")).unwrap();
        std::fs::write(dir.join("token"), TOKEN).unwrap();
        std::fs::write(
            dir.join("terna.toml"),
            format!(
                "cluster_token_file = \"token\"\ncluster_ca_file = {ca:?}\n[[pools]]\nname = \"{name}-disk\"\npath = \"pool\"\ntier = \"standard\"\n"
            ),
        )
        .unwrap();
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_terna"))
            .arg("agent")
            .arg("--data-dir")
            .arg(&dir)
            .args(["--listen", &addr.to_string(), "--node-id", name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("agent.log")).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "agent {name} did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Agent {
            name: name.to_string(),
            dir,
            addr,
            child,
        }
    }

    fn replica_file(&self, id: &str, index: usize) -> PathBuf {
        self.dir
            .join("pool")
            .join(terna::core::volume::replica_file_name(id, index))
    }

    /// Whether a TLS connection made under `identity` gets past this
    /// agent's handshake and Hello.
    fn admits(&self, identity: std::sync::Arc<Identity>) -> bool {
        use terna::datapath::agent::protocol::{Request, Response, read_frame};
        let tcp = std::net::TcpStream::connect(self.addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let Ok(mut s) = Transport::Tls(identity).connect(
            tcp,
            &self.name,
            Instant::now() + Duration::from_secs(10),
        ) else {
            return false;
        };
        s.set_deadline(None);
        let hello = Request::Hello {
            token: TOKEN.as_bytes().to_vec(),
            node: "probe".into(),
            claim: 0,
        };
        s.send(&hello.encode(1)).is_ok()
            && matches!(
                read_frame(&mut s)
                    .ok()
                    .flatten()
                    .map(|(h, p)| Response::decode(h.kind, &p)),
                Some(Ok(Response::Hello { .. }))
            )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rotate(ca: &Path, step: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_terna"))
        .args(["ca", "rotate", "--step", step, "--file"])
        .arg(ca)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "terna ca rotate --step {step}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pid_in(path: &Path) -> i32 {
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_rotation_under_a_writer_fails_no_write_and_faults_no_replica() {
    if !common::require_root("ca_rotation_under_a_writer_fails_no_write_and_faults_no_replica") {
        return;
    }
    let base = tempfile::Builder::new()
        .prefix("terna-tls-")
        .tempdir()
        .unwrap();
    let ca = base.path().join("cluster-ca.json");
    terna::datapath::tls::store::ensure(&ca).unwrap();
    let original = terna::datapath::tls::store::load(&ca).unwrap();
    let agents = [
        Agent::start(base.path(), "a1", &ca),
        Agent::start(base.path(), "a2", &ca),
    ];
    let mut config = format!(
        "cluster_token_file = \"token\"\ncluster_ca_file = {ca:?}\nagent_timeout_ms = 3000\nreplace_after_secs = 3600\n"
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
            "rotation",
            VOLUME as i64,
            &[("replicas", "2")],
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

    let mut writer = Writer::start(&target);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let worker_file = terna.data_dir.join(format!("run/{id}/engine-worker.pid"));
    for step in ["stage", "promote", "retire"] {
        rotate(&ca, step);
        // Every process copies the shared file within 2 s and looks at its
        // copy once a second: a step is everywhere well within 6 s.
        tokio::time::sleep(Duration::from_secs(6)).await;
        let worker = pid_in(&worker_file);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(worker),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while pid_in(&worker_file) == worker {
            assert!(Instant::now() < deadline, "{step}: no new engine worker");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let before = writer.written.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let during = writer.written.load(Ordering::SeqCst) - before;
        assert!(during > 0, "{step}: writes stopped");
        let condition = csi.condition(&id).await;
        assert!(
            !condition.abnormal,
            "{step}: the volume degraded: {}",
            condition.message
        );
        println!(
            "{step}: worker {worker} -> {}, {during} bytes written in 3 s after",
            pid_in(&worker_file)
        );
    }
    let sums = writer.stop();
    assert!(sums.len() >= 32, "writer made too little progress");
    verify(&sums);
    let rec = record(&terna, &id);
    // Healthy, and never faulted and caught up meanwhile either.
    for r in rec["replicas"].as_array().unwrap() {
        assert_eq!(r["state"]["state"], "healthy", "{rec}");
        assert!(r["last_catch_up_bytes"].is_null(), "{rec}");
    }

    // The retired CA: its certificates no longer get in, and a client that
    // trusts only it does not take the agents' new certificates.
    let now = terna::datapath::tls::store::load(&ca).unwrap();
    assert!(now.previous.is_none() && now.next.is_none());
    let current = Identity::in_memory("probe", now.clone());
    let stale_trust = Identity::in_memory("probe", original.clone());
    let stale_cert = Identity::in_memory(
        "probe",
        CaSet {
            previous: Some(RetiringCa {
                name: now.current.name.clone(),
                cert_pem: now.current.cert_pem.clone(),
            }),
            ..original
        },
    );
    for a in &agents {
        assert!(a.admits(current.clone()), "{}: current CA refused", a.name);
        assert!(
            !a.admits(stale_trust.clone()),
            "{}: a client trusting only the retired CA got in",
            a.name
        );
        assert!(
            !a.admits(stale_cert.clone()),
            "{}: a certificate of the retired CA was taken",
            a.name
        );
    }

    csi.unpublish(&id, &target).await;
    csi.unstage(&id, &staging).await;
    let files: Vec<Vec<u8>> = (0..2)
        .map(|i| {
            let node = rec["replicas"][i]["node"].as_str().unwrap();
            let agent = agents.iter().find(|a| a.name == node).unwrap();
            std::fs::read(agent.replica_file(&id, i)).unwrap()
        })
        .collect();
    assert!(files[0] == files[1], "the replica files differ");
    csi.delete(&id).await;
    terna.stop_and_check_clean();
    drop(agents);
}
