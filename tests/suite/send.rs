//! The batched-send engine's behaviour, one suite run on every backend
//! (`uring`, `epoll`, `poll`; off Linux `poll`) and on `auto`, which the
//! seccomp test below re-runs in a child whose policy denies io_uring.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use bytes::Bytes;
use ringmover::{Backend, BackendChoice, Completion, Mover, MoverBuilder, SendErrorKind};

#[cfg(target_os = "linux")]
mod enter_faults;

/// A connected loopback TCP pair: (our sending end, the peer's reading end).
pub fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (b, _) = l.accept().unwrap();
    (a, b)
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Cuts `data` into pieces of varied sizes, some empty, as `Bytes` slices
/// of one allocation (no copies).
pub fn pieces(data: &Bytes, seed: u64) -> Vec<Bytes> {
    let sizes = pattern(seed, data.len() + 1);
    let mut out = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < data.len() {
        let n = (usize::from(sizes[i]) % 97).min(data.len() - at);
        out.push(data.slice(at..at + n));
        at += n;
        i += 1;
    }
    out
}

fn set_sndbuf(s: &impl AsFd, bytes: i32) {
    nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::SndBuf, &(bytes as usize)).unwrap();
}

/// Reads `s` to EOF in `chunk`-byte reads, so the sender sees its socket
/// buffer fill and drain many times.
pub fn slow_reader(mut s: TcpStream, chunk: usize) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let mut buf = vec![0u8; chunk];
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                return v;
            }
            v.extend_from_slice(&buf[..n]);
        }
    })
}

fn reader(mut s: TcpStream) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        s.read_to_end(&mut v).unwrap();
        v
    })
}

/// A builder for the backend a suite instance runs on; `None` is `Auto`.
pub fn builder(backend: Option<Backend>) -> MoverBuilder {
    Mover::builder().backend(backend.map_or(BackendChoice::Auto, BackendChoice::Force))
}

/// Which backend a suite instance runs on; `None` is `Auto`.
pub fn mover(backend: Option<Backend>) -> Mover {
    built(backend, builder(backend))
}

/// `mover`, copying no piece: every queued piece is its own iovec.
pub fn mover_uncopied(backend: Option<Backend>) -> Mover {
    built(backend, builder(backend).copy_threshold(0))
}

fn built(backend: Option<Backend>, builder: MoverBuilder) -> Mover {
    let m = builder.build().expect("building the mover");
    if let Some(b) = backend {
        assert_eq!(m.backend(), b);
    } else if let Ok(expected) = std::env::var("RINGMOVER_EXPECT_BACKEND") {
        assert_eq!(m.backend().name(), expected, "{}", m.selection().reason);
    }
    m
}

/// Runs `f` on a thread of its own (a `Mover` is built and used there;
/// a fault filter dies with it) and fails, naming `what`, if it has not
/// finished within `bound`: a hang becomes a failure, not a stuck suite.
pub fn on_own_thread<T: Send + 'static>(
    what: &str,
    bound: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let out = f();
        let _ = tx.send(());
        out
    });
    match rx.recv_timeout(bound) {
        Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match h.join() {
            Ok(out) => out,
            Err(panic) => std::panic::resume_unwind(panic),
        },
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: still running after {bound:?} (hung or spinning)")
        }
    }
}

/// `n` connected loopback TCP pairs: (our ends, the peers' ends).
pub fn tcp_pairs(n: usize) -> (Vec<TcpStream>, Vec<TcpStream>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    (0..n)
        .map(|_| {
            let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            (a, l.accept().unwrap().0)
        })
        .unzip()
}

/// Checks every completion's `queued` against the bytes queued so far on
/// its connection, in order, and returns what each connection wrote.
fn check_queued(
    done: &[Completion],
    queued_total: impl Fn(ringmover::Conn) -> usize,
) -> std::collections::HashMap<ringmover::Conn, usize> {
    let mut written = std::collections::HashMap::new();
    for c in done.iter().filter(|c| c.error.is_none()) {
        let w = written.entry(c.conn).or_insert(0);
        *w += c.written;
        assert_eq!(
            c.queued,
            queued_total(c.conn) - *w,
            "Completion::queued is what was queued less what was written"
        );
    }
    written
}

fn errors(done: &[Completion]) -> Vec<String> {
    done.iter()
        .filter_map(|c| {
            c.error
                .as_ref()
                .map(|e| format!("{:?}: {}", c.conn, e.error))
        })
        .collect()
}

/// Asserts no completion in `done` carries an error (naming those that do).
pub fn no_errors(done: &[Completion]) {
    assert_eq!(errors(done), Vec::<String>::new());
}

pub fn more_than_iov_max_pieces_arrive_byte_exact(b: Option<Backend>) {
    let mut m = mover_uncopied(b);
    let (a, peer) = tcp_pair();
    let rx = reader(peer);
    let conn = m.attach(a).unwrap();
    let data = Bytes::from(pattern(1, 400_000));
    let bufs = pieces(&data, 2);
    assert!(bufs.len() > 3 * 1024, "{}", bufs.len());
    assert!(bufs.iter().any(Bytes::is_empty));
    m.send(conn, bufs).unwrap();
    let mut done = Vec::new();
    m.flush_and_wait(&mut done).unwrap();
    assert_eq!(errors(&done), Vec::<String>::new());
    assert!(done.last().unwrap().is_drained());
    assert_eq!(done.iter().map(|c| c.written).sum::<usize>(), data.len());
    assert!(
        done.len() > 1,
        "more than IOV_MAX pieces take several writes"
    );
    check_queued(&done, |_| data.len());
    drop(m.detach(conn).unwrap());
    assert!(rx.join().unwrap() == data[..]);
}

pub fn partial_writes_resume_at_the_exact_byte(b: Option<Backend>) {
    // Pieces as queued (glued ones are tested below): every send waits
    // for the flush, so each completion's `queued` is the total less what
    // was written.
    let mut m = mover_uncopied(b);
    let (a, peer) = tcp_pair();
    set_sndbuf(&a, 4096);
    // A slow reader keeps the tiny send buffer full: many short writes.
    let rx = slow_reader(peer, 1500);
    let conn = m.attach(a).unwrap();
    let data = Bytes::from(pattern(3, 3 << 20));
    for (i, chunk) in data.chunks(100_000).enumerate() {
        let chunk = data.slice_ref(chunk);
        m.send(conn, pieces(&chunk, i as u64)).unwrap();
    }
    let mut done = Vec::new();
    m.flush_and_wait(&mut done).unwrap();
    assert_eq!(errors(&done), Vec::<String>::new());
    check_queued(&done, |_| data.len());
    if m.backend() != Backend::Uring {
        // The 4 KiB buffer takes part of each write: writes were short and
        // resumed. (io_uring's MSG_WAITALL finishes stream writes in the
        // kernel; its short writes are tested on a pipe, below.)
        assert!(m.stats().short_writes > 0, "{:?}", m.stats());
    }
    drop(m.detach(conn).unwrap());
    assert!(rx.join().unwrap() == data[..]);
}

/// Small pieces are glued as they are queued: a connection whose 64 KiB
/// glued buffer fills with nothing in flight starts writing it inside
/// `send` (as a `BufWriter` does when full), less than that waits for the
/// flush; short writes resume inside glued buffers at the exact byte, and
/// the counts add up.
pub fn glued_small_pieces_arrive_byte_exact(b: Option<Backend>) {
    let mut m = mover(b);
    let (a, peer) = tcp_pair();
    set_sndbuf(&a, 4096);
    peer.set_nonblocking(true).unwrap();
    let conn = m.attach(a).unwrap();
    let data = Bytes::from(pattern(9, 3 << 20));
    // Under one glued buffer: nothing moves before the flush.
    let first = data.slice(..1000);
    m.send(conn, pieces(&first, 1)).unwrap();
    assert_eq!(m.stats().writes, 0, "{:?}", m.stats());
    std::thread::sleep(Duration::from_millis(20));
    let mut probe = [0u8; 1];
    let early = (&peer).read(&mut probe);
    assert!(
        matches!(&early, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "bytes arrived before any flush: {early:?}"
    );
    peer.set_nonblocking(false).unwrap();
    let rx = slow_reader(peer, 1500);
    for (i, chunk) in data[1000..].chunks(100_000).enumerate() {
        let chunk = data.slice_ref(chunk);
        m.send(conn, pieces(&chunk, i as u64)).unwrap();
    }
    assert!(
        m.stats().writes >= 1,
        "a full glued buffer waited: {:?}",
        m.stats()
    );
    let mut done = Vec::new();
    m.flush_and_wait(&mut done).unwrap();
    assert_eq!(errors(&done), Vec::<String>::new());
    assert_eq!(done.iter().map(|c| c.written).sum::<usize>(), data.len());
    // Each completion's `queued` is what was queued by then less what was
    // written: never more than the total less the running sum.
    let mut written = 0;
    for c in &done {
        written += c.written;
        assert!(c.queued <= data.len() - written, "{c:?}");
    }
    assert!(done.last().unwrap().is_drained());
    drop(m.detach(conn).unwrap());
    assert!(rx.join().unwrap() == data[..]);
}

/// A queue of glued pieces at its high watermark starts writing inside
/// `send` (the producer pauses there anyway), so the kernel copies it while
/// in cache; below it, nothing moves before the flush.
pub fn a_glued_queue_at_its_high_watermark_starts_writing(b: Option<Backend>) {
    let mut m = built(b, builder(b).max_queued_bytes(16 << 10));
    let (a, peer) = tcp_pair();
    let rx = reader(peer);
    let conn = m.attach(a).unwrap();
    let piece = Bytes::from(pattern(4, 100));
    let mut sent = 0;
    while m.stats().writes == 0 && sent < 1 << 20 {
        m.send(conn, [piece.clone()]).unwrap();
        sent += piece.len();
    }
    // Started by the send that reached the mark, not before, not after.
    assert_eq!(m.stats().writes, 1, "{:?}", m.stats());
    assert!((16 << 10..(16 << 10) + 100).contains(&sent), "{sent}");
    let mut done = Vec::new();
    m.flush_and_wait(&mut done).unwrap();
    assert_eq!(errors(&done), Vec::<String>::new());
    assert_eq!(done.iter().map(|c| c.written).sum::<usize>(), sent);
    drop(m.detach(conn).unwrap());
    let got = rx.join().unwrap();
    assert_eq!(got.len(), sent);
    assert!(got.chunks(100).all(|c| c == &piece[..]));
}

/// A pipe with a slow reader takes part of each write on every backend
/// (io_uring too: WRITEV to a pipe completes short): each resumes at the
/// exact byte, and the counts add up.
pub fn partial_writes_to_a_pipe_resume_at_the_exact_byte(b: Option<Backend>) {
    let mut m = mover(b);
    let (rd, wr) = nix::unistd::pipe().unwrap();
    let mut rd = std::fs::File::from(rd);
    let rx = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 5000];
        loop {
            let n = rd.read(&mut buf).unwrap();
            if n == 0 {
                return got;
            }
            got.extend_from_slice(&buf[..n]);
            std::thread::sleep(Duration::from_micros(200));
        }
    });
    let conn = m.attach(wr).unwrap();
    let data = Bytes::from(pattern(21, 1 << 20));
    m.send(conn, pieces(&data, 22)).unwrap();
    let mut done = Vec::new();
    m.flush_and_wait(&mut done).unwrap();
    assert_eq!(errors(&done), Vec::<String>::new());
    check_queued(&done, |_| data.len());
    assert!(m.stats().short_writes > 0, "{:?}", m.stats());
    drop(m.detach(conn).unwrap());
    assert!(rx.join().unwrap() == data[..]);
}

pub fn thousand_connections_each_get_their_own_stream(b: Option<Backend>) {
    let mut m = mover(b);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut peers = Vec::new();
    let mut conns = Vec::new();
    for _ in 0..1000 {
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        peers.push(l.accept().unwrap().0);
        conns.push(m.attach(a).unwrap());
    }
    // Three rounds: each queues one packet (header + payload slices) per
    // connection, then one flush for all (under 1 MiB: see the next test).
    let payloads: Vec<Bytes> = (0..1000)
        .map(|i| Bytes::from(pattern(i + 10, 900)))
        .collect();
    let mut done = Vec::new();
    let before = m.stats();
    for round in 0..3 {
        for (i, &c) in conns.iter().enumerate() {
            let header = Bytes::from(format!("<{i}:{round}>"));
            let p = &payloads[i];
            m.send(c, [header, p.slice(..300), Bytes::new(), p.slice(300..)])
                .unwrap();
        }
        let enters = m.stats().enters;
        let started = m.flush().unwrap();
        assert_eq!(started, 1000);
        if m.backend() == Backend::Uring {
            // The whole flush of 1000 connections is one io_uring_enter.
            assert_eq!(m.stats().enters - enters, 1);
        }
        m.flush_and_wait(&mut done).unwrap();
    }
    let after = m.stats();
    if m.backend() == Backend::Uring {
        // One io_uring_enter per flush of 1000 connections (SQ holds 1024),
        // plus the waits.
        assert!(
            after.enters - before.enters <= 3 + 3,
            "{before:?} {after:?}"
        );
        assert_eq!(after.sqes - before.sqes, 3000);
    }
    assert_eq!(errors(&done), Vec::<String>::new());
    for (i, c) in conns.into_iter().enumerate() {
        drop(m.detach(c).unwrap());
        let mut got = Vec::new();
        peers[i].read_to_end(&mut got).unwrap();
        let mut want = Vec::new();
        for round in 0..3 {
            want.extend_from_slice(format!("<{i}:{round}>").as_bytes());
            want.extend_from_slice(&payloads[i]);
        }
        assert!(got == want, "connection {i} got {} bytes", got.len());
    }
}

/// More connections than the SQ ring holds: a flush enters the kernel
/// once per full queue, ⌈connections / depth⌉ times, as documented.
pub fn a_flush_beyond_the_queue_depth_enters_once_per_full_queue(b: Option<Backend>) {
    const DEPTH: usize = 64;
    const CONNS: usize = 200;
    let mut m = builder(b).queue_depth(DEPTH as u32).build().unwrap();
    let (ours, peers) = tcp_pairs(CONNS);
    let conns: Vec<_> = ours.into_iter().map(|a| m.attach(a).unwrap()).collect();
    for (i, &c) in conns.iter().enumerate() {
        m.send(c, [Bytes::from(format!("<{i}>"))]).unwrap();
    }
    let before = m.stats();
    assert_eq!(m.flush().unwrap(), CONNS);
    if m.backend() == Backend::Uring {
        assert_eq!(
            m.stats().enters - before.enters,
            CONNS.div_ceil(DEPTH) as u64,
            "one io_uring_enter per full queue"
        );
    }
    let mut done = Vec::new();
    m.flush_and_wait(&mut done).unwrap();
    assert_eq!(errors(&done), Vec::<String>::new());
    for (i, (c, mut peer)) in conns.into_iter().zip(peers).enumerate() {
        drop(m.detach(c).unwrap());
        let mut got = String::new();
        peer.read_to_string(&mut got).unwrap();
        assert_eq!(got, format!("<{i}>"));
    }
}

/// A flush of large writes enters the kernel once the writes started
/// since the last enter carry 1 MiB, so one enter never copies a whole
/// flush of them (as `Mover::flush` documents): 8 writes of 512 KiB are 4
/// enters on io_uring, not 1.
pub fn a_flush_of_large_writes_enters_once_per_mebibyte(b: Option<Backend>) {
    const CONNS: usize = 8;
    const EACH: usize = 512 << 10;
    let mut m = mover(b);
    let (ours, peers) = tcp_pairs(CONNS);
    let readers: Vec<_> = peers.into_iter().map(reader).collect();
    let conns: Vec<_> = ours.into_iter().map(|a| m.attach(a).unwrap()).collect();
    let data: Vec<Vec<u8>> = (0..CONNS).map(|i| pattern(i as u64 + 3, EACH)).collect();
    for (c, d) in conns.iter().zip(&data) {
        m.send(*c, [Bytes::from(d.clone())]).unwrap();
    }
    let before = m.stats();
    assert_eq!(m.flush().unwrap(), CONNS);
    if m.backend() == Backend::Uring {
        assert_eq!(
            m.stats().enters - before.enters,
            (CONNS * EACH / (1 << 20)) as u64,
            "one io_uring_enter per MiB started"
        );
    }
    let mut done = Vec::new();
    m.flush_and_wait(&mut done).unwrap();
    assert_eq!(errors(&done), Vec::<String>::new());
    for ((c, r), d) in conns.into_iter().zip(readers).zip(&data) {
        drop(m.detach(c).unwrap());
        assert!(r.join().unwrap() == *d, "a connection's bytes differ");
    }
}

pub fn a_dead_peer_fails_only_its_own_connection(b: Option<Backend>) {
    let mut m = mover(b);
    let (a1, peer1) = tcp_pair();
    let (a2, peer2) = tcp_pair();
    // Reset: later sends get ECONNRESET/EPIPE.
    crate::util::reset(peer1);
    let rx2 = reader(peer2);
    let dead = m.attach(a1).unwrap();
    let live = m.attach(a2).unwrap();
    let data = Bytes::from(pattern(5, 2 << 20));
    let mut done = Vec::new();
    for chunk in data.chunks(64 << 10) {
        let chunk = data.slice_ref(chunk);
        // The dead one refuses sends once its failure is known.
        if let Err(e) = m.send(dead, [chunk.clone()]) {
            assert_eq!(e.kind, SendErrorKind::Failed, "{e}");
        }
        m.send(live, [chunk]).unwrap();
        m.flush().unwrap();
        m.wait(Some(std::time::Duration::from_millis(1)), &mut done)
            .unwrap();
    }
    m.flush_and_wait(&mut done).unwrap();
    let dead_err: Vec<&Completion> = done
        .iter()
        .filter(|c| c.conn == dead && c.error.is_some())
        .collect();
    assert_eq!(dead_err.len(), 1, "{done:?}");
    let e = dead_err[0].error.as_ref().unwrap();
    assert!(
        matches!(e.error.raw_os_error(), Some(libc::ECONNRESET | libc::EPIPE)),
        "{}",
        e.error
    );
    let written: usize = done
        .iter()
        .filter(|c| c.conn == dead)
        .map(|c| c.written)
        .sum();
    assert!(written < data.len());
    assert!(done.iter().all(|c| c.conn != live || c.error.is_none()));
    let err = m.send(dead, [Bytes::from_static(b"x")]).unwrap_err();
    assert_eq!(err.kind, SendErrorKind::Failed);
    drop(m.detach(live).unwrap());
    assert!(rx2.join().unwrap() == data[..]);
}

pub fn back_pressure_returns_the_buffers(b: Option<Backend>) {
    let mut m = Mover::builder()
        .backend(b.map_or(BackendChoice::Auto, BackendChoice::Force))
        .max_queued_bytes(10_000)
        .build()
        .unwrap();
    let (a, _peer) = tcp_pair();
    let conn = m.attach(a).unwrap();
    m.send(conn, vec![Bytes::from(vec![1u8; 10_000])]).unwrap();
    let refused = m.send(conn, vec![Bytes::from_static(b"more")]).unwrap_err();
    assert_eq!(
        refused.kind,
        SendErrorKind::BackPressure {
            queued: 10_000,
            limit: 10_000
        }
    );
    assert_eq!(refused.bufs, vec![Bytes::from_static(b"more")]);
    let mut done = Vec::new();
    m.flush_and_wait(&mut done).unwrap();
    m.send(conn, vec![Bytes::from_static(b"more")]).unwrap();
}

pub fn udp_datagrams_keep_their_boundaries(b: Option<Backend>) {
    let mut m = mover(b);
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let dest = rx.local_addr().unwrap();
    let conn = m.attach(tx).unwrap();
    for i in 0..20u8 {
        let body = Bytes::from(vec![i; 1000 + usize::from(i)]);
        m.send_to(
            conn,
            [
                Bytes::from(vec![b'H', i]),
                body.slice(..500),
                Bytes::new(),
                body.slice(500..),
            ],
            dest,
        )
        .unwrap();
    }
    m.send_to(conn, Vec::<Bytes>::new(), dest).unwrap();
    let mut done = Vec::new();
    m.flush_and_wait(&mut done).unwrap();
    assert_eq!(errors(&done), Vec::<String>::new());
    let mut buf = [0u8; 4096];
    rx.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for i in 0..20u8 {
        let (n, _) = rx
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("waiting for datagram {i}: {e}"));
        assert_eq!(n, 2 + 1000 + usize::from(i));
        assert_eq!(&buf[..2], &[b'H', i]);
        assert!(buf[2..n].iter().all(|&x| x == i));
    }
    let (n, _) = rx
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("waiting for the empty datagram: {e}"));
    assert_eq!(n, 0, "the empty datagram arrives empty");
    // A stream refuses destination addresses.
    let (a, _peer) = tcp_pair();
    let s = m.attach(a).unwrap();
    let e = m.send_to(s, [Bytes::from_static(b"x")], dest).unwrap_err();
    assert_eq!(e.kind, SendErrorKind::NotDatagram);
}

/// A loopback UDP socket connected to `rx`, attached to `m`.
fn connected_udp(m: &mut Mover) -> (ringmover::Conn, UdpSocket) {
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
    tx.connect(rx.local_addr().unwrap()).unwrap();
    (m.attach(tx).unwrap(), rx)
}

/// Every datagram waiting on `rx`, each of `size` bytes, concatenated in
/// arrival order.
pub fn drain_datagrams(rx: &std::os::unix::net::UnixDatagram, size: usize) -> Vec<u8> {
    rx.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; size + 1];
    while let Ok(n) = rx.recv(&mut buf) {
        assert_eq!(n, size);
        got.extend_from_slice(&buf[..n]);
    }
    got
}

/// A burst of datagrams on one socket leaves in one flush, in order, each
/// whole; on io_uring as linked chains, a handful of enters for them all.
pub fn udp_bursts_leave_in_order_in_few_enters(b: Option<Backend>) {
    let mut m = mover(b);
    let (conn, rx) = connected_udp(&mut m);
    let n = 100usize;
    for i in 0..n {
        let body = Bytes::from(pattern(i as u64, 64 + i));
        m.send(conn, [Bytes::from((i as u32).to_be_bytes().to_vec()), body])
            .unwrap();
    }
    let before = m.stats();
    let mut done = Vec::new();
    m.flush_and_wait(&mut done).unwrap();
    assert_eq!(errors(&done), Vec::<String>::new());
    let after = m.stats();
    assert_eq!(after.writes - before.writes, n as u64);
    if m.backend() == Backend::Uring {
        // One datagram per enter would be 100 or more.
        assert!(
            after.enters - before.enters <= 10,
            "{} enters for {n} datagrams",
            after.enters - before.enters
        );
    }
    let mut buf = [0u8; 2048];
    rx.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for i in 0..n {
        let got = rx
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("waiting for datagram {i}: {e}"));
        assert_eq!(got, 4 + 64 + i, "datagram {i}");
        assert_eq!(
            &buf[..4],
            &(i as u32).to_be_bytes(),
            "datagram {i} out of order"
        );
        assert!(buf[4..got] == pattern(i as u64, 64 + i)[..]);
    }
}

/// A datagram the kernel refuses (too big) fails its connection; those
/// before it arrive, it and those after come back unsent, none reordered.
pub fn a_refused_datagram_returns_it_and_the_rest(b: Option<Backend>) {
    let mut m = mover(b);
    let (conn, rx) = connected_udp(&mut m);
    for i in 0..5u8 {
        m.send(conn, [Bytes::from(vec![i; 100])]).unwrap();
    }
    let big = Bytes::from(vec![9u8; 70_000]);
    m.send(conn, [big.slice(..35_000), big.slice(35_000..)])
        .unwrap();
    for i in 5..10u8 {
        m.send(conn, [Bytes::from(vec![i; 100])]).unwrap();
    }
    let mut done = Vec::new();
    m.flush_and_wait(&mut done).unwrap();
    let failed: Vec<_> = done.iter().filter_map(|c| c.error.as_ref()).collect();
    assert_eq!(failed.len(), 1, "one failure, reported once");
    let e = failed[0];
    assert_eq!(e.error.raw_os_error(), Some(libc::EMSGSIZE), "{}", e.error);
    assert_eq!(e.unsent_bytes(), 70_000 + 5 * 100);
    let unsent: Vec<u8> = e.unsent.iter().flat_map(|b| b.to_vec()).collect();
    let mut want = vec![9u8; 70_000];
    for i in 5..10u8 {
        want.extend(vec![i; 100]);
    }
    assert!(unsent == want, "unsent bytes in order");
    let written: usize = done.iter().map(|c| c.written).sum();
    assert_eq!(written, 5 * 100);
    rx.set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 2048];
    for i in 0..5u8 {
        let n = rx
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("waiting for datagram {i}: {e}"));
        assert!(n == 100 && buf[..n].iter().all(|&x| x == i), "datagram {i}");
    }
    assert!(rx.recv(&mut buf).is_err(), "nothing after the refused one");
    let e = m.send(conn, [Bytes::from_static(b"x")]).unwrap_err();
    assert_eq!(e.kind, SendErrorKind::Failed);
}

/// A Unix datagram socket blocks once its unread datagrams fill the send
/// buffer, so a burst stalls mid-chain (EAGAIN, wait, resume) while a slow
/// reader drains: every datagram still arrives once, whole, in order.
pub fn stalled_datagram_bursts_resume_in_order(b: Option<Backend>) {
    use std::os::unix::net::UnixDatagram;
    let mut m = mover(b);
    let (tx, rx) = UnixDatagram::pair().unwrap();
    let conn = m.attach(tx).unwrap();
    let n = 300usize;
    for i in 0..n {
        m.send(
            conn,
            [
                Bytes::from((i as u32).to_be_bytes().to_vec()),
                Bytes::from(vec![i as u8; 2000]),
            ],
        )
        .unwrap();
    }
    rx.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        for i in 0..n {
            if i % 25 == 0 {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            let got = rx
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("waiting for datagram {i}: {e}"));
            assert_eq!(got, 2004, "datagram {i}");
            assert_eq!(
                &buf[..4],
                &(i as u32).to_be_bytes(),
                "datagram {i} out of order"
            );
            assert!(buf[4..got].iter().all(|&x| x == i as u8));
        }
    });
    let mut done = Vec::new();
    m.flush_and_wait(&mut done).unwrap();
    assert_eq!(errors(&done), Vec::<String>::new());
    reader.join().unwrap();
}

/// Detaching while a datagram burst is stalled: what arrived plus what
/// comes back is exactly the burst, in order, nothing twice.
pub fn detach_mid_burst_returns_exactly_the_rest(b: Option<Backend>) {
    use std::os::unix::net::UnixDatagram;
    let mut m = mover(b);
    let (tx, rx) = UnixDatagram::pair().unwrap();
    let conn = m.attach(tx).unwrap();
    let n = 100u8;
    for i in 0..n {
        m.send(conn, [Bytes::from(vec![i; 4000])]).unwrap();
    }
    m.flush().unwrap();
    // Let the sends run until the peer's queue is full, then give up.
    let mut done = Vec::new();
    let until = std::time::Instant::now() + std::time::Duration::from_millis(300);
    while let Some(left) = until.checked_duration_since(std::time::Instant::now()) {
        m.wait(Some(left), &mut done).unwrap();
    }
    assert_eq!(errors(&done), Vec::<String>::new());
    let written: usize = done.iter().map(|c| c.written).sum();
    assert!(
        written < usize::from(n) * 4000,
        "the peer never read, yet all was sent"
    );
    let d = m.detach(conn).unwrap();
    let unsent: Vec<u8> = d.unsent.iter().flat_map(|b| b.to_vec()).collect();
    let mut arrived = drain_datagrams(&rx, 4000);
    assert_eq!(arrived.len(), written, "completions report what arrived");
    let want: Vec<u8> = (0..n).flat_map(|i| vec![i; 4000]).collect();
    arrived.extend(unsent);
    assert!(
        arrived == want,
        "arrived + unsent is the burst, in order, once"
    );
}

pub fn files_are_written_at_their_position(b: Option<Backend>) {
    let mut m = mover(b);
    let mut f = tempfile();
    f.write_all(b"prefix:").unwrap();
    let conn = m.attach(f.try_clone().unwrap()).unwrap();
    let data = Bytes::from(pattern(7, 300_000));
    m.send(conn, pieces(&data, 8)).unwrap();
    let mut done = Vec::new();
    m.flush_and_wait(&mut done).unwrap();
    assert_eq!(errors(&done), Vec::<String>::new());
    let mut d = m.detach(conn).unwrap();
    // The fd's position is after the last byte written: the caller (or a
    // dup of the fd) carries on where the engine stopped.
    let mut back = std::fs::File::from(d.fd);
    back.write_all(b":suffix").unwrap();
    assert_eq!(d.written + d.unsent.len(), 0, "nothing left over");
    d.unsent.clear();
    let mut got = Vec::new();
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(0)).unwrap();
    f.read_to_end(&mut got).unwrap();
    assert_eq!(&got[..7], b"prefix:");
    assert!(got[7..7 + data.len()] == data[..]);
    assert_eq!(&got[7 + data.len()..], b":suffix");
}

pub fn detach_returns_fd_and_unsent_bytes(b: Option<Backend>) {
    let mut m = mover(b);
    let (a, peer) = tcp_pair();
    set_sndbuf(&a, 4096);
    let raw = a.as_raw_fd();
    let conn = m.attach(a).unwrap();
    // A reader held back until after the detach: the one big write is in
    // flight, part-way (what the socket buffers took), at detach, however
    // loaded the machine.
    let (go, gate) = std::sync::mpsc::channel::<()>();
    let rx = std::thread::spawn(move || {
        let _ = gate.recv();
        slow_reader(peer, 1500).join().unwrap()
    });
    let data = Bytes::from(pattern(9, 8 << 20));
    m.send(conn, [data.clone()]).unwrap();
    m.flush().unwrap();
    let mut done = Vec::new();
    m.wait(Some(std::time::Duration::from_millis(20)), &mut done)
        .unwrap();
    let before = m.stats();
    let detached = m.detach(conn).unwrap();
    go.send(()).unwrap();
    assert_eq!(detached.fd.as_raw_fd(), raw);
    let unsent: Vec<u8> = detached.unsent.iter().flat_map(|b| b.to_vec()).collect();
    let written = done.iter().map(|c| c.written).sum::<usize>() + detached.written;
    assert!(
        !unsent.is_empty(),
        "8 MiB cannot pass a reader that has not read"
    );
    // Exactly: every byte is reported written or handed back, once.
    assert_eq!(written + unsent.len(), data.len());
    assert!(unsent == data[written..], "unsent starts at the exact byte");
    if m.backend() == Backend::Uring {
        // The cancelled send completed short (its partial count), which is
        // what `detached.written` reports.
        assert!(detached.written > 0, "the cancelled write moved bytes");
        assert!(m.stats().short_writes > before.short_writes);
    }
    drop(detached);
    let got = rx.join().unwrap();
    assert_eq!(got.len(), written, "the peer got exactly what was reported");
    assert!(got == data[..written]);
    let stale = m.send(conn, [Bytes::from_static(b"x")]).unwrap_err();
    assert_eq!(stale.kind, SendErrorKind::UnknownConn);
    assert!(m.detach(conn).is_err());
}

pub fn blocking_write_to_finishes_partial_writes(_b: Option<Backend>) {
    use ringmover::outbox::{Framing, Outbox};
    let (a, peer) = tcp_pair();
    set_sndbuf(&a, 4096);
    a.set_nonblocking(true).unwrap();
    let rx = reader(peer);
    let data = Bytes::from(pattern(11, 2 << 20));
    let mut bufs = Outbox::new(Framing::Stream);
    bufs.push(pieces(&data, 12), None);
    assert_eq!(
        ringmover::write_to(&a, &mut bufs).unwrap(),
        data.len() as u64
    );
    drop(a);
    assert!(rx.join().unwrap() == data[..]);
}

/// Not only sockets: a file and a pipe get the same bytes, in order.
pub fn blocking_write_to_writes_files_and_pipes(_b: Option<Backend>) {
    use ringmover::outbox::{Framing, Outbox};
    use std::io::{Read, Seek};
    let data = Bytes::from(pattern(17, 300_000));
    let mut file = tempfile();
    let mut bufs = Outbox::new(Framing::Stream);
    bufs.push(pieces(&data, 7), None);
    assert_eq!(
        ringmover::write_to(&file, &mut bufs).unwrap(),
        data.len() as u64
    );
    assert!(bufs.is_empty());
    let mut got = Vec::new();
    file.rewind().unwrap();
    file.read_to_end(&mut got).unwrap();
    assert!(got == data[..]);

    let (rd, wr) = nix::unistd::pipe().unwrap();
    let (mut rd, wr) = (std::fs::File::from(rd), std::fs::File::from(wr));
    let rx = std::thread::spawn(move || {
        let mut got = Vec::new();
        rd.read_to_end(&mut got).unwrap();
        got
    });
    bufs.push(pieces(&data, 5), None);
    assert_eq!(
        ringmover::write_to(&wr, &mut bufs).unwrap(),
        data.len() as u64
    );
    drop(wr);
    assert!(rx.join().unwrap() == data[..]);
}

/// One ring per thread: the builder goes to each thread, which builds its
/// own `Mover` (the `Mover` itself cannot move: see its compile_fail doc).
pub fn each_thread_builds_its_own_mover(b: Option<Backend>) {
    fn is_send<T: Send>(t: T) -> T {
        t
    }
    let data = Bytes::from(pattern(13, 100_000));
    let shards: Vec<_> = (0..2)
        .map(|_| {
            let (a, peer) = tcp_pair();
            let rx = reader(peer);
            let builder = is_send(builder(b));
            let sent = data.clone();
            let shard = std::thread::spawn(move || {
                let mut m = builder.build().unwrap();
                let conn = m.attach(a).unwrap();
                m.send(conn, [sent]).unwrap();
                let mut done = Vec::new();
                m.flush_and_wait(&mut done).unwrap();
                assert_eq!(errors(&done), Vec::<String>::new());
                drop(m.detach(conn).unwrap());
            });
            (shard, rx)
        })
        .collect();
    for (shard, rx) in shards {
        shard.join().unwrap();
        assert!(rx.join().unwrap() == data[..]);
    }
}

/// A blocking pipe nobody reads must not hold up the other connections on
/// any backend (epoll/poll make it non-blocking at attach; regular files
/// are left alone).
pub fn a_blocking_pipe_does_not_stall_other_connections(b: Option<Backend>) {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let file = tempfile();
    let file_flags = fcntl(file.as_raw_fd(), FcntlArg::F_GETFL).unwrap();
    let (rd, wr) = nix::unistd::pipe().unwrap();
    let wr_raw = wr.as_raw_fd();
    let data = Bytes::from(pattern(31, 1 << 20));
    let (pipe_written, pipe_unsent, arrived, file_flags_after) = on_own_thread(
        "a flush with a full blocking pipe",
        Duration::from_secs(30),
        {
            let data = data.clone();
            move || {
                let mut m = mover(b);
                let (a, peer) = tcp_pair();
                let rx = reader(peer);
                let pipe = m.attach(wr).unwrap();
                let sock = m.attach(a).unwrap();
                let f = m.attach(file).unwrap();
                let flags = fcntl(wr_raw, FcntlArg::F_GETFL).unwrap();
                if m.backend() != Backend::Uring {
                    assert!(OFlag::from_bits_truncate(flags).contains(OFlag::O_NONBLOCK));
                }
                // 1 MiB into a 64 KiB pipe that nobody reads: it fills.
                m.send(pipe, [data.clone()]).unwrap();
                m.send(sock, [data.clone()]).unwrap();
                m.send(f, [data.slice(..1000)]).unwrap();
                m.flush().unwrap();
                let mut done = Vec::new();
                while m.queued(sock) != Some(0) || m.queued(f) != Some(0) {
                    m.wait(Some(Duration::from_millis(100)), &mut done).unwrap();
                }
                assert_eq!(errors(&done), Vec::<String>::new());
                let file_back = m.detach(f).unwrap().fd;
                let flags_after = fcntl(file_back.as_raw_fd(), FcntlArg::F_GETFL).unwrap();
                drop(m.detach(sock).unwrap());
                let d = m.detach(pipe).unwrap();
                let written = done
                    .iter()
                    .filter(|c| c.conn == pipe)
                    .map(|c| c.written)
                    .sum::<usize>()
                    + d.written;
                let unsent: Vec<u8> = d.unsent.iter().flat_map(|b| b.to_vec()).collect();
                (written, unsent, rx.join().unwrap(), flags_after)
            }
        },
    );
    assert!(arrived == data[..], "the socket got everything");
    assert_eq!(
        file_flags_after, file_flags,
        "a regular file's flags are untouched"
    );
    assert!(!pipe_unsent.is_empty(), "the pipe is full");
    assert_eq!(pipe_written + pipe_unsent.len(), data.len());
    let mut got = Vec::new();
    std::fs::File::from(rd).read_to_end(&mut got).unwrap();
    assert!(
        got == data[..pipe_written],
        "the pipe got exactly what was reported"
    );
}

fn tempfile() -> std::fs::File {
    let dir = std::env::temp_dir();
    let path = dir.join(format!(
        "ringmover-test-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    f
}

for_each_backend!(
    auto;
    more_than_iov_max_pieces_arrive_byte_exact,
    partial_writes_resume_at_the_exact_byte,
    glued_small_pieces_arrive_byte_exact,
    a_glued_queue_at_its_high_watermark_starts_writing,
    thousand_connections_each_get_their_own_stream,
    a_dead_peer_fails_only_its_own_connection,
    back_pressure_returns_the_buffers,
    udp_datagrams_keep_their_boundaries,
    udp_bursts_leave_in_order_in_few_enters,
    a_refused_datagram_returns_it_and_the_rest,
    stalled_datagram_bursts_resume_in_order,
    detach_mid_burst_returns_exactly_the_rest,
    files_are_written_at_their_position,
    detach_returns_fd_and_unsent_bytes,
    blocking_write_to_finishes_partial_writes,
    blocking_write_to_writes_files_and_pipes,
    each_thread_builds_its_own_mover,
    partial_writes_to_a_pipe_resume_at_the_exact_byte,
    a_flush_beyond_the_queue_depth_enters_once_per_full_queue,
    a_flush_of_large_writes_enters_once_per_mebibyte,
    a_blocking_pipe_does_not_stall_other_connections,
);

/// Twenty connections on an 8-entry SQ ring, with the enter the flush
/// makes when the ring fills failing (`count` times, with `errno`): `check`
/// sees the flush's error; then the kernel accepts again, and a drain must
/// deliver every byte (no connection stranded, no spin).
#[cfg(target_os = "linux")]
fn faulty_flush_then_drain(
    what: &str,
    errno: i32,
    count: usize,
    check: fn(&std::io::Error, &enter_faults::EnterFaults, &Mover),
) {
    const CONNS: usize = 20;
    let got = on_own_thread(what, Duration::from_secs(30), move || {
        let faults = enter_faults::install();
        let mut m = builder(Some(Backend::Uring))
            .queue_depth(8)
            .build()
            .unwrap();
        let (ours, peers) = tcp_pairs(CONNS);
        let readers: Vec<_> = peers.into_iter().map(reader).collect();
        let conns: Vec<_> = ours.into_iter().map(|a| m.attach(a).unwrap()).collect();
        for (i, &c) in conns.iter().enumerate() {
            m.send(c, [Bytes::from(pattern(i as u64, 1000))]).unwrap();
        }
        faults.fail_next(errno, count, enter_faults::Enter::submits_only);
        let err = m.flush().unwrap_err();
        check(&err, &faults, &m);
        faults.clear();
        let mut done = Vec::new();
        m.flush_and_wait(&mut done).unwrap();
        assert_eq!(errors(&done), Vec::<String>::new());
        assert_eq!(m.in_flight(), 0);
        for &c in &conns {
            assert_eq!(m.queued(c), Some(0));
            drop(m.detach(c).unwrap());
        }
        readers
            .into_iter()
            .map(|r| r.join().unwrap())
            .collect::<Vec<_>>()
    });
    for (i, g) in got.iter().enumerate() {
        assert!(g[..] == pattern(i as u64, 1000)[..], "connection {i}");
    }
}

/// io_uring's single issuer, with the enter failing mid-flush (EEXIST, what
/// the kernel answers another task): the flush reports the error, counts in
/// flight only what it pushed, keeps the rest scheduled, and the next drain
/// finishes every connection instead of spinning.
#[test]
#[cfg(target_os = "linux")]
fn uring_enter_failure_mid_flush_strands_nothing() {
    // The 9th connection finds the 8-entry SQ full: that enter fails.
    faulty_flush_then_drain(
        "drain after a failed enter",
        libc::EEXIST,
        1,
        |err, faults, m| {
            assert_eq!(faults.failed(), 1);
            assert!(err.to_string().contains("single issuer"), "{err}");
            assert_eq!(m.in_flight(), 8, "in flight: what was pushed, no more");
        },
    );
}

/// A transient enter (EINTR) while making room for a datagram chain must
/// not split it across two submissions: a split would be two chains, and
/// the datagrams after a refused one would go out anyway (and be reported
/// unsent too).
#[test]
#[cfg(target_os = "linux")]
fn uring_transient_enter_never_splits_a_datagram_chain() {
    on_own_thread(
        "a burst after an interrupted enter",
        Duration::from_secs(30),
        || {
            let faults = enter_faults::install();
            let mut m = builder(Some(Backend::Uring))
                .queue_depth(8)
                .build()
                .unwrap();
            // Five streams take five of the eight SQ slots first.
            let (ours, _peers) = tcp_pairs(5);
            for a in ours {
                let c = m.attach(a).unwrap();
                m.send(c, [Bytes::from_static(b"fill")]).unwrap();
            }
            let (conn, rx) = connected_udp(&mut m);
            for i in 0..10u8 {
                let len = if i == 2 { 70_000 } else { 100 };
                m.send(conn, [Bytes::from(vec![i; len])]).unwrap();
            }
            faults.fail_next(libc::EINTR, 1, |_| true);
            let mut done = Vec::new();
            m.flush_and_wait(&mut done).unwrap();
            assert_eq!(faults.failed(), 1, "the enter was interrupted");
            let failed: Vec<_> = done
                .iter()
                .filter(|c| c.conn == conn)
                .filter_map(|c| c.error.as_ref())
                .collect();
            assert_eq!(failed.len(), 1);
            assert_eq!(failed[0].error.raw_os_error(), Some(libc::EMSGSIZE));
            let unsent: Vec<u8> = failed[0].unsent.iter().flat_map(|b| b.to_vec()).collect();
            let want: Vec<u8> = (2..10u8)
                .flat_map(|i| vec![i; if i == 2 { 70_000 } else { 100 }])
                .collect();
            assert!(
                unsent == want,
                "unsent: the refused datagram and all after it"
            );
            rx.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let mut buf = [0u8; 2048];
            // A receive timeout makes task work the ring queues for this
            // thread show as EINTR (`sock_intr_errno`): not the answer.
            let recv = |buf: &mut [u8]| loop {
                match rx.recv(buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    other => break other,
                }
            };
            for i in 0..2u8 {
                let n = recv(&mut buf).unwrap_or_else(|e| panic!("waiting for datagram {i}: {e}"));
                assert!(n == 100 && buf[..n].iter().all(|&x| x == i), "datagram {i}");
            }
            match recv(&mut buf) {
                Ok(n) => panic!("datagram {} arrived after the refused one", buf[..n][0]),
                Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}"),
            }
        },
    );
}

/// Writes in flight never outnumber the completion queue (documented: at
/// most 7 × queue_depth), however many connections flush at once; the
/// rest start as completions come in.
#[test]
#[cfg(target_os = "linux")]
fn uring_in_flight_stays_within_the_completion_queue() {
    const DEPTH: usize = 8;
    const CONNS: usize = 100;
    let mut m = builder(Some(Backend::Uring))
        .queue_depth(DEPTH as u32)
        .build()
        .unwrap();
    let (ours, peers) = tcp_pairs(CONNS);
    let data = Bytes::from(pattern(41, 64 << 10));
    let conns: Vec<_> = ours
        .into_iter()
        .map(|a| {
            // Tiny buffers and nobody reading yet: every write stays in flight.
            set_sndbuf(&a, 4096);
            m.attach(a).unwrap()
        })
        .collect();
    for &c in &conns {
        m.send(c, [data.clone()]).unwrap();
    }
    m.flush().unwrap();
    let mut done = Vec::new();
    m.wait(Some(Duration::from_millis(20)), &mut done).unwrap();
    assert!(
        m.in_flight() <= 7 * DEPTH,
        "{} writes in flight with a CQ of {}: {:?}",
        m.in_flight(),
        8 * DEPTH,
        m.stats()
    );
    let readers: Vec<_> = peers.into_iter().map(reader).collect();
    m.flush_and_wait(&mut done).unwrap();
    assert_eq!(errors(&done), Vec::<String>::new());
    for c in conns {
        drop(m.detach(c).unwrap());
    }
    for (i, r) in readers.into_iter().enumerate() {
        assert!(r.join().unwrap() == data[..], "connection {i}");
    }
}

/// A kernel that keeps answering EBUSY (its CQ backed up) while the SQ
/// ring is full: the flush reaps and retries a bounded number of times,
/// then reports the error; once the kernel accepts again, nothing is lost.
#[test]
#[cfg(target_os = "linux")]
fn uring_persistent_ebusy_is_an_error_not_a_spin() {
    faulty_flush_then_drain(
        "a flush while every enter gets EBUSY",
        libc::EBUSY,
        usize::MAX,
        |err, faults, _| {
            assert_eq!(err.kind(), std::io::ErrorKind::ResourceBusy, "{err}");
            assert!(err.to_string().contains("refusing"), "{err}");
            let tries = faults.failed();
            assert!(tries > 1 && tries < 100, "{tries} enters refused");
        },
    );
}
