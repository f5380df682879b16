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
use std::time::{Duration, Instant};

#[cfg(target_os = "linux")]
use super::direct::{self, Buf, WriteReq, REGISTERED};
use super::pump::{pump, Mover, Pump};
#[cfg(target_os = "linux")]
use super::uring::RingSelector;
use super::{next_timeout, Accepted, Conn, Event, Failure, Listen, PipeReport, RecvOptions};
use crate::backend::OpFallback;
use crate::wake::Waker;

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

    /// `O_DIRECT` writes completed (ring only), with their results.
    #[cfg(target_os = "linux")]
    fn take_written(&mut self) -> Vec<(WriteReq, i32)> {
        match self {
            Selector::Ring(r) => r.take_written(),
            _ => Vec::new(),
        }
    }

    #[cfg(target_os = "linux")]
    fn writes_in_flight(&self) -> usize {
        match self {
            Selector::Ring(r) => r.writes_in_flight(),
            _ => 0,
        }
    }
}

#[derive(Debug)]
struct Slot {
    conn: Conn,
    socket: OwnedFd,
    /// The connection is over, with this result, and waits for its
    /// `O_DIRECT` writes in flight before it is reported.
    ending: Option<Result<(), Failure>>,
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
    /// after an accept failure, nor while it is held).
    listening: bool,
    /// The caller takes connections ([`super::Receiver::set_accepting`]);
    /// while not, the listener stays out of the selector and is not
    /// accepted from, so connections wait in its backlog.
    accepting: bool,
    /// Connections whose turn ended with bytes possibly left.
    again: Vec<u64>,
    /// Watched once a [`super::Waker`] was asked for.
    waker: Option<Waker>,
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
            accepting: true,
            again: Vec::new(),
            waker: None,
        }
    }

    /// Readiness from an io_uring ring, `splice(2)` through pooled pipes.
    #[cfg(target_os = "linux")]
    pub(crate) fn uring(options: RecvOptions) -> io::Result<ReadinessEngine> {
        let mut ring = RingSelector::new()?;
        let mut mover = Mover::splice(options.pipe_size);
        if options.direct {
            // Full buffers are written by the ring while the connection
            // fills the next; the first few buffers are registered.
            mover.direct.async_writes = true;
            let mut bufs: Vec<Buf> = (0..REGISTERED).map(|_| Buf::new()).collect();
            mover.direct.registered = ring.register(&mut bufs);
            bufs.truncate(mover.direct.registered);
            mover.direct.free = bufs;
        }
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

    /// Rests the listener as after a failed accept (tests of a listener
    /// held while it rests).
    #[cfg(test)]
    pub(crate) fn pretend_accept_failed(&mut self, events: &mut Vec<Event>) {
        if let Some(l) = &mut self.listen {
            let e = io::Error::from_raw_os_error(libc::EMFILE);
            l.pause(e, events, Instant::now());
            if self.listening {
                let _ = self.selector.remove(l.listener.as_fd(), LISTENER);
                self.listening = false;
            }
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

    /// The pipe capacity to ask for (see [`super::pipe::PipePool::new`]).
    #[cfg(target_os = "linux")]
    pub(crate) fn pipe_size(&self) -> usize {
        super::pipe::PipePool::new(self.options.pipe_size)
            .report()
            .wanted
    }

    pub(crate) fn direct(&self) -> bool {
        self.options.direct
    }

    pub(crate) fn direct_refused(&mut self) {
        #[cfg(target_os = "linux")]
        {
            self.mover.direct.refused += 1;
        }
    }

    pub(crate) fn direct_report(&self) -> super::DirectReport {
        #[cfg(target_os = "linux")]
        return super::DirectReport {
            refused: self.mover.direct.refused,
            registered: self.mover.direct.registered,
        };
        #[cfg(not(target_os = "linux"))]
        super::DirectReport::default()
    }

    pub(crate) fn listen(&mut self, listen: Listen) -> io::Result<()> {
        self.stop_listening();
        // A held listener is watched only once accepting is on again.
        if self.accepting {
            self.selector.add(listen.listener.as_fd(), LISTENER)?;
            self.listening = true;
        }
        self.listen = Some(listen);
        Ok(())
    }

    /// Holds the listener (`on == false`) or lets it accept again.
    ///
    /// Held, it leaves the selector: a level-triggered listener with
    /// connections in its backlog would otherwise end every wait at once.
    /// Let go, the next wait tries an accept at once (unless the listener
    /// still rests after a failure) and watches it again once drained, as
    /// after a rest; a failure to watch it is reported there, as
    /// [`Event::AcceptFailed`].
    pub(crate) fn set_accepting(&mut self, on: bool) {
        if self.accepting == on {
            return;
        }
        self.accepting = on;
        let Some(l) = &mut self.listen else {
            return;
        };
        if on {
            if !self.listening && l.paused_until.is_none() {
                l.paused_until = Some(Instant::now());
            }
        } else if self.listening {
            // Best effort, as when it rests: the fd stays open either way.
            let _ = self.selector.remove(l.listener.as_fd(), LISTENER);
            self.listening = false;
        }
    }

    /// A listener is open and not held.
    pub(crate) fn is_accepting(&self) -> bool {
        self.listen.is_some() && self.accepting
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
    pub(crate) fn waker(&mut self) -> io::Result<Waker> {
        if let Some(w) = &self.waker {
            return Ok(w.clone());
        }
        let w = Waker::new()?;
        self.selector.add(w.as_fd(), WAKE)?;
        self.waker = Some(w.clone());
        Ok(w)
    }

    pub(crate) fn is_listening(&self) -> bool {
        self.listen.is_some()
    }

    pub(crate) fn attach(&mut self, conn: Conn, socket: OwnedFd) -> io::Result<()> {
        self.selector.add(socket.as_fd(), conn.id.0)?;
        self.slots.insert(
            conn.id.0,
            Slot {
                conn,
                socket,
                ending: None,
            },
        );
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
            // A held listener has no rest to end: it must not shorten the
            // wait (a rest that ended while held would make it spin).
            let resume = self.resume_at();
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
        #[cfg(target_os = "linux")]
        for (req, res) in self.selector.take_written() {
            self.written(req, res, events);
        }
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
                    w.reset();
                    // Only a one-shot poll (a ring without multishot)
                    // needs arming again; a failure shows as no wake-ups.
                    let _ = self.selector.rearm(WAKE);
                }
            } else {
                self.service(token, events);
            }
        }
        if self.resume_at().is_some_and(|t| t <= Instant::now()) {
            self.accept(events);
        }
        self.expire_idle(events);
        Ok(())
    }

    /// When a resting listener tries again; never while it is held.
    fn resume_at(&self) -> Option<Instant> {
        self.listen
            .as_ref()
            .filter(|_| self.accepting)
            .and_then(|l| l.paused_until)
    }

    /// Accepts what is waiting; rests the listener after a failure and
    /// watches it again once an attempt drains it.
    fn accept(&mut self, events: &mut Vec<Event>) {
        let Some(l) = &mut self.listen else {
            return;
        };
        if !self.accepting {
            // A readiness reported before it was held.
            return;
        }
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
        let Some(slot) = self.slots.get_mut(&token).filter(|s| s.ending.is_none()) else {
            return;
        };
        let pumped = pump(
            &mut slot.conn,
            &slot.socket,
            &mut self.mover,
            self.options.max_bytes,
        );
        #[cfg(target_os = "linux")]
        self.queue_writes(events);
        match pumped {
            // Pumped again when one of its writes completes.
            Pump::Stalled => {}
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

    /// Ends connection `token` and reports it, once its `O_DIRECT`
    /// writes in flight (if any) have completed.
    fn finish(&mut self, token: u64, result: Result<(), Failure>, events: &mut Vec<Event>) {
        let Some(slot) = self.slots.get_mut(&token) else {
            return;
        };
        if slot.ending.is_none() {
            // Best effort: the socket closes soon either way.
            let _ = self.selector.remove(slot.socket.as_fd(), token);
            slot.ending = Some(result);
        }
        self.settle(token, events);
    }

    /// Reports an ended connection whose writes are all done: what its
    /// `O_DIRECT` buffer holds is written first.
    fn settle(&mut self, token: u64, events: &mut Vec<Event>) {
        #[cfg(target_os = "linux")]
        if self
            .slots
            .get(&token)
            .and_then(|s| s.conn.direct.as_ref())
            .is_some_and(|d| d.in_flight > 0)
        {
            return;
        }
        let Some(mut slot) = self.slots.remove(&token) else {
            return;
        };
        let result = slot.ending.take().unwrap_or(Ok(()));
        #[cfg(target_os = "linux")]
        let result = self.settle_direct(&mut slot.conn, result);
        events.push(Event::Finished(slot.conn.finish(result)));
    }

    /// Writes what a finished connection's `O_DIRECT` buffer holds; after
    /// a failed write, cuts the file where the failure was (so it holds
    /// exactly the bytes counted) and makes that the result.
    #[cfg(target_os = "linux")]
    fn settle_direct(
        &mut self,
        conn: &mut Conn,
        result: Result<(), Failure>,
    ) -> Result<(), Failure> {
        let Some(dc) = conn.direct.as_mut() else {
            return result;
        };
        if dc.failed.is_none() {
            let base = dc.base;
            if let Err((w, e)) = direct::flush_tail(&conn.file, dc) {
                dc.fail(base + w as u64, e);
            }
        }
        if let Some(buf) = dc.buf.take() {
            self.mover.direct.free.push(buf);
        }
        let Some((at, e)) = dc.failed.take() else {
            return result;
        };
        let _ = conn.file.set_len(at);
        conn.written = at;
        // The first write error, whatever ended the connection meanwhile.
        drop(result);
        Err(Failure::Write(e))
    }

    /// Queues the full `O_DIRECT` buffers on the ring.
    #[cfg(target_os = "linux")]
    fn queue_writes(&mut self, events: &mut Vec<Event>) {
        for req in std::mem::take(&mut self.mover.direct.pending) {
            let Some(slot) = self.slots.get(&req.token) else {
                self.mover.direct.free.push(req.buf);
                continue;
            };
            let fd = std::os::fd::AsRawFd::as_raw_fd(&slot.conn.file);
            let queued = match &mut self.selector {
                Selector::Ring(r) => r.write(fd, req),
                _ => Err((req, io::Error::other("no ring to write with"))),
            };
            if let Err((req, e)) = queued {
                // Completed at once, as a failed write.
                self.written(req, -e.raw_os_error().unwrap_or(libc::EIO), events);
            }
        }
    }

    /// An `O_DIRECT` write completed with `res`: a short one is finished
    /// synchronously, an alignment refusal (`EINVAL`) is written through
    /// the page cache, any other error fails the connection.
    #[cfg(target_os = "linux")]
    fn written(&mut self, req: WriteReq, res: i32, events: &mut Vec<Event>) {
        let token = req.token;
        self.mover.direct.in_flight = self.mover.direct.in_flight.saturating_sub(1);
        // A buffer is free again: whoever waited for one tries again.
        let stalled = std::mem::take(&mut self.mover.direct.stalled);
        self.again.extend(stalled);
        let Some(slot) = self.slots.get_mut(&token) else {
            self.mover.direct.free.push(req.buf);
            return;
        };
        let conn = &mut slot.conn;
        let Some(dc) = conn.direct.as_mut() else {
            self.mover.direct.free.push(req.buf);
            return;
        };
        dc.in_flight = dc.in_flight.saturating_sub(1);
        let from = if res >= 0 {
            req.done + res as usize
        } else {
            req.done
        };
        let at = req.at + from as u64;
        if res < 0 && -res != libc::EINVAL {
            dc.fail(at, io::Error::from_raw_os_error(-res));
        } else if from < req.len {
            let rest = &req.buf.bytes()[from..req.len];
            if let Err((w, e)) = direct::write_all(&conn.file, &mut dc.cleared, rest, at) {
                dc.fail(at + w as u64, e);
            }
        }
        let failed = dc.failed.is_some();
        self.mover.direct.free.push(req.buf);
        if slot.ending.is_some() {
            self.settle(token, events);
        } else if failed {
            let e = io::Error::other("an O_DIRECT write failed");
            self.finish(token, Err(Failure::Write(e)), events);
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
            s.ending.is_none()
                && s.conn
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

impl Drop for ReadinessEngine {
    /// Nothing received is lost when a receiver is dropped with
    /// connections live (`ringmover recv` on SIGINT): `O_DIRECT` writes in
    /// flight complete (at most 30 s) and what the buffers hold is written.
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        {
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut events = Vec::new();
            while self.selector.writes_in_flight() > 0 && Instant::now() < deadline {
                let mut ready = Vec::new();
                let wait = Some(Duration::from_millis(100));
                if self
                    .selector
                    .wait(wait, std::iter::empty(), &mut ready)
                    .is_err()
                {
                    break;
                }
                for (req, res) in self.selector.take_written() {
                    self.written(req, res, &mut events);
                }
            }
            let tokens: Vec<u64> = self.slots.keys().copied().collect();
            for token in tokens {
                if let Some(mut slot) = self.slots.remove(&token) {
                    match slot.conn.direct.as_mut() {
                        Some(d) if d.in_flight == 0 => {
                            let result = slot.ending.take().unwrap_or(Ok(()));
                            drop(self.settle_direct(&mut slot.conn, result));
                        }
                        // Writes still in flight (a stuck disk): its
                        // buffer goes back to the pool, freed after the
                        // ring like every registered buffer.
                        Some(d) => self.mover.direct.free.extend(d.buf.take()),
                        None => {}
                    }
                }
            }
        }
    }
}
