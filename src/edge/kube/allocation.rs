//! Each StoragePool's allocation (the sum of its replicas' volume sizes),
//! written back to its status for `kubectl get` and `terna pools`.

use std::collections::BTreeMap;
use std::sync::Arc;

use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tracing::warn;

use crate::core::controller::ControllerCore;
use crate::edge::kube::crd::{StoragePool, human_bytes};

/// Patches the pools among `pools` whose reported allocation is not what
/// the core's volumes add up to.
pub async fn report(client: &kube::Client, core: Arc<ControllerCore>, pools: &[StoragePool]) {
    let records = match tokio::task::spawn_blocking(move || core.list_all()).await {
        Ok(Ok(r)) => r,
        _ => return,
    };
    let mut allocated: BTreeMap<&str, u64> = BTreeMap::new();
    for r in &records {
        for rep in &r.replicas {
            *allocated.entry(rep.pool.as_str()).or_default() += r.capacity_bytes;
        }
    }
    let api: Api<StoragePool> = Api::all(client.clone());
    for pool in pools {
        let Some(name) = pool.metadata.name.as_deref() else {
            continue;
        };
        let bytes = allocated.get(name).copied().unwrap_or(0);
        if pool.status.as_ref().map(|s| s.allocated_bytes) == Some(bytes) {
            continue;
        }
        let patch = json!({"status": {"allocatedBytes": bytes, "allocated": human_bytes(bytes)}});
        if let Err(e) = api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            warn!(pool = %name, error = %e, "cannot report pool allocation");
        }
    }
}
