//! Send a file or a byte stream to a stream socket.
//!
//! On Linux, regular files go with `sendfile(2)` (no copy through user
//! space); other sources (stdin, pipes, `/proc` files that refuse
//! `sendfile`), and every source on other Unix, with `read(2)`/`write(2)`
//! through a 64 KiB buffer.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::TcpStream;

use crate::sys::retry;

/// Bytes per `sendfile(2)` call, so progress is reported at least this often.
#[cfg(target_os = "linux")]
const SENDFILE_CHUNK: usize = 8 << 20;
/// The copy buffer for sources `sendfile(2)` cannot read.
const COPY_BUF: usize = 64 * 1024;

/// How the bytes went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendPath {
    /// `sendfile(2)` (Linux).
    Sendfile,
    /// `read(2)` then `write(2)`.
    Copy,
}

/// Sends `file` from its current position to its end. `progress` gets the
/// running total after each call. Returns the total and the path used:
/// `sendfile(2)` on Linux where the file allows it, else a copy.
pub fn send_file(
    file: &mut File,
    socket: &mut TcpStream,
    progress: &mut dyn FnMut(u64),
) -> io::Result<(u64, SendPath)> {
    match sendfile_all(file, socket, progress)? {
        Some(total) => Ok((total, SendPath::Sendfile)),
        None => send_stream(file, socket, progress).map(|n| (n, SendPath::Copy)),
    }
}

/// `sendfile(2)` until end of file. `None` when the file refuses it before
/// the first byte (the caller copies instead).
#[cfg(target_os = "linux")]
fn sendfile_all(
    file: &File,
    socket: &TcpStream,
    progress: &mut dyn FnMut(u64),
) -> io::Result<Option<u64>> {
    use std::os::fd::AsFd;
    let mut total = 0u64;
    loop {
        let sent =
            retry(|| crate::sys::splice::sendfile(socket.as_fd(), file.as_fd(), SENDFILE_CHUNK));
        match sent {
            Ok(0) => return Ok(Some(total)),
            Ok(n) => {
                total += n as u64;
                progress(total);
            }
            // Nothing sent yet and the source cannot be sendfile'd.
            Err(e)
                if total == 0 && matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e),
        }
    }
}

/// The BSDs' and macOS's `sendfile(2)` differ from Linux's and from each
/// other: every file is copied.
#[cfg(not(target_os = "linux"))]
fn sendfile_all(
    _file: &File,
    _socket: &TcpStream,
    _progress: &mut dyn FnMut(u64),
) -> io::Result<Option<u64>> {
    Ok(None)
}

/// Copies `reader` to `socket` until end of input through a 64 KiB buffer.
pub fn send_stream(
    reader: &mut dyn Read,
    socket: &mut TcpStream,
    progress: &mut dyn FnMut(u64),
) -> io::Result<u64> {
    let mut buf = vec![0u8; COPY_BUF];
    let mut total = 0u64;
    loop {
        let n = retry(|| reader.read(&mut buf))?;
        if n == 0 {
            return Ok(total);
        }
        // Finishes partial writes and retries EINTR.
        socket.write_all(&buf[..n])?;
        total += n as u64;
        progress(total);
    }
}
