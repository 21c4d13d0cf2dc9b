//! The provisioner against a real control plane: etcd, kube-apiserver and
//! kube-controller-manager (whose PV controller completes binding), built
//! by scripts/install-kube-tools and started per test by
//! scripts/kube-testenv. Three `terna node` processes register fast,
//! standard and slow pools (one zone each) and serve them through their
//! replica agents; `terna controller` provisions.
//!
//! Stood in for: the scheduler, for WaitForFirstConsumer classes (the test
//! sets the selected-node annotation the scheduler would set), and the
//! kubelet, where a test stages a volume or expands it on a node: the test
//! makes the kubelet's CSI calls itself (the real kubelet's are in
//! tests/nodes.rs).

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::cluster::{
    Cluster, NODE_LEASE_SECS, claim, create_claim, eventually, pvs, terna_volumes, wait_bound,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::storage::v1::{CSIStorageCapacity, StorageClass};
use kube::api::{Api, DeleteParams, ListParams, PostParams};

const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";

/// The classes in storageclasses/: (name, WaitForFirstConsumer, replicas,
/// reclaim policy).
fn classes() -> Vec<(String, bool, usize, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/storageclasses")).unwrap()
    {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        let sc: StorageClass = serde_yaml::from_str(&text).unwrap();
        let params = sc.parameters.clone().unwrap_or_default();
        let class = terna::core::class::VolumeClass::parse(&params).unwrap();
        out.push((
            sc.metadata.name.clone().unwrap(),
            sc.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer"),
            class.replicas as usize,
            sc.reclaim_policy.clone().unwrap_or_else(|| "Delete".into()),
        ));
    }
    out.sort();
    out
}

async fn warnings_for(client: &kube::Client, ns: &str, claim: &str) -> Vec<String> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(claim))
        .filter(|e| e.type_.as_deref() == Some("Warning"))
        .map(|e| {
            format!(
                "{}: {}",
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default()
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_storage_class_binds_a_claim_with_replicas_on_distinct_nodes() {
    let mut cluster = Cluster::start(3).await;
    cluster.start_controller_with("c1", &["--capacity-namespace", "default"]);
    let client = cluster.client().await;
    let mut names = Vec::new();
    for (class, wffc, _, _) in classes() {
        let annotations: Vec<(&str, &str)> = if wffc {
            vec![(SELECTED_NODE, "n2")]
        } else {
            vec![]
        };
        let name = format!("claim-{class}");
        create_claim(
            &client,
            "default",
            &claim(
                &name,
                &class,
                "100Mi",
                class.ends_with("-block"),
                &annotations,
            ),
        )
        .await;
        names.push(name);
    }
    // A block-mode claim too.
    create_claim(
        &client,
        "default",
        &claim(
            "claim-block",
            "terna-fast",
            "64Mi",
            true,
            &[(SELECTED_NODE, "n1")],
        ),
    )
    .await;
    names.push("claim-block".into());

    let bound = wait_bound(&cluster, "default", &names, Duration::from_secs(60)).await;
    let pv_list = pvs(&client).await;
    let volumes = terna_volumes(&client).await;
    for pvc in &bound {
        let class_name = pvc
            .spec
            .as_ref()
            .unwrap()
            .storage_class_name
            .clone()
            .unwrap();
        let (_, _, replicas, reclaim) = classes().into_iter().find(|c| c.0 == class_name).unwrap();
        let pv_name = pvc.spec.as_ref().unwrap().volume_name.clone().unwrap();
        let pv = pv_list
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(&pv_name))
            .unwrap();
        let spec = pv.spec.as_ref().unwrap();
        assert_eq!(
            spec.persistent_volume_reclaim_policy.as_deref(),
            Some(reclaim.as_str())
        );
        let csi = spec.csi.as_ref().unwrap();
        assert_eq!(csi.driver, terna::DRIVER_NAME);
        // 100Mi and 64Mi are whole MiB: exactly the request, except that
        // xfs volumes are made at mkfs.xfs's 300 MiB minimum.
        let want = if pvc.metadata.name.as_deref() == Some("claim-block") {
            64 << 20
        } else if class_name == "terna-xfs" {
            300 << 20
        } else {
            100 << 20
        };
        assert_eq!(
            spec.capacity.as_ref().unwrap()["storage"].0,
            want.to_string()
        );
        let tv = volumes
            .iter()
            .find(|v| v.metadata.name.as_deref() == Some(&csi.volume_handle))
            .unwrap();
        assert_eq!(tv.spec.replicas.len(), replicas, "{class_name}");
        let nodes: BTreeSet<&str> = tv.spec.replicas.iter().map(|r| r.node.as_str()).collect();
        assert_eq!(nodes.len(), replicas, "{class_name}: replicas share a node");
        let status = tv.status.as_ref().unwrap();
        assert_eq!(status.phase, "ready");
        assert_eq!(status.state, "healthy");
        if replicas == 1 {
            // Data locality: the one replica is on the selected node.
            assert_eq!(tv.spec.replicas[0].node, "n2", "{class_name}");
        }
    }
    // Every replica file exists on its node's pool.
    let files = cluster.replica_files();
    let expected: usize = volumes.iter().map(|v| v.spec.replicas.len()).sum();
    assert_eq!(files.len(), expected, "{files:?}");
    // kubectl tells the story.
    let table = cluster.env.kubectl(&["get", "ternavolumes"]);
    assert!(
        table.contains("healthy") && table.contains("3/3"),
        "{table}"
    );
    let table = cluster.env.kubectl(&["get", "storagepools"]);
    assert!(table.contains("Ready") && table.contains("n3"), "{table}");
    // Each node measured its pools' disks when it began serving them.
    let pools: Api<terna::edge::kube::crd::StoragePool> = Api::all(client.clone());
    for p in pools.list(&ListParams::default()).await.unwrap().items {
        let status = p.status.unwrap();
        assert!(
            status.measured_write_mib_per_sec.unwrap_or(0.0) > 0.0,
            "{:?}",
            p.metadata.name
        );
        assert!(
            status.measured_read_mib_per_sec.unwrap_or(0.0) > 0.0,
            "{:?}",
            p.metadata.name
        );
        assert_eq!(status.capacity_bytes, 1 << 40);
    }

    // Capacity per class, for the scheduler: each node has 1 TiB per tier,
    // so a 3-replica class can place at most 1 TiB per volume.
    let api: Api<CSIStorageCapacity> = Api::namespaced(client.clone(), "default");
    let c = api.clone();
    eventually("capacity for every class", Duration::from_secs(30), || {
        let c = c.clone();
        async move { c.list(&ListParams::default()).await.unwrap().items.len() >= classes().len() }
    })
    .await;
    for cap in api.list(&ListParams::default()).await.unwrap().items {
        let available: u64 = cap.capacity.unwrap().0.parse().unwrap();
        let max: u64 = cap.maximum_volume_size.unwrap().0.parse().unwrap();
        assert!(
            available > 0 && max > 0 && max <= 1 << 40,
            "{}",
            cap.storage_class_name
        );
    }
}

async fn add_class(client: &kube::Client, name: &str, params: &[(&str, &str)], reclaim: &str) {
    let api: Api<StorageClass> = Api::all(client.clone());
    let sc = StorageClass {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        provisioner: terna::DRIVER_NAME.into(),
        parameters: Some(
            params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        reclaim_policy: Some(reclaim.into()),
        volume_binding_mode: Some("Immediate".into()),
        ..Default::default()
    };
    api.create(&PostParams::default(), &sc).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_class_parameters_give_a_warning_that_names_them_and_create_nothing() {
    let mut cluster = Cluster::start(3).await;
    cluster.start_controller("c1");
    let client = cluster.client().await;
    add_class(
        &client,
        "typo",
        &[("tier", "fast"), ("speed", "ludicrous")],
        "Delete",
    )
    .await;
    add_class(&client, "too-many", &[("replicas", "9")], "Delete").await;
    add_class(&client, "impossible", &[("replicas", "4")], "Delete").await;
    for class in ["typo", "too-many", "impossible"] {
        create_claim(
            &client,
            "default",
            &claim(&format!("bad-{class}"), class, "1Gi", false, &[]),
        )
        .await;
    }
    let expect = [
        ("bad-typo", "speed"),
        ("bad-too-many", "replicas=\"9\""),
        // Three nodes cannot hold four replicas on distinct nodes.
        ("bad-impossible", "4"),
    ];
    for (claim_name, needle) in expect {
        let c = client.clone();
        eventually(
            &format!("a warning on {claim_name}"),
            Duration::from_secs(30),
            || {
                let c = c.clone();
                async move {
                    warnings_for(&c, "default", claim_name)
                        .await
                        .iter()
                        .any(|w| w.starts_with("ProvisioningFailed") && w.contains(needle))
                }
            },
        )
        .await;
    }
    let warnings = warnings_for(&client, "default", "bad-typo").await;
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("StorageClass typo") && w.contains("accepted keys")),
        "{warnings:?}"
    );
    // Nothing was created for any of them.
    assert!(pvs(&client).await.is_empty());
    assert!(terna_volumes(&client).await.is_empty());
    assert!(cluster.replica_files().is_empty());
    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    for c in api.list(&ListParams::default()).await.unwrap().items {
        assert_eq!(c.status.unwrap().phase.as_deref(), Some("Pending"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_claims_delete_or_retain_their_volume_as_the_class_says() {
    let mut cluster = Cluster::start(3).await;
    cluster.start_controller("c1");
    let client = cluster.client().await;
    add_class(&client, "gone", &[("tier", "standard")], "Delete").await;
    add_class(&client, "kept", &[("tier", "slow")], "Retain").await;
    create_claim(
        &client,
        "default",
        &claim("doomed", "gone", "10Mi", false, &[]),
    )
    .await;
    create_claim(
        &client,
        "default",
        &claim("precious", "kept", "10Mi", false, &[]),
    )
    .await;
    let bound = wait_bound(
        &cluster,
        "default",
        &["doomed".into(), "precious".into()],
        Duration::from_secs(60),
    )
    .await;
    let pv_of = |n: &str| -> String {
        bound
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some(n))
            .unwrap()
            .spec
            .as_ref()
            .unwrap()
            .volume_name
            .clone()
            .unwrap()
    };
    let (doomed_pv, precious_pv) = (pv_of("doomed"), pv_of("precious"));
    assert_eq!(cluster.replica_files().len(), 6);

    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    for n in ["doomed", "precious"] {
        api.delete(n, &DeleteParams::default()).await.unwrap();
    }
    let c = client.clone();
    let doomed = doomed_pv.clone();
    eventually(
        "the Delete PV and its volume to go",
        Duration::from_secs(60),
        || {
            let (c, doomed) = (c.clone(), doomed.clone());
            async move {
                let pv_gone = !pvs(&c)
                    .await
                    .iter()
                    .any(|p| p.metadata.name.as_deref() == Some(&doomed));
                pv_gone && terna_volumes(&c).await.len() == 1
            }
        },
    )
    .await;
    // The retained volume: PV Released, replicas and TernaVolume kept.
    let c = client.clone();
    let precious = precious_pv.clone();
    eventually(
        "the Retain PV to be Released",
        Duration::from_secs(60),
        || {
            let (c, precious) = (c.clone(), precious.clone());
            async move {
                pvs(&c).await.iter().any(|p| {
                    p.metadata.name.as_deref() == Some(&precious)
                        && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Released")
                })
            }
        },
    )
    .await;
    let volumes = terna_volumes(&client).await;
    assert_eq!(volumes.len(), 1);
    assert_eq!(volumes[0].spec.volume_name, precious_pv);
    let files = cluster.replica_files();
    assert_eq!(files.len(), 3, "{files:?}");
    assert!(files.iter().all(|f| f.contains("/slow/")), "{files:?}");
    // Deleting the retained PV by hand keeps the data (Retain) and the PV
    // goes once our finalizer is released.
    let pv_api: Api<k8s_openapi::api::core::v1::PersistentVolume> = Api::all(client.clone());
    pv_api
        .delete(&precious_pv, &DeleteParams::default())
        .await
        .unwrap();
    let c = client.clone();
    eventually(
        "the retained PV to be deleted",
        Duration::from_secs(30),
        || {
            let c = c.clone();
            async move { pvs(&c).await.is_empty() }
        },
    )
    .await;
    assert_eq!(cluster.replica_files().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_claims_filed_at_once_all_bind() {
    let mut cluster = Cluster::start(3).await;
    cluster.start_controller("c1");
    let client = cluster.client().await;
    add_class(&client, "bulk", &[("tier", "standard")], "Delete").await;
    let names: Vec<String> = (0..200).map(|i| format!("bulk-{i}")).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in names.chunks(20) {
        let (client, chunk) = (client.clone(), chunk.to_vec());
        tasks.spawn(async move {
            for n in chunk {
                create_claim(&client, "default", &claim(&n, "bulk", "1Gi", false, &[])).await;
            }
        });
    }
    tasks.join_all().await;
    let bound = wait_bound(&cluster, "default", &names, Duration::from_secs(240)).await;
    let pv_names: BTreeSet<String> = bound
        .iter()
        .map(|c| c.spec.as_ref().unwrap().volume_name.clone().unwrap())
        .collect();
    assert_eq!(pv_names.len(), 200);
    assert_eq!(pvs(&client).await.len(), 200);
    assert_eq!(terna_volumes(&client).await.len(), 200);
    assert_eq!(cluster.replica_files().len(), 600);
}

/// Counts that must hold once provisioning settles: one PV per claim, one
/// volume per PV, three replica files per volume, nothing else.
async fn assert_exactly_once(cluster: &Cluster, claims: usize) {
    let client = cluster.client().await;
    let pv_list = pvs(&client).await;
    let volumes = terna_volumes(&client).await;
    assert_eq!(pv_list.len(), claims, "duplicate or missing PVs");
    assert_eq!(volumes.len(), claims, "orphan or missing volumes");
    let handles: BTreeSet<String> = pv_list
        .iter()
        .map(|p| {
            p.spec
                .as_ref()
                .unwrap()
                .csi
                .as_ref()
                .unwrap()
                .volume_handle
                .clone()
        })
        .collect();
    let ids: BTreeSet<String> = volumes
        .iter()
        .map(|v| v.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(handles, ids);
    assert_eq!(
        cluster.replica_files().len(),
        claims * 3,
        "orphan replica files"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_killed_mid_provisioning_leaves_no_duplicates_or_orphans() {
    let mut cluster = Cluster::start(3).await;
    let first = cluster.start_controller("c1");
    let client = cluster.client().await;
    add_class(&client, "crashy", &[("tier", "fast")], "Delete").await;
    let names: Vec<String> = (0..60).map(|i| format!("crash-{i}")).collect();
    for n in &names {
        create_claim(&client, "default", &claim(n, "crashy", "8Mi", false, &[])).await;
    }
    // Kill it once some, but not all, volumes exist.
    let c = client.clone();
    eventually("provisioning to begin", Duration::from_secs(60), || {
        let c = c.clone();
        async move { !terna_volumes(&c).await.is_empty() }
    })
    .await;
    cluster.controllers[first].kill_hard();
    let made = terna_volumes(&client).await.len();
    assert!(
        made < names.len(),
        "all {made} provisioned before the kill; nothing tested"
    );
    // The lease of the dead controller must expire before the next leads.
    cluster.start_controller("c2");
    wait_bound(&cluster, "default", &names, Duration::from_secs(120)).await;
    assert_exactly_once(&cluster, names.len()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_restarted_mid_run_and_everything_binds() {
    let mut cluster = Cluster::start(3).await;
    cluster.start_controller("c1");
    let client = cluster.client().await;
    add_class(&client, "steady", &[("tier", "standard")], "Delete").await;
    let names: Vec<String> = (0..40).map(|i| format!("steady-{i}")).collect();
    for n in &names[..20] {
        create_claim(&client, "default", &claim(n, "steady", "8Mi", false, &[])).await;
    }
    cluster.env.restart_apiserver(3);
    let client = cluster.client().await;
    for n in &names[20..] {
        create_claim(&client, "default", &claim(n, "steady", "8Mi", false, &[])).await;
    }
    wait_bound(&cluster, "default", &names, Duration::from_secs(120)).await;
    assert_exactly_once(&cluster, names.len()).await;
    assert!(
        cluster.controllers[0].is_running(),
        "the controller died with the API server"
    );
}

async fn leader(client: &kube::Client) -> Option<String> {
    let api: Api<Lease> = Api::namespaced(client.clone(), "default");
    api.get_opt("terna-controller")
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec?.holder_identity)
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// GET /metrics from a controller: sample name (with labels) to value.
fn scrape(addr: &str) -> std::collections::BTreeMap<String, f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let body = out.split_once("\r\n\r\n").unwrap().1;
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_controllers_run_and_one_leads() {
    let mut cluster = Cluster::start(3).await;
    let metrics: std::collections::BTreeMap<&str, String> =
        [("c1", free_addr()), ("c2", free_addr())].into();
    cluster.start_controller_with("c1", &["--metrics-listen", &metrics["c1"]]);
    cluster.start_controller_with("c2", &["--metrics-listen", &metrics["c2"]]);
    let client = cluster.client().await;
    add_class(&client, "duo", &[("tier", "fast")], "Delete").await;
    let c = client.clone();
    eventually("a leader", Duration::from_secs(30), || {
        let c = c.clone();
        async move { leader(&c).await.is_some() }
    })
    .await;
    let first = leader(&client).await.unwrap();
    let names: Vec<String> = (0..20).map(|i| format!("duo-{i}")).collect();
    for n in &names[..10] {
        create_claim(&client, "default", &claim(n, "duo", "8Mi", false, &[])).await;
    }
    wait_bound(&cluster, "default", &names[..10], Duration::from_secs(60)).await;
    // Only the leader provisioned: every Provisioned event is its own.
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let reporters: BTreeSet<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("Provisioned"))
        .filter_map(|e| e.reporting_instance)
        .collect();
    assert_eq!(reporters, BTreeSet::from([first.clone()]));
    let standby = cluster
        .controllers
        .iter()
        .find(|p| p.name != first)
        .unwrap()
        .log();
    assert!(
        !standby.contains("claim provisioned"),
        "the standby provisioned:\n{standby}"
    );
    // Their metrics say the same.
    let other = if first == "c1" { "c2" } else { "c1" };
    let leader_metrics = scrape(&metrics[first.as_str()]);
    let standby_metrics = scrape(&metrics[other]);
    assert_eq!(leader_metrics["terna_controller_leading"], 1.0);
    assert_eq!(standby_metrics["terna_controller_leading"], 0.0);
    assert_eq!(leader_metrics["terna_claims_provisioned_total"], 10.0);
    assert_eq!(standby_metrics["terna_claims_provisioned_total"], 0.0);
    assert_eq!(leader_metrics["terna_provision_seconds_count"], 10.0);
    assert_eq!(leader_metrics["terna_volumes{state=\"healthy\"}"], 10.0);

    // The leader dies; the other takes over once the lease expires.
    let index = cluster
        .controllers
        .iter()
        .position(|p| p.name == first)
        .unwrap();
    cluster.controllers[index].kill_hard();
    for n in &names[10..] {
        create_claim(&client, "default", &claim(n, "duo", "8Mi", false, &[])).await;
    }
    wait_bound(&cluster, "default", &names, Duration::from_secs(60)).await;
    let second = leader(&client).await.unwrap();
    assert_ne!(second, first);
    assert_exactly_once(&cluster, names.len()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csi_create_volume_on_the_controller_endpoint_serves_the_sidecar_deployment() {
    let mut cluster = Cluster::start(3).await;
    let socket = cluster.root.path().join("controller.sock");
    let endpoint = format!("unix://{}", socket.display());
    cluster.start_controller_with("c1", &["--endpoint", &endpoint]);
    let c = socket.clone();
    eventually("the CSI socket", Duration::from_secs(30), || {
        let c = c.clone();
        async move { c.exists() }
    })
    .await;
    let mut csi = common::csi_client::Csi::connect(&socket).await;
    // The controller learns the pools within seconds of starting; until
    // then a create finds no room (ResourceExhausted) and is retried, as
    // the sidecar would.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let vol = loop {
        match csi
            .create(
                "pvc-from-sidecar",
                50 << 20,
                &[("tier", "fast"), ("replicas", "3")],
                common::csi_client::mount_cap("ext4"),
            )
            .await
        {
            Ok(v) => break v,
            Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                assert!(std::time::Instant::now() < deadline, "{s:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => panic!("{s:?}"),
        }
    };
    assert_eq!(vol.capacity_bytes, 50 << 20);
    // Repeating the call answers the same volume.
    let again = csi
        .create(
            "pvc-from-sidecar",
            50 << 20,
            &[("tier", "fast"), ("replicas", "3")],
            common::csi_client::mount_cap("ext4"),
        )
        .await
        .unwrap();
    assert_eq!(again.volume_id, vol.volume_id);
    let client = cluster.client().await;
    let volumes = terna_volumes(&client).await;
    assert_eq!(volumes.len(), 1);
    assert_eq!(
        volumes[0].metadata.name.as_deref(),
        Some(vol.volume_id.as_str())
    );
    assert_eq!(cluster.replica_files().len(), 3);
    let condition = csi.condition(&vol.volume_id).await;
    assert!(!condition.abnormal, "{}", condition.message);
    csi.delete(&vol.volume_id).await;
    assert!(terna_volumes(&client).await.is_empty());
    assert!(cluster.replica_files().is_empty());
}

/// Unmounts and stops engines under a directory when the test ends, even
/// when it fails, so no mount or process outlives it.
struct Cleanup(std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        common::cleanup(&self.0);
    }
}

/// Files a 64Mi claim against a new fast class, waits for it to bind and
/// returns its volume id (the PV's CSI volume handle).
async fn provision_one(cluster: &Cluster, class: &str, name: &str) -> String {
    let client = cluster.client().await;
    add_class(&client, class, &[("tier", "fast")], "Delete").await;
    create_claim(&client, "default", &claim(name, class, "64Mi", false, &[])).await;
    let bound = wait_bound(cluster, "default", &[name.into()], Duration::from_secs(60)).await;
    let pv_name = bound[0].spec.as_ref().unwrap().volume_name.clone().unwrap();
    pvs(&client)
        .await
        .into_iter()
        .find(|p| p.metadata.name.as_deref() == Some(&pv_name))
        .unwrap()
        .spec
        .unwrap()
        .csi
        .unwrap()
        .volume_handle
}

/// What the kubelet does on node `i` for a pod using volume `id`: stage
/// (ext4) and publish, at n<i>-staging and n<i>-target.
async fn mount_on(
    cluster: &Cluster,
    i: usize,
    id: &str,
) -> (
    common::csi_client::Csi,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let cap = common::csi_client::mount_cap("ext4");
    let root = cluster.root.path();
    let mut csi = common::csi_client::Csi::connect(&cluster.node_socket(i)).await;
    let staging = root.join(format!("n{i}-staging"));
    let target = root.join(format!("n{i}-target"));
    std::fs::create_dir_all(&staging).unwrap();
    csi.stage(id, &staging, cap.clone()).await;
    csi.publish(id, &staging, &target, cap).await;
    (csi, staging, target)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bound_claim_mounts_on_a_cluster_node_and_only_one_node_at_a_time_kubelet_stood_in() {
    use sha2::{Digest, Sha256};
    common::assert_root("kubernetes");
    let mut cluster = Cluster::start(3).await;
    let _cleanup = Cleanup(cluster.root.path().to_path_buf());
    cluster.start_controller("c1");
    let client = cluster.client().await;
    let id = provision_one(&cluster, "mountable", "data").await;
    let cap = common::csi_client::mount_cap("ext4");
    let root = cluster.root.path().to_path_buf();

    // The kubelet's calls on node n1: stage, publish, and a checksummed file.
    let (mut n1, staging1, target1) = mount_on(&cluster, 1, &id).await;
    let data: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let digest = Sha256::digest(&data);
    common::write_synced(&target1.join("data.bin"), &data);
    let tv = terna_volume(&client, &id).await;
    assert_eq!(tv.status.unwrap().staged_on.unwrap().node, "n1");

    // While n1 holds it, n2 is refused.
    let mut n2 = common::csi_client::Csi::connect(&cluster.node_socket(2)).await;
    let (staging2, target2) = (root.join("n2-staging"), root.join("n2-target"));
    std::fs::create_dir_all(&staging2).unwrap();
    let refused = n2
        .node
        .node_stage_volume(terna::proto::csi::NodeStageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging2.display().to_string(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(refused.message().contains("n1"), "{}", refused.message());

    // Released on n1, it mounts on n2 with every byte intact.
    n1.unpublish(&id, &target1).await;
    n1.unstage(&id, &staging1).await;
    n2.stage(&id, &staging2, cap.clone()).await;
    n2.publish(&id, &staging2, &target2, cap).await;
    let read = std::fs::read(target2.join("data.bin")).unwrap();
    assert_eq!(Sha256::digest(&read), digest, "data changed between nodes");
    n2.unpublish(&id, &target2).await;
    n2.unstage(&id, &staging2).await;
    // No mount, loop device or engine left (the node and controller
    // processes are the cluster's own).
    let left: Vec<String> = common::leftovers(&root)
        .into_iter()
        .filter(|l| !l.starts_with("process") || l.contains(" engine "))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Connects to a Unix socket as a gRPC channel.
async fn unix_channel(socket: std::path::PathBuf) -> tonic::transport::Channel {
    tonic::transport::Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_plugin_registers_with_the_kubelet_itself_kubelet_stood_in() {
    use terna::proto::csi as csi_pb;
    use terna::proto::pluginregistration as reg;
    let cluster = Cluster::start(1).await;
    // What the kubelet's plugin watcher does: find the socket in
    // plugins_registry, ask who it is, dial the CSI endpoint it names,
    // check the driver there, and report the outcome.
    let socket = terna::edge::csi::registration::socket_in(&cluster.registry_dir(1));
    let s = socket.clone();
    eventually("the registration socket", Duration::from_secs(30), || {
        let s = s.clone();
        async move { s.exists() }
    })
    .await;
    let mut registration =
        reg::registration_client::RegistrationClient::new(unix_channel(socket).await);
    let info = registration
        .get_info(reg::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.r#type, "CSIPlugin");
    assert_eq!(info.name, terna::DRIVER_NAME);
    assert_eq!(info.endpoint, cluster.node_socket(1).display().to_string());
    assert!(info.supported_versions.contains(&"1.0.0".to_string()));

    let channel = unix_channel(info.endpoint.into()).await;
    let plugin = csi_pb::identity_client::IdentityClient::new(channel.clone())
        .get_plugin_info(csi_pb::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(plugin.name, terna::DRIVER_NAME);
    let node = csi_pb::node_client::NodeClient::new(channel)
        .node_get_info(csi_pb::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(node.node_id, "n1");

    registration
        .notify_registration_status(reg::RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        })
        .await
        .unwrap();
    let log = cluster.nodes[0].log();
    assert!(log.contains("registered with the kubelet"), "{log}");
}

async fn claim_events(client: &kube::Client, claim: &str) -> Vec<String> {
    let api: Api<Event> = Api::namespaced(client.clone(), "default");
    api.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(claim))
        .filter_map(|e| e.reason)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_lost_and_back_shows_as_degraded_then_healthy_events_on_the_claim() {
    use sha2::{Digest, Sha256};
    use std::io::Write;
    common::assert_root("kubernetes");
    let mut cluster = Cluster::start(3).await;
    let _cleanup = Cleanup(cluster.root.path().to_path_buf());
    cluster.start_controller("c1");
    let client = cluster.client().await;
    let id = provision_one(&cluster, "watched", "watched").await;
    let cap = common::csi_client::mount_cap("ext4");
    let root = cluster.root.path().to_path_buf();
    let mut n1 = common::csi_client::Csi::connect(&cluster.node_socket(1)).await;
    let (staging, target) = (root.join("staging"), root.join("target"));
    std::fs::create_dir_all(&staging).unwrap();
    n1.stage(&id, &staging, cap.clone()).await;
    n1.publish(&id, &staging, &target, cap.clone()).await;

    // Node n3 (one replica) dies; writes go on, on two replicas.
    cluster.nodes[2].kill_hard();
    let data: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(40503) >> 7) as u8)
        .collect();
    {
        let mut f = std::fs::File::create(target.join("while-away.bin")).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
    }
    wait_claim_event(
        &client,
        "watched",
        "VolumeDegraded",
        Duration::from_secs(60),
    )
    .await;

    // It comes back: the replica catches up and the claim hears of it.
    cluster.nodes[2].restart();
    wait_claim_event(&client, "watched", "VolumeHealthy", Duration::from_secs(90)).await;
    let tv = terna_volume(&client, &id).await;
    let status = tv.status.unwrap();
    assert_eq!(status.state, "healthy");
    // Only what was written while it was away was copied.
    let copied: u64 = status
        .replicas
        .iter()
        .filter_map(|r| r.last_catch_up_bytes)
        .sum();
    assert!(copied > 0 && copied < 64 << 20, "copied {copied} bytes");
    let read = std::fs::read(target.join("while-away.bin")).unwrap();
    assert_eq!(Sha256::digest(&read), Sha256::digest(&data));
    n1.unpublish(&id, &target).await;
    n1.unstage(&id, &staging).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_dies_holding_a_volume_releases_it_when_its_lease_expires() {
    use sha2::{Digest, Sha256};
    common::assert_root("kubernetes");
    let mut cluster = Cluster::start(3).await;
    let _cleanup = Cleanup(cluster.root.path().to_path_buf());
    cluster.start_controller("c1");
    let client = cluster.client().await;
    let id = provision_one(&cluster, "orphaned", "orphaned").await;
    let cap = common::csi_client::mount_cap("ext4");
    let root = cluster.root.path().to_path_buf();
    let (_, staging1, target1) = mount_on(&cluster, 1, &id).await;
    let data: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2246822519) >> 11) as u8)
        .collect();
    common::write_synced(&target1.join("before.bin"), &data);
    let n1_device = terna::datapath::host::mounts::mount_at(&staging1)
        .unwrap()
        .expect("staged on n1")
        .source;

    // Node n1's plugin dies (its lease lapses), but the volume's engine
    // there lives on, as on a node cut off from its peers' view: it must not
    // write behind the new holder's back.
    let engine: i32 =
        std::fs::read_to_string(cluster.node_dir(1).join(format!("run/{id}/engine.pid")))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    cluster.nodes[0].kill_hard();

    // While n1's lease is current, n2 is refused; once it lapses, n2 takes
    // the volume over.
    let mut n2 = common::csi_client::Csi::connect(&cluster.node_socket(2)).await;
    let (staging2, target2) = (root.join("n2-staging"), root.join("n2-target"));
    std::fs::create_dir_all(&staging2).unwrap();
    let stage2 = terna::proto::csi::NodeStageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging2.display().to_string(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    };
    let refused = n2.node.node_stage_volume(stage2.clone()).await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(refused.message().contains("n1"), "{}", refused.message());
    let deadline = std::time::Instant::now() + Duration::from_secs(10 * NODE_LEASE_SECS);
    while let Err(e) = n2.node.node_stage_volume(stage2.clone()).await {
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        assert!(
            std::time::Instant::now() < deadline,
            "n1's claim never lapsed: {e:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let status = terna_volume(&client, &id).await.status.unwrap();
    let claim = status.staged_on.unwrap();
    assert_eq!((claim.node.as_str(), claim.epoch), ("n2", 2));
    // n2 held n1's lapsed Lease off before claiming: a renewal of n1's
    // slipping in would otherwise let its engine write on after this.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), "default");
    let n1_lease = leases.get("terna-node-n1").await.unwrap();
    assert_eq!(
        n1_lease.spec.unwrap().holder_identity.as_deref(),
        Some("n2 (taking over)")
    );
    let on_n1 = tv_replica_on(&client, &id, "n1").await;
    assert_eq!(
        on_n1.state, "faulted",
        "n1's replica may hold unacknowledged writes"
    );
    assert!(
        on_n1
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("lease expired"),
        "{on_n1:?}"
    );

    // The old engine's writes are refused (fenced at the agents, and its
    // fault records refused by the store), then it stops by itself.
    let late = (|| -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(target1.join("late.bin"))?;
        f.write_all(&data)?;
        f.sync_all()
    })();
    assert!(
        late.is_err(),
        "n1's engine acknowledged a write after the takeover"
    );
    println!("late write on n1 after the takeover: {late:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    // Orphaned when n1's plugin died: once it exits it may linger as a
    // zombie of whoever adopted it, so "running" means not a zombie.
    let running = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit(") ")
                .next()
                .is_some_and(|rest| !rest.starts_with('Z'))
        })
    };
    while running(engine) {
        assert!(
            std::time::Instant::now() < deadline,
            "n1's engine still runs"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Every byte acknowledged on n1 reads back on n2, and it takes writes.
    n2.publish(&id, &staging2, &target2, cap.clone()).await;
    let read = std::fs::read(target2.join("before.bin")).unwrap();
    assert_eq!(
        Sha256::digest(&read),
        Sha256::digest(&data),
        "data lost in the takeover"
    );
    common::write_synced(&target2.join("after.bin"), &data);

    // n1 comes back: its replica is rebuilt in full from the others (it may
    // hold writes n1's engine never had acknowledged), and the kubelet's
    // unstage there leaves n2's claim alone.
    cluster.nodes[0].restart();
    wait_replica_state(&client, &id, "n1", "healthy", Duration::from_secs(120)).await;
    let rebuilt = tv_replica_on(&client, &id, "n1").await;
    assert!(
        rebuilt.last_catch_up_bytes.unwrap_or(0) >= 64 << 20,
        "a taken-over node's replica is rebuilt in full: {rebuilt:?}"
    );
    let mut n1 = common::csi_client::Csi::connect(&cluster.node_socket(1)).await;
    n1.unpublish(&id, &target1).await;
    n1.unstage(&id, &staging1).await;
    // Its old engine ended the session and unmounted the export, so the
    // kernel names the device's file `/volume`: unstage still finds it.
    let name = n1_device.trim_start_matches("/dev/");
    let backing = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"));
    assert!(
        backing.as_deref().map(str::trim).ok() != Some("/volume"),
        "n1's loop device {n1_device} was left attached"
    );
    assert!(
        terna::datapath::host::mounts::mount_at(&staging1)
            .unwrap()
            .is_none()
    );
    let claim = terna_volume(&client, &id)
        .await
        .status
        .unwrap()
        .staged_on
        .unwrap();
    assert_eq!(claim.node, "n2");
    n2.unpublish(&id, &target2).await;
    n2.unstage(&id, &staging2).await;
    // Compared file against file: every replica is the same.
    let replicas: Vec<(String, Vec<u8>)> = replica_paths(&cluster, &id)
        .into_iter()
        .map(|(f, path)| (f, std::fs::read(path).unwrap()))
        .collect();
    assert_eq!(replicas.len(), 3);
    for (f, bytes) in &replicas[1..] {
        assert!(
            *bytes == replicas[0].1,
            "{f} differs from {}",
            replicas[0].0
        );
    }
}

async fn terna_volume(client: &kube::Client, id: &str) -> terna::edge::kube::crd::TernaVolume {
    terna_volumes(client)
        .await
        .into_iter()
        .find(|v| v.metadata.name.as_deref() == Some(id))
        .unwrap()
}

/// Waits until the replica of `id` on `node` is in `state`.
async fn wait_replica_state(
    client: &kube::Client,
    id: &str,
    node: &str,
    state: &str,
    within: Duration,
) {
    let (c, volume) = (client.clone(), id.to_string());
    eventually(&format!("{node}'s replica {state}"), within, || {
        let (c, volume) = (c.clone(), volume.clone());
        async move { tv_replica_on(&c, &volume, node).await.state == state }
    })
    .await;
}

/// Waits for an event with `reason` on claim `claim`.
async fn wait_claim_event(client: &kube::Client, claim: &str, reason: &str, within: Duration) {
    let c = client.clone();
    eventually(&format!("a {reason} event on the claim"), within, || {
        let c = c.clone();
        async move { claim_events(&c, claim).await.iter().any(|r| r == reason) }
    })
    .await;
}

async fn tv_replica_on(
    client: &kube::Client,
    id: &str,
    node: &str,
) -> terna::edge::kube::crd::ReplicaStatus {
    let tv = terna_volume(client, id).await;
    let index = tv
        .spec
        .replicas
        .iter()
        .position(|r| r.node == node)
        .unwrap();
    tv.status.unwrap().replicas[index].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_staged_nowhere_is_repaired_when_a_replica_node_dies_and_returns() {
    use sha2::{Digest, Sha256};
    common::assert_root("kubernetes");
    let mut cluster = Cluster::start(3).await;
    let _cleanup = Cleanup(cluster.root.path().to_path_buf());
    cluster.start_controller("c1");
    let client = cluster.client().await;
    let id = provision_one(&cluster, "idle", "idle").await;
    let (mut n1, staging1, target1) = mount_on(&cluster, 1, &id).await;
    let data: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(3266489917) >> 9) as u8)
        .collect();
    common::write_synced(&target1.join("kept.bin"), &data);
    n1.unpublish(&id, &target1).await;
    n1.unstage(&id, &staging1).await;

    // With no engine anywhere, the nodes holding its other replicas notice
    // n3's is gone, and when n3 returns its replica rejoins.
    cluster.nodes[2].kill_hard();
    wait_replica_state(&client, &id, "n3", "faulted", Duration::from_secs(60)).await;
    cluster.nodes[2].restart();
    wait_replica_state(&client, &id, "n3", "healthy", Duration::from_secs(90)).await;
    // The replica turns healthy inside the repair pass; the claim is let go
    // when the pass ends, a moment later.
    let c = client.clone();
    eventually(
        "repair to release its claim",
        Duration::from_secs(30),
        || {
            let (c, id) = (c.clone(), id.clone());
            async move {
                let status = terna_volume(&c, &id).await.status;
                status.is_some_and(|s| s.staged_on.is_none())
            }
        },
    )
    .await;

    let (mut n2, staging2, target2) = mount_on(&cluster, 2, &id).await;
    let read = std::fs::read(target2.join("kept.bin")).unwrap();
    assert_eq!(Sha256::digest(&read), Sha256::digest(&data));
    n2.unpublish(&id, &target2).await;
    n2.unstage(&id, &staging2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nfs_storage_pools_hold_a_claims_replicas_and_any_node_mounts_it() {
    use sha2::{Digest, Sha256};
    use terna::edge::kube::crd::{NfsPoolSpec, StoragePool, StoragePoolSpec};
    common::assert_root("kubernetes");
    let mut cluster = Cluster::start(2).await;
    let _cleanup = Cleanup(cluster.root.path().to_path_buf());
    let servers: Vec<common::nfs::Ganesha> = (1..=3)
        .map(|i| common::nfs::Ganesha::start(cluster.root.path(), &format!("nfs{i}")))
        .collect();
    cluster.start_controller("c1");
    let client = cluster.client().await;
    // The admin's view: the nodes' slow disks go, three exports come.
    let api: Api<StoragePool> = Api::all(client.clone());
    for n in ["n1-slow", "n2-slow"] {
        api.delete(n, &DeleteParams::default()).await.unwrap();
    }
    for (i, s) in servers.iter().enumerate() {
        let pool = StoragePool::new(
            &format!("export-{i}"),
            StoragePoolSpec {
                node: String::new(),
                path: String::new(),
                nfs: Some(NfsPoolSpec {
                    server: s.addr.clone(),
                    port: Some(s.port),
                    mount_port: Some(s.mount_port),
                    export: "/export".into(),
                    subdir: Some("terna".into()),
                }),
                tier: terna::core::class::Tier::Slow,
                domain: None,
                zone: None,
                overcommit_ratio: None,
                capacity_bytes: None,
            },
        );
        api.create(&PostParams::default(), &pool).await.unwrap();
    }
    add_class(
        &client,
        "on-nfs",
        &[("tier", "slow"), ("replicas", "3")],
        "Delete",
    )
    .await;
    // Placed once the controller has seen the new pools (its next refresh;
    // until then the claim waits with a ProvisioningFailed event).
    create_claim(
        &client,
        "default",
        &claim("on-nfs", "on-nfs", "64Mi", false, &[]),
    )
    .await;
    let bound = wait_bound(
        &cluster,
        "default",
        &["on-nfs".to_string()],
        Duration::from_secs(120),
    )
    .await;
    let pv_name = bound[0].spec.as_ref().unwrap().volume_name.clone().unwrap();
    let id = pvs(&client)
        .await
        .into_iter()
        .find(|p| p.metadata.name.as_deref() == Some(&pv_name))
        .unwrap()
        .spec
        .unwrap()
        .csi
        .unwrap()
        .volume_handle;
    let tv = terna_volume(&client, &id).await;
    let mut nodes: Vec<String> = tv.spec.replicas.iter().map(|r| r.node.clone()).collect();
    nodes.sort();
    let mut want: Vec<String> = servers.iter().map(|s| format!("nfs:{}", s.addr)).collect();
    want.sort();
    assert_eq!(nodes, want, "one replica on each export's server");

    // Written through n1, read back through n2: both reach the exports.
    let (mut n1, staging1, target1) = mount_on(&cluster, 1, &id).await;
    let data: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
        .collect();
    common::write_synced(&target1.join("on-nfs.bin"), &data);
    n1.unpublish(&id, &target1).await;
    n1.unstage(&id, &staging1).await;
    let (mut n2, staging2, target2) = mount_on(&cluster, 2, &id).await;
    let read = std::fs::read(target2.join("on-nfs.bin")).unwrap();
    assert_eq!(Sha256::digest(&read), Sha256::digest(&data));
    n2.unpublish(&id, &target2).await;
    n2.unstage(&id, &staging2).await;
    for (i, r) in tv.spec.replicas.iter().enumerate() {
        let s = servers
            .iter()
            .find(|s| r.node == format!("nfs:{}", s.addr))
            .unwrap();
        assert!(
            s.replica_file(&id, i).exists(),
            "replica {i} not on {}",
            s.addr
        );
    }
}

// ---------------------------------------------------------------------------
// Expanding a bound claim. Terna's controller does what the external-resizer
// does (edge/kube/expansion.rs); the kubelet's half, NodeExpandVolume, is
// called here by the test standing in for the kubelet, as its
// operation_generator does (volume_path = the publish target, or for Block
// the published device; capacity = status.allocatedResources). That the real
// kubelet (v1.34) does exactly this on its own, once the claim says
// NodeResizePending, is proven in tests/nodes.rs against real nodes.
// ---------------------------------------------------------------------------

const MIB: u64 = 1 << 20;

async fn get_claim(client: &kube::Client, name: &str) -> PersistentVolumeClaim {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    api.get(name).await.unwrap()
}

/// What `kubectl patch pvc <name> -p '{"spec":{"resources":{"requests":{"storage":…}}}}'` does.
async fn request_storage(client: &kube::Client, name: &str, size: &str) -> Result<(), kube::Error> {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let patch = serde_json::json!({"spec": {"resources": {"requests": {"storage": size}}}});
    api.patch(
        name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await
    .map(|_| ())
}

fn storage_of(
    map: &Option<
        std::collections::BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    >,
) -> Option<u64> {
    map.as_ref()
        .and_then(|m| m.get("storage"))
        .and_then(|q| terna::edge::kube::quantity::parse_quantity(&q.0))
}

/// (PV capacity, claim's allocatedResources, claim's
/// allocatedResourceStatuses, claim's status.capacity).
async fn resize_state(
    client: &kube::Client,
    claim: &str,
) -> (Option<u64>, Option<u64>, Option<String>, Option<u64>) {
    let pvc = get_claim(client, claim).await;
    let pv_name = pvc.spec.as_ref().unwrap().volume_name.clone().unwrap();
    let pv = pvs(client)
        .await
        .into_iter()
        .find(|p| p.metadata.name.as_deref() == Some(&pv_name))
        .unwrap();
    let status = pvc.status.unwrap_or_default();
    (
        storage_of(&pv.spec.unwrap().capacity),
        storage_of(&status.allocated_resources),
        status
            .allocated_resource_statuses
            .and_then(|m| m.get("storage").cloned()),
        storage_of(&status.capacity),
    )
}

/// A volume's replica files on every node's pools, each with its name
/// ("n<i>/<tier>/<file>").
fn replica_paths(cluster: &Cluster, id: &str) -> Vec<(String, std::path::PathBuf)> {
    cluster
        .replica_files()
        .into_iter()
        .filter(|f| f.contains(id))
        .map(|f| {
            let mut parts = f.splitn(3, '/');
            let (node, tier, file) = (
                parts.next().unwrap(),
                parts.next().unwrap(),
                parts.next().unwrap(),
            );
            let i: usize = node[1..].parse().unwrap();
            let path = cluster.node_dir(i).join("pools").join(tier).join(file);
            (f.clone(), path)
        })
        .collect()
}

/// Sizes of a volume's replica files on every node's pools.
fn replica_sizes(cluster: &Cluster, id: &str) -> Vec<u64> {
    replica_paths(cluster, id)
        .iter()
        .map(|(_, path)| std::fs::metadata(path).unwrap().len())
        .collect()
}

/// Files a 64Mi claim selected onto n1 (the classes wait for a consumer)
/// and returns its volume id once bound.
async fn bound_claim(cluster: &Cluster, name: &str, class: &str, block: bool) -> String {
    let client = cluster.client().await;
    create_claim(
        &client,
        "default",
        &claim(name, class, "64Mi", block, &[(SELECTED_NODE, "n1")]),
    )
    .await;
    let bound = wait_bound(cluster, "default", &[name.into()], Duration::from_secs(60)).await;
    let pv_name = bound[0].spec.as_ref().unwrap().volume_name.clone().unwrap();
    pvs(&client)
        .await
        .into_iter()
        .find(|p| p.metadata.name.as_deref() == Some(&pv_name))
        .unwrap()
        .spec
        .unwrap()
        .csi
        .unwrap()
        .volume_handle
}

/// The kubelet's NodeExpandVolume, as its csi_client.go sends it.
async fn node_expand(
    csi: &mut common::csi_client::Csi,
    id: &str,
    volume_path: &std::path::Path,
    staging: &std::path::Path,
    bytes: u64,
    cap: terna::proto::csi::VolumeCapability,
) -> u64 {
    csi.node
        .node_expand_volume(terna::proto::csi::NodeExpandVolumeRequest {
            volume_id: id.into(),
            volume_path: volume_path.display().to_string(),
            capacity_range: Some(terna::proto::csi::CapacityRange {
                required_bytes: bytes as i64,
                limit_bytes: 0,
            }),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .capacity_bytes as u64
}

/// The kubelet's MarkNodeExpansionFinishedWithRecovery: capacity = the
/// size allocated, the resize status and conditions gone.
async fn kubelet_marks_expansion_finished(client: &kube::Client, claim: &str, bytes: u64) {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let patch = serde_json::json!({"status": {
        "capacity": {"storage": bytes.to_string()},
        "allocatedResourceStatuses": null,
        "conditions": [],
    }});
    api.patch_status(
        claim,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await
    .unwrap();
}

fn fs_bytes(path: &std::path::Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(path).unwrap();
    st.blocks() * st.fragment_size()
}

fn device_bytes(path: &std::path::Path) -> u64 {
    use std::io::Seek;
    std::fs::File::open(path)
        .unwrap()
        .seek(std::io::SeekFrom::End(0))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bound_claim_patched_bigger_grows_its_replicas_pv_and_status_then_the_node_grows_it_kubelet_stood_in()
 {
    common::assert_root("kubernetes");
    let mut cluster = Cluster::start(3).await;
    let _cleanup = Cleanup(cluster.root.path().to_path_buf());
    cluster.start_controller("c1");
    let client = cluster.client().await;
    let root = cluster.root.path().to_path_buf();

    // A filesystem claim in a running pod: staged and published on n1.
    // xfs: growing ext4 online needs CAP_SYS_RESOURCE, which a privileged
    // node pod has and this test's sandbox may not; xfs_growfs needs only
    // CAP_SYS_ADMIN. (xfs volumes are made at mkfs.xfs's 300 MiB minimum.)
    let id = bound_claim(&cluster, "data", "terna-xfs", false).await;
    let xfs = common::csi_client::mount_cap("xfs");
    let mut n1 = common::csi_client::Csi::connect(&cluster.node_socket(1)).await;
    let (staging, target) = (root.join("n1-staging"), root.join("n1-target"));
    std::fs::create_dir_all(&staging).unwrap();
    n1.stage(&id, &staging, xfs.clone()).await;
    n1.publish(&id, &staging, &target, xfs.clone()).await;
    let data = common::content(11, 4 << 20);
    common::write_synced(&target.join("before.bin"), &data);
    let fs_before = fs_bytes(&target);
    assert_eq!(replica_sizes(&cluster, &id), vec![300 * MIB; 3]);

    request_storage(&client, "data", "640Mi").await.unwrap();
    let c = client.clone();
    eventually(
        "the PV and the claim's status to say 640Mi, NodeResizePending",
        Duration::from_secs(60),
        || {
            let c = c.clone();
            async move {
                resize_state(&c, "data").await
                    == (
                        Some(640 * MIB),
                        Some(640 * MIB),
                        Some("NodeResizePending".into()),
                        Some(300 * MIB),
                    )
            }
        },
    )
    .await;
    wait_claim_event(&client, "data", "Resizing", Duration::from_secs(10)).await;
    wait_claim_event(
        &client,
        "data",
        "FileSystemResizeRequired",
        Duration::from_secs(10),
    )
    .await;
    let pvc = get_claim(&client, "data").await;
    let conditions: Vec<String> = pvc
        .status
        .unwrap()
        .conditions
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.type_)
        .collect();
    assert!(
        conditions.contains(&"FileSystemResizePending".to_string()),
        "{conditions:?}"
    );
    // The replicas grew (every one), and the record says so.
    assert_eq!(replica_sizes(&cluster, &id), vec![640 * MIB; 3]);
    assert_eq!(
        terna_volume(&client, &id).await.spec.capacity_bytes,
        640 * MIB
    );
    // Until the node's step the pod still sees the old filesystem.
    assert_eq!(fs_bytes(&target), fs_before);

    // The kubelet's step: NodeExpandVolume to the size allocated.
    let grown = node_expand(&mut n1, &id, &target, &staging, 640 * MIB, xfs).await;
    assert_eq!(grown, 640 * MIB);
    let fs_after = fs_bytes(&target);
    assert!(
        fs_after > fs_before + 300 * MIB,
        "filesystem did not grow: {fs_before} -> {fs_after}"
    );
    assert_eq!(std::fs::read(target.join("before.bin")).unwrap(), data);
    kubelet_marks_expansion_finished(&client, "data", 640 * MIB).await;

    // A Block claim: the same controller side; the node's step grows the
    // loop device the pod has (the kubelet calls NodeExpandVolume for
    // Block volumes too, with the published device as volume_path).
    let raw = bound_claim(&cluster, "raw", "terna-block", true).await;
    let block = common::csi_client::block_cap();
    let raw_staging = root.join("n1-raw-staging");
    let raw_device = root.join("n1-raw-pod/dev");
    n1.stage(&raw, &raw_staging, block.clone()).await;
    n1.publish(&raw, &raw_staging, &raw_device, block.clone())
        .await;
    assert_eq!(device_bytes(&raw_device), 64 * MIB);
    request_storage(&client, "raw", "128Mi").await.unwrap();
    let c = client.clone();
    eventually(
        "the block claim's PV and status to say 128Mi, NodeResizePending",
        Duration::from_secs(60),
        || {
            let c = c.clone();
            async move {
                resize_state(&c, "raw").await
                    == (
                        Some(128 * MIB),
                        Some(128 * MIB),
                        Some("NodeResizePending".into()),
                        Some(64 * MIB),
                    )
            }
        },
    )
    .await;
    assert_eq!(replica_sizes(&cluster, &raw), vec![128 * MIB; 3]);
    assert_eq!(
        device_bytes(&raw_device),
        64 * MIB,
        "grown before the node's step"
    );
    let grown = node_expand(&mut n1, &raw, &raw_device, &raw_staging, 128 * MIB, block).await;
    assert_eq!(grown, 128 * MIB);
    assert_eq!(device_bytes(&raw_device), 128 * MIB);
    kubelet_marks_expansion_finished(&client, "raw", 128 * MIB).await;

    // A controller restarted over claims already expanded does nothing
    // again: no second Resizing, the status the kubelet left stays.
    let resizing = |events: Vec<String>| events.iter().filter(|r| *r == "Resizing").count();
    let before = (
        resizing(claim_events(&client, "data").await),
        resizing(claim_events(&client, "raw").await),
    );
    assert_eq!(before, (1, 1));
    cluster.controllers[0].kill_hard();
    cluster.controllers[0].restart();
    let c = client.clone();
    eventually(
        "the restarted controller to lead",
        Duration::from_secs(30),
        || {
            let c = c.clone();
            async move { leader(&c).await.as_deref() == Some("c1") }
        },
    )
    .await;
    // It has reconciled every claim by the time a new one binds.
    bound_claim(&cluster, "after-restart", "terna-standard", false).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        (
            resizing(claim_events(&client, "data").await),
            resizing(claim_events(&client, "raw").await),
        ),
        before
    );
    assert_eq!(
        resize_state(&client, "data").await,
        (Some(640 * MIB), Some(640 * MIB), None, Some(640 * MIB))
    );
    assert_eq!(
        resize_state(&client, "raw").await,
        (Some(128 * MIB), Some(128 * MIB), None, Some(128 * MIB))
    );

    n1.unpublish(&raw, &raw_device).await;
    n1.unstage(&raw, &raw_staging).await;
    n1.unpublish(&id, &target).await;
    n1.unstage(&id, &staging).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expanding_a_claim_beyond_its_pools_room_fails_with_the_reason_and_changes_nothing() {
    common::assert_root("kubernetes");
    let mut cluster = Cluster::start(3).await;
    let _cleanup = Cleanup(cluster.root.path().to_path_buf());
    cluster.start_controller("c1");
    let client = cluster.client().await;
    let id = bound_claim(&cluster, "data", "terna-standard", false).await;

    // Admission refuses what is not ours to refuse: a class without
    // allowVolumeExpansion (PersistentVolumeClaimResize), and less than
    // the claim's capacity.
    add_class(&client, "fixed", &[("tier", "standard")], "Delete").await;
    create_claim(
        &client,
        "default",
        &claim("fixed", "fixed", "64Mi", false, &[]),
    )
    .await;
    wait_bound(
        &cluster,
        "default",
        &["fixed".into()],
        Duration::from_secs(60),
    )
    .await;
    let refused = request_storage(&client, "fixed", "128Mi")
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("must support resize"),
        "{refused}"
    );
    let shrink = request_storage(&client, "data", "32Mi").await.unwrap_err();
    assert!(shrink.to_string().contains("status.capacity"), "{shrink}");

    // Every pool is 1 TiB: 2 TiB cannot be had.
    request_storage(&client, "data", "2Ti").await.unwrap();
    let c = client.clone();
    eventually(
        "a VolumeResizeFailed event",
        Duration::from_secs(60),
        || {
            let c = c.clone();
            async move {
                warnings_for(&c, "default", "data")
                    .await
                    .iter()
                    .any(|w| w.starts_with("VolumeResizeFailed"))
            }
        },
    )
    .await;
    let warning = warnings_for(&client, "default", "data")
        .await
        .into_iter()
        .find(|w| w.starts_with("VolumeResizeFailed"))
        .unwrap();
    assert!(
        warning.contains("pool") && warning.contains("free"),
        "the event names the pool and the reason: {warning}"
    );
    let c = client.clone();
    eventually(
        "the claim's status to say ControllerResizeInProgress with the error",
        Duration::from_secs(10),
        || {
            let c = c.clone();
            async move {
                let status = get_claim(&c, "data").await.status.unwrap_or_default();
                status
                    .allocated_resource_statuses
                    .and_then(|m| m.get("storage").cloned())
                    .as_deref()
                    == Some("ControllerResizeInProgress")
                    && status
                        .conditions
                        .unwrap_or_default()
                        .iter()
                        .any(|c| c.type_ == "ControllerResizeError")
            }
        },
    )
    .await;
    // Nothing grew: not the PV, not the record, not a replica.
    let (pv, allocated, _, capacity) = resize_state(&client, "data").await;
    assert_eq!(
        (pv, allocated, capacity),
        (Some(64 * MIB), Some(2 << 40), Some(64 * MIB))
    );
    assert_eq!(
        terna_volume(&client, &id).await.spec.capacity_bytes,
        64 * MIB
    );
    assert_eq!(replica_sizes(&cluster, &id), vec![64 * MIB; 3]);
    // It is retried with a growing delay, not in a loop.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let failures = claim_events(&client, "data")
        .await
        .iter()
        .filter(|r| *r == "VolumeResizeFailed")
        .count();
    assert!(failures <= 2, "{failures} failure events in 8 s");

    // Lowering the request (allowed down to the capacity, for this) lets
    // the expansion succeed.
    request_storage(&client, "data", "128Mi").await.unwrap();
    let c = client.clone();
    eventually(
        "the lowered request to be expanded",
        Duration::from_secs(60),
        || {
            let c = c.clone();
            async move {
                resize_state(&c, "data").await
                    == (
                        Some(128 * MIB),
                        Some(128 * MIB),
                        Some("NodeResizePending".into()),
                        Some(64 * MIB),
                    )
            }
        },
    )
    .await;
    assert_eq!(replica_sizes(&cluster, &id), vec![128 * MIB; 3]);
}

/// The stale holder's distinctive bytes: what it tries to write once it is
/// resumed after another node took its volume over.
const STALE: u8 = 0xa5;

fn count_stale(bytes: &[u8]) -> usize {
    bytes
        .chunks(4096)
        .filter(|c| c.len() == 4096 && c.iter().all(|&b| b == STALE))
        .count()
}

/// A holder frozen whole (its node plugin, the engine's supervisor and
/// worker: SIGSTOP) until its lease lapses and another node takes the
/// volume over and writes, then resumed (SIGCONT) and driven with writes:
/// it writes no replica at all, not even its own node's local one, which
/// it would reach without any agent; no write of its is acknowledged; and
/// afterwards every replica holds exactly what the new holder wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_holder_resumed_after_a_takeover_writes_no_replica() {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    common::assert_root("kubernetes");
    let mut cluster = Cluster::start(3).await;
    let _cleanup = Cleanup(cluster.root.path().to_path_buf());
    cluster.start_controller("c1");
    let client = cluster.client().await;
    let id = provision_one(&cluster, "frozen", "frozen").await;
    let root = cluster.root.path().to_path_buf();
    let block = common::csi_client::block_cap();
    let mut n1 = common::csi_client::Csi::connect(&cluster.node_socket(1)).await;
    let (staging1, target1) = (root.join("n1-staging"), root.join("n1-target"));
    std::fs::create_dir_all(&staging1).unwrap();
    n1.stage(&id, &staging1, block.clone()).await;
    n1.publish(&id, &staging1, &target1, block.clone()).await;
    let device = |path: &std::path::Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .unwrap()
    };
    let first = common::content(3, 4 << 20);
    device(&target1)
        .write_all_at(
            terna::datapath::replica::aligned::AlignedBuf::copy_of(&first).as_slice(),
            0,
        )
        .unwrap();

    // n1's local replica, held open the way its engine holds it.
    let local = cluster
        .replica_files()
        .into_iter()
        .find(|f| f.starts_with("n1/") && f.contains(&id))
        .expect("a replica on n1");
    let local_path = cluster
        .node_dir(1)
        .join("pools")
        .join(local.split('/').nth(1).unwrap())
        .join(local.rsplit('/').next().unwrap());
    let held = std::fs::File::open(&local_path).unwrap();

    // Freeze n1 whole.
    let run = cluster.node_dir(1).join(format!("run/{id}"));
    let pid_of = |file: &str| -> i32 {
        std::fs::read_to_string(run.join(file))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let frozen = [
        cluster.nodes[0].pid().unwrap() as i32,
        pid_of("engine.pid"),
        pid_of("engine-worker.pid"),
    ];
    for pid in frozen {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGSTOP).unwrap();
    }

    // n2 takes over once n1's lease lapsed, and writes.
    let mut n2 = common::csi_client::Csi::connect(&cluster.node_socket(2)).await;
    let (staging2, target2) = (
        cluster.root.path().join("n2-staging"),
        cluster.root.path().join("n2-target"),
    );
    std::fs::create_dir_all(&staging2).unwrap();
    let stage2 = terna::proto::csi::NodeStageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging2.display().to_string(),
        volume_capability: Some(block.clone()),
        ..Default::default()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10 * NODE_LEASE_SECS);
    while let Err(e) = n2.node.node_stage_volume(stage2.clone()).await {
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        assert!(std::time::Instant::now() < deadline, "{e:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    n2.publish(&id, &staging2, &target2, block.clone()).await;
    let second = common::content(4, 4 << 20);
    device(&target2)
        .write_all_at(
            terna::datapath::replica::aligned::AlignedBuf::copy_of(&second).as_slice(),
            0,
        )
        .unwrap();

    // n1 resumes and its pod goes on writing.
    for pid in frozen {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGCONT).unwrap();
    }
    let stale_writer = {
        let target1 = target1.clone();
        std::thread::spawn(move || {
            let dev = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(&target1);
            let Ok(dev) = dev else { return (0, 0) };
            let buf = terna::datapath::replica::aligned::AlignedBuf::copy_of(&[STALE; 65536]);
            let (mut acked, mut failed) = (0, 0);
            let until = std::time::Instant::now() + Duration::from_secs(8);
            let mut offset = 0u64;
            while std::time::Instant::now() < until {
                match dev.write_at(buf.as_slice(), offset) {
                    Ok(_) => acked += 1,
                    Err(_) => failed += 1,
                }
                offset = (offset + 65536) % (4 << 20);
                if failed > 20 {
                    break;
                }
            }
            (acked, failed)
        })
    };
    let (acked, failed) = stale_writer.join().unwrap();
    println!("stale holder after resuming: {acked} writes acknowledged, {failed} failed");
    assert_eq!(acked, 0, "the stale holder acknowledged writes");

    // n1's replica comes back healthy from n2's engine; nothing anywhere
    // holds the stale bytes, and every replica is what n2 wrote.
    wait_replica_state(&client, &id, "n1", "healthy", Duration::from_secs(120)).await;
    let mut old_inode = vec![0u8; 64 << 20];
    let n = held.read_at(&mut old_inode, 0).unwrap();
    assert_eq!(
        count_stale(&old_inode[..n]),
        0,
        "the stale holder wrote its local replica after the takeover"
    );
    n2.node
        .node_unpublish_volume(terna::proto::csi::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target2.display().to_string(),
        })
        .await
        .unwrap();
    n2.unstage(&id, &staging2).await;
    for (f, path) in replica_paths(&cluster, &id) {
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(count_stale(&bytes), 0, "{f} holds the stale holder's bytes");
        assert!(
            bytes[..4 << 20] == second[..],
            "{f} does not hold what the new holder wrote"
        );
    }
    let mut n1 = common::csi_client::Csi::connect(&cluster.node_socket(1)).await;
    let _ = n1
        .node
        .node_unpublish_volume(terna::proto::csi::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target1.display().to_string(),
        })
        .await;
    n1.unstage(&id, &staging1).await;
}
