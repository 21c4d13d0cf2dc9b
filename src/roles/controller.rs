//! `terna controller`: the provisioner over a Kubernetes-backed core, led
//! through a Lease. The pool set follows the StoragePool objects; each
//! pool's allocation is written back to its status for `kubectl get`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::events::Recorder;
use serde_json::json;
use tracing::{info, warn};

use crate::core::controller::ControllerCore;
use crate::core::error::{Error, ErrorKind, Result};
use crate::core::pool::Pools;
use crate::edge::kube::crd::{StoragePool, human_bytes};
use crate::edge::kube::leader::{self, LeaseConfig};
use crate::edge::kube::pools::PoolDirectory;
use crate::edge::kube::provisioner::Provisioner;
use crate::edge::kube::store::KubeStore;

pub struct ControllerOptions {
    pub identity: String,
    /// `None`: run without leader election (one controller only).
    pub lease: Option<LeaseConfig>,
    pub cluster_token_file: Option<PathBuf>,
    pub agent_timeout: Duration,
    pub overcommit_ratio: f64,
    pub concurrency: u16,
    /// Pools whose node has not reported for this long take no new replicas.
    pub pool_stale_after: Duration,
    /// Also serve CSI Identity and Controller here (unix:///path), for the
    /// standard external-provisioner sidecar.
    pub endpoint: Option<String>,
    /// Publish CSIStorageCapacity objects into this namespace.
    pub capacity_namespace: Option<String>,
    /// Serve /metrics, /healthz and /readyz here.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Serves CSI Identity and Controller over the cluster's core; every
/// controller replica answers, whoever leads the built-in provisioner.
async fn serve_csi(endpoint: &str, core: Arc<ControllerCore>) -> Result<()> {
    use crate::edge::csi::controller::ControllerService;
    use crate::edge::csi::identity::IdentityService;
    use crate::proto::csi::controller_server::ControllerServer;
    use crate::proto::csi::identity_server::IdentityServer;
    let (_, listener) = crate::edge::grpc::uds::bind_endpoint(endpoint)?;
    info!(endpoint = %endpoint, "serving CSI Identity and Controller");
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(IdentityService { controller: true }))
        .add_service(ControllerServer::new(ControllerService {
            core,
            topology_node: None,
            locks: Default::default(),
        }))
        .serve_with_incoming(crate::edge::grpc::uds::incoming(listener))
        .await
        .map_err(|e| Error::with_source(ErrorKind::Internal, "gRPC server failed", e))
}

async fn refresh_pools(
    api: &Api<StoragePool>,
    directory: &PoolDirectory,
    core: &ControllerCore,
) -> std::result::Result<Vec<StoragePool>, kube::Error> {
    let objects = api.list(&ListParams::default()).await?.items;
    let shared: Vec<Arc<StoragePool>> = objects.iter().cloned().map(Arc::new).collect();
    core.set_pools(Arc::new(directory.pools(&shared)));
    Ok(objects)
}

/// Writes each pool's allocated bytes (the sum of its volumes' sizes).
async fn report_allocation(
    api: &Api<StoragePool>,
    core: Arc<ControllerCore>,
    pools: &[StoragePool],
) {
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

pub async fn run(client: kube::Client, opts: ControllerOptions) -> Result<()> {
    let token = match &opts.cluster_token_file {
        Some(path) => crate::datapath::host::config_file::read_cluster_token(path)?,
        None => {
            warn!(
                "no --cluster-token-file: every node's agent will refuse this controller, \
                 so only NFS pools can hold new replicas"
            );
            Vec::new()
        }
    };
    let store = Arc::new(KubeStore::new(
        client.clone(),
        tokio::runtime::Handle::current(),
    ));
    let core = Arc::new(ControllerCore::new(
        store,
        Arc::new(Pools::from_entries(vec![])),
        opts.overcommit_ratio,
    ));
    let directory = PoolDirectory::new(
        &token,
        &opts.identity,
        opts.agent_timeout,
        opts.pool_stale_after,
    );
    let metrics = Arc::new(crate::edge::metrics::controller::ControllerMetrics::new(
        core.clone(),
    ));
    if let Some(addr) = opts.metrics_listen {
        crate::edge::metrics::http::spawn(addr, metrics.clone())?;
    }
    let pool_api: Api<StoragePool> = Api::all(client.clone());
    // Every replica keeps its view of the pools current: the CSI endpoint
    // answers whoever leads, and a new leader starts with fresh pools.
    let directory = Arc::new(directory);
    {
        let (pool_api, directory, core) = (pool_api.clone(), directory.clone(), core.clone());
        tokio::spawn(async move {
            loop {
                if let Err(e) = refresh_pools(&pool_api, &directory, &core).await {
                    warn!(error = %e, "cannot list StoragePools");
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        });
    }
    if let Some(endpoint) = opts.endpoint.clone() {
        let core = core.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_csi(&endpoint, core).await {
                tracing::error!(error = %e, "CSI endpoint stopped");
            }
        });
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::io("cannot handle SIGTERM", e))?;
    // Lead until the lease is lost (say, the API server was away longer
    // than the lease), then stand by and try again: never act unled.
    loop {
        let leading = async {
            if let Some(lease) = &opts.lease {
                leader::acquire(client.clone(), lease).await;
            }
            metrics.set_leading(true);
            let led = lead(&client, &opts, &core, &directory, &pool_api, &metrics).await;
            metrics.set_leading(false);
            led
        };
        tokio::select! {
            outcome = leading => match outcome {
                Ok(()) => warn!("leadership lost; standing by"),
                Err(e) => return Err(e),
            },
            _ = term.recv() => {
                info!("SIGTERM: stopping");
                return Ok(());
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// Provisions while this process holds the lease; `Ok` when it is lost.
async fn lead(
    client: &kube::Client,
    opts: &ControllerOptions,
    core: &Arc<ControllerCore>,
    directory: &PoolDirectory,
    pool_api: &Api<StoragePool>,
    metrics: &Arc<crate::edge::metrics::controller::ControllerMetrics>,
) -> Result<()> {
    let mut objects = loop {
        match refresh_pools(pool_api, directory, core).await {
            Ok(objects) => break objects,
            Err(e) => {
                warn!(error = %e, "cannot list StoragePools");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    info!(pools = objects.len(), "provisioning");
    let provisioner = Arc::new(Provisioner {
        client: client.clone(),
        core: core.clone(),
        driver: crate::DRIVER_NAME.to_string(),
        recorder: Recorder::new(client.clone(), Provisioner::reporter(&opts.identity)),
        concurrency: opts.concurrency,
        metrics: metrics.clone(),
    });
    let pools_loop = async {
        loop {
            match pool_api.list(&ListParams::default()).await {
                Ok(o) => objects = o.items,
                Err(e) => warn!(error = %e, "cannot list StoragePools"),
            }
            report_allocation(pool_api, core.clone(), &objects).await;
            if let Some(ns) = &opts.capacity_namespace {
                crate::edge::kube::capacity::publish(client, ns, core.clone(), crate::DRIVER_NAME)
                    .await;
            }
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    };
    let holding = async {
        match &opts.lease {
            Some(lease) => leader::hold(client.clone(), lease).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = provisioner.run() => Err(Error::internal("the provisioner stopped")),
        () = pools_loop => Err(Error::internal("the allocation reporter stopped")),
        () = holding => Ok(()),
    }
}
