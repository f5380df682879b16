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
//!                 receiver.attach(socket.into(), peer, file)?;
//!             }
//!             Event::Finished(done) => println!("{}: {} bytes, {:?}", done.peer, done.bytes, done.result),
//!             Event::AcceptFailed(e) => eprintln!("accept: {e}"),
//!         }
//!     }
//! }
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! Backends (see `docs/recv.md`):
//! - `uring`: `IORING_OP_POLL_ADD` (POLLIN) first, so an idle connection
//!   costs no io-wq worker; then `IORING_OP_SPLICE` socket → pipe with
//!   `SPLICE_F_NONBLOCK` (EAGAIN re-arms the poll), then pipe → file for
//!   exactly the count moved, at an explicit offset. Without `SPLICE` on
//!   the ring (before Linux 5.7), `splice(2)` runs after each poll
//!   completion; [`Receiver::fallbacks`] says so.
//! - `epoll`: level-triggered readiness, `splice(2)` socket → pipe → file.
//! - `poll`: `poll(2)`, `read(2)` into a 64 KiB buffer, `pwrite(2)`. The
//!   only backend off Linux.
//!
//! Pipes (`uring`, `epoll`) come from a [`pipe pool`](PipeReport) shared by
//! the connections of one receiver: a connection holds one only while bytes
//! are in it.

use std::fmt;
use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::backend::{Backend, OpFallback};

#[cfg(target_os = "linux")]
mod pipe;
mod readiness;
#[cfg(target_os = "linux")]
mod uring;

/// Limits applied to every connection of a [`Receiver`].
#[derive(Debug, Clone, Default)]
pub struct RecvOptions {
    /// Stop a connection with [`Failure::Quota`] when the peer sends more
    /// than this many bytes; exactly this many reach the file.
    pub max_bytes: Option<u64>,
    /// Stop a connection with [`Failure::IdleTimeout`] when no byte arrives
    /// for this long.
    pub idle_timeout: Option<Duration>,
    /// Pipe capacity to ask for with `F_SETPIPE_SZ` (default: 1 MiB capped
    /// at `/proc/sys/fs/pipe-max-size`). Unused by `poll`, which has no pipes.
    pub pipe_size: Option<usize>,
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
    /// No byte arrived for this long.
    IdleTimeout(Duration),
    /// The peer sent more than this many bytes.
    Quota(u64),
    /// Reading the socket failed otherwise.
    Read(io::Error),
    /// Writing the file failed (`ENOSPC`, `EFBIG`, `EDQUOT`, `EIO` ...).
    Write(io::Error),
}

impl Failure {
    /// A short machine-readable name: `reset`, `idle-timeout`, `quota`,
    /// `read-error` or `write-error`.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Failure::Reset(_) => "reset",
            Failure::IdleTimeout(_) => "idle-timeout",
            Failure::Quota(_) => "quota",
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
            Failure::Read(e) => write!(f, "reading the socket: {e}"),
            Failure::Write(e) => write!(f, "writing the file: {e}"),
        }
    }
}

impl std::error::Error for Failure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Failure::Reset(e) | Failure::Read(e) | Failure::Write(e) => Some(e),
            Failure::IdleTimeout(_) | Failure::Quota(_) => None,
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
    /// Bytes written to the file (from offset 0).
    pub bytes: u64,
    /// Time from [`Receiver::attach`] to the end.
    pub elapsed: Duration,
    /// `Ok` after a clean end of stream.
    pub result: Result<(), Failure>,
}

/// What [`Receiver::wait`] reports.
#[derive(Debug)]
pub enum Event {
    /// The listener accepted a connection; [`Receiver::attach`] it (or drop it).
    Incoming {
        /// The accepted socket.
        socket: TcpStream,
        /// Its peer.
        peer: SocketAddr,
    },
    /// A connection ended.
    Finished(Finished),
    /// `accept(2)` failed with something other than `EAGAIN`.
    AcceptFailed(io::Error),
}

/// A connection's progress, for rate displays.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// The connection.
    pub id: ConnId,
    /// Its peer.
    pub peer: SocketAddr,
    /// Bytes written so far.
    pub bytes: u64,
    /// Time since it was attached.
    pub elapsed: Duration,
}

/// Receives many stream sockets into files on one backend.
#[derive(Debug)]
pub struct Receiver {
    engine: Engine,
    backend: Backend,
    next_id: u64,
}

#[derive(Debug)]
enum Engine {
    #[cfg(target_os = "linux")]
    Uring(Box<uring::UringEngine>),
    Readiness(readiness::ReadinessEngine),
}

impl Receiver {
    /// A receiver on `backend` (usually `Selection::from_env()?.backend`).
    ///
    /// Fails when the backend cannot work here (io_uring forbidden, epoll
    /// on a non-Linux build).
    pub fn new(backend: Backend, options: RecvOptions) -> io::Result<Receiver> {
        let engine = match backend {
            #[cfg(target_os = "linux")]
            Backend::Uring => Engine::Uring(Box::new(uring::UringEngine::new(options)?)),
            #[cfg(target_os = "linux")]
            Backend::Epoll => Engine::Readiness(readiness::ReadinessEngine::epoll(options)?),
            Backend::Poll => Engine::Readiness(readiness::ReadinessEngine::poll(options)),
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

    /// Per-operation fallbacks in use (io_uring without `SPLICE`).
    pub fn fallbacks(&self) -> Vec<OpFallback> {
        match &self.engine {
            #[cfg(target_os = "linux")]
            Engine::Uring(u) => u.fallbacks(),
            Engine::Readiness(_) => Vec::new(),
        }
    }

    /// The pipes the pool made: how many, and the capacity they got.
    pub fn pipes(&self) -> PipeReport {
        match &self.engine {
            #[cfg(target_os = "linux")]
            Engine::Uring(u) => u.pipes(),
            Engine::Readiness(r) => r.pipes(),
        }
    }

    /// Watches `listener` and reports each accepted connection as
    /// [`Event::Incoming`], at most `limit` of them (then stops listening).
    pub fn listen(&mut self, listener: TcpListener, limit: Option<u64>) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        let listen = Listen {
            listener,
            remaining: limit,
        };
        match &mut self.engine {
            #[cfg(target_os = "linux")]
            Engine::Uring(u) => u.listen(listen),
            Engine::Readiness(r) => r.listen(listen),
        }
    }

    /// Whether a listener is still accepting.
    pub fn is_listening(&self) -> bool {
        match &self.engine {
            #[cfg(target_os = "linux")]
            Engine::Uring(u) => u.is_listening(),
            Engine::Readiness(r) => r.is_listening(),
        }
    }

    /// Starts receiving `socket` into `file` (written from offset 0). The
    /// socket is made non-blocking.
    pub fn attach(&mut self, socket: OwnedFd, peer: SocketAddr, file: File) -> io::Result<ConnId> {
        set_nonblocking(&socket)?;
        let id = ConnId(self.next_id);
        self.next_id += 1;
        let conn = Conn::new(id, peer, file);
        match &mut self.engine {
            #[cfg(target_os = "linux")]
            Engine::Uring(u) => u.attach(conn, socket)?,
            Engine::Readiness(r) => r.attach(conn, socket)?,
        }
        Ok(id)
    }

    /// Connections attached and not yet finished.
    pub fn active(&self) -> usize {
        match &self.engine {
            #[cfg(target_os = "linux")]
            Engine::Uring(u) => u.active(),
            Engine::Readiness(r) => r.active(),
        }
    }

    /// Progress of every active connection.
    pub fn progress(&self) -> Vec<Progress> {
        let now = Instant::now();
        let mut v: Vec<Progress> = match &self.engine {
            #[cfg(target_os = "linux")]
            Engine::Uring(u) => u.conns().map(|c| c.progress(now)).collect(),
            Engine::Readiness(r) => r.conns().map(|c| c.progress(now)).collect(),
        };
        v.sort_by_key(|p| p.id);
        v
    }

    /// Moves bytes until something happens or `timeout` passes, and appends
    /// what happened to `events`. Idle timeouts are enforced here.
    pub fn wait(&mut self, timeout: Option<Duration>, events: &mut Vec<Event>) -> io::Result<()> {
        match &mut self.engine {
            #[cfg(target_os = "linux")]
            Engine::Uring(u) => u.wait(timeout, events),
            Engine::Readiness(r) => r.wait(timeout, events),
        }
    }
}

/// A listener being watched, with how many more connections to accept.
#[derive(Debug)]
pub(crate) struct Listen {
    pub(crate) listener: TcpListener,
    pub(crate) remaining: Option<u64>,
}

impl Listen {
    /// Accepts until `EAGAIN` or the limit; `false` once the limit is reached.
    pub(crate) fn accept_all(&mut self, events: &mut Vec<Event>) -> bool {
        loop {
            if self.remaining == Some(0) {
                return false;
            }
            match self.listener.accept() {
                Ok((socket, peer)) => {
                    if let Some(r) = &mut self.remaining {
                        *r -= 1;
                    }
                    events.push(Event::Incoming { socket, peer });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The peer gave up before we accepted: not our failure.
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
                Err(e) => {
                    events.push(Event::AcceptFailed(e));
                    return true;
                }
            }
        }
    }
}

/// What a connection wants next, given its quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Want {
    /// Read up to this many bytes.
    Read(usize),
    /// The quota is used up: find out whether the peer sent more (quota
    /// failure) or ended the stream (clean end).
    Probe,
}

/// Backend-neutral state of one connection: no syscalls here.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) id: ConnId,
    pub(crate) peer: SocketAddr,
    pub(crate) file: File,
    /// Bytes written to the file; also the next file offset.
    pub(crate) written: u64,
    started: Instant,
    last_progress: Instant,
}

impl Conn {
    fn new(id: ConnId, peer: SocketAddr, file: File) -> Conn {
        let now = Instant::now();
        Conn {
            id,
            peer,
            file,
            written: 0,
            started: now,
            last_progress: now,
        }
    }

    /// The next step, reading at most `cap` bytes at a time.
    pub(crate) fn want(&self, cap: usize, max_bytes: Option<u64>) -> Want {
        match max_bytes {
            None => Want::Read(cap),
            Some(max) => {
                let left = max.saturating_sub(self.written);
                if left == 0 {
                    Want::Probe
                } else {
                    Want::Read(usize::try_from(left).unwrap_or(usize::MAX).min(cap))
                }
            }
        }
    }

    /// Records `n` bytes written to the file.
    pub(crate) fn wrote(&mut self, n: u64, now: Instant) {
        self.written += n;
        self.last_progress = now;
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
            file: self.file,
            bytes: self.written,
            elapsed: self.started.elapsed(),
            result,
        }
    }
}

/// The earliest of `timeout` from now and the idle deadlines.
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

/// `recv(fd, buf, 1, MSG_PEEK | MSG_DONTWAIT)`: whether the peer sent more
/// (`Ok(true)`), ended the stream (`Ok(false)`), or nothing is there yet
/// (`WouldBlock`).
pub(crate) fn peek_more(fd: &OwnedFd) -> io::Result<bool> {
    use nix::sys::socket::{recv, MsgFlags};
    let mut byte = [0u8; 1];
    crate::sys::retry(|| {
        recv(
            fd.as_raw_fd(),
            &mut byte,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        )
        .map_err(io::Error::from)
    })
    .map(|n| n > 0)
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
        Conn::new(ConnId(1), "127.0.0.1:1".parse().unwrap(), file)
    }

    #[test]
    fn want_respects_quota() {
        let mut c = conn();
        assert_eq!(c.want(65536, None), Want::Read(65536));
        assert_eq!(c.want(65536, Some(10)), Want::Read(10));
        c.wrote(4, Instant::now());
        assert_eq!(c.want(65536, Some(10)), Want::Read(6));
        c.wrote(6, Instant::now());
        assert_eq!(c.want(65536, Some(10)), Want::Probe);
        assert_eq!(c.want(65536, Some(0)), Want::Probe);
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
        let path =
            std::env::temp_dir().join(format!("ringmover-unit-{}-{name}", std::process::id()));
        let mut events = Vec::new();
        let mut attached = false;
        let done = loop {
            r.wait(Some(Duration::from_secs(10)), &mut events).unwrap();
            let mut finished = None;
            for e in events.drain(..) {
                match e {
                    Event::Incoming { socket, peer } => {
                        let f = File::create(&path).unwrap();
                        r.attach(socket.into(), peer, f).unwrap();
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
    fn uring_without_splice_falls_back_to_splice_syscall() {
        let mut r = Receiver::new(Backend::Uring, RecvOptions::default()).unwrap();
        assert!(r.fallbacks().is_empty(), "this kernel has IORING_OP_SPLICE");
        if let Engine::Uring(u) = &mut r.engine {
            u.pretend_no_splice_op();
        }
        let ops: Vec<_> = r.fallbacks().iter().map(|f| f.op).collect();
        assert_eq!(ops, vec![crate::Opcode::SPLICE]);
        let (done, _) = receive_one(r, data(2 << 20), "uring-fallback");
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
                            r.attach(socket.into(), peer, f).unwrap();
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
        /// Reading what `want` allows, in any chunking, never passes the
        /// quota, and `Probe` comes exactly when the quota is used up.
        #[test]
        fn reads_never_pass_the_quota(
            cap in 1usize..5000,
            max in proptest::option::of(0u64..20_000),
            chunks in proptest::collection::vec(1usize..7000, 0..40),
        ) {
            let mut c = conn();
            for chunk in chunks {
                match c.want(cap, max) {
                    Want::Read(len) => {
                        proptest::prop_assert!(len >= 1 && len <= cap);
                        // A short read: the socket had less than asked.
                        let n = chunk.min(len);
                        c.wrote(n as u64, Instant::now());
                        if let Some(m) = max {
                            proptest::prop_assert!(c.written <= m);
                        }
                    }
                    Want::Probe => {
                        proptest::prop_assert_eq!(Some(c.written), max);
                    }
                }
            }
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
