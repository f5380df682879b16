//! The one small interface every backend implements, and the in-flight
//! record that owns what the kernel reads.
//!
//! A driver starts a vectored write for a connection, submits, and waits;
//! it reports an [`Event`] per finished write (or, for readiness backends,
//! when a connection that hit `EAGAIN` becomes writable). The engine above
//! (`mover/`) never matches on which driver it has except to report it.
#![allow(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, RawFd};
use std::time::Duration;

use nix::sys::socket::{SockaddrLike, SockaddrStorage};

use crate::backend::Backend;
use crate::outbox::{Batch, DatagramAt, Outbox};
use crate::sys::net::FdKind;

#[cfg(target_os = "linux")]
mod epoll;
mod poll;
mod readiness;
#[cfg(target_os = "linux")]
mod uring;

/// A connection's identity on the wire between engine and driver:
/// `(slot << 32) | generation`, which is also the io_uring `user_data`.
pub(crate) type Token = u64;

/// What a driver reports.
#[derive(Debug)]
pub(crate) enum Event {
    /// A started write finished: bytes written, or the error.
    Done {
        token: Token,
        res: io::Result<usize>,
    },
    /// A connection whose write hit `EAGAIN` may be written again.
    Writable { token: Token },
    /// A zero-copy send's notification: the kernel no longer reads its
    /// buffers. `copied`: the kernel copied after all (loopback, veth).
    /// Only the io_uring leaf sends zero-copy; the engine handles it anyway.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    Notified { token: Token, copied: bool },
    /// The wake fd (see `Driver::watch_wake`) was signalled.
    Woken,
}

/// Counters every driver keeps; the engine adds its own.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DriverStats {
    /// Submission queue entries pushed (io_uring only).
    pub(crate) sqes: u64,
    /// `io_uring_enter` calls.
    pub(crate) enters: u64,
    /// System calls of any kind made to move bytes or wait.
    pub(crate) syscalls: u64,
    /// Zero-copy sends submitted (io_uring only).
    pub(crate) zc_sends: u64,
    /// SQEs that named their file by its index in the ring's registered
    /// file table (`IOSQE_FIXED_FILE`; io_uring only).
    pub(crate) fixed_file_sqes: u64,
    /// Connections attached while the ring had a file table that use
    /// their plain fd: the table was full, or the kernel refused the fd.
    pub(crate) unregistered_files: u64,
}

/// Whether the io_uring ring names connections' fds through a table of
/// registered files (`IOSQE_FIXED_FILE`), which spares the kernel an
/// `fget`/`fput` per request; and if not, why. Per `Mover`; a
/// connection attached while the table is full uses its plain fd
/// ([`Stats::unregistered_files`](crate::Stats::unregistered_files)
/// counts those).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegisteredFiles {
    /// A sparse table of `slots` files is registered with the ring
    /// (`IORING_REGISTER_FILES2` with `IORING_RSRC_REGISTER_SPARSE`, Linux
    /// 5.19); each connection takes a slot at attach and frees it at
    /// detach (`IORING_REGISTER_FILES_UPDATE`).
    On {
        /// The table's size.
        slots: u32,
    },
    /// None asked for: not io_uring, or
    /// [`MoverBuilder::registered_files`](crate::MoverBuilder::registered_files)
    /// was 0.
    Off,
    /// The kernel refused to register the table, with this errno (EINVAL:
    /// before 5.19; EMFILE: more slots than `RLIMIT_NOFILE`; ENOMEM; or
    /// what a seccomp filter answers): every request names its plain fd.
    Refused {
        /// The errno of the refused registration.
        errno: i32,
    },
}

/// The in-flight record of one connection's write: the iovec array, the
/// `msghdr` and the destination address the kernel reads.
///
/// Invariant (the one every `unsafe` write relies on): a `WriteOp` is boxed
/// (its address never changes) and is neither refilled nor dropped while its
/// write is in flight, that is from `Driver::start` until the driver reports
/// `Event::Done` for its token; and the `Bytes` its iovecs point at belong to
/// the connection's [`Outbox`], which advances only on that `Done`. The engine
/// keeps both in one `ConnState` and, before freeing a connection or the
/// engine, cancels and waits for every in-flight write.
#[derive(Debug)]
pub(crate) struct WriteOp {
    iovecs: Vec<libc::iovec>,
    msg: libc::msghdr,
    dest: Option<SockaddrStorage>,
    /// What the current fill covers.
    pub(crate) batch: Batch,
    /// Send with SEND_ZC/SENDMSG_ZC (io_uring only).
    pub(crate) zero_copy: bool,
    /// The whole batch lies in this registered buffer (`buf_index`).
    pub(crate) fixed: Option<u16>,
    /// A zero-copy write's clones of the `Bytes` its iovecs point at: the
    /// driver takes them at `start` and keeps them until the notification.
    pub(crate) hold: Vec<bytes::Bytes>,
    /// The control message the msghdr points at when the batch is a GSO
    /// send (`UDP_SEGMENT` and the segment size): in the op, so it lives
    /// exactly as long as the iovecs (the same invariant).
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    cmsg: CmsgBuf,
}

/// Room for one cmsg carrying a `u16`, aligned for `cmsghdr`.
#[derive(Debug, Default, Clone, Copy)]
#[repr(C, align(8))]
struct CmsgBuf([u8; 32]);

// SAFETY: the raw pointers inside point only at this op's own `iovecs` and
// `dest`, and at `Bytes` owned by the same connection's `Outbox`, all of
// which are `Send`; the op is only used by whoever owns the engine.
unsafe impl Send for WriteOp {}

impl WriteOp {
    pub(crate) fn new() -> Box<WriteOp> {
        Box::new(WriteOp {
            iovecs: Vec::new(),
            // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
            msg: unsafe { std::mem::zeroed() },
            dest: None,
            batch: Batch::default(),
            zero_copy: false,
            fixed: None,
            hold: Vec::new(),
            cmsg: CmsgBuf::default(),
        })
    }

    /// Refills the op from the front of `outbox`. Must not be called while
    /// the op is in flight (see the type's invariant).
    pub(crate) fn fill(&mut self, outbox: &Outbox) -> &Batch {
        self.batch = outbox.fill_iovecs(&mut self.iovecs, crate::outbox::IOV_MAX);
        self.point_msghdr();
        &self.batch
    }

    /// Refills the op with the queued datagram of `outbox` at `at` and, up
    /// to `max_segments` in all, those after it that can go with it as one
    /// GSO send (`Outbox::fill_datagrams`, which moves `at` past them;
    /// `None`: no such datagram). Not while in flight, as for `fill`.
    pub(crate) fn fill_datagrams(
        &mut self,
        outbox: &Outbox,
        at: &mut DatagramAt,
        max_segments: usize,
    ) -> Option<&Batch> {
        self.batch = outbox.fill_datagrams(at, max_segments, &mut self.iovecs)?;
        self.point_msghdr();
        Some(&self.batch)
    }

    /// Points the msghdr at this op's iovecs and destination.
    fn point_msghdr(&mut self) {
        self.dest = self
            .batch
            .dest
            .map(|a: SocketAddr| SockaddrStorage::from(a));
        self.msg.msg_iov = self.iovecs.as_mut_ptr();
        self.msg.msg_iovlen = self.iovecs.len() as _;
        match &self.dest {
            Some(addr) => {
                self.msg.msg_name = addr.as_ptr() as *mut libc::c_void;
                self.msg.msg_namelen = addr.len();
            }
            None => {
                self.msg.msg_name = std::ptr::null_mut();
                self.msg.msg_namelen = 0;
            }
        }
        self.msg.msg_control = std::ptr::null_mut();
        self.msg.msg_controllen = 0;
        if let Some(size) = self.batch.segment_size {
            self.point_segment_size(size);
        }
    }

    /// Adds the `UDP_SEGMENT` cmsg (the segment size) to the msghdr.
    #[cfg(target_os = "linux")]
    fn point_segment_size(&mut self, size: u16) {
        // SAFETY: CMSG_SPACE only computes a length.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as usize;
        debug_assert!(space <= std::mem::size_of::<CmsgBuf>());
        self.cmsg = CmsgBuf::default();
        self.msg.msg_control = self.cmsg.0.as_mut_ptr().cast();
        self.msg.msg_controllen = space as _;
        // SAFETY: msg_control points at `self.cmsg`, 8-byte aligned and at
        // least `space` bytes long, so CMSG_FIRSTHDR returns a valid header
        // inside it whose data has room for a u16; the op owns the buffer
        // for as long as the msghdr is used (the WriteOp invariant).
        unsafe {
            let hdr = libc::CMSG_FIRSTHDR(&self.msg);
            (*hdr).cmsg_level = libc::SOL_UDP;
            (*hdr).cmsg_type = crate::sys::net::UDP_SEGMENT;
            (*hdr).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(hdr).cast::<u16>(), size);
        }
    }

    /// GSO exists only on Linux; the engine never asks for it elsewhere.
    #[cfg(not(target_os = "linux"))]
    fn point_segment_size(&mut self, _size: u16) {}

    pub(crate) fn iovecs(&self) -> &[libc::iovec] {
        &self.iovecs
    }

    pub(crate) fn msghdr(&self) -> *const libc::msghdr {
        &self.msg
    }

    /// The destination's address and length, if the batch has one.
    #[cfg(target_os = "linux")]
    pub(crate) fn dest(&self) -> Option<(*const libc::sockaddr, libc::socklen_t)> {
        self.dest.as_ref().map(|a| (a.as_ptr(), a.len()))
    }
}

/// Flags for socket sends: never raise SIGPIPE, report EPIPE instead.
pub(crate) const SEND_FLAGS: i32 = libc::MSG_NOSIGNAL;

/// A backend leaf, chosen at run time (static dispatch).
#[derive(Debug)]
pub(crate) enum Driver {
    #[cfg(target_os = "linux")]
    Uring(Box<uring::UringDriver>),
    #[cfg(target_os = "linux")]
    Epoll(readiness::Readiness<epoll::Epoll>),
    Poll(readiness::Readiness<poll::Poll>),
}

macro_rules! each {
    ($self:ident, $d:ident => $e:expr) => {
        match $self {
            #[cfg(target_os = "linux")]
            Driver::Uring($d) => $e,
            #[cfg(target_os = "linux")]
            Driver::Epoll($d) => $e,
            Driver::Poll($d) => $e,
        }
    };
}

impl Driver {
    /// Builds the driver for `backend` with room for `depth` queued writes
    /// (io_uring registers `pool`'s buffers, and a table of `files` file
    /// slots, `None`: the default size; off Linux only poll exists, which
    /// needs neither).
    #[cfg_attr(not(target_os = "linux"), allow(unused_variables))]
    pub(crate) fn new(
        backend: Backend,
        depth: u32,
        pool: Option<&crate::fixed::FixedBufPool>,
        files: Option<u32>,
    ) -> io::Result<Driver> {
        match backend {
            #[cfg(target_os = "linux")]
            Backend::Uring => Ok(Driver::Uring(Box::new(uring::UringDriver::new(
                depth, pool, files,
            )?))),
            #[cfg(target_os = "linux")]
            Backend::Epoll => Ok(Driver::Epoll(readiness::Readiness::new(
                epoll::Epoll::new()?
            ))),
            Backend::Poll => Ok(Driver::Poll(readiness::Readiness::new(
                poll::Poll::with_signal()?,
            ))),
            #[cfg(not(target_os = "linux"))]
            b => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("the {b} backend exists only on Linux"),
            )),
        }
    }

    /// The fd an event loop polls for readability (see the `AsFd` impl of
    /// `Mover`): io_uring's ring fd, the epoll fd, or poll's signal
    /// eventfd. `None` only for the inert driver.
    pub(crate) fn pollable_fd(&self) -> Option<BorrowedFd<'_>> {
        each!(self, d => d.pollable_fd())
    }

    /// Collects, without blocking, whatever made `pollable_fd` readable
    /// (io_uring: posted completions and deferred task work; epoll: its
    /// ready list, unarmed entries included, so it stops polling readable).
    pub(crate) fn poll_ready(&mut self, events: &mut Vec<Event>) -> io::Result<()> {
        each!(self, d => d.poll_ready(events))
    }

    /// A driver that owns nothing, to stand in for one being leaked.
    pub(crate) fn inert() -> Driver {
        Driver::Poll(readiness::Readiness::new(poll::Poll::new()))
    }

    /// Starts watching `fd` (readiness backends register it once; io_uring
    /// puts it in its registered file table where there is room).
    pub(crate) fn register(&mut self, token: Token, fd: RawFd, kind: FdKind) -> io::Result<()> {
        each!(self, d => d.register(token, fd, kind))
    }

    /// Stops watching `fd` (io_uring: takes it out of the file table).
    /// Its write must not be in flight.
    pub(crate) fn deregister(&mut self, token: Token, fd: RawFd) {
        each!(self, d => d.deregister(token, fd))
    }

    /// Starts `ops`, one ordered chain of writes on `fd`, all or none: on
    /// error nothing was started. io_uring queues an SQE each, linked
    /// (`IOSQE_IO_LINK`) so each begins only once the one before it
    /// succeeded, all in one submission (made by `submit` or `wait`);
    /// readiness backends (whose chains are one write) try the syscall now
    /// and report `Done` into `events`, or arm writability on `EAGAIN`.
    ///
    /// A zero-copy write (`op.zero_copy`, io_uring) takes `op.hold`,
    /// clones of the `Bytes` its iovecs point at, and keeps them until its
    /// notification; other writes leave it.
    ///
    /// # Safety
    /// Every op must stay at its address, unmodified, with the memory its
    /// iovecs point at alive, until `Event::Done` for it is reported (the
    /// [`WriteOp`] invariant); a zero-copy op's `hold` must cover every
    /// buffer its iovecs point at.
    pub(crate) unsafe fn start(
        &mut self,
        token: Token,
        fd: RawFd,
        kind: FdKind,
        ops: &mut [Box<WriteOp>],
        events: &mut Vec<Event>,
    ) -> io::Result<()> {
        // SAFETY: forwarded contract.
        each!(self, d => unsafe { d.start(token, fd, kind, ops, events) })
    }

    /// How many of `want` writes (`want` queued datagrams, or 1 for a
    /// stream) may start now as one chain, each owing `cost` completions
    /// (2 for a zero-copy send: the send and its notification), while
    /// `waiting` connections (this one included) are in line for the same
    /// room. 0: none until completions are reaped (io_uring keeps what it
    /// owes within its completion queue). io_uring chains a socket's
    /// datagrams up to its share of the 128 sends it keeps in flight (at
    /// least 1, at most the SQ ring), so a flush sends a burst in one
    /// `io_uring_enter`, in order; readiness backends finish each write
    /// inline anyway and answer 1. Completions reaped to make room go to
    /// `events`.
    pub(crate) fn room(
        &mut self,
        want: usize,
        cost: usize,
        waiting: usize,
        events: &mut Vec<Event>,
    ) -> usize {
        each!(self, d => d.room(want, cost, waiting, events))
    }

    /// Zero-copy sends whose notification has not arrived.
    pub(crate) fn notifs_pending(&self) -> usize {
        match self {
            #[cfg(target_os = "linux")]
            Driver::Uring(d) => d.notifs_pending(),
            _ => 0,
        }
    }

    /// Takes completions already posted, without a syscall (io_uring:
    /// writes the kernel finished inline at submission). Readiness
    /// backends report writes as they make them: nothing to take.
    pub(crate) fn reap_posted(&mut self, events: &mut Vec<Event>) {
        #[cfg(target_os = "linux")]
        if let Driver::Uring(d) = self {
            d.reap_posted(events);
        }
        #[cfg(not(target_os = "linux"))]
        let _ = events;
    }

    /// Hands queued work to the kernel (one `io_uring_enter`).
    pub(crate) fn submit(&mut self) -> io::Result<()> {
        each!(self, d => d.submit())
    }

    /// Submits, then blocks until at least one event or the timeout.
    /// (io_uring: until `min` completions, capped at what is in flight.)
    pub(crate) fn wait(
        &mut self,
        min: usize,
        timeout: Option<Duration>,
        events: &mut Vec<Event>,
    ) -> io::Result<()> {
        each!(self, d => d.wait(min, timeout, events))
    }

    /// Asks the kernel to cancel the in-flight write for `token`; its `Done`
    /// still arrives (with `ECANCELED` or what it wrote).
    pub(crate) fn cancel(&mut self, token: Token) -> io::Result<()> {
        each!(self, d => d.cancel(token))
    }

    pub(crate) fn stats(&self) -> DriverStats {
        each!(self, d => d.stats())
    }

    /// See [`RegisteredFiles`]: `Off` on readiness backends.
    pub(crate) fn registered_files(&self) -> RegisteredFiles {
        match self {
            #[cfg(target_os = "linux")]
            Driver::Uring(d) => d.registered_files(),
            _ => RegisteredFiles::Off,
        }
    }
}

/// The token of the wake fd: never a connection's (a connection's slot is
/// below `u32::MAX`), and never an io_uring `user_data` the leaf uses.
pub(crate) const WAKE_TOKEN: Token = u64::MAX - 1;

impl Driver {
    /// Watches `fd` (an eventfd or a pipe's read end, which the engine
    /// keeps open) for readability, reporting `Event::Woken` whenever it is
    /// signalled; and makes `wait` sleep for it even when no write is in
    /// flight. Called once per engine.
    pub(crate) fn watch_wake(&mut self, fd: RawFd) -> io::Result<()> {
        each!(self, d => d.watch_wake(fd))
    }
}
