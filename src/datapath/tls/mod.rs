//! Mutual TLS for replica agent connections: the cluster CA (`ca`, pure),
//! where it is kept (`store`: a private file, created once), and each
//! process's own identity (`identity`: a leaf certificate it issues itself
//! from the current CA, renewed at half-life, and the rustls configurations
//! built from it, rebuilt when the CA set changes).

pub mod ca;
pub mod identity;
pub mod store;

pub use identity::Identity;

/// What can go wrong making, reading or using certificates.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0:?} cannot name a certificate: identities must be DNS labels")]
    BadIdentity(String),
    #[error("cannot make a certificate: {0}")]
    Issue(#[source] rcgen::Error),
    #[error("no randomness for a certificate serial: {0}")]
    Random(String),
    #[error("bad certificate time: {0}")]
    Time(String),
    #[error("the CA set is unreadable: {0}")]
    Decode(String),
    #[error("the CA set holds a bad certificate or key: {0}")]
    Pem(String),
    #[error("rotation step {0:?} is out of order: the next step is {1:?}")]
    OutOfOrder(ca::Step, ca::Step),
    #[error("cannot configure TLS: {0}")]
    Config(#[source] rustls::Error),
    #[error("cannot read the cluster CA {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the cluster CA {path}: {message}")]
    Write {
        path: std::path::PathBuf,
        message: String,
    },
}

impl From<TlsError> for crate::core::error::Error {
    fn from(e: TlsError) -> Self {
        use crate::core::error::{Error, ErrorKind};
        let kind = match &e {
            TlsError::BadIdentity(_) => ErrorKind::InvalidArgument,
            TlsError::Read { .. } | TlsError::Decode(_) | TlsError::Pem(_) => {
                ErrorKind::FailedPrecondition
            }
            TlsError::OutOfOrder(..) => ErrorKind::FailedPrecondition,
            _ => ErrorKind::Internal,
        };
        Error::with_source(kind, "cluster CA", e)
    }
}

/// Unix seconds now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
