//! The io_uring backend: many connections on one ring.
//!
//! Per connection, one operation at a time:
//! 1. `IORING_OP_POLL_ADD` (POLLIN) on the socket. An idle connection waits
//!    here, in the kernel's poll machinery, not in an io-wq worker: every
//!    `IORING_OP_SPLICE` is punted to io-wq (`REQ_F_FORCE_ASYNC`, see
//!    `io_uring/splice.c`), where a splice on an empty socket would block.
//! 2. `IORING_OP_SPLICE` socket → pipe, `SPLICE_F_NONBLOCK | SPLICE_F_MOVE`
//!    on a non-blocking socket. `-EAGAIN` goes back to 1.
//! 3. `IORING_OP_SPLICE` pipe → file at an explicit offset for exactly the
//!    count step 2 moved (not linked: a short first splice would cancel a
//!    linked second one), repeated while short; then step 2 again.
//!
//! On rings without `IORING_OP_SPLICE` (before Linux 5.7), step 1 is
//! followed by `splice(2)` in this thread instead (a recorded fallback).
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};

use super::pipe::{Pipe, PipePool};
use super::readiness::{pump_splice, Pump};
use super::{next_timeout, peek_more, Conn, Event, Failure, Listen, PipeReport, RecvOptions, Want};
use crate::backend::OpFallback;
use crate::opcode::Opcode;
use crate::probe::RingSupport;

/// `user_data` of the listener's poll.
const LISTENER_UD: u64 = u64::MAX;
/// `user_data` of cancellations (their results are not needed).
const CANCEL_UD: u64 = u64::MAX - 1;
/// `user_data` of wake-up timeouts on rings without `IORING_FEAT_EXT_ARG`.
const TIMEOUT_UD: u64 = u64::MAX - 2;

/// The operation a connection has in flight; the low two bits of its
/// `user_data` (the connection id is in the rest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Poll = 0,
    SpliceIn = 1,
    SpliceOut = 2,
}

impl Op {
    fn user_data(self, id: u64) -> u64 {
        (id << 2) | self as u64
    }

    fn from_user_data(ud: u64) -> Option<(u64, Op)> {
        let op = match ud & 3 {
            0 => Op::Poll,
            1 => Op::SpliceIn,
            2 => Op::SpliceOut,
            _ => return None,
        };
        Some((ud >> 2, op))
    }
}

/// One connection on the ring. It owns every fd its in-flight operation
/// names (socket, pipe, file), and is dropped only when `in_flight` is
/// `None`: io-wq resolves a SPLICE's fds when it runs the request, so they
/// must stay open until the completion arrives.
#[derive(Debug)]
struct RingConn {
    conn: Conn,
    socket: OwnedFd,
    pipe: Option<Pipe>,
    /// Bytes in `pipe` not yet in the file.
    in_pipe: usize,
    in_flight: Option<Op>,
    /// Set when the connection must end once `in_flight` completes.
    closing: Option<Failure>,
}

/// Many connections on one ring.
///
/// Field order matters: `ring` is dropped first, so the kernel tears down
/// its requests before the connections' fds close.
pub(crate) struct UringEngine {
    ring: IoUring,
    conns: HashMap<u64, RingConn>,
    pool: PipePool,
    options: RecvOptions,
    /// `IORING_OP_SPLICE` is supported on this ring.
    splice_op: bool,
    listen: Option<Listen>,
    listener_armed: bool,
    /// Wake-up timeouts in flight (rings without EXT_ARG); each owns its
    /// `Timespec` until its completion. Boxed: the kernel holds the address,
    /// which must not move when the `Vec` grows.
    #[allow(clippy::vec_box)]
    timeouts: Vec<Box<types::Timespec>>,
}

impl UringEngine {
    pub(crate) fn new(options: RecvOptions) -> io::Result<UringEngine> {
        let ring = IoUring::builder().setup_cqsize(4096).build(256)?;
        let splice_op = RingSupport::detect().supports(Opcode::SPLICE);
        let pool = PipePool::new(options.pipe_size);
        Ok(UringEngine {
            ring,
            conns: HashMap::new(),
            pool,
            options,
            splice_op,
            listen: None,
            listener_armed: false,
            timeouts: Vec::new(),
        })
    }

    pub(crate) fn fallbacks(&self) -> Vec<OpFallback> {
        if self.splice_op {
            Vec::new()
        } else {
            vec![OpFallback {
                op: Opcode::SPLICE,
                instead: "splice(2) after readiness",
            }]
        }
    }

    /// Behaves as on a ring without `IORING_OP_SPLICE` (tests of the
    /// fallback on kernels that have it).
    #[cfg(test)]
    pub(crate) fn pretend_no_splice_op(&mut self) {
        self.splice_op = false;
    }

    pub(crate) fn pipes(&self) -> PipeReport {
        self.pool.report()
    }

    pub(crate) fn listen(&mut self, listen: Listen) -> io::Result<()> {
        self.listen = Some(listen);
        self.listener_armed = false;
        Ok(())
    }

    pub(crate) fn is_listening(&self) -> bool {
        self.listen.is_some()
    }

    pub(crate) fn active(&self) -> usize {
        self.conns.len()
    }

    pub(crate) fn conns(&self) -> impl Iterator<Item = &Conn> {
        self.conns.values().map(|c| &c.conn)
    }

    pub(crate) fn attach(&mut self, conn: Conn, socket: OwnedFd) -> io::Result<()> {
        let id = conn.id.0;
        self.conns.insert(
            id,
            RingConn {
                conn,
                socket,
                pipe: None,
                in_pipe: 0,
                in_flight: None,
                closing: None,
            },
        );
        let armed = self.arm_poll(id);
        if armed.is_err() {
            self.conns.remove(&id);
        }
        armed
    }

    /// Queues `entry`, submitting first when the submission queue is full.
    ///
    /// # Safety
    /// Every fd and buffer `entry` names must stay valid until its
    /// completion is reaped.
    unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the caller guarantees what `entry` names outlives it.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    fn arm_poll(&mut self, id: u64) -> io::Result<()> {
        let Some(c) = self.conns.get_mut(&id) else {
            return Ok(());
        };
        let fd = c.socket.as_raw_fd();
        c.in_flight = Some(Op::Poll);
        let entry = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .build()
            .user_data(Op::Poll.user_data(id));
        // SAFETY: the socket is owned by the connection, which is not
        // dropped while `in_flight` is set; POLL_ADD names no buffer.
        unsafe { self.push(&entry) }
    }

    fn splice_in(&mut self, id: u64, len: usize) -> io::Result<()> {
        let Some(c) = self.conns.get_mut(&id) else {
            return Ok(());
        };
        let Some(pipe) = &c.pipe else {
            return Err(io::Error::other("splice without a pipe"));
        };
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        let entry = opcode::Splice::new(
            types::Fd(c.socket.as_raw_fd()),
            -1,
            types::Fd(pipe.wr.as_raw_fd()),
            -1,
            len,
        )
        .flags(libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE)
        .build()
        .user_data(Op::SpliceIn.user_data(id));
        c.in_flight = Some(Op::SpliceIn);
        // SAFETY: socket and pipe are owned by the connection, which keeps
        // both until the completion (`in_flight`); no buffer is named.
        unsafe { self.push(&entry) }
    }

    fn splice_out(&mut self, id: u64) -> io::Result<()> {
        let Some(c) = self.conns.get_mut(&id) else {
            return Ok(());
        };
        let Some(pipe) = &c.pipe else {
            return Err(io::Error::other("splice without a pipe"));
        };
        let off =
            i64::try_from(c.conn.written).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        let len = u32::try_from(c.in_pipe).unwrap_or(u32::MAX);
        let entry = opcode::Splice::new(
            types::Fd(pipe.rd.as_raw_fd()),
            -1,
            types::Fd(c.conn.file.as_raw_fd()),
            off,
            len,
        )
        .flags(libc::SPLICE_F_MOVE)
        .build()
        .user_data(Op::SpliceOut.user_data(id));
        c.in_flight = Some(Op::SpliceOut);
        // SAFETY: pipe and file are owned by the connection, which keeps
        // both until the completion (`in_flight`); no buffer is named.
        unsafe { self.push(&entry) }
    }

    /// Asks the kernel to cancel connection `id`'s operation in flight.
    fn cancel(&mut self, id: u64, op: Op) -> io::Result<()> {
        let entry = opcode::AsyncCancel::new(op.user_data(id))
            .build()
            .user_data(CANCEL_UD);
        // SAFETY: ASYNC_CANCEL names no fd or buffer, only a user_data.
        unsafe { self.push(&entry) }
    }

    pub(crate) fn wait(
        &mut self,
        timeout: Option<Duration>,
        events: &mut Vec<Event>,
    ) -> io::Result<()> {
        if let (Some(l), false) = (&self.listen, self.listener_armed) {
            let entry =
                opcode::PollAdd::new(types::Fd(l.listener.as_raw_fd()), libc::POLLIN as u32)
                    .build()
                    .user_data(LISTENER_UD);
            // SAFETY: the listener's file is taken by POLL_ADD at submission
            // and held by the kernel; no buffer is named.
            unsafe { self.push(&entry)? };
            self.listener_armed = true;
        }
        let idle = self.options.idle_timeout;
        let now = Instant::now();
        let timeout = next_timeout(
            timeout,
            self.conns
                .values()
                .filter(|c| c.closing.is_none())
                .filter_map(|c| c.conn.idle_deadline(idle)),
            now,
        );
        self.enter(timeout)?;

        let cqes: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (ud, res) in cqes {
            match ud {
                LISTENER_UD => {
                    self.listener_armed = false;
                    if let Some(l) = &mut self.listen {
                        if !l.accept_all(events) {
                            self.listen = None;
                        }
                    }
                }
                CANCEL_UD => {}
                TIMEOUT_UD => {
                    self.timeouts.pop();
                }
                _ => {
                    if let Some((id, op)) = Op::from_user_data(ud) {
                        self.complete(id, op, res, events)?;
                    }
                }
            }
        }

        if let Some(d) = idle {
            let now = Instant::now();
            let expired: Vec<u64> = self
                .conns
                .iter()
                // Only a connection waiting for data is idle; one with a
                // splice in flight is moving bytes.
                .filter(|(_, c)| {
                    c.closing.is_none() && matches!(c.in_flight, None | Some(Op::Poll))
                })
                .filter(|(_, c)| c.conn.idle_deadline(Some(d)).is_some_and(|t| t <= now))
                .map(|(&k, _)| k)
                .collect();
            for id in expired {
                self.close(id, Failure::IdleTimeout(d), events)?;
            }
        }
        Ok(())
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
                // until a TIMEOUT_UD completion is reaped (and the ring is
                // dropped before `timeouts`).
                unsafe { self.push(&entry)? };
                self.timeouts.push(ts);
                self.ring.submit_and_wait(1)
            }
        };
        match result {
            Err(e) if !crate::sys::is_transient_enter_error(&e) => Err(e),
            _ => Ok(()),
        }
    }

    /// Ends connection `id` with `why`, now or once its operation completes.
    fn close(&mut self, id: u64, why: Failure, events: &mut Vec<Event>) -> io::Result<()> {
        let Some(c) = self.conns.get_mut(&id) else {
            return Ok(());
        };
        match c.in_flight {
            None => self.finish(id, Err(why), events),
            Some(op) => {
                c.closing = Some(why);
                self.cancel(id, op)
            }
        }
    }

    /// Removes connection `id` (nothing in flight) and reports it.
    fn finish(
        &mut self,
        id: u64,
        result: Result<(), Failure>,
        events: &mut Vec<Event>,
    ) -> io::Result<()> {
        if let Some(mut c) = self.conns.remove(&id) {
            if let Some(pipe) = c.pipe.take() {
                if c.in_pipe == 0 {
                    self.pool.put(pipe);
                }
            }
            events.push(Event::Finished(c.conn.finish(result)));
        }
        Ok(())
    }

    /// Handles the completion of `op` for connection `id` with result `res`.
    fn complete(&mut self, id: u64, op: Op, res: i32, events: &mut Vec<Event>) -> io::Result<()> {
        let max = self.options.max_bytes;
        let Some(c) = self.conns.get_mut(&id) else {
            return Ok(());
        };
        c.in_flight = None;
        if op == Op::SpliceOut && res > 0 {
            let n = res as usize;
            c.in_pipe = c.in_pipe.saturating_sub(n);
            c.conn.wrote(n as u64, Instant::now());
        }
        if op == Op::SpliceIn && res > 0 {
            // Counted before the closing check: a pipe with bytes in it
            // must never go back to the pool.
            c.in_pipe = res as usize;
        }
        if let Some(why) = c.closing.take() {
            return self.finish(id, Err(why), events);
        }
        let err = || io::Error::from_raw_os_error(-res);
        match op {
            Op::Poll => {
                if res < 0 {
                    return self.finish(id, Err(Failure::Read(err())), events);
                }
                if !self.splice_op {
                    return self.pump_fallback(id, events);
                }
                let pipe_cap = self.pool_cap(id)?;
                let Some(c) = self.conns.get_mut(&id) else {
                    return Ok(());
                };
                match c.conn.want(pipe_cap, max) {
                    Want::Read(len) => self.splice_in(id, len),
                    Want::Probe => {
                        let peek = peek_more(&c.socket);
                        self.release_pipe(id);
                        match peek {
                            Ok(false) => self.finish(id, Ok(()), events),
                            Ok(true) => {
                                self.finish(id, Err(Failure::Quota(max.unwrap_or(0))), events)
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.arm_poll(id),
                            Err(e) => self.finish(id, Err(Failure::from_read(e)), events),
                        }
                    }
                }
            }
            Op::SpliceIn => match res {
                0 => {
                    self.release_pipe(id);
                    self.finish(id, Ok(()), events)
                }
                n if n > 0 => self.splice_out(id),
                _ if -res == libc::EAGAIN => {
                    self.release_pipe(id);
                    self.arm_poll(id)
                }
                _ => {
                    self.release_pipe(id);
                    self.finish(id, Err(Failure::from_read(err())), events)
                }
            },
            Op::SpliceOut => {
                if res < 0 {
                    return self.finish(id, Err(Failure::Write(err())), events);
                }
                if res == 0 {
                    let e = io::Error::new(
                        io::ErrorKind::WriteZero,
                        "splice to the file moved nothing",
                    );
                    return self.finish(id, Err(Failure::Write(e)), events);
                }
                if c.in_pipe > 0 {
                    return self.splice_out(id);
                }
                // The pipe is empty: read again straight away, or probe the
                // quota after a poll.
                match c.conn.want(c.pipe.as_ref().map_or(0, |p| p.cap), max) {
                    Want::Read(len) => self.splice_in(id, len),
                    Want::Probe => {
                        self.release_pipe(id);
                        self.arm_poll(id)
                    }
                }
            }
        }
    }

    /// Gives connection `id` a pipe if it has none; returns its capacity.
    fn pool_cap(&mut self, id: u64) -> io::Result<usize> {
        let Some(c) = self.conns.get_mut(&id) else {
            return Ok(0);
        };
        if c.pipe.is_none() {
            c.pipe = Some(self.pool.take()?);
        }
        Ok(c.pipe.as_ref().map_or(0, |p| p.cap))
    }

    /// Returns connection `id`'s (empty) pipe to the pool.
    fn release_pipe(&mut self, id: u64) {
        if let Some(c) = self.conns.get_mut(&id) {
            if c.in_pipe == 0 {
                if let Some(p) = c.pipe.take() {
                    self.pool.put(p);
                }
            }
        }
    }

    /// Rings without SPLICE: `splice(2)` in this thread after readiness.
    fn pump_fallback(&mut self, id: u64, events: &mut Vec<Event>) -> io::Result<()> {
        let max = self.options.max_bytes;
        let Some(c) = self.conns.get_mut(&id) else {
            return Ok(());
        };
        match pump_splice(&mut c.conn, &c.socket, &mut self.pool, max) {
            Pump::Pending => self.arm_poll(id),
            Pump::Done(result) => self.finish(id, result, events),
        }
    }
}

impl std::fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringEngine")
            .field("conns", &self.conns.len())
            .field("pool", &self.pool)
            .field("splice_op", &self.splice_op)
            .field("listening", &self.listen.is_some())
            .finish_non_exhaustive()
    }
}
