//! poll(2) selector: the portable fallback; only armed fds are polled.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::io;
use std::os::fd::{BorrowedFd, RawFd};
use std::time::Duration;

use super::readiness::Selector;
use super::{Token, WAKE_TOKEN};
use crate::sys::{cvt, retry};
use crate::wake::Waker;

#[derive(Debug, Default)]
pub(crate) struct Poll {
    armed: HashMap<Token, RawFd>,
    fds: Vec<libc::pollfd>,
    tokens: Vec<Token>,
    /// The wake fd, polled for `POLLIN` with every select.
    wake: Option<RawFd>,
    /// What an event loop polls (`Driver::pollable_fd`): poll(2) has no
    /// kernel object that gathers readiness, so this eventfd is kept
    /// readable while any write waits for writability (`armed`): the loop
    /// then calls `wait` with a zero timeout, which polls the sockets once.
    signal: Option<Waker>,
    /// `signal` is readable now.
    signalled: bool,
}

impl Poll {
    pub(crate) fn new() -> Poll {
        Poll::default()
    }

    /// A selector with a pollable signal fd.
    pub(crate) fn with_signal() -> io::Result<Poll> {
        Ok(Poll {
            signal: Some(Waker::new()?),
            ..Poll::default()
        })
    }

    /// Keeps `signal` readable exactly while a token is armed.
    fn update_signal(&mut self) {
        let Some(signal) = &self.signal else { return };
        let want = !self.armed.is_empty();
        if want == self.signalled {
            return;
        }
        if want {
            // Fails only on a closed fd, which this selector keeps open;
            // then the loop just sees no readiness and `wait` still works.
            let _ = signal.wake();
        } else {
            signal.reset();
        }
        self.signalled = want;
    }
}

impl Selector for Poll {
    fn register(&mut self, _token: Token, _fd: RawFd) -> io::Result<bool> {
        Ok(true)
    }

    fn deregister(&mut self, token: Token, _fd: RawFd) {
        self.armed.remove(&token);
        self.update_signal();
    }

    fn arm(&mut self, token: Token, fd: RawFd) {
        self.armed.insert(token, fd);
        self.update_signal();
    }

    fn disarm(&mut self, token: Token) {
        self.armed.remove(&token);
        self.update_signal();
    }

    fn armed(&self) -> bool {
        !self.armed.is_empty() || self.wake.is_some()
    }

    fn select(&mut self, timeout: Option<Duration>, ready: &mut Vec<Token>) -> io::Result<u64> {
        self.fds.clear();
        self.tokens.clear();
        for (&token, &fd) in &self.armed {
            self.fds.push(libc::pollfd {
                fd,
                events: libc::POLLOUT,
                revents: 0,
            });
            self.tokens.push(token);
        }
        if let Some(fd) = self.wake {
            self.fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
            self.tokens.push(WAKE_TOKEN);
        }
        let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        let mut calls = 0;
        retry(|| {
            calls += 1;
            // SAFETY: `fds` is a live array of `fds.len()` pollfds.
            cvt(unsafe { libc::poll(self.fds.as_mut_ptr(), self.fds.len() as libc::nfds_t, ms) })
        })?;
        for (pfd, &token) in self.fds.iter().zip(&self.tokens) {
            // POLLERR/POLLHUP: the retried write reports the error itself.
            if pfd.revents
                & (libc::POLLOUT | libc::POLLIN | libc::POLLERR | libc::POLLHUP | libc::POLLNVAL)
                != 0
            {
                self.armed.remove(&token);
                ready.push(token);
            }
        }
        self.update_signal();
        Ok(calls)
    }

    fn watch_wake(&mut self, fd: RawFd) -> io::Result<()> {
        self.wake = Some(fd);
        Ok(())
    }

    fn pollable_fd(&self) -> Option<BorrowedFd<'_>> {
        self.signal.as_ref().map(Waker::as_fd)
    }
}
