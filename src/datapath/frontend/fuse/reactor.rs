//! Who takes requests off the session and who answers them.
//!
//! - Readers (a few threads, on the session fd made non-blocking) take
//!   every request. A read of the volume that the device
//!   can hand out as a replica file (`BlockDevice::direct_read`) becomes an
//!   io_uring read straight into the request's buffer; the reader answers
//!   it when it completes. No thread sleeps per read, and a reader waits
//!   for new requests and read completions at once.
//! - Helpers (many threads) get everything else, with its buffer, over a
//!   channel and answer it synchronously: writes, which go to every
//!   replica, and reads the readers could not do or whose direct read failed
//!   (the engine's own read then records the fault and tries another replica).
//!
//! Why not a thread per request: each 4k read then cost a wake-up for the
//! request, a sleep in pread and a wake-up on its completion, and its own
//! disk submission; the CPUs spent more on that than on the I/O.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use io_uring::{IoUring, cqueue, opcode, types};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};

use super::buffer::{Buffers, DATA_OFFSET, REQ_OFFSET};
use super::ops::Session;
use super::reply::{Response, reply};
use crate::datapath::frontend::DirectRead;
use crate::datapath::replica::aligned::AlignedBuf;

/// A request taken off the session, and the fd it came from: its reply
/// must go to that fd.
pub(super) struct Request {
    buf: AlignedBuf,
    n: usize,
    fd: Arc<OwnedFd>,
}

/// A helper: answers the requests readers pass on, one at a time.
pub(super) fn helper(session: &Session, requests: Receiver<Request>, buffers: &Buffers) {
    let _ = crate::datapath::frontend::mark_io_flusher();
    for mut req in requests {
        if let Some((unique, resp)) = session.handle(req.buf.as_mut_slice(), req.n) {
            reply(&req.fd, unique, &resp);
        }
        buffers.put(req.buf);
    }
}

/// The user data of the poll on the session fd; reads use their slot index.
const POLL: u64 = u64::MAX;
const RING_ENTRIES: u32 = 256;

/// A read submitted to the ring: its request, and where the data goes.
struct InFlight {
    req: Request,
    unique: u64,
    len: usize,
    direct: Box<dyn DirectRead>,
}

enum Taken {
    Request(Request),
    /// Nothing queued now.
    Empty,
    /// The session is over (unmounted or aborted).
    Ended,
}

/// A reader: runs until the session ends. `fd` is non-blocking.
pub(super) fn reader(
    session: &Session,
    fd: Arc<OwnedFd>,
    buffers: &Buffers,
    helpers: Sender<Request>,
) {
    if let Err(e) = crate::datapath::frontend::mark_io_flusher() {
        tracing::warn!(error = %e, "PR_SET_IO_FLUSHER refused (needs CAP_SYS_RESOURCE); memory reclaim may wait on this FUSE server");
    }
    // Not DEFER_TASKRUN: completions would then wait for a blocking
    // submit, and while requests keep coming the reader does not block.
    let ring = IoUring::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .build(RING_ENTRIES)
        .or_else(|_| IoUring::new(RING_ENTRIES));
    match ring {
        Ok(ring) => Reader {
            session,
            fd,
            buffers,
            helpers,
            ring,
            slots: Vec::new(),
            free_slots: Vec::new(),
            in_flight: 0,
            readable: true,
            polling: false,
            done: Vec::new(),
        }
        .run(),
        Err(e) => {
            tracing::warn!(error = %e, "io_uring unavailable: every FUSE request goes to the helpers");
            pass_everything_on(&fd, buffers, &helpers);
        }
    }
}

/// Without io_uring the reader only hands requests to the helpers.
fn pass_everything_on(fd: &Arc<OwnedFd>, buffers: &Buffers, helpers: &Sender<Request>) {
    loop {
        match take(fd, buffers) {
            Taken::Request(req) => {
                if helpers.send(req).is_err() {
                    return;
                }
            }
            Taken::Empty => {
                let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
                let _ = nix::poll::poll(&mut fds, PollTimeout::NONE);
            }
            Taken::Ended => return,
        }
    }
}

/// The next request queued on the session, if any.
fn take(fd: &Arc<OwnedFd>, buffers: &Buffers) -> Taken {
    loop {
        let mut buf = buffers.take();
        match nix::unistd::read(fd.as_fd(), &mut buf.as_mut_slice()[REQ_OFFSET..]) {
            Ok(n) => {
                return Taken::Request(Request {
                    buf,
                    n,
                    fd: fd.clone(),
                });
            }
            Err(Errno::EAGAIN) => {
                buffers.put(buf);
                return Taken::Empty;
            }
            // ENOENT: the request was interrupted before we could read it.
            Err(Errno::EINTR | Errno::ENOENT) => buffers.put(buf),
            Err(Errno::ENODEV | Errno::ECONNABORTED) => return Taken::Ended,
            Err(e) => {
                tracing::error!(error = %e, "reading /dev/fuse failed, reader exits");
                return Taken::Ended;
            }
        }
    }
}

struct Reader<'a> {
    session: &'a Session,
    fd: Arc<OwnedFd>,
    buffers: &'a Buffers,
    helpers: Sender<Request>,
    ring: IoUring,
    /// Reads in flight, by the user data of their ring entry.
    slots: Vec<Option<InFlight>>,
    free_slots: Vec<usize>,
    in_flight: usize,
    /// Requests may be queued on the session (no EAGAIN since the last poll).
    readable: bool,
    /// The multishot poll on the session is armed.
    polling: bool,
    /// Completions being handled; kept to reuse its allocation.
    done: Vec<(u64, i32, u32)>,
}

impl Reader<'_> {
    fn run(mut self) {
        loop {
            if !self.polling {
                // Multishot: one entry per wake-up of the session's queue,
                // so a request queued after we found it empty wakes us.
                let poll =
                    opcode::PollAdd::new(types::Fd(self.fd.as_raw_fd()), libc::POLLIN as u32)
                        .multi(true)
                        .build()
                        .user_data(POLL);
                self.push(&poll);
                self.polling = true;
            }
            // One request at a time: its read goes to the disk, and the
            // reads completed meanwhile are answered, before the next request
            // is taken. Taking a batch of requests first saves syscalls but
            // holds both the batch's reads and earlier completions back; on
            // a two-CPU machine that latency cost more than the syscalls
            // (4k random reads at depth 32: batches of 32 gave 0.61-0.63 of
            // the raw disk, one at a time 0.64-0.66).
            if self.readable {
                match take(&self.fd, self.buffers) {
                    Taken::Request(req) => self.dispatch(req),
                    Taken::Empty => self.readable = false,
                    Taken::Ended => break,
                }
            }
            // Still readable: submit, reap, and come back for more.
            let wait = usize::from(!self.readable);
            if let Err(e) = self.ring.submit_and_wait(wait)
                && !matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY))
            {
                tracing::error!(error = %e, "io_uring submit failed, reader exits");
                break;
            }
            self.reap();
        }
        // The kernel writes into the buffers of reads in flight: they must
        // outlive those reads.
        while self.in_flight > 0 {
            if let Err(e) = self.ring.submit_and_wait(1)
                && e.raw_os_error() != Some(libc::EINTR)
            {
                tracing::error!(error = %e, "io_uring wait failed; leaking the buffers of reads in flight");
                std::mem::forget(std::mem::take(&mut self.slots));
                return;
            }
            self.reap();
        }
    }

    /// Handles the completions posted so far: the session's poll, and reads.
    fn reap(&mut self) {
        let mut done = std::mem::take(&mut self.done);
        done.extend(
            self.ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        for &(data, result, flags) in &done {
            if data == POLL {
                self.readable = true;
                self.polling = cqueue::more(flags);
            } else {
                self.complete(data, result);
            }
        }
        done.clear();
        self.done = done;
    }

    fn dispatch(&mut self, mut req: Request) {
        let Some((unique, offset, len, direct)) =
            self.session.direct_read(req.buf.as_slice(), req.n)
        else {
            self.pass_on(req);
            return;
        };
        let data = req.buf.as_mut_slice()[DATA_OFFSET..].as_mut_ptr();
        let read = opcode::Read::new(types::Fd(direct.fd()), data, len as u32)
            .offset(offset)
            .build();
        let slot = self.free_slots.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        // The buffer moves into the slot, but its heap allocation does not:
        // `data` stays valid until the read completes and the slot is emptied.
        self.slots[slot] = Some(InFlight {
            req,
            unique,
            len,
            direct,
        });
        self.in_flight += 1;
        self.push(&read.user_data(slot as u64));
    }

    fn push(&mut self, entry: &io_uring::squeue::Entry) {
        loop {
            // SAFETY: what an entry points to outlives the operation: a
            // read's data pointer is into the buffer of the request its slot
            // holds until the completion empties it (and `run` waits for
            // every read in flight before the slots are dropped); a poll
            // points to nothing.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return;
            }
            // Full: hand the queue to the kernel and try again.
            if let Err(e) = self.ring.submit() {
                tracing::warn!(error = %e, "io_uring submit failed, retrying");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    fn complete(&mut self, slot: u64, result: i32) {
        let Some(done) = self.slots.get_mut(slot as usize).and_then(Option::take) else {
            return;
        };
        self.free_slots.push(slot as usize);
        self.in_flight -= 1;
        if usize::try_from(result).ok() == Some(done.len) {
            done.direct.done();
            let data = &done.req.buf.as_slice()[DATA_OFFSET..DATA_OFFSET + done.len];
            reply(&done.req.fd, done.unique, &Response::Data(data));
            self.buffers.put(done.req.buf);
        } else {
            // The engine reads again, and faults the replica if it fails.
            tracing::debug!(result, "direct replica read failed or came back short");
            drop(done.direct);
            self.pass_on(done.req);
        }
    }

    fn pass_on(&self, req: Request) {
        // Blocks while the helpers' queue is full; helpers never wait on a
        // reader, so it drains. They outlive readers, so this fails only in
        // a teardown.
        let _ = self.helpers.send(req);
    }
}
