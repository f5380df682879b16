//! Continuous production with back-pressure: a producer streams packets to
//! four connections of a local sink for two seconds, sending on each only
//! while it is writable and resuming when a completion says
//! `writable_again`. One reader is slow: its connection pauses often, the
//! others keep streaming, and memory stays within the watermarks.
//!
//! `cargo run --release --example stream` (RINGMOVER_BACKEND picks the backend).

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ringmover::{Mover, Packet};

const CONNS: usize = 4;
const RUN: Duration = Duration::from_secs(2);

fn main() -> std::io::Result<()> {
    // The sink: one reader thread per connection; reader 0 is slow.
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let sink = thread::spawn(move || -> std::io::Result<Vec<u64>> {
        let readers: Vec<_> = (0..CONNS)
            .map(|i| {
                let (s, _) = listener.accept()?;
                Ok(thread::spawn(move || read_all(s, i == 0)))
            })
            .collect::<std::io::Result<_>>()?;
        readers
            .into_iter()
            .map(|r| r.join().expect("reader thread"))
            .collect()
    });

    // Unwritable at 256 KiB queued, writable again at 64 KiB or less.
    let mut mover = Mover::builder()
        .write_watermarks(64 << 10, 256 << 10)
        .build()?;
    let conns = (0..CONNS)
        .map(|_| mover.attach(TcpStream::connect(addr)?))
        .collect::<std::io::Result<Vec<_>>>()?;
    println!("backend: {}", mover.backend());

    // Each packet: a small header and a 16 KiB slice of one payload, queued
    // by one reference (only packets whose pieces are all under the copy
    // threshold are copied).
    let payload = Bytes::from(vec![0x5a; 1 << 20]);
    let mut writable = [true; CONNS];
    let (mut sent, mut pauses) = ([0u64; CONNS], [0u32; CONNS]);
    let mut done = Vec::new();
    let mut seq = 0u64;
    let deadline = Instant::now() + RUN;
    while Instant::now() < deadline {
        for (i, &c) in conns.iter().enumerate() {
            while writable[i] {
                let at = (seq as usize * 16384) % payload.len();
                let header = Bytes::from(format!("seq {seq:>12}\n"));
                let pkt = Packet::new([header, payload.slice(at..at + 16384)]);
                sent[i] += pkt.len() as u64;
                // Refused only past the byte limit, which writability keeps us under.
                mover.send_packet(c, pkt)?;
                seq += 1;
                if mover.is_writable(c) == Some(false) {
                    writable[i] = false;
                    pauses[i] += 1;
                }
            }
        }
        mover.flush()?;
        mover.wait(Some(Duration::from_millis(50)), &mut done)?;
        for d in done.drain(..) {
            if let Some(e) = d.error {
                return Err(e.error);
            }
            if d.writable_again {
                let i = conns.iter().position(|&c| c == d.conn).expect("our conn");
                writable[i] = true;
            }
        }
    }
    // Stop producing; finish what is queued, then close.
    mover.flush_and_wait(&mut done)?;
    if let Some(e) = done.iter().find_map(|d| d.error.as_ref()) {
        return Err(std::io::Error::new(e.error.kind(), e.error.to_string()));
    }
    for c in conns {
        drop(mover.detach(c)?);
    }
    let received = sink.join().expect("sink thread")?;
    for i in 0..CONNS {
        println!(
            "conn {i}{}: {:>7.1} MiB sent, {:>4} pauses, {}",
            if i == 0 { " (slow reader)" } else { "" },
            sent[i] as f64 / f64::from(1 << 20),
            pauses[i],
            if received[i] == sent[i] {
                "all received"
            } else {
                "MISMATCH"
            },
        );
        if received[i] != sent[i] {
            return Err(std::io::Error::other("the sink missed bytes"));
        }
    }
    Ok(())
}

/// Reads `s` to its end, slowly if asked (16 KiB every 2 ms).
fn read_all(mut s: TcpStream, slow: bool) -> std::io::Result<u64> {
    let mut buf = vec![0u8; if slow { 16 << 10 } else { 1 << 20 }];
    let mut total = 0;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
        if slow {
            thread::sleep(Duration::from_millis(2));
        }
    }
}
