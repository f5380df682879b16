//! The receive engine: a selector says which sockets are readable, then
//! [`pump`] moves what is there with non-blocking syscalls in this thread.
//!
//! Three selectors: epoll(7) (level-triggered), poll(2), and an io_uring
//! ring ([`RingSelector`]: `IORING_OP_POLL_ADD`, multishot where the kernel
//! has it, which is edge-triggered). The engine works with either kind: a
//! connection whose turn ended with bytes possibly left is pumped again
//! at the next wait without waiting for readiness, and a connection is
//! re-armed only after it was drained (`EAGAIN`).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::pump::{pump, Mover, Pump};
#[cfg(target_os = "linux")]
use super::uring::RingSelector;
use super::wake::WakeFd;
use super::{next_timeout, Accepted, Conn, Event, Failure, Listen, PipeReport, RecvOptions};
use crate::backend::OpFallback;

/// Token of the listener.
const LISTENER: u64 = u64::MAX;
/// Token of the waker's fd.
const WAKE: u64 = u64::MAX - 1;

/// Which readiness mechanism the engine waits on.
#[derive(Debug)]
enum Selector {
    #[cfg(target_os = "linux")]
    Epoll(nix::sys::epoll::Epoll),
    /// poll(2) keeps no registry: every wait passes the interest set.
    Poll,
    #[cfg(target_os = "linux")]
    Ring(Box<RingSelector>),
}

impl Selector {
    /// Starts watching `fd` for readability under `token`.
    fn add(&mut self, fd: BorrowedFd<'_>, token: u64) -> io::Result<()> {
        match self {
            #[cfg(target_os = "linux")]
            Selector::Epoll(ep) => {
                use nix::sys::epoll::{EpollEvent, EpollFlags};
                ep.add(fd, EpollEvent::new(EpollFlags::EPOLLIN, token))
                    .map_err(io::Error::from)
            }
            Selector::Poll => {
                let _ = (fd, token);
                Ok(())
            }
            #[cfg(target_os = "linux")]
            Selector::Ring(r) => r.add(fd, token),
        }
    }

    /// Stops watching `fd`. Call before `fd` is closed.
    fn remove(&mut self, fd: BorrowedFd<'_>, token: u64) -> io::Result<()> {
        match self {
            #[cfg(target_os = "linux")]
            Selector::Epoll(ep) => ep.delete(fd).map_err(io::Error::from),
            Selector::Poll => {
                let _ = (fd, token);
                Ok(())
            }
            #[cfg(target_os = "linux")]
            Selector::Ring(r) => {
                let _ = fd;
                r.remove(token)
            }
        }
    }

    /// `token` was drained: report it again when it becomes readable (a
    /// no-op for level-triggered selectors and live multishot polls).
    fn rearm(&mut self, token: u64) -> io::Result<()> {
        match self {
            #[cfg(target_os = "linux")]
            Selector::Ring(r) => r.rearm(token),
            _ => {
                let _ = token;
                Ok(())
            }
        }
    }

    /// Waits up to `timeout` and appends the tokens ready to `ready`;
    /// nothing on `EINTR`. `interest`: what poll(2) watches.
    fn wait<'a>(
        &mut self,
        timeout: Option<Duration>,
        interest: impl Iterator<Item = (u64, BorrowedFd<'a>)>,
        ready: &mut Vec<u64>,
    ) -> io::Result<()> {
        use nix::poll::PollTimeout;
        let ms = |d: Duration| {
            // Round up: a 0.4 ms deadline must not become a busy 0 ms wait.
            let ms = d.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128 / 2) as i32;
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
        };
        match self {
            #[cfg(target_os = "linux")]
            Selector::Epoll(ep) => {
                use nix::sys::epoll::EpollEvent;
                let _ = interest;
                let mut buf = [EpollEvent::empty(); 256];
                match ep.wait(&mut buf, timeout.map_or(PollTimeout::NONE, ms)) {
                    Ok(n) => ready.extend(buf[..n].iter().map(|e| e.data())),
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Selector::Poll => {
                use nix::poll::{PollFd, PollFlags};
                let (tokens, mut fds): (Vec<u64>, Vec<PollFd<'_>>) = interest
                    .map(|(t, fd)| (t, PollFd::new(fd, PollFlags::POLLIN)))
                    .unzip();
                match nix::poll::poll(&mut fds, timeout.map_or(PollTimeout::NONE, ms)) {
                    Ok(_) => ready.extend(
                        fds.iter()
                            .zip(tokens)
                            .filter(|(fd, _)| fd.revents().is_some_and(|r| !r.is_empty()))
                            .map(|(_, t)| t),
                    ),
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            #[cfg(target_os = "linux")]
            Selector::Ring(r) => {
                let _ = interest;
                r.wait(timeout, ready)?;
            }
        }
        Ok(())
    }

    /// Polls that failed (ring only), with the error, since the last call.
    fn take_failed(&mut self) -> Vec<(u64, io::Error)> {
        match self {
            #[cfg(target_os = "linux")]
            Selector::Ring(r) => r.take_failed(),
            _ => Vec::new(),
        }
    }

    fn fallbacks(&self) -> Vec<OpFallback> {
        match self {
            #[cfg(target_os = "linux")]
            Selector::Ring(r) => r.fallbacks(),
            _ => Vec::new(),
        }
    }
}

#[derive(Debug)]
struct Slot {
    conn: Conn,
    socket: OwnedFd,
}

/// The receive engine of every backend: one selector, one way to move bytes.
#[derive(Debug)]
pub(crate) struct ReadinessEngine {
    selector: Selector,
    mover: Mover,
    options: RecvOptions,
    slots: HashMap<u64, Slot>,
    listen: Option<Listen>,
    /// The listener is registered with the selector (not while it rests
    /// after an accept failure).
    listening: bool,
    /// Connections whose turn ended with bytes possibly left.
    again: Vec<u64>,
    /// Watched once a [`super::Waker`] was asked for.
    waker: Option<Arc<WakeFd>>,
}

impl ReadinessEngine {
    fn new(selector: Selector, mover: Mover, options: RecvOptions) -> ReadinessEngine {
        ReadinessEngine {
            selector,
            mover,
            options,
            slots: HashMap::new(),
            listen: None,
            listening: false,
            again: Vec::new(),
            waker: None,
        }
    }

    /// Readiness from an io_uring ring, `splice(2)` through pooled pipes.
    #[cfg(target_os = "linux")]
    pub(crate) fn uring(options: RecvOptions) -> io::Result<ReadinessEngine> {
        let ring = RingSelector::new()?;
        let mover = Mover::splice(options.pipe_size);
        Ok(Self::new(Selector::Ring(Box::new(ring)), mover, options))
    }

    /// epoll(7) readiness, `splice(2)` through pooled pipes.
    #[cfg(target_os = "linux")]
    pub(crate) fn epoll(options: RecvOptions) -> io::Result<ReadinessEngine> {
        use nix::sys::epoll::{Epoll, EpollCreateFlags};
        let ep = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io::Error::from)?;
        let mover = Mover::splice(options.pipe_size);
        Ok(Self::new(Selector::Epoll(ep), mover, options))
    }

    /// poll(2) readiness, `read(2)`/`pwrite(2)` through a 64 KiB buffer.
    pub(crate) fn poll(options: RecvOptions) -> ReadinessEngine {
        Self::new(Selector::Poll, Mover::copy(), options)
    }

    /// Behaves as on a ring without multishot poll (tests of the fallback
    /// on kernels that have it).
    #[cfg(all(test, target_os = "linux"))]
    pub(crate) fn pretend_no_multishot(&mut self) {
        if let Selector::Ring(r) = &mut self.selector {
            r.pretend_no_multishot();
        }
    }

    pub(crate) fn fallbacks(&self) -> Vec<OpFallback> {
        self.selector.fallbacks()
    }

    pub(crate) fn pipes(&self) -> PipeReport {
        self.mover.report()
    }

    pub(crate) fn raw(&self) -> bool {
        self.options.raw
    }

    pub(crate) fn listen(&mut self, listen: Listen) -> io::Result<()> {
        self.stop_listening();
        self.selector.add(listen.listener.as_fd(), LISTENER)?;
        self.listening = true;
        self.listen = Some(listen);
        Ok(())
    }

    fn stop_listening(&mut self) {
        if let Some(l) = self.listen.take() {
            if self.listening {
                let _ = self.selector.remove(l.listener.as_fd(), LISTENER);
            }
        }
        self.listening = false;
    }

    /// The fd that wakes `wait` from other threads, watched from now on.
    pub(crate) fn waker(&mut self) -> io::Result<Arc<WakeFd>> {
        if let Some(w) = &self.waker {
            return Ok(w.clone());
        }
        let w = Arc::new(WakeFd::new()?);
        self.selector.add(w.as_fd(), WAKE)?;
        self.waker = Some(w.clone());
        Ok(w)
    }

    pub(crate) fn is_listening(&self) -> bool {
        self.listen.is_some()
    }

    pub(crate) fn attach(&mut self, conn: Conn, socket: OwnedFd) -> io::Result<()> {
        self.selector.add(socket.as_fd(), conn.id.0)?;
        self.slots.insert(conn.id.0, Slot { conn, socket });
        Ok(())
    }

    pub(crate) fn active(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn conns(&self) -> impl Iterator<Item = &Conn> {
        self.slots.values().map(|s| &s.conn)
    }

    pub(crate) fn wait(
        &mut self,
        timeout: Option<Duration>,
        events: &mut Vec<Event>,
    ) -> io::Result<()> {
        let now = Instant::now();
        let idle = self.options.idle_timeout;
        let timeout = if self.again.is_empty() {
            let deadlines = self
                .slots
                .values()
                .filter_map(|s| s.conn.idle_deadline(idle));
            let resume = self.listen.as_ref().and_then(|l| l.paused_until);
            next_timeout(timeout, deadlines.chain(resume), now)
        } else {
            Some(Duration::ZERO)
        };
        let mut ready = std::mem::take(&mut self.again);
        let listener = self
            .listen
            .as_ref()
            .filter(|_| self.listening)
            .map(|l| (LISTENER, l.listener.as_fd()));
        let wake = self.waker.as_ref().map(|w| (WAKE, w.as_fd()));
        let interest = listener
            .into_iter()
            .chain(wake)
            .chain(self.slots.iter().map(|(&t, s)| (t, s.socket.as_fd())));
        self.selector.wait(timeout, interest, &mut ready)?;
        for (token, e) in self.selector.take_failed() {
            if token == LISTENER {
                if let Some(l) = &mut self.listen {
                    l.pause(e, events, Instant::now());
                    self.listening = false;
                }
            } else {
                self.finish(token, Err(Failure::Read(e)), events);
            }
        }
        ready.sort_unstable();
        ready.dedup();
        for token in ready {
            if token == LISTENER {
                self.accept(events);
            } else if token == WAKE {
                if let Some(w) = &self.waker {
                    w.drain();
                    // Only a one-shot poll (a ring without multishot)
                    // needs arming again; a failure shows as no wake-ups.
                    let _ = self.selector.rearm(WAKE);
                }
            } else {
                self.service(token, events);
            }
        }
        if self
            .listen
            .as_ref()
            .and_then(|l| l.paused_until)
            .is_some_and(|t| t <= Instant::now())
        {
            self.accept(events);
        }
        self.expire_idle(events);
        Ok(())
    }

    /// Accepts what is waiting; rests the listener after a failure and
    /// watches it again once an attempt drains it.
    fn accept(&mut self, events: &mut Vec<Event>) {
        let Some(l) = &mut self.listen else {
            return;
        };
        if l.paused_until.is_some_and(|t| t > Instant::now()) {
            // A readiness reported before it rested.
            return;
        }
        match l.accept_all(events, Instant::now()) {
            Accepted::Drained if !self.listening => {
                match self.selector.add(l.listener.as_fd(), LISTENER) {
                    Ok(()) => self.listening = true,
                    Err(e) => l.pause(e, events, Instant::now()),
                }
            }
            Accepted::Drained => {}
            Accepted::Paused => {
                if self.listening {
                    let _ = self.selector.remove(l.listener.as_fd(), LISTENER);
                    self.listening = false;
                }
            }
            // Closing the listener also removes it from epoll.
            Accepted::LimitReached => self.stop_listening(),
        }
    }

    /// Pumps connection `token`.
    fn service(&mut self, token: u64, events: &mut Vec<Event>) {
        let Some(slot) = self.slots.get_mut(&token) else {
            return;
        };
        match pump(
            &mut slot.conn,
            &slot.socket,
            &mut self.mover,
            self.options.max_bytes,
        ) {
            Pump::Drained => {
                if let Err(e) = self.selector.rearm(token) {
                    // Only this connection loses its readiness.
                    self.finish(token, Err(Failure::Read(e)), events);
                }
            }
            Pump::Yielded => self.again.push(token),
            Pump::Done(result) => self.finish(token, result, events),
        }
    }

    /// Removes connection `token` and reports it.
    fn finish(&mut self, token: u64, result: Result<(), Failure>, events: &mut Vec<Event>) {
        if let Some(slot) = self.slots.remove(&token) {
            // Best effort: the socket closes right after either way.
            let _ = self.selector.remove(slot.socket.as_fd(), token);
            events.push(Event::Finished(slot.conn.finish(result)));
        }
    }

    /// Ends connections idle past the timeout. Idle means no data was
    /// available, not that the clock moved (a stopped or frozen process
    /// wakes up late with data waiting): each is pumped before it expires.
    fn expire_idle(&mut self, events: &mut Vec<Event>) {
        let Some(d) = self.options.idle_timeout else {
            return;
        };
        let due = |s: &Slot| {
            s.conn
                .idle_deadline(Some(d))
                .is_some_and(|t| t <= Instant::now())
        };
        let expired: Vec<u64> = self
            .slots
            .iter()
            .filter(|(_, s)| due(s))
            .map(|(&k, _)| k)
            .collect();
        for token in expired {
            self.service(token, events);
            if self.slots.get(&token).is_some_and(due) {
                self.finish(token, Err(Failure::IdleTimeout(d)), events);
            }
        }
    }
}
