//! Registered buffers and zero-copy sends, on every backend: buffers are
//! never reused while the kernel may read them, exhaustion is back-pressure,
//! fan-out sends one buffer everywhere, and a dead peer frees nothing early.

use std::net::TcpStream;
use std::time::Duration;

use bytes::Bytes;
use ringmover::{
    Backend, BackendChoice, Completion, Mover, Opcode, RingSupport, SendErrorKind, ZeroCopy,
};

use crate::send::{no_errors, pattern, tcp_pair};

fn mover(b: Option<Backend>, count: usize, size: usize, zc: ZeroCopy) -> Mover {
    let m = Mover::builder()
        .backend(b.map_or(BackendChoice::Auto, BackendChoice::Force))
        .fixed_buffers(count, size)
        .zero_copy(zc)
        .build()
        .expect("building the mover");
    if let Some(b) = b {
        assert_eq!(m.backend(), b);
    }
    // The policy is known: what was asked where io_uring has both opcodes
    // (the machine's kernel does: 6.1+), copying everywhere else.
    let ring = RingSupport::detect();
    let expected = if m.backend() == Backend::Uring
        && ring.supports(Opcode::SEND_ZC)
        && ring.supports(Opcode::SENDMSG_ZC)
    {
        zc
    } else {
        ZeroCopy::Never
    };
    assert_eq!(m.zero_copy(), expected, "{:?}", m.selection());
    m
}

/// Leases a buffer, waiting for completions/notifications while the pool
/// is exhausted (that is the back-pressure). Completions are moved to
/// `done`, except that failed connections' unsent buffers are dropped: they
/// would hold pool buffers forever.
fn lease(m: &mut Mover, done: &mut Vec<Completion>) -> ringmover::FixedBufMut {
    for _ in 0..300 {
        match m.lease() {
            Ok(b) => return b,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                m.flush().unwrap();
                m.wait(Some(Duration::from_millis(100)), done).unwrap();
                for c in done.iter_mut() {
                    if let Some(e) = c.error.as_mut() {
                        e.unsent.clear();
                    }
                }
            }
            Err(e) => panic!("lease: {e}"),
        }
    }
    panic!(
        "the pool never gave a buffer back: {:?} in flight {}",
        m.stats(),
        m.in_flight()
    );
}

fn slow_reader(s: TcpStream) -> std::thread::JoinHandle<Vec<u8>> {
    crate::send::slow_reader(s, 3000)
}

pub fn buffers_are_never_reused_in_flight(b: Option<Backend>) {
    const SIZE: usize = 32 << 10;
    let mut m = mover(b, 3, SIZE, ZeroCopy::Always);
    let mut conns = Vec::new();
    let mut readers = Vec::new();
    for _ in 0..2 {
        let (a, peer) = tcp_pair();
        nix::sys::socket::setsockopt(&a, nix::sys::socket::sockopt::SndBuf, &8192).unwrap();
        readers.push(slow_reader(peer));
        conns.push(m.attach(a).unwrap());
    }
    let mut done = Vec::new();
    let rounds = 200u64;
    for i in 0..rounds {
        let mut buf = lease(&mut m, &mut done);
        buf.extend_from_slice(&pattern(i, SIZE)).unwrap();
        let frozen = buf.freeze();
        for &c in &conns {
            m.send(c, [frozen.clone()]).unwrap();
        }
        drop(frozen);
        m.flush().unwrap();
    }
    m.flush_and_wait(&mut done).unwrap();
    no_errors(&done);
    let pool = m.pool().unwrap().clone();
    assert_eq!(pool.available(), 3, "every buffer is back after drain");
    if m.backend() == Backend::Uring {
        assert!(m.stats().zc_sends > 0, "{:?}", m.stats());
        assert_eq!(m.stats().notifs_outstanding, 0);
    }
    for c in conns {
        drop(m.detach(c).unwrap());
    }
    for r in readers {
        let got = r.join().unwrap();
        assert_eq!(got.len() as u64, rounds * SIZE as u64);
        for (i, block) in got.chunks(SIZE).enumerate() {
            assert!(
                block == &pattern(i as u64, SIZE)[..],
                "block {i} was overwritten in flight"
            );
        }
    }
}

pub fn pool_exhaustion_is_back_pressure_not_a_panic(b: Option<Backend>) {
    let m = mover(b, 2, 4096, ZeroCopy::Never);
    let first = m.lease().unwrap();
    let second = m.lease().unwrap();
    let err = m.lease().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
    assert!(
        err.to_string().contains("all 2 fixed buffers are in use"),
        "{err}"
    );
    let mut frozen_src = second;
    assert!(
        frozen_src.extend_from_slice(&[0u8; 5000]).is_err(),
        "a buffer never grows"
    );
    frozen_src.extend_from_slice(b"abc").unwrap();
    let frozen = frozen_src.freeze();
    let clone = frozen.slice(1..);
    drop(first);
    assert_eq!(m.pool().unwrap().available(), 1);
    drop(frozen);
    assert_eq!(m.pool().unwrap().available(), 1, "a slice still holds it");
    assert_eq!(&clone[..], b"bc");
    drop(clone);
    assert_eq!(m.pool().unwrap().available(), 2);
}

pub fn one_buffer_fans_out_to_many_connections(b: Option<Backend>) {
    const SIZE: usize = 256 << 10;
    let mut m = mover(b, 1, SIZE, ZeroCopy::AUTO);
    let payload = {
        let mut buf = m.lease().unwrap();
        buf.extend_from_slice(&pattern(77, SIZE)).unwrap();
        buf.freeze()
    };
    let mut conns = Vec::new();
    let mut readers = Vec::new();
    for i in 0..50 {
        let (a, peer) = tcp_pair();
        readers.push(slow_reader(peer));
        let c = m.attach(a).unwrap();
        m.send(c, [Bytes::from(format!("conn {i:03}\n")), payload.clone()])
            .unwrap();
        conns.push(c);
    }
    let mut done = Vec::new();
    m.flush_and_wait(&mut done).unwrap();
    no_errors(&done);
    drop(payload);
    assert_eq!(m.pool().unwrap().available(), 1);
    for c in conns {
        drop(m.detach(c).unwrap());
    }
    let want = pattern(77, SIZE);
    for (i, r) in readers.into_iter().enumerate() {
        let got = r.join().unwrap();
        assert_eq!(&got[..9], format!("conn {i:03}\n").as_bytes());
        assert!(got[9..] == want[..], "connection {i}");
    }
}

pub fn a_peer_closed_mid_flight_frees_nothing_early(b: Option<Backend>) {
    const SIZE: usize = 64 << 10;
    let mut m = mover(b, 4, SIZE, ZeroCopy::Always);
    let (a, peer) = tcp_pair();
    let (a2, peer2) = tcp_pair();
    let mut peer = Some(peer);
    nix::sys::socket::setsockopt(
        peer.as_ref().unwrap(),
        nix::sys::socket::sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )
    .unwrap();
    let dead = m.attach(a).unwrap();
    let live = m.attach(a2).unwrap();
    let rx = slow_reader(peer2);
    let mut done = Vec::new();
    for i in 0..40u64 {
        if i == 2 {
            // Reset the first peer while its sends are in flight. (Not
            // later: bytes queued to a peer that never reads keep their
            // buffers until acknowledged, which is the contract, and would
            // exhaust the pool first.)
            drop(peer.take());
        }
        let mut buf = lease(&mut m, &mut done);
        buf.extend_from_slice(&pattern(i, SIZE)).unwrap();
        let frozen = buf.freeze();
        // Refused only once the reset is known.
        if let Err(e) = m.send(dead, [frozen.clone()]) {
            assert_eq!(e.kind, SendErrorKind::Failed, "{e}");
        }
        m.send(live, [frozen]).unwrap();
        m.flush().unwrap();
    }
    m.flush_and_wait(&mut done).unwrap();
    assert!(
        done.iter().any(|c| c.conn == dead && c.error.is_some()),
        "the dead peer reports its error"
    );
    assert!(
        done.iter().any(|c| c.conn == live)
            && done.iter().all(|c| c.conn != live || c.error.is_none()),
        "the live peer got its completions, none failed"
    );
    done.clear();
    let detached = m.detach(dead).unwrap();
    drop(detached);
    drop(m.detach(live).unwrap());
    let pool = m.pool().unwrap().clone();
    drop(m);
    assert_eq!(pool.available(), 4, "every buffer returned, none leaked");
    let got = rx.join().unwrap();
    assert_eq!(got.len(), 40 * SIZE);
    for (i, block) in got.chunks(SIZE).enumerate() {
        assert!(block == &pattern(i as u64, SIZE)[..], "block {i}");
    }
}

/// A Unix datagram socket refuses zero-copy (EOPNOTSUPP) on the first
/// send of a burst; the kernel cancels the rest of that chain, and the
/// whole burst goes again by copying: each datagram once, in order.
pub fn a_burst_refused_zero_copy_is_resent_by_copying(b: Option<Backend>) {
    use std::os::unix::net::UnixDatagram;
    let mut m = mover(b, 4, 64 << 10, ZeroCopy::Always);
    let (tx, rx) = UnixDatagram::pair().unwrap();
    let conn = m.attach(tx).unwrap();
    let mut buf = m.lease().unwrap();
    buf.extend_from_slice(&pattern(5, 50 * 100)).unwrap();
    let payload = buf.freeze();
    for i in 0..50 {
        m.send(conn, [payload.slice(i * 100..(i + 1) * 100)])
            .unwrap();
    }
    let mut done = Vec::new();
    m.flush_and_wait(&mut done).unwrap();
    no_errors(&done);
    assert_eq!(done.iter().map(|c| c.written).sum::<usize>(), 50 * 100);
    if m.zero_copy() != ZeroCopy::Never {
        // A refused zero-copy chain, then all 50 again by copying. (The
        // policy was asserted when the Mover was built.)
        let st = m.stats();
        assert!(st.zc_sends >= 1 && st.writes > 50, "{st:?}");
    }
    let got = crate::send::drain_datagrams(&rx, 100);
    assert!(got == payload[..], "each datagram once, in order");
}

for_each_backend!(
    auto;
    buffers_are_never_reused_in_flight,
    a_burst_refused_zero_copy_is_resent_by_copying,
    pool_exhaustion_is_back_pressure_not_a_panic,
    one_buffer_fans_out_to_many_connections,
    a_peer_closed_mid_flight_frees_nothing_early,
    detaching_with_notifications_pending_frees_nothing_early,
);

/// On loopback the kernel copies zero-copy sends anyway and says so:
/// `Always` counts the copies, `Auto` switches the connection to copying.
#[test]
#[cfg(target_os = "linux")]
fn uring_reports_kernel_copies_and_auto_demotes() {
    for (policy, auto) in [(ZeroCopy::Always, false), (ZeroCopy::AUTO, true)] {
        let mut m = mover(Some(Backend::Uring), 2, 64 << 10, policy);
        let (a, peer) = tcp_pair();
        let rx = slow_reader(peer);
        let c = m.attach(a).unwrap();
        let mut done = Vec::new();
        for i in 0..20u64 {
            let mut buf = lease(&mut m, &mut done);
            buf.extend_from_slice(&pattern(i, 64 << 10)).unwrap();
            m.send(c, [buf.freeze()]).unwrap();
            m.flush_and_wait(&mut done).unwrap();
        }
        no_errors(&done);
        let s = m.stats();
        assert!(s.zc_sends > 0, "{s:?}");
        assert_eq!(s.zc_notified, s.zc_sends, "{s:?}");
        assert!(s.zc_copied > 0, "loopback copies and reports it: {s:?}");
        if auto {
            assert!(
                s.zc_sends < 5,
                "Auto switched to copying after a copy report: {s:?}"
            );
        } else {
            assert_eq!(s.zc_sends, 20, "{s:?}");
        }
        drop(m.detach(c).unwrap());
        assert_eq!(rx.join().unwrap().len(), 20 * (64 << 10));
    }
}

/// UDP too: a datagram socket whose zero-copy sends the kernel copies
/// (loopback delivery) is switched to copying by `Auto`.
#[test]
#[cfg(target_os = "linux")]
fn uring_auto_demotes_udp_too() {
    let mut m = mover(Some(Backend::Uring), 1, 32 << 10, ZeroCopy::AUTO);
    let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    tx.connect(rx.local_addr().unwrap()).unwrap();
    let c = m.attach(tx).unwrap();
    let payload = {
        let mut b = m.lease().unwrap();
        b.fill(7, 20_000);
        b.freeze()
    };
    let mut done = Vec::new();
    let mut buf = vec![0u8; 65536];
    rx.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for i in 0..50 {
        m.send(c, [payload.clone()]).unwrap();
        m.flush_and_wait(&mut done).unwrap();
        let n = rx
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("waiting for datagram {i}: {e}"));
        assert_eq!(n, 20_000);
    }
    no_errors(&done);
    let s = m.stats();
    assert!(s.zc_copied > 0, "{s:?}");
    assert!(s.zc_sends < 5, "{s:?}");
}

/// Dropping the engine while zero-copy data sits unacknowledged at a peer
/// that never reads neither hangs nor frees the buffers under the kernel.
#[test]
#[cfg(target_os = "linux")]
fn uring_drop_with_notifications_pending_does_not_hang() {
    const SIZE: usize = 1 << 20;
    // Drop waits 2 s at most; the bound only catches a hang.
    let (pool, peer) = crate::send::on_own_thread(
        "dropping a Mover with notifications pending",
        Duration::from_secs(60),
        || {
            let mut m = mover(Some(Backend::Uring), 4, SIZE, ZeroCopy::Always);
            let (a, peer) = tcp_pair();
            let c = m.attach(a).unwrap();
            let pool = m.pool().unwrap().clone();
            let mut done = Vec::new();
            for i in 0..4u64 {
                let mut buf = m.lease().unwrap();
                buf.extend_from_slice(&pattern(i, SIZE)).unwrap();
                m.send(c, [buf.freeze()]).unwrap();
                m.flush().unwrap();
                m.wait(Some(Duration::from_millis(50)), &mut done).unwrap();
            }
            drop(m);
            (pool, peer)
        },
    );
    // What the peer never acknowledged is still held, not back in the pool.
    assert!(pool.available() < 4);
    drop(peer);
}

/// Detaching a zero-copy connection whose notifications are pending (a
/// peer that has not read) hands back the fd and exactly the unsent bytes
/// at once, keeps the buffers the kernel may still read, and releases them
/// when the notifications arrive, after the peer reads.
pub fn detaching_with_notifications_pending_frees_nothing_early(b: Option<Backend>) {
    use std::io::Read;
    const SIZE: usize = 1 << 20;
    let mut m = mover(b, 4, SIZE, ZeroCopy::Always);
    let (a, mut peer) = tcp_pair();
    nix::sys::socket::setsockopt(&peer, nix::sys::socket::sockopt::RcvBuf, &(64 << 10)).unwrap();
    // A fixed send buffer too: autotuning may otherwise grow it to take all
    // 4 MiB (tcp_wmem's maximum), and then nothing is left unsent.
    nix::sys::socket::setsockopt(&a, nix::sys::socket::sockopt::SndBuf, &(64 << 10)).unwrap();
    let c = m.attach(a).unwrap();
    let pool = m.pool().unwrap().clone();
    let mut done = Vec::new();
    let mut want = Vec::new();
    for i in 0..4u64 {
        let mut buf = m.lease().unwrap();
        buf.extend_from_slice(&pattern(i, SIZE)).unwrap();
        want.extend_from_slice(&pattern(i, SIZE));
        m.send(c, [buf.freeze()]).unwrap();
        m.flush().unwrap();
        m.wait(Some(Duration::from_millis(20)), &mut done).unwrap();
    }
    no_errors(&done);
    let mut d = m.detach(c).unwrap();
    if m.zero_copy() != ZeroCopy::Never {
        assert!(
            m.stats().notifs_outstanding > 0,
            "a notification is pending at detach: {:?}",
            m.stats()
        );
    }
    let written = done.iter().map(|c| c.written).sum::<usize>() + d.written;
    let unsent: Vec<u8> = d.unsent.iter().flat_map(|b| b.to_vec()).collect();
    assert!(!unsent.is_empty(), "a peer that never read took everything");
    assert_eq!(
        written + unsent.len(),
        want.len(),
        "every byte accounted once"
    );
    assert!(unsent == want[written..]);
    d.unsent.clear();
    if m.zero_copy() != ZeroCopy::Never {
        assert!(
            pool.available() < 4,
            "buffers in the kernel's hands are held"
        );
    }
    peer.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = vec![0u8; written];
    peer.read_exact(&mut got)
        .unwrap_or_else(|e| panic!("waiting for the {written} bytes written: {e}"));
    assert!(
        got == want[..written],
        "the peer got exactly what was reported"
    );
    // Read and acknowledged: the notifications arrive and free the buffers.
    m.flush_and_wait(&mut done).unwrap();
    assert_eq!(m.stats().notifs_outstanding, 0);
    assert_eq!(
        pool.available(),
        4,
        "every buffer back after the notifications"
    );
    drop(d);
}

/// Registering more than `RLIMIT_MEMLOCK` allows is a clear error naming the
/// limit. Root is not charged for locked memory, so the check runs in a
/// child (this test binary again) as `nobody` with a 1 MiB limit.
#[test]
#[cfg(target_os = "linux")]
fn registering_beyond_memlock_is_a_clear_error() {
    const NAME: &str = "zerocopy::registering_beyond_memlock_is_a_clear_error";
    if std::env::var_os("RINGMOVER_MEMLOCK_CHILD").is_some() {
        let err = Mover::builder()
            .backend(BackendChoice::Force(Backend::Uring))
            .fixed_buffers(4, 1 << 20)
            .build()
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::OutOfMemory, "{err}");
        assert!(
            err.to_string().contains("RLIMIT_MEMLOCK (1048576 bytes)"),
            "{err}"
        );
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    // `nobody` must be able to run it wherever the tree was cloned: run a
    // copy from a world-readable temporary directory.
    let dir = std::env::temp_dir().join(format!("ringmover-memlock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = dir.join("suite");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cmd = std::process::Command::new(&exe);
    cmd.current_dir(&dir);
    cmd.args([NAME, "--exact", "--test-threads=1"])
        .env("RINGMOVER_MEMLOCK_CHILD", "1");
    // SAFETY: between fork and exec only async-signal-safe calls are made.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 1 << 20,
                rlim_max: 1 << 20,
            };
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) != 0
                || libc::setgid(65534) != 0
                || libc::setuid(65534) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let out = cmd
        .output()
        .expect("the child runs (as nobody: needs root)");
    std::fs::remove_dir_all(&dir).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("test result: ok. 1 passed"), "{text}");
}

/// `bench zerocopy` runs (so it never rots) and reports what the kernel
/// did: on loopback TCP every zero-copy send is copied anyway (the deferred
/// copy its help text names), `copy` makes none, and into the black-hole
/// veth (root only; the bench skips it with a note otherwise) none is
/// copied. Needs io_uring, as the bench does.
#[cfg(target_os = "linux")]
#[test]
fn bench_zerocopy_reports_what_the_kernel_copied() {
    use crate::util::{output_within, ringmover};
    if ringmover::Selection::choose(BackendChoice::Force(Backend::Uring)).is_err() {
        eprintln!("skipped: no io_uring here, and bench zerocopy needs it");
        return;
    }
    let out = output_within(
        ringmover().args([
            "bench",
            "zerocopy",
            "--sizes",
            "16K",
            "--conns",
            "2",
            "--strategy",
            "copy,zerocopy",
            "--seconds",
            "0.05",
            "--json",
        ]),
        Duration::from_secs(60),
        "bench zerocopy",
    );
    let lines = crate::util::json_rows(&out);
    assert!(lines.iter().any(|v| v["transport"] == "tcp"), "{lines:?}");
    for v in &lines {
        assert_eq!(v["type"], "bench-zerocopy", "{v}");
        assert!(v["bytes"].as_u64().unwrap() > 0, "{v}");
        let (sends, copied) = (v["zc_sends"].as_u64(), v["zc_copied"].as_u64());
        match (v["strategy"].as_str(), v["transport"].as_str()) {
            (Some("copy"), _) => assert_eq!((sends, copied), (Some(0), Some(0)), "{v}"),
            (Some("zerocopy"), Some("tcp")) => {
                assert!(sends.unwrap() > 0, "{v}");
                assert_eq!(copied, sends, "loopback copies every one: {v}");
            }
            (Some("zerocopy"), Some("udp-veth")) => {
                assert!(sends.unwrap() > 0, "{v}");
                assert_eq!(copied, Some(0), "a transmitting device copies none: {v}");
            }
            _ => panic!("unexpected row {v}"),
        }
    }
}
