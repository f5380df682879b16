//! io_uring leaf: one SQE per connection write (`SENDMSG` for sockets,
//! `WRITEV` for everything else) and one `io_uring_enter` per submit.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring};

use super::{DriverStats, Event, Token, WriteOp, SEND_FLAGS};
use crate::sys::net::FdKind;

/// `user_data` of entries whose completions nobody waits for (cancels,
/// timeouts).
const IGNORED: u64 = u64::MAX;

/// An io_uring instance and its counters.
pub(crate) struct UringDriver {
    ring: IoUring,
    stats: DriverStats,
    /// SQEs pushed since the last `io_uring_enter`.
    unsubmitted: usize,
    /// Writes whose completion has not been reaped.
    in_flight: usize,
}

impl std::fmt::Debug for UringDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringDriver")
            .field("sq_entries", &self.ring.params().sq_entries())
            .field("in_flight", &self.in_flight)
            .field("stats", &self.stats)
            .finish()
    }
}

impl UringDriver {
    pub(crate) fn new(depth: u32) -> io::Result<UringDriver> {
        let depth = depth.clamp(8, 32768);
        // COOP_TASKRUN (5.19) saves an interrupt per completion for a ring
        // used by one thread at a time; older kernels reject it, so retry plain.
        let ring = IoUring::builder()
            .setup_coop_taskrun()
            .setup_cqsize(depth.saturating_mul(2))
            .build(depth)
            .or_else(|_| IoUring::builder().setup_cqsize(depth * 2).build(depth))
            .or_else(|_| IoUring::new(depth))?;
        Ok(UringDriver {
            ring,
            stats: DriverStats::default(),
            unsubmitted: 0,
            in_flight: 0,
        })
    }

    pub(crate) fn register(&mut self, _: Token, _: RawFd, _: FdKind) -> io::Result<()> {
        Ok(())
    }

    pub(crate) fn deregister(&mut self, _: Token, _: RawFd) {}

    /// # Safety
    /// The [`WriteOp`] invariant: `op` and the memory its iovecs point at
    /// stay valid and unmodified until `Done` for `token` is reported.
    pub(crate) unsafe fn start(
        &mut self,
        token: Token,
        fd: RawFd,
        kind: FdKind,
        op: &WriteOp,
        _events: &mut Vec<Event>,
    ) -> io::Result<()> {
        let entry = match kind {
            // MSG_WAITALL on a stream socket: the kernel finishes a partial
            // send itself instead of completing short (io_net_retry).
            FdKind::StreamSocket => opcode::SendMsg::new(types::Fd(fd), op.msghdr())
                .flags((SEND_FLAGS | libc::MSG_WAITALL) as u32)
                .build(),
            FdKind::DatagramSocket => opcode::SendMsg::new(types::Fd(fd), op.msghdr())
                .flags(SEND_FLAGS as u32)
                .build(),
            // Offset -1: write at (and advance) the file position (5.6, RW_CUR_POS).
            FdKind::File | FdKind::Other => opcode::Writev::new(
                types::Fd(fd),
                op.iovecs().as_ptr(),
                op.iovecs().len() as u32,
            )
            .offset(u64::MAX)
            .build(),
        }
        .user_data(token);
        // SAFETY: the caller upholds the WriteOp invariant for this entry's
        // msghdr/iovecs and the Bytes behind them until its completion.
        unsafe { self.push(&entry)? };
        self.in_flight += 1;
        Ok(())
    }

    /// Pushes an entry, entering the kernel first if the SQ ring is full.
    ///
    /// # Safety
    /// Every buffer the entry points at stays valid until its completion.
    unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: forwarded from the caller.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                self.unsubmitted += 1;
                self.stats.sqes += 1;
                return Ok(());
            }
            self.enter(0, None)?;
        }
    }

    pub(crate) fn submit(&mut self) -> io::Result<()> {
        if self.unsubmitted > 0 {
            self.enter(0, None)?;
        }
        Ok(())
    }

    /// One `io_uring_enter`: submits what is queued, waits for `want`
    /// completions (up to `timeout`). A timeout or signal is not an error.
    fn enter(&mut self, want: usize, timeout: Option<Duration>) -> io::Result<()> {
        self.stats.enters += 1;
        self.stats.syscalls += 1;
        let res = match timeout {
            Some(t) if want > 0 => {
                let ts = types::Timespec::from(t);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(want, &args)
            }
            _ => self.ring.submitter().submit_and_wait(want),
        };
        match res {
            Ok(_) => {
                self.unsubmitted = 0;
                Ok(())
            }
            Err(e) => match e.raw_os_error() {
                // Timed out, interrupted, or the CQ is backed up and must be
                // reaped first: the caller reaps and comes back.
                Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN) => {
                    self.unsubmitted = self.ring.submission().len();
                    Ok(())
                }
                _ => Err(e),
            },
        }
    }

    pub(crate) fn wait(
        &mut self,
        timeout: Option<Duration>,
        events: &mut Vec<Event>,
    ) -> io::Result<()> {
        let ready = !self.ring.completion().is_empty();
        let want = usize::from(!ready && self.in_flight > 0);
        if want > 0 || self.unsubmitted > 0 {
            self.enter(want, timeout)?;
        }
        for cqe in self.ring.completion() {
            if cqe.user_data() == IGNORED {
                continue;
            }
            self.in_flight -= 1;
            let res = if cqe.result() < 0 {
                Err(io::Error::from_raw_os_error(-cqe.result()))
            } else {
                Ok(cqe.result() as usize)
            };
            events.push(Event::Done {
                token: cqe.user_data(),
                res,
            });
        }
        Ok(())
    }

    pub(crate) fn cancel(&mut self, token: Token) -> io::Result<()> {
        let entry = opcode::AsyncCancel::new(token).build().user_data(IGNORED);
        // SAFETY: ASYNC_CANCEL points at no buffer.
        unsafe { self.push(&entry) }
    }

    pub(crate) fn stats(&self) -> DriverStats {
        self.stats
    }
}
