//! Mounting a session, and unmounting or aborting one, also one left
//! behind by a process that died.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::stat::Mode;

use super::FuseError;
use crate::datapath::host::mounts;

/// Opens `/dev/fuse` and mounts a session for it at `mountpoint`. The
/// returned fd is the session: it lives as long as any process holds a copy,
/// which is what lets a supervisor keep a volume's mount alive across a
/// restart of the server that answers it.
pub fn open_session(mountpoint: &Path) -> Result<OwnedFd, FuseError> {
    let dev = nix::fcntl::open("/dev/fuse", OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| FuseError::OpenDevice {
            mountpoint: mountpoint.to_path_buf(),
            source: e.into(),
        })?;
    let uid = nix::unistd::getuid().as_raw();
    let gid = nix::unistd::getgid().as_raw();
    // rootmode is octal (S_IFDIR); user_id/group_id name the mounter.
    let data = format!(
        "fd={},rootmode=40000,user_id={uid},group_id={gid},allow_other,default_permissions",
        dev.as_raw_fd()
    );
    nix::mount::mount(
        Some("terna"),
        mountpoint,
        Some("fuse.terna"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOATIME,
        Some(data.as_str()),
    )
    .map_err(|e| FuseError::Mount {
        mountpoint: mountpoint.to_path_buf(),
        source: e.into(),
    })?;
    Ok(dev)
}

/// Unmounts a FUSE export, e.g. one left behind by a dead process: no FUSE
/// mount there is success; busy falls back to a lazy unmount (the session
/// then lives on until the file's last user, e.g. a loop device, lets go).
pub fn unmount(mountpoint: &Path) -> Result<(), FuseError> {
    for _ in 0..16 {
        if !is_mounted(mountpoint) {
            return Ok(());
        }
        unmount_once(mountpoint)?;
    }
    Ok(())
}

pub(super) fn unmount_once(mountpoint: &Path) -> Result<(), FuseError> {
    let err = |e: Errno| FuseError::Unmount {
        mountpoint: mountpoint.to_path_buf(),
        source: e.into(),
    };
    match nix::mount::umount2(mountpoint, MntFlags::empty()) {
        Ok(()) | Err(Errno::EINVAL | Errno::ENOENT) => Ok(()),
        Err(Errno::EBUSY) => match nix::mount::umount2(mountpoint, MntFlags::MNT_DETACH) {
            Ok(()) | Err(Errno::EINVAL | Errno::ENOENT) => Ok(()),
            Err(e) => Err(err(e)),
        },
        Err(e) => Err(err(e)),
    }
}

/// Whether a FUSE filesystem is mounted at `mountpoint` (per
/// /proc/self/mountinfo).
pub fn is_mounted(mountpoint: &Path) -> bool {
    fuse_mount_device(mountpoint).is_some()
}

/// The `major:minor` of the topmost FUSE mount at `mountpoint`.
fn fuse_mount_device(mountpoint: &Path) -> Option<(u64, u64)> {
    let want = normalize(mountpoint);
    mounts::mounts()
        .ok()?
        .into_iter()
        .rev()
        .filter(|m| m.is_fuse() && m.mount_point == want)
        .find_map(|m| m.device_number())
}

/// Resolves symlinks in the parent only: the mount point itself may be a
/// dead FUSE mount that cannot be stat'ed.
fn normalize(path: &Path) -> PathBuf {
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) if !parent.as_os_str().is_empty() => parent
            .canonicalize()
            .map(|p| p.join(name))
            .unwrap_or_else(|_| path.to_path_buf()),
        _ => path.canonicalize().unwrap_or_else(|_| path.to_path_buf()),
    }
}

/// Aborts the FUSE session mounted at `mountpoint`: every request waiting
/// on it, and every later one, fails with ENOTCONN.
pub fn abort(mountpoint: &Path) {
    if let Some(conn) = mount_device(mountpoint) {
        abort_connection(conn);
    }
}

pub(super) fn mount_device(mountpoint: &Path) -> Option<u64> {
    // The kernel's dev_t encoding, which fusectl uses for directory names.
    fuse_mount_device(mountpoint).map(|(major, minor)| (major << 20) | minor)
}

/// Aborts a FUSE connection through fusectl, mounting fusectl if needed.
pub(super) fn abort_connection(conn: u64) {
    let dir = Path::new("/sys/fs/fuse/connections");
    let abort = dir.join(conn.to_string()).join("abort");
    if !abort.exists() {
        let _ = nix::mount::mount(
            Some("fusectl"),
            dir,
            Some("fusectl"),
            MsFlags::empty(),
            None::<&str>,
        );
    }
    if let Err(e) = std::fs::write(&abort, b"1") {
        tracing::warn!(path = %abort.display(), error = %e, "cannot abort FUSE connection");
    }
}
