//! `terna standalone`: controller and node in one process, on a data dir
//! holding the configuration, the state store and the default pools.

use std::path::PathBuf;
use std::sync::Arc;

use tracing::{info, warn};

use crate::core::controller::ControllerCore;
use crate::core::error::{Error, Result};
use crate::core::store::StateStore;
use crate::core::volume::Phase;
use crate::datapath::host::files::FileStore;
use crate::datapath::node::NodeCore;
use crate::edge::csi::server::{Controller, Endpoint, Services};

const REPAIR_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(clap::Args)]
pub struct Args {
    /// Holds the configuration (terna.toml), the state store and the default pools.
    #[arg(long, default_value = "/var/lib/terna")]
    data_dir: PathBuf,
    /// CSI endpoint, unix:///path/to/csi.sock.
    #[arg(long, default_value = "unix:///run/terna/csi.sock")]
    endpoint: String,
    /// Node id; defaults to the hostname.
    #[arg(long)]
    node_id: Option<String>,
}

struct Options {
    data_dir: PathBuf,
    endpoint: String,
    node_id: String,
}

pub fn run(args: Args) -> Result<()> {
    let opts = Options {
        node_id: crate::datapath::host::hostname::node_id(args.node_id)?,
        data_dir: args.data_dir,
        endpoint: args.endpoint,
    };
    tokio::runtime::Runtime::new()
        .map_err(|e| Error::io("cannot start the async runtime", e))?
        .block_on(serve(opts))
}

async fn serve(opts: Options) -> Result<()> {
    let data_dir = &opts.data_dir;
    let _owner = crate::datapath::host::lock::lock(data_dir)?;
    let config = crate::datapath::host::config_file::load_or_init(data_dir)?;
    let store: Arc<dyn StateStore> = Arc::new(FileStore::open(&crate::core::data_dir::state_dir(
        data_dir,
    ))?);
    let token = crate::datapath::pools::cluster_token(&config, data_dir, &opts.node_id)?;
    // The engines it starts make their TLS identities from the same CA.
    crate::datapath::tls::store::prepare(&config, data_dir)?;
    let transport = crate::datapath::pools::transport(data_dir, &opts.node_id);
    let pools = Arc::new(crate::datapath::pools::from_config(
        &config,
        data_dir,
        &opts.node_id,
        &token,
        &transport,
    )?);
    let controller = Arc::new(
        ControllerCore::new(store.clone(), pools.clone(), config.overcommit_ratio).with_dirty_maps(
            Arc::new(crate::datapath::dirty_maps::DirtyMapFiles::new(data_dir)),
        ),
    );
    let node = Arc::new(
        NodeCore::new(data_dir, &opts.node_id, store.clone()).with_protected(
            config
                .pools
                .iter()
                .filter(|p| p.nfs.is_none())
                .map(|p| config.pool_path(data_dir, p)),
        ),
    );
    resume_interrupted(&controller, &store);
    crate::datapath::repair::release_claims(store.as_ref(), &opts.node_id);
    {
        let (data_dir, node) = (data_dir.clone(), opts.node_id.clone());
        let backing = crate::datapath::engine::assemble::Backing {
            store: store.clone(),
            pools: pools.clone(),
            leases: None,
        };
        std::thread::Builder::new()
            .name("repair".into())
            .spawn(move || {
                loop {
                    crate::datapath::repair::pass(&data_dir, &node, &backing);
                    std::thread::sleep(REPAIR_INTERVAL);
                }
            })
            .map_err(|e| Error::io("cannot start repair thread", e))?;
    }

    let csi = Endpoint::bind(&opts.endpoint)?;
    let socket = csi.socket().to_path_buf();
    if let Some(addr) = config.metrics_listen {
        crate::edge::metrics::http::spawn(
            addr,
            Arc::new(crate::edge::metrics::node::NodeMetrics {
                data_dir: data_dir.clone(),
                store: store.clone(),
                all_volumes: true,
                socket: socket.clone(),
            }),
        )?;
    }
    info!(
        endpoint = %opts.endpoint,
        node_id = %opts.node_id,
        data_dir = %data_dir.display(),
        pools = config.pools.len(),
        "terna standalone serving"
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let services = Services {
        controller: Some(Controller {
            core: controller,
            topology_node: Some(opts.node_id.clone()),
        }),
        node: Some(node),
    };
    let server = csi.serve(services, async {
        let _ = stop_rx.await;
    });
    // Graceful shutdown waits for clients to hang up; one that never does
    // must not keep the process alive.
    let grace = async {
        crate::datapath::host::shutdown::requested().await;
        let _ = stop_tx.send(());
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        served = server => served?,
        () = grace => warn!("clients still connected {} s after shutdown began; stopping anyway", SHUTDOWN_GRACE.as_secs()),
    }
    let _ = std::fs::remove_file(&socket);
    info!("terna standalone stopped; staged volumes keep running in their engines");
    Ok(())
}

/// Finishes creates and deletes a crash interrupted, so no replica leaks
/// and no half-made volume lingers.
fn resume_interrupted(controller: &ControllerCore, store: &Arc<dyn StateStore>) {
    let Ok(records) = store.list() else { return };
    for r in records {
        let outcome = match r.phase {
            Phase::Ready => continue,
            // The CreateVolume caller did not get an answer; it retries with
            // the same name and resumes. Creating files now is just as idempotent.
            Phase::Creating => controller
                .create(&crate::core::controller::CreateRequest {
                    name: r.name.clone(),
                    required_bytes: r.capacity_bytes,
                    limit_bytes: 0,
                    parameters: r.parameters.clone(),
                    capabilities: vec![crate::core::capability::Capability {
                        access_type: crate::core::capability::AccessType::Block,
                        mode: crate::core::capability::AccessMode::SingleNodeWriter,
                    }],
                    preferred_node: None,
                    allowed_nodes: None,
                    claim: r.claim.clone(),
                })
                .map(|_| ()),
            Phase::Deleting => controller.delete(&r.id),
        };
        if let Err(e) = outcome {
            warn!(volume_id = %r.id, error = %e.report(), "cannot finish interrupted operation");
        }
    }
}
