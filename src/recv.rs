//! Receive stream sockets into files: many connections at once, each into
//! its own file, on the backend the caller selected.
//!
//! ```no_run
//! use std::net::TcpListener;
//! use std::time::Duration;
//! use ringmover::recv::{Event, Receiver, RecvOptions};
//! use ringmover::Selection;
//!
//! let selection = Selection::from_env()?;
//! let mut receiver = Receiver::new(selection.backend, RecvOptions::default())?;
//! receiver.listen(TcpListener::bind("127.0.0.1:0")?, Some(1))?;
//! let mut events = Vec::new();
//! while receiver.is_listening() || receiver.active() > 0 {
//!     receiver.wait(Some(Duration::from_secs(1)), &mut events)?;
//!     for event in events.drain(..) {
//!         match event {
//!             Event::Incoming { socket, peer } => {
//!                 let file = std::fs::File::create("/tmp/out")?;
//!                 receiver.attach(socket, peer, file)?;
//!             }
//!             Event::Finished(done) => println!("{}: {} bytes, {:?}", done.peer, done.bytes, done.result),
//!             Event::AcceptFailed(e) => eprintln!("accept: {e}"),
//!         }
//!     }
//! }
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! One engine serves every backend: a selector says which sockets are
//! readable, then non-blocking syscalls in this thread move what is there.
//! The backends differ only in the selector and in how bytes move (see
//! `docs/recv.md`):
//! - `uring`: readiness from the ring (`IORING_OP_POLL_ADD`, multishot
//!   where the kernel has it, Linux 5.13), `splice(2)` socket → pipe →
//!   file. No io-wq worker is involved; without multishot the poll is
//!   re-armed after each readiness and [`Receiver::fallbacks`] says so.
//! - `epoll`: level-triggered `epoll_wait`, `splice(2)` socket → pipe →
//!   file.
//! - `poll`: `poll(2)`, `read(2)` into a 64 KiB buffer, `pwrite(2)`. The
//!   only backend off Linux.
//!
//! Pipes (`uring`, `epoll`) come from a [`pipe pool`](PipeReport) shared by
//! the connections of one receiver; when none can be made (out of fds) or
//! a file refuses splice, bytes are copied through a buffer instead.
//!
//! Each stream is detected as framed ([`crate::wire`]: what `ringmover send`
//! sends) or raw (anything else, e.g. `nc`); a framed stream completes only
//! after its end marker, so a sender that died is never taken for a
//! finished one.

use std::fmt;
use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::backend::{Backend, OpFallback};
use crate::wire;

#[cfg(target_os = "linux")]
mod direct;
#[cfg(target_os = "linux")]
mod pipe;
mod pump;
mod readiness;
#[cfg(target_os = "linux")]
mod uring;

/// Limits applied to every connection of a [`Receiver`].
#[derive(Debug, Clone, Default)]
pub struct RecvOptions {
    /// Stop a connection with [`Failure::Quota`] when the peer sends more
    /// than this many payload bytes; exactly this many reach the file.
    pub max_bytes: Option<u64>,
    /// Stop a connection with [`Failure::IdleTimeout`] when no byte has
    /// been available for this long (a receiver that was stopped, e.g. by
    /// `SIGSTOP` or a cgroup freeze, looks before it expires anything).
    pub idle_timeout: Option<Duration>,
    /// Pipe capacity to ask for with `F_SETPIPE_SZ` (default: 1 MiB capped
    /// at `/proc/sys/fs/pipe-max-size`). Unused by `poll`, which has no pipes.
    pub pipe_size: Option<usize>,
    /// Take every stream as raw bytes: no detection of the
    /// [`wire`] format (default `false`: detect).
    pub raw: bool,
    /// Write regular files (attached with [`Receiver::attach`]) with
    /// `O_DIRECT`, bypassing the page cache: payload is received into
    /// page-aligned buffers and written in aligned blocks (asynchronously
    /// on the uring backend, several writes in flight per connection), the
    /// last partial block through the page cache, so the file holds
    /// exactly the bytes received. A file system that refuses `O_DIRECT`
    /// is written through the page cache ([`Finished::direct`] says so).
    /// Up to 512 KiB per connection is held in memory until it is written
    /// (on uring up to 2.5 MiB). Linux only (refused elsewhere).
    pub direct: bool,
}

/// What `O_DIRECT` did for a connection.
#[derive(Debug, Default)]
pub enum DirectOutcome {
    /// Not asked for, or not a regular file written at offsets.
    #[default]
    Off,
    /// Written with `O_DIRECT` (the last partial block through the page
    /// cache).
    Used,
    /// The file system refused `O_DIRECT` (the error says how): written
    /// through the page cache.
    Refused(io::Error),
}

impl DirectOutcome {
    /// `"off"`, `"direct"` or `"refused"`.
    pub fn name(&self) -> &'static str {
        match self {
            DirectOutcome::Off => "off",
            DirectOutcome::Used => "direct",
            DirectOutcome::Refused(_) => "refused",
        }
    }
}

/// What `O_DIRECT` output ([`RecvOptions::direct`]) did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectReport {
    /// Files whose file system refused `O_DIRECT` (written through the
    /// page cache instead).
    pub refused: usize,
    /// Aligned buffers registered with the ring (`WRITE_FIXED`); 0 on the
    /// readiness backends and where `RLIMIT_MEMLOCK` allowed none (then
    /// plain `WRITE`s).
    pub registered: usize,
}

/// What a receiver's pipe pool made so far (all zero on the poll backend,
/// which copies through a buffer instead).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PipeReport {
    /// Pipes created.
    pub created: usize,
    /// Capacity asked for with `F_SETPIPE_SZ`.
    pub wanted: usize,
    /// Capacity of the last pipe made (less than `wanted` when
    /// `F_SETPIPE_SZ` was refused, e.g. past `pipe-user-pages-soft`).
    pub got: usize,
    /// Times `pipe2(2)` failed (`EMFILE`, `ENFILE`, ...); each time the
    /// bytes at hand were copied through a buffer instead.
    pub refused: usize,
    /// Connections whose socket or file refused `splice(2)` (`EINVAL`,
    /// e.g. `/dev/full`); they copy through a buffer from then on.
    pub unspliceable: usize,
}

/// Identifies a connection within one [`Receiver`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Why a connection stopped before a clean end of stream.
#[derive(Debug)]
pub enum Failure {
    /// The peer reset the connection (`ECONNRESET`, `ETIMEDOUT`, `EPIPE`).
    Reset(io::Error),
    /// No byte was available for this long.
    IdleTimeout(Duration),
    /// The peer sent more than this many payload bytes.
    Quota(u64),
    /// A framed stream ended (end of stream, no reset) before its end
    /// marker: the sender stopped early, e.g. it was killed. `expected`:
    /// the payload bytes announced so far, when the stream ended inside a
    /// frame (more than the file holds).
    Truncated {
        /// Payload bytes announced by the frames seen, if cut inside one.
        expected: Option<u64>,
    },
    /// A framed stream broke the format, e.g. bytes after the end marker.
    Protocol(&'static str),
    /// Reading the socket failed otherwise (`ENOMEM`, a failed poll ...).
    Read(io::Error),
    /// Writing the file failed (`ENOSPC`, `EFBIG`, `EDQUOT`, `EIO` ...).
    Write(io::Error),
}

impl Failure {
    /// A short machine-readable name: `reset`, `idle-timeout`, `quota`,
    /// `truncated`, `protocol-error`, `read-error` or `write-error`.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Failure::Reset(_) => "reset",
            Failure::IdleTimeout(_) => "idle-timeout",
            Failure::Quota(_) => "quota",
            Failure::Truncated { .. } => "truncated",
            Failure::Protocol(_) => "protocol-error",
            Failure::Read(_) => "read-error",
            Failure::Write(_) => "write-error",
        }
    }

    /// Sorts a socket read error: resets apart from everything else.
    pub(crate) fn from_read(e: io::Error) -> Failure {
        match e.raw_os_error() {
            Some(libc::ECONNRESET) | Some(libc::ETIMEDOUT) | Some(libc::EPIPE) => Failure::Reset(e),
            _ => Failure::Read(e),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Reset(e) => write!(f, "connection reset by peer ({e})"),
            Failure::IdleTimeout(d) => write!(f, "idle for {d:?}"),
            Failure::Quota(n) => write!(f, "peer sent more than the {n}-byte quota"),
            Failure::Truncated { expected: Some(n) } => write!(
                f,
                "the sender stopped early: the stream ended inside a frame, \
                 {n} bytes announced, no end marker"
            ),
            Failure::Truncated { expected: None } => {
                write!(
                    f,
                    "the sender stopped early: the stream ended before its end marker"
                )
            }
            Failure::Protocol(why) => write!(f, "protocol error: {why}"),
            Failure::Read(e) => write!(f, "reading the socket: {e}"),
            Failure::Write(e) => write!(f, "writing the file: {e}"),
        }
    }
}

impl std::error::Error for Failure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Failure::Reset(e) | Failure::Read(e) | Failure::Write(e) => Some(e),
            Failure::IdleTimeout(_)
            | Failure::Quota(_)
            | Failure::Truncated { .. }
            | Failure::Protocol(_) => None,
        }
    }
}

/// A connection that ended, with its file handed back.
#[derive(Debug)]
pub struct Finished {
    /// The connection.
    pub id: ConnId,
    /// Its peer.
    pub peer: SocketAddr,
    /// The output file, for the caller to sync, rename or remove.
    pub file: File,
    /// Payload bytes written to the file (from offset 0, or from its
    /// position for [`Receiver::attach_sequential`]).
    pub bytes: u64,
    /// Time from [`Receiver::attach`] to the end.
    pub elapsed: Duration,
    /// Whether the stream was framed ([`crate::wire`]; also when it ended
    /// inside the magic), rather than raw.
    pub framed: bool,
    /// `Ok` after a clean end of stream (for a framed one: the end marker,
    /// then the end of stream).
    pub result: Result<(), Failure>,
    /// Whether the file was written with `O_DIRECT` ([`RecvOptions::direct`]).
    pub direct: DirectOutcome,
}

/// What [`Receiver::wait`] reports.
#[derive(Debug)]
pub enum Event {
    /// The listener accepted a connection; [`Receiver::attach`] it (or drop
    /// it, or keep it unread until it can be attached, holding the listener
    /// meanwhile with [`Receiver::set_accepting`]).
    Incoming {
        /// The accepted socket.
        socket: TcpStream,
        /// Its peer.
        peer: SocketAddr,
    },
    /// A connection ended.
    Finished(Finished),
    /// `accept(2)` failed with something other than `EAGAIN` or a
    /// connection that was already gone. Reported once per episode: the
    /// listener then rests for [`ACCEPT_BACKOFF`] at a time (`EMFILE` would
    /// otherwise make it spin) and is not reported again until an accept
    /// has succeeded.
    AcceptFailed(io::Error),
}

/// How long the listener rests after `accept(2)` failed (e.g. `EMFILE`:
/// out of fds) before it tries again.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A connection's progress, for rate displays.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// The connection.
    pub id: ConnId,
    /// Its peer.
    pub peer: SocketAddr,
    /// Payload bytes written so far.
    pub bytes: u64,
    /// Time since it was attached.
    pub elapsed: Duration,
}

/// Receives many stream sockets into files on one backend.
#[derive(Debug)]
pub struct Receiver {
    engine: readiness::ReadinessEngine,
    backend: Backend,
    next_id: u64,
}

impl Receiver {
    /// A receiver on `backend` (usually `Selection::from_env()?.backend`).
    ///
    /// Fails when the backend cannot work here (io_uring forbidden, epoll
    /// on a non-Linux build).
    pub fn new(backend: Backend, options: RecvOptions) -> io::Result<Receiver> {
        let engine = match backend {
            #[cfg(target_os = "linux")]
            Backend::Uring => readiness::ReadinessEngine::uring(options)?,
            #[cfg(target_os = "linux")]
            Backend::Epoll => readiness::ReadinessEngine::epoll(options)?,
            Backend::Poll => readiness::ReadinessEngine::poll(options),
            #[allow(unreachable_patterns)]
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("the {other} backend is not compiled into this build"),
                ))
            }
        };
        Ok(Receiver {
            engine,
            backend,
            next_id: 1,
        })
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Per-operation fallbacks in use (io_uring without multishot poll).
    pub fn fallbacks(&self) -> Vec<OpFallback> {
        self.engine.fallbacks()
    }

    /// The pipes the pool made: how many, the capacity they got, and how
    /// often bytes were copied instead.
    pub fn pipes(&self) -> PipeReport {
        self.engine.pipes()
    }

    /// Watches `listener` and reports each accepted connection as
    /// [`Event::Incoming`], at most `limit` of them (then stops listening).
    pub fn listen(&mut self, listener: TcpListener, limit: Option<u64>) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        self.engine.listen(Listen::new(listener, limit))
    }

    /// Whether a listener is open: one was given to [`listen`](Self::listen)
    /// and its limit is not reached. A listener held by
    /// [`set_accepting`](Self::set_accepting) is still listening.
    pub fn is_listening(&self) -> bool {
        self.engine.is_listening()
    }

    /// Holds the listener (`false`) or lets it accept again (`true`, the
    /// default): for a caller that cannot take another connection right
    /// now, e.g. one that is out of file descriptors for the files it
    /// attaches connections to.
    ///
    /// While held, [`wait`](Self::wait) accepts nothing and reports no
    /// [`Event::Incoming`]: the kernel completes new connections' handshakes
    /// and keeps them in the listen backlog (`listen(2)`; up to
    /// `net.core.somaxconn`), where their senders wait, as they do while
    /// `accept(2)` fails ([`Event::AcceptFailed`]). A held listener does not
    /// make `wait` return early: it is taken out of the selector (epoll,
    /// poll's interest set, the ring's poll), so `wait` sleeps until a
    /// connection has bytes, a [`Waker`] wakes it or its timeout passes.
    /// Connections already attached are served as usual.
    ///
    /// Let go, the next `wait` accepts what waits in the backlog at once (or,
    /// if the listener still rests after an accept failure, when the rest
    /// ends) and watches the listener again. Calling it again with the same
    /// value does nothing; it applies to a listener given to `listen` later
    /// too. The limit given to `listen` counts accepted connections only:
    /// holding does not change it.
    ///
    /// ```no_run
    /// use std::collections::VecDeque;
    /// use std::fs::File;
    /// use std::net::TcpListener;
    /// use std::time::Duration;
    /// use ringmover::recv::{Event, Receiver, RecvOptions};
    /// use ringmover::Selection;
    ///
    /// let selection = Selection::from_env()?;
    /// let mut receiver = Receiver::new(selection.backend, RecvOptions::default())?;
    /// receiver.listen(TcpListener::bind("127.0.0.1:0")?, None)?;
    /// // Accepted connections that have no file yet, oldest first.
    /// let mut waiting = VecDeque::new();
    /// let mut events = Vec::new();
    /// loop {
    ///     while let Some((socket, peer)) = waiting.pop_front() {
    ///         match File::create(format!("/tmp/in-{peer}")) {
    ///             Ok(file) => {
    ///                 receiver.attach(socket, peer, file)?;
    ///             }
    ///             // Out of fds: unread, its bytes wait in the kernel and
    ///             // TCP flow control holds its sender.
    ///             Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
    ///                 waiting.push_front((socket, peer));
    ///                 break;
    ///             }
    ///             Err(e) => eprintln!("{peer}: {e}"), // dropped: closed
    ///         }
    ///     }
    ///     // A freed fd goes to a waiting connection, not to a new accept.
    ///     receiver.set_accepting(waiting.is_empty());
    ///     // Short enough to retry the waiting ones soon.
    ///     receiver.wait(Some(Duration::from_millis(100)), &mut events)?;
    ///     for event in events.drain(..) {
    ///         match event {
    ///             Event::Incoming { socket, peer } => waiting.push_back((socket, peer)),
    ///             Event::Finished(done) => println!("{}: {:?}", done.peer, done.result),
    ///             Event::AcceptFailed(e) => eprintln!("accept: {e}"),
    ///         }
    ///     }
    ///     if !receiver.is_listening() && receiver.active() == 0 && waiting.is_empty() {
    ///         break;
    ///     }
    /// }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    #[doc(alias = "hold")]
    #[doc(alias = "pause")]
    pub fn set_accepting(&mut self, on: bool) {
        self.engine.set_accepting(on);
    }

    /// Whether the listener takes connections: one is open
    /// ([`is_listening`](Self::is_listening)) and not held by
    /// [`set_accepting`](Self::set_accepting). It may still be resting
    /// after an accept failure ([`ACCEPT_BACKOFF`]).
    pub fn is_accepting(&self) -> bool {
        self.engine.is_accepting()
    }

    /// Starts receiving `socket` into `file`: a regular file is written
    /// from offset 0 at explicit offsets; anything else (a pipe, a
    /// terminal, a device) as with [`attach_sequential`](Self::attach_sequential).
    /// The socket is made non-blocking.
    pub fn attach(
        &mut self,
        socket: impl Into<OwnedFd>,
        peer: SocketAddr,
        file: File,
    ) -> io::Result<ConnId> {
        let regular = file.metadata()?.file_type().is_file();
        self.attach_as(socket.into(), peer, file, !regular)
    }

    /// Starts receiving `socket` into `file` at the file's own position,
    /// advancing it (`write(2)`, `splice(2)` without an offset): for
    /// standard output, whatever it is. Into a pipe, payload is spliced
    /// straight from the socket (Linux; no pipe of the receiver's own, no
    /// copy through user space), and a full pipe makes this thread wait
    /// for its reader: meant for a receiver with one connection.
    pub fn attach_sequential(
        &mut self,
        socket: impl Into<OwnedFd>,
        peer: SocketAddr,
        file: File,
    ) -> io::Result<ConnId> {
        self.attach_as(socket.into(), peer, file, true)
    }

    fn attach_as(
        &mut self,
        socket: OwnedFd,
        peer: SocketAddr,
        file: File,
        sequential: bool,
    ) -> io::Result<ConnId> {
        set_nonblocking(&socket)?;
        let id = ConnId(self.next_id);
        self.next_id += 1;
        let mut conn = Conn::new(id, peer, file, self.engine.raw());
        if sequential {
            conn.write_sequentially()?;
            // Fewer, larger splices into an output pipe (stdout): grown
            // like the pool's pipes, best effort.
            #[cfg(target_os = "linux")]
            if conn.out_pipe {
                pipe::grow(&conn.file, self.engine.pipe_size());
            }
        } else if self.engine.direct() {
            conn.go_direct();
            if let DirectOutcome::Refused(_) = conn.direct_outcome {
                self.engine.direct_refused();
            }
        }
        self.engine.attach(conn, socket)?;
        Ok(id)
    }

    /// A handle that makes this receiver's [`wait`](Self::wait) return
    /// early, from any thread: for a receiver that is handed sockets
    /// accepted elsewhere (one acceptor feeding several receive threads,
    /// as `ringmover recv --threads` does), or that must look at a flag.
    /// A wake-up that comes while nobody waits ends the next wait at once.
    pub fn waker(&mut self) -> io::Result<Waker> {
        self.engine.waker()
    }

    /// What `O_DIRECT` output did so far ([`RecvOptions::direct`]).
    pub fn direct(&self) -> DirectReport {
        self.engine.direct_report()
    }

    /// Connections attached and not yet finished.
    pub fn active(&self) -> usize {
        self.engine.active()
    }

    /// Progress of every active connection.
    pub fn progress(&self) -> Vec<Progress> {
        let now = Instant::now();
        let mut v: Vec<Progress> = self.engine.conns().map(|c| c.progress(now)).collect();
        v.sort_by_key(|p| p.id);
        v
    }

    /// Moves bytes until something happens or `timeout` passes, and appends
    /// what happened to `events`. Idle timeouts are enforced here.
    pub fn wait(&mut self, timeout: Option<Duration>, events: &mut Vec<Event>) -> io::Result<()> {
        self.engine.wait(timeout, events)
    }
}

/// Wakes a [`Receiver::wait`] from another thread ([`Receiver::waker`]):
/// the same type as the `Mover`'s waker.
pub use crate::wake::Waker;

/// A listener being watched, with how many more connections to accept and
/// whether `accept(2)` is failing.
#[derive(Debug)]
pub(crate) struct Listen {
    pub(crate) listener: TcpListener,
    remaining: Option<u64>,
    /// An accept failure was reported and no accept has succeeded since.
    failing: bool,
    /// Resting after a failure until then.
    pub(crate) paused_until: Option<Instant>,
}

/// Where [`Listen::accept_all`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Accepted {
    /// No connection is waiting (`EAGAIN`): watch the listener.
    Drained,
    /// `accept(2)` failed: stop watching until `paused_until`.
    Paused,
    /// The limit is reached: close the listener.
    LimitReached,
}

impl Listen {
    fn new(listener: TcpListener, remaining: Option<u64>) -> Listen {
        Listen {
            listener,
            remaining,
            failing: false,
            paused_until: None,
        }
    }

    /// Accepts until `EAGAIN`, a failure or the limit.
    pub(crate) fn accept_all(&mut self, events: &mut Vec<Event>, now: Instant) -> Accepted {
        self.paused_until = None;
        loop {
            if self.remaining == Some(0) {
                return Accepted::LimitReached;
            }
            match self.listener.accept() {
                Ok((socket, peer)) => {
                    self.failing = false;
                    if let Some(r) = &mut self.remaining {
                        *r -= 1;
                    }
                    events.push(Event::Incoming { socket, peer });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Accepted::Drained,
                Err(e) if is_gone_before_accept(&e) => continue,
                Err(e) => {
                    self.pause(e, events, now);
                    return Accepted::Paused;
                }
            }
        }
    }

    /// Rests the listener for [`ACCEPT_BACKOFF`], reporting `e` unless this
    /// episode of failures was already reported.
    pub(crate) fn pause(&mut self, e: io::Error, events: &mut Vec<Event>, now: Instant) {
        if !self.failing {
            self.failing = true;
            events.push(Event::AcceptFailed(e));
        }
        self.paused_until = Some(now + ACCEPT_BACKOFF);
    }
}

/// `accept(2)` errors that concern one connection only, already gone or
/// failing on the network (the man page: treat them like `EAGAIN`, retry).
fn is_gone_before_accept(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Interrupted
        || matches!(
            e.raw_os_error(),
            Some(
                libc::ECONNABORTED
                    | libc::EPROTO
                    | libc::ENETDOWN
                    | libc::ENOPROTOOPT
                    | libc::EHOSTDOWN
                    | libc::EHOSTUNREACH
                    | libc::EOPNOTSUPP
                    | libc::ENETUNREACH
            )
        )
}

/// Where a connection's stream is: not yet known, raw, or framed.
#[derive(Debug)]
enum Stream {
    /// Deciding: `held` are the first bytes, consumed because they are a
    /// proper prefix of [`wire::MAGIC`] (a peek alone cannot tell "more to
    /// come" from "the stream ended there").
    Detect {
        held: [u8; wire::MAGIC.len()],
        have: usize,
    },
    Raw,
    Framed(wire::Deframer),
}

/// The next thing a connection needs, given its stream and quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Peek at the first bytes: framed or raw?
    Detect,
    /// Read this many frame-header bytes (1..=8) into memory.
    Header(usize),
    /// Move up to this many payload bytes to the file.
    Payload(usize),
    /// Nothing more may come: a clean end of stream is next, or else a
    /// quota failure (`quota`) or a protocol error (after the end marker).
    ExpectEof {
        /// More bytes are a quota failure (raw), not a protocol error.
        quota: bool,
    },
    /// The current frame goes past the quota.
    OverQuota,
}

/// What the first bytes peeked say, for the pump to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Detected {
    /// Raw: write these held bytes (none, usually) before the rest.
    Raw {
        /// Bytes consumed while detecting, to write first.
        held: [u8; wire::MAGIC.len()],
        /// How many of them.
        len: usize,
    },
    /// Still a prefix of the magic, or all of it: consume this many of the
    /// bytes peeked and pass them to [`Conn::hold`].
    Consume(usize),
}

/// Backend-neutral state of one connection: no syscalls here.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) id: ConnId,
    pub(crate) peer: SocketAddr,
    pub(crate) file: File,
    /// Payload bytes written to the file; also the next file offset.
    pub(crate) written: u64,
    /// `splice(2)` works for this socket and file (cleared on `EINVAL`).
    #[cfg(target_os = "linux")]
    pub(crate) splice: bool,
    /// Written at the file's own position (no offsets): stdout, a pipe ...
    pub(crate) sequential: bool,
    /// `O_DIRECT` output in progress.
    #[cfg(target_os = "linux")]
    pub(crate) direct: Option<direct::DirectConn>,
    pub(crate) direct_outcome: DirectOutcome,
    /// The file is a pipe: splice straight from the socket into it.
    #[cfg(target_os = "linux")]
    pub(crate) out_pipe: bool,
    stream: Stream,
    started: Instant,
    last_progress: Instant,
}

impl Conn {
    fn new(id: ConnId, peer: SocketAddr, file: File, raw: bool) -> Conn {
        let now = Instant::now();
        let stream = if raw {
            Stream::Raw
        } else {
            Stream::Detect {
                held: [0; wire::MAGIC.len()],
                have: 0,
            }
        };
        Conn {
            id,
            peer,
            file,
            written: 0,
            #[cfg(target_os = "linux")]
            splice: true,
            sequential: false,
            #[cfg(target_os = "linux")]
            direct: None,
            direct_outcome: DirectOutcome::Off,
            #[cfg(target_os = "linux")]
            out_pipe: false,
            stream,
            started: now,
            last_progress: now,
        }
    }

    /// Writes at the file's position from now on; a pipe is spliced into
    /// straight from the socket.
    fn write_sequentially(&mut self) -> io::Result<()> {
        self.sequential = true;
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::fs::FileTypeExt;
            self.out_pipe = self.file.metadata()?.file_type().is_fifo();
        }
        Ok(())
    }

    /// Sets `O_DIRECT` on the file, or records why not.
    fn go_direct(&mut self) {
        #[cfg(target_os = "linux")]
        {
            self.direct_outcome = match direct::set(&self.file) {
                Ok(()) => {
                    self.direct = Some(direct::DirectConn::default());
                    DirectOutcome::Used
                }
                Err(e) => DirectOutcome::Refused(e),
            };
        }
        #[cfg(not(target_os = "linux"))]
        {
            let e = io::Error::new(io::ErrorKind::Unsupported, "O_DIRECT is Linux-only here");
            self.direct_outcome = DirectOutcome::Refused(e);
        }
    }

    /// Where the next payload byte goes: its offset, or `None` for the
    /// file's own position.
    pub(crate) fn at(&self) -> Option<u64> {
        (!self.sequential).then_some(self.written)
    }

    /// What to do next under quota `max_bytes`.
    pub(crate) fn step(&self, max_bytes: Option<u64>) -> Step {
        let left = max_bytes.map(|m| m.saturating_sub(self.written));
        let clamp = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        match &self.stream {
            Stream::Detect { .. } => Step::Detect,
            Stream::Raw => match left {
                Some(0) => Step::ExpectEof { quota: true },
                Some(l) => Step::Payload(clamp(l)),
                None => Step::Payload(usize::MAX),
            },
            Stream::Framed(d) => match d.want() {
                wire::Want::Header(n) => Step::Header(n),
                wire::Want::End => Step::ExpectEof { quota: false },
                wire::Want::Payload(frame) => match left {
                    Some(0) => Step::OverQuota,
                    Some(l) => Step::Payload(clamp(frame.min(l))),
                    None => Step::Payload(clamp(frame)),
                },
            },
        }
    }

    /// The detection bytes held so far (empty unless detecting).
    pub(crate) fn held(&self) -> &[u8] {
        match &self.stream {
            Stream::Detect { held, have } => &held[..*have],
            _ => &[],
        }
    }

    /// Decides on the bytes `peeked` after those held (the stream goes on).
    /// Raw: the stream becomes raw, and the held bytes are handed back.
    pub(crate) fn peeked(&mut self, peeked: &[u8]) -> Detected {
        let Stream::Detect { held, have } = self.stream else {
            return Detected::Consume(0);
        };
        let mut seen = held[..have].to_vec();
        seen.extend_from_slice(peeked);
        match wire::detect(&seen) {
            wire::Detect::Raw => {
                self.stream = Stream::Raw;
                Detected::Raw { held, len: have }
            }
            // All of the magic (the peek asked for no more), or a prefix.
            wire::Detect::Framed | wire::Detect::NeedMore => Detected::Consume(peeked.len()),
        }
    }

    /// The stream cannot be peeked at (not a socket): raw.
    pub(crate) fn undetectable(&mut self) {
        if let Stream::Detect { have: 0, .. } = self.stream {
            self.stream = Stream::Raw;
        }
    }

    /// Keeps `bytes` consumed while detecting; all of the magic makes the
    /// stream framed.
    pub(crate) fn hold(&mut self, bytes: &[u8], now: Instant) {
        if let Stream::Detect { held, have } = &mut self.stream {
            let n = bytes.len().min(held.len() - *have);
            held[*have..*have + n].copy_from_slice(&bytes[..n]);
            *have += n;
            if *have == held.len() {
                self.stream = Stream::Framed(wire::Deframer::new());
            }
            self.last_progress = now;
        }
    }

    /// How the stream ends when the peer closes now: `Ok` for a raw
    /// stream, or a framed one after its end marker; else truncated.
    pub(crate) fn at_eof(&self) -> Result<(), Failure> {
        match &self.stream {
            Stream::Raw => Ok(()),
            Stream::Detect { have: 0, .. } => Ok(()),
            Stream::Detect { .. } => Err(Failure::Truncated { expected: None }),
            Stream::Framed(d) if d.ended() => Ok(()),
            // A peer may announce any length: saturate, never overflow.
            Stream::Framed(d) if d.payload_left() > 0 => Err(Failure::Truncated {
                expected: Some(d.payload_total().saturating_add(d.payload_left())),
            }),
            Stream::Framed(_) => Err(Failure::Truncated { expected: None }),
        }
    }

    /// Feeds frame-header bytes read from the socket.
    pub(crate) fn header(&mut self, bytes: &[u8], now: Instant) {
        if let Stream::Framed(d) = &mut self.stream {
            d.header(bytes);
        }
        self.last_progress = now;
    }

    /// Records `n` payload bytes written to the file.
    pub(crate) fn wrote(&mut self, n: u64, now: Instant) {
        self.written += n;
        if let Stream::Framed(d) = &mut self.stream {
            d.payload(n);
        }
        self.last_progress = now;
    }

    /// The socket has bytes this connection cannot take yet (its output
    /// is full): not idle, as far as the idle timeout goes.
    pub(crate) fn held_back(&mut self, now: Instant) {
        self.last_progress = now;
    }

    /// Whether the stream is (or began like) a framed one.
    pub(crate) fn framed(&self) -> bool {
        match &self.stream {
            Stream::Framed(_) => true,
            Stream::Detect { have, .. } => *have > 0,
            Stream::Raw => false,
        }
    }

    /// When this connection times out for idleness.
    pub(crate) fn idle_deadline(&self, idle: Option<Duration>) -> Option<Instant> {
        idle.map(|d| self.last_progress + d)
    }

    pub(crate) fn progress(&self, now: Instant) -> Progress {
        Progress {
            id: self.id,
            peer: self.peer,
            bytes: self.written,
            elapsed: now - self.started,
        }
    }

    pub(crate) fn finish(self, result: Result<(), Failure>) -> Finished {
        Finished {
            id: self.id,
            peer: self.peer,
            framed: self.framed(),
            file: self.file,
            bytes: self.written,
            elapsed: self.started.elapsed(),
            result,
            direct: self.direct_outcome,
        }
    }
}

/// The earliest of `timeout` from now and the `deadlines`.
pub(crate) fn next_timeout(
    timeout: Option<Duration>,
    deadlines: impl Iterator<Item = Instant>,
    now: Instant,
) -> Option<Duration> {
    let idle = deadlines
        .min()
        .map(|d| d.saturating_duration_since(now) + Duration::from_millis(1));
    match (timeout, idle) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).map_err(io::Error::from)?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
    Ok(())
}

/// Makes `write(2)` beyond `RLIMIT_FSIZE` fail with `EFBIG` instead of
/// killing the process with `SIGXFSZ`. Call once at start-up in programs
/// that write files whose size a peer controls.
pub fn ignore_sigxfsz() -> io::Result<()> {
    crate::sys::ignore_sigxfsz()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Conn {
        let file = File::open("/dev/null").unwrap();
        Conn::new(ConnId(1), "127.0.0.1:1".parse().unwrap(), file, false)
    }

    fn raw_conn() -> Conn {
        let file = File::open("/dev/null").unwrap();
        Conn::new(ConnId(1), "127.0.0.1:1".parse().unwrap(), file, true)
    }

    #[test]
    fn raw_steps_respect_the_quota() {
        let mut c = raw_conn();
        assert_eq!(c.step(None), Step::Payload(usize::MAX));
        assert_eq!(c.step(Some(10)), Step::Payload(10));
        c.wrote(4, Instant::now());
        assert_eq!(c.step(Some(10)), Step::Payload(6));
        c.wrote(6, Instant::now());
        assert_eq!(c.step(Some(10)), Step::ExpectEof { quota: true });
        assert_eq!(c.step(Some(0)), Step::ExpectEof { quota: true });
        assert!(c.at_eof().is_ok());
        assert!(!c.framed());
    }

    #[test]
    fn detection_decides_on_the_first_bytes() {
        // Raw at the first byte that differs from the magic: nothing held.
        let mut c = conn();
        assert_eq!(c.step(None), Step::Detect);
        assert!(matches!(c.peeked(b"hello"), Detected::Raw { len: 0, .. }));
        assert_eq!(c.step(None), Step::Payload(usize::MAX));

        // The magic in pieces: consumed and held, then framed.
        let mut c = conn();
        assert_eq!(c.peeked(&wire::MAGIC[..3]), Detected::Consume(3));
        c.hold(&wire::MAGIC[..3], Instant::now());
        assert_eq!(c.held(), &wire::MAGIC[..3]);
        assert!(c.framed(), "a prefix of the magic counts as framed");
        assert!(
            matches!(c.at_eof(), Err(Failure::Truncated { expected: None })),
            "ended inside the magic"
        );
        assert_eq!(c.peeked(&wire::MAGIC[3..]), Detected::Consume(5));
        c.hold(&wire::MAGIC[3..], Instant::now());
        assert_eq!(c.step(None), Step::Header(8));

        // A prefix, then something else: raw, the held bytes handed back.
        let mut c = conn();
        c.hold(&wire::MAGIC[..2], Instant::now());
        match c.peeked(b"xyz") {
            Detected::Raw { held, len } => assert_eq!(&held[..len], &wire::MAGIC[..2]),
            other => panic!("{other:?}"),
        }
        assert!(!c.framed());

        // An empty stream is a complete raw one.
        assert!(conn().at_eof().is_ok());
    }

    /// Drives a connection's pure state through `wire` as if every step
    /// got up to `piece` bytes; returns the payload and the outcome at the
    /// end of `wire` (an end of stream there).
    fn run_framed(wire: &[u8], piece: usize, max: Option<u64>) -> (Vec<u8>, Result<(), Failure>) {
        let mut c = conn();
        let mut rest = wire;
        let mut out = Vec::new();
        loop {
            let n = piece.min(rest.len());
            match c.step(max) {
                Step::Detect => {
                    if n == 0 {
                        return (out, c.at_eof());
                    }
                    let peek = &rest[..n.min(8 - c.held().len())];
                    match c.peeked(peek) {
                        Detected::Raw { .. } => panic!("taken for raw"),
                        Detected::Consume(k) => {
                            c.hold(&rest[..k], Instant::now());
                            rest = &rest[k..];
                        }
                    }
                }
                Step::Header(h) => {
                    if n == 0 {
                        return (out, c.at_eof());
                    }
                    let k = h.min(n);
                    c.header(&rest[..k], Instant::now());
                    rest = &rest[k..];
                }
                Step::Payload(len) => {
                    if n == 0 {
                        return (out, c.at_eof());
                    }
                    let k = len.min(n);
                    out.extend_from_slice(&rest[..k]);
                    c.wrote(k as u64, Instant::now());
                    rest = &rest[k..];
                }
                Step::ExpectEof { quota } => {
                    assert!(!quota);
                    if n > 0 {
                        return (out, Err(Failure::Protocol("bytes after the end marker")));
                    }
                    return (out, Ok(()));
                }
                Step::OverQuota => return (out, Err(Failure::Quota(max.unwrap()))),
            }
        }
    }

    fn encode(frames: &[&[u8]]) -> Vec<u8> {
        let mut v = wire::MAGIC.to_vec();
        for f in frames {
            v.extend_from_slice(&wire::frame_header(f.len() as u64));
            v.extend_from_slice(f);
        }
        v.extend_from_slice(&wire::END);
        v
    }

    #[test]
    fn framed_streams_complete_only_after_the_end_marker() {
        let a: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let wire = encode(&[&a, b"xyz", &a[..17]]);
        let payload = [&a[..], b"xyz", &a[..17]].concat();
        for piece in [1, 3, 7, 8, 9, 100, 4096] {
            let (got, end) = run_framed(&wire, piece, None);
            assert_eq!(got, payload, "piece {piece}");
            assert!(end.is_ok(), "piece {piece}: {end:?}");
        }
        // Cut anywhere: never complete, and never more than was sent.
        for cut in 1..wire.len() {
            let (got, end) = run_framed(&wire[..cut], 5, None);
            assert!(
                matches!(end, Err(Failure::Truncated { .. })),
                "cut at {cut}: {end:?}"
            );
            assert!(payload.starts_with(&got));
        }
        // Inside a frame, the announced size is known.
        let (_, end) = run_framed(&wire[..8 + 8 + 10], 64, None);
        assert!(
            matches!(
                end,
                Err(Failure::Truncated {
                    expected: Some(1000)
                })
            ),
            "{end:?}"
        );
        // Bytes after the end marker break the format.
        let mut more = wire.clone();
        more.push(0);
        let (_, end) = run_framed(&more, 64, None);
        assert!(matches!(end, Err(Failure::Protocol(_))), "{end:?}");
    }

    #[test]
    fn the_quota_counts_payload_bytes() {
        let wire = encode(&[&[1u8; 600], &[2u8; 600]]);
        let (got, end) = run_framed(&wire, 64, Some(1200));
        assert_eq!(got.len(), 1200);
        assert!(end.is_ok(), "{end:?}");
        let (got, end) = run_framed(&wire, 64, Some(1000));
        assert_eq!(got.len(), 1000);
        assert!(matches!(end, Err(Failure::Quota(1000))), "{end:?}");
    }

    #[test]
    fn timeout_is_the_earliest() {
        let now = Instant::now();
        let d = [now + Duration::from_secs(3), now + Duration::from_secs(1)];
        let t = next_timeout(Some(Duration::from_secs(2)), d.into_iter(), now).unwrap();
        assert!(
            t <= Duration::from_millis(1001) && t >= Duration::from_secs(1),
            "{t:?}"
        );
        assert_eq!(next_timeout(None, std::iter::empty(), now), None);
        let past = [now - Duration::from_secs(1)];
        assert_eq!(
            next_timeout(None, past.into_iter(), now),
            Some(Duration::from_millis(1))
        );
    }

    /// Receives one connection carrying `data` on `r`; returns what ended
    /// up in the file.
    fn receive_one(mut r: Receiver, data: Vec<u8>, name: &str) -> (Finished, Vec<u8>) {
        use std::io::{Read, Write};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        r.listen(listener, Some(1)).unwrap();
        let client = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(&data).unwrap();
            data
        });
        // Unique per call: tests run in parallel threads of one process,
        // and two of them receive under the same backend name.
        static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "ringmover-unit-{}-{call}-{name}",
            std::process::id()
        ));
        let mut events = Vec::new();
        let mut attached = false;
        let done = loop {
            r.wait(Some(Duration::from_secs(10)), &mut events).unwrap();
            let mut finished = None;
            for e in events.drain(..) {
                match e {
                    Event::Incoming { socket, peer } => {
                        let f = File::create(&path).unwrap();
                        r.attach(socket, peer, f).unwrap();
                        attached = true;
                        assert!(!r.is_listening(), "the limit of one stops listening");
                    }
                    Event::Finished(f) => finished = Some(f),
                    Event::AcceptFailed(e) => panic!("{e}"),
                }
            }
            if let Some(f) = finished {
                break f;
            }
            assert!(attached || r.is_listening());
        };
        assert_eq!(r.active(), 0);
        let sent = client.join().unwrap();
        let mut got = Vec::new();
        File::open(&path).unwrap().read_to_end(&mut got).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(
            got == sent,
            "{name}: {} bytes received, {} sent",
            got.len(),
            sent.len()
        );
        (done, got)
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn every_backend_receives_byte_exact() {
        for backend in Backend::compiled() {
            let r = Receiver::new(backend, RecvOptions::default()).unwrap();
            assert_eq!(r.backend(), backend);
            let (done, got) = receive_one(r, data(3 << 20), backend.name());
            assert!(done.result.is_ok(), "{backend}: {:?}", done.result);
            assert_eq!(done.bytes, got.len() as u64);
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn uring_without_multishot_arms_one_shot_polls() {
        let mut r = Receiver::new(Backend::Uring, RecvOptions::default()).unwrap();
        assert!(r.fallbacks().is_empty(), "this kernel has multishot poll");
        r.engine.pretend_no_multishot();
        let ops: Vec<_> = r.fallbacks().iter().map(|f| f.op).collect();
        assert_eq!(ops, vec![crate::Opcode::POLL_ADD]);
        let (done, _) = receive_one(r, data(2 << 20), "uring-one-shot");
        assert!(done.result.is_ok(), "{:?}", done.result);
    }

    #[test]
    fn quota_stops_at_max_bytes_on_every_backend() {
        for backend in Backend::compiled() {
            let options = RecvOptions {
                max_bytes: Some(1000),
                ..RecvOptions::default()
            };
            let mut r = Receiver::new(backend, options).unwrap();
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            r.listen(listener, Some(1)).unwrap();
            let client = std::thread::spawn(move || {
                use std::io::Write;
                let mut s = TcpStream::connect(addr).unwrap();
                let _ = s.write_all(&[7u8; 5000]);
                s
            });
            let mut events = Vec::new();
            let done = loop {
                r.wait(Some(Duration::from_secs(10)), &mut events).unwrap();
                let mut finished = None;
                for e in events.drain(..) {
                    match e {
                        Event::Incoming { socket, peer } => {
                            let f = File::options().write(true).open("/dev/null").unwrap();
                            r.attach(socket, peer, f).unwrap();
                        }
                        Event::Finished(f) => finished = Some(f),
                        Event::AcceptFailed(e) => panic!("{e}"),
                    }
                }
                if let Some(f) = finished {
                    break f;
                }
            };
            drop(client.join());
            assert!(
                matches!(done.result, Err(Failure::Quota(1000))),
                "{backend}: {:?}",
                done.result
            );
            assert_eq!(done.bytes, 1000, "{backend}");
        }
    }

    proptest::proptest! {
        /// Moving what `step` allows, in any chunking, never passes the
        /// quota, and the end is expected exactly when the quota is used up.
        #[test]
        fn raw_reads_never_pass_the_quota(
            max in proptest::option::of(0u64..20_000),
            chunks in proptest::collection::vec(1usize..7000, 0..40),
        ) {
            let mut c = raw_conn();
            for chunk in chunks {
                match c.step(max) {
                    Step::Payload(len) => {
                        proptest::prop_assert!(len >= 1);
                        // A short read: the socket had less than asked.
                        c.wrote(chunk.min(len) as u64, Instant::now());
                        if let Some(m) = max {
                            proptest::prop_assert!(c.written <= m);
                        }
                    }
                    Step::ExpectEof { quota: true } => {
                        proptest::prop_assert_eq!(Some(c.written), max);
                    }
                    other => proptest::prop_assert!(false, "{:?}", other),
                }
            }
        }

        /// A framed stream in random frames, read in random pieces: the
        /// payload comes out whole and complete; cut short, it never does.
        #[test]
        fn framed_round_trip(
            frames in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 1..300), 0..8),
            piece in 1usize..50,
            cut in proptest::num::usize::ANY,
        ) {
            let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
            let wire = encode(&refs);
            let (got, end) = run_framed(&wire, piece, None);
            proptest::prop_assert_eq!(got, frames.concat());
            proptest::prop_assert!(end.is_ok());
            let cut = 1 + cut % (wire.len() - 1);
            let (_, end) = run_framed(&wire[..cut], piece, None);
            let truncated = matches!(end, Err(Failure::Truncated { .. }));
            proptest::prop_assert!(truncated, "cut at {}: {:?}", cut, end);
        }
    }

    #[cfg(target_os = "linux")]
    fn direct_receiver(backend: Backend) -> Receiver {
        let options = RecvOptions {
            direct: true,
            ..RecvOptions::default()
        };
        Receiver::new(backend, options).unwrap()
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn direct_output_on_every_backend() {
        for backend in Backend::compiled() {
            let r = direct_receiver(backend);
            let registered = r.direct().registered;
            // Registered buffers only where a ring writes them.
            assert_eq!(registered > 0, backend == Backend::Uring, "{backend}");
            let (done, got) = receive_one(r, data((5 << 20) + 123), backend.name());
            assert!(done.result.is_ok(), "{backend}: {:?}", done.result);
            assert!(matches!(done.direct, DirectOutcome::Used), "{backend}");
            assert_eq!(done.bytes, got.len() as u64);
        }
    }

    /// A receiver dropped with a live `O_DIRECT` connection (SIGINT in
    /// `ringmover recv`) writes what its buffer holds: nothing received is
    /// lost, the file ends exactly there.
    #[cfg(target_os = "linux")]
    #[test]
    fn dropping_a_direct_receiver_keeps_what_arrived() {
        use std::io::Write;
        for backend in Backend::compiled() {
            let mut r = direct_receiver(backend);
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            r.listen(listener, Some(1)).unwrap();
            // Two buffers and a bit: some written, some held.
            let sent = data((1 << 20) + 5000);
            let mut client = TcpStream::connect(addr).unwrap();
            client.write_all(&sent).unwrap();
            let path = std::env::temp_dir().join(format!(
                "ringmover-unit-{}-drop-{backend}",
                std::process::id()
            ));
            let mut events = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(30);
            while r.progress().first().map_or(0, |p| p.bytes) < sent.len() as u64 {
                assert!(Instant::now() < deadline, "{backend}: bytes did not arrive");
                r.wait(Some(Duration::from_millis(100)), &mut events)
                    .unwrap();
                for e in events.drain(..) {
                    if let Event::Incoming { socket, peer } = e {
                        let f = File::create(&path).unwrap();
                        r.attach(socket, peer, f).unwrap();
                    }
                }
            }
            drop(r);
            let got = std::fs::read(&path).unwrap();
            std::fs::remove_file(&path).unwrap();
            assert!(
                got == sent,
                "{backend}: {} of {} bytes",
                got.len(),
                sent.len()
            );
        }
    }

    #[test]
    fn a_waker_ends_a_wait_from_another_thread() {
        use std::sync::atomic::{AtomicBool, Ordering};
        for backend in Backend::compiled() {
            let mut r = Receiver::new(backend, RecvOptions::default()).unwrap();
            let w = r.waker().unwrap();
            let mut events = Vec::new();
            for _ in 0..3 {
                let woken = std::sync::Arc::new(AtomicBool::new(false));
                let (w, flag) = (w.clone(), woken.clone());
                let t = std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(50));
                    flag.store(true, Ordering::SeqCst);
                    w.wake().unwrap();
                });
                let started = Instant::now();
                // A wait may also end early (EINTR, e.g. from io_uring
                // task work): wait again until the wake-up was sent.
                loop {
                    r.wait(Some(Duration::from_secs(30)), &mut events).unwrap();
                    assert!(
                        started.elapsed() < Duration::from_secs(20),
                        "{backend}: the wake-up was lost"
                    );
                    if woken.load(Ordering::SeqCst) {
                        break;
                    }
                }
                t.join().unwrap();
                assert!(events.is_empty(), "{backend}");
            }
            // Nothing pending: a wait runs to its timeout.
            assert!(
                a_wait_sleeps(&mut r, &mut events),
                "{backend}: the wake-up fd stays readable"
            );
        }
    }

    /// Whether a 200 ms wait runs (nearly) to its timeout: one of three
    /// must, allowing for waits a signal interrupts.
    fn a_wait_sleeps(r: &mut Receiver, events: &mut Vec<Event>) -> bool {
        (0..3).any(|_| {
            let started = Instant::now();
            r.wait(Some(Duration::from_millis(200)), events).unwrap();
            started.elapsed() >= Duration::from_millis(150)
        })
    }

    /// A held listener accepts nothing and ends no wait early (it is out
    /// of the selector: a level-triggered listener with a connection in its
    /// backlog would be ready again and again); let go, it accepts what
    /// waited at once. Held before it listens, after an accept, and while
    /// it rests after a failed accept (a rest that ends while it is held
    /// must not end waits either).
    #[test]
    fn a_held_listener_leaves_connections_in_the_backlog() {
        for backend in Backend::compiled() {
            let mut r = Receiver::new(backend, RecvOptions::default()).unwrap();
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            r.set_accepting(false);
            r.listen(listener, Some(3)).unwrap();
            let mut events = Vec::new();
            let mut clients = Vec::new();
            for round in 0..3 {
                if round == 2 {
                    r.set_accepting(true);
                    r.engine.pretend_accept_failed(&mut events);
                    assert!(matches!(events.pop(), Some(Event::AcceptFailed(_))));
                    r.set_accepting(false);
                    std::thread::sleep(ACCEPT_BACKOFF);
                }
                // Complete once in the backlog: no accept needed.
                clients.push(TcpStream::connect(addr).unwrap());
                assert!(r.is_listening() && !r.is_accepting(), "{backend}");
                // Waits run to their timeout and accept nothing.
                assert!(
                    a_wait_sleeps(&mut r, &mut events),
                    "{backend} round {round}: waits end at once"
                );
                assert!(events.is_empty(), "{backend} round {round}: {events:?}");
                r.set_accepting(true);
                assert!(r.is_accepting(), "{backend}");
                let started = Instant::now();
                while events.is_empty() {
                    assert!(
                        started.elapsed() < Duration::from_secs(5),
                        "{backend} round {round}: nothing accepted once let go"
                    );
                    r.wait(Some(Duration::from_secs(1)), &mut events).unwrap();
                }
                assert!(
                    matches!(events.pop(), Some(Event::Incoming { .. })) && events.is_empty(),
                    "{backend} round {round}: {events:?}"
                );
                r.set_accepting(false);
            }
            assert!(
                !r.is_listening() && !r.is_accepting(),
                "{backend}: limit reached"
            );
        }
    }

    #[test]
    fn resets_are_told_apart() {
        let reset = Failure::from_read(io::Error::from_raw_os_error(libc::ECONNRESET));
        assert_eq!(reset.kind_name(), "reset");
        let other = Failure::from_read(io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(other.kind_name(), "read-error");
    }
}
