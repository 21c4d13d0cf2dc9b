//! Reading the mount table and mounting/unmounting, the few ways the node
//! plugin needs.

use std::path::{Path, PathBuf};
use std::process::Command;

use nix::mount::{MntFlags, umount2};

use crate::core::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    /// `major:minor` of the mounted filesystem's device.
    pub device: String,
    /// Which part of that filesystem is mounted (`/` for all of it; a bind
    /// mount of a device node shows the node's path, e.g. `/loop3`).
    pub root: String,
    pub fs_type: String,
    pub source: String,
    pub options: String,
}

impl MountEntry {
    /// Mounted read-only (the per-mount flag, which a read-only bind mount sets).
    pub fn read_only(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }
}

/// `/proc/self/mountinfo` escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            Some(MountEntry {
                device: left.get(2)?.to_string(),
                root: unescape(left.get(3)?),
                mount_point: PathBuf::from(unescape(left.get(4)?)),
                options: left.get(5)?.to_string(),
                fs_type: right.first()?.to_string(),
                source: unescape(right.get(1)?),
            })
        })
        .collect()
}

pub fn mounts() -> Result<Vec<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("cannot read /proc/self/mountinfo", e))?;
    Ok(parse_mountinfo(&text))
}

/// The topmost mount at exactly `path`, if any.
pub fn mount_at(path: &Path) -> Result<Option<MountEntry>> {
    Ok(mounts()?.into_iter().rev().find(|m| m.mount_point == path))
}

pub fn is_mounted(path: &Path) -> Result<bool> {
    Ok(mount_at(path)?.is_some())
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd
        .output()
        .map_err(|e| Error::io(format!("cannot run {what}"), e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::internal(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

pub fn mount_fs(device: &Path, target: &Path, fs_type: &str, options: &[String]) -> Result<()> {
    let mut cmd = Command::new("mount");
    cmd.arg("-t").arg(fs_type);
    if !options.is_empty() {
        cmd.arg("-o").arg(options.join(","));
    }
    cmd.arg(device).arg(target);
    run(
        &mut cmd,
        &format!("mount {} on {}", device.display(), target.display()),
    )
}

pub fn bind_mount(source: &Path, target: &Path, read_only: bool, options: &[String]) -> Result<()> {
    run(
        Command::new("mount").arg("--bind").arg(source).arg(target),
        &format!("bind mount {} on {}", source.display(), target.display()),
    )?;
    if read_only || !options.is_empty() {
        let mut opts = vec!["remount".to_string(), "bind".to_string()];
        opts.extend(options.iter().cloned());
        // Last, so a flag such as `rw` in the options cannot undo it.
        if read_only {
            opts.push("ro".to_string());
        }
        run(
            Command::new("mount")
                .arg("-o")
                .arg(opts.join(","))
                .arg(target),
            &format!("remount {}", target.display()),
        )?;
    }
    Ok(())
}

/// Unmounts the topmost mount at `path`.
pub fn unmount_one(path: &Path) -> Result<()> {
    umount2(path, MntFlags::empty()).map_err(|e| {
        Error::io(
            format!("cannot unmount {}", path.display()),
            std::io::Error::from(e),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_are_parsed_with_escapes() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    40 36 0:45 / /var/lib/x rw shared:2 - fuse.terna terna rw,user_id=0\n\
                    garbage line\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(m[0].fs_type, "ext3");
        assert_eq!(m[0].source, "/dev/root");
        assert_eq!(m[0].options, "rw,noatime");
        assert_eq!(m[0].device, "98:0");
        assert_eq!(m[0].root, "/mnt1");
        assert_eq!(m[1].fs_type, "fuse.terna");
    }

    #[test]
    fn unescape_leaves_plain_and_short_sequences_alone() {
        assert_eq!(unescape("a\\134b"), "a\\b");
        assert_eq!(unescape("a\\13"), "a\\13");
        assert_eq!(unescape("plain"), "plain");
    }
}
