//! The host's name: the node id a role runs as when it is given none, as
//! the kubelet names the node by default.

use crate::core::error::{Error, Result};

pub fn hostname() -> Result<String> {
    let name =
        nix::unistd::gethostname().map_err(|e| Error::io("cannot read the hostname", e.into()))?;
    Ok(name.to_string_lossy().into_owned())
}

/// `given`, or else the hostname.
pub fn node_id(given: Option<String>) -> Result<String> {
    match given {
        Some(id) => Ok(id),
        None => hostname(),
    }
}
