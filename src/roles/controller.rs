//! `terna controller`: the provisioner over a Kubernetes-backed core, led
//! through a Lease. The pool set follows the StoragePool objects; each
//! pool's allocation is written back to its status for `kubectl get`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::core::controller::ControllerCore;
use crate::core::error::Result;
use crate::core::pool::Pools;
use crate::edge::csi::server::{Controller, Endpoint, Services};
use crate::edge::kube::leader::LeaseConfig;
use crate::edge::kube::leading::Leading;
use crate::edge::kube::pool_list::PoolList;
use crate::edge::kube::pools::PoolDirectory;
use crate::edge::kube::store::KubeStore;
use crate::edge::metrics::controller::ControllerMetrics;

pub struct ControllerOptions {
    /// `None`: KUBECONFIG, then in-cluster.
    pub kubeconfig: Option<PathBuf>,
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

pub async fn run(opts: ControllerOptions) -> Result<()> {
    let client = crate::edge::kube::client::client(opts.kubeconfig.as_deref()).await?;
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
    let metrics = Arc::new(ControllerMetrics::new(core.clone()));
    if let Some(addr) = opts.metrics_listen {
        crate::edge::metrics::http::spawn(addr, metrics.clone())?;
    }
    let pools = Arc::new(PoolList::new(client.clone(), directory, core.clone()));
    {
        let pools = pools.clone();
        tokio::spawn(async move { pools.keep_current().await });
    }
    // Every replica answers CSI, whoever leads the built-in provisioner.
    if let Some(endpoint) = opts.endpoint.clone() {
        let core = core.clone();
        tokio::spawn(async move {
            let services = Services {
                controller: Some(Controller {
                    core,
                    topology_node: None,
                }),
                node: None,
            };
            let served = match Endpoint::bind(&endpoint) {
                Ok(csi) => csi.serve(services, std::future::pending()).await,
                Err(e) => Err(e),
            };
            if let Err(e) = served {
                tracing::error!(error = %e, "CSI endpoint stopped");
            }
        });
    }
    let leading = Leading {
        client,
        identity: opts.identity,
        lease: opts.lease,
        concurrency: opts.concurrency,
        capacity_namespace: opts.capacity_namespace,
        core,
        pools,
        metrics,
    };
    tokio::select! {
        led = leading.run() => led,
        () = crate::datapath::host::shutdown::requested() => {
            info!("stopping");
            Ok(())
        }
    }
}
