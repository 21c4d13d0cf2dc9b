//! `terna node`'s cluster duties: serve this node's pools through its
//! replica agent and keep a `StoragePool` object per pool current, so the
//! controller places replicas only where a live node says there is room.
//!
//! Pools come from two places: the node's `terna.toml` (registered as
//! `<node>-<pool>` objects), and `StoragePool` objects an admin creates
//! naming this node, which are served from the next heartbeat on.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tracing::{info, warn};

use crate::core::config::Config;
use crate::core::error::{Error, Result};
use crate::core::pool::Pool;
use crate::datapath::agent::server::{self, AgentState};
use crate::datapath::replica::local::LocalPool;
use crate::edge::kube::backing::{CLUSTER_FILE, ClusterFile};
use crate::edge::kube::crd::{NfsPoolSpec, StoragePool, StoragePoolSpec, human_bytes};
use crate::edge::kube::leader::{Decision, LeaseConfig, decide, try_acquire};

/// MiB written and read by the probe of a newly served pool.
const PROBE_MIB: usize = 64;

pub struct NodeOptions {
    pub data_dir: PathBuf,
    pub node_id: String,
    pub agent_listen: SocketAddr,
    /// The address other nodes reach this agent at.
    pub agent_advertise: SocketAddr,
    pub heartbeat: Duration,
    /// Serve CSI Identity and Node here (unix:///path).
    pub endpoint: Option<String>,
    pub kubeconfig: Option<PathBuf>,
    /// StoragePools not confirmed for this long are left out of engines.
    pub pool_stale_after: Duration,
    /// The kubelet's plugins_registry directory: register there (needs
    /// `endpoint`).
    pub registry_dir: Option<PathBuf>,
    /// Namespace of the node's liveness Lease.
    pub lease_namespace: String,
    /// How long the Lease lasts unrenewed.
    pub lease_duration: Duration,
}

/// The name of `node`'s liveness Lease.
pub fn lease_name(node: &str) -> String {
    format!("terna-node-{node}")
}

/// The object name of a configured pool: pool names are per node, object
/// names cluster-wide.
pub fn object_name(node: &str, pool: &str) -> String {
    format!("{node}-{pool}")
}

/// The StoragePools this node's configuration declares.
pub fn configured_pools(config: &Config, data_dir: &Path, node: &str) -> Vec<StoragePool> {
    config
        .pools
        .iter()
        .filter(|p| p.node.as_deref().is_none_or(|n| n == node))
        .map(|p| match &p.nfs {
            // An export is the cluster's, not this node's: one object,
            // named after the pool, whichever node declares it.
            Some(nfs) => StoragePool::new(
                &p.name,
                StoragePoolSpec {
                    node: String::new(),
                    path: String::new(),
                    nfs: Some(NfsPoolSpec::from_config(nfs)),
                    tier: p.tier,
                    domain: p.domain.clone(),
                    zone: p.zone.clone(),
                    overcommit_ratio: None,
                    capacity_bytes: p.capacity_bytes,
                },
            ),
            None => StoragePool::new(
                &object_name(node, &p.name),
                StoragePoolSpec {
                    node: node.to_string(),
                    path: config.pool_path(data_dir, p).display().to_string(),
                    nfs: None,
                    tier: p.tier,
                    domain: p.domain.clone(),
                    zone: p.zone.clone(),
                    overcommit_ratio: None,
                    capacity_bytes: p.capacity_bytes,
                },
            ),
        })
        .collect()
}

fn statvfs_used(path: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    Some((st.blocks() - st.blocks_free()) * st.fragment_size())
}

/// Runs until the agent stops: the agent on its own threads, the
/// registration loop here.
pub async fn run(client: kube::Client, opts: NodeOptions) -> Result<()> {
    let _owner = crate::datapath::host::lock::lock(&opts.data_dir)?;
    let config = Config::load_or_init_with(&opts.data_dir, Config::default_node)?;
    let token = config.cluster_token(&opts.data_dir)?;
    let agent = Arc::new(
        AgentState::new(&opts.node_id, &token, Default::default())
            .with_fence_dir(&crate::core::data_dir::fence_dir(&opts.data_dir)),
    );
    let listener = TcpListener::bind(opts.agent_listen)
        .map_err(|e| Error::io(format!("cannot listen on {}", opts.agent_listen), e))?;
    let serving = agent.clone();
    let agent_thread = std::thread::Builder::new()
        .name("agent".into())
        .spawn(move || server::serve(listener, serving))
        .map_err(|e| Error::io("cannot start the replica agent", e))?;
    info!(node = %opts.node_id, listen = %opts.agent_listen, "replica agent serving");

    let (stopping, _) = tokio::sync::watch::channel(false);
    let mut registration = None;
    let api: Api<StoragePool> = Api::all(client.clone());
    for pool in configured_pools(&config, &opts.data_dir, &opts.node_id) {
        register(&api, &pool).await?;
    }
    if let Some(endpoint) = opts.endpoint.clone() {
        let file = ClusterFile {
            kubeconfig: opts.kubeconfig.clone(),
            pool_stale_secs: opts.pool_stale_after.as_secs(),
        };
        let bytes = serde_json::to_vec_pretty(&file)
            .map_err(|e| Error::internal(format!("cannot encode {CLUSTER_FILE}: {e}")))?;
        crate::datapath::host::files::atomic_write(&opts.data_dir.join(CLUSTER_FILE), &bytes)?;
        let store = Arc::new(crate::edge::kube::store::KubeStore::new(
            client.clone(),
            tokio::runtime::Handle::current(),
        ));
        {
            let (store, node) = (store.clone(), opts.node_id.clone());
            tokio::task::spawn_blocking(move || {
                crate::datapath::repair::release_claims(store.as_ref(), &node)
            })
            .await
            .map_err(|e| Error::internal(format!("claim recovery panicked: {e}")))?;
        }
        if let Some(addr) = config.metrics_listen {
            crate::edge::metrics::http::spawn(
                addr,
                Arc::new(crate::edge::metrics::node::NodeMetrics {
                    data_dir: opts.data_dir.clone(),
                    store: store.clone(),
                    all_volumes: false,
                    socket: crate::edge::grpc::uds::socket_path(&endpoint)?,
                }),
            )?;
        }
        let leases: Api<Lease> = Api::namespaced(client.clone(), &opts.lease_namespace);
        // Renewed before CSI Node serves: a node never stages a volume
        // without a live lease standing for its claims.
        let lease = LeaseConfig {
            namespace: opts.lease_namespace.clone(),
            name: lease_name(&opts.node_id),
            identity: opts.node_id.clone(),
            duration: opts.lease_duration,
            renew_every: opts.lease_duration / 4,
        };
        while !matches!(try_acquire(&leases, &lease).await, Ok(true)) {
            warn!(lease = %lease.name, "cannot take this node's lease yet");
            tokio::time::sleep(lease.renew_every).await;
        }
        {
            let (leases, lease) = (leases.clone(), lease.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(lease.renew_every).await;
                    if let Err(e) = try_acquire(&leases, &lease).await {
                        warn!(lease = %lease.name, error = %e, "cannot renew this node's lease");
                    }
                }
            });
        }
        let core = Arc::new(
            crate::datapath::node::NodeCore::new(&opts.data_dir, &opts.node_id, store)
                .with_liveness(Arc::new(LeaseLiveness {
                    leases,
                    handle: tokio::runtime::Handle::current(),
                }))
                .with_protected(
                    config
                        .pools
                        .iter()
                        .filter(|p| p.nfs.is_none())
                        .map(|p| config.pool_path(&opts.data_dir, p)),
                ),
        );
        if let Some(registry) = opts.registry_dir.clone() {
            let csi_socket = crate::edge::grpc::uds::socket_path(&endpoint)?;
            let mut stop = stopping.subscribe();
            registration = Some(tokio::spawn(async move {
                let stopped = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                if let Err(e) =
                    crate::edge::csi::registration::serve_until(&registry, csi_socket, stopped)
                        .await
                {
                    tracing::error!(error = %e, "kubelet registration stopped");
                }
            }));
        }
        spawn_repair(&opts.data_dir, &opts.node_id)?;
        tokio::spawn(async move {
            if let Err(e) = serve_csi(&endpoint, core).await {
                tracing::error!(error = %e, "CSI endpoint stopped");
            }
        });
    } else if opts.registry_dir.is_some() {
        return Err(Error::invalid(
            "--kubelet-registry needs --endpoint: the kubelet is told where CSI Node listens",
        ));
    }
    let shutdown = crate::datapath::host::shutdown::requested();
    tokio::pin!(shutdown);
    loop {
        if agent_thread.is_finished() {
            return Err(Error::internal("the replica agent stopped"));
        }
        if let Err(e) = heartbeat(&api, &agent, &opts).await {
            warn!(error = %e, "cannot report pools");
        }
        tokio::select! {
            () = tokio::time::sleep(opts.heartbeat) => {}
            () = &mut shutdown => break,
        }
    }
    // The kubelet must not find a registration socket nobody answers;
    // engines keep serving mounted volumes in their own process groups.
    let _ = stopping.send(true);
    if let Some(task) = registration {
        let _ = task.await;
    }
    if let Some(endpoint) = &opts.endpoint
        && let Ok(socket) = crate::edge::grpc::uds::socket_path(endpoint)
    {
        let _ = std::fs::remove_file(socket);
    }
    info!("terna node stopped; staged volumes keep running in their engines");
    Ok(())
}

/// Creates the object, or brings its spec in line with the configuration.
async fn register(api: &Api<StoragePool>, pool: &StoragePool) -> Result<()> {
    let name = pool.metadata.name.clone().unwrap_or_default();
    let failed = |e: kube::Error| {
        Error::new(
            crate::core::error::ErrorKind::Unavailable,
            format!("cannot register StoragePool {name}: {e}"),
        )
    };
    match api.get_opt(&name).await.map_err(failed)? {
        None => match api.create(&PostParams::default(), pool).await {
            Ok(_) => info!(pool = %name, "pool registered"),
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(failed(e)),
        },
        Some(mut existing) if existing.spec != pool.spec => {
            existing.spec = pool.spec.clone();
            api.replace(&name, &PostParams::default(), &existing)
                .await
                .map_err(failed)?;
        }
        Some(_) => {}
    }
    Ok(())
}

/// Serves every pool naming this node and reports each one's state.
async fn heartbeat(api: &Api<StoragePool>, agent: &AgentState, opts: &NodeOptions) -> Result<()> {
    let pools = api
        .list(&ListParams::default())
        .await
        .map_err(|e| Error::new(crate::core::error::ErrorKind::Unavailable, e.to_string()))?;
    let served = agent.pool_names();
    for pool in pools.items.iter().filter(|p| p.spec.node == opts.node_id) {
        let Some(name) = pool.metadata.name.clone() else {
            continue;
        };
        let path = PathBuf::from(&pool.spec.path);
        let local = LocalPool::new(&path, pool.spec.capacity_bytes);
        let (health, message, capacity) = match local {
            Ok(local) => match local.capacity() {
                Ok(capacity) => {
                    if !served.contains(&name) {
                        info!(pool = %name, path = %path.display(), "serving pool");
                        agent.add_pool(&name, Box::new(local));
                        let probe_path = path.clone();
                        match tokio::task::spawn_blocking(move || {
                            crate::datapath::host::probe::measure(&probe_path, PROBE_MIB)
                        })
                        .await
                        {
                            Ok(Ok((write, read))) => {
                                info!(pool = %name, write_mib_s = write, read_mib_s = read, "pool measured");
                                let patch = json!({"status": {
                                    "measuredWriteMibPerSec": (write * 10.0).round() / 10.0,
                                    "measuredReadMibPerSec": (read * 10.0).round() / 10.0,
                                }});
                                let _ = api
                                    .patch_status(
                                        &name,
                                        &PatchParams::default(),
                                        &Patch::Merge(&patch),
                                    )
                                    .await;
                            }
                            Ok(Err(e)) => warn!(pool = %name, error = %e, "cannot measure pool"),
                            Err(e) => warn!(pool = %name, error = %e, "pool probe failed"),
                        }
                    }
                    ("Ready", None, capacity)
                }
                Err(e) => ("NotReady", Some(e.to_string()), 0),
            },
            Err(e) => ("NotReady", Some(e.to_string()), 0),
        };
        let status = json!({
            "status": {
                "agent": opts.agent_advertise.to_string(),
                "capacityBytes": capacity,
                "capacity": human_bytes(capacity),
                "usedBytes": statvfs_used(&path).unwrap_or(0),
                "zone": pool.spec.zone.clone().unwrap_or_else(|| "default".into()),
                "health": health,
                "message": message,
                "heartbeat": Timestamp::now().to_string(),
            }
        });
        if let Err(e) = api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await
        {
            warn!(pool = %name, error = %e, "cannot update pool status");
        }
    }
    Ok(())
}

const REPAIR_INTERVAL: Duration = Duration::from_secs(10);

/// Repairs, in the background, degraded volumes staged nowhere that this
/// node holds a healthy replica of: a fresh store and pool snapshot each
/// pass, so pools registered since are seen.
fn spawn_repair(data_dir: &Path, node: &str) -> Result<()> {
    let (data_dir, node) = (data_dir.to_path_buf(), node.to_string());
    std::thread::Builder::new()
        .name("repair".into())
        .spawn(move || {
            loop {
                std::thread::sleep(REPAIR_INTERVAL);
                let backing = Config::load_or_init_with(&data_dir, Config::default_node)
                    .and_then(|config| crate::edge::kube::backing::open(&data_dir, &node, &config));
                match backing {
                    Ok(Some(b)) => crate::datapath::repair::pass_over(&data_dir, &node, &b, |r| {
                        crate::datapath::repair::looks_after(r, &node)
                    }),
                    Ok(None) => {}
                    Err(e) => warn!(error = %e, "cannot look for volumes to repair"),
                }
            }
        })
        .map_err(|e| Error::io("cannot start the repair thread", e))?;
    Ok(())
}

/// Node liveness from the nodes' Leases. A node without one is dead too:
/// deleting a dead node's Lease is how an admin frees its claims at once.
struct LeaseLiveness {
    leases: Api<Lease>,
    handle: tokio::runtime::Handle,
}

impl crate::datapath::node::NodeLiveness for LeaseLiveness {
    fn expired(&self, node: &str) -> Result<bool> {
        let lease = self
            .handle
            .block_on(self.leases.get_opt(&lease_name(node)))
            .map_err(|e| {
                Error::new(
                    crate::core::error::ErrorKind::Unavailable,
                    format!("cannot read the lease of node {node}: {e}"),
                )
            })?;
        let spec = lease.as_ref().and_then(|l| l.spec.as_ref());
        // Seen from a neutral identity: Take means nobody holds it now.
        Ok(lease.is_none() || decide(spec, "", Timestamp::now()) == Decision::Take)
    }
}

/// Serves CSI Identity and Node for this node's kubelet.
async fn serve_csi(endpoint: &str, core: Arc<crate::datapath::node::NodeCore>) -> Result<()> {
    use crate::edge::csi::identity::IdentityService;
    use crate::edge::csi::node::NodeService;
    use crate::proto::csi::identity_server::IdentityServer;
    use crate::proto::csi::node_server::NodeServer;
    let (_, listener) = crate::edge::grpc::uds::bind_endpoint(endpoint)?;
    info!(endpoint = %endpoint, "serving CSI Identity and Node");
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(IdentityService { controller: false }))
        .add_service(NodeServer::new(NodeService {
            core,
            locks: Default::default(),
        }))
        .serve_with_incoming(crate::edge::grpc::uds::incoming(listener))
        .await
        .map_err(|e| {
            Error::with_source(
                crate::core::error::ErrorKind::Internal,
                "gRPC server failed",
                e,
            )
        })
}
