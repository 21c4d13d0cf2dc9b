use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "terna",
    version,
    about = "Replicated Kubernetes storage: CSI driver and provisioner"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Controller and node in one process, with local state and default pools.
    Standalone {
        /// Holds the configuration (terna.toml), the state store and the default pools.
        #[arg(long, default_value = "/var/lib/terna")]
        data_dir: PathBuf,
        /// CSI endpoint, unix:///path/to/csi.sock.
        #[arg(long, default_value = "unix:///run/terna/csi.sock")]
        endpoint: String,
        /// Node id; defaults to the hostname.
        #[arg(long)]
        node_id: Option<String>,
    },
    /// Runs one staged volume's engine (started by the node plugin).
    #[command(hide = true)]
    Engine {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        node_id: String,
        #[arg(long)]
        volume: String,
        #[arg(long)]
        mountpoint: PathBuf,
        /// Set by the engine's supervisor for its worker: the FUSE session.
        #[arg(long)]
        fuse_fd: Option<i32>,
    },
    /// Serves this node's pools to engines on other nodes (the replica agent).
    Agent {
        /// Holds terna.toml (pools with no `node`, or this node's, are served).
        #[arg(long, default_value = "/var/lib/terna")]
        data_dir: PathBuf,
        /// Address to listen on, host:port.
        #[arg(long, default_value = "0.0.0.0:7420")]
        listen: std::net::SocketAddr,
        /// Node id; defaults to the hostname.
        #[arg(long)]
        node_id: Option<String>,
    },
    /// The cluster controller: provisions claims of Terna StorageClasses.
    Controller {
        /// Kubeconfig to use; default: KUBECONFIG, then in-cluster.
        #[arg(long, env = "KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
        /// This controller's identity in the leader lease; default: hostname-pid.
        #[arg(long, env = "POD_NAME")]
        id: Option<String>,
        /// Run without leader election (only ever one controller).
        #[arg(long)]
        no_leader_elect: bool,
        #[arg(long, env = "POD_NAMESPACE", default_value = "terna-system")]
        lease_namespace: String,
        #[arg(long, default_value = "terna-controller")]
        lease_name: String,
        /// A leader that has not renewed for this long is replaced.
        #[arg(long, default_value_t = 15)]
        lease_duration_secs: u64,
        /// File holding the token replica agents require.
        #[arg(long)]
        cluster_token_file: Option<PathBuf>,
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
    },
    /// A cluster node: serves its pools through the replica agent and
    /// registers them as StoragePools.
    Node {
        #[arg(long, default_value = "/var/lib/terna")]
        data_dir: PathBuf,
        /// Node id; defaults to the hostname.
        #[arg(long, env = "NODE_NAME")]
        node_id: Option<String>,
        #[arg(long, env = "KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
        /// Address the replica agent listens on.
        #[arg(long, default_value = "0.0.0.0:7420")]
        agent_listen: std::net::SocketAddr,
        /// Address other nodes reach the agent at; default: the listen address.
        #[arg(long, env = "AGENT_ADVERTISE")]
        agent_advertise: Option<std::net::SocketAddr>,
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
    },
    /// Prints the CustomResourceDefinitions (or writes them into a directory).
    Crds {
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Parses the arguments after `--` as a terna command line and exits,
    /// running nothing: tests check deploy/'s container args with it.
    #[command(hide = true)]
    CheckArgs {
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Volumes with replica health and catch-up progress.
    Volumes {
        #[command(flatten)]
        source: ReportSource,
        /// Refresh every 2 s until every volume is healthy.
        #[arg(long)]
        watch: bool,
    },
    /// Pools with tier, capacity, allocation and health.
    Pools {
        #[command(flatten)]
        source: ReportSource,
    },
    /// Pools and volumes at a glance, and what is not healthy.
    Status {
        #[command(flatten)]
        source: ReportSource,
        /// Refresh every 2 s until every volume is healthy.
        #[arg(long)]
        watch: bool,
    },
}

/// Where the CLI reports read from: a standalone data dir, or the cluster.
#[derive(clap::Args)]
struct ReportSource {
    #[arg(long, default_value = "/var/lib/terna")]
    data_dir: PathBuf,
    /// Read the cluster's StoragePools and TernaVolumes instead.
    #[arg(long)]
    cluster: bool,
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// table or json
    #[arg(short = 'o', long, default_value = "table")]
    output: String,
}

type Rows = (
    Vec<terna::roles::report::PoolRow>,
    Vec<terna::roles::report::VolumeRow>,
);

fn gather(source: &ReportSource) -> anyhow::Result<Rows> {
    if !matches!(source.output.as_str(), "table" | "json") {
        anyhow::bail!(
            "output format {:?} is unknown: use table or json",
            source.output
        );
    }
    if source.cluster {
        let runtime = tokio::runtime::Runtime::new()?;
        Ok(runtime.block_on(terna::roles::report::from_cluster(
            source.kubeconfig.as_deref(),
        ))?)
    } else {
        let node = nix::unistd::gethostname()?.to_string_lossy().into_owned();
        Ok(terna::roles::report::from_data_dir(
            &source.data_dir,
            &node,
        )?)
    }
}

/// Prints `render` of fresh rows; with `watch`, again every 2 s until no
/// volume is unhealthy.
fn report(
    source: &ReportSource,
    watch: bool,
    render: impl Fn(&Rows) -> anyhow::Result<String>,
) -> anyhow::Result<()> {
    loop {
        let rows = gather(source)?;
        print!("{}", render(&rows)?);
        if !watch || rows.1.iter().all(|v| v.state == "healthy") {
            return Ok(());
        }
        println!();
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TERNA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    // One JSON object per line for log collectors (TERNA_LOG_FORMAT=json);
    // key=value text otherwise.
    if std::env::var("TERNA_LOG_FORMAT").is_ok_and(|f| f == "json") {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .init();
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing();
    match cli.command {
        Command::Standalone {
            data_dir,
            endpoint,
            node_id,
        } => {
            let node_id = match node_id {
                Some(n) => n,
                None => nix::unistd::gethostname()?.to_string_lossy().into_owned(),
            };
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(terna::roles::standalone::run(
                terna::roles::standalone::Options {
                    data_dir,
                    endpoint,
                    node_id,
                },
            ))?;
        }
        Command::Engine {
            data_dir,
            node_id,
            volume,
            mountpoint,
            fuse_fd,
        } => terna::roles::engine::run(terna::roles::engine::EngineArgs {
            data_dir,
            node_id,
            volume_id: volume,
            mountpoint,
            fuse_fd,
        })?,
        Command::Agent {
            data_dir,
            listen,
            node_id,
        } => {
            let node_id = match node_id {
                Some(n) => n,
                None => nix::unistd::gethostname()?.to_string_lossy().into_owned(),
            };
            terna::roles::agent::run(&data_dir, listen, &node_id)?;
        }
        Command::Controller {
            kubeconfig,
            id,
            no_leader_elect,
            lease_namespace,
            lease_name,
            lease_duration_secs,
            cluster_token_file,
            agent_timeout_ms,
            overcommit_ratio,
            concurrency,
            pool_stale_secs,
            endpoint,
            capacity_namespace,
            metrics_listen,
        } => {
            let identity = match id {
                Some(id) => id,
                None => format!(
                    "{}-{}",
                    nix::unistd::gethostname()?.to_string_lossy(),
                    std::process::id()
                ),
            };
            let duration = std::time::Duration::from_secs(lease_duration_secs.max(3));
            let lease = (!no_leader_elect).then(|| terna::edge::kube::leader::LeaseConfig {
                namespace: lease_namespace,
                name: lease_name,
                identity: identity.clone(),
                duration,
                renew_every: duration / 3,
            });
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async {
                terna::roles::controller::run(terna::roles::controller::ControllerOptions {
                    kubeconfig,
                    identity,
                    lease,
                    cluster_token_file,
                    agent_timeout: std::time::Duration::from_millis(agent_timeout_ms),
                    overcommit_ratio,
                    concurrency: concurrency.max(1),
                    pool_stale_after: std::time::Duration::from_secs(pool_stale_secs),
                    endpoint,
                    capacity_namespace,
                    metrics_listen,
                })
                .await
            })?;
        }
        Command::Node {
            data_dir,
            node_id,
            kubeconfig,
            agent_listen,
            agent_advertise,
            heartbeat_secs,
            endpoint,
            pool_stale_secs,
            kubelet_registry,
            lease_namespace,
            node_lease_secs,
        } => {
            let node_id = match node_id {
                Some(n) => n,
                None => nix::unistd::gethostname()?.to_string_lossy().into_owned(),
            };
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async {
                let kubeconfig = kubeconfig.map(|k| std::path::absolute(&k).unwrap_or(k));
                terna::roles::node::run(terna::roles::node::NodeOptions {
                    data_dir,
                    node_id,
                    agent_listen,
                    agent_advertise: agent_advertise.unwrap_or(agent_listen),
                    heartbeat: std::time::Duration::from_secs(heartbeat_secs.max(1)),
                    endpoint,
                    kubeconfig,
                    pool_stale_after: std::time::Duration::from_secs(pool_stale_secs),
                    registry_dir: kubelet_registry,
                    lease_namespace,
                    lease_duration: std::time::Duration::from_secs(node_lease_secs.max(3)),
                })
                .await
            })?;
        }
        Command::Crds { out } => {
            let docs = terna::edge::kube::crd::crd_yaml()?;
            match out {
                Some(dir) => {
                    std::fs::create_dir_all(&dir)?;
                    for (file, yaml) in docs {
                        std::fs::write(dir.join(file), yaml)?;
                    }
                }
                None => {
                    for (_, yaml) in docs {
                        print!("---\n{yaml}");
                    }
                }
            }
        }
        Command::CheckArgs { args } => {
            let argv = std::iter::once("terna".to_string()).chain(args);
            // What Cli::try_parse_from does, keeping the matches for the name.
            let parsed = Cli::command()
                .try_get_matches_from(argv)
                .and_then(|m| Cli::from_arg_matches(&m).map(|_| m));
            match parsed {
                Ok(m) => println!("ok: {}", m.subcommand_name().unwrap_or_default()),
                Err(e) => {
                    eprint!("{}", e.render());
                    std::process::exit(2);
                }
            }
        }
        Command::Volumes { source, watch } => {
            let json = source.output == "json";
            report(&source, watch, |(_, volumes)| {
                Ok(if json {
                    serde_json::to_string_pretty(volumes)? + "\n"
                } else {
                    terna::roles::report::volumes_table(volumes)
                })
            })?;
        }
        Command::Pools { source } => {
            let json = source.output == "json";
            report(&source, false, |(pools, _)| {
                Ok(if json {
                    serde_json::to_string_pretty(pools)? + "\n"
                } else {
                    terna::roles::report::pools_table(pools)
                })
            })?;
        }
        Command::Status { source, watch } => {
            let json = source.output == "json";
            report(&source, watch, |(pools, volumes)| {
                Ok(if json {
                    serde_json::to_string_pretty(
                        &serde_json::json!({"pools": pools, "volumes": volumes}),
                    )? + "\n"
                } else {
                    terna::roles::report::status_text(pools, volumes)
                })
            })?;
        }
    }
    Ok(())
}
