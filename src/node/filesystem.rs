//! Filesystems on a volume's device: find out what is there, make one only
//! when nothing is, and grow it after an expansion.

use std::path::Path;
use std::process::Command;

use crate::class::FsType;
use crate::error::{Error, Result};

/// The filesystem type on `device`, or `None` when it holds no signature.
pub fn probe(device: &Path) -> Result<Option<String>> {
    let out = Command::new("blkid")
        .args(["-p", "-s", "TYPE", "-o", "value"])
        .arg(device)
        .output()
        .map_err(|e| Error::io("cannot run blkid", e))?;
    match out.status.code() {
        Some(0) => {
            let t = String::from_utf8_lossy(&out.stdout).trim().to_string();
            Ok(if t.is_empty() { None } else { Some(t) })
        }
        // blkid: 2 = nothing found.
        Some(2) => Ok(None),
        _ => Err(Error::internal(format!(
            "blkid {} failed ({}): {}",
            device.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
    }
}

/// Makes `fs` on `device` unless it already holds a filesystem, which is
/// never touched. A different filesystem than asked for is an error, not a
/// reformat: the data on it is someone's.
pub fn ensure(device: &Path, fs: FsType) -> Result<()> {
    match probe(device)? {
        Some(existing) if existing == fs.as_str() => Ok(()),
        Some(existing) => Err(Error::precondition(format!(
            "volume already holds a {existing} filesystem, but {} was requested; it is left untouched",
            fs.as_str()
        ))),
        None => {
            let mut cmd = match fs {
                // Fresh replicas are sparse, hence already zero: skip discard.
                FsType::Ext4 => {
                    let mut c = Command::new("mkfs.ext4");
                    c.args([
                        "-F",
                        "-q",
                        "-E",
                        "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
                    ]);
                    c
                }
                FsType::Xfs => {
                    let mut c = Command::new("mkfs.xfs");
                    c.args(["-f", "-q", "-K"]);
                    c
                }
            };
            let out = cmd
                .arg(device)
                .output()
                .map_err(|e| Error::io(format!("cannot run mkfs.{}", fs.as_str()), e))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(Error::internal(format!(
                    "mkfs.{} {} failed: {}",
                    fs.as_str(),
                    device.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                )))
            }
        }
    }
}

/// Grows the filesystem mounted at `mount_point` from `device` to fill it.
pub fn grow(device: &Path, mount_point: &Path) -> Result<()> {
    let fs = probe(device)?;
    let mut cmd = match fs.as_deref() {
        Some("ext4") | Some("ext3") | Some("ext2") => {
            let mut c = Command::new("resize2fs");
            c.arg(device);
            c
        }
        Some("xfs") => {
            let mut c = Command::new("xfs_growfs");
            c.arg(mount_point);
            c
        }
        other => {
            return Err(Error::precondition(format!(
                "cannot grow filesystem {other:?} on {}",
                device.display()
            )));
        }
    };
    let out = cmd
        .output()
        .map_err(|e| Error::io("cannot run filesystem resize", e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::internal(format!(
            "growing the filesystem on {} failed: {}",
            device.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}
