//! A data dir's exclusive owner: one `terna standalone`, `terna node` or
//! `terna agent` per data dir; a second one would replace the first's
//! socket, run a second repair loop over the same volumes and race it on
//! every record.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::core::error::{Error, ErrorKind, Result};

/// Held while the process runs; the kernel drops the lock when it exits,
/// however it exits.
pub struct DataDirLock {
    _lock: Flock<File>,
}

/// Takes `<data_dir>/terna.lock`, recording our pid in it, or fails
/// naming the process that holds it.
pub fn lock(data_dir: &Path) -> Result<DataDirLock> {
    if !data_dir.exists() {
        crate::datapath::host::files::private_dir(data_dir)?;
    }
    let path = data_dir.join("terna.lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((mut file, Errno::EWOULDBLOCK)) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            return Err(Error::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "data dir {} is in use by another terna (pid {}); stop it or use another --data-dir",
                    data_dir.display(),
                    holder.trim()
                ),
            ));
        }
        Err((_, errno)) => {
            return Err(Error::io(
                format!("cannot lock {}", path.display()),
                std::io::Error::from(errno),
            ));
        }
    };
    let pid = std::process::id().to_string();
    lock.set_len(0)
        .and_then(|()| lock.seek(SeekFrom::Start(0)).map(drop))
        .and_then(|()| lock.write_all(pid.as_bytes()))
        .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))?;
    Ok(DataDirLock { _lock: lock })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_owner_is_refused_with_the_first_ones_pid() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock(dir.path()).unwrap();
        let err = lock(dir.path()).err().unwrap();
        assert_eq!(err.kind, ErrorKind::FailedPrecondition);
        assert!(
            err.message.contains(&std::process::id().to_string()),
            "{}",
            err.message
        );
        drop(first);
        lock(dir.path()).unwrap();
    }
}
