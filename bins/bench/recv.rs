//! `ringmover bench recv`: loopback streams into page-cache files, by each
//! backend and by a read/write loop, side by side, from a sender in its own
//! process.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::resource::UsageWho;
use ringmover::recv::{Event, Receiver, RecvOptions};
use ringmover::Backend;
use serde::Serialize;

use crate::json::{self, Line};
use crate::units::{human_bytes, parse_size};
use crate::Outcome;

/// Stream --bytes over loopback into files, with each backend and with a
/// read/write loop (64 KiB buffer, a thread per connection, as `nc -l >
/// file` does), and report the median and the spread of --runs runs.
///
/// The sender is a child process (this binary again), so its CPU never
/// mixes with the receiver's: receiver CPU is this process's
/// getrusage(RUSAGE_SELF) delta, io_uring workers included. Methods are
/// interleaved run by run, so a slow spell of the machine hits them all;
/// outputs are removed after each run and `sync(2)` runs before each, so
/// every run starts with the same page-cache state.
///
/// With --idle N: N idle connections on the io_uring backend, and how many
/// iou-wrk threads exist meanwhile.
#[derive(Debug, clap::Args)]
#[command(long_about, after_long_help = AFTER_HELP)]
pub struct Args {
    /// Bytes per run (e.g. 2GiB or 2G = 2 * 2^30, 2GB = 2 * 10^9).
    #[arg(long, value_name = "SIZE", default_value = "1GiB", value_parser = parse_size)]
    bytes: u64,

    /// Directory for the output files (removed after each run).
    #[arg(long, value_name = "DIR", default_value_os_t = std::env::temp_dir())]
    dir: PathBuf,

    /// Split the bytes over this many concurrent connections (ringmover: all
    /// on one thread; baseline: a thread per connection).
    #[arg(long, value_name = "N", default_value_t = 1)]
    conns: usize,

    /// Runs per method, interleaved; the median and the spread (slowest /
    /// fastest wall time) are reported.
    #[arg(long, default_value_t = 3)]
    runs: u32,

    /// Instead: hold this many idle connections on the io_uring backend and
    /// count iou-wrk threads.
    #[arg(long, value_name = "N")]
    idle: Option<usize>,

    /// Methods to run: read-write, uring, epoll, poll.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "read-write,uring,epoll,poll"
    )]
    methods: Vec<String>,

    /// Also run each ringmover method with O_DIRECT output (rows marked
    /// "direct"): received into aligned buffers, written around the page
    /// cache.
    #[arg(long)]
    direct: bool,

    /// Print one `bench-recv` JSON line per method (with --idle, one
    /// `bench-recv-idle` line) on stdout; see docs/cli-json.md.
    #[arg(long)]
    json: bool,

    /// Internal: be the sender process, streaming --bytes over --conns
    /// connections to ADDR.
    #[arg(long, value_name = "ADDR", hide = true)]
    sender: Option<SocketAddr>,
}

const AFTER_HELP: &str = "\
Examples:
  ringmover bench recv                             # 1 GiB, 3 runs per method
  ringmover bench recv --bytes 256MiB --conns 16 --runs 5
  ringmover bench recv --bytes 8GB --dir /mnt/nvme --json
  ringmover bench recv --idle 1000                 # iou-wrk threads for idle connections

Exit status:
  0  every run received every byte
  1  a run failed (named on stderr)
  2  bad command line";

/// The `bench-recv` JSON line: one method's median over the runs.
#[derive(Debug, Serialize)]
struct Row {
    /// Bytes per run.
    bytes: u64,
    conns: usize,
    runs: u32,
    kernel: String,
    cpus: usize,
    method: String,
    /// Median wall time of a run.
    seconds: f64,
    /// Slowest wall time over fastest.
    spread: f64,
    gb_per_s: f64,
    /// Receiver CPU-seconds per 1e9 bytes (median).
    cpu_s_per_gb: f64,
    /// Speed relative to the read/write loop (wall time ratio).
    vs_read_write: f64,
}

impl Line for Row {
    const TYPE: &'static str = "bench-recv";
}

/// The `bench-recv-idle` JSON line.
#[derive(Debug, Serialize)]
struct IdleRow {
    idle_connections: usize,
    iou_wrk_threads: usize,
    finished_after_close: usize,
}

impl Line for IdleRow {
    const TYPE: &'static str = "bench-recv-idle";
}

/// A way to receive the stream.
#[derive(Debug, Clone, Copy)]
enum Method {
    Ringmover(Backend),
    /// The same with `RecvOptions::direct`.
    Direct(Backend),
    ReadWrite,
}

impl Method {
    fn name(self) -> String {
        match self {
            Method::Ringmover(b) => format!("ringmover {b}"),
            Method::Direct(b) => format!("ringmover {b} direct"),
            Method::ReadWrite => String::from("read/write 64 KiB"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Measure {
    secs: f64,
    cpu: f64,
}

/// The median and spread of one method's runs.
#[derive(Debug, Clone, Copy)]
struct Summary {
    secs: f64,
    cpu: f64,
    /// Slowest wall time over fastest.
    spread: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn summarize(runs: &[Measure]) -> Summary {
    let secs: Vec<f64> = runs.iter().map(|r| r.secs).collect();
    let max = secs.iter().copied().fold(f64::MIN, f64::max);
    let min = secs.iter().copied().fold(f64::MAX, f64::min);
    Summary {
        secs: median(secs),
        cpu: median(runs.iter().map(|r| r.cpu).collect()),
        spread: max / min,
    }
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    crate::recv::raise_nofile_limit();
    if let Some(addr) = args.sender {
        return sender(addr, args.bytes, args.conns.max(1));
    }
    if let Some(n) = args.idle {
        return idle(n, args.json);
    }
    let methods = args
        .methods
        .iter()
        .map(|m| match m.trim() {
            "read-write" => Ok(Method::ReadWrite),
            "uring" => Ok(Method::Ringmover(Backend::Uring)),
            "epoll" => Ok(Method::Ringmover(Backend::Epoll)),
            "poll" => Ok(Method::Ringmover(Backend::Poll)),
            other => bail!("unknown method {other:?}: expected read-write, uring, epoll or poll"),
        })
        .collect::<anyhow::Result<Vec<Method>>>()?;
    let mut methods = methods;
    if args.direct {
        let direct: Vec<Method> = methods
            .iter()
            .filter_map(|m| match m {
                Method::Ringmover(b) => Some(Method::Direct(*b)),
                _ => None,
            })
            .collect();
        methods.extend(direct);
    }
    if methods.is_empty() {
        bail!("--methods names no method");
    }
    let mut runs: Vec<Vec<Measure>> = vec![Vec::new(); methods.len()];
    for _ in 0..args.runs.max(1) {
        for (i, &m) in methods.iter().enumerate() {
            let r = measure(m, args.bytes, args.conns.max(1), &args.dir)
                .with_context(|| format!("benchmarking {}", m.name()))?;
            runs[i].push(r);
        }
    }
    let rows: Vec<(Method, Summary)> = methods
        .iter()
        .zip(&runs)
        .map(|(&m, r)| (m, summarize(r)))
        .collect();
    // Ratios are against the read/write loop when it ran, else the first.
    let base = rows
        .iter()
        .find(|(m, _)| matches!(m, Method::ReadWrite))
        .unwrap_or(&rows[0])
        .1;
    let (release, _) = kernel();
    let cpus = thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut out = io::stdout().lock();
    if args.json {
        for (m, r) in &rows {
            let row = Row {
                bytes: args.bytes,
                conns: args.conns,
                runs: args.runs.max(1),
                kernel: release.clone(),
                cpus,
                method: m.name(),
                seconds: r.secs,
                spread: r.spread,
                gb_per_s: json::gb_per_s(args.bytes, r.secs),
                cpu_s_per_gb: json::cpu_s_per_gb(r.cpu, args.bytes),
                vs_read_write: base.secs / r.secs,
            };
            json::write(&mut out, &row)?;
        }
        return Ok(Outcome::Success);
    }
    writeln!(
        out,
        "recv bench: {} over loopback in {} connection(s) into {} (kernel {release}, {cpus} CPUs), median of {} interleaved runs",
        human_bytes(args.bytes),
        args.conns,
        args.dir.display(),
        args.runs.max(1),
    )?;
    writeln!(
        out,
        "sender: a child process; receiver CPU = this process's getrusage(RUSAGE_SELF) delta (io-wq workers included)"
    )?;
    writeln!(
        out,
        "{:<20} {:>8} {:>8} {:>10} {:>14} {:>12}",
        "method", "wall s", "GB/s", "vs r/w", "CPU-s/GB", "max/min wall"
    )?;
    for (m, r) in &rows {
        writeln!(
            out,
            "{:<20} {:>8.3} {:>8.2} {:>9.2}x {:>14.3} {:>12.2}",
            m.name(),
            r.secs,
            json::gb_per_s(args.bytes, r.secs),
            base.secs / r.secs,
            json::cpu_s_per_gb(r.cpu, args.bytes),
            r.spread,
        )?;
    }
    Ok(Outcome::Success)
}

fn kernel() -> (String, String) {
    match nix::sys::utsname::uname() {
        Ok(u) => (
            u.release().to_string_lossy().into_owned(),
            u.machine().to_string_lossy().into_owned(),
        ),
        Err(_) => (String::from("unknown"), String::from("unknown")),
    }
}

fn cpu_secs(who: UsageWho) -> anyhow::Result<f64> {
    Ok(super::rusage_cpu(who).context("getrusage")?.as_secs_f64())
}

/// Starts the sender process: this binary, `bench recv --sender ADDR`.
fn spawn_sender(addr: SocketAddr, bytes: u64, conns: usize) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("finding this binary to run the sender")?;
    Command::new(exe)
        .args(["bench", "recv", "--sender", &addr.to_string()])
        .args(["--bytes", &bytes.to_string(), "--conns", &conns.to_string()])
        .stdin(Stdio::null())
        .spawn()
        .context("starting the sender process")
}

/// One run: a sender process streams `bytes` over `conns` connections;
/// this process receives.
fn measure(method: Method, bytes: u64, conns: usize, dir: &Path) -> anyhow::Result<Measure> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let paths: Vec<PathBuf> = (0..conns)
        .map(|i| dir.join(format!("ringmover-bench-recv-{}-{i}", std::process::id())))
        .collect();
    let files = paths
        .iter()
        .map(|p| {
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(p)
                .with_context(|| format!("creating {}", p.display()))
        })
        .collect::<anyhow::Result<Vec<File>>>()?;
    let expected = bytes / conns as u64 * conns as u64;
    // Nothing dirty from an earlier run or another program is written back
    // during this one.
    nix::unistd::sync();

    let mut child = spawn_sender(addr, bytes, conns)?;
    let cpu0 = cpu_secs(UsageWho::RUSAGE_SELF)?;
    let started = Instant::now();
    let got = match method {
        Method::ReadWrite => read_write(&listener, files),
        Method::Ringmover(b) => ringmover(b, false, listener, files),
        Method::Direct(b) => ringmover(b, true, listener, files),
    };
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu_secs(UsageWho::RUSAGE_SELF)? - cpu0;
    let status = child.wait().context("waiting for the sender process")?;
    for p in &paths {
        let _ = std::fs::remove_file(p);
    }
    let got = got?;
    if !status.success() {
        bail!("the sender process failed ({status})");
    }
    if got != expected {
        bail!("received {got} bytes, expected {expected}");
    }
    Ok(Measure { secs, cpu })
}

/// The sender process: `conns` threads, `bytes / conns` each, to `addr`.
fn sender(addr: SocketAddr, bytes: u64, conns: usize) -> anyhow::Result<Outcome> {
    let share = bytes / conns as u64;
    let threads: Vec<_> = (0..conns)
        .map(|_| thread::spawn(move || send_share(addr, share)))
        .collect();
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("sender thread panicked"))?
            .with_context(|| format!("sending to {addr}"))?;
    }
    Ok(Outcome::Success)
}

fn send_share(addr: SocketAddr, bytes: u64) -> io::Result<()> {
    let mut s = TcpStream::connect(addr)?;
    let buf: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// The baseline: a thread per connection, read(2) 64 KiB then write(2).
fn read_write(listener: &TcpListener, files: Vec<File>) -> anyhow::Result<u64> {
    let mut workers = Vec::new();
    for mut file in files {
        let (mut s, _) = listener.accept().context("accepting")?;
        workers.push(thread::spawn(move || -> io::Result<u64> {
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0;
            loop {
                let n = match s.read(&mut buf) {
                    Ok(0) => return Ok(total),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                file.write_all(&buf[..n])?;
                total += n as u64;
            }
        }));
    }
    let mut total = 0;
    for w in workers {
        total += w
            .join()
            .map_err(|_| anyhow::anyhow!("receiver thread panicked"))?
            .context("receiving")?;
    }
    Ok(total)
}

/// ringmover: every connection on one `Receiver` in this thread.
fn ringmover(
    backend: Backend,
    direct: bool,
    listener: TcpListener,
    mut files: Vec<File>,
) -> anyhow::Result<u64> {
    let conns = files.len();
    let options = RecvOptions {
        direct,
        ..RecvOptions::default()
    };
    let mut r = Receiver::new(backend, options)?;
    r.listen(listener, Some(conns as u64))?;
    let mut events = Vec::new();
    let mut finished = 0;
    let mut total = 0;
    while finished < conns {
        r.wait(Some(Duration::from_secs(5)), &mut events)?;
        for e in events.drain(..) {
            match e {
                Event::Incoming { socket, peer } => {
                    let f = files.pop().context("more connections than expected")?;
                    r.attach(socket, peer, f)?;
                }
                Event::Finished(done) => {
                    if let Err(why) = done.result {
                        bail!("{}: {why}", done.peer);
                    }
                    finished += 1;
                    total += done.bytes;
                }
                Event::AcceptFailed(e) => return Err(e).context("accepting"),
            }
        }
    }
    Ok(total)
}

/// Counts threads of this process named `iou-wrk-*`.
fn iou_workers() -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .filter(|c| c.starts_with("iou-wrk"))
        .count()
}

/// `n` idle connections on the io_uring backend: how many io-wq workers?
fn idle(n: usize, json: bool) -> anyhow::Result<Outcome> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut r = Receiver::new(Backend::Uring, RecvOptions::default())?;
    r.listen(listener, Some(n as u64))?;
    let (hold_tx, hold_rx) = mpsc::channel::<()>();
    let client = thread::spawn(move || -> io::Result<()> {
        let socks: Vec<TcpStream> = (0..n)
            .map(|_| TcpStream::connect(addr))
            .collect::<io::Result<_>>()?;
        let _ = hold_rx.recv();
        drop(socks);
        Ok(())
    });
    let dev_null = || File::options().write(true).open("/dev/null");
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut attached = 0;
    while attached < n {
        if Instant::now() > deadline {
            bail!("only {attached} of {n} connections arrived in 30 s");
        }
        r.wait(Some(Duration::from_millis(100)), &mut events)?;
        for e in events.drain(..) {
            if let Event::Incoming { socket, peer } = e {
                r.attach(socket, peer, dev_null()?)?;
                attached += 1;
            }
        }
    }
    // Let anything that would be punted to io-wq get there.
    let settle = Instant::now() + Duration::from_millis(500);
    while Instant::now() < settle {
        r.wait(Some(Duration::from_millis(100)), &mut events)?;
    }
    let workers = iou_workers();
    let _ = hold_tx.send(());
    client
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))?
        .context("connecting")?;
    let mut finished = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while finished < n && Instant::now() < deadline {
        r.wait(Some(Duration::from_millis(100)), &mut events)?;
        finished += events
            .drain(..)
            .filter(|e| matches!(e, Event::Finished(_)))
            .count();
    }
    if json {
        let row = IdleRow {
            idle_connections: n,
            iou_wrk_threads: workers,
            finished_after_close: finished,
        };
        json::write(&mut io::stdout().lock(), &row)?;
    } else {
        println!("{n} idle connections on io_uring: {workers} iou-wrk threads; {finished} finished after the peers closed");
    }
    Ok(Outcome::Success)
}
