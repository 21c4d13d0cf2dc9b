//! The CSI gRPC surface. The only code that sees CSI protobuf types: it
//! parses requests into domain requests, runs the core off the async
//! runtime, and maps `Error` kinds to gRPC codes exactly once.
//!
//! Secrets in requests are never logged: handlers log ids and paths only.

pub mod controller;
pub mod identity;
pub mod node;
pub mod registration;
pub mod server;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tonic::{Code, Status};

use crate::core::capability::{AccessMode, AccessType, Capability};
use crate::core::class::FsType;
use crate::core::error::{Error, ErrorKind};
use crate::proto::csi as pb;

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = match e.kind {
            ErrorKind::InvalidArgument => Code::InvalidArgument,
            ErrorKind::NotFound => Code::NotFound,
            ErrorKind::AlreadyExists => Code::AlreadyExists,
            ErrorKind::ResourceExhausted => Code::ResourceExhausted,
            ErrorKind::FailedPrecondition => Code::FailedPrecondition,
            ErrorKind::OutOfRange => Code::OutOfRange,
            ErrorKind::Aborted => Code::Aborted,
            ErrorKind::Unavailable => Code::Unavailable,
            ErrorKind::Internal => Code::Internal,
        };
        Status::new(code, e.report().to_string())
    }
}

/// The volume id from a request, checked before it is a lock key or a
/// lookup: malformed is InvalidArgument; whether it exists is decided after
/// every other field has been checked, as the spec orders the codes (ids
/// Terna never makes are then simply not found).
pub(crate) fn volume_id(id: &str) -> Result<String, Status> {
    crate::core::volume::check_id_well_formed(id)?;
    Ok(id.to_string())
}

pub(crate) fn parse_capability(cap: &pb::VolumeCapability) -> Result<Capability, Status> {
    use pb::volume_capability::access_mode::Mode;
    let mode = cap
        .access_mode
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("volume capability has no access mode"))?;
    let mode = match Mode::try_from(mode.mode) {
        Ok(Mode::SingleNodeWriter) => AccessMode::SingleNodeWriter,
        Ok(Mode::SingleNodeReaderOnly) => AccessMode::SingleNodeReaderOnly,
        Ok(Mode::SingleNodeSingleWriter) => AccessMode::SingleNodeSingleWriter,
        Ok(Mode::SingleNodeMultiWriter) => AccessMode::SingleNodeMultiWriter,
        Ok(Mode::MultiNodeReaderOnly) => AccessMode::MultiNodeReaderOnly,
        Ok(Mode::MultiNodeSingleWriter) => AccessMode::MultiNodeSingleWriter,
        Ok(Mode::MultiNodeMultiWriter) => AccessMode::MultiNodeMultiWriter,
        _ => {
            return Err(Status::invalid_argument(format!(
                "volume capability access mode {} is unknown",
                mode.mode
            )));
        }
    };
    let access_type = match &cap.access_type {
        Some(pb::volume_capability::AccessType::Block(_)) => AccessType::Block,
        Some(pb::volume_capability::AccessType::Mount(m)) => {
            let fs_type = if m.fs_type.is_empty() {
                None
            } else {
                Some(FsType::parse(&m.fs_type).ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "fs_type {:?} is not supported: use ext4 or xfs",
                        m.fs_type
                    ))
                })?)
            };
            for flag in &m.mount_flags {
                if let Some(why) = mount_flag_problem(flag) {
                    return Err(Status::invalid_argument(format!(
                        "mount flag {} is not accepted: {why}",
                        crate::core::volume::shown(flag)
                    )));
                }
            }
            AccessType::Mount {
                fs_type,
                mount_flags: m.mount_flags.clone(),
            }
        }
        None => {
            return Err(Status::invalid_argument(
                "volume capability has no access type",
            ));
        }
    };
    Ok(Capability { access_type, mode })
}

/// Options that would make `mount` do something else than mount the
/// volume's filesystem at the target (bind or move another tree, change
/// propagation, run helpers, change ownership of the mount point).
const REFUSED_MOUNT_OPTIONS: &[&str] = &[
    "bind",
    "rbind",
    "move",
    "remount",
    "shared",
    "rshared",
    "slave",
    "rslave",
    "private",
    "rprivate",
    "unbindable",
    "runbindable",
    "helper",
    "uhelper",
    "owner",
    "group",
    "user",
    "users",
    "loop",
    "offset",
    "sizelimit",
    "journal_path",
    "journal_dev",
    "logdev",
    "rtdev",
    "sb",
    "norecovery",
    "abort",
];

/// Why a mount flag from a request is refused, if it is. Flags reach
/// `mount -o` joined with commas, so each comma-separated piece counts.
fn mount_flag_problem(flag: &str) -> Option<&'static str> {
    if flag.is_empty() || flag.len() > 256 {
        return Some("empty or longer than 256 bytes");
    }
    for piece in flag.split(',') {
        if piece.is_empty()
            || !piece
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_=.:/+-@".contains(&b))
        {
            return Some("only ASCII letters, digits and _=.:/+-@ may appear in mount options");
        }
        let name = piece
            .split('=')
            .next()
            .unwrap_or(piece)
            .to_ascii_lowercase();
        // errors=panic turns any I/O error on the volume into a host panic.
        let panics = name == "errors" && piece.to_ascii_lowercase().ends_with("=panic");
        if REFUSED_MOUNT_OPTIONS.contains(&name.as_str()) || name.starts_with("x-") || panics {
            return Some("it changes what is mounted or how, not the volume's filesystem options");
        }
    }
    None
}

pub(crate) fn sorted(params: &HashMap<String, String>) -> BTreeMap<String, String> {
    params.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Runs blocking core work off the async runtime, inside `span`.
pub(crate) async fn blocking<T: Send + 'static>(
    span: tracing::Span,
    f: impl FnOnce() -> crate::core::error::Result<T> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(move || span.in_scope(f))
        .await
        .map_err(|e| Status::internal(format!("operation panicked: {e}")))?
        .map_err(|e| {
            tracing::warn!(error = %e.report(), "operation failed");
            Status::from(e)
        })
}

/// One operation per volume at a time; a second one gets Aborted, as the
/// CSI spec asks, and the caller retries.
#[derive(Clone, Default)]
pub struct VolumeLocks {
    held: Arc<Mutex<HashSet<String>>>,
}

pub struct VolumeLock {
    held: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl VolumeLocks {
    pub fn try_lock(&self, key: &str) -> Result<VolumeLock, Status> {
        let mut held = self
            .held
            .lock()
            .map_err(|_| Status::internal("volume lock table poisoned"))?;
        if !held.insert(key.to_string()) {
            return Err(Status::aborted(format!(
                "an operation on {key} is already in progress"
            )));
        }
        Ok(VolumeLock {
            held: self.held.clone(),
            key: key.to_string(),
        })
    }
}

impl Drop for VolumeLock {
    fn drop(&mut self) {
        if let Ok(mut held) = self.held.lock() {
            held.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_flags_that_change_what_is_mounted_are_refused() {
        for bad in [
            "bind",
            "remount,rw",
            "noatime,bind",
            "X-mount.mkdir",
            "a b",
            "a\0",
            "",
            ",",
            "rbind",
            "helper=/bin/sh",
            "ro;rm",
        ] {
            assert!(mount_flag_problem(bad).is_some(), "{bad:?}");
        }
        for good in [
            "noatime",
            "discard",
            "data=ordered",
            "ro",
            "nodev,nosuid",
            "commit=30",
        ] {
            assert_eq!(mount_flag_problem(good), None, "{good}");
        }
    }
}
