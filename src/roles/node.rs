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

use tracing::{info, warn};

use crate::core::config::Config;
use crate::core::error::{Error, Result};
use crate::datapath::agent::server::{self, AgentState};
use crate::edge::csi::server::{Endpoint, Services};
use crate::edge::kube::backing::ClusterFile;
use crate::edge::kube::pool_registration::PoolRegistration;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value = "/var/lib/terna")]
    data_dir: PathBuf,
    /// Node id; defaults to the hostname.
    #[arg(long, env = "NODE_NAME")]
    node_id: Option<String>,
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Address the replica agent listens on.
    #[arg(long, default_value = "0.0.0.0:7420")]
    agent_listen: SocketAddr,
    /// Address other nodes reach the agent at; default: the listen address.
    #[arg(long, env = "AGENT_ADVERTISE")]
    agent_advertise: Option<SocketAddr>,
    /// Seconds between pool status reports.
    #[arg(long, default_value_t = 10)]
    heartbeat_secs: u64,
    /// Serve CSI Identity and Node (unix:///path) for the kubelet.
    #[arg(long)]
    endpoint: Option<String>,
    /// Pools whose node has not reported for this long are not opened.
    #[arg(long, default_value_t = 60)]
    pool_stale_secs: u64,
    /// Register with the kubelet through this plugins_registry
    /// directory (usually /var/lib/kubelet/plugins_registry).
    #[arg(long)]
    kubelet_registry: Option<PathBuf>,
    /// Where this node's liveness Lease (terna-node-<node>) lives.
    #[arg(long, env = "POD_NAMESPACE", default_value = "terna-system")]
    lease_namespace: String,
    /// A node that has not renewed its Lease for this long is dead: its
    /// staging claims may be taken over by other nodes.
    #[arg(long, default_value_t = 40)]
    node_lease_secs: u64,
    /// The host's cgroup filesystem, mounted into the node plugin's pod:
    /// engines move beside the pods there, so the pod's end (a rolling
    /// update, a deletion) leaves mounted volumes running.
    #[arg(long, env = "TERNA_ENGINE_CGROUP_ROOT")]
    engine_cgroup_root: Option<PathBuf>,
    /// A terna.toml to install as DATA_DIR/terna.toml at start (deploy/
    /// mounts its ConfigMap here): engines read the data dir's copy, and a
    /// file mounted inside the data dir would propagate to the host.
    #[arg(long)]
    config: Option<PathBuf>,
    /// This pod's ServiceAccount (in --lease-namespace): engines get a
    /// token of it bound to no pod, so they keep API access after the pod
    /// that started them is gone.
    #[arg(long, env = "SERVICE_ACCOUNT_NAME")]
    service_account: Option<String>,
}

struct NodeOptions {
    data_dir: PathBuf,
    node_id: String,
    agent_listen: SocketAddr,
    /// The address other nodes reach this agent at.
    agent_advertise: SocketAddr,
    heartbeat: Duration,
    /// Serve CSI Identity and Node here (unix:///path).
    endpoint: Option<String>,
    /// Absolute: engines started from another directory read it too.
    kubeconfig: Option<PathBuf>,
    /// StoragePools not confirmed for this long are left out of engines.
    pool_stale_after: Duration,
    /// The kubelet's plugins_registry directory: register there (needs
    /// `endpoint`).
    registry_dir: Option<PathBuf>,
    /// Namespace of the node's liveness Lease.
    lease_namespace: String,
    /// How long the Lease lasts unrenewed.
    lease_duration: Duration,
    engine_cgroup_root: Option<PathBuf>,
    service_account: Option<String>,
}

pub fn run(args: Args) -> Result<()> {
    if let Some(source) = &args.config {
        crate::datapath::host::config_file::install_from(source, &args.data_dir)?;
    }
    let opts = NodeOptions {
        data_dir: args.data_dir,
        node_id: crate::datapath::host::hostname::node_id(args.node_id)?,
        agent_listen: args.agent_listen,
        agent_advertise: args.agent_advertise.unwrap_or(args.agent_listen),
        heartbeat: Duration::from_secs(args.heartbeat_secs.max(1)),
        endpoint: args.endpoint,
        kubeconfig: args
            .kubeconfig
            .map(|k| std::path::absolute(&k).unwrap_or(k)),
        pool_stale_after: Duration::from_secs(args.pool_stale_secs),
        registry_dir: args.kubelet_registry,
        lease_namespace: args.lease_namespace,
        lease_duration: Duration::from_secs(args.node_lease_secs.max(3)),
        engine_cgroup_root: args.engine_cgroup_root,
        service_account: args.service_account,
    };
    tokio::runtime::Runtime::new()
        .map_err(|e| Error::io("cannot start the async runtime", e))?
        .block_on(serve(opts))
}

/// Runs until the agent stops: the agent on its own threads, the
/// registration loop here.
async fn serve(opts: NodeOptions) -> Result<()> {
    let client = crate::edge::kube::client::client(opts.kubeconfig.as_deref()).await?;
    let _owner = crate::datapath::host::lock::lock(&opts.data_dir)?;
    let config = crate::datapath::host::config_file::load_or_init_with(
        &opts.data_dir,
        Config::default_node,
    )?;
    let token = crate::datapath::host::config_file::cluster_token(&config, &opts.data_dir)?;
    crate::datapath::tls::store::prepare(&config, &opts.data_dir)?;
    let transport = crate::datapath::pools::transport(&opts.data_dir, &opts.node_id);
    if let crate::datapath::agent::transport::Transport::Tls(identity) = &transport {
        identity.configs()?;
    }
    let agent = Arc::new(
        AgentState::new(&opts.node_id, &token, transport.clone(), Default::default())
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
    let pools = PoolRegistration::new(client.clone(), &opts.node_id, opts.agent_advertise);
    pools.register_configured(&config, &opts.data_dir).await?;
    if let Some(endpoint) = opts.endpoint.clone() {
        let cluster = ClusterFile {
            kubeconfig: match &opts.kubeconfig {
                Some(k) => Some(k.clone()),
                None => {
                    crate::edge::kube::engine_credentials::install(
                        &client,
                        &opts.data_dir,
                        &opts.lease_namespace,
                        opts.service_account.as_deref(),
                    )
                    .await?
                }
            },
            pool_stale_secs: opts.pool_stale_after.as_secs(),
            lease_namespace: Some(opts.lease_namespace.clone()),
        };
        crate::edge::kube::backing::write_cluster_file(&opts.data_dir, &cluster)?;
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
        let liveness = crate::edge::kube::node_lease::hold(
            client.clone(),
            &opts.lease_namespace,
            &opts.node_id,
            opts.lease_duration,
        )
        .await;
        let core = Arc::new(
            crate::datapath::node::NodeCore::new(&opts.data_dir, &opts.node_id, store)
                .with_liveness(Arc::new(liveness))
                .with_engine_cgroup_root(opts.engine_cgroup_root.clone())
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
                    tracing::error!(error = %e.report(), "kubelet registration stopped");
                }
            }));
        }
        spawn_repair(&opts.data_dir, &opts.node_id, cluster, token, transport)?;
        tokio::spawn(async move {
            let services = Services {
                controller: None,
                node: Some(core),
            };
            let served = match Endpoint::bind(&endpoint) {
                Ok(csi) => csi.serve(services, std::future::pending()).await,
                Err(e) => Err(e),
            };
            if let Err(e) = served {
                tracing::error!(error = %e.report(), "CSI endpoint stopped");
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
        if let Err(e) = pools.heartbeat(&agent).await {
            warn!(error = %e.report(), "cannot report pools");
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

const REPAIR_INTERVAL: Duration = Duration::from_secs(10);

/// Repairs, in the background, degraded volumes staged nowhere that this
/// node holds a healthy replica of: a fresh store and pool snapshot each
/// pass, so pools registered since are seen.
fn spawn_repair(
    data_dir: &Path,
    node: &str,
    cluster: ClusterFile,
    token: Vec<u8>,
    transport: crate::datapath::agent::transport::Transport,
) -> Result<()> {
    let (data_dir, node) = (data_dir.to_path_buf(), node.to_string());
    std::thread::Builder::new()
        .name("repair".into())
        .spawn(move || {
            loop {
                std::thread::sleep(REPAIR_INTERVAL);
                let backing = crate::datapath::host::config_file::load_or_init_with(
                    &data_dir,
                    Config::default_node,
                )
                .and_then(|config| {
                    crate::edge::kube::backing::open(&cluster, &node, &config, &token, &transport)
                });
                match backing {
                    Ok(b) => crate::datapath::repair::pass_over(&data_dir, &node, &b, |r| {
                        crate::datapath::repair::looks_after(r, &node)
                    }),
                    Err(e) => warn!(error = %e.report(), "cannot look for volumes to repair"),
                }
            }
        })
        .map_err(|e| Error::io("cannot start the repair thread", e))?;
    Ok(())
}
