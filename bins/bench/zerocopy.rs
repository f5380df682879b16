//! `ringmover bench zerocopy` and `ringmover bench fanout`: what registered
//! buffers and zero-copy sends buy, measured side by side with copying.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use ringmover::{Backend, BackendChoice, Conn, Mover, ZeroCopy};
use serde_json::json;

use super::sink::connect;
use super::sink::Sink;
use super::{bytes_acked, peak_rss, reset_peak_rss, CpuMeter};
use crate::units::parse_size;
use crate::Outcome;

/// Copy vs zero-copy vs auto across send sizes, on io_uring with
/// registered buffers: over TCP on loopback (where the kernel copies
/// anyway: a deferred copy) and with UDP into a veth whose peer is down (the
/// device drops at transmit, so nothing is delivered locally and zero-copy
/// shows its real effect). The veth transport creates a network namespace
/// and needs root; it says so and is skipped otherwise.
#[derive(Debug, clap::Args)]
#[command(long_about)]
pub struct ZcArgs {
    /// Send sizes.
    #[arg(long, value_delimiter = ',', value_parser = parse_size, default_value = "4K,16K,63K,256K,1M")]
    sizes: Vec<u64>,
    /// Strategies: copy, zerocopy, auto.
    #[arg(long, value_delimiter = ',', default_value = "copy,zerocopy,auto")]
    strategy: Vec<String>,
    /// Transports: tcp (loopback), udp-veth (black-hole veth, root only).
    #[arg(long, value_delimiter = ',', default_value = "tcp,udp-veth")]
    transport: Vec<String>,
    /// Sockets sent to at once, each round one send per socket and one
    /// submission for all (TCP: connections to the sink; UDP: sockets).
    #[arg(long, default_value = "16")]
    conns: usize,
    #[command(flatten)]
    run: super::RunArgs,
}

/// One 1 MiB payload to many connections: ringmover publishes one buffer to
/// a broadcast group of all of them (`ringmover::shard`: no user-space copy,
/// memory does not grow with the count), on `--threads` shards, against a
/// copy of the payload per connection from `--threads` threads.
#[derive(Debug, clap::Args)]
#[command(long_about)]
pub struct FanoutArgs {
    /// Connection counts.
    #[arg(long, value_delimiter = ',', default_value = "1,100,1000")]
    conns: Vec<usize>,
    /// Payload size.
    #[arg(long, value_parser = parse_size, default_value = "1M")]
    payload: u64,
    /// Strategies: shared (one buffer published to a broadcast group,
    /// zero-copy Auto: each connection's first sends probe whether
    /// zero-copy pays, which on loopback it does not), shared-copy (the
    /// same with zero-copy off, what loopback and short runs favour), copy
    /// (a private copy per connection, rounds of one send each and a
    /// drain).
    #[arg(long, value_delimiter = ',', default_value = "shared,copy")]
    strategy: Vec<String>,
    /// Threads: shards for `shared`, sending threads (connections split
    /// evenly) for `copy`.
    #[arg(long, default_value = "1")]
    threads: usize,
    /// Send to this external sink instead of the built-in one.
    #[arg(long, value_name = "ADDR")]
    to: Option<SocketAddr>,
    /// Unmeasured time each cell first runs, so fresh connections are past
    /// TCP slow start and socket-buffer autotuning, and `shared`'s
    /// zero-copy probes are done, when measuring starts (at 1000
    /// connections a round of 8 payloads each takes about 0.4 s, and the
    /// probe round on loopback longer: 0.5 s measured `shared` at half its
    /// steady rate).
    #[arg(long, value_parser = crate::units::parse_duration, default_value = "2s")]
    warmup: Duration,
    #[command(flatten)]
    run: super::RunArgs,
}

fn policy(name: &str) -> anyhow::Result<ZeroCopy> {
    Ok(match name.trim().to_ascii_lowercase().as_str() {
        "copy" => ZeroCopy::Never,
        "zerocopy" | "zc" => ZeroCopy::Always,
        "auto" => ZeroCopy::AUTO,
        other => bail!("unknown strategy {other:?}: expected copy, zerocopy or auto"),
    })
}

#[derive(Debug, Default)]
struct Cell {
    bytes: u64,
    wall: Duration,
    cpu: Duration,
    zc_sends: u64,
    zc_copied: u64,
}

/// Keeps `window` bytes queued on `conn`, sending `payload` again and again
/// without ever waiting for a notification, for `seconds`.
fn pump(
    m: &mut Mover,
    conns: &[Conn],
    payload: &Bytes,
    dest: Option<SocketAddr>,
    seconds: Duration,
    sink: &Option<Sink>,
) -> anyhow::Result<Cell> {
    let window = (4 * payload.len()).max(256 << 10);
    let mut done = Vec::new();
    let meter = CpuMeter::start(&Sink::tids(sink));
    let t0 = Instant::now();
    let before = m.stats();
    while t0.elapsed() < seconds {
        for &conn in conns {
            let sent = match dest {
                Some(d) => m.send_to(conn, [payload.clone()], d),
                None => m.send(conn, [payload.clone()]),
            };
            sent.map_err(std::io::Error::from)?;
        }
        // One submission for every socket.
        m.flush()?;
        while conns.iter().any(|&c| m.queued(c).unwrap_or(0) > window) {
            m.wait(None, &mut done)?;
        }
        if let Some(e) = done.iter().find_map(|c| c.error.as_ref()) {
            bail!("send failed: {}", e.error);
        }
        done.clear();
    }
    m.flush_and_wait(&mut done)?;
    if let Some(e) = done.iter().find_map(|c| c.error.as_ref()) {
        bail!("send failed: {}", e.error);
    }
    let after = m.stats();
    Ok(Cell {
        bytes: after.bytes - before.bytes,
        wall: t0.elapsed(),
        cpu: meter.elapsed(),
        zc_sends: after.zc_sends - before.zc_sends,
        zc_copied: after.zc_copied - before.zc_copied,
    })
}

fn uring_mover(size: usize, zc: ZeroCopy) -> anyhow::Result<Mover> {
    Mover::builder()
        .backend(BackendChoice::Force(Backend::Uring))
        .fixed_buffers(1, size)
        .zero_copy(zc)
        .build()
        .context("the zerocopy bench needs io_uring with SEND_ZC")
}

fn registered_payload(m: &Mover, size: usize) -> anyhow::Result<Bytes> {
    let mut buf = m.lease()?;
    buf.fill(0x5A, size);
    Ok(buf.freeze())
}

pub fn run_zc(args: &ZcArgs) -> anyhow::Result<Outcome> {
    let policies = args
        .strategy
        .iter()
        .map(|s| Ok((s.trim().to_ascii_lowercase(), policy(s)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if args.conns == 0 {
        bail!("--conns must be at least 1");
    }
    if !args.run.json {
        writeln!(
            out,
            "{:<9} {:>7}  {:<9} {:>7} {:>9} {:>9} {:>9} {:>8}",
            "transport", "size", "strategy", "GB/s", "CPU-s/GB", "zc sends", "copied", "vs copy"
        )?;
    }
    for transport in &args.transport {
        let transport = transport.trim().to_ascii_lowercase();
        let veth = match transport.as_str() {
            "tcp" => None,
            "udp-veth" | "veth" => match BlackHole::create() {
                Ok(v) => Some(v),
                Err(e) => {
                    eprintln!("ringmover: bench zerocopy: udp-veth skipped: {e:#}");
                    continue;
                }
            },
            other => bail!("unknown transport {other:?}: expected tcp or udp-veth"),
        };
        for &size in &args.sizes {
            let size = usize::try_from(size)?;
            // A UDP datagram holds at most 65507 bytes.
            if veth.is_some() && size > 65507 {
                continue;
            }
            let mut copy_rate = None;
            for (name, zc) in &policies {
                let cell = match &veth {
                    None => {
                        let (socks, sink) = connect(args.conns, None)?;
                        let mut m = uring_mover(size, *zc)?;
                        let payload = registered_payload(&m, size)?;
                        let conns = socks
                            .into_iter()
                            .map(|s| m.attach(s))
                            .collect::<std::io::Result<Vec<_>>>()?;
                        let cell = pump(&mut m, &conns, &payload, None, args.run.seconds, &sink)?;
                        for c in conns {
                            drop(m.detach(c)?);
                        }
                        drop(payload);
                        drop(m);
                        if let Some(s) = sink {
                            let got = s.finish()?;
                            if got != cell.bytes {
                                bail!("the sink received {got} of {} bytes", cell.bytes);
                            }
                        }
                        cell
                    }
                    Some(v) => v.run(|| {
                        let mut m = uring_mover(size, *zc)?;
                        let payload = registered_payload(&m, size)?;
                        let conns = (0..args.conns)
                            .map(|_| m.attach(UdpSocket::bind("0.0.0.0:0")?))
                            .collect::<std::io::Result<Vec<_>>>()?;
                        pump(
                            &mut m,
                            &conns,
                            &payload,
                            Some(BlackHole::DEST),
                            args.run.seconds,
                            &None,
                        )
                    })?,
                };
                let gbs = cell.bytes as f64 / 1e9 / cell.wall.as_secs_f64();
                if name == "copy" {
                    copy_rate = Some(gbs);
                }
                let ratio = copy_rate.map(|c| gbs / c);
                let cpu_gb = cell.cpu.as_secs_f64() / (cell.bytes as f64 / 1e9);
                if args.run.json {
                    let v = json!({
                        "transport": transport, "size": size,
                        "strategy": name, "bytes": cell.bytes, "seconds": cell.wall.as_secs_f64(),
                        "gb_per_s": gbs, "cpu_s_per_gb": cpu_gb, "zc_sends": cell.zc_sends,
                        "zc_copied": cell.zc_copied, "vs_copy": ratio,
                    });
                    crate::json::write_typed(&mut out, "bench-zerocopy", &v)?;
                } else {
                    writeln!(
                        out,
                        "{:<9} {:>7}  {:<9} {:>7.2} {:>9.3} {:>9} {:>9} {:>8}",
                        transport,
                        crate::units::human_bytes(size as u64),
                        name,
                        gbs,
                        cpu_gb,
                        cell.zc_sends,
                        cell.zc_copied,
                        ratio.map_or_else(|| "-".into(), |r| format!("{r:.2}x")),
                    )?;
                }
                out.flush()?;
            }
        }
    }
    Ok(Outcome::Success)
}

pub fn run_fanout(args: &FanoutArgs) -> anyhow::Result<Outcome> {
    let size = usize::try_from(args.payload)?;
    if size == 0 {
        bail!("--payload must be greater than zero");
    }
    if args.threads == 0 {
        bail!("--threads must be at least 1");
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if !args.run.json {
        writeln!(
            out,
            "{:>5} {:>7}  {:<7} {:>7} {:>9} {:>12} {:>12}",
            "conns", "threads", "strategy", "GB/s", "CPU-s/GB", "peak RSS MiB", "RSS-payload"
        )?;
    }
    for &conns in &args.conns {
        for strategy in &args.strategy {
            let strategy = strategy.trim().to_ascii_lowercase();
            // The broadcast API's zero-copy policy, or None for `copy`.
            let shared = match strategy.as_str() {
                "shared" => Some(ZeroCopy::AUTO),
                "shared-copy" => Some(ZeroCopy::Never),
                "copy" => None,
                other => bail!("unknown strategy {other:?}: expected shared, shared-copy or copy"),
            };
            let (socks, sink) = connect(conns, args.to)?;
            // Duplicates to read what each peer acknowledged; closed before
            // the sink counts (it waits for every connection's end).
            let watch = socks
                .iter()
                .map(|s| s.try_clone().map(OwnedFd::from))
                .collect::<std::io::Result<Vec<_>>>()?;
            let acked = || {
                watch
                    .iter()
                    .map(|w| bytes_acked(w.as_raw_fd()))
                    .sum::<u64>()
            };
            reset_peak_rss();
            let rss0 = peak_rss();
            let payload = Bytes::from(vec![0x5Au8; size]);
            let stop = AtomicBool::new(false);
            let (window, written) = std::thread::scope(|scope| {
                let (payload, stop) = (&payload, &stop);
                let sender = scope.spawn(move || match shared {
                    Some(zc) => fanout_shared(socks, payload, args.threads, zc, stop),
                    None => fanout_copy(socks, payload, args.threads, stop),
                });
                std::thread::sleep(args.warmup);
                let a0 = acked();
                let meter = CpuMeter::start(&Sink::tids(&sink));
                let t0 = Instant::now();
                std::thread::sleep(args.run.seconds);
                let window = (acked().saturating_sub(a0), t0.elapsed(), meter.elapsed());
                stop.store(true, Ordering::Relaxed);
                let written = sender
                    .join()
                    .map_err(|_| anyhow::anyhow!("the sending thread panicked"))??;
                anyhow::Ok((window, written))
            })?;
            drop(watch);
            let (bytes, wall, cpu) = window;
            let peak = peak_rss();
            if let Some(s) = sink {
                let got = s.finish()?;
                if got != written {
                    bail!("the sink received {got} of {written} bytes");
                }
            }
            let gbs = bytes as f64 / 1e9 / wall.as_secs_f64();
            let cpu_gb = cpu.as_secs_f64() / (bytes as f64 / 1e9);
            let above = peak.saturating_sub(rss0) as f64 / f64::from(1u32 << 20);
            if args.run.json {
                let v = json!({
                    "conns": conns, "threads": args.threads,
                    "strategy": strategy, "payload": size, "bytes": bytes,
                    "seconds": wall.as_secs_f64(), "gb_per_s": gbs, "cpu_s_per_gb": cpu_gb,
                    "peak_rss": peak, "rss_growth": peak.saturating_sub(rss0),
                });
                crate::json::write_typed(&mut out, "bench-fanout", &v)?;
            } else {
                writeln!(
                    out,
                    "{:>5} {:>7}  {:<7} {:>7.2} {:>9.3} {:>12.1} {:>12.1}",
                    conns,
                    args.threads,
                    strategy,
                    gbs,
                    cpu_gb,
                    peak as f64 / f64::from(1u32 << 20),
                    above - size as f64 / f64::from(1u32 << 20),
                )?;
            }
            out.flush()?;
        }
    }
    Ok(Outcome::Success)
}

/// `shared` and `shared-copy`: every socket subscribed to one broadcast group on `threads`
/// shards; one `Packet` of the payload published again and again (one
/// message per shard, one reference count per subscriber) while no subscriber lags, until
/// `stop`; then a shutdown that flushes everything. Returns the bytes
/// sent (checked: nothing left unsent, nobody disconnected).
fn fanout_shared(
    socks: Vec<std::net::TcpStream>,
    payload: &Bytes,
    threads: usize,
    zero_copy: ZeroCopy,
    stop: &AtomicBool,
) -> anyhow::Result<u64> {
    use ringmover::shard::{Event, GroupOptions, Shards, SlowPolicy};
    let conns = socks.len();
    let per_shard = conns.div_ceil(threads);
    let (shards, events) = Shards::builder()
        .threads(threads)
        .mover(
            Mover::builder()
                .zero_copy(zero_copy)
                .queue_depth(per_shard.next_power_of_two().clamp(8, 4096) as u32),
        )
        .build()?;
    // Lagging above 4 payloads queued, caught up at 2: each socket always
    // has a write's worth waiting, and memory is the payloads in flight.
    // Every sink reads: a subscriber behind for 10 s is a failure.
    let group = shards.group(
        GroupOptions::new((8 * payload.len()).max(1 << 20), SlowPolicy::Disconnect)
            .stall(Duration::from_secs(10)),
    );
    for s in socks {
        group.subscribe(shards.attach(s)?)?;
    }
    let mut published = 0u64;
    let packet = ringmover::Packet::from(payload.clone());
    while !stop.load(Ordering::Relaxed) {
        group
            .publish_wait(packet.clone(), Duration::from_secs(10))
            .map_err(std::io::Error::from)?;
        published += 1;
    }
    let report = shards.shutdown(Duration::from_secs(60));
    let mut problems = Vec::new();
    while let Some(ev) = events.try_recv() {
        match ev {
            Event::Failed { conn, error, .. } => problems.push(format!("{conn}: {error}")),
            Event::Disconnected { conn, .. } => {
                problems.push(format!("{conn}: disconnected as a slow consumer"))
            }
            Event::ShardFailed { shard, error } => problems.push(format!("shard {shard}: {error}")),
            _ => {}
        }
    }
    if let Some(p) = problems.first() {
        bail!("{} connections failed, first: {p}", problems.len());
    }
    if report.unsent_bytes() > 0 {
        bail!(
            "{} bytes were still unsent after 60 s",
            report.unsent_bytes()
        );
    }
    Ok(published * (conns * payload.len()) as u64)
}

/// `copy`: `threads` threads, each with its own `Mover` and an even share
/// of the sockets, each round a private copy of the payload per connection
/// and a drain, until `stop`. Returns the bytes sent.
fn fanout_copy(
    socks: Vec<std::net::TcpStream>,
    payload: &Bytes,
    threads: usize,
    stop: &AtomicBool,
) -> anyhow::Result<u64> {
    let mut shares: Vec<Vec<std::net::TcpStream>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, s) in socks.into_iter().enumerate() {
        shares[i % threads].push(s);
    }
    std::thread::scope(|scope| {
        let workers: Vec<_> = shares
            .into_iter()
            .filter(|share| !share.is_empty())
            .map(|share| {
                scope.spawn(move || -> anyhow::Result<u64> {
                    let mut m = Mover::builder()
                        .queue_depth(share.len().next_power_of_two().clamp(8, 4096) as u32)
                        .build()?;
                    let handles = share
                        .into_iter()
                        .map(|s| m.attach(s))
                        .collect::<std::io::Result<Vec<_>>>()?;
                    let mut done = Vec::new();
                    let mut bytes = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        for &h in &handles {
                            // What a server without shared buffers does: a
                            // private copy per connection.
                            let buf = Bytes::copy_from_slice(payload);
                            m.send(h, [buf]).map_err(std::io::Error::from)?;
                        }
                        m.flush_and_wait(&mut done)?;
                        if let Some(e) = done.iter().find_map(|c| c.error.as_ref()) {
                            bail!("a connection failed: {}", e.error);
                        }
                        done.clear();
                        bytes += (handles.len() * payload.len()) as u64;
                    }
                    Ok(bytes)
                })
            })
            .collect();
        let mut total = 0;
        for w in workers {
            total += w
                .join()
                .map_err(|_| anyhow::anyhow!("a copy thread panicked"))??;
        }
        Ok(total)
    })
}

/// A network namespace holding a veth pair whose peer is down: UDP sent to
/// `DEST` is dropped by the device at transmit (no local delivery, so no
/// deferred copy). Removed on drop. (Also `bench udp`'s black hole.)
pub(super) struct BlackHole {
    name: String,
}

impl BlackHole {
    /// The benchmarking range (RFC 2544), which no interface of this
    /// machine uses, inside a namespace of our own: never routed.
    pub(super) const DEST: SocketAddr =
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 9));

    pub(super) fn create() -> anyhow::Result<BlackHole> {
        if !nix::unistd::geteuid().is_root() {
            bail!("needs root: it creates a network namespace and a veth pair");
        }
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("ringmover-bh-{}-{seq}", std::process::id());
        let hole = BlackHole { name };
        let n = hole.name.as_str();
        for args in [
            vec!["netns", "add", n],
            vec![
                "-n", n, "link", "add", "rmzc0", "type", "veth", "peer", "name", "rmzc1",
            ],
            vec!["-n", n, "addr", "add", "198.18.0.1/24", "dev", "rmzc0"],
            // A 64 KiB MTU: datagrams leave unfragmented (fragmenting copies).
            vec!["-n", n, "link", "set", "rmzc0", "mtu", "65535", "up"],
            // A static neighbour: no ARP, so every datagram reaches the device.
            vec![
                "-n",
                n,
                "neigh",
                "add",
                "198.18.0.2",
                "lladdr",
                "02:00:00:00:00:02",
                "dev",
                "rmzc0",
                "nud",
                "permanent",
            ],
        ] {
            let st = Command::new("ip")
                .args(&args)
                .status()
                .context("running ip(8) (package iproute2)")?;
            if !st.success() {
                bail!("ip {} failed", args.join(" "));
            }
        }
        Ok(hole)
    }

    /// Runs `f` on a thread that has entered the namespace.
    pub(super) fn run<T: Send>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send,
    ) -> anyhow::Result<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .context("entering the bench's network namespace")?;
                f()
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the veth bench thread panicked"))?
        })
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
