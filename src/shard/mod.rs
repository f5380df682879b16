//! Every core: shards above the engine, and broadcast groups.
//!
//! A [`Mover`](crate::Mover) is one thread and one ring. [`Shards`] runs `N` of them, one
//! per thread, each built on its own thread (a single-issuer ring stays
//! single-issuer). A connection is placed on one shard when it is attached
//! and stays there; any thread hands work to it through the shard's queue
//! (a [`Packet`] is its pieces behind one reference count, so nothing is
//! copied on the way), and wakes the
//! shard through its [`crate::Waker`] only when the shard may be
//! asleep. A shard with nothing to do sleeps in the kernel.
//!
//! On top of the shards, a [`Group`] is a set of subscribers: [`Group::publish`]
//! queues one message per shard that has subscribers, each shard queues the
//! same [`Packet`] on every subscriber it holds ([`Mover::send_packet`](crate::Mover::send_packet): one
//! reference count each, however many pieces) and flushes them all in one
//! submission. A subscriber that falls more than [`GroupOptions::limit`]
//! bytes behind is handled by the [`SlowPolicy`] the caller picked, and
//! reported as an [`Event`].
//!
//! ```no_run
//! use std::time::Duration;
//! use bytes::Bytes;
//! use ringmover::shard::{Event, GroupOptions, Shards, SlowPolicy};
//! # fn main() -> std::io::Result<()> {
//! let (shards, events) = Shards::builder().threads(2).build()?;
//! let group = shards.group(GroupOptions::new(4 << 20, SlowPolicy::Disconnect));
//! for _ in 0..4 {
//!     let conn = shards.attach(std::net::TcpStream::connect("127.0.0.1:7000")?)?;
//!     group.subscribe(conn)?;
//! }
//! let payload = Bytes::from(vec![0u8; 64 << 10]);
//! for i in 0u32..100 {
//!     let header = Bytes::copy_from_slice(&i.to_be_bytes());
//!     // Waits (at most 1 s) while a subscriber is over half its limit.
//!     group.publish_wait([header, payload.clone()], Duration::from_secs(1))?;
//! }
//! while let Some(ev) = events.try_recv() {
//!     if let Event::Disconnected { conn, dropped_bytes, .. } = ev {
//!         eprintln!("{conn} was too slow: {dropped_bytes} bytes dropped");
//!     }
//! }
//! let report = shards.shutdown(Duration::from_secs(2));
//! assert_eq!(report.unsent_bytes(), 0);
//! # Ok(()) }
//! ```
//!
//! Memory is bounded when producers outrun the network: each shard's queue
//! holds at most [`ShardsBuilder::queue_bytes`] (a publish or send over it
//! is refused with [`PublishErrorKind::Full`]), and each subscriber at most
//! its group's limit (then the policy applies). Per subscriber, packets
//! arrive in the order the shard took them from its queue: one producer's
//! packets in the order it published them.

use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::backend::Backend;
use crate::mover::{Conn, Detached, MoverBuilder};
/// The packet type producers hand the shards: [`crate::Packet`], the same
/// one [`Mover::send_packet`](crate::Mover::send_packet) queues.
pub use crate::packet::Packet;
use crate::wake::Waker;

mod group;
mod worker;

pub use group::Group;
use group::{GroupShared, Pressure};
use worker::Shard;

/// What a queued message costs beyond its bytes (as Netty counts a fixed
/// overhead per entry), so a flood of empty packets is bounded too.
const MSG_OVERHEAD: usize = 64;
/// Messages a shard takes from its queue before it flushes and reaps
/// completions, so a busy queue cannot starve the sockets.
const ROUND: usize = 1024;
/// How long dropping [`Shards`] without [`Shards::shutdown`] lets queued
/// bytes drain.
const DROP_GRACE: Duration = Duration::from_secs(2);

/// What a shard's queue charges a message of `packet`.
fn cost(packet: &Packet) -> usize {
    packet.len() + MSG_OVERHEAD
}

/// A connection attached to [`Shards`]: which shard holds it, and its
/// handle there. Cheap to copy; stale handles are rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardConn {
    shard: u32,
    conn: Conn,
}

impl ShardConn {
    /// The shard (thread) that owns the connection, `0..threads`.
    pub fn shard(self) -> usize {
        self.shard as usize
    }

    /// The connection's handle on its shard's [`Mover`](crate::Mover).
    pub fn conn(self) -> Conn {
        self.conn
    }
}

impl fmt::Display for ShardConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shard {} conn {}", self.shard, self.conn.index())
    }
}

/// A broadcast group's identity, as events name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(u32);

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "group {}", self.0)
    }
}

/// What happens to a subscriber that falls more than its group's limit
/// behind (its peer reads slower than the group publishes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SlowPolicy {
    /// Skip whole packets for it until it has caught up to a quarter of
    /// the limit ([`Event::Dropped`], then [`Event::Writable`]): its stream
    /// has gaps at packet boundaries, and it stays connected.
    Drop,
    /// Disconnect it (nats-server's slow consumer): what it had queued is
    /// dropped and its socket closed ([`Event::Disconnected`]).
    Disconnect,
}

/// A group's limits. A subscriber is *lagging* above half the limit: the
/// group is not [`writable`](Group::writable) then, and
/// [`Group::publish_wait`] waits for it, for at most `stall` per lagging
/// spell (after that it stops holding producers back, as nats-server stalls
/// a fast producer only briefly). It is caught up again at a quarter of the
/// limit, and handled by the policy when a packet would take it over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupOptions {
    /// Bytes a subscriber may have queued and unwritten; must exceed the
    /// largest packet (best: at least four of them).
    pub limit: usize,
    /// What to do with a subscriber that would exceed `limit`.
    pub policy: SlowPolicy,
    /// How long one lagging subscriber may hold producers back.
    pub stall: Duration,
}

impl GroupOptions {
    /// `limit` bytes per subscriber, `policy`, and a 100 ms stall.
    pub fn new(limit: usize, policy: SlowPolicy) -> GroupOptions {
        GroupOptions {
            limit,
            policy,
            stall: Duration::from_millis(100),
        }
    }

    /// The same, with `stall` instead.
    pub fn stall(self, stall: Duration) -> GroupOptions {
        GroupOptions { stall, ..self }
    }
}

/// What the shards report, in the order each shard saw it. Delivered
/// through [`Events`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// A write failed (`EPIPE`, `ECONNRESET`, …): the connection was
    /// detached and closed, and left every group.
    Failed {
        /// The connection.
        conn: ShardConn,
        /// The kernel's error.
        error: io::Error,
        /// Exactly the bytes that were queued and not written.
        unsent: Vec<Bytes>,
    },
    /// A write finished (only with [`ShardsBuilder::report_writes`]).
    Written {
        /// The connection.
        conn: ShardConn,
        /// Bytes this write moved.
        written: usize,
        /// Bytes still queued on the connection.
        queued: usize,
    },
    /// [`Shards::send`] reached the shard but the connection refused it:
    /// at its byte limit (`WouldBlock`; [`Event::Writable`] follows), failed
    /// or detached. The packet comes back.
    Refused {
        /// The connection.
        conn: ShardConn,
        /// Why, as the connection's [`Mover::send_packet`](crate::Mover::send_packet) said.
        error: io::Error,
        /// What was not queued.
        packet: Packet,
    },
    /// [`SlowPolicy::Drop`]: packets were skipped for a subscriber over the
    /// group's limit, since the last such event for it (one per shard round).
    Dropped {
        /// The group.
        group: GroupId,
        /// The subscriber.
        conn: ShardConn,
        /// Packets skipped.
        packets: u64,
        /// Their bytes.
        bytes: u64,
    },
    /// [`SlowPolicy::Disconnect`]: a subscriber over the group's limit was
    /// detached and its socket closed.
    Disconnected {
        /// The group whose limit it exceeded.
        group: GroupId,
        /// The subscriber.
        conn: ShardConn,
        /// What it had queued and unwritten, plus the packet that did not
        /// fit.
        dropped_bytes: u64,
    },
    /// A connection that was refused ([`Event::Refused`]) or was skipping
    /// packets ([`Event::Dropped`]) has caught up.
    Writable {
        /// The connection.
        conn: ShardConn,
        /// The group whose packets it skipped, if any.
        group: Option<GroupId>,
    },
    /// A shard whose queue refused a publish or send
    /// ([`PublishErrorKind::Full`]) has room again.
    ShardWritable {
        /// The shard.
        shard: usize,
    },
    /// A shard's engine failed (an `io_uring_enter` error, say): it stopped;
    /// its connections are in the shutdown report.
    ShardFailed {
        /// The shard.
        shard: usize,
        /// What failed.
        error: io::Error,
    },
}

/// The receiving end of the shards' events. The channel is bounded
/// ([`ShardsBuilder::events_capacity`]): when the caller does not keep up,
/// further events are counted in [`lost`](Events::lost), not queued.
#[derive(Debug)]
pub struct Events {
    rx: Receiver<Event>,
    lost: Arc<AtomicU64>,
}

impl Events {
    /// The next event, waiting at most `timeout`; `None` on timeout or when
    /// every shard has stopped and nothing is left.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<Event> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// The next event, if one is waiting.
    pub fn try_recv(&self) -> Option<Event> {
        self.rx.try_recv().ok()
    }

    /// Events not delivered because the channel was full.
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }
}

/// Why a publish or send was not queued. The packet comes back.
#[derive(Debug)]
pub struct PublishError {
    /// What went wrong.
    pub kind: PublishErrorKind,
    /// The caller's packet.
    pub packet: Packet,
}

/// The reasons a publish or send is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PublishErrorKind {
    /// The shard's queue holds its byte limit: retry after
    /// [`Event::ShardWritable`], or use [`Group::publish_wait`].
    Full {
        /// The shard.
        shard: usize,
        /// Bytes queued for it (packets plus a fixed cost per message).
        queued: usize,
        /// Its limit.
        limit: usize,
    },
    /// The shard has stopped (its engine failed).
    Closed {
        /// The shard.
        shard: usize,
    },
    /// [`Shards::shutdown`] was called (or the `Shards` dropped).
    ShutDown,
    /// No such shard.
    UnknownShard,
}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            PublishErrorKind::Full {
                shard,
                queued,
                limit,
            } => write!(
                f,
                "shard {shard} has {queued} bytes queued, at its limit of {limit}: \
                 wait for it to drain"
            ),
            PublishErrorKind::Closed { shard } => write!(f, "shard {shard} has stopped"),
            PublishErrorKind::ShutDown => f.write_str("the shards were shut down"),
            PublishErrorKind::UnknownShard => f.write_str("no such shard"),
        }
    }
}

impl std::error::Error for PublishError {}

impl From<PublishError> for io::Error {
    fn from(e: PublishError) -> io::Error {
        let kind = match e.kind {
            PublishErrorKind::Full { .. } => io::ErrorKind::WouldBlock,
            PublishErrorKind::Closed { .. } | PublishErrorKind::ShutDown => {
                io::ErrorKind::BrokenPipe
            }
            PublishErrorKind::UnknownShard => io::ErrorKind::NotFound,
        };
        io::Error::new(kind, e.to_string())
    }
}

/// One shard's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShardStats {
    /// Connections attached to it.
    pub conns: usize,
    /// Bytes waiting in its queue (packets plus a fixed cost per message).
    pub queued: usize,
    /// Rounds: take from the queue, flush, reap completions.
    pub rounds: u64,
    /// Times it went to sleep in the kernel with nothing to do but wait.
    pub sleeps: u64,
    /// Times a producer wrote its eventfd (the shard may have been asleep);
    /// every other hand-over skipped the syscall.
    pub wakes: u64,
    /// Messages taken from its queue.
    pub messages: u64,
    /// Asleep (or about to be) right now.
    pub sleeping: bool,
}

/// What [`Shards::shutdown`] could not send.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Per shard, in order.
    pub shards: Vec<ShardReport>,
}

impl ShutdownReport {
    /// Every byte that was queued and not written, over all shards.
    pub fn unsent_bytes(&self) -> u64 {
        self.shards.iter().map(ShardReport::unsent_bytes).sum()
    }
}

/// One shard's part of a [`ShutdownReport`].
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct ShardReport {
    /// The shard.
    pub shard: usize,
    /// Connections that still had bytes queued when the grace period
    /// ended, with exactly those bytes (their sockets are closed).
    pub unsent: Vec<(ShardConn, Vec<Bytes>)>,
    /// Bytes of publishes and sends that reached the shard after it was
    /// told to stop, never queued to a connection.
    pub rejected_bytes: u64,
    /// Why the shard stopped early, if its engine failed.
    pub error: Option<io::Error>,
}

impl ShardReport {
    /// Bytes queued and not written, plus rejected bytes.
    pub fn unsent_bytes(&self) -> u64 {
        let queued: usize = self
            .unsent
            .iter()
            .flat_map(|(_, b)| b.iter().map(Bytes::len))
            .sum();
        queued as u64 + self.rejected_bytes
    }
}

/// Builds [`Shards`].
#[derive(Debug, Clone)]
pub struct ShardsBuilder {
    threads: usize,
    mover: MoverBuilder,
    queue_bytes: usize,
    events_capacity: usize,
    report_writes: bool,
}

impl Default for ShardsBuilder {
    fn default() -> Self {
        ShardsBuilder {
            threads: 1,
            mover: MoverBuilder::default(),
            queue_bytes: 64 << 20,
            events_capacity: 64 << 10,
            report_writes: false,
        }
    }
}

impl ShardsBuilder {
    /// Shards (threads), each with its own [`Mover`](crate::Mover); default 1.
    pub fn threads(mut self, n: usize) -> Self {
        self.threads = n;
        self
    }

    /// How each shard's [`Mover`](crate::Mover) is built (backend, queue depth,
    /// per-connection byte limit, zero-copy policy). Each shard builds its
    /// own on its own thread. To publish from registered memory, give it
    /// one pool with [`MoverBuilder::fixed_pool`]: every shard's ring
    /// registers it, and a payload leased from it (by any thread, with
    /// [`FixedBufPool::lease`](crate::FixedBufPool::lease)) goes out of
    /// every shard without a copy. (With
    /// [`fixed_buffers`](MoverBuilder::fixed_buffers) each shard would get
    /// a pool of its own that only its thread can lease from.)
    pub fn mover(mut self, builder: MoverBuilder) -> Self {
        self.mover = builder;
        self
    }

    /// Bytes a shard's queue may hold before publishes and sends to it are
    /// refused with [`PublishErrorKind::Full`] (default 64 MiB); writable
    /// again ([`Event::ShardWritable`]) at half.
    pub fn queue_bytes(mut self, limit: usize) -> Self {
        self.queue_bytes = limit;
        self
    }

    /// Events buffered for the caller before further ones are counted as
    /// lost (default 65536).
    pub fn events_capacity(mut self, n: usize) -> Self {
        self.events_capacity = n;
        self
    }

    /// Report every finished write as [`Event::Written`] (default off:
    /// only failures and back-pressure changes are reported).
    pub fn report_writes(mut self, on: bool) -> Self {
        self.report_writes = on;
        self
    }

    /// Starts the shard threads; each builds its [`Mover`](crate::Mover) and reports
    /// back before this returns. Fails (stopping those already started) if
    /// any cannot, naming the shard.
    pub fn build(self) -> io::Result<(Shards, Events)> {
        if self.threads == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "shards: need at least one thread",
            ));
        }
        let (ev_tx, ev_rx) = mpsc::sync_channel(self.events_capacity.max(1));
        let lost = Arc::new(AtomicU64::new(0));
        let mut links = Vec::new();
        let mut threads = Vec::new();
        let mut backend = None;
        let mut failed = None;
        for index in 0..self.threads {
            let (tx, rx) = mpsc::channel();
            let (ready_tx, ready_rx) = mpsc::sync_channel(1);
            let builder = self.mover.clone();
            let events = EventTx {
                tx: ev_tx.clone(),
                lost: lost.clone(),
            };
            let report_writes = self.report_writes;
            let spawned = std::thread::Builder::new()
                .name(format!("ringmover-shard-{index}"))
                .spawn(move || {
                    // Built here: the ring's single issuer is this thread.
                    let mover = builder.build().and_then(|mut m| {
                        let waker = m.waker()?;
                        Ok((m, waker))
                    });
                    let (mover, waker) = match mover {
                        Ok(v) => v,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return ShardReport {
                                shard: index,
                                ..ShardReport::default()
                            };
                        }
                    };
                    let (link_tx, link_rx) = mpsc::sync_channel::<Arc<Inner>>(1);
                    if ready_tx
                        .send(Ok((waker, mover.backend(), link_tx)))
                        .is_err()
                    {
                        return ShardReport::default();
                    }
                    // The shared state exists once every shard is up.
                    let Ok(inner) = link_rx.recv() else {
                        return ShardReport::default();
                    };
                    Shard::new(index, mover, rx, inner, events, report_writes).run()
                });
            let handle = match spawned {
                Ok(h) => h,
                Err(e) => {
                    failed = Some(io::Error::new(
                        e.kind(),
                        format!("shard {index}: spawning its thread: {e}"),
                    ));
                    break;
                }
            };
            match ready_rx.recv() {
                Ok(Ok((waker, b, link_tx))) => {
                    backend = Some(b);
                    links.push((ShardLink::new(tx, waker), link_tx));
                    threads.push(handle);
                }
                Ok(Err(e)) => {
                    let _ = handle.join();
                    failed = Some(io::Error::new(
                        e.kind(),
                        format!("shard {index}: building its Mover: {e}"),
                    ));
                    break;
                }
                Err(_) => {
                    let _ = handle.join();
                    failed = Some(io::Error::other(format!(
                        "shard {index}: its thread ended while starting"
                    )));
                    break;
                }
            }
        }
        let (links, starts): (Vec<ShardLink>, Vec<SyncSender<Arc<Inner>>>) =
            links.into_iter().unzip();
        let inner = Arc::new(Inner {
            shards: links,
            queue_limit: self.queue_bytes.max(1),
            next: AtomicUsize::new(0),
            next_group: AtomicU32::new(0),
            pressure: Pressure::default(),
            stopped: AtomicBool::new(false),
        });
        if let Some(e) = failed {
            // Dropping the start channels ends the threads already started.
            drop(starts);
            for t in threads {
                let _ = t.join();
            }
            return Err(e);
        }
        for s in starts {
            let _ = s.send(inner.clone());
        }
        let shards = Shards {
            inner,
            threads,
            backend: backend.unwrap_or(Backend::Poll),
        };
        Ok((shards, Events { rx: ev_rx, lost }))
    }
}

/// `N` threads, each owning a [`Mover`](crate::Mover) and its ring; connections placed on
/// them, work handed over without copies, and broadcast [`Group`]s.
///
/// `Send + Sync`: share it (by reference, or in an `Arc`) with every thread
/// that attaches, sends or publishes. Dropping it without
/// [`shutdown`](Self::shutdown) shuts down with a 2 s grace period.
///
/// ```no_run
/// use std::time::Duration;
/// use bytes::Bytes;
/// use ringmover::shard::{Event, Shards};
/// # fn main() -> std::io::Result<()> {
/// let (shards, events) = Shards::builder().threads(2).build()?;
/// let conn = shards.attach(std::net::TcpStream::connect("127.0.0.1:7000")?)?;
/// println!("placed on shard {}", conn.shard());
/// shards.send(conn, [Bytes::from_static(b"HDR"), Bytes::from(vec![1u8; 4096])])?;
/// if let Some(Event::Failed { conn, error, .. }) = events.recv_timeout(Duration::from_millis(10)) {
///     eprintln!("{conn}: {error}");
/// }
/// let report = shards.shutdown(Duration::from_secs(1));
/// println!("{} bytes not sent", report.unsent_bytes());
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Shards {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<ShardReport>>,
    backend: Backend,
}

impl Shards {
    /// A builder with defaults (one thread).
    pub fn builder() -> ShardsBuilder {
        ShardsBuilder::default()
    }

    /// How many shards (threads).
    pub fn threads(&self) -> usize {
        self.inner.shards.len()
    }

    /// The backend every shard's [`Mover`](crate::Mover) uses.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Attaches `fd` to the shard with the fewest connections (ties taken in
    /// turn), on that shard's thread. The handle says which shard.
    pub fn attach(&self, fd: impl Into<OwnedFd>) -> io::Result<ShardConn> {
        let n = self.inner.shards.len();
        let start = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let shard = (0..n)
            .map(|k| (start + k) % n)
            .min_by_key(|&i| self.inner.shards[i].conns.load(Ordering::Relaxed))
            .unwrap_or(0);
        self.attach_to(shard, fd)
    }

    /// Attaches `fd` to shard `shard`.
    pub fn attach_to(&self, shard: usize, fd: impl Into<OwnedFd>) -> io::Result<ShardConn> {
        let (reply, rx) = mpsc::sync_channel(1);
        self.inner.control(
            shard,
            Cmd::Attach {
                fd: fd.into(),
                reply,
            },
        )?;
        let conn = answer(shard, rx)??;
        Ok(ShardConn {
            shard: shard as u32,
            conn,
        })
    }

    /// Detaches `conn` from its shard (leaving every group), giving back its
    /// fd and whatever it had not sent; a write in flight is cancelled first.
    pub fn detach(&self, conn: ShardConn) -> io::Result<Detached> {
        let (reply, rx) = mpsc::sync_channel(1);
        self.inner.control(
            conn.shard(),
            Cmd::Detach {
                conn: conn.conn,
                reply,
            },
        )?;
        answer(conn.shard(), rx)?
    }

    /// Queues `packet` on `conn` from any thread: one message to its shard,
    /// no copy on the way (the shard queues it with
    /// [`Mover::send_packet`](crate::Mover::send_packet), which copies small pieces as they are queued). Refused at once when the shard's queue is full; if the
    /// connection itself refuses it on the shard, [`Event::Refused`] brings
    /// it back.
    pub fn send(&self, conn: ShardConn, packet: impl Into<Packet>) -> Result<(), PublishError> {
        let packet = packet.into();
        let shard = conn.shard();
        if let Err(kind) = self.inner.room(shard) {
            return Err(PublishError { kind, packet });
        }
        let cost = cost(&packet);
        self.inner
            .push(
                shard,
                Cmd::Send {
                    conn: conn.conn,
                    packet,
                },
                cost,
            )
            .map_err(|cmd| PublishError {
                kind: PublishErrorKind::Closed { shard },
                packet: cmd.into_packet(),
            })
    }

    /// A new, empty broadcast group.
    pub fn group(&self, options: GroupOptions) -> Group {
        let id = GroupId(self.inner.next_group.fetch_add(1, Ordering::Relaxed));
        Group {
            inner: self.inner.clone(),
            shared: Arc::new(GroupShared {
                id,
                options,
                per_shard: (0..self.inner.shards.len())
                    .map(|_| AtomicUsize::new(0))
                    .collect(),
                lagging: AtomicUsize::new(0),
                pending: (0..self.inner.shards.len())
                    .map(|_| AtomicUsize::new(0))
                    .collect(),
            }),
        }
    }

    /// Each shard's counters.
    pub fn stats(&self) -> Vec<ShardStats> {
        self.inner
            .shards
            .iter()
            .map(|s| ShardStats {
                conns: s.conns.load(Ordering::Relaxed),
                queued: s.queued.load(Ordering::Relaxed),
                rounds: s.rounds.load(Ordering::Relaxed),
                sleeps: s.sleeps.load(Ordering::Relaxed),
                wakes: s.wakes.load(Ordering::Relaxed),
                messages: s.messages.load(Ordering::Relaxed),
                sleeping: s.sleeping.load(Ordering::SeqCst),
            })
            .collect()
    }

    /// Stops every shard: each first takes everything queued before this
    /// call, then flushes for at most `grace` while connections still have
    /// bytes queued, then closes them all. Returns what was not sent; the
    /// threads are joined. Publishes that race with it are refused
    /// ([`PublishErrorKind::Closed`]) or counted as rejected.
    pub fn shutdown(mut self, grace: Duration) -> ShutdownReport {
        self.stop(grace)
    }

    fn stop(&mut self, grace: Duration) -> ShutdownReport {
        self.inner.stopped.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + grace;
        for i in 0..self.inner.shards.len() {
            let _ = self.inner.control(i, Cmd::Shutdown { deadline });
        }
        let mut report = ShutdownReport::default();
        for (i, t) in self.threads.drain(..).enumerate() {
            match t.join() {
                Ok(r) => report.shards.push(r),
                Err(_) => report.shards.push(ShardReport {
                    shard: i,
                    error: Some(io::Error::other(format!("shard {i} panicked"))),
                    ..ShardReport::default()
                }),
            }
        }
        report
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop(DROP_GRACE);
        }
    }
}
/// State every thread shares.
#[derive(Debug)]
struct Inner {
    shards: Vec<ShardLink>,
    queue_limit: usize,
    /// Where placement's round-robin tie-break starts next.
    next: AtomicUsize,
    next_group: AtomicU32,
    pressure: Pressure,
    /// `Shards::shutdown` was called: publishes and sends are refused.
    stopped: AtomicBool,
}

/// A producer's view of one shard.
#[derive(Debug)]
struct ShardLink {
    tx: Sender<Cmd>,
    waker: Waker,
    /// The shard is asleep or about to be: whoever hands it work next must
    /// write its eventfd. Changed only by `swap`/`store` with the fences
    /// described in `push` and `Shard::park`.
    sleeping: AtomicBool,
    /// Bytes charged for messages in its queue.
    queued: AtomicUsize,
    /// A producer was refused for a full queue: report writable again.
    over: AtomicBool,
    conns: AtomicUsize,
    rounds: AtomicU64,
    sleeps: AtomicU64,
    wakes: AtomicU64,
    messages: AtomicU64,
}

impl ShardLink {
    fn new(tx: Sender<Cmd>, waker: Waker) -> ShardLink {
        ShardLink {
            tx,
            waker,
            sleeping: AtomicBool::new(false),
            queued: AtomicUsize::new(0),
            over: AtomicBool::new(false),
            conns: AtomicUsize::new(0),
            rounds: AtomicU64::new(0),
            sleeps: AtomicU64::new(0),
            wakes: AtomicU64::new(0),
            messages: AtomicU64::new(0),
        }
    }
}

impl Inner {
    fn link(&self, shard: usize) -> Result<&ShardLink, PublishErrorKind> {
        self.shards.get(shard).ok_or(PublishErrorKind::UnknownShard)
    }

    /// Whether shard `shard`'s queue takes another message. When it does
    /// not, marks it so the shard reports [`Event::ShardWritable`].
    fn room(&self, shard: usize) -> Result<(), PublishErrorKind> {
        let link = self.link(shard)?;
        if self.stopped.load(Ordering::Relaxed) {
            return Err(PublishErrorKind::ShutDown);
        }
        let queued = link.queued.load(Ordering::SeqCst);
        if queued < self.queue_limit {
            return Ok(());
        }
        link.over.store(true, Ordering::SeqCst);
        // The shard checks `over` after draining (with a fence between): if
        // this load still sees a full queue, the shard's later check sees
        // `over`; if the queue drained meanwhile, say so ourselves.
        fence(Ordering::SeqCst);
        let queued = link.queued.load(Ordering::SeqCst);
        if queued <= self.queue_limit / 2 && link.over.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        Err(PublishErrorKind::Full {
            shard,
            queued,
            limit: self.queue_limit,
        })
    }

    /// Hands `cmd` to shard `shard`, charging `cost` against its queue, and
    /// wakes it if it may be asleep. `Err` gives the command back when the
    /// shard has stopped.
    fn push(&self, shard: usize, cmd: Cmd, cost: usize) -> Result<(), Cmd> {
        let Ok(link) = self.link(shard) else {
            return Err(cmd);
        };
        link.queued.fetch_add(cost, Ordering::Relaxed);
        if let Err(mpsc::SendError(cmd)) = link.tx.send(cmd) {
            link.queued.fetch_sub(cost, Ordering::Relaxed);
            return Err(cmd);
        }
        // Pairs with the fence in `Shard::park` (store-buffering): either
        // the shard's re-check of its queue sees this message, or this
        // sees it asleep and wakes it. Only the producer that flips
        // `sleeping` back writes the eventfd.
        fence(Ordering::SeqCst);
        if link.sleeping.swap(false, Ordering::SeqCst) {
            link.wakes.fetch_add(1, Ordering::Relaxed);
            // Fails only on a closed fd, which the shard keeps open.
            let _ = link.waker.wake();
        }
        Ok(())
    }

    /// A control message (never refused for a full queue).
    fn control(&self, shard: usize, cmd: Cmd) -> io::Result<()> {
        if shard >= self.shards.len() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no shard {shard}"),
            ));
        }
        self.push(shard, cmd, 0).map_err(|_| {
            io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("shard {shard} has stopped"),
            )
        })
    }
}

/// Waits for a shard's answer to a control message.
fn answer<T>(shard: usize, rx: Receiver<T>) -> io::Result<T> {
    rx.recv().map_err(|_| {
        io::Error::new(
            io::ErrorKind::BrokenPipe,
            format!("shard {shard} stopped before answering"),
        )
    })
}

/// What producers hand a shard.
enum Cmd {
    Attach {
        fd: OwnedFd,
        reply: SyncSender<io::Result<Conn>>,
    },
    Detach {
        conn: Conn,
        reply: SyncSender<io::Result<Detached>>,
    },
    Send {
        conn: Conn,
        packet: Packet,
    },
    Subscribe {
        group: Arc<GroupShared>,
        conn: Conn,
        reply: SyncSender<io::Result<()>>,
    },
    Unsubscribe {
        group: GroupId,
        conn: Conn,
        reply: SyncSender<io::Result<()>>,
    },
    Publish {
        group: Arc<GroupShared>,
        packet: Packet,
    },
    Shutdown {
        deadline: Instant,
    },
}

impl Cmd {
    /// The queue bytes it was charged.
    fn cost(&self) -> usize {
        match self {
            Cmd::Send { packet, .. } | Cmd::Publish { packet, .. } => cost(packet),
            _ => 0,
        }
    }

    fn into_packet(self) -> Packet {
        match self {
            Cmd::Send { packet, .. } | Cmd::Publish { packet, .. } => packet,
            _ => Packet::default(),
        }
    }
}

/// A shard's sending half of the events channel.
#[derive(Debug)]
struct EventTx {
    tx: SyncSender<Event>,
    lost: Arc<AtomicU64>,
}

impl EventTx {
    fn send(&self, ev: Event) {
        match self.tx.try_send(ev) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                self.lost.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl fmt::Debug for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Cmd::Attach { .. } => "Attach",
            Cmd::Detach { .. } => "Detach",
            Cmd::Send { .. } => "Send",
            Cmd::Subscribe { .. } => "Subscribe",
            Cmd::Unsubscribe { .. } => "Unsubscribe",
            Cmd::Publish { .. } => "Publish",
            Cmd::Shutdown { .. } => "Shutdown",
        };
        f.write_str(name)
    }
}
