//! Streaming sends: packets shared by reference, small pieces staged,
//! writability watermarks; and `bench gather --queue`, which drives them.
//! Every behaviour runs on every backend.

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ringmover::{Backend, BackendChoice, Completion, Mover, MoverBuilder, Packet, SendErrorKind};

use crate::send::{pattern, slow_reader, tcp_pair};

fn builder(backend: Option<Backend>) -> MoverBuilder {
    Mover::builder().backend(backend.map_or(BackendChoice::Auto, BackendChoice::Force))
}

fn set_sndbuf(s: &TcpStream, bytes: usize) {
    nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::SndBuf, &bytes).unwrap();
}

/// Waits for completions until `until` holds for one of them, failing on
/// any connection error and after a generous deadline naming `what`.
fn wait_until(
    m: &mut Mover,
    what: &str,
    seen: &mut Vec<Completion>,
    until: impl Fn(&Completion) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let from = seen.len();
        m.wait(Some(Duration::from_millis(200)), seen).unwrap();
        for c in &seen[from..] {
            assert!(c.error.is_none(), "{what}: {:?}", c.error);
        }
        if seen[from..].iter().any(&until) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
    }
}

/// One packet: a 12-byte header, then `body` cut at 100 and 1500 bytes,
/// so it has small pieces (staged) and, for long bodies, large ones.
fn packet(seq: u32, body: &Bytes) -> Packet {
    let header = Bytes::from(format!("<pkt {seq:06}>"));
    let cut = body.len().min(100);
    let cut2 = body.len().min(1500);
    Packet::new([
        header,
        body.slice(..cut),
        body.slice(cut..cut2),
        body.slice(cut2..),
    ])
}

pub fn writability_flips_once_each_way(b: Option<Backend>) {
    let (low, high) = (64 << 10, 256 << 10);
    let mut m = builder(b).write_watermarks(low, high).build().unwrap();
    let (a, peer) = tcp_pair();
    set_sndbuf(&a, 4096);
    let conn = m.attach(a).unwrap();
    let body = Bytes::from(pattern(7, 4000));
    let mut want = Vec::new();
    let mut seq = 0;
    // Below the high mark the connection stays writable; reaching it flips.
    while m.is_writable(conn).unwrap() {
        assert!(m.queued(conn).unwrap() < high);
        let p = packet(seq, &body);
        for piece in p.pieces() {
            want.extend_from_slice(piece);
        }
        m.send_packet(conn, p).unwrap();
        seq += 1;
    }
    assert!(m.queued(conn).unwrap() >= high);
    // Unwritable is advice: sends are still accepted up to the byte limit.
    m.send_packet(conn, packet(seq, &body)).unwrap();
    for piece in packet(seq, &body).pieces() {
        want.extend_from_slice(piece);
    }
    m.flush().unwrap();
    let rx = slow_reader(peer, 8192);
    let mut seen = Vec::new();
    wait_until(&mut m, "writable_again", &mut seen, |c| c.writable_again);
    let flips: Vec<&Completion> = seen.iter().filter(|c| c.writable_again).collect();
    assert_eq!(flips.len(), 1);
    assert!(
        flips[0].queued <= low,
        "flipped at {} queued",
        flips[0].queued
    );
    // Every completion before the flip still had more than `low` queued.
    let at = seen.iter().position(|c| c.writable_again).unwrap();
    assert!(seen[..at].iter().all(|c| c.queued > low));
    assert!(m.is_writable(conn).unwrap());
    m.flush_and_wait(&mut seen).unwrap();
    assert_eq!(seen.iter().filter(|c| c.writable_again).count(), 1);
    drop(m.detach(conn).unwrap());
    assert!(rx.join().unwrap() == want);
}

pub fn default_watermarks_follow_back_pressure(b: Option<Backend>) {
    let limit = 100_000;
    let mut m = builder(b).max_queued_bytes(limit).build().unwrap();
    let (a, peer) = tcp_pair();
    set_sndbuf(&a, 4096);
    let conn = m.attach(a).unwrap();
    let body = Bytes::from(pattern(8, 3000));
    let mut want = Vec::new();
    let mut seq = 0;
    let refused = loop {
        assert!(m.is_writable(conn).unwrap());
        match m.send_packet(conn, packet(seq, &body)) {
            Ok(()) => {
                for piece in packet(seq, &body).pieces() {
                    want.extend_from_slice(piece);
                }
                seq += 1;
                if !m.is_writable(conn).unwrap() {
                    break m.send_packet(conn, packet(seq, &body)).unwrap_err();
                }
            }
            Err(e) => panic!("refused while writable: {e}"),
        }
    };
    assert_eq!(
        refused.kind,
        SendErrorKind::BackPressure {
            queued: m.queued(conn).unwrap(),
            limit
        }
    );
    assert_eq!(refused.bufs.len(), packet(seq, &body).len());
    let rx = slow_reader(peer, 4096);
    let mut seen = Vec::new();
    wait_until(&mut m, "writable_again", &mut seen, |c| c.writable_again);
    let flip = seen.iter().find(|c| c.writable_again).unwrap();
    assert!(flip.queued <= limit / 2, "{}", flip.queued);
    m.send_packet(conn, refused.bufs).unwrap();
    for piece in packet(seq, &body).pieces() {
        want.extend_from_slice(piece);
    }
    m.flush_and_wait(&mut seen).unwrap();
    drop(m.detach(conn).unwrap());
    assert!(rx.join().unwrap() == want);
}

/// Packets and plain buffers interleaved, small pieces staged at three
/// thresholds, through a tiny send buffer and a slow reader (many partial
/// writes inside staged runs): the stream arrives byte-exact.
pub fn staged_packets_arrive_byte_exact(b: Option<Backend>) {
    for threshold in [0, ringmover::DEFAULT_COPY_THRESHOLD, 1 << 20] {
        let mut m = builder(b).copy_threshold(threshold).build().unwrap();
        let (a, peer) = tcp_pair();
        set_sndbuf(&a, 4096);
        let rx = slow_reader(peer, 1500);
        let conn = m.attach(a).unwrap();
        let bodies: Vec<Bytes> = (0..5)
            .map(|i| Bytes::from(pattern(i, 500 + 900 * i as usize)))
            .collect();
        let mut want = Vec::new();
        let mut seen = Vec::new();
        for seq in 0..600u32 {
            let body = &bodies[seq as usize % bodies.len()];
            if seq % 3 == 0 {
                let bufs = [
                    Bytes::from(format!("[{seq}]")),
                    body.slice(..body.len() / 2),
                ];
                want.extend(bufs.iter().flat_map(|b| b.to_vec()));
                m.send(conn, bufs).unwrap();
            } else {
                let p = packet(seq, body);
                want.extend(p.pieces().iter().flat_map(|b| b.to_vec()));
                m.send_packet(conn, p).unwrap();
            }
            if seq % 50 == 0 {
                m.flush().unwrap();
            }
        }
        m.flush_and_wait(&mut seen).unwrap();
        assert!(
            seen.iter().all(|c| c.error.is_none()),
            "threshold {threshold}"
        );
        assert_eq!(seen.iter().map(|c| c.written).sum::<usize>(), want.len());
        drop(m.detach(conn).unwrap());
        assert!(rx.join().unwrap() == want, "threshold {threshold}");
    }
}

/// Detaching a connection mid-stream hands back exactly the bytes not
/// written, in order, as the original pieces (the staged copies are
/// never what comes back): what the peer read plus them is the input.
pub fn detach_mid_stream_returns_exactly_the_rest(b: Option<Backend>) {
    let mut m = builder(b).build().unwrap();
    let (a, mut peer) = tcp_pair();
    set_sndbuf(&a, 4096);
    let conn = m.attach(a).unwrap();
    let body = Bytes::from(pattern(9, 2500));
    let mut want = Vec::new();
    for seq in 0..400 {
        let p = packet(seq, &body);
        want.extend(p.pieces().iter().flat_map(|b| b.to_vec()));
        m.send_packet(conn, p).unwrap();
    }
    m.flush().unwrap();
    let mut seen = Vec::new();
    // Let some writes finish (the peer does not read: the kernel fills up).
    m.wait(Some(Duration::from_millis(300)), &mut seen).unwrap();
    let detached = m.detach(conn).unwrap();
    let unsent: Vec<u8> = detached.unsent.iter().flat_map(|b| b.to_vec()).collect();
    assert!(!unsent.is_empty() && unsent.len() < want.len());
    // The returned pieces are the packets' own memory, not staged copies.
    let originals = [body.as_ptr() as usize, body.as_ptr() as usize + body.len()];
    let tail = detached.unsent.last().unwrap();
    assert!((originals[0]..=originals[1]).contains(&(tail.as_ptr() as usize)));
    drop(detached);
    peer.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut got = Vec::new();
    peer.read_to_end(&mut got)
        .expect("reading what was written");
    assert_eq!(got.len() + unsent.len(), want.len());
    assert!(got[..] == want[..got.len()]);
    assert!(unsent[..] == want[got.len()..]);
}

for_each_backend!(
    auto;
    writability_flips_once_each_way,
    default_watermarks_follow_back_pressure,
    staged_packets_arrive_byte_exact,
    detach_mid_stream_returns_exactly_the_rest,
);

/// io_uring: a write that staged 32 KiB or more is submitted at once (the
/// kernel copies it at submission, while it is in cache), so a flush of
/// four such connections enters four times; a flush of small packets
/// (lock-step rounds) still enters once for all. Every byte arrives.
#[test]
#[cfg(target_os = "linux")]
fn uring_submits_large_staged_writes_at_once() {
    let mut m = builder(Some(Backend::Uring)).build().unwrap();
    let (ours, peers) = crate::send::tcp_pairs(4);
    let conns: Vec<_> = ours.into_iter().map(|s| m.attach(s).unwrap()).collect();
    let readers: Vec<_> = peers.into_iter().map(|p| slow_reader(p, 1 << 16)).collect();
    let body = Bytes::from(pattern(9, 128));
    let mut want = vec![Vec::new(); conns.len()];
    let mut seen = Vec::new();
    // Round 1: one 140-byte packet per connection (nothing much staged).
    // Round 2: 48 KiB of them per connection (a large staged write each).
    for (round, packets) in [(1, 1), (2, 48 * 1024 / 140)] {
        for (i, &c) in conns.iter().enumerate() {
            for seq in 0..packets {
                let p = packet(seq as u32, &body);
                want[i].extend(p.pieces().iter().flat_map(|b| b.to_vec()));
                m.send_packet(c, p).unwrap();
            }
        }
        let before = m.stats().enters;
        m.flush().unwrap();
        let enters = m.stats().enters - before;
        let expect = if round == 1 { 1 } else { conns.len() as u64 };
        assert_eq!(enters, expect, "round {round}: {:?}", m.stats());
        m.flush_and_wait(&mut seen).unwrap();
    }
    assert!(seen.iter().all(|c| c.error.is_none()), "{seen:?}");
    for (c, (rx, want)) in conns.into_iter().zip(readers.into_iter().zip(want)) {
        drop(m.detach(c).unwrap());
        assert!(rx.join().unwrap() == want, "a connection's bytes differ");
    }
}

#[test]
fn bad_watermarks_are_a_clear_error() {
    let e = Mover::builder()
        .backend(BackendChoice::Force(Backend::Poll))
        .write_watermarks(10, 5)
        .build()
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    assert!(e.to_string().contains("write_watermarks"), "{e}");
}

/// `bench gather --queue` runs every streaming strategy on two threads and
/// reports each (so the bench never rots); like `ringmover bench`, Linux
/// only.
#[cfg(target_os = "linux")]
#[test]
fn bench_gather_streams_every_strategy() {
    use crate::util::{ringmover, run, stderr, stdout};
    // ringmover on io_uring only where a ring can be set up here.
    let uring = ringmover::Selection::choose(BackendChoice::Force(Backend::Uring)).is_ok();
    let mut want = vec![
        "writev",
        "coalesce",
        "glue",
        "ringmover-epoll",
        "ringmover-poll",
    ];
    if uring {
        want.insert(3, "ringmover-uring");
    }
    let strategies = want.join(",").replace("ringmover-", "");
    let out = run(ringmover().args([
        "bench",
        "gather",
        "--queue",
        "16K",
        "--threads",
        "2",
        "--conns",
        "4",
        "--shape",
        "small",
        "--seconds",
        "0.1",
        "--warmup",
        "0.05",
        "--json",
        "--strategy",
        &strategies,
    ]));
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<&str> = lines
        .iter()
        .map(|v| v["strategy"].as_str().unwrap())
        .collect();
    assert_eq!(names, want);
    for v in &lines {
        assert_eq!(v["type"], "bench-gather", "{v}");
        assert!(v["bytes"].as_u64().unwrap() > 0, "{v}");
        assert_eq!(
            (v["queue"].as_u64(), v["threads"].as_u64()),
            (Some(16 << 10), Some(2))
        );
    }
}

/// The sink runs as its own process and `--to` sends to it.
#[cfg(target_os = "linux")]
#[test]
fn bench_sink_serves_another_process() {
    use crate::util::{ringmover, run, stderr};
    use std::io::BufRead;
    let mut sink = ringmover()
        .args(["bench", "sink", "--listen", "127.0.0.1:0"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawning the sink");
    let mut line = String::new();
    std::io::BufReader::new(sink.stderr.take().unwrap())
        .read_line(&mut line)
        .expect("reading the sink's address");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .expect(&line)
        .to_string();
    let out = run(ringmover().args([
        "bench",
        "gather",
        "--to",
        &addr,
        "--conns",
        "3",
        "--shape",
        "small",
        "--strategy",
        "glue,epoll",
        "--seconds",
        "0.1",
        "--warmup",
        "0.05",
        "--json",
    ]));
    sink.kill().unwrap();
    sink.wait().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(crate::util::stdout(&out).lines().count(), 2);
}
