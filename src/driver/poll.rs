//! poll(2) selector: the portable fallback; only armed fds are polled.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use super::readiness::Selector;
use super::{Token, WAKE_TOKEN};
use crate::sys::{cvt, retry};

#[derive(Debug, Default)]
pub(crate) struct Poll {
    armed: HashMap<Token, RawFd>,
    fds: Vec<libc::pollfd>,
    tokens: Vec<Token>,
    /// The wake fd, polled for `POLLIN` with every select.
    wake: Option<RawFd>,
}

impl Poll {
    pub(crate) fn new() -> Poll {
        Poll::default()
    }
}

impl Selector for Poll {
    fn register(&mut self, _token: Token, _fd: RawFd) -> io::Result<bool> {
        Ok(true)
    }

    fn deregister(&mut self, token: Token, _fd: RawFd) {
        self.armed.remove(&token);
    }

    fn arm(&mut self, token: Token, fd: RawFd) {
        self.armed.insert(token, fd);
    }

    fn disarm(&mut self, token: Token) {
        self.armed.remove(&token);
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
        Ok(calls)
    }

    fn watch_wake(&mut self, fd: RawFd) -> io::Result<()> {
        self.wake = Some(fd);
        Ok(())
    }
}
