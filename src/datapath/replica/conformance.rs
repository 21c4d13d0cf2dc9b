//! One behavioural suite every `Pool`/`ReplicaIo` implementation passes:
//! local pools and remote (agent) pools from the unit tests, NFS pools
//! against a real nfs-ganesha from `tests/conformance.rs`. It is public only
//! so that integration test can call the very same suite; nothing in the
//! driver uses it.
//!
//! Where backends legitimately differ, `Backend` says how, and the suite
//! checks the backend's way instead of skipping the check.
#![doc(hidden)]
// Test code: a failed step is a failed test.
#![allow(clippy::unwrap_used)]

use crate::core::error::ErrorKind;
use crate::core::pool::Pool;
use crate::datapath::replica::aligned::AlignedBuf;

const MIB: u64 = 1 << 20;

/// A backend under test and how it differs from the others.
pub struct Backend<'a> {
    pub pool: &'a dyn Pool,
    /// Removes replica `name` the way something other than the pool would
    /// (an admin, a disk swap): on the node's disk, on the server's export.
    pub remove_behind: &'a dyn Fn(&str),
    /// Whether aligned I/O must reach the file through O_DIRECT (a local
    /// pool on a filesystem that takes it, not tmpfs): then `direct_fd` is
    /// offered, and unaligned I/O must still work beside it.
    pub direct: bool,
    /// Whether a handle whose check failed then reaches whatever file has
    /// its name (an agent forgets the file it had open and opens the name
    /// again), rather than staying bound to the file it opened.
    pub reopens_by_name: bool,
}

/// Replica `index` of the suite's volume: pools take replica file names only.
pub fn name(index: usize) -> String {
    crate::core::volume::replica_file_name(
        &crate::core::volume::volume_id_for("conformance"),
        index,
    )
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i % 251) as u8).wrapping_add(seed))
        .collect()
}

pub fn run(backend: &Backend) {
    let pool = backend.pool;
    let (a, b, c, missing) = (name(0), name(1), name(3), name(2));
    let (a, b, c, missing) = (a.as_str(), b.as_str(), c.as_str(), missing.as_str());
    // Create is idempotent and sparse; grow never shrinks.
    pool.create(a, 4 * MIB).unwrap();
    pool.create(a, 4 * MIB).unwrap();
    assert_eq!(pool.size_of(a).unwrap(), Some(4 * MIB));
    pool.grow(a, 8 * MIB).unwrap();
    pool.grow(a, 2 * MIB).unwrap();
    assert_eq!(pool.size_of(a).unwrap(), Some(8 * MIB));
    // Creating an existing replica smaller leaves it as it is.
    pool.create(a, MIB).unwrap();
    assert_eq!(pool.size_of(a).unwrap(), Some(8 * MIB));
    assert_eq!(pool.size_of(missing).unwrap(), None);
    assert!(
        pool.open(missing).is_err(),
        "opening a missing replica fails"
    );
    assert!(
        pool.grow(missing, MIB).is_err(),
        "growing a missing replica fails"
    );
    assert_eq!(pool.size_of(missing).unwrap(), None, "grow created nothing");
    assert!(pool.capacity().unwrap() > 0);
    if let Some(available) = pool.available() {
        assert!(available.unwrap() <= pool.capacity().unwrap());
    }

    let r = pool.open(a).unwrap();
    assert_eq!(
        r.direct_fd().is_some(),
        backend.direct,
        "O_DIRECT descriptor offered"
    );
    if let Some(size) = r.size() {
        assert_eq!(size.unwrap(), 8 * MIB, "the replica's own size");
    }
    // Never-written space reads as zeroes.
    let mut buf = AlignedBuf::zeroed(64 * 1024);
    r.read_at(buf.as_mut_slice(), 7 * MIB).unwrap();
    assert!(buf.as_slice().iter().all(|&b| b == 0));

    // Aligned, unaligned and large writes read back.
    let big = pattern(MIB as usize, 0);
    r.write_at(AlignedBuf::copy_of(&big).as_slice(), MIB)
        .unwrap();
    r.write_at(b"odd", 3).unwrap();
    r.flush().unwrap();
    let mut back = AlignedBuf::zeroed(MIB as usize);
    r.read_at(back.as_mut_slice(), MIB).unwrap();
    assert!(back.as_slice() == big.as_slice());
    let mut small = [0u8; 3];
    r.read_at(&mut small, 3).unwrap();
    assert_eq!(&small, b"odd");

    // O_DIRECT wants buffer, length and offset aligned: each one alone
    // misaligned still reads and writes (a backend without O_DIRECT must
    // simply not care).
    let mut storage = AlignedBuf::zeroed(8192 + 1);
    let unaligned_buf = &mut storage.as_mut_slice()[1..8192 + 1];
    unaligned_buf.copy_from_slice(&pattern(8192, 7));
    r.write_at(unaligned_buf, 5 * MIB).unwrap();
    r.write_at(
        AlignedBuf::copy_of(&pattern(4096, 9)).as_slice(),
        5 * MIB + 512,
    )
    .unwrap();
    r.write_at(
        AlignedBuf::copy_of(&pattern(1000, 11)).as_slice(),
        5 * MIB + 16384,
    )
    .unwrap();
    let mut expect = pattern(8192, 7);
    expect[512..512 + 4096].copy_from_slice(&pattern(4096, 9));
    expect.resize(16384, 0);
    expect.extend_from_slice(&pattern(1000, 11));
    let mut got = AlignedBuf::zeroed(expect.len() + 1);
    r.read_at(&mut got.as_mut_slice()[1..], 5 * MIB).unwrap();
    assert!(
        got.as_slice()[1..] == expect[..],
        "misaligned I/O reads back"
    );

    // Writes and reads larger than one backend request (NFS sends at most
    // 1 MiB per call), not starting on a request boundary.
    let huge = pattern(2 * MIB as usize + 4096, 3);
    r.write_at(AlignedBuf::copy_of(&huge).as_slice(), 2 * MIB + 8192)
        .unwrap();
    let mut huge_back = AlignedBuf::zeroed(huge.len());
    r.read_at(huge_back.as_mut_slice(), 2 * MIB + 8192).unwrap();
    assert!(huge_back.as_slice() == huge.as_slice(), "multi-request I/O");

    // Called from many threads at once, each on its own range.
    std::thread::scope(|s| {
        for t in 0..4u8 {
            let r = &r;
            s.spawn(move || {
                let at = 6 * MIB + u64::from(t) * 64 * 1024;
                for round in 0..8u8 {
                    let data = pattern(64 * 1024, t.wrapping_mul(31).wrapping_add(round));
                    r.write_at(AlignedBuf::copy_of(&data).as_slice(), at)
                        .unwrap();
                    let mut back = AlignedBuf::zeroed(data.len());
                    r.read_at(back.as_mut_slice(), at).unwrap();
                    assert!(
                        back.as_slice() == data.as_slice(),
                        "thread {t} round {round}"
                    );
                }
            });
        }
    });

    // Discard zeroes exactly the range.
    r.write_at(AlignedBuf::copy_of(&big).as_slice(), MIB)
        .unwrap();
    r.discard(MIB, 4096).unwrap();
    r.read_at(back.as_mut_slice(), MIB).unwrap();
    assert!(back.as_slice()[..4096].iter().all(|&b| b == 0));
    assert!(back.as_slice()[4096..] == big[4096..]);
    r.discard(MIB, 0).unwrap();
    // Discard leaves the size as it is.
    assert_eq!(pool.size_of(a).unwrap(), Some(8 * MIB));

    // Reads past the end fail rather than return short or made-up data,
    // whole or in part.
    let mut past = AlignedBuf::zeroed(4096);
    assert!(
        r.read_at(past.as_mut_slice(), 8 * MIB).is_err(),
        "read past the end"
    );
    let mut straddling = AlignedBuf::zeroed(8192);
    assert!(
        r.read_at(straddling.as_mut_slice(), 8 * MIB - 4096)
            .is_err(),
        "read across the end"
    );
    r.flush().unwrap();

    // Data outlives the handle that wrote it.
    drop(r);
    let r = pool.open(a).unwrap();
    r.read_at(back.as_mut_slice(), MIB).unwrap();
    assert!(back.as_slice()[4096..] == big[4096..], "reopened");

    // Removal behind the backend's back is reported by check.
    assert!(r.check().is_ok());
    (backend.remove_behind)(a);
    assert!(r.check().is_err(), "check must notice a removed replica");
    assert_eq!(pool.size_of(a).unwrap(), None);
    pool.create(a, MIB).unwrap();
    assert_eq!(
        r.check().is_ok(),
        backend.reopens_by_name,
        "after a failed check, the handle reaches a new file of the name only where the backend says so"
    );
    drop(r);
    // A file replaced under an open handle is not its replica.
    let r = pool.open(a).unwrap();
    r.check().unwrap();
    (backend.remove_behind)(a);
    pool.create(a, MIB).unwrap();
    assert!(r.check().is_err(), "check must notice a replaced replica");
    drop(r);
    pool.delete(a).unwrap();

    // Names that are not replica file names are refused, not looked up.
    for bad in ["../a", "/etc/passwd", "a/b", "..", "", "x\0"] {
        let err = pool.create(bad, MIB).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidArgument, "{bad:?}: {err}");
        assert!(pool.open(bad).is_err(), "{bad:?}");
        assert!(pool.grow(bad, MIB).is_err(), "{bad:?}");
        assert!(pool.delete(bad).is_err(), "{bad:?}");
        assert!(pool.size_of(bad).is_err(), "{bad:?}");
    }

    // Delete is idempotent, and deletes only its replica.
    pool.create(b, MIB).unwrap();
    pool.create(c, 2 * MIB).unwrap();
    pool.delete(b).unwrap();
    pool.delete(b).unwrap();
    assert_eq!(pool.size_of(b).unwrap(), None);
    assert_eq!(pool.size_of(c).unwrap(), Some(2 * MIB));
    pool.delete(c).unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::replica::local::LocalPool;

    #[test]
    fn local_pool_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let pool = LocalPool::new(dir.path(), None).unwrap();
        // Whether this filesystem takes O_DIRECT (tmpfs does not).
        let probe = dir.path().join("probe");
        std::fs::write(&probe, b"").unwrap();
        let direct = nix::fcntl::open(
            &probe,
            nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_DIRECT,
            nix::sys::stat::Mode::empty(),
        )
        .is_ok();
        std::fs::remove_file(&probe).unwrap();
        run(&Backend {
            pool: &pool,
            remove_behind: &|name| std::fs::remove_file(dir.path().join(name)).unwrap(),
            direct,
            reopens_by_name: false,
        });
    }
}
