//! A broadcast group, the caller's side: publish once to every
//! subscriber, and the back-pressure producers wait on.

use std::io;
use std::sync::atomic::{fence, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{
    answer, cost, Cmd, GroupId, GroupOptions, Inner, Packet, PublishError, PublishErrorKind,
    ShardConn,
};

/// A broadcast group: publish once, every subscriber gets the same [`Packet`].
/// Cheap to clone, `Send + Sync`: publish from any thread.
///
/// ```no_run
/// use std::time::Duration;
/// use bytes::Bytes;
/// use ringmover::shard::{GroupOptions, Shards, SlowPolicy};
/// # fn main() -> std::io::Result<()> {
/// let (shards, _events) = Shards::builder().threads(2).build()?;
/// let group = shards.group(GroupOptions::new(1 << 20, SlowPolicy::Drop));
/// group.subscribe(shards.attach(std::net::TcpStream::connect("127.0.0.1:7000")?)?)?;
/// let g = group.clone();
/// std::thread::spawn(move || g.publish(Bytes::from_static(b"from another thread\n")));
/// group.publish([Bytes::from_static(b"hdr "), Bytes::from_static(b"body\n")])?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Group {
    pub(super) inner: Arc<Inner>,
    pub(super) shared: Arc<GroupShared>,
}

impl Group {
    /// The group's id, as events name it.
    pub fn id(&self) -> GroupId {
        self.shared.id
    }

    /// The group's limits.
    pub fn options(&self) -> GroupOptions {
        self.shared.options
    }

    /// Adds `conn` to the group; packets published after this call reach it.
    /// An error if the connection is unknown, already a subscriber, or its
    /// shard has stopped.
    pub fn subscribe(&self, conn: ShardConn) -> io::Result<()> {
        let shard = conn.shard();
        let count = self
            .shared
            .per_shard
            .get(shard)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such shard"))?;
        // Counted first: a publish right after this call must reach the shard.
        count.fetch_add(1, Ordering::SeqCst);
        let (reply, rx) = mpsc::sync_channel(1);
        let res = self
            .inner
            .control(
                shard,
                Cmd::Subscribe {
                    group: self.shared.clone(),
                    conn: conn.conn,
                    reply,
                },
            )
            .and_then(|()| answer(shard, rx)?);
        if res.is_err() {
            count.fetch_sub(1, Ordering::SeqCst);
        }
        res
    }

    /// Removes `conn` from the group (it stays attached).
    pub fn unsubscribe(&self, conn: ShardConn) -> io::Result<()> {
        let (reply, rx) = mpsc::sync_channel(1);
        self.inner.control(
            conn.shard(),
            Cmd::Unsubscribe {
                group: self.shared.id,
                conn: conn.conn,
                reply,
            },
        )?;
        answer(conn.shard(), rx)?
    }

    /// Subscribers now, over all shards.
    pub fn subscribers(&self) -> usize {
        self.shared
            .per_shard
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// No subscriber is lagging (more than half the limit queued), and
    /// the group's packets still waiting in each shard's queue are at most
    /// a quarter of the limit: a packet published now cannot take a
    /// subscriber over the limit (if packets are at most a quarter of it).
    /// A lagging subscriber that exceeds the limit anyway (after
    /// [`publish_wait`](Self::publish_wait)'s stall) is handled by the
    /// policy and stops counting.
    pub fn writable(&self) -> bool {
        let quarter = self.shared.options.limit / 4;
        self.shared.lagging.load(Ordering::SeqCst) == 0
            && self
                .shared
                .pending
                .iter()
                .all(|p| p.load(Ordering::SeqCst) <= quarter)
    }

    /// Queues `packet` to every subscriber: one message per shard that has
    /// subscribers, the same [`Packet`] for all (one reference count per
    /// subscriber, however many pieces; no copy), never blocking.
    /// Refused, for every shard, when one target shard's queue is full.
    pub fn publish(&self, packet: impl Into<Packet>) -> Result<(), PublishError> {
        let packet = packet.into();
        if self.inner.stopped.load(Ordering::Relaxed) {
            return Err(PublishError {
                kind: PublishErrorKind::ShutDown,
                packet,
            });
        }
        let targets = || {
            self.shared
                .per_shard
                .iter()
                .enumerate()
                .filter(|(_, c)| c.load(Ordering::SeqCst) > 0)
                .map(|(i, _)| i)
        };
        for shard in targets() {
            if let Err(kind) = self.inner.room(shard) {
                return Err(PublishError { kind, packet });
            }
        }
        let cost = cost(&packet);
        let mut closed = None;
        for shard in targets() {
            let cmd = Cmd::Publish {
                group: self.shared.clone(),
                packet: packet.clone(),
            };
            let pending = &self.shared.pending[shard];
            pending.fetch_add(packet.len(), Ordering::SeqCst);
            if self.inner.push(shard, cmd, cost).is_err() {
                pending.fetch_sub(packet.len(), Ordering::SeqCst);
                closed.get_or_insert(shard);
            }
        }
        match closed {
            None => Ok(()),
            Some(shard) => Err(PublishError {
                kind: PublishErrorKind::Closed { shard },
                packet,
            }),
        }
    }

    /// [`publish`](Self::publish), but first waits while the group is not
    /// [`writable`](Self::writable) (at most the group's
    /// [`stall`](GroupOptions::stall), then it publishes anyway: the shard
    /// then stops counting a subscriber lagging for longer, and its policy
    /// deals with it once over the limit) or a shard's queue is full (at
    /// most `timeout`, then [`PublishErrorKind::Full`]).
    pub fn publish_wait(
        &self,
        packet: impl Into<Packet>,
        timeout: Duration,
    ) -> Result<(), PublishError> {
        let mut packet = packet.into();
        let now = Instant::now();
        let deadline = now + timeout;
        let soft = now + timeout.min(self.shared.options.stall);
        loop {
            if self.writable() || Instant::now() >= soft {
                match self.publish(packet) {
                    Err(PublishError {
                        kind: PublishErrorKind::Full { .. },
                        packet: p,
                    }) if Instant::now() < deadline => packet = p,
                    res => return res,
                }
            }
            let until = if Instant::now() < soft {
                soft
            } else {
                deadline
            };
            self.inner.pressure.wait_until(until, || {
                self.writable()
                    && self
                        .shared
                        .per_shard
                        .iter()
                        .enumerate()
                        .all(|(i, c)| c.load(Ordering::SeqCst) == 0 || self.inner.room(i).is_ok())
            });
        }
    }
}

/// Caller-side state of a group, shared with the shards holding subscribers.
#[derive(Debug)]
pub(super) struct GroupShared {
    pub(super) id: GroupId,
    pub(super) options: GroupOptions,
    /// Subscribers per shard: publishes skip shards without any.
    pub(super) per_shard: Vec<AtomicUsize>,
    /// Subscribers above half the limit, over all shards.
    pub(super) lagging: AtomicUsize,
    /// Bytes of this group's publishes in each shard's queue, not yet
    /// taken: part of `Group::writable`.
    pub(super) pending: Vec<AtomicUsize>,
}

impl GroupShared {
    /// Shard `shard` took a publish of `len` bytes from its queue.
    pub(super) fn taken(&self, shard: usize, len: usize, pressure: &Pressure) {
        let quarter = self.options.limit / 4;
        let before = self.pending[shard].fetch_sub(len, Ordering::SeqCst);
        if before > quarter && before - len <= quarter {
            pressure.notify();
        }
    }
}

/// Where blocked producers wait for "writable again": notified only on
/// those transitions, and only when someone waits.
#[derive(Debug, Default)]
pub(super) struct Pressure {
    lock: Mutex<()>,
    cv: Condvar,
    waiters: AtomicUsize,
}

impl Pressure {
    /// Blocks until `ready()` or `deadline` (spurious returns allowed).
    pub(super) fn wait_until(&self, deadline: Instant, ready: impl Fn() -> bool) {
        let guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.waiters.fetch_add(1, Ordering::SeqCst);
        // Checked under the lock, after announcing ourselves: a transition
        // after this check notifies under the same lock, so it is not lost.
        if !ready() {
            if let Some(left) = deadline.checked_duration_since(Instant::now()) {
                let _ = self.cv.wait_timeout(guard, left);
            }
        }
        self.waiters.fetch_sub(1, Ordering::SeqCst);
    }

    /// Something became writable: wake the waiting producers, if any.
    pub(super) fn notify(&self) {
        fence(Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) > 0 {
            let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.cv.notify_all();
        }
    }
}
