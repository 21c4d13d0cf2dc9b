//! A short I/O probe of a pool's disk when a node starts serving it, so
//! `kubectl get storagepools` shows what the disk really does next to the
//! tier the admin declared. Direct I/O (page cache bypassed where the
//! filesystem allows it), 1 MiB requests, data flushed before the clock
//! stops; the probe file is removed afterwards.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Instant;

use crate::datapath::replica::aligned::AlignedBuf;

const CHUNK: usize = 1 << 20;

/// Sequential write and read bandwidth in MiB/s over `mib` MiB.
pub fn measure(dir: &Path, mib: usize) -> io::Result<(f64, f64)> {
    let path = dir.join(".terna-probe");
    let open = |flags: i32| {
        OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .custom_flags(flags)
            .open(&path)
    };
    // tmpfs and some others refuse O_DIRECT; measure buffered there.
    let file = open(libc::O_DIRECT).or_else(|_| open(0))?;
    let result = (|| {
        let mut buf = AlignedBuf::zeroed(CHUNK);
        for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
            // Not zeroes: some filesystems compress or skip them.
            *b = (i % 251) as u8;
        }
        let started = Instant::now();
        for i in 0..mib {
            file.write_all_at(buf.as_slice(), (i * CHUNK) as u64)?;
        }
        file.sync_data()?;
        let write = mib as f64 / started.elapsed().as_secs_f64();
        let started = Instant::now();
        for i in 0..mib {
            file.read_exact_at(buf.as_mut_slice(), (i * CHUNK) as u64)?;
        }
        let read = mib as f64 / started.elapsed().as_secs_f64();
        Ok((write, read))
    })();
    let _ = std::fs::remove_file(&path);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let (write, read) = measure(dir.path(), 8).unwrap();
        assert!(write > 0.0 && read > 0.0);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
