//! The readiness backends: epoll(7) or poll(2) says a socket is readable,
//! then non-blocking syscalls move what is there.
//!
//! epoll (Linux) moves bytes with `splice(2)` socket → pipe → file; poll
//! (every Unix) with `read(2)` into a 64 KiB buffer and `pwrite(2)`.
//! [`pump_splice`] also serves the io_uring backend on rings without
//! `IORING_OP_SPLICE`.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Instant;

#[cfg(target_os = "linux")]
use super::pipe::PipePool;
use super::{next_timeout, peek_more, Conn, Event, Failure, Listen, PipeReport, RecvOptions, Want};
use crate::sys::retry;
#[cfg(target_os = "linux")]
use crate::sys::splice::splice;

/// Token of the listener in the epoll set.
const LISTENER: u64 = u64::MAX;
/// Reads per readiness before other connections get their turn.
const TURN: usize = 16;
/// The poll backend's copy buffer.
const COPY_BUF: usize = 64 * 1024;

/// What a pump left behind.
#[derive(Debug)]
pub(crate) enum Pump {
    /// The socket has no more bytes for now (or the turn is over).
    Pending,
    /// The connection is over.
    Done(Result<(), Failure>),
}

/// Moves what `socket` has into `conn.file` via pipes from `pool`, at most
/// [`TURN`] pipefuls: `splice(socket → pipe, SPLICE_F_NONBLOCK)` then
/// `splice(pipe → file at offset)` for exactly the count moved.
#[cfg(target_os = "linux")]
pub(crate) fn pump_splice(
    conn: &mut Conn,
    socket: &OwnedFd,
    pool: &mut PipePool,
    max_bytes: Option<u64>,
) -> Pump {
    for _ in 0..TURN {
        let pipe = match pool.take() {
            Ok(p) => p,
            Err(e) => return Pump::Done(Err(Failure::Read(e))),
        };
        let len = match conn.want(pipe.cap, max_bytes) {
            Want::Read(len) => len,
            Want::Probe => {
                pool.put(pipe);
                return probe(socket, max_bytes);
            }
        };
        let moved = retry(|| {
            splice(
                socket.as_fd(),
                pipe.wr.as_fd(),
                None,
                len,
                libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
            )
        });
        let n = match moved {
            Ok(0) => {
                pool.put(pipe);
                return Pump::Done(Ok(()));
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                pool.put(pipe);
                return Pump::Pending;
            }
            Err(e) => {
                pool.put(pipe);
                return Pump::Done(Err(Failure::from_read(e)));
            }
        };
        if let Err(e) = drain_pipe(conn, &pipe.rd, n) {
            // The pipe may still hold bytes: it is dropped, not pooled.
            return Pump::Done(Err(Failure::Write(e)));
        }
        pool.put(pipe);
    }
    Pump::Pending
}

/// `splice(pipe → file at conn.written)` until `n` bytes have gone.
#[cfg(target_os = "linux")]
fn drain_pipe(conn: &mut Conn, rd: &OwnedFd, mut n: usize) -> io::Result<()> {
    while n > 0 {
        let mut off =
            i64::try_from(conn.written).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        let wrote = retry(|| {
            splice(
                rd.as_fd(),
                conn.file.as_fd(),
                Some(&mut off),
                n,
                libc::SPLICE_F_MOVE,
            )
        })?;
        if wrote == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "splice to the file moved nothing",
            ));
        }
        conn.wrote(wrote as u64, Instant::now());
        n -= wrote;
    }
    Ok(())
}

/// Moves what `socket` has into `conn.file` through `buf` with `read(2)`
/// and `pwrite(2)`, at most [`TURN`] buffers.
pub(crate) fn pump_copy(
    conn: &mut Conn,
    socket: &OwnedFd,
    buf: &mut [u8],
    max_bytes: Option<u64>,
) -> Pump {
    for _ in 0..TURN {
        let len = match conn.want(buf.len(), max_bytes) {
            Want::Read(len) => len,
            Want::Probe => return probe(socket, max_bytes),
        };
        let got = retry(|| {
            nix::unistd::read(socket.as_raw_fd(), &mut buf[..len]).map_err(io::Error::from)
        });
        let n = match got {
            Ok(0) => return Pump::Done(Ok(())),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Pump::Pending,
            Err(e) => return Pump::Done(Err(Failure::from_read(e))),
        };
        let mut done = 0;
        while done < n {
            let Ok(off) = i64::try_from(conn.written) else {
                return Pump::Done(Err(Failure::Write(io::Error::from_raw_os_error(
                    libc::EFBIG,
                ))));
            };
            let wrote = retry(|| {
                nix::sys::uio::pwrite(&conn.file, &buf[done..n], off).map_err(io::Error::from)
            });
            match wrote {
                Ok(0) => {
                    return Pump::Done(Err(Failure::Write(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "pwrite wrote nothing",
                    ))))
                }
                Ok(w) => {
                    done += w;
                    conn.wrote(w as u64, Instant::now());
                }
                Err(e) => return Pump::Done(Err(Failure::Write(e))),
            }
        }
    }
    Pump::Pending
}

/// The quota is used up: a clean end of stream or one byte too many?
fn probe(socket: &OwnedFd, max_bytes: Option<u64>) -> Pump {
    match peek_more(socket) {
        Ok(false) => Pump::Done(Ok(())),
        Ok(true) => Pump::Done(Err(Failure::Quota(max_bytes.unwrap_or(0)))),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Pump::Pending,
        Err(e) => Pump::Done(Err(Failure::from_read(e))),
    }
}

#[derive(Debug)]
enum Waiter {
    #[cfg(target_os = "linux")]
    Epoll(nix::sys::epoll::Epoll),
    Poll,
}

#[derive(Debug)]
enum Mover {
    #[cfg(target_os = "linux")]
    Splice(PipePool),
    Copy(Vec<u8>),
}

#[derive(Debug)]
struct Slot {
    conn: Conn,
    socket: OwnedFd,
}

/// The epoll and poll backends: one readiness waiter, one way to move bytes.
#[derive(Debug)]
pub(crate) struct ReadinessEngine {
    waiter: Waiter,
    mover: Mover,
    options: RecvOptions,
    slots: HashMap<u64, Slot>,
    listen: Option<Listen>,
}

impl ReadinessEngine {
    /// epoll(7) readiness, `splice(2)` through pooled pipes.
    #[cfg(target_os = "linux")]
    pub(crate) fn epoll(options: RecvOptions) -> io::Result<ReadinessEngine> {
        use nix::sys::epoll::{Epoll, EpollCreateFlags};
        let ep = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io::Error::from)?;
        let pool = PipePool::new(options.pipe_size);
        Ok(ReadinessEngine {
            waiter: Waiter::Epoll(ep),
            mover: Mover::Splice(pool),
            options,
            slots: HashMap::new(),
            listen: None,
        })
    }

    /// poll(2) readiness, `read(2)`/`pwrite(2)` through a 64 KiB buffer.
    pub(crate) fn poll(options: RecvOptions) -> ReadinessEngine {
        ReadinessEngine {
            waiter: Waiter::Poll,
            mover: Mover::Copy(vec![0; COPY_BUF]),
            options,
            slots: HashMap::new(),
            listen: None,
        }
    }

    pub(crate) fn pipes(&self) -> PipeReport {
        match &self.mover {
            #[cfg(target_os = "linux")]
            Mover::Splice(pool) => pool.report(),
            Mover::Copy(_) => PipeReport::default(),
        }
    }

    pub(crate) fn listen(&mut self, listen: Listen) -> io::Result<()> {
        self.register(&listen.listener, LISTENER)?;
        self.listen = Some(listen);
        Ok(())
    }

    pub(crate) fn is_listening(&self) -> bool {
        self.listen.is_some()
    }

    pub(crate) fn attach(&mut self, conn: Conn, socket: OwnedFd) -> io::Result<()> {
        self.register(&socket, conn.id.0)?;
        self.slots.insert(conn.id.0, Slot { conn, socket });
        Ok(())
    }

    pub(crate) fn active(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn conns(&self) -> impl Iterator<Item = &Conn> {
        self.slots.values().map(|s| &s.conn)
    }

    /// Starts watching `fd` for readability under `token`.
    #[cfg(target_os = "linux")]
    fn register(&self, fd: &impl AsFd, token: u64) -> io::Result<()> {
        match &self.waiter {
            Waiter::Epoll(ep) => {
                use nix::sys::epoll::{EpollEvent, EpollFlags};
                ep.add(fd, EpollEvent::new(EpollFlags::EPOLLIN, token))
                    .map_err(io::Error::from)
            }
            Waiter::Poll => Ok(()),
        }
    }

    /// Only poll(2) exists here, and it keeps no registry: [`Self::ready`]
    /// polls the listener and every slot.
    #[cfg(not(target_os = "linux"))]
    fn register(&self, _fd: &impl AsFd, _token: u64) -> io::Result<()> {
        Ok(())
    }

    pub(crate) fn wait(
        &mut self,
        timeout: Option<std::time::Duration>,
        events: &mut Vec<Event>,
    ) -> io::Result<()> {
        let now = Instant::now();
        let idle = self.options.idle_timeout;
        let timeout = next_timeout(
            timeout,
            self.slots
                .values()
                .filter_map(|s| s.conn.idle_deadline(idle)),
            now,
        );
        let ready = self.ready(timeout)?;
        for token in ready {
            if token == LISTENER {
                if let Some(l) = &mut self.listen {
                    if !l.accept_all(events) {
                        // Closing the listener also removes it from epoll.
                        self.listen = None;
                    }
                }
                continue;
            }
            let Some(slot) = self.slots.get_mut(&token) else {
                continue;
            };
            let max = self.options.max_bytes;
            let pump = match &mut self.mover {
                #[cfg(target_os = "linux")]
                Mover::Splice(pool) => pump_splice(&mut slot.conn, &slot.socket, pool, max),
                Mover::Copy(buf) => pump_copy(&mut slot.conn, &slot.socket, buf, max),
            };
            if let Pump::Done(result) = pump {
                if let Some(slot) = self.slots.remove(&token) {
                    events.push(Event::Finished(slot.conn.finish(result)));
                }
            }
        }
        if let Some(d) = idle {
            let now = Instant::now();
            let expired: Vec<u64> = self
                .slots
                .iter()
                .filter(|(_, s)| s.conn.idle_deadline(Some(d)).is_some_and(|t| t <= now))
                .map(|(&k, _)| k)
                .collect();
            for k in expired {
                if let Some(slot) = self.slots.remove(&k) {
                    events.push(Event::Finished(
                        slot.conn.finish(Err(Failure::IdleTimeout(d))),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Tokens of the ready descriptors (empty on timeout or `EINTR`).
    fn ready(&self, timeout: Option<std::time::Duration>) -> io::Result<Vec<u64>> {
        use nix::poll::PollTimeout;
        let timeout = match timeout {
            None => PollTimeout::NONE,
            Some(d) => {
                let ms = d.as_millis().min(i32::MAX as u128 / 2) as i32;
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
            }
        };
        match &self.waiter {
            #[cfg(target_os = "linux")]
            Waiter::Epoll(ep) => {
                use nix::sys::epoll::EpollEvent;
                let mut buf = vec![EpollEvent::empty(); 256];
                match ep.wait(&mut buf, timeout) {
                    Ok(n) => Ok(buf[..n].iter().map(|e| e.data()).collect()),
                    Err(nix::errno::Errno::EINTR) => Ok(Vec::new()),
                    Err(e) => Err(e.into()),
                }
            }
            Waiter::Poll => {
                use nix::poll::{PollFd, PollFlags};
                let mut tokens = Vec::with_capacity(self.slots.len() + 1);
                let mut fds = Vec::with_capacity(self.slots.len() + 1);
                if let Some(l) = &self.listen {
                    tokens.push(LISTENER);
                    fds.push(PollFd::new(l.listener.as_fd(), PollFlags::POLLIN));
                }
                for (&k, s) in &self.slots {
                    tokens.push(k);
                    fds.push(PollFd::new(s.socket.as_fd(), PollFlags::POLLIN));
                }
                match nix::poll::poll(&mut fds, timeout) {
                    Ok(_) => Ok(fds
                        .iter()
                        .zip(tokens)
                        .filter(|(fd, _)| fd.revents().is_some_and(|r| !r.is_empty()))
                        .map(|(_, t)| t)
                        .collect()),
                    Err(nix::errno::Errno::EINTR) => Ok(Vec::new()),
                    Err(e) => Err(e.into()),
                }
            }
        }
    }
}
