//! The pure core, exhaustively: random buffers, random partial writes,
//! compared with a flat copy. No syscalls involved.

use bytes::Bytes;
use proptest::prelude::*;
use ringmover::outbox::{Framing, Outbox, IOV_MAX};

fn bufs_strategy() -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop::collection::vec(prop::collection::vec(any::<u8>(), 0..=300), 0..=2000)
}

/// Simulates a kernel that writes `k` bytes of what the iovecs describe.
fn write_some(outbox: &mut Outbox, max: usize, frac: f64, out: &mut Vec<u8>) -> usize {
    let mut iov = Vec::new();
    let batch = outbox.fill_iovecs(&mut iov, max);
    let chunks: Vec<&[u8]> = outbox.chunks(max.clamp(1, IOV_MAX)).collect();
    // fill_iovecs describes exactly what chunks yields.
    assert_eq!(iov.len(), chunks.len());
    for (v, c) in iov.iter().zip(&chunks) {
        assert_eq!(v.iov_base as *const u8, c.as_ptr());
        assert_eq!(v.iov_len, c.len());
        assert!(!c.is_empty());
    }
    assert!(iov.len() <= IOV_MAX);
    assert_eq!(batch.bytes, chunks.iter().map(|c| c.len()).sum::<usize>());
    let k = ((batch.bytes as f64) * frac) as usize;
    let mut left = k;
    for c in chunks {
        let n = left.min(c.len());
        out.extend_from_slice(&c[..n]);
        left -= n;
    }
    outbox.advance(k);
    k
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn partial_writes_reassemble_the_stream(
        bufs in bufs_strategy(),
        later in bufs_strategy(),
        fracs in prop::collection::vec(0.0f64..=1.0, 1..50),
        max in 1usize..=1100,
    ) {
        let mut outbox = Outbox::new(Framing::Stream);
        let mut flat = Vec::new();
        for b in &bufs { flat.extend_from_slice(b); }
        outbox.push(bufs.into_iter().map(Bytes::from), None);
        prop_assert_eq!(outbox.queued_bytes(), flat.len());
        let mut out = Vec::new();
        let mut pushed_later = false;
        let mut i = 0;
        while !outbox.is_empty() {
            // Progress is guaranteed: a zero write now and then, then a full one.
            let frac = if i % 7 == 6 { 1.0 } else { fracs[i % fracs.len()] };
            write_some(&mut outbox, max, frac, &mut out);
            prop_assert_eq!(outbox.queued_bytes(), flat.len() - out.len());
            if !pushed_later && i == 3 {
                for b in &later { flat.extend_from_slice(b); }
                outbox.push(later.iter().cloned().map(Bytes::from), None);
                pushed_later = true;
            }
            i += 1;
        }
        if !pushed_later {
            for b in &later { flat.extend_from_slice(b); }
            outbox.push(later.iter().cloned().map(Bytes::from), None);
            while !outbox.is_empty() {
                write_some(&mut outbox, max, 1.0, &mut out);
            }
        }
        prop_assert!(out == flat);
    }

    #[test]
    fn take_unsent_is_exactly_the_remainder(
        bufs in bufs_strategy(),
        fracs in prop::collection::vec(0.0f64..=1.0, 0..10),
        max in 1usize..=1100,
    ) {
        let mut outbox = Outbox::new(Framing::Stream);
        let mut flat = Vec::new();
        for b in &bufs { flat.extend_from_slice(b); }
        outbox.push(bufs.into_iter().map(Bytes::from), None);
        let mut out = Vec::new();
        for f in fracs {
            write_some(&mut outbox, max, f, &mut out);
        }
        let rest: Vec<u8> = outbox.take_unsent().iter().flat_map(|b| b.iter().copied()).collect();
        prop_assert!(outbox.is_empty());
        prop_assert_eq!(outbox.queued_bytes(), 0);
        out.extend_from_slice(&rest);
        prop_assert!(out == flat);
    }
}

#[test]
fn more_than_iov_max_buffers_split_across_batches() {
    let mut outbox = Outbox::new(Framing::Stream);
    outbox.push((0..2500u32).map(|i| Bytes::from(vec![i as u8; 3])), None);
    let mut iov = Vec::new();
    let b1 = outbox.fill_iovecs(&mut iov, usize::MAX);
    assert_eq!((b1.iovecs, b1.bytes), (IOV_MAX, 3 * IOV_MAX));
    outbox.advance(b1.bytes);
    let b2 = outbox.fill_iovecs(&mut iov, IOV_MAX);
    assert_eq!(b2.iovecs, IOV_MAX);
    outbox.advance(b2.bytes);
    let b3 = outbox.fill_iovecs(&mut iov, IOV_MAX);
    assert_eq!(
        (b3.iovecs, b3.bytes),
        (2500 - 2 * IOV_MAX, 3 * (2500 - 2 * IOV_MAX))
    );
}

#[test]
fn partial_write_inside_at_and_across_boundaries() {
    let mut o = Outbox::new(Framing::Stream);
    o.push(
        [
            Bytes::from_static(b"abc"),
            Bytes::new(),
            Bytes::from_static(b"defg"),
            Bytes::from_static(b"hi"),
        ],
        None,
    );
    o.advance(1); // inside
    assert_eq!(
        o.chunks(10).collect::<Vec<_>>(),
        vec![&b"bc"[..], b"defg", b"hi"]
    );
    o.advance(2); // exactly at a boundary (the empty buffer is skipped)
    assert_eq!(o.chunks(10).collect::<Vec<_>>(), vec![&b"defg"[..], b"hi"]);
    o.advance(5); // across
    assert_eq!(o.chunks(10).collect::<Vec<_>>(), vec![&b"i"[..]]);
    assert_eq!(o.take_unsent(), vec![Bytes::from_static(b"i")]);
    assert!(o.is_empty());
}

#[test]
fn datagrams_keep_boundaries_and_destinations() {
    let dest: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let mut o = Outbox::new(Framing::Datagram);
    o.push(
        [Bytes::from_static(b"a"), Bytes::from_static(b"bc")],
        Some(dest),
    );
    o.push(Vec::<Bytes>::new(), None);
    o.push([Bytes::from_static(b"d")], None);
    assert_eq!(o.queued_messages(), 3);
    let mut iov = Vec::new();
    let b = o.fill_iovecs(&mut iov, IOV_MAX);
    assert_eq!((b.bytes, b.iovecs, b.dest), (3, 2, Some(dest)));
    o.advance(3);
    let b = o.fill_iovecs(&mut iov, IOV_MAX);
    assert_eq!((b.bytes, b.iovecs, b.dest), (0, 0, None));
    assert!(!o.is_empty(), "an empty datagram is still a message");
    o.advance(0);
    assert_eq!(o.front_pieces(), 1);
    o.advance(1);
    assert!(o.is_empty());
}
