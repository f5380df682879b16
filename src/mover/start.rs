//! Starting writes: each scheduled connection's next write (a stream's
//! one, a datagram socket's chain), sealing glued buffers, the zero-copy
//! choice, and the one `unsafe` call that hands the driver buffers the
//! engine owns until their completions.
// The one unsafe call here starts a write whose buffers this module owns:
// it is where the in-flight invariant is kept, so it is where it is stated.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::AsRawFd;

use super::{live_mut, Conn, Mover, Segmentation, ZeroCopy};
use crate::driver::WriteOp;
use crate::outbox::{DatagramAt, GSO_MAX_SEGMENTS, IOV_MAX};
use crate::sys::net::FdKind;

/// What `Mover::start` did for one connection.
pub(super) enum Started {
    /// Writes started.
    Yes,
    /// Nothing to start (empty, failed, or a write already in flight).
    Nothing,
    /// The driver has no room now (io_uring: its completion queue is
    /// spoken for): the connection stays scheduled.
    NoRoom,
}

/// Glued bytes from which a write is submitted at once rather than with
/// the rest of its flush (see `start_dirty`). Measured (small packets,
/// 1000 connections 64 KiB deep, io_uring): 0.477 CPU-s/GB submitting each
/// such write, 0.543 submitting once per flush. Lock-step flushes of small
/// packets glue far less per connection and keep one enter per flush.
const SUBMIT_GLUED_BYTES: usize = 32 << 10;

/// Bytes of writes started since the last submission from which the next
/// is submitted at once, so one `io_uring_enter` never copies a whole
/// flush of large writes in one go while the peers' reads wait. Measured
/// (SRS shape, 1000 connections, 2 threads, io_uring): 0.20–0.22 CPU-s/GB
/// with one enter per flush (78 MB each), 0.14–0.17 with a bound of
/// 512 KiB, 2 MiB or 8 MiB alike.
const SUBMIT_BYTES: usize = 1 << 20;

impl Mover {
    /// Starts every scheduled connection; readiness backends finish writes
    /// inline, so their events are processed (and resumptions started) here.
    /// Connections not started (no room, or an error) stay scheduled, first
    /// in line, so an error strands nothing: the next flush, wait or
    /// flush_and_wait starts them.
    pub(super) fn start_dirty(&mut self) -> io::Result<usize> {
        let mut started = 0;
        while !self.dirty.is_empty() {
            let mut dirty = std::mem::take(&mut self.dirty);
            let mut next = 0;
            let outcome = loop {
                let Some(&conn) = dirty.get(next) else {
                    break Ok(true);
                };
                match self.start(conn, dirty.len() - next) {
                    Ok(Started::Yes) => {
                        started += 1;
                        // A write that carries many glued bytes goes to the
                        // kernel now, which copies them at submission:
                        // while they are still in cache, not after the rest
                        // of the flush has started its own (tens of MiB for
                        // a thousand busy connections).
                        if std::mem::take(&mut self.submit_now) {
                            self.unsubmitted = 0;
                            if let Err(e) = self.driver.submit() {
                                next += 1;
                                break Err(e);
                            }
                        }
                    }
                    Ok(Started::Nothing) => {}
                    Ok(Started::NoRoom) => break Ok(false),
                    Err(e) => break Err(e),
                }
                next += 1;
            };
            if next < dirty.len() {
                let mut rest = dirty.split_off(next);
                rest.append(&mut self.dirty);
                self.dirty = rest;
            }
            self.process_events();
            match outcome {
                Ok(true) => {}
                // Completions (in `wait`) make room; don't spin here.
                Ok(false) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(started)
    }

    /// After a send that made `conn` full (`ConnState::is_full`): starts
    /// its write now, so the kernel copies the glued bytes while in cache;
    /// the rest of its queue waits for `flush` as usual. An error leaves it
    /// scheduled for `flush`, which reports it.
    pub(super) fn start_filled(&mut self, conn: Conn) {
        match self.start(conn, 1) {
            Ok(Started::Yes) => {
                self.submit_now = false;
                self.unsubmitted = 0;
                // A write the kernel finished at submission frees its
                // glued buffer now, for the next connection to fill while
                // it is in cache.
                if self.driver.submit().is_ok() {
                    self.driver.reap_posted(&mut self.events);
                    self.process_events();
                }
            }
            // Still in `dirty` (a send with nothing in flight schedules),
            // and marked so: `flush` retries and reports.
            Ok(Started::Nothing | Started::NoRoom) | Err(_) => {}
        }
    }

    /// Starts `conn`'s next write, or for a datagram socket a chain of them
    /// (as long as the driver allows with `waiting` connections, this one
    /// included, in line). Counts in flight only what the driver started;
    /// otherwise leaves the connection scheduled (`NoRoom`, or the error).
    fn start(&mut self, conn: Conn, waiting: usize) -> io::Result<Started> {
        let Some(st) = live_mut(&mut self.slots, conn) else {
            return Ok(Started::Nothing);
        };
        st.scheduled = false;
        if st.failed || st.in_flight > 0 || st.outbox.is_empty() {
            return Ok(Started::Nothing);
        }
        let datagram = st.kind == FdKind::DatagramSocket;
        if datagram && st.outbox.front_pieces() > IOV_MAX {
            let msg = format!("datagram of more than {IOV_MAX} pieces");
            Self::fail(
                &mut self.completions,
                conn,
                st,
                io::Error::new(io::ErrorKind::InvalidInput, msg),
            );
            return Ok(Started::Nothing);
        }
        let want = if datagram {
            st.outbox.queued_messages()
        } else {
            1
        };
        // A zero-copy send owes two completions (its notification).
        let may_zero_copy =
            st.kind.is_socket() && !st.copy_only && self.zero_copy != ZeroCopy::Never;
        let cost = 1 + usize::from(may_zero_copy);
        let chain = self.driver.room(want, cost, waiting, &mut self.events);
        if chain == 0 {
            st.scheduled = true;
            return Ok(Started::NoRoom);
        }
        if !datagram {
            // What was glued goes to the kernel while in cache.
            st.outbox.seal();
            self.submit_now |= st.outbox.glued_bytes() >= SUBMIT_GLUED_BYTES;
        }
        // How many ops to fill: a chain stops before a datagram too big to
        // send in one call (it fails the connection once it is the front).
        // With GSO on, an op carries a run of datagrams.
        let segments = match st.gso {
            Segmentation::On => GSO_MAX_SEGMENTS,
            _ => 1,
        };
        let (mut n, mut next) = (0, DatagramAt::default());
        while n < chain {
            if st.ops.len() == n {
                st.ops.push(WriteOp::new());
            }
            // Nothing is in flight (checked above): every op may be refilled.
            let op = &mut st.ops[n];
            let filled = if datagram {
                op.fill_datagrams(&st.outbox, &mut next, segments).is_some()
            } else {
                op.fill(&st.outbox);
                true
            };
            if !filled {
                break;
            }
            n += 1;
        }
        if n == 0 {
            return Ok(Started::Nothing);
        }
        st.done = 0;
        st.broken = false;
        let probe_before = st.zc_probe;
        let mut first = DatagramAt::default();
        for i in 0..n {
            let batch_bytes = st.ops[i].batch.bytes;
            // A GSO send copies: SENDMSG_ZC with UDP_SEGMENT fails with
            // EMSGSIZE (seen on 6.18), and for datagrams small enough to
            // share a send, GSO is the saving that matters.
            // A gluing outbox (threshold set) has copies with no `Bytes`
            // to hold: it is never sent zero-copy (`demote_to_copy`).
            let zero_copy = may_zero_copy
                && st.outbox.copy_threshold() == 0
                && st.ops[i].batch.segment_size.is_none()
                && st.zc_probe.wants(self.zero_copy, batch_bytes);
            let op = &mut st.ops[i];
            op.zero_copy = zero_copy;
            op.fixed = None;
            op.hold.clear();
            // Only a zero-copy send needs to know where its datagrams start.
            let at = first;
            if datagram && may_zero_copy {
                first = st.outbox.after(first, op.batch.datagrams);
            }
            if zero_copy {
                if datagram {
                    op.hold
                        .extend(st.outbox.datagrams_bufs(at, op.batch.datagrams).cloned());
                } else {
                    op.hold.extend(st.outbox.front_bufs(IOV_MAX).cloned());
                }
                if let ([iov], Some(pool)) = (op.iovecs(), &self.pool) {
                    op.fixed = pool.index_of(iov.iov_base as *const u8, iov.iov_len);
                }
            }
        }
        // SAFETY: `st.ops[..n]` are boxed and none is touched again until
        // every `Done` of this chain has been seen (`in_flight` back to 0);
        // the `Bytes` (and glued buffers, sealed above so no later `send`
        // grows or moves them) their iovecs point at stay in `st.outbox`,
        // which only
        // advances on these writes' `Done`s; `Drop` and `detach` wait for
        // every in-flight write before freeing either. On error nothing was
        // started.
        let res = unsafe {
            self.driver.start(
                conn.token(),
                st.fd.as_raw_fd(),
                st.kind,
                &mut st.ops[..n],
                &mut self.events,
            )
        };
        if let Err(e) = res {
            // Not started: no holds kept, no probe under way, still queued.
            st.ops[..n].iter_mut().for_each(|op| op.hold.clear());
            st.zc_probe = probe_before;
            st.scheduled = true;
            return Err(e);
        }
        let bytes: usize = st.ops[..n].iter().map(|op| op.batch.bytes).sum();
        self.unsubmitted += bytes;
        if self.unsubmitted >= SUBMIT_BYTES {
            self.submit_now = true;
        }
        st.in_flight += n;
        self.in_flight += n;
        self.writes += n as u64;
        for op in st.ops[..n]
            .iter()
            .filter(|op| op.batch.segment_size.is_some())
        {
            self.gso.sends += 1;
            self.gso.datagrams += op.batch.datagrams as u64;
        }
        Ok(Started::Yes)
    }
}
