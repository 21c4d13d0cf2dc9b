//! What agent connections run over: mutual TLS 1.3, both ends presenting
//! a certificate of the cluster CA for their identity (`tls::Identity`).
//! The client names the node it means to reach, and the server's
//! certificate must be for that node; the server takes any client the CA
//! vouches for, and then requires the node its Hello names to be the
//! certificate's. The cluster token in the Hello is checked as before,
//! now inside the encrypted session.
//!
//! `Transport::Plain` is the protocol without TLS. No role makes one: it
//! is there so `bench/agent_tls.rs` can say what TLS costs.
//!
//! Deadlines: a `Sock` given a deadline bounds every read and write of the
//! socket by it, so a handshake or Hello trickled in byte by byte still
//! ends on time; without one, the socket's own timeouts bound each call.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Instant;

use rustls::{ClientConnection, ServerConnection, StreamOwned};

use crate::datapath::tls::{Identity, identity};

#[derive(Clone)]
pub enum Transport {
    Tls(Arc<Identity>),
    /// Unencrypted and unauthenticated but for the token: benchmarks only.
    Plain,
}

/// A TCP socket whose reads and writes can be bounded by one deadline.
pub struct Sock {
    tcp: TcpStream,
    deadline: Option<Instant>,
}

impl Sock {
    fn left(&self) -> io::Result<Option<std::time::Duration>> {
        match self.deadline {
            None => Ok(None),
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"))
                } else {
                    Ok(Some(left))
                }
            }
        }
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(left) = self.left()? {
            self.tcp.set_read_timeout(Some(left))?;
        }
        self.tcp.read(buf)
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(left) = self.left()? {
            self.tcp.set_write_timeout(Some(left))?;
        }
        self.tcp.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

/// One agent connection, either end.
pub enum Stream {
    Plain(Sock),
    Server(Box<StreamOwned<ServerConnection, Sock>>),
    Client(Box<StreamOwned<ClientConnection, Sock>>),
}

impl Stream {
    fn sock_mut(&mut self) -> &mut Sock {
        match self {
            Stream::Plain(s) => s,
            Stream::Server(s) => &mut s.sock,
            Stream::Client(s) => &mut s.sock,
        }
    }

    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => &s.tcp,
            Stream::Server(s) => &s.sock.tcp,
            Stream::Client(s) => &s.sock.tcp,
        }
    }

    /// Bounds every read and write by `deadline` (`None`: by the socket's
    /// timeouts only).
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.sock_mut().deadline = deadline;
    }

    /// Whether the peer proved, by certificate, to be `identity`. Always
    /// so without TLS, which proves nothing but the token.
    pub fn peer_is(&self, identity: &str) -> bool {
        match self {
            Stream::Plain(_) => true,
            Stream::Server(s) => s
                .conn
                .peer_certificates()
                .and_then(|c| c.first())
                .is_some_and(|c| identity::names(c, identity)),
            Stream::Client(s) => s.conn.peer_certificates().is_some(),
        }
    }

    /// Writes all of `bytes` and pushes them out (TLS records included).
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.write_all(bytes)?;
        self.flush()
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Server(s) => s.read(buf),
            Stream::Client(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Server(s) => s.write(buf),
            Stream::Client(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Server(s) => s.flush(),
            Stream::Client(s) => s.flush(),
        }
    }
}

fn tls_failed(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("TLS handshake: {e}"),
    )
}

/// Runs the handshake to its end (or the socket's deadline).
fn handshake<S: rustls::SideData>(
    conn: &mut rustls::ConnectionCommon<S>,
    sock: &mut Sock,
) -> io::Result<()> {
    while conn.is_handshaking() {
        let (read, wrote) = conn.complete_io(sock)?;
        if read == 0 && wrote == 0 && conn.is_handshaking() {
            return Err(tls_failed("the peer closed the connection"));
        }
    }
    // The last flight (the client's Finished) may still be queued.
    while conn.wants_write() {
        conn.write_tls(sock)?;
    }
    Ok(())
}

impl Transport {
    /// The server end of an accepted connection, handshaken by `deadline`.
    pub fn accept(&self, tcp: TcpStream, deadline: Instant) -> io::Result<Stream> {
        let mut sock = Sock {
            tcp,
            deadline: Some(deadline),
        };
        match self {
            Transport::Plain => Ok(Stream::Plain(sock)),
            Transport::Tls(identity) => {
                let configs = identity.configs().map_err(tls_failed)?;
                let mut conn = ServerConnection::new(configs.server).map_err(tls_failed)?;
                handshake(&mut conn, &mut sock)?;
                Ok(Stream::Server(Box::new(StreamOwned::new(conn, sock))))
            }
        }
    }

    /// The client end of a connection to node `peer`'s agent, handshaken
    /// by `deadline`: refused unless the agent's certificate is `peer`'s.
    pub fn connect(&self, tcp: TcpStream, peer: &str, deadline: Instant) -> io::Result<Stream> {
        let mut sock = Sock {
            tcp,
            deadline: Some(deadline),
        };
        let stream = match self {
            Transport::Plain => Stream::Plain(sock),
            Transport::Tls(identity) => {
                let configs = identity.configs().map_err(tls_failed)?;
                let name = Identity::server_name(peer).map_err(tls_failed)?;
                let mut conn = ClientConnection::new(configs.client, name).map_err(tls_failed)?;
                handshake(&mut conn, &mut sock)?;
                Stream::Client(Box::new(StreamOwned::new(conn, sock)))
            }
        };
        Ok(stream)
    }
}
