//! `bench gather --queue`: streaming sends. Every connection is kept topped
//! up with at least `queue` bytes of packets while the sender refills,
//! writes and takes completions; throughput is what the sink's kernel
//! acknowledged (`tcpi_bytes_acked`), so bytes still queued in the sender,
//! in user space or in flight, never count.
//!
//! Stalled connections (`--stalled`) are kept in the same loop, but their
//! receiver never reads: they fill to their per-connection limit and stay
//! there. Only the connections that read count towards the throughput.

use std::io::IoSlice;
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use ringmover::outbox::IOV_MAX;
use ringmover::{Backend, Conn, Packet, SendErrorKind};

use super::gather::{build_mover, Measured, Strategy};
use super::sink::Sink;
use super::{bytes_acked, peak_rss, reset_peak_rss, CpuMeter};

/// How a streaming cell runs.
#[derive(Debug, Clone, Copy)]
pub struct Opts {
    /// Bytes each connection is kept topped up with.
    pub queue: usize,
    /// Sender threads; connections are shared out among them.
    pub threads: usize,
    /// ringmover's copy threshold (`None`: the library default).
    pub copy_threshold: Option<usize>,
    pub warmup: Duration,
    pub seconds: Duration,
    /// How the sender goes round its connections.
    pub refill: Refill,
}

/// How a streaming sender tops its connections up (`--refill`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Refill {
    /// One --queue of packets per connection per turn, then the next
    /// connection.
    Breadth,
    /// Refill a connection while its socket takes each write at once, up
    /// to 128 queues, then flush it and go to the next connection.
    // What a task per connection does: write until the socket refuses or
    // the runtime's cooperative budget runs out (`DEEP_TURNS`).
    Deep,
}

impl Refill {
    pub fn name(self) -> &'static str {
        match self {
            Refill::Breadth => "breadth",
            Refill::Deep => "deep",
        }
    }

    /// Queues' worth a connection may take in one turn.
    fn turns(self) -> usize {
        match self {
            Refill::Breadth => 1,
            Refill::Deep => DEEP_TURNS,
        }
    }
}

/// `--refill deep`: queues' worth a connection may take in one turn, as
/// tokio's cooperative budget of 128 operations per task turn.
const DEEP_TURNS: usize = 128;

/// One sender thread's connections: the last `stalled` of `socks` are
/// stalled (their receiver never reads).
#[derive(Debug, Default)]
struct Share {
    socks: Vec<TcpStream>,
    stalled: usize,
}

/// What a sender thread did.
#[derive(Debug, Default)]
struct Sent {
    /// Bytes written to the connections that read (sockets closed on
    /// return, so the built-in sink can check it got them all).
    written: u64,
    /// The most bytes a stalled connection had queued after a refill.
    stalled_queued: usize,
}

/// Runs `strategy` over `socks` (whose receivers read) and `stalled`
/// (whose receivers never do) on `opts.threads` threads: warm up, then
/// measure for `opts.seconds`, then stop, let ringmover finish what it
/// queued on the reading connections, close, and check the built-in sink
/// got every byte written to them.
pub fn measure(
    strategy: Strategy,
    pkt: &[Bytes],
    socks: Vec<TcpStream>,
    stalled: Vec<TcpStream>,
    sink: Option<Sink>,
    opts: &Opts,
) -> anyhow::Result<Measured> {
    let pkt_len: usize = pkt.iter().map(Bytes::len).sum();
    // Only what the reading connections' peers acknowledged counts.
    let fds: Vec<RawFd> = socks.iter().map(AsRawFd::as_raw_fd).collect();
    let acked = || fds.iter().map(|&fd| bytes_acked(fd)).sum::<u64>();
    let stop = AtomicBool::new(false);
    let calls: Vec<AtomicU64> = (0..opts.threads).map(|_| AtomicU64::new(0)).collect();
    let calls_now = || calls.iter().map(|c| c.load(Ordering::Relaxed)).sum::<u64>();
    let mut shares: Vec<Share> = (0..opts.threads).map(|_| Share::default()).collect();
    let reading = socks.len();
    for (i, s) in socks.into_iter().enumerate() {
        shares[i % opts.threads].socks.push(s);
    }
    // Dealt on from where the reading ones stopped, so the stalled ones
    // are spread over the threads as evenly as the rest.
    for (i, s) in stalled.into_iter().enumerate() {
        let share = &mut shares[(reading + i) % opts.threads];
        share.socks.push(s);
        share.stalled += 1;
    }
    if strategy == Strategy::TokioGlue {
        // One runtime of `threads` workers runs a task per connection:
        // one share of them all, the stalled ones last.
        let (mut all, mut stalled) = (Share::default(), Vec::new());
        for mut share in shares.drain(..) {
            let first_stalled = share.socks.len() - share.stalled;
            stalled.extend(share.socks.drain(first_stalled..));
            all.socks.append(&mut share.socks);
        }
        all.stalled = stalled.len();
        all.socks.append(&mut stalled);
        shares.push(all);
    }
    let exclude = Sink::tids(&sink);
    let (window, written) = std::thread::scope(|scope| {
        let workers: Vec<_> = shares
            .into_iter()
            .zip(&calls)
            .map(|(share, calls)| {
                let stop = &stop;
                scope.spawn(move || worker(strategy, share, pkt, opts, stop, calls))
            })
            .collect();
        std::thread::sleep(opts.warmup);
        let (a0, c0) = (acked(), calls_now());
        reset_peak_rss();
        let meter = CpuMeter::start(&exclude);
        let t0 = Instant::now();
        std::thread::sleep(opts.seconds);
        let (cpu, user_cpu) = (meter.elapsed(), meter.elapsed_user());
        let (wall, peak) = (t0.elapsed(), peak_rss());
        let (a1, c1) = (acked(), calls_now());
        stop.store(true, Ordering::Relaxed);
        let (mut written, mut stalled_queued) = (0u64, 0usize);
        for w in workers {
            let sent = w
                .join()
                .map_err(|_| anyhow::anyhow!("a sender thread panicked"))??;
            written += sent.written;
            stalled_queued = stalled_queued.max(sent.stalled_queued);
        }
        let bytes = a1.saturating_sub(a0);
        let window = Measured {
            bytes,
            packets: bytes / pkt_len as u64,
            wall,
            cpu,
            user_cpu,
            syscalls: c1 - c0,
            peak_rss: peak,
            stalled_queued,
        };
        anyhow::Ok((window, written))
    })?;
    if let Some(sink) = sink {
        let got = sink.finish()?;
        if got != written {
            bail!("the sink received {got} bytes of the {written} written");
        }
    }
    Ok(window)
}

/// One sender thread (sockets closed on return).
fn worker(
    strategy: Strategy,
    share: Share,
    pkt: &[Bytes],
    opts: &Opts,
    stop: &AtomicBool,
    calls: &AtomicU64,
) -> anyhow::Result<Sent> {
    match strategy {
        Strategy::Mover(b) => mover(b, share, pkt, opts, stop, calls),
        Strategy::Writev | Strategy::Coalesce | Strategy::Glue => {
            baseline(strategy, share, pkt, opts, stop, calls)
        }
        #[cfg(feature = "tokio-baseline")]
        Strategy::TokioGlue => tokio_glue::run(share, pkt, opts, stop, calls),
        #[cfg(not(feature = "tokio-baseline"))]
        Strategy::TokioGlue => bail!("tokio-glue needs the tokio-baseline feature"),
        Strategy::Write | Strategy::Copy => {
            bail!(
                "{} runs only in lock-step rounds (--queue 0)",
                strategy.name()
            )
        }
    }
}

/// ringmover: every connection whose write completed is refilled until
/// its byte limit (`max_queued_bytes`, set to `queue`) refuses or `queue`
/// bytes went in (one `send_packet` of the borrowed packet each: small
/// pieces are copied into the glued buffer, no reference count), then
/// flush, wait for completions. A stalled connection fills to its limit once and stays
/// there, its write waiting: it is never refilled, and costs nothing more.
fn mover(
    backend: Backend,
    share: Share,
    pkt: &[Bytes],
    opts: &Opts,
    stop: &AtomicBool,
    calls: &AtomicU64,
) -> anyhow::Result<Sent> {
    let mut mover = build_mover(
        backend,
        share.socks.len(),
        opts.copy_threshold,
        Some(opts.queue),
    )?;
    let packet = Packet::new(pkt.iter().cloned());
    let first_stalled = share.socks.len() - share.stalled;
    let (mut need, mut stalled_conns) = (Vec::new(), Vec::new());
    // Indexed by `Conn::index`.
    let mut stalled = Vec::new();
    for (i, s) in share.socks.into_iter().enumerate() {
        let c = mover.attach(s)?;
        let at = c.index() as usize;
        if stalled.len() <= at {
            stalled.resize(at + 1, false);
        }
        stalled[at] = i >= first_stalled;
        if stalled[at] {
            stalled_conns.push(c);
        }
        need.push(c);
    }
    // Indexed by `Conn::index`: already in `need`.
    let mut listed = vec![true; stalled.len()];
    let mut done = Vec::new();
    let mut sent = Sent::default();
    while !stop.load(Ordering::Relaxed) {
        for c in need.drain(..) {
            let i = c.index() as usize;
            listed[i] = false;
            top_up(&mut mover, c, &packet, opts.queue, opts.refill)?;
            if opts.refill == Refill::Deep {
                // Its turn is over: what it glued last goes now, while in
                // cache, not a thousand connections later (as the other
                // strategies leave nothing unwritten at the end of a turn).
                mover.flush()?;
            }
            if stalled[i] {
                let q = mover.queued(c).unwrap_or(0);
                sent.stalled_queued = sent.stalled_queued.max(q);
            }
        }
        mover.flush()?;
        mover.wait(Some(Duration::from_millis(10)), &mut done)?;
        for d in done.drain(..) {
            if let Some(e) = &d.error {
                bail!("a connection failed: {}", e.error);
            }
            let i = d.conn.index() as usize;
            if !stalled[i] {
                sent.written += d.written as u64;
            }
            if !std::mem::replace(&mut listed[i], true) {
                need.push(d.conn);
            }
        }
        calls.store(mover.stats().syscalls, Ordering::Relaxed);
    }
    // A stalled connection never drains: detach it (which cancels its
    // write in flight) and close it, then finish the others.
    for c in stalled_conns {
        drop(mover.detach(c)?);
    }
    mover.flush_and_wait(&mut done)?;
    if let Some(e) = done.iter().find_map(|c| c.error.as_ref()) {
        bail!("a connection failed: {}", e.error);
    }
    sent.written += done.iter().map(|d| d.written as u64).sum::<u64>();
    Ok(sent)
}

/// Queues `packet` on `conn` until the connection's byte limit refuses it,
/// or `queue` bytes went in (`Refill::Deep`: until a write stays in
/// flight, or `DEEP_TURNS` queues went in).
fn top_up(
    mover: &mut ringmover::Mover,
    conn: Conn,
    packet: &Packet,
    queue: usize,
    refill: Refill,
) -> anyhow::Result<()> {
    // A bounded budget per call: a full glued buffer starts writing inside
    // `send_packet`, and a fast peer would otherwise keep one connection
    // refilling forever, never at its limit.
    let mut budget = queue * refill.turns();
    while budget > 0 {
        match mover.send_packet(conn, packet) {
            Ok(()) => budget = budget.saturating_sub(packet.len()),
            Err(e) if matches!(e.kind, SendErrorKind::BackPressure { .. }) => break,
            Err(e) => return Err(std::io::Error::from(e).into()),
        }
        // Deep: a write that completed at submission left little queued;
        // a full queue means one stayed in flight, as a refused socket.
        if refill == Refill::Deep && mover.queued(conn).unwrap_or(0) >= queue {
            break;
        }
    }
    Ok(())
}

/// A baseline connection's queue: `packets` whole packets, of which the
/// first has `offset` bytes written; what the glueing writer copied and
/// the socket did not take.
#[derive(Debug, Default)]
struct Queue {
    packets: usize,
    offset: usize,
    glued: Vec<u8>,
    at: usize,
}

impl Queue {
    fn bytes(&self, pkt_len: usize) -> usize {
        self.packets * pkt_len - self.offset + (self.glued.len() - self.at)
    }

    /// `n` bytes of the packets were written.
    fn advance(&mut self, n: usize, pkt_len: usize) {
        let total = self.offset + n;
        self.packets -= total / pkt_len;
        self.offset = total % pkt_len;
    }
}

/// What one turn on a connection ended with.
enum Turn {
    /// Everything queued went out: still writable.
    Emptied,
    /// `EAGAIN`: epoll reports it when writable.
    Blocked,
}

/// The baselines, on non-blocking sockets in an edge-triggered epoll loop:
/// each turn a connection is topped up to `queue` bytes and written until
/// it is empty or the socket is full. Topping up is only a count (no
/// per-packet work), so these mark the kernel's floor more than a server.
/// A stalled connection fills its socket, then is never ready again.
fn baseline(
    strategy: Strategy,
    share: Share,
    pkt: &[Bytes],
    opts: &Opts,
    stop: &AtomicBool,
    calls: &AtomicU64,
) -> anyhow::Result<Sent> {
    let (queue, turns) = (opts.queue, opts.refill.turns());
    let pkt_len: usize = pkt.iter().map(Bytes::len).sum();
    let socks = share.socks;
    let first_stalled = socks.len() - share.stalled;
    let mut sent = Sent::default();
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    for (i, s) in socks.iter().enumerate() {
        s.set_nonblocking(true)?;
        let ev = EpollEvent::new(EpollFlags::EPOLLOUT | EpollFlags::EPOLLET, i as u64);
        epoll.add(s.as_fd(), ev)?;
    }
    let mut queues: Vec<Queue> = socks.iter().map(|_| Queue::default()).collect();
    let mut ready: Vec<usize> = (0..socks.len()).collect();
    let mut next = Vec::new();
    let mut events = vec![EpollEvent::empty(); 1024];
    let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(IOV_MAX);
    // `glue` copies into this one buffer, hot in cache, as a writer that
    // allocates a buffer per batch gets from malloc; only what a socket did
    // not take stays with its connection.
    let mut scratch: Vec<u8> = Vec::with_capacity(queue + pkt_len);
    let mut syscalls = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for &i in &ready {
            // Deep: refilled and written again while the socket takes it all.
            let mut turn = Turn::Emptied;
            for _ in 0..turns {
                let q = &mut queues[i];
                while q.bytes(pkt_len) < queue {
                    q.packets += 1;
                }
                let stalled = i >= first_stalled;
                if stalled {
                    sent.stalled_queued = sent.stalled_queued.max(q.bytes(pkt_len));
                }
                let fd = socks[i].as_fd();
                turn = loop {
                    // A `glue` write from `scratch`: what it left is already
                    // all of `q.glued`.
                    let mut glued_now = false;
                    let n = match strategy {
                        Strategy::Glue if q.at == q.glued.len() => {
                            if q.packets == 0 {
                                break Turn::Emptied;
                            }
                            scratch.clear();
                            for _ in 0..q.packets {
                                for b in pkt {
                                    scratch.extend_from_slice(b);
                                }
                            }
                            q.packets = 0;
                            let n = nix::unistd::write(fd, &scratch);
                            // The connection keeps what was not written.
                            let kept = match n {
                                Ok(n) => &scratch[n..],
                                Err(_) => &scratch[..],
                            };
                            q.glued.clear();
                            q.glued.extend_from_slice(kept);
                            q.at = 0;
                            glued_now = true;
                            n
                        }
                        Strategy::Glue => nix::unistd::write(fd, &q.glued[q.at..]),
                        _ => {
                            if q.packets == 0 {
                                break Turn::Emptied;
                            }
                            let packets = if strategy == Strategy::Writev {
                                1
                            } else {
                                q.packets
                            };
                            fill(&mut iov, pkt, packets, q.offset);
                            nix::sys::uio::writev(fd, &iov)
                        }
                    };
                    syscalls += 1;
                    match n {
                        Ok(n) => {
                            if !stalled {
                                sent.written += n as u64;
                            }
                            if strategy == Strategy::Glue {
                                q.at += if glued_now { 0 } else { n };
                            } else {
                                q.advance(n, pkt_len);
                            }
                        }
                        Err(Errno::EAGAIN) => break Turn::Blocked,
                        Err(Errno::EINTR) => {}
                        Err(e) => return Err(e).context("writing to the sink"),
                    }
                };
                if let Turn::Blocked = turn {
                    break;
                }
            }
            if let Turn::Emptied = turn {
                next.push(i);
            }
        }
        ready.clear();
        std::mem::swap(&mut ready, &mut next);
        let timeout = if ready.is_empty() { 10u16 } else { 0 };
        let k = match epoll.wait(&mut events, EpollTimeout::from(timeout)) {
            Ok(k) => k,
            Err(Errno::EINTR) => 0,
            Err(e) => return Err(e.into()),
        };
        syscalls += 1;
        ready.extend(events[..k].iter().map(|e| e.data() as usize));
        calls.store(syscalls, Ordering::Relaxed);
    }
    Ok(sent)
}

/// `iov` := `packets` copies of `pkt`, the first `offset` bytes skipped,
/// at most `IOV_MAX` slices.
fn fill<'a>(iov: &mut Vec<IoSlice<'a>>, pkt: &'a [Bytes], packets: usize, mut offset: usize) {
    iov.clear();
    for _ in 0..packets {
        for b in pkt {
            if offset >= b.len() {
                offset -= b.len();
                continue;
            }
            iov.push(IoSlice::new(&b[offset..]));
            offset = 0;
            if iov.len() == IOV_MAX {
                return;
            }
        }
    }
}

/// `tokio-glue`: the writer issue 9 measured ringmover against, in the same
/// run: a tokio runtime of `--threads` workers, a task per connection, each
/// gluing `queue` bytes of packets into a fresh buffer (malloc hands back
/// memory still in cache) and writing it whole, then again. No per-packet
/// work but the copies, as in the writer.
#[cfg(feature = "tokio-baseline")]
mod tokio_glue {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use tokio::io::AsyncWriteExt;
    use tokio::sync::watch;

    use super::{Opts, Sent, Share};

    pub(super) fn run(
        share: Share,
        pkt: &[Bytes],
        opts: &Opts,
        stop: &AtomicBool,
        calls: &AtomicU64,
    ) -> anyhow::Result<Sent> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(opts.threads)
            .enable_all()
            .build()?;
        let first_stalled = share.socks.len() - share.stalled;
        let pkt: Arc<[Bytes]> = pkt.into();
        let writes = Arc::new(AtomicU64::new(0));
        let (tx, rx) = watch::channel(false);
        let (queue, deep) = (opts.queue, opts.refill == super::Refill::Deep);
        let outcomes = rt.block_on(async {
            let mut tasks = Vec::new();
            for (i, s) in share.socks.into_iter().enumerate() {
                s.set_nonblocking(true)?;
                let s = tokio::net::TcpStream::from_std(s)?;
                let (pkt, rx, writes) = (pkt.clone(), rx.clone(), writes.clone());
                let stalled = i >= first_stalled;
                let task = glue(s, pkt, queue, deep, rx, writes, stalled);
                tasks.push(tokio::spawn(task));
            }
            while !stop.load(Ordering::Relaxed) {
                calls.store(writes.load(Ordering::Relaxed), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            tx.send_replace(true);
            let mut outcomes = Vec::new();
            for t in tasks {
                outcomes.push(t.await?);
            }
            anyhow::Ok(outcomes)
        })?;
        // The sockets close with the tasks; the runtime's threads end here.
        drop(rt);
        let mut sent = Sent::default();
        for o in outcomes {
            let (written, held) = o?;
            sent.written += written;
            sent.stalled_queued = sent.stalled_queued.max(held);
        }
        Ok(sent)
    }

    /// One connection's task until `stop`: returns the bytes written (0 for
    /// a stalled connection, whose peer never reads) and, for a stalled
    /// one, the bytes it still held. `deep`: the next buffer at once, as a
    /// task does (until the socket refuses, or tokio's cooperative budget
    /// makes it yield); else it yields after each buffer, so the tasks
    /// take turns a buffer each, as `--refill breadth` goes round.
    async fn glue(
        mut s: tokio::net::TcpStream,
        pkt: Arc<[Bytes]>,
        queue: usize,
        deep: bool,
        mut stop: watch::Receiver<bool>,
        writes: Arc<AtomicU64>,
        stalled: bool,
    ) -> std::io::Result<(u64, usize)> {
        let pkt_len: usize = pkt.iter().map(Bytes::len).sum();
        let mut written = 0u64;
        loop {
            let mut buf = Vec::with_capacity(queue + pkt_len);
            while buf.len() < queue {
                for b in pkt.iter() {
                    buf.extend_from_slice(b);
                }
            }
            let mut at = 0;
            while at < buf.len() {
                tokio::select! {
                    biased;
                    _ = stop.changed() => {
                        let held = if stalled { buf.len() - at } else { 0 };
                        return Ok((written, held));
                    }
                    n = s.write(&buf[at..]) => {
                        let n = n?;
                        at += n;
                        writes.fetch_add(1, Ordering::Relaxed);
                        written += if stalled { 0 } else { n as u64 };
                    }
                }
            }
            if !deep {
                tokio::task::yield_now().await;
            }
        }
    }
}
