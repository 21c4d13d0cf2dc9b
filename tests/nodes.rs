//! Terna on real Kubernetes nodes: three real kubelets with real containerd
//! (scripts/kube-nodes), a real kube-apiserver, controller-manager and
//! kube-scheduler (scripts/kube-testenv), and `deploy/` applied through an
//! overlay that changes only the image, to images built here without a
//! registry (scripts/build-images). Everything is driven through the API
//! server, as a user would: no CSI call is made by the test.
//!
//! The nodes take a while to start (images imported, kubelets Ready, the
//! node plugin registered), so one cluster serves every test of this file:
//! `harness = false`, and `main` starts it, runs the tests one after the
//! other (the disruptive ones last) and stops it, also when a test fails.
//! Each test works in a namespace of its own. Arguments that are not flags
//! select tests by substring, like libtest's filter.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const NODES: usize = 3;
const IMAGE_TAGS: [&str; 2] = ["dev", "next"];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

struct Cluster {
    dir: PathBuf,
}

impl Cluster {
    fn kube_dir(&self) -> PathBuf {
        self.dir.join("kube")
    }

    fn start() -> Cluster {
        let dir = repo().join("target/nodes");
        let cluster = Cluster { dir: dir.clone() };
        // What a crashed earlier run left.
        cluster.stop();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();

        let t = Instant::now();
        run(Command::new(repo().join("scripts/build-images")).args(IMAGE_TAGS));
        eprintln!("images ready in {:.0?}", t.elapsed());
        let images = repo().join(".tools/images");
        let mut tars = vec![images.join("pause.tar"), images.join("workload.tar")];
        tars.extend(
            IMAGE_TAGS
                .iter()
                .map(|t| images.join(format!("terna-{t}.tar"))),
        );

        let t = Instant::now();
        run(Command::new(repo().join("scripts/kube-nodes"))
            .arg("net")
            .arg(&dir)
            .arg(NODES.to_string()));
        run(Command::new(repo().join("scripts/kube-testenv"))
            .arg("start")
            .arg(cluster.kube_dir())
            .env("KUBE_TESTENV_ADDRESS", "10.96.0.1")
            .env("KUBE_TESTENV_PORT", "443")
            .env("KUBE_TESTENV_SCHEDULER", "1"));
        run(Command::new(repo().join("scripts/kube-nodes"))
            .arg("start")
            .arg(&dir)
            .arg(NODES.to_string())
            .arg(cluster.kube_dir())
            .args(&tars));
        eprintln!("{NODES} nodes Ready in {:.0?}", t.elapsed());

        let t = Instant::now();
        cluster.install("dev");
        cluster.kubectl(&["apply", "-f", "storageclasses/"]);
        cluster.wait_for_terna();
        eprintln!("deploy/ running in {:.0?}", t.elapsed());
        cluster
    }

    /// `kubectl apply -k` of an overlay of deploy/ that changes the image
    /// reference and nothing else (kustomize wants the base as a relative
    /// path: the overlay is DIR/overlay, three levels below the repo).
    fn install(&self, tag: &str) {
        let overlay = self.dir.join("overlay");
        std::fs::create_dir_all(&overlay).unwrap();
        std::fs::write(
            overlay.join("kustomization.yaml"),
            format!(
                "apiVersion: kustomize.config.k8s.io/v1beta1\n\
                 kind: Kustomization\n\
                 resources:\n  - ../../../deploy\n\
                 images:\n  - name: ghcr.io/terna/terna\n    newName: terna.local/terna\n    newTag: {tag}\n"
            ),
        )
        .unwrap();
        self.kubectl(&["apply", "-k", overlay.to_str().unwrap()]);
    }

    fn wait_for_terna(&self) {
        wait_until("the controller Deployment available", 240, || {
            let [want, available, updated] = ["replicas", "availableReplicas", "updatedReplicas"]
                .map(|f| {
                    self.get(
                        "-n terna-system deployment terna-controller",
                        &format!("{{.status.{f}}}"),
                    )
                });
            !want.is_empty() && available == want && updated == want
        });
        wait_until("every node plugin pod ready", 240, || {
            self.get(
                "-n terna-system daemonset terna-node",
                "{.status.numberReady}/{.status.updatedNumberScheduled}",
            ) == format!("{NODES}/{NODES}")
        });
        wait_until("every node's StoragePool Ready", 120, || {
            let out = self.kubectl(&[
                "get",
                "storagepools",
                "-o",
                "jsonpath={range .items[*]}{.status.health}{\"\\n\"}{end}",
            ]);
            out.lines().filter(|l| *l == "Ready").count() >= NODES
        });
    }

    fn kubectl_result(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        let mut child = Command::new(repo().join(".tools/bin/kubectl"))
            .env("KUBECONFIG", self.kube_dir().join("kubeconfig"))
            .env("KUBECACHEDIR", self.kube_dir().join("kubectl-cache"))
            .args(args)
            .current_dir(repo())
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "kubectl {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    fn kubectl(&self, args: &[&str]) -> String {
        self.kubectl_result(args, None).unwrap()
    }

    fn apply(&self, yaml: &str) {
        self.kubectl_result(&["apply", "-f", "-"], Some(yaml))
            .unwrap();
    }

    /// One jsonpath of one object ("-n NS KIND NAME"), empty when absent.
    fn get(&self, object: &str, jsonpath: &str) -> String {
        let mut args: Vec<&str> = vec!["get"];
        args.extend(object.split_whitespace());
        let path = format!("jsonpath={jsonpath}");
        args.extend(["-o", &path]);
        self.kubectl_result(&args, None).unwrap_or_default()
    }

    /// `sh -c script` in a pod's container.
    fn exec(&self, ns: &str, pod: &str, script: &str) -> Result<String, String> {
        self.kubectl_result(&["exec", "-n", ns, pod, "--", "sh", "-c", script], None)
    }

    fn node_exec(&self, node: usize, cmd: &[&str]) -> String {
        let out = Command::new(repo().join("scripts/kube-nodes"))
            .arg("exec")
            .arg(&self.dir)
            .arg(node.to_string())
            .args(cmd)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn namespace(&self, name: &str) {
        self.apply(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n"
        ));
        // The ServiceAccount pods run as; made by the controller-manager.
        wait_until("the namespace's default ServiceAccount", 60, || {
            !self
                .get(
                    &format!("-n {name} serviceaccount default"),
                    "{.metadata.name}",
                )
                .is_empty()
        });
    }

    fn wait_running(&self, ns: &str, pod: &str, secs: u64) {
        wait_until(&format!("pod {ns}/{pod} Running and ready"), secs, || {
            self.get(
                &format!("-n {ns} pod {pod}"),
                "{.status.phase}/{.status.containerStatuses[0].ready}",
            ) == "Running/true"
        });
    }

    /// Diagnostics for a failed test: what the pods, claims and Terna say.
    fn dump(&self) {
        for args in [
            &["get", "pods", "-A", "-o", "wide"][..],
            &["get", "pvc", "-A"],
            &["get", "ternavolumes", "-o", "wide"],
            &["get", "events", "-A", "--sort-by=.lastTimestamp"],
        ] {
            if let Ok(out) = self.kubectl_result(args, None) {
                eprintln!("--- kubectl {}\n{}", args.join(" "), tail(&out, 40));
            }
        }
        for pod in self
            .kubectl_result(&["get", "pods", "-n", "terna-system", "-o", "name"], None)
            .unwrap_or_default()
            .lines()
        {
            if let Ok(out) = self.kubectl_result(&["logs", "-n", "terna-system", pod], None) {
                eprintln!("--- logs {pod}\n{}", tail(&out, 30));
            }
        }
        for i in 1..=NODES {
            let log = std::fs::read_to_string(self.dir.join(format!("node-{i}/kubelet.log")))
                .unwrap_or_default();
            eprintln!("--- node-{i} kubelet.log\n{}", tail(&log, 15));
        }
    }

    fn stop(&self) {
        let _ = Command::new(repo().join("scripts/kube-nodes"))
            .arg("stop")
            .arg(&self.dir)
            .status();
        let _ = Command::new(repo().join("scripts/kube-testenv"))
            .arg("stop")
            .arg(self.kube_dir())
            .status();
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Polls `done` every half second for up to `secs` seconds: generous
/// deadlines, as these tests share 2 cores with everything else.
/// A storage quantity as Kubernetes prints it (plain bytes or a binary
/// suffix), in bytes.
fn quantity_bytes(q: &str) -> Option<u64> {
    let q = q.trim();
    let (digits, shift) = match q.find(|ch: char| !ch.is_ascii_digit()) {
        None => (q, 0),
        Some(i) => (
            &q[..i],
            match &q[i..] {
                "Ki" => 10,
                "Mi" => 20,
                "Gi" => 30,
                "Ti" => 40,
                _ => return None,
            },
        ),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

fn wait_until(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < deadline, "timed out after {secs}s: {what}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

// ---------------------------------------------------------------------
// The tests.

/// Each node plugin registered itself with its kubelet (no
/// node-driver-registrar): CSINode lists the driver with its topology key
/// for every node, and each node's pool is a Ready StoragePool.
fn node_plugins_register_with_real_kubelets(c: &Cluster) {
    for i in 1..=NODES {
        wait_until(
            &format!("CSINode node-{i} lists csi.terna.dev"),
            120,
            || {
                c.get(
                    &format!("csinode node-{i}"),
                    "{.spec.drivers[?(@.name==\"csi.terna.dev\")].topologyKeys}",
                )
                .contains("terna.dev")
            },
        );
    }
}

/// What a writer pod does: checks what it wrote before (every file's
/// checksum), then writes more files, each fsynced before its checksum is
/// recorded (and the checksum list fsynced), then stays.
const CHECKED_WRITER: &str = r#"
set -e
cd /data
if [ -f sums ]; then
  sha256sum -c -s sums || { echo CORRUPT; sha256sum -c sums; exit 1; }
  echo "verified $(wc -l < sums)"
fi
n=$(ls | grep -c '^blk-' || true)
i=$n
while [ $i -lt $((n + 8)) ]; do
  dd if=/dev/urandom of=blk-$i bs=64k count=4 conv=fsync 2>/dev/null
  sha256sum blk-$i >> sums
  sync -d sums
  i=$((i + 1))
done
echo "wrote $i"
touch /tmp/ready
exec sleep 1000000
"#;

fn writer_pod_spec(claim_volume: &str) -> String {
    format!(
        r#"
      terminationGracePeriodSeconds: 2
      containers:
        - name: app
          image: terna.local/workload:1
          imagePullPolicy: Never
          command: ["/bin/sh", "-c", {script}]
          readinessProbe:
            exec: {{command: ["test", "-e", "/tmp/ready"]}}
            periodSeconds: 1
          volumeMounts:
            - {{name: {claim_volume}, mountPath: /data}}"#,
        script = serde_json::to_string(CHECKED_WRITER).unwrap(),
    )
}

/// The way databases run: a StatefulSet of 3 with one claim of the default
/// class per pod, WaitForFirstConsumer resolved by the real scheduler. A
/// pod deleted comes back (anywhere) and finds every byte it fsynced.
fn statefulset_pods_keep_their_data(c: &Cluster) {
    let ns = "sts";
    c.namespace(ns);
    c.apply(&format!(
        r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: db, namespace: {ns}}}
spec:
  serviceName: db
  replicas: 3
  podManagementPolicy: Parallel
  selector: {{matchLabels: {{app: db}}}}
  template:
    metadata: {{labels: {{app: db}}}}
    spec:{pod}
  volumeClaimTemplates:
    - metadata: {{name: data}}
      spec:
        accessModes: [ReadWriteOnce]
        storageClassName: terna-standard
        resources: {{requests: {{storage: 128Mi}}}}
"#,
        pod = writer_pod_spec("data")
    ));
    for i in 0..3 {
        c.wait_running(ns, &format!("db-{i}"), 240);
    }
    for i in 0..3 {
        let out = c
            .exec(ns, &format!("db-{i}"), "wc -l < /data/sums")
            .unwrap();
        assert_eq!(out.trim(), "8", "db-{i} wrote 8 files");
    }
    let node_before = c.get(&format!("-n {ns} pod db-0"), "{.spec.nodeName}");
    c.kubectl(&["delete", "pod", "-n", ns, "db-0", "--wait=true"]);
    c.wait_running(ns, "db-0", 240);
    let logs = c.kubectl(&["logs", "-n", ns, "db-0"]);
    assert!(
        logs.contains("verified 8"),
        "db-0 after its restart: {logs}"
    );
    let out = c
        .exec(
            ns,
            "db-0",
            "cd /data && sha256sum -c -s sums && wc -l < sums",
        )
        .unwrap();
    assert_eq!(out.trim(), "16");
    eprintln!(
        "db-0 ran on {node_before}, then on {}",
        c.get(&format!("-n {ns} pod db-0"), "{.spec.nodeName}")
    );
    c.kubectl(&["delete", "namespace", ns, "--wait=true", "--timeout=180s"]);
}

/// A claim in Block mode is a raw device in the pod: what is written to it
/// reads back, also from the pod's successor.
fn block_claim_is_a_raw_device(c: &Cluster) {
    let ns = "block";
    c.namespace(ns);
    let pod = |name: &str| {
        format!(
            r#"
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
    - name: app
      image: terna.local/workload:1
      imagePullPolicy: Never
      command: ["sleep", "1000000"]
      volumeDevices: [{{name: raw, devicePath: /dev/xvda}}]
  volumes: [{{name: raw, persistentVolumeClaim: {{claimName: raw}}}}]
"#
        )
    };
    c.apply(&format!(
        r#"
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: raw, namespace: {ns}}}
spec:
  accessModes: [ReadWriteOnce]
  volumeMode: Block
  storageClassName: terna-standard
  resources: {{requests: {{storage: 64Mi}}}}
"#
    ));
    c.apply(&pod("first"));
    c.wait_running(ns, "first", 240);
    let sum = c
        .exec(
            ns,
            "first",
            "dd if=/dev/urandom of=/tmp/pattern bs=1M count=8 2>/dev/null && \
             dd if=/tmp/pattern of=/dev/xvda bs=1M conv=fsync 2>/dev/null && \
             sha256sum < /tmp/pattern",
        )
        .unwrap();
    let size = c
        .exec(ns, "first", "blockdev --getsize64 /dev/xvda")
        .unwrap();
    assert_eq!(
        size.trim(),
        (64u64 << 20).to_string(),
        "the device is the claim's size"
    );
    c.kubectl(&["delete", "pod", "-n", ns, "first", "--wait=true"]);
    c.apply(&pod("second"));
    c.wait_running(ns, "second", 240);
    let read = c
        .exec(
            ns,
            "second",
            "dd if=/dev/xvda bs=1M count=8 2>/dev/null | sha256sum",
        )
        .unwrap();
    assert_eq!(read, sum, "the device keeps what the first pod wrote");
    c.kubectl(&["delete", "namespace", ns, "--wait=true", "--timeout=180s"]);
}

/// fsGroup, readOnly and subPath behave as with any CSI driver: the
/// volume's files belong to the pod's fsGroup (fsGroupPolicy File), a
/// read-only mount refuses writes, a subPath shows one directory.
fn fsgroup_readonly_and_subpath(c: &Cluster) {
    let ns = "mounts";
    c.namespace(ns);
    c.apply(&format!(
        r#"
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: shared, namespace: {ns}}}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: terna-standard
  resources: {{requests: {{storage: 64Mi}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: app, namespace: {ns}}}
spec:
  terminationGracePeriodSeconds: 1
  securityContext: {{runAsUser: 1000, runAsGroup: 1000, fsGroup: 2000}}
  containers:
    - name: writer
      image: terna.local/workload:1
      imagePullPolicy: Never
      command: ["sh", "-c", "mkdir -p /data/sub && echo hello > /data/sub/greeting && exec sleep 1000000"]
      volumeMounts: [{{name: v, mountPath: /data}}]
    - name: reader
      image: terna.local/workload:1
      imagePullPolicy: Never
      command: ["sleep", "1000000"]
      volumeMounts: [{{name: v, mountPath: /data, readOnly: true}}]
  volumes: [{{name: v, persistentVolumeClaim: {{claimName: shared}}}}]
"#
    ));
    c.wait_running(ns, "app", 240);
    let group = c.exec(ns, "app", "stat -c %g /data && id -G").unwrap();
    assert!(
        group.lines().next() == Some("2000") && group.contains("2000"),
        "the volume's root is the fsGroup's and the pod is in it: {group}"
    );
    let ro = c.kubectl_result(
        &[
            "exec",
            "-n",
            ns,
            "app",
            "-c",
            "reader",
            "--",
            "sh",
            "-c",
            "touch /data/x",
        ],
        None,
    );
    assert!(
        ro.as_ref()
            .is_err_and(|e| e.contains("Read-only file system")),
        "a readOnly mount refuses writes: {ro:?}"
    );
    // A second pod on the same node would be needed for a subPath of a
    // ReadWriteOnce claim in use; the same pod's later container does.
    wait_until("the writer's greeting", 60, || {
        c.exec(ns, "app", "cat /data/sub/greeting")
            .is_ok_and(|g| g.trim() == "hello")
    });
    c.apply(&format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: sub, namespace: {ns}}}
spec:
  terminationGracePeriodSeconds: 1
  nodeName: {node}
  securityContext: {{runAsUser: 1000, fsGroup: 2000}}
  containers:
    - name: app
      image: terna.local/workload:1
      imagePullPolicy: Never
      command: ["sleep", "1000000"]
      volumeMounts: [{{name: v, mountPath: /only, subPath: sub}}]
  volumes: [{{name: v, persistentVolumeClaim: {{claimName: shared}}}}]
"#,
        node = c.get(&format!("-n {ns} pod app"), "{.spec.nodeName}")
    ));
    c.wait_running(ns, "sub", 240);
    assert_eq!(
        c.exec(ns, "sub", "ls /only && cat /only/greeting").unwrap(),
        "greeting\nhello\n"
    );
    c.kubectl(&["delete", "namespace", ns, "--wait=true", "--timeout=180s"]);
}

/// Claims expanded while their pod runs, through the API server only: the
/// controller grows the replicas and the PV, the real kubelet calls
/// NodeExpandVolume, and inside the pod the filesystem and the raw device
/// are larger, keep what was written and take writes in the new space.
/// The filesystem is xfs: growing a mounted ext4 needs CAP_SYS_RESOURCE,
/// which this machine's root lacks (a real node's privileged pod has it).
fn claims_grow_while_their_pods_run(c: &Cluster) {
    let ns = "grow";
    c.namespace(ns);
    c.apply(&format!(
        r#"
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: files, namespace: {ns}}}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: terna-xfs
  resources: {{requests: {{storage: 300Mi}}}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: raw, namespace: {ns}}}
spec:
  accessModes: [ReadWriteOnce]
  volumeMode: Block
  storageClassName: terna-standard
  resources: {{requests: {{storage: 64Mi}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: app, namespace: {ns}}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
    - name: app
      image: terna.local/workload:1
      imagePullPolicy: Never
      command: ["sleep", "1000000"]
      volumeMounts: [{{name: files, mountPath: /data}}]
      volumeDevices: [{{name: raw, devicePath: /dev/xvda}}]
  volumes:
    - {{name: files, persistentVolumeClaim: {{claimName: files}}}}
    - {{name: raw, persistentVolumeClaim: {{claimName: raw}}}}
"#
    ));
    c.wait_running(ns, "app", 240);
    let fs_kib = || -> u64 {
        c.exec(ns, "app", "df -k /data | tail -n 1")
            .ok()
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    let dev_bytes = || -> u64 {
        c.exec(ns, "app", "blockdev --getsize64 /dev/xvda")
            .ok()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(0)
    };
    let before = fs_kib();
    assert!(
        before > 0 && before <= 300 << 10,
        "a 300 MiB filesystem: {before} KiB"
    );
    assert_eq!(dev_bytes(), 64 << 20);
    let sums = c
        .exec(
            ns,
            "app",
            "dd if=/dev/urandom of=/data/before bs=1M count=16 2>/dev/null && sync /data/before && \
             dd if=/dev/urandom of=/tmp/p bs=1M count=8 2>/dev/null && \
             dd if=/tmp/p of=/dev/xvda bs=1M conv=fsync 2>/dev/null && \
             sha256sum < /data/before && sha256sum < /tmp/p",
        )
        .unwrap();

    for (claim, size) in [("files", "600Mi"), ("raw", "128Mi")] {
        let patch = format!(r#"{{"spec":{{"resources":{{"requests":{{"storage":"{size}"}}}}}}}}"#);
        c.kubectl(&[
            "patch",
            "pvc",
            "-n",
            ns,
            claim,
            "--type=merge",
            "-p",
            &patch,
        ]);
    }
    let asked = Instant::now();
    // The kubelet grows a mounted volume at its next sync of the pod (about
    // a minute), then records the claim's new capacity.
    let capacity = |claim: &str| {
        quantity_bytes(&c.get(
            &format!("-n {ns} pvc {claim}"),
            "{.status.capacity.storage}",
        ))
    };
    wait_until("both claims' status capacity grown", 240, || {
        capacity("files") == Some(600 << 20) && capacity("raw") == Some(128 << 20)
    });
    wait_until("the pod sees the larger filesystem and device", 60, || {
        fs_kib() > 500 << 10 && dev_bytes() == 128 << 20
    });
    println!(
        "expansion: filesystem {before} KiB -> {} KiB, device 64 MiB -> 128 MiB, {:.1}s after the patch, pod never restarted",
        fs_kib(),
        asked.elapsed().as_secs_f64()
    );
    assert_eq!(
        c.get(
            &format!("-n {ns} pod app"),
            "{.status.containerStatuses[0].restartCount}"
        ),
        "0"
    );
    for (claim, want) in [("files", 600u64 << 20), ("raw", 128 << 20)] {
        let pv = c.get(&format!("-n {ns} pvc {claim}"), "{.spec.volumeName}");
        assert_eq!(
            quantity_bytes(&c.get(&format!("pv {pv}"), "{.spec.capacity.storage}")),
            Some(want)
        );
    }
    // The old bytes are where they were; the new space takes writes.
    let after = c
        .exec(
            ns,
            "app",
            "sha256sum < /data/before && dd if=/dev/xvda bs=1M count=8 2>/dev/null | sha256sum && \
             dd if=/dev/urandom of=/data/after bs=1M count=400 2>/dev/null && sync /data/after && \
             dd if=/dev/urandom of=/tmp/q bs=1M count=8 2>/dev/null && \
             dd if=/tmp/q of=/dev/xvda bs=1M seek=112 conv=fsync 2>/dev/null && \
             [ \"$(dd if=/dev/xvda bs=1M skip=112 count=8 2>/dev/null | sha256sum)\" = \"$(sha256sum < /tmp/q)\" ] && echo tail-ok",
        )
        .unwrap();
    assert_eq!(
        after,
        format!("{sums}tail-ok\n"),
        "data kept, new space written"
    );
    c.kubectl(&["delete", "namespace", ns, "--wait=true", "--timeout=180s"]);
}

/// A workload that writes a 4 KiB record at a time, each fsynced, and
/// prints `ack N T` (T: uptime seconds) only after its fsync returned, or
/// `ERR N ...`. Record N holds N as 15 digits and a newline, 256 times, at
/// offset N * 4 KiB, so every acknowledged record can be checked.
const RECORD_WRITER: &str = r#"
i=0
while :; do
  yes "$(printf '%015d' $i)" | head -n 256 > /tmp/b
  if dd if=/tmp/b of=/data/w bs=4096 seek=$i conv=notrunc,fsync 2>/tmp/err; then
    echo "ack $i $(cut -d' ' -f1 /proc/uptime)"
  else
    echo "ERR $i $(cat /tmp/err)"
  fi
  i=$((i + 1))
  sleep 0.05
done
"#;

/// Checks records 0..=last in the pod; prints `bad K` (K records wrong).
fn check_records(c: &Cluster, ns: &str, pod: &str, last: u64) {
    let script = format!(
        r#"i=0; bad=0; while [ $i -le {last} ]; do
  [ "$(dd if=/data/w bs=4096 skip=$i count=1 2>/dev/null | uniq)" = "$(printf '%015d' $i)" ] || {{ echo "wrong record $i"; bad=$((bad + 1)); }}
  i=$((i + 1))
done; echo "bad $bad""#
    );
    let out = c.exec(ns, pod, &script).unwrap();
    assert!(
        out.ends_with("bad 0\n"),
        "acknowledged records lost: {}",
        tail(&out, 10)
    );
}

/// Acknowledged record numbers and the longest gap between two acks.
fn acks(log: &str) -> (Vec<u64>, f64, Vec<String>) {
    let mut acked = Vec::new();
    let mut errors = Vec::new();
    let mut longest = 0f64;
    let mut last_t: Option<f64> = None;
    for line in log.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["ack", n, t] => {
                let t: f64 = t.parse().unwrap();
                acked.push(n.parse().unwrap());
                if let Some(prev) = last_t {
                    longest = longest.max(t - prev);
                }
                last_t = Some(t);
            }
            _ if line.starts_with("ERR") => errors.push(line.to_string()),
            _ => {}
        }
    }
    (acked, longest, errors)
}

fn record_writer(c: &Cluster, ns: &str, class: &str) {
    c.apply(&format!(
        r#"
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: records, namespace: {ns}}}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: {class}
  resources: {{requests: {{storage: 128Mi}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: writer, namespace: {ns}}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
    - name: app
      image: terna.local/workload:1
      imagePullPolicy: Never
      command: ["/bin/sh", "-c", {script}]
      volumeMounts: [{{name: v, mountPath: /data}}]
  volumes: [{{name: v, persistentVolumeClaim: {{claimName: records}}}}]
"#,
        script = serde_json::to_string(RECORD_WRITER).unwrap()
    ));
    c.wait_running(ns, "writer", 240);
    wait_until("the writer's first acks", 60, || {
        acks(&c.kubectl(&["logs", "-n", ns, "writer"])).0.len() > 20
    });
}

fn node_plugin_pod_on(c: &Cluster, node: &str) -> String {
    c.kubectl(&[
        "get",
        "pods",
        "-n",
        "terna-system",
        "-l",
        "app.kubernetes.io/component=node",
        "--field-selector",
        &format!("spec.nodeName={node}"),
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ])
}

/// Restarting and upgrading Terna's own pods never interrupts a mounted
/// volume: a workload writes fsynced records throughout while its node's
/// plugin pod is deleted, and while the DaemonSet and the controller
/// Deployment roll to another image tag (claims being filed meanwhile, each
/// bound exactly once). No I/O error, no acknowledged record lost; the
/// longest stall is reported.
fn terna_restarts_and_upgrades_never_interrupt_a_volume(c: &Cluster) {
    let ns = "upgrade";
    c.namespace(ns);
    record_writer(c, ns, "terna-standard");
    let node = c.get(&format!("-n {ns} pod writer"), "{.spec.nodeName}");

    let plugin = node_plugin_pod_on(c, &node);
    let t = Instant::now();
    c.kubectl(&[
        "delete",
        "pod",
        "-n",
        "terna-system",
        &plugin,
        "--wait=true",
    ]);
    wait_until(
        "a new node plugin pod ready on the writer's node",
        180,
        || {
            let now = node_plugin_pod_on(c, &node);
            !now.is_empty()
                && now != plugin
                && c.get(
                    &format!("-n terna-system pod {now}"),
                    "{.status.containerStatuses[0].ready}",
                ) == "true"
        },
    );
    eprintln!("node plugin pod on {node} replaced in {:.1?}", t.elapsed());
    std::thread::sleep(Duration::from_secs(5));

    c.apply(
        "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata:\n  name: nodes-immediate\n\
         provisioner: csi.terna.dev\nparameters:\n  tier: standard\n  replicas: \"3\"\n\
         reclaimPolicy: Delete\nvolumeBindingMode: Immediate\n",
    );
    let t = Instant::now();
    c.install(IMAGE_TAGS[1]);
    let claims = 6;
    for k in 0..claims {
        c.apply(&format!(
            "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: during-{k}, namespace: {ns}}}\n\
             spec:\n  accessModes: [ReadWriteOnce]\n  storageClassName: nodes-immediate\n  \
             resources: {{requests: {{storage: 16Mi}}}}\n"
        ));
        std::thread::sleep(Duration::from_secs(2));
    }
    c.kubectl(&[
        "rollout",
        "status",
        "-n",
        "terna-system",
        "daemonset/terna-node",
        "--timeout=400s",
    ]);
    c.kubectl(&[
        "rollout",
        "status",
        "-n",
        "terna-system",
        "deployment/terna-controller",
        "--timeout=300s",
    ]);
    eprintln!("rolled to {} in {:.1?}", IMAGE_TAGS[1], t.elapsed());
    c.wait_for_terna();
    wait_until("every claim filed during the roll bound", 240, || {
        (0..claims).all(|k| c.get(&format!("-n {ns} pvc during-{k}"), "{.status.phase}") == "Bound")
    });
    let volumes: Vec<String> = (0..claims)
        .map(|k| c.get(&format!("-n {ns} pvc during-{k}"), "{.spec.volumeName}"))
        .collect();
    let pvs = c.kubectl(&[
        "get",
        "pv",
        "-o",
        "jsonpath={range .items[*]}{.spec.claimRef.namespace}/{.spec.claimRef.name}{\"\\n\"}{end}",
    ]);
    for k in 0..claims {
        let bound = pvs
            .lines()
            .filter(|l| *l == format!("{ns}/during-{k}"))
            .count();
        assert_eq!(
            bound, 1,
            "claim during-{k} has exactly one PV (volumes {volumes:?})"
        );
    }
    std::thread::sleep(Duration::from_secs(5));

    let log = c.kubectl(&["logs", "-n", ns, "writer"]);
    let (acked, longest, errors) = acks(&log);
    assert!(errors.is_empty(), "I/O errors in the workload: {errors:?}");
    let last = *acked.last().unwrap();
    assert_eq!(
        acked.len() as u64,
        last + 1,
        "every record acknowledged in order"
    );
    check_records(c, ns, "writer", last);
    eprintln!(
        "upgrade: {} records acknowledged, none lost, no I/O error; longest stall {longest:.2}s",
        acked.len()
    );
    c.kubectl(&["delete", "namespace", ns, "--wait=true", "--timeout=180s"]);
    c.kubectl(&["delete", "storageclass", "nodes-immediate"]);
}

/// The node holding a StatefulSet pod's volume dies: kubelet, containerd,
/// the node plugin and every engine SIGKILLed at once. The admin's part is
/// Kubernetes' own, once the node is NotReady: the out-of-service taint,
/// so the dead node's pod may be deleted. The pod comes back on another
/// node with every acknowledged byte; when the node boots again its
/// replica catches up and the volume is healthy. Times are reported.
fn node_loss_moves_the_pod_with_its_data(c: &Cluster) {
    let ns = "loss";
    c.namespace(ns);
    c.apply(&format!(
        r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: db, namespace: {ns}}}
spec:
  serviceName: db
  replicas: 1
  selector: {{matchLabels: {{app: db}}}}
  template:
    metadata: {{labels: {{app: db}}}}
    spec:{pod}
  volumeClaimTemplates:
    - metadata: {{name: data}}
      spec:
        accessModes: [ReadWriteOnce]
        storageClassName: terna-standard
        resources: {{requests: {{storage: 128Mi}}}}
"#,
        pod = writer_pod_spec("data")
    ));
    c.wait_running(ns, "db-0", 240);
    let node = c.get(&format!("-n {ns} pod db-0"), "{.spec.nodeName}");
    let index: usize = node.trim_start_matches("node-").parse().unwrap();
    let pv = c.get(&format!("-n {ns} pvc data-db-0"), "{.spec.volumeName}");
    // The TernaVolume is named by the volume id, the PV's handle.
    let volume = c.get(&format!("pv {pv}"), "{.spec.csi.volumeHandle}");

    let killed = Instant::now();
    run(Command::new(repo().join("scripts/kube-nodes"))
        .arg("kill")
        .arg(&c.dir)
        .arg(index.to_string()));
    wait_until(&format!("{node} NotReady"), 180, || {
        c.get(
            &format!("node {node}"),
            "{.status.conditions[?(@.type==\"Ready\")].status}",
        ) != "True"
    });
    let not_ready = killed.elapsed();
    c.kubectl(&[
        "taint",
        "node",
        &node,
        "node.kubernetes.io/out-of-service=nodeshutdown:NoExecute",
    ]);
    wait_until("db-0 Running on another node", 300, || {
        let on = c.get(&format!("-n {ns} pod db-0"), "{.spec.nodeName}");
        !on.is_empty()
            && on != node
            && c.get(
                &format!("-n {ns} pod db-0"),
                "{.status.phase}/{.status.containerStatuses[0].ready}",
            ) == "Running/true"
    });
    let running = killed.elapsed();
    let logs = c.kubectl(&["logs", "-n", ns, "db-0"]);
    assert!(logs.contains("verified 8"), "db-0 on its new node: {logs}");

    let booted = Instant::now();
    run(Command::new(repo().join("scripts/kube-nodes"))
        .arg("boot")
        .arg(&c.dir)
        .arg(index.to_string()));
    c.kubectl(&[
        "taint",
        "node",
        &node,
        "node.kubernetes.io/out-of-service=nodeshutdown:NoExecute-",
    ]);
    wait_until("the volume healthy again", 300, || {
        c.get(
            &format!("ternavolume {volume}"),
            "{.status.state}/{.status.healthyReplicas}",
        ) == "healthy/3/3"
    });
    eprintln!(
        "node loss: {node} NotReady {:.0?} after the kill, db-0 Running elsewhere {:.0?} after it; \
         volume healthy {:.0?} after the node booted again",
        not_ready,
        running,
        booted.elapsed()
    );
    c.wait_for_terna();
    c.kubectl(&["delete", "namespace", ns, "--wait=true", "--timeout=180s"]);
}

/// After every workload and claim is gone, no node has a loop device, a
/// mount, a FUSE session, an engine process or a replica file left.
fn nothing_is_left_behind(c: &Cluster) {
    wait_until("every TernaVolume and PV gone", 240, || {
        c.kubectl(&["get", "ternavolumes,pv", "-o", "name"])
            .trim()
            .is_empty()
    });
    let mut left = Vec::new();
    for i in 1..=NODES {
        let mounts = c.node_exec(i, &["findmnt", "-rn", "-o", "TARGET,FSTYPE"]);
        left.extend(
            mounts
                .lines()
                .filter(|l| {
                    // fusectl is the kernel's own control filesystem, not a session of ours.
                    let fstype = l.rsplit(' ').next().unwrap_or("");
                    fstype == "fuse"
                        || fstype.starts_with("fuse.")
                        || l.starts_with("/var/lib/terna/run")
                        || l.contains("/plugins/kubernetes.io/csi/")
                        || l.contains("kubernetes.io~csi")
                })
                .map(|l| format!("node-{i}: mount {l}")),
        );
        let pools = c.dir.join(format!("node-{i}/terna/pools/default"));
        if let Ok(entries) = std::fs::read_dir(&pools) {
            left.extend(entries.map(|e| format!("node-{i}: replica {:?}", e.unwrap().path())));
        }
    }
    let loops = Command::new("losetup")
        .args(["-l", "-n", "-O", "NAME,BACK-FILE"])
        .output()
        .unwrap();
    left.extend(
        String::from_utf8_lossy(&loops.stdout)
            .lines()
            .filter(|l| l.contains("/var/lib/terna/"))
            .map(|l| format!("loop device {l}")),
    );
    let engines = Command::new("pgrep")
        .args(["-a", "-f", "terna engine"])
        .output()
        .unwrap();
    left.extend(
        String::from_utf8_lossy(&engines.stdout)
            .lines()
            .filter(|l| l.contains("--volume"))
            .map(|l| format!("engine process {l}")),
    );
    assert!(left.is_empty(), "left behind: {left:#?}");
}

type Test = (&'static str, fn(&Cluster));

const TESTS: &[Test] = &[
    (
        "node_plugins_register_with_real_kubelets",
        node_plugins_register_with_real_kubelets,
    ),
    (
        "statefulset_pods_keep_their_data",
        statefulset_pods_keep_their_data,
    ),
    ("block_claim_is_a_raw_device", block_claim_is_a_raw_device),
    ("fsgroup_readonly_and_subpath", fsgroup_readonly_and_subpath),
    (
        "claims_grow_while_their_pods_run",
        claims_grow_while_their_pods_run,
    ),
    (
        "terna_restarts_and_upgrades_never_interrupt_a_volume",
        terna_restarts_and_upgrades_never_interrupt_a_volume,
    ),
    (
        "node_loss_moves_the_pod_with_its_data",
        node_loss_moves_the_pod_with_its_data,
    ),
    ("nothing_is_left_behind", nothing_is_left_behind),
];

fn main() {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if std::env::args().any(|a| a == "--list") {
        for (name, _) in TESTS {
            println!("{name}: test");
        }
        return;
    }
    let selected: Vec<&Test> = TESTS
        .iter()
        .filter(|(name, _)| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str())))
        .collect();
    if selected.is_empty() {
        println!("running 0 tests");
        return;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "tests/nodes.rs runs real kubelets and containerd: run it as root"
    );
    println!("running {} tests", selected.len());
    let started = Instant::now();
    let cluster = match std::panic::catch_unwind(Cluster::start) {
        Ok(c) => c,
        Err(_) => {
            let c = Cluster {
                dir: repo().join("target/nodes"),
            };
            c.dump();
            c.stop();
            println!("test result: FAILED. the cluster did not start");
            std::process::exit(101);
        }
    };
    let mut failed = Vec::new();
    for (name, test) in selected {
        let t = Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| test(&cluster)));
        match outcome {
            Ok(()) => println!("test {name} ... ok ({:.0?})", t.elapsed()),
            Err(_) => {
                println!("test {name} ... FAILED ({:.0?})", t.elapsed());
                cluster.dump();
                failed.push(*name);
            }
        }
    }
    cluster.stop();
    println!("nodes suite took {:.0?}", started.elapsed());
    if failed.is_empty() {
        println!("test result: ok");
    } else {
        println!("test result: FAILED. failures: {failed:?}");
        std::process::exit(101);
    }
}
