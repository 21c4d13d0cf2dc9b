//! Replicas on another node, reached through that node's replica agent.
//!
//! A `Client` keeps a few idle connections to one agent; each call takes one
//! (or dials a new one), sends a request and waits for its answer with a
//! deadline. Any failure drops that connection, so a dead agent or a cut
//! link becomes an error within the timeout, never a hang, and the engine
//! faults the replica. Connections are mutual TLS (`agent::transport`):
//! the agent must show a certificate for the node the client means to
//! reach, and a connection is dialled under the identity's configuration of
//! the moment, so one made before a CA rotation lives on until recycled.
//!
//! Hot path: `RemoteReplica::{read_at, write_at}`.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::core::error::{Error, ErrorKind, Result};
use crate::core::pool::{Pool, ReplicaIo};
use crate::datapath::agent::protocol::{Request, Response};
use crate::datapath::agent::protocol::{invalid, read_frame};
use crate::datapath::agent::transport::{Stream, Transport};

const MAX_IDLE: usize = 32;

pub struct Client {
    addr: SocketAddr,
    /// The node whose agent listens at `addr`: its certificate must say so.
    peer: String,
    token: Vec<u8>,
    node: String,
    timeout: Duration,
    transport: Transport,
    idle: Mutex<Vec<Stream>>,
    next_id: AtomicU64,
    /// The staging claim this process's writes act under (0: none).
    claim: AtomicU64,
}

impl Client {
    /// A client of node `peer`'s agent at `addr`, saying it is `node`.
    pub fn new(
        addr: SocketAddr,
        peer: &str,
        token: &[u8],
        node: &str,
        timeout: Duration,
        transport: Transport,
    ) -> Client {
        Client {
            addr,
            peer: peer.to_string(),
            token: token.to_vec(),
            node: node.to_string(),
            timeout,
            transport,
            idle: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
            claim: AtomicU64::new(0),
        }
    }

    /// Connections from now on act under staging claim `epoch`.
    pub fn act_under_claim(&self, epoch: u64) {
        self.claim.store(epoch, Ordering::SeqCst);
        self.drop_idle();
    }

    fn exchange(&self, stream: &mut Stream, req: &Request) -> io::Result<Response> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        stream.send(&req.encode(id))?;
        let (header, payload) = read_frame(stream)?.ok_or_else(|| {
            io::Error::new(io::ErrorKind::UnexpectedEof, "agent closed the connection")
        })?;
        if header.id != id {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("answer to request {} arrived for {id}", header.id),
            ));
        }
        Response::decode(header.kind, &payload).map_err(invalid)
    }

    fn dial(&self) -> io::Result<Stream> {
        let tcp = TcpStream::connect_timeout(&self.addr, self.timeout)?;
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(self.timeout))?;
        tcp.set_write_timeout(Some(self.timeout))?;
        let mut stream = self
            .transport
            .connect(tcp, &self.peer, Instant::now() + self.timeout)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("agent {} of node {}: {e}", self.addr, self.peer),
                )
            })?;
        stream.set_deadline(None);
        let hello = Request::Hello {
            token: self.token.clone(),
            node: self.node.clone(),
            claim: self.claim.load(Ordering::SeqCst),
        };
        match self.exchange(&mut stream, &hello)? {
            Response::Hello { .. } => Ok(stream),
            Response::Error { errno, message } => Err(io::Error::new(
                io::Error::from_raw_os_error(errno).kind(),
                format!("agent {} refused us: {message}", self.addr),
            )),
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected answer to hello: {other:?}"),
            )),
        }
    }

    /// Forgets idle connections: the next call dials afresh, so it is newer
    /// than any fence set before it.
    pub fn drop_idle(&self) {
        if let Ok(mut v) = self.idle.lock() {
            v.clear();
        }
    }

    /// Sends `req` and returns the agent's answer; an agent-side error comes
    /// back as an io::Error carrying the agent's errno.
    pub fn call(&self, req: &Request) -> io::Result<Response> {
        let idle = self.idle.lock().ok().and_then(|mut v| v.pop());
        let (stream, resp) = match idle {
            // An idle connection may have died with an agent that restarted
            // since; one fresh dial tells a dead connection from a dead agent.
            // Every request is idempotent, so resending is safe.
            Some(mut s) => match self.exchange(&mut s, req) {
                Ok(resp) => (s, resp),
                Err(_) => {
                    let mut s = self.dial()?;
                    let resp = self.exchange(&mut s, req)?;
                    (s, resp)
                }
            },
            None => {
                let mut s = self.dial()?;
                let resp = self.exchange(&mut s, req)?;
                (s, resp)
            }
        };
        if let Ok(mut v) = self.idle.lock()
            && v.len() < MAX_IDLE
        {
            v.push(stream);
        }
        match resp {
            Response::Error { errno, message } => Err(io::Error::new(
                io::Error::from_raw_os_error(errno).kind(),
                format!("agent {}: {message} (errno {errno})", self.addr),
            )),
            other => Ok(other),
        }
    }
}

fn unexpected(resp: Response) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("unexpected agent answer {resp:?}"),
    )
}

pub struct RemotePool {
    client: Arc<Client>,
    pool: String,
}

impl RemotePool {
    pub fn new(client: Arc<Client>, pool: &str) -> RemotePool {
        RemotePool {
            client,
            pool: pool.to_string(),
        }
    }

    fn call(&self, what: &str, req: Request) -> Result<Response> {
        self.client.call(&req).map_err(|e| {
            Error::with_source(
                ErrorKind::Unavailable,
                format!(
                    "{what} on pool {} via agent {}",
                    self.pool, self.client.addr
                ),
                e,
            )
        })
    }
}

impl Pool for RemotePool {
    fn act_under_claim(&self, epoch: u64) {
        self.client.act_under_claim(epoch);
    }

    fn create(&self, name: &str, size: u64) -> Result<()> {
        crate::core::pool::check_replica_name(name)?;
        self.call(
            "create replica",
            Request::Create {
                pool: self.pool.clone(),
                name: name.into(),
                size,
            },
        )
        .map(drop)
    }

    fn grow(&self, name: &str, size: u64) -> Result<()> {
        crate::core::pool::check_replica_name(name)?;
        self.call(
            "grow replica",
            Request::Grow {
                pool: self.pool.clone(),
                name: name.into(),
                size,
            },
        )
        .map(drop)
    }

    fn delete(&self, name: &str) -> Result<()> {
        crate::core::pool::check_replica_name(name)?;
        self.call(
            "delete replica",
            Request::Delete {
                pool: self.pool.clone(),
                name: name.into(),
            },
        )
        .map(drop)
    }

    fn size_of(&self, name: &str) -> Result<Option<u64>> {
        crate::core::pool::check_replica_name(name)?;
        match self.call(
            "stat replica",
            Request::Stat {
                pool: self.pool.clone(),
                name: name.into(),
            },
        )? {
            Response::Stat { size } => Ok(size),
            other => Err(Error::internal(unexpected(other).to_string())),
        }
    }

    fn open(&self, name: &str) -> Result<Box<dyn ReplicaIo>> {
        crate::core::pool::check_replica_name(name)?;
        let replica = RemoteReplica {
            client: self.client.clone(),
            pool: self.pool.clone(),
            name: name.to_string(),
        };
        // Opening proves the replica exists and the agent answers.
        replica
            .check()
            .map_err(|reason| Error::new(ErrorKind::Unavailable, reason))?;
        Ok(Box::new(replica))
    }

    fn capacity(&self) -> Result<u64> {
        match self.call(
            "read capacity",
            Request::Capacity {
                pool: self.pool.clone(),
            },
        )? {
            Response::Capacity { bytes } => Ok(bytes),
            other => Err(Error::internal(unexpected(other).to_string())),
        }
    }
}

pub struct RemoteReplica {
    client: Arc<Client>,
    pool: String,
    name: String,
}

impl RemoteReplica {
    fn ok(&self, req: Request) -> io::Result<()> {
        match self.client.call(&req)? {
            Response::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }
}

impl ReplicaIo for RemoteReplica {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let resp = self.client.call(&Request::Read {
            pool: self.pool.clone(),
            name: self.name.clone(),
            offset,
            len: buf.len() as u32,
        })?;
        match resp {
            Response::Data { data } if data.len() == buf.len() => {
                buf.copy_from_slice(&data);
                Ok(())
            }
            other => Err(unexpected(other)),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.ok(Request::Write {
            pool: self.pool.clone(),
            name: self.name.clone(),
            offset,
            data: buf.to_vec(),
        })
    }

    fn flush(&self) -> io::Result<()> {
        self.ok(Request::Flush {
            pool: self.pool.clone(),
            name: self.name.clone(),
        })
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.ok(Request::Discard {
            pool: self.pool.clone(),
            name: self.name.clone(),
            offset,
            len,
        })
    }

    fn fence(&self) -> io::Result<()> {
        self.client.drop_idle();
        self.ok(Request::Fence {
            pool: self.pool.clone(),
            name: self.name.clone(),
        })?;
        self.client.drop_idle();
        Ok(())
    }

    fn fence_empty(&self) -> io::Result<()> {
        self.client.drop_idle();
        self.ok(Request::FenceEmpty {
            pool: self.pool.clone(),
            name: self.name.clone(),
        })?;
        self.client.drop_idle();
        Ok(())
    }

    fn check(&self) -> std::result::Result<(), String> {
        self.ok(Request::Check {
            pool: self.pool.clone(),
            name: self.name.clone(),
        })
        .map_err(|e| format!("replica {}/{} unreachable: {e}", self.pool, self.name))
    }
}
