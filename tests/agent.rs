//! `terna agent` as a process, under hostile peers: what it costs to talk
//! to it before authenticating (threads, memory, file descriptors, log
//! lines) stays bounded, it will not start without a cluster token, and a
//! peer without a certificate of the cluster CA for the node it claims to
//! be is refused before any request is served.
//! Measured from /proc/<pid>/status of the spawned agent. Timing bounds are
//! loose: they must hold on a loaded 2-core machine. Needs no root.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use terna::datapath::agent::protocol::read_frame;
use terna::datapath::agent::protocol::{HEADER_LEN, Request, Response};
use terna::datapath::agent::transport::{Stream, Transport};
use terna::datapath::tls::Identity;

const TOKEN: &str = "agent-test-token-0123456789abcdef";

struct Agent {
    _dir: tempfile::TempDir,
    /// The cluster CA the agent's `cluster_ca_file` names.
    ca: PathBuf,
    /// Its pool's directory.
    pool: PathBuf,
    log: PathBuf,
    addr: SocketAddr,
    child: Child,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Starts `terna agent` on a fresh data dir whose terna.toml gets `extra`;
/// `nofile` caps its file descriptors.
fn start(extra: &str, nofile: Option<u64>) -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let ca = dir.path().join("ca.json");
    terna::datapath::tls::store::ensure(&ca).unwrap();
    std::fs::write(data.join("token"), format!("{TOKEN}\n")).unwrap();
    std::fs::write(
        data.join("terna.toml"),
        format!(
            "cluster_token_file = \"token\"\ncluster_ca_file = {ca:?}\n{extra}\n[[pools]]\nname = \"p\"\npath = \"pools/p\"\ntier = \"standard\"\n"
        ),
    )
    .unwrap();
    let log = dir.path().join("agent.log");
    let addr = free_addr();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_terna"));
    cmd.args(["agent", "--node-id", "n1", "--listen", &addr.to_string()])
        .arg("--data-dir")
        .arg(&data)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    if let Some(n) = nofile {
        // SAFETY: runs in the forked child before exec; setrlimit is
        // async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: n,
                    rlim_max: n,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    let child = cmd.spawn().unwrap();
    let agent = Agent {
        _dir: dir,
        ca,
        pool: data.join("pools/p"),
        log,
        addr,
        child,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "agent did not listen: {}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    agent
}

impl Agent {
    fn status(&self, field: &str) -> u64 {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    fn threads(&self) -> u64 {
        self.status("Threads:")
    }

    fn rss_kib(&self) -> u64 {
        self.status("VmRSS:")
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_lines(&self) -> usize {
        self.log_text().lines().count()
    }

    /// A TLS connection as node `test`, with a certificate of the agent's
    /// CA, or `None` if the agent did not take it.
    fn tls(&self, within: Duration) -> Option<Stream> {
        let tcp = TcpStream::connect_timeout(&self.addr, within).ok()?;
        tcp.set_read_timeout(Some(within)).unwrap();
        tcp.set_write_timeout(Some(within)).unwrap();
        let identity = Identity::from_file("test", self.ca.clone());
        let mut s = Transport::Tls(identity)
            .connect(tcp, "n1", Instant::now() + within)
            .ok()?;
        s.set_deadline(None);
        Some(s)
    }

    /// A connection that said Hello, or `None` if the agent did not answer.
    fn hello(&self, within: Duration) -> Option<Stream> {
        let mut s = self.tls(within)?;
        let hello = Request::Hello {
            token: TOKEN.as_bytes().to_vec(),
            node: "test".into(),
            claim: 0,
        };
        s.send(&hello.encode(1)).ok()?;
        let (h, p) = read_frame(&mut s).ok()??;
        matches!(Response::decode(h.kind, &p).ok()?, Response::Hello { .. }).then_some(s)
    }
}

/// Whether the peer closed `s` (EOF or reset) within `within`.
fn closed_within(mut s: &TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    closed(&mut s)
}

/// Whether the peer closed `s` (EOF or reset) before its read timeout.
fn closed(s: &mut impl Read) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
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

/// The agent's threads and memory do not grow with the connections opened
/// to it: beyond `agent_max_connections` they are closed at once, and
/// those it holds cost a thread each and no payload buffers.
#[test]
fn many_connections_leave_threads_and_memory_bounded() {
    let agent = start("agent_max_connections = 32", None);
    let (threads0, rss0) = (agent.threads(), agent.rss_kib());
    let mut conns = Vec::new();
    for _ in 0..400 {
        if let Ok(s) = TcpStream::connect_timeout(&agent.addr, Duration::from_secs(5)) {
            conns.push(s);
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let (threads, rss) = (agent.threads(), agent.rss_kib());
    assert!(
        threads <= threads0 + 32 + 4,
        "{threads} threads (from {threads0}) for 400 connections"
    );
    assert!(
        rss < rss0 + 48 * 1024,
        "RSS grew from {rss0} to {rss} KiB for 400 connections"
    );
    // The ones beyond the limit were closed at once.
    let closed = conns
        .iter()
        .rev()
        .take(100)
        .filter(|s| closed_within(s, Duration::from_millis(200)))
        .count();
    assert!(closed >= 90, "only {closed} of the last 100 were closed");
    drop(conns);
    // Held pre-auth ones time out, then everyone is served again.
    let deadline = Instant::now() + Duration::from_secs(30);
    while agent.hello(Duration::from_secs(2)).is_none() {
        assert!(Instant::now() < deadline, "agent never served again");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Headers announcing 4 MiB payloads before Hello are answered and closed
/// from the header alone: nothing is allocated for them.
#[test]
fn huge_frames_before_hello_are_refused_without_allocating() {
    let agent = start("", None);
    let rss0 = agent.rss_kib();
    let mut head = Request::Hello {
        token: vec![],
        node: String::new(),
        claim: 0,
    }
    .encode(1)[..HEADER_LEN]
        .to_vec();
    head[16..20].copy_from_slice(&(4u32 << 20).to_le_bytes());
    let crc = crc32c::crc32c(&head[..20]);
    head[20..24].copy_from_slice(&crc.to_le_bytes());
    let start = Instant::now();
    let mut conns = Vec::new();
    for _ in 0..100 {
        let mut s = agent.tls(Duration::from_secs(10)).unwrap();
        s.send(&head).unwrap();
        conns.push(s);
    }
    let mut refused = 0;
    for s in &mut conns {
        s.tcp()
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        if let Ok(Some((h, p))) = read_frame(s)
            && let Ok(Response::Error { errno, .. }) = Response::decode(h.kind, &p)
        {
            assert_eq!(errno, libc::EMSGSIZE);
            refused += 1;
        }
        s.tcp()
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert!(closed(s));
    }
    assert_eq!(refused, 100);
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "{:?}",
        start.elapsed()
    );
    let rss = agent.rss_kib();
    // 100 × 4 MiB would be 400 MiB.
    assert!(rss < rss0 + 32 * 1024, "RSS grew from {rss0} to {rss} KiB");
    assert!(agent.hello(Duration::from_secs(5)).is_some());
}

/// Out of file descriptors, the accept loop backs off instead of spinning:
/// few log lines, and the agent serves again once descriptors free up.
#[test]
fn running_out_of_file_descriptors_backs_off_and_recovers() {
    let agent = start("", Some(32));
    // Authenticated connections are kept, so they use up the descriptors.
    let mut held = Vec::new();
    for _ in 0..60 {
        match agent.hello(Duration::from_millis(500)) {
            Some(s) => held.push(s),
            None => break,
        }
    }
    assert!(!held.is_empty() && held.len() < 60, "{} held", held.len());
    // More knock meanwhile: they wait in the backlog, the agent at EMFILE.
    let waiting: Vec<_> = (0..20)
        .filter_map(|_| TcpStream::connect_timeout(&agent.addr, Duration::from_secs(1)).ok())
        .collect();
    let lines0 = agent.log_lines();
    std::thread::sleep(Duration::from_secs(3));
    let logged = agent.log_lines() - lines0;
    assert!(
        logged <= 20,
        "{logged} log lines in 3 s at EMFILE:\n{}",
        agent
            .log_text()
            .lines()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        agent.log_text().contains("cannot accept"),
        "{}",
        agent.log_text()
    );
    drop(held);
    drop(waiting);
    let deadline = Instant::now() + Duration::from_secs(30);
    while agent.hello(Duration::from_secs(2)).is_none() {
        assert!(Instant::now() < deadline, "agent never served again");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(agent.child_alive());
}

impl Agent {
    fn child_alive(&self) -> bool {
        Path::new(&format!("/proc/{}", self.child.id())).exists()
    }
}

/// With the default configuration (no token file), or a short token,
/// `terna agent` exits with an error naming the key and how to make one.
#[test]
fn the_agent_refuses_to_start_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let run = |data: &Path| {
        Command::new(env!("CARGO_BIN_EXE_terna"))
            .args([
                "agent",
                "--node-id",
                "n1",
                "--listen",
                &free_addr().to_string(),
            ])
            .arg("--data-dir")
            .arg(data)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let data = dir.path().join("data");
    let out = run(&data);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("cluster_token_file"), "{err}");
    assert!(err.contains("openssl rand -hex 32"), "{err}");
    std::fs::write(data.join("token"), "abc\n").unwrap();
    let config = std::fs::read_to_string(data.join("terna.toml")).unwrap();
    std::fs::write(
        data.join("terna.toml"),
        format!("cluster_token_file = \"token\"\n{config}"),
    )
    .unwrap();
    let out = run(&data);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("3 bytes, fewer than the 16"), "{err}");
}

/// `terna node` runs the same agent: without a token it stops before
/// listening or talking to the API server (which does not exist here).
#[test]
fn a_node_refuses_to_start_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:1\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\nusers:\n- name: u\n  user:\n    token: x\ncurrent-context: c\n",
    )
    .unwrap();
    let listen = free_addr();
    let out = Command::new(env!("CARGO_BIN_EXE_terna"))
        .args([
            "node",
            "--node-id",
            "n1",
            "--agent-listen",
            &listen.to_string(),
        ])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("cluster_token_file"), "{err}");
    assert!(err.contains("openssl rand -hex 32"), "{err}");
}

/// What a client with `cert` (chain and key; none: no certificate) gets
/// from the agent for a Hello with the right token followed by a Create of
/// `replica`: the answers it read before the connection ended.
fn try_with_certificate(
    agent: &Agent,
    cert: Option<(rustls::pki_types::CertificateDer<'static>, Vec<u8>)>,
    replica: &str,
) -> Vec<Response> {
    use rustls::pki_types::pem::PemObject;
    let set = terna::datapath::tls::store::load(&agent.ca).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for pem in set.trusted() {
        roots
            .add(rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap())
            .unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let config = match cert {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => builder
            .with_client_auth_cert(
                vec![chain],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.into()),
            )
            .unwrap(),
    };
    let conn = rustls::ClientConnection::new(
        std::sync::Arc::new(config),
        "n1.node.terna".try_into().unwrap(),
    )
    .unwrap();
    let tcp = TcpStream::connect(agent.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let requests = [
        Request::Hello {
            token: TOKEN.as_bytes().to_vec(),
            node: "test".into(),
            claim: 0,
        }
        .encode(1),
        Request::Create {
            pool: "p".into(),
            name: replica.into(),
            size: 1 << 20,
        }
        .encode(2),
    ]
    .concat();
    let mut answers = Vec::new();
    // In TLS 1.3 the client's side of the handshake ends before the server
    // has checked its certificate, so the requests may well be sent.
    if tls.write_all(&requests).and_then(|()| tls.flush()).is_ok() {
        while let Ok(Some((h, p))) = read_frame(&mut tls) {
            answers.push(Response::decode(h.kind, &p).unwrap());
        }
    }
    answers
}

fn replica_name(i: usize) -> String {
    terna::core::volume::replica_file_name(&terna::core::volume::volume_id_for("tls-tests"), i)
}

/// No certificate, a self-signed one, one of another CA, an expired one of
/// the right CA, one for another node than the Hello names, and plain text
/// with the right token: refused, nothing created; a good one is served.
#[test]
fn peers_without_a_valid_certificate_are_refused_and_served_nothing() {
    use terna::datapath::tls::ca;
    let agent = start("", None);
    let now = terna::datapath::tls::unix_now();
    let own = terna::datapath::tls::store::load(&agent.ca).unwrap();
    let other = ca::CaSet::create(now, ca::CA_LIFETIME).unwrap();
    let leaf = |ca: &ca::CaPair, name: &str, from: i64, life: Duration| {
        let l = ca::issue_leaf(ca, name, from, life).unwrap();
        Some((l.cert_der.into(), l.key_der))
    };
    let self_signed = {
        let c = rcgen::generate_simple_self_signed(vec!["test.node.terna".to_string()]).unwrap();
        Some((c.cert.der().clone(), c.signing_key.serialize_der()))
    };
    let day = Duration::from_secs(24 * 3600);
    let cases = [
        ("no certificate", None),
        ("a self-signed certificate", self_signed),
        (
            "a certificate of another CA",
            leaf(&other.current, "test", now, day),
        ),
        (
            "an expired certificate",
            leaf(&own.current, "test", now - 3 * 24 * 3600, day),
        ),
        (
            "another node's certificate",
            leaf(&own.current, "n7", now, day),
        ),
    ];
    for (i, (what, cert)) in cases.into_iter().enumerate() {
        let answers = try_with_certificate(&agent, cert, &replica_name(i));
        assert!(
            answers.iter().all(|a| matches!(
                a,
                Response::Error {
                    errno: libc::EACCES,
                    ..
                }
            )),
            "{what}: {answers:?}"
        );
        assert!(
            !answers.iter().any(|a| matches!(a, Response::Hello { .. })),
            "{what}: {answers:?}"
        );
    }
    // Plain text, our protocol with the right token: no handshake, no answer.
    let mut plain = TcpStream::connect(agent.addr).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let bytes = [
        Request::Hello {
            token: TOKEN.as_bytes().to_vec(),
            node: "test".into(),
            claim: 0,
        }
        .encode(1),
        Request::Create {
            pool: "p".into(),
            name: replica_name(9),
            size: 1 << 20,
        }
        .encode(2),
    ]
    .concat();
    let _ = plain.write_all(&bytes);
    let mut rest = Vec::new();
    let _ = plain.read_to_end(&mut rest);
    assert!(
        terna::datapath::agent::protocol::split_frame(&rest).is_err(),
        "plain text got an answer: {rest:?}"
    );
    for i in [0, 1, 2, 3, 4, 9] {
        assert!(
            !agent.pool.join(replica_name(i)).exists(),
            "replica {i} was created"
        );
    }
    // The right certificate for the node the Hello names is served.
    let good = leaf(&own.current, "test", now, day);
    let answers = try_with_certificate(&agent, good, &replica_name(5));
    assert!(
        matches!(answers.as_slice(), [Response::Hello { .. }, Response::Ok]),
        "{answers:?}"
    );
    assert!(agent.pool.join(replica_name(5)).exists());
}
