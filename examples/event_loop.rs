//! A `Mover` inside someone else's event loop: one thread, one poll(2)
//! call watching the Mover's fd next to the loop's own socket. The Mover
//! sends 64 MiB into one end of a socket pair; the loop reads the other
//! end, non-blocking, as poll says it is readable. Nothing blocks except
//! poll itself.
//!
//! The pattern: poll the Mover's fd (`AsFd`) for `POLLIN`; when it is
//! readable, call `wait(Some(Duration::ZERO), ..)`, which reaps what
//! finished without sleeping. With tokio the same is
//! `AsyncFd::with_interest(mover, Interest::READABLE)`, then in a loop
//! `let mut guard = fd.readable_mut().await?;`,
//! `guard.get_inner_mut().wait(Some(Duration::ZERO), &mut done)?;`,
//! `guard.clear_ready();`.
//!
//! `cargo run --example event_loop` (RINGMOVER_BACKEND picks the backend;
//! on `poll` the loop spins while the socket is full: see `Mover`'s docs).

use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use bytes::Bytes;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use ringmover::Mover;

const TOTAL: usize = 64 << 20;
const CHUNK: usize = 1 << 20;

fn main() -> io::Result<()> {
    let mut mover = Mover::builder().build()?;
    println!(
        "backend: {} ({})",
        mover.backend(),
        mover.selection().reason
    );
    let (ours, mut theirs) = UnixStream::pair()?;
    theirs.set_nonblocking(true)?;
    let conn = mover.attach(ours)?;

    let payload = Bytes::from(vec![0x5a; CHUNK]);
    for _ in 0..TOTAL / CHUNK {
        mover.send(conn, [payload.clone()])?;
    }
    mover.flush()?;

    let (mut received, mut written, mut wakeups) = (0, 0, 0);
    let mut buf = vec![0u8; 256 << 10];
    let mut done = Vec::new();
    while received < TOTAL || mover.queued(conn) != Some(0) {
        let (mover_ready, sock_ready) = {
            let mut fds = [
                PollFd::new(mover.as_fd(), PollFlags::POLLIN),
                PollFd::new(theirs.as_fd(), PollFlags::POLLIN),
            ];
            if poll(&mut fds, PollTimeout::from(5000u16))? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "nothing happened for 5 s",
                ));
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), ready(&fds[1]))
        };
        if mover_ready {
            wakeups += 1;
            mover.wait(Some(Duration::ZERO), &mut done)?;
            for c in done.drain(..) {
                if let Some(e) = c.error {
                    return Err(e.error);
                }
                written += c.written;
            }
        }
        if sock_ready {
            loop {
                match theirs.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => received += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
        }
    }
    println!(
        "{} MiB written by the Mover, {} MiB read by the loop, {wakeups} wake-ups for the Mover's fd",
        written >> 20,
        received >> 20
    );
    Ok(())
}
