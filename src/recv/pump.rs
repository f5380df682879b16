//! Moving one connection's bytes once its socket is readable: whatever its
//! stream needs next (detection, a frame header, payload, the end), with
//! non-blocking syscalls in the calling thread. Every backend uses this;
//! they differ only in how payload moves ([`Mover`]): `splice(2)` through
//! pooled pipes, or `read(2)` + `pwrite(2)` through a buffer.

use std::fs::File;
use std::io;
#[cfg(target_os = "linux")]
use std::os::fd::AsFd;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Instant;

#[cfg(target_os = "linux")]
use super::direct::{self, DirectPool, WriteReq, BUF, IN_FLIGHT, MAX_IN_FLIGHT};
#[cfg(target_os = "linux")]
use super::pipe::{Pipe, PipePool};
use super::{Conn, Detected, Failure, PipeReport, Step};
use crate::sys::retry;
#[cfg(target_os = "linux")]
use crate::sys::splice::splice;
use crate::wire;

/// Steps (payload moves, header reads ...) per readiness before other
/// connections get their turn.
const TURN: usize = 32;
/// The copy buffer: poll's only path, and the others' when no pipe can be
/// made or a file refuses splice.
const COPY_BUF: usize = 64 * 1024;
/// How long one step waits for room in a full output pipe (`--out -`)
/// before it hands control back to the caller, who may have been asked to
/// stop (SIGINT): a reader that stopped reading never holds a receiver
/// for longer.
#[cfg(target_os = "linux")]
const OUTPUT_WAIT_MS: u16 = 100;

/// Where a pump left its connection.
#[derive(Debug)]
pub(crate) enum Pump {
    /// The socket had nothing more (`EAGAIN`): wait for readiness.
    Drained,
    /// The turn is over and bytes may be left: pump again soon, without
    /// waiting for readiness (an edge-triggered selector will not repeat).
    Yielded,
    /// Every `O_DIRECT` buffer this connection may use is being written:
    /// pump it again when one of its writes completes.
    Stalled,
    /// The connection is over.
    Done(Result<(), Failure>),
}

/// What one step decided.
enum Next {
    Go,
    Wait,
    Stall,
    /// Come back without waiting for readiness.
    Yield,
    End(Result<(), Failure>),
}

/// What one payload move did.
enum Moved {
    /// This many bytes went to the file.
    Bytes(usize),
    /// The peer ended the stream.
    Eof,
    /// Nothing to read now.
    WouldBlock,
    /// No `O_DIRECT` buffer free for this connection (all being written).
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    Stalled,
    /// The socket has bytes but the output pipe stayed full for
    /// [`OUTPUT_WAIT_MS`]: try again at the next wait.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    OutputFull,
    /// Failed, after this many bytes went to the file.
    Failed(usize, Failure),
}

/// How payload moves from sockets to files, shared by the connections of
/// one receiver.
#[derive(Debug)]
pub(crate) struct Mover {
    /// `None`: copy only (poll).
    #[cfg(target_os = "linux")]
    pool: Option<PipePool>,
    /// The copy buffer, allocated when first needed.
    buf: Vec<u8>,
    refused: usize,
    unspliceable: usize,
    /// `O_DIRECT` buffers and queued writes.
    #[cfg(target_os = "linux")]
    pub(crate) direct: DirectPool,
}

impl Mover {
    /// `splice(2)` through pipes of `pipe_size` (see [`PipePool::new`]).
    #[cfg(target_os = "linux")]
    pub(crate) fn splice(pipe_size: Option<usize>) -> Mover {
        Mover {
            pool: Some(PipePool::new(pipe_size)),
            buf: Vec::new(),
            refused: 0,
            unspliceable: 0,
            #[cfg(target_os = "linux")]
            direct: DirectPool::default(),
        }
    }

    /// `read(2)` and `pwrite(2)` through a 64 KiB buffer.
    pub(crate) fn copy() -> Mover {
        Mover {
            #[cfg(target_os = "linux")]
            pool: None,
            buf: vec![0; COPY_BUF],
            refused: 0,
            unspliceable: 0,
            #[cfg(target_os = "linux")]
            direct: DirectPool::default(),
        }
    }

    pub(crate) fn report(&self) -> PipeReport {
        #[cfg(target_os = "linux")]
        let pool = self.pool.as_ref().map(PipePool::report).unwrap_or_default();
        #[cfg(not(target_os = "linux"))]
        let pool = PipeReport::default();
        PipeReport {
            refused: self.refused,
            unspliceable: self.unspliceable,
            ..pool
        }
    }

    /// Moves up to `len` payload bytes from `socket` to `conn.file` at
    /// `conn.written` (the connection's counters are the caller's).
    fn payload(&mut self, conn: &mut Conn, socket: &OwnedFd, len: usize) -> Moved {
        #[cfg(target_os = "linux")]
        if conn.direct.is_some() {
            return self.direct_recv(conn, socket, len);
        }
        #[cfg(target_os = "linux")]
        if conn.splice && conn.out_pipe {
            return self.splice_direct(conn, socket, len);
        }
        #[cfg(target_os = "linux")]
        if conn.splice {
            if let Some(pool) = &mut self.pool {
                match pool.take() {
                    Ok(pipe) => return self.splice_through(conn, socket, pipe, len),
                    // Out of fds (EMFILE, ENFILE) or memory: copy this
                    // time, and try for a pipe again next time.
                    Err(_) => self.refused += 1,
                }
            }
        }
        self.copy_through(conn, socket, len)
    }

    /// `splice(socket → pipe, SPLICE_F_NONBLOCK)`, then `splice(pipe → file
    /// at offset)` for exactly the count moved.
    #[cfg(target_os = "linux")]
    fn splice_through(
        &mut self,
        conn: &mut Conn,
        socket: &OwnedFd,
        pipe: Pipe,
        len: usize,
    ) -> Moved {
        let len = len.min(pipe.cap);
        let flags = libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE;
        let n = match retry(|| splice(socket.as_fd(), pipe.wr.as_fd(), None, len, flags)) {
            Ok(n) => n,
            Err(e) => {
                self.put(pipe);
                return match e.raw_os_error() {
                    _ if e.kind() == io::ErrorKind::WouldBlock => Moved::WouldBlock,
                    // This kind of socket cannot be spliced from.
                    Some(libc::EINVAL) => {
                        self.unsplice(conn);
                        self.copy_through(conn, socket, len)
                    }
                    _ => Moved::Failed(0, Failure::from_read(e)),
                };
            }
        };
        if n == 0 {
            self.put(pipe);
            return Moved::Eof;
        }
        let mut done = 0;
        while done < n {
            let mut off = match conn.at().map(|w| offset(w + done as u64)).transpose() {
                Ok(off) => off,
                Err(e) => return Moved::Failed(done, Failure::Write(e)),
            };
            let wrote = retry(|| {
                splice(
                    pipe.rd.as_fd(),
                    conn.file.as_fd(),
                    off.as_mut(),
                    n - done,
                    libc::SPLICE_F_MOVE,
                )
            });
            match wrote {
                Ok(0) => {
                    let e = io::Error::new(
                        io::ErrorKind::WriteZero,
                        "splice to the file moved nothing",
                    );
                    // The pipe may still hold bytes: dropped, not pooled.
                    return Moved::Failed(done, Failure::Write(e));
                }
                Ok(w) => done += w,
                // This file cannot be spliced to (e.g. /dev/full): copy
                // what the pipe holds, and copy from now on.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && conn.splice => {
                    self.unsplice(conn);
                    return match self.copy_out_of(&pipe, conn, done, n - done) {
                        Ok(()) => {
                            self.put(pipe);
                            Moved::Bytes(n)
                        }
                        Err((w, e)) => Moved::Failed(done + w, Failure::Write(e)),
                    };
                }
                Err(e) => return Moved::Failed(done, Failure::Write(e)),
            }
        }
        self.put(pipe);
        Moved::Bytes(n)
    }

    /// The output is a pipe: `splice(socket → output)`, no pipe of our own
    /// and no copy. `SPLICE_F_NONBLOCK`: a full output pipe is waited for
    /// with poll(2), at most [`OUTPUT_WAIT_MS`] per step, never inside the
    /// splice, so a reader that stops reading cannot keep the caller from
    /// its next wait (and from a SIGINT) for good.
    #[cfg(target_os = "linux")]
    fn splice_direct(&mut self, conn: &mut Conn, socket: &OwnedFd, len: usize) -> Moved {
        let len = len.min(1 << 20);
        loop {
            let moved = retry(|| {
                splice(
                    socket.as_fd(),
                    conn.file.as_fd(),
                    None,
                    len,
                    libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
                )
            });
            return match moved {
                Ok(0) => Moved::Eof,
                Ok(n) => Moved::Bytes(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    match output_room(socket, &conn.file) {
                        Ok(Room::SocketEmpty) => Moved::WouldBlock,
                        Ok(Room::Made) => continue,
                        Ok(Room::Full) => Moved::OutputFull,
                        Err(e) => Moved::Failed(0, Failure::Write(e)),
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.unsplice(conn);
                    self.copy_through(conn, socket, len)
                }
                // The reader of the output pipe went away.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {
                    Moved::Failed(0, Failure::Write(e))
                }
                Err(e) => Moved::Failed(0, Failure::from_read(e)),
            };
        }
    }

    /// `O_DIRECT`: `read(2)` into the connection's aligned buffer; a full
    /// buffer is written (here, or queued for the ring).
    #[cfg(target_os = "linux")]
    fn direct_recv(&mut self, conn: &mut Conn, socket: &OwnedFd, len: usize) -> Moved {
        let token = conn.id.0;
        let Some(dc) = conn.direct.as_mut() else {
            return Moved::Stalled;
        };
        if dc.buf.is_none() {
            if self.direct.async_writes
                && (dc.in_flight >= IN_FLIGHT || self.direct.in_flight >= MAX_IN_FLIGHT)
            {
                self.direct.stalled.push(token);
                return Moved::Stalled;
            }
            dc.buf = Some(self.direct.take());
        }
        let Some(buf) = dc.buf.as_mut() else {
            return Moved::Stalled;
        };
        let want = len.min(BUF - dc.fill);
        let n = match read(socket, &mut buf.bytes_mut()[dc.fill..dc.fill + want]) {
            Ok(0) => return Moved::Eof,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Moved::WouldBlock,
            Err(e) => return Moved::Failed(0, Failure::from_read(e)),
        };
        dc.fill += n;
        if dc.fill < BUF {
            return Moved::Bytes(n);
        }
        let Some(buf) = dc.buf.take() else {
            return Moved::Bytes(n);
        };
        let at = dc.base;
        dc.base += BUF as u64;
        dc.fill = 0;
        if self.direct.async_writes {
            dc.in_flight += 1;
            self.direct.in_flight += 1;
            self.direct.pending.push(WriteReq {
                token,
                buf,
                at,
                len: BUF,
                done: 0,
            });
            return Moved::Bytes(n);
        }
        let wrote = direct::write_all(&conn.file, &mut dc.cleared, buf.bytes(), at);
        self.direct.free.push(buf);
        match wrote {
            Ok(()) => Moved::Bytes(n),
            Err((w, e)) => {
                // The file holds `at + w` bytes; the error ends the
                // connection, and `settle` cuts the file there.
                dc.fail(at + w as u64, io::Error::new(e.kind(), e.to_string()));
                Moved::Failed(n, Failure::Write(e))
            }
        }
    }

    /// `O_DIRECT`: keeps `bytes` (consumed while detecting) in the
    /// connection's buffer, ahead of the payload.
    #[cfg(target_os = "linux")]
    fn direct_hold(&mut self, conn: &mut Conn, bytes: &[u8]) {
        if let Some(dc) = conn.direct.as_mut() {
            let buf = dc.buf.get_or_insert_with(|| self.direct.take());
            buf.bytes_mut()[dc.fill..dc.fill + bytes.len()].copy_from_slice(bytes);
            dc.fill += bytes.len();
        }
    }

    #[cfg(target_os = "linux")]
    fn put(&mut self, pipe: Pipe) {
        if let Some(pool) = &mut self.pool {
            pool.put(pipe);
        }
    }

    /// Copies from now on for `conn`: its socket or file refused splice.
    #[cfg(target_os = "linux")]
    fn unsplice(&mut self, conn: &mut Conn) {
        if conn.splice {
            conn.splice = false;
            self.unspliceable += 1;
        }
    }

    /// Moves the `n` bytes in `pipe` to `conn.file` after the `done` already
    /// written there, through the buffer.
    #[cfg(target_os = "linux")]
    fn copy_out_of(
        &mut self,
        pipe: &Pipe,
        conn: &Conn,
        done: usize,
        n: usize,
    ) -> Result<(), (usize, io::Error)> {
        let buf = buffer(&mut self.buf);
        let mut moved = 0;
        while moved < n {
            let want = (n - moved).min(buf.len());
            // The pipe holds at least `want` bytes: this read cannot block.
            let got = retry(|| {
                nix::unistd::read(pipe.rd.as_raw_fd(), &mut buf[..want]).map_err(io::Error::from)
            })
            .map_err(|e| (moved, e))?;
            if got == 0 {
                let e = io::Error::new(io::ErrorKind::UnexpectedEof, "the pipe ran dry");
                return Err((moved, e));
            }
            let at = conn.at().map(|w| w + (done + moved) as u64);
            write_all_at(&conn.file, &buf[..got], at).map_err(|(w, e)| (moved + w, e))?;
            moved += got;
        }
        Ok(())
    }

    /// `read(2)` up to `len` bytes into the buffer, `pwrite(2)` them all.
    fn copy_through(&mut self, conn: &mut Conn, socket: &OwnedFd, len: usize) -> Moved {
        let buf = buffer(&mut self.buf);
        let len = len.min(buf.len());
        let got = retry(|| {
            nix::unistd::read(socket.as_raw_fd(), &mut buf[..len]).map_err(io::Error::from)
        });
        let n = match got {
            Ok(0) => return Moved::Eof,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Moved::WouldBlock,
            Err(e) => return Moved::Failed(0, Failure::from_read(e)),
        };
        match write_all_at(&conn.file, &buf[..n], conn.at()) {
            Ok(()) => Moved::Bytes(n),
            Err((w, e)) => Moved::Failed(w, Failure::Write(e)),
        }
    }
}

/// The copy buffer, allocated on first use.
fn buffer(buf: &mut Vec<u8>) -> &mut [u8] {
    if buf.is_empty() {
        buf.resize(COPY_BUF, 0);
    }
    buf
}

/// A file offset as `off_t`: past `i64::MAX` is `EFBIG`.
fn offset(at: u64) -> io::Result<i64> {
    i64::try_from(at).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))
}

/// `pwrite(2)` all of `bytes` at `at` (`write(2)` at the file's position
/// for `None`); on failure, how many were written.
fn write_all_at(file: &File, bytes: &[u8], at: Option<u64>) -> Result<(), (usize, io::Error)> {
    let mut done = 0;
    while done < bytes.len() {
        let wrote = match at {
            Some(at) => {
                let off = offset(at + done as u64).map_err(|e| (done, e))?;
                retry(|| nix::sys::uio::pwrite(file, &bytes[done..], off).map_err(io::Error::from))
            }
            None => retry(|| nix::unistd::write(file, &bytes[done..]).map_err(io::Error::from)),
        };
        match wrote {
            Ok(0) => {
                let e = io::Error::new(io::ErrorKind::WriteZero, "pwrite wrote nothing");
                return Err((done, e));
            }
            Ok(w) => done += w,
            Err(e) => return Err((done, e)),
        }
    }
    Ok(())
}

/// Why a splice into an output pipe said `EAGAIN`.
#[cfg(target_os = "linux")]
enum Room {
    /// The socket has nothing: wait for its readiness.
    SocketEmpty,
    /// The output was full and has room now (or an error to report).
    Made,
    /// The output stayed full for [`OUTPUT_WAIT_MS`].
    Full,
}

/// After `EAGAIN` from a splice into an output pipe: the socket empty, or
/// the output full (then waited for, at most [`OUTPUT_WAIT_MS`]).
#[cfg(target_os = "linux")]
fn output_room(socket: &OwnedFd, out: &File) -> io::Result<Room> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLIN)];
    if retry(|| poll(&mut fds, PollTimeout::ZERO).map_err(io::Error::from))? == 0 {
        return Ok(Room::SocketEmpty);
    }
    let mut fds = [PollFd::new(out.as_fd(), PollFlags::POLLOUT)];
    // POLLERR (the reader went away) counts as room: the splice says EPIPE.
    match retry(|| poll(&mut fds, PollTimeout::from(OUTPUT_WAIT_MS)).map_err(io::Error::from))? {
        0 => Ok(Room::Full),
        _ => Ok(Room::Made),
    }
}

/// Moves what `socket` has for `conn`, at most [`TURN`] steps.
pub(crate) fn pump(
    conn: &mut Conn,
    socket: &OwnedFd,
    mover: &mut Mover,
    max_bytes: Option<u64>,
) -> Pump {
    let quota = || Failure::Quota(max_bytes.unwrap_or(0));
    for _ in 0..TURN {
        let next = match conn.step(max_bytes) {
            Step::Detect => detect(conn, socket, mover, max_bytes),
            Step::Header(n) => read_into(conn, socket, n, Conn::header),
            Step::Payload(len) => match mover.payload(conn, socket, len) {
                Moved::Bytes(n) => {
                    conn.wrote(n as u64, Instant::now());
                    Next::Go
                }
                Moved::Eof => Next::End(conn.at_eof()),
                Moved::WouldBlock => Next::Wait,
                Moved::Stalled => Next::Stall,
                Moved::OutputFull => {
                    // The sender is not idle: its bytes wait for our reader.
                    conn.held_back(Instant::now());
                    Next::Yield
                }
                Moved::Failed(n, why) => {
                    conn.wrote(n as u64, Instant::now());
                    Next::End(Err(why))
                }
            },
            Step::ExpectEof { quota: raw } => match peek_more(socket) {
                Ok(false) => Next::End(Ok(())),
                Ok(true) if raw => Next::End(Err(quota())),
                Ok(true) => Next::End(Err(Failure::Protocol("bytes after the end marker"))),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Next::Wait,
                Err(e) => Next::End(Err(Failure::from_read(e))),
            },
            Step::OverQuota => Next::End(Err(quota())),
        };
        match next {
            Next::Go => {}
            Next::Wait => return Pump::Drained,
            Next::Stall => return Pump::Stalled,
            Next::Yield => return Pump::Yielded,
            Next::End(result) => return Pump::Done(result),
        }
    }
    Pump::Yielded
}

/// Framed or raw? Peeks at the first bytes; consumes them only while they
/// are (a prefix of) the magic.
fn detect(conn: &mut Conn, socket: &OwnedFd, mover: &mut Mover, max_bytes: Option<u64>) -> Next {
    let mut buf = [0u8; wire::MAGIC.len()];
    let want = wire::MAGIC.len() - conn.held().len();
    let n = match peek(socket, &mut buf[..want]) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Wait,
        // Not a socket (a pipe, say): nothing to peek with, so raw.
        Err(e) if e.raw_os_error() == Some(libc::ENOTSOCK) && conn.held().is_empty() => {
            conn.undetectable();
            return Next::Go;
        }
        Err(e) => return Next::End(Err(Failure::from_read(e))),
    };
    if n == 0 {
        // The stream ended: empty (raw, complete) or inside the magic.
        return Next::End(conn.at_eof());
    }
    match conn.peeked(&buf[..n]) {
        Detected::Raw { len: 0, .. } => Next::Go,
        // Rare: the first bytes began like the magic, then did not.
        Detected::Raw { held, len } => {
            let allowed = max_bytes.map_or(len, |m| len.min(usize::try_from(m).unwrap_or(len)));
            #[cfg(target_os = "linux")]
            if conn.direct.is_some() {
                mover.direct_hold(conn, &held[..allowed]);
                conn.wrote(allowed as u64, Instant::now());
                return if allowed < len {
                    Next::End(Err(Failure::Quota(max_bytes.unwrap_or(0))))
                } else {
                    Next::Go
                };
            }
            #[cfg(not(target_os = "linux"))]
            let _ = mover;
            match write_all_at(&conn.file, &held[..allowed], conn.at()) {
                Ok(()) => {
                    conn.wrote(allowed as u64, Instant::now());
                    if allowed < len {
                        Next::End(Err(Failure::Quota(max_bytes.unwrap_or(0))))
                    } else {
                        Next::Go
                    }
                }
                Err((w, e)) => {
                    conn.wrote(w as u64, Instant::now());
                    Next::End(Err(Failure::Write(e)))
                }
            }
        }
        Detected::Consume(k) => read_into(conn, socket, k, Conn::hold),
    }
}

/// Reads up to `n` (at most 8) bytes of the magic or a frame header and
/// hands them to `feed`.
fn read_into(
    conn: &mut Conn,
    socket: &OwnedFd,
    n: usize,
    feed: fn(&mut Conn, &[u8], Instant),
) -> Next {
    let mut buf = [0u8; wire::HEADER_LEN];
    match read(socket, &mut buf[..n.min(wire::HEADER_LEN)]) {
        Ok(0) => Next::End(conn.at_eof()),
        Ok(k) => {
            feed(conn, &buf[..k], Instant::now());
            Next::Go
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Next::Wait,
        Err(e) => Next::End(Err(Failure::from_read(e))),
    }
}

/// `read(2)`, `EINTR` retried.
fn read(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    retry(|| nix::unistd::read(fd.as_raw_fd(), buf).map_err(io::Error::from))
}

/// `recv(fd, buf, MSG_PEEK | MSG_DONTWAIT)`: the bytes waiting, left there.
fn peek(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    use nix::sys::socket::{recv, MsgFlags};
    retry(|| {
        recv(
            fd.as_raw_fd(),
            buf,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        )
        .map_err(io::Error::from)
    })
}

/// Whether the peer sent more (`Ok(true)`), ended the stream
/// (`Ok(false)`), or nothing is there yet (`WouldBlock`).
fn peek_more(fd: &OwnedFd) -> io::Result<bool> {
    peek(fd, &mut [0u8; 1]).map(|n| n > 0)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use crate::recv::ConnId;
    use std::io::{Read, Seek, Write};
    use std::os::unix::net::UnixStream;

    /// Pumps `data` (then the end of stream) from a socket pair into a
    /// temporary file with `mover`; returns the outcome and the file.
    fn pump_all(mover: &mut Mover, data: &[u8]) -> (Result<(), Failure>, Vec<u8>) {
        let (mut tx, rx) = UnixStream::pair().unwrap();
        rx.set_nonblocking(true).unwrap();
        let path = std::env::temp_dir().join(format!("ringmover-pump-{}", std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        let mut conn = Conn::new(ConnId(1), "127.0.0.1:1".parse().unwrap(), file, false);
        let socket = OwnedFd::from(rx);
        let writer = {
            let data = data.to_vec();
            std::thread::spawn(move || {
                tx.write_all(&data).unwrap();
            })
        };
        let result = loop {
            match pump(&mut conn, &socket, mover, None) {
                Pump::Done(r) => break r,
                Pump::Drained | Pump::Stalled => {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
                Pump::Yielded => {}
            }
        };
        writer.join().unwrap();
        let mut got = Vec::new();
        conn.file.rewind().unwrap();
        conn.file.read_to_end(&mut got).unwrap();
        (result, got)
    }

    #[test]
    fn no_pipe_means_a_copy_not_a_failure() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut mover = Mover::splice(None);
        if let Some(pool) = &mut mover.pool {
            pool.exhausted = true;
        }
        let (result, got) = pump_all(&mut mover, &data);
        assert!(result.is_ok(), "{result:?}");
        assert!(got == data, "{} bytes of {}", got.len(), data.len());
        let report = mover.report();
        assert!(report.refused > 0, "{report:?}");
        assert_eq!(report.created, 0);
        // Pipes again once they can be made.
        if let Some(pool) = &mut mover.pool {
            pool.exhausted = false;
        }
        let (result, got) = pump_all(&mut mover, &data);
        assert!(result.is_ok() && got == data, "{result:?}");
        assert_eq!(mover.report().created, 1);
    }
}
