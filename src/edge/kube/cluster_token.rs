//! The cluster token kept in a Secret (`terna controller
//! --cluster-token-secret NAME`), so an install needs no token of its own:
//! the controller reads the Secret at start and, when it does not exist
//! yet, creates it with a random token. The node DaemonSet mounts the same
//! Secret as a file (`cluster_token_file`), so both sides share it.
//!
//! Two controllers starting at once both find no Secret; the create of
//! one fails with AlreadyExists, and it reads the winner's. A Secret an
//! admin made first is used as it is, after the same checks as a token
//! file (`config::check_cluster_token`).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use tracing::{info, warn};

use crate::core::config::check_cluster_token;
use crate::core::error::{Error, ErrorKind, Result};

/// The Secret's key holding the token: the file name node.yaml's mount of
/// it gives the nodes' `cluster_token_file`.
pub const TOKEN_KEY: &str = "token";
/// Random bytes in a generated token; it is stored hex-encoded, twice as long.
pub const GENERATED_TOKEN_BYTES: usize = 32;
/// The annotation on a generated Secret saying where it came from.
pub const GENERATED_ANNOTATION: &str = "terna.dev/generated-by";

/// Transient failures (connection refused, 5xx, 429) are retried this many
/// times at start before the controller gives up and exits.
const ATTEMPTS: u32 = 5;

/// The token in Secret `namespace/name`, created with a random one first
/// when the Secret does not exist.
pub async fn get_or_create(client: kube::Client, namespace: &str, name: &str) -> Result<Vec<u8>> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let mut attempt = 1;
    loop {
        match get_or_create_once(&api, namespace, name).await {
            Err(Attempt::Transient(e)) if attempt < ATTEMPTS => {
                warn!(error = %e.report(), attempt, "cannot reach the cluster token Secret yet; retrying");
                tokio::time::sleep(Duration::from_secs(u64::from(attempt))).await;
                attempt += 1;
            }
            Err(Attempt::Transient(e) | Attempt::Final(e)) => return Err(e),
            Ok(token) => return Ok(token),
        }
    }
}

enum Attempt {
    Transient(Error),
    Final(Error),
}

async fn get_or_create_once(
    api: &Api<Secret>,
    namespace: &str,
    name: &str,
) -> Result<Vec<u8>, Attempt> {
    let get = |e| {
        api_error(
            format!("cannot get Secret {namespace}/{name}"),
            namespace,
            name,
            e,
        )
    };
    if let Some(secret) = api.get_opt(name).await.map_err(get)? {
        info!(
            secret = name,
            namespace, "cluster token from the existing Secret"
        );
        return token_from_secret(&secret, namespace, name).map_err(Attempt::Final);
    }
    let token = random_token().map_err(Attempt::Final)?;
    let secret = generated_secret(namespace, name, &token);
    match api.create(&PostParams::default(), &secret).await {
        Ok(created) => {
            info!(
                secret = name,
                namespace, "generated the cluster token into a new Secret"
            );
            token_from_secret(&created, namespace, name).map_err(Attempt::Final)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            // Another controller created it between our get and create.
            info!(
                secret = name,
                namespace, "the cluster token Secret was created meanwhile; reading it"
            );
            match api.get_opt(name).await.map_err(get)? {
                Some(secret) => token_from_secret(&secret, namespace, name).map_err(Attempt::Final),
                None => Err(Attempt::Transient(Error::new(
                    ErrorKind::Unavailable,
                    format!("Secret {namespace}/{name} was created and deleted again meanwhile"),
                ))),
            }
        }
        Err(e) => Err(api_error(
            format!("cannot create Secret {namespace}/{name}"),
            namespace,
            name,
            e,
        )),
    }
}

/// A refused request is final (with what the controller's Role must
/// allow); a connection failure, a server error or throttling is retried.
fn api_error(context: String, namespace: &str, name: &str, e: kube::Error) -> Attempt {
    match &e {
        kube::Error::Api(s) if s.code == 403 => Attempt::Final(Error::with_source(
            ErrorKind::FailedPrecondition,
            format!(
                "{context} (the cluster token, --cluster-token-secret): forbidden; the controller's Role in {namespace} must allow get on Secret {name} and create on secrets (deploy/rbac-controller.yaml)"
            ),
            e,
        )),
        kube::Error::Api(s) if s.code < 500 && s.code != 429 => Attempt::Final(Error::with_source(
            ErrorKind::FailedPrecondition,
            format!("{context} (the cluster token, --cluster-token-secret)"),
            e,
        )),
        _ => Attempt::Transient(Error::with_source(
            ErrorKind::Unavailable,
            format!("{context} (the cluster token, --cluster-token-secret)"),
            e,
        )),
    }
}

/// What to do about a Secret whose token is missing or refused.
fn replace_hint(namespace: &str, name: &str) -> String {
    format!(
        "put a token of your own in it (`openssl rand -hex 32 > token && kubectl create secret generic {name} -n {namespace} --from-file={TOKEN_KEY}=token --dry-run=client -o yaml | kubectl apply -f -`) or delete it so the controller generates one, then restart the terna controller and node pods"
    )
}

/// The token in a Secret's `token` key, checked as a token file is.
pub fn token_from_secret(secret: &Secret, namespace: &str, name: &str) -> Result<Vec<u8>> {
    let Some(value) = secret.data.as_ref().and_then(|d| d.get(TOKEN_KEY)) else {
        return Err(Error::precondition(format!(
            "Secret {namespace}/{name} (the cluster token, --cluster-token-secret) has no key `{TOKEN_KEY}`; {}",
            replace_hint(namespace, name)
        )));
    };
    match check_cluster_token(&value.0) {
        Ok(token) => Ok(token.to_vec()),
        Err(problem) => Err(Error::precondition(format!(
            "Secret {namespace}/{name} (the cluster token, --cluster-token-secret): its key `{TOKEN_KEY}` {problem}; {}",
            replace_hint(namespace, name)
        ))),
    }
}

/// The Secret the controller creates when there is none: `token` holding
/// `token`, labelled as Terna's, annotated with where it came from and how
/// to replace it.
pub fn generated_secret(namespace: &str, name: &str, token: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/name".to_string(),
                "terna".to_string(),
            )])),
            annotations: Some(BTreeMap::from([(
                GENERATED_ANNOTATION.to_string(),
                format!(
                    "terna controller, because the Secret did not exist: {GENERATED_TOKEN_BYTES} random bytes, hex-encoded. To use your own token instead: openssl rand -hex 32 > token && kubectl create secret generic {name} -n {namespace} --from-file={TOKEN_KEY}=token --dry-run=client -o yaml | kubectl apply -f - ; then restart the terna controller and node pods."
                ),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_string()),
        data: Some(BTreeMap::from([(
            TOKEN_KEY.to_string(),
            ByteString(token.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    }
}

/// `GENERATED_TOKEN_BYTES` from the operating system's CSPRNG, hex-encoded.
fn random_token() -> Result<String> {
    let mut bytes = [0u8; GENERATED_TOKEN_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| {
        Error::internal(format!(
            "cannot read the operating system's random source for the cluster token: {e}"
        ))
    })?;
    Ok(hex(&bytes))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|b| [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 15)]])
        .map(char::from)
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn secret_with(data: Option<&[(&str, &[u8])]>) -> Secret {
        Secret {
            data: data.map(|d| {
                d.iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
                    .collect()
            }),
            ..Secret::default()
        }
    }

    #[test]
    fn hex_is_two_lowercase_digits_a_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(hex(&[]), "");
    }

    #[test]
    fn a_random_token_is_64_hex_digits_and_new_each_time() {
        let a = random_token().unwrap();
        let b = random_token().unwrap();
        assert_eq!(a.len(), 2 * GENERATED_TOKEN_BYTES);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
            "{a}"
        );
        assert_ne!(a, b);
        assert!(check_cluster_token(a.as_bytes()).is_ok());
    }

    #[test]
    fn the_generated_secret_is_opaque_labelled_annotated_and_holds_the_token() {
        let s = generated_secret("terna-system", "terna-cluster-token", "ab12");
        assert_eq!(s.metadata.name.as_deref(), Some("terna-cluster-token"));
        assert_eq!(s.metadata.namespace.as_deref(), Some("terna-system"));
        assert_eq!(s.type_.as_deref(), Some("Opaque"));
        assert_eq!(
            s.metadata.labels.as_ref().unwrap()["app.kubernetes.io/name"],
            "terna"
        );
        let note = &s.metadata.annotations.as_ref().unwrap()[GENERATED_ANNOTATION];
        assert!(note.starts_with("terna controller"), "{note}");
        assert!(
            note.contains("kubectl create secret generic terna-cluster-token -n terna-system --from-file=token="),
            "{note}"
        );
        assert_eq!(s.data.as_ref().unwrap()[TOKEN_KEY].0, b"ab12");
        assert!(s.string_data.is_none() && s.immutable.is_none());
        // What the controller then reads back from it.
        let token = "0123456789abcdef0123456789abcdef";
        let s = generated_secret("ns", "n", token);
        assert_eq!(token_from_secret(&s, "ns", "n").unwrap(), token.as_bytes());
    }

    #[test]
    fn a_good_token_is_read_without_surrounding_whitespace() {
        let s = secret_with(Some(&[("token", b"0123456789abcdef\n"), ("other", b"x")]));
        assert_eq!(
            token_from_secret(&s, "ns", "tok").unwrap(),
            b"0123456789abcdef"
        );
    }

    #[test]
    fn a_secret_without_the_key_or_with_a_bad_token_is_refused_naming_it_and_what_to_do() {
        let cases: [(Secret, &str); 5] = [
            (secret_with(None), "has no key `token`"),
            (
                secret_with(Some(&[("tokn", b"0123456789abcdef")])),
                "has no key `token`",
            ),
            (
                secret_with(Some(&[("token", b"short\n")])),
                "5 bytes, fewer than the 16",
            ),
            (
                secret_with(Some(&[("token", b"")])),
                "0 bytes, fewer than the 16",
            ),
            (
                secret_with(Some(&[(
                    "token",
                    b"REPLACE-ME-with-the-output-of-openssl-rand-hex-32",
                )])),
                "placeholder",
            ),
        ];
        for (secret, why) in cases {
            let err =
                token_from_secret(&secret, "terna-system", "terna-cluster-token").unwrap_err();
            assert_eq!(err.kind, ErrorKind::FailedPrecondition);
            let m = &err.message;
            assert!(m.contains("Secret terna-system/terna-cluster-token"), "{m}");
            assert!(m.contains(why), "{m}");
            assert!(m.contains("openssl rand -hex 32"), "{m}");
            assert!(
                m.contains("delete it so the controller generates one"),
                "{m}"
            );
        }
    }
}
