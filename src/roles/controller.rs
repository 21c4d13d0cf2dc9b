//! `terna controller`: the provisioner over a Kubernetes-backed core, led
//! through a Lease. The pool set follows the StoragePool objects; each
//! pool's allocation is written back to its status for `kubectl get`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::core::controller::ControllerCore;
use crate::core::error::{Error, Result};
use crate::core::pool::Pools;
use crate::datapath::agent::transport::Transport;
use crate::datapath::tls::Identity;
use crate::datapath::tls::ca::{CA_LIFETIME, CaSet};
use crate::edge::csi::server::{Controller, Endpoint, Services};
use crate::edge::kube::leader::LeaseConfig;
use crate::edge::kube::leading::Leading;
use crate::edge::kube::pool_list::PoolList;
use crate::edge::kube::pools::PoolDirectory;
use crate::edge::kube::store::KubeStore;
use crate::edge::metrics::controller::ControllerMetrics;

#[derive(clap::Args)]
pub struct Args {
    /// Kubeconfig to use; default: KUBECONFIG, then in-cluster.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// This controller's identity in the leader lease; default: hostname-pid.
    #[arg(long, env = "POD_NAME")]
    id: Option<String>,
    /// Run without leader election (only ever one controller).
    #[arg(long)]
    no_leader_elect: bool,
    /// Namespace of the leader lease and of --cluster-token-secret.
    #[arg(long, env = "POD_NAMESPACE", default_value = "terna-system")]
    lease_namespace: String,
    #[arg(long, default_value = "terna-controller")]
    lease_name: String,
    /// A leader that has not renewed for this long is replaced.
    #[arg(long, default_value_t = 15)]
    lease_duration_secs: u64,
    /// File holding the token replica agents require.
    #[arg(long, conflicts_with = "cluster_token_secret")]
    cluster_token_file: Option<PathBuf>,
    /// Secret (in the lease namespace) holding the token replica agents
    /// require under key `token`; created with a random token if absent.
    #[arg(long)]
    cluster_token_secret: Option<String>,
    /// The cluster CA file (made when absent) the controller's TLS identity
    /// for the agents comes from.
    #[arg(long, conflicts_with = "cluster_ca_secret")]
    cluster_ca_file: Option<PathBuf>,
    /// Secret (in the lease namespace) holding the cluster CA under key
    /// `ca.json`; created when absent, rotated by the controller.
    #[arg(long)]
    cluster_ca_secret: Option<String>,
    #[arg(long, default_value_t = 5000)]
    agent_timeout_ms: u64,
    /// Allocatable bytes per pool = capacity × this, unless the pool says otherwise.
    #[arg(long, default_value_t = 1.0)]
    overcommit_ratio: f64,
    /// Claims provisioned at once.
    #[arg(long, default_value_t = 16)]
    concurrency: u16,
    /// Pools whose node has not reported for this long take no new replicas.
    #[arg(long, default_value_t = 60)]
    pool_stale_secs: u64,
    /// Also serve CSI Identity and Controller (unix:///path), for the
    /// external-provisioner sidecar.
    #[arg(long)]
    endpoint: Option<String>,
    /// Publish CSIStorageCapacity objects (per Terna StorageClass) into
    /// this namespace; off when unset.
    #[arg(long)]
    capacity_namespace: Option<String>,
    /// Serve /metrics, /healthz and /readyz here (host:port).
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
}

struct ControllerOptions {
    /// `None`: KUBECONFIG, then in-cluster.
    kubeconfig: Option<PathBuf>,
    identity: String,
    /// `None`: run without leader election (one controller only).
    lease: Option<LeaseConfig>,
    token: TokenSource,
    ca: CaSource,
    agent_timeout: Duration,
    overcommit_ratio: f64,
    concurrency: u16,
    /// Pools whose node has not reported for this long take no new replicas.
    pool_stale_after: Duration,
    /// Also serve CSI Identity and Controller here (unix:///path), for the
    /// standard external-provisioner sidecar.
    endpoint: Option<String>,
    /// Publish CSIStorageCapacity objects into this namespace.
    capacity_namespace: Option<String>,
    /// Serve /metrics, /healthz and /readyz here.
    metrics_listen: Option<std::net::SocketAddr>,
}

/// Where the cluster token comes from.
enum TokenSource {
    /// No token: agents refuse this controller (NFS pools only).
    None,
    /// `--cluster-token-file`.
    File(PathBuf),
    /// `--cluster-token-secret`: a Secret in the controller's namespace,
    /// generated when it does not exist.
    Secret { namespace: String, name: String },
}

/// Where the cluster CA comes from.
enum CaSource {
    /// None: a CA of the controller's own, which no agent trusts (NFS
    /// pools only, as without a token).
    None,
    File(PathBuf),
    Secret {
        namespace: String,
        name: String,
    },
}

impl ControllerOptions {
    fn from_args(args: Args) -> Result<ControllerOptions> {
        let identity = match args.id {
            Some(id) => id,
            None => format!(
                "{}-{}",
                crate::datapath::host::hostname::hostname()?,
                std::process::id()
            ),
        };
        let token = match (args.cluster_token_file, args.cluster_token_secret) {
            (Some(_), Some(_)) => {
                return Err(Error::invalid(
                    "give --cluster-token-file or --cluster-token-secret, not both",
                ));
            }
            (Some(path), None) => TokenSource::File(path),
            (None, Some(name)) => TokenSource::Secret {
                namespace: args.lease_namespace.clone(),
                name,
            },
            (None, None) => TokenSource::None,
        };
        let ca = match (args.cluster_ca_file, args.cluster_ca_secret) {
            (Some(path), _) => CaSource::File(path),
            (None, Some(name)) => CaSource::Secret {
                namespace: args.lease_namespace.clone(),
                name,
            },
            (None, None) => CaSource::None,
        };
        let duration = Duration::from_secs(args.lease_duration_secs.max(3));
        let lease = (!args.no_leader_elect).then(|| LeaseConfig {
            namespace: args.lease_namespace,
            name: args.lease_name,
            identity: identity.clone(),
            duration,
            renew_every: duration / 3,
        });
        Ok(ControllerOptions {
            kubeconfig: args.kubeconfig,
            identity,
            lease,
            token,
            ca,
            agent_timeout: Duration::from_millis(args.agent_timeout_ms),
            overcommit_ratio: args.overcommit_ratio,
            concurrency: args.concurrency.max(1),
            pool_stale_after: Duration::from_secs(args.pool_stale_secs),
            endpoint: args.endpoint,
            capacity_namespace: args.capacity_namespace,
            metrics_listen: args.metrics_listen,
        })
    }
}

/// The controller's TLS identity for the agents from a CA file, or from
/// none (a Secret is `cluster_ca::followed` instead).
fn identity(file: Option<&PathBuf>, me: &str) -> Result<Arc<Identity>> {
    match file {
        Some(path) => {
            crate::datapath::tls::store::ensure(path)?;
            let identity = Identity::from_file(me, path.clone());
            identity.configs()?;
            Ok(identity)
        }
        None => {
            warn!(
                "no --cluster-ca-secret or --cluster-ca-file: every node's agent will refuse \
                 this controller's certificate, so only NFS pools can hold new replicas"
            );
            let set = CaSet::create(crate::datapath::tls::unix_now(), CA_LIFETIME)?;
            Ok(Identity::in_memory(me, set))
        }
    }
}

pub fn run(args: Args) -> Result<()> {
    let opts = ControllerOptions::from_args(args)?;
    tokio::runtime::Runtime::new()
        .map_err(|e| Error::io("cannot start the async runtime", e))?
        .block_on(serve(opts))
}

async fn serve(opts: ControllerOptions) -> Result<()> {
    let client = crate::edge::kube::client::client(opts.kubeconfig.as_deref()).await?;
    // Before anything uses it: a bad token is an error at start.
    let token = match &opts.token {
        TokenSource::File(path) => crate::datapath::host::config_file::read_cluster_token(path)?,
        TokenSource::Secret { namespace, name } => {
            crate::edge::kube::cluster_token::get_or_create(client.clone(), namespace, name).await?
        }
        TokenSource::None => {
            warn!(
                "no --cluster-token-secret or --cluster-token-file: every node's agent will \
                 refuse this controller, so only NFS pools can hold new replicas"
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
    let identity = match &opts.ca {
        CaSource::Secret { namespace, name } => {
            crate::edge::kube::cluster_ca::followed(client.clone(), namespace, name, &opts.identity)
                .await?
        }
        CaSource::File(path) => identity(Some(path), &opts.identity)?,
        CaSource::None => identity(None, &opts.identity)?,
    };
    let transport = Transport::Tls(identity);
    let directory = PoolDirectory::new(
        &token,
        transport,
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
                tracing::error!(error = %e.report(), "CSI endpoint stopped");
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
