//! Send a file or a byte stream to a stream socket, framed for
//! `ringmover recv` ([`crate::wire`]) or raw.
//!
//! On Linux, regular files go with `sendfile(2)` (no copy through user
//! space); other sources (stdin, pipes, devices, `/proc` files that report
//! size 0 or refuse `sendfile`), and every source on other Unix, with
//! `read(2)`/`write(2)` through a 64 KiB buffer.
//!
//! A [`Sender`] writes the magic when framed, then each source, then
//! [`Sender::finish`] writes the end marker, shuts down its side and waits
//! for the peer to close: only a clean close after every byte is success.
//! On any error the caller should [`reset_on_close`] before dropping the
//! socket, so the receiver sees a reset rather than a FIN that could pass
//! for a clean end.

use std::fs::File;
use std::io::{self, IoSlice, Read, Seek, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use crate::wire;

/// Payload bytes per frame for regular files (one `sendfile(2)` loop per
/// frame), so progress is reported at least this often.
pub const FILE_FRAME: u64 = 8 << 20;
/// The copy buffer for sources `sendfile(2)` cannot read; also the largest
/// frame sent from such a source (one frame per read).
const COPY_BUF: usize = 64 * 1024;

/// How the bytes went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendPath {
    /// `sendfile(2)` (Linux).
    Sendfile,
    /// `read(2)` then `write(2)`.
    Copy,
}

/// What goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// [`crate::wire`]: magic, length-prefixed frames, end marker. A
    /// receiver can tell an interrupted transfer from a complete one.
    Framed,
    /// The bytes alone (for `nc`, `socat` and other plain receivers).
    Raw,
}

/// Sends sources over one connection in one [`Format`].
#[derive(Debug)]
pub struct Sender<'a> {
    socket: &'a TcpStream,
    format: Format,
    sent: u64,
}

impl<'a> Sender<'a> {
    /// Starts a transfer on `socket` (writing the magic when framed).
    ///
    /// `idle`: fail with [`io::ErrorKind::TimedOut`] when the peer takes no
    /// byte for this long, or has not closed this long after the last one
    /// (`SO_SNDTIMEO`/`SO_RCVTIMEO`; the socket must be blocking).
    pub fn new(
        socket: &'a TcpStream,
        format: Format,
        idle: Option<Duration>,
    ) -> io::Result<Sender<'a>> {
        socket.set_write_timeout(idle)?;
        socket.set_read_timeout(idle)?;
        let mut sender = Sender {
            socket,
            format,
            sent: 0,
        };
        if format == Format::Framed {
            sender.write_all(&wire::MAGIC)?;
        }
        Ok(sender)
    }

    /// Payload bytes sent so far (framing not counted).
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Sends `file` from its current position to its end. `progress` gets
    /// the running total after each call. Framed, each frame's length is
    /// declared before its bytes; a file that turns out shorter than its
    /// size said fails with [`io::ErrorKind::UnexpectedEof`].
    pub fn file(&mut self, file: &File, progress: &mut dyn FnMut(u64)) -> io::Result<SendPath> {
        let meta = file.metadata()?;
        // Size 0 also covers /proc and /sys files, whose size says nothing.
        if !meta.is_file() || meta.len() == 0 {
            self.stream(&mut &*file, progress)?;
            return Ok(SendPath::Copy);
        }
        match self.format {
            Format::Raw => self.file_raw(file, meta.len(), progress),
            Format::Framed => self.file_framed(file, meta.len(), progress),
        }
    }

    /// Raw has no frame to declare, but the size at the start is still a
    /// promise: a file that ends short of it was cut while being sent, and
    /// a clean close would pass the prefix off as the whole file.
    fn file_raw(
        &mut self,
        file: &File,
        size: u64,
        progress: &mut dyn FnMut(u64),
    ) -> io::Result<SendPath> {
        let first = self.sent;
        let want = size.saturating_sub((&*file).stream_position()?);
        loop {
            match self.sendfile(file, usize::MAX) {
                Ok(0) if self.sent - first < want => {
                    let left = want - (self.sent - first);
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "the file shrank while being sent: it ended {left} bytes short \
                             of the {size} bytes its size promised"
                        ),
                    ));
                }
                Ok(0) => return Ok(SendPath::Sendfile),
                Ok(_) => progress(self.sent),
                // Nothing sent yet and the source cannot be sendfile'd.
                Err(e) if self.sent == first && refuses_sendfile(&e) => {
                    self.stream(&mut &*file, progress)?;
                    return Ok(SendPath::Copy);
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn file_framed(
        &mut self,
        file: &File,
        mut size: u64,
        progress: &mut dyn FnMut(u64),
    ) -> io::Result<SendPath> {
        let mut pos = (&*file).stream_position()?;
        let mut path = SendPath::Sendfile;
        let first = self.sent;
        loop {
            if pos >= size {
                // It may have grown since: send that too, as raw would.
                size = file.metadata()?.len();
                if pos >= size {
                    return Ok(path);
                }
            }
            let len = (size - pos).min(FILE_FRAME);
            self.write_all(&wire::frame_header(len))?;
            let mut left = len;
            while left > 0 {
                let n = match path {
                    SendPath::Sendfile => match self.sendfile(file, usize_of(left)) {
                        Err(e) if self.sent == first && refuses_sendfile(&e) => {
                            // The frame is declared: copy its bytes instead.
                            path = SendPath::Copy;
                            continue;
                        }
                        other => other?,
                    },
                    SendPath::Copy => self.copy_some(file, left)?,
                };
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "the file shrank while being sent: it ended {left} bytes short \
                             of the {len}-byte frame its size promised"
                        ),
                    ));
                }
                left -= n as u64;
                progress(self.sent);
            }
            pos += len;
        }
    }

    /// Copies `reader` to the socket until end of input: framed, one frame
    /// per read, header and bytes in one `writev(2)`.
    pub fn stream(
        &mut self,
        reader: &mut dyn Read,
        progress: &mut dyn FnMut(u64),
    ) -> io::Result<()> {
        let mut buf = vec![0u8; COPY_BUF];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            match self.format {
                Format::Raw => self.write_all(&buf[..n])?,
                Format::Framed => {
                    self.write_all_framed(&wire::frame_header(n as u64), &buf[..n])?
                }
            }
            self.sent += n as u64;
            progress(self.sent);
        }
    }

    /// Ends the transfer: the end marker when framed, then `shutdown(2)` of
    /// the write side, then reads until the peer closes. Bytes the peer
    /// sends meanwhile are discarded. A reset (`ECONNRESET`) here means the
    /// peer did not take everything; returns the payload total otherwise.
    pub fn finish(mut self) -> io::Result<u64> {
        if self.format == Format::Framed {
            self.write_all(&wire::END)?;
        }
        self.socket.shutdown(Shutdown::Write)?;
        let mut buf = [0u8; 4096];
        loop {
            match self.socket.read(&mut buf) {
                Ok(0) => return Ok(self.sent),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(timed_out(e, "the receiver did not close the connection")),
            }
        }
    }

    /// Reads up to `max` bytes of `file` and writes them all (the fallback
    /// for a declared frame when `sendfile(2)` is refused).
    fn copy_some(&mut self, file: &File, max: u64) -> io::Result<usize> {
        let mut buf = vec![0u8; COPY_BUF.min(usize_of(max))];
        let n = loop {
            match (&*file).read(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => break other?,
            }
        };
        self.write_all(&buf[..n])?;
        self.sent += n as u64;
        Ok(n)
    }

    /// One `sendfile(2)` of at most `max` bytes from the file's position.
    #[cfg(target_os = "linux")]
    fn sendfile(&mut self, file: &File, max: usize) -> io::Result<usize> {
        use std::os::fd::AsFd;
        // Keep each call short enough for progress reports.
        let max = max.min(usize_of(FILE_FRAME));
        let n = crate::sys::retry(|| {
            crate::sys::splice::sendfile(self.socket.as_fd(), file.as_fd(), max)
        })
        .map_err(|e| timed_out(e, "the receiver took no bytes"))?;
        self.sent += n as u64;
        Ok(n)
    }

    /// The BSDs' and macOS's `sendfile(2)` differ from Linux's and from
    /// each other: every file is copied.
    #[cfg(not(target_os = "linux"))]
    fn sendfile(&mut self, _file: &File, _max: usize) -> io::Result<usize> {
        Err(io::Error::from_raw_os_error(libc::ENOSYS))
    }

    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        // Finishes partial writes and retries EINTR.
        self.socket
            .write_all(bytes)
            .map_err(|e| timed_out(e, "the receiver took no bytes"))
    }

    /// Writes `header` then `body` with as few `writev(2)` calls as the
    /// socket allows.
    fn write_all_framed(&mut self, header: &[u8], body: &[u8]) -> io::Result<()> {
        let total = header.len() + body.len();
        let mut done = 0;
        while done < total {
            let n = if done < header.len() {
                let iov = [IoSlice::new(&header[done..]), IoSlice::new(body)];
                self.socket.write_vectored(&iov)
            } else {
                self.socket.write(&body[done - header.len()..])
            };
            match n {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(timed_out(e, "the receiver took no bytes")),
            }
        }
        Ok(())
    }
}

/// Makes closing `socket` send a reset (`SO_LINGER` with a zero timeout)
/// instead of a FIN, so the peer cannot take an aborted transfer for a
/// finished one.
pub fn reset_on_close(socket: &TcpStream) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt::Linger};
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(socket, Linger, &linger).map_err(io::Error::from)
}

/// `SO_SNDTIMEO`/`SO_RCVTIMEO` expiring shows as `EAGAIN` on a blocking
/// socket: name it for what it is.
fn timed_out(e: io::Error, what: &str) -> io::Error {
    if e.kind() == io::ErrorKind::WouldBlock {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{what} within the idle timeout"),
        )
    } else {
        e
    }
}

/// `EINVAL`/`ENOSYS`: this source cannot be read with `sendfile(2)`.
fn refuses_sendfile(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS))
}

fn usize_of(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}
