//! The provisioning benchmark behind `bench/run`: claims filed at once
//! against a real API server (etcd, kube-apiserver, kube-controller-manager
//! from scripts/install-kube-tools), three `terna node`s and one
//! `terna controller`; PVC-to-Bound latency p50/p99 and claims bound per
//! second. The latency runs from the moment the API server accepted the
//! claim (our create call returned) to the moment a watch saw it Bound.

#![allow(clippy::unwrap_used)]

#[path = "../tests/common/cluster.rs"]
mod cluster;
#[allow(dead_code)]
#[path = "../tests/common/csi_client.rs"]
mod csi_client;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

const KCM_QPS: &str = "200";
const KCM_BURST: &str = "400";
const CONCURRENCY: &str = "32";

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("provisioning benchmark: run it with bench/run");
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let claims: usize = if quick { 200 } else { 1000 };
    // SAFETY: set before any thread of ours reads the environment; the
    // test environment script reads these when it starts.
    unsafe {
        std::env::set_var("KCM_API_QPS", KCM_QPS);
        std::env::set_var("KCM_API_BURST", KCM_BURST);
    }
    let mut cluster = cluster::Cluster::start(3).await;
    cluster.start_controller_with("bench", &["--concurrency", CONCURRENCY]);
    let client = cluster.client().await;
    let classes: Api<StorageClass> = Api::all(client.clone());
    classes
        .create(
            &PostParams::default(),
            &StorageClass {
                metadata: ObjectMeta {
                    name: Some("bench".into()),
                    ..Default::default()
                },
                provisioner: terna::DRIVER_NAME.into(),
                parameters: Some([("replicas".to_string(), "3".to_string())].into()),
                volume_binding_mode: Some("Immediate".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // Give the controller its first pool listing before the clock starts.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let bound_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let watch = {
        let bound_at = bound_at.clone();
        let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
        tokio::spawn(async move {
            let mut stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .applied_objects()
                .boxed();
            while let Some(Ok(pvc)) = stream.next().await {
                if pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound") {
                    let now = Instant::now();
                    bound_at
                        .lock()
                        .unwrap()
                        .entry(pvc.metadata.name.clone().unwrap())
                        .or_insert(now);
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    // One claim at a time on an otherwise idle system: the latency a
    // developer filing one claim sees.
    let pvc_api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let mut single: Vec<f64> = Vec::new();
    for i in 0..20 {
        let n = format!("single-{i}");
        pvc_api
            .create(
                &PostParams::default(),
                &cluster::claim(&n, "bench", "1Gi", false, &[]),
            )
            .await
            .unwrap();
        let created = Instant::now();
        let deadline = created + Duration::from_secs(60);
        loop {
            if let Some(t) = bound_at.lock().unwrap().get(&n) {
                single.push(t.saturating_duration_since(created).as_secs_f64());
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{n} not bound after 60 s\n{}",
                cluster.logs()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    single.sort_by(|a, b| a.total_cmp(b));
    let (single_p50, single_p99) = (percentile(&single, 50.0), percentile(&single, 99.0));

    let created_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let names: Vec<String> = (0..claims).map(|i| format!("bench-{i}")).collect();
    for chunk in names.chunks(claims / 20) {
        let (client, chunk, created_at) = (client.clone(), chunk.to_vec(), created_at.clone());
        tasks.spawn(async move {
            let api: Api<PersistentVolumeClaim> = Api::namespaced(client, "default");
            for n in chunk {
                api.create(
                    &PostParams::default(),
                    &cluster::claim(&n, "bench", "1Gi", false, &[]),
                )
                .await
                .unwrap();
                created_at.lock().unwrap().insert(n, Instant::now());
            }
        });
    }
    tasks.join_all().await;
    let filed = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(600);
    while bound_at.lock().unwrap().len() < claims + single.len() {
        assert!(
            Instant::now() < deadline,
            "only {} of {claims} claims bound after 10 minutes\n{}",
            bound_at.lock().unwrap().len() - single.len(),
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    watch.abort();
    let bound_at = bound_at.lock().unwrap().clone();
    let created_at = created_at.lock().unwrap().clone();
    let last = names.iter().map(|n| bound_at[n]).max().unwrap();
    let total = last.duration_since(started).as_secs_f64();
    let mut latencies: Vec<f64> = names
        .iter()
        .map(|n| {
            bound_at[n]
                .saturating_duration_since(created_at[n])
                .as_secs_f64()
        })
        .collect();
    latencies.sort_by(|a, b| a.total_cmp(b));
    let (p50, p99) = (percentile(&latencies, 50.0), percentile(&latencies, 99.0));
    let rate = claims as f64 / total;

    let report = format!(
        "# Terna provisioning benchmark\n\n\
         Against a real kube-apiserver + etcd + kube-controller-manager on this machine, 3 `terna node`s, \
         1 `terna controller`; claims of 1Gi, 3 replicas, Immediate binding.\n\n\
         | figure | value |\n|---|---:|\n\
         | one claim at a time (20 in a row), PVC to Bound p50 | {:.0} ms |\n\
         | one claim at a time (20 in a row), PVC to Bound p99 | {:.0} ms |\n\
         | **{claims} claims filed at once by 20 concurrent clients:** | |\n\
         | PVC to Bound, p50 | {:.0} ms |\n\
         | PVC to Bound, p99 | {:.0} ms |\n\
         | all {claims} bound in | {total:.1} s |\n\
         | claims bound per second | {rate:.1} |\n\
         | time to file the claims | {:.1} s |\n\n\
         Client settings: terna controller (kube-rs) has no client-side rate limit and provisions up to {CONCURRENCY} claims at once \
         (`--concurrency`); kube-controller-manager, whose PV controller completes each binding, runs with \
         `--kube-api-qps={KCM_QPS} --kube-api-burst={KCM_BURST}` (its defaults, 20/30, cap binding at roughly 7 claims/s).\n",
        single_p50 * 1000.0,
        single_p99 * 1000.0,
        p50 * 1000.0,
        p99 * 1000.0,
        filed.as_secs_f64(),
    );
    let results = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/results");
    let name = if quick {
        "provision-quick"
    } else {
        "provision"
    };
    std::fs::write(results.join(format!("{name}.md")), &report).unwrap();
    std::fs::write(
        results.join(format!("{name}.json")),
        serde_json::to_string_pretty(&json!({
            "single_p50_ms": single_p50 * 1000.0, "single_p99_ms": single_p99 * 1000.0,
            "claims": claims, "p50_ms": p50 * 1000.0, "p99_ms": p99 * 1000.0,
            "total_s": total, "claims_per_s": rate, "filing_s": filed.as_secs_f64(),
            "controller_concurrency": CONCURRENCY.parse::<u32>().unwrap(),
            "kcm_api_qps": KCM_QPS.parse::<u32>().unwrap(), "kcm_api_burst": KCM_BURST.parse::<u32>().unwrap(),
        }))
        .unwrap(),
    )
    .unwrap();
    println!("{report}");
}
