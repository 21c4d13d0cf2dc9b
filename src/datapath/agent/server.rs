//! The agent's server side: one thread per connection, requests answered in
//! order. Engines open several connections to get several requests in flight.
//!
//! What an unauthenticated peer can make the agent spend is bounded: at most
//! `Limits::max_connections` connections (and so threads) at once, further
//! ones closed on accept; before Hello succeeds, frames of at most
//! `protocol::PRE_AUTH_MAX_PAYLOAD` bytes and `Limits::hello_timeout` to
//! send the Hello in. Running out of file descriptors makes the accept loop
//! back off (up to a second) rather than spin, and every warning of the
//! accept loop is rate-limited.
//!
//! Every connection is mutual TLS (`transport`), handshaken by the Hello
//! deadline too, and the node its Hello names must be its certificate's.
//!
//! Every request's names are checked before anything is looked up (pool
//! names plain, replica names replica file names), and every offset and
//! length against the replica's size, so bad input is an error answer, never
//! a path outside the pools, a panic or a large allocation.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::core::pool::{Pool, ReplicaIo, check_pool_name, check_replica_name};
use crate::datapath::agent::protocol::{
    self, FrameError, HEADER_LEN, HELLO_KIND, PRE_AUTH_MAX_PAYLOAD, Request, Response, invalid,
    read_frame,
};
use crate::datapath::agent::transport::{Stream, Transport};
use crate::datapath::replica::aligned::AlignedBuf;

/// Longest a backed-off accept loop sleeps (out of file descriptors).
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
/// At most one warning per this long from each kind of accept-loop trouble.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// What connections may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once (one thread each); more are closed at once.
    pub max_connections: usize,
    /// A connection that has not said Hello by then is dropped.
    pub hello_timeout: Duration,
    /// An authenticated connection idle this long is dropped, so dead peers
    /// do not pin threads.
    pub idle_timeout: Duration,
}

/// Default of `agent_max_connections` (threads have 256 KiB stacks,
/// mostly untouched).
pub const DEFAULT_MAX_CONNECTIONS: usize = crate::core::config::DEFAULT_AGENT_MAX_CONNECTIONS;

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            hello_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(300),
        }
    }
}

type ReplicaKey = (String, String);

pub struct AgentState {
    node: String,
    /// Empty only when misconfigured: then every Hello is refused.
    token: Vec<u8>,
    transport: Transport,
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
    fence_dir: Option<PathBuf>,
    limits: Limits,
    /// Connections being served now.
    connections: AtomicUsize,
    /// Connections per peer address that have not said Hello yet.
    unauthenticated: Mutex<HashMap<std::net::IpAddr, usize>>,
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

fn refused(errno: i32, message: impl Into<String>) -> Response {
    Response::Error {
        errno,
        message: message.into(),
    }
}

impl AgentState {
    /// An agent given an empty `token` refuses every peer.
    pub fn new(
        node: &str,
        token: &[u8],
        transport: Transport,
        pools: BTreeMap<String, Box<dyn Pool>>,
    ) -> AgentState {
        if token.is_empty() {
            warn!(
                node,
                "replica agent has an empty cluster token: every peer is refused"
            );
        }
        AgentState {
            node: node.to_string(),
            token: token.to_vec(),
            transport,
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
            limits: Limits::default(),
            connections: AtomicUsize::new(0),
            unauthenticated: Mutex::new(HashMap::new()),
        }
    }

    /// Keeps claim floors in `dir`, so an agent that restarts still refuses
    /// writes from engines of claims that were fenced out.
    pub fn with_fence_dir(mut self, dir: &Path) -> AgentState {
        self.fence_dir = Some(dir.to_path_buf());
        self
    }

    pub fn with_limits(mut self, limits: Limits) -> AgentState {
        self.limits = limits;
        self
    }

    /// Only ever called with checked names, so the file stays in its pool's
    /// directory of `fence_dir`.
    fn floor_file(&self, pool: &str, name: &str) -> Option<PathBuf> {
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

    /// Whether `token` is this agent's (never when the agent has none).
    fn admits(&self, token: &[u8]) -> bool {
        !self.token.is_empty() && token_matches(token, &self.token)
    }

    fn fence_of(&self, pool: &str, name: &str) -> Result<Arc<RwLock<Floor>>, Response> {
        let mut fences = self.fences.lock().map_err(|_| poisoned())?;
        Ok(fences
            .entry((pool.to_string(), name.to_string()))
            .or_insert_with(|| {
                let claim = self
                    .floor_file(pool, name)
                    .and_then(|f| read_floor(&f))
                    .unwrap_or(0);
                Arc::new(RwLock::new(Floor { epoch: 0, claim }))
            })
            .clone())
    }

    /// Fences `pool/name` for `conn`'s claim; `empty`: then replaces it by
    /// an empty replica of the same size under a new inode (see the
    /// protocol's FenceEmpty), with the fence still held so nothing is
    /// written in between. An older claim may not empty a newer one's.
    fn fence(
        &self,
        conn: &Conn,
        pool: &str,
        name: &str,
        empty: bool,
    ) -> Result<Response, Response> {
        // Only replicas that exist get a floor (and a floor file).
        if self
            .pool_for(pool, name)?
            .size_of(name)
            .map_err(error_response)?
            .is_none()
        {
            return Err(refused(
                libc::ENOENT,
                format!("replica {pool}/{name} does not exist"),
            ));
        }
        let fence = self.fence_of(pool, name)?;
        // Exclusive: waits for fenced operations under way to finish.
        let mut floor = fence.write().map_err(|_| poisoned())?;
        // Before the epoch moves: a stale engine's fence would otherwise
        // cut off the current holder's connections and fault its replica.
        if conn.claim < floor.claim {
            return Err(refused(
                libc::ESTALE,
                format!(
                    "replica {pool}/{name} is fenced under claim {}; claim {} may not fence it",
                    floor.claim, conn.claim
                ),
            ));
        }
        floor.epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        if conn.claim > floor.claim {
            // Durable before the fence is acknowledged: the new
            // holder relies on it from then on.
            if let Some(file) = self.floor_file(pool, name) {
                let written = file
                    .parent()
                    .map_or(Ok(None), crate::datapath::host::files::private_dir)
                    .and_then(|_| {
                        crate::datapath::host::files::atomic_write(
                            &file,
                            conn.claim.to_string().as_bytes(),
                        )
                    });
                if let Err(e) = written {
                    return Err(refused(
                        libc::EIO,
                        format!("cannot persist the fence of {pool}/{name}: {}", e.report()),
                    ));
                }
            }
            floor.claim = conn.claim;
        }
        if empty {
            let recreated = self.pool_for(pool, name)?.recreate_empty(name);
            // After the swap, so nothing caches the old file in between.
            self.forget(pool, name);
            recreated.map_err(error_response)?;
        }
        Ok(Response::Ok)
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
            return Err(refused(
                libc::ESTALE,
                format!("write to {pool}/{name} from before its fence refused"),
            ));
        }
        if conn.claim < floor.claim {
            return Err(refused(
                libc::ESTALE,
                format!(
                    "write to {pool}/{name} under claim {} refused: claim {} fenced it",
                    conn.claim, floor.claim
                ),
            ));
        }
        op()
    }

    /// Serves `pool` from now on; an existing pool of that name is kept,
    /// and a name no request could use is refused.
    pub fn add_pool(&self, name: &str, pool: Box<dyn Pool>) {
        if let Err(e) = check_pool_name(name) {
            warn!(error = %e.report(), "pool not served");
            return;
        }
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
        check_pool_name(name).map_err(error_response)?;
        let pools = self.pools.read().unwrap_or_else(|p| p.into_inner());
        pools.get(name).cloned().ok_or_else(|| {
            refused(
                libc::ENOENT,
                format!("pool {name:?} is not served by node {}", self.node),
            )
        })
    }

    /// The pool, once both names are checked.
    fn pool_for(&self, pool: &str, name: &str) -> Result<Arc<dyn Pool>, Response> {
        let p = self.pool(pool)?;
        check_replica_name(name).map_err(error_response)?;
        Ok(p)
    }

    fn replica(&self, pool: &str, name: &str) -> Result<Arc<dyn ReplicaIo>, Response> {
        let backend = self.pool_for(pool, name)?;
        let key = (pool.to_string(), name.to_string());
        let mut open = self.open.lock().map_err(|_| poisoned())?;
        if let Some(r) = open.get(&key) {
            return Ok(r.clone());
        }
        let io: Arc<dyn ReplicaIo> = Arc::from(backend.open(name).map_err(error_response)?);
        open.insert(key, io.clone());
        Ok(io)
    }

    fn forget(&self, pool: &str, name: &str) {
        if let Ok(mut open) = self.open.lock() {
            open.remove(&(pool.to_string(), name.to_string()));
        }
    }

    /// Refuses `len` bytes at `offset` unless they lie inside `replica`.
    fn check_range(
        &self,
        replica: &dyn ReplicaIo,
        pool: &str,
        name: &str,
        offset: u64,
        len: u64,
    ) -> Result<(), Response> {
        let size = match replica.size() {
            Some(size) => size.map_err(|e| {
                refused(
                    e.raw_os_error().unwrap_or(libc::EIO),
                    format!("cannot size replica {pool}/{name}: {e}"),
                )
            })?,
            None => self
                .pool_for(pool, name)?
                .size_of(name)
                .map_err(error_response)?
                .ok_or_else(|| {
                    refused(
                        libc::ENOENT,
                        format!("replica {pool}/{name} does not exist"),
                    )
                })?,
        };
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(refused(
                libc::EINVAL,
                format!(
                    "{len} bytes at offset {offset} are outside replica {pool}/{name} of {size} bytes"
                ),
            )),
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
                self.pool_for(&pool, &name)?
                    .create(&name, size)
                    .map_err(error_response)?;
                Response::Ok
            }
            Request::Grow { pool, name, size } => {
                self.pool_for(&pool, &name)?
                    .grow(&name, size)
                    .map_err(error_response)?;
                Response::Ok
            }
            Request::Delete { pool, name } => {
                let backend = self.pool_for(&pool, &name)?;
                self.forget(&pool, &name);
                backend.delete(&name).map_err(error_response)?;
                if let Some(file) = self.floor_file(&pool, &name) {
                    let _ = std::fs::remove_file(file);
                }
                if let Ok(mut fences) = self.fences.lock() {
                    fences.remove(&(pool.clone(), name.clone()));
                }
                Response::Ok
            }
            Request::Stat { pool, name } => Response::Stat {
                size: self
                    .pool_for(&pool, &name)?
                    .size_of(&name)
                    .map_err(error_response)?,
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
                    return Err(refused(
                        libc::EINVAL,
                        format!("read of {len} bytes exceeds the frame limit"),
                    ));
                }
                let replica = self.replica(&pool, &name)?;
                self.check_range(&*replica, &pool, &name, offset, u64::from(len))?;
                let mut buf = AlignedBuf::zeroed(len as usize);
                replica
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
                let replica = self.replica(&pool, &name)?;
                self.check_range(&*replica, &pool, &name, offset, data.len() as u64)?;
                let buf = AlignedBuf::copy_of(&data);
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
                self.check_range(&*replica, &pool, &name, offset, len)?;
                self.fenced(conn, &pool, &name, || {
                    replica.discard(offset, len).map_err(io_err)
                })?;
                Response::Ok
            }
            Request::Fence { pool, name } => self.fence(conn, &pool, &name, false)?,
            Request::FenceEmpty { pool, name } => self.fence(conn, &pool, &name, true)?,
            Request::Check { pool, name } => {
                let r = self.replica(&pool, &name)?;
                if let Err(reason) = r.check() {
                    // A replaced or removed file must be reopened, not reused.
                    self.forget(&pool, &name);
                    return Err(refused(libc::ENOENT, reason));
                }
                Response::Ok
            }
        })
    }
}

/// A persisted claim floor, read without following a link.
fn read_floor(file: &Path) -> Option<u64> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut text = String::new();
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(file)
        .ok()?
        .take(64)
        .read_to_string(&mut text)
        .ok()?;
    text.trim().parse().ok()
}

fn poisoned() -> Response {
    refused(libc::EIO, "agent lock poisoned")
}

fn error_response(e: crate::core::error::Error) -> Response {
    use crate::core::error::ErrorKind;
    let errno = e
        .source
        .as_ref()
        .and_then(|s| s.downcast_ref::<io::Error>())
        .and_then(|e| e.raw_os_error())
        .unwrap_or(match e.kind {
            ErrorKind::InvalidArgument => libc::EINVAL,
            ErrorKind::NotFound => libc::ENOENT,
            ErrorKind::OutOfRange => libc::EFBIG,
            ErrorKind::FailedPrecondition => libc::EPERM,
            _ => libc::EIO,
        });
    Response::Error {
        errno,
        message: e.report().to_string(),
    }
}

/// Token comparison that takes the same time wherever the first difference is.
fn token_matches(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Fills `buf` by `deadline` however slowly the peer sends; `Ok(false)`
/// when the peer closed before sending anything.
/// (The stream's own deadline bounds each read.)
fn read_by(stream: &mut Stream, buf: &mut [u8], deadline: Instant) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        if Instant::now() >= deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no Hello in time"));
        }
        match stream.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Answers `resp` and ends the connection with `why`.
fn refuse(stream: &mut Stream, id: u64, resp: Response, why: &str) -> io::Result<Option<Conn>> {
    stream.send(&resp.encode(id))?;
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        why.to_string(),
    ))
}

/// The connection's first frame, which must be a Hello with the token:
/// read by the Hello deadline and never larger than `PRE_AUTH_MAX_PAYLOAD`.
/// `Ok(None)` when the peer left without a word.
fn authenticate(
    state: &AgentState,
    stream: &mut Stream,
    deadline: Instant,
) -> io::Result<Option<Conn>> {
    let mut head = [0u8; HEADER_LEN];
    if !read_by(stream, &mut head, deadline)? {
        return Ok(None);
    }
    // Garbage (not our magic, a bad checksum) is not answered at all.
    let header = protocol::decode_header(&head).map_err(invalid)?;
    if header.len > PRE_AUTH_MAX_PAYLOAD {
        let resp = refused(
            libc::EMSGSIZE,
            format!(
                "a frame of {} bytes before Hello is refused (at most {PRE_AUTH_MAX_PAYLOAD})",
                header.len
            ),
        );
        return refuse(stream, header.id, resp, "oversized frame before hello");
    }
    let mut payload = [0u8; PRE_AUTH_MAX_PAYLOAD as usize];
    let payload = &mut payload[..header.len as usize];
    if !payload.is_empty() && !read_by(stream, payload, deadline)? {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    protocol::check_payload(&header, payload).map_err(invalid)?;
    if header.kind != HELLO_KIND {
        let resp = refused(libc::EACCES, "Hello with the cluster token must come first");
        return refuse(stream, header.id, resp, "no hello");
    }
    let Request::Hello { token, claim, node } =
        Request::decode(header.kind, payload).map_err(invalid)?
    else {
        return Err(invalid(FrameError::UnknownKind(header.kind)));
    };
    if let Some(resp) = state.refusal(stream, &token, &node) {
        return refuse(stream, header.id, resp, "hello refused");
    }
    let conn = state.connect(claim);
    stream.send(
        &Response::Hello {
            node: state.node.clone(),
        }
        .encode(header.id),
    )?;
    Ok(Some(conn))
}

impl AgentState {
    /// Why a Hello with `token` naming `node` on `stream` is refused, if it is.
    fn refusal(&self, stream: &Stream, token: &[u8], node: &str) -> Option<Response> {
        if !self.admits(token) {
            return Some(refused(libc::EACCES, "cluster token rejected"));
        }
        if !stream.peer_is(node) {
            return Some(refused(
                libc::EACCES,
                format!("the Hello names node {node:?}, which the certificate does not"),
            ));
        }
        None
    }
}

fn serve_connection(
    state: &AgentState,
    tcp: std::net::TcpStream,
    unauthenticated: Unauthenticated,
) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    let deadline = Instant::now() + state.limits.hello_timeout;
    let authenticated = state
        .transport
        .accept(tcp, deadline)
        .and_then(|mut stream| Ok((authenticate(state, &mut stream, deadline)?, stream)));
    drop(unauthenticated);
    let (Some(mut conn), mut stream) = authenticated? else {
        return Ok(());
    };
    stream.set_deadline(None);
    stream
        .tcp()
        .set_read_timeout(Some(state.limits.idle_timeout))?;
    stream
        .tcp()
        .set_write_timeout(Some(state.limits.idle_timeout))?;
    while let Some((header, payload)) = read_frame(&mut stream)? {
        let req = Request::decode(header.kind, &payload).map_err(invalid)?;
        let resp = match &req {
            // A Hello again: a new claim, with the token checked again.
            Request::Hello { token, claim, node } => {
                if let Some(resp) = state.refusal(&stream, token, node) {
                    return refuse(&mut stream, header.id, resp, "hello refused").map(drop);
                }
                conn = state.connect(*claim);
                state.handle(&conn, req)
            }
            _ => state.handle(&conn, req),
        };
        stream.send(&resp.encode(header.id))?;
    }
    Ok(())
}

/// A warning that is logged at most once per `WARN_EVERY`, saying how many
/// were held back meanwhile.
struct RateLimited {
    last: Option<Instant>,
    held: u64,
}

impl RateLimited {
    const fn new() -> RateLimited {
        RateLimited {
            last: None,
            held: 0,
        }
    }

    /// `Some(held back since the last one)` when a warning may be logged now.
    fn ready(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < WARN_EVERY)
        {
            self.held += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held))
    }
}

/// Connections one peer address may have open before their Hello: enough
/// for a node whose engines all start at once, too few for one address to
/// take every place by connecting and saying nothing.
pub const MAX_UNAUTHENTICATED_PER_PEER: usize = 64;

/// A connection from `peer` counted as not yet authenticated, until dropped.
struct Unauthenticated(Arc<AgentState>, std::net::IpAddr);

impl Unauthenticated {
    fn take(state: &Arc<AgentState>, peer: std::net::IpAddr) -> Option<Unauthenticated> {
        let mut counts = state.unauthenticated.lock().ok()?;
        let n = counts.entry(peer).or_insert(0);
        if *n >= MAX_UNAUTHENTICATED_PER_PEER {
            return None;
        }
        *n += 1;
        Some(Unauthenticated(state.clone(), peer))
    }
}

impl Drop for Unauthenticated {
    fn drop(&mut self) {
        if let Ok(mut counts) = self.0.unauthenticated.lock()
            && let Some(n) = counts.get_mut(&self.1)
        {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.1);
            }
        }
    }
}

/// One of the `max_connections` places; given back when dropped.
struct Slot(Arc<AgentState>);

impl Slot {
    fn take(state: &Arc<AgentState>) -> Option<Slot> {
        state
            .connections
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < state.limits.max_connections).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(state.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Whether an accept error means the process or system is out of something
/// (descriptors, memory): waiting is the only cure.
fn is_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Accepts connections until the listener is closed; each runs on its own
/// thread, at most `max_connections` at once.
pub fn serve(listener: TcpListener, state: Arc<AgentState>) -> io::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, node = %state.node,
        max_connections = state.limits.max_connections, "replica agent listening");
    let mut backoff = Duration::ZERO;
    let (mut full, mut exhausted, mut failed) =
        (RateLimited::new(), RateLimited::new(), RateLimited::new());
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // The peer gave up before we took it: nothing to do.
            Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
            Err(e) => {
                backoff = (backoff * 2).clamp(Duration::from_millis(10), MAX_ACCEPT_BACKOFF);
                let limiter = if is_exhaustion(&e) {
                    &mut exhausted
                } else {
                    &mut failed
                };
                if let Some(held) = limiter.ready() {
                    warn!(error = %e, retry_in_ms = backoff.as_millis() as u64,
                        similar_held_back = held, "replica agent cannot accept connections");
                }
                std::thread::sleep(backoff);
                continue;
            }
        };
        backoff = Duration::ZERO;
        let Some(slot) = Slot::take(&state) else {
            // Closed at once: no thread, no read.
            drop(stream);
            if let Some(held) = full.ready() {
                warn!(
                    max_connections = state.limits.max_connections,
                    also_closed = held,
                    "replica agent at its connection limit: new connections closed"
                );
            }
            continue;
        };
        let peer = stream.peer_addr().ok();
        let Some(unauthenticated) = peer.and_then(|p| Unauthenticated::take(&state, p.ip())) else {
            drop(stream);
            if let Some(held) = full.ready() {
                warn!(
                    ?peer,
                    per_peer = MAX_UNAUTHENTICATED_PER_PEER,
                    also_closed = held,
                    "replica agent: too many connections from one address without a Hello; new ones closed"
                );
            }
            continue;
        };
        let spawned = std::thread::Builder::new()
            .name("agent-conn".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                if let Err(e) = serve_connection(&slot.0, stream, unauthenticated) {
                    debug!(?peer, error = %e, "agent connection closed");
                }
                drop(slot);
            });
        if let Err(e) = spawned {
            // The connection (and its slot) went with the closure.
            if let Some(held) = failed.ready() {
                warn!(error = %e, similar_held_back = held, "replica agent cannot start a connection thread");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[cfg(test)]
mod error_frames {
    use super::*;

    #[test]
    fn an_error_frame_says_the_cause_as_before_display_stopped_repeating_it() {
        let e = crate::core::error::Error::io(
            "cannot open replica tv-x.0",
            io::Error::from_raw_os_error(libc::ENOENT),
        );
        let Response::Error { errno, message } = error_response(e) else {
            panic!("not an error frame");
        };
        assert_eq!(errno, libc::ENOENT);
        assert!(message.contains("No such file or directory"), "{message}");
    }
}
