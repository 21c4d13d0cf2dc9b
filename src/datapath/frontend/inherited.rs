//! The FUSE session a supervisor hands its engine worker, by fd number.

use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use crate::core::error::{Error, Result};

/// Takes a /dev/fuse fd inherited from the supervisor, after checking it is
/// what the supervisor says.
pub fn adopt_session_fd(fd: RawFd) -> Result<OwnedFd> {
    let target = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map_err(|e| Error::io(format!("--fuse-fd {fd} is not open"), e))?;
    if target != Path::new("/dev/fuse") {
        return Err(Error::invalid(format!(
            "--fuse-fd {fd} is {}, not /dev/fuse",
            target.display()
        )));
    }
    // SAFETY: the fd is open (checked above), was inherited for this
    // process alone to own, and nothing else in it refers to the number.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    nix::fcntl::fcntl(
        owned.as_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| Error::io("cannot set close-on-exec on the FUSE fd", e.into()))?;
    Ok(owned)
}
