//! The blocking helper: Go's `net.Buffers.WriteTo` for one fd.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use crate::outbox::{Outbox, IOV_MAX};
use crate::sys::net::{self, FdKind};

/// Writes everything queued in `outbox` to `fd` with `writev`/`sendmsg`
/// (at most [`IOV_MAX`] buffers a call), resuming partial writes at the exact
/// byte, retrying `EINTR`, and waiting with poll(2) if `fd` is non-blocking.
/// Returns the bytes written. On error the outbox holds exactly what was not
/// written.
///
/// ```
/// use bytes::Bytes;
/// use ringmover::outbox::{Framing, Outbox};
/// let (a, mut b) = std::os::unix::net::UnixStream::pair()?;
/// let mut bufs = Outbox::new(Framing::Stream);
/// bufs.push([Bytes::from_static(b"head "), Bytes::from_static(b"body")], None);
/// assert_eq!(ringmover::write_to(&a, &mut bufs)?, 9);
/// drop(a);
/// let mut got = String::new();
/// std::io::Read::read_to_string(&mut b, &mut got)?;
/// assert_eq!(got, "head body");
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn write_to(fd: impl AsFd, outbox: &mut Outbox) -> io::Result<u64> {
    let fd = fd.as_fd();
    // Assume a socket and learn otherwise from ENOTSOCK: classifying first
    // (fstat + getsockopt) would cost two syscalls per call, about a tenth
    // of a small write's price.
    let mut kind = FdKind::StreamSocket;
    let mut iovecs = Vec::with_capacity(IOV_MAX.min(64));
    let mut total = 0u64;
    while !outbox.is_empty() {
        outbox.seal();
        let batch = outbox.fill_iovecs(&mut iovecs, IOV_MAX);
        match net::write_iovecs(fd.as_raw_fd(), kind, &iovecs, batch.dest) {
            Ok(n) => {
                outbox.advance(n);
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => net::wait_writable(fd)?,
            Err(e) if kind.is_socket() && e.raw_os_error() == Some(libc::ENOTSOCK) => {
                kind = FdKind::Other;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(total)
}
