//! Streaming sends: packets shared by reference, small pieces staged,
//! writability watermarks; and `bench gather --queue`, which drives them.
//! Every behaviour runs on every backend.

use std::collections::HashMap;
use std::io::Read;
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ringmover::{
    Backend, BackendChoice, Completion, Conn, Mover, MoverBuilder, Packet, SendErrorKind,
};

use crate::send::{pattern, slow_reader, tcp_pair, tcp_pairs};

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

/// Reads every socket of `peers` to EOF on one thread (poll(2)), failing
/// after a generous deadline (a hang bound, not a speed check); returns
/// what each sent, in the order given.
fn read_all_polled(peers: Vec<TcpStream>) -> std::thread::JoinHandle<Vec<Vec<u8>>> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut got = vec![Vec::new(); peers.len()];
        let mut open: Vec<usize> = (0..peers.len()).collect();
        let mut buf = vec![0u8; 64 << 10];
        while !open.is_empty() {
            assert!(
                Instant::now() < deadline,
                "{} of {} peers never saw EOF",
                open.len(),
                peers.len()
            );
            let mut fds: Vec<PollFd<'_>> = open
                .iter()
                .map(|&i| PollFd::new(peers[i].as_fd(), PollFlags::POLLIN))
                .collect();
            match poll(&mut fds, PollTimeout::from(200u16)) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => panic!("poll: {e}"),
            }
            let ready: Vec<usize> = fds
                .iter()
                .zip(&open)
                .filter(|(f, _)| f.revents().is_some_and(|r| !r.is_empty()))
                .map(|(_, &i)| i)
                .collect();
            drop(fds);
            for i in ready {
                // Readable (or hung up): this read does not block.
                match (&peers[i]).read(&mut buf) {
                    Ok(0) => open.retain(|&j| j != i),
                    Ok(n) => got[i].extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => panic!("reading peer {i}: {e}"),
                }
            }
        }
        got
    })
}

/// Issue 10's load item, with fewer connections: 200 streaming, 4 whose
/// peers never read (their socket buffers fill). The producer keeps
/// offering every connection packets: the reading ones while writable,
/// the stalled ones every round until their byte limit refuses. Every
/// reading connection gets its whole stream, byte-exact; no connection
/// ever holds more than its limit plus the one packet that reached it,
/// however much is offered (so what the engine holds stays within
/// connections × limit); and a stalled connection's written bytes plus
/// what `detach` hands back are exactly what it accepted.
pub fn stalled_connections_do_not_hold_back_the_rest(b: Option<Backend>) {
    const CONNS: usize = 200;
    const LIMIT: usize = 32 << 10;
    // Per reading connection: 100 packets of 2012 bytes, six limits' worth.
    const PACKETS: u32 = 100;
    // Rounds in a row every stalled connection must end refused and with
    // no write completed (its write waits on a full socket) before the end.
    const STUCK_ROUNDS: u32 = 20;
    let stalled = |i: usize| i % 50 == 7;
    let mut m = builder(b).max_queued_bytes(LIMIT).build().unwrap();
    let (ours, peers) = tcp_pairs(CONNS);
    let (mut reading, mut held) = (Vec::new(), Vec::new());
    for (i, p) in peers.into_iter().enumerate() {
        if stalled(i) {
            // A small, fixed send buffer (no autotuning): it fills soon.
            // (A tiny receive buffer would too, but reading it at the end
            // would then wait on the sender's zero-window probes.)
            set_sndbuf(&ours[i], 4096);
            held.push((i, p));
        } else {
            reading.push((i, p));
        }
    }
    let order: Vec<usize> = reading.iter().map(|(i, _)| *i).collect();
    let rx = read_all_polled(reading.into_iter().map(|(_, p)| p).collect());
    let conns: Vec<Conn> = ours.into_iter().map(|s| m.attach(s).unwrap()).collect();
    let index: HashMap<Conn, usize> = conns.iter().enumerate().map(|(i, &c)| (c, i)).collect();
    let bodies: Vec<Bytes> = (0..CONNS)
        .map(|i| Bytes::from(pattern(i as u64 + 100, 2000)))
        .collect();
    let pkt_len = packet(0, &bodies[0]).len();
    let mut next = vec![0u32; CONNS];
    let mut want: Vec<Vec<u8>> = vec![Vec::new(); CONNS];
    let mut written = vec![0usize; CONNS];
    let mut stuck = vec![0u32; CONNS];
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for (i, &c) in conns.iter().enumerate() {
            if stalled(i) {
                // A producer that ignores writability: the limit stops it.
                loop {
                    let p = packet(next[i], &bodies[i]);
                    match m.send_packet(c, p.clone()) {
                        Ok(()) => {
                            want[i].extend(p.pieces().iter().flat_map(|b| b.to_vec()));
                            next[i] += 1;
                        }
                        Err(e) => {
                            match e.kind {
                                SendErrorKind::BackPressure { queued, limit } => {
                                    assert_eq!(limit, LIMIT);
                                    assert!(queued >= LIMIT, "refused at {queued}");
                                }
                                other => panic!("connection {i} refused: {other:?}"),
                            }
                            assert_eq!(e.bufs.len(), p.len(), "the packet comes back");
                            stuck[i] += 1;
                            break;
                        }
                    }
                }
            } else {
                while next[i] < PACKETS && m.is_writable(c) == Some(true) {
                    let p = packet(next[i], &bodies[i]);
                    want[i].extend(p.pieces().iter().flat_map(|b| b.to_vec()));
                    m.send_packet(c, p).unwrap();
                    next[i] += 1;
                }
            }
            let q = m.queued(c).unwrap();
            assert!(
                q < LIMIT + pkt_len,
                "connection {i} holds {q} bytes: over its limit of {LIMIT} plus one packet"
            );
        }
        m.flush().unwrap();
        let from = seen.len();
        m.wait(Some(Duration::from_millis(10)), &mut seen).unwrap();
        for c in &seen[from..] {
            assert!(c.error.is_none(), "{:?}", c.error);
            let i = index[&c.conn];
            written[i] += c.written;
            // It moved: not stuck yet.
            stuck[i] = 0;
        }
        let behind: Vec<usize> = (0..CONNS)
            .filter(|&i| !stalled(i))
            .filter(|&i| next[i] < PACKETS || m.queued(conns[i]) != Some(0))
            .collect();
        if behind.is_empty() && (0..CONNS).all(|i| !stalled(i) || stuck[i] >= STUCK_ROUNDS) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "timed out: {} reading connections behind (first: {:?}), stalled stuck for {:?} rounds",
            behind.len(),
            behind.first().map(|&i| (i, next[i], m.queued(conns[i]))),
            (0..CONNS)
                .filter(|&i| stalled(i))
                .map(|i| stuck[i])
                .collect::<Vec<_>>()
        );
    }
    // The reading connections: everything written, closed, read to EOF.
    for &i in &order {
        let d = m.detach(conns[i]).unwrap();
        assert!(d.unsent.is_empty(), "connection {i}");
        assert_eq!(written[i] + d.written, want[i].len(), "connection {i}");
    }
    let got = rx.join().expect("the reader thread failed");
    for (&i, got) in order.iter().zip(&got) {
        assert!(
            *got == want[i],
            "connection {i}: got {} of {} bytes, or different ones",
            got.len(),
            want[i].len()
        );
    }
    // The stalled ones: still holding bytes, and exact about them.
    for (i, mut peer) in held {
        let d = m.detach(conns[i]).unwrap();
        let unsent: Vec<u8> = d.unsent.iter().flat_map(|b| b.to_vec()).collect();
        let wrote = written[i] + d.written;
        assert!(!unsent.is_empty(), "stalled connection {i} drained");
        assert_eq!(wrote + unsent.len(), want[i].len(), "connection {i}");
        drop(d.fd);
        peer.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut got = Vec::new();
        peer.read_to_end(&mut got)
            .expect("reading what a stalled connection had written");
        assert_eq!(got.len(), wrote, "connection {i}");
        assert!(got[..] == want[i][..wrote], "connection {i}");
        assert!(unsent[..] == want[i][wrote..], "connection {i}");
    }
}

for_each_backend!(
    auto;
    writability_flips_once_each_way,
    default_watermarks_follow_back_pressure,
    staged_packets_arrive_byte_exact,
    detach_mid_stream_returns_exactly_the_rest,
    stalled_connections_do_not_hold_back_the_rest,
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
    use crate::util::{ringmover, run};
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
    // Both ways round the connections (`--refill`); the built-in sink
    // checks it got every byte written either way.
    for refill in ["breadth", "deep"] {
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
            "--refill",
            refill,
            "--strategy",
            &strategies,
        ]));
        let lines = crate::util::json_rows(&out);
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
            assert_eq!(v["refill"], refill, "{v}");
        }
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
        // One of the three stalled: it goes to the bench's own listener,
        // which never reads, not to the sink.
        "--stalled",
        "0,34",
    ]));
    sink.kill().unwrap();
    sink.wait().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let stalled: Vec<u64> = crate::util::stdout(&out)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert!(v["bytes"].as_u64().unwrap() > 0, "{v}");
            v["stalled"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(stalled, [0, 0, 1, 1]);
}

/// `bench gather --stalled`: stalled connections go to a listener that
/// never reads; each row counts only the connections that read (the
/// built-in sink checks it got every byte written to them, or the bench
/// fails), says how many were stalled and the most one held queued (its
/// limit, --queue, plus at most one packet), and compares with the same
/// strategy's cell with none stalled.
#[cfg(target_os = "linux")]
#[test]
fn bench_gather_stalled_counts_only_the_readers() {
    use crate::util::{output_within, ringmover};
    let out = output_within(
        ringmover().args([
            "bench",
            "gather",
            "--queue",
            "16K",
            "--conns",
            "20",
            "--stalled",
            "10,0",
            "--shape",
            "small",
            "--strategy",
            "glue,epoll",
            "--seconds",
            "0.1",
            "--warmup",
            "0.05",
            "--json",
        ]),
        Duration::from_secs(120),
        "bench gather --stalled",
    );
    let lines = crate::util::json_rows(&out);
    let cells: Vec<(&str, u64)> = lines
        .iter()
        .map(|v| {
            (
                v["strategy"].as_str().unwrap(),
                v["stalled"].as_u64().unwrap(),
            )
        })
        .collect();
    // Ascending, whatever order they were given in.
    assert_eq!(
        cells,
        [
            ("glue", 0),
            ("ringmover-epoll", 0),
            ("glue", 2),
            ("ringmover-epoll", 2)
        ]
    );
    let packet = 512 + 4 * 12;
    for v in &lines {
        assert!(v["bytes"].as_u64().unwrap() > 0, "{v}");
        if v["stalled"] == 0 {
            assert!(v["stalled_queued_max"].is_null(), "{v}");
            assert!(v["vs_unstalled"].is_null(), "{v}");
        } else {
            let q = v["stalled_queued_max"].as_u64().unwrap();
            assert!((16 << 10..(16 << 10) + packet).contains(&q), "{v}");
            assert!(v["vs_unstalled"].as_f64().unwrap() > 0.0, "{v}");
            assert_eq!(v["stalled_percent"], 10.0, "{v}");
        }
    }
}

/// The bench raises RLIMIT_NOFILE's soft limit to what its connections
/// need, and says so; past what the kernel allows (`fs.nr_open`) it fails
/// before opening anything, naming the limit and the number needed.
#[cfg(target_os = "linux")]
#[test]
fn bench_gather_makes_room_for_its_descriptors() {
    use crate::util::{output_within, stderr, stdout};
    let bench = |soft: &str, conns: &str| {
        let mut cmd = std::process::Command::new("sh");
        cmd.env_remove("RINGMOVER_BACKEND")
            .arg("-c")
            .arg(format!("ulimit -S -n {soft} && exec \"$0\" \"$@\""))
            .arg(env!("CARGO_BIN_EXE_ringmover"))
            .args(["bench", "gather", "--queue", "16K", "--conns", conns])
            .args([
                "--stalled",
                "0,2",
                "--shape",
                "small",
                "--strategy",
                "epoll",
            ])
            .args(["--seconds", "0.1", "--warmup", "0.05", "--json"]);
        output_within(&mut cmd, Duration::from_secs(120), "bench gather")
    };
    // 100 connections and the sink's ends need about 270 descriptors.
    let out = bench("64", "100");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("raised RLIMIT_NOFILE's soft limit from 64"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stdout(&out).lines().count(), 2);
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .expect("reading fs.nr_open")
        .trim()
        .parse()
        .unwrap();
    let out = bench("64", &nr_open.to_string());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("{nr_open} connections need about"))
            && err.contains("RLIMIT_NOFILE")
            && err.contains("fs.nr_open"),
        "{err}"
    );
    assert!(stdout(&out).is_empty());
}
