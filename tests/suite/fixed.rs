//! One pool of registered buffers shared by several engines: every ring
//! registers the same memory, a payload leased once goes out of any of
//! them, and the memory outlives the first engine to go.

use std::io::Read;
use std::net::TcpStream;
use std::time::Duration;

use bytes::Bytes;
use ringmover::shard::{Event, GroupOptions, Shards, SlowPolicy};
use ringmover::{Backend, FixedBufPool, Packet, ZeroCopy};

use crate::send::{builder, pattern, tcp_pair};

const SIZE: usize = 128 << 10;

/// A payload in `pool`'s registered memory.
fn leased(pool: &FixedBufPool, seed: u64) -> Bytes {
    let mut buf = pool.lease().expect("a free buffer in the pool");
    buf.extend_from_slice(&pattern(seed, SIZE)).unwrap();
    buf.freeze()
}

fn read_exactly(mut s: TcpStream, len: usize) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = vec![0u8; len];
        s.read_exact(&mut v).expect("reading what was published");
        v
    })
}

/// Two shards (two rings) register one pool; one leased payload is
/// published to a subscriber on each, zero-copy where the backend can.
pub fn pool_shared_across_shards(b: Option<Backend>) {
    let pool = FixedBufPool::new(2, SIZE).unwrap();
    let (shards, events) = Shards::builder()
        .threads(2)
        .mover(
            builder(b)
                .fixed_pool(pool.clone())
                .zero_copy(ZeroCopy::Always),
        )
        .build()
        .unwrap();
    let group = shards.group(GroupOptions::new(64 * SIZE, SlowPolicy::Disconnect));
    let mut readers = Vec::new();
    for shard in 0..2 {
        let (ours, theirs) = tcp_pair();
        let conn = shards.attach_to(shard, ours).unwrap();
        assert_eq!(conn.shard(), shard);
        group.subscribe(conn).unwrap();
        readers.push(read_exactly(theirs, 8 * SIZE));
    }
    let payload = leased(&pool, 3);
    assert_eq!(pool.available(), 1);
    // One packet, published again and again: a reference count per
    // subscriber, the registered payload never copied.
    let packet = Packet::from(payload.clone());
    for _ in 0..8 {
        group
            .publish_wait(packet.clone(), Duration::from_secs(10))
            .unwrap();
    }
    let want: Vec<u8> = payload.iter().copied().cycle().take(8 * SIZE).collect();
    for r in readers {
        assert!(
            r.join().expect("reader") == want,
            "a subscriber got other bytes"
        );
    }
    let report = shards.shutdown(Duration::from_secs(10));
    assert_eq!(report.unsent_bytes(), 0);
    while let Some(ev) = events.try_recv() {
        assert!(
            !matches!(ev, Event::Failed { .. } | Event::ShardFailed { .. }),
            "{ev:?}"
        );
    }
    // Every engine let go of its references: the buffer is back.
    drop((packet, payload));
    assert_eq!(pool.available(), 2);
}

/// Two engines on one thread register the pool; the first is dropped and
/// the second still sends from the same registered memory.
pub fn pool_outlives_the_first_engine(b: Option<Backend>) {
    let pool = FixedBufPool::new(1, SIZE).unwrap();
    let builder = builder(b).fixed_pool(pool.clone());
    let first = builder.clone().build().unwrap();
    let mut second = builder.build().unwrap();
    let payload = leased(&pool, 5);
    drop(first);
    let (ours, theirs) = tcp_pair();
    let conn = second.attach(ours).unwrap();
    let reader = read_exactly(theirs, SIZE);
    second.send(conn, [payload.clone()]).unwrap();
    let mut done = Vec::new();
    second.flush_and_wait(&mut done).unwrap();
    assert!(done.iter().all(|c| c.error.is_none()), "{done:?}");
    assert!(reader.join().expect("reader") == payload[..]);
    drop((second, payload));
    assert_eq!(pool.available(), 1);
}

for_each_backend!(pool_shared_across_shards, pool_outlives_the_first_engine);
