//! `terna agent` as a process, under hostile peers: what it costs to talk
//! to it before authenticating (threads, memory, file descriptors, log
//! lines) stays bounded, and it will not start without a cluster token.
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

const TOKEN: &str = "agent-test-token-0123456789abcdef";

struct Agent {
    _dir: tempfile::TempDir,
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
    std::fs::write(data.join("token"), format!("{TOKEN}\n")).unwrap();
    std::fs::write(
        data.join("terna.toml"),
        format!(
            "cluster_token_file = \"token\"\n{extra}\n[[pools]]\nname = \"p\"\npath = \"pools/p\"\ntier = \"standard\"\n"
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

    /// A connection that said Hello, or `None` if the agent did not answer.
    fn hello(&self, within: Duration) -> Option<TcpStream> {
        let mut s = TcpStream::connect_timeout(&self.addr, within).ok()?;
        s.set_read_timeout(Some(within)).unwrap();
        s.set_write_timeout(Some(within)).unwrap();
        let hello = Request::Hello {
            token: TOKEN.as_bytes().to_vec(),
            node: "test".into(),
            claim: 0,
        };
        s.write_all(&hello.encode(1)).ok()?;
        let (h, p) = read_frame(&mut s).ok()??;
        matches!(Response::decode(h.kind, &p).ok()?, Response::Hello { .. }).then_some(s)
    }
}

/// Whether the peer closed `s` (EOF or reset) within `within`.
fn closed_within(mut s: &TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
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
        let mut s = TcpStream::connect(agent.addr).unwrap();
        s.write_all(&head).unwrap();
        conns.push(s);
    }
    let mut refused = 0;
    for s in &mut conns {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        if let Ok(Some((h, p))) = read_frame(s)
            && let Ok(Response::Error { errno, .. }) = Response::decode(h.kind, &p)
        {
            assert_eq!(errno, libc::EMSGSIZE);
            refused += 1;
        }
        assert!(closed_within(s, Duration::from_secs(5)));
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
