//! The shared suites against the implementations that need a real server:
//! the replica backend suite (`datapath::replica::conformance`) on an NFS
//! pool served by nfs-ganesha on loopback. The other implementations run
//! the same suite as unit tests. Needs root (ganesha).

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use terna::datapath::replica::conformance;
use terna::datapath::replica::nfs::NfsPool;

#[test]
fn nfs_pool_conforms() {
    common::assert_root("conformance");
    let root = tempfile::Builder::new()
        .prefix("terna-conformance-")
        .tempdir()
        .unwrap();
    let server = common::nfs::Ganesha::start(root.path(), "s1");
    let cfg = terna::core::config::NfsPoolConfig {
        server: server.addr.clone(),
        port: Some(server.port),
        mount_port: Some(server.mount_port),
        export: "/export".into(),
        subdir: Some("terna".into()),
    };
    let pool = NfsPool::new(&cfg, Duration::from_secs(10));
    // Another client of the export (another node) removes it. Not on the
    // server's disk: ganesha caches attributes and directory entries, so
    // it sees such a removal only once they expire (60 s by default).
    let other = NfsPool::new(&cfg, Duration::from_secs(10));
    conformance::run(&conformance::Backend {
        pool: &pool,
        remove_behind: &|name| terna::core::pool::Pool::delete(&other, name).unwrap(),
        direct: false,
        reopens_by_name: false,
    });
}
