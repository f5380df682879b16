//! Waking a receiver's `wait` from another thread: an eventfd (a pipe off
//! Linux) that the engine watches like a socket.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
#[cfg(not(target_os = "linux"))]
use std::os::fd::{AsRawFd, OwnedFd};

/// The fd behind a [`Waker`](super::Waker).
#[derive(Debug)]
pub(crate) struct WakeFd {
    #[cfg(target_os = "linux")]
    efd: nix::sys::eventfd::EventFd,
    #[cfg(not(target_os = "linux"))]
    rd: OwnedFd,
    #[cfg(not(target_os = "linux"))]
    wr: OwnedFd,
}

impl WakeFd {
    pub(crate) fn new() -> io::Result<WakeFd> {
        #[cfg(target_os = "linux")]
        {
            use nix::sys::eventfd::{EfdFlags, EventFd};
            let efd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
            Ok(WakeFd { efd })
        }
        #[cfg(not(target_os = "linux"))]
        {
            use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
            let (rd, wr) = nix::unistd::pipe()?;
            for fd in [&rd, &wr] {
                fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
                fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
            }
            Ok(WakeFd { rd, wr })
        }
    }

    /// Makes the fd readable. A full counter (or pipe) is already readable.
    pub(crate) fn wake(&self) -> io::Result<()> {
        #[cfg(target_os = "linux")]
        let r = self.efd.write(1).map(drop);
        #[cfg(not(target_os = "linux"))]
        let r = nix::unistd::write(&self.wr, &[1]).map(drop);
        match r {
            Err(nix::errno::Errno::EAGAIN) => Ok(()),
            other => other.map_err(io::Error::from),
        }
    }

    /// Makes the fd unreadable again.
    pub(crate) fn drain(&self) {
        #[cfg(target_os = "linux")]
        let _ = self.efd.read();
        #[cfg(not(target_os = "linux"))]
        while matches!(nix::unistd::read(self.rd.as_raw_fd(), &mut [0u8; 64]), Ok(n) if n > 0) {}
    }
}

impl AsFd for WakeFd {
    /// The end to watch for readability.
    fn as_fd(&self) -> BorrowedFd<'_> {
        #[cfg(target_os = "linux")]
        return self.efd.as_fd();
        #[cfg(not(target_os = "linux"))]
        return self.rd.as_fd();
    }
}
