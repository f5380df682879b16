//! Fan-out on every core: one broadcast group over two shards, two
//! publishing threads, eight subscribers that read and one that never
//! does. Starts its own loopback sink, runs about a second, and prints
//! what each subscriber received and what the shards reported.
//!
//! ```sh
//! cargo run --release --example broadcast
//! RINGMOVER_BACKEND=epoll cargo run --release --example broadcast
//! ```

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ringmover::shard::{Event, GroupOptions, Shards, SlowPolicy};

const READERS: usize = 8;
const PUBLISHERS: u32 = 2;
const RUN: Duration = Duration::from_secs(1);

fn main() -> std::io::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;

    // Every core: one shard (thread + Mover + ring) per CPU, at least 2.
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
    let (shards, events) = Shards::builder().threads(threads).build()?;
    println!("{} shards on {}", shards.threads(), shards.backend());

    // A subscriber more than 1 MiB behind skips whole packets until it
    // catches up (SlowPolicy::Disconnect would close it instead).
    let group = shards.group(GroupOptions::new(1 << 20, SlowPolicy::Drop));

    // The sink: readers that count what they get, and one peer that
    // never reads (its socket buffers fill, then it falls behind).
    let mut readers: Vec<JoinHandle<u64>> = Vec::new();
    for _ in 0..READERS {
        let stream = TcpStream::connect(addr)?;
        let (peer, _) = listener.accept()?;
        readers.push(std::thread::spawn(move || count(peer)));
        group.subscribe(shards.attach(stream)?)?;
    }
    let stuck = shards.attach(TcpStream::connect(addr)?)?;
    let (stuck_peer, _) = listener.accept()?;
    group.subscribe(stuck)?;
    println!(
        "subscribers: {}, the stuck one is {stuck}",
        group.subscribers()
    );

    // Publishers on their own threads: a 16-byte header and a shared
    // 16 KiB body per packet, one `Packet` (one reference count) for every
    // subscriber (a packet with a large piece is never copied).
    let body = Bytes::from(vec![b'x'; 16 << 10]);
    let t0 = Instant::now();
    let published: u64 = std::thread::scope(|s| {
        let workers: Vec<_> = (0..PUBLISHERS)
            .map(|p| {
                let (group, body) = (group.clone(), body.clone());
                s.spawn(move || {
                    let mut n = 0u64;
                    while t0.elapsed() < RUN {
                        let mut header = Vec::with_capacity(16);
                        header.extend_from_slice(&p.to_be_bytes());
                        header.extend_from_slice(&n.to_be_bytes());
                        header.extend_from_slice(&(body.len() as u32).to_be_bytes());
                        // Waits while a subscriber lags, but for the stuck
                        // one only once, for the group's stall (100 ms): then
                        // it stops holding publishers back, fills up to its
                        // limit, and skips packets from then on.
                        match group.publish_wait([Bytes::from(header), body.clone()], RUN) {
                            Ok(()) => n += 1,
                            Err(e) => {
                                eprintln!("publisher {p}: {e}");
                                break;
                            }
                        }
                    }
                    n
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    let packet = 16 + body.len() as u64;
    println!(
        "published {published} packets ({:.1} MiB each subscriber) in {:.2?}",
        (published * packet) as f64 / f64::from(1u32 << 20),
        t0.elapsed()
    );

    // Flush what is queued (the stuck subscriber never drains: 1 s grace).
    let report = shards.shutdown(Duration::from_secs(1));
    for (i, r) in readers.into_iter().enumerate() {
        let got = r.join().unwrap();
        let ok = if got == published * packet {
            "all"
        } else {
            "MISSING"
        };
        println!("reader {i}: {got} bytes ({ok})");
    }
    let mut skipped = 0;
    while let Some(ev) = events.try_recv() {
        match ev {
            Event::Dropped { conn, bytes, .. } if conn == stuck => skipped += bytes,
            other => println!("event: {other:?}"),
        }
    }
    drop(stuck_peer);
    println!("the stuck subscriber skipped {skipped} bytes");
    for shard in &report.shards {
        for (conn, unsent) in &shard.unsent {
            let n: usize = unsent.iter().map(Bytes::len).sum();
            println!("at shutdown {conn} still had {n} bytes queued");
        }
    }
    Ok(())
}

/// Reads to EOF, returning the byte count (bounded: EOF comes at shutdown).
fn count(mut s: TcpStream) -> u64 {
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0;
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    total
}
