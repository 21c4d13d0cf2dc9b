use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use terna::roles;

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
    Standalone(roles::standalone::Args),
    /// Runs one staged volume's engine (started by the node plugin).
    #[command(hide = true)]
    Engine(roles::engine::Args),
    /// Serves this node's pools to engines on other nodes (the replica agent).
    Agent(roles::agent::Args),
    /// The cluster controller: provisions claims of Terna StorageClasses.
    Controller(roles::controller::Args),
    /// A cluster node: serves its pools through the replica agent and
    /// registers them as StoragePools.
    Node(roles::node::Args),
    /// Shows or rotates the cluster CA file (`terna ca show|rotate`).
    Ca(roles::ca::Args),
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
    #[command(flatten)]
    Report(roles::report::Args),
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
        Command::Standalone(args) => roles::standalone::run(args)?,
        Command::Engine(args) => roles::engine::run(args)?,
        Command::Agent(args) => roles::agent::run(args)?,
        Command::Ca(args) => roles::ca::run(args)?,
        Command::Controller(args) => roles::controller::run(args)?,
        Command::Node(args) => roles::node::run(args)?,
        Command::Report(args) => roles::report::run(args)?,
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
    }
    Ok(())
}
