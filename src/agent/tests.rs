use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::protocol::{Request, Response};
use super::server::{AgentState, serve};
use crate::replica::Pool;
use crate::replica::local::LocalPool;
use crate::replica::remote::{Client, RemotePool};

const TOKEN: &[u8] = b"cluster-secret";

fn start_agent(dir: &std::path::Path) -> SocketAddr {
    start_agent_with(AgentState::new("node-a", TOKEN, pool_in(dir)))
}

fn pool_in(dir: &std::path::Path) -> BTreeMap<String, Box<dyn Pool>> {
    let mut pools: BTreeMap<String, Box<dyn Pool>> = BTreeMap::new();
    pools.insert("p".into(), Box::new(LocalPool::new(dir, None).unwrap()));
    pools
}

fn start_agent_with(state: AgentState) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(state);
    std::thread::spawn(move || serve(listener, state));
    addr
}

fn client(addr: SocketAddr, token: &[u8]) -> Arc<Client> {
    Arc::new(Client::new(addr, token, "node-b", Duration::from_secs(2)))
}

#[test]
fn remote_pool_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start_agent(dir.path());
    let pool = RemotePool::new(client(addr, TOKEN), "p");
    crate::replica::conformance::run(&pool, &|name| {
        std::fs::remove_file(dir.path().join(name)).unwrap()
    });
}

#[test]
fn wrong_token_and_unknown_pool_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start_agent(dir.path());
    let bad = RemotePool::new(client(addr, b"guess"), "p");
    let err = bad.create("x", 4096).unwrap_err().to_string();
    assert!(err.contains("token rejected"), "{err}");
    assert!(!dir.path().join("x").exists());
    let other = RemotePool::new(client(addr, TOKEN), "nope");
    let err = other.create("x", 4096).unwrap_err().to_string();
    assert!(
        err.contains("\"nope\" is not served by node node-a"),
        "{err}"
    );
}

#[test]
fn requests_before_hello_and_garbage_close_the_connection_and_the_agent_survives() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start_agent(dir.path());
    // A valid request without Hello: refused, connection closed.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(
        &Request::Create {
            pool: "p".into(),
            name: "x".into(),
            size: 4096,
        }
        .encode(1),
    )
    .unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    let (h, p) = super::protocol::split_frame(&rest).unwrap();
    assert!(matches!(
        Response::decode(h.kind, p).unwrap(),
        Response::Error {
            errno: libc::EACCES,
            ..
        }
    ));
    assert!(!dir.path().join("x").exists());
    // Garbage: closed without an answer.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: agent\r\n\r\n")
        .unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty());
    // Still serving.
    let pool = RemotePool::new(client(addr, TOKEN), "p");
    pool.create("y", 4096).unwrap();
    assert_eq!(pool.size_of("y").unwrap(), Some(4096));
}

#[test]
fn a_silent_agent_turns_into_an_error_within_the_timeout() {
    // Accepts connections and never answers: a hung peer.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let held = std::thread::spawn(move || {
        let conns: Vec<_> = listener.incoming().take(1).collect();
        std::thread::sleep(Duration::from_secs(4));
        drop(conns);
    });
    let pool = RemotePool::new(
        Arc::new(Client::new(addr, TOKEN, "n", Duration::from_millis(300))),
        "p",
    );
    let start = Instant::now();
    assert!(pool.create("x", 4096).is_err());
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "took {:?}",
        start.elapsed()
    );
    held.join().unwrap();
}

#[test]
fn writes_from_connections_older_than_a_fence_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start_agent(dir.path());
    let old = RemotePool::new(client(addr, TOKEN), "p");
    old.create("r", 1 << 20).unwrap();
    let old_io = old.open("r").unwrap();
    old_io.write_at(&[1u8; 4096], 0).unwrap();
    // Another client (the catching-up engine) fences the replica.
    let new = RemotePool::new(client(addr, TOKEN), "p");
    let new_io = new.open("r").unwrap();
    new_io.fence().unwrap();
    // The late write on the old connection must not land.
    let err = old_io.write_at(&[2u8; 4096], 0).unwrap_err();
    assert!(err.to_string().contains("before its fence"), "{err}");
    assert!(old_io.discard(0, 4096).is_err());
    new_io.write_at(&[3u8; 4096], 0).unwrap();
    let mut back = [0u8; 4096];
    new_io.read_at(&mut back, 0).unwrap();
    assert_eq!(back, [3u8; 4096]);
}

#[test]
fn an_engine_of_an_older_claim_is_fenced_out_even_on_new_connections() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start_agent(dir.path());
    // The engine of claim 1 (the node that held the volume).
    let old_client = client(addr, TOKEN);
    old_client.act_under_claim(1);
    let old = RemotePool::new(old_client.clone(), "p");
    old.create("r", 1 << 20).unwrap();
    let old_io = old.open("r").unwrap();
    old_io.write_at(&[1u8; 4096], 0).unwrap();
    // Claim 2 takes the volume over and fences the replica.
    let new_client = client(addr, TOKEN);
    new_client.act_under_claim(2);
    let new_io = RemotePool::new(new_client, "p").open("r").unwrap();
    new_io.fence().unwrap();
    // Claim 1 reconnects afresh: still refused, and the data stays claim 2's.
    old_client.drop_idle();
    let err = old_io.write_at(&[2u8; 4096], 0).unwrap_err();
    assert!(err.to_string().contains("claim 2 fenced it"), "{err}");
    assert!(old_io.discard(0, 4096).is_err());
    new_io.write_at(&[3u8; 4096], 0).unwrap();
    // A later claim still writes, and reads stay open to everyone.
    let newer_client = client(addr, TOKEN);
    newer_client.act_under_claim(3);
    let newer_io = RemotePool::new(newer_client, "p").open("r").unwrap();
    newer_io.write_at(&[4u8; 4096], 4096).unwrap();
    let mut back = [0u8; 4096];
    old_io.read_at(&mut back, 0).unwrap();
    assert_eq!(back, [3u8; 4096]);
}

#[test]
fn a_claim_floor_outlives_an_agent_restart_and_goes_with_its_replica() {
    let dir = tempfile::tempdir().unwrap();
    let fences = dir.path().join("fences");
    let pool_dir = dir.path().join("pool");
    std::fs::create_dir_all(&pool_dir).unwrap();
    let agent = || AgentState::new("node-a", TOKEN, pool_in(&pool_dir)).with_fence_dir(&fences);
    let first = start_agent_with(agent());
    let holder = client(first, TOKEN);
    holder.act_under_claim(2);
    let pool = RemotePool::new(holder, "p");
    pool.create("r", 1 << 20).unwrap();
    pool.open("r").unwrap().fence().unwrap();
    // The same node's agent, restarted (a second instance on the same dirs).
    let second = start_agent_with(agent());
    let old = client(second, TOKEN);
    old.act_under_claim(1);
    let old_io = RemotePool::new(old, "p").open("r").unwrap();
    let err = old_io.write_at(&[1u8; 4096], 0).unwrap_err();
    assert!(err.to_string().contains("claim 2 fenced it"), "{err}");
    // Deleting the replica forgets its floor: a new one starts afresh.
    let admin = RemotePool::new(client(second, TOKEN), "p");
    admin.delete("r").unwrap();
    assert!(!fences.join("p/r.claim").exists());
    admin.create("r", 1 << 20).unwrap();
    old_io.write_at(&[1u8; 4096], 0).unwrap();
}
