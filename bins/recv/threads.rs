//! `recv --threads N`: one acceptor (the main thread) hands each accepted
//! connection to the least busy of N receive threads, each with its own
//! [`Receiver`] (its own ring or epoll set).
//!
//! Why one acceptor rather than `SO_REUSEPORT` listeners, one per thread:
//! - `--max-conns` (and `--once`, `--out FILE`) stays exact for free: one
//!   listener counts, and stops accepting at the limit. With one listener
//!   per thread the threads would share a counter, and a connection the
//!   kernel had already queued on one thread's listener past the limit
//!   would have to be reset.
//! - Balance: `SO_REUSEPORT` spreads by a hash of the 4-tuple, so 4
//!   connections may land 3 + 1 (or 4 + 0) on 2 threads; the acceptor
//!   sends each one to the thread with the fewest live connections.
//! - Names: output files are created by the one thread that accepts, so
//!   two threads never race for a name (and `O_EXCL` guards anyway).
//!
//! The cost is one hop per connection (a channel message and a wake-up),
//! nothing per byte. Finished connections come back to the main thread,
//! which renames and reports them, as with one thread.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ringmover::recv::{ConnId, Event, Finished, Progress, Receiver, RecvOptions, Waker};
use ringmover::Backend;

/// How long a receive thread waits before it looks at its inbox anyway (a
/// wake-up normally ends the wait at once).
const TICK: Duration = Duration::from_millis(100);

/// What the main thread tells a receive thread.
enum ToWorker {
    Attach {
        key: ConnId,
        socket: TcpStream,
        peer: SocketAddr,
        file: File,
    },
    /// Close everything and return the live connections' progress.
    Stop,
}

/// What a receive thread tells the main thread.
pub(super) enum FromWorker {
    /// A connection ended; its `id` is the key the main thread gave it.
    Finished(Finished),
    /// [`Receiver::attach`] failed for the connection with this key.
    AttachFailed {
        key: ConnId,
        peer: SocketAddr,
        error: io::Error,
    },
    /// The thread's `wait` failed; it stopped.
    Failed(io::Error),
}

struct Worker {
    tx: mpsc::Sender<ToWorker>,
    waker: Waker,
    /// Connections handed to it and not yet reported back.
    active: usize,
    /// Its live connections (keys as ids), refreshed a few times a second
    /// when progress is shown.
    progress: Arc<Mutex<Vec<Progress>>>,
    handle: Option<JoinHandle<Vec<Progress>>>,
}

/// N receive threads fed by the caller's acceptor.
pub(super) struct Shards {
    workers: Vec<Worker>,
    rx: mpsc::Receiver<FromWorker>,
    /// Which worker holds each key.
    owner: HashMap<ConnId, usize>,
    next_key: u64,
}

impl Shards {
    /// Starts `n` receive threads on `backend`; each wakes `main` when it
    /// has something to report. `track`: keep progress snapshots.
    pub(super) fn start(
        n: usize,
        backend: Backend,
        options: &RecvOptions,
        main: Waker,
        track: bool,
    ) -> io::Result<Shards> {
        let (back_tx, rx) = mpsc::channel();
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let (tx, inbox) = mpsc::channel();
            let (ready_tx, ready_rx) = mpsc::channel();
            let progress = Arc::new(Mutex::new(Vec::new()));
            let shared = progress.clone();
            let back = back_tx.clone();
            let main = main.clone();
            let options = options.clone();
            let handle = std::thread::Builder::new()
                .name(format!("recv-{i}"))
                .spawn(move || {
                    // The ring (or epoll set) is made by the thread that uses it.
                    let started =
                        Receiver::new(backend, options).and_then(|mut r| r.waker().map(|w| (r, w)));
                    match started {
                        Ok((r, w)) => {
                            let _ = ready_tx.send(Ok(w));
                            work(r, inbox, back, main, shared, track)
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            Vec::new()
                        }
                    }
                })?;
            let waker = ready_rx
                .recv()
                .map_err(|_| io::Error::other(format!("receive thread {i} died starting")))??;
            workers.push(Worker {
                tx,
                waker,
                active: 0,
                progress,
                handle: Some(handle),
            });
        }
        Ok(Shards {
            workers,
            rx,
            owner: HashMap::new(),
            next_key: 1,
        })
    }

    /// Hands a connection to the thread with the fewest live ones; returns
    /// the key its `Finished` will carry as `id`.
    pub(super) fn dispatch(
        &mut self,
        socket: TcpStream,
        peer: SocketAddr,
        file: File,
    ) -> io::Result<ConnId> {
        let key = ConnId(self.next_key);
        self.next_key += 1;
        let (i, w) = self
            .workers
            .iter_mut()
            .enumerate()
            .min_by_key(|(_, w)| w.active)
            .ok_or_else(|| io::Error::other("no receive thread"))?;
        w.tx.send(ToWorker::Attach {
            key,
            socket,
            peer,
            file,
        })
        .map_err(|_| io::Error::other(format!("receive thread {i} has stopped")))?;
        w.waker.wake()?;
        w.active += 1;
        self.owner.insert(key, i);
        Ok(key)
    }

    /// Connections handed out and not yet reported back.
    pub(super) fn active(&self) -> usize {
        self.owner.len()
    }

    /// What the threads reported since the last call.
    pub(super) fn take(&mut self) -> Vec<FromWorker> {
        let got: Vec<FromWorker> = self.rx.try_iter().collect();
        for m in &got {
            let key = match m {
                FromWorker::Finished(f) => f.id,
                FromWorker::AttachFailed { key, .. } => *key,
                FromWorker::Failed(_) => continue,
            };
            if let Some(i) = self.owner.remove(&key) {
                self.workers[i].active -= 1;
            }
        }
        got
    }

    /// The live connections' progress, as of the threads' last snapshots.
    pub(super) fn progress(&self) -> Vec<Progress> {
        let mut v: Vec<Progress> = self
            .workers
            .iter()
            .flat_map(|w| w.progress.lock().map(|p| p.clone()).unwrap_or_default())
            .collect();
        v.sort_by_key(|p| p.id);
        v
    }

    /// Stops every thread: each closes its connections (no byte moves
    /// after this returns) and reports those that were live; also returns
    /// what the threads reported and was not taken yet.
    pub(super) fn stop(mut self) -> (Vec<Progress>, Vec<FromWorker>) {
        for w in &self.workers {
            let _ = w.tx.send(ToWorker::Stop);
            let _ = w.waker.wake();
        }
        let mut live = Vec::new();
        for w in &mut self.workers {
            if let Some(h) = w.handle.take() {
                live.extend(h.join().unwrap_or_default());
            }
        }
        (live, self.take())
    }
}

impl Drop for Shards {
    /// Threads still running (an error path) are told to stop, not joined.
    fn drop(&mut self) {
        for w in &self.workers {
            if w.handle.is_some() {
                let _ = w.tx.send(ToWorker::Stop);
                let _ = w.waker.wake();
            }
        }
    }
}

/// A receive thread: attaches what it is sent, moves bytes, reports ends.
fn work(
    mut r: Receiver,
    inbox: mpsc::Receiver<ToWorker>,
    back: mpsc::Sender<FromWorker>,
    main: Waker,
    shared: Arc<Mutex<Vec<Progress>>>,
    track: bool,
) -> Vec<Progress> {
    let mut keys: HashMap<ConnId, ConnId> = HashMap::new();
    let live = |r: &Receiver, keys: &HashMap<ConnId, ConnId>| -> Vec<Progress> {
        r.progress()
            .into_iter()
            .filter_map(|mut p| {
                p.id = *keys.get(&p.id)?;
                Some(p)
            })
            .collect()
    };
    let mut events = Vec::new();
    let mut last = Instant::now();
    loop {
        loop {
            match inbox.try_recv() {
                Ok(ToWorker::Attach {
                    key,
                    socket,
                    peer,
                    file,
                }) => match r.attach(socket, peer, file) {
                    Ok(id) => {
                        keys.insert(id, key);
                    }
                    Err(error) => {
                        let _ = back.send(FromWorker::AttachFailed { key, peer, error });
                        let _ = main.wake();
                    }
                },
                Ok(ToWorker::Stop) | Err(mpsc::TryRecvError::Disconnected) => {
                    let v = live(&r, &keys);
                    drop(r);
                    return v;
                }
                Err(mpsc::TryRecvError::Empty) => break,
            }
        }
        if let Err(e) = r.wait(Some(TICK), &mut events) {
            let v = live(&r, &keys);
            drop(r);
            let _ = back.send(FromWorker::Failed(e));
            let _ = main.wake();
            return v;
        }
        let mut sent = false;
        for e in events.drain(..) {
            if let Event::Finished(mut f) = e {
                if let Some(key) = keys.remove(&f.id) {
                    f.id = key;
                    sent |= back.send(FromWorker::Finished(f)).is_ok();
                }
            }
        }
        if sent {
            let _ = main.wake();
        }
        if track && last.elapsed() >= Duration::from_millis(250) {
            last = Instant::now();
            if let Ok(mut p) = shared.lock() {
                *p = live(&r, &keys);
            }
        }
    }
}

/// The default for `--threads`: one per CPU, at most 4. A thread costs a
/// ring (or epoll set) and nothing while idle, and one connection only
/// ever uses one thread; with several busy connections, a second thread
/// took 4 concurrent 256 MiB streams in less than half the wall time of
/// one on this 2-CPU VM (issue 11).
pub(super) fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4)
}
