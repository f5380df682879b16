//! io_uring as the receive engine's selector: `IORING_OP_POLL_ADD` says a
//! socket is readable, then the engine's `splice(2)` calls run inline in
//! this thread.
//!
//! Why not `IORING_OP_SPLICE`: the kernel punts every SPLICE to an io-wq
//! worker (`REQ_F_FORCE_ASYNC`, `io_uring/splice.c`), so each chunk cost
//! two thread hand-offs (socket → pipe, pipe → file) that an inline splice
//! does not pay, and on a busy machine its speed swung with the scheduler
//! (issue 11). Readiness from the ring keeps what the ring is good at here:
//! one `io_uring_enter` waits for every connection, and an idle connection
//! costs a poll entry, no thread.
//!
//! Polls are multishot (`IORING_POLL_ADD_MULTI`, Linux 5.13): one SQE per
//! connection for its whole life, a CQE (flagged `IORING_CQE_F_MORE`) each
//! time it becomes readable. That is edge-triggered, which the engine
//! handles (a connection whose turn ended early is pumped again without
//! waiting). A multishot poll the kernel ends (no `F_MORE`: CQ overflow,
//! cancellation) is armed again after the next drain. Without multishot,
//! one-shot polls are armed after each drain ([`RingSelector::fallbacks`]).
#![allow(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::OnceLock;
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::direct::{Buf, WriteReq, BUF};
use crate::backend::OpFallback;
use crate::opcode::Opcode;

/// `user_data` of POLL_REMOVEs (their results are not needed).
const REMOVE_UD: u64 = u64::MAX;
/// `user_data` of wake-up timeouts on rings without `IORING_FEAT_EXT_ARG`.
const TIMEOUT_UD: u64 = u64::MAX - 1;
/// Set in the `user_data` of `O_DIRECT` writes (polls count up from 1).
const WRITE_BIT: u64 = 1 << 62;

/// A watched fd and its poll in flight, if any.
#[derive(Debug)]
struct Watched {
    /// Kept open by the engine until [`RingSelector::remove`].
    fd: RawFd,
    /// `user_data` of the poll in flight.
    poll: Option<u64>,
}

/// Readiness from an io_uring ring.
///
/// Field order matters: `ring` is dropped first, so the kernel ends its
/// polls before anything else goes.
pub(crate) struct RingSelector {
    ring: IoUring,
    multishot: bool,
    /// By token.
    watched: HashMap<u64, Watched>,
    /// Token of each poll in flight, by `user_data`. Every arm gets a
    /// fresh `user_data`, so a late CQE of a poll removed or replaced is
    /// recognised and ignored.
    polls: HashMap<u64, u64>,
    next_ud: u64,
    /// Tokens reaped and not yet handed out.
    ready: Vec<u64>,
    /// Polls that failed, to end their connection.
    failed: Vec<(u64, io::Error)>,
    /// Timespecs of wake-up timeouts in flight (rings without EXT_ARG).
    /// Boxed: the SQE holds the address until it is submitted.
    #[allow(clippy::vec_box)]
    timeouts: VecDeque<Box<types::Timespec>>,
    /// `O_DIRECT` writes in flight, by `user_data`: each owns the buffer
    /// the kernel reads, until its CQE is reaped.
    writes: HashMap<u64, WriteReq>,
    /// Writes whose CQE was reaped, with the result.
    written: Vec<(WriteReq, i32)>,
}

impl RingSelector {
    pub(crate) fn new() -> io::Result<RingSelector> {
        // COOP_TASKRUN (5.19): completions are posted when this thread
        // enters the kernel to wait, not by interrupting it mid-splice.
        let ring = IoUring::builder()
            .setup_cqsize(4096)
            .setup_coop_taskrun()
            .build(256)
            .or_else(|_| IoUring::builder().setup_cqsize(4096).build(256))?;
        Ok(RingSelector {
            ring,
            multishot: multishot_poll(),
            watched: HashMap::new(),
            polls: HashMap::new(),
            next_ud: 1,
            ready: Vec::new(),
            failed: Vec::new(),
            timeouts: VecDeque::new(),
            writes: HashMap::new(),
            written: Vec::new(),
        })
    }

    pub(crate) fn fallbacks(&self) -> Vec<OpFallback> {
        if self.multishot {
            Vec::new()
        } else {
            vec![OpFallback {
                op: Opcode::POLL_ADD,
                instead:
                    "one-shot POLL_ADD armed again after each drain (multishot needs Linux 5.13)",
            }]
        }
    }

    #[cfg(test)]
    pub(crate) fn pretend_no_multishot(&mut self) {
        self.multishot = false;
    }

    /// Watches `fd` under `token` until [`Self::remove`].
    pub(crate) fn add(&mut self, fd: BorrowedFd<'_>, token: u64) -> io::Result<()> {
        self.watched.insert(
            token,
            Watched {
                fd: fd.as_raw_fd(),
                poll: None,
            },
        );
        let armed = self.arm(token);
        if armed.is_err() {
            self.watched.remove(&token);
        }
        armed
    }

    /// Arms a poll for `token` unless one is in flight.
    pub(crate) fn rearm(&mut self, token: u64) -> io::Result<()> {
        self.arm(token)
    }

    fn arm(&mut self, token: u64) -> io::Result<()> {
        let Some(w) = self.watched.get(&token) else {
            return Ok(());
        };
        if w.poll.is_some() {
            return Ok(());
        }
        let ud = self.next_ud;
        self.next_ud += 1;
        let entry = opcode::PollAdd::new(types::Fd(w.fd), libc::POLLIN as u32)
            .multi(self.multishot)
            .build()
            .user_data(ud);
        // SAFETY: POLL_ADD names no buffer, only the fd, which the engine
        // keeps open until `remove`, and `remove` submits what is queued
        // (this SQE included) before returning; once submitted, the kernel
        // holds its own reference to the file.
        unsafe { self.push(&entry)? };
        self.polls.insert(ud, token);
        if let Some(w) = self.watched.get_mut(&token) {
            w.poll = Some(ud);
        }
        Ok(())
    }

    /// Registers `bufs` with the ring (`IORING_REGISTER_BUFFERS`), as many
    /// as `RLIMIT_MEMLOCK` allows (halving on refusal); marks those
    /// registered with their index and returns how many.
    pub(crate) fn register(&mut self, bufs: &mut [Buf]) -> usize {
        let mut n = bufs.len();
        while n > 0 {
            let iovecs: Vec<libc::iovec> = bufs[..n]
                .iter_mut()
                .map(|b| libc::iovec {
                    iov_base: b.bytes_mut().as_mut_ptr().cast(),
                    iov_len: BUF,
                })
                .collect();
            // SAFETY: every iovec names BUF bytes of a `Buf`'s heap
            // allocation. The `Buf`s live in the receiver's pool (or in
            // `self.writes` while a WRITE_FIXED names them) and are freed
            // only after this ring is dropped (the engine drops its
            // selector first), so registered memory is never freed while
            // the kernel may use it.
            if unsafe { self.ring.submitter().register_buffers(&iovecs) }.is_ok() {
                for (i, b) in bufs[..n].iter_mut().enumerate() {
                    b.fixed = u16::try_from(i).ok();
                }
                return n;
            }
            n /= 2;
        }
        0
    }

    /// Queues an `O_DIRECT` write of `req` to `fd` (`WRITE_FIXED` from a
    /// registered buffer, else `WRITE`); the request comes back from
    /// [`Self::take_written`] with its result. On failure to queue, it
    /// comes back at once.
    pub(crate) fn write(&mut self, fd: RawFd, req: WriteReq) -> Result<(), (WriteReq, io::Error)> {
        let ud = WRITE_BIT | self.next_ud;
        self.next_ud += 1;
        let rest = &req.buf.bytes()[req.done..req.len];
        let (ptr, len, at) = (rest.as_ptr(), rest.len() as u32, req.at + req.done as u64);
        let entry = match req.buf.fixed {
            // A short write goes on from an offset inside the buffer, still
            // within the registered range.
            Some(index) => opcode::WriteFixed::new(types::Fd(fd), ptr, len, index)
                .offset(at)
                .build(),
            None => opcode::Write::new(types::Fd(fd), ptr, len)
                .offset(at)
                .build(),
        };
        let entry = entry.user_data(ud);
        // SAFETY: the buffer belongs to `req`, which is moved into
        // `self.writes` right below and stays there (not reused, not
        // freed: its heap allocation does not move with the `WriteReq`)
        // until this write's CQE is reaped; `Drop` waits for every write in
        // flight before the buffers go. The fd is the connection's file,
        // which the engine keeps open until every write it queued has
        // completed.
        if let Err(e) = unsafe { self.push(&entry) } {
            return Err((req, e));
        }
        self.writes.insert(ud, req);
        Ok(())
    }

    /// Writes in flight.
    pub(crate) fn writes_in_flight(&self) -> usize {
        self.writes.len()
    }

    /// Writes completed since the last call, with their results.
    pub(crate) fn take_written(&mut self) -> Vec<(WriteReq, i32)> {
        std::mem::take(&mut self.written)
    }

    /// Stops watching `token`; its fd may be closed once this returns.
    pub(crate) fn remove(&mut self, token: u64) -> io::Result<()> {
        let Some(w) = self.watched.remove(&token) else {
            return Ok(());
        };
        if let Some(ud) = w.poll {
            self.polls.remove(&ud);
            let entry = opcode::PollRemove::new(ud).build().user_data(REMOVE_UD);
            // SAFETY: POLL_REMOVE names neither fd nor buffer.
            unsafe { self.push(&entry)? };
        }
        // Submit now: a queued POLL_ADD names the fd by number, which must
        // still be this socket when the kernel reads the SQE.
        self.submit()
    }

    /// Queues `entry`, submitting first when the submission queue is full.
    ///
    /// # Safety
    /// Every fd and buffer `entry` names must stay valid until it is
    /// submitted (fds) or completes (buffers).
    unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the caller guarantees what `entry` names outlives it.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            self.submit()?;
        }
    }

    /// Submits what is queued; completions that are in the way (the kernel
    /// refuses to submit while its CQ overflows) are reaped first, kept for
    /// the next [`Self::wait`].
    fn submit(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if crate::sys::is_transient_enter_error(&e) => {
                    if self.reap() == 0 && e.raw_os_error() != Some(libc::EINTR) {
                        // Nothing to make room with: try again at the
                        // next wait, which submits too.
                        return Ok(());
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Submits, waits up to `timeout` for a completion (not at all when
    /// some are kept from earlier), and appends every ready token.
    pub(crate) fn wait(
        &mut self,
        timeout: Option<Duration>,
        ready: &mut Vec<u64>,
    ) -> io::Result<()> {
        let timeout = if self.ready.is_empty() {
            timeout
        } else {
            Some(Duration::ZERO)
        };
        self.enter(timeout)?;
        self.reap();
        ready.append(&mut self.ready);
        Ok(())
    }

    /// Polls that failed since the last call.
    pub(crate) fn take_failed(&mut self) -> Vec<(u64, io::Error)> {
        std::mem::take(&mut self.failed)
    }

    /// Takes every CQE off the ring; returns how many.
    fn reap(&mut self) -> usize {
        let cqes: Vec<(u64, i32, u32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result(), c.flags()))
            .collect();
        for &(ud, res, flags) in &cqes {
            match ud {
                REMOVE_UD => {}
                TIMEOUT_UD => {
                    self.timeouts.pop_front();
                }
                ud if ud & WRITE_BIT != 0 => {
                    if let Some(req) = self.writes.remove(&ud) {
                        self.written.push((req, res));
                    }
                }
                _ => self.polled(ud, res, flags),
            }
        }
        cqes.len()
    }

    /// Handles a poll's CQE.
    fn polled(&mut self, ud: u64, res: i32, flags: u32) {
        let Some(&token) = self.polls.get(&ud) else {
            // A poll already removed or replaced.
            return;
        };
        if !cqueue::more(flags) {
            // This poll is over: the next drain arms another.
            self.polls.remove(&ud);
            if let Some(w) = self.watched.get_mut(&token) {
                w.poll = None;
            }
        }
        match res {
            r if r >= 0 => self.ready.push(token),
            // Ended by the kernel (e.g. CQ overflow): look, then re-arm.
            r if -r == libc::ECANCELED => self.ready.push(token),
            r => self.failed.push((token, io::Error::from_raw_os_error(-r))),
        }
    }

    /// Submits and waits for one completion or `timeout`.
    fn enter(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let result = match timeout {
            None => self.ring.submit_and_wait(1),
            Some(d) if self.ring.params().is_feature_ext_arg() => {
                let ts = types::Timespec::from(d);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
            Some(d) => {
                let ts = Box::new(types::Timespec::from(d));
                let entry = opcode::Timeout::new(&*ts).build().user_data(TIMEOUT_UD);
                // SAFETY: the boxed Timespec is kept in `self.timeouts`
                // until a TIMEOUT_UD completion is reaped (the kernel
                // copies it when it reads the SQE; one kept per TIMEOUT
                // in flight), and the ring is dropped before `timeouts`.
                unsafe { self.push(&entry)? };
                self.timeouts.push_back(ts);
                self.ring.submit_and_wait(1)
            }
        };
        match result {
            Err(e) if !crate::sys::is_transient_enter_error(&e) => Err(e),
            _ => Ok(()),
        }
    }
}

impl Drop for RingSelector {
    /// The kernel may still be reading buffers of writes in flight: wait
    /// for them (at most 30 s, a stuck disk) before the buffers go.
    fn drop(&mut self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !self.writes.is_empty() && std::time::Instant::now() < deadline {
            if self.enter(Some(Duration::from_millis(100))).is_err() {
                break;
            }
            self.reap();
        }
        if !self.writes.is_empty() {
            // Leaked rather than freed under the kernel's feet.
            std::mem::forget(std::mem::take(&mut self.writes));
        }
    }
}

impl std::fmt::Debug for RingSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingSelector")
            .field("multishot", &self.multishot)
            .field("watched", &self.watched.len())
            .finish_non_exhaustive()
    }
}

/// Whether this kernel keeps a POLL_ADD armed (`IORING_POLL_ADD_MULTI`,
/// Linux 5.13). Asked once, of a throw-away ring: a multishot poll for
/// POLLOUT on an empty pipe completes at once, flagged `F_MORE` when it
/// stays armed; older kernels reject the flag with `EINVAL`.
fn multishot_poll() -> bool {
    static MULTISHOT: OnceLock<bool> = OnceLock::new();
    *MULTISHOT.get_or_init(|| {
        let ask = || -> io::Result<bool> {
            let (_rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
            let mut ring = IoUring::new(2)?;
            let entry = opcode::PollAdd::new(types::Fd(wr.as_raw_fd()), libc::POLLOUT as u32)
                .multi(true)
                .build()
                .user_data(1);
            // SAFETY: `wr` is open until after the ring (declared later,
            // dropped first) is gone; no buffer is named.
            unsafe { ring.submission().push(&entry) }.map_err(io::Error::other)?;
            ring.submit_and_wait(1)?;
            let cqe = ring.completion().next();
            Ok(cqe.is_some_and(|c| c.result() > 0 && cqueue::more(c.flags())))
        };
        ask().unwrap_or(false)
    })
}
