//! A real Kubernetes control plane for tests (etcd, kube-apiserver and
//! kube-controller-manager from scripts/install-kube-tools, started by
//! scripts/kube-testenv), Terna's CRDs and classes installed, `terna node`
//! processes standing for nodes (each with fast, standard and slow pools in
//! its own zone) and `terna controller` processes. Every process is stopped
//! by its pid when the value is dropped.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimSpec, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use terna::edge::kube::crd::{StoragePool, TernaVolume};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The control plane. `scripts/kube-testenv stop` runs on drop.
pub struct KubeEnv {
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
}

impl KubeEnv {
    pub fn start() -> KubeEnv {
        let dir = tempfile::Builder::new()
            .prefix("terna-kube-")
            .tempdir()
            .unwrap();
        let out = Command::new(repo().join("scripts/kube-testenv"))
            .arg("start")
            .arg(dir.path())
            .output()
            .unwrap();
        let env = KubeEnv {
            kubeconfig: dir.path().join("kubeconfig"),
            dir,
        };
        assert!(
            out.status.success(),
            "kube-testenv start failed (is scripts/install-kube-tools run?): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        env
    }

    /// Applies `apply` (a kubectl command that installs the CRDs), waits
    /// for the CRDs to be served, and installs every shipped class.
    pub fn install(&self, apply: &[&str]) {
        self.kubectl(apply);
        self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/storagepools.terna.dev",
            "crd/ternavolumes.terna.dev",
        ]);
        self.kubectl(&["apply", "-f", "storageclasses/"]);
    }

    /// Stops the API server for `down_secs`, then starts it again.
    pub fn restart_apiserver(&self, down_secs: u64) {
        let out = Command::new(repo().join("scripts/kube-testenv"))
            .arg("restart-apiserver")
            .arg(self.dir.path())
            .args(["--down-secs", &down_secs.to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "restart-apiserver failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = Command::new(repo().join(".tools/bin/kubectl"))
            .env("KUBECONFIG", &self.kubeconfig)
            .env("KUBECACHEDIR", self.dir.path().join("kubectl-cache"))
            .args(args)
            .current_dir(repo())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub async fn client(&self) -> kube::Client {
        terna::edge::kube::client::client(Some(&self.kubeconfig))
            .await
            .unwrap()
    }
}

impl Drop for KubeEnv {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/kube-testenv"))
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

/// A terna process, stopped (SIGTERM, then SIGKILL) on drop.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
    args: Vec<String>,
}

impl Proc {
    fn spawn(name: &str, args: &[String], log: PathBuf) -> Proc {
        let mut p = Proc {
            name: name.to_string(),
            child: None,
            log,
            args: args.to_vec(),
        };
        p.restart();
        p
    }

    /// Starts it again with the same arguments (after `kill_hard`); the
    /// log continues.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "{} is still running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_terna"))
            .args(&self.args)
            .env("TERNA_LOG", "info")
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL: no cleanup runs, as in a crash.
    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if child.try_wait().unwrap().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The control plane plus Terna: CRDs and every class in storageclasses/,
/// `nodes` node processes, and the controllers a test starts.
pub struct Cluster {
    pub controllers: Vec<Proc>,
    pub nodes: Vec<Proc>,
    pub root: tempfile::TempDir,
    pub env: KubeEnv,
    token: PathBuf,
    /// The cluster CA every node and controller shares (a Secret's stand-in).
    ca: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub const TIERS: [&str; 3] = ["fast", "standard", "slow"];
/// Short, so a test sees a killed node's claims lapse within seconds.
pub const NODE_LEASE_SECS: u64 = 6;

impl Cluster {
    pub async fn start(nodes: usize) -> Cluster {
        let env = KubeEnv::start();
        env.install(&["apply", "-f", "deploy/crds/"]);
        let root = tempfile::Builder::new()
            .prefix("terna-cluster-")
            .tempdir()
            .unwrap();
        let token = root.path().join("cluster-token");
        std::fs::write(&token, "test-cluster-token\n").unwrap();
        let ca = root.path().join("cluster-ca.json");
        terna::datapath::tls::store::ensure(&ca).unwrap();
        let mut cluster = Cluster {
            controllers: vec![],
            nodes: vec![],
            root,
            env,
            token,
            ca,
        };
        for i in 1..=nodes {
            cluster.start_node(i);
        }
        cluster.wait_pools_ready(nodes * TIERS.len()).await;
        cluster
    }

    pub fn node_dir(&self, i: usize) -> PathBuf {
        self.root.path().join(format!("n{i}"))
    }

    /// Node `i`'s CSI socket (Identity and Node), where the kubelet would
    /// call.
    pub fn node_socket(&self, i: usize) -> PathBuf {
        self.root.path().join(format!("n{i}-csi.sock"))
    }

    /// Node `i`'s stand-in for /var/lib/kubelet/plugins_registry.
    pub fn registry_dir(&self, i: usize) -> PathBuf {
        self.root.path().join(format!("n{i}-plugins_registry"))
    }

    fn start_node(&mut self, i: usize) {
        let data = self.node_dir(i);
        std::fs::create_dir_all(&data).unwrap();
        let mut config = format!(
            "overcommit_ratio = 1.0\ncluster_token_file = {:?}\ncluster_ca_file = {:?}\n",
            self.token.display().to_string(),
            self.ca.display().to_string()
        );
        for tier in TIERS {
            config += &format!(
                "\n[[pools]]\nname = \"{tier}\"\npath = \"pools/{tier}\"\ntier = \"{tier}\"\nzone = \"zone-{i}\"\ncapacity_bytes = {}\n",
                1u64 << 40
            );
        }
        std::fs::write(data.join("terna.toml"), config).unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let args: Vec<String> = [
            "node",
            "--node-id",
            &format!("n{i}"),
            "--data-dir",
            data.to_str().unwrap(),
            "--kubeconfig",
            self.env.kubeconfig.to_str().unwrap(),
            "--agent-listen",
            &addr,
            "--heartbeat-secs",
            "1",
            "--lease-namespace",
            "default",
            "--node-lease-secs",
            &NODE_LEASE_SECS.to_string(),
            "--endpoint",
            &format!("unix://{}", self.node_socket(i).display()),
            "--kubelet-registry",
            self.registry_dir(i).to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let log = self.root.path().join(format!("node-n{i}.log"));
        self.nodes.push(Proc::spawn(&format!("n{i}"), &args, log));
    }

    /// Starts a controller with leader election in namespace default.
    pub fn start_controller(&mut self, id: &str) -> usize {
        self.start_controller_with(id, &[])
    }

    pub fn start_controller_with(&mut self, id: &str, extra: &[&str]) -> usize {
        let mut args: Vec<String> = [
            "controller",
            "--id",
            id,
            "--kubeconfig",
            self.env.kubeconfig.to_str().unwrap(),
            "--lease-namespace",
            "default",
            "--lease-duration-secs",
            "6",
            "--cluster-token-file",
            self.token.to_str().unwrap(),
            "--cluster-ca-file",
            self.ca.to_str().unwrap(),
            "--agent-timeout-ms",
            "3000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = self.root.path().join(format!("controller-{id}.log"));
        self.controllers.push(Proc::spawn(id, &args, log));
        self.controllers.len() - 1
    }

    pub async fn client(&self) -> kube::Client {
        self.env.client().await
    }

    async fn wait_pools_ready(&self, want: usize) {
        let api: Api<StoragePool> = Api::all(self.client().await);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let pools = api.list(&ListParams::default()).await.unwrap().items;
            let ready = pools
                .iter()
                .filter(|p| p.status.as_ref().is_some_and(|s| s.health == "Ready"))
                .count();
            if ready >= want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "only {ready} of {want} pools ready; node logs:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .chain(&self.controllers)
            .map(|p| {
                let log = p.log();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                format!(
                    "--- {} ---\n{}",
                    p.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Every replica file on every node, as "node/pool/file".
    pub fn replica_files(&self) -> Vec<String> {
        let mut files = Vec::new();
        for i in 1..=self.nodes.len() {
            for tier in TIERS {
                let dir = self.node_dir(i).join("pools").join(tier);
                for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if name.ends_with(".img") {
                        files.push(format!("n{i}/{tier}/{name}"));
                    }
                }
            }
        }
        files.sort();
        files
    }
}

pub fn claim(
    name: &str,
    class: &str,
    size: &str,
    block: bool,
    annotations: &[(&str, &str)],
) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(name.into()),
            annotations: (!annotations.is_empty()).then(|| {
                annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            }),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: Some(class.into()),
            volume_mode: block.then(|| "Block".into()),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(size.into()),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    }
}

pub async fn create_claim(client: &kube::Client, ns: &str, pvc: &PersistentVolumeClaim) {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    api.create(&PostParams::default(), pvc).await.unwrap();
}

/// Waits until every named claim is Bound; returns them.
pub async fn wait_bound(
    cluster: &Cluster,
    ns: &str,
    names: &[String],
    timeout: Duration,
) -> Vec<PersistentVolumeClaim> {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client().await, ns);
    let deadline = Instant::now() + timeout;
    loop {
        let claims = api.list(&ListParams::default()).await;
        if let Ok(claims) = claims {
            let bound: Vec<PersistentVolumeClaim> = claims
                .items
                .into_iter()
                .filter(|c| names.contains(c.metadata.name.as_ref().unwrap()))
                .filter(|c| c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound"))
                .collect();
            if bound.len() == names.len() {
                return bound;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {} claims bound after {timeout:?}\n{}",
                bound.len(),
                names.len(),
                cluster.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn pvs(client: &kube::Client) -> Vec<PersistentVolume> {
    let api: Api<PersistentVolume> = Api::all(client.clone());
    api.list(&ListParams::default()).await.unwrap().items
}

pub async fn terna_volumes(client: &kube::Client) -> Vec<TernaVolume> {
    let api: Api<TernaVolume> = Api::all(client.clone());
    api.list(&ListParams::default()).await.unwrap().items
}

/// Polls `check` until it is true or `timeout` passes.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
