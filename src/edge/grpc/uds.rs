//! Accepted Unix socket connections, their reads passed through an
//! [`authority::Rewriter`](super::authority::Rewriter), as the incoming
//! stream tonic's `serve_with_incoming` takes. Writes (server→client) go
//! straight to the socket. No task, no extra socket: the rewrite happens
//! inside `poll_read`, on bytes already read.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::{Stream, StreamExt, wrappers::UnixListenerStream};
use tonic::transport::server::{Connected, UdsConnectInfo};
use tracing::{debug, warn};

use super::authority::{Rewriter, Violation};
use crate::core::error::{Error, Result};

/// How much is read from the socket at a time.
const READ_CHUNK: usize = 64 * 1024;

/// The socket path of a `unix://` endpoint.
pub fn socket_path(endpoint: &str) -> Result<PathBuf> {
    let path = endpoint
        .strip_prefix("unix://")
        .ok_or_else(|| Error::invalid(format!("endpoint {endpoint:?} must start with unix://")))?;
    if path.is_empty() {
        return Err(Error::invalid(format!(
            "endpoint {endpoint:?} names no socket path"
        )));
    }
    Ok(PathBuf::from(path))
}

/// Listens on a `unix://` CSI endpoint, replacing a stale socket file.
pub fn bind_endpoint(endpoint: &str) -> Result<(PathBuf, UnixListener)> {
    let socket = socket_path(endpoint)?;
    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::io(format!("cannot create {}", parent.display()), e))?;
    }
    // Only a socket is replaced: an endpoint naming a regular file, a
    // directory or a symlink is a mistake, and the file is not ours.
    match std::fs::symlink_metadata(&socket) {
        Ok(m) if m.file_type().is_socket() => {
            // Stale only if nobody answers on it: a live one is another
            // process's endpoint, not ours to take over.
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                return Err(Error::new(
                    crate::core::error::ErrorKind::FailedPrecondition,
                    format!(
                        "endpoint {} is in use by a running process; stop it or choose another endpoint",
                        socket.display()
                    ),
                ));
            }
            std::fs::remove_file(&socket).map_err(|e| {
                Error::io(
                    format!("cannot remove stale socket {}", socket.display()),
                    e,
                )
            })?;
        }
        Ok(_) => {
            return Err(Error::invalid(format!(
                "endpoint {} exists and is not a socket; refusing to replace it",
                socket.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(Error::io(format!("cannot inspect {}", socket.display()), e));
        }
    }
    let listener = UnixListener::bind(&socket)
        .map_err(|e| Error::io(format!("cannot listen on {}", socket.display()), e))?;
    Ok((socket, listener))
}

/// The connections `listener` accepts, each wrapped in a [`Connection`].
/// Accept errors are passed on as `UnixListenerStream` passes them.
pub fn incoming(listener: UnixListener) -> impl Stream<Item = io::Result<Connection>> + Send {
    UnixListenerStream::new(listener).map(|accepted| accepted.map(Connection::new))
}

/// One accepted connection whose client→server bytes are rewritten.
pub struct Connection {
    socket: UnixStream,
    rewriter: Rewriter,
    /// What was read from the socket, before rewriting.
    chunk: Box<[u8]>,
    /// Rewritten bytes not yet handed to the reader, from `pending_at` on.
    pending: Vec<u8>,
    pending_at: usize,
    eof: bool,
}

impl Connection {
    /// For a tonic server with the default SETTINGS_MAX_FRAME_SIZE (16384);
    /// one configured with a larger `max_frame_size` needs the rewriter to
    /// allow it too (`Rewriter::new`).
    pub fn new(socket: UnixStream) -> Connection {
        Connection {
            socket,
            rewriter: Rewriter::default(),
            chunk: vec![0; READ_CHUNK].into_boxed_slice(),
            pending: Vec::new(),
            pending_at: 0,
            eof: false,
        }
    }

    fn violation(&self, v: Violation) -> io::Error {
        warn!(error = %v, "closing a gRPC connection that broke the HTTP/2 protocol");
        io::Error::new(io::ErrorKind::InvalidData, v)
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.pending_at < this.pending.len() {
                let n = buf.remaining().min(this.pending.len() - this.pending_at);
                buf.put_slice(&this.pending[this.pending_at..this.pending_at + n]);
                this.pending_at += n;
                if this.pending_at == this.pending.len() {
                    this.pending.clear();
                    this.pending_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let mut read = ReadBuf::new(&mut this.chunk);
            ready!(Pin::new(&mut this.socket).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                this.eof = true;
                continue;
            }
            let replaced = this.rewriter.replaced;
            if let Err(v) = this.rewriter.feed(read.filled(), &mut this.pending) {
                return Poll::Ready(Err(this.violation(v)));
            }
            if replaced == 0
                && let Some(authority) = &this.rewriter.first_replaced
            {
                let authority = String::from_utf8_lossy(authority);
                debug!(%authority, "replacing an :authority h2 rejects with localhost");
            }
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().socket).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().socket).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.socket.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().socket).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().socket).poll_shutdown(cx)
    }
}

impl Connected for Connection {
    type ConnectInfo = UdsConnectInfo;

    fn connect_info(&self) -> UdsConnectInfo {
        self.socket.connect_info()
    }
}

#[cfg(test)]
mod tests;
