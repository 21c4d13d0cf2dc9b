//! What engines and repair run on in a cluster: the state store on
//! TernaVolumes (with the runtime its Kubernetes calls run on) and the pools
//! the StoragePools name, for a data dir whose node wrote `cluster.json`.

use crate::datapath::agent::transport::Transport;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, ListParams};

use crate::core::config::Config;
use crate::core::error::{Error, Result};
use crate::core::pool::{PoolEntry, PoolSource, Pools};
use crate::datapath::engine::assemble::Backing;
use crate::edge::kube::crd::StoragePool;
use crate::edge::kube::pools::PoolDirectory;

/// Written into a cluster node's data dir: tells the engines it starts
/// that state lives in Kubernetes and pools are the StoragePools.
pub const CLUSTER_FILE: &str = "cluster.json";

#[derive(serde::Serialize, serde::Deserialize)]
pub struct ClusterFile {
    /// `None`: in-cluster configuration (or KUBECONFIG).
    pub kubeconfig: Option<PathBuf>,
    pub pool_stale_secs: u64,
    /// Where the nodes' liveness Leases are: engines write only while
    /// their node's is current. Absent in files of older versions, whose
    /// engines then write ungated.
    #[serde(default)]
    pub lease_namespace: Option<String>,
}

/// Tells the engines and repair passes `node` starts in `data_dir` where
/// the cluster is.
pub fn write_cluster_file(data_dir: &Path, file: &ClusterFile) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(file)
        .map_err(|e| Error::internal(format!("cannot encode {CLUSTER_FILE}: {e}")))?;
    crate::datapath::host::files::atomic_write(&data_dir.join(CLUSTER_FILE), &bytes)
}

/// The cluster `data_dir` belongs to; `None` when it is not a cluster
/// node's.
pub fn read_cluster_file(data_dir: &Path) -> Result<Option<ClusterFile>> {
    let path = data_dir.join(CLUSTER_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::invalid(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("cannot read {}", path.display()), e)),
    }
}

/// The cluster's backing for `node`: remote pools are reached with `token`,
/// which the role read once, over `transport`.
pub fn open(
    file: &ClusterFile,
    node: &str,
    config: &Config,
    token: &[u8],
    transport: &Transport,
) -> Result<Backing> {
    let runtime = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| Error::io("cannot start a runtime", e))?,
    );
    let client = runtime.block_on(crate::edge::kube::client::client(
        file.kubeconfig.as_deref(),
    ))?;
    let store = crate::edge::kube::store::KubeStore::with_runtime(client.clone(), runtime.clone());
    let leases = file.lease_namespace.as_deref().map(|ns| {
        Arc::new(crate::edge::kube::node_lease::KubeLeaseReader::new(
            client.clone(),
            ns,
            runtime.clone(),
        )) as Arc<dyn crate::datapath::engine::gate::LeaseReader>
    });
    let source = StoragePools {
        api: Api::all(client),
        runtime,
        directory: PoolDirectory::new(
            token,
            transport.clone(),
            node,
            Duration::from_millis(config.agent_timeout_ms),
            Duration::from_secs(file.pool_stale_secs),
        )
        .with_local_node(node),
    };
    let pools = Pools::from_entries(source.usable()?);
    Ok(Backing {
        store: Arc::new(store),
        pools: Arc::new(pools.rediscovering(Box::new(source), REDISCOVER_EVERY)),
        leases,
    })
}

/// How often an engine missing a pool (its node was away when the engine
/// started) asks the API server for it again. Each engine process asks on
/// its own, so this keeps a cluster with a dead node and many volumes from
/// listing StoragePools many times a second.
const REDISCOVER_EVERY: Duration = Duration::from_secs(15);

/// The cluster's StoragePools, as an engine's pools.
struct StoragePools {
    api: Api<StoragePool>,
    runtime: Arc<tokio::runtime::Runtime>,
    directory: PoolDirectory,
}

impl PoolSource for StoragePools {
    fn usable(&self) -> Result<Vec<PoolEntry>> {
        let objects = self
            .runtime
            .block_on(self.api.list(&ListParams::default()))
            .map_err(|e| {
                Error::new(
                    crate::core::error::ErrorKind::Unavailable,
                    format!("cannot list StoragePools: {e}"),
                )
            })?
            .items;
        let shared: Vec<Arc<StoragePool>> = objects.into_iter().map(Arc::new).collect();
        Ok(self.directory.entries(&shared))
    }
}
