//! `ringmover bench gather`: one packet per connection per round (headers
//! interleaved with slices of one payload), sent by each strategy in turn.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use ringmover::outbox::{Framing, Outbox};
use ringmover::{Backend, BackendChoice, Mover};
use serde_json::json;

use super::{parse_duration, parse_size, peak_rss, reset_peak_rss, thread_cpu};
use crate::Outcome;

/// Send packets cut into pieces (each behind a small header) to many
/// connections, by each strategy in one run, and compare: GB/s, packets/s,
/// CPU-seconds per GB of the sending thread (getrusage), syscalls (or
/// io_uring_enter calls) per MB, and peak RSS.
///
/// Strategies: write (one write(2) per header and per piece), copy (glue
/// the packet into one buffer per connection, then write), writev (one
/// writev per connection per packet: Go's net.Buffers), and ringmover on
/// the uring, epoll and poll backends (queue every connection, one flush).
///
/// By default the built-in sink on loopback reads with MSG_TRUNC (no copy)
/// and checks it received every byte; --to sends to an external sink.
#[derive(Debug, clap::Args)]
#[command(long_about)]
pub struct Args {
    /// Connection counts to run, e.g. 1,100,1000.
    #[arg(long, value_delimiter = ',', default_value = "1,100,1000")]
    conns: Vec<usize>,

    /// Strategies to run: write, copy, writev, uring, epoll, poll.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "write,copy,writev,uring,epoll,poll"
    )]
    strategy: Vec<String>,

    /// Packet shapes: srs (156 KiB payload in 10 KiB pieces) and small
    /// (512 B in 128 B pieces), each piece behind a 12-byte header.
    /// Ignored when --payload is given.
    #[arg(long, value_delimiter = ',', default_value = "srs,small")]
    shape: Vec<String>,

    /// Custom shape: payload bytes per packet (e.g. 156K).
    #[arg(long, value_parser = parse_size)]
    payload: Option<usize>,

    /// Custom shape: bytes per piece (default 10K).
    #[arg(long, value_parser = parse_size, requires = "payload")]
    piece: Option<usize>,

    /// Custom shape: header bytes before each piece (default 12).
    #[arg(long, value_parser = parse_size, requires = "payload")]
    header: Option<usize>,

    /// How long each strategy runs per shape and connection count.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    seconds: Duration,

    /// Send to this external sink instead of the built-in one.
    #[arg(long, value_name = "ADDR")]
    to: Option<SocketAddr>,

    /// One JSON object per result line.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Strategy {
    Write,
    Copy,
    Writev,
    Mover(Backend),
}

impl Strategy {
    fn parse(s: &str) -> anyhow::Result<Strategy> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "write" | "write-per-piece" => Strategy::Write,
            "copy" => Strategy::Copy,
            "writev" => Strategy::Writev,
            "uring" => Strategy::Mover(Backend::Uring),
            "epoll" => Strategy::Mover(Backend::Epoll),
            "poll" => Strategy::Mover(Backend::Poll),
            other => bail!(
                "unknown strategy {other:?}: expected write, copy, writev, uring, epoll or poll"
            ),
        })
    }

    fn name(self) -> String {
        match self {
            Strategy::Write => "write".into(),
            Strategy::Copy => "copy".into(),
            Strategy::Writev => "writev".into(),
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
struct Measured {
    bytes: u64,
    packets: u64,
    wall: Duration,
    cpu: Duration,
    syscalls: u64,
    peak_rss: u64,
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    let strategies = args
        .strategy
        .iter()
        .map(|s| Strategy::parse(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let shapes = match args.payload {
        Some(payload) => {
            let piece = args.piece.unwrap_or(10 << 10);
            if payload == 0 || piece == 0 {
                bail!("--payload and --piece must be greater than zero");
            }
            vec![Shape {
                name: "custom".into(),
                payload,
                piece,
                header: args.header.unwrap_or(12),
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
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if !args.json {
        writeln!(
            out,
            "{:<6} {:>5}  {:<16} {:>8} {:>11} {:>9} {:>11} {:>9} {:>8}",
            "shape",
            "conns",
            "strategy",
            "GB/s",
            "packets/s",
            "CPU-s/GB",
            "syscalls/MB",
            "RSS MiB",
            "vs writev"
        )?;
    }
    for shape in &shapes {
        for &conns in &args.conns {
            let mut writev_pps = None;
            let mut rows = Vec::new();
            for &s in &strategies {
                let m = measure(s, shape, conns, args.seconds, args.to)
                    .with_context(|| format!("{} with {conns} connections", s.name()))?;
                let pps = m.packets as f64 / m.wall.as_secs_f64();
                if s == Strategy::Writev {
                    writev_pps = Some(pps);
                }
                rows.push((s, m, pps));
            }
            for (s, m, pps) in rows {
                let gb = m.bytes as f64 / 1e9;
                let ratio = writev_pps.map(|w| pps / w);
                if args.json {
                    let v = json!({
                        "bench": "gather",
                        "shape": shape.name,
                        "payload": shape.payload,
                        "piece": shape.piece,
                        "header": shape.header,
                        "conns": conns,
                        "strategy": s.name(),
                        "bytes": m.bytes,
                        "packets": m.packets,
                        "seconds": m.wall.as_secs_f64(),
                        "gb_per_s": gb / m.wall.as_secs_f64(),
                        "packets_per_s": pps,
                        "cpu_s_per_gb": m.cpu.as_secs_f64() / gb,
                        "syscalls_per_mb": m.syscalls as f64 / (m.bytes as f64 / 1e6),
                        "peak_rss": m.peak_rss,
                        "vs_writev": ratio,
                    });
                    writeln!(out, "{v}")?;
                } else {
                    writeln!(
                        out,
                        "{:<6} {:>5}  {:<16} {:>8.2} {:>11.0} {:>9.3} {:>11.2} {:>9.1} {:>8}",
                        shape.name,
                        conns,
                        s.name(),
                        gb / m.wall.as_secs_f64(),
                        pps,
                        m.cpu.as_secs_f64() / gb,
                        m.syscalls as f64 / (m.bytes as f64 / 1e6),
                        m.peak_rss as f64 / f64::from(1u32 << 20),
                        ratio.map_or_else(|| "-".into(), |r| format!("{r:.2}x")),
                    )?;
                }
                out.flush()?;
            }
        }
    }
    Ok(Outcome::Success)
}

/// Connects `n` sockets to `to`, or to a fresh built-in sink.
fn connect(
    n: usize,
    to: Option<SocketAddr>,
) -> anyhow::Result<(Vec<TcpStream>, Option<sink::Sink>)> {
    let (addr, sink) = match to {
        Some(a) => (a, None),
        None => {
            let s = sink::Sink::start(n)?;
            (s.addr, Some(s))
        }
    };
    let socks = (0..n)
        .map(|_| TcpStream::connect(addr).with_context(|| format!("connecting to {addr}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for s in &socks {
        s.set_nodelay(true)?;
    }
    Ok((socks, sink))
}

fn measure(
    strategy: Strategy,
    shape: &Shape,
    conns: usize,
    seconds: Duration,
    to: Option<SocketAddr>,
) -> anyhow::Result<Measured> {
    let (socks, sink) = connect(conns, to)?;
    let pkt = packet(shape);
    let pkt_len: usize = pkt.iter().map(Bytes::len).sum();
    debug_assert_eq!(pkt_len, shape.packet_bytes());
    let mut packets = 0u64;
    let mut syscalls = 0u64;
    reset_peak_rss();
    let cpu0 = thread_cpu();
    let t0 = Instant::now();
    match strategy {
        Strategy::Write => {
            let mut socks = socks;
            while t0.elapsed() < seconds {
                for s in &mut socks {
                    for b in &pkt {
                        s.write_all(b)?;
                        syscalls += 1;
                    }
                }
                packets += conns as u64;
            }
        }
        Strategy::Copy => {
            let mut socks = socks;
            // One glued buffer per connection, as a copying server keeps.
            let mut glued: Vec<Vec<u8>> = vec![Vec::with_capacity(pkt_len); conns];
            while t0.elapsed() < seconds {
                for (s, buf) in socks.iter_mut().zip(&mut glued) {
                    buf.clear();
                    for b in &pkt {
                        buf.extend_from_slice(b);
                    }
                    s.write_all(buf)?;
                    syscalls += 1;
                }
                packets += conns as u64;
            }
        }
        Strategy::Writev => {
            let mut outbox = Outbox::new(Framing::Stream);
            while t0.elapsed() < seconds {
                for s in &socks {
                    outbox.push(pkt.iter().cloned(), None);
                    ringmover::write_to(s.as_fd(), &mut outbox)?;
                    syscalls += 1;
                }
                packets += conns as u64;
            }
            drop(socks);
        }
        Strategy::Mover(backend) => {
            let mut mover = Mover::builder()
                .backend(BackendChoice::Force(backend))
                .queue_depth(conns.next_power_of_two().clamp(8, 4096) as u32)
                .build()?;
            let handles = socks
                .into_iter()
                .map(|s| mover.attach(s))
                .collect::<std::io::Result<Vec<_>>>()?;
            let mut done = Vec::new();
            while t0.elapsed() < seconds {
                for &c in &handles {
                    mover
                        .send(c, pkt.iter().cloned())
                        .map_err(std::io::Error::from)?;
                }
                mover.drain(&mut done)?;
                if let Some(e) = done.iter().find_map(|c| c.error.as_ref()) {
                    bail!("a connection failed: {}", e.error);
                }
                done.clear();
                packets += conns as u64;
            }
            syscalls = mover.stats().syscalls;
        }
    }
    let wall = t0.elapsed();
    let cpu = thread_cpu() - cpu0;
    let peak = peak_rss();
    let bytes = packets * pkt_len as u64;
    // Closing every connection lets the sink finish and count.
    if let Some(sink) = sink {
        let got = sink.finish()?;
        if got != bytes {
            bail!("the sink received {got} bytes of the {bytes} sent");
        }
    }
    Ok(Measured {
        bytes,
        packets,
        wall,
        cpu,
        syscalls,
        peak_rss: peak,
    })
}

/// The built-in loopback sink: one thread, epoll, `recv(MSG_TRUNC)` so the
/// data is discarded in the kernel without a copy.
mod sink {
    use std::net::{SocketAddr, TcpListener};
    use std::os::fd::AsFd;
    use std::thread::JoinHandle;

    use anyhow::Context;
    use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
    use nix::sys::socket::{recv, MsgFlags};

    #[derive(Debug)]
    pub struct Sink {
        pub addr: SocketAddr,
        thread: JoinHandle<anyhow::Result<u64>>,
    }

    impl Sink {
        /// Listens on loopback and serves `n` connections until each closes.
        pub fn start(n: usize) -> anyhow::Result<Sink> {
            let listener = super::listen_loopback()?;
            let addr = listener.local_addr()?;
            let thread = std::thread::Builder::new()
                .name("sink".into())
                .spawn(move || serve(listener, n))?;
            Ok(Sink { addr, thread })
        }

        /// Waits for every connection to close; returns the bytes received.
        pub fn finish(self) -> anyhow::Result<u64> {
            self.thread
                .join()
                .map_err(|_| anyhow::anyhow!("the sink thread panicked"))?
        }
    }

    fn serve(listener: TcpListener, n: usize) -> anyhow::Result<u64> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let mut socks = Vec::with_capacity(n);
        for i in 0..n {
            let (s, _) = listener.accept().context("sink: accepting")?;
            s.set_nonblocking(true)?;
            // Wake only once 64 KiB wait (or at EOF): the sink stays cheap, so
            // the sender, not the sink, is what the bench measures.
            super::super::set_rcvlowat(&s, 64 << 10)?;
            epoll.add(s.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, i as u64))?;
            socks.push(Some(s));
        }
        let mut open = n;
        let mut total = 0u64;
        let mut events = vec![EpollEvent::empty(); 1024];
        let mut buf = vec![0u8; 4 << 20];
        while open > 0 {
            let k = match epoll.wait(&mut events, 1000u16) {
                Ok(k) => k,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            for ev in &events[..k] {
                let i = ev.data() as usize;
                let Some(s) = socks[i].as_ref() else { continue };
                // One recv per readiness report: level-triggered epoll says
                // again if more is left, so no extra EAGAIN round trip.
                // TCP with MSG_TRUNC: the kernel discards, nothing is copied.
                match recv(
                    std::os::fd::AsRawFd::as_raw_fd(s),
                    &mut buf,
                    MsgFlags::MSG_TRUNC,
                ) {
                    Ok(0) => {
                        epoll.delete(s.as_fd())?;
                        socks[i] = None;
                        open -= 1;
                    }
                    Ok(m) => total += m as u64,
                    Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(e).context("sink: recv"),
                }
            }
        }
        Ok(total)
    }
}

/// A loopback listener on an ephemeral port with the largest backlog, so
/// a thousand connects never wait on SYN retries.
fn listen_loopback() -> anyhow::Result<TcpListener> {
    use nix::sys::socket::{
        bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn,
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::new(127, 0, 0, 1, 0),
    )?;
    listen(&fd, Backlog::MAXCONN)?;
    Ok(TcpListener::from(fd))
}
