use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::protocol::{Request, Response};
use super::server::{AgentState, serve};
use super::transport::{Stream, Transport};
use crate::core::pool::Pool;
use crate::datapath::replica::local::LocalPool;
use crate::datapath::replica::remote::{Client, RemotePool};

const TOKEN: &[u8] = b"0123456789abcdef-cluster-secret";

/// `name`'s TLS identity, from one CA for all these tests.
fn tls(name: &str) -> Transport {
    static CA: std::sync::OnceLock<crate::datapath::tls::ca::CaSet> = std::sync::OnceLock::new();
    let set = CA.get_or_init(|| {
        crate::datapath::tls::ca::CaSet::create(
            crate::datapath::tls::unix_now(),
            crate::datapath::tls::ca::CA_LIFETIME,
        )
        .unwrap()
    });
    Transport::Tls(crate::datapath::tls::Identity::in_memory(name, set.clone()))
}

/// An agent of node-a on these tests' CA.
fn agent(token: &[u8], dir: &std::path::Path) -> AgentState {
    AgentState::new("node-a", token, tls("node-a"), pool_in(dir))
}

/// Replica `index` of the tests' volume: agents serve replica file names only.
fn r(index: usize) -> String {
    crate::core::volume::replica_file_name(
        &crate::core::volume::volume_id_for("agent-tests"),
        index,
    )
}

fn start_agent(dir: &std::path::Path) -> SocketAddr {
    start_agent_with(agent(TOKEN, dir))
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
    Arc::new(Client::new(
        addr,
        "node-a",
        token,
        "node-b",
        Duration::from_secs(2),
        tls("node-b"),
    ))
}

#[test]
fn remote_pool_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start_agent(dir.path());
    let pool = RemotePool::new(client(addr, TOKEN), "p");
    crate::datapath::replica::conformance::run(&crate::datapath::replica::conformance::Backend {
        pool: &pool,
        remove_behind: &|name| std::fs::remove_file(dir.path().join(name)).unwrap(),
        // The agent's replica is local to it; to us it is bytes over TCP.
        direct: false,
        reopens_by_name: true,
    });
}

#[test]
fn wrong_token_and_unknown_pool_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start_agent(dir.path());
    let bad = RemotePool::new(client(addr, b"guess"), "p");
    let err = bad.create(&r(0), 4096).unwrap_err().report().to_string();
    assert!(err.contains("token rejected"), "{err}");
    assert!(!dir.path().join(r(0)).exists());
    let other = RemotePool::new(client(addr, TOKEN), "nope");
    let err = other.create(&r(0), 4096).unwrap_err().report().to_string();
    assert!(
        err.contains("\"nope\" is not served by node node-a"),
        "{err}"
    );
}

#[test]
fn requests_before_hello_and_garbage_close_the_connection_and_the_agent_survives() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start_agent(dir.path());
    let create = Request::Create {
        pool: "p".into(),
        name: r(0),
        size: 4096,
    }
    .encode(1);
    // A valid request without Hello, inside TLS: refused, connection closed.
    let mut raw = Raw::connect(addr);
    raw.stream.send(&create).unwrap();
    assert_eq!(errno_of(&raw.answer()), libc::EACCES);
    assert!(raw.closed_within(Duration::from_secs(5)));
    assert!(!dir.path().join(r(0)).exists());
    // Plain text, be it our protocol (a Hello with the right token, then
    // the request) or garbage: no TLS handshake, so never an answer of ours.
    let hello = Request::Hello {
        token: TOKEN.to_vec(),
        node: "n".into(),
        claim: 0,
    }
    .encode(1);
    for bytes in [
        [hello, create].concat(),
        b"GET / HTTP/1.1\r\nHost: agent\r\n\r\n".to_vec(),
    ] {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(&bytes);
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(super::protocol::split_frame(&rest).is_err(), "{rest:?}");
    }
    assert!(!dir.path().join(r(0)).exists());
    // Still serving.
    let pool = RemotePool::new(client(addr, TOKEN), "p");
    pool.create(&r(1), 4096).unwrap();
    assert_eq!(pool.size_of(&r(1)).unwrap(), Some(4096));
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
        Arc::new(Client::new(
            addr,
            "node-a",
            TOKEN,
            "n",
            Duration::from_millis(300),
            tls("n"),
        )),
        "p",
    );
    let start = Instant::now();
    assert!(pool.create(&r(0), 4096).is_err());
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
    old.create(&r(0), 1 << 20).unwrap();
    let old_io = old.open(&r(0)).unwrap();
    old_io.write_at(&[1u8; 4096], 0).unwrap();
    // Another client (the catching-up engine) fences the replica.
    let new = RemotePool::new(client(addr, TOKEN), "p");
    let new_io = new.open(&r(0)).unwrap();
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
    old.create(&r(0), 1 << 20).unwrap();
    let old_io = old.open(&r(0)).unwrap();
    old_io.write_at(&[1u8; 4096], 0).unwrap();
    // Claim 2 takes the volume over and fences the replica.
    let new_client = client(addr, TOKEN);
    new_client.act_under_claim(2);
    let new_io = RemotePool::new(new_client, "p").open(&r(0)).unwrap();
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
    let newer_io = RemotePool::new(newer_client, "p").open(&r(0)).unwrap();
    newer_io.write_at(&[4u8; 4096], 4096).unwrap();
    let mut back = [0u8; 4096];
    old_io.read_at(&mut back, 0).unwrap();
    assert_eq!(back, [3u8; 4096]);
}

/// A stale engine's fence (its catch-up, after it was resumed) is refused
/// before it moves anything: the current holder's open connections keep
/// writing, so its healthy replica is not faulted by someone else's fence.
#[test]
fn an_older_claims_fence_cuts_off_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start_agent(dir.path());
    let holder = client(addr, TOKEN);
    holder.act_under_claim(5);
    let io = RemotePool::new(holder, "p");
    io.create(&r(0), 1 << 20).unwrap();
    let io = io.open(&r(0)).unwrap();
    io.fence().unwrap();
    io.write_at(&[1u8; 4096], 0).unwrap();
    let stale = client(addr, TOKEN);
    stale.act_under_claim(4);
    let stale_io = RemotePool::new(stale, "p").open(&r(0)).unwrap();
    let err = stale_io.fence().unwrap_err();
    assert!(err.to_string().contains("may not fence it"), "{err}");
    // The holder's pooled connection predates that attempt and still writes.
    io.write_at(&[2u8; 4096], 0).unwrap();
    let mut back = [0u8; 4096];
    io.read_at(&mut back, 0).unwrap();
    assert_eq!(back, [2u8; 4096]);
}

/// A stale engine on the agent's own node writes its replica file
/// directly, through a descriptor opened long before. Once the new holder
/// empties the replica for a full rebuild, what that descriptor writes
/// lands in a file nobody reads, and an older claim may not empty it back.
#[test]
fn a_replica_emptied_for_a_rebuild_is_out_of_reach_of_writers_holding_the_old_file() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let addr = start_agent(dir.path());
    let holder = client(addr, TOKEN);
    holder.act_under_claim(2);
    let pool = RemotePool::new(holder, "p");
    pool.create(&r(0), 1 << 20).unwrap();
    let io = pool.open(&r(0)).unwrap();
    io.write_at(&[7u8; 4096], 0).unwrap();
    // The stale engine's descriptor, opened under claim 1 long ago.
    let stale = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join(r(0)))
        .unwrap();
    io.fence_empty().unwrap();
    stale.write_all_at(&[9u8; 4096], 0).unwrap();
    stale.write_all_at(&[9u8; 4096], 8192).unwrap();
    let mut back = vec![1u8; 3 * 4096];
    io.read_at(&mut back, 0).unwrap();
    assert!(back.iter().all(|&b| b == 0), "the replica reads empty");
    assert_eq!(pool.size_of(&r(0)).unwrap(), Some(1 << 20));
    // The rebuild writes where the agent and every later open look.
    io.write_at(&[3u8; 4096], 0).unwrap();
    let on_disk = std::fs::read(dir.path().join(r(0))).unwrap();
    assert_eq!(on_disk.len(), 1 << 20);
    assert_eq!(&on_disk[..4096], &[3u8; 4096][..]);
    assert!(on_disk[8192..12288].iter().all(|&b| b == 0));
    assert!(
        std::fs::read_dir(dir.path()).unwrap().count() == 1,
        "no temporary file left"
    );
    // An engine of the older claim cannot empty it again.
    let old = client(addr, TOKEN);
    old.act_under_claim(1);
    let err = RemotePool::new(old, "p")
        .open(&r(0))
        .unwrap()
        .fence_empty()
        .unwrap_err();
    assert!(err.to_string().contains("may not fence it"), "{err}");
    io.read_at(&mut back[..4096], 0).unwrap();
    assert_eq!(&back[..4096], &[3u8; 4096][..]);
}

#[test]
fn a_claim_floor_outlives_an_agent_restart_and_goes_with_its_replica() {
    let dir = tempfile::tempdir().unwrap();
    let fences = dir.path().join("fences");
    let pool_dir = dir.path().join("pool");
    std::fs::create_dir_all(&pool_dir).unwrap();
    let agent = || agent(TOKEN, &pool_dir).with_fence_dir(&fences);
    let first = start_agent_with(agent());
    let holder = client(first, TOKEN);
    holder.act_under_claim(2);
    let pool = RemotePool::new(holder, "p");
    pool.create(&r(0), 1 << 20).unwrap();
    pool.open(&r(0)).unwrap().fence().unwrap();
    // The same node's agent, restarted (a second instance on the same dirs).
    let second = start_agent_with(agent());
    let old = client(second, TOKEN);
    old.act_under_claim(1);
    let old_io = RemotePool::new(old, "p").open(&r(0)).unwrap();
    let err = old_io.write_at(&[1u8; 4096], 0).unwrap_err();
    assert!(err.to_string().contains("claim 2 fenced it"), "{err}");
    // Deleting the replica forgets its floor: a new one starts afresh.
    let admin = RemotePool::new(client(second, TOKEN), "p");
    admin.delete(&r(0)).unwrap();
    assert!(!fences.join(format!("p/{}.claim", r(0))).exists());
    admin.create(&r(0), 1 << 20).unwrap();
    old_io.write_at(&[1u8; 4096], 0).unwrap();
}

/// A raw connection to an agent (inside TLS, as node `n`): frames in,
/// answers out.
struct Raw {
    stream: Stream,
    id: u64,
}

impl Raw {
    fn over(tcp: TcpStream) -> std::io::Result<Raw> {
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut stream =
            tls("n").connect(tcp, "node-a", Instant::now() + Duration::from_secs(10))?;
        stream.set_deadline(None);
        Ok(Raw { stream, id: 0 })
    }

    fn connect(addr: SocketAddr) -> Raw {
        Raw::over(TcpStream::connect(addr).unwrap()).unwrap()
    }

    fn hello(addr: SocketAddr) -> Raw {
        let mut raw = Raw::connect(addr);
        let resp = raw.call(&Request::Hello {
            token: TOKEN.to_vec(),
            node: "n".into(),
            claim: 0,
        });
        assert!(matches!(resp, Response::Hello { .. }), "{resp:?}");
        raw
    }

    fn call(&mut self, req: &Request) -> Response {
        self.id += 1;
        self.stream.send(&req.encode(self.id)).unwrap();
        self.answer()
    }

    fn answer(&mut self) -> Response {
        let (h, p) = super::protocol::read_frame(&mut self.stream)
            .unwrap()
            .expect("an answer, not a closed connection");
        Response::decode(h.kind, &p).unwrap()
    }

    /// Whether the agent closed the connection (EOF or reset) by `within`.
    fn closed_within(&mut self, within: Duration) -> bool {
        self.stream.tcp().set_read_timeout(Some(within)).unwrap();
        closed(&mut self.stream)
    }
}

/// Whether `stream`'s peer closed it (EOF or reset) before its read timeout.
fn closed(stream: &mut impl Read) -> bool {
    {
        let mut byte = [0u8; 1];
        loop {
            match stream.read(&mut byte) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return false;
                }
                Err(_) => return true,
            }
        }
    }
}

fn errno_of(resp: &Response) -> i32 {
    match resp {
        Response::Error { errno, .. } => *errno,
        other => panic!("expected an error, got {other:?}"),
    }
}

fn message_of(resp: &Response) -> &str {
    match resp {
        Response::Error { message, .. } => message,
        other => panic!("expected an error, got {other:?}"),
    }
}

/// Every request naming a replica, with `pool` and `name`.
fn every_named_request(pool: &str, name: &str) -> Vec<Request> {
    let (pool, name) = (pool.to_string(), name.to_string());
    vec![
        Request::Create {
            pool: pool.clone(),
            name: name.clone(),
            size: 4096,
        },
        Request::Grow {
            pool: pool.clone(),
            name: name.clone(),
            size: 8192,
        },
        Request::Stat {
            pool: pool.clone(),
            name: name.clone(),
        },
        Request::Read {
            pool: pool.clone(),
            name: name.clone(),
            offset: 0,
            len: 4096,
        },
        Request::Write {
            pool: pool.clone(),
            name: name.clone(),
            offset: 0,
            data: vec![1; 4096],
        },
        Request::Flush {
            pool: pool.clone(),
            name: name.clone(),
        },
        Request::Discard {
            pool: pool.clone(),
            name: name.clone(),
            offset: 0,
            len: 4096,
        },
        Request::Check {
            pool: pool.clone(),
            name: name.clone(),
        },
        Request::Fence {
            pool: pool.clone(),
            name: name.clone(),
        },
        Request::FenceEmpty {
            pool: pool.clone(),
            name: name.clone(),
        },
        Request::Delete { pool, name },
    ]
}

/// Names that are no replica file name get EINVAL, on a connection that
/// stays open, and nothing outside the pool (or the fence dir) is touched.
#[test]
fn names_that_would_leave_the_pool_get_a_specific_error_and_touch_nothing() {
    let root = tempfile::tempdir().unwrap();
    let pool_dir = root.path().join("pools/p");
    let fences = root.path().join("fences");
    std::fs::create_dir_all(&pool_dir).unwrap();
    // What an escape would read, overwrite or remove.
    let config = root.path().join("terna.toml");
    std::fs::write(&config, b"secret").unwrap();
    let addr = start_agent_with(agent(TOKEN, &pool_dir).with_fence_dir(&fences));
    let mut raw = Raw::hello(addr);
    let long = "a".repeat(4096);
    let abs = config.display().to_string();
    let bad_names = [
        "../../terna.toml",
        "../../etc/passwd",
        "/etc/passwd",
        abs.as_str(),
        "a/b",
        "tv-0123456789abcdef01234567.r0.img\0",
        "\0",
        long.as_str(),
        ".",
        "..",
        "",
        "terna.toml",
    ];
    for name in bad_names {
        for req in every_named_request("p", name) {
            let resp = raw.call(&req);
            assert_eq!(errno_of(&resp), libc::EINVAL, "{req:?}: {resp:?}");
            assert!(
                message_of(&resp).contains("not a replica file name"),
                "{resp:?}"
            );
            assert!(message_of(&resp).len() < 400, "{resp:?}");
        }
    }
    for pool in ["..", ".", "../p", "/", "p/..", "\0", long.as_str()] {
        for req in every_named_request(pool, &r(0)) {
            let resp = raw.call(&req);
            assert_eq!(errno_of(&resp), libc::EINVAL, "{req:?}: {resp:?}");
        }
        let resp = raw.call(&Request::Capacity { pool: pool.into() });
        assert_eq!(errno_of(&resp), libc::EINVAL, "{resp:?}");
    }
    // The connection still serves, and nothing moved outside the pool.
    assert_eq!(
        raw.call(&Request::Create {
            pool: "p".into(),
            name: r(0),
            size: 4096
        }),
        Response::Ok
    );
    assert_eq!(std::fs::read(&config).unwrap(), b"secret");
    let mut left: Vec<_> = walk(root.path());
    left.sort();
    let mut expected = vec![config.clone(), pool_dir.join(r(0))];
    expected.sort();
    assert_eq!(left, expected);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if std::fs::symlink_metadata(&path).unwrap().is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// A symbolic link planted in a pool under a replica's name leads nowhere:
/// no request reads, writes or sizes its target, and Delete removes the link.
#[test]
fn a_symlink_planted_in_a_pool_is_never_followed_by_the_agent() {
    let root = tempfile::tempdir().unwrap();
    let pool_dir = root.path().join("pool");
    std::fs::create_dir_all(&pool_dir).unwrap();
    let target = root.path().join("token");
    std::fs::write(&target, b"the cluster token").unwrap();
    std::os::unix::fs::symlink(&target, pool_dir.join(r(0))).unwrap();
    let addr = start_agent(&pool_dir);
    let mut raw = Raw::hello(addr);
    for req in every_named_request("p", &r(0)) {
        let resp = raw.call(&req);
        match req {
            Request::Delete { .. } => assert_eq!(resp, Response::Ok),
            _ => {
                assert!(matches!(resp, Response::Error { .. }), "{req:?}: {resp:?}");
            }
        }
    }
    assert_eq!(std::fs::read(&target).unwrap(), b"the cluster token");
    assert!(std::fs::symlink_metadata(pool_dir.join(r(0))).is_err());
}

/// Offsets and lengths outside the replica, or overflowing, are refused
/// before any I/O; zero lengths are fine; absurd sizes are refused.
#[test]
fn offsets_lengths_and_sizes_outside_the_replica_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start_agent(dir.path());
    let mut raw = Raw::hello(addr);
    let size = 1u64 << 20;
    let name = r(0);
    let create = |size| Request::Create {
        pool: "p".into(),
        name: name.clone(),
        size,
    };
    let resp = raw.call(&create(u64::MAX));
    assert_eq!(errno_of(&resp), libc::EFBIG, "{resp:?}");
    assert!(!dir.path().join(&name).exists());
    assert_eq!(raw.call(&create(size)), Response::Ok);
    let read = |offset, len| Request::Read {
        pool: "p".into(),
        name: name.clone(),
        offset,
        len,
    };
    let write = |offset, data: Vec<u8>| Request::Write {
        pool: "p".into(),
        name: name.clone(),
        offset,
        data,
    };
    let discard = |offset, len| Request::Discard {
        pool: "p".into(),
        name: name.clone(),
        offset,
        len,
    };
    for req in [
        read(size, 1),
        read(size - 10, 4096),
        read(u64::MAX, 4096),
        read(u64::MAX - 100, 4096),
        write(size, vec![1; 1]),
        write(size - 4095, vec![1; 4096]),
        write(u64::MAX - 10, vec![1; 4096]),
        discard(0, size + 1),
        discard(u64::MAX, 1),
        discard(1, u64::MAX),
        Request::Grow {
            pool: "p".into(),
            name: name.clone(),
            size: u64::MAX,
        },
    ] {
        let resp = raw.call(&req);
        assert!(
            matches!(errno_of(&resp), libc::EINVAL | libc::EFBIG),
            "{req:?}: {resp:?}"
        );
    }
    let resp = raw.call(&read(0, u32::MAX));
    assert!(message_of(&resp).contains("frame limit"), "{resp:?}");
    // The file never grew past its size.
    assert_eq!(
        std::fs::metadata(dir.path().join(&name)).unwrap().len(),
        size
    );
    // Zero lengths, and ranges ending exactly at the end, are served.
    assert_eq!(raw.call(&read(size, 0)), Response::Data { data: vec![] });
    assert_eq!(raw.call(&write(size, vec![])), Response::Ok);
    assert_eq!(raw.call(&discard(size, 0)), Response::Ok);
    assert_eq!(raw.call(&write(size - 4096, vec![9; 4096])), Response::Ok);
    assert_eq!(
        raw.call(&read(size - 4096, 4096)),
        Response::Data {
            data: vec![9; 4096]
        }
    );
    // Replicas that do not exist: refused, and no claim floor is made.
    let fences = dir.path().join("fences");
    let missing = r(7);
    let addr = start_agent_with(agent(TOKEN, dir.path()).with_fence_dir(&fences));
    let mut raw = Raw::hello(addr);
    for req in every_named_request("p", &missing) {
        let resp = raw.call(&req);
        match req {
            Request::Create { .. } | Request::Stat { .. } | Request::Delete { .. } => {
                assert!(!matches!(resp, Response::Error { .. }), "{req:?}: {resp:?}");
                // Delete the one Create made, so the rest find nothing.
                if let Request::Create { .. } = req {
                    std::fs::remove_file(dir.path().join(&missing)).unwrap();
                }
            }
            _ => assert_eq!(errno_of(&resp), libc::ENOENT, "{req:?}: {resp:?}"),
        }
    }
    assert!(
        !fences.exists(),
        "a floor for a replica that does not exist"
    );
}

/// The agent's own token can never be empty in effect: an agent built with
/// one refuses every Hello, the empty one included.
#[test]
fn an_agent_with_an_empty_token_refuses_everyone() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start_agent_with(agent(b"", dir.path()));
    for token in [&b""[..], TOKEN] {
        let mut raw = Raw::connect(addr);
        let resp = raw.call(&Request::Hello {
            token: token.to_vec(),
            node: "n".into(),
            claim: 0,
        });
        assert_eq!(errno_of(&resp), libc::EACCES, "{resp:?}");
        assert!(raw.closed_within(Duration::from_secs(5)));
    }
    let pool = RemotePool::new(client(addr, b""), "p");
    assert!(pool.create(&r(0), 4096).is_err());
    assert!(!dir.path().join(r(0)).exists());
}

/// `terna agent` with the default configuration (no token file) refuses to
/// start, naming the key and how to make a token.
#[test]
fn the_agent_will_not_start_without_a_cluster_token() {
    let dir = tempfile::tempdir().unwrap();
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let err = crate::roles::agent::run(crate::roles::agent::Args {
        data_dir: dir.path().to_path_buf(),
        listen,
        node_id: Some("n".into()),
    })
    .unwrap_err();
    assert!(err.message.contains("cluster_token_file"), "{err}");
    assert!(err.message.contains("openssl rand -hex 32"), "{err}");
    std::fs::write(dir.path().join("token"), "too-short\n").unwrap();
    let text = std::fs::read_to_string(dir.path().join("terna.toml")).unwrap();
    std::fs::write(
        dir.path().join("terna.toml"),
        format!("cluster_token_file = \"token\"\n{text}"),
    )
    .unwrap();
    let err = crate::roles::agent::run(crate::roles::agent::Args {
        data_dir: dir.path().to_path_buf(),
        listen,
        node_id: Some("n".into()),
    })
    .unwrap_err();
    assert!(err.message.contains("fewer than the 16"), "{err}");
}

/// Before Hello: frames bigger than the pre-authentication limit are
/// refused from their header (answered, closed, payload never read), other
/// requests are refused, and a peer that says nothing is dropped.
#[test]
fn before_hello_big_frames_are_refused_and_silent_peers_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start_agent_with(agent(TOKEN, dir.path()).with_limits(super::server::Limits {
        hello_timeout: Duration::from_millis(500),
        ..Default::default()
    }));
    // A header announcing 4 MiB, as a Hello and as a Write.
    for kind_of in [
        Request::Hello {
            token: TOKEN.to_vec(),
            node: "n".into(),
            claim: 0,
        },
        Request::Write {
            pool: "p".into(),
            name: r(0),
            offset: 0,
            data: vec![],
        },
    ] {
        let mut head = kind_of.encode(1)[..super::protocol::HEADER_LEN].to_vec();
        head[16..20].copy_from_slice(&(4u32 << 20).to_le_bytes());
        let crc = crc32c::crc32c(&head[..20]);
        head[20..24].copy_from_slice(&crc.to_le_bytes());
        let mut raw = Raw::connect(addr);
        let start = Instant::now();
        raw.stream.send(&head).unwrap();
        let resp = raw.answer();
        assert_eq!(errno_of(&resp), libc::EMSGSIZE, "{resp:?}");
        assert!(raw.closed_within(Duration::from_secs(5)));
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
    }
    // Silence, before the TLS handshake and after it, and a trickle too
    // slow to finish a Hello in time: dropped.
    let mut silent = TcpStream::connect(addr).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(closed(&mut silent));
    let mut silent = Raw::connect(addr);
    assert!(silent.closed_within(Duration::from_secs(10)));
    let mut slow = Raw::connect(addr);
    let hello = Request::Hello {
        token: TOKEN.to_vec(),
        node: "n".into(),
        claim: 0,
    }
    .encode(1);
    let start = Instant::now();
    for byte in &hello[..10] {
        if slow.stream.send(&[*byte]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(150));
    }
    assert!(slow.closed_within(Duration::from_secs(10)));
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "{:?}",
        start.elapsed()
    );
    // A Hello in time is served.
    Raw::hello(addr);
}

/// Beyond `max_connections`, new connections are closed at once; a place
/// freed is taken again.
#[test]
fn connections_beyond_the_limit_are_closed_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start_agent_with(agent(TOKEN, dir.path()).with_limits(super::server::Limits {
        max_connections: 4,
        ..Default::default()
    }));
    let mut held: Vec<Raw> = (0..4).map(|_| Raw::hello(addr)).collect();
    for _ in 0..3 {
        let mut extra = TcpStream::connect(addr).unwrap();
        extra
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert!(closed(&mut extra));
    }
    // The held ones still serve.
    for raw in &mut held {
        assert!(matches!(
            raw.call(&Request::Capacity { pool: "p".into() }),
            Response::Capacity { .. }
        ));
    }
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let hello = Request::Hello {
            token: TOKEN.to_vec(),
            node: "n".into(),
            claim: 0,
        };
        if let Ok(mut raw) = Raw::over(TcpStream::connect(addr).unwrap())
            && raw.stream.send(&hello.encode(1)).is_ok()
            && let Ok(Some((h, p))) = super::protocol::read_frame(&mut raw.stream)
        {
            assert!(matches!(
                Response::decode(h.kind, &p).unwrap(),
                Response::Hello { .. }
            ));
            break;
        }
        assert!(Instant::now() < deadline, "the freed place was not reused");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn one_address_saying_nothing_cannot_take_every_place() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start_agent_with(agent(TOKEN, dir.path()));
    // Silent connections from 127.0.0.1, more than one address may hold.
    let silent: Vec<TcpStream> = (0..super::server::MAX_UNAUTHENTICATED_PER_PEER + 8)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    let mut extra = TcpStream::connect(addr).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert!(closed(&mut extra));
    // Another peer address still gets in at once.
    let mut raw = Raw::over(connect_from("127.0.0.2", addr)).unwrap();
    let resp = raw.call(&Request::Hello {
        token: TOKEN.to_vec(),
        node: "n".into(),
        claim: 0,
    });
    assert!(matches!(resp, Response::Hello { .. }), "{resp:?}");
    drop(silent);
}

/// A TCP connection to `to` from the local address `from` (any of 127/8
/// is this machine's loopback).
fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stream = rt
        .block_on(async {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(format!("{from}:0").parse().unwrap())?;
            socket.connect(to).await
        })
        .unwrap()
        .into_std()
        .unwrap();
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// The client names the node it means to reach: an agent whose
/// certificate is another node's (a recycled address, a wrong entry) is
/// refused at the handshake, before the token is sent.
#[test]
fn a_client_refuses_an_agent_whose_certificate_is_another_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start_agent(dir.path());
    let wrong = RemotePool::new(
        Arc::new(Client::new(
            addr,
            "node-x",
            TOKEN,
            "node-b",
            Duration::from_secs(2),
            tls("node-b"),
        )),
        "p",
    );
    let err = wrong.create(&r(0), 4096).unwrap_err().report().to_string();
    assert!(err.contains("not valid for name"), "{err}");
    assert!(!dir.path().join(r(0)).exists());
}

/// The node that took a volume over writes its own replica as a local
/// file; a stale engine elsewhere writes it through this node's agent. A
/// local file's fence stops nobody: the fence must reach the agent.
#[test]
fn a_takers_own_replica_is_fenced_through_its_agent_against_a_stale_engine() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start_agent(dir.path());
    let stale_client = client(addr, TOKEN);
    stale_client.act_under_claim(1);
    let stale = RemotePool::new(stale_client, "p");
    stale.create(&r(0), 1 << 20).unwrap();
    let stale_io = stale.open(&r(0)).unwrap();
    stale_io.write_at(&[1u8; 4096], 0).unwrap();
    // A local file's own fence: the stale engine still writes.
    let local = LocalPool::new(dir.path(), None).unwrap();
    local.open(&r(0)).unwrap().fence().unwrap();
    stale_io.write_at(&[2u8; 4096], 0).unwrap();
    // Fenced through the agent under the taker's claim: refused.
    let taker_client = client(addr, TOKEN);
    let taker = crate::datapath::replica::agent_fenced::AgentFencedPool::new(
        LocalPool::new(dir.path(), None).unwrap(),
        RemotePool::new(taker_client, "p"),
    );
    taker.act_under_claim(2);
    let io = taker.open(&r(0)).unwrap();
    assert!(io.direct_fd().is_some(), "still the local file");
    io.fence().unwrap();
    let err = stale_io.write_at(&[3u8; 4096], 0).unwrap_err();
    assert!(err.to_string().contains("before its fence"), "{err}");
    // Nor on a connection of its own made afresh.
    let again = client(addr, TOKEN);
    again.act_under_claim(1);
    let err = RemotePool::new(again, "p")
        .open(&r(0))
        .unwrap()
        .write_at(&[3u8; 4096], 0)
        .unwrap_err();
    assert!(err.to_string().contains("claim 2 fenced it"), "{err}");
    io.write_at(&[4u8; 4096], 0).unwrap();
    let mut back = [0u8; 4096];
    io.read_at(&mut back, 0).unwrap();
    assert_eq!(back, [4u8; 4096]);
}
