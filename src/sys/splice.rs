//! `splice(2)` and `sendfile(2)`: moving bytes without a trip through user
//! space.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use super::cvt;

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
    let off_ptr = match off_out {
        Some(off) => off as *mut i64,
        None => std::ptr::null_mut(),
    };
    // SAFETY: both fds are borrowed, so open for the call; `off_ptr` is
    // null or points to an i64 that outlives the call; no buffer is passed.
    let n = cvt(unsafe {
        libc::splice(
            fd_in.as_raw_fd(),
            std::ptr::null_mut(),
            fd_out.as_raw_fd(),
            off_ptr,
            len,
            flags,
        )
    })?;
    Ok(n as usize)
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
    // SAFETY: both fds are borrowed, so open for the call; a null offset
    // pointer means "use and advance the file position".
    let n = cvt(unsafe {
        libc::sendfile(
            out_fd.as_raw_fd(),
            in_fd.as_raw_fd(),
            std::ptr::null_mut(),
            count,
        )
    })?;
    Ok(n as usize)
}
