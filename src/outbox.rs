//! The backend-neutral core: a per-connection queue of `Bytes` and
//! [`Packet`]s, its iovec view (small pieces optionally glued into one
//! buffer), and partial-write accounting. No syscalls, no `unsafe`: every
//! backend and the blocking helper share this one implementation, and its
//! tests need no kernel.

use std::collections::VecDeque;
use std::net::SocketAddr;

use bytes::Bytes;

use crate::packet::Packet;

/// Linux `IOV_MAX`: at most this many iovecs per `writev`/`sendmsg` call.
pub const IOV_MAX: usize = 1024;

/// How queued bytes are cut when written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// One continuous byte sequence (TCP, Unix stream, files, pipes).
    Stream,
    /// Each `push` is one message, written whole or not at all (UDP).
    Datagram,
}

/// What `Outbox::fill_iovecs` put in its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Batch {
    /// Bytes the iovecs cover.
    pub(crate) bytes: usize,
    /// Number of iovecs.
    pub(crate) iovecs: usize,
    /// Destination of the datagram (`None`: the connected peer, or a stream).
    pub(crate) dest: Option<SocketAddr>,
    /// Datagrams the iovecs carry (0 for a stream).
    pub(crate) datagrams: usize,
    /// Set when they are more than one (see [`Outbox::fill_datagrams`]):
    /// every datagram but the last is exactly this long, the last no
    /// longer: UDP GSO's segment size.
    pub(crate) segment_size: Option<u16>,
}

/// Where a queued datagram starts: its place among the queued messages
/// and its first queue entry. Filling a chain walks forward from the
/// front with one, so each datagram is found in constant time rather
/// than by summing the entries of every message before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct DatagramAt {
    pub(crate) message: usize,
    pub(crate) entry: usize,
}

/// Most datagrams one GSO send carries: the kernel's `UDP_MAX_SEGMENTS`
/// (64; recent kernels allow 128), quinn-udp's limit too.
pub const GSO_MAX_SEGMENTS: usize = 64;

/// Most payload bytes one GSO send carries: what fits one IPv6 UDP
/// packet's length field (65535 less the 8-byte UDP header) less an IPv4
/// header, so it fits either family.
pub const GSO_MAX_BYTES: usize = 65_535 - 8 - 20;

/// One queued datagram: the next `bufs` entries of the queue.
#[derive(Debug, Clone, Copy)]
struct Message {
    /// Non-empty `Bytes` entries in this message.
    bufs: usize,
    /// Bytes in this message.
    bytes: usize,
    dest: Option<SocketAddr>,
}

/// One queued item: a `Bytes`, a whole packet held by one reference, or
/// small pieces copied into one buffer (glued).
#[derive(Debug)]
enum Entry {
    One(Bytes),
    Packet(Packet),
    Glued(Vec<u8>),
}

impl Entry {
    fn len(&self) -> usize {
        match self {
            Entry::One(b) => b.len(),
            Entry::Packet(p) => p.len(),
            Entry::Glued(v) => v.len(),
        }
    }

    /// Pieces: a glued buffer is one.
    fn count(&self) -> usize {
        match self {
            Entry::Packet(p) => p.pieces().len(),
            Entry::One(_) | Entry::Glued(_) => 1,
        }
    }

    fn piece(&self, i: usize) -> &[u8] {
        match self {
            Entry::One(b) => b,
            Entry::Packet(p) => &p.pieces()[i],
            Entry::Glued(v) => v,
        }
    }

    /// The referenced `Bytes` (none for a glued buffer, which is never
    /// sent zero-copy nor queued on a datagram socket).
    fn referenced(&self) -> &[Bytes] {
        match self {
            Entry::One(b) => std::slice::from_ref(b),
            Entry::Packet(p) => p.pieces(),
            Entry::Glued(_) => &[],
        }
    }
}

/// Answers true for memory that must never be copied (registered buffers).
pub type NeverCopy<'a> = dyn Fn(&[u8]) -> bool + 'a;

/// Most bytes one glued buffer holds, so one write's copies stay in cache
/// and an idle connection's buffers stay small.
pub const STAGE_CAP: usize = 64 << 10;

/// Emptied glued buffers kept for reuse, the most recently written on top:
/// the next connection to glue writes into memory still in cache, as a
/// writer that glues into one buffer does. One per engine (a thread), so
/// an idle connection holds no glued memory.
#[derive(Debug, Default)]
pub struct GluePool {
    bufs: Vec<Vec<u8>>,
}

impl GluePool {
    /// Buffers kept (at most 1 MiB of [`STAGE_CAP`] each).
    const KEEP: usize = 16;

    /// An empty buffer with room for `len` bytes at least: the last one
    /// given back, else a new one of `len` and no less than 4 KiB.
    fn take(&mut self, len: usize) -> Vec<u8> {
        let mut v = self.bufs.pop().unwrap_or_default();
        v.reserve(len.max(4096));
        v
    }

    /// The last buffer given back if it has room for `len` bytes (else it
    /// stays kept).
    fn take_at_least(&mut self, len: usize) -> Option<Vec<u8>> {
        if self.bufs.last()?.capacity() >= len {
            self.bufs.pop()
        } else {
            None
        }
    }

    /// Keeps `v` (emptied) for reuse, unless enough are kept or it is a
    /// small one (a tail that started behind queued bytes): the pool holds
    /// full-size buffers, so taking one never means growing it.
    fn give(&mut self, mut v: Vec<u8>) {
        if self.bufs.len() < Self::KEEP && v.capacity() >= STAGE_CAP {
            v.clear();
            self.bufs.push(v);
        }
    }
}

/// A FIFO of `Bytes` and [`Packet`]s with a cursor into the front piece:
/// what one connection has queued and not yet written. Queued buffers are
/// never modified; with a copy threshold set, small pieces are copied as
/// they are queued into a glued buffer at the tail (copy small, reference
/// large).
///
/// Invariants: no piece is empty; for streams the cursor (`front_piece`,
/// `front_offset`) points inside the front entry's pieces (both 0 when
/// empty), for datagrams it stays at 0; `queued` is the sum of unwritten
/// bytes and `pieces` the number of pieces not wholly written (the `tail`
/// counts as one while it holds bytes); queued entries never change, only
/// the `tail` is appended to, and it is always behind every entry.
#[derive(Debug)]
pub struct Outbox {
    framing: Framing,
    entries: VecDeque<Entry>,
    /// The first unwritten piece is `entries[0]`'s `front_piece`-th, of
    /// which `front_offset` bytes are written (streams only).
    front_piece: usize,
    front_offset: usize,
    /// Unwritten bytes in total.
    queued: usize,
    /// Pieces not wholly written.
    pieces: usize,
    /// Message boundaries (datagrams only).
    messages: VecDeque<Message>,
    /// Pieces shorter than this are glued; 0: none.
    threshold: usize,
    /// The glued buffer being filled, after every entry: no write has seen
    /// it, so it may grow (and move); `seal` queues it as an entry before a
    /// write takes iovecs. Kept out of `entries` so gluing a packet touches
    /// one `Vec` (empty, unallocated, when nothing is being glued).
    tail: Vec<u8>,
    /// Unwritten bytes in glued buffers.
    glued: usize,
    /// A glued buffer was closed full by the last pushes (see `take_filled`).
    filled: bool,
}

impl Outbox {
    /// An empty outbox (copy threshold 0: nothing is ever copied).
    pub fn new(framing: Framing) -> Outbox {
        Outbox {
            framing,
            entries: VecDeque::new(),
            front_piece: 0,
            front_offset: 0,
            queued: 0,
            pieces: 0,
            messages: VecDeque::new(),
            threshold: 0,
            tail: Vec::new(),
            glued: 0,
            filled: false,
        }
    }

    /// Stream or datagram.
    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// Copy small, reference large: once set, pieces shorter than
    /// `threshold` bytes queued on a stream are copied, as they are
    /// queued, into a glued buffer of at most [`STAGE_CAP`] bytes, so the
    /// kernel sees a few large segments instead of many tiny iovecs, and
    /// the queue holds a few entries instead of one per piece; larger
    /// pieces stay referenced, and a packet is glued whole only when all
    /// its pieces are small (else it stays one reference). 0 (the default)
    /// copies nothing. Datagrams are never glued. Applies to what is
    /// queued from then on.
    pub fn set_copy_threshold(&mut self, threshold: usize) {
        self.threshold = threshold;
    }

    /// The threshold [`set_copy_threshold`](Self::set_copy_threshold) set.
    pub fn copy_threshold(&self) -> usize {
        self.threshold
    }

    /// Queues buffers. Stream: they continue the byte sequence (`dest` is
    /// ignored), small ones copied (see
    /// [`set_copy_threshold`](Self::set_copy_threshold)). Datagram: they
    /// form one message to `dest` (`None`: the connected peer), never
    /// copied; an all-empty push is one empty datagram. Zero-length buffers
    /// never produce an iovec.
    pub fn push<I: IntoIterator<Item = Bytes>>(&mut self, bufs: I, dest: Option<SocketAddr>) {
        self.push_with(bufs, dest, None, &mut GluePool::default());
    }

    /// `push`, never copying memory for which `never_copy` answers true
    /// (registered buffers; `None`: there are none), gluing into buffers
    /// from `pool`.
    pub fn push_with<I: IntoIterator<Item = Bytes>>(
        &mut self,
        bufs: I,
        dest: Option<SocketAddr>,
        never_copy: Option<&NeverCopy<'_>>,
        pool: &mut GluePool,
    ) {
        if self.framing == Framing::Datagram {
            let before = self.entries.len();
            let mut bytes = 0;
            for b in bufs.into_iter().filter(|b| !b.is_empty()) {
                bytes += b.len();
                self.entries.push_back(Entry::One(b));
            }
            let added = self.entries.len() - before;
            self.queued += bytes;
            self.pieces += added;
            self.messages.push_back(Message {
                bufs: added,
                bytes,
                dest,
            });
            return;
        }
        for b in bufs.into_iter().filter(|b| !b.is_empty()) {
            if self.gluable(b.len()) && !never_copy.is_some_and(|f| f(&b)) {
                self.tail_for(b.len(), pool).extend_from_slice(&b);
                self.glued_more(b.len());
            } else {
                self.push_entry(Entry::One(b), 1);
            }
        }
    }

    /// Queues a packet as `push` queues its pieces, but by one reference
    /// for all of them (a clone of `packet`), or, on a stream when every piece is shorter than
    /// the copy threshold, copied whole into the glued buffer (a datagram
    /// socket gets one datagram of its pieces, each referenced). Pieces
    /// for which `never_copy` answers true are never copied.
    #[inline]
    pub fn push_packet(
        &mut self,
        packet: &Packet,
        dest: Option<SocketAddr>,
        never_copy: Option<&NeverCopy<'_>>,
        pool: &mut GluePool,
    ) {
        match self.framing {
            Framing::Datagram => self.push(packet.pieces().iter().cloned(), dest),
            Framing::Stream if packet.is_empty() => {}
            Framing::Stream if packet.max_piece() < self.threshold => {
                let registered = never_copy.is_some_and(|f| packet.pieces().iter().any(|p| f(p)));
                if registered || packet.len() > STAGE_CAP {
                    // Piece by piece: registered ones referenced, and a
                    // packet larger than one glued buffer split across two.
                    self.push_with(packet.pieces().iter().cloned(), None, never_copy, pool);
                } else {
                    packet.copy_to(self.tail_for(packet.len(), pool));
                    self.glued_more(packet.len());
                }
            }
            Framing::Stream => {
                let count = packet.pieces().len();
                self.push_entry(Entry::Packet(packet.clone()), count);
            }
        }
    }

    fn gluable(&self, len: usize) -> bool {
        len < self.threshold && len <= STAGE_CAP
    }

    fn push_entry(&mut self, e: Entry, count: usize) {
        // Behind what was glued before it.
        self.seal();
        self.queued += e.len();
        self.pieces += count;
        self.entries.push_back(e);
    }

    /// The glued buffer `len` more bytes go into: the tail while it has
    /// room under [`STAGE_CAP`]; else the tail is queued (full: see
    /// `take_filled`) and a new one opens.
    ///
    /// Which buffer a tail gets decides the memory a waiting connection
    /// holds. A tail opened behind queued bytes (the full buffer just
    /// sealed, or a write in flight) waits for them, and may wait long on
    /// a socket that refuses: it starts fresh with room for these bytes
    /// alone, not as one of the pool's buffers, which are large and
    /// resident (a 12-byte header glued between two referenced pieces
    /// stays 12 bytes). A tail with nothing ahead is written soon, so it
    /// takes the pool's most recent buffer, still in cache. A small tail
    /// that outgrows its room moves into a pool buffer when there is one
    /// (a copy of what it holds), rather than growing by reallocation.
    #[inline]
    fn tail_for(&mut self, len: usize, pool: &mut GluePool) -> &mut Vec<u8> {
        if self.tail.len() + len > STAGE_CAP && !self.tail.is_empty() {
            self.seal();
            self.filled = true;
        }
        if self.tail.is_empty() {
            if self.tail.capacity() < len {
                self.tail = if self.entries.is_empty() {
                    pool.take(len)
                } else {
                    Vec::with_capacity(len)
                };
            }
            // The caller adds at least one byte.
            self.pieces += 1;
        } else if self.tail.len() + len > self.tail.capacity() {
            if let Some(mut big) = pool.take_at_least(self.tail.len() + len) {
                big.extend_from_slice(&self.tail);
                pool.give(std::mem::replace(&mut self.tail, big));
            }
        }
        &mut self.tail
    }

    #[inline]
    fn glued_more(&mut self, len: usize) {
        self.queued += len;
        self.glued += len;
    }

    /// Unwritten bytes in glued buffers: copies made since the last write,
    /// which the engine submits early while they are in cache.
    #[inline]
    pub fn glued_bytes(&self) -> usize {
        self.glued
    }

    /// Whether a glued buffer filled up (to [`STAGE_CAP`]) since the last
    /// call: worth writing now, while its bytes are in cache.
    #[inline]
    pub fn take_filled(&mut self) -> bool {
        std::mem::take(&mut self.filled)
    }

    /// Closes the glued buffer being filled, so what is queued from now on
    /// goes into another: call it before taking iovecs for a write (the
    /// kernel reads the buffer until that write completes, so it must not
    /// grow and move).
    #[inline]
    pub fn seal(&mut self) {
        if !self.tail.is_empty() {
            let v = std::mem::take(&mut self.tail);
            self.entries.push_back(Entry::Glued(v));
        }
    }

    /// Bytes queued and not yet written.
    #[inline]
    pub fn queued_bytes(&self) -> usize {
        self.queued
    }

    /// Messages queued: datagrams, or for a stream 1 when bytes are queued.
    pub fn queued_messages(&self) -> usize {
        match self.framing {
            Framing::Datagram => self.messages.len(),
            Framing::Stream => usize::from(self.queued > 0),
        }
    }

    /// Nothing is queued (for datagrams: not even an empty message).
    pub fn is_empty(&self) -> bool {
        match self.framing {
            Framing::Datagram => self.messages.is_empty(),
            Framing::Stream => self.queued == 0,
        }
    }

    /// Every unwritten piece from the cursor on, whole; the tail last.
    fn unwritten(&self) -> impl Iterator<Item = &[u8]> + '_ {
        let skip = self.front_piece;
        let tail = Some(&self.tail[..]).filter(|t| !t.is_empty());
        self.entries
            .iter()
            .enumerate()
            .flat_map(move |(i, e)| {
                let first = if i == 0 { skip } else { 0 };
                (first..e.count()).map(move |k| e.piece(k))
            })
            .chain(tail)
    }

    /// The next unsent bytes as slices of the queued pieces (small ones
    /// glued), in order, from the exact byte after what was written, never
    /// empty, at most `max_slices` of them. Stream: as many as fit;
    /// datagram: the front message only. For `write_vectored`, wrap each
    /// in [`std::io::IoSlice::new`].
    pub fn chunks(&self, max_slices: usize) -> impl Iterator<Item = &[u8]> + '_ {
        let offset = self.front_offset;
        self.unwritten()
            .take(self.front_pieces().min(max_slices))
            .enumerate()
            .map(move |(i, b)| if i == 0 { &b[offset..] } else { b })
    }

    /// The `Bytes` behind `chunks(max_slices)`, whole (the front one not
    /// sliced at the cursor): clones keep that memory alive while the kernel
    /// may still read it, as zero-copy sends need until their notification.
    /// Only for an outbox that glues nothing (copy threshold 0 since it was
    /// made): the engine never sends glued bytes zero-copy.
    pub fn front_bufs(&self, max_slices: usize) -> impl Iterator<Item = &Bytes> + '_ {
        debug_assert_eq!(self.glued, 0, "glued bytes have no Bytes to hold");
        let skip = self.front_piece;
        self.entries
            .iter()
            .enumerate()
            .flat_map(move |(i, e)| &e.referenced()[if i == 0 { skip } else { 0 }..])
            .take(self.front_pieces().min(max_slices))
    }

    /// Clears `out` and fills it with iovecs for the next bytes to write,
    /// at most `max_iovecs` of them (clamped to `1..=IOV_MAX`): those of
    /// `chunks(max_iovecs)`. Datagram: the front message only, with its
    /// destination. Call [`seal`](Self::seal) first on a stream that glues.
    ///
    /// The iovecs point into this outbox's `Bytes` and glued buffers: they
    /// stay valid until [`advance`](Self::advance) or
    /// [`take_unsent`](Self::take_unsent) releases that memory, or the
    /// outbox is dropped.
    pub(crate) fn fill_iovecs(&self, out: &mut Vec<libc::iovec>, max_iovecs: usize) -> Batch {
        debug_assert!(self.tail.is_empty(), "seal before taking iovecs");
        out.clear();
        let mut bytes = 0;
        for s in self.chunks(max_iovecs.clamp(1, IOV_MAX)) {
            bytes += s.len();
            out.push(iovec(s));
        }
        let front = match self.framing {
            Framing::Datagram => self.messages.front(),
            Framing::Stream => None,
        };
        Batch {
            bytes,
            iovecs: out.len(),
            dest: front.and_then(|m| m.dest),
            datagrams: usize::from(front.is_some()),
            segment_size: None,
        }
    }

    /// Datagram framing: clears `out` and fills it with iovecs for the
    /// `index`-th queued message (0 is the front, as `fill_iovecs` gives),
    /// so several datagrams can be in flight at once. `None` past the last
    /// message, for a stream, or for a message of more than [`IOV_MAX`]
    /// pieces. The iovecs stay valid as `fill_iovecs`' do.
    #[cfg(test)]
    pub(crate) fn fill_datagram(&self, index: usize, out: &mut Vec<libc::iovec>) -> Option<Batch> {
        self.fill_datagrams(&mut self.at(index), 1, out)
    }

    /// Where the `index`-th queued message starts (a walk from the front:
    /// the hot path carries a [`DatagramAt`] forward instead).
    #[cfg(test)]
    fn at(&self, index: usize) -> DatagramAt {
        let entry = self.messages.iter().take(index).map(|m| m.bufs).sum();
        DatagramAt {
            message: index,
            entry,
        }
    }

    /// `fill_datagram` of the datagram at `at`, extended over the messages
    /// after it that can leave with it as one GSO send: up to `max_segments` in all,
    /// to the same destination, each as long as the first (at most
    /// `u16::MAX`, not empty) except the last, which may be shorter, at most
    /// [`GSO_MAX_BYTES`] and [`IOV_MAX`] iovecs together. Iovecs of
    /// adjacent memory (the slices of one `Bytes` that
    /// `Mover::send_segments` cut) are merged across datagrams. `datagrams` says how many
    /// it took; `segment_size` is set when more than one. `at` moves past
    /// them.
    pub(crate) fn fill_datagrams(
        &self,
        at: &mut DatagramAt,
        max_segments: usize,
        out: &mut Vec<libc::iovec>,
    ) -> Option<Batch> {
        let (bufs, m) = self.datagram(*at)?;
        if m.bufs > IOV_MAX {
            return None;
        }
        out.clear();
        out.extend(bufs.map(|b| iovec(b)));
        let mut batch = Batch {
            bytes: m.bytes,
            iovecs: 0,
            dest: m.dest,
            datagrams: 1,
            segment_size: None,
        };
        let size = m.bytes;
        let gso_size = u16::try_from(size).ok().filter(|&s| s > 0);
        // The entry the next message starts at.
        let mut first = at.entry + m.bufs;
        if let Some(seg) = gso_size.filter(|_| max_segments > 1) {
            for next in self.messages.range(at.message + 1..) {
                if batch.datagrams == max_segments
                    || next.dest != m.dest
                    || next.bytes == 0
                    || next.bytes > size
                    || batch.bytes + next.bytes > GSO_MAX_BYTES
                    || out.len() + next.bufs > IOV_MAX
                {
                    break;
                }
                let pieces = self.entries.range(first..first + next.bufs);
                extend_merged(out, pieces.flat_map(Entry::referenced));
                first += next.bufs;
                batch.bytes += next.bytes;
                batch.datagrams += 1;
                // A shorter one ends the run.
                if next.bytes < size {
                    break;
                }
            }
            if batch.datagrams > 1 {
                batch.segment_size = Some(seg);
            }
        }
        batch.iovecs = out.len();
        *at = DatagramAt {
            message: at.message + batch.datagrams,
            entry: first,
        };
        Some(batch)
    }

    /// The `Bytes` of the `index`-th queued datagram (see `fill_datagram`).
    #[cfg(test)]
    pub fn datagram_bufs(&self, index: usize) -> impl Iterator<Item = &Bytes> + '_ {
        self.datagram(self.at(index))
            .into_iter()
            .flat_map(|(bufs, _)| bufs)
    }

    /// The `Bytes` of `count` queued datagrams from `at` on: clones keep
    /// them alive for a zero-copy send.
    pub(crate) fn datagrams_bufs(
        &self,
        at: DatagramAt,
        count: usize,
    ) -> impl Iterator<Item = &Bytes> + '_ {
        let end = self.after(at, count).entry;
        self.entries
            .range(at.entry..end)
            .flat_map(Entry::referenced)
    }

    /// Where the datagram `count` messages after `at` starts.
    pub(crate) fn after(&self, at: DatagramAt, count: usize) -> DatagramAt {
        let entries: usize = self
            .messages
            .range(at.message..at.message + count)
            .map(|m| m.bufs)
            .sum();
        DatagramAt {
            message: at.message + count,
            entry: at.entry + entries,
        }
    }

    fn datagram(&self, at: DatagramAt) -> Option<(impl Iterator<Item = &Bytes> + '_, Message)> {
        if self.framing != Framing::Datagram {
            return None;
        }
        let m = *self.messages.get(at.message)?;
        // A datagram outbox holds `Entry::One`s only (packets are split).
        let bufs = self.entries.range(at.entry..at.entry + m.bufs);
        Some((bufs.flat_map(Entry::referenced), m))
    }

    /// Non-empty buffers in the front datagram (more than [`IOV_MAX`] cannot
    /// be sent in one call), or for a stream all pieces not wholly written.
    pub fn front_pieces(&self) -> usize {
        match self.framing {
            Framing::Datagram => self.messages.front().map_or(0, |m| m.bufs),
            Framing::Stream => self.pieces,
        }
    }

    /// Records that the kernel wrote `n` bytes of the last batch. Stream:
    /// the cursor moves exactly `n` bytes (clamped to what is queued),
    /// releasing every buffer and packet fully written; a partly written
    /// front piece is kept whole with an offset. Datagram: the front message
    /// is gone, since a datagram is sent all or nothing (`n` is not needed).
    pub fn advance(&mut self, n: usize) {
        self.advance_into(n, &mut GluePool::default());
    }

    /// `advance`, giving glued buffers written in full back to `pool`.
    pub fn advance_into(&mut self, n: usize, pool: &mut GluePool) {
        match self.framing {
            Framing::Datagram => {
                if let Some(m) = self.messages.pop_front() {
                    self.entries.drain(..m.bufs);
                    self.queued -= m.bytes;
                    self.pieces -= m.bufs;
                }
            }
            Framing::Stream => {
                let mut left = n.min(self.queued);
                self.queued -= left;
                while left > 0 {
                    let Some(front) = self.entries.front() else {
                        break;
                    };
                    let glued = matches!(front, Entry::Glued(_));
                    let count = front.count();
                    // A whole entry written: release it at once.
                    if self.front_piece == 0 && self.front_offset == 0 && left >= front.len() {
                        let len = front.len();
                        left -= len;
                        self.pieces -= count;
                        self.glued -= if glued { len } else { 0 };
                        self.release_front(pool);
                        continue;
                    }
                    let rest = front.piece(self.front_piece).len() - self.front_offset;
                    let took = left.min(rest);
                    self.glued -= if glued { took } else { 0 };
                    if left < rest {
                        self.front_offset += left;
                        break;
                    }
                    left -= rest;
                    self.front_offset = 0;
                    self.front_piece += 1;
                    self.pieces -= 1;
                    if self.front_piece == count {
                        self.release_front(pool);
                        self.front_piece = 0;
                    }
                }
            }
        }
    }

    /// Drops the front entry; a glued buffer goes back to `pool`.
    fn release_front(&mut self, pool: &mut GluePool) {
        if let Some(Entry::Glued(v)) = self.entries.pop_front() {
            pool.give(v);
        }
    }

    /// Datagram framing: the first `count` queued datagrams were sent (a
    /// GSO send carries several); they are released.
    pub fn advance_datagrams(&mut self, count: usize) {
        for _ in 0..count.min(self.messages.len()) {
            self.advance(0);
        }
    }

    /// Removes and returns everything not yet written: the queued `Bytes`
    /// (a packet's pieces each referenced) and the glued buffers (no copy),
    /// the front one sliced, so the result is exactly the unsent bytes in
    /// order, none of them empty. Pieces shorter than the copy threshold
    /// come back glued together. Message boundaries are not kept. Empties
    /// the outbox.
    pub fn take_unsent(&mut self) -> Vec<Bytes> {
        self.seal();
        let mut out = Vec::with_capacity(self.pieces);
        let skip = self.front_piece;
        for (i, e) in self.entries.drain(..).enumerate() {
            let skip = if i == 0 { skip } else { 0 };
            match e {
                Entry::One(b) => out.push(b),
                Entry::Packet(p) => out.extend(p.pieces()[skip..].iter().cloned()),
                Entry::Glued(v) => out.push(Bytes::from(v)),
            }
        }
        if let Some(first) = out.first_mut() {
            *first = first.slice(self.front_offset..);
        }
        self.front_piece = 0;
        self.front_offset = 0;
        self.queued = 0;
        self.pieces = 0;
        self.glued = 0;
        self.messages.clear();
        out
    }
}

/// Appends an iovec per slice of `bufs`, the first growing the last iovec
/// instead when it starts where that one ends (the next datagram of a GSO
/// run cut from one buffer).
fn extend_merged<'a>(out: &mut Vec<libc::iovec>, bufs: impl Iterator<Item = &'a Bytes>) {
    for (i, b) in bufs.enumerate() {
        match out.last_mut() {
            Some(last)
                if i == 0
                    && (last.iov_base as *const u8).wrapping_add(last.iov_len) == b.as_ptr() =>
            {
                last.iov_len += b.len();
            }
            _ => out.push(iovec(b)),
        }
    }
}

/// The iovec describing `s` (the kernel only reads through it).
fn iovec(s: &[u8]) -> libc::iovec {
    libc::iovec {
        iov_base: s.as_ptr().cast_mut().cast::<libc::c_void>(),
        iov_len: s.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn b(s: &'static [u8]) -> Bytes {
        Bytes::from_static(s)
    }

    fn stream(parts: &[&'static [u8]]) -> Outbox {
        let mut o = Outbox::new(Framing::Stream);
        o.push(parts.iter().map(|p| b(p)), None);
        o
    }

    fn chunks(o: &Outbox) -> Vec<&[u8]> {
        o.chunks(usize::MAX).collect()
    }

    fn addr(port: u16) -> Option<SocketAddr> {
        Some(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    /// Buffers of the given sizes with pseudo-random content.
    fn buffers(sizes: &[usize], mut x: u64) -> Vec<Bytes> {
        let mut byte = move || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            (x >> 56) as u8
        };
        sizes
            .iter()
            .map(|&n| (0..n).map(|_| byte()).collect())
            .collect()
    }

    fn flat(bufs: &[Bytes]) -> Vec<u8> {
        bufs.concat()
    }

    /// `fill_iovecs` describes exactly the slices `chunks` yields.
    fn check_iovecs(o: &Outbox, max: usize) -> Batch {
        let mut iov = Vec::new();
        let batch = o.fill_iovecs(&mut iov, max);
        let slices: Vec<&[u8]> = o.chunks(max.clamp(1, IOV_MAX)).collect();
        assert_eq!((batch.iovecs, iov.len()), (slices.len(), slices.len()));
        assert_eq!(batch.bytes, slices.iter().map(|s| s.len()).sum::<usize>());
        assert!(batch.bytes <= o.queued_bytes());
        for (v, s) in iov.iter().zip(&slices) {
            assert!(!s.is_empty());
            assert_eq!((v.iov_base as *const u8, v.iov_len), (s.as_ptr(), s.len()));
        }
        batch
    }

    #[test]
    fn empty_buffers_never_make_iovecs() {
        let mut o = stream(&[b"", b"ab", b"", b"", b"c", b""]);
        assert_eq!(chunks(&o), [&b"ab"[..], b"c"]);
        assert_eq!((o.front_pieces(), check_iovecs(&o, IOV_MAX).bytes), (2, 3));
        o.advance(3);
        assert!(o.is_empty());
        let o = stream(&[b"", b""]);
        assert!(o.is_empty());
        assert_eq!((o.queued_messages(), o.front_pieces()), (0, 0));
        assert_eq!(check_iovecs(&o, IOV_MAX), Batch::default());

        let mut d = Outbox::new(Framing::Datagram);
        d.push([Bytes::new(), Bytes::new()], addr(9));
        assert!(!d.is_empty());
        assert_eq!((d.queued_messages(), d.queued_bytes()), (1, 0));
        let want = Batch {
            dest: addr(9),
            datagrams: 1,
            ..Batch::default()
        };
        assert_eq!(check_iovecs(&d, IOV_MAX), want);
        d.advance(0);
        assert!(d.is_empty());
    }

    #[test]
    fn partial_writes_inside_at_and_across_boundaries() {
        let mut o = stream(&[b"hello", b"world"]);
        let base = o.chunks(1).next().unwrap().as_ptr();
        o.advance(2); // inside: an offset into the same buffer, no copy
        assert_eq!(chunks(&o), [&b"llo"[..], b"world"]);
        assert_eq!(o.chunks(1).next().unwrap().as_ptr(), base.wrapping_add(2));
        assert_eq!((o.queued_bytes(), o.queued_messages()), (8, 1));
        o.advance(3); // exactly at the boundary
        assert_eq!(chunks(&o), [&b"world"[..]]);

        let mut o = stream(&[b"ab", b"cde", b"", b"f", b"ghij"]);
        o.advance(7); // across several
        assert_eq!(chunks(&o), [&b"hij"[..]]);
        o.advance(0);
        assert_eq!(chunks(&o), [&b"hij"[..]]);
        o.advance(3);
        assert!(o.is_empty() && chunks(&o).is_empty());
    }

    #[test]
    fn more_than_iov_max_buffers_split_across_batches() {
        let mut o = Outbox::new(Framing::Stream);
        o.push(buffers(&[1; 1500], 7), None);
        assert_eq!(o.front_pieces(), 1500);
        let first = check_iovecs(&o, IOV_MAX);
        assert_eq!((first.iovecs, first.bytes), (IOV_MAX, IOV_MAX));
        assert_eq!(check_iovecs(&o, 5000).iovecs, IOV_MAX);
        assert_eq!(check_iovecs(&o, 0).iovecs, 1);
        o.advance(first.bytes);
        let rest = check_iovecs(&o, IOV_MAX);
        assert_eq!((rest.iovecs, rest.bytes), (476, 476));
        o.advance(rest.bytes);
        assert!(o.is_empty());
    }

    #[test]
    fn any_queued_datagram_can_be_filled_in_place() {
        let mut d = Outbox::new(Framing::Datagram);
        d.push([b(b"ab"), b(b""), b(b"c")], addr(1));
        d.push(Vec::<Bytes>::new(), None);
        d.push([b(b"xyz")], addr(3));
        let mut iov = Vec::new();
        // The iovecs describe exactly the message's own Bytes, in order.
        let flat = |d: &Outbox, i: usize, iov: &[libc::iovec]| -> Vec<u8> {
            let bufs: Vec<&Bytes> = d.datagram_bufs(i).collect();
            assert_eq!(bufs.len(), iov.len());
            for (b, v) in bufs.iter().zip(iov) {
                assert_eq!((b.as_ptr(), b.len()), (v.iov_base as *const u8, v.iov_len));
            }
            bufs.iter().flat_map(|b| b.to_vec()).collect()
        };
        let batch = d.fill_datagram(0, &mut iov).unwrap();
        assert_eq!((batch.bytes, batch.iovecs, batch.dest), (3, 2, addr(1)));
        assert_eq!(flat(&d, 0, &iov), b"abc");
        let batch = d.fill_datagram(1, &mut iov).unwrap();
        assert_eq!((batch.bytes, batch.iovecs, batch.dest), (0, 0, None));
        let batch = d.fill_datagram(2, &mut iov).unwrap();
        assert_eq!((batch.bytes, batch.dest), (3, addr(3)));
        assert_eq!(flat(&d, 2, &iov), b"xyz");
        assert_eq!(d.datagram_bufs(2).count(), 1);
        assert!(d.fill_datagram(3, &mut iov).is_none());
        d.advance(3);
        assert_eq!(d.fill_datagram(1, &mut iov).unwrap().dest, addr(3));
        assert!(stream(&[b"a"]).fill_datagram(0, &mut iov).is_none());
    }

    /// A chain carries one cursor forward instead of walking from the
    /// front for each datagram: every batch it fills, with and without
    /// GSO, is the one filled from that datagram's own position.
    #[test]
    fn a_carried_cursor_fills_what_each_position_would() {
        let mut d = Outbox::new(Framing::Datagram);
        let run = Bytes::from(vec![3u8; 500]);
        for i in 0..5 {
            d.push([run.slice(i * 100..(i + 1) * 100)], addr(1));
        }
        d.push([b(b"head "), b(b""), b(b"body")], addr(1));
        d.push([], addr(2));
        d.push([b(b"ab"), b(b"cd")], addr(2));
        d.push([b(b"ef"), b(b"gh")], addr(2));
        d.push([b(b"z")], None);
        for segments in [1, 64] {
            let (mut at, mut iov, mut again) = (DatagramAt::default(), Vec::new(), Vec::new());
            let mut index = 0;
            while let Some(batch) = d.fill_datagrams(&mut at, segments, &mut iov) {
                let from_front = d.fill_datagrams(&mut d.at(index), segments, &mut again);
                assert_eq!(
                    Some(batch),
                    from_front,
                    "datagram {index}, {segments} segments"
                );
                let same = |v: &libc::iovec, w: &libc::iovec| {
                    (v.iov_base, v.iov_len) == (w.iov_base, w.iov_len)
                };
                assert!(
                    iov.len() == again.len() && iov.iter().zip(&again).all(|(v, w)| same(v, w))
                );
                index += batch.datagrams;
                assert_eq!(at, d.at(index));
                assert_eq!(d.after(d.at(index - batch.datagrams), batch.datagrams), at);
            }
            assert_eq!(index, d.queued_messages(), "{segments} segments");
        }
    }

    #[test]
    fn gso_runs_break_at_size_destination_and_limits() {
        let mut d = Outbox::new(Framing::Datagram);
        let payload = Bytes::from(vec![7u8; 10 * 100]);
        // Ten 100-byte slices of one buffer, then a shorter one: one run,
        // one merged iovec.
        for i in 0..10 {
            d.push([payload.slice(i * 100..(i + 1) * 100)], addr(1));
        }
        d.push([b(b"tail")], addr(1));
        // A different destination, a longer one, an empty one: each breaks.
        d.push([b(b"xx")], addr(2));
        d.push([b(b"y")], addr(2));
        d.push([b(b"zzz")], addr(2));
        d.push([], addr(2));
        d.push([b(b"q")], addr(2));
        let mut iov = Vec::new();
        let run = d.fill_datagrams(&mut d.at(0), 64, &mut iov).unwrap();
        assert_eq!(
            (run.datagrams, run.bytes, run.segment_size),
            (11, 1004, Some(100))
        );
        assert_eq!(run.dest, addr(1));
        assert_eq!(iov.len(), 2, "ten adjacent slices merge into one iovec");
        assert_eq!(
            d.fill_datagrams(&mut d.at(0), 4, &mut iov)
                .unwrap()
                .datagrams,
            4
        );
        let one = d.fill_datagrams(&mut d.at(0), 1, &mut iov).unwrap();
        assert_eq!((one.datagrams, one.segment_size), (1, None));
        let two = d.fill_datagrams(&mut d.at(11), 64, &mut iov).unwrap();
        assert_eq!(
            (two.datagrams, two.bytes, two.segment_size),
            (2, 3, Some(2))
        );
        let zzz = d.fill_datagrams(&mut d.at(13), 64, &mut iov).unwrap();
        assert_eq!((zzz.datagrams, zzz.segment_size), (1, None), "empty breaks");
        let empty = d.fill_datagrams(&mut d.at(14), 64, &mut iov).unwrap();
        assert_eq!(
            (empty.datagrams, empty.bytes, empty.segment_size),
            (1, 0, None)
        );
        d.advance_datagrams(11);
        assert_eq!((d.queued_messages(), d.queued_bytes()), (5, 7));
        // The byte limit: 60 datagrams of 1200 bytes are 72,000 > 64 KiB.
        let mut big = Outbox::new(Framing::Datagram);
        for _ in 0..60 {
            big.push([Bytes::from(vec![1u8; 1200])], None);
        }
        let run = big.fill_datagrams(&mut big.at(0), 64, &mut iov).unwrap();
        assert_eq!(run.datagrams, GSO_MAX_BYTES / 1200);
        assert!(run.bytes <= GSO_MAX_BYTES);
    }

    #[test]
    fn datagrams_keep_boundaries_and_destinations() {
        let mut d = Outbox::new(Framing::Datagram);
        d.push([b(b"ab"), Bytes::new(), b(b"c")], addr(1));
        d.push([b(b"xyz")], None);
        d.push([], addr(2));
        d.push([b(b"q")], None);
        assert_eq!((d.queued_messages(), d.queued_bytes()), (4, 7));
        assert_eq!(d.front_pieces(), 2);
        let want = [(3, 2, addr(1)), (3, 1, None), (0, 0, addr(2))];
        for (bytes, iovecs, dest) in want {
            assert_eq!(
                check_iovecs(&d, IOV_MAX),
                Batch {
                    bytes,
                    iovecs,
                    dest,
                    datagrams: 1,
                    segment_size: None,
                }
            );
            assert_eq!(d.front_pieces(), iovecs);
            d.advance(bytes);
        }
        assert_eq!((d.queued_messages(), d.queued_bytes()), (1, 1));
        assert_eq!(d.take_unsent(), [b(b"q")]);
        assert!(d.is_empty());
    }

    #[test]
    fn take_unsent_after_a_partial_write_is_exactly_the_rest() {
        let mut o = stream(&[b"hello", b"", b"world"]);
        o.advance(3);
        assert_eq!(o.take_unsent(), [b(b"lo"), b(b"world")]);
        assert!(o.is_empty() && o.queued_bytes() == 0);
        assert!(o.take_unsent().is_empty());
        o.push([b(b"again")], None);
        assert_eq!(chunks(&o), [&b"again"[..]]);
    }

    #[test]
    fn advance_past_the_end_clamps() {
        let mut o = stream(&[b"abc"]);
        o.advance(1);
        o.advance(10);
        assert!(o.is_empty() && o.queued_bytes() == 0);
        o.advance(usize::MAX);
        o.push([b(b"de")], None);
        assert_eq!(chunks(&o), [&b"de"[..]]);
        let mut d = Outbox::new(Framing::Datagram);
        d.advance(4);
        assert!(d.is_empty());
    }

    /// A 0xEE-filled "registered" allocation: its slices must never be
    /// glued, and only they hold 0xEE (see `plain`).
    fn registered(len: usize) -> Bytes {
        Bytes::from(vec![0xEE; len])
    }

    fn inside(outer: &Bytes, s: &[u8]) -> bool {
        let (a, p) = (outer.as_ptr() as usize, s.as_ptr() as usize);
        p >= a && p + s.len() <= a + outer.len()
    }

    #[test]
    fn small_pieces_are_glued_large_ones_referenced() {
        let big = Bytes::from(vec![1u8; 5000]);
        let reg = registered(64);
        let never_copy = |s: &[u8]| inside(&reg, s);
        let nc = Some(&never_copy as &NeverCopy<'_>);
        let mut pool = GluePool::default();
        let mut o = Outbox::new(Framing::Stream);
        o.set_copy_threshold(1024);
        // Mixed: one reference for the whole packet, nothing copied.
        let mixed = Packet::new([b(b"h1"), big.clone(), b(b"h2")]);
        o.push_packet(&mixed, None, nc, &mut pool);
        // Small pieces and all-small packets: glued into one buffer; a
        // registered piece stays referenced and ends that buffer.
        o.push_with([b(b"x"), b(b"yz")], None, nc, &mut pool);
        o.push_packet(&Packet::new([b(b"p1"), b(b"p2")]), None, nc, &mut pool);
        o.push_packet(
            &Packet::new([b(b"q"), reg.clone(), b(b"r")]),
            None,
            nc,
            &mut pool,
        );
        o.push_with([big.clone(), b(b"t")], None, nc, &mut pool);
        o.seal();
        assert_eq!(o.glued_bytes(), 3 + 4 + 1 + 1 + 1);
        let got: Vec<&[u8]> = o.chunks(IOV_MAX).collect();
        assert_eq!(got.len(), 8);
        assert_eq!((got[1].as_ptr(), got[1].len()), (big.as_ptr(), 5000));
        assert_eq!([got[0], got[2], got[3]], [&b"h1"[..], b"h2", b"xyzp1p2q"]);
        assert!(inside(&reg, got[4]) && got[4].len() == 64);
        assert_eq!(got[5], b"r");
        assert_eq!((got[6].as_ptr(), got[6].len()), (big.as_ptr(), 5000));
        assert_eq!(got[7], b"t");
        check_iovecs(&o, IOV_MAX);
        // Sealed: what is queued now goes into a new buffer, the iovecs
        // taken before stay valid.
        let glued_at = got[3].as_ptr();
        o.push([b(b"late")], None);
        assert_eq!(o.chunks(IOV_MAX).nth(3).unwrap().as_ptr(), glued_at);
        assert_eq!(o.chunks(IOV_MAX).last().unwrap(), b"late");
        // A partial write resumes inside a glued buffer without copying.
        o.advance(2 + 5000 + 2 + 3);
        assert_eq!(
            o.chunks(1).next().unwrap().as_ptr(),
            glued_at.wrapping_add(3)
        );
        o.seal();
        assert_eq!(o.glued_bytes(), 5 + 1 + 1 + 4);
        // Unsent: the exact rest, glued pieces glued, the rest referenced.
        let rest = o.take_unsent();
        assert_eq!(rest[0], b(b"p1p2q"));
        assert_eq!(flat(&rest[1..3]), [&reg[..], b"r"].concat());
        assert_eq!(rest[3].as_ptr(), big.as_ptr());
        assert_eq!(&rest[4..], [b(b"t"), b(b"late")]);
        o.seal();
        assert_eq!(o.glued_bytes(), 0);
    }

    /// What a waiting connection holds: the tail opened behind a full
    /// buffer (which waits for that buffer's write, maybe long) is small,
    /// not one of the pool's full-size buffers; a tail with nothing ahead
    /// takes the pool's; a small tail that outgrows its room moves into a
    /// pool buffer, bytes intact; the pool keeps full-size buffers only.
    #[test]
    fn a_tail_behind_queued_bytes_starts_small() {
        let mut pool = GluePool::default();
        pool.give(Vec::with_capacity(STAGE_CAP));
        pool.give(Vec::with_capacity(STAGE_CAP));
        pool.give(Vec::with_capacity(100));
        assert_eq!(pool.bufs.len(), 2, "a small buffer is not kept");
        let mut o = Outbox::new(Framing::Stream);
        o.set_copy_threshold(1024);
        let piece = Bytes::from(vec![7u8; 1000]);
        // Nothing ahead: the pool's buffer, filled to the cap.
        let per_buffer = STAGE_CAP / piece.len();
        for _ in 0..per_buffer {
            o.push_with([piece.clone()], None, None, &mut pool);
        }
        assert_eq!(o.tail.capacity(), STAGE_CAP);
        assert_eq!(pool.bufs.len(), 1);
        // The piece that overflows it opens a small tail behind it.
        o.push_with([piece.clone()], None, None, &mut pool);
        assert!(o.take_filled());
        assert!(o.tail.capacity() < STAGE_CAP, "{}", o.tail.capacity());
        assert_eq!(pool.bufs.len(), 1, "the pool's buffer is left for others");
        // Outgrowing its room: into the pool's buffer, not grown.
        let small_room = o.tail.capacity() / piece.len();
        for _ in 0..small_room {
            o.push_with([piece.clone()], None, None, &mut pool);
        }
        assert_eq!(o.tail.capacity(), STAGE_CAP);
        assert!(pool.bufs.is_empty());
        o.seal();
        let all: Vec<u8> = o.chunks(IOV_MAX).flat_map(|c| c.to_vec()).collect();
        assert_eq!(all, vec![7u8; (per_buffer + 1 + small_room) * piece.len()]);
        // Written: the full-size buffers go back to the pool.
        o.advance_into(o.queued_bytes(), &mut pool);
        assert_eq!(pool.bufs.len(), 2);
    }

    #[test]
    fn queueing_a_packet_clones_none_of_its_pieces() {
        let pieces: Vec<Bytes> = (0..8).map(|i| Bytes::from(vec![i; 100])).collect();
        let pkt = Packet::new(pieces);
        let mut pool = GluePool::default();
        for threshold in [0, 50, 1024] {
            let mut boxes: Vec<Outbox> = (0..100).map(|_| Outbox::new(Framing::Stream)).collect();
            for o in &mut boxes {
                o.set_copy_threshold(threshold);
                o.push_packet(&pkt, None, None, &mut pool);
                let pieces = if threshold > 100 { 1 } else { 8 };
                assert_eq!((o.queued_bytes(), o.front_pieces()), (800, pieces));
                o.seal();
            }
            assert!(pkt.pieces().iter().all(|p| p.is_unique()));
            for o in &mut boxes {
                o.advance(800);
                assert!(o.is_empty());
            }
            drop(boxes);
            assert!(pkt.pieces().iter().all(|p| p.is_unique()));
        }
    }

    #[test]
    fn a_glued_buffer_holds_at_most_stage_cap() {
        let mut o = Outbox::new(Framing::Stream);
        o.set_copy_threshold(1024);
        let piece = Bytes::from(vec![7u8; 1000]);
        for _ in 0..200 {
            o.push([piece.clone()], None);
        }
        // A packet larger than one buffer is split across two.
        o.push_packet(
            &Packet::new(vec![piece.clone(); 70]),
            None,
            None,
            &mut GluePool::default(),
        );
        let lens: Vec<usize> = o.chunks(IOV_MAX).map(<[u8]>::len).collect();
        assert!(lens.iter().all(|&n| n <= STAGE_CAP), "{lens:?}");
        assert_eq!(lens.iter().sum::<usize>(), 270_000);
        assert_eq!(lens.len(), 270_000usize.div_ceil(STAGE_CAP / 1000 * 1000));
    }

    proptest! {
        /// A simulated writer that takes a random prefix of each batch, with
        /// new pushes in between, reproduces the flat input exactly.
        #[test]
        fn random_partial_writes_reproduce_the_input(
            first in prop::collection::vec(0usize..=300, 0..=2000),
            later in prop::collection::vec(prop::collection::vec(0usize..=300, 0..=50), 0..=20),
            writes in prop::collection::vec(any::<u32>(), 1..=40),
            max in 1usize..=1100,
            seed in any::<u64>(),
        ) {
            let mut o = Outbox::new(Framing::Stream);
            let first = buffers(&first, seed);
            let mut input = flat(&first);
            o.push(first, addr(3));
            let mut later = later.iter().enumerate().map(|(i, s)| buffers(s, seed ^ i as u64));
            let mut output = Vec::new();
            let mut step = 0;
            while !o.is_empty() || later.len() > 0 {
                let r = writes[step % writes.len()] as usize;
                if r % 3 == 0 || o.is_empty() {
                    if let Some(bufs) = later.next() {
                        input.extend_from_slice(&flat(&bufs));
                        o.push(bufs, None);
                    }
                }
                let batch = check_iovecs(&o, max);
                prop_assert_eq!(batch.iovecs, o.front_pieces().min(max.clamp(1, IOV_MAX)));
                prop_assert_eq!(batch.dest, None);
                let mut k = r % (batch.bytes + 1);
                if k == 0 && step % writes.len() == writes.len() - 1 {
                    k = batch.bytes; // make progress at least once per cycle
                }
                let mut left = k;
                for s in o.chunks(max.clamp(1, IOV_MAX)) {
                    let take = left.min(s.len());
                    output.extend_from_slice(&s[..take]);
                    left -= take;
                }
                o.advance(k);
                prop_assert_eq!(o.queued_bytes(), input.len() - output.len());
                step += 1;
            }
            prop_assert_eq!(output, input);
        }

        /// `take_unsent` after random writes is the flat remainder, without copying.
        #[test]
        fn take_unsent_is_the_flat_remainder(
            sizes in prop::collection::vec(0usize..=300, 0..=300),
            writes in prop::collection::vec(any::<u32>(), 0..=20),
            max in 1usize..=1100,
            seed in any::<u64>(),
        ) {
            let bufs = buffers(&sizes, seed);
            let input = flat(&bufs);
            let mut o = Outbox::new(Framing::Stream);
            o.push(bufs, None);
            let mut written = 0;
            for r in writes {
                let batch = check_iovecs(&o, max);
                let k = r as usize % (batch.bytes + 1);
                o.advance(k);
                written += k;
            }
            let ptrs: Vec<*const u8> = o.chunks(usize::MAX).map(<[u8]>::as_ptr).collect();
            let rest = o.take_unsent();
            prop_assert!(o.is_empty());
            prop_assert_eq!(o.queued_bytes(), 0);
            prop_assert!(rest.iter().all(|b| !b.is_empty()));
            prop_assert_eq!(rest.iter().map(|b| b.as_ptr()).collect::<Vec<_>>(), ptrs);
            prop_assert_eq!(flat(&rest), &input[written..]);
        }

        /// Datagrams come out one whole message per batch, in order, with their dest.
        #[test]
        fn datagrams_come_out_whole_and_in_order(
            msgs in prop::collection::vec(prop::collection::vec(0usize..=300, 0..=8), 0..=50),
            seed in any::<u64>(),
        ) {
            let mut d = Outbox::new(Framing::Datagram);
            let mut expect = Vec::new();
            for (i, sizes) in msgs.iter().enumerate() {
                let bufs = buffers(sizes, seed ^ i as u64);
                let dest = if i % 2 == 0 { addr(i as u16) } else { None };
                expect.push((flat(&bufs), dest));
                d.push(bufs, dest);
            }
            prop_assert_eq!(d.queued_messages(), msgs.len());
            for (bytes, dest) in expect {
                let batch = check_iovecs(&d, IOV_MAX);
                prop_assert_eq!(batch.dest, dest);
                prop_assert_eq!(d.chunks(IOV_MAX).collect::<Vec<_>>().concat(), bytes);
                d.advance(batch.bytes);
            }
            prop_assert!(d.is_empty());
            prop_assert_eq!(d.queued_bytes(), 0);
        }
        /// Bytes and packets, glued or not, with registered pieces mixed
        /// in, under random partial writes and pushes: the output is the
        /// flat input, no registered byte is ever copied, pushes after a
        /// seal never change bytes a write was given, and `take_unsent` is
        /// the flat remainder.
        #[test]
        fn glued_packets_reproduce_the_input(
            items in prop::collection::vec(
                (prop::collection::vec(0usize..=700, 0..=12), any::<bool>(), any::<u8>()),
                1..=60,
            ),
            threshold in prop_oneof![Just(0usize), 1usize..=800, Just(100_000)],
            writes in prop::collection::vec(any::<u32>(), 1..=40),
            stop in any::<u32>(),
            seed in any::<u64>(),
            use_reg in any::<bool>(),
            shared in any::<bool>(),
        ) {
            let reg = registered(1000);
            // Clones held elsewhere, as a fan-out does (packets then glue
            // from their glued form).
            let mut held = Vec::new();
            let mut pool = GluePool::default();
            let mut o = Outbox::new(Framing::Stream);
            o.set_copy_threshold(threshold);
            let mut input = Vec::new();
            let mut items = items.into_iter().enumerate();
            let never_copy = |s: &[u8]| inside(&reg, s);
            let nc = use_reg.then_some(&never_copy as &NeverCopy<'_>);
            let mut output = Vec::new();
            let stop = stop as usize % 50;
            for step in 0.. {
                let r = writes[step % writes.len()] as usize;
                if r % 2 == 0 || o.is_empty() {
                    let (i, (sizes, as_packet, regs)) = match items.next() {
                        Some(item) => item,
                        None if o.is_empty() => break,
                        // Nothing left to push: keep writing.
                        None => (0, (Vec::new(), false, 0)),
                    };
                    // Plain bytes never 0xEE; piece k is registered if bit k is set.
                    let mut bufs: Vec<Bytes> = buffers(&sizes, seed ^ i as u64)
                        .into_iter()
                        .map(|x| x.iter().map(|&c| c % 0xEE).collect())
                        .collect();
                    for (k, x) in bufs.iter_mut().enumerate() {
                        if use_reg && regs & (1 << (k % 8)) != 0 {
                            let n = x.len().min(reg.len());
                            *x = reg.slice(..n);
                        }
                    }
                    input.extend_from_slice(&flat(&bufs));
                    if as_packet {
                        let pkt = Packet::new(bufs);
                        if shared {
                            held.push(pkt.clone());
                        }
                        o.push_packet(&pkt, None, nc, &mut pool);
                    } else {
                        o.push_with(bufs, None, nc, &mut pool);
                    }
                }
                if step == stop {
                    break;
                }
                o.seal();
                let mut iov = Vec::new();
                let batch = o.fill_iovecs(&mut iov, IOV_MAX);
                prop_assert!(batch.iovecs <= o.front_pieces().min(IOV_MAX));
                prop_assert!(batch.bytes <= o.queued_bytes());
                // Pushes while the write is "in flight" leave its bytes be.
                let before: Vec<Vec<u8>> = o.chunks(IOV_MAX).map(<[u8]>::to_vec).collect();
                if r % 5 == 0 {
                    let more: Vec<Bytes> = buffers(&[r % 300, 3], seed ^ r as u64)
                        .into_iter()
                        .map(|x| x.iter().map(|&c| c % 0xEE).collect())
                        .collect();
                    input.extend_from_slice(&flat(&more));
                    o.push_with(more, None, nc, &mut pool);
                }
                let k = if step % writes.len() == writes.len() - 1 { batch.bytes } else { r % (batch.bytes + 1) };
                let mut left = k;
                let slices: Vec<&[u8]> = o.chunks(IOV_MAX).take(iov.len()).collect();
                prop_assert_eq!(slices.len(), iov.len());
                for (k, (v, s)) in iov.iter().zip(slices).enumerate() {
                    prop_assert_eq!(s, &before[k][..]);
                    prop_assert_eq!((v.iov_base as *const u8, v.iov_len), (s.as_ptr(), s.len()));
                    prop_assert!(!s.is_empty());
                    prop_assert!(inside(&reg, s) || !s.contains(&0xEE), "registered bytes copied");
                    let take = left.min(s.len());
                    output.extend_from_slice(&s[..take]);
                    left -= take;
                }
                // Written buffers go back to the pool, and are reused.
                o.advance_into(k, &mut pool);
                prop_assert_eq!(o.queued_bytes(), input.len() - output.len());
            }
            let rest = o.take_unsent();
            prop_assert!(o.is_empty() && o.front_pieces() == 0);
            prop_assert_eq!(&output[..], &input[..output.len()]);
            prop_assert_eq!(flat(&rest), &input[output.len()..]);
            for x in &rest {
                prop_assert!(!x.is_empty());
                prop_assert!(inside(&reg, x) || !x.contains(&0xEE), "registered bytes copied");
            }
        }
    }
}
