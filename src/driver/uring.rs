//! io_uring leaf: one SQE per connection write (`SENDMSG` for sockets,
//! `WRITEV` for everything else) and one `io_uring_enter` per submit.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use bytes::Bytes;
use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::{DriverStats, Event, Token, WriteOp, SEND_FLAGS, WAKE_TOKEN};
use crate::sys::is_transient_enter_error;
use crate::sys::net::FdKind;

/// `user_data` of entries whose completions nobody waits for (cancels,
/// timeouts).
const IGNORED: u64 = u64::MAX;
/// `user_data` bit of zero-copy sends: each gets its own id, since its
/// notification may arrive after later sends on the same connection.
const ZC_BIT: u64 = 1 << 63;
/// Datagrams one connection may have in flight as one linked chain: enough
/// to make one flush one submission for typical bursts, few enough that one
/// socket does not take over the SQ ring.
const MAX_CHAIN: usize = 32;
/// `IORING_SEND_ZC_REPORT_USAGE` (6.2), in the SQE's `ioprio`.
const SEND_ZC_REPORT_USAGE: u16 = 1 << 3;
/// `IORING_NOTIF_USAGE_ZC_COPIED`, in a notification's `res`.
const NOTIF_USAGE_ZC_COPIED: u32 = 1 << 31;

/// A zero-copy send from submission until its notification.
#[derive(Debug)]
struct ZcSend {
    token: Token,
    /// Clones of every `Bytes` the send reads: dropped at the notification,
    /// never before (the kernel may read them until then).
    _hold: Vec<Bytes>,
    /// The send's own completion has been reaped.
    done: bool,
}

/// An io_uring instance and its counters.
pub(crate) struct UringDriver {
    ring: IoUring,
    stats: DriverStats,
    /// SQEs pushed since the last `io_uring_enter`.
    unsubmitted: usize,
    /// Writes whose completion has not been reaped.
    in_flight: usize,
    /// Set up with `IORING_SETUP_R_DISABLED`: enabled by the first enter,
    /// which makes the calling thread the ring's single issuer.
    disabled: bool,
    /// Set up with `DEFER_TASKRUN`: retries and notifications run only in
    /// an enter that asks for events.
    deferred: bool,
    /// Zero-copy sends by `user_data`, until their notification.
    zc: HashMap<u64, ZcSend>,
    next_zc: u64,
    /// Zero-copy sends completed and waiting only for their notification.
    zc_done: usize,
    /// Kernel accepts `IORING_SEND_ZC_REPORT_USAGE` (6.2).
    report_usage: bool,
    /// The wake fd's poll, once `watch_wake` was called.
    wake: Option<WakeWatch>,
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
    pub(crate) fn new(
        depth: u32,
        pool: Option<&crate::fixed::FixedBufPool>,
    ) -> io::Result<UringDriver> {
        let depth = depth.clamp(8, 32768);
        let cq = depth.saturating_mul(2);
        // DEFER_TASKRUN (6.1, with SINGLE_ISSUER) runs retries of partial
        // sends only when we wait, and wakes us only once enough completions
        // are ready: far fewer wake-ups for many connections. R_DISABLED lets
        // the thread that first submits (not the one that built the ring)
        // become its issuer. Older kernels reject the flags: try the
        // next-best set.
        let deferred = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_r_disabled()
            .setup_cqsize(cq)
            .build(depth);
        let (ring, disabled) = match deferred {
            Ok(ring) => (ring, true),
            Err(_) => (
                IoUring::builder()
                    .setup_coop_taskrun()
                    .setup_cqsize(cq)
                    .build(depth)
                    .or_else(|_| IoUring::builder().setup_cqsize(cq).build(depth))
                    .or_else(|_| IoUring::new(depth))?,
                false,
            ),
        };
        if let Some(pool) = pool {
            register(&ring, pool)?;
        }
        Ok(UringDriver {
            ring,
            stats: DriverStats::default(),
            unsubmitted: 0,
            in_flight: 0,
            disabled,
            deferred: disabled,
            zc: HashMap::new(),
            next_zc: 0,
            zc_done: 0,
            // REPORT_USAGE came in 6.2, with the RECVSEND_BUNDLE-era feature
            // set; EXT_ARG+NODROP alone do not tell, so ask the version.
            report_usage: kernel_at_least(6, 2),
            wake: None,
        })
    }

    pub(crate) fn register(&mut self, _: Token, _: RawFd, _: FdKind) -> io::Result<()> {
        Ok(())
    }

    pub(crate) fn deregister(&mut self, _: Token, _: RawFd) {}

    /// # Safety
    /// The [`WriteOp`] invariant: `op` and the memory its iovecs point at
    /// stay valid and unmodified until `Done` for `token` is reported; for a
    /// zero-copy op, `hold` covers every buffer its iovecs point at.
    pub(crate) unsafe fn start(
        &mut self,
        token: Token,
        fd: RawFd,
        kind: FdKind,
        op: &WriteOp,
        hold: Vec<Bytes>,
        _events: &mut Vec<Event>,
    ) -> io::Result<()> {
        let fd = types::Fd(fd);
        // MSG_WAITALL on a stream socket: the kernel finishes a partial send
        // itself instead of completing short (io_net_retry).
        let msg_flags = match kind {
            FdKind::StreamSocket => SEND_FLAGS | libc::MSG_WAITALL,
            _ => SEND_FLAGS,
        };
        let mut user_data = token;
        let entry = if op.zero_copy && kind.is_socket() {
            let zc_flags = if self.report_usage {
                SEND_ZC_REPORT_USAGE
            } else {
                0
            };
            let entry = match (op.fixed, op.iovecs()) {
                // One registered buffer: SEND_ZC from it (no page pinning).
                (Some(index), [iov]) => {
                    let mut e =
                        opcode::SendZc::new(fd, iov.iov_base as *const u8, iov.iov_len as u32)
                            .buf_index(Some(index))
                            .flags(msg_flags)
                            .zc_flags(zc_flags);
                    if let Some((addr, len)) = op.dest() {
                        e = e.dest_addr(addr).dest_addr_len(len);
                    }
                    e.build()
                }
                _ => opcode::SendMsgZc::new(fd, op.msghdr())
                    .flags(msg_flags as u32)
                    .ioprio(zc_flags)
                    .build(),
            };
            self.next_zc += 1;
            user_data = ZC_BIT | self.next_zc;
            self.zc.insert(
                user_data,
                ZcSend {
                    token,
                    _hold: hold,
                    done: false,
                },
            );
            self.stats.zc_sends += 1;
            entry
        } else {
            match kind {
                FdKind::StreamSocket | FdKind::DatagramSocket => {
                    opcode::SendMsg::new(fd, op.msghdr())
                        .flags(msg_flags as u32)
                        .build()
                }
                // Offset -1: write at (and advance) the file position (5.6, RW_CUR_POS).
                FdKind::File | FdKind::Other => {
                    opcode::Writev::new(fd, op.iovecs().as_ptr(), op.iovecs().len() as u32)
                        .offset(u64::MAX)
                        .build()
                }
            }
        }
        .user_data(user_data);
        // A link orders this write before the next in the chain: the next
        // starts only once this one succeeded, and fails (ECANCELED) if not.
        let entry = if op.link {
            entry.flags(squeue::Flags::IO_LINK)
        } else {
            entry
        };
        // SAFETY: the caller upholds the WriteOp invariant for this entry's
        // msghdr/iovecs and the Bytes behind them until its completion, and
        // for zero-copy `self.zc` holds the Bytes until the notification.
        if let Err(e) = unsafe { self.push(&entry) } {
            self.zc.remove(&user_data);
            return Err(e);
        }
        self.in_flight += 1;
        Ok(())
    }

    /// See `Driver::chain`. A chain must reach the kernel in one
    /// submission (a chain split across two would be two chains, free to
    /// overtake each other), so submit first if the SQ ring lacks room.
    pub(crate) fn chain(&mut self, want: usize) -> io::Result<usize> {
        let n = want.clamp(1, MAX_CHAIN);
        let n = n.min(self.ring.params().sq_entries() as usize);
        let free = {
            let sq = self.ring.submission();
            sq.capacity() - sq.len()
        };
        if free < n {
            self.enter(0, None)?;
        }
        Ok(n)
    }

    /// Zero-copy sends whose notification has not arrived.
    pub(crate) fn notifs_pending(&self) -> usize {
        self.zc.len()
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
        if self.disabled {
            self.stats.syscalls += 1;
            self.ring.submitter().register_enable_rings()?;
            self.disabled = false;
        }
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
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Err(io::Error::new(
                e.kind(),
                "io_uring ring used from a second thread: a Mover's ring has a single \
                 issuer (IORING_SETUP_SINGLE_ISSUER), the thread that first flushed it",
            )),
            // Timed out, interrupted, or the CQ is backed up and must be
            // reaped first: the caller reaps and comes back.
            Err(e) if is_transient_enter_error(&e) => {
                self.unsubmitted = self.ring.submission().len();
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// `io_uring_enter(fd, 0, 0, IORING_ENTER_GETEVENTS)`: runs deferred
    /// task work without waiting.
    fn run_deferred(&mut self) -> io::Result<()> {
        self.stats.enters += 1;
        self.stats.syscalls += 1;
        // SAFETY: no SQEs are submitted and no argument pointer is passed.
        let res = unsafe {
            self.ring.submitter().enter::<libc::sigset_t>(
                0,
                0,
                io_uring::EnterFlags::GETEVENTS.bits(),
                None,
            )
        };
        match res {
            Err(e) if !is_transient_enter_error(&e) => Err(e),
            _ => Ok(()),
        }
    }

    pub(crate) fn wait(
        &mut self,
        min: usize,
        timeout: Option<Duration>,
        events: &mut Vec<Event>,
    ) -> io::Result<()> {
        let ready = self.ring.completion().len();
        // Notifications count too: Drop waits for them.
        let outstanding = self.in_flight + self.zc_done;
        let want = if ready >= min.max(1) {
            0
        } else {
            min.max(1).min(outstanding + self.wake_armed())
        };
        if want > 0 || self.unsubmitted > 0 {
            self.enter(want, timeout)?;
        } else if self.deferred && outstanding > ready {
            // Completions are ready, but deferred task work (partial-send
            // retries, zero-copy notifications) runs only when we ask for
            // events: without this a caller that always finds a completion
            // waiting would starve it.
            self.run_deferred()?;
        }
        for cqe in self.ring.completion() {
            let user_data = cqe.user_data();
            if user_data == IGNORED {
                continue;
            }
            if user_data == WAKE_TOKEN {
                wake_cqe(&mut self.wake, cqe.result(), cqe.flags(), events);
                continue;
            }
            let token = if user_data & ZC_BIT != 0 {
                let Some(zc) = self.zc.get_mut(&user_data) else {
                    continue;
                };
                let token = zc.token;
                if cqueue::notif(cqe.flags()) {
                    // The kernel is done with the buffers: release them.
                    if zc.done {
                        self.zc_done -= 1;
                    }
                    self.zc.remove(&user_data);
                    let copied = (cqe.result() as u32) & NOTIF_USAGE_ZC_COPIED != 0;
                    events.push(Event::Notified { token, copied });
                    continue;
                }
                if cqueue::more(cqe.flags()) {
                    zc.done = true;
                    self.zc_done += 1;
                } else {
                    // No notification follows (the send failed early).
                    self.zc.remove(&user_data);
                }
                token
            } else {
                user_data
            };
            self.in_flight -= 1;
            let res = if cqe.result() < 0 {
                Err(io::Error::from_raw_os_error(-cqe.result()))
            } else {
                Ok(cqe.result() as usize)
            };
            events.push(Event::Done { token, res });
        }
        self.rearm_wake()
    }

    pub(crate) fn cancel(&mut self, token: Token) -> io::Result<()> {
        // Plain writes run under the token (cancelling a chain's running
        // write fails the rest of it); each zero-copy send under its own id,
        // so cancel every one of this connection's still running: those
        // not yet started are not found (ENOENT, ignored) and fail with
        // the chain.
        let mut targets: Vec<u64> = self
            .zc
            .iter()
            .filter(|(_, z)| z.token == token && !z.done)
            .map(|(&id, _)| id)
            .collect();
        targets.push(token);
        for target in targets {
            let entry = opcode::AsyncCancel::new(target).build().user_data(IGNORED);
            // SAFETY: ASYNC_CANCEL points at no buffer.
            unsafe { self.push(&entry) }?;
        }
        Ok(())
    }

    pub(crate) fn stats(&self) -> DriverStats {
        self.stats
    }
}

/// Registers the pool's buffers with the ring (`IORING_REGISTER_BUFFERS`).
fn register(ring: &IoUring, pool: &crate::fixed::FixedBufPool) -> io::Result<()> {
    let iovecs: Vec<libc::iovec> = pool
        .regions()
        .into_iter()
        .map(|(addr, len)| libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: len,
        })
        .collect();
    // SAFETY: the regions are the pool's buffers, whose heap memory never
    // moves or shrinks and lives as long as the pool; the engine keeps the
    // pool alive for as long as the ring exists.
    match unsafe { ring.submitter().register_buffers(&iovecs) } {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOMEM) => {
            let limit = crate::sys::memlock_limit()
                .ok()
                .and_then(|(soft, _)| soft)
                .map_or_else(|| String::from("unlimited"), |b| format!("{b} bytes"));
            Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!(
                    "registering {} fixed buffers of {} bytes exceeds RLIMIT_MEMLOCK ({limit}): \
                     raise `ulimit -l` or register fewer",
                    pool.count(),
                    pool.buf_size()
                ),
            ))
        }
        Err(e) => Err(e),
    }
}

/// Whether `uname -r` is at least `major.minor`.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let (release, _) = crate::sys::uname();
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let maj = parts
        .next()
        .and_then(|p| p.parse::<u32>().ok())
        .unwrap_or(0);
    let min = parts
        .next()
        .and_then(|p| p.parse::<u32>().ok())
        .unwrap_or(0);
    (maj, min) >= (major, minor)
}

/// The wake fd's `POLL_ADD`: multishot (5.13) where the kernel takes it,
/// else one-shot and re-armed after each wake.
#[derive(Debug)]
struct WakeWatch {
    fd: RawFd,
    multishot: bool,
    /// A poll is queued or in the kernel.
    armed: bool,
    /// The poll failed in a way re-arming cannot fix: reported by `wait`.
    error: Option<i32>,
}

/// Handles a completion of the wake fd's poll.
fn wake_cqe(watch: &mut Option<WakeWatch>, res: i32, flags: u32, events: &mut Vec<Event>) {
    let Some(w) = watch.as_mut() else {
        return;
    };
    if res >= 0 {
        events.push(Event::Woken);
        // No IORING_CQE_F_MORE: the poll ended (one-shot, or the kernel
        // stopped a multishot one, e.g. on CQ overflow): arm it again.
        w.armed = cqueue::more(flags);
    } else if res == -libc::EINVAL && w.multishot {
        // Before 5.13 POLL_ADD takes no flags: one-shot it is.
        w.multishot = false;
        w.armed = false;
    } else {
        w.armed = false;
        w.error = Some(-res);
        // Whoever waits must not sleep on a poll that is gone.
        events.push(Event::Woken);
    }
}

impl UringDriver {
    /// See `Driver::watch_wake`.
    pub(crate) fn watch_wake(&mut self, fd: RawFd) -> io::Result<()> {
        self.wake = Some(WakeWatch {
            fd,
            multishot: true,
            armed: false,
            error: None,
        });
        self.rearm_wake()
    }

    /// 1 when a wake poll is armed: `wait` may sleep for it.
    fn wake_armed(&self) -> usize {
        usize::from(self.wake.as_ref().is_some_and(|w| w.armed))
    }

    /// Queues the wake fd's poll again if it ended (submitted with the
    /// next enter), or reports why it cannot be.
    fn rearm_wake(&mut self) -> io::Result<()> {
        let Some(w) = self.wake.as_mut() else {
            return Ok(());
        };
        if let Some(errno) = w.error.take() {
            self.wake = None;
            let e = io::Error::from_raw_os_error(errno);
            return Err(io::Error::new(
                e.kind(),
                format!("io_uring POLL_ADD on the wake eventfd failed: {e}"),
            ));
        }
        if w.armed {
            return Ok(());
        }
        w.armed = true;
        let entry = opcode::PollAdd::new(types::Fd(w.fd), libc::POLLIN as u32)
            .multi(w.multishot)
            .build()
            .user_data(WAKE_TOKEN);
        // SAFETY: POLL_ADD points at no buffer; the wake fd stays open for
        // as long as the engine (it owns the Waker that owns the fd), and
        // closing it with the poll armed is safe anyway (the kernel holds
        // its own reference to the file).
        unsafe { self.push(&entry) }
    }
}
