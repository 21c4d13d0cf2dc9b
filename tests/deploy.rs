//! deploy/ checked against what it is deployed onto: a real kube-apiserver
//! (scripts/kube-testenv) and the real binary.
//!
//! - The kustomize base and storageclasses/ pass server-side dry-run: the
//!   API server's own schema validation, defaulting and admission.
//! - The controller and a node, run with nothing but their ServiceAccounts'
//!   tokens, provision and delete a volume: an RBAC rule missing for a call
//!   the binary makes fails only in a cluster, never against the admin
//!   kubeconfig the other tests use. And the roles grant no more than that.
//! - Every container's args, with its env expanded as the kubelet would,
//!   parse as a terna command line (`terna check-args`).
//! - The node's terna.toml parses and points where node.yaml mounts things.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::cluster::KubeEnv;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, Secret};

const NAMESPACE: &str = "terna-system";
const TOKEN_SECRET: &str = "terna-cluster-token";
/// The key the controller writes the token under, and node.yaml's mount
/// of the Secret makes a file of.
const TOKEN_KEY: &str = terna::edge::kube::cluster_token::TOKEN_KEY;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap()
}

fn controller_pod() -> PodSpec {
    let d: Deployment = serde_yaml::from_str(&read("deploy/controller.yaml")).unwrap();
    d.spec.unwrap().template.spec.unwrap()
}

fn node_pod() -> PodSpec {
    let d: DaemonSet = serde_yaml::from_str(&read("deploy/node.yaml")).unwrap();
    d.spec.unwrap().template.spec.unwrap()
}

/// What the kubelet would set a fieldRef variable to, in a plausible pod.
fn field_value(path: &str) -> String {
    match path {
        "metadata.name" => "terna-controller-5d8f7b6c9-x2x7q",
        "metadata.namespace" => NAMESPACE,
        "spec.nodeName" => "node-1",
        "spec.serviceAccountName" => "terna-node",
        "status.podIP" => "10.0.0.5",
        "status.hostIP" => "192.168.1.10",
        other => panic!("no plausible value for fieldRef {other}: add one here"),
    }
    .to_string()
}

/// The kubelet's `$(VAR)` expansion: a reference to a variable defined
/// earlier expands and `$$` is a literal `$`. The kubelet leaves any other
/// reference as is, which here is an error: terna would get it literally.
fn expand(s: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some(after) = tail.strip_prefix("$(") {
            let end = after
                .find(')')
                .unwrap_or_else(|| panic!("unterminated $( in {s:?}"));
            let name = &after[..end];
            let value = vars.get(name).unwrap_or_else(|| {
                panic!("$({name}) in {s:?} is no variable defined before it: it would stay literal")
            });
            out.push_str(value);
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// The container's environment as the kubelet builds it, in order.
fn container_env(c: &Container) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    for e in c.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), _) => expand(v, &vars),
            (None, Some(from)) => {
                let field = from.field_ref.as_ref().unwrap_or_else(|| {
                    panic!(
                        "{}: only fieldRef sources have plausible values here",
                        e.name
                    )
                });
                field_value(&field.field_path)
            }
            (None, None) => String::new(),
        };
        vars.insert(e.name.clone(), value);
    }
    vars
}

fn container_args(c: &Container, env: &BTreeMap<String, String>) -> Vec<String> {
    c.args.iter().flatten().map(|a| expand(a, env)).collect()
}

/// `terna check-args -- <args>` with exactly `env` as its environment, as
/// clap reads flags' env fallbacks (NODE_NAME, AGENT_ADVERTISE, ...) too.
fn check_args(args: &[String], env: &BTreeMap<String, String>) -> Output {
    Command::new(env!("CARGO_BIN_EXE_terna"))
        .env_clear()
        .envs(env)
        .arg("check-args")
        .arg("--")
        .args(args)
        .output()
        .unwrap()
}

/// The value of `--name=value` or `--name value` in `args`.
fn flag(args: &[String], name: &str) -> Option<String> {
    let long = format!("--{name}");
    let eq = format!("{long}=");
    args.iter().enumerate().find_map(|(i, a)| {
        if let Some(v) = a.strip_prefix(&eq) {
            Some(v.to_string())
        } else if *a == long {
            args.get(i + 1).cloned()
        } else {
            None
        }
    })
}

/// `args` with `--name` (in either form) set to `value`.
fn with_flag(args: &[String], name: &str, value: &str) -> Vec<String> {
    let long = format!("--{name}");
    let eq = format!("{long}=");
    let mut out = Vec::new();
    let mut skip_next = false;
    for a in args {
        if skip_next {
            skip_next = false;
        } else if *a == long {
            skip_next = true;
        } else if !a.starts_with(&eq) {
            out.push(a.clone());
        }
    }
    out.push(format!("{eq}{value}"));
    out
}

/// Where the pod's first container sees the token Secret.
fn token_mount(pod: &PodSpec) -> PathBuf {
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| {
            v.secret
                .as_ref()
                .is_some_and(|s| s.secret_name.as_deref() == Some(TOKEN_SECRET))
        })
        .expect("a volume of the cluster token Secret");
    let mount = pod.containers[0]
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == volume.name)
        .expect("the token volume mounted");
    PathBuf::from(&mount.mount_path)
}

#[test]
fn deploy_base_passes_server_side_dry_run() {
    let env = KubeEnv::start();
    // A dry run creates nothing, so the namespace the base creates would
    // not exist for the objects in it (NamespaceLifecycle admission
    // rejects them): create it for real first. No other ordering matters:
    // the base holds no custom resources, so the CRDs need not exist.
    env.kubectl(&["apply", "-f", "deploy/namespace.yaml"]);
    let out = env.kubectl(&["apply", "--dry-run=server", "-k", "deploy/"]);
    for object in [
        "customresourcedefinition.apiextensions.k8s.io/storagepools.terna.dev",
        "customresourcedefinition.apiextensions.k8s.io/ternavolumes.terna.dev",
        "csidriver.storage.k8s.io/csi.terna.dev",
        "serviceaccount/terna-controller",
        "serviceaccount/terna-node",
        "clusterrole.rbac.authorization.k8s.io/terna-controller",
        "clusterrole.rbac.authorization.k8s.io/terna-node",
        "clusterrolebinding.rbac.authorization.k8s.io/terna-controller",
        "clusterrolebinding.rbac.authorization.k8s.io/terna-node",
        "role.rbac.authorization.k8s.io/terna-controller",
        "rolebinding.rbac.authorization.k8s.io/terna-controller",
        "configmap/terna-node-config",
        "deployment.apps/terna-controller",
        "daemonset.apps/terna-node",
    ] {
        assert!(out.contains(object), "{object} missing from:\n{out}");
    }
    // The token is the controller's to generate: the base ships none.
    assert!(!out.contains("secret/"), "a Secret in the base:\n{out}");
}

#[test]
fn every_storage_class_passes_server_side_dry_run() {
    let env = KubeEnv::start();
    let out = env.kubectl(&["apply", "--dry-run=server", "-f", "storageclasses/"]);
    let mut seen = 0;
    for entry in std::fs::read_dir(repo().join("storageclasses")).unwrap() {
        let name = entry.unwrap().path();
        let name = name.file_stem().unwrap().to_str().unwrap();
        assert!(
            out.contains(&format!("storageclass.storage.k8s.io/{name} created")),
            "{name} not accepted:\n{out}"
        );
        seen += 1;
    }
    assert!(seen >= 5, "only {seen} classes");
}

#[test]
fn every_container_args_list_parses_as_a_terna_command_line() {
    let mut checked = 0;
    for (file, pod) in [
        ("deploy/controller.yaml", controller_pod()),
        ("deploy/node.yaml", node_pod()),
    ] {
        for c in pod.init_containers.iter().flatten().chain(&pod.containers) {
            assert!(
                c.command.is_none(),
                "{file}: {}: command replaces the image's terna entrypoint",
                c.name
            );
            let env = container_env(c);
            let args = container_args(c, &env);
            let out = check_args(&args, &env);
            assert!(
                out.status.success(),
                "{file}: container {}: terna {args:?} with env {env:?} is rejected:\n{}",
                c.name,
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                format!("ok: {}\n", args[0])
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 2, "one container each in controller and node");
}

/// So that the test above can fail: check-args rejects what terna would.
#[test]
fn check_args_rejects_a_bogus_flag_and_a_bad_env_value() {
    let node = node_pod().containers.remove(0);
    let env = container_env(&node);
    let args = container_args(&node, &env);

    let mut bogus = args.clone();
    bogus.push("--no-such-flag".into());
    let out = check_args(&bogus, &env);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--no-such-flag"));
    assert!(out.stdout.is_empty());

    // The environment counts: an advertise address must have a port.
    let mut no_port = env.clone();
    no_port.insert("AGENT_ADVERTISE".into(), field_value("status.podIP"));
    let out = check_args(&args, &no_port);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("agent-advertise"));
}

#[test]
fn node_config_parses_and_points_at_what_node_yaml_mounts() {
    let cm: ConfigMap = serde_yaml::from_str(&read("deploy/node-config.yaml")).unwrap();
    let text = &cm.data.as_ref().unwrap()["terna.toml"];
    let config = terna::core::config::Config::parse(text, Path::new("terna.toml")).unwrap();
    assert!(!config.pools.is_empty());

    let pod = node_pod();
    let node = &pod.containers[0];
    let data_dir =
        PathBuf::from(flag(&container_args(node, &container_env(node)), "data-dir").unwrap());
    let mounts = node.volume_mounts.as_deref().unwrap();
    let volume = |name: &str| {
        pod.volumes
            .iter()
            .flatten()
            .find(|v| v.name == name)
            .unwrap()
    };

    // terna.toml is installed from --config into the data dir: the
    // ConfigMap's key is that file, mounted as a directory (a file mounted
    // inside the Bidirectional data dir would propagate to the host).
    let config_mount = mounts
        .iter()
        .find(|m| {
            volume(&m.name).config_map.as_ref().map(|c| c.name.as_str())
                == cm.metadata.name.as_deref()
        })
        .expect("the ConfigMap mounted");
    let config_flag =
        PathBuf::from(flag(&container_args(node, &container_env(node)), "config").unwrap());
    assert_eq!(
        config_flag,
        Path::new(&config_mount.mount_path).join(terna::core::config::CONFIG_FILE)
    );
    assert!(config_mount.sub_path.is_none());
    assert!(!Path::new(&config_mount.mount_path).starts_with(&data_dir));

    // Pools are on the host's disk, not in the container's.
    let data_mount = mounts
        .iter()
        .find(|m| Path::new(&m.mount_path) == data_dir)
        .expect("the data dir mounted");
    let host = volume(&data_mount.name)
        .host_path
        .as_ref()
        .expect("data dir is a hostPath");
    assert_eq!(Path::new(&host.path), data_dir);
    for pool in &config.pools {
        let path = config.pool_path(&data_dir, pool);
        assert!(
            path.starts_with(&data_dir),
            "pool {} at {path:?}",
            pool.name
        );
    }

    // The controller makes the token Secret (the base has no generator
    // for it); the node reads the key it writes, by the Secret's fixed name.
    let kustomization: serde_yaml::Value =
        serde_yaml::from_str(&read("deploy/kustomization.yaml")).unwrap();
    assert!(
        kustomization.get("secretGenerator").is_none(),
        "the base generates a Secret: the token is the controller's to make"
    );
    assert_eq!(
        config.cluster_token_file.as_deref(),
        Some(token_mount(&pod).join(TOKEN_KEY).as_path())
    );
    let controller = controller_pod();
    let c = &controller.containers[0];
    let args = container_args(c, &container_env(c));
    assert_eq!(
        flag(&args, "cluster-token-secret").as_deref(),
        Some(TOKEN_SECRET)
    );
    assert_eq!(flag(&args, "cluster-token-file"), None);
    assert!(
        controller
            .volumes
            .iter()
            .flatten()
            .all(|v| v.secret.is_none()),
        "the controller reads the token through the API, not a mounted Secret"
    );
}

/// A terna process, killed on drop.
struct Running {
    child: Child,
    log: PathBuf,
}

impl Running {
    fn spawn(args: &[String], env: &BTreeMap<String, String>, log: PathBuf) -> Running {
        let child = Command::new(env!("CARGO_BIN_EXE_terna"))
            .env_clear()
            .envs(env)
            .env("TERNA_LOG", "info")
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Running { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A kubeconfig for the test cluster holding only a token of `sa`.
fn service_account_kubeconfig(env: &KubeEnv, sa: &str, dir: &Path) -> PathBuf {
    let admin: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&env.kubeconfig).unwrap()).unwrap();
    let cluster = &admin["clusters"][0]["cluster"];
    let token = env.kubectl(&["create", "token", sa, "-n", NAMESPACE, "--duration=1h"]);
    let config = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority-data: {}\nusers:\n- name: {sa}\n  user:\n    token: {}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: {sa}\ncurrent-context: c\n",
        cluster["server"].as_str().unwrap(),
        cluster["certificate-authority-data"].as_str().unwrap(),
        token.trim()
    );
    let path = dir.join(format!("{sa}.kubeconfig"));
    std::fs::write(&path, config).unwrap();
    path
}

fn wait_until(
    what: &str,
    timeout: Duration,
    logs: &dyn Fn() -> String,
    mut done: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The token in Secret terna-cluster-token, if it exists.
fn secret_token(env: &KubeEnv) -> Option<Vec<u8>> {
    token_secret(env).map(|s| s.data.unwrap()[TOKEN_KEY].0.clone())
}

/// Secret terna-cluster-token, if it exists.
fn token_secret(env: &KubeEnv) -> Option<Secret> {
    named_secret(env, TOKEN_SECRET)
}

/// The cluster CA the controller made into Secret terna-cluster-ca, if it
/// exists.
fn secret_ca(env: &KubeEnv) -> Option<Vec<u8>> {
    named_secret(env, "terna-cluster-ca").map(|s| {
        s.data.unwrap()[terna::edge::kube::cluster_ca::CA_KEY]
            .0
            .clone()
    })
}

fn named_secret(env: &KubeEnv, name: &str) -> Option<Secret> {
    let out = env.kubectl(&[
        "get",
        "secret",
        name,
        "-n",
        NAMESPACE,
        "--ignore-not-found",
        "-o",
        "json",
    ]);
    (!out.trim().is_empty()).then(|| serde_json::from_str(&out).unwrap())
}

/// The controller and a node run with deploy/'s args and env (paths and
/// addresses swapped for local ones) and their ServiceAccounts' tokens;
/// they must take a claim through provisioning, events, capacity
/// publishing and deletion with no call refused.
#[test]
fn controller_and_node_provision_and_delete_a_volume_with_only_their_rbac() {
    let env = KubeEnv::start();
    env.install(&["apply", "-k", "deploy/"]);
    let root = tempfile::Builder::new()
        .prefix("terna-deploy-")
        .tempdir()
        .unwrap();
    let controller_pod = controller_pod();
    let controller = &controller_pod.containers[0];
    let controller_env = container_env(controller);
    let mut controller_args = container_args(controller, &controller_env);
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    controller_args = with_flag(&controller_args, "metrics-listen", &metrics);
    let kubeconfig = service_account_kubeconfig(&env, "terna-controller", root.path());
    controller_args = with_flag(&controller_args, "kubeconfig", kubeconfig.to_str().unwrap());
    let controller = Running::spawn(
        &controller_args,
        &controller_env,
        root.path().join("controller.log"),
    );
    wait_until(
        "the controller to generate the token and CA Secrets",
        Duration::from_secs(30),
        &|| controller.log(),
        || secret_token(&env).is_some() && secret_ca(&env).is_some(),
    );

    // The node reads the token the controller generated, as node.yaml's
    // mount of the Secret would give it.
    let token = root.path().join(TOKEN_KEY);
    std::fs::write(&token, secret_token(&env).unwrap()).unwrap();
    let token = token.to_str().unwrap();
    // And the CA, as node.yaml's mount of its Secret would.
    let ca = root.path().join("ca.json");
    std::fs::write(&ca, secret_ca(&env).unwrap()).unwrap();

    // The node, with one fast pool (for terna-scratch) in a local data dir.
    let node_pod = node_pod();
    let node = &node_pod.containers[0];
    let mut node_env = container_env(node);
    let node_name = node_env["NODE_NAME"].clone();
    let data = root.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let config = root.path().join("config/terna.toml");
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    std::fs::write(
        &config,
        format!(
            "cluster_token_file = {token:?}\ncluster_ca_file = {ca:?}\n\n[[pools]]\nname = \"fast\"\npath = \"pools/fast\"\ntier = \"fast\"\ncapacity_bytes = {}\n",
            1u64 << 40
        ),
    )
    .unwrap();
    let agent = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    node_env.insert("AGENT_ADVERTISE".into(), agent.clone());
    let mut node_args = container_args(node, &node_env);
    node_args = with_flag(&node_args, "data-dir", data.to_str().unwrap());
    node_args = with_flag(&node_args, "agent-listen", &agent);
    node_args = with_flag(&node_args, "heartbeat-secs", "1");
    node_args = with_flag(&node_args, "config", config.to_str().unwrap());
    // Not in a pod here, so engines stay where they are.
    node_args = with_flag(&node_args, "engine-cgroup-root", "/sys/fs/cgroup");
    let csi = format!("unix://{}", root.path().join("csi.sock").display());
    node_args = with_flag(&node_args, "endpoint", &csi);
    let registry = root.path().join("plugins_registry");
    node_args = with_flag(&node_args, "kubelet-registry", registry.to_str().unwrap());
    let kubeconfig = service_account_kubeconfig(&env, "terna-node", root.path());
    node_args = with_flag(&node_args, "kubeconfig", kubeconfig.to_str().unwrap());
    let node = Running::spawn(&node_args, &node_env, root.path().join("node.log"));

    let logs = || {
        format!(
            "--- node ---\n{}\n--- controller ---\n{}",
            node.log(),
            controller.log()
        )
    };

    let claim = root.path().join("claim.yaml");
    std::fs::write(
        &claim,
        format!(
            "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: data\n  namespace: default\n  annotations:\n    volume.kubernetes.io/selected-node: {node_name}\nspec:\n  storageClassName: terna-scratch\n  accessModes: [ReadWriteOnce]\n  resources:\n    requests:\n      storage: 1Gi\n"
        ),
    )
    .unwrap();
    env.kubectl(&["apply", "-f", claim.to_str().unwrap()]);
    let get = |args: &[&str]| env.kubectl(args);
    wait_until("the claim to bind", Duration::from_secs(120), &logs, || {
        get(&[
            "get",
            "pvc",
            "data",
            "-n",
            "default",
            "-o",
            "jsonpath={.status.phase}",
        ]) == "Bound"
    });
    wait_until(
        "the Provisioned event",
        Duration::from_secs(30),
        &logs,
        || {
            get(&[
                "get",
                "events.events.k8s.io",
                "-n",
                "default",
                "-o",
                "jsonpath={.items[*].reason}",
            ])
            .contains("Provisioned")
        },
    );
    wait_until(
        "CSIStorageCapacity objects",
        Duration::from_secs(60),
        &logs,
        || !get(&["get", "csistoragecapacities", "-n", NAMESPACE, "-o", "name"]).is_empty(),
    );
    let holder = get(&[
        "get",
        "lease",
        "terna-controller",
        "-n",
        NAMESPACE,
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    assert_eq!(holder, controller_env["POD_NAME"]);
    let node_holder = get(&[
        "get",
        "lease",
        &format!("terna-node-{node_name}"),
        "-n",
        NAMESPACE,
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    assert_eq!(node_holder, node_name, "the node renews its liveness lease");

    env.kubectl(&["delete", "pvc", "data", "-n", "default", "--wait=false"]);
    wait_until(
        "the volume to be deleted",
        Duration::from_secs(60),
        &logs,
        || {
            get(&["get", "pv", "-o", "name"]).is_empty()
                && get(&["get", "ternavolumes", "-o", "name"]).is_empty()
        },
    );
    let logs = logs();
    assert!(
        !logs.to_lowercase().contains("forbidden"),
        "a call was refused:\n{logs}"
    );
}

/// `kubectl auth can-i`, as `sa` in terna-system.
fn can_i(env: &KubeEnv, sa: &str, args: &[&str]) -> bool {
    let out = Command::new(repo().join(".tools/bin/kubectl"))
        .env("KUBECONFIG", &env.kubeconfig)
        .env("KUBECACHEDIR", env.dir.path().join("kubectl-cache"))
        .args(["auth", "can-i"])
        .args(args)
        .arg(format!("--as=system:serviceaccount:{NAMESPACE}:{sa}"))
        .output()
        .unwrap();
    match String::from_utf8_lossy(&out.stdout).trim() {
        "yes" => true,
        "no" => false,
        other => panic!(
            "can-i {args:?}: {other} {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

#[test]
fn service_accounts_cannot_read_secrets_or_write_beyond_their_duties() {
    let env = KubeEnv::start();
    env.kubectl(&["apply", "-k", "deploy/"]);
    for (sa, args) in [
        ("terna-controller", &["get", "secrets", "-n", NAMESPACE][..]),
        ("terna-controller", &["list", "secrets", "--all-namespaces"]),
        // The token Secret by name, and no other; never listed or changed.
        (
            "terna-controller",
            &["get", "secret/other", "-n", NAMESPACE],
        ),
        ("terna-controller", &["list", "secrets", "-n", NAMESPACE]),
        ("terna-controller", &["watch", "secrets", "-n", NAMESPACE]),
        (
            "terna-controller",
            &["update", &format!("secret/{TOKEN_SECRET}"), "-n", NAMESPACE],
        ),
        (
            "terna-controller",
            &["delete", &format!("secret/{TOKEN_SECRET}"), "-n", NAMESPACE],
        ),
        (
            "terna-controller",
            &["get", &format!("secret/{TOKEN_SECRET}"), "-n", "default"],
        ),
        ("terna-controller", &["create", "secrets", "-n", "default"]),
        (
            "terna-controller",
            &["update", "persistentvolumeclaims", "-n", "default"],
        ),
        ("terna-controller", &["delete", "storagepools.terna.dev"]),
        (
            "terna-controller",
            &["create", "leases.coordination.k8s.io", "-n", "default"],
        ),
        (
            "terna-controller",
            &[
                "create",
                "csistoragecapacities.storage.k8s.io",
                "-n",
                "default",
            ],
        ),
        ("terna-controller", &["create", "pods", "-n", NAMESPACE]),
        ("terna-node", &["get", "secrets", "-n", NAMESPACE]),
        ("terna-node", &["list", "persistentvolumes"]),
        ("terna-node", &["delete", "ternavolumes.terna.dev"]),
        ("terna-node", &["create", "ternavolumes.terna.dev"]),
        ("terna-node", &["delete", "storagepools.terna.dev"]),
        (
            "terna-node",
            &["create", "leases.coordination.k8s.io", "-n", "default"],
        ),
        (
            "terna-node",
            &["delete", "leases.coordination.k8s.io", "-n", NAMESPACE],
        ),
    ] {
        assert!(!can_i(&env, sa, args), "{sa} may {args:?}");
    }
    // And the check itself can say yes.
    assert!(can_i(
        &env,
        "terna-node",
        &["create", "storagepools.terna.dev"]
    ));
    assert!(can_i(
        &env,
        "terna-controller",
        &["create", "leases.coordination.k8s.io", "-n", NAMESPACE]
    ));
    // The cluster token: read by name, created when absent.
    assert!(can_i(
        &env,
        "terna-controller",
        &["get", &format!("secret/{TOKEN_SECRET}"), "-n", NAMESPACE]
    ));
    assert!(can_i(
        &env,
        "terna-controller",
        &["create", "secrets", "-n", NAMESPACE]
    ));
    // Its own liveness Lease, in its own namespace only.
    assert!(can_i(
        &env,
        "terna-node",
        &["update", "leases.coordination.k8s.io", "-n", NAMESPACE]
    ));
}

/// `terna controller` with deploy/'s args and env and its ServiceAccount's
/// token, its metrics on a free local port.
fn deployed_controller(env: &KubeEnv, dir: &Path, log: &str) -> Running {
    let pod = controller_pod();
    let c = &pod.containers[0];
    let c_env = container_env(c);
    let mut args = container_args(c, &c_env);
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    args = with_flag(&args, "metrics-listen", &metrics);
    let kubeconfig = dir.join("terna-controller.kubeconfig");
    if !kubeconfig.exists() {
        service_account_kubeconfig(env, "terna-controller", dir);
    }
    args = with_flag(&args, "kubeconfig", kubeconfig.to_str().unwrap());
    Running::spawn(&args, &c_env, dir.join(log))
}

/// Waits for `running` to exit by itself; its status.
fn exit_status(running: &mut Running, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = running.child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "still running after {timeout:?}:\n{}",
            running.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// deploy/ ships no token: the controller, with only its RBAC, generates
/// Secret terna-cluster-token on first start, a second start reuses it, and
/// a Secret holding the placeholder, a short token or no `token` key stops
/// it at start with an error naming the Secret.
#[test]
fn the_controller_generates_the_token_secret_once_and_refuses_a_bad_one() {
    let env = KubeEnv::start();
    env.kubectl(&["apply", "-k", "deploy/"]);
    let root = tempfile::Builder::new()
        .prefix("terna-token-")
        .tempdir()
        .unwrap();
    assert!(token_secret(&env).is_none(), "the base made the Secret");

    // First start: created, 32 random bytes in hex, labelled and annotated.
    let first = deployed_controller(&env, root.path(), "first.log");
    wait_until(
        "the controller to generate the token Secret",
        Duration::from_secs(30),
        &|| first.log(),
        || token_secret(&env).is_some(),
    );
    let secret = token_secret(&env).unwrap();
    let token = secret.data.as_ref().unwrap()[TOKEN_KEY].0.clone();
    assert_eq!(token.len(), 64, "{:?}", String::from_utf8_lossy(&token));
    assert!(
        token
            .iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
    );
    assert_eq!(secret.type_.as_deref(), Some("Opaque"));
    assert_eq!(
        secret.metadata.labels.as_ref().unwrap()["app.kubernetes.io/name"],
        "terna"
    );
    let note = &secret.metadata.annotations.as_ref().unwrap()
        [terna::edge::kube::cluster_token::GENERATED_ANNOTATION];
    assert!(note.contains("kubectl create secret generic"), "{note}");
    let version = secret.metadata.resource_version.clone();
    drop(first);

    // Second start: the same Secret, untouched, and it keeps running.
    let second = deployed_controller(&env, root.path(), "second.log");
    wait_until(
        "the second controller to read the Secret",
        Duration::from_secs(30),
        &|| second.log(),
        || {
            second
                .log()
                .contains("cluster token from the existing Secret")
        },
    );
    let again = token_secret(&env).unwrap();
    assert_eq!(again.data.unwrap()[TOKEN_KEY].0, token);
    assert_eq!(again.metadata.resource_version, version);
    drop(second);

    // A Secret an admin got wrong: the controller exits naming it.
    for (data, why) in [
        (
            "--from-literal=token=REPLACE-ME-with-the-output-of-openssl-rand-hex-32",
            "placeholder",
        ),
        ("--from-literal=token=short", "fewer than the 16"),
        (
            "--from-literal=tokn=0123456789abcdef0123",
            "has no key `token`",
        ),
    ] {
        env.kubectl(&["delete", "secret", TOKEN_SECRET, "-n", NAMESPACE]);
        env.kubectl(&[
            "create",
            "secret",
            "generic",
            TOKEN_SECRET,
            "-n",
            NAMESPACE,
            data,
        ]);
        let mut bad = deployed_controller(&env, root.path(), "bad.log");
        let status = exit_status(&mut bad, Duration::from_secs(30));
        let log = bad.log();
        assert!(!status.success(), "{data}: exited {status}:\n{log}");
        assert!(
            log.contains(&format!("Secret {NAMESPACE}/{TOKEN_SECRET}")),
            "{data}:\n{log}"
        );
        assert!(log.contains(why), "{data}:\n{log}");
        // And it left the Secret alone.
        assert!(token_secret(&env).unwrap().data.unwrap().len() == 1);
    }

    // One source of the token only.
    let pod = controller_pod();
    let c = &pod.containers[0];
    let c_env = container_env(c);
    let both = with_flag(
        &container_args(c, &c_env),
        "cluster-token-file",
        "/etc/terna/token/token",
    );
    let out = check_args(&both, &c_env);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cluster-token-secret"), "{err}");
}
