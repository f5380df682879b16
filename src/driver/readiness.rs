//! The readiness backends' shared half: try the non-blocking syscall now,
//! and on `EAGAIN` ask the selector (epoll or poll) to say when to retry.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{BorrowedFd, RawFd};
use std::time::Duration;

use super::{DriverStats, Event, Token, WriteOp, SEND_FLAGS, WAKE_TOKEN};
use crate::sys::net::{self, FdKind};

/// What epoll and poll each provide.
pub(crate) trait Selector {
    /// Starts watching `fd` for writability; `Ok(false)` when the fd cannot
    /// be watched (a regular file: always ready).
    fn register(&mut self, token: Token, fd: RawFd) -> io::Result<bool>;
    /// Stops watching `fd`.
    fn deregister(&mut self, token: Token, fd: RawFd);
    /// The write for `token` hit `EAGAIN`: report `token` once writable.
    fn arm(&mut self, token: Token, fd: RawFd);
    /// Forget an armed `token`.
    fn disarm(&mut self, token: Token);
    /// Whether any token is armed.
    fn armed(&self) -> bool;
    /// Blocks until an armed token is writable (or the timeout), pushing
    /// those tokens to `ready` and disarming them. Returns syscalls made.
    fn select(&mut self, timeout: Option<Duration>, ready: &mut Vec<Token>) -> io::Result<u64>;
    /// Watches `fd` for readability from now on, reporting it as
    /// `WAKE_TOKEN` from every `select` while it is readable; `armed()`
    /// is true from then on, so `wait` sleeps for it.
    fn watch_wake(&mut self, fd: RawFd) -> io::Result<()>;
    /// The fd that polls readable when `select` has something to report
    /// (see `Driver::pollable_fd`).
    fn pollable_fd(&self) -> Option<BorrowedFd<'_>>;
}

/// A readiness driver over selector `S`.
#[derive(Debug)]
pub(crate) struct Readiness<S> {
    selector: S,
    stats: DriverStats,
    /// Events produced outside `wait` (cancellations), reported by it.
    pending: Vec<Event>,
    ready: Vec<Token>,
}

impl<S: Selector> Readiness<S> {
    pub(crate) fn new(selector: S) -> Self {
        Readiness {
            selector,
            stats: DriverStats::default(),
            pending: Vec::new(),
            ready: Vec::new(),
        }
    }

    pub(crate) fn register(&mut self, token: Token, fd: RawFd, kind: FdKind) -> io::Result<()> {
        if kind == FdKind::Other {
            // A blocking pipe or tty would hold every connection inside one
            // writev: make it non-blocking. (Sockets need not be: each
            // sendmsg passes MSG_DONTWAIT; regular files never block.)
            self.stats.syscalls += 1;
            net::set_nonblocking(fd)?;
        }
        if kind != FdKind::File {
            self.stats.syscalls += 1;
            self.selector.register(token, fd)?;
        }
        Ok(())
    }

    pub(crate) fn deregister(&mut self, token: Token, fd: RawFd) {
        self.selector.disarm(token);
        self.selector.deregister(token, fd);
    }

    /// # Safety
    /// `ops`' iovecs point at memory valid for the duration of this call.
    pub(crate) unsafe fn start(
        &mut self,
        token: Token,
        fd: RawFd,
        kind: FdKind,
        ops: &mut [Box<WriteOp>],
        events: &mut Vec<Event>,
    ) -> io::Result<()> {
        // `room` answers 1: a chain here is one write.
        let [op] = ops else {
            return Err(io::Error::other(
                "readiness backends start one write at a time",
            ));
        };
        // Readiness backends always copy: the syscall is done when it returns.
        self.stats.syscalls += 1;
        let res = if kind.is_socket() {
            // SAFETY: the msghdr and its iovecs/name live in `op`, whose
            // memory the caller guarantees for this call.
            unsafe { net::sendmsg(fd, op.msghdr(), SEND_FLAGS | libc::MSG_DONTWAIT) }
        } else {
            // SAFETY: as above, for the iovecs alone.
            unsafe { net::writev(fd, op.iovecs()) }
        };
        match res {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.selector.arm(token, fd),
            res => events.push(Event::Done { token, res }),
        }
        Ok(())
    }

    /// Each write finishes inline, so there is nothing to chain: one at a
    /// time, and never more in flight than connections.
    pub(crate) fn room(
        &mut self,
        _want: usize,
        _cost: usize,
        _waiting: usize,
        _events: &mut Vec<Event>,
    ) -> usize {
        1
    }

    pub(crate) fn submit(&mut self) -> io::Result<()> {
        Ok(())
    }

    pub(crate) fn wait(
        &mut self,
        _min: usize,
        timeout: Option<Duration>,
        events: &mut Vec<Event>,
    ) -> io::Result<()> {
        if !self.pending.is_empty() {
            events.append(&mut self.pending);
            return Ok(());
        }
        if !self.selector.armed() {
            return Ok(());
        }
        self.ready.clear();
        self.stats.syscalls += self.selector.select(timeout, &mut self.ready)?;
        events.extend(self.ready.drain(..).map(|token| match token {
            WAKE_TOKEN => Event::Woken,
            token => Event::Writable { token },
        }));
        Ok(())
    }

    /// See `Driver::pollable_fd`.
    pub(crate) fn pollable_fd(&self) -> Option<BorrowedFd<'_>> {
        self.selector.pollable_fd()
    }

    /// See `Driver::poll_ready`: one `select` that does not block, even
    /// with nothing armed (epoll's ready list holds edges of unarmed fds
    /// too, and its fd polls readable until they are collected).
    pub(crate) fn poll_ready(&mut self, events: &mut Vec<Event>) -> io::Result<()> {
        events.append(&mut self.pending);
        self.ready.clear();
        self.stats.syscalls += self
            .selector
            .select(Some(Duration::ZERO), &mut self.ready)?;
        events.extend(self.ready.drain(..).map(|token| match token {
            WAKE_TOKEN => Event::Woken,
            token => Event::Writable { token },
        }));
        Ok(())
    }

    pub(crate) fn cancel(&mut self, token: Token) -> io::Result<()> {
        self.selector.disarm(token);
        self.pending.push(Event::Done {
            token,
            res: Err(io::Error::from_raw_os_error(libc::ECANCELED)),
        });
        Ok(())
    }

    pub(crate) fn stats(&self) -> DriverStats {
        self.stats
    }
}

impl<S: Selector> Readiness<S> {
    /// See `Driver::watch_wake`.
    pub(crate) fn watch_wake(&mut self, fd: RawFd) -> io::Result<()> {
        self.stats.syscalls += 1;
        self.selector.watch_wake(fd)
    }
}
