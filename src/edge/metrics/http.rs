//! A minimal HTTP/1.1 endpoint for Prometheus and probes: GET /metrics,
//! /healthz and /readyz, one short request per connection. Thread per
//! connection (at most 16 at once), bounded reads, nothing else served.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::core::error::{Error, Result};

/// What the endpoint answers with.
pub trait Probe: Send + Sync + 'static {
    /// The /metrics body.
    fn metrics(&self) -> String;
    /// Ready to serve (for /readyz); `Err` says why not.
    fn ready(&self) -> std::result::Result<(), String>;
}

fn respond(stream: &mut TcpStream, status: &str, content_type: &str, body: &str) {
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Reads from a connection until a deadline for the whole request, so a
/// client sending a byte now and then cannot hold a connection slot.
struct ByDeadline<'a> {
    stream: &'a TcpStream,
    until: Instant,
}

impl std::io::Read for ByDeadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        let mut stream = self.stream;
        std::io::Read::read(&mut stream, buf)
    }
}

/// The whole request must arrive within this.
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

fn serve_one(mut stream: TcpStream, probe: &dyn Probe) {
    let mut line = String::new();
    {
        let deadline = ByDeadline {
            stream: &stream,
            until: Instant::now() + REQUEST_DEADLINE,
        };
        let mut reader = BufReader::new(deadline.take_bounded());
        if reader.read_line(&mut line).is_err() {
            return;
        }
        // Drain the headers; the request has no body we care about.
        let mut header = String::new();
        while reader.read_line(&mut header).is_ok_and(|n| n > 2) {
            header.clear();
        }
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n",
        );
        return;
    }
    match path {
        "/metrics" => respond(
            &mut stream,
            "200 OK",
            "text/plain; version=0.0.4",
            &probe.metrics(),
        ),
        "/healthz" => respond(&mut stream, "200 OK", "text/plain", "ok\n"),
        "/readyz" => match probe.ready() {
            Ok(()) => respond(&mut stream, "200 OK", "text/plain", "ok\n"),
            Err(why) => respond(
                &mut stream,
                "503 Service Unavailable",
                "text/plain",
                &format!("{why}\n"),
            ),
        },
        _ => respond(&mut stream, "404 Not Found", "text/plain", "not found\n"),
    }
}

trait TakeBounded: Sized {
    fn take_bounded(self) -> std::io::Take<Self>;
}

impl<R: std::io::Read> TakeBounded for R {
    /// Requests are a few hundred bytes; nobody gets to send more than 16 KiB.
    fn take_bounded(self) -> std::io::Take<Self> {
        std::io::Read::take(self, 16 * 1024)
    }
}

/// Connections served at once; more are closed at once. Scrapes and probes
/// are a handful per minute, so this only bites a flood.
const MAX_CONNECTIONS: usize = 16;

/// Serves on `addr` from a background thread.
pub fn spawn(addr: SocketAddr, probe: Arc<dyn Probe>) -> Result<()> {
    let listener =
        TcpListener::bind(addr).map_err(|e| Error::io(format!("cannot listen on {addr}"), e))?;
    info!(%addr, "metrics and health endpoint serving");
    serve_on(listener, probe)
}

fn serve_on(listener: TcpListener, probe: Arc<dyn Probe>) -> Result<()> {
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            let mut backoff = Duration::ZERO;
            let mut last_warning: Option<Instant> = None;
            let mut warn_rarely = |what: &str, error: &dyn std::fmt::Display| {
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    warn!(%error, "metrics endpoint: {what}");
                    last_warning = Some(Instant::now());
                }
            };
            for stream in listener.incoming() {
                let stream = match stream {
                    Ok(stream) => {
                        backoff = Duration::ZERO;
                        stream
                    }
                    Err(e) => {
                        // Out of file descriptors: accepting again at once
                        // would spin and flood the log.
                        warn_rarely("accept failed; backing off", &e);
                        backoff =
                            (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                        std::thread::sleep(backoff);
                        continue;
                    }
                };
                if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                    active.fetch_sub(1, Ordering::AcqRel);
                    warn_rarely("too many connections; closing new ones", &MAX_CONNECTIONS);
                    continue;
                }
                let (probe, done) = (probe.clone(), active.clone());
                let spawned =
                    std::thread::Builder::new()
                        .name("http-conn".into())
                        .spawn(move || {
                            serve_one(stream, probe.as_ref());
                            done.fetch_sub(1, Ordering::AcqRel);
                        });
                if let Err(e) = spawned {
                    active.fetch_sub(1, Ordering::AcqRel);
                    warn_rarely("cannot start a connection thread", &e);
                }
            }
        })
        .map_err(|e| Error::io("cannot start the metrics endpoint", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    struct Fixed;
    impl Probe for Fixed {
        fn metrics(&self) -> String {
            "up 1\n".into()
        }
        fn ready(&self) -> std::result::Result<(), String> {
            Ok(())
        }
    }

    fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    }

    #[test]
    fn a_client_trickling_its_request_is_cut_off_at_the_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        serve_on(listener, Arc::new(Fixed)).unwrap();
        let mut slow = TcpStream::connect(addr).unwrap();
        slow.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let started = Instant::now();
        let mut buf = [0u8; 64];
        // A byte every 200 ms never completes a line; each read alone is
        // far inside any per-read timeout.
        loop {
            assert!(
                started.elapsed() < REQUEST_DEADLINE * 4,
                "the trickling client still holds its connection"
            );
            if slow.write_all(b"G").is_err() {
                break;
            }
            match slow.read(&mut buf) {
                Ok(_) => break,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => break,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(started.elapsed() >= REQUEST_DEADLINE / 2);
    }

    #[test]
    fn a_flood_of_idle_connections_is_capped_and_service_resumes() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        serve_on(listener, Arc::new(Fixed)).unwrap();
        assert!(get(addr, "/healthz").unwrap().starts_with("HTTP/1.1 200"));
        let idle: Vec<TcpStream> = (0..MAX_CONNECTIONS + 8)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        // Connections past the cap are closed without being served.
        let mut extra = TcpStream::connect(addr).unwrap();
        extra
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(extra.read(&mut buf).unwrap_or(0), 0);
        drop(idle);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match get(addr, "/metrics") {
                Ok(body) if body.contains("up 1") => break,
                _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                other => panic!("not served again: {other:?}"),
            }
        }
    }
}
