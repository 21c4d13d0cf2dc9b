//! The Kubernetes client every cluster role and the CLI start from.

use crate::core::error::{Error, ErrorKind, Result};

/// A client from `kubeconfig`, or the usual places (KUBECONFIG, in-cluster).
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client> {
    let unavailable = |what: String| Error::new(ErrorKind::Unavailable, what);
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| unavailable(format!("cannot read {}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| unavailable(format!("kubeconfig {}: {e}", path.display())))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| unavailable(format!("no Kubernetes configuration found: {e}")))?,
    };
    kube::Client::try_from(config)
        .map_err(|e| unavailable(format!("cannot build a Kubernetes client: {e}")))
}
