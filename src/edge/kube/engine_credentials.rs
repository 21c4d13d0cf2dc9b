//! API credentials for the engines a node plugin starts, that stay valid
//! after the plugin's pod is gone.
//!
//! Engines outlive the pod that started them (see `host::cgroup`). Kube's
//! in-cluster configuration would have them read the pod's ServiceAccount
//! token, which is bound to that pod: the API server refuses it the moment
//! the pod is deleted, so a replica fault during a rolling update could not
//! be recorded and its write would fail. So the plugin asks for a token of
//! its ServiceAccount bound to no pod (TokenRequest, `TOKEN_LIFETIME`),
//! writes it with the pod's CA into `DATA_DIR/cluster/` beside a kubeconfig
//! naming both (`tokenFile`, which kube re-reads at least once a minute),
//! and renews it every `RENEW_EVERY`; the next plugin pod does the same,
//! while the last token stays valid. Engines and repair find that
//! kubeconfig through `cluster.json`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::warn;

use crate::core::error::{Error, Result};
use crate::datapath::host::files::{atomic_write, private_dir};

/// Where a pod's ServiceAccount credentials are mounted.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Below the data dir: root's only.
pub const CREDENTIALS_DIR: &str = "cluster";
/// How long an engines' token is valid: it must outlast the gap between
/// one plugin pod and the next (a node drained for an hour included).
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(6 * 3600);
/// Renewed well before it expires.
pub const RENEW_EVERY: Duration = Duration::from_secs(15 * 60);

/// The API server as the in-cluster environment names it, or `None`
/// outside a pod.
pub fn in_cluster_server(host: Option<&str>, port: Option<&str>) -> Option<String> {
    let (host, port) = (host?.trim(), port?.trim());
    if host.is_empty() || port.is_empty() {
        return None;
    }
    Some(if host.contains(':') {
        format!("https://[{host}]:{port}")
    } else {
        format!("https://{host}:{port}")
    })
}

/// A kubeconfig for `server` whose CA and token are the files given.
pub fn render_kubeconfig(server: &str, ca: &Path, token: &Path) -> String {
    // JSON is YAML, and serde_json quotes every string correctly.
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "in-cluster", "cluster": {
            "server": server,
            "certificate-authority": ca.display().to_string(),
        }}],
        "users": [{"name": "terna-node", "user": {"tokenFile": token.display().to_string()}}],
        "contexts": [{"name": "in-cluster", "context": {"cluster": "in-cluster", "user": "terna-node"}}],
        "current-context": "in-cluster",
    });
    config.to_string()
}

/// The engines' credentials in `data_dir`.
pub struct EngineCredentials {
    source: PathBuf,
    dir: PathBuf,
}

impl EngineCredentials {
    /// `source`: the pod's ServiceAccount mount (for its CA).
    pub fn new(source: &Path, data_dir: &Path) -> EngineCredentials {
        EngineCredentials {
            source: source.to_path_buf(),
            dir: data_dir.join(CREDENTIALS_DIR),
        }
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// Writes the CA, `token` and the kubeconfig naming them.
    pub fn write(&self, server: &str, token: &[u8]) -> Result<PathBuf> {
        private_dir(&self.dir)?;
        let ca = self.dir.join("ca.crt");
        atomic_write(&ca, &read(&self.source.join("ca.crt"))?)?;
        self.set_token(token)?;
        let kubeconfig = self.kubeconfig();
        atomic_write(
            &kubeconfig,
            render_kubeconfig(server, &ca, &self.dir.join("token")).as_bytes(),
        )?;
        Ok(kubeconfig)
    }

    pub fn set_token(&self, token: &[u8]) -> Result<()> {
        atomic_write(&self.dir.join("token"), token)
    }
}

/// A token of ServiceAccount `namespace/name` bound to no pod.
pub async fn issue_token(client: &kube::Client, namespace: &str, name: &str) -> Result<Vec<u8>> {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::ServiceAccount;
    let api: kube::Api<ServiceAccount> = kube::Api::namespaced(client.clone(), namespace);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: Vec::new(),
            expiration_seconds: Some(TOKEN_LIFETIME.as_secs() as i64),
            bound_object_ref: None,
        },
        ..Default::default()
    };
    let issued = api
        .create_token_request(name, &Default::default(), &request)
        .await
        .map_err(|e| {
            Error::new(
                crate::core::error::ErrorKind::Unavailable,
                format!(
                    "cannot issue a token of ServiceAccount {namespace}/{name} for the engines: {e}"
                ),
            )
        })?;
    issued
        .status
        .map(|s| s.token.into_bytes())
        .ok_or_else(|| Error::internal("the TokenRequest came back without a token"))
}

/// Renews the engines' token for as long as this process runs.
pub fn keep_fresh(creds: EngineCredentials, client: kube::Client, namespace: String, name: String) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(RENEW_EVERY).await;
            let renewed = issue_token(&client, &namespace, &name)
                .await
                .and_then(|t| creds.set_token(&t));
            if let Err(e) = renewed {
                warn!(error = %e.report(), "cannot renew the engines' API token");
            }
        }
    });
}

/// In a pod: the engines' own API credentials, outliving this pod (see
/// `edge::kube::engine_credentials`); `None` outside one.
pub async fn install(
    client: &kube::Client,
    data_dir: &Path,
    namespace: &str,
    service_account: Option<&str>,
) -> Result<Option<PathBuf>> {
    let host = std::env::var("KUBERNETES_SERVICE_HOST").ok();
    let port = std::env::var("KUBERNETES_SERVICE_PORT").ok();
    let Some(server) = in_cluster_server(host.as_deref(), port.as_deref()) else {
        return Ok(None);
    };
    let Some(name) = service_account else {
        return Err(Error::invalid(
            "in a pod, terna node needs --service-account (SERVICE_ACCOUNT_NAME): engines get a token of it that outlives the pod",
        ));
    };
    let creds = EngineCredentials::new(Path::new(SERVICE_ACCOUNT_DIR), data_dir);
    let token = issue_token(client, namespace, name).await?;
    let kubeconfig = creds.write(&server, &token)?;
    keep_fresh(
        creds,
        client.clone(),
        namespace.to_string(),
        name.to_string(),
    );
    Ok(Some(kubeconfig))
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(format!("cannot read {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_server_comes_from_the_service_environment() {
        assert_eq!(
            in_cluster_server(Some("10.96.0.1"), Some("443")).as_deref(),
            Some("https://10.96.0.1:443")
        );
        assert_eq!(
            in_cluster_server(Some("fd00::1"), Some("443")).as_deref(),
            Some("https://[fd00::1]:443")
        );
        assert_eq!(in_cluster_server(None, Some("443")), None);
        assert_eq!(in_cluster_server(Some("10.96.0.1"), Some("")), None);
    }

    #[test]
    fn the_kubeconfig_names_the_copies() {
        let text = render_kubeconfig(
            "https://10.96.0.1:443",
            Path::new("/d/cluster/ca.crt"),
            Path::new("/d/cluster/token"),
        );
        let config = kube::config::Kubeconfig::from_yaml(&text).unwrap();
        let cluster = config.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://10.96.0.1:443"));
        assert_eq!(
            cluster.certificate_authority.as_deref(),
            Some("/d/cluster/ca.crt")
        );
        let user = config.auth_infos[0].auth_info.as_ref().unwrap();
        assert_eq!(user.token_file.as_deref(), Some("/d/cluster/token"));
        assert_eq!(config.current_context.as_deref(), Some("in-cluster"));
    }

    #[test]
    fn credentials_are_private_files() {
        let source = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        std::fs::write(source.path().join("ca.crt"), "CA").unwrap();
        let creds = EngineCredentials::new(source.path(), data.path());
        let kubeconfig = creds.write("https://10.96.0.1:443", b"first").unwrap();
        assert!(kubeconfig.exists());
        let dir = data.path().join(CREDENTIALS_DIR);
        assert_eq!(std::fs::read_to_string(dir.join("token")).unwrap(), "first");
        assert_eq!(std::fs::read_to_string(dir.join("ca.crt")).unwrap(), "CA");
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(
            std::fs::metadata(dir.join("token"))
                .unwrap()
                .permissions()
                .mode()
                & 0o077,
            0
        );
        creds.set_token(b"renewed").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("token")).unwrap(),
            "renewed"
        );
    }
}
