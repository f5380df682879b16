//! The pipe pool: pipes between a socket and a file for `splice(2)`.
//!
//! A connection takes a pipe when bytes are about to flow and gives it back
//! once the pipe is empty again, so idle connections hold none and the pool
//! grows only to the number of connections moving bytes at once. A pipe
//! that may still hold bytes (a failed write) is closed, never reused.
//! Linux only, like `splice(2)` and `F_SETPIPE_SZ`.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use super::PipeReport;

/// One pipe: read end, write end and the capacity it got.
#[derive(Debug)]
pub(crate) struct Pipe {
    pub(crate) rd: OwnedFd,
    pub(crate) wr: OwnedFd,
    pub(crate) cap: usize,
}

/// Default pipe capacity: 64 KiB (the kernel's default pipe size).
const DEFAULT_PIPE: usize = 64 * 1024;

/// A reusable set of pipes of one target size.
#[derive(Debug)]
pub(crate) struct PipePool {
    free: Vec<Pipe>,
    report: PipeReport,
    /// Tests: `take` fails as if out of fds.
    #[cfg(test)]
    pub(crate) exhausted: bool,
}

impl PipePool {
    /// A pool making pipes of `wanted` bytes (default 1 MiB), capped at
    /// `/proc/sys/fs/pipe-max-size`.
    pub(crate) fn new(wanted: Option<usize>) -> PipePool {
        let max = crate::sys::read_trimmed("/proc/sys/fs/pipe-max-size")
            .and_then(|s| s.parse::<usize>().ok())
            .unwrap_or(1 << 20);
        let wanted = wanted.unwrap_or(1 << 20).min(max).max(4096);
        PipePool {
            free: Vec::new(),
            report: PipeReport {
                created: 0,
                wanted,
                got: 0,
                ..PipeReport::default()
            },
            #[cfg(test)]
            exhausted: false,
        }
    }

    pub(crate) fn report(&self) -> PipeReport {
        self.report
    }

    /// An empty pipe, from the pool or new.
    pub(crate) fn take(&mut self) -> io::Result<Pipe> {
        #[cfg(test)]
        if self.exhausted {
            return Err(io::Error::from_raw_os_error(libc::EMFILE));
        }
        if let Some(p) = self.free.pop() {
            return Ok(p);
        }
        let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        let cap = grow(&wr, self.report.wanted);
        self.report.created += 1;
        self.report.got = cap;
        Ok(Pipe { rd, wr, cap })
    }

    /// Returns a pipe known to be empty.
    pub(crate) fn put(&mut self, pipe: Pipe) {
        self.free.push(pipe);
    }
}

/// `fcntl(fd, F_SETPIPE_SZ, size)`, halving on refusal down to the default;
/// returns the capacity the pipe has.
pub(crate) fn grow(fd: &impl AsRawFd, wanted: usize) -> usize {
    use nix::fcntl::{fcntl, FcntlArg};
    let mut size = wanted;
    while size > DEFAULT_PIPE {
        let Ok(as_int) = i32::try_from(size) else {
            size /= 2;
            continue;
        };
        if let Ok(got) = fcntl(fd.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(as_int)) {
            return usize::try_from(got).unwrap_or(DEFAULT_PIPE);
        }
        size /= 2;
    }
    fcntl(fd.as_raw_fd(), FcntlArg::F_GETPIPE_SZ)
        .ok()
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(DEFAULT_PIPE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_reuses_pipes() {
        let mut pool = PipePool::new(Some(256 * 1024));
        let a = pool.take().unwrap();
        assert!(a.cap >= 64 * 1024);
        pool.put(a);
        let _b = pool.take().unwrap();
        assert_eq!(pool.report().created, 1);
        let _c = pool.take().unwrap();
        assert_eq!(pool.report().created, 2);
    }
}
