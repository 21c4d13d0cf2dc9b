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
//! Hot path: `NfsReplica::{read_at, write_at}`.

use std::io;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use nfs3_client::nfs3_types::nfs3::{
    COMMIT3args, CREATE3args, FSSTAT3args, GETATTR3args, LOOKUP3args, MKDIR3args, Nfs3Option,
    Nfs3Result, READ3args, REMOVE3args, SETATTR3args, WRITE3args, createhow3, diropargs3,
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

/// One export (and sub-directory) of one server.
struct Target {
    server: String,
    port: u16,
    mount_port: Option<u16>,
    export: String,
    subdir: Option<String>,
    timeout: Duration,
    idle: Mutex<Vec<Conn>>,
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

    async fn connect(&self) -> std::result::Result<Conn, io::Error> {
        let cred = opaque_auth::auth_unix(&auth_unix {
            stamp: 0,
            machinename: Opaque::borrowed(b"terna"),
            uid: 0,
            gid: 0,
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

    /// Runs `op` on a connection under the timeout; see the module doc.
    fn call<T>(
        &self,
        what: &str,
        op: impl AsyncFn(&mut Conn, &nfs_fh3) -> std::result::Result<T, CallError>,
    ) -> io::Result<T> {
        let fail = |kind: io::ErrorKind, detail: String| {
            io::Error::new(kind, format!("{}: {what}: {detail}", self.describe()))
        };
        runtime()?.block_on(async {
            let mut attempt = 0;
            loop {
                attempt += 1;
                let idle = self.idle.lock().ok().and_then(|mut v| v.pop());
                let reused = idle.is_some();
                let mut conn = match idle {
                    Some(c) => c,
                    None => match tokio::time::timeout(self.timeout, self.connect()).await {
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
                let done = tokio::time::timeout(self.timeout, async {
                    let dir = self.dir(&mut conn).await?;
                    op(&mut conn, &dir).await
                })
                .await;
                match done {
                    Ok(result) => {
                        if !matches!(result, Err(CallError::Rpc(_))) {
                            self.give_back(conn);
                        }
                        match result {
                            Ok(v) => return Ok(v),
                            Err(CallError::Nfs(stat)) => {
                                let errno = errno_of(stat);
                                return Err(io::Error::new(
                                    io::Error::from_raw_os_error(errno).kind(),
                                    ServerSaid {
                                        errno,
                                        message: format!(
                                            "{}: {what}: {stat:?} (errno {errno})",
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

    fn give_back(&self, conn: Conn) {
        if let Ok(mut v) = self.idle.lock()
            && v.len() < MAX_IDLE
        {
            v.push(conn);
        }
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

async fn size_of(conn: &mut Conn, fh: &nfs_fh3) -> std::result::Result<u64, CallError> {
    let attr = ok(conn.getattr(&GETATTR3args { object: fh.clone() }).await?)?;
    Ok(attr.obj_attributes.size)
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
        self.target.call("write", async |conn, _| {
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
            let data = self.target.call("read", async |conn, _| {
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
        self.target.call("commit", async |conn, _| {
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
            .call("check replica", async |conn, _| {
                size_of(conn, &self.fh).await.map(|_| ())
            })
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
