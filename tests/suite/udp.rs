//! UDP on every backend: GSO (`UDP_SEGMENT`) runs of datagrams, the
//! kernel refusing it on a socket (a real refusal: `SO_NO_CHECK` makes
//! GSO sends fail with EINVAL, UDP-Lite with EIO), runs broken by size and
//! destination, and `send_segments`. Every datagram is read back, in
//! order, with its content.

use std::net::{SocketAddr, UdpSocket};
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use bytes::Bytes;
use ringmover::{Backend, Mover, Segmentation, SendErrorKind, ZeroCopy};

use crate::send::{builder, drain_datagrams, mover, no_errors, on_own_thread, pattern, tcp_pair};

/// How long any one datagram may take to arrive before the test fails.
const RECV_LIMIT: Duration = Duration::from_secs(10);

/// Datagrams queued per round before the reader catches up: well within
/// a loopback socket's receive buffer, so none is dropped.
const ROUND: usize = 40;

/// GSO is expected on UDP sockets on Linux (4.18+), nowhere else.
fn gso_expected() -> Segmentation {
    if cfg!(target_os = "linux") {
        Segmentation::On
    } else {
        Segmentation::Off
    }
}

/// A loopback receiver with a generous read timeout.
fn receiver() -> UdpSocket {
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    rx.set_read_timeout(Some(RECV_LIMIT)).unwrap();
    rx
}

/// Datagrams a round of `send_and_check` queues: zero-copy datagrams pin
/// whole pages, which count against the receive buffer, so fewer.
fn round(m: &Mover) -> usize {
    match m.zero_copy() {
        ZeroCopy::Never => ROUND,
        _ => ROUND / 4,
    }
}

/// The `i`-th datagram of a test: its index, then a pattern, `len` bytes.
fn datagram(i: usize, len: usize) -> Bytes {
    let mut d = (i as u32).to_be_bytes().to_vec();
    d.extend_from_slice(&pattern(i as u64, len - 4));
    Bytes::from(d)
}

/// Reads the next datagram from `rx` and checks it is `want`.
fn expect(rx: &UdpSocket, want: &[u8], what: &str) {
    let mut buf = vec![0u8; 65536];
    let n = rx
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("waiting up to {RECV_LIMIT:?} for {what}: {e}"));
    assert_eq!(n, want.len(), "{what}: length");
    assert!(buf[..n] == *want, "{what}: content or order differs");
}

/// Sends `count` datagrams of `len` bytes from `tx` (attached to `m`) to
/// `rx`, in rounds, and reads every one back in order.
fn send_and_check(m: &mut Mover, tx: ringmover::Conn, rx: &UdpSocket, count: usize, len: usize) {
    let dest = rx.local_addr().unwrap();
    let mut done = Vec::new();
    let round = round(m);
    for start in (0..count).step_by(round) {
        let end = (start + round).min(count);
        for i in start..end {
            m.send_to(tx, [datagram(i, len)], dest).unwrap();
        }
        m.flush_and_wait(&mut done).unwrap();
        no_errors(&done);
        for i in start..end {
            expect(rx, &datagram(i, len), &format!("datagram {i} of {count}"));
        }
    }
    let written: usize = done.iter().map(|c| c.written).sum();
    assert_eq!(written, count * len, "completions account every byte once");
}

/// Thousands of equal datagrams through GSO arrive in order, whole, once;
/// far fewer sends than datagrams.
pub fn gso_sends_thousands_of_datagrams_in_order(b: Option<Backend>) {
    let mut m = mover(b);
    let rx = receiver();
    let tx = m.attach(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
    assert_eq!(m.segmentation(tx), Some(gso_expected()));
    let (count, len) = (3000, 1200);
    send_and_check(&mut m, tx, &rx, count, len);
    let s = m.stats();
    if gso_expected() == Segmentation::On {
        assert!(s.gso_sends > 0, "{s:?}");
        assert_eq!(
            s.gso_datagrams, count as u64,
            "every round is one run: {s:?}"
        );
        assert!(s.writes <= (count / 10) as u64, "{} sends", s.writes);
    }
    assert_eq!(s.gso_disabled, 0);
    assert_eq!(m.segmentation(tx), Some(gso_expected()));
}

/// With GSO off the same datagrams go one send each, same result.
pub fn without_gso_every_datagram_is_its_own_send(b: Option<Backend>) {
    let mut m = builder(b).gso(false).build().unwrap();
    let rx = receiver();
    let tx = m.attach(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
    assert_eq!(m.segmentation(tx), Some(Segmentation::Off));
    send_and_check(&mut m, tx, &rx, 3000, 1200);
    let s = m.stats();
    assert_eq!((s.gso_sends, s.writes), (0, 3000), "{s:?}");
}

/// GSO and zero-copy together (io_uring `SENDMSG_ZC` with the cmsg;
/// elsewhere the copy path): the same datagrams, in order.
pub fn gso_with_zero_copy_keeps_order(b: Option<Backend>) {
    let mut m = builder(b).zero_copy(ZeroCopy::Always).build().unwrap();
    let rx = receiver();
    let tx = m.attach(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
    send_and_check(&mut m, tx, &rx, 400, 1000);
    let s = m.stats();
    assert_eq!((s.notifs_outstanding, s.gso_disabled), (0, 0), "{s:?}");
    if gso_expected() == Segmentation::On {
        assert!(s.gso_sends > 0, "{s:?}");
    }
}

/// Runs are cut where the size grows, where a shorter datagram ends one,
/// at an empty datagram and where the destination changes: each receiver
/// gets exactly its datagrams, each its own length, in order.
pub fn mixed_sizes_and_destinations_break_runs(b: Option<Backend>) {
    let mut m = mover(b);
    let (ra, rb) = (receiver(), receiver());
    let (a, bb) = (ra.local_addr().unwrap(), rb.local_addr().unwrap());
    let tx = m.attach(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
    // (destination, length): runs of equal lengths, shorter tails, longer
    // ones, the other destination in between, an empty datagram.
    let mut plan: Vec<(SocketAddr, usize)> = Vec::new();
    let lens = [1200, 1200, 1200, 700, 1200, 1200, 1300, 1300, 8, 8, 8];
    for round in 0..6 {
        for (k, &len) in lens.iter().enumerate() {
            let dest = if (k + round) % 4 == 3 { bb } else { a };
            plan.push((dest, len));
        }
        plan.push((a, 0));
        plan.extend([(bb, 500); 5]);
    }
    let body = |i: usize, len: usize| {
        if len == 0 {
            Bytes::new()
        } else {
            datagram(i, len)
        }
    };
    for (i, &(dest, len)) in plan.iter().enumerate() {
        m.send_to(tx, [body(i, len)], dest).unwrap();
    }
    let mut done = Vec::new();
    m.flush_and_wait(&mut done).unwrap();
    no_errors(&done);
    let written: usize = done.iter().map(|c| c.written).sum();
    let total: usize = plan.iter().map(|&(_, len)| len).sum();
    assert_eq!(written, total);
    for (i, &(dest, len)) in plan.iter().enumerate() {
        let rx = if dest == a { &ra } else { &rb };
        expect(rx, &body(i, len), &format!("datagram {i} ({len} bytes)"));
    }
    if gso_expected() == Segmentation::On {
        assert!(m.stats().gso_sends > 0);
    }
}

/// `send_segments` cuts one buffer, or several pieces straddling segment
/// boundaries, into datagrams of the segment size (the last shorter).
pub fn send_segments_cuts_buffers_into_datagrams(b: Option<Backend>) {
    let mut m = mover(b);
    let rx = receiver();
    let dest = rx.local_addr().unwrap();
    let tx = m.attach(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
    let data = Bytes::from(pattern(7, 30_000));
    let seg = NonZeroUsize::new(1100).unwrap();
    m.send_segments(tx, [data.clone()], seg, Some(dest))
        .unwrap();
    // The same bytes as uneven pieces.
    let pieces = [
        data.slice(..10),
        data.slice(10..5000),
        data.slice(5000..5001),
        data.slice(5001..),
    ];
    m.send_segments(tx, pieces, seg, Some(dest)).unwrap();
    m.send_segments(tx, Vec::<Bytes>::new(), seg, Some(dest))
        .unwrap();
    let mut done = Vec::new();
    m.flush_and_wait(&mut done).unwrap();
    no_errors(&done);
    for pass in 0..2 {
        for (k, chunk) in data.chunks(1100).enumerate() {
            expect(&rx, chunk, &format!("pass {pass} segment {k}"));
        }
    }
    rx.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    assert!(
        rx.recv(&mut [0u8; 16]).is_err(),
        "nothing more: empty bufs queue nothing"
    );
    if gso_expected() == Segmentation::On {
        // 28 datagrams of 1100 bytes per pass fit one GSO send (30,000 B).
        assert_eq!(m.stats().gso_datagrams, 56, "{:?}", m.stats());
    }
    // A stream refuses it, handing the buffers back.
    let (s, _peer) = tcp_pair();
    let s = m.attach(s).unwrap();
    let e = m
        .send_segments(s, [Bytes::from_static(b"x")], seg, None)
        .unwrap_err();
    assert_eq!(e.kind, SendErrorKind::NotDatagram);
    assert_eq!(e.bufs, [Bytes::from_static(b"x")]);
}

/// `setsockopt(fd, level, name, 1)`.
#[cfg(target_os = "linux")]
fn set_int_opt(fd: &impl AsRawFd, level: i32, name: i32) {
    let one: libc::c_int = 1;
    // SAFETY: `one` is a live c_int and its size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt: {}", std::io::Error::last_os_error());
}

/// A socket whose GSO sends the kernel refuses: the first refusal turns
/// GSO off for it, visibly (`Segmentation::Refused`, `Stats::gso_disabled`),
/// and every datagram still arrives once, in order.
fn refused_gso_resends_without_it(b: Option<Backend>, tx: UdpSocket, rx: UdpSocket, errno: i32) {
    let mut m = mover(b);
    rx.set_read_timeout(Some(RECV_LIMIT)).unwrap();
    let tx = m.attach(tx).unwrap();
    assert_eq!(
        m.segmentation(tx),
        Some(gso_expected()),
        "the probe accepts it"
    );
    send_and_check(&mut m, tx, &rx, 500, 1000);
    if gso_expected() == Segmentation::On {
        assert_eq!(m.segmentation(tx), Some(Segmentation::Refused { errno }));
        assert_eq!(m.stats().gso_disabled, 1);
        // Refused once, for good: later rounds go one by one at once.
        let before = m.stats();
        send_and_check(&mut m, tx, &rx, 100, 1000);
        let after = m.stats();
        assert_eq!(after.gso_sends, before.gso_sends);
        assert_eq!(after.writes - before.writes, 100);
    }
}

/// `SO_NO_CHECK` (no UDP checksum) makes every GSO send fail with EINVAL.
pub fn gso_refused_with_einval_falls_back(b: Option<Backend>) {
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
    tx.connect(rx.local_addr().unwrap()).unwrap();
    #[cfg(target_os = "linux")]
    set_int_opt(&tx, libc::SOL_SOCKET, libc::SO_NO_CHECK);
    refused_gso_resends_without_it(b, tx, rx, libc::EINVAL);
}

/// A UDP-Lite socket (protocol 136) takes `UDP_SEGMENT` but its sends with
/// it fail with EIO, as a device without segmentation does.
pub fn gso_refused_with_eio_falls_back(b: Option<Backend>) {
    const IPPROTO_UDPLITE: i32 = 136;
    let udplite = || {
        // SAFETY: plain socket(2); the fd is owned at once.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, IPPROTO_UDPLITE) };
        // SAFETY: a fresh fd nobody else owns.
        (fd >= 0).then(|| UdpSocket::from(unsafe { OwnedFd::from_raw_fd(fd) }))
    };
    let (Some(rx), Some(tx)) = (udplite(), udplite()) else {
        eprintln!(
            "skipped: this kernel has no UDP-Lite ({})",
            std::io::Error::last_os_error()
        );
        return;
    };
    bind_and_connect(&rx, &tx);
    refused_gso_resends_without_it(b, tx, rx, libc::EIO);
}

/// Binds both to loopback ports and connects `tx` to `rx`.
fn bind_and_connect(rx: &UdpSocket, tx: &UdpSocket) {
    use nix::sys::socket::{bind, connect, getsockname, SockaddrIn};
    let any = SockaddrIn::new(127, 0, 0, 1, 0);
    bind(rx.as_raw_fd(), &any).unwrap();
    bind(tx.as_raw_fd(), &any).unwrap();
    let to: SockaddrIn = getsockname(rx.as_raw_fd()).unwrap();
    connect(tx.as_raw_fd(), &to).unwrap();
}

/// A Unix datagram socket refuses the probe: no GSO, datagrams intact.
pub fn unix_datagram_sockets_never_try_gso(b: Option<Backend>) {
    use std::os::unix::net::UnixDatagram;
    let mut m = mover(b);
    let (tx, rx) = UnixDatagram::pair().unwrap();
    rx.set_read_timeout(Some(RECV_LIMIT)).unwrap();
    let tx = m.attach(tx).unwrap();
    assert_eq!(m.segmentation(tx), Some(Segmentation::Off));
    let data = Bytes::from(pattern(3, 5000));
    m.send_segments(tx, [data.clone()], NonZeroUsize::new(1000).unwrap(), None)
        .unwrap();
    let mut done = Vec::new();
    m.flush_and_wait(&mut done).unwrap();
    no_errors(&done);
    let mut buf = [0u8; 2048];
    for (k, chunk) in data.chunks(1000).enumerate() {
        let n = rx
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("waiting up to {RECV_LIMIT:?} for segment {k}: {e}"));
        assert!(buf[..n] == *chunk, "segment {k}");
    }
    assert_eq!(m.stats().gso_sends, 0);
}

// Chains longer than the old cap of 32: io_uring links a socket's burst
// into one chain (up to 128 for a socket alone, a share of 128 sends in
// flight among several); every backend must keep order, bytes and errors
// exact.

/// Datagrams per round of `long_chains_keep_order_with_and_without_gso`:
/// more than 32 writes in one chain with GSO on or off, and (at most 200
/// bytes each) within a default receive buffer, so none is dropped.
const LONG_ROUND: usize = 100;

/// The `i`-th datagram of a long chain: 200 bytes, then 100, alternating,
/// so a GSO run is a pair (a shorter datagram ends it) and a round of 100
/// is 50 GSO sends.
fn paired(i: usize) -> Bytes {
    datagram(i, if i % 2 == 0 { 200 } else { 100 })
}

/// Thousands of datagrams, each round one flush of 100 (one chain of 100
/// sends, or of 50 GSO pairs, on io_uring: a socket alone chains up to
/// 128), to the connected peer and to an explicit destination: all arrive
/// in order, whole, once.
pub fn long_chains_keep_order_with_and_without_gso(b: Option<Backend>) {
    for gso in [true, false] {
        for connected in [true, false] {
            let what = format!("gso {gso}, connected {connected}");
            let mut m = builder(b).gso(gso).build().unwrap();
            let rx = receiver();
            let dest = rx.local_addr().unwrap();
            let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
            if connected {
                tx.connect(dest).unwrap();
            }
            let tx = m.attach(tx).unwrap();
            let (rounds, mut done) = (30, Vec::new());
            let before = m.stats();
            for r in 0..rounds {
                for i in r * LONG_ROUND..(r + 1) * LONG_ROUND {
                    if connected {
                        m.send(tx, [paired(i)]).unwrap();
                    } else {
                        m.send_to(tx, [paired(i)], dest).unwrap();
                    }
                }
                m.flush_and_wait(&mut done).unwrap();
                no_errors(&done);
                for i in r * LONG_ROUND..(r + 1) * LONG_ROUND {
                    expect(&rx, &paired(i), &format!("{what}: datagram {i}"));
                }
            }
            let n = rounds * LONG_ROUND;
            let written: usize = done.iter().map(|c| c.written).sum();
            assert_eq!(written, (n / 2) * 300, "{what}: every byte once");
            let s = m.stats();
            let gso_on = gso && gso_expected() == Segmentation::On;
            let writes = if gso_on { n / 2 } else { n };
            assert_eq!(s.writes - before.writes, writes as u64, "{what}: {s:?}");
            if gso_on {
                assert_eq!(s.gso_datagrams - before.gso_datagrams, n as u64, "{what}");
            }
            if m.backend() == Backend::Uring {
                // One chain per round: its submission and one wait. Chains
                // of 32 took four submissions and waits per round.
                let enters = s.enters - before.enters;
                assert!(
                    enters <= 3 * rounds as u64,
                    "{what}: {enters} enters for {rounds} rounds"
                );
            }
        }
    }
}

/// A Unix datagram socket's send buffer holds about a hundred of these, so
/// a chain of thousands stalls (EAGAIN, the kernel polls, the chain goes
/// on) again and again while a slow reader drains: every datagram still
/// arrives once, whole, in order. Also with a small ring, whose SQ bounds
/// each chain.
pub fn a_long_chain_stalls_and_resumes_in_order(b: Option<Backend>) {
    use std::os::unix::net::UnixDatagram;
    for depth in [None, Some(16)] {
        on_own_thread("a stalled long chain", Duration::from_secs(60), move || {
            let mut builder = builder(b);
            if let Some(d) = depth {
                builder = builder.queue_depth(d);
            }
            let mut m = builder.build().unwrap();
            let (tx, rx) = UnixDatagram::pair().unwrap();
            rx.set_read_timeout(Some(RECV_LIMIT)).unwrap();
            let conn = m.attach(tx).unwrap();
            let (n, len) = (3000, 1000);
            for i in 0..n {
                m.send(conn, [datagram(i, len)]).unwrap();
            }
            let reader = std::thread::spawn(move || {
                let mut buf = vec![0u8; 2 * len];
                for i in 0..n {
                    if i % 500 == 0 {
                        // Let the sender fill the socket and stall.
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    let got = rx.recv(&mut buf).unwrap_or_else(|e| {
                        panic!("depth {depth:?}: waiting for datagram {i}: {e}")
                    });
                    assert!(
                        buf[..got] == datagram(i, len)[..],
                        "depth {depth:?}: datagram {i} differs or is out of order"
                    );
                }
            });
            let mut done = Vec::new();
            m.flush_and_wait(&mut done).unwrap();
            no_errors(&done);
            let written: usize = done.iter().map(|c| c.written).sum();
            assert_eq!(written, n * len, "depth {depth:?}");
            reader.join().unwrap();
        });
    }
}

/// A datagram the kernel refuses (too big: EMSGSIZE) in the middle of a
/// long chain, with GSO on and off: the error names it, it and every
/// datagram after it come back unsent, in order; those before it arrive;
/// nothing is lost or sent twice.
pub fn an_error_mid_chain_is_reported_against_its_datagram(b: Option<Backend>) {
    for gso in [true, false] {
        let mut m = builder(b).gso(gso).build().unwrap();
        let rx = receiver();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.connect(rx.local_addr().unwrap()).unwrap();
        let conn = m.attach(tx).unwrap();
        let (before, after, len) = (99, 100, 100);
        let big = 70_000;
        let body = move |i: usize| datagram(i, if i == before { big } else { len });
        for i in 0..before + 1 + after {
            m.send(conn, [body(i)]).unwrap();
        }
        let mut done = Vec::new();
        m.flush_and_wait(&mut done).unwrap();
        let failed: Vec<_> = done.iter().filter_map(|c| c.error.as_ref()).collect();
        assert_eq!(failed.len(), 1, "gso {gso}: one failure, reported once");
        let e = failed[0];
        assert_eq!(e.error.raw_os_error(), Some(libc::EMSGSIZE), "{}", e.error);
        let unsent: Vec<u8> = e.unsent.iter().flat_map(|b| b.to_vec()).collect();
        let want: Vec<u8> = (before..before + 1 + after)
            .flat_map(|i| body(i).to_vec())
            .collect();
        assert!(
            unsent == want,
            "gso {gso}: unsent is the refused datagram and the rest"
        );
        let written: usize = done.iter().map(|c| c.written).sum();
        assert_eq!(written, before * len, "gso {gso}: those before it, once");
        for i in 0..before {
            expect(&rx, &body(i), &format!("gso {gso}: datagram {i}"));
        }
        rx.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        assert!(
            rx.recv(&mut [0u8; 16]).is_err(),
            "gso {gso}: nothing after the refused one"
        );
        let e = m.send(conn, [Bytes::from_static(b"x")]).unwrap_err();
        assert_eq!(e.kind, SendErrorKind::Failed);
        assert_eq!(
            m.stats().gso_disabled,
            0,
            "a lone datagram's EMSGSIZE is not GSO's"
        );
    }
}

/// The same with a chain that stalls before it reaches the refused
/// datagram (a Unix datagram socket refuses one larger than its send
/// buffer with EMSGSIZE): those before it arrive, in order; it and the
/// rest come back unsent.
pub fn an_error_mid_stalled_chain_is_reported_against_its_datagram(b: Option<Backend>) {
    use std::os::unix::net::UnixDatagram;
    on_own_thread(
        "an error after a stall",
        Duration::from_secs(60),
        move || {
            let mut m = mover(b);
            let (tx, rx) = UnixDatagram::pair().unwrap();
            rx.set_read_timeout(Some(RECV_LIMIT)).unwrap();
            let conn = m.attach(tx).unwrap();
            let (before, after, len) = (1000, 500, 1000);
            let big = 1 << 20;
            let body = move |i: usize| datagram(i, if i == before { big } else { len });
            for i in 0..before + 1 + after {
                m.send(conn, [body(i)]).unwrap();
            }
            let reader = std::thread::spawn(move || {
                let mut buf = vec![0u8; 2 * len];
                for i in 0..before {
                    if i % 250 == 0 {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    let got = rx
                        .recv(&mut buf)
                        .unwrap_or_else(|e| panic!("waiting for datagram {i}: {e}"));
                    assert!(
                        buf[..got] == body(i)[..],
                        "datagram {i} differs or is out of order"
                    );
                }
                rx.set_read_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                match rx.recv(&mut buf) {
                    Ok(n) => panic!("a datagram of {n} bytes arrived after the refused one"),
                    Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}"),
                }
            });
            let mut done = Vec::new();
            m.flush_and_wait(&mut done).unwrap();
            let failed: Vec<_> = done.iter().filter_map(|c| c.error.as_ref()).collect();
            assert_eq!(failed.len(), 1, "one failure, reported once");
            assert_eq!(failed[0].error.raw_os_error(), Some(libc::EMSGSIZE));
            let unsent: Vec<u8> = failed[0].unsent.iter().flat_map(|b| b.to_vec()).collect();
            let want: Vec<u8> = (before..before + 1 + after)
                .flat_map(|i| body(i).to_vec())
                .collect();
            assert!(
                unsent == want,
                "unsent is the refused datagram and the rest"
            );
            let written: usize = done.iter().map(|c| c.written).sum();
            assert_eq!(written, before * len);
            reader.join().unwrap();
        },
    );
}

/// A connected socket whose peer port is closed: the kernel's ICMP "port
/// unreachable" comes back on loopback while the first send runs, and the
/// next send on the socket fails with ECONNREFUSED. That datagram is the
/// one reported: what came before it counts as written, it and every
/// datagram after it come back unsent, in order, none twice.
pub fn a_refused_destination_fails_from_the_datagram_it_reaches(b: Option<Backend>) {
    for gso in [true, false] {
        let mut m = builder(b).gso(gso).build().unwrap();
        let closed = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.connect(closed.local_addr().unwrap()).unwrap();
        drop(closed);
        let conn = m.attach(tx).unwrap();
        let (n, len) = (500, 300);
        for i in 0..n {
            m.send(conn, [datagram(i, len)]).unwrap();
        }
        let mut done = Vec::new();
        m.flush_and_wait(&mut done).unwrap();
        let failed: Vec<_> = done.iter().filter_map(|c| c.error.as_ref()).collect();
        assert_eq!(failed.len(), 1, "gso {gso}: one failure, reported once");
        let e = failed[0];
        assert_eq!(
            e.error.raw_os_error(),
            Some(libc::ECONNREFUSED),
            "{}",
            e.error
        );
        let written: usize = done.iter().map(|c| c.written).sum();
        assert!(
            written >= len && written % len == 0,
            "gso {gso}: the first send went out ({written} bytes written)"
        );
        let first = written / len;
        let unsent: Vec<u8> = e.unsent.iter().flat_map(|b| b.to_vec()).collect();
        let want: Vec<u8> = (first..n).flat_map(|i| datagram(i, len).to_vec()).collect();
        assert!(
            unsent == want,
            "gso {gso}: unsent is datagram {first} (the refused one) and all after it"
        );
        let e = m.send(conn, [Bytes::from_static(b"x")]).unwrap_err();
        assert_eq!(e.kind, SendErrorKind::Failed);
    }
}

/// Many sockets with deep queues flushed at once on a small ring (SQ 64,
/// 448 completions for writes), one send per datagram: each socket's chain
/// is its share of the sends the ring keeps in flight, so all ten start in
/// that flush (chains as long as the SQ would start only seven before the
/// CQ is spoken for), and every datagram is accounted once.
pub fn deep_queues_on_many_sockets_all_start_at_once(b: Option<Backend>) {
    let mut m = builder(b).queue_depth(64).gso(false).build().unwrap();
    // Nobody reads: loopback drops what does not fit; sends still succeed.
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (socks, n, len) = (10, 1000, 64);
    let conns: Vec<_> = (0..socks)
        .map(|_| {
            let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
            tx.connect(sink.local_addr().unwrap()).unwrap();
            m.attach(tx).unwrap()
        })
        .collect();
    for &c in &conns {
        for i in 0..n {
            m.send(c, [datagram(i, len)]).unwrap();
        }
    }
    // Readiness backends count each inline resumption too.
    let started = m.flush().unwrap();
    assert!(
        started >= socks,
        "{started} starts: every socket starts in the first flush"
    );
    let mut done = Vec::new();
    m.flush_and_wait(&mut done).unwrap();
    no_errors(&done);
    for &c in &conns {
        let written: usize = done.iter().filter(|d| d.conn == c).map(|d| d.written).sum();
        assert_eq!(written, n * len, "{c:?}");
        assert_eq!(m.queued(c), Some(0));
    }
}

/// Detaching right after a flush, while a long chain runs and is about to
/// stall (the peer never reads): detach returns (a cancel that misses a
/// chain between two writes is sent again), and what arrived plus what
/// comes back is the burst, in order, once.
pub fn detach_while_a_long_chain_runs_returns_the_rest(b: Option<Backend>) {
    use std::os::unix::net::UnixDatagram;
    on_own_thread(
        "detach during a long chain",
        Duration::from_secs(30),
        move || {
            let mut m = mover(b);
            let (tx, rx) = UnixDatagram::pair().unwrap();
            let conn = m.attach(tx).unwrap();
            let (n, len) = (1000, 1000);
            for i in 0..n {
                m.send(conn, [datagram(i, len)]).unwrap();
            }
            m.flush().unwrap();
            let d = m.detach(conn).unwrap();
            let mut arrived = drain_datagrams(&rx, len);
            assert_eq!(arrived.len(), d.written, "written is what arrived");
            assert!(d.written < n * len, "the peer never read, yet all was sent");
            arrived.extend(d.unsent.iter().flat_map(|b| b.to_vec()));
            let want: Vec<u8> = (0..n).flat_map(|i| datagram(i, len).to_vec()).collect();
            assert!(
                arrived == want,
                "arrived + unsent is the burst, in order, once"
            );
        },
    );
}

for_each_backend!(
    gso_sends_thousands_of_datagrams_in_order,
    without_gso_every_datagram_is_its_own_send,
    gso_with_zero_copy_keeps_order,
    mixed_sizes_and_destinations_break_runs,
    send_segments_cuts_buffers_into_datagrams,
    gso_refused_with_einval_falls_back,
    gso_refused_with_eio_falls_back,
    unix_datagram_sockets_never_try_gso,
    long_chains_keep_order_with_and_without_gso,
    a_long_chain_stalls_and_resumes_in_order,
    an_error_mid_chain_is_reported_against_its_datagram,
    an_error_mid_stalled_chain_is_reported_against_its_datagram,
    a_refused_destination_fails_from_the_datagram_it_reaches,
    deep_queues_on_many_sockets_all_start_at_once,
    detach_while_a_long_chain_runs_returns_the_rest,
);

/// `bench udp` runs (so it never rots), and its reader counts exactly
/// what was sent: each datagram once through the plain reader, and GSO
/// super-packets into the `UDP_GRO` reader counted by their segments.
/// Linux only, as `ringmover bench` is.
#[cfg(target_os = "linux")]
#[test]
fn bench_udp_reader_counts_every_datagram_sent() {
    use crate::util::{output_within, ringmover};
    // GSO through the backend this host can use (a forced uring cell
    // would fail where a seccomp filter denies the ring).
    let uring =
        ringmover::Selection::choose(ringmover::BackendChoice::Force(Backend::Uring)).is_ok();
    let gso = if uring { "uring-gso" } else { "epoll-gso" };
    let strategies = format!("send,sendmmsg,sendmmsg-queue,{gso}");
    let out = output_within(
        ringmover().args([
            "bench",
            "udp",
            "--targets",
            "loopback,loopback-gro",
            "--sizes",
            "1200,64",
            "--sockets",
            "1",
            "--strategy",
            &strategies,
            // Short: what a starved reader has not read yet fits its
            // receive buffer (32 MiB when root).
            "--seconds",
            "0.02",
            "--json",
        ]),
        Duration::from_secs(60),
        "bench udp",
    );
    let lines = crate::util::json_rows(&out);
    // 2 targets × 2 sizes × 4 strategies.
    assert_eq!(lines.len(), 16, "{lines:?}");
    for v in &lines {
        assert_eq!(v["type"], "bench-udp", "{v}");
        let sent = v["sent"].as_u64().unwrap();
        assert!(sent > 0, "{v}");
        // Never more than was sent (a GRO read counted by its segments,
        // not as 64), and, where the bench may force a large receive
        // buffer (root), every datagram: the bench waits for the reader.
        let delivered = v["delivered"].as_u64().unwrap();
        if nix::unistd::geteuid().is_root() {
            assert_eq!(delivered, sent, "{v}");
        } else {
            assert!(delivered > 0 && delivered <= sent, "{v}");
        }
        if v["strategy"] == gso {
            assert!(v["gso_sends"].as_u64().unwrap() > 0, "{v}");
        }
    }
}
