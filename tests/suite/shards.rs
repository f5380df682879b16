//! Shards and broadcast groups (`ringmover::shard`), on every backend: real
//! threads, real loopback sockets. Timing decides nothing here; every
//! blocking step has a generous bound that names what it waited for.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ringmover::shard::{
    Event, Events, GroupOptions, PublishErrorKind, ShardConn, Shards, SlowPolicy,
};
use ringmover::{Backend, BackendChoice, Mover, Packet};

use super::send::{pattern, pieces, tcp_pair};

/// How long any one blocking step may take before the test fails.
const HANG: Duration = Duration::from_secs(60);

fn start(b: Option<Backend>, threads: usize) -> (Shards, Events) {
    let choice = b.map_or(BackendChoice::Auto, BackendChoice::Force);
    let (shards, events) = Shards::builder()
        .threads(threads)
        .mover(Mover::builder().backend(choice))
        .build()
        .expect("starting the shards");
    if let Some(b) = b {
        assert_eq!(shards.backend(), b);
    }
    assert_eq!(shards.threads(), threads);
    (shards, events)
}

/// Reads `s` to EOF (bounded by HANG per read).
fn read_all(mut s: TcpStream) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        s.set_read_timeout(Some(HANG)).unwrap();
        let mut v = Vec::new();
        s.read_to_end(&mut v)
            .expect("reading a peer to EOF (60 s bound per read)");
        v
    })
}

/// Reads `s` to EOF, counting in `progress` the bytes received so far.
fn read_all_counting(mut s: TcpStream, progress: Arc<AtomicUsize>) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        s.set_read_timeout(Some(HANG)).unwrap();
        let mut v = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = s
                .read(&mut buf)
                .expect("reading a subscriber's peer (60 s bound per read)");
            if n == 0 {
                return v;
            }
            v.extend_from_slice(&buf[..n]);
            progress.store(v.len(), Ordering::SeqCst);
        }
    })
}

/// A loopback pair with small socket buffers, so a peer that never reads
/// stalls the sender after a few KiB.
fn small_pair() -> (TcpStream, TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    setsockopt(&l, sockopt::RcvBuf, &4096).unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    setsockopt(&a, sockopt::SndBuf, &4096).unwrap();
    let (b, _) = l.accept().unwrap();
    (a, b)
}

/// Every event waiting now.
fn drain_events(events: &Events) -> Vec<Event> {
    std::iter::from_fn(|| events.try_recv()).collect()
}

fn failures(evs: &[Event]) -> Vec<String> {
    evs.iter()
        .filter_map(|e| match e {
            Event::Failed { conn, error, .. } => Some(format!("{conn}: {error}")),
            Event::ShardFailed { shard, error } => Some(format!("shard {shard}: {error}")),
            Event::Disconnected { conn, .. } => Some(format!("{conn} disconnected")),
            _ => None,
        })
        .collect()
}

/// A record: 12-byte header (publisher, sequence, body length, big-endian)
/// then the body, a slice of a shared buffer.
fn record(body: &Bytes, publisher: u32, seq: u32) -> [Bytes; 2] {
    let at = (seq as usize * 7) % 1000;
    let len = 100 + (seq as usize * 13) % 300;
    let mut h = Vec::with_capacity(12);
    h.extend_from_slice(&publisher.to_be_bytes());
    h.extend_from_slice(&seq.to_be_bytes());
    h.extend_from_slice(&(len as u32).to_be_bytes());
    [Bytes::from(h), body.slice(at..at + len)]
}

/// Splits a received stream into (publisher, seq) records, checking each
/// body against `body`.
fn parse(stream: &[u8], body: &[u8]) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < stream.len() {
        assert!(stream.len() - at >= 12, "a torn header at byte {at}");
        let word = |i: usize| u32::from_be_bytes(stream[at + i..at + i + 4].try_into().unwrap());
        let (p, seq, len) = (word(0), word(4), word(8) as usize);
        let from = (seq as usize * 7) % 1000;
        assert_eq!(len, 100 + (seq as usize * 13) % 300, "record {p}/{seq}");
        assert!(stream.len() - at - 12 >= len, "a torn body at byte {at}");
        assert!(
            stream[at + 12..at + 12 + len] == body[from..from + len],
            "record {p}/{seq}: body differs"
        );
        out.push((p, seq));
        at += 12 + len;
    }
    out
}

pub fn two_shards_many_connections_byte_exact(b: Option<Backend>) {
    let (shards, events) = start(b, 2);
    let n = 24;
    let mut conns = Vec::new();
    let mut readers = Vec::new();
    let mut data = Vec::new();
    for i in 0..n {
        let (a, peer) = tcp_pair();
        readers.push(read_all(peer));
        let conn = shards.attach(a).expect("attaching");
        conns.push(conn);
        data.push(Bytes::from(pattern(100 + i as u64, 40_000 + 997 * i)));
    }
    // Least-loaded placement: sequential attaches alternate.
    let per_shard: Vec<usize> = (0..2)
        .map(|s| conns.iter().filter(|c| c.shard() == s).count())
        .collect();
    assert_eq!(per_shard, vec![n / 2, n / 2]);
    assert_eq!(
        shards.stats().iter().map(|s| s.conns).sum::<usize>(),
        n,
        "{:?}",
        shards.stats()
    );
    // Interleave the connections: many small packets each, from two
    // threads (each owns half of the connections, so order per connection
    // is one thread's order).
    std::thread::scope(|s| {
        for half in 0..2 {
            let (shards, conns, data) = (&shards, &conns, &data);
            s.spawn(move || {
                let mine: Vec<usize> = (half..conns.len()).step_by(2).collect();
                let mut packets: Vec<Vec<Bytes>> =
                    mine.iter().map(|&i| pieces(&data[i], i as u64)).collect();
                loop {
                    let mut any = false;
                    for (k, &i) in mine.iter().enumerate() {
                        let take = packets[k].len().min(40);
                        if take == 0 {
                            continue;
                        }
                        any = true;
                        let packet: Packet = packets[k].drain(..take).collect();
                        shards.send(conns[i], packet).expect("queueing a send");
                    }
                    if !any {
                        break;
                    }
                }
            });
        }
    });
    let report = shards.shutdown(HANG);
    assert_eq!(report.unsent_bytes(), 0, "{report:?}");
    assert!(
        report.shards.iter().all(|s| s.error.is_none()),
        "{report:?}"
    );
    assert_eq!(failures(&drain_events(&events)), Vec::<String>::new());
    for (i, r) in readers.into_iter().enumerate() {
        let got = r.join().unwrap();
        assert_eq!(got.len(), data[i].len(), "connection {i}");
        assert!(got == data[i][..], "connection {i}: bytes differ");
    }
}

pub fn publish_from_several_threads_keeps_order(b: Option<Backend>) {
    let (shards, events) = start(b, 2);
    // Nobody is slow here, however loaded the machine: a long stall.
    let group = shards.group(GroupOptions::new(8 << 20, SlowPolicy::Disconnect).stall(HANG));
    let mut readers = Vec::new();
    let mut placed = Vec::new();
    for _ in 0..6 {
        let (a, peer) = tcp_pair();
        readers.push(read_all(peer));
        let conn = shards.attach(a).unwrap();
        placed.push(conn.shard());
        group.subscribe(conn).expect("subscribing");
    }
    assert_eq!(group.subscribers(), 6);
    let body = Bytes::from(pattern(7, 2000));
    let (publishers, per) = (3u32, 400u32);
    std::thread::scope(|s| {
        for p in 0..publishers {
            let (group, body) = (group.clone(), body.clone());
            s.spawn(move || {
                for seq in 0..per {
                    group
                        .publish_wait(record(&body, p, seq), HANG)
                        .expect("publishing");
                }
            });
        }
    });
    let report = shards.shutdown(HANG);
    assert_eq!(report.unsent_bytes(), 0, "{report:?}");
    assert_eq!(failures(&drain_events(&events)), Vec::<String>::new());
    let mut first_on_shard: Vec<Option<Vec<(u32, u32)>>> = vec![None, None];
    for (i, r) in readers.into_iter().enumerate() {
        let got = r.join().unwrap();
        let records = parse(&got, &body);
        assert_eq!(records.len(), (publishers * per) as usize, "subscriber {i}");
        // One queue per shard: its subscribers see one interleaving.
        match &first_on_shard[placed[i]] {
            Some(first) => assert!(first == &records, "subscriber {i}: another order"),
            None => first_on_shard[placed[i]] = Some(records.clone()),
        }
        for p in 0..publishers {
            let seqs: Vec<u32> = records.iter().filter(|r| r.0 == p).map(|r| r.1).collect();
            assert_eq!(
                seqs,
                (0..per).collect::<Vec<_>>(),
                "subscriber {i}, publisher {p}: out of order or missing"
            );
        }
    }
}

/// Four subscribers that read, one that never does; 1024 packets of 4 KiB
/// against a 64 KiB limit.
fn slow_subscriber(b: Option<Backend>, policy: SlowPolicy) {
    const PACKET: usize = 4096;
    const PACKETS: u32 = 1024;
    let (shards, events) = start(b, 2);
    let group = shards.group(GroupOptions::new(64 << 10, policy));
    let total = PACKET * PACKETS as usize;
    let mut good = Vec::new();
    let mut progress = Vec::new();
    for _ in 0..4 {
        let (a, peer) = tcp_pair();
        progress.push(Arc::new(AtomicUsize::new(0)));
        good.push(read_all_counting(
            peer,
            progress[progress.len() - 1].clone(),
        ));
        group.subscribe(shards.attach(a).unwrap()).unwrap();
    }
    // Waits until every reading subscriber has `bytes`.
    let caught_up = |bytes: usize| {
        let t0 = Instant::now();
        while progress.iter().any(|p| p.load(Ordering::SeqCst) < bytes) {
            assert!(
                t0.elapsed() < HANG,
                "reading subscribers stuck below {bytes} bytes: {progress:?}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    let (a, slow_peer) = small_pair();
    let slow = shards.attach(a).unwrap();
    group.subscribe(slow).unwrap();
    let payload = Bytes::from(pattern(9, PACKET - 8));
    for seq in 0..PACKETS {
        let mut h = Vec::with_capacity(8);
        h.extend_from_slice(&seq.to_be_bytes());
        h.extend_from_slice(&(PACKET as u32).to_be_bytes());
        // Paced by the readers, never by time: bursts of 8 packets (half
        // the limit), so only the one that never reads can exceed it.
        if seq % 8 == 0 {
            caught_up(seq as usize * PACKET);
        }
        group
            .publish([Bytes::from(h), payload.clone()])
            .expect("publishing");
    }
    caught_up(total);
    // The slow peer never reads: its queue cannot drain, so a short grace.
    let report = shards.shutdown(Duration::from_millis(100));
    let evs = drain_events(&events);
    assert_eq!(events.lost(), 0);
    for r in good {
        let got = r.join().unwrap();
        assert_eq!(got.len(), total);
        for (seq, rec) in got.chunks(PACKET).enumerate() {
            assert_eq!(&rec[..4], &(seq as u32).to_be_bytes(), "packet {seq}");
            assert!(rec[8..] == payload[..], "packet {seq}");
        }
    }
    // What the slow peer has in its socket, read after the fact.
    let received = read_all(slow_peer).join().unwrap();
    // Whole packets, intact, then at most the start of one more (the
    // socket was closed mid-write); the rest of it is unsent or dropped.
    let seqs: Vec<u32> = received
        .chunks(PACKET)
        .filter_map(|r| {
            assert!(r.len() < 8 || r[4..8] == (PACKET as u32).to_be_bytes());
            let body = &payload[..r.len().saturating_sub(8)];
            assert!(r.len() < 8 || r[8..] == body[..], "a packet's body differs");
            Some(u32::from_be_bytes(r.get(..4)?.try_into().unwrap()))
        })
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
    let others: Vec<String> = evs
        .iter()
        .filter_map(|e| match e {
            Event::Dropped { conn, .. } | Event::Disconnected { conn, .. } if *conn != slow => {
                Some(format!("{e:?}"))
            }
            Event::Failed { .. } | Event::ShardFailed { .. } => Some(format!("{e:?}")),
            _ => None,
        })
        .collect();
    assert_eq!(others, Vec::<String>::new(), "only the slow one is handled");
    let unsent: usize = report
        .shards
        .iter()
        .flat_map(|s| &s.unsent)
        .filter(|(c, _)| *c == slow)
        .flat_map(|(_, b)| b.iter().map(Bytes::len))
        .sum();
    match policy {
        SlowPolicy::Drop => {
            let (packets, dropped) = evs.iter().fold((0, 0), |(p, d), e| match e {
                Event::Dropped {
                    conn,
                    packets,
                    bytes,
                    group: g,
                } if *conn == slow && *g == group.id() => (p + packets, d + bytes),
                _ => (p, d),
            });
            assert!(packets > 0, "no Dropped event for {slow}: {evs:?}");
            assert_eq!(dropped, packets * PACKET as u64);
            // Every packet is accounted for: dropped, written, or unsent.
            assert_eq!(received.len() + unsent + dropped as usize, total);
        }
        SlowPolicy::Disconnect => {
            let dropped: Vec<u64> = evs
                .iter()
                .filter_map(|e| match e {
                    Event::Disconnected {
                        conn,
                        dropped_bytes,
                        group: g,
                    } if *conn == slow && *g == group.id() => Some(*dropped_bytes),
                    _ => None,
                })
                .collect();
            assert_eq!(dropped.len(), 1, "one Disconnected for {slow}: {evs:?}");
            assert!(dropped[0] >= PACKET as u64);
            // Disconnected mid-stream: what it got plus what was dropped is
            // a whole number of packets, and it was closed, so nothing is
            // left for shutdown to report.
            assert_eq!((received.len() + dropped[0] as usize) % PACKET, 0);
            assert!(received.len() + (dropped[0] as usize) < total);
            assert_eq!(unsent, 0);
            assert_eq!(seqs, (0..seqs.len() as u32).collect::<Vec<_>>());
        }
        other => panic!("no check written for {other:?}"),
    }
}

pub fn slow_subscriber_disconnected(b: Option<Backend>) {
    slow_subscriber(b, SlowPolicy::Disconnect);
}

pub fn slow_subscriber_skips_packets(b: Option<Backend>) {
    slow_subscriber(b, SlowPolicy::Drop);
}

pub fn shutdown_reports_queued_work(b: Option<Backend>) {
    let (shards, events) = start(b, 1);
    let (a, peer) = small_pair();
    let conn = shards.attach(a).unwrap();
    let data = Bytes::from(pattern(3, 4 << 20));
    for chunk in 0..64 {
        let at = chunk * (64 << 10);
        shards
            .send(conn, data.slice(at..at + (64 << 10)))
            .expect("queueing");
    }
    // A group whose handle outlives the shards.
    let (b2, peer2) = tcp_pair();
    let group = shards.group(GroupOptions::new(1 << 20, SlowPolicy::Drop));
    group.subscribe(shards.attach(b2).unwrap()).unwrap();
    let report = shards.shutdown(Duration::from_millis(200));
    assert!(report.shards[0].error.is_none(), "{report:?}");
    let unsent: Vec<&(ShardConn, Vec<Bytes>)> = report.shards[0].unsent.iter().collect();
    assert_eq!(unsent.len(), 1, "{report:?}");
    assert_eq!(unsent[0].0, conn);
    let unsent: Vec<u8> = unsent[0].1.iter().flat_map(|b| b.iter().copied()).collect();
    assert!(
        !unsent.is_empty(),
        "a peer that never reads left bytes queued"
    );
    let received = read_all(peer).join().unwrap();
    assert_eq!(received.len() + unsent.len(), data.len());
    assert!(
        received[..] == data[..received.len()],
        "written bytes differ"
    );
    assert!(unsent[..] == data[received.len()..], "unsent bytes differ");
    assert_eq!(report.unsent_bytes(), unsent.len() as u64);
    assert_eq!(failures(&drain_events(&events)), Vec::<String>::new());
    // Publishing after shutdown is a clear error, not a panic or a hang.
    let err = group
        .publish(Bytes::from_static(b"late"))
        .expect_err("the shards are gone");
    assert_eq!(err.kind, PublishErrorKind::ShutDown);
    // The shards' packet is the crate's: it comes back whole.
    let back: Packet = err.packet;
    assert_eq!(&back.pieces()[0][..], b"late");
    assert_eq!(read_all(peer2).join().unwrap(), Vec::<u8>::new());
}

/// A subscriber that never reads holds `publish_wait` back for one stall,
/// not one per packet: 2000 packets with a 50 ms stall finish well within
/// the hang bound (one stall per packet would need 100 s), and the stuck
/// subscriber ends up skipping packets.
pub fn publish_wait_stalls_once_per_stuck_subscriber(b: Option<Backend>) {
    let (shards, events) = start(b, 1);
    let group = shards
        .group(GroupOptions::new(64 << 10, SlowPolicy::Drop).stall(Duration::from_millis(50)));
    let (a, stuck_peer) = small_pair();
    let stuck = shards.attach(a).unwrap();
    group.subscribe(stuck).unwrap();
    let body = Bytes::from(vec![1u8; 4096]);
    let t0 = Instant::now();
    for _ in 0..2000 {
        group.publish_wait(body.clone(), HANG).expect("publishing");
        assert!(t0.elapsed() < HANG, "publish_wait stalled per packet");
    }
    let report = shards.shutdown(Duration::from_millis(100));
    let skipped: u64 = drain_events(&events)
        .iter()
        .map(|e| match e {
            Event::Dropped { conn, bytes, .. } if *conn == stuck => *bytes,
            _ => 0,
        })
        .sum();
    assert!(skipped > 0, "the stuck subscriber skipped nothing");
    let received = read_all(stuck_peer).join().unwrap().len() as u64;
    assert_eq!(received + skipped + report.unsent_bytes(), 2000 * 4096);
}

/// Waits until shard `i` is asleep (bounded).
fn asleep(shards: &Shards, i: usize) -> ringmover::shard::ShardStats {
    let t0 = Instant::now();
    loop {
        let st = shards.stats()[i];
        if st.sleeping {
            return st;
        }
        assert!(t0.elapsed() < HANG, "shard {i} never went to sleep: {st:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub fn sleeping_shard_is_woken_by_publish(b: Option<Backend>) {
    let (shards, _events) = start(b, 2);
    let group = shards.group(GroupOptions::new(1 << 20, SlowPolicy::Disconnect));
    let (a, mut peer) = tcp_pair();
    peer.set_read_timeout(Some(HANG)).unwrap();
    let conn = shards.attach_to(1, a).unwrap();
    assert_eq!(conn.shard(), 1);
    group.subscribe(conn).unwrap();
    for round in 0..3u8 {
        let before = asleep(&shards, 1);
        // From another thread, while the shard sleeps in the kernel.
        let g = group.clone();
        std::thread::spawn(move || g.publish(Bytes::from(vec![round; 1000])))
            .join()
            .unwrap()
            .expect("publishing");
        let mut got = vec![0u8; 1000];
        peer.read_exact(&mut got)
            .expect("the woken shard sent the packet (60 s bound)");
        assert_eq!(got, vec![round; 1000]);
        let after = shards.stats()[1];
        assert!(
            after.wakes > before.wakes,
            "the producer found the shard asleep and wrote its eventfd: {before:?} {after:?}"
        );
    }
    // Idle means asleep, not spinning: no rounds pass while nothing happens.
    let idle = asleep(&shards, 1);
    std::thread::sleep(Duration::from_millis(200));
    let later = shards.stats()[1];
    assert_eq!(later.rounds, idle.rounds, "an idle shard went round");
    // Shard 0 never had work: it slept once and stayed asleep.
    let zero = asleep(&shards, 0);
    assert_eq!(zero.wakes, 0);
    // Bad handles are errors, not panics.
    let (x, _y) = tcp_pair();
    assert!(shards.attach_to(7, x).is_err());
    assert!(group.subscribe(conn).is_err(), "subscribed twice");
    let detached = shards.detach(conn).expect("detaching");
    assert!(detached.unsent.is_empty());
    assert!(shards.detach(conn).is_err(), "detached twice");
    assert!(group.subscribe(conn).is_err(), "a detached connection");
    assert_eq!(group.subscribers(), 0);
    let report = shards.shutdown(HANG);
    assert_eq!(report.unsent_bytes(), 0);
}

/// The engine-level piece the shards rest on: `Mover::waker`.
pub fn mover_waker_ends_wait(b: Option<Backend>) {
    let mut m = super::send::mover(b);
    let waker = m.waker().expect("creating the waker");
    let mut done = Vec::new();
    // With a waker, an idle wait sleeps (until its timeout) instead of
    // returning at once.
    let t0 = Instant::now();
    m.wait(Some(Duration::from_millis(50)), &mut done).unwrap();
    assert!(
        t0.elapsed() >= Duration::from_millis(50),
        "{:?}",
        t0.elapsed()
    );
    // A wake before the wait is kept: the wait returns at once.
    waker.wake().unwrap();
    waker.wake().unwrap();
    let t0 = Instant::now();
    m.wait(Some(HANG), &mut done).unwrap();
    assert!(t0.elapsed() < HANG, "a pending wake was lost");
    // ...and consumed: several wakes count as one.
    let t0 = Instant::now();
    m.wait(Some(Duration::from_millis(20)), &mut done).unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(20));
    // A wake from another thread ends a wait without a timeout.
    let w = m.waker().unwrap();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        w.wake()
    });
    m.wait(None, &mut done).unwrap();
    t.join().unwrap().unwrap();
    assert!(done.is_empty());
    // Sends still complete normally with the waker watched.
    let (a, peer) = tcp_pair();
    let rx = read_all(peer);
    let conn = m.attach(a).unwrap();
    let data = Bytes::from(pattern(5, 300_000));
    m.send(conn, pieces(&data, 5)).unwrap();
    m.flush_and_wait(&mut done).unwrap();
    assert!(done.iter().all(|c| c.error.is_none()));
    // A zero timeout never sleeps, but still reaps what the kernel finished
    // (a shard whose queue never empties waits only like this).
    done.clear();
    m.send(conn, [data.clone()]).unwrap();
    m.flush().unwrap();
    let t0 = Instant::now();
    let mut written = 0;
    while written < data.len() {
        assert!(t0.elapsed() < HANG, "wait(0) never reaped: {written} bytes");
        m.wait(Some(Duration::ZERO), &mut done).unwrap();
        written += done.drain(..).map(|c| c.written).sum::<usize>();
    }
    drop(m.detach(conn).unwrap());
    let got = rx.join().unwrap();
    assert!(got[..data.len()] == data[..] && got[data.len()..] == data[..]);
}

/// `bench fanout --threads 2` runs both strategies end to end, the sink
/// checking every byte arrived (so it never rots); Linux only, like
/// `ringmover bench`.
#[test]
#[cfg(target_os = "linux")]
fn bench_fanout_on_two_threads() {
    let out = super::util::run(super::util::ringmover().args([
        "bench",
        "fanout",
        "--warmup",
        "0.1",
        "--seconds",
        "0.1",
        "--conns",
        "10",
        "--payload",
        "64K",
        "--threads",
        "2",
        "--json",
    ]));
    let rows = crate::util::json_rows(&out);
    let strategies: Vec<&str> = rows
        .iter()
        .map(|r| r["strategy"].as_str().unwrap())
        .collect();
    assert_eq!(strategies, ["shared", "copy"]);
    for r in &rows {
        assert_eq!(r["type"], "bench-fanout", "{r}");
        assert_eq!(r["threads"], 2, "{r}");
        assert!(r["bytes"].as_u64().unwrap() > 0, "{r}");
    }
}

for_each_backend!(
    two_shards_many_connections_byte_exact,
    publish_from_several_threads_keeps_order,
    slow_subscriber_disconnected,
    slow_subscriber_skips_packets,
    shutdown_reports_queued_work,
    sleeping_shard_is_woken_by_publish,
    mover_waker_ends_wait,
    publish_wait_stalls_once_per_stuck_subscriber,
);
