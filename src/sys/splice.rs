//! `splice(2)` and `sendfile(2)`: moving bytes without a trip through user
//! space. Thin over nix, which holds the `unsafe`; these keep the crate's
//! `io::Result` and argument order.

use std::io;
use std::os::fd::BorrowedFd;

/// `splice(fd_in, NULL, fd_out, off_out, len, flags)`: moves up to `len`
/// bytes from `fd_in` to `fd_out`, one of which must be a pipe. With
/// `off_out`, writes at that offset and advances it (the file position is
/// left alone). Returns the count moved; 0 is end of input.
///
/// # References
/// - [`splice(2)`](https://man7.org/linux/man-pages/man2/splice.2.html)
pub(crate) fn splice(
    fd_in: BorrowedFd<'_>,
    fd_out: BorrowedFd<'_>,
    off_out: Option<&mut i64>,
    len: usize,
    flags: u32,
) -> io::Result<usize> {
    use nix::fcntl::SpliceFFlags;
    // Unknown bits are passed through, as the raw call did.
    let flags = SpliceFFlags::from_bits_retain(flags);
    Ok(nix::fcntl::splice(
        fd_in, None, fd_out, off_out, len, flags,
    )?)
}

/// `sendfile(out_fd, in_fd, NULL, count)`: sends up to `count` bytes of
/// `in_fd` from its file position to `out_fd`, advancing the position.
///
/// # References
/// - [`sendfile(2)`](https://man7.org/linux/man-pages/man2/sendfile.2.html)
pub(crate) fn sendfile(
    out_fd: BorrowedFd<'_>,
    in_fd: BorrowedFd<'_>,
    count: usize,
) -> io::Result<usize> {
    Ok(nix::sys::sendfile::sendfile(out_fd, in_fd, None, count)?)
}
