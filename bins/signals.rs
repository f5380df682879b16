//! SIGINT and SIGTERM for the long-running subcommands (`recv`, `send`).
//!
//! The two signals are blocked in every thread and taken by one watcher
//! thread with `sigwait(2)`: no handler runs in signal context, so the
//! reaction can be ordinary code (set a flag, reset a socket, exit), and no
//! `unsafe` is needed.

use std::io;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use nix::sys::signal::{SigSet, Signal};

/// Blocks SIGINT and SIGTERM in the calling thread (and so in every thread
/// it starts afterwards), then calls `on_signal` from a watcher thread for
/// each one that arrives. Call before starting any other thread.
pub fn watch(mut on_signal: impl FnMut(Signal) + Send + 'static) -> io::Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block().map_err(io::Error::from)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            while let Ok(sig) = set.wait() {
                on_signal(sig);
            }
        })?;
    Ok(())
}

/// The first SIGINT/SIGTERM received, for a loop that checks it between
/// waits.
#[derive(Debug, Clone, Default)]
pub struct Interrupt(Arc<AtomicI32>);

impl Interrupt {
    /// Starts watching (see [`watch`]).
    pub fn watch() -> io::Result<Interrupt> {
        let flag = Interrupt::default();
        let seen = flag.0.clone();
        watch(move |sig| {
            let _ = seen.compare_exchange(0, sig as i32, Ordering::SeqCst, Ordering::SeqCst);
        })?;
        Ok(flag)
    }

    /// The signal received, if any.
    pub fn received(&self) -> Option<Signal> {
        Signal::try_from(self.0.load(Ordering::SeqCst)).ok()
    }
}

/// The conventional exit status of a process ended by `sig`: 128 + number.
pub fn exit_status(sig: Signal) -> u8 {
    (128 + sig as i32).clamp(0, 255) as u8
}
