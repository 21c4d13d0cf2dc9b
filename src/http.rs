//! A minimal HTTP/1.1 endpoint for Prometheus and probes: GET /metrics,
//! /healthz and /readyz, one short request per connection. Thread per
//! connection, bounded reads, nothing else served.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::error::{Error, Result};

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

fn serve_one(mut stream: TcpStream, probe: &dyn Probe) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    {
        let mut reader = BufReader::new((&stream).take_bounded());
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

/// Serves on `addr` from a background thread.
pub fn spawn(addr: SocketAddr, probe: Arc<dyn Probe>) -> Result<()> {
    let listener =
        TcpListener::bind(addr).map_err(|e| Error::io(format!("cannot listen on {addr}"), e))?;
    info!(%addr, "metrics and health endpoint serving");
    std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => {
                        let probe = probe.clone();
                        let _ = std::thread::Builder::new()
                            .name("http-conn".into())
                            .spawn(move || serve_one(stream, probe.as_ref()));
                    }
                    Err(e) => warn!(error = %e, "metrics endpoint accept failed"),
                }
            }
        })
        .map_err(|e| Error::io("cannot start the metrics endpoint", e))?;
    Ok(())
}
