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
use ringmover::{Backend, Completion, Mover, Segmentation, SendErrorKind, ZeroCopy};

use crate::send::{builder, drain_datagrams, mover, on_own_thread, pattern, tcp_pair};

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

fn no_errors(done: &[Completion]) {
    let errs: Vec<String> = done
        .iter()
        .filter_map(|c| c.error.as_ref().map(|e| e.error.to_string()))
        .collect();
    assert_eq!(errs, Vec::<String>::new());
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
    detach_while_a_long_chain_runs_returns_the_rest,
);
