//! `O_DIRECT` output ([`RecvOptions::direct`](super::RecvOptions::direct)):
//! payload is received into page-aligned buffers and written from them in
//! aligned blocks, bypassing the page cache. Linux only.
//!
//! Each connection fills one buffer at a time ([`BUF`] bytes) at a file
//! offset that is a multiple of [`BUF`]. A full buffer is written:
//! - synchronously with `pwrite(2)` (epoll, poll), then filled again;
//! - or, on the uring backend, queued as an asynchronous `WRITE_FIXED`
//!   (`WRITE` for buffers that are not registered) while the connection
//!   fills the next buffer: up to [`IN_FLIGHT`] writes per connection, so
//!   the network and the disk overlap.
//!
//! When the connection ends, whatever it holds is written: the aligned part
//! with `O_DIRECT`, then `O_DIRECT` is cleared (`fcntl`) and the last
//! partial block is written through the page cache, so the file has
//! exactly the bytes received, never padding. A file system that refuses
//! `O_DIRECT` (`EINVAL` from `fcntl`, e.g. ramfs) is written through the
//! page cache as usual, and [`Finished::direct`](super::Finished::direct)
//! says so.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::sys::retry;

/// Alignment of buffers, offsets and lengths: 4096 covers the logical block
/// size of the usual disks (512 or 4096 bytes).
pub(crate) const BLOCK: usize = 4096;
/// One buffer: what a connection fills before it is written.
pub(crate) const BUF: usize = 512 * 1024;
/// Asynchronous writes in flight per connection (uring).
pub(crate) const IN_FLIGHT: usize = 4;
/// Asynchronous writes in flight per receiver (16 MiB): with many
/// connections and a slow disk, memory stays bounded by this plus one
/// filling buffer per connection.
pub(crate) const MAX_IN_FLIGHT: usize = 32;
/// Buffers registered with the ring (`IORING_REGISTER_BUFFERS`), tried
/// from this many down: registered pages count against `RLIMIT_MEMLOCK`
/// (8 MiB by default), shared by every ring of the user.
pub(crate) const REGISTERED: usize = 8;

/// A page-aligned buffer of [`BUF`] bytes inside a heap allocation (which
/// never moves while the `Buf` is moved around).
#[derive(Debug)]
pub(crate) struct Buf {
    mem: Vec<u8>,
    start: usize,
    /// Index in the ring's registered buffers, if registered.
    pub(crate) fixed: Option<u16>,
}

impl Buf {
    pub(crate) fn new() -> Buf {
        let mem = vec![0u8; BUF + BLOCK];
        let start = mem.as_ptr().align_offset(BLOCK);
        Buf {
            mem,
            start,
            fixed: None,
        }
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.mem[self.start..self.start + BUF]
    }

    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.mem[self.start..self.start + BUF]
    }
}

/// A full (or final) buffer to write at `at`.
#[derive(Debug)]
pub(crate) struct WriteReq {
    /// The connection's token.
    pub(crate) token: u64,
    pub(crate) buf: Buf,
    pub(crate) at: u64,
    pub(crate) len: usize,
    /// Bytes of it already written (a short write is continued).
    pub(crate) done: usize,
}

/// The aligned buffers of one receiver, and the writes waiting to be
/// queued on the ring.
#[derive(Debug, Default)]
pub(crate) struct DirectPool {
    pub(crate) free: Vec<Buf>,
    /// Full buffers are written asynchronously by the engine (uring), not
    /// here.
    pub(crate) async_writes: bool,
    pub(crate) pending: Vec<WriteReq>,
    /// Writes queued or in flight, all connections.
    pub(crate) in_flight: usize,
    /// Connections waiting for a write to complete (any of them) before
    /// they may fill another buffer.
    pub(crate) stalled: Vec<u64>,
    /// Files that refused `O_DIRECT`.
    pub(crate) refused: usize,
    /// Buffers registered with the ring.
    pub(crate) registered: usize,
}

impl DirectPool {
    pub(crate) fn take(&mut self) -> Buf {
        self.free.pop().unwrap_or_else(Buf::new)
    }
}

/// A connection's `O_DIRECT` state.
#[derive(Debug, Default)]
pub(crate) struct DirectConn {
    /// The buffer being filled, from file offset `base`.
    pub(crate) buf: Option<Buf>,
    pub(crate) fill: usize,
    pub(crate) base: u64,
    /// Asynchronous writes in flight.
    pub(crate) in_flight: usize,
    /// The lowest offset whose write failed, and why.
    pub(crate) failed: Option<(u64, io::Error)>,
    /// `O_DIRECT` was cleared (a write refused alignment): the rest goes
    /// through the page cache.
    pub(crate) cleared: bool,
}

impl DirectConn {
    /// Records a failed write at `at` (the lowest one is kept).
    pub(crate) fn fail(&mut self, at: u64, e: io::Error) {
        if self.failed.as_ref().is_none_or(|(f, _)| at < *f) {
            self.failed = Some((at, e));
        }
    }
}

/// Sets `O_DIRECT` on `file`.
pub(crate) fn set(file: &File) -> io::Result<()> {
    flags(file, |f| f | libc::O_DIRECT)
}

/// Clears `O_DIRECT` on `file`.
pub(crate) fn clear(file: &File) -> io::Result<()> {
    flags(file, |f| f & !libc::O_DIRECT)
}

fn flags(file: &File, change: impl Fn(i32) -> i32) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let fd = file.as_raw_fd();
    let now = fcntl(fd, FcntlArg::F_GETFL)?;
    fcntl(fd, FcntlArg::F_SETFL(OFlag::from_bits_retain(change(now))))?;
    Ok(())
}

/// `pwrite(2)` all of `bytes` at `at`. An `EINVAL` (the file system wants
/// another alignment) clears `O_DIRECT` and writes through the page cache.
pub(crate) fn write_all(
    file: &File,
    cleared: &mut bool,
    bytes: &[u8],
    at: u64,
) -> Result<(), (usize, io::Error)> {
    let mut done = 0;
    while done < bytes.len() {
        let off = i64::try_from(at + done as u64)
            .map_err(|_| (done, io::Error::from_raw_os_error(libc::EFBIG)))?;
        match retry(|| nix::sys::uio::pwrite(file, &bytes[done..], off).map_err(io::Error::from)) {
            Ok(0) => {
                let e = io::Error::new(io::ErrorKind::WriteZero, "pwrite wrote nothing");
                return Err((done, e));
            }
            Ok(w) => done += w,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && !*cleared => {
                clear(file).map_err(|_| (done, e))?;
                *cleared = true;
            }
            Err(e) => return Err((done, e)),
        }
    }
    Ok(())
}

/// Writes what `dc` still holds (the connection ended): the aligned part
/// with `O_DIRECT`, then the last partial block after clearing it. The
/// buffer stays in `dc` (for the pool). On failure, returns how many of
/// the held bytes were written.
pub(crate) fn flush_tail(file: &File, dc: &mut DirectConn) -> Result<(), (usize, io::Error)> {
    let Some(buf) = &dc.buf else {
        return Ok(());
    };
    let fill = std::mem::take(&mut dc.fill);
    let aligned = fill / BLOCK * BLOCK;
    let bytes = &buf.bytes()[..fill];
    write_all(file, &mut dc.cleared, &bytes[..aligned], dc.base)?;
    if aligned < fill {
        if !dc.cleared {
            clear(file).map_err(|e| (aligned, e))?;
            dc.cleared = true;
        }
        write_all(
            file,
            &mut dc.cleared,
            &bytes[aligned..],
            dc.base + aligned as u64,
        )
        .map_err(|(w, e)| (aligned + w, e))?;
    }
    dc.base += fill as u64;
    Ok(())
}
