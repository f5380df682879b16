//! Completions: each `Done` advances its connection's outbox by the exact
//! count (or fails, demotes or breaks the chain), each notification
//! teaches zero-copy, each `Writable` reschedules.

use std::io;

use super::{live_mut, schedule, Completion, Conn, ConnError, ConnState, Mover, Segmentation};
use crate::driver::Event;
use crate::sys::net::FdKind;

/// Ops a connection keeps once a chain is over and its queue is empty. A
/// datagram chain may be 128 sends long (a few hundred bytes per op), and
/// a socket that bursts once should not hold that much for good; bursts
/// of up to this many reuse their ops.
const KEPT_OPS: usize = 64;

impl Mover {
    pub(super) fn fail(
        completions: &mut Vec<Completion>,
        conn: Conn,
        st: &mut ConnState,
        error: io::Error,
    ) {
        st.failed = true;
        let unsent = st.outbox.take_unsent();
        completions.push(Completion {
            conn,
            written: 0,
            queued: 0,
            error: Some(ConnError { error, unsent }),
            writable_again: false,
        });
    }

    pub(super) fn process_events(&mut self) {
        let mut events = std::mem::take(&mut self.events);
        let copy_threshold = self.copy_threshold;
        for ev in events.drain(..) {
            match ev {
                Event::Done { token, res } => {
                    let conn = Conn::from_token(token);
                    let Some(st) = live_mut(&mut self.slots, conn) else {
                        continue;
                    };
                    if st.in_flight == 0 {
                        continue;
                    }
                    st.in_flight -= 1;
                    self.in_flight -= 1;
                    let (zero_copy, asked) = st
                        .ops
                        .get(st.done)
                        .map_or((false, 0), |op| (op.zero_copy, op.batch.bytes));
                    let (carried, segment) = st
                        .ops
                        .get(st.done)
                        .map_or((1, None), |op| (op.batch.datagrams, op.batch.segment_size));
                    st.done += 1;
                    let chain_over = st.in_flight == 0;
                    if st.failed {
                        // The dead connection's queue was handed back; the
                        // rest of its chain failed with it.
                    } else {
                        match res {
                            Ok(mut n) => {
                                if st.kind == FdKind::DatagramSocket {
                                    n = Self::sent_datagrams(st, n, asked, carried, segment);
                                } else {
                                    st.outbox.advance_into(n, &mut self.glue);
                                }
                                self.bytes += n as u64;
                                self.short_writes += u64::from(n < asked);
                                let again =
                                    st.unwritable && st.outbox.queued_bytes() <= self.watermarks.0;
                                st.unwritable &= !again;
                                self.completions.push(Completion {
                                    conn,
                                    written: n,
                                    queued: st.outbox.queued_bytes(),
                                    error: None,
                                    writable_again: again,
                                });
                            }
                            // The rest of a chain whose earlier write failed:
                            // not sent, still queued.
                            Err(e) if st.broken && e.raw_os_error() == Some(libc::ECANCELED) => {}
                            // The kernel refused GSO on this socket: off for
                            // good; the same datagrams go again one by one.
                            Err(e)
                                if segment.is_some()
                                    && matches!(
                                        e.raw_os_error(),
                                        Some(libc::EIO | libc::EINVAL | libc::EMSGSIZE)
                                    ) =>
                            {
                                st.gso = Segmentation::Refused {
                                    errno: e.raw_os_error().unwrap_or(0),
                                };
                                self.gso.disabled += 1;
                                st.broken = true;
                            }
                            // A socket that refuses zero-copy (e.g. Unix
                            // stream): demote it and resend the same bytes
                            // by copying.
                            Err(e)
                                if zero_copy
                                    && matches!(
                                        e.raw_os_error(),
                                        Some(libc::EOPNOTSUPP | libc::EINVAL)
                                    ) =>
                            {
                                st.demote_to_copy(copy_threshold);
                                st.broken = true;
                            }
                            Err(e) => Self::fail(&mut self.completions, conn, st, e),
                        }
                    }
                    if chain_over && !st.failed && !st.outbox.is_empty() {
                        schedule(&mut self.dirty, conn, st);
                    } else if chain_over {
                        // Nothing in flight reads them any more.
                        st.ops.truncate(KEPT_OPS);
                    }
                }
                Event::Notified { token, copied } => self.notified(token, copied),
                Event::Woken => self.woken(),
                Event::Writable { token } => {
                    let conn = Conn::from_token(token);
                    let Some(st) = live_mut(&mut self.slots, conn) else {
                        continue;
                    };
                    if st.in_flight > 0 {
                        // Readiness backends: the one write hit EAGAIN;
                        // retry the same, untouched op.
                        st.in_flight -= 1;
                        self.in_flight -= 1;
                        schedule(&mut self.dirty, conn, st);
                    }
                }
            }
        }
        self.events = events;
    }
}
