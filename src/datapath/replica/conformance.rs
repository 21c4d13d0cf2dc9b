//! One behavioural suite every `Pool`/`ReplicaIo` implementation must pass.
//! Each backend's tests call `run` with a way to remove a replica's file
//! behind the backend's back.

use crate::core::pool::Pool;
use crate::datapath::replica::aligned::AlignedBuf;

const MIB: u64 = 1 << 20;

/// Replica `index` of the suite's volume: pools take replica file names only.
pub fn name(index: usize) -> String {
    crate::core::volume::replica_file_name(
        &crate::core::volume::volume_id_for("conformance"),
        index,
    )
}

pub fn run(pool: &dyn Pool, remove_behind: &dyn Fn(&str)) {
    let (a, b, missing) = (name(0), name(1), name(2));
    let (a, b, missing) = (a.as_str(), b.as_str(), missing.as_str());
    // Create is idempotent and sparse; grow never shrinks.
    pool.create(a, 4 * MIB).unwrap();
    pool.create(a, 4 * MIB).unwrap();
    assert_eq!(pool.size_of(a).unwrap(), Some(4 * MIB));
    pool.grow(a, 8 * MIB).unwrap();
    pool.grow(a, 2 * MIB).unwrap();
    assert_eq!(pool.size_of(a).unwrap(), Some(8 * MIB));
    assert_eq!(pool.size_of(missing).unwrap(), None);
    assert!(
        pool.open(missing).is_err(),
        "opening a missing replica fails"
    );
    assert!(pool.capacity().unwrap() > 0);

    let r = pool.open(a).unwrap();
    // Never-written space reads as zeroes.
    let mut buf = AlignedBuf::zeroed(64 * 1024);
    r.read_at(buf.as_mut_slice(), 7 * MIB).unwrap();
    assert!(buf.as_slice().iter().all(|&b| b == 0));

    // Aligned, unaligned and large writes read back.
    let big: Vec<u8> = (0..MIB as usize).map(|i| (i % 251) as u8).collect();
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

    // Discard zeroes exactly the range.
    r.discard(MIB, 4096).unwrap();
    r.read_at(back.as_mut_slice(), MIB).unwrap();
    assert!(back.as_slice()[..4096].iter().all(|&b| b == 0));
    assert!(back.as_slice()[4096..] == big[4096..]);

    // Reads past the end fail rather than return short data.
    let mut past = AlignedBuf::zeroed(4096);
    assert!(r.read_at(past.as_mut_slice(), 8 * MIB).is_err());

    // Removal behind the backend's back is reported by check.
    assert!(r.check().is_ok());
    remove_behind(a);
    assert!(r.check().is_err(), "check must notice a removed replica");

    // Names that are not replica file names are refused, not looked up.
    for bad in ["../a", "/etc/passwd", "a/b", "..", "", "x\0"] {
        let err = pool.create(bad, MIB).unwrap_err();
        assert_eq!(
            err.kind,
            crate::core::error::ErrorKind::InvalidArgument,
            "{bad:?}: {err}"
        );
        assert!(pool.open(bad).is_err(), "{bad:?}");
        assert!(pool.delete(bad).is_err(), "{bad:?}");
        assert!(pool.size_of(bad).is_err(), "{bad:?}");
    }

    // Delete is idempotent.
    pool.create(b, MIB).unwrap();
    pool.delete(b).unwrap();
    pool.delete(b).unwrap();
    assert_eq!(pool.size_of(b).unwrap(), None);
}

#[test]
fn local_pool_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let pool = crate::datapath::replica::local::LocalPool::new(dir.path(), None).unwrap();
    run(&pool, &|name| {
        std::fs::remove_file(dir.path().join(name)).unwrap()
    });
}
