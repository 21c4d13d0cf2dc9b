//! One process's TLS identity: a leaf certificate for its name, issued by
//! the process itself from the cluster CA's current signer and kept only
//! in memory, and the rustls configurations built from it and the trusted
//! CAs. Each new connection asks for the configurations; they are rebuilt
//! when the CA set changes (the file is looked at at most once a second)
//! and when the leaf is at half its life. Connections already made keep
//! the configuration they were made with.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::TlsError;
use super::ca::{self, CaSet};

/// How often the CA file is looked at for a change.
const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// Where the CA set comes from.
enum Source {
    /// A CA file, reloaded when it changes.
    File(PathBuf),
    /// A set handed over by the process (the controller's Secret), with a
    /// count of hand-overs.
    Memory(Box<Mutex<(CaSet, u64)>>),
}

/// What says whether the source changed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stamp {
    File {
        dev: u64,
        ino: u64,
        mtime_ns: i128,
        len: u64,
    },
    Memory(u64),
}

/// The configurations for new connections, both directions.
#[derive(Clone)]
pub struct Configs {
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
}

struct Loaded {
    stamp: Stamp,
    set: CaSet,
    renew_at: i64,
    checked: Instant,
    configs: Configs,
}

pub struct Identity {
    name: String,
    source: Source,
    loaded: Mutex<Option<Loaded>>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn pem_certs(pem: &str) -> Result<CertificateDer<'static>, TlsError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem(e.to_string()))
}

/// The configurations presenting `leaf` and trusting `set`'s CAs. TLS 1.3
/// only; no session resumption, so every connection is a full handshake
/// checked against the CAs trusted when it is made.
fn build(set: &CaSet, leaf: &ca::Leaf) -> Result<Configs, TlsError> {
    let mut roots = RootCertStore::empty();
    for pem in set.trusted() {
        roots.add(pem_certs(pem)?).map_err(TlsError::Config)?;
    }
    let roots = Arc::new(roots);
    let chain = vec![CertificateDer::from(leaf.cert_der.clone())];
    let key = || PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_der.clone()));
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))?;
    let mut server = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key())
        .map_err(TlsError::Config)?;
    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    server.send_tls13_tickets = 0;
    let mut client = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key())
        .map_err(TlsError::Config)?;
    client.resumption = rustls::client::Resumption::disabled();
    Ok(Configs {
        server: Arc::new(server),
        client: Arc::new(client),
    })
}

impl Identity {
    /// The name is checked when a certificate is first issued for it, so a
    /// process that never dials an agent never needs a name fit for one.
    fn with_source(name: &str, source: Source) -> Arc<Identity> {
        Arc::new(Identity {
            name: name.to_string(),
            source,
            loaded: Mutex::new(None),
        })
    }

    /// `name`'s identity from the CA file `path`, read when first needed.
    pub fn from_file(name: &str, path: PathBuf) -> Arc<Identity> {
        Identity::with_source(name, Source::File(path))
    }

    /// `name`'s identity from a CA set the process keeps (`replace` hands
    /// over a new one).
    pub fn in_memory(name: &str, set: CaSet) -> Arc<Identity> {
        Identity::with_source(name, Source::Memory(Box::new(Mutex::new((set, 0)))))
    }

    /// Uses `set` from the next connection on (in-memory identities only).
    pub fn replace(&self, set: CaSet) {
        if let Source::Memory(m) = &self.source {
            let mut held = m.lock().unwrap_or_else(|p| p.into_inner());
            if held.0 != set {
                *held = (set, held.1 + 1);
            }
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name `identity`'s certificate must carry, as a TLS server name.
    pub fn server_name(identity: &str) -> Result<ServerName<'static>, TlsError> {
        ServerName::try_from(ca::dns_name(identity)?)
            .map_err(|_| TlsError::BadIdentity(identity.to_string()))
    }

    fn stamp(&self) -> Result<Stamp, TlsError> {
        match &self.source {
            Source::File(path) => {
                use std::os::unix::fs::MetadataExt;
                let m = std::fs::metadata(path).map_err(|source| TlsError::Read {
                    path: path.clone(),
                    source,
                })?;
                Ok(Stamp::File {
                    dev: m.dev(),
                    ino: m.ino(),
                    mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
                    len: m.len(),
                })
            }
            Source::Memory(m) => Ok(Stamp::Memory(m.lock().unwrap_or_else(|p| p.into_inner()).1)),
        }
    }

    fn read(&self) -> Result<CaSet, TlsError> {
        match &self.source {
            Source::File(path) => super::store::load(path),
            Source::Memory(m) => Ok(m.lock().unwrap_or_else(|p| p.into_inner()).0.clone()),
        }
    }

    fn issue(&self, set: CaSet, stamp: Stamp) -> Result<Loaded, TlsError> {
        let now = super::unix_now();
        let leaf = ca::issue_leaf(&set.current, &self.name, now, ca::LEAF_LIFETIME)?;
        let configs = build(&set, &leaf)?;
        Ok(Loaded {
            stamp,
            renew_at: now + (leaf.not_after - now) / 2,
            set,
            checked: Instant::now(),
            configs,
        })
    }

    /// The configurations for a connection made now. A CA source that
    /// turns unreadable after it was read once keeps the last good
    /// configurations (with a warning), so a bad copy does not stop I/O.
    pub fn configs(&self) -> Result<Configs, TlsError> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        let now = super::unix_now();
        if let Some(l) = loaded.as_ref()
            && l.checked.elapsed() < RELOAD_EVERY
            && now < l.renew_at
        {
            return Ok(l.configs.clone());
        }
        let fresh = self.stamp().and_then(|stamp| match loaded.as_ref() {
            Some(l) if l.stamp == stamp && now < l.renew_at => Ok(None),
            Some(l) if l.stamp == stamp => self.issue(l.set.clone(), stamp).map(Some),
            _ => {
                let set = self.read()?;
                match loaded.as_ref() {
                    // Touched but the same: the leaf stays.
                    Some(l) if l.set == set && now < l.renew_at => Ok(Some(Loaded {
                        stamp,
                        set,
                        renew_at: l.renew_at,
                        checked: Instant::now(),
                        configs: l.configs.clone(),
                    })),
                    _ => {
                        let l = self.issue(set, stamp)?;
                        tracing::info!(identity = %self.name, ca = %l.set.current.name,
                            trusted = l.set.trusted().len(), "TLS identity issued from the cluster CA");
                        Ok(Some(l))
                    }
                }
            }
        });
        match (fresh, loaded.as_mut()) {
            (Ok(Some(l)), _) => {
                let configs = l.configs.clone();
                *loaded = Some(l);
                Ok(configs)
            }
            (Ok(None), Some(l)) => {
                l.checked = Instant::now();
                Ok(l.configs.clone())
            }
            (Err(e), Some(l)) => {
                tracing::warn!(identity = %self.name, error = %e,
                    "cannot reload the cluster CA; new connections keep the last good one");
                l.checked = Instant::now();
                Ok(l.configs.clone())
            }
            (Err(e), None) => Err(e),
            (Ok(None), None) => Err(TlsError::Decode("no CA set loaded".into())),
        }
    }
}

/// Whether `cert` (a peer's leaf, DER, already verified against the CAs)
/// is `identity`'s.
pub fn names(cert: &CertificateDer<'_>, identity: &str) -> bool {
    let Ok(name) = Identity::server_name(identity) else {
        return false;
    };
    webpki::EndEntityCert::try_from(cert)
        .and_then(|c| c.verify_is_valid_for_subject_name(&name))
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_ca_file_gives_new_configurations_and_a_broken_one_keeps_the_old() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("ca.json");
        super::super::store::ensure(&file).expect("ca");
        let id = Identity::from_file("n1", file.clone());
        let first = id.configs().expect("configs");
        let again = id.configs().expect("configs");
        assert!(Arc::ptr_eq(&first.client, &again.client), "cached");
        super::super::store::rotate(&file, None, &ca::Schedule::default()).expect("stage");
        std::thread::sleep(RELOAD_EVERY + Duration::from_millis(100));
        let staged = id.configs().expect("configs");
        assert!(!Arc::ptr_eq(&first.client, &staged.client), "reloaded");
        std::fs::write(&file, b"garbage").expect("write");
        std::thread::sleep(RELOAD_EVERY + Duration::from_millis(100));
        let kept = id.configs().expect("the last good configurations");
        assert!(Arc::ptr_eq(&staged.client, &kept.client));
    }

    #[test]
    fn a_name_unfit_for_a_certificate_fails_only_when_one_is_needed() {
        let set = CaSet::create(super::super::unix_now(), ca::CA_LIFETIME).expect("ca");
        let id = Identity::in_memory("not a dns name", set);
        assert!(matches!(id.configs(), Err(TlsError::BadIdentity(_))));
    }

    #[test]
    fn a_certificate_names_only_its_own_identity() {
        let set = CaSet::create(super::super::unix_now(), ca::CA_LIFETIME).expect("ca");
        let leaf = ca::issue_leaf(
            &set.current,
            "n1",
            super::super::unix_now(),
            ca::LEAF_LIFETIME,
        )
        .expect("leaf");
        let der = CertificateDer::from(leaf.cert_der);
        assert!(names(&der, "n1"));
        assert!(!names(&der, "n2"));
    }
}
