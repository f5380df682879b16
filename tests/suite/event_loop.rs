//! A `Mover` driven from someone else's event loop: its fd (`AsFd`) polls
//! readable when there is something to reap, and `wait` with a zero
//! timeout reaps it. On io_uring the ring is set up with DEFER_TASKRUN:
//! these tests check that a poller blocked on the ring fd is woken by
//! completions that need the ring's task work to run first.

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use ringmover::{Backend, Completion, Mover};

use crate::send::{builder, pattern};

/// Which loop polls the Mover's fd.
#[derive(Debug, Clone, Copy)]
enum Outer {
    Poll,
    Epoll,
}

/// Blocks in `outer` until `mover`'s fd polls readable or `timeout`;
/// whether it did. A poll that was never woken still finds the fd
/// readable if it checks again as it times out: only a wake-up before
/// the timeout counts (for a zero timeout, the one check).
fn readable(mover: &Mover, outer: Outer, timeout: Duration) -> bool {
    let started = Instant::now();
    let ready = poll_once(mover, outer, timeout);
    ready && (timeout.is_zero() || started.elapsed() < timeout)
}

fn poll_once(mover: &Mover, outer: Outer, timeout: Duration) -> bool {
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    match outer {
        Outer::Poll => {
            let mut fds = [PollFd::new(mover.as_fd(), PollFlags::POLLIN)];
            poll(&mut fds, PollTimeout::from(ms)).expect("poll(2) on the Mover's fd") == 1
        }
        Outer::Epoll => {
            let ep = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).expect("epoll_create1");
            ep.add(mover.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, 7))
                .expect("EPOLL_CTL_ADD of the Mover's fd");
            let mut evs = [EpollEvent::empty()];
            ep.wait(&mut evs, EpollTimeout::from(ms))
                .expect("epoll_wait on the Mover's fd")
                == 1
        }
    }
}

/// Reads exactly `len` bytes after `delay` (so the poller is blocked by
/// then; the checks hold either way), and hands the socket back open: a
/// hang-up would make the Mover's fd readable again.
fn late_reader(
    mut s: UnixStream,
    len: usize,
    delay: Duration,
) -> std::thread::JoinHandle<(Vec<u8>, UnixStream)> {
    std::thread::spawn(move || {
        std::thread::sleep(delay);
        let mut v = vec![0u8; len];
        s.read_exact(&mut v).expect("reading what the Mover sent");
        (v, s)
    })
}

/// Sends more than the socket buffer holds, then drives the Mover only
/// from `outer`: block until its fd is readable, `wait(Some(ZERO))`,
/// repeat. Every byte arrives, no poll times out while bytes are queued,
/// and once everything is reaped the fd no longer polls readable.
fn drive_from(b: Option<Backend>, outer: Outer) {
    let mut m = builder(b).build().unwrap();
    let (a, peer) = UnixStream::pair().unwrap();
    let conn = m.attach(a).unwrap();
    let data = Bytes::from(pattern(41, 8 << 20));
    m.send(conn, [data.clone()]).unwrap();
    m.flush().unwrap();
    let reader = late_reader(peer, data.len(), Duration::from_millis(100));
    let mut done: Vec<Completion> = Vec::new();
    let (mut wakes, mut spurious) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while m.queued(conn) != Some(0) {
        assert!(
            Instant::now() < deadline,
            "{outer:?} on {:?}: 30 s and still {:?} bytes queued ({} completions)",
            m.backend(),
            m.queued(conn),
            done.len()
        );
        assert!(
            readable(&m, outer, Duration::from_secs(10)),
            "{outer:?} on {:?}: the Mover's fd (fd {}) did not poll readable within 10 s \
             while {:?} bytes were queued and the peer was reading",
            m.backend(),
            m.as_raw_fd(),
            m.queued(conn)
        );
        wakes += 1;
        let before = done.len();
        m.wait(Some(Duration::ZERO), &mut done).unwrap();
        spurious += usize::from(done.len() == before);
        for c in &done[before..] {
            assert!(c.error.is_none(), "{:?}", c.error);
        }
    }
    let written: usize = done.iter().map(|c| c.written).sum();
    assert_eq!(written, data.len());
    let (got, _peer) = reader.join().expect("reader thread");
    assert!(got == data, "the peer read different bytes");
    // Everything is reaped and the peer idle: nothing left to report.
    m.wait(Some(Duration::ZERO), &mut done).unwrap();
    assert!(
        !readable(&m, outer, Duration::ZERO),
        "{outer:?} on {:?}: the fd still polls readable with nothing to reap \
         ({wakes} wake-ups, {spurious} spurious)",
        m.backend()
    );
}

pub fn fd_wakes_a_poll_loop(b: Option<Backend>) {
    drive_from(b, Outer::Poll);
}

pub fn fd_wakes_an_epoll_loop(b: Option<Backend>) {
    drive_from(b, Outer::Epoll);
}

/// An idle Mover's fd does not poll readable once `wait` has run,
/// attached connections and all (epoll's ready list holds their first
/// writability edge: the first `wait` after the fd was asked for
/// collects it).
pub fn idle_fd_is_not_readable(b: Option<Backend>) {
    let mut m = builder(b).build().unwrap();
    let (a, _peer) = UnixStream::pair().unwrap();
    m.attach(a).unwrap();
    // As a loop registers it, before its first wait.
    let fd = m.as_raw_fd();
    assert!(fd >= 0);
    let mut done = Vec::new();
    m.wait(Some(Duration::ZERO), &mut done).unwrap();
    assert!(done.is_empty());
    for outer in [Outer::Poll, Outer::Epoll] {
        assert!(
            !readable(&m, outer, Duration::from_millis(50)),
            "{outer:?} on {:?}: an idle Mover's fd polls readable",
            m.backend()
        );
    }
}

for_each_backend!(
    fd_wakes_a_poll_loop,
    fd_wakes_an_epoll_loop,
    idle_fd_is_not_readable
);

/// io_uring and epoll: a `Waker`'s wake makes the fd readable, and the
/// `wait` that follows returns at once and consumes it.
fn wake_shows_on_fd(backend: Backend) {
    let mut m = Mover::builder()
        .backend(ringmover::BackendChoice::Force(backend))
        .build()
        .unwrap();
    let waker = m.waker().unwrap();
    let mut done = Vec::new();
    // Arms the wake fd's watch (io_uring submits its poll here).
    m.wait(Some(Duration::ZERO), &mut done).unwrap();
    assert!(
        !readable(&m, Outer::Poll, Duration::ZERO),
        "readable before any wake"
    );
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        waker.wake().unwrap();
    });
    assert!(
        readable(&m, Outer::Poll, Duration::from_secs(10)),
        "{backend}: a wake did not make the fd readable within 10 s"
    );
    t.join().unwrap();
    let started = Instant::now();
    m.wait(Some(Duration::from_secs(10)), &mut done).unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{backend}: wait after a wake slept"
    );
    m.wait(Some(Duration::ZERO), &mut done).unwrap();
    assert!(
        !readable(&m, Outer::Poll, Duration::ZERO),
        "{backend}: still readable after the wake was consumed"
    );
}

#[cfg(target_os = "linux")]
#[test]
fn uring_wake_shows_on_fd() {
    wake_shows_on_fd(Backend::Uring);
}

#[cfg(target_os = "linux")]
#[test]
fn epoll_wake_shows_on_fd() {
    wake_shows_on_fd(Backend::Epoll);
}
