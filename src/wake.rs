//! Waking a thread that sleeps in [`Mover::wait`](crate::Mover::wait) from
//! any other thread.
//!
//! A [`Waker`] is an eventfd (a non-blocking pipe off Linux) that the engine
//! watches next to its sockets: the io_uring leaf with a (multishot, where
//! the kernel has it: 5.13) `POLL_ADD`, epoll and poll by registering it.
//! Writing it ends the owner's wait early. It carries no data: whoever
//! wakes the owner hands it work through a queue of its own (see
//! [`crate::shard`]) and, to keep wake-ups cheap, writes the eventfd only
//! when the owner may be asleep.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;

/// Ends a [`Mover::wait`](crate::Mover::wait) early, from any thread.
///
/// Cheap to clone (`Send + Sync`). A wake with nobody waiting is kept until
/// the next wait, which then returns at once; several wakes before that
/// wait count as one.
///
/// ```no_run
/// use ringmover::Mover;
/// # fn main() -> std::io::Result<()> {
/// let mut mover = Mover::builder().build()?;
/// let waker = mover.waker()?;
/// std::thread::spawn(move || waker.wake());
/// let mut done = Vec::new();
/// // Nothing in flight: sleeps in the kernel until woken.
/// mover.wait(None, &mut done)?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Waker {
    fd: Arc<WakeFd>,
}

#[derive(Debug)]
struct WakeFd {
    #[cfg(target_os = "linux")]
    efd: nix::sys::eventfd::EventFd,
    #[cfg(not(target_os = "linux"))]
    read: std::os::fd::OwnedFd,
    #[cfg(not(target_os = "linux"))]
    write: std::os::fd::OwnedFd,
}

impl Waker {
    /// A new, unsignalled waker.
    pub(crate) fn new() -> io::Result<Waker> {
        Ok(Waker {
            fd: Arc::new(WakeFd::new()?),
        })
    }

    /// Wakes the engine watching this waker: its current or next
    /// [`Mover::wait`](crate::Mover::wait) returns. One `write(2)`.
    pub fn wake(&self) -> io::Result<()> {
        self.fd.signal()
    }

    /// The fd the engine watches for readability.
    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.raw_fd()
    }

    /// Consumes pending wakes, so the fd stops polling readable.
    pub(crate) fn reset(&self) {
        self.fd.reset();
    }

    /// The fd that polls readable while a wake is pending.
    pub(crate) fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(target_os = "linux")]
impl WakeFd {
    fn new() -> io::Result<WakeFd> {
        use nix::sys::eventfd::{EfdFlags, EventFd};
        let efd = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        Ok(WakeFd { efd })
    }

    fn signal(&self) -> io::Result<()> {
        match self.efd.write(1) {
            // EAGAIN: the counter is saturated, so a wake is pending anyway.
            Ok(_) | Err(nix::errno::Errno::EAGAIN) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn raw_fd(&self) -> RawFd {
        self.efd.as_raw_fd()
    }

    fn as_fd(&self) -> BorrowedFd<'_> {
        self.efd.as_fd()
    }

    fn reset(&self) {
        // EAGAIN: already reset. One read zeroes the counter.
        let _ = self.efd.read();
    }
}

#[cfg(not(target_os = "linux"))]
impl WakeFd {
    fn new() -> io::Result<WakeFd> {
        use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
        let (read, write) = nix::unistd::pipe()?;
        for fd in [&read, &write] {
            fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
            fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
        }
        Ok(WakeFd { read, write })
    }

    fn signal(&self) -> io::Result<()> {
        match nix::unistd::write(&self.write, &[1]) {
            // EAGAIN: the pipe is full of wakes already.
            Ok(_) | Err(nix::errno::Errno::EAGAIN) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn raw_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    fn as_fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    fn reset(&self) {
        let mut buf = [0u8; 64];
        while matches!(nix::unistd::read(self.read.as_raw_fd(), &mut buf), Ok(n) if n > 0) {}
    }
}
