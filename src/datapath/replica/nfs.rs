//! Replicas as files on an NFS export, reached through our own NFSv3 client
//! (the `nfs3_client` crate over TCP): no kernel mount, so a dead or hung
//! server is an error after the timeout, never a hung process or node.
//!
//! Each pool keeps a few idle connections; a call takes one (or connects),
//! runs under the timeout, and gives it back only if the RPC completed: a
//! call cut off by the timeout leaves its connection out of step, so it is
//! dropped. A connection idle since the server restarted fails at once; the
//! call is then retried once on a fresh one (every call here is idempotent).
//!
//! Writes are FILE_SYNC: acknowledged only once the server has them on
//! stable storage, so a server that reboots loses nothing the engine was
//! told is written, and `flush` has nothing left to do. NFSv3 has no way to
//! punch holes, so a discard writes zeroes.
//!
//! **Fencing.** The server checks every READ and WRITE against the
//! caller's AUTH_SYS credential, so that is the fence: replica data is read
//! and written as `claim_uid(epoch)`, a uid of its own for each staging
//! claim (`0x4000_0000 + epoch mod 2^30`, never root), and fencing a
//! replica for claim N makes its file owned by N's uid with mode 0600, with
//! a SETATTR sent as root. From then on the server refuses an older
//! claim's calls (NFS3ERR_ACCES), on its pooled connections too. Fencing
//! never goes backwards: it reads the file's owner first and refuses when
//! a newer claim owns it (serial-number order on the 30 bits, so epochs
//! may wrap as long as fewer than 2^29 claims separate two engines), and
//! its SETATTR is guarded by the ctime it read, so a fencer that raced
//! another one reads again instead of overwriting it; ganesha checks that
//! guard apart from applying the change, so a fence counts only once the
//! owner has stayed ours for `FENCE_SETTLE`, and one taken back by an
//! older fencer is taken again. Pool calls (create,
//! grow, lookup, FSSTAT) are root's; this needs an export that does not
//! squash root. Claim 0 (no claim: tests, records older than epochs)
//! reads and writes as root, unfenced.
//!
//! Hot path: `NfsReplica::{read_at, write_at}`.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use nfs3_client::nfs3_types::nfs3::{
    COMMIT3args, CREATE3args, FSSTAT3args, GETATTR3args, LOOKUP3args, MKDIR3args, Nfs3Option,
    Nfs3Result, READ3args, REMOVE3args, SETATTR3args, WRITE3args, createhow3, diropargs3, fattr3,
    filename3, nfs_fh3, nfsstat3, sattr3, stable_how,
};
use nfs3_client::nfs3_types::rpc::{auth_unix, opaque_auth};
use nfs3_client::nfs3_types::xdr_codec::Opaque;
use nfs3_client::{Nfs3Connection, Nfs3ConnectionBuilder, RpcError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::core::config::NfsPoolConfig;
use crate::core::error::{Error, ErrorKind, Result};
use crate::core::pool::{Pool, ReplicaIo};

const MAX_IDLE: usize = 16;
/// Largest READ or WRITE sent in one call; servers announce more (ganesha:
/// 64 MiB) but the engine's requests are at most 1 MiB anyway.
const MAX_IO: usize = 1 << 20;
const NFS_PORT: u16 = 2049;
/// The uids claims write as: `CLAIM_UID_BASE + epoch mod CLAIM_UID_SPAN`,
/// high enough to be nobody's account and far from root and `nobody`.
const CLAIM_UID_BASE: u32 = 0x4000_0000;
const CLAIM_UID_SPAN: u32 = 1 << 30;
/// A fencing SETATTR loses its ctime guard to every write the older claim
/// lands meanwhile; past this many tries the replica is reported unfenced.
const FENCE_ATTEMPTS: u32 = 64;
/// How long a fence's owner must stay ours before it counts (see `fence`):
/// far longer than a server takes to apply a SETATTR it has checked.
const FENCE_SETTLE: Duration = Duration::from_millis(50);

type Conn = Nfs3Connection<Stream>;

/// The runtime NFS calls run on; callers block on it from their own threads.
fn runtime() -> io::Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("nfs-io")
        .enable_all()
        .build()?;
    Ok(RUNTIME.get_or_init(|| rt))
}

/// A TCP stream that reports end of file as an error: the crate's own
/// reader loops on a closed socket, so a dead server would spin a call
/// until its timeout instead of failing it at once.
pub struct Stream(TcpStream);

impl nfs3_client::io::AsyncRead for Stream {
    async fn async_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.0.read(buf).await?;
        if n == 0 && !buf.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(n)
    }
}

impl nfs3_client::io::AsyncWrite for Stream {
    async fn async_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.0.write(buf).await?;
        if n == 0 && !buf.is_empty() {
            return Err(io::ErrorKind::WriteZero.into());
        }
        Ok(n)
    }
}

struct Connector;

impl nfs3_client::net::Connector for Connector {
    type Connection = Stream;

    async fn connect(&self, addr: std::net::SocketAddr) -> io::Result<Stream> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Stream(stream))
    }

    async fn connect_with_port(
        &self,
        addr: std::net::SocketAddr,
        local_port: u16,
    ) -> io::Result<Stream> {
        let socket = match addr {
            std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        let local = match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
        };
        socket.bind(std::net::SocketAddr::new(local, local_port))?;
        let stream = socket.connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Stream(stream))
    }
}

/// How one call ended, short of success.
enum CallError {
    /// The server answered with an error: the connection is fine.
    Nfs(nfsstat3),
    /// The server answered, and fencing cannot go on.
    Fence(FenceError),
    /// The transport failed: the connection is dropped.
    Rpc(RpcError),
}

impl From<RpcError> for CallError {
    fn from(e: RpcError) -> Self {
        CallError::Rpc(e)
    }
}

/// The success value, or the server's status as an error.
fn ok<T, F>(r: Nfs3Result<T, F>) -> std::result::Result<T, CallError> {
    match r {
        Nfs3Result::Ok(v) => Ok(v),
        Nfs3Result::Err((stat, _)) => Err(CallError::Nfs(stat)),
    }
}

fn errno_of(stat: nfsstat3) -> i32 {
    match stat {
        nfsstat3::NFS3ERR_NOSPC => libc::ENOSPC,
        nfsstat3::NFS3ERR_DQUOT => libc::EDQUOT,
        nfsstat3::NFS3ERR_ROFS => libc::EROFS,
        nfsstat3::NFS3ERR_NOENT => libc::ENOENT,
        nfsstat3::NFS3ERR_STALE | nfsstat3::NFS3ERR_BADHANDLE => libc::ESTALE,
        nfsstat3::NFS3ERR_PERM | nfsstat3::NFS3ERR_ACCES => libc::EACCES,
        nfsstat3::NFS3ERR_EXIST => libc::EEXIST,
        nfsstat3::NFS3ERR_NOTDIR => libc::ENOTDIR,
        nfsstat3::NFS3ERR_FBIG => libc::EFBIG,
        nfsstat3::NFS3ERR_JUKEBOX => libc::EAGAIN,
        _ => libc::EIO,
    }
}

/// The uid (and gid) replica data is read and written as under claim
/// `epoch`; see the module doc.
pub fn claim_uid(epoch: u64) -> u32 {
    CLAIM_UID_BASE + (epoch % u64::from(CLAIM_UID_SPAN)) as u32
}

/// What fencing a file for a claim has to do, given its owner and mode.
#[derive(Debug, PartialEq, Eq)]
enum FenceStep {
    /// Already fenced for this claim.
    Done,
    /// Owned by root (new), or by an older claim: take it.
    Take,
    /// A newer claim fenced it: this one has lost the volume.
    Refuse { owner: u32 },
}

/// Pure: the step for claim `epoch` on a file with these attributes.
/// Claims are compared in serial-number arithmetic on their 30 bits, so
/// `CLAIM_UID_SPAN - 1` is older than `0` (wrap-around), and a claim is
/// newer when it is at most half the span ahead.
fn fence_step(epoch: u64, uid: u32, gid: u32, mode: u32) -> FenceStep {
    let ours = claim_uid(epoch);
    if uid == ours {
        return if gid == ours && mode & 0o7777 == 0o600 {
            FenceStep::Done
        } else {
            FenceStep::Take
        };
    }
    if !(CLAIM_UID_BASE..CLAIM_UID_BASE + CLAIM_UID_SPAN).contains(&uid) {
        return FenceStep::Take;
    }
    let ahead = (uid - CLAIM_UID_BASE).wrapping_sub(ours - CLAIM_UID_BASE) % CLAIM_UID_SPAN;
    if ahead < CLAIM_UID_SPAN / 2 {
        FenceStep::Refuse { owner: uid }
    } else {
        FenceStep::Take
    }
}

/// Why a replica could not be fenced, beyond a failed call.
#[derive(Debug, thiserror::Error)]
enum FenceError {
    #[error(
        "fenced by a newer claim: the replica is owned by uid {owner:#x}, this engine writes as {ours:#x} (claim {epoch})"
    )]
    Newer { owner: u32, ours: u32, epoch: u64 },
    #[error(
        "the server refused root's SETATTR ({stat:?}): the export squashes root; Terna fences NFS replicas by their owner and needs an export with no root squash"
    )]
    RootSquashed { stat: nfsstat3 },
    #[error(
        "the server kept the owner uid {uid:#x} after a SETATTR to {ours:#x}: it does not let root change owners, so replicas cannot be fenced"
    )]
    OwnerKept { uid: u32, ours: u32 },
    #[error(
        "lost the ctime guard or the owner {FENCE_ATTEMPTS} times in a row: the file keeps changing"
    )]
    Contended,
}

/// Who a connection calls as.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Caller {
    /// Pool calls and fencing.
    Root,
    /// Replica data, as the claim's uid.
    Claim(u64),
}

impl Caller {
    fn uid(self) -> u32 {
        match self {
            Caller::Root | Caller::Claim(0) => 0,
            Caller::Claim(epoch) => claim_uid(epoch),
        }
    }
}

/// One export (and sub-directory) of one server.
struct Target {
    server: String,
    port: u16,
    mount_port: Option<u16>,
    export: String,
    subdir: Option<String>,
    timeout: Duration,
    /// Root's idle connections.
    idle: Mutex<Vec<Conn>>,
    /// The claim replica data is read and written under (0: none, root).
    claim: AtomicU64,
    /// Idle connections calling as a claim's uid, with that claim.
    claim_idle: Mutex<Vec<(u64, Conn)>>,
    /// The handle of the directory replicas live in, once looked up.
    dir: OnceLock<nfs_fh3>,
}

impl Target {
    fn describe(&self) -> String {
        format!(
            "nfs://{}:{}{}{}",
            self.server,
            self.port,
            self.export,
            self.subdir
                .as_deref()
                .map(|s| format!("/{s}"))
                .unwrap_or_default()
        )
    }

    async fn connect(&self, caller: Caller) -> std::result::Result<Conn, io::Error> {
        let id = caller.uid();
        let cred = opaque_auth::auth_unix(&auth_unix {
            stamp: 0,
            machinename: Opaque::borrowed(b"terna"),
            uid: id,
            gid: id,
            gids: vec![],
        });
        let mut builder = Nfs3ConnectionBuilder::new(Connector, &self.server, &self.export)
            .nfs3_port(self.port)
            .credential(cred)
            .connect_from_privileged_port(false);
        if let Some(p) = self.mount_port {
            builder = builder.mount_port(p);
        }
        builder
            .mount()
            .await
            .map_err(|e| io::Error::new(io::ErrorKind::ConnectionRefused, e.to_string()))
    }

    /// Runs a pool call, as root, with the replicas' directory.
    fn call<T>(
        &self,
        what: &str,
        op: impl AsyncFn(&mut Conn, &nfs_fh3) -> std::result::Result<T, CallError>,
    ) -> io::Result<T> {
        self.run(Caller::Root, what, async |conn| {
            let dir = self.dir(conn).await?;
            op(conn, &dir).await
        })
    }

    /// Runs a call on replica data, as the current claim's uid.
    fn call_data<T>(
        &self,
        what: &str,
        op: impl AsyncFn(&mut Conn) -> std::result::Result<T, CallError>,
    ) -> io::Result<T> {
        let caller = Caller::Claim(self.claim.load(Ordering::SeqCst));
        self.run(caller, what, op)
    }

    fn take_idle(&self, caller: Caller) -> Option<Conn> {
        match caller {
            Caller::Root => self.idle.lock().ok()?.pop(),
            Caller::Claim(epoch) => {
                let mut idle = self.claim_idle.lock().ok()?;
                idle.retain(|(e, _)| *e == epoch);
                idle.pop().map(|(_, c)| c)
            }
        }
    }

    fn give_back(&self, caller: Caller, conn: Conn) {
        match caller {
            Caller::Root => {
                if let Ok(mut v) = self.idle.lock()
                    && v.len() < MAX_IDLE
                {
                    v.push(conn);
                }
            }
            Caller::Claim(epoch) => {
                if let Ok(mut v) = self.claim_idle.lock()
                    && v.len() < MAX_IDLE
                    && epoch == self.claim.load(Ordering::SeqCst)
                {
                    v.push((epoch, conn));
                }
            }
        }
    }

    /// Runs `op` on a connection of `caller` under the timeout; see the
    /// module doc.
    fn run<T>(
        &self,
        caller: Caller,
        what: &str,
        op: impl AsyncFn(&mut Conn) -> std::result::Result<T, CallError>,
    ) -> io::Result<T> {
        let fail = |kind: io::ErrorKind, detail: String| {
            io::Error::new(kind, format!("{}: {what}: {detail}", self.describe()))
        };
        runtime()?.block_on(async {
            let mut attempt = 0;
            loop {
                attempt += 1;
                let idle = self.take_idle(caller);
                let reused = idle.is_some();
                let mut conn = match idle {
                    Some(c) => c,
                    None => match tokio::time::timeout(self.timeout, self.connect(caller)).await {
                        Ok(Ok(c)) => c,
                        Ok(Err(e)) => return Err(fail(e.kind(), e.to_string())),
                        Err(_) => {
                            return Err(fail(
                                io::ErrorKind::TimedOut,
                                format!("no answer within {:?}", self.timeout),
                            ));
                        }
                    },
                };
                let done = tokio::time::timeout(self.timeout, op(&mut conn)).await;
                match done {
                    Ok(result) => {
                        if !matches!(result, Err(CallError::Rpc(_))) {
                            self.give_back(caller, conn);
                        }
                        match result {
                            Ok(v) => return Ok(v),
                            Err(CallError::Fence(e)) => {
                                return Err(io::Error::new(
                                    io::ErrorKind::PermissionDenied,
                                    format!("{}: {what}: {e}", self.describe()),
                                ));
                            }
                            Err(CallError::Nfs(stat)) => {
                                let errno = errno_of(stat);
                                let fenced = match caller {
                                    Caller::Claim(epoch) if epoch > 0 && errno == libc::EACCES => {
                                        format!(
                                            ": fenced: the server refuses claim {epoch}'s uid {:#x} (a newer claim fenced the replica, or this one never did)",
                                            claim_uid(epoch)
                                        )
                                    }
                                    _ => String::new(),
                                };
                                return Err(io::Error::new(
                                    io::Error::from_raw_os_error(errno).kind(),
                                    ServerSaid {
                                        errno,
                                        message: format!(
                                            "{}: {what}: {stat:?} (errno {errno}){fenced}",
                                            self.describe()
                                        ),
                                    },
                                ));
                            }
                            // A connection left idle across a server restart.
                            Err(CallError::Rpc(_)) if reused && attempt == 1 => continue,
                            Err(CallError::Rpc(e)) => {
                                return Err(fail(io::ErrorKind::BrokenPipe, e.to_string()));
                            }
                        }
                    }
                    Err(_) => {
                        return Err(fail(
                            io::ErrorKind::TimedOut,
                            format!("no answer within {:?}", self.timeout),
                        ));
                    }
                }
            }
        })
    }

    /// The replicas' directory, created inside the export on first use.
    async fn dir(&self, conn: &mut Conn) -> std::result::Result<nfs_fh3, CallError> {
        if let Some(fh) = self.dir.get() {
            return Ok(fh.clone());
        }
        let root = conn.root_nfs_fh3();
        let fh = match &self.subdir {
            None => root,
            Some(sub) => {
                let name = filename3(Opaque::owned(sub.as_bytes().to_vec()));
                let found = conn
                    .lookup(&LOOKUP3args {
                        what: diropargs3 {
                            dir: root.clone(),
                            name: name.clone(),
                        },
                    })
                    .await?;
                match found {
                    Nfs3Result::Ok(ok) => ok.object,
                    Nfs3Result::Err((nfsstat3::NFS3ERR_NOENT, _)) => {
                        let made = ok(conn
                            .mkdir(&MKDIR3args {
                                where_: diropargs3 { dir: root, name },
                                attributes: sattr3 {
                                    mode: Nfs3Option::Some(0o700),
                                    ..Default::default()
                                },
                            })
                            .await?)?;
                        match made.obj {
                            Nfs3Option::Some(fh) => fh,
                            Nfs3Option::None => return Err(CallError::Nfs(nfsstat3::NFS3ERR_IO)),
                        }
                    }
                    Nfs3Result::Err((stat, _)) => return Err(CallError::Nfs(stat)),
                }
            }
        };
        Ok(self.dir.get_or_init(|| fh).clone())
    }
}

async fn lookup(
    conn: &mut Conn,
    dir: &nfs_fh3,
    name: &str,
) -> std::result::Result<Option<nfs_fh3>, CallError> {
    let found = conn
        .lookup(&LOOKUP3args {
            what: diropargs3 {
                dir: dir.clone(),
                name: filename3(Opaque::owned(name.as_bytes().to_vec())),
            },
        })
        .await?;
    match found {
        Nfs3Result::Ok(ok) => Ok(Some(ok.object)),
        Nfs3Result::Err((nfsstat3::NFS3ERR_NOENT, _)) => Ok(None),
        Nfs3Result::Err((stat, _)) => Err(CallError::Nfs(stat)),
    }
}

async fn attributes(conn: &mut Conn, fh: &nfs_fh3) -> std::result::Result<fattr3, CallError> {
    let attr = ok(conn.getattr(&GETATTR3args { object: fh.clone() }).await?)?;
    Ok(attr.obj_attributes)
}

async fn size_of(conn: &mut Conn, fh: &nfs_fh3) -> std::result::Result<u64, CallError> {
    Ok(attributes(conn, fh).await?.size)
}

async fn set_size(conn: &mut Conn, fh: &nfs_fh3, size: u64) -> std::result::Result<(), CallError> {
    ok(conn
        .setattr(&SETATTR3args {
            object: fh.clone(),
            new_attributes: sattr3 {
                size: Nfs3Option::Some(size),
                ..Default::default()
            },
            guard: Nfs3Option::None,
        })
        .await?)?;
    Ok(())
}

fn pool_error(e: io::Error) -> Error {
    let errno = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<ServerSaid>())
        .map(|s| s.errno);
    let kind = match errno {
        Some(libc::EROFS) | Some(libc::EACCES) => ErrorKind::FailedPrecondition,
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorKind::ResourceExhausted,
        _ => match e.kind() {
            io::ErrorKind::TimedOut
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::BrokenPipe => ErrorKind::Unavailable,
            _ => ErrorKind::Internal,
        },
    };
    let hint = match kind {
        ErrorKind::FailedPrecondition => {
            "; the export is read-only or refuses this client: export it read-write with no root squash"
        }
        ErrorKind::ResourceExhausted => "; the export is full",
        _ => "",
    };
    Error::new(kind, format!("{e}{hint}"))
}

/// An error status the server answered with, as the errno it stands for.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
struct ServerSaid {
    errno: i32,
    message: String,
}

/// Cheap to clone: clones share their connections.
#[derive(Clone)]
pub struct NfsPool {
    target: Arc<Target>,
}

impl NfsPool {
    pub fn new(cfg: &NfsPoolConfig, timeout: Duration) -> NfsPool {
        NfsPool {
            target: Arc::new(Target {
                server: cfg.server.clone(),
                port: cfg.port.unwrap_or(NFS_PORT),
                mount_port: cfg.mount_port,
                export: cfg.export.clone(),
                subdir: cfg.subdir.clone().filter(|s| !s.is_empty()),
                timeout,
                idle: Mutex::new(Vec::new()),
                claim: AtomicU64::new(0),
                claim_idle: Mutex::new(Vec::new()),
                dir: OnceLock::new(),
            }),
        }
    }

    /// Bytes the server says are free for us (FSSTAT `abytes`).
    pub fn available(&self) -> Result<u64> {
        self.target
            .call("read free space", async |conn, dir| {
                let st = ok(conn
                    .fsstat(&FSSTAT3args {
                        fsroot: dir.clone(),
                    })
                    .await?)?;
                Ok(st.abytes)
            })
            .map_err(pool_error)
    }
}

impl Pool for NfsPool {
    fn act_under_claim(&self, epoch: u64) {
        self.target.claim.store(epoch, Ordering::SeqCst);
        if let Ok(mut idle) = self.target.claim_idle.lock() {
            idle.clear();
        }
    }

    fn create(&self, name: &str, size: u64) -> Result<()> {
        // A name is one component in the pool's directory: never `..`
        // (the export's root or another pool's subdir), never a path.
        crate::core::pool::check_replica_name(name)?;
        self.target
            .call("create replica", async |conn, dir| {
                let fh = match lookup(conn, dir, name).await? {
                    Some(fh) => fh,
                    None => {
                        let made = ok(conn
                            .create(&CREATE3args {
                                where_: diropargs3 {
                                    dir: dir.clone(),
                                    name: filename3(Opaque::owned(name.as_bytes().to_vec())),
                                },
                                how: createhow3::UNCHECKED(sattr3 {
                                    mode: Nfs3Option::Some(0o600),
                                    ..Default::default()
                                }),
                            })
                            .await?)?;
                        match made.obj {
                            Nfs3Option::Some(fh) => fh,
                            // Some servers leave the handle out: look it up.
                            Nfs3Option::None => lookup(conn, dir, name)
                                .await?
                                .ok_or(CallError::Nfs(nfsstat3::NFS3ERR_NOENT))?,
                        }
                    }
                };
                if size_of(conn, &fh).await? < size {
                    set_size(conn, &fh, size).await?;
                }
                Ok(())
            })
            .map_err(pool_error)
    }

    fn grow(&self, name: &str, size: u64) -> Result<()> {
        crate::core::pool::check_replica_name(name)?;
        self.target
            .call("grow replica", async |conn, dir| {
                let fh = lookup(conn, dir, name)
                    .await?
                    .ok_or(CallError::Nfs(nfsstat3::NFS3ERR_NOENT))?;
                if size_of(conn, &fh).await? < size {
                    set_size(conn, &fh, size).await?;
                }
                Ok(())
            })
            .map_err(pool_error)
    }

    fn delete(&self, name: &str) -> Result<()> {
        crate::core::pool::check_replica_name(name)?;
        self.target
            .call("delete replica", async |conn, dir| {
                let removed = conn
                    .remove(&REMOVE3args {
                        object: diropargs3 {
                            dir: dir.clone(),
                            name: filename3(Opaque::owned(name.as_bytes().to_vec())),
                        },
                    })
                    .await?;
                match removed {
                    Nfs3Result::Ok(_) | Nfs3Result::Err((nfsstat3::NFS3ERR_NOENT, _)) => Ok(()),
                    Nfs3Result::Err((stat, _)) => Err(CallError::Nfs(stat)),
                }
            })
            .map_err(pool_error)
    }

    fn size_of(&self, name: &str) -> Result<Option<u64>> {
        crate::core::pool::check_replica_name(name)?;
        self.target
            .call("stat replica", async |conn, dir| {
                match lookup(conn, dir, name).await? {
                    Some(fh) => Ok(Some(size_of(conn, &fh).await?)),
                    None => Ok(None),
                }
            })
            .map_err(pool_error)
    }

    fn open(&self, name: &str) -> Result<Box<dyn ReplicaIo>> {
        crate::core::pool::check_replica_name(name)?;
        let fh = self
            .target
            .call("open replica", async |conn, dir| {
                lookup(conn, dir, name)
                    .await?
                    .ok_or(CallError::Nfs(nfsstat3::NFS3ERR_NOENT))
            })
            .map_err(pool_error)?;
        Ok(Box::new(NfsReplica {
            target: self.target.clone(),
            fh,
        }))
    }

    fn capacity(&self) -> Result<u64> {
        self.target
            .call("read capacity", async |conn, dir| {
                let st = ok(conn
                    .fsstat(&FSSTAT3args {
                        fsroot: dir.clone(),
                    })
                    .await?)?;
                Ok(st.tbytes)
            })
            .map_err(pool_error)
    }

    fn available(&self) -> Option<Result<u64>> {
        Some(NfsPool::available(self))
    }
}

struct NfsReplica {
    target: Arc<Target>,
    fh: nfs_fh3,
}

impl NfsReplica {
    fn write_chunk(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.target.call_data("write", async |conn| {
            let mut done = 0;
            while done < buf.len() {
                let part = &buf[done..];
                let written = ok(conn
                    .write(&WRITE3args {
                        file: self.fh.clone(),
                        offset: offset + done as u64,
                        count: part.len() as u32,
                        stable: stable_how::FILE_SYNC,
                        data: Opaque::borrowed(part),
                    })
                    .await?)?;
                if written.count == 0 {
                    return Err(CallError::Nfs(nfsstat3::NFS3ERR_IO));
                }
                done += written.count as usize;
            }
            Ok(())
        })
    }
}

impl ReplicaIo for NfsReplica {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        for (i, chunk) in buf.chunks_mut(MAX_IO).enumerate() {
            let at = offset + (i * MAX_IO) as u64;
            let data = self.target.call_data("read", async |conn| {
                let mut out = Vec::with_capacity(chunk.len());
                while out.len() < chunk.len() {
                    let got = ok(conn
                        .read(&READ3args {
                            file: self.fh.clone(),
                            offset: at + out.len() as u64,
                            count: (chunk.len() - out.len()) as u32,
                        })
                        .await?)?;
                    out.extend_from_slice(&got.data);
                    if got.eof || got.data.is_empty() {
                        break;
                    }
                }
                Ok(out)
            })?;
            // Short only at the file's end. Zeroes there would pass off a
            // replica truncated behind our back as holding zeroes; a local
            // replica fails such a read, and so does this one.
            if data.len() != chunk.len() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "{}: read of {} bytes at {at} got {}: it ends past the end of the replica",
                        self.target.describe(),
                        chunk.len(),
                        data.len()
                    ),
                ));
            }
            chunk.copy_from_slice(&data);
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        for (i, chunk) in buf.chunks(MAX_IO).enumerate() {
            self.write_chunk(chunk, offset + (i * MAX_IO) as u64)?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        // Every write was FILE_SYNC; COMMIT still proves the server is there.
        self.target.call_data("commit", async |conn| {
            ok(conn
                .commit(&COMMIT3args {
                    file: self.fh.clone(),
                    offset: 0,
                    count: 0,
                })
                .await?)?;
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeroes = vec![0u8; MAX_IO];
        let mut at = offset;
        let end = offset.saturating_add(len);
        while at < end {
            let n = (end - at).min(MAX_IO as u64) as usize;
            self.write_chunk(&zeroes[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    fn check(&self) -> std::result::Result<(), String> {
        self.target
            .call_data("check replica", async |conn| {
                size_of(conn, &self.fh).await.map(|_| ())
            })
            .map_err(|e| e.to_string())
    }

    /// Makes the file the current claim's (see the module doc): every
    /// call of an older claim is refused from the server's answer to this
    /// SETATTR on.
    fn fence(&self) -> io::Result<()> {
        let epoch = self.target.claim.load(Ordering::SeqCst);
        if epoch == 0 {
            return Ok(());
        }
        let ours = claim_uid(epoch);
        self.target
            .run(Caller::Root, "fence replica", async |conn| {
                let mut settled = false;
                for _ in 0..FENCE_ATTEMPTS {
                    let attr = attributes(conn, &self.fh).await?;
                    match fence_step(epoch, attr.uid, attr.gid, attr.mode) {
                        // ganesha checks the guard and applies the SETATTR in
                        // two steps, so an older fencer's SETATTR that passed
                        // its guard before ours may still land after it: only
                        // an owner that stays ours past that is a fence, and
                        // one taken back is taken again.
                        FenceStep::Done if settled => return Ok(()),
                        FenceStep::Done => {
                            tokio::time::sleep(FENCE_SETTLE).await;
                            settled = true;
                            continue;
                        }
                        FenceStep::Refuse { owner } => {
                            return Err(CallError::Fence(FenceError::Newer { owner, ours, epoch }));
                        }
                        FenceStep::Take => settled = false,
                    }
                    let set = conn
                        .setattr(&SETATTR3args {
                            object: self.fh.clone(),
                            new_attributes: sattr3 {
                                mode: Nfs3Option::Some(0o600),
                                uid: Nfs3Option::Some(ours),
                                gid: Nfs3Option::Some(ours),
                                ..Default::default()
                            },
                            guard: Nfs3Option::Some(attr.ctime),
                        })
                        .await?;
                    match set {
                        Nfs3Result::Ok(_) => {
                            let now = attributes(conn, &self.fh).await?;
                            if now.uid == attr.uid && now.uid != ours {
                                return Err(CallError::Fence(FenceError::OwnerKept {
                                    uid: now.uid,
                                    ours,
                                }));
                            }
                        }
                        // Changed since we read it (a write, or another fencer):
                        // decide again on what it is now.
                        Nfs3Result::Err((nfsstat3::NFS3ERR_NOT_SYNC, _)) => {}
                        Nfs3Result::Err((
                            stat @ (nfsstat3::NFS3ERR_PERM | nfsstat3::NFS3ERR_ACCES),
                            _,
                        )) => {
                            return Err(CallError::Fence(FenceError::RootSquashed { stat }));
                        }
                        Nfs3Result::Err((stat, _)) => return Err(CallError::Nfs(stat)),
                    }
                }
                Err(CallError::Fence(FenceError::Contended))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Claims own their replica files in order: a newer claim takes over
    /// root's file or an older claim's, never the other way round, also
    /// across the wrap of the 30 bits.
    #[test]
    fn fencing_takes_files_of_older_claims_only() {
        let span = u64::from(CLAIM_UID_SPAN);
        assert_eq!(claim_uid(1), 0x4000_0001);
        assert_eq!(claim_uid(span + 1), claim_uid(1));
        assert_eq!(claim_uid(span - 1), 0x7fff_ffff);
        for epoch in [1, 2, 1000, span / 2, span - 1, span, span + 5, u64::MAX] {
            let ours = claim_uid(epoch);
            assert_eq!(fence_step(epoch, ours, ours, 0o100600), FenceStep::Done);
            assert_eq!(fence_step(epoch, ours, ours, 0o100644), FenceStep::Take);
            assert_eq!(fence_step(epoch, ours, 0, 0o100600), FenceStep::Take);
            // New files are root's; other owners are not claims.
            for other in [
                0,
                65534,
                1000,
                CLAIM_UID_BASE - 1,
                CLAIM_UID_BASE + CLAIM_UID_SPAN,
            ] {
                assert_eq!(fence_step(epoch, other, other, 0o100600), FenceStep::Take);
            }
            for older in [1, 2, 1000, span / 2 - 1] {
                let owner = claim_uid(epoch.wrapping_sub(older));
                assert_eq!(
                    fence_step(epoch, owner, owner, 0o100600),
                    FenceStep::Take,
                    "{epoch} after {older} fewer"
                );
            }
            for newer in [1, 2, 1000, span / 2 - 1] {
                let owner = claim_uid(epoch.wrapping_add(newer));
                assert_eq!(
                    fence_step(epoch, owner, owner, 0o100600),
                    FenceStep::Refuse { owner },
                    "{epoch} before {newer} more"
                );
            }
        }
        // Across the wrap: the last 30-bit claim is older than claim 0 of
        // the next round, and the other way round is refused.
        assert_eq!(
            fence_step(span, claim_uid(span - 1), claim_uid(span - 1), 0o600),
            FenceStep::Take
        );
        let first = claim_uid(span);
        assert_eq!(
            fence_step(span - 1, first, first, 0o600),
            FenceStep::Refuse { owner: first }
        );
        assert_eq!(Caller::Root.uid(), 0);
        assert_eq!(Caller::Claim(0).uid(), 0);
        assert_eq!(Caller::Claim(7).uid(), 0x4000_0007);
    }

    /// An NFS pool sends a name as one LOOKUP/CREATE/REMOVE component:
    /// `..` would reach the export's root or another pool's subdir, so bad
    /// names are refused before any call (this server does not exist).
    #[test]
    fn nfs_pools_refuse_bad_names_before_any_call() {
        let cfg = crate::core::config::NfsPoolConfig {
            server: "192.0.2.1".into(),
            port: Some(2049),
            mount_port: Some(2049),
            export: "/export".into(),
            subdir: Some("pool-a".into()),
        };
        let pool = NfsPool::new(&cfg, std::time::Duration::from_secs(30));
        let start = std::time::Instant::now();
        for bad in ["..", "../pool-b/x", "/etc/passwd", "a/b", "x\0", "."] {
            let kind = |r: Result<()>| r.unwrap_err().kind;
            let invalid = crate::core::error::ErrorKind::InvalidArgument;
            assert_eq!(kind(pool.create(bad, 4096)), invalid, "{bad:?}");
            assert_eq!(kind(pool.grow(bad, 4096)), invalid, "{bad:?}");
            assert_eq!(kind(pool.delete(bad)), invalid, "{bad:?}");
            assert_eq!(kind(pool.size_of(bad).map(drop)), invalid, "{bad:?}");
            assert_eq!(kind(pool.open(bad).map(drop)), invalid, "{bad:?}");
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
    }
}
