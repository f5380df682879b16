//! Non-blocking vectored writes for the readiness backends, and the fd
//! classification every backend shares.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use super::{cvt, retry};

/// How an attached fd is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FdKind {
    /// A stream socket (TCP, Unix stream): `sendmsg` with `MSG_NOSIGNAL`.
    StreamSocket,
    /// A datagram or seqpacket socket: one `sendmsg` per message.
    DatagramSocket,
    /// A regular file: `writev` at the file position; never "not ready".
    File,
    /// Anything else (pipe, tty, char device): `writev`.
    Other,
}

impl FdKind {
    /// Sockets are written with `sendmsg`, everything else with `writev`.
    pub(crate) fn is_socket(self) -> bool {
        matches!(self, FdKind::StreamSocket | FdKind::DatagramSocket)
    }
}

/// Classifies `fd` with `fstat(2)` and, for sockets, `SO_TYPE`.
pub(crate) fn classify(fd: BorrowedFd<'_>) -> io::Result<FdKind> {
    use nix::sys::stat::{fstat, SFlag};
    let st = fstat(fd.as_raw_fd()).map_err(io::Error::from)?;
    let fmt = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
    if fmt == SFlag::S_IFREG {
        return Ok(FdKind::File);
    }
    if fmt != SFlag::S_IFSOCK {
        return Ok(FdKind::Other);
    }
    let ty = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::SockType)
        .map_err(io::Error::from)?;
    Ok(match ty {
        nix::sys::socket::SockType::Stream => FdKind::StreamSocket,
        _ => FdKind::DatagramSocket,
    })
}

/// `sendmsg(fd, msg, flags)`, retried on `EINTR`.
///
/// # Safety
/// `msg` and every iovec and name it points at must be valid for reads for
/// the duration of the call.
pub(crate) unsafe fn sendmsg(fd: RawFd, msg: *const libc::msghdr, flags: i32) -> io::Result<usize> {
    // SAFETY: the caller guarantees `msg` and what it points at are valid.
    retry(|| cvt(unsafe { libc::sendmsg(fd, msg, flags) })).map(|n| n as usize)
}

/// `writev(fd, iov, iovcnt)`, retried on `EINTR`.
///
/// # Safety
/// Every iovec in `iov` must point at memory valid for reads for the
/// duration of the call.
pub(crate) unsafe fn writev(fd: RawFd, iov: &[libc::iovec]) -> io::Result<usize> {
    let cnt = iov.len().min(libc::c_int::MAX as usize) as libc::c_int;
    // SAFETY: `iov` is a live slice of `cnt` iovecs; the caller guarantees
    // the memory they describe.
    retry(|| cvt(unsafe { libc::writev(fd, iov.as_ptr(), cnt) })).map(|n| n as usize)
}

/// One vectored write of `iov` to `fd`: `sendmsg` (with `MSG_NOSIGNAL`, and
/// `dest` as the address) for sockets, `writev` otherwise. The iovecs borrow
/// from an `Outbox` the caller holds across the call.
pub(crate) fn write_iovecs(
    fd: RawFd,
    kind: FdKind,
    iov: &[libc::iovec],
    dest: Option<std::net::SocketAddr>,
) -> io::Result<usize> {
    use nix::sys::socket::{SockaddrLike, SockaddrStorage};
    if !kind.is_socket() {
        // SAFETY: the iovecs point into Bytes held by the caller's outbox,
        // which is borrowed for this whole call.
        return unsafe { writev(fd, iov) };
    }
    let addr = dest.map(SockaddrStorage::from);
    // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len() as _;
    if let Some(a) = &addr {
        msg.msg_name = a.as_ptr() as *mut libc::c_void;
        msg.msg_namelen = a.len();
    }
    // SAFETY: `msg` points at `iov` and `addr`, both alive for the call, and
    // the iovecs at Bytes the caller's outbox holds.
    unsafe { sendmsg(fd, &msg, libc::MSG_NOSIGNAL) }
}

/// Sets `O_NONBLOCK` on `fd`'s open file description (shared with every
/// dup of it and every process holding it), if not set already.
pub(crate) fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    if !flags.contains(OFlag::O_NONBLOCK) {
        fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    }
    Ok(())
}

/// Blocks in poll(2) until `fd` is writable (or has an error to report).
pub(crate) fn wait_writable(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one live pollfd.
    retry(|| cvt(unsafe { libc::poll(&mut pfd, 1, -1) }))?;
    Ok(())
}

/// `SOL_UDP` option and cmsg type of UDP GSO (Linux 4.18): the segment
/// size. (libc defines it only for some Linux targets.)
#[cfg(target_os = "linux")]
pub(crate) const UDP_SEGMENT: libc::c_int = 103;

/// Whether UDP socket `fd` takes `UDP_SEGMENT` (quinn-udp's probe): set it,
/// then reset it to 0, since the size goes with each send as a cmsg. False
/// for anything but a UDP socket on a kernel with GSO, and off Linux.
pub(crate) fn probe_gso(fd: BorrowedFd<'_>) -> bool {
    #[cfg(target_os = "linux")]
    {
        let set = |size: libc::c_int| {
            // SAFETY: `size` is a live c_int and its length is passed with it.
            let rc = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_UDP,
                    UDP_SEGMENT,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            rc == 0
        };
        set(1200) && set(0)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = fd;
        false
    }
}
