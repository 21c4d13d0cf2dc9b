//! Real gRPC clients against Terna's Unix sockets: a grpc-go client that
//! dials exactly as the kubelet's plugin registration client does (the
//! socket path as target, a unix context dialer, no WithAuthority; the
//! kubelet v1.34's grpc-go version) and grpc-python's default
//! `insecure_channel("unix:" + path)`. Neither sends an `:authority` h2
//! accepts, so without `terna::edge::grpc` every call here is reset.
//!
//! Every Unix socket Terna serves gRPC on: `terna standalone` (Identity,
//! Controller, Node); `terna node`'s kubelet registration socket and CSI
//! socket and `terna controller`'s CSI socket, against a real control plane
//! (scripts/kube-testenv, as tests/kubernetes.rs); and the registration
//! server in-process, to check it removes its socket when stopped. The
//! clients live in tests/interop and are installed by
//! scripts/install-test-tools.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

const TEST: &str = "grpc_interop";

struct Clients {
    go: PathBuf,
    python: PathBuf,
    stubs: PathBuf,
    script: PathBuf,
}

/// The interop clients from .tools, installed by scripts/install-test-tools
/// if missing (as root; otherwise the test says why it skips).
fn clients() -> Option<Clients> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let clients = Clients {
        go: root.join(".tools/bin/terna-grpc-client"),
        python: root.join(".tools/python/bin/python"),
        stubs: root.join(".tools/python-stubs"),
        script: root.join("tests/interop/python/client.py"),
    };
    let present =
        |c: &Clients| c.go.exists() && c.python.exists() && c.stubs.join("csi_pb2.py").exists();
    if !present(&clients) {
        if !common::require_root(TEST) {
            return None;
        }
        let status = Command::new(root.join("scripts/install-test-tools"))
            .status()
            .expect("cannot run scripts/install-test-tools");
        assert!(
            status.success(),
            "scripts/install-test-tools failed: {status}"
        );
        assert!(present(&clients), "interop clients missing after install");
    }
    Some(clients)
}

/// Runs a client that must fail, and returns what it said on stderr.
fn run_failing(what: &str, command: &mut Command) -> String {
    let out = command.output().unwrap();
    assert!(
        !out.status.success(),
        "{what} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs a client and returns the JSON it printed; fails with its stderr.
fn run(what: &str, command: &mut Command) -> Value {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

impl Clients {
    fn go_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.go);
        command.args(args);
        command
    }

    fn python_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.python);
        command
            .arg(&self.script)
            .arg("--stubs")
            .arg(&self.stubs)
            .args(args);
        command
    }

    fn go(&self, args: &[&str]) -> Value {
        run("grpc-go client", &mut self.go_command(args))
    }

    fn python(&self, args: &[&str]) -> Value {
        run("grpc-python client", &mut self.python_command(args))
    }
}

#[test]
fn grpc_go_and_grpc_python_call_standalone() {
    if !common::require_root(TEST) {
        return;
    }
    let Some(clients) = clients() else { return };
    let terna = common::Standalone::start();
    let socket = terna.socket.to_str().unwrap();
    let topology = json!({ terna::TOPOLOGY_NODE_KEY: "test-node" });

    let go = clients.go(&["-csi", socket, "-controller"]);
    assert_eq!(go["pluginInfo"]["name"], terna::DRIVER_NAME, "{go}");
    assert_eq!(go["probe"]["ready"], true, "{go}");
    assert_eq!(go["nodeInfo"]["nodeId"], "test-node", "{go}");
    assert_eq!(go["nodeInfo"]["accessibleTopology"], topology, "{go}");
    let node_caps = go["nodeCapabilities"].as_array().unwrap();
    for cap in ["STAGE_UNSTAGE_VOLUME", "GET_VOLUME_STATS", "EXPAND_VOLUME"] {
        assert!(node_caps.contains(&json!(cap)), "{cap} missing: {go}");
    }
    let controller_caps = go["controllerCapabilities"].as_array().unwrap();
    for cap in [
        "CREATE_DELETE_VOLUME",
        "LIST_VOLUMES",
        "GET_CAPACITY",
        "EXPAND_VOLUME",
    ] {
        assert!(controller_caps.contains(&json!(cap)), "{cap} missing: {go}");
    }

    let py = clients.python(&["--csi", socket]);
    assert_eq!(py["pluginInfo"]["name"], terna::DRIVER_NAME, "{py}");
    assert_eq!(
        py["pluginInfo"]["vendorVersion"], go["pluginInfo"]["vendorVersion"],
        "{py}"
    );
    assert_eq!(py["probe"]["ready"], true, "{py}");
    assert_eq!(py["nodeInfo"]["nodeId"], "test-node", "{py}");
    assert_eq!(py["nodeInfo"]["accessibleTopology"], topology, "{py}");
    terna.stop_and_check_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_go_and_grpc_python_call_terna_node_and_controller() {
    let Some(clients) = clients() else { return };
    let mut cluster = common::cluster::Cluster::start(1).await;
    let controller_socket = cluster.root.path().join("controller-csi.sock");
    let endpoint = format!("unix://{}", controller_socket.display());
    cluster.start_controller_with("c1", &["--endpoint", &endpoint]);
    let registration = terna::edge::csi::registration::socket_in(&cluster.registry_dir(1));
    let node_socket = cluster.node_socket(1);
    for socket in [&registration, &node_socket, &controller_socket] {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !socket.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "no {}:\n{}",
                socket.display(),
                cluster.logs()
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    // The clients are processes: wait for them off the runtime's workers.
    let go = |args: &[&str]| tokio::task::block_in_place(|| clients.go(args));
    let python = |args: &[&str]| tokio::task::block_in_place(|| clients.python(args));

    // The kubelet's plugin watcher: who are you, then the CSI socket named.
    let expected = json!({
        "getInfo": {
            "type": "CSIPlugin",
            "name": terna::DRIVER_NAME,
            "endpoint": node_socket.to_str().unwrap(),
            "supportedVersions": terna::edge::csi::registration::SUPPORTED_VERSIONS,
        },
        "notifyRegistrationStatus": "ok",
    });
    let reg = registration.to_str().unwrap();
    assert_eq!(go(&["-registration", reg]), expected);
    assert_eq!(python(&["--registration", reg]), expected);
    let log = cluster.nodes[0].log();
    assert!(log.contains("registered with the kubelet"), "{log}");

    let node = node_socket.to_str().unwrap();
    let g = go(&["-csi", node]);
    assert_eq!(g["pluginInfo"]["name"], terna::DRIVER_NAME, "{g}");
    assert_eq!(g["nodeInfo"]["nodeId"], "n1", "{g}");
    let node_caps = g["nodeCapabilities"].as_array().unwrap();
    assert!(node_caps.contains(&json!("STAGE_UNSTAGE_VOLUME")), "{g}");
    let py = python(&["--csi", node]);
    assert_eq!(py["nodeInfo"]["nodeId"], "n1", "{py}");
    assert_eq!(py["probe"]["ready"], true, "{py}");

    let controller = controller_socket.to_str().unwrap();
    let g = go(&["-csi", controller, "-node=false", "-controller"]);
    assert_eq!(g["pluginInfo"]["name"], terna::DRIVER_NAME, "{g}");
    let caps = g["controllerCapabilities"].as_array().unwrap();
    assert!(caps.contains(&json!("CREATE_DELETE_VOLUME")), "{g}");

    // A node stopped as a rolling update stops it leaves no socket the
    // kubelet would keep trying.
    let pid = cluster.nodes[0].pid().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while cluster.nodes[0].is_running() {
        assert!(
            std::time::Instant::now() < deadline,
            "terna node ignored SIGTERM"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        !registration.exists(),
        "{} left behind",
        registration.display()
    );
    assert!(
        !node_socket.exists(),
        "{} left behind",
        node_socket.display()
    );
}

#[test]
fn grpc_go_and_grpc_python_register_like_the_kubelet() {
    let Some(clients) = clients() else { return };
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("plugins_registry");
    let csi_socket = dir.path().join("plugins/csi.terna.dev/csi.sock");
    let socket = terna::edge::csi::registration::socket_in(&registry);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = runtime.spawn({
        let (registry, csi_socket) = (registry.clone(), csi_socket.clone());
        async move {
            terna::edge::csi::registration::serve_until(&registry, csi_socket, async {
                let _ = stopped.await;
            })
            .await
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no registration socket"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let socket_arg = socket.to_str().unwrap();
    let expected = json!({
        "getInfo": {
            "type": "CSIPlugin",
            "name": terna::DRIVER_NAME,
            "endpoint": csi_socket.to_str().unwrap(),
            "supportedVersions": terna::edge::csi::registration::SUPPORTED_VERSIONS,
        },
        "notifyRegistrationStatus": "ok",
    });
    assert_eq!(clients.go(&["-registration", socket_arg]), expected);
    assert_eq!(clients.python(&["--registration", socket_arg]), expected);

    // Told to stop, it removes its socket, so the kubelet deregisters.
    stop.send(()).unwrap();
    runtime.block_on(server).unwrap().unwrap();
    assert!(!socket.exists(), "{} left behind", socket.display());
}

/// The same clients against the same service served by tonic straight from
/// the listener, as Terna did before `terna::edge::grpc`: h2 resets every call.
/// This shows the tests above would fail without the shim; if it starts
/// failing, h2 accepts such authorities now (upstream hyperium/h2#487).
#[test]
fn without_the_shim_h2_refuses_these_clients() {
    use terna::edge::csi::registration::RegistrationService;
    use terna::proto::pluginregistration::registration_server::RegistrationServer;
    let Some(clients) = clients() else { return };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.terna.dev-reg.sock");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let listener = runtime
        .block_on(async { tokio::net::UnixListener::bind(&socket) })
        .unwrap();
    runtime.spawn(
        tonic::transport::Server::builder()
            .add_service(RegistrationServer::new(RegistrationService {
                csi_socket: dir.path().join("csi.sock"),
            }))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    let socket_arg = socket.to_str().unwrap();
    let go = run_failing(
        "grpc-go client",
        &mut clients.go_command(&["-registration", socket_arg]),
    );
    assert!(
        go.contains("RST_STREAM") && go.contains("PROTOCOL_ERROR"),
        "{go}"
    );
    let py = run_failing(
        "grpc-python client",
        &mut clients.python_command(&["--registration", socket_arg]),
    );
    eprintln!("without the shim:\n  grpc-go: {go}  grpc-python: {py}");
    assert!(py.contains("RST_STREAM"), "{py}");
}
