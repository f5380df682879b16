//! io_uring leaf: one SQE per connection write (`SENDMSG` for sockets,
//! `SEND` for a datagram in one buffer, `WRITEV` for everything else) and
//! one `io_uring_enter` per submit.
//!
//! Two capacities bound what it accepts: the SQ ring (a datagram chain is
//! pushed whole or not at all, so it never spans two submissions) and the
//! CQ ring (every completion the kernel owes us has a slot, so none can be
//! dropped or backed up, whatever the kernel's overflow handling).
#![allow(unsafe_code)]

use std::cell::{Cell, OnceCell};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::time::Duration;

use bytes::Bytes;
use io_uring::{cqueue, opcode, squeue, types, IoUring};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::unistd::{lseek, Whence};

use super::{DriverStats, Event, RegisteredFiles, Token, WriteOp, SEND_FLAGS, WAKE_TOKEN};
use crate::sys::is_transient_enter_error;
use crate::sys::net::FdKind;

/// `user_data` of entries whose completions nobody waits for (cancels,
/// timeouts).
const IGNORED: u64 = u64::MAX;
/// `user_data` bit of zero-copy sends: each gets its own id, since its
/// notification may arrive after later sends on the same connection.
const ZC_BIT: u64 = 1 << 63;
/// Writes the ring keeps in flight when it may choose (how long datagram
/// chains grow): the kernel keeps the async state (`io_async_msghdr`) of
/// 128 network requests per ring for reuse (`IO_ALLOC_CACHE_MAX`,
/// `io_uring/alloc_cache.h`; 6.18), and every send in flight beyond that
/// allocates and frees its own. A send gets it when submitted, so every
/// send of a chain holds one, not only the one running. Measured (`bench
/// udp`, 16 sockets, no GSO): the kernel's `udp_sendmsg` was 78–80% of
/// the sending thread with 128 `SENDMSG`s in flight, 73–74% with 512 (16
/// chains of 32, before), `kmalloc`/`kfree` behind the difference.
const SENDS_IN_FLIGHT: usize = 128;
/// `IORING_SEND_ZC_REPORT_USAGE` (6.2), in the SQE's `ioprio`.
const SEND_ZC_REPORT_USAGE: u16 = 1 << 3;
/// `IORING_NOTIF_USAGE_ZC_COPIED`, in a notification's `res`.
const NOTIF_USAGE_ZC_COPIED: u32 = 1 << 31;
/// CQ ring size per SQ entry: room for this many times the queue depth of
/// completions owed, so a flush of more connections than the SQ holds still
/// starts them all (one enter per full SQ).
const CQ_PER_SQ: u32 = 8;
/// Enters tried to make room in the SQ ring while the kernel keeps refusing
/// transiently (EINTR, EBUSY, EAGAIN), reaping between tries, before the
/// refusal is returned as an error rather than retried forever.
const ROOM_TRIES: usize = 16;

/// Most slots of the registered file table. By default the table has one
/// slot per fd the process may have open (`RLIMIT_NOFILE`'s soft limit,
/// which the kernel also requires: EMFILE above it), up to this: an empty
/// slot costs a pointer and a bit of kernel memory (6.18,
/// `io_rsrc_data_alloc`), so 512 KiB per ring at most. The kernel cannot
/// resize a table (only unregister it and register another), so it is
/// sized once; connections beyond it use their plain fd.
const MAX_FILE_SLOTS: u32 = 1 << 16;

/// The ring's table of registered files (`IOSQE_FIXED_FILE`): a request
/// naming a slot skips the `fget`/`fput` the kernel does per request on a
/// plain fd (`io_file_get_normal`): 1–3% of the sending thread before
/// (docs/benchmarks.md, "Registered files").
///
/// Removing a file from a slot while requests use it is safe: each holds
/// the slot's resource node, which keeps its file reference until the
/// last of them completes (`io_uring_register(2)`: updates "might be held
/// until all requests using that resource complete"). The engine frees a
/// slot only at detach, with no write of the connection in flight (a
/// zero-copy notification may still be owed; it needs no file), so no
/// queued link can find its slot empty or reused (since 5.17,
/// `IORING_FEAT_LINKED_FILE`, a link's file is looked up when it starts).
#[derive(Debug)]
struct FileTable {
    state: RegisteredFiles,
    /// Slots freed by detaches, the most recent last.
    free: Vec<u32>,
    /// Slots from here on were never used.
    fresh: u32,
    /// By connection slot (`token >> 32`): the token and its table slot.
    by_conn: Vec<Option<(Token, u32)>>,
}

impl FileTable {
    /// Registers a sparse table of `slots` (`None`: one per fd the
    /// process may open, at most `MAX_FILE_SLOTS`) with `ring`; if the
    /// kernel refuses, a table that says why and holds nothing.
    fn register(ring: &IoUring, slots: Option<u32>) -> FileTable {
        let slots = slots.unwrap_or_else(|| {
            use nix::sys::resource::{getrlimit, Resource};
            getrlimit(Resource::RLIMIT_NOFILE)
                .map_or(1024, |(soft, _)| soft.min(u64::from(MAX_FILE_SLOTS)) as u32)
        });
        let state = if slots == 0 {
            RegisteredFiles::Off
        } else {
            match ring.submitter().register_files_sparse(slots) {
                Ok(()) => RegisteredFiles::On { slots },
                Err(e) => RegisteredFiles::Refused {
                    errno: e.raw_os_error().unwrap_or(libc::EINVAL),
                },
            }
        };
        FileTable {
            state,
            free: Vec::new(),
            fresh: 0,
            by_conn: Vec::new(),
        }
    }

    /// The table slot `token`'s file is in, if it is in one.
    #[inline]
    fn slot_of(&self, token: Token) -> Option<u32> {
        match self.by_conn.get((token >> 32) as usize) {
            Some(&Some((t, slot))) if t == token => Some(slot),
            _ => None,
        }
    }
}

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
    /// SQEs pushed and not yet taken by the kernel.
    unsubmitted: usize,
    /// Writes whose completion has not been reaped.
    in_flight: usize,
    /// Completions the kernel will post and we have not reaped: one per
    /// write and per cancel, two per zero-copy send (its notification).
    /// Kept at most `cq_entries`, so the CQ ring can never overflow.
    cq_owed: usize,
    cq_entries: usize,
    sq_entries: usize,
    /// Completions reaped outside `wait` (to make room), reported by it.
    reaped: Vec<Event>,
    /// Seekable files (and devices): the position the next write starts
    /// at. Explicit offsets work on every kernel with io_uring; offset -1
    /// (the file position) needs 5.6 (`IORING_FEAT_RW_CUR_POS`). Restored
    /// into the fd's own position when it is detached.
    positions: HashMap<Token, u64>,
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
    /// `IORING_OP_SEND` (5.6) for a datagram in one buffer: no `msghdr`
    /// and iovec array for the kernel to copy in.
    send: bool,
    /// `SEND` takes a destination address too (6.0: `addr2`/`addr_len`;
    /// earlier kernels fail such an SQE with EINVAL).
    send_to: bool,
    /// The wake fd's poll, once `watch_wake` was called.
    wake: Option<WakeWatch>,
    /// What an event loop polls: an eventfd registered with the ring
    /// (`IORING_REGISTER_EVENTFD`) the first time one asks. Under
    /// `DEFER_TASKRUN` the ring fd itself reports pending task work as
    /// readable but does not wake a poller blocked on it (6.18); the
    /// kernel signals a registered eventfd both when it queues task work
    /// for the ring and when it posts completions.
    poll_efd: OnceCell<Option<nix::sys::eventfd::EventFd>>,
    /// Why registering `poll_efd` failed: the next `wait` reports it.
    poll_error: Cell<Option<io::Error>>,
    /// Connections' files registered with the ring.
    files: FileTable,
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
        files: Option<u32>,
    ) -> io::Result<UringDriver> {
        let depth = depth.clamp(8, 32768);
        let cq = depth.saturating_mul(CQ_PER_SQ).min(65536);
        // DEFER_TASKRUN (6.1, with SINGLE_ISSUER) runs retries of partial
        // sends only when we wait, and wakes us only once enough completions
        // are ready: far fewer wake-ups for many connections. R_DISABLED
        // makes the thread that first submits the issuer (the engine is
        // `!Send`, so that is the thread that built it). Older kernels reject
        // the flags: try the next-best set.
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
        // Refused (an old kernel, a seccomp filter): plain fds for the
        // whole ring, and `registered_files` says why.
        let files = FileTable::register(&ring, files);
        let (sq_entries, cq_entries) = (
            ring.params().sq_entries() as usize,
            ring.params().cq_entries() as usize,
        );
        Ok(UringDriver {
            ring,
            stats: DriverStats::default(),
            unsubmitted: 0,
            in_flight: 0,
            cq_owed: 0,
            cq_entries,
            sq_entries,
            reaped: Vec::new(),
            positions: HashMap::new(),
            disabled,
            deferred: disabled,
            zc: HashMap::new(),
            next_zc: 0,
            zc_done: 0,
            // REPORT_USAGE came in 6.2, with the RECVSEND_BUNDLE-era feature
            // set; EXT_ARG+NODROP alone do not tell, so ask the version.
            report_usage: kernel_at_least(6, 2),
            send: crate::probe::RingSupport::detect().supports(crate::opcode::Opcode::SEND),
            send_to: kernel_at_least(6, 0),
            wake: None,
            poll_efd: OnceCell::new(),
            poll_error: Cell::new(None),
            files,
        })
    }

    /// See `Driver::registered_files`.
    pub(crate) fn registered_files(&self) -> RegisteredFiles {
        self.files.state
    }

    /// Puts `fd` in a free slot of the file table for `token`'s requests
    /// (`IORING_REGISTER_FILES_UPDATE`). A full table, or a file the
    /// kernel will not register (another ring's fd: EBADF), leaves the
    /// connection on its plain fd, counted in `unregistered_files`.
    fn register_file(&mut self, token: Token, fd: RawFd) {
        let RegisteredFiles::On { slots } = self.files.state else {
            return;
        };
        let t = &mut self.files;
        let slot = match t.free.pop() {
            Some(s) => s,
            None if t.fresh < slots => {
                t.fresh += 1;
                t.fresh - 1
            }
            None => {
                self.stats.unregistered_files += 1;
                return;
            }
        };
        match self.ring.submitter().register_files_update(slot, &[fd]) {
            Ok(1) => {
                let conn = (token >> 32) as usize;
                if t.by_conn.len() <= conn {
                    t.by_conn.resize(conn + 1, None);
                }
                t.by_conn[conn] = Some((token, slot));
            }
            _ => {
                t.free.push(slot);
                self.stats.unregistered_files += 1;
            }
        }
    }

    /// Empties `token`'s file table slot, if it has one, and frees it.
    /// Should the kernel refuse, the slot is never reused (it keeps the
    /// file open until the ring goes).
    fn deregister_file(&mut self, token: Token) {
        let Some(slot) = self.files.slot_of(token) else {
            return;
        };
        self.files.by_conn[(token >> 32) as usize] = None;
        if let Ok(1) = self.ring.submitter().register_files_update(slot, &[-1]) {
            self.files.free.push(slot);
        }
    }

    pub(crate) fn register(&mut self, token: Token, fd: RawFd, kind: FdKind) -> io::Result<()> {
        self.register_file(token, fd);
        if kind.is_socket() {
            return Ok(());
        }
        let append = fcntl(fd, FcntlArg::F_GETFL)
            .is_ok_and(|fl| OFlag::from_bits_truncate(fl).contains(OFlag::O_APPEND));
        // Pipes, FIFOs and ttys cannot seek (ESPIPE) and ignore the offset;
        // O_APPEND files append wherever we aim.
        if !append {
            if let Ok(pos) = lseek(fd, 0, Whence::SeekCur) {
                self.positions.insert(token, pos as u64);
            }
        }
        Ok(())
    }

    /// Leaves the fd's position after the last byte written, as sequential
    /// writes at the position would have.
    pub(crate) fn deregister(&mut self, token: Token, fd: RawFd) {
        self.deregister_file(token);
        if let Some(pos) = self.positions.remove(&token) {
            // Cannot fail for a seekable fd and a position it reached.
            let _ = lseek(fd, pos as i64, Whence::SeekSet);
        }
    }

    /// See `Driver::room`: how many of `want` writes costing `cost`
    /// completions each may start now as one submission, `waiting`
    /// connections (this one included) being in line for the same room.
    pub(crate) fn room(
        &mut self,
        want: usize,
        cost: usize,
        waiting: usize,
        events: &mut Vec<Event>,
    ) -> usize {
        // A chain is pushed whole, so it fits the SQ ring.
        let n = want.clamp(1, self.sq_entries);
        // One SQ's worth of the CQ is kept for cancellations.
        let budget = self.cq_entries - self.sq_entries;
        if self.cq_owed + n * cost > budget {
            // Completions already posted free their slots once reaped.
            self.reap();
            events.append(&mut self.reaped);
        }
        let free = budget.saturating_sub(self.cq_owed) / cost;
        // Sockets waiting to start share what is left of SENDS_IN_FLIGHT: a
        // socket alone chains up to 128 sends, 16 get 8 each; one at
        // least, so a flush of many sockets still starts every one.
        let share = SENDS_IN_FLIGHT.saturating_sub(self.in_flight) / waiting.max(1);
        n.min(share.max(1)).min(free)
    }

    /// # Safety
    /// The [`WriteOp`] invariant for every op: it and the memory its
    /// iovecs point at stay valid and unmodified until `Done` for `token`
    /// is reported; for a zero-copy op, its `hold` covers every buffer its
    /// iovecs point at.
    pub(crate) unsafe fn start(
        &mut self,
        token: Token,
        fd: RawFd,
        kind: FdKind,
        ops: &mut [Box<WriteOp>],
        events: &mut Vec<Event>,
    ) -> io::Result<()> {
        // Room first, for the whole chain: pushed together, it reaches the
        // kernel in one submission (two would be two chains, free to
        // overtake each other), and no SQE is left linking to whatever is
        // pushed next.
        let room = self.make_room(ops.len());
        events.append(&mut self.reaped);
        room?;
        // A registered file is named by its table slot: the SQE's fd field
        // holds the slot and IOSQE_FIXED_FILE is set, which is all
        // `types::Fixed` does (io-uring's `assign_fd!`), written out so one
        // builder call serves both. Every opcode here takes fixed files.
        let (fd, file_flags) = match self.files.slot_of(token) {
            Some(slot) => (types::Fd(slot as RawFd), squeue::Flags::FIXED_FILE),
            None => (types::Fd(fd), squeue::Flags::empty()),
        };
        // MSG_WAITALL on a stream socket: the kernel finishes a partial send
        // itself instead of completing short (io_net_retry). On a datagram
        // socket (which never sends part of a datagram) it makes a short
        // count, should one ever come, fail the link: the rest of the chain
        // is cancelled and stays queued, so the engine's count stays exact.
        let msg_flags = match kind {
            FdKind::StreamSocket | FdKind::DatagramSocket => SEND_FLAGS | libc::MSG_WAITALL,
            _ => SEND_FLAGS,
        };
        let zc_flags = if self.report_usage {
            SEND_ZC_REPORT_USAGE
        } else {
            0
        };
        let last = ops.len().saturating_sub(1);
        let mut entries = Vec::with_capacity(ops.len());
        let mut zc_ids = Vec::new();
        let mut cost = 0;
        let mut offset = self.positions.get(&token).copied();
        for (i, op) in ops.iter().enumerate() {
            let mut user_data = token;
            let entry = if op.zero_copy && kind.is_socket() {
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
                user_data = ZC_BIT | (self.next_zc + 1 + zc_ids.len() as u64);
                zc_ids.push(user_data);
                cost += 2;
                entry
            } else {
                cost += 1;
                match (kind, op.iovecs()) {
                    // One datagram in one buffer, no GSO cmsg: SEND, whose
                    // preparation reads no msghdr or iovec array from us.
                    (FdKind::DatagramSocket, [iov])
                        if self.send
                            && op.batch.segment_size.is_none()
                            && u32::try_from(iov.iov_len).is_ok()
                            && (self.send_to || op.dest().is_none()) =>
                    {
                        let mut e =
                            opcode::Send::new(fd, iov.iov_base as *const u8, iov.iov_len as u32)
                                .flags(msg_flags);
                        if let Some((addr, len)) = op.dest() {
                            e = e.dest_addr(addr).dest_addr_len(len);
                        }
                        e.build()
                    }
                    (FdKind::StreamSocket | FdKind::DatagramSocket, _) => {
                        opcode::SendMsg::new(fd, op.msghdr())
                            .flags(msg_flags as u32)
                            .build()
                    }
                    // An explicit offset: where this connection's writes
                    // have reached (0, ignored, for pipes and O_APPEND).
                    (FdKind::File | FdKind::Other, _) => {
                        let at = offset.unwrap_or(0);
                        offset = offset.map(|o| o + op.batch.bytes as u64);
                        opcode::Writev::new(fd, op.iovecs().as_ptr(), op.iovecs().len() as u32)
                            .offset(at)
                            .build()
                    }
                }
            }
            .user_data(user_data)
            .flags(file_flags);
            // A link orders this write before the next in the chain: the
            // next starts only once this one succeeded, and fails
            // (ECANCELED) if not. The last one links to nothing.
            entries.push(if i < last {
                entry.flags(squeue::Flags::IO_LINK)
            } else {
                entry
            });
        }
        // SAFETY: the caller upholds the WriteOp invariant for every
        // entry's msghdr/iovecs (a SEND's buffer and destination: the one
        // iovec's memory and the op's own address) and the Bytes behind
        // them until its completion; for zero-copy, `self.zc` holds the
        // Bytes until the notification (inserted below, before anything
        // can be reaped). The file: the engine owns the fd until detach,
        // which waits for these completions; a table slot is emptied only
        // there, after them (see `FileTable`).
        unsafe { self.ring.submission().push_multiple(&entries) }
            .map_err(|_| io::Error::other("io_uring submission queue full after making room"))?;
        let zc_ops = ops.iter_mut().filter(|op| op.zero_copy && kind.is_socket());
        for (op, &id) in zc_ops.zip(&zc_ids) {
            let hold = std::mem::take(&mut op.hold);
            self.zc.insert(
                id,
                ZcSend {
                    token,
                    _hold: hold,
                    done: false,
                },
            );
        }
        self.next_zc += zc_ids.len() as u64;
        self.stats.zc_sends += zc_ids.len() as u64;
        if file_flags.contains(squeue::Flags::FIXED_FILE) {
            self.stats.fixed_file_sqes += entries.len() as u64;
        }
        self.unsubmitted += entries.len();
        self.stats.sqes += entries.len() as u64;
        self.in_flight += entries.len();
        self.cq_owed += cost;
        Ok(())
    }

    /// Makes room for `n` SQEs (at most the ring's size), submitting what
    /// is queued. A kernel that refuses transiently (EBUSY while the CQ is
    /// backed up, EAGAIN, EINTR) gets its completions reaped, which is what
    /// frees it, and a few more tries; then the refusal is the error.
    fn make_room(&mut self, n: usize) -> io::Result<()> {
        let mut refused = None;
        for _ in 0..ROOM_TRIES {
            if self.sq_free() >= n {
                return Ok(());
            }
            self.reap();
            match self.enter_raw(0, None) {
                Ok(()) => {}
                Err(e) if is_transient_enter_error(&e) => refused = Some(e),
                Err(e) => return Err(e),
            }
        }
        if self.sq_free() >= n {
            return Ok(());
        }
        let e = refused.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EBUSY));
        Err(io::Error::new(
            e.kind(),
            format!(
                "io_uring_enter kept refusing submissions ({e}) after {ROOM_TRIES} tries \
                 with completions reaped; {} writes stay queued",
                self.unsubmitted
            ),
        ))
    }

    fn sq_free(&mut self) -> usize {
        let sq = self.ring.submission();
        sq.capacity() - sq.len()
    }

    /// Zero-copy sends whose notification has not arrived.
    pub(crate) fn notifs_pending(&self) -> usize {
        self.zc.len()
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
        match self.enter_raw(want, timeout) {
            // Timed out, interrupted, or the CQ is backed up and must be
            // reaped first: the caller reaps and comes back.
            Err(e) if is_transient_enter_error(&e) => Ok(()),
            res => res,
        }
    }

    /// `enter`, reporting every error.
    fn enter_raw(&mut self, want: usize, timeout: Option<Duration>) -> io::Result<()> {
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
        // Failed or not, the kernel has taken SQEs from the head or not.
        self.unsubmitted = self.ring.submission().len();
        match res {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Err(io::Error::new(
                e.kind(),
                "io_uring ring used from another task: a Mover's ring has a single \
                 issuer (IORING_SETUP_SINGLE_ISSUER), the thread that built it \
                 (after fork(2) the child must build its own)",
            )),
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
        // Completions reaped earlier (making room) count as ready.
        let need = min.max(1).saturating_sub(self.reaped.len());
        let ready = self.ring.completion().len();
        // Notifications count too: Drop waits for them.
        let outstanding = self.in_flight + self.zc_done;
        let want = if need == 0 || ready >= need {
            0
        } else {
            need.min(outstanding + self.wake_armed())
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
        self.reap();
        events.append(&mut self.reaped);
        self.rearm_wake()
    }

    /// See `Driver::pollable_fd`: the eventfd registered with the ring
    /// (see `poll_efd`), created and registered on the first call. If that
    /// fails, the ring's fd, and the next `wait` returns the error.
    pub(crate) fn pollable_fd(&self) -> Option<BorrowedFd<'_>> {
        let efd = self.poll_efd.get_or_init(|| {
            use nix::sys::eventfd::{EfdFlags, EventFd};
            let registered =
                EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                    .map_err(io::Error::from)
                    .and_then(|efd| {
                        self.ring.submitter().register_eventfd(efd.as_raw_fd())?;
                        Ok(efd)
                    });
            match registered {
                Ok(efd) => Some(efd),
                Err(e) => {
                    self.poll_error.set(Some(io::Error::new(
                        e.kind(),
                        format!(
                            "registering an eventfd with the io_uring ring \
                             (IORING_REGISTER_EVENTFD) for an event loop to poll: {e}; \
                             the ring fd polled instead may not wake the loop"
                        ),
                    )));
                    None
                }
            }
        });
        Some(match efd {
            Some(efd) => efd.as_fd(),
            None => self.ring.as_fd(),
        })
    }

    /// See `Driver::poll_ready`: consumes the eventfd's count first (so a
    /// signal from anything queued after this enter is kept), then `wait`
    /// with a zero timeout, which enters the kernel to run deferred task
    /// work when any is possible.
    pub(crate) fn poll_ready(&mut self, events: &mut Vec<Event>) -> io::Result<()> {
        if let Some(e) = self.poll_error.take() {
            return Err(e);
        }
        if let Some(Some(efd)) = self.poll_efd.get() {
            // EAGAIN: nothing was signalled since the last read.
            let _ = efd.read();
        }
        self.wait(1, Some(Duration::ZERO), events)
    }

    /// Takes every posted completion into `events`, without entering.
    pub(crate) fn reap_posted(&mut self, events: &mut Vec<Event>) {
        self.reap();
        events.append(&mut self.reaped);
    }

    /// Takes every posted completion off the CQ ring into `self.reaped`,
    /// freeing its slot.
    fn reap(&mut self) {
        for cqe in self.ring.completion() {
            let user_data = cqe.user_data();
            if user_data == IGNORED {
                self.cq_owed = self.cq_owed.saturating_sub(1);
                continue;
            }
            // The wake fd's poll posts one CQE per wake, outside `cq_owed`:
            // wakes are rare next to writes, and the CQ keeps an SQ's worth
            // of slack beyond what writes may use.
            if user_data == WAKE_TOKEN {
                wake_cqe(&mut self.wake, cqe.result(), cqe.flags(), &mut self.reaped);
                continue;
            }
            let token = if user_data & ZC_BIT != 0 {
                let Some(zc) = self.zc.get_mut(&user_data) else {
                    self.cq_owed = self.cq_owed.saturating_sub(1);
                    continue;
                };
                let token = zc.token;
                if cqueue::notif(cqe.flags()) {
                    // The kernel is done with the buffers: release them.
                    if zc.done {
                        self.zc_done -= 1;
                    }
                    self.zc.remove(&user_data);
                    self.cq_owed = self.cq_owed.saturating_sub(1);
                    let copied = (cqe.result() as u32) & NOTIF_USAGE_ZC_COPIED != 0;
                    self.reaped.push(Event::Notified { token, copied });
                    continue;
                }
                if cqueue::more(cqe.flags()) {
                    zc.done = true;
                    self.zc_done += 1;
                    self.cq_owed = self.cq_owed.saturating_sub(1);
                } else {
                    // No notification follows (the send failed early).
                    self.zc.remove(&user_data);
                    self.cq_owed = self.cq_owed.saturating_sub(2);
                }
                token
            } else {
                self.cq_owed = self.cq_owed.saturating_sub(1);
                user_data
            };
            self.in_flight -= 1;
            let res = if cqe.result() < 0 {
                Err(io::Error::from_raw_os_error(-cqe.result()))
            } else {
                let n = cqe.result() as usize;
                if let Some(pos) = self.positions.get_mut(&token) {
                    *pos += n as u64;
                }
                Ok(n)
            };
            self.reaped.push(Event::Done { token, res });
        }
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
            self.cq_room_for_cancel()?;
            self.make_room(1)?;
            let entry = opcode::AsyncCancel::new(target).build().user_data(IGNORED);
            // SAFETY: ASYNC_CANCEL points at no buffer.
            unsafe { self.ring.submission().push(&entry) }.map_err(|_| {
                io::Error::other("io_uring submission queue full after making room")
            })?;
            self.unsubmitted += 1;
            self.stats.sqes += 1;
            self.cq_owed += 1;
        }
        Ok(())
    }

    /// Writes never use the last SQ's worth of the CQ, so the first cancel
    /// always has a slot; later ones wait for earlier cancels (which
    /// complete at once, with their targets) to free theirs.
    fn cq_room_for_cancel(&mut self) -> io::Result<()> {
        for _ in 0..100 {
            self.reap();
            if self.cq_owed < self.cq_entries {
                return Ok(());
            }
            self.enter(1, Some(Duration::from_millis(50)))?;
        }
        Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "io_uring completion queue stays full: cannot queue a cancellation",
        ))
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
        self.make_room(1)?;
        // SAFETY: POLL_ADD points at no buffer; the wake fd stays open for
        // as long as the engine (it owns the Waker that owns the fd), and
        // closing it with the poll armed is safe anyway (the kernel holds
        // its own reference to the file).
        unsafe { self.ring.submission().push(&entry) }
            .map_err(|_| io::Error::other("io_uring submission queue full after making room"))?;
        self.unsubmitted += 1;
        self.stats.sqes += 1;
        Ok(())
    }
}
