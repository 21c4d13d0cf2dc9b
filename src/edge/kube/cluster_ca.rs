//! The cluster CA kept in a Secret (`terna controller --cluster-ca-secret
//! NAME`, key `ca.json`): created by the controller when absent, rotated by
//! it on `ca::Schedule` (stage, promote, retire, each a conditional update
//! of the Secret, so two controllers never both take a step), and mounted
//! by the node DaemonSet as the nodes' `cluster_ca_file`, which each node
//! copies into its data dir for its agent and engines (`tls::store`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use tracing::{info, warn};

use crate::core::error::{Error, ErrorKind, Result};
use crate::datapath::tls::Identity;
use crate::datapath::tls::ca::{CA_LIFETIME, CaSet, Schedule};

/// The Secret's key: the file name of the nodes' mount of it.
pub const CA_KEY: &str = "ca.json";
/// How often the controller reads the Secret again (and checks the schedule).
const REFRESH_EVERY: Duration = Duration::from_secs(30);

fn api_error(context: String, e: kube::Error) -> Error {
    let kind = match &e {
        kube::Error::Api(s) if s.code < 500 && s.code != 429 => ErrorKind::FailedPrecondition,
        _ => ErrorKind::Unavailable,
    };
    Error::with_source(
        kind,
        format!(
            "{context} (the cluster CA, --cluster-ca-secret; the controller's Role must allow get, create and update on it)"
        ),
        e,
    )
}

fn set_of(secret: &Secret, namespace: &str, name: &str) -> Result<CaSet> {
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(CA_KEY))
        .ok_or_else(|| {
            Error::precondition(format!(
                "Secret {namespace}/{name} (the cluster CA) has no key `{CA_KEY}`; delete it so the controller makes a new CA"
            ))
        })?;
    Ok(CaSet::from_json(&bytes.0)?)
}

fn secret_of(namespace: &str, name: &str, set: &CaSet) -> Result<Secret> {
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/name".to_string(),
                "terna".to_string(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_string()),
        data: Some(BTreeMap::from([(
            CA_KEY.to_string(),
            ByteString(set.to_json()?),
        )])),
        ..Secret::default()
    })
}

/// The CA set in Secret `namespace/name`, made first when there is none
/// (a controller that loses the race to create it reads the winner's).
pub async fn get_or_create(client: kube::Client, namespace: &str, name: &str) -> Result<CaSet> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let get = |e| api_error(format!("cannot get Secret {namespace}/{name}"), e);
    if let Some(secret) = api.get_opt(name).await.map_err(get)? {
        return set_of(&secret, namespace, name);
    }
    let set = CaSet::create(crate::datapath::tls::unix_now(), CA_LIFETIME)?;
    match api
        .create(&PostParams::default(), &secret_of(namespace, name, &set)?)
        .await
    {
        Ok(_) => {
            info!(secret = name, namespace, ca = %set.current.name, "made the cluster CA into a new Secret");
            Ok(set)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => match api.get_opt(name).await.map_err(get)? {
            Some(secret) => set_of(&secret, namespace, name),
            None => Err(Error::new(
                ErrorKind::Unavailable,
                format!("Secret {namespace}/{name} was created and deleted again meanwhile"),
            )),
        },
        Err(e) => Err(api_error(
            format!("cannot create Secret {namespace}/{name}"),
            e,
        )),
    }
}

/// One refresh: the Secret read, a due rotation step written back
/// (conditional on what was read), and the result handed to `identity`.
async fn refresh(
    api: &Api<Secret>,
    namespace: &str,
    name: &str,
    identity: &Identity,
    schedule: &Schedule,
) -> Result<()> {
    let secret = api
        .get(name)
        .await
        .map_err(|e| api_error(format!("cannot get Secret {namespace}/{name}"), e))?;
    let mut set = set_of(&secret, namespace, name)?;
    let now = crate::datapath::tls::unix_now();
    if let Some(step) = set.due(now, schedule) {
        let rotated = set.rotated(step, now, schedule.ca_lifetime)?;
        let mut update = secret_of(namespace, name, &rotated)?;
        update.metadata.resource_version = secret.metadata.resource_version.clone();
        match api.replace(name, &PostParams::default(), &update).await {
            Ok(_) => {
                info!(?step, ca = %rotated.current.name, "cluster CA rotated");
                set = rotated;
            }
            // Another controller changed it first: next round reads theirs.
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => {
                return Err(api_error(
                    format!("cannot update Secret {namespace}/{name}"),
                    e,
                ));
            }
        }
    }
    identity.replace(set);
    Ok(())
}

/// `me`'s TLS identity from the CA in Secret `namespace/name` (made when
/// absent), kept on the Secret, which it rotates when due, for as long as
/// the process runs.
pub async fn followed(
    client: kube::Client,
    namespace: &str,
    name: &str,
    me: &str,
) -> Result<Arc<Identity>> {
    let set = get_or_create(client.clone(), namespace, name).await?;
    let identity = Identity::in_memory(me, set);
    tokio::spawn(keep_current(
        client,
        namespace.to_string(),
        name.to_string(),
        identity.clone(),
    ));
    Ok(identity)
}

/// Keeps `identity` on the Secret's CA set and rotates it when due, until
/// the process ends.
async fn keep_current(
    client: kube::Client,
    namespace: String,
    name: String,
    identity: Arc<Identity>,
) {
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    let schedule = Schedule::default();
    loop {
        tokio::time::sleep(REFRESH_EVERY).await;
        if let Err(e) = refresh(&api, &namespace, &name, &identity, &schedule).await {
            warn!(error = %e.report(), "cannot refresh the cluster CA; keeping the last one");
        }
    }
}
