//! Registers the node plugin with the kubelet itself, the way the
//! node-driver-registrar sidecar would: a socket in the kubelet's
//! plugins_registry directory serving the plugin registration API. The
//! kubelet finds it (inotify), asks GetInfo for the driver name and the CSI
//! socket, and reports the outcome.

use std::path::{Path, PathBuf};

use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::core::error::{Error, Result};
use crate::proto::pluginregistration as pb;
use crate::proto::pluginregistration::registration_server::{Registration, RegistrationServer};

/// The CSI versions the node plugin serves.
pub const SUPPORTED_VERSIONS: [&str; 1] = ["1.0.0"];

pub struct RegistrationService {
    /// Path of the CSI socket, as the kubelet will dial it.
    pub csi_socket: PathBuf,
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn get_info(
        &self,
        _request: Request<pb::InfoRequest>,
    ) -> std::result::Result<Response<pb::PluginInfo>, Status> {
        Ok(Response::new(pb::PluginInfo {
            r#type: "CSIPlugin".into(),
            name: crate::DRIVER_NAME.into(),
            endpoint: self.csi_socket.display().to_string(),
            supported_versions: SUPPORTED_VERSIONS.iter().map(|v| v.to_string()).collect(),
        }))
    }

    async fn notify_registration_status(
        &self,
        request: Request<pb::RegistrationStatus>,
    ) -> std::result::Result<Response<pb::RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        if status.plugin_registered {
            info!("registered with the kubelet");
        } else {
            warn!(error = %status.error, "the kubelet refused the registration");
        }
        Ok(Response::new(pb::RegistrationStatusResponse {}))
    }
}

/// The registration socket's conventional name: `<driver>-reg.sock`.
pub fn socket_in(registry_dir: &Path) -> PathBuf {
    registry_dir.join(format!("{}-reg.sock", crate::DRIVER_NAME))
}

/// Serves the registration API in `registry_dir` until `shutdown`
/// resolves, then removes the socket: the kubelet deregisters a plugin
/// when its socket goes, and would keep retrying a stale one.
pub async fn serve_until(
    registry_dir: &Path,
    csi_socket: PathBuf,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let endpoint = format!("unix://{}", socket_in(registry_dir).display());
    let (socket, listener) = crate::edge::grpc::uds::bind_endpoint(&endpoint)?;
    info!(socket = %endpoint, "kubelet registration socket ready");
    let server = tonic::transport::Server::builder()
        .add_service(RegistrationServer::new(RegistrationService { csi_socket }))
        .serve_with_incoming(crate::edge::grpc::uds::incoming(listener));
    // Not a graceful shutdown: a client that never hangs up must not keep
    // the socket around.
    let served = tokio::select! {
        served = server => served,
        () = shutdown => Ok(()),
    };
    if let Err(e) = std::fs::remove_file(&socket)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!(socket = %socket.display(), error = %e, "cannot remove the registration socket");
    }
    served.map_err(|e| {
        Error::with_source(
            crate::core::error::ErrorKind::Internal,
            "registration server failed",
            e,
        )
    })
}
