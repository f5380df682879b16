//! The connection table: handles (`Conn`: slot and generation, so a
//! stale handle is never confused with a new connection), each live
//! connection's state, and the checks a send must pass.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use super::{Mover, Segmentation, SendErrorKind, ZcProbe};
use crate::driver::{Token, WriteOp};
use crate::outbox::Outbox;
use crate::sys::net::FdKind;

/// A connection attached to a [`Mover`]. Cheap to copy; stale handles (after
/// [`Mover::detach`]) are rejected, never confused with a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Conn {
    pub(super) slot: u32,
    pub(super) generation: u32,
}

impl Conn {
    pub(super) fn token(self) -> Token {
        (u64::from(self.slot) << 32) | u64::from(self.generation)
    }

    pub(super) fn from_token(t: Token) -> Conn {
        Conn {
            slot: (t >> 32) as u32,
            generation: t as u32,
        }
    }

    /// A small number unique among attached connections (for logs).
    pub fn index(self) -> u32 {
        self.slot
    }
}

/// One connection's state. The `ops` and the `outbox` together are what the
/// kernel reads while writes are in flight; see `WriteOp`'s invariant.
#[derive(Debug)]
pub(super) struct ConnState {
    pub(super) fd: OwnedFd,
    pub(super) kind: FdKind,
    pub(super) outbox: Outbox,
    /// One op per write of the current chain: a stream has one write in
    /// flight at a time; a datagram socket up to a chain of them, the
    /// `i`-th sending the `i`-th queued datagram. None is refilled until
    /// the whole chain has completed.
    // Boxed: an op's msghdr points into the op itself (its destination),
    // so it must not move when the vector grows.
    #[allow(clippy::vec_box)]
    pub(super) ops: Vec<Box<WriteOp>>,
    /// Writes started and whose `Done` was not yet seen.
    pub(super) in_flight: usize,
    /// `Done`s seen of the current chain: the next `Done` is `ops[done]`'s,
    /// since a chain's writes complete in order.
    pub(super) done: usize,
    /// A write of the current chain failed: the rest of it complete with
    /// ECANCELED, unsent, and stay queued.
    pub(super) broken: bool,
    /// In `dirty`, waiting to start.
    pub(super) scheduled: bool,
    pub(super) failed: bool,
    /// The kernel copied a zero-copy send here, or refused zero-copy on
    /// this socket: use the copy path (demoted per connection, observable
    /// in `Stats::zc_copied`).
    pub(super) copy_only: bool,
    /// `Auto`: what this connection has learnt about zero-copy.
    pub(super) zc_probe: ZcProbe,
    /// Queue reached the high watermark and not yet back to the low one.
    pub(super) unwritable: bool,
    /// Datagram sockets: whether runs of datagrams go as GSO sends.
    pub(super) gso: Segmentation,
}

impl ConnState {
    /// Worth writing now, as a `BufWriter` writes when full: a 64 KiB
    /// glued buffer just filled, or glued bytes brought the queue to its
    /// high watermark (the producer pauses there anyway), with no write of
    /// its own in flight.
    #[inline]
    pub(super) fn is_full(&mut self) -> bool {
        let full = self.outbox.take_filled() || (self.unwritable && self.outbox.glued_bytes() > 0);
        full && self.in_flight == 0
    }

    /// Zero-copy does not pay or is refused here: copy from now on, and
    /// glue small pieces queued from now on (never before: zero-copy
    /// writes need the queued `Bytes` themselves).
    pub(super) fn demote_to_copy(&mut self, copy_threshold: usize) {
        self.copy_only = true;
        self.outbox.set_copy_threshold(copy_threshold);
    }
}

#[derive(Debug, Default)]
pub(super) struct Slot {
    pub(super) generation: u32,
    pub(super) state: Option<ConnState>,
}

/// The live state behind `conn`, if the handle is current. A free function
/// over the slots so callers may hold other fields of the engine too.
#[inline]
pub(super) fn live_mut(slots: &mut [Slot], conn: Conn) -> Option<&mut ConnState> {
    let slot = slots.get_mut(conn.slot as usize)?;
    if slot.generation != conn.generation {
        return None;
    }
    slot.state.as_mut()
}

/// Why `st` refuses a send now, if it does.
#[inline]
pub(super) fn refusal(
    st: &ConnState,
    dest: Option<SocketAddr>,
    limit: usize,
) -> Option<SendErrorKind> {
    if st.failed {
        Some(SendErrorKind::Failed)
    } else if dest.is_some() && st.kind != FdKind::DatagramSocket {
        Some(SendErrorKind::NotDatagram)
    } else if st.outbox.queued_bytes() >= limit {
        Some(SendErrorKind::BackPressure {
            queued: st.outbox.queued_bytes(),
            limit,
        })
    } else {
        None
    }
}

/// Puts `conn` in line to start a write (`dirty`), unless it already is.
#[inline]
pub(super) fn schedule(dirty: &mut Vec<Conn>, conn: Conn, st: &mut ConnState) {
    if !st.scheduled {
        st.scheduled = true;
        dirty.push(conn);
    }
}

/// After a push onto `st`'s outbox: unwritable once at the high watermark,
/// and in line to start unless a write is in flight (its `Done`
/// reschedules what is left).
#[inline]
pub(super) fn queued_more(dirty: &mut Vec<Conn>, conn: Conn, st: &mut ConnState, high: usize) {
    st.unwritable |= st.outbox.queued_bytes() >= high;
    if st.in_flight == 0 {
        schedule(dirty, conn, st);
    }
}

impl Mover {
    pub(super) fn state(&self, conn: Conn) -> Option<&ConnState> {
        let slot = self.slots.get(conn.slot as usize)?;
        if slot.generation != conn.generation {
            return None;
        }
        slot.state.as_ref()
    }
}
