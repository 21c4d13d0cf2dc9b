//! Who keeps a block device open: processes with a descriptor on it,
//! mounts of it in any mount namespace, devices stacked on it. Only read
//! when a device will not let go, to say in the error what holds it.

use std::collections::HashSet;
use std::fmt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::mounts::{MountEntry, parse_mountinfo};

/// Something holding a block device open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    Process {
        pid: i32,
        command: String,
    },
    /// Mounted at `point` in the mount namespace `pid` lives in; `None`
    /// when that is this process's own.
    Mount {
        point: PathBuf,
        pid: Option<i32>,
    },
    /// A device built on it (`/sys/block/<dev>/holders`).
    Stacked(String),
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Holder::Process { pid, command } => write!(f, "process {pid} ({command})"),
            Holder::Mount { point, pid: None } => write!(f, "mounted at {}", point.display()),
            Holder::Mount {
                point,
                pid: Some(pid),
            } => write!(
                f,
                "mounted at {} in the mount namespace of process {pid}",
                point.display()
            ),
            Holder::Stacked(name) => write!(f, "device {name} built on it"),
        }
    }
}

/// The holders as one phrase for an error message.
pub fn describe(holders: &[Holder]) -> String {
    if holders.is_empty() {
        return "no holder found; the kernel has yet to release it".to_string();
    }
    holders
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The mount points in `mounts` of the device numbered `device`
/// (`major:minor`).
fn mounted_from(mounts: &[MountEntry], device: &str) -> Vec<PathBuf> {
    mounts
        .iter()
        .filter(|m| m.device == device)
        .map(|m| m.mount_point.clone())
        .collect()
}

/// Whoever holds the block device `node` (e.g. `/dev/loop3`) open.
/// Processes that go away meanwhile are skipped. Descriptors are matched
/// by the device number of the node they name, stat'ed only when they name
/// something under `/dev`, so that no file on a hung FUSE mount is touched.
pub fn of_device(node: &Path) -> Vec<Holder> {
    let Some((rdev, name)) = std::fs::metadata(node)
        .ok()
        .filter(|m| m.file_type().is_block_device())
        .map(|m| m.rdev())
        .zip(node.file_name())
    else {
        return Vec::new();
    };
    let number = format!(
        "{}:{}",
        nix::sys::stat::major(rdev),
        nix::sys::stat::minor(rdev)
    );
    let me = std::process::id() as i32;
    let own_ns = std::fs::read_link("/proc/self/ns/mnt").ok();
    let mut seen_ns = HashSet::new();
    let mut holders = Vec::new();
    let pids = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok());
    for pid in pids {
        let proc = PathBuf::from(format!("/proc/{pid}"));
        if pid != me && holds_fd(&proc, rdev) {
            let command = std::fs::read_to_string(proc.join("comm"))
                .map(|c| c.trim().to_string())
                .unwrap_or_default();
            holders.push(Holder::Process { pid, command });
        }
        let Ok(ns) = std::fs::read_link(proc.join("ns/mnt")) else {
            continue;
        };
        if !seen_ns.insert(ns.clone()) {
            continue;
        }
        let Ok(text) = std::fs::read(proc.join("mountinfo")) else {
            continue;
        };
        let ns_pid = (Some(&ns) != own_ns.as_ref()).then_some(pid);
        holders.extend(
            mounted_from(&parse_mountinfo(&text), &number)
                .into_iter()
                .map(|point| Holder::Mount { point, pid: ns_pid }),
        );
    }
    let stacked = Path::new("/sys/block").join(name).join("holders");
    holders.extend(
        std::fs::read_dir(stacked)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| Holder::Stacked(e.file_name().to_string_lossy().into_owned())),
    );
    holders
}

/// Whether the process at `proc` has a descriptor on the device `rdev`.
fn holds_fd(proc: &Path, rdev: u64) -> bool {
    let Ok(fds) = std::fs::read_dir(proc.join("fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .ok()
            .filter(|target| target.starts_with("/dev/"))
            .and_then(|target| std::fs::metadata(target).ok())
            .is_some_and(|m| m.file_type().is_block_device() && m.rdev() == rdev)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_are_named_in_one_phrase() {
        let holders = [
            Holder::Process {
                pid: 42,
                command: "blkid".into(),
            },
            Holder::Mount {
                point: "/mnt/x".into(),
                pid: None,
            },
            Holder::Mount {
                point: "/var/lib/pod".into(),
                pid: Some(7),
            },
            Holder::Stacked("dm-0".into()),
        ];
        assert_eq!(
            describe(&holders),
            "process 42 (blkid), mounted at /mnt/x, mounted at /var/lib/pod in the mount \
             namespace of process 7, device dm-0 built on it"
        );
        assert!(describe(&[]).contains("no holder found"));
    }

    #[test]
    fn mounts_are_matched_by_device_number() {
        let text = "36 25 7:3 / /staging rw - ext4 /dev/loop3 rw\n\
                    37 25 7:30 / /other rw - ext4 /dev/loop30 rw\n\
                    38 25 7:3 /dir /pod rw - ext4 /dev/loop3 rw\n";
        let mounts = parse_mountinfo(text);
        assert_eq!(
            mounted_from(&mounts, "7:3"),
            vec![PathBuf::from("/staging"), PathBuf::from("/pod")]
        );
        assert!(mounted_from(&mounts, "7:4").is_empty());
    }
}
