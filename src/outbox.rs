//! The backend-neutral core: a per-connection queue of `Bytes`, its iovec
//! view, and partial-write accounting. No syscalls, no `unsafe`: every
//! backend and the blocking helper share this one implementation, and its
//! tests need no kernel.

use std::collections::VecDeque;
use std::net::SocketAddr;

use bytes::Bytes;

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

/// What [`Outbox::fill_iovecs`] put in its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Batch {
    /// Bytes the iovecs cover.
    pub bytes: usize,
    /// Number of iovecs.
    pub iovecs: usize,
    /// Destination of the datagram (`None`: the connected peer, or a stream).
    pub dest: Option<SocketAddr>,
}

/// One queued datagram: the next `bufs` entries of [`Outbox::bufs`].
#[derive(Debug, Clone, Copy)]
struct Message {
    /// Non-empty `Bytes` entries in this message.
    bufs: usize,
    /// Bytes in this message.
    bytes: usize,
    dest: Option<SocketAddr>,
}

/// A FIFO of `Bytes` with a cursor into the front one: what one connection
/// has queued and not yet written. Buffers are never copied or glued.
///
/// Invariants: `bufs` holds no empty `Bytes`; `front_offset` is 0 for
/// datagrams and, for streams, less than the front buffer's length (0 when
/// `bufs` is empty); `queued` is the sum of unwritten bytes.
#[derive(Debug)]
pub struct Outbox {
    framing: Framing,
    bufs: VecDeque<Bytes>,
    /// Bytes of `bufs[0]` already written (streams only).
    front_offset: usize,
    /// Unwritten bytes in total.
    queued: usize,
    /// Message boundaries (datagrams only).
    messages: VecDeque<Message>,
}

impl Outbox {
    /// An empty outbox.
    pub fn new(framing: Framing) -> Outbox {
        Outbox {
            framing,
            bufs: VecDeque::new(),
            front_offset: 0,
            queued: 0,
            messages: VecDeque::new(),
        }
    }

    /// Stream or datagram.
    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// Queues buffers without copying. Stream: they continue the byte
    /// sequence (`dest` is ignored). Datagram: they form one message to
    /// `dest` (`None`: the connected peer); an all-empty push is one empty
    /// datagram. Zero-length buffers never produce an iovec.
    pub fn push<I: IntoIterator<Item = Bytes>>(&mut self, bufs: I, dest: Option<SocketAddr>) {
        let before = self.bufs.len();
        let mut bytes = 0;
        for b in bufs.into_iter().filter(|b| !b.is_empty()) {
            bytes += b.len();
            self.bufs.push_back(b);
        }
        self.queued += bytes;
        if self.framing == Framing::Datagram {
            self.messages.push_back(Message {
                bufs: self.bufs.len() - before,
                bytes,
                dest,
            });
        }
    }

    /// Bytes queued and not yet written.
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

    /// The next unsent bytes as slices, in order, from the exact byte after
    /// what was written, never empty, at most `max_slices` of them. Stream:
    /// as many as fit; datagram: the front message only.
    pub fn chunks(&self, max_slices: usize) -> impl Iterator<Item = &[u8]> + '_ {
        let offset = self.front_offset;
        self.front_bufs(max_slices)
            .enumerate()
            .map(move |(i, b)| if i == 0 { &b[offset..] } else { &b[..] })
    }

    /// The `Bytes` behind `chunks(max_slices)`, whole (the front one not
    /// sliced at the cursor): clones keep that memory alive while the kernel
    /// may still read it, as zero-copy sends need until their notification.
    pub fn front_bufs(&self, max_slices: usize) -> impl Iterator<Item = &Bytes> + '_ {
        self.bufs.iter().take(self.front_pieces().min(max_slices))
    }

    /// Clears `out` and fills it with iovecs for exactly what
    /// `chunks(max_iovecs)` yields (`max_iovecs` clamped to `1..=IOV_MAX`).
    /// Datagram: the front message only, with its destination.
    ///
    /// The iovecs point into this outbox's `Bytes`: they stay valid until
    /// [`advance`](Self::advance) or [`take_unsent`](Self::take_unsent)
    /// releases those buffers or the outbox is dropped.
    pub fn fill_iovecs(&self, out: &mut Vec<libc::iovec>, max_iovecs: usize) -> Batch {
        out.clear();
        let mut bytes = 0;
        for s in self.chunks(max_iovecs.clamp(1, IOV_MAX)) {
            bytes += s.len();
            out.push(iovec(s));
        }
        Batch {
            bytes,
            iovecs: out.len(),
            dest: match self.framing {
                Framing::Datagram => self.messages.front().and_then(|m| m.dest),
                Framing::Stream => None,
            },
        }
    }

    /// Datagram framing: clears `out` and fills it with iovecs for the
    /// `index`-th queued message (0 is the front, as `fill_iovecs` gives),
    /// so several datagrams can be in flight at once. `None` past the last
    /// message, for a stream, or for a message of more than [`IOV_MAX`]
    /// pieces. The iovecs stay valid as `fill_iovecs`' do.
    pub fn fill_datagram(&self, index: usize, out: &mut Vec<libc::iovec>) -> Option<Batch> {
        let (bufs, m) = self.datagram(index)?;
        if m.bufs > IOV_MAX {
            return None;
        }
        out.clear();
        out.extend(bufs.map(|b| iovec(b)));
        Some(Batch {
            bytes: m.bytes,
            iovecs: out.len(),
            dest: m.dest,
        })
    }

    /// The `Bytes` of the `index`-th queued datagram (see `fill_datagram`):
    /// clones keep them alive for a zero-copy send.
    pub fn datagram_bufs(&self, index: usize) -> impl Iterator<Item = &Bytes> + '_ {
        self.datagram(index).into_iter().flat_map(|(bufs, _)| bufs)
    }

    fn datagram(&self, index: usize) -> Option<(impl Iterator<Item = &Bytes> + '_, Message)> {
        if self.framing != Framing::Datagram {
            return None;
        }
        let m = *self.messages.get(index)?;
        let first: usize = self.messages.iter().take(index).map(|m| m.bufs).sum();
        Some((self.bufs.range(first..first + m.bufs), m))
    }

    /// Non-empty buffers in the front datagram (more than [`IOV_MAX`] cannot
    /// be sent in one call), or for a stream all non-empty unsent buffers.
    pub fn front_pieces(&self) -> usize {
        match self.framing {
            Framing::Datagram => self.messages.front().map_or(0, |m| m.bufs),
            Framing::Stream => self.bufs.len(),
        }
    }

    /// Records that the kernel wrote `n` bytes of the last batch. Stream:
    /// the cursor moves exactly `n` bytes (clamped to what is queued),
    /// releasing every buffer fully written; a partly written front buffer is
    /// kept whole with an offset. Datagram: the front message is gone, since
    /// a datagram is sent all or nothing (`n` is not needed).
    pub fn advance(&mut self, n: usize) {
        match self.framing {
            Framing::Datagram => {
                if let Some(m) = self.messages.pop_front() {
                    self.bufs.drain(..m.bufs);
                    self.queued -= m.bytes;
                }
            }
            Framing::Stream => {
                let mut left = n.min(self.queued);
                self.queued -= left;
                while left > 0 {
                    let Some(front) = self.bufs.front() else {
                        break;
                    };
                    let rest = front.len() - self.front_offset;
                    if left < rest {
                        self.front_offset += left;
                        break;
                    }
                    left -= rest;
                    self.bufs.pop_front();
                    self.front_offset = 0;
                }
            }
        }
    }

    /// Removes and returns everything not yet written, the front buffer
    /// sliced (no copy), so the result is exactly the unsent bytes, none of
    /// them empty. Message boundaries are not kept. Empties the outbox.
    pub fn take_unsent(&mut self) -> Vec<Bytes> {
        let mut out: Vec<Bytes> = self.bufs.drain(..).collect();
        if let Some(first) = out.first_mut() {
            *first = first.slice(self.front_offset..);
        }
        self.front_offset = 0;
        self.queued = 0;
        self.messages.clear();
        out
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
                    dest
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
    }
}
