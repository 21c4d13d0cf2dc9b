//! The one CSI gRPC server every role serves through: Identity always,
//! Controller and Node as the role has them, on a `unix://` endpoint whose
//! connections come from [`uds::incoming`].

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::UnixListener;
use tracing::info;

use crate::core::controller::ControllerCore;
use crate::core::error::{Error, ErrorKind, Result};
use crate::datapath::node::NodeCore;
use crate::edge::csi::VolumeLocks;
use crate::edge::csi::controller::ControllerService;
use crate::edge::csi::identity::IdentityService;
use crate::edge::csi::node::NodeService;
use crate::edge::grpc::uds;
use crate::proto::csi::controller_server::ControllerServer;
use crate::proto::csi::identity_server::IdentityServer;
use crate::proto::csi::node_server::NodeServer;

/// The CSI Controller side: the core, and the node its volumes are
/// reachable from when there is only one (standalone).
pub struct Controller {
    pub core: Arc<ControllerCore>,
    pub topology_node: Option<String>,
}

/// What an endpoint serves besides Identity.
pub struct Services {
    pub controller: Option<Controller>,
    pub node: Option<Arc<NodeCore>>,
}

/// A bound endpoint, not yet serving: binding first lets a role fail on a
/// taken endpoint before it starts anything else.
pub struct Endpoint {
    endpoint: String,
    socket: PathBuf,
    listener: UnixListener,
}

impl Endpoint {
    pub fn bind(endpoint: &str) -> Result<Endpoint> {
        let (socket, listener) = uds::bind_endpoint(endpoint)?;
        Ok(Endpoint {
            endpoint: endpoint.to_string(),
            socket,
            listener,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Serves until `stop` resolves and the clients have hung up.
    pub async fn serve(self, services: Services, stop: impl Future<Output = ()>) -> Result<()> {
        // One table for both sides: standalone's Controller and Node must
        // not work on one volume at once either.
        let locks = VolumeLocks::default();
        let identity = IdentityService {
            controller: services.controller.is_some(),
        };
        let controller = services.controller.map(|c| {
            ControllerServer::new(ControllerService {
                core: c.core,
                topology_node: c.topology_node,
                locks: locks.clone(),
            })
        });
        let node = services
            .node
            .map(|core| NodeServer::new(NodeService { core, locks }));
        info!(
            endpoint = %self.endpoint,
            controller = controller.is_some(),
            node = node.is_some(),
            "serving CSI"
        );
        tonic::transport::Server::builder()
            .add_service(IdentityServer::new(identity))
            .add_optional_service(controller)
            .add_optional_service(node)
            .serve_with_incoming_shutdown(uds::incoming(self.listener), stop)
            .await
            .map_err(|e| Error::with_source(ErrorKind::Internal, "gRPC server failed", e))
    }
}
