//! The batched-send engine: queue `Bytes` for many connections, flush them
//! all with one submission, and read each connection's result.
//!
//! Backend-neutral: partial-write accounting lives in [`Outbox`], the
//! syscalls in the driver leaves. This module owns every connection's state,
//! and with it the guarantee that no buffer is freed while the kernel may
//! still read it (see `WriteOp`).
//!
//! The files below: `conn.rs` the connection table, `start.rs` starting
//! writes (the one `unsafe` call), `events.rs` completions, `wait.rs`
//! waiting and the waker, `zerocopy.rs` the zero-copy policy,
//! `datagram.rs` GSO and segmented sends.

mod conn;
mod datagram;
mod events;
mod start;
mod wait;
mod zerocopy;

use std::borrow::Borrow;
use std::cell::Cell;
use std::fmt;
use std::io;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::backend::{Backend, BackendChoice, Selection};
use crate::driver::{Driver, Event, Token, WriteOp};
use crate::fixed::{FixedBufMut, FixedBufPool};
use crate::opcode::Opcode;
use crate::outbox::{Framing, GluePool, NeverCopy, Outbox};
use crate::packet::Packet;
use crate::probe::RingSupport;
use crate::sys::net::{self, FdKind};

use conn::{live_mut, queued_more, refusal, schedule, ConnState, Slot};
use datagram::GsoCounters;
use wait::Wake;
use zerocopy::ZcProbe;

pub use crate::driver::RegisteredFiles;
pub use conn::Conn;
pub use datagram::Segmentation;
pub use zerocopy::ZeroCopy;

/// Why a connection failed. Its queue was emptied into `unsent`.
#[derive(Debug)]
#[non_exhaustive]
pub struct ConnError {
    /// The kernel's error (`EPIPE`, `ECONNRESET`, …), kind preserved.
    pub error: io::Error,
    /// Exactly the bytes that were queued and not written, in order
    /// (pieces under the copy threshold glued together, see
    /// [`MoverBuilder::copy_threshold`]).
    pub unsent: Vec<Bytes>,
}

impl ConnError {
    /// Total length of `unsent`.
    pub fn unsent_bytes(&self) -> usize {
        self.unsent.iter().map(Bytes::len).sum()
    }
}

/// One finished write on one connection.
#[derive(Debug)]
#[non_exhaustive]
pub struct Completion {
    /// The connection.
    pub conn: Conn,
    /// Bytes this write moved.
    pub written: usize,
    /// Bytes still queued on the connection after it.
    pub queued: usize,
    /// Set when the connection failed; it accepts no more sends.
    pub error: Option<ConnError>,
    /// This write took the connection's queue from at or above the high
    /// watermark down to the low one or below: it is writable again (see
    /// [`MoverBuilder::write_watermarks`]). Reported once per flip.
    pub writable_again: bool,
}

impl Completion {
    /// The connection's queue is empty and it has not failed.
    pub fn is_drained(&self) -> bool {
        self.error.is_none() && self.queued == 0
    }
}

/// Why [`Mover::send`] refused buffers. The buffers come back untouched.
#[derive(Debug)]
pub struct SendError<I> {
    /// What went wrong.
    pub kind: SendErrorKind,
    /// The caller's buffers, not queued.
    pub bufs: I,
}

/// The reasons [`Mover::send`] can refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SendErrorKind {
    /// The connection already holds its byte limit: wait for completions.
    BackPressure {
        /// Bytes queued now.
        queued: usize,
        /// The per-connection limit.
        limit: usize,
    },
    /// The connection failed earlier (its completion carried the error).
    Failed,
    /// The handle is stale or was never attached here.
    UnknownConn,
    /// A destination address was given for a stream or file.
    NotDatagram,
}

impl<I> fmt::Display for SendError<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            SendErrorKind::BackPressure { queued, limit } => write!(
                f,
                "connection has {queued} bytes queued, at its limit of {limit}: wait for completions"
            ),
            SendErrorKind::Failed => f.write_str("connection failed earlier; detach it"),
            SendErrorKind::UnknownConn => f.write_str("unknown or detached connection"),
            SendErrorKind::NotDatagram => {
                f.write_str("a destination address needs a datagram socket")
            }
        }
    }
}

impl<I: fmt::Debug> std::error::Error for SendError<I> {}

impl<I> From<SendError<I>> for io::Error {
    fn from(e: SendError<I>) -> io::Error {
        let kind = match e.kind {
            SendErrorKind::BackPressure { .. } => io::ErrorKind::WouldBlock,
            SendErrorKind::Failed => io::ErrorKind::BrokenPipe,
            SendErrorKind::UnknownConn => io::ErrorKind::NotFound,
            SendErrorKind::NotDatagram => io::ErrorKind::InvalidInput,
        };
        io::Error::new(kind, e.to_string())
    }
}

/// A detached connection: its fd, and what it had not yet sent.
#[derive(Debug)]
#[non_exhaustive]
pub struct Detached {
    /// The fd, as attached.
    pub fd: OwnedFd,
    /// Exactly the queued bytes that were not written, in order (pieces
    /// under the copy threshold glued together).
    pub unsent: Vec<Bytes>,
    /// Bytes written by writes whose completions were not yet handed out:
    /// chiefly the write in flight, cancelled part-way through. No
    /// completion for the connection follows, so the bytes reported in
    /// its completions, plus these, plus `unsent`, are exactly what was
    /// queued.
    pub written: usize,
}

/// Counters since the engine was built.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// `flush` calls that started at least one write.
    pub submissions: u64,
    /// Writes started (one per connection per round, plus resumptions;
    /// one per datagram, or per GSO send of several).
    pub writes: u64,
    /// io_uring submission queue entries.
    pub sqes: u64,
    /// `io_uring_enter` calls.
    pub enters: u64,
    /// System calls made to move bytes or wait (on io_uring: `enters`).
    pub syscalls: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Writes that moved fewer bytes than they were given (the rest went
    /// out in later writes, from the exact byte).
    pub short_writes: u64,
    /// Zero-copy sends submitted.
    pub zc_sends: u64,
    /// Zero-copy sends whose notification said the kernel copied anyway.
    pub zc_copied: u64,
    /// Zero-copy notifications received.
    pub zc_notified: u64,
    /// Zero-copy sends whose notification has not arrived yet (their
    /// buffers are still held).
    pub notifs_outstanding: u64,
    /// GSO sends: one `sendmsg` carrying several datagrams (`UDP_SEGMENT`).
    pub gso_sends: u64,
    /// Datagrams those GSO sends carried.
    pub gso_datagrams: u64,
    /// Sockets whose GSO the kernel refused (EIO, EINVAL, EMSGSIZE): switched
    /// off for good, their datagrams resent one by one
    /// ([`Mover::segmentation`] says which and why).
    pub gso_disabled: u64,
    /// io_uring SQEs that named their connection's file by its slot in the
    /// ring's registered file table (`IOSQE_FIXED_FILE`), sparing the
    /// kernel an `fget`/`fput` each ([`Mover::registered_files`]).
    pub fixed_file_sqes: u64,
    /// Connections attached while the ring had a registered file table
    /// that use their plain fd instead: the table was full, or the kernel
    /// refused the fd.
    pub unregistered_files: u64,
}

/// Builds a [`Mover`]: every setting has a default, `build` selects the
/// backend (io_uring where it works, else epoll, else poll(2), or what
/// `RINGMOVER_BACKEND` or [`backend`](Self::backend) forces) and says why
/// in [`Mover::selection`]. `Clone + Send`: build one `Mover` per thread
/// from clones of one builder.
///
/// ```
/// use ringmover::{BackendChoice, Mover, ZeroCopy};
/// # fn main() -> std::io::Result<()> {
/// let mover = Mover::builder()
///     .backend(BackendChoice::Auto)
///     .queue_depth(256)                        // SQ entries (io_uring)
///     .max_queued_bytes(16 << 20)              // per connection, then BackPressure
///     .write_watermarks(1 << 20, 4 << 20)      // is_writable flips at 4 MiB, back at 1
///     .zero_copy(ZeroCopy::AUTO)               // SEND_ZC where it pays
///     .build()?;
/// let s = mover.selection();
/// println!("{} ({}); fallbacks: {:?}", s.backend, s.reason, s.fallbacks);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct MoverBuilder {
    choice: Option<BackendChoice>,
    depth: u32,
    max_queued: usize,
    fixed: Option<FixedBufs>,
    zero_copy: ZeroCopy,
    copy_threshold: usize,
    watermarks: Option<(usize, usize)>,
    gso: bool,
    files: Option<u32>,
}

impl Default for MoverBuilder {
    fn default() -> Self {
        MoverBuilder {
            choice: None,
            depth: 1024,
            max_queued: 64 << 20,
            fixed: None,
            zero_copy: ZeroCopy::Never,
            copy_threshold: DEFAULT_COPY_THRESHOLD,
            watermarks: None,
            gso: true,
            files: None,
        }
    }
}

/// Where a [`MoverBuilder`]'s registered buffers come from.
#[derive(Debug, Clone)]
enum FixedBufs {
    /// A new pool of `count` buffers of `size` bytes per `Mover`.
    New(usize, usize),
    /// One pool, registered by every `Mover` built.
    Shared(FixedBufPool),
}

/// [`MoverBuilder::copy_threshold`]'s default: pieces under 1 KiB are
/// copied into the glued buffer, larger ones referenced (docs/benchmarks.md).
pub const DEFAULT_COPY_THRESHOLD: usize = 1 << 10;

impl MoverBuilder {
    /// The backend; default: `RINGMOVER_BACKEND`, else `Auto`.
    pub fn backend(mut self, choice: BackendChoice) -> Self {
        self.choice = Some(choice);
        self
    }

    /// io_uring submission queue size (default 1024, at least 8): a flush
    /// of `n` connections enters the kernel ⌈n / depth⌉ times, once per
    /// full queue. The completion queue holds 8 × depth entries, and what
    /// is in flight stays within it: at most 7 × depth writes (a zero-copy
    /// send counts twice until its notification; one queue's worth is kept
    /// for cancellations). Connections beyond that start as completions
    /// come in, in `wait` or `flush_and_wait`.
    pub fn queue_depth(mut self, depth: u32) -> Self {
        self.depth = depth;
        self
    }

    /// Bytes a connection may hold queued before `send` answers
    /// [`SendErrorKind::BackPressure`] (default 64 MiB).
    pub fn max_queued_bytes(mut self, limit: usize) -> Self {
        self.max_queued = limit;
        self
    }

    /// Registers `count` buffers of `size` bytes with the kernel
    /// (`IORING_REGISTER_BUFFERS`); lease them with [`Mover::lease`]. On
    /// epoll/poll they are plain memory. Registration beyond
    /// `RLIMIT_MEMLOCK` fails `build` with an error naming the limit.
    /// Every `build` makes a new pool: to share one between engines, use
    /// [`fixed_pool`](Self::fixed_pool).
    pub fn fixed_buffers(mut self, count: usize, size: usize) -> Self {
        self.fixed = Some(FixedBufs::New(count, size));
        self
    }

    /// Registers an existing pool's buffers (instead of
    /// [`fixed_buffers`](Self::fixed_buffers)): every `Mover` built from
    /// this builder, or a clone of it (so every shard of
    /// [`Shards`](crate::Shards) given it), registers the same memory with
    /// its own ring, and a payload leased from `pool` once and frozen goes
    /// out of any of them from registered memory. Each `Mover` keeps the
    /// pool, and so its memory, alive until its ring is gone (the pool is
    /// freed with its last clone, lease and frozen `Bytes`). The kernel
    /// charges each ring's registration to `RLIMIT_MEMLOCK` separately
    /// (without `CAP_IPC_LOCK`): N engines pin the pool's size N times
    /// against the limit, not in memory.
    ///
    /// ```
    /// use std::io::Read;
    /// use ringmover::{FixedBufPool, Mover};
    /// # fn main() -> std::io::Result<()> {
    /// let pool = FixedBufPool::new(4, 64 << 10)?;
    /// let mut buf = pool.lease()?;
    /// buf.fill(b'x', 64 << 10);
    /// let payload = buf.freeze(); // registered memory, shared by reference
    /// let builder = Mover::builder().fixed_pool(pool.clone());
    /// let senders: Vec<_> = (0..2)
    ///     .map(|_| {
    ///         let (builder, payload) = (builder.clone(), payload.clone());
    ///         let (ours, mut theirs) = std::os::unix::net::UnixStream::pair()?;
    ///         let sender = std::thread::spawn(move || -> std::io::Result<()> {
    ///             let mut mover = builder.build()?; // one ring per thread
    ///             let conn = mover.attach(ours)?;
    ///             mover.send(conn, [payload])?;
    ///             mover.flush_and_wait(&mut Vec::new())
    ///         });
    ///         let mut got = Vec::new();
    ///         theirs.read_to_end(&mut got)?;
    ///         assert_eq!(got.len(), 64 << 10);
    ///         Ok(sender)
    ///     })
    ///     .collect::<std::io::Result<_>>()?;
    /// for s in senders {
    ///     s.join().expect("sender thread")?;
    /// }
    /// drop(payload);
    /// assert_eq!(pool.available(), 4); // every buffer back in the pool
    /// # Ok(()) }
    /// ```
    pub fn fixed_pool(mut self, pool: FixedBufPool) -> Self {
        self.fixed = Some(FixedBufs::Shared(pool));
        self
    }

    /// The zero-copy policy (default [`ZeroCopy::Never`]).
    pub fn zero_copy(mut self, policy: ZeroCopy) -> Self {
        self.zero_copy = policy;
        self
    }

    /// Copy small, reference large: pieces shorter than `bytes` queued on a
    /// stream are copied, as they are queued, into the connection's glued
    /// buffer (at most 64 KiB each; a new one once a write has taken it), so
    /// the kernel sees a few large segments instead of many tiny iovecs and
    /// the queue one entry instead of one per packet. A [`Packet`] is
    /// copied whole when all its pieces are shorter, else queued by one
    /// reference; larger pieces, and slices of registered buffers whatever
    /// their size, are sent by reference. `unsent` then holds small pieces
    /// glued together (set 0 to get the queued pieces themselves back).
    /// Datagrams are never copied, and under a zero-copy policy a
    /// connection copies nothing until zero-copy is found not to pay on it.
    /// 0 turns copying off. Default 1 KiB.
    pub fn copy_threshold(mut self, bytes: usize) -> Self {
        self.copy_threshold = bytes;
        self
    }

    /// Writability watermarks (Netty's `WriteBufferWaterMark`): a connection
    /// whose queue reaches `high` bytes becomes unwritable
    /// ([`Mover::is_writable`] answers false; `send` still accepts up to
    /// the byte limit), and the completion whose write brings it back to
    /// `low` bytes or fewer says [`Completion::writable_again`]. Default:
    /// half the byte limit and the byte limit, so `writable_again` follows
    /// a `BackPressure` refusal. `build` fails if `low > high` or `high` is 0.
    pub fn write_watermarks(mut self, low: usize, high: usize) -> Self {
        self.watermarks = Some((low, high));
        self
    }

    /// UDP GSO (default on, Linux): runs of queued datagrams to one
    /// destination, all of one size but the last (which may be shorter),
    /// leave as one `sendmsg` with `UDP_SEGMENT`, up to 64 datagrams and
    /// 64 KiB, on every backend. Probed per socket at attach; a socket
    /// whose device refuses it is switched off for good and its datagrams
    /// resent without it (see [`Segmentation`]).
    pub fn gso(mut self, on: bool) -> Self {
        self.gso = on;
        self
    }

    /// Slots in the io_uring ring's table of registered files: each
    /// connection attached while one is free is named by it
    /// (`IOSQE_FIXED_FILE`), which spares the kernel an `fget`/`fput` per
    /// request; the rest use their plain fd. Default: one per fd the
    /// process may have open (`RLIMIT_NOFILE`'s soft limit when built),
    /// at most 65,536. 0: no table. Where the kernel refuses the table
    /// (before 5.19), every connection uses its plain fd and
    /// [`Mover::registered_files`] says why. Other backends ignore it.
    pub fn registered_files(mut self, slots: u32) -> Self {
        self.files = Some(slots);
        self
    }

    fn watermarks(&self) -> io::Result<(usize, usize)> {
        match self.watermarks {
            None => Ok((self.max_queued / 2, self.max_queued.max(1))),
            Some((low, high)) if low <= high && high > 0 => Ok((low, high)),
            Some((low, high)) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "write_watermarks: low ({low}) must not exceed high ({high}), and high must be at least 1"
                ),
            )),
        }
    }

    /// Selects the backend and sets it up.
    pub fn build(self) -> io::Result<Mover> {
        let choice = match self.choice {
            Some(c) => c,
            None => BackendChoice::from_env()?,
        };
        let selection = Selection::choose(choice)?;
        let watermarks = self.watermarks()?;
        let pool = match self.fixed {
            Some(FixedBufs::New(count, size)) => Some(FixedBufPool::new(count, size)?),
            Some(FixedBufs::Shared(pool)) => Some(pool),
            None => None,
        };
        let driver = Driver::new(selection.backend, self.depth, pool.as_ref(), self.files)?;
        // Zero-copy needs SEND_ZC and SENDMSG_ZC on the ring; else copy.
        let zero_copy = if selection.backend == Backend::Uring
            && RingSupport::detect().supports(Opcode::SEND_ZC)
            && RingSupport::detect().supports(Opcode::SENDMSG_ZC)
        {
            self.zero_copy
        } else {
            ZeroCopy::Never
        };
        Ok(Mover {
            pool,
            glue: GluePool::default(),
            zero_copy,
            zc_copied: 0,
            zc_notified: 0,
            driver,
            selection,
            slots: Vec::new(),
            free: Vec::new(),
            dirty: Vec::new(),
            events: Vec::new(),
            completions: Vec::new(),
            in_flight: 0,
            max_queued: self.max_queued,
            copy_threshold: self.copy_threshold,
            watermarks,
            submissions: 0,
            writes: 0,
            bytes: 0,
            short_writes: 0,
            one_thread: PhantomData,
            wake: None,
            submit_now: false,
            unsubmitted: 0,
            gso: GsoCounters {
                enabled: self.gso,
                ..GsoCounters::default()
            },
            polled: Cell::new(false),
        })
    }
}

/// The batched-send engine.
///
/// # Threading
///
/// One ring per thread: a `Mover` is neither `Send` nor `Sync`. Its
/// io_uring ring is set up for a single issuer (`IORING_SETUP_SINGLE_ISSUER`
/// and `DEFER_TASKRUN`, 6.1), whose kernel refuses any other thread (EEXIST)
/// and runs completions only for it; so the type keeps every call, `Drop`
/// included, on the thread that built it. To use several threads, send the
/// [`MoverBuilder`] (which is `Send`) and build one `Mover` on each. (After
/// `fork(2)` the child must build its own as well.)
///
/// ```compile_fail
/// let mover = ringmover::Mover::builder().build().unwrap();
/// std::thread::spawn(move || drop(mover)); // error: `Mover` is not `Send`
/// ```
///
/// ```no_run
/// use bytes::Bytes;
/// use ringmover::Mover;
/// # fn main() -> std::io::Result<()> {
/// let mut mover = Mover::builder().build()?;
/// let stream = std::net::TcpStream::connect("127.0.0.1:7000")?;
/// let conn = mover.attach(stream)?;
/// let payload = Bytes::from(vec![7u8; 10_000]);
/// mover.send(conn, [Bytes::from_static(b"HDR1"), payload.slice(..5000)])?;
/// mover.send(conn, [Bytes::from_static(b"HDR2"), payload.slice(5000..)])?;
/// let mut done = Vec::new();
/// mover.flush_and_wait(&mut done)?; // flush, finish partial writes, collect results
/// assert!(done.iter().all(|c| c.error.is_none()));
/// # Ok(()) }
/// ```
///
/// # Streaming
///
/// A server producing continuously (a media stream fanned out to viewers, a
/// broker's subscribers) keeps each connection topped up instead of
/// waiting for every write: while [`is_writable`](Self::is_writable),
/// queue packets with [`send_packet`](Self::send_packet) (one reference
/// count per packet, however many pieces, and the same [`Packet`] shared by
/// every subscriber); then `flush`, and `wait` with a timeout for
/// completions. Whatever a connection queued while its last write was in
/// flight leaves as its next write. A completion with
/// [`Completion::writable_again`] says a connection that reached its high
/// watermark is back at its low one: resume producing for it
/// ([`MoverBuilder::write_watermarks`]; `send` refuses only at the hard
/// byte limit). Pieces under the copy threshold
/// ([`MoverBuilder::copy_threshold`], 1 KiB) are copied as they are queued
/// into the connection's glued buffer (64 KiB at most each, freed when the
/// queue empties), so the kernel copies a few large segments rather than
/// hundreds of tiny iovecs and the queue holds a few entries rather than
/// one per packet; larger pieces and registered buffers go by reference.
/// Exact accounting is unchanged: partial writes resume at the exact byte,
/// and `unsent` (on failure or `detach`) is exactly the bytes not written,
/// small pieces glued together.
/// `examples/stream.rs` is a complete producer.
///
/// ```no_run
/// use bytes::Bytes;
/// use ringmover::{Mover, Packet};
/// # fn main() -> std::io::Result<()> {
/// let mut mover = Mover::builder().write_watermarks(64 << 10, 256 << 10).build()?;
/// let conn = mover.attach(std::net::TcpStream::connect("127.0.0.1:7000")?)?;
/// let payload = Bytes::from(vec![0u8; 1 << 20]);
/// let (mut at, mut done) = (0, Vec::new());
/// loop {
///     while mover.is_writable(conn) == Some(true) {
///         let pkt = Packet::new([Bytes::from_static(b"HDR"), payload.slice(at..at + 1024)]);
///         mover.send_packet(conn, pkt)?;
///         at = (at + 1024) % payload.len();
///     }
///     mover.flush()?;
///     mover.wait(Some(std::time::Duration::from_millis(10)), &mut done)?;
///     if let Some(e) = done.drain(..).find_map(|c| c.error) {
///         return Err(e.error); // writable_again needs no action here:
///     }                        // is_writable says it on the next turn
/// }
/// # }
/// ```
///
/// To use every core, run one `Mover` per thread, each with its own share
/// of the connections (`bench gather --threads N` does that), or let
/// [`Shards`](crate::Shards) do it; [`MoverBuilder::fixed_pool`] shares one
/// set of registered buffers between them.
///
/// # Event loops
///
/// A `Mover` is [`AsFd`]: a loop that already polls other fds (poll(2),
/// epoll, mio, tokio's `AsyncFd`) polls this one for readability too, and
/// when it is readable calls [`wait`](Self::wait) with a zero timeout,
/// which reaps what finished without sleeping; readiness may be spurious
/// (nothing new comes out), and after that `wait` the fd stops polling
/// readable until something else happens. The fd is, per backend:
///
/// - io_uring: an eventfd registered with the ring
///   (`IORING_REGISTER_EVENTFD`, 5.2) on the first `as_fd`, not the ring's
///   own fd. The ring is set up with `IORING_SETUP_DEFER_TASKRUN` (6.1)
///   where the kernel has it: completions that need task work (a send the
///   peer's reads made room for, a zero-copy notification) are then
///   posted only inside `io_uring_enter` on the ring's thread, which
///   `wait` calls. The ring fd reports such pending work as readable when
///   polled, but queueing it does not wake a poller already blocked on the
///   fd (seen on 6.18: a blocked poll(2) sleeps to its timeout); the
///   kernel does signal a registered eventfd when it queues task work, as
///   well as when it posts completions. `tests/suite/event_loop.rs` checks
///   the wake-up from a blocking poll(2) and epoll.
/// - epoll: the epoll fd, readable while a watched socket has a readiness
///   edge to report.
/// - poll(2): there is no kernel object gathering readiness, so the fd is
///   an eventfd kept readable while a write waits for a socket to become
///   writable: the loop spins through `wait(Some(ZERO))` until it is.
///   Correct, but busy: prefer io_uring or epoll under an event loop. A
///   [`Waker`](crate::Waker)'s wake does not show on it (on io_uring and epoll it does).
///
/// Nothing about the `Mover` changes: `flush` still submits, a blocking
/// `wait` still works. `examples/event_loop.rs` is a complete poll(2)
/// loop; with tokio the same is `AsyncFd::new(mover)`, then
/// `readable().await`, `wait(Some(Duration::ZERO), ..)`, and
/// `guard.clear_ready()`.
///
/// ```no_run
/// use std::os::fd::AsFd;
/// use std::time::Duration;
/// use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
/// # fn main() -> std::io::Result<()> {
/// let mut mover = ringmover::Mover::builder().build()?;
/// let conn = mover.attach(std::net::TcpStream::connect("127.0.0.1:7000")?)?;
/// mover.send(conn, [bytes::Bytes::from(vec![0u8; 1 << 20])])?;
/// mover.flush()?;
/// let mut done = Vec::new();
/// while mover.queued(conn).is_some_and(|q| q > 0) {
///     let mut fds = [PollFd::new(mover.as_fd(), PollFlags::POLLIN)];
///     poll(&mut fds, PollTimeout::from(1000u16))?; // ...and the loop's other fds
///     mover.wait(Some(Duration::ZERO), &mut done)?;
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Mover {
    // Declared first so it drops first: the ring goes before the pool whose
    // memory it has registered.
    driver: Driver,
    pool: Option<FixedBufPool>,
    zero_copy: ZeroCopy,
    zc_copied: u64,
    zc_notified: u64,
    selection: Selection,
    slots: Vec<Slot>,
    free: Vec<u32>,
    dirty: Vec<Conn>,
    events: Vec<Event>,
    completions: Vec<Completion>,
    in_flight: usize,
    max_queued: usize,
    copy_threshold: usize,
    /// Written glued buffers, for the next connection to glue into.
    glue: GluePool,
    /// (low, high) writability watermarks.
    watermarks: (usize, usize),
    submissions: u64,
    writes: u64,
    bytes: u64,
    short_writes: u64,
    /// Not `Send`/`Sync`: see "Threading".
    one_thread: PhantomData<*const ()>,
    /// Set by [`Mover::waker`]: the fd other threads wake `wait` with.
    wake: Option<Wake>,
    /// The write just started carries at least `SUBMIT_GLUED_BYTES` glued.
    pub(super) submit_now: bool,
    /// Bytes of the writes started since the last submission.
    pub(super) unsubmitted: usize,
    gso: GsoCounters,
    /// Someone asked for the pollable fd (`AsFd`): every `wait` first
    /// collects what makes it readable, so it stops polling readable.
    polled: Cell<bool>,
}

impl AsFd for Mover {
    /// The fd an event loop polls for readability (see "Event loops").
    /// From the first call on, every `wait` also collects what made it
    /// readable (one more non-blocking syscall), so ask for it before
    /// the first `wait` whose readiness the loop relies on; on io_uring
    /// the first call registers an eventfd with the ring (an error doing
    /// so is returned by the next `wait`).
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.polled.set(true);
        self.driver
            .pollable_fd()
            .expect("a Mover's driver always has a pollable fd (only a leaked one has not)")
    }
}

impl AsRawFd for Mover {
    /// See [`AsFd`].
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

impl Mover {
    /// A builder with defaults.
    pub fn builder() -> MoverBuilder {
        MoverBuilder::default()
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.selection.backend
    }

    /// The backend selection, with its reason and per-operation fallbacks.
    pub fn selection(&self) -> &Selection {
        &self.selection
    }

    /// Attaches an fd: a TCP, UDP or Unix socket, a regular file (written
    /// from its file position on, which `detach` leaves after the last byte
    /// written), a pipe. The engine owns it until `detach`.
    ///
    /// On epoll/poll a pipe, FIFO, tty or other non-socket, non-regular fd
    /// is switched to `O_NONBLOCK`, or one full pipe would stall every
    /// connection. The flag lives in the open file description, so every
    /// dup of the fd (in this process or another) sees it too.
    pub fn attach(&mut self, fd: impl Into<OwnedFd>) -> io::Result<Conn> {
        let fd: OwnedFd = fd.into();
        let kind = net::classify(std::os::fd::AsFd::as_fd(&fd))?;
        let framing = match kind {
            FdKind::DatagramSocket => Framing::Datagram,
            _ => Framing::Stream,
        };
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                let s = u32::try_from(self.slots.len())
                    .map_err(|_| io::Error::other("too many connections"))?;
                self.slots.push(Slot::default());
                s
            }
        };
        let entry = &mut self.slots[slot as usize];
        let conn = Conn {
            slot,
            generation: entry.generation,
        };
        if let Err(e) = self.driver.register(conn.token(), fd.as_raw_fd(), kind) {
            self.free.push(slot);
            return Err(e);
        }
        let probe = || net::probe_gso(std::os::fd::AsFd::as_fd(&fd));
        let gso = if self.gso.enabled && framing == Framing::Datagram && probe() {
            Segmentation::On
        } else {
            Segmentation::Off
        };
        let mut outbox = Outbox::new(framing);
        if self.zero_copy == ZeroCopy::Never {
            // Copy small, reference large: never together with zero-copy,
            // which needs the queued `Bytes` themselves.
            outbox.set_copy_threshold(self.copy_threshold);
        }
        entry.state = Some(ConnState {
            fd,
            kind,
            outbox,
            ops: vec![WriteOp::new()],
            in_flight: 0,
            done: 0,
            broken: false,
            scheduled: false,
            failed: false,
            copy_only: false,
            zc_probe: ZcProbe::Untried,
            unwritable: false,
            gso,
        });
        Ok(conn)
    }

    /// Queues `bufs` on `conn`: no copy but of pieces under the copy
    /// threshold ([`MoverBuilder::copy_threshold`]). On a stream they
    /// continue the byte stream; on a datagram socket they form one
    /// datagram to the connected peer. Nothing moves until
    /// [`flush`](Self::flush), with one exception: when small pieces fill
    /// a stream's 64 KiB glued buffer, or bring a queue holding glued bytes
    /// to its high watermark ([`MoverBuilder::write_watermarks`]), and no
    /// write of that connection is in flight, its write starts at once (as
    /// a `BufWriter` writes when full), so the kernel copies the bytes while
    /// they are in cache; that costs one syscall, and its completion comes
    /// from `wait` as any other.
    pub fn send<I: IntoIterator<Item = Bytes>>(
        &mut self,
        conn: Conn,
        bufs: I,
    ) -> Result<(), SendError<I>> {
        self.enqueue(conn, bufs, None)
    }

    /// Queues one datagram for `dest` on a datagram socket: `bufs` are its
    /// pieces, sent as one message (`sendmsg` with `msg_name`). Refused with
    /// [`SendErrorKind::NotDatagram`] on a stream or file.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use std::net::UdpSocket;
    /// # fn main() -> std::io::Result<()> {
    /// let peer = UdpSocket::bind("127.0.0.1:0")?;
    /// let mut mover = ringmover::Mover::builder().build()?;
    /// let conn = mover.attach(UdpSocket::bind("127.0.0.1:0")?)?;
    /// let header = Bytes::from_static(b"seq=1 ");
    /// mover.send_to(conn, [header, Bytes::from_static(b"hello")], peer.local_addr()?)?;
    /// mover.flush_and_wait(&mut Vec::new())?;
    /// let mut buf = [0u8; 64];
    /// let (n, _) = peer.recv_from(&mut buf)?;
    /// assert_eq!(&buf[..n], b"seq=1 hello");
    /// # Ok(()) }
    /// ```
    pub fn send_to<I: IntoIterator<Item = Bytes>>(
        &mut self,
        conn: Conn,
        bufs: I,
        dest: SocketAddr,
    ) -> Result<(), SendError<I>> {
        self.enqueue(conn, bufs, Some(dest))
    }

    fn enqueue<I: IntoIterator<Item = Bytes>>(
        &mut self,
        conn: Conn,
        bufs: I,
        dest: Option<SocketAddr>,
    ) -> Result<(), SendError<I>> {
        let limit = self.max_queued;
        let high = self.watermarks.1;
        let Some(st) = live_mut(&mut self.slots, conn) else {
            return Err(SendError {
                kind: SendErrorKind::UnknownConn,
                bufs,
            });
        };
        let refuse = refusal(st, dest, limit);
        if let Some(kind) = refuse {
            return Err(SendError { kind, bufs });
        }
        let registered = self.pool.as_ref().map(|p| move |s: &[u8]| p.holds(s));
        let never_copy = registered.as_ref().map(|f| f as &NeverCopy<'_>);
        st.outbox.push_with(bufs, dest, never_copy, &mut self.glue);
        if st.kind != FdKind::DatagramSocket && st.outbox.queued_bytes() == 0 {
            // Only empty buffers on a stream: nothing to write, nothing to keep.
            st.outbox.take_unsent();
            return Ok(());
        }
        queued_more(&mut self.dirty, conn, st, high);
        if st.is_full() {
            self.start_filled(conn);
        }
        Ok(())
    }

    /// Borrows `conn`'s fd, to read or set socket options (`setsockopt`,
    /// `getpeername`) without detaching it; `None` if unknown. Do not write
    /// to it, close it, or change its `O_NONBLOCK` flag: the engine owns
    /// its writes until [`detach`](Self::detach).
    ///
    /// ```no_run
    /// # fn main() -> std::io::Result<()> {
    /// let mut mover = ringmover::Mover::builder().build()?;
    /// let conn = mover.attach(std::net::TcpStream::connect("127.0.0.1:7000")?)?;
    /// let fd = mover.fd(conn).expect("attached");
    /// nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::TcpNoDelay, &true)?;
    /// # Ok(()) }
    /// ```
    pub fn fd(&self, conn: Conn) -> Option<BorrowedFd<'_>> {
        self.state(conn).map(|s| s.fd.as_fd())
    }

    /// Bytes queued on `conn` and not yet written (`None` if unknown).
    pub fn queued(&self, conn: Conn) -> Option<usize> {
        self.state(conn).map(|s| s.outbox.queued_bytes())
    }

    /// Queues `packet` on `conn` as `send` queues its pieces, but by one
    /// reference for the whole packet however many pieces it has: queue
    /// the same packet on a thousand connections with a thousand atomic
    /// increments, and release it with as many decrements once written. A
    /// packet whose pieces are all under the copy threshold is copied
    /// instead (no reference kept; a packet shared by many connections is
    /// glued once and each copies that one run). Takes a `Packet` or a
    /// `&Packet`: a borrowed one is cloned only if it is referenced, so a
    /// packet of small pieces costs no reference count at all.
    /// Refuses, handing the packet back, exactly when `send` would.
    pub fn send_packet<P: Borrow<Packet>>(
        &mut self,
        conn: Conn,
        packet: P,
    ) -> Result<(), SendError<P>> {
        let (limit, high) = (self.max_queued, self.watermarks.1);
        let Some(st) = live_mut(&mut self.slots, conn) else {
            return Err(SendError {
                kind: SendErrorKind::UnknownConn,
                bufs: packet,
            });
        };
        if let Some(kind) = refusal(st, None, limit) {
            return Err(SendError { kind, bufs: packet });
        }
        let datagram = st.kind == FdKind::DatagramSocket;
        if packet.borrow().is_empty() && !datagram {
            return Ok(());
        }
        let registered = self.pool.as_ref().map(|p| move |s: &[u8]| p.holds(s));
        let never_copy = registered.as_ref().map(|f| f as &NeverCopy<'_>);
        st.outbox
            .push_packet(packet.borrow(), None, never_copy, &mut self.glue);
        queued_more(&mut self.dirty, conn, st, high);
        if st.is_full() {
            self.start_filled(conn);
        }
        Ok(())
    }

    /// Whether `conn` is below its high watermark, or back to its low one
    /// since it reached it (see [`MoverBuilder::write_watermarks`]); `None`
    /// if unknown. A streaming producer sends while this holds, then waits
    /// for a completion with [`Completion::writable_again`].
    pub fn is_writable(&self, conn: Conn) -> Option<bool> {
        self.state(conn).map(|s| !s.unwritable)
    }

    /// Starts a write for every connection with queued data and none in
    /// flight, and submits them: on io_uring one SQE per connection (for a
    /// datagram socket, a linked chain of one per queued datagram, kept in
    /// order: up to 128 for a socket alone, a share of 128 sends in flight
    /// when several wait, at least one each) and one `io_uring_enter` per
    /// full submission queue (⌈n / queue_depth⌉), except that a write
    /// which carries 32 KiB or more of glued small pieces is submitted at
    /// once, so the kernel copies them while they are still in cache
    /// (streaming: one enter per such write), and that writes are submitted
    /// whenever those started since the last enter carry 1 MiB, so one
    /// enter never copies a whole flush of large writes while the peers'
    /// reads wait; on epoll/poll a non-blocking `sendmsg` or `writev` each,
    /// finishing immediately what the sockets accept.
    /// Returns the number of connections started: on io_uring, those beyond
    /// the completion queue's room (see [`MoverBuilder::queue_depth`]) start
    /// later, in `wait` or `flush_and_wait`.
    ///
    /// It does not wait for the writes to finish (unlike
    /// [`std::io::Write::flush`]): their results come from
    /// [`wait`](Self::wait); [`flush_and_wait`](Self::flush_and_wait) is
    /// flush-then-wait-for-everything.
    ///
    /// On error (an `io_uring_enter` failure), connections not started stay
    /// queued and scheduled; a later `flush`, `wait` or `flush_and_wait`
    /// starts them.
    ///
    /// A producer that fills one connection at a time (many packets to it,
    /// then the next) should flush as it moves on: the connection's last,
    /// partly filled glued buffer is then written while in cache. Left for
    /// one flush after every connection, each is copied cold; at 1,000
    /// connections that cost 2.6× the CPU per byte (docs/benchmarks.md,
    /// `--refill deep`). A producer that sends each packet to many
    /// connections in turn flushes once per round instead: flushing per
    /// connection there would write each packet alone.
    pub fn flush(&mut self) -> io::Result<usize> {
        let started = self.start_dirty()?;
        self.unsubmitted = 0;
        self.driver.submit()?;
        if started > 0 {
            self.submissions += 1;
        }
        Ok(started)
    }

    /// Waits for completions, finishing partial writes and retrying sockets
    /// that became writable, and moves them into `out` (appending; `out` is
    /// not cleared). Returns when at least one completion is available, when
    /// `timeout` passes, or at once when nothing is in flight. With a
    /// [`waker`](Self::waker), it sleeps even when nothing is in flight,
    /// also returns when woken. A zero `timeout` reaps what the kernel has
    /// finished without sleeping: what an event loop calls when
    /// [engine's fd](#event-loops) polls readable.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use bytes::Bytes;
    /// # fn main() -> std::io::Result<()> {
    /// let mut mover = ringmover::Mover::builder().build()?;
    /// let conn = mover.attach(std::net::TcpStream::connect("127.0.0.1:7000")?)?;
    /// mover.send(conn, [Bytes::from(vec![1u8; 1 << 20])])?;
    /// mover.flush()?;
    /// let mut done = Vec::new();
    /// while mover.queued(conn).is_some_and(|q| q > 0) {
    ///     mover.wait(Some(Duration::from_secs(5)), &mut done)?;
    ///     for c in done.drain(..) {
    ///         if let Some(e) = c.error {
    ///             return Err(e.error);
    ///         }
    ///         println!("{}: {} bytes written, {} still queued", c.conn.index(), c.written, c.queued);
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn wait(&mut self, timeout: Option<Duration>, out: &mut Vec<Completion>) -> io::Result<()> {
        if self.polled.get() {
            self.driver.poll_ready(&mut self.events)?;
            self.process_events();
        }
        if self.wake.is_some() {
            return self.park(out, timeout);
        }
        self.wait_for(1, out, timeout)
    }

    /// [`flush`](Self::flush)es, then blocks until every connection's queue
    /// is empty or its connection failed, and every zero-copy notification
    /// has arrived (so every buffer sent is released), moving all
    /// completions into `out`: what [`std::io::Write::flush`] means, where
    /// this crate's `flush` only submits. It returns an error rather than
    /// spin when the kernel refuses work.
    ///
    /// ```no_run
    /// use bytes::Bytes;
    /// # fn main() -> std::io::Result<()> {
    /// let mut mover = ringmover::Mover::builder().build()?;
    /// let conn = mover.attach(std::net::TcpStream::connect("127.0.0.1:7000")?)?;
    /// mover.send(conn, [Bytes::from_static(b"last words\n")])?;
    /// let mut done = Vec::new();
    /// mover.flush_and_wait(&mut done)?;
    /// assert_eq!(mover.queued(conn), Some(0));
    /// # Ok(()) }
    /// ```
    #[doc(alias = "drain")]
    pub fn flush_and_wait(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        self.flush()?;
        while self.in_flight > 0
            || !self.dirty.is_empty()
            || !self.completions.is_empty()
            || self.driver.notifs_pending() > 0
        {
            // Everything in flight must finish anyway: wake once for all.
            let all = self.in_flight + self.driver.notifs_pending();
            self.wait_for(all, out, None)?;
        }
        Ok(())
    }

    /// Detaches `conn`, giving its fd back with whatever it had not sent.
    /// A write in flight is cancelled and its completion awaited first, so
    /// nothing the kernel may still read is freed early.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use std::os::unix::net::UnixStream;
    /// # fn main() -> std::io::Result<()> {
    /// let mut mover = ringmover::Mover::builder().build()?;
    /// let (ours, _theirs) = UnixStream::pair()?;
    /// let conn = mover.attach(ours)?;
    /// mover.send(conn, [Bytes::from_static(b"never flushed")])?;
    /// let detached = mover.detach(conn)?;
    /// assert_eq!(detached.unsent, [Bytes::from_static(b"never flushed")]);
    /// let ours = UnixStream::from(detached.fd); // ours again, to use or close
    /// # drop(ours);
    /// assert!(mover.queued(conn).is_none()); // the handle is stale now
    /// # Ok(()) }
    /// ```
    pub fn detach(&mut self, conn: Conn) -> io::Result<Detached> {
        let Some(st) = self.state(conn) else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "unknown or detached connection",
            ));
        };
        let mut left = st.in_flight;
        if left > 0 {
            self.driver.cancel(conn.token())?;
            while left > 0 {
                self.driver.wait(1, Some(CANCEL_RETRY), &mut self.events)?;
                self.process_events();
                let now = self.state(conn).map_or(0, |s| s.in_flight);
                if now == left {
                    // No progress: the cancel may have missed (see
                    // CANCEL_RETRY) and the chain stalled since. Again.
                    self.driver.cancel(conn.token())?;
                }
                left = now;
            }
        }
        let slot = &mut self.slots[conn.slot as usize];
        let Some(mut st) = slot.state.take() else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "connection vanished",
            ));
        };
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(conn.slot);
        self.dirty.retain(|&c| c != conn);
        // The connection's completions not yet handed out go with it: what
        // they wrote (a cancelled write may have moved part of its batch)
        // and, if the cancel failed the connection, the queue it moved
        // into its error.
        let mut unsent = Vec::new();
        let mut written = 0;
        for c in self.completions.iter_mut().filter(|c| c.conn == conn) {
            written += c.written;
            if let Some(e) = c.error.as_mut() {
                unsent.append(&mut e.unsent);
            }
        }
        self.completions.retain(|c| c.conn != conn);
        unsent.append(&mut st.outbox.take_unsent());
        self.driver.deregister(conn.token(), st.fd.as_raw_fd());
        Ok(Detached {
            unsent,
            fd: st.fd,
            written,
        })
    }

    /// Counters since the engine was built.
    pub fn stats(&self) -> Stats {
        let d = self.driver.stats();
        Stats {
            submissions: self.submissions,
            writes: self.writes,
            sqes: d.sqes,
            enters: d.enters,
            syscalls: d.syscalls,
            bytes: self.bytes,
            short_writes: self.short_writes,
            zc_sends: d.zc_sends,
            zc_copied: self.zc_copied,
            zc_notified: self.zc_notified,
            notifs_outstanding: self.driver.notifs_pending() as u64,
            gso_sends: self.gso.sends,
            gso_datagrams: self.gso.datagrams,
            gso_disabled: self.gso.disabled,
            fixed_file_sqes: d.fixed_file_sqes,
            unregistered_files: d.unregistered_files,
        }
    }

    /// Whether the io_uring ring names connections' fds through a table
    /// of registered files, and if not, why
    /// ([`MoverBuilder::registered_files`]).
    pub fn registered_files(&self) -> RegisteredFiles {
        self.driver.registered_files()
    }

    /// Leases a registered buffer (see [`MoverBuilder::fixed_buffers`]).
    /// `WouldBlock` when all are in use: wait for completions, which release
    /// buffers (zero-copy ones at their notification).
    ///
    /// ```
    /// use std::io::Read;
    /// # fn main() -> std::io::Result<()> {
    /// let mut mover = ringmover::Mover::builder().fixed_buffers(8, 64 << 10).build()?;
    /// let (ours, mut theirs) = std::os::unix::net::UnixStream::pair()?;
    /// let conn = mover.attach(ours)?;
    /// let mut buf = mover.lease()?;
    /// buf.extend_from_slice(b"HDR1 payload in registered memory")?;
    /// let frozen = buf.freeze(); // cheap to clone and slice, never copied
    /// mover.send(conn, [frozen.slice(..5), frozen.slice(5..)])?;
    /// mover.flush_and_wait(&mut Vec::new())?;
    /// drop(mover.detach(conn)?); // closes our end: the reader sees EOF
    /// let mut got = String::new();
    /// theirs.read_to_string(&mut got)?;
    /// assert_eq!(got, "HDR1 payload in registered memory");
    /// # Ok(()) }
    /// ```
    pub fn lease(&self) -> io::Result<FixedBufMut> {
        match &self.pool {
            Some(pool) => pool.lease(),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no fixed buffers: build the Mover with .fixed_buffers(count, size)",
            )),
        }
    }

    /// The registered buffer pool, if any.
    pub fn pool(&self) -> Option<&FixedBufPool> {
        self.pool.as_ref()
    }

    /// The zero-copy policy in force (`Never` where the backend or kernel
    /// cannot do zero-copy).
    pub fn zero_copy(&self) -> ZeroCopy {
        self.zero_copy
    }

    /// Writes in flight (started, completion not yet seen).
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }
}

/// How long dropping a `Mover` waits for in-flight writes and zero-copy
/// notifications before leaking what the kernel may still read.
const DROP_GRACE: Duration = Duration::from_secs(2);

/// How long `detach` and `Drop` wait for a cancelled connection to make
/// progress before cancelling it again. io_uring's cancel finds a chain's
/// write only while it runs or waits for the socket; a write whose
/// predecessor has just completed waits in the ring's task work, where no
/// cancel looks (it answers ENOENT), then runs on and may stall on a full
/// socket. A chain that moves needs no second cancel; one that stalls is
/// found by it.
const CANCEL_RETRY: Duration = Duration::from_millis(10);

impl Mover {
    /// Asks the driver to cancel every connection's in-flight writes;
    /// false if it could not queue a cancel.
    fn cancel_in_flight(&mut self) -> bool {
        let tokens: Vec<Token> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                s.state.as_ref().filter(|st| st.in_flight > 0).map(|_| {
                    Conn {
                        slot: i as u32,
                        generation: s.generation,
                    }
                    .token()
                })
            })
            .collect();
        tokens.iter().all(|&t| self.driver.cancel(t).is_ok())
    }
}

impl Drop for Mover {
    fn drop(&mut self) {
        if self.in_flight == 0 && self.driver.notifs_pending() == 0 {
            return;
        }
        // The kernel may still read in-flight buffers: cancel, and wait for
        // every completion before the Bytes and ops are freed.
        let mut ok = self.cancel_in_flight();
        // Cancelled writes complete at once, but a zero-copy notification
        // waits for the peer to acknowledge the data, which a peer that never
        // reads never does: wait a bounded time, never hang in drop.
        let deadline = Instant::now() + DROP_GRACE;
        while ok && (self.in_flight > 0 || self.driver.notifs_pending() > 0) {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            let before = self.in_flight;
            ok = self
                .driver
                .wait(1, Some(left.min(CANCEL_RETRY)), &mut self.events)
                .is_ok();
            self.process_events();
            if ok && self.in_flight > 0 && self.in_flight == before {
                // See CANCEL_RETRY: a cancel may have missed a chain.
                ok = self.cancel_in_flight();
            }
        }
        if self.in_flight > 0 || self.driver.notifs_pending() > 0 {
            // Could not confirm completion: leak rather than free memory the
            // kernel may read (the held Bytes live in the driver, the
            // registered pool in `pool`); the ring and its sockets stay open.
            std::mem::forget(std::mem::take(&mut self.slots));
            if let Some(pool) = self.pool.take() {
                std::mem::forget(pool);
            }
            std::mem::forget(std::mem::replace(&mut self.driver, Driver::inert()));
        }
    }
}
