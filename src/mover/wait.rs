//! Waiting: the loop that sleeps in the driver until enough completes,
//! and, with a [`Waker`], parking with nothing in flight until woken.

use std::io;
use std::time::{Duration, Instant};

use super::{Completion, Mover};
use crate::wake::Waker;

impl Mover {
    /// `wait`, but on io_uring sleep until `min` completions are ready: one
    /// wake-up instead of one per connection.
    pub(super) fn wait_for(
        &mut self,
        min: usize,
        out: &mut Vec<Completion>,
        timeout: Option<Duration>,
    ) -> io::Result<()> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let notified = self.zc_notified;
        loop {
            self.start_dirty()?;
            // Progress is a completion, or a notification (it frees buffers).
            if !self.completions.is_empty()
                || self.zc_notified != notified
                || (self.in_flight == 0 && self.driver.notifs_pending() == 0)
            {
                break;
            }
            let left = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) => Some(left),
                    None => break,
                },
                None => None,
            };
            self.driver.wait(min, left, &mut self.events)?;
            self.process_events();
        }
        out.append(&mut self.completions);
        Ok(())
    }
}

/// A [`Mover`]'s waker and whether it fired since `wait` last returned.
#[derive(Debug)]
pub(super) struct Wake {
    waker: Waker,
    woken: bool,
}

impl Mover {
    /// A [`Waker`] that ends this engine's [`wait`](Self::wait) early from
    /// any thread. The first call creates an eventfd (a pipe off Linux)
    /// and has the backend watch it (io_uring: a multishot `POLL_ADD`;
    /// epoll/poll: registered for `POLLIN`); later calls return clones.
    /// From then on `wait` also sleeps, in the kernel, when nothing is in
    /// flight, until a completion, a wake or the timeout: what a thread
    /// that is handed work by other threads needs (see [`crate::shard`]).
    pub fn waker(&mut self) -> io::Result<Waker> {
        if let Some(w) = &self.wake {
            return Ok(w.waker.clone());
        }
        let waker = Waker::new()?;
        self.driver.watch_wake(waker.raw_fd())?;
        self.wake = Some(Wake {
            waker: waker.clone(),
            woken: false,
        });
        Ok(waker)
    }

    /// The waker fired: consume it (the fd stops polling readable) and
    /// let the current or next `wait` return.
    pub(super) fn woken(&mut self) {
        if let Some(w) = self.wake.as_mut() {
            w.waker.reset();
            w.woken = true;
        }
    }

    /// `wait` with a waker: starts what is scheduled, then sleeps until a
    /// completion, a zero-copy notification, a wake, or the timeout, even
    /// with nothing in flight. A zero timeout still asks the kernel once
    /// (without sleeping), so a caller that never sleeps still reaps.
    pub(super) fn park(
        &mut self,
        out: &mut Vec<Completion>,
        timeout: Option<Duration>,
    ) -> io::Result<()> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let notified = self.zc_notified;
        let mut asked = false;
        loop {
            self.start_dirty()?;
            let woken = self.wake.as_ref().is_some_and(|w| w.woken);
            if woken || !self.completions.is_empty() || self.zc_notified != notified {
                break;
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if asked && left == Some(Duration::ZERO) {
                break;
            }
            asked = true;
            self.driver.wait(1, left, &mut self.events)?;
            self.process_events();
        }
        if let Some(w) = self.wake.as_mut() {
            w.woken = false;
        }
        out.append(&mut self.completions);
        Ok(())
    }
}
