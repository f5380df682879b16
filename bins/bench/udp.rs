//! `ringmover bench udp`: UDP senders side by side, in one run: `send` per
//! datagram, `sendmmsg`, and ringmover on each backend with GSO off and
//! on, from 1 and 16 sockets, into loopback (a reader in the bench drains
//! and counts, with and without `UDP_GRO`) and into a black-hole veth.

use std::collections::VecDeque;
use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use ringmover::{Backend, BackendChoice, Mover};
use serde_json::json;

use super::zerocopy::BlackHole;
use super::{gettid, CpuMeter};
use crate::Outcome;

/// Datagrams each socket queues per round (one `sendmmsg`, one flush).
const BATCH: usize = 64;
/// `UDP_GRO` (Linux 5.0): the receive side of GSO.
const UDP_GRO: libc::c_int = 104;

/// UDP datagrams per second, GB/s and CPU-s/GB for every sender strategy,
/// side by side. Targets: `loopback` (a reader thread in the bench drains
/// one socket with `recvmmsg` and `MSG_TRUNC`, discarding as the TCP sink
/// does, and counts what arrives: what got through, not what was
/// offered), `loopback-gro` (the same reader with `UDP_GRO`, so a GSO send
/// arrives as one read), `veth` (a veth whose peer is down, inside a network
/// namespace the bench creates: root only, skipped with a note otherwise;
/// the device drops at transmit, so it overstates GSO, which is dropped
/// before being segmented).
#[derive(Debug, clap::Args)]
#[command(long_about, after_long_help = AFTER_HELP)]
pub struct Args {
    /// Sending sockets (each round, every socket sends `BATCH` datagrams).
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    sockets: Vec<usize>,
    /// Datagram sizes in bytes.
    #[arg(long, value_delimiter = ',', default_value = "64,1200")]
    sizes: Vec<usize>,
    /// Targets: loopback, loopback-gro, veth.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "loopback,loopback-gro,veth"
    )]
    targets: Vec<String>,
    /// Strategies: send, sendmmsg (one prebuilt array, sent again and
    /// again), sendmmsg-queue (headers filled from a queue of `Bytes`, one
    /// per datagram, as ringmover is fed), and BACKEND or BACKEND-gso for
    /// each of uring, epoll, poll.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "send,sendmmsg,uring,uring-gso,epoll,epoll-gso,poll,poll-gso"
    )]
    strategy: Vec<String>,
    #[command(flatten)]
    run: super::RunArgs,
}

const AFTER_HELP: &str = "\
Examples:
  ringmover bench udp                                  # every target, 1 and 16 sockets
  ringmover bench udp --targets loopback-gro --sizes 1200 --sockets 1
  ringmover bench udp --strategy sendmmsg,uring-gso,epoll-gso --seconds 3 --json

Exit status:
  0  every cell ran
  1  a cell failed (named on stderr)
  2  bad command line";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Strategy {
    Send,
    /// One prebuilt array of headers, all pointing at one payload, sent
    /// again and again: the kernel's floor, no per-datagram user work.
    Sendmmsg,
    /// What a sender built on `sendmmsg` does (quinn-udp before GSO): each
    /// datagram is queued as its own `Bytes`, as ringmover is fed, and
    /// each call fills its headers from the front of the queue and drops
    /// what the kernel took.
    SendmmsgQueue,
    Mover {
        backend: Backend,
        gso: bool,
    },
}

fn strategy(name: &str) -> anyhow::Result<Strategy> {
    let name = name.trim().to_ascii_lowercase();
    Ok(match name.as_str() {
        "send" => Strategy::Send,
        "sendmmsg" => Strategy::Sendmmsg,
        "sendmmsg-queue" => Strategy::SendmmsgQueue,
        other => {
            let (b, gso) = match other.strip_suffix("-gso") {
                Some(b) => (b, true),
                None => (other, false),
            };
            let backend = match b {
                "uring" => Backend::Uring,
                "epoll" => Backend::Epoll,
                "poll" => Backend::Poll,
                _ => bail!(
                    "unknown strategy {other:?}: expected send, sendmmsg, sendmmsg-queue, uring[-gso], epoll[-gso], poll[-gso]"
                ),
            };
            Strategy::Mover { backend, gso }
        }
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Loopback { gro: bool },
    Veth,
}

/// What a cell measured.
#[derive(Debug, Default)]
struct Cell {
    sent: u64,
    bytes: u64,
    wall: Duration,
    cpu: Duration,
    syscalls: u64,
    gso_sends: u64,
}

impl Cell {
    /// A baseline's cell: `sent` datagrams of `size` bytes since `t0` in
    /// `syscalls` calls (no GSO).
    fn baseline(sent: u64, size: usize, t0: Instant, meter: &CpuMeter, syscalls: u64) -> Cell {
        Cell {
            sent,
            bytes: sent * size as u64,
            wall: t0.elapsed(),
            cpu: meter.elapsed(),
            syscalls,
            gso_sends: 0,
        }
    }
}

/// Sends from `socks` to `dest` with `how` for `seconds`.
fn pump(
    how: Strategy,
    socks: Vec<UdpSocket>,
    dest: SocketAddr,
    size: usize,
    seconds: Duration,
    exclude: &[i32],
) -> anyhow::Result<Cell> {
    let payload = Bytes::from(vec![0x5Au8; size]);
    for s in &socks {
        s.connect(dest)?;
    }
    match how {
        Strategy::Send => {
            let meter = CpuMeter::start(exclude);
            let t0 = Instant::now();
            let mut sent = 0u64;
            while t0.elapsed() < seconds {
                for s in &socks {
                    for _ in 0..BATCH {
                        s.send(&payload).context("send")?;
                        sent += 1;
                    }
                }
            }
            Ok(Cell::baseline(sent, size, t0, &meter, sent))
        }
        Strategy::Sendmmsg => {
            let mut iov = libc::iovec {
                iov_base: payload.as_ptr().cast_mut().cast(),
                iov_len: size,
            };
            let mut msgs: Vec<libc::mmsghdr> = (0..BATCH)
                .map(|_| {
                    // SAFETY: all-zero is a valid mmsghdr (no name, no cmsg).
                    let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                    m.msg_hdr.msg_iov = &mut iov;
                    m.msg_hdr.msg_iovlen = 1;
                    m
                })
                .collect();
            let meter = CpuMeter::start(exclude);
            let t0 = Instant::now();
            let (mut sent, mut calls) = (0u64, 0u64);
            while t0.elapsed() < seconds {
                for s in &socks {
                    calls += 1;
                    // SAFETY: `msgs` holds BATCH live headers, each pointing
                    // at `iov`, which points at `payload`; all outlive the call.
                    let n = unsafe {
                        libc::sendmmsg(s.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0)
                    };
                    if n < 0 {
                        return Err(std::io::Error::last_os_error()).context("sendmmsg");
                    }
                    sent += n as u64;
                }
            }
            Ok(Cell::baseline(sent, size, t0, &meter, calls))
        }
        Strategy::SendmmsgQueue => {
            let mut queues: Vec<VecDeque<Bytes>> = socks.iter().map(|_| VecDeque::new()).collect();
            let mut iovs: Vec<libc::iovec> = Vec::with_capacity(BATCH);
            let mut msgs: Vec<libc::mmsghdr> = Vec::with_capacity(BATCH);
            let meter = CpuMeter::start(exclude);
            let t0 = Instant::now();
            let (mut sent, mut calls) = (0u64, 0u64);
            while t0.elapsed() < seconds {
                for (s, q) in socks.iter().zip(&mut queues) {
                    q.extend((0..BATCH).map(|_| payload.clone()));
                    while !q.is_empty() {
                        iovs.clear();
                        iovs.extend(q.iter().take(BATCH).map(|b| libc::iovec {
                            iov_base: b.as_ptr().cast_mut().cast(),
                            iov_len: b.len(),
                        }));
                        msgs.clear();
                        msgs.extend(iovs.iter_mut().map(|iov| {
                            // SAFETY: all-zero is a valid mmsghdr (no name, no cmsg).
                            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                            m.msg_hdr.msg_iov = iov;
                            m.msg_hdr.msg_iovlen = 1;
                            m
                        }));
                        calls += 1;
                        // SAFETY: `msgs` holds live headers, each pointing at
                        // one of `iovs`, which point at `Bytes` in `q`; all
                        // outlive the call.
                        let n = unsafe {
                            libc::sendmmsg(s.as_raw_fd(), msgs.as_mut_ptr(), msgs.len() as u32, 0)
                        };
                        if n < 0 {
                            return Err(std::io::Error::last_os_error()).context("sendmmsg");
                        }
                        q.drain(..n as usize);
                        sent += n as u64;
                    }
                }
            }
            Ok(Cell::baseline(sent, size, t0, &meter, calls))
        }
        Strategy::Mover { backend, gso } => {
            let mut m = Mover::builder()
                .backend(BackendChoice::Force(backend))
                .gso(gso)
                .build()
                .with_context(|| format!("building a {backend} mover"))?;
            let conns = socks
                .into_iter()
                .map(|s| m.attach(s))
                .collect::<std::io::Result<Vec<_>>>()?;
            let mut done = Vec::new();
            let before = m.stats();
            let meter = CpuMeter::start(exclude);
            let t0 = Instant::now();
            while t0.elapsed() < seconds {
                for &c in &conns {
                    for _ in 0..BATCH {
                        m.send(c, [payload.clone()]).map_err(std::io::Error::from)?;
                    }
                }
                // One flush for every socket, then every completion.
                m.flush_and_wait(&mut done)?;
                if let Some(e) = done.iter().find_map(|c| c.error.as_ref()) {
                    bail!("send failed: {}", e.error);
                }
                done.clear();
            }
            let after = m.stats();
            let bytes = after.bytes - before.bytes;
            Ok(Cell {
                sent: bytes / size as u64,
                bytes,
                wall: t0.elapsed(),
                cpu: meter.elapsed(),
                syscalls: after.syscalls - before.syscalls,
                gso_sends: after.gso_sends - before.gso_sends,
            })
        }
    }
}

/// A thread draining one UDP socket, counting datagrams (a `UDP_GRO` read
/// carries several: its cmsg gives their size) until stopped.
struct Reader {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    datagrams: Arc<AtomicU64>,
    tid: i32,
    handle: std::thread::JoinHandle<std::io::Result<()>>,
}

impl Reader {
    fn start(gro: bool) -> anyhow::Result<Reader> {
        let sock = UdpSocket::bind("127.0.0.1:0")?;
        sock.set_read_timeout(Some(Duration::from_millis(20)))?;
        // As large a receive buffer as allowed (root may exceed rmem_max).
        let big: libc::c_int = 32 << 20;
        for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
            if setsockopt(&sock, libc::SOL_SOCKET, opt, big).is_ok() {
                break;
            }
        }
        if gro {
            setsockopt(&sock, libc::SOL_UDP, UDP_GRO, 1).context("setsockopt UDP_GRO")?;
        }
        let addr = sock.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let datagrams = Arc::new(AtomicU64::new(0));
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = {
            let (stop, datagrams) = (stop.clone(), datagrams.clone());
            std::thread::spawn(move || {
                let _ = tx.send(gettid());
                drain(&sock, &stop, &datagrams)
            })
        };
        let tid = rx
            .recv_timeout(Duration::from_secs(10))
            .context("waiting for the reader thread to start")?;
        Ok(Reader {
            addr,
            stop,
            datagrams,
            tid,
            handle,
        })
    }

    fn count(&self) -> u64 {
        self.datagrams.load(Ordering::Relaxed)
    }

    fn finish(self) -> anyhow::Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .map_err(|_| anyhow::anyhow!("the reader thread panicked"))??;
        Ok(self.datagrams.load(Ordering::Relaxed))
    }
}

/// Datagrams the reader takes per `recvmmsg`.
const READ_BATCH: usize = 64;

/// The reader's loop: `recvmmsg` of up to `READ_BATCH` datagrams with
/// `MSG_TRUNC` into a byte each, so it discards as the TCP sink does (the
/// kernel reports each datagram's whole length without copying it), with
/// room per datagram for a `UDP_GRO` cmsg. A reader that copied every
/// datagram with one `recvmsg` each ran at 100% of its core on GSO cells
/// and capped them below what the sender could send.
fn drain(sock: &UdpSocket, stop: &AtomicBool, datagrams: &AtomicU64) -> std::io::Result<()> {
    let mut bytes = [0u8; READ_BATCH];
    let mut control = [[0u64; 8]; READ_BATCH];
    // SAFETY: all-zero is a valid iovec and mmsghdr; the pointers are set
    // just below.
    let mut iovs: [libc::iovec; READ_BATCH] = unsafe { std::mem::zeroed() };
    let mut msgs: [libc::mmsghdr; READ_BATCH] = unsafe { std::mem::zeroed() };
    while !stop.load(Ordering::Relaxed) {
        for (i, m) in msgs.iter_mut().enumerate() {
            iovs[i] = libc::iovec {
                iov_base: bytes[i..].as_mut_ptr().cast(),
                iov_len: 1,
            };
            m.msg_hdr.msg_iov = &mut iovs[i];
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_control = control[i].as_mut_ptr().cast();
            m.msg_hdr.msg_controllen = std::mem::size_of_val(&control[i]) as _;
        }
        // SAFETY: each of the READ_BATCH headers points at its own live
        // iovec (one writable byte of `bytes`) and its own control buffer,
        // all outliving the call.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                READ_BATCH as u32,
                libc::MSG_TRUNC | libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::WouldBlock
                | std::io::ErrorKind::TimedOut
                | std::io::ErrorKind::Interrupted => continue,
                _ => return Err(e),
            }
        }
        let mut count = 0u64;
        for m in &msgs[..n as usize] {
            let mut segment = 0usize;
            // SAFETY: the kernel filled `msg_controllen` bytes of this
            // message's control buffer; CMSG_FIRSTHDR/NXTHDR stay within
            // them, and a UDP_GRO cmsg carries an int.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&m.msg_hdr);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == UDP_GRO {
                        segment = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>())
                            as usize;
                    }
                    c = libc::CMSG_NXTHDR(&m.msg_hdr, c);
                }
            }
            // With MSG_TRUNC, msg_len is the datagram's whole length.
            let len = m.msg_len as usize;
            count += if segment > 0 {
                len.div_ceil(segment) as u64
            } else {
                1
            };
        }
        datagrams.fetch_add(count, Ordering::Relaxed);
    }
    Ok(())
}

fn setsockopt(s: &impl AsRawFd, level: i32, name: i32, value: libc::c_int) -> std::io::Result<()> {
    // SAFETY: `value` is a live c_int and its size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Runs one cell into `target`: (cell, datagrams delivered if counted).
fn cell(
    target: Target,
    hole: Option<&BlackHole>,
    how: Strategy,
    sockets: usize,
    size: usize,
    seconds: Duration,
) -> anyhow::Result<(Cell, Option<u64>)> {
    match (target, hole) {
        (Target::Loopback { gro }, _) => {
            let reader = Reader::start(gro)?;
            let socks = (0..sockets)
                .map(|_| UdpSocket::bind("127.0.0.1:0"))
                .collect::<std::io::Result<Vec<_>>>()?;
            let before = reader.count();
            let cell = pump(how, socks, reader.addr, size, seconds, &[reader.tid])?;
            // What arrives after the cell was still sent in it: wait until
            // the reader has it all, or has stopped getting more (drops).
            let mut last = reader.count();
            let mut still = 0;
            while last - before < cell.sent && still < 5 {
                std::thread::sleep(Duration::from_millis(20));
                let now = reader.count();
                still = if now == last { still + 1 } else { 0 };
                last = now;
            }
            let got = reader.finish()? - before;
            Ok((cell, Some(got)))
        }
        (Target::Veth, Some(hole)) => {
            let cell = hole.run(|| {
                let socks = (0..sockets)
                    .map(|_| UdpSocket::bind("0.0.0.0:0"))
                    .collect::<std::io::Result<Vec<_>>>()?;
                pump(how, socks, BlackHole::DEST, size, seconds, &[])
            })?;
            Ok((cell, None))
        }
        (Target::Veth, None) => bail!("no black hole"),
    }
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    let strategies = args
        .strategy
        .iter()
        .map(|s| Ok((s.trim().to_ascii_lowercase(), strategy(s)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if args.sockets.contains(&0) || args.sizes.iter().any(|&s| s == 0 || s > 65507) {
        bail!("--sockets must be at least 1 and --sizes between 1 and 65507 bytes");
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if !args.run.json {
        writeln!(
            out,
            "{:<12} {:>4} {:>5}  {:<14} {:>12} {:>7} {:>9} {:>10} {:>9} {:>9}",
            "target",
            "socks",
            "size",
            "strategy",
            "datagrams/s",
            "GB/s",
            "CPU-s/GB",
            "delivered",
            "sys/dgram",
            "gso sends"
        )?;
    }
    for name in &args.targets {
        let name = name.trim().to_ascii_lowercase();
        let (target, hole) = match name.as_str() {
            "loopback" | "lo" => (Target::Loopback { gro: false }, None),
            "loopback-gro" | "lo-gro" => (Target::Loopback { gro: true }, None),
            "veth" => match BlackHole::create() {
                Ok(h) => (Target::Veth, Some(h)),
                Err(e) => {
                    eprintln!("ringmover: bench udp: veth skipped: {e:#}");
                    continue;
                }
            },
            other => bail!("unknown target {other:?}: expected loopback, loopback-gro or veth"),
        };
        for &sockets in &args.sockets {
            for &size in &args.sizes {
                for (sname, how) in &strategies {
                    let (c, delivered) =
                        cell(target, hole.as_ref(), *how, sockets, size, args.run.seconds)?;
                    let secs = c.wall.as_secs_f64();
                    // Loopback: what the reader counted; veth: what was sent.
                    let counted = delivered.unwrap_or(c.sent);
                    let rate = counted as f64 / secs;
                    let gbs = counted as f64 * size as f64 / 1e9 / secs;
                    let cpu_gb = c.cpu.as_secs_f64() / (c.bytes.max(1) as f64 / 1e9);
                    let per = c.syscalls as f64 / c.sent.max(1) as f64;
                    let share = delivered.map(|d| d as f64 / c.sent.max(1) as f64);
                    if args.run.json {
                        let v = json!({
                            "target": name, "sockets": sockets, "size": size,
                            "strategy": sname, "datagrams_per_s": rate, "sent": c.sent,
                            "delivered": delivered, "gb_per_s": gbs, "cpu_s_per_gb": cpu_gb,
                            "seconds": secs, "syscalls_per_datagram": per,
                            "gso_sends": c.gso_sends,
                        });
                        crate::json::write_typed(&mut out, "bench-udp", &v)?;
                    } else {
                        writeln!(
                            out,
                            "{:<12} {:>4} {:>5}  {:<14} {:>12.0} {:>7.3} {:>9.2} {:>10} {:>9.3} {:>9}",
                            name,
                            sockets,
                            size,
                            sname,
                            rate,
                            gbs,
                            cpu_gb,
                            share.map_or_else(|| "-".into(), |s| format!("{:.1}%", s * 100.0)),
                            per,
                            c.gso_sends,
                        )?;
                    }
                    out.flush()?;
                }
            }
        }
    }
    Ok(Outcome::Success)
}
