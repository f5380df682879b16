//! epoll(7) selector: every fd registered once, edge-triggered for
//! `EPOLLOUT`; only tokens that hit `EAGAIN` are reported.
#![allow(unsafe_code)]

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use super::readiness::Selector;
use super::{Token, WAKE_TOKEN};
use crate::sys::{cvt, retry};

#[derive(Debug)]
pub(crate) struct Epoll {
    epfd: OwnedFd,
    armed: HashSet<Token>,
    buf: Vec<libc::epoll_event>,
    /// The wake fd is registered (level-triggered `EPOLLIN`).
    wake: bool,
}

impl Epoll {
    pub(crate) fn new() -> io::Result<Epoll> {
        // SAFETY: plain syscall with a constant flag.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        Ok(Epoll {
            // SAFETY: epoll_create1(2) returned a new fd that nothing else owns.
            epfd: unsafe { OwnedFd::from_raw_fd(fd) },
            armed: HashSet::new(),
            buf: vec![libc::epoll_event { events: 0, u64: 0 }; 1024],
            wake: false,
        })
    }

    fn ctl(&self, op: i32, fd: RawFd, token: Token) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLOUT | libc::EPOLLET) as u32,
            u64: token,
        };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call.
        cvt(unsafe { libc::epoll_ctl(self.epfd.as_raw_fd(), op, fd, &mut ev) })?;
        Ok(())
    }
}

impl Selector for Epoll {
    fn register(&mut self, token: Token, fd: RawFd) -> io::Result<bool> {
        match self.ctl(libc::EPOLL_CTL_ADD, fd, token) {
            Ok(()) => Ok(true),
            // Regular files and some devices cannot be polled: always ready.
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn deregister(&mut self, token: Token, fd: RawFd) {
        // A closed or never-registered fd is already gone from the set.
        let _ = self.ctl(libc::EPOLL_CTL_DEL, fd, token);
    }

    fn arm(&mut self, token: Token, _fd: RawFd) {
        self.armed.insert(token);
    }

    fn disarm(&mut self, token: Token) {
        self.armed.remove(&token);
    }

    fn armed(&self) -> bool {
        !self.armed.is_empty() || self.wake
    }

    fn select(&mut self, timeout: Option<Duration>, ready: &mut Vec<Token>) -> io::Result<u64> {
        let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        let mut calls = 0;
        let n = retry(|| {
            calls += 1;
            // SAFETY: `buf` has room for `buf.len()` events; the kernel writes
            // at most that many.
            cvt(unsafe {
                libc::epoll_wait(
                    self.epfd.as_raw_fd(),
                    self.buf.as_mut_ptr(),
                    self.buf.len() as i32,
                    ms,
                )
            })
        })?;
        for ev in &self.buf[..n as usize] {
            let token = ev.u64;
            if token == WAKE_TOKEN || self.armed.remove(&token) {
                ready.push(token);
            }
        }
        Ok(calls)
    }

    fn pollable_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.epfd.as_fd())
    }

    fn watch_wake(&mut self, fd: RawFd) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: WAKE_TOKEN,
        };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call.
        cvt(unsafe { libc::epoll_ctl(self.epfd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) })?;
        self.wake = true;
        Ok(())
    }
}
