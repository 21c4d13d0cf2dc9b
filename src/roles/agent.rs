//! The replica agent: serves this node's pools to engines on other nodes
//! over TCP, with the protocol in `protocol.rs`.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::core::error::{Error, Result};
use crate::datapath::agent::server;

#[derive(clap::Args)]
pub struct Args {
    /// Holds terna.toml (pools with no `node`, or this node's, are served).
    #[arg(long, default_value = "/var/lib/terna")]
    pub data_dir: PathBuf,
    /// Address to listen on, host:port.
    #[arg(long, default_value = "0.0.0.0:7420")]
    pub listen: SocketAddr,
    /// Node id; defaults to the hostname.
    #[arg(long)]
    pub node_id: Option<String>,
}

/// `terna agent`: serves the pools on this node's disks until killed.
/// Refuses to start without a cluster token (`cluster_token_file`): an
/// agent serves every replica on the node to whoever it lets in.
pub fn run(args: Args) -> Result<()> {
    let node = crate::datapath::host::hostname::node_id(args.node_id)?;
    serve(&args.data_dir, args.listen, &node)
}

fn serve(data_dir: &Path, listen: SocketAddr, node: &str) -> Result<()> {
    // Claim floors live partly in memory: two agents on one data dir could
    // each let through what the other fenced.
    let _owner = crate::datapath::host::lock::lock(data_dir)?;
    let config = crate::datapath::host::config_file::load_or_init(data_dir)?;
    let token =
        crate::datapath::host::config_file::cluster_token(&config, data_dir).map_err(|e| {
            Error {
                message: format!(
                    "the replica agent will not start without a cluster token: {}",
                    e.message
                ),
                ..e
            }
        })?;
    crate::datapath::tls::store::prepare(&config, data_dir)?;
    let transport = crate::datapath::pools::transport(data_dir, node);
    // A CA that cannot be read is an error now, not at the first peer.
    if let crate::datapath::agent::transport::Transport::Tls(identity) = &transport {
        identity.configs()?;
    }
    let pools = crate::datapath::pools::local_to(&config, data_dir, node)?;
    let fences = crate::core::data_dir::fence_dir(data_dir);
    crate::datapath::host::files::private_dir(&fences)?;
    let listener = TcpListener::bind(listen)
        .map_err(|e| Error::io(format!("cannot listen on {listen}"), e))?;
    let state = Arc::new(
        server::AgentState::new(node, &token, transport, pools)
            .with_fence_dir(&fences)
            .with_limits(server::Limits {
                max_connections: config.agent_max_connections.max(1),
                ..server::Limits::default()
            }),
    );
    server::serve(listener, state).map_err(|e| Error::io("replica agent stopped", e))
}
