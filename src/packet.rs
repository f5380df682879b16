//! A packet: one message of many pieces, shared by every connection it is
//! queued on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

/// An immutable list of `Bytes` pieces (headers, payload slices) sent as one
/// unit. Cloning it, and queueing it on a connection with
/// [`Mover::send_packet`](crate::Mover::send_packet), costs one reference
/// count however many pieces it has (or, when all its pieces are under the
/// copy threshold, one copy of its bytes and no reference); sending the same packet to a thousand
/// subscribers shares one list. [`Shards::send`](crate::Shards::send) and
/// [`Group::publish`](crate::Group::publish) take the same type (also
/// `shard::Packet`) and queue it that way on each connection. Empty pieces
/// are dropped when it is built.
///
/// ```
/// use bytes::Bytes;
/// use ringmover::Packet;
/// let body = Bytes::from(vec![7u8; 4096]);
/// let pkt = Packet::new([Bytes::from_static(b"HDR1"), body.slice(..2048), Bytes::new()]);
/// assert_eq!((pkt.len(), pkt.pieces().len()), (2052, 2));
/// let for_another_subscriber = pkt.clone(); // one atomic increment
/// # drop(for_another_subscriber);
/// ```
#[derive(Clone, Default)]
pub struct Packet(Option<Arc<Inner>>);

struct Inner {
    pieces: Box<[Bytes]>,
    len: usize,
    /// The longest piece: below the copy threshold, the whole packet is
    /// copied in one go.
    max_piece: usize,
    /// The pieces glued, made the first time a shared packet of small
    /// pieces is queued: each connection then copies one run, not a
    /// piece at a time.
    glued: OnceLock<Box<[u8]>>,
    /// Set at the first copy: a packet copied again (to another
    /// connection, or the same one) is glued then. Relaxed load and store,
    /// never a locked read-modify-write: a race only glues a copy early.
    copied: AtomicBool,
}

impl Packet {
    /// A packet of `pieces`, in order; empty ones are left out.
    pub fn new<I: IntoIterator<Item = Bytes>>(pieces: I) -> Packet {
        let pieces: Box<[Bytes]> = pieces.into_iter().filter(|b| !b.is_empty()).collect();
        if pieces.is_empty() {
            return Packet(None);
        }
        let len = pieces.iter().map(Bytes::len).sum();
        let max_piece = pieces.iter().map(Bytes::len).max().unwrap_or(0);
        Packet(Some(Arc::new(Inner {
            pieces,
            len,
            max_piece,
            glued: OnceLock::new(),
            copied: AtomicBool::new(false),
        })))
    }

    /// Total bytes.
    #[inline]
    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |i| i.len)
    }

    /// No bytes at all.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    #[inline]
    pub(crate) fn max_piece(&self) -> usize {
        self.0.as_ref().map_or(0, |i| i.max_piece)
    }

    /// Copies the packet to the end of `buf`: for a packet copied more
    /// than once (a fan-out, or a packet reused), from its glued form, made
    /// once, so each copy is one `memcpy` rather than one per piece.
    #[inline]
    pub(crate) fn copy_to(&self, buf: &mut Vec<u8>) {
        let Some(inner) = &self.0 else { return };
        if let Some(glued) = inner.glued.get() {
            return buf.extend_from_slice(glued);
        }
        if inner.pieces.len() > 1
            && (Arc::strong_count(inner) > 1 || inner.copied.load(Ordering::Relaxed))
        {
            buf.extend_from_slice(inner.glued.get_or_init(|| inner.pieces.concat().into()));
            return;
        }
        inner.copied.store(true, Ordering::Relaxed);
        buf.reserve(inner.len);
        for p in inner.pieces.iter() {
            buf.extend_from_slice(p);
        }
    }

    /// The pieces, none of them empty.
    #[inline]
    pub fn pieces(&self) -> &[Bytes] {
        self.0.as_ref().map_or(&[], |i| &i.pieces)
    }
}

impl std::fmt::Debug for Packet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Packet")
            .field("len", &self.len())
            .field("pieces", &self.pieces().len())
            .finish()
    }
}

impl FromIterator<Bytes> for Packet {
    fn from_iter<I: IntoIterator<Item = Bytes>>(iter: I) -> Packet {
        Packet::new(iter)
    }
}

impl From<Bytes> for Packet {
    fn from(b: Bytes) -> Packet {
        Packet::new([b])
    }
}

impl From<Vec<Bytes>> for Packet {
    fn from(v: Vec<Bytes>) -> Packet {
        Packet::new(v)
    }
}

impl<const N: usize> From<[Bytes; N]> for Packet {
    fn from(a: [Bytes; N]) -> Packet {
        Packet::new(a)
    }
}
