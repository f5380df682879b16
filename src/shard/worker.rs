//! One shard: the thread that owns a `Mover` and its ring, takes what
//! producers queued, and applies each group's slow-subscriber policy.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{fence, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{
    Cmd, Event, EventTx, GroupId, GroupOptions, GroupShared, Inner, Packet, Pressure, ShardConn,
    ShardLink, ShardReport, SlowPolicy, ROUND,
};
use crate::mover::{Completion, Conn, Mover, SendErrorKind};

/// A subscriber's standing in one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SubState {
    /// At most half the limit queued (or back under a quarter).
    Normal,
    /// Above half the limit: counted in the group's `lagging`.
    Lagging,
    /// Lagging for longer than the group's stall: no longer counted.
    Slow,
    /// Over the limit under `SlowPolicy::Drop`: skipping packets until it
    /// is back under a quarter.
    Dropping,
}

#[derive(Debug)]
struct Sub {
    conn: Conn,
    state: SubState,
    /// When it last started lagging.
    since: Instant,
}

/// A group as one shard sees it: its subscribers there.
#[derive(Debug)]
struct ShardGroup {
    shared: Arc<GroupShared>,
    subs: Vec<Sub>,
    index: HashMap<Conn, usize>,
}

/// What a shard keeps per connection.
#[derive(Debug)]
struct ConnInfo {
    conn: Conn,
    groups: Vec<GroupId>,
    /// Memberships not `Normal`, plus one while a send was refused:
    /// completions are only inspected for these.
    flagged: usize,
    /// The byte limit a refused send hit: writable again at half.
    refused_at: Option<usize>,
}

/// One shard: its thread's engine and the connections on it.
pub(super) struct Shard {
    index: usize,
    mover: Mover,
    rx: Receiver<Cmd>,
    inner: Arc<Inner>,
    events: EventTx,
    report_writes: bool,
    /// By `Conn::index()`.
    conns: Vec<Option<ConnInfo>>,
    groups: HashMap<GroupId, ShardGroup>,
    done: Vec<Completion>,
    /// Packets skipped this round, per (group, subscriber).
    drops: HashMap<(GroupId, Conn), (u64, u64)>,
    /// A message taken while deciding whether to sleep.
    pending: Option<Cmd>,
    /// Shutting down: flush until then.
    stop: Option<Instant>,
    report: ShardReport,
}

impl Shard {
    pub(super) fn new(
        index: usize,
        mover: Mover,
        rx: Receiver<Cmd>,
        inner: Arc<Inner>,
        events: EventTx,
        report_writes: bool,
    ) -> Shard {
        Shard {
            index,
            mover,
            rx,
            inner,
            events,
            report_writes,
            conns: Vec::new(),
            groups: HashMap::new(),
            done: Vec::new(),
            drops: HashMap::new(),
            pending: None,
            stop: None,
            report: ShardReport {
                shard: index,
                ..ShardReport::default()
            },
        }
    }

    fn link(&self) -> &ShardLink {
        &self.inner.shards[self.index]
    }

    fn handle(&self, conn: Conn) -> ShardConn {
        ShardConn {
            shard: self.index as u32,
            conn,
        }
    }

    /// The shard's loop: take what the queue holds (up to a round), queue it
    /// on the connections, flush once, then reap completions, sleeping in
    /// the kernel when there is nothing else to do.
    pub(super) fn run(mut self) -> ShardReport {
        if let Err(e) = self.serve() {
            self.events.send(Event::ShardFailed {
                shard: self.index,
                error: io::Error::new(e.kind(), e.to_string()),
            });
            self.report.error = Some(e);
        }
        self.close_all();
        // Anything still queued (or sent until the receiver drops) is refused.
        self.reject_rest();
        self.report
    }

    fn serve(&mut self) -> io::Result<()> {
        loop {
            let took = self.take_round();
            self.mover.flush()?;
            self.emit_drops();
            self.link().rounds.fetch_add(1, Ordering::Relaxed);
            self.check_room();
            if let Some(deadline) = self.stop {
                if self.flushed() || Instant::now() >= deadline {
                    return Ok(());
                }
                self.mover.wait(Some(Duration::ZERO), &mut self.done)?;
                if took == 0 && self.done.is_empty() {
                    let left = deadline.saturating_duration_since(Instant::now());
                    self.mover.wait(Some(left), &mut self.done)?;
                }
            } else if took == ROUND {
                // More is queued: reap without sleeping, then go on.
                self.mover.wait(Some(Duration::ZERO), &mut self.done)?;
            } else {
                self.park()?;
            }
            self.completions();
        }
    }

    /// Sleeps in the kernel until a completion or a producer's wake, unless
    /// the queue turns out not to be empty after all.
    fn park(&mut self) -> io::Result<()> {
        let link = &self.inner.shards[self.index];
        link.sleeping.store(true, Ordering::SeqCst);
        // Pairs with the fence in `Inner::push`: a message pushed before
        // this is seen by the try_recv below; one pushed after sees
        // `sleeping` and writes the eventfd.
        fence(Ordering::SeqCst);
        let busy = match self.rx.try_recv() {
            Ok(cmd) => {
                self.pending = Some(cmd);
                true
            }
            Err(TryRecvError::Empty) => self.room_pending(),
            // Every producer handle is gone (only when `Shards` is being
            // dropped, which sends `Shutdown` first).
            Err(TryRecvError::Disconnected) => true,
        };
        if busy {
            link.sleeping.store(false, Ordering::SeqCst);
            return self.mover.wait(Some(Duration::ZERO), &mut self.done);
        }
        link.sleeps.fetch_add(1, Ordering::Relaxed);
        let res = self.mover.wait(None, &mut self.done);
        self.inner.shards[self.index]
            .sleeping
            .store(false, Ordering::SeqCst);
        res
    }

    /// Takes up to a round of messages from the queue.
    fn take_round(&mut self) -> usize {
        let mut took = 0;
        while took < ROUND {
            let cmd = match self.pending.take() {
                Some(c) => c,
                None => match self.rx.try_recv() {
                    Ok(c) => c,
                    Err(_) => break,
                },
            };
            took += 1;
            let cost = cmd.cost();
            self.command(cmd);
            let link = self.link();
            link.messages.fetch_add(1, Ordering::Relaxed);
            if cost > 0 {
                link.queued.fetch_sub(cost, Ordering::SeqCst);
            }
        }
        took
    }

    /// A producer was refused for a full queue that has drained to half.
    fn room_pending(&self) -> bool {
        let link = self.link();
        link.over.load(Ordering::SeqCst)
            && link.queued.load(Ordering::SeqCst) <= self.inner.queue_limit / 2
    }

    /// Reports [`Event::ShardWritable`] once the queue drained after a refusal.
    fn check_room(&self) {
        // Pairs with the fence in `Inner::room`.
        fence(Ordering::SeqCst);
        if self.room_pending() && self.link().over.swap(false, Ordering::SeqCst) {
            self.events.send(Event::ShardWritable { shard: self.index });
            self.inner.pressure.notify();
        }
    }

    fn command(&mut self, cmd: Cmd) {
        if self.stop.is_some() {
            return self.reject(cmd);
        }
        match cmd {
            Cmd::Attach { fd, reply } => {
                let res = self.mover.attach(fd);
                if let Ok(conn) = res {
                    let i = conn.index() as usize;
                    if self.conns.len() <= i {
                        self.conns.resize_with(i + 1, || None);
                    }
                    self.conns[i] = Some(ConnInfo {
                        conn,
                        groups: Vec::new(),
                        flagged: 0,
                        refused_at: None,
                    });
                    self.link().conns.fetch_add(1, Ordering::Relaxed);
                }
                let _ = reply.send(res);
            }
            Cmd::Detach { conn, reply } => {
                let res = self.mover.detach(conn);
                if res.is_ok() {
                    self.forget(conn);
                }
                let _ = reply.send(res);
            }
            Cmd::Send { conn, packet } => {
                if let Err(e) = self.mover.send_packet(conn, packet) {
                    if let SendErrorKind::BackPressure { limit, .. } = e.kind {
                        if let Some(info) = self.info_mut(conn) {
                            if info.refused_at.is_none() {
                                info.flagged += 1;
                            }
                            info.refused_at = Some(limit);
                        }
                    }
                    let error = io::Error::from(crate::mover::SendError {
                        kind: e.kind,
                        bufs: (),
                    });
                    self.events.send(Event::Refused {
                        conn: self.handle(conn),
                        error,
                        packet: e.bufs,
                    });
                }
            }
            Cmd::Subscribe { group, conn, reply } => {
                let _ = reply.send(self.subscribe(group, conn));
            }
            Cmd::Unsubscribe { group, conn, reply } => {
                let res = if self.leave(group, conn) {
                    Ok(())
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("{} is not subscribed to {group}", self.handle(conn)),
                    ))
                };
                let _ = reply.send(res);
            }
            Cmd::Publish { group, packet } => {
                self.publish(group.id, &packet);
                group.taken(self.index, packet.len(), &self.inner.pressure);
            }
            Cmd::Shutdown { deadline } => self.stop = Some(deadline),
        }
    }

    /// A message that arrived after `Shutdown`: counted, and its fd closed.
    fn reject(&mut self, cmd: Cmd) {
        let stopped = || io::Error::new(io::ErrorKind::BrokenPipe, "the shard is shutting down");
        match cmd {
            Cmd::Attach { reply, .. } => {
                let _ = reply.send(Err(stopped()));
            }
            Cmd::Detach { reply, .. } => {
                let _ = reply.send(Err(stopped()));
            }
            Cmd::Subscribe { reply, .. } | Cmd::Unsubscribe { reply, .. } => {
                let _ = reply.send(Err(stopped()));
            }
            Cmd::Send { packet, .. } => self.report.rejected_bytes += packet.len() as u64,
            Cmd::Publish { group, packet } => {
                self.report.rejected_bytes += packet.len() as u64;
                group.taken(self.index, packet.len(), &self.inner.pressure);
            }
            Cmd::Shutdown { .. } => {}
        }
    }

    fn reject_rest(&mut self) {
        self.stop.get_or_insert_with(Instant::now);
        while let Some(cmd) = self.pending.take().or_else(|| self.rx.try_recv().ok()) {
            let cost = cmd.cost();
            self.reject(cmd);
            self.link().queued.fetch_sub(cost, Ordering::SeqCst);
        }
        self.check_room();
    }

    fn info_mut(&mut self, conn: Conn) -> Option<&mut ConnInfo> {
        info_of(&mut self.conns, conn)
    }

    fn subscribe(&mut self, group: Arc<GroupShared>, conn: Conn) -> io::Result<()> {
        let id = group.id;
        let handle = self.handle(conn);
        let Some(info) = info_of(&mut self.conns, conn) else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{handle}: unknown or detached connection"),
            ));
        };
        if info.groups.contains(&id) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{handle} is already subscribed to {id}"),
            ));
        }
        info.groups.push(id);
        let g = self.groups.entry(id).or_insert_with(|| ShardGroup {
            shared: group,
            subs: Vec::new(),
            index: HashMap::new(),
        });
        g.index.insert(conn, g.subs.len());
        g.subs.push(Sub {
            conn,
            state: SubState::Normal,
            since: Instant::now(),
        });
        Ok(())
    }

    /// Removes `conn` from group `id` here; false if it was not in it.
    fn leave(&mut self, id: GroupId, conn: Conn) -> bool {
        let Some(g) = self.groups.get_mut(&id) else {
            return false;
        };
        let Some(i) = g.index.remove(&conn) else {
            return false;
        };
        let sub = g.subs.swap_remove(i);
        if let Some(moved) = g.subs.get(i) {
            g.index.insert(moved.conn, i);
        }
        if sub.state == SubState::Lagging {
            unlag(&g.shared, &self.inner.pressure);
        }
        g.shared.per_shard[self.index].fetch_sub(1, Ordering::SeqCst);
        if g.subs.is_empty() {
            self.groups.remove(&id);
        }
        if let Some(info) = self.info_mut(conn) {
            info.groups.retain(|&g| g != id);
            if sub.state != SubState::Normal {
                info.flagged -= 1;
            }
        }
        true
    }

    /// `conn` is gone from the engine: leave every group, stop counting it.
    fn forget(&mut self, conn: Conn) {
        let groups = match self.info_mut(conn) {
            Some(info) => info.groups.clone(),
            None => return,
        };
        for id in groups {
            self.leave(id, conn);
        }
        self.conns[conn.index() as usize] = None;
        self.link().conns.fetch_sub(1, Ordering::Relaxed);
    }

    /// Queues `packet` on every subscriber of `id` held here, applying the
    /// group's limit.
    fn publish(&mut self, id: GroupId, packet: &Packet) {
        let Some(g) = self.groups.get_mut(&id) else {
            return;
        };
        let GroupOptions {
            limit,
            policy,
            stall,
        } = g.shared.options;
        let len = packet.len();
        let mut slow = Vec::new();
        let mut now = None;
        for sub in &mut g.subs {
            if sub.state == SubState::Lagging
                && now
                    .get_or_insert_with(Instant::now)
                    .duration_since(sub.since)
                    >= stall
            {
                // Held producers back long enough: stop counting it.
                sub.state = SubState::Slow;
                unlag(&g.shared, &self.inner.pressure);
            }
            if sub.state == SubState::Dropping {
                let d = self.drops.entry((id, sub.conn)).or_default();
                d.0 += 1;
                d.1 += len as u64;
                continue;
            }
            let queued = self.mover.queued(sub.conn).unwrap_or(0);
            let fits = queued.saturating_add(len) <= limit
                && match self.mover.send_packet(sub.conn, packet) {
                    Ok(()) => true,
                    // The engine's own per-connection limit: as over ours.
                    Err(e) if matches!(e.kind, SendErrorKind::BackPressure { .. }) => false,
                    // Failed: its completion reports it (then it leaves).
                    Err(_) => continue,
                };
            if fits {
                if sub.state == SubState::Normal && queued + len > limit / 2 {
                    sub.state = SubState::Lagging;
                    sub.since = Instant::now();
                    g.shared.lagging.fetch_add(1, Ordering::SeqCst);
                    flag(&mut self.conns, sub.conn, 1);
                }
                continue;
            }
            // Over the limit: the policy decides.
            match sub.state {
                SubState::Lagging => unlag(&g.shared, &self.inner.pressure),
                SubState::Normal => flag(&mut self.conns, sub.conn, 1),
                SubState::Slow | SubState::Dropping => {}
            }
            match policy {
                SlowPolicy::Drop => {
                    sub.state = SubState::Dropping;
                    let d = self.drops.entry((id, sub.conn)).or_default();
                    d.0 += 1;
                    d.1 += len as u64;
                }
                SlowPolicy::Disconnect => {
                    // Leaves the group below; `Dropping` so `leave` does not
                    // count it as lagging twice.
                    sub.state = SubState::Dropping;
                    slow.push(sub.conn);
                }
            }
        }
        for conn in slow {
            let mut dropped = len as u64;
            if let Ok(d) = self.mover.detach(conn) {
                dropped += d.unsent.iter().map(|b| b.len() as u64).sum::<u64>();
            }
            self.forget(conn);
            self.events.send(Event::Disconnected {
                group: id,
                conn: self.handle(conn),
                dropped_bytes: dropped,
            });
        }
    }

    /// One [`Event::Dropped`] per subscriber that skipped packets this round.
    fn emit_drops(&mut self) {
        for ((group, conn), (packets, bytes)) in self.drops.drain() {
            self.events.send(Event::Dropped {
                group,
                conn: ShardConn {
                    shard: self.index as u32,
                    conn,
                },
                packets,
                bytes,
            });
        }
    }

    /// Handles what `wait` reaped: failures, and catching up.
    fn completions(&mut self) {
        let mut done = std::mem::take(&mut self.done);
        for c in done.drain(..) {
            let conn = c.conn;
            if let Some(err) = c.error {
                // Detach frees the slot and closes the fd; the queue was
                // already handed back in the completion.
                let mut unsent = err.unsent;
                if let Ok(d) = self.mover.detach(conn) {
                    unsent.extend(d.unsent);
                }
                self.forget(conn);
                self.events.send(Event::Failed {
                    conn: self.handle(conn),
                    error: err.error,
                    unsent,
                });
                continue;
            }
            if self.report_writes {
                self.events.send(Event::Written {
                    conn: self.handle(conn),
                    written: c.written,
                    queued: c.queued,
                });
            }
            if self.info_mut(conn).is_some_and(|i| i.flagged > 0) {
                self.caught_up(conn, c.queued);
            }
        }
        self.done = done;
    }

    /// `conn` has `queued` bytes left: clear the states it has left behind.
    fn caught_up(&mut self, conn: Conn, queued: usize) {
        let handle = self.handle(conn);
        let Some(info) = info_of(&mut self.conns, conn) else {
            return;
        };
        if let Some(limit) = info.refused_at {
            if queued <= limit / 2 {
                info.refused_at = None;
                info.flagged -= 1;
                self.events.send(Event::Writable {
                    conn: handle,
                    group: None,
                });
            }
        }
        for id in &info.groups {
            let Some(g) = self.groups.get_mut(id) else {
                continue;
            };
            let Some(&i) = g.index.get(&conn) else {
                continue;
            };
            let sub = &mut g.subs[i];
            if sub.state == SubState::Normal || queued > g.shared.options.limit / 4 {
                continue;
            }
            match sub.state {
                SubState::Lagging => unlag(&g.shared, &self.inner.pressure),
                SubState::Dropping => self.events.send(Event::Writable {
                    conn: handle,
                    group: Some(*id),
                }),
                SubState::Normal | SubState::Slow => {}
            }
            sub.state = SubState::Normal;
            info.flagged -= 1;
        }
    }

    /// Every connection's queue is empty and nothing is in flight.
    fn flushed(&self) -> bool {
        self.mover.in_flight() == 0
            && self
                .conns
                .iter()
                .flatten()
                .all(|i| self.mover.queued(i.conn).unwrap_or(0) == 0)
    }

    /// Detaches every connection (closing it), recording what it had not sent.
    fn close_all(&mut self) {
        let conns: Vec<Conn> = self.conns.iter().flatten().map(|i| i.conn).collect();
        for conn in conns {
            if let Ok(d) = self.mover.detach(conn) {
                if d.unsent.iter().any(|b| !b.is_empty()) {
                    self.report.unsent.push((self.handle(conn), d.unsent));
                }
            }
            self.forget(conn);
        }
    }
}

/// A subscriber stopped lagging: the group may be writable again.
fn unlag(group: &GroupShared, pressure: &Pressure) {
    if group.lagging.fetch_sub(1, Ordering::SeqCst) == 1 {
        pressure.notify();
    }
}

fn flag(conns: &mut [Option<ConnInfo>], conn: Conn, by: usize) {
    if let Some(info) = info_of(conns, conn) {
        info.flagged += by;
    }
}

/// `conn`'s entry, unless the slot is empty or holds a later connection
/// (a stale handle). A free function, so the rest of the shard stays
/// borrowable beside it.
fn info_of(conns: &mut [Option<ConnInfo>], conn: Conn) -> Option<&mut ConnInfo> {
    conns
        .get_mut(conn.index() as usize)?
        .as_mut()
        .filter(|i| i.conn == conn)
}
