//! Datagram sockets: UDP GSO (`Segmentation`, its counters), queueing a
//! buffer as many datagrams (`send_segments`), and releasing what a
//! datagram write carried. Chains of datagram writes are filled in
//! `start.rs` with every other write.

use std::net::SocketAddr;

use bytes::Bytes;

use super::{live_mut, queued_more, refusal, Conn, ConnState, Mover, SendError, SendErrorKind};
use crate::sys::net::FdKind;

/// Whether a datagram socket sends runs of equal-size datagrams to one
/// destination as one GSO `sendmsg` (`UDP_SEGMENT`, Linux 4.18).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Segmentation {
    /// Up to 64 datagrams (64 KiB) per send.
    On,
    /// Never tried: not a UDP socket, not Linux, the socket refused the
    /// `UDP_SEGMENT` probe at attach, or [`MoverBuilder::gso`](super::MoverBuilder::gso) is off.
    Off,
    /// The kernel refused a GSO send on this socket with this errno (EIO:
    /// the device cannot; EINVAL: e.g. `SO_NO_CHECK`; EMSGSIZE: segments
    /// above the path MTU). Off for good; the datagrams went again one by
    /// one, none lost or repeated.
    Refused {
        /// The errno of the refused send.
        errno: i32,
    },
}

/// The engine's GSO switch and counters (see [`Stats`]).
#[derive(Debug, Default)]
pub(super) struct GsoCounters {
    /// [`MoverBuilder::gso`]: probe datagram sockets at attach.
    pub(super) enabled: bool,
    pub(super) sends: u64,
    pub(super) datagrams: u64,
    pub(super) disabled: u64,
}

impl Mover {
    /// Queues `bufs` as datagrams of `segment_size` bytes each (the last
    /// may be shorter), cut without copying: quinn-udp's `Transmit` with a
    /// `segment_size`, so a caller with one buffer of many packets need
    /// not queue them one by one. To `dest`, or the connected peer. With
    /// GSO on ([`Mover::segmentation`]) they leave in as few sends as the
    /// kernel allows (64 datagrams, 64 KiB each); otherwise one by one.
    /// Empty `bufs` queue nothing. Refuses (buffers back, untouched) as
    /// `send_to` does, and with `NotDatagram` on a stream or file.
    pub fn send_segments<I: IntoIterator<Item = Bytes>>(
        &mut self,
        conn: Conn,
        bufs: I,
        segment_size: std::num::NonZeroUsize,
        dest: Option<SocketAddr>,
    ) -> Result<(), SendError<I>> {
        let limit = self.max_queued;
        let refuse = match self.state(conn) {
            None => Some(SendErrorKind::UnknownConn),
            Some(st) if st.kind != FdKind::DatagramSocket && !st.failed => {
                Some(SendErrorKind::NotDatagram)
            }
            Some(st) => refusal(st, dest, limit),
        };
        if let Some(kind) = refuse {
            return Err(SendError { kind, bufs });
        }
        let size = segment_size.get();
        let (mut datagram, mut room) = (Vec::new(), size);
        for mut b in bufs {
            while !b.is_empty() {
                let piece = b.split_to(room.min(b.len()));
                room -= piece.len();
                datagram.push(piece);
                if room == 0 {
                    self.push_datagram(conn, std::mem::take(&mut datagram), dest);
                    room = size;
                }
            }
        }
        if !datagram.is_empty() {
            self.push_datagram(conn, datagram, dest);
        }
        Ok(())
    }

    /// Queues one datagram on a live datagram socket, past the checks.
    fn push_datagram(&mut self, conn: Conn, bufs: Vec<Bytes>, dest: Option<SocketAddr>) {
        let high = self.watermarks.1;
        let Some(st) = live_mut(&mut self.slots, conn) else {
            return;
        };
        st.outbox.push(bufs, dest);
        queued_more(&mut self.dirty, conn, st, high);
    }

    /// Whether `conn` (a datagram socket) sends with GSO, and if the kernel
    /// refused it, why (`None` if unknown).
    pub fn segmentation(&self, conn: Conn) -> Option<Segmentation> {
        self.state(conn).map(|s| s.gso)
    }

    /// A datagram write of `carried` datagrams (`segment`: its GSO segment
    /// size) moved `n` bytes of `asked`: releases the datagrams sent and
    /// returns their bytes. UDP sends all or nothing, so `n == asked`; a
    /// short count (none is known) releases only the whole segments it
    /// covers, leaves the rest queued, and breaks the chain (on io_uring
    /// the rest of it is cancelled: datagram sends carry `MSG_WAITALL`), so
    /// nothing is lost or sent twice.
    pub(super) fn sent_datagrams(
        st: &mut ConnState,
        n: usize,
        asked: usize,
        carried: usize,
        segment: Option<u16>,
    ) -> usize {
        let (count, bytes) = match segment {
            Some(size) if n < asked => {
                let whole = (n / usize::from(size)).min(carried);
                st.broken = true;
                (whole, whole * usize::from(size))
            }
            // A single datagram is never split.
            _ => (carried, asked),
        };
        st.outbox.advance_datagrams(count);
        bytes
    }
}
