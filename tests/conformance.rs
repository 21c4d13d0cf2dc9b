//! The shared suites against the implementations that need a real server:
//! the replica backend suite (`datapath::replica::conformance`) on an NFS
//! pool served by nfs-ganesha on loopback, and the state store suite
//! (`core::store::conformance`) on `KubeStore` against a real
//! kube-apiserver and etcd. The other implementations run the same suites
//! as unit tests. Needs root (ganesha) and scripts/install-kube-tools.

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

#[test]
fn kube_store_conforms() {
    let env = common::cluster::KubeEnv::start();
    env.install(&["apply", "-f", "deploy/crds/"]);
    let runtime = std::sync::Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap(),
    );
    let client = runtime.block_on(env.client());
    let store = terna::edge::kube::store::KubeStore::with_runtime(client, runtime.clone());
    terna::core::store::conformance::run(&store, "kube-store");
}
