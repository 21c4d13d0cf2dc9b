use std::path::PathBuf;

use clap::{Parser, Subcommand};

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
    /// Lists volumes with replica health.
    Volumes {
        #[arg(long, default_value = "/var/lib/terna")]
        data_dir: PathBuf,
        /// table or json
        #[arg(short = 'o', long, default_value = "table")]
        output: String,
    },
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TERNA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
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
            runtime.block_on(terna::standalone::run(terna::standalone::Options {
                data_dir,
                endpoint,
                node_id,
            }))?;
        }
        Command::Engine {
            data_dir,
            node_id,
            volume,
            mountpoint,
        } => terna::engine::process::run(terna::engine::process::EngineArgs {
            data_dir,
            node_id,
            volume_id: volume,
            mountpoint,
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
            terna::agent::run(&data_dir, listen, &node_id)?;
        }
        Command::Volumes { data_dir, output } => {
            print!("{}", terna::standalone::volumes_report(&data_dir, &output)?);
        }
    }
    Ok(())
}
