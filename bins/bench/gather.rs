//! `ringmover bench gather`: packets (headers interleaved with slices of
//! one payload) to many connections, sent by each strategy in turn:
//! streaming (every connection kept topped up, `stream.rs`) or in
//! lock-step rounds of one packet per connection (`--queue 0`).

use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use ringmover::outbox::{Framing, Outbox};
use ringmover::{Backend, BackendChoice, Mover, Packet};
use serde_json::json;

use super::sink::{connect, connect_stalled, Sink};
use super::{peak_rss, reset_peak_rss, CpuMeter};
use crate::units::parse_size;
use crate::Outcome;

/// Send packets cut into pieces (each behind a small header) to many
/// connections, by each strategy in one run, and compare: GB/s, packets/s,
/// CPU-seconds per GB (the sending process, io_uring workers included, the
/// built-in sink left out, plus ksoftirqd, which finishes network work the
/// sender's softirqs defer), syscalls (or io_uring_enter calls) per MB, and
/// peak RSS.
///
/// Streaming (--queue BYTES, default 64K): every connection is kept topped
/// up with at least that many bytes of queued packets; the sender refills,
/// writes and takes completions, and GB/s counts what the sink's kernel
/// acknowledged. Strategies: writev (one writev per packet: Go's
/// net.Buffers), coalesce (everything queued on a connection in one writev,
/// IOV_MAX at a time: nats-server), glue (everything queued copied into the
/// thread's one buffer, one write; what the socket did not take stays with
/// its connection), each on non-blocking sockets in an epoll loop per
/// thread; tokio-glue (a build with the tokio-baseline feature: a tokio
/// task per connection gluing 64 KiB of packets into a fresh buffer and
/// writing it whole, --threads workers); and ringmover on the uring, epoll
/// and poll backends (one
/// send_packet per packet, one flush, completions refill). --threads N
/// shares the connections among N threads (ringmover: one Mover each).
///
/// Stalled connections (--stalled PERCENT[,PERCENT...], streaming only):
/// that share of the connections goes to a listener inside the bench that
/// accepts and never reads, as clients that stopped reading. The sender
/// keeps them in its loop like every other; each fills its socket buffers
/// (kept small: 16 KiB to send, 4 KiB to receive, so it stalls within a
/// few writes) and then its per-connection limit (--queue bytes: ringmover's
/// max_queued_bytes, the baselines' own count) and stays there. GB/s,
/// packets/s and CPU-s/GB count only the connections that read; `vs 0%`
/// compares each strategy's GB/s with its own cell at --stalled 0 in the
/// same run (include 0, e.g. --stalled 0,1; the percentages run in
/// ascending order), and `stall-q KiB` is the most a stalled connection
/// held queued (the limit plus at most one packet). Every strategy runs
/// with stalled connections, the baselines too. With --to, the stalled
/// connections still go to the bench's own listener: the external sink
/// reads everything it gets, so it serves only the connections that read.
///
/// Many connections need many file descriptors (two per connection with
/// the built-in sink; with --to, one per connection plus one per stalled
/// connection): the bench raises RLIMIT_NOFILE itself, the hard limit too
/// where allowed (root with CAP_SYS_RESOURCE), and when it cannot, fails
/// before connecting, saying how many it needs.
///
/// Lock-step rounds (--queue 0): one packet per connection, then wait for
/// all. Strategies: write (one write(2) per header and per piece), copy
/// (glue the packet, then write), writev, and ringmover (queue every
/// connection, one flush, drain).
///
/// By default the built-in sink on loopback reads with MSG_TRUNC (no copy)
/// and checks it received every byte; --to sends to an external sink (e.g.
/// `ringmover bench sink --listen ADDR` in another process).
#[derive(Debug, clap::Args)]
#[command(long_about)]
pub struct Args {
    /// Connection counts to run, e.g. 1,100,1000.
    #[arg(long, value_delimiter = ',', default_value = "1,100,1000")]
    conns: Vec<usize>,

    /// Strategies to run (default: writev,coalesce,glue,uring,epoll,poll
    /// when streaming, write,copy,writev,uring,epoll,poll with --queue 0).
    #[arg(long, value_delimiter = ',')]
    strategy: Vec<String>,

    /// Bytes of packets each connection is kept topped up with; 0: one
    /// packet per connection per round, in lock-step.
    #[arg(long, value_parser = parse_size, default_value = "64K")]
    queue: u64,

    /// Sender threads when streaming (connections shared out among them).
    #[arg(long, default_value_t = 1)]
    threads: usize,

    /// ringmover's copy threshold: pieces shorter than this are copied
    /// into a staging buffer, longer ones referenced (default: the
    /// library's; 0: never copy).
    #[arg(long, value_parser = parse_size)]
    copy_threshold: Option<u64>,

    /// Packet shapes: srs (156 KiB payload in 10 KiB pieces) and small
    /// (512 B in 128 B pieces), each piece behind a 12-byte header.
    /// Ignored when --payload is given.
    #[arg(long, value_delimiter = ',', default_value = "srs,small")]
    shape: Vec<String>,

    /// Custom shape: payload bytes per packet (e.g. 156K).
    #[arg(long, value_parser = parse_size)]
    payload: Option<u64>,

    /// Custom shape: bytes per piece (default 10K).
    #[arg(long, value_parser = parse_size, requires = "payload")]
    piece: Option<u64>,

    /// Custom shape: header bytes before each piece (default 12).
    #[arg(long, value_parser = parse_size, requires = "payload")]
    header: Option<u64>,

    /// Send to this external sink instead of the built-in one.
    #[arg(long, value_name = "ADDR")]
    to: Option<SocketAddr>,

    /// Streaming only: percentages of --conns whose receiver never reads,
    /// each run in turn, e.g. 0,1 (every cell with none stalled, then with
    /// 1% of the connections stalled: 100 of 10000). At least one
    /// connection when above 0, never all of them.
    #[arg(long, value_delimiter = ',', value_parser = parse_percent, default_value = "0", value_name = "PERCENT")]
    stalled: Vec<f64>,

    /// Streaming only: how the sender goes round its connections. breadth:
    /// one --queue of packets per connection per turn, then the next (a
    /// connection holds a buffer only while its write is in flight). deep:
    /// a connection is refilled and written again while its socket takes
    /// each write at once, up to 128 queues (tokio's cooperative budget),
    /// then flushed (ringmover), as a task per connection does: the sink
    /// finds several writes per read, but each connection the socket
    /// refused holds a buffer. Every strategy follows it, tokio-glue too
    /// (breadth: its task yields after each buffer).
    #[arg(long, value_enum, default_value = "breadth")]
    refill: super::stream::Refill,

    /// Unmeasured time each cell first runs, so fresh connections are past
    /// TCP slow start and socket-buffer autotuning when measuring starts.
    #[arg(long, value_parser = crate::units::parse_duration, default_value = "500ms")]
    warmup: Duration,

    #[command(flatten)]
    run: super::RunArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    Write,
    Copy,
    Writev,
    Coalesce,
    Glue,
    /// A tokio task per connection glueing its packets (feature
    /// `tokio-baseline`).
    TokioGlue,
    Mover(Backend),
}

impl Strategy {
    fn parse(s: &str) -> anyhow::Result<Strategy> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "write" | "write-per-piece" => Strategy::Write,
            "copy" => Strategy::Copy,
            "writev" => Strategy::Writev,
            "coalesce" => Strategy::Coalesce,
            "glue" => Strategy::Glue,
            "tokio-glue" if cfg!(feature = "tokio-baseline") => Strategy::TokioGlue,
            "tokio-glue" => bail!(
                "tokio-glue needs a build with the tokio-baseline feature: \
                 cargo build --release --features tokio-baseline"
            ),
            "uring" => Strategy::Mover(Backend::Uring),
            "epoll" => Strategy::Mover(Backend::Epoll),
            "poll" => Strategy::Mover(Backend::Poll),
            other => bail!(
                "unknown strategy {other:?}: expected write, copy, writev, coalesce, glue, uring, epoll or poll"
            ),
        })
    }

    pub fn name(self) -> String {
        match self {
            Strategy::Write => "write".into(),
            Strategy::Copy => "copy".into(),
            Strategy::Writev => "writev".into(),
            Strategy::Coalesce => "coalesce".into(),
            Strategy::Glue => "glue".into(),
            Strategy::TokioGlue => "tokio-glue".into(),
            Strategy::Mover(b) => format!("ringmover-{b}"),
        }
    }
}

#[derive(Debug, Clone)]
struct Shape {
    name: String,
    payload: usize,
    piece: usize,
    header: usize,
}

impl Shape {
    fn named(name: &str) -> anyhow::Result<Shape> {
        let (payload, piece) = match name.trim().to_ascii_lowercase().as_str() {
            "srs" => (156 << 10, 10 << 10),
            "small" => (512, 128),
            other => bail!("unknown shape {other:?}: expected srs or small (or give --payload)"),
        };
        Ok(Shape {
            name: name.trim().to_ascii_lowercase(),
            payload,
            piece,
            header: 12,
        })
    }

    fn packet_bytes(&self) -> usize {
        self.payload + self.payload.div_ceil(self.piece) * self.header
    }
}

/// One packet as `Bytes`: headers and slices of one payload, never glued.
fn packet(shape: &Shape) -> Vec<Bytes> {
    let payload = Bytes::from(vec![0xA5u8; shape.payload]);
    let mut bufs = Vec::new();
    let mut at = 0;
    let mut i = 0u32;
    while at < shape.payload {
        let n = shape.piece.min(shape.payload - at);
        let mut h = vec![0u8; shape.header];
        for (j, b) in h.iter_mut().enumerate() {
            *b = (i as usize + j) as u8;
        }
        bufs.push(Bytes::from(h));
        bufs.push(payload.slice(at..at + n));
        at += n;
        i += 1;
    }
    bufs
}

#[derive(Debug)]
pub struct Measured {
    pub bytes: u64,
    pub packets: u64,
    pub wall: Duration,
    pub cpu: Duration,
    /// The part of `cpu` spent in user space.
    pub user_cpu: Duration,
    pub syscalls: u64,
    pub peak_rss: u64,
    /// The most bytes a stalled connection had queued (0: none stalled).
    pub stalled_queued: usize,
}

/// `--stalled`: a percentage in [0, 100), with or without a `%`.
fn parse_percent(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let p: f64 = t
        .strip_suffix('%')
        .unwrap_or(t)
        .parse()
        .map_err(|_| format!("invalid percentage {s:?}: expected e.g. 0, 1, 0.5"))?;
    if !(0.0..100.0).contains(&p) {
        return Err(format!("percentage {s:?} out of range: 0 to less than 100"));
    }
    Ok(p)
}

/// How many of `conns` connections `percent` stalls: rounded, at least one
/// when `percent` is above 0, and never all of them (someone must read).
fn stalled_count(conns: usize, percent: f64) -> anyhow::Result<usize> {
    if percent == 0.0 {
        return Ok(0);
    }
    let n = ((conns as f64 * percent / 100.0).round() as usize).max(1);
    if n >= conns {
        bail!(
            "--stalled {percent}% of {conns} connections stalls {n}, leaving none that reads: \
             use more --conns or a smaller percentage"
        );
    }
    Ok(n)
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    let queue = usize::try_from(args.queue)?;
    let defaults = if queue > 0 {
        "writev,coalesce,glue,uring,epoll,poll"
    } else {
        "write,copy,writev,uring,epoll,poll"
    };
    let named: Vec<String> = match args.strategy.is_empty() {
        true => defaults.split(',').map(String::from).collect(),
        false => args.strategy.clone(),
    };
    let strategies = named
        .iter()
        .map(|s| Strategy::parse(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for &s in &strategies {
        match (s, queue) {
            (Strategy::Write | Strategy::Copy, q) if q > 0 => bail!(
                "strategy {}: lock-step rounds only (--queue 0); streaming has writev, coalesce and glue",
                s.name()
            ),
            (Strategy::Coalesce | Strategy::Glue | Strategy::TokioGlue, 0) => bail!(
                "strategy {}: needs --queue (one packet per round has nothing to coalesce)",
                s.name()
            ),
            _ => {}
        }
    }
    if args.threads == 0 {
        bail!("--threads must be at least 1");
    }
    if args.threads > 1 && queue == 0 {
        bail!("--threads needs streaming (--queue greater than 0)");
    }
    if args.refill != super::stream::Refill::Breadth && queue == 0 {
        bail!("--refill deep needs streaming (--queue greater than 0)");
    }
    if let Some(&n) = args.conns.iter().find(|&&n| n < args.threads) {
        bail!("--conns {n} is fewer than --threads {}", args.threads);
    }
    let opts = super::stream::Opts {
        queue,
        threads: args.threads,
        copy_threshold: args.copy_threshold.map(usize::try_from).transpose()?,
        warmup: args.warmup,
        seconds: args.run.seconds,
        refill: args.refill,
    };
    let shapes = match args.payload {
        Some(payload) => {
            let payload = usize::try_from(payload)?;
            let piece = usize::try_from(args.piece.unwrap_or(10 << 10))?;
            if payload == 0 || piece == 0 {
                bail!("--payload and --piece must be greater than zero");
            }
            vec![Shape {
                name: "custom".into(),
                payload,
                piece,
                header: usize::try_from(args.header.unwrap_or(12))?,
            }]
        }
        None => args
            .shape
            .iter()
            .map(|s| Shape::named(s))
            .collect::<anyhow::Result<Vec<_>>>()?,
    };
    if args.conns.contains(&0) {
        bail!("--conns: connection counts must be at least 1");
    }
    // Ascending, so each strategy's cell at 0% comes before those it is
    // compared with.
    let mut stalled = args.stalled.clone();
    stalled.sort_by(f64::total_cmp);
    stalled.dedup();
    let stalling = stalled.iter().any(|&p| p > 0.0);
    if stalling && queue == 0 {
        bail!("--stalled needs streaming (--queue greater than 0): lock-step rounds wait for every connection");
    }
    // File descriptors per cell: every connection, the built-in sink's end
    // of each, and the bench's own end of each stalled one.
    let mut fds = (0u64, 0usize);
    for &conns in &args.conns {
        for &p in &stalled {
            let n = stalled_count(conns, p)?;
            let need = match args.to {
                None => 2 * conns,
                Some(_) => conns + n,
            } as u64;
            fds = fds.max((need, conns));
        }
    }
    // The built-in sink holds the other end of each connection: a sink in
    // its own process halves what this one needs.
    let hint = args.to.is_none().then_some(
        "run the sink as its own process (`ringmover bench sink --listen 127.0.0.1:7000`, \
         then --to 127.0.0.1:7000), which halves what this process needs",
    );
    super::reserve_fds(fds.0, &format!("{} connections", fds.1), hint)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if !args.run.json {
        if stalling {
            write!(out, "{:<6} {:>5} {:>7}", "shape", "conns", "stalled")?;
        } else {
            write!(out, "{:<6} {:>5}", "shape", "conns")?;
        }
        write!(
            out,
            "  {:<16} {:>8} {:>11} {:>9} {:>11} {:>9}",
            "strategy", "GB/s", "packets/s", "CPU-s/GB", "syscalls/MB", "RSS MiB",
        )?;
        if stalling {
            write!(out, " {:>11}", "stall-q KiB")?;
        }
        write!(out, " {:>8}", "vs writev")?;
        if stalling {
            write!(out, " {:>6}", "vs 0%")?;
        }
        writeln!(out)?;
    }
    for shape in &shapes {
        for &conns in &args.conns {
            // Each strategy's GB/s with none stalled, for `vs 0%`.
            let mut unstalled: Vec<(Strategy, f64)> = Vec::new();
            for &percent in &stalled {
                let n = stalled_count(conns, percent)?;
                let mut writev_pps = None;
                let mut rows = Vec::new();
                for &s in &strategies {
                    let m = if queue > 0 {
                        cell(s, shape, conns, n, args.to, &opts)
                    } else {
                        measure(
                            s,
                            shape,
                            conns,
                            &args.run,
                            args.warmup,
                            args.to,
                            opts.copy_threshold,
                        )
                    }
                    .with_context(|| match n {
                        0 => format!("{} with {conns} connections", s.name()),
                        n => format!("{} with {conns} connections, {n} stalled", s.name()),
                    })?;
                    let pps = m.packets as f64 / m.wall.as_secs_f64();
                    if s == Strategy::Writev {
                        writev_pps = Some(pps);
                    }
                    rows.push((s, m, pps));
                }
                for (s, m, pps) in rows {
                    let gb = m.bytes as f64 / 1e9;
                    let gbps = gb / m.wall.as_secs_f64();
                    let ratio = writev_pps.map(|w| pps / w);
                    let vs_unstalled = match n {
                        0 => {
                            unstalled.push((s, gbps));
                            None
                        }
                        _ => unstalled.iter().find(|u| u.0 == s).map(|u| gbps / u.1),
                    };
                    if args.run.json {
                        let v = json!({
                            "shape": shape.name,
                            "payload": shape.payload,
                            "piece": shape.piece,
                            "header": shape.header,
                            "conns": conns,
                            "stalled": n,
                            "stalled_percent": percent,
                            "queue": queue,
                            "threads": args.threads,
                            "refill": (queue > 0).then_some(args.refill.name()),
                            "strategy": s.name(),
                            "bytes": m.bytes,
                            "packets": m.packets,
                            "seconds": m.wall.as_secs_f64(),
                            "gb_per_s": gbps,
                            "packets_per_s": pps,
                            "cpu_s_per_gb": m.cpu.as_secs_f64() / gb,
                            "user_cpu_s_per_gb": m.user_cpu.as_secs_f64() / gb,
                            "syscalls_per_mb": m.syscalls as f64 / (m.bytes as f64 / 1e6),
                            "peak_rss": m.peak_rss,
                            "stalled_queued_max": (n > 0).then_some(m.stalled_queued),
                            "vs_writev": ratio,
                            "vs_unstalled": vs_unstalled,
                        });
                        crate::json::write_typed(&mut out, "bench-gather", &v)?;
                    } else {
                        if stalling {
                            write!(out, "{:<6} {:>5} {:>7}", shape.name, conns, n)?;
                        } else {
                            write!(out, "{:<6} {:>5}", shape.name, conns)?;
                        }
                        write!(
                            out,
                            "  {:<16} {:>8.2} {:>11.0} {:>9.3} {:>11.2} {:>9.1}",
                            s.name(),
                            gbps,
                            pps,
                            m.cpu.as_secs_f64() / gb,
                            m.syscalls as f64 / (m.bytes as f64 / 1e6),
                            m.peak_rss as f64 / f64::from(1u32 << 20),
                        )?;
                        if stalling {
                            match n {
                                0 => write!(out, " {:>11}", "-")?,
                                _ => write!(out, " {:>11.1}", m.stalled_queued as f64 / 1024.0)?,
                            }
                        }
                        let ratio = ratio.map_or_else(|| "-".into(), |r| format!("{r:.2}x"));
                        write!(out, " {ratio:>8}")?;
                        if stalling {
                            let r = vs_unstalled.map_or_else(|| "-".into(), |r| format!("{r:.2}x"));
                            write!(out, " {r:>6}")?;
                        }
                        writeln!(out)?;
                    }
                    out.flush()?;
                }
            }
        }
    }
    Ok(Outcome::Success)
}

/// One streaming cell: `conns` connections, `n_stalled` of them to a
/// listener that never reads, the rest to the sink.
fn cell(
    strategy: Strategy,
    shape: &Shape,
    conns: usize,
    n_stalled: usize,
    to: Option<SocketAddr>,
    opts: &super::stream::Opts,
) -> anyhow::Result<Measured> {
    let (socks, sink) = connect(conns - n_stalled, to)?;
    // Held open until the cell ends: closing them would let the stalled
    // connections fail instead of wait.
    let (stalled, _peers) = connect_stalled(n_stalled)?;
    super::stream::measure(strategy, &packet(shape), socks, stalled, sink, opts)
}

/// One round of a strategy: one packet to every connection. Returns the
/// syscalls (or `io_uring_enter` calls) it made.
type Round<'a> = Box<dyn FnMut() -> anyhow::Result<u64> + 'a>;

fn rounds<'a>(
    strategy: Strategy,
    socks: Vec<std::net::TcpStream>,
    pkt: &'a [Bytes],
    copy_threshold: Option<usize>,
) -> anyhow::Result<Round<'a>> {
    let pkt_len: usize = pkt.iter().map(Bytes::len).sum();
    Ok(match strategy {
        Strategy::Write => {
            let mut socks = socks;
            Box::new(move || {
                for s in &mut socks {
                    for b in pkt {
                        s.write_all(b)?;
                    }
                }
                Ok((socks.len() * pkt.len()) as u64)
            })
        }
        Strategy::Copy => {
            let mut socks = socks;
            // One glued buffer per connection, as a copying server keeps.
            let mut glued: Vec<Vec<u8>> = vec![Vec::with_capacity(pkt_len); socks.len()];
            Box::new(move || {
                for (s, buf) in socks.iter_mut().zip(&mut glued) {
                    buf.clear();
                    for b in pkt {
                        buf.extend_from_slice(b);
                    }
                    s.write_all(buf)?;
                }
                Ok(socks.len() as u64)
            })
        }
        Strategy::Writev => {
            let mut outbox = Outbox::new(Framing::Stream);
            Box::new(move || {
                for s in &socks {
                    outbox.push(pkt.iter().cloned(), None);
                    ringmover::write_to(s.as_fd(), &mut outbox)?;
                }
                Ok(socks.len() as u64)
            })
        }
        Strategy::Coalesce | Strategy::Glue | Strategy::TokioGlue => {
            bail!("{} needs --queue", strategy.name())
        }
        Strategy::Mover(backend) => {
            let mut mover = build_mover(backend, socks.len(), copy_threshold, None)?;
            let packet = Packet::new(pkt.iter().cloned());
            let handles = socks
                .into_iter()
                .map(|s| mover.attach(s))
                .collect::<std::io::Result<Vec<_>>>()?;
            let mut done = Vec::new();
            Box::new(move || {
                let before = mover.stats().syscalls;
                for &c in &handles {
                    mover
                        .send_packet(c, &packet)
                        .map_err(std::io::Error::from)?;
                }
                mover.flush_and_wait(&mut done)?;
                if let Some(e) = done.iter().find_map(|c| c.error.as_ref()) {
                    bail!("a connection failed: {}", e.error);
                }
                done.clear();
                Ok(mover.stats().syscalls - before)
            })
        }
    })
}

/// A `Mover` on `backend` sized for `conns` connections, each holding at
/// most `limit` bytes queued (plus the packet that reaches it) when given.
pub fn build_mover(
    backend: Backend,
    conns: usize,
    copy_threshold: Option<usize>,
    limit: Option<usize>,
) -> std::io::Result<Mover> {
    let mut builder = Mover::builder()
        .backend(BackendChoice::Force(backend))
        .queue_depth(conns.next_power_of_two().clamp(8, 4096) as u32);
    if let Some(t) = copy_threshold {
        builder = builder.copy_threshold(t);
    }
    if let Some(limit) = limit {
        builder = builder.max_queued_bytes(limit);
    }
    builder.build()
}

fn measure(
    strategy: Strategy,
    shape: &Shape,
    conns: usize,
    run: &super::RunArgs,
    warmup: Duration,
    to: Option<SocketAddr>,
    copy_threshold: Option<usize>,
) -> anyhow::Result<Measured> {
    let (socks, sink) = connect(conns, to)?;
    let pkt = packet(shape);
    let pkt_len: usize = pkt.iter().map(Bytes::len).sum();
    debug_assert_eq!(pkt_len, shape.packet_bytes());
    let mut round = rounds(strategy, socks, &pkt, copy_threshold)?;
    let mut warm_packets = 0u64;
    let warm = Instant::now();
    while warm.elapsed() < warmup {
        round()?;
        warm_packets += conns as u64;
    }
    let mut packets = 0u64;
    let mut syscalls = 0u64;
    reset_peak_rss();
    let meter = CpuMeter::start(&Sink::tids(&sink));
    let t0 = Instant::now();
    while t0.elapsed() < run.seconds {
        syscalls += round()?;
        packets += conns as u64;
    }
    let wall = t0.elapsed();
    let (cpu, user_cpu) = (meter.elapsed(), meter.elapsed_user());
    let peak = peak_rss();
    // Closing every connection lets the sink finish and count.
    drop(round);
    if let Some(sink) = sink {
        let got = sink.finish()?;
        let sent = (warm_packets + packets) * pkt_len as u64;
        if got != sent {
            bail!("the sink received {got} bytes of the {sent} sent");
        }
    }
    Ok(Measured {
        bytes: packets * pkt_len as u64,
        packets,
        wall,
        cpu,
        user_cpu,
        syscalls,
        peak_rss: peak,
        stalled_queued: 0,
    })
}
