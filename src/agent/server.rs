//! The agent's server side: one thread per connection, requests answered in
//! order. Engines open several connections to get several requests in flight.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::agent::protocol::{self, FrameError, HEADER_LEN, Request, Response};
use crate::replica::aligned::AlignedBuf;
use crate::replica::{Pool, ReplicaIo};

/// An idle connection is dropped after this long, so dead peers do not pin threads.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

type ReplicaKey = (String, String);

pub struct AgentState {
    node: String,
    token: Vec<u8>,
    /// Grows as a cluster names more pools for this node.
    pools: RwLock<BTreeMap<String, Arc<dyn Pool>>>,
    open: Mutex<HashMap<ReplicaKey, Arc<dyn ReplicaIo>>>,
    /// Connection epochs: each connection takes the current value at Hello.
    epoch: AtomicU64,
    /// Per replica: what writes must be at least, behind a lock that
    /// writes hold shared while they run.
    fences: Mutex<HashMap<ReplicaKey, Arc<RwLock<Floor>>>>,
    /// Where claim floors are kept across restarts (`<pool>/<name>.claim`);
    /// `None` keeps them in memory only (tests).
    fence_dir: Option<std::path::PathBuf>,
}

/// Writes to a replica are refused from connections older than `epoch` or
/// acting under a claim older than `claim`.
#[derive(Default)]
struct Floor {
    epoch: u64,
    claim: u64,
}

/// What a connection knows about itself.
pub struct Conn {
    epoch: u64,
    claim: u64,
}

impl AgentState {
    pub fn new(node: &str, token: &[u8], pools: BTreeMap<String, Box<dyn Pool>>) -> AgentState {
        AgentState {
            node: node.to_string(),
            token: token.to_vec(),
            pools: RwLock::new(
                pools
                    .into_iter()
                    .map(|(name, p)| (name, Arc::from(p)))
                    .collect(),
            ),
            open: Mutex::new(HashMap::new()),
            epoch: AtomicU64::new(1),
            fences: Mutex::new(HashMap::new()),
            fence_dir: None,
        }
    }

    /// Keeps claim floors in `dir`, so an agent that restarts still refuses
    /// writes from engines of claims that were fenced out.
    pub fn with_fence_dir(mut self, dir: &std::path::Path) -> AgentState {
        self.fence_dir = Some(dir.to_path_buf());
        self
    }

    fn floor_file(&self, pool: &str, name: &str) -> Option<std::path::PathBuf> {
        self.fence_dir
            .as_ref()
            .map(|d| d.join(pool).join(format!("{name}.claim")))
    }

    /// A connection that said Hello acting under `claim`.
    pub fn connect(&self, claim: u64) -> Conn {
        Conn {
            epoch: self.epoch.load(Ordering::SeqCst),
            claim,
        }
    }

    fn fence_of(&self, pool: &str, name: &str) -> Result<Arc<RwLock<Floor>>, Response> {
        let mut fences = self.fences.lock().map_err(|_| poisoned())?;
        Ok(fences
            .entry((pool.to_string(), name.to_string()))
            .or_insert_with(|| {
                let claim = self
                    .floor_file(pool, name)
                    .and_then(|f| std::fs::read_to_string(f).ok())
                    .and_then(|t| t.trim().parse().ok())
                    .unwrap_or(0);
                Arc::new(RwLock::new(Floor { epoch: 0, claim }))
            })
            .clone())
    }

    /// Runs a data-changing operation unless this connection predates the
    /// replica's fence.
    fn fenced<T>(
        &self,
        conn: &Conn,
        pool: &str,
        name: &str,
        op: impl FnOnce() -> Result<T, Response>,
    ) -> Result<T, Response> {
        let fence = self.fence_of(pool, name)?;
        let floor = fence.read().map_err(|_| poisoned())?;
        if conn.epoch < floor.epoch {
            return Err(Response::Error {
                errno: libc::ESTALE,
                message: format!("write to {pool}/{name} from before its fence refused"),
            });
        }
        if conn.claim < floor.claim {
            return Err(Response::Error {
                errno: libc::ESTALE,
                message: format!(
                    "write to {pool}/{name} under claim {} refused: claim {} fenced it",
                    conn.claim, floor.claim
                ),
            });
        }
        op()
    }

    /// Serves `pool` from now on; an existing pool of that name is kept.
    pub fn add_pool(&self, name: &str, pool: Box<dyn Pool>) {
        let mut pools = self.pools.write().unwrap_or_else(|p| p.into_inner());
        pools
            .entry(name.to_string())
            .or_insert_with(|| Arc::from(pool));
    }

    pub fn pool_names(&self) -> Vec<String> {
        let pools = self.pools.read().unwrap_or_else(|p| p.into_inner());
        pools.keys().cloned().collect()
    }

    fn pool(&self, name: &str) -> Result<Arc<dyn Pool>, Response> {
        let pools = self.pools.read().unwrap_or_else(|p| p.into_inner());
        pools.get(name).cloned().ok_or_else(|| Response::Error {
            errno: libc::ENOENT,
            message: format!("pool {name:?} is not served by node {}", self.node),
        })
    }

    fn replica(&self, pool: &str, name: &str) -> Result<Arc<dyn ReplicaIo>, Response> {
        let key = (pool.to_string(), name.to_string());
        let mut open = self.open.lock().map_err(|_| Response::Error {
            errno: libc::EIO,
            message: "agent replica table poisoned".into(),
        })?;
        if let Some(r) = open.get(&key) {
            return Ok(r.clone());
        }
        let io: Arc<dyn ReplicaIo> =
            Arc::from(self.pool(pool)?.open(name).map_err(error_response)?);
        open.insert(key, io.clone());
        Ok(io)
    }

    fn forget(&self, pool: &str, name: &str) {
        if let Ok(mut open) = self.open.lock() {
            open.remove(&(pool.to_string(), name.to_string()));
        }
    }

    pub fn handle(&self, conn: &Conn, req: Request) -> Response {
        match self.dispatch(conn, req) {
            Ok(r) | Err(r) => r,
        }
    }

    fn dispatch(&self, conn: &Conn, req: Request) -> Result<Response, Response> {
        let io_err = |e: io::Error| Response::Error {
            errno: e.raw_os_error().unwrap_or(libc::EIO),
            message: e.to_string(),
        };
        Ok(match req {
            Request::Hello { .. } => Response::Hello {
                node: self.node.clone(),
            },
            Request::Create { pool, name, size } => {
                self.pool(&pool)?
                    .create(&name, size)
                    .map_err(error_response)?;
                Response::Ok
            }
            Request::Grow { pool, name, size } => {
                self.pool(&pool)?
                    .grow(&name, size)
                    .map_err(error_response)?;
                Response::Ok
            }
            Request::Delete { pool, name } => {
                self.forget(&pool, &name);
                self.pool(&pool)?.delete(&name).map_err(error_response)?;
                if let Some(file) = self.floor_file(&pool, &name) {
                    let _ = std::fs::remove_file(file);
                }
                if let Ok(mut fences) = self.fences.lock() {
                    fences.remove(&(pool.clone(), name.clone()));
                }
                Response::Ok
            }
            Request::Stat { pool, name } => Response::Stat {
                size: self.pool(&pool)?.size_of(&name).map_err(error_response)?,
            },
            Request::Capacity { pool } => Response::Capacity {
                bytes: self.pool(&pool)?.capacity().map_err(error_response)?,
            },
            Request::Read {
                pool,
                name,
                offset,
                len,
            } => {
                if len > protocol::MAX_PAYLOAD - 64 {
                    return Err(Response::Error {
                        errno: libc::EINVAL,
                        message: format!("read of {len} bytes exceeds the frame limit"),
                    });
                }
                let mut buf = AlignedBuf::zeroed(len as usize);
                self.replica(&pool, &name)?
                    .read_at(buf.as_mut_slice(), offset)
                    .map_err(io_err)?;
                Response::Data {
                    data: buf.as_slice().to_vec(),
                }
            }
            Request::Write {
                pool,
                name,
                offset,
                data,
            } => {
                let buf = AlignedBuf::copy_of(&data);
                let replica = self.replica(&pool, &name)?;
                self.fenced(conn, &pool, &name, || {
                    replica.write_at(buf.as_slice(), offset).map_err(io_err)
                })?;
                Response::Ok
            }
            Request::Flush { pool, name } => {
                self.replica(&pool, &name)?.flush().map_err(io_err)?;
                Response::Ok
            }
            Request::Discard {
                pool,
                name,
                offset,
                len,
            } => {
                let replica = self.replica(&pool, &name)?;
                self.fenced(conn, &pool, &name, || {
                    replica.discard(offset, len).map_err(io_err)
                })?;
                Response::Ok
            }
            Request::Fence { pool, name } => {
                let fence = self.fence_of(&pool, &name)?;
                // Exclusive: waits for fenced operations under way to finish.
                let mut floor = fence.write().map_err(|_| poisoned())?;
                floor.epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
                if conn.claim > floor.claim {
                    // Durable before the fence is acknowledged: the new
                    // holder relies on it from then on.
                    if let Some(file) = self.floor_file(&pool, &name) {
                        let written = file
                            .parent()
                            .map_or(Ok(()), std::fs::create_dir_all)
                            .map_err(|e| crate::error::Error::io("cannot keep a claim floor", e))
                            .and_then(|()| {
                                crate::store::atomic_write(&file, conn.claim.to_string().as_bytes())
                            });
                        if let Err(e) = written {
                            return Err(Response::Error {
                                errno: libc::EIO,
                                message: format!("cannot persist the fence of {pool}/{name}: {e}"),
                            });
                        }
                    }
                    floor.claim = conn.claim;
                }
                Response::Ok
            }
            Request::Check { pool, name } => {
                let r = self.replica(&pool, &name)?;
                if let Err(reason) = r.check() {
                    // A replaced or removed file must be reopened, not reused.
                    self.forget(&pool, &name);
                    return Err(Response::Error {
                        errno: libc::ENOENT,
                        message: reason,
                    });
                }
                Response::Ok
            }
        })
    }
}

fn poisoned() -> Response {
    Response::Error {
        errno: libc::EIO,
        message: "agent lock poisoned".into(),
    }
}

fn error_response(e: crate::error::Error) -> Response {
    let errno = e
        .source
        .as_ref()
        .and_then(|s| s.downcast_ref::<io::Error>())
        .and_then(|e| e.raw_os_error())
        .unwrap_or(libc::EIO);
    Response::Error {
        errno,
        message: e.to_string(),
    }
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
pub fn read_frame(stream: &mut impl Read) -> io::Result<Option<(protocol::Header, Vec<u8>)>> {
    let mut head = [0u8; HEADER_LEN];
    match stream.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let header = protocol::decode_header(&head).map_err(invalid)?;
    let mut payload = vec![0u8; header.len as usize];
    stream.read_exact(&mut payload)?;
    protocol::check_payload(&header, &payload).map_err(invalid)?;
    Ok(Some((header, payload)))
}

pub fn invalid(e: FrameError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Token comparison that takes the same time wherever the first difference is.
fn token_matches(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn serve_connection(state: &AgentState, mut stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    let mut conn: Option<Conn> = None;
    while let Some((header, payload)) = read_frame(&mut stream)? {
        let req = Request::decode(header.kind, &payload).map_err(invalid)?;
        let resp = match (&req, &conn) {
            (Request::Hello { token, claim, .. }, _) => {
                if token_matches(token, &state.token) {
                    let c = state.connect(*claim);
                    let resp = state.handle(&c, req);
                    conn = Some(c);
                    resp
                } else {
                    let resp = Response::Error {
                        errno: libc::EACCES,
                        message: "cluster token rejected".into(),
                    };
                    stream.write_all(&resp.encode(header.id))?;
                    return Err(io::Error::new(io::ErrorKind::PermissionDenied, "bad token"));
                }
            }
            (_, None) => {
                let resp = Response::Error {
                    errno: libc::EACCES,
                    message: "Hello with the cluster token must come first".into(),
                };
                stream.write_all(&resp.encode(header.id))?;
                return Err(io::Error::new(io::ErrorKind::PermissionDenied, "no hello"));
            }
            (_, Some(c)) => state.handle(c, req),
        };
        stream.write_all(&resp.encode(header.id))?;
    }
    Ok(())
}

/// Accepts connections until the listener fails; each runs on its own thread.
pub fn serve(listener: TcpListener, state: Arc<AgentState>) -> io::Result<()> {
    info!(addr = %listener.local_addr()?, node = %state.node, "replica agent listening");
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "accept failed");
                continue;
            }
        };
        let peer = stream.peer_addr().ok();
        let state = state.clone();
        std::thread::Builder::new()
            .name("agent-conn".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                if let Err(e) = serve_connection(&state, stream) {
                    debug!(?peer, error = %e, "agent connection closed");
                }
            })?;
    }
    Ok(())
}
