//! Filesystems on a volume's device: find out what is there, make one only
//! when nothing is, and grow it after an expansion.

use std::path::Path;
use std::process::Command;

use crate::core::class::FsType;
use crate::core::error::{Error, Result};

/// What `device` holds: its filesystem type, or (with no filesystem) its
/// partition table as `"<type> partition table"`; `None` when it holds no
/// signature at all, the only case in which it may be formatted.
pub fn probe(device: &Path) -> Result<Option<String>> {
    let out = Command::new("blkid")
        .args(["-p", "-o", "export"])
        .arg(device)
        .output()
        .map_err(|e| Error::io("cannot run blkid", e))?;
    match out.status.code() {
        Some(0) => Ok(signature(&String::from_utf8_lossy(&out.stdout))),
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

/// The signature named in `blkid -o export` output. A device Block-mode
/// users partitioned has a PTTYPE and no TYPE; it is someone's data too.
fn signature(export: &str) -> Option<String> {
    let value = |key: &str| {
        export
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    if let Some(fs) = value("TYPE") {
        return Some(fs.to_string());
    }
    value("PTTYPE").map(|pt| format!("{pt} partition table"))
}

/// Makes `fs` on `device` unless it already holds a filesystem, which is
/// never touched. A different filesystem than asked for is an error, not a
/// reformat: the data on it is someone's.
pub fn ensure(device: &Path, fs: FsType) -> Result<()> {
    match probe(device)? {
        Some(existing) if existing == fs.as_str() => Ok(()),
        Some(existing) => Err(Error::precondition(format!(
            "volume already holds {existing}, but a {} filesystem was requested; it is left untouched",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_table_is_a_signature_and_nothing_is_none() {
        assert_eq!(
            signature("DEVNAME=/dev/loop3\nTYPE=ext4\nUUID=x\n").as_deref(),
            Some("ext4")
        );
        assert_eq!(
            signature("DEVNAME=/dev/loop3\nPTUUID=1234\nPTTYPE=dos\n").as_deref(),
            Some("dos partition table")
        );
        assert_eq!(
            signature("DEVNAME=/dev/loop3\nPTTYPE=gpt\nTYPE=xfs\n").as_deref(),
            Some("xfs")
        );
        assert_eq!(signature("DEVNAME=/dev/loop3\n"), None);
        assert_eq!(signature(""), None);
    }
}
