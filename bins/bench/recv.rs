//! `ringmover bench recv`: one loopback stream into a page-cache file, by
//! each backend and by a read/write loop, side by side.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::resource::UsageWho;
use ringmover::recv::{Event, Receiver, RecvOptions};
use ringmover::Backend;
use serde_json::json;

use crate::units::{human_bytes, parse_size};
use crate::Outcome;

/// Stream --bytes over loopback from in-process sender threads into
/// files, with each backend and with a read/write loop (64 KiB buffer).
/// Reports GB/s and receiver CPU-seconds per GiB: process-wide
/// getrusage(RUSAGE_SELF) deltas minus the sender threads' own
/// getrusage(RUSAGE_THREAD), so io-wq workers count as receiver CPU.
///
/// With --idle N: N idle connections on the io_uring backend, and how many
/// iou-wrk threads exist meanwhile.
#[derive(Debug, clap::Args)]
#[command(long_about)]
pub struct Args {
    /// Bytes per run (e.g. 2G, 256M).
    #[arg(long, value_name = "BYTES", default_value = "2G", value_parser = parse_size)]
    bytes: u64,

    /// Directory for the output file (removed after each run).
    #[arg(long, value_name = "DIR", default_value_os_t = std::env::temp_dir())]
    dir: PathBuf,

    /// Split the bytes over this many concurrent connections (ringmover: all
    /// on one thread; baseline: a thread per connection).
    #[arg(long, value_name = "N", default_value_t = 1)]
    conns: usize,

    /// Runs per method; the best run is reported.
    #[arg(long, default_value_t = 1)]
    runs: u32,

    /// Instead: hold this many idle connections on the io_uring backend and
    /// count iou-wrk threads.
    #[arg(long, value_name = "N")]
    idle: Option<usize>,

    /// Print JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// A way to receive the stream.
#[derive(Debug, Clone, Copy)]
enum Method {
    Ringmover(Backend),
    ReadWrite,
}

impl Method {
    fn name(self) -> String {
        match self {
            Method::Ringmover(b) => format!("ringmover {b}"),
            Method::ReadWrite => String::from("read/write 64 KiB"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Measure {
    secs: f64,
    cpu: f64,
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    crate::recv::raise_nofile_limit();
    if let Some(n) = args.idle {
        return idle(n, args.json);
    }
    let methods = [
        Method::ReadWrite,
        Method::Ringmover(Backend::Uring),
        Method::Ringmover(Backend::Epoll),
        Method::Ringmover(Backend::Poll),
    ];
    let mut rows = Vec::new();
    for m in methods {
        let mut best: Option<Measure> = None;
        for _ in 0..args.runs.max(1) {
            let r = measure(m, args.bytes, args.conns.max(1), &args.dir)
                .with_context(|| format!("benchmarking {}", m.name()))?;
            if best.map_or(true, |b| r.secs < b.secs) {
                best = Some(r);
            }
        }
        if let Some(b) = best {
            rows.push((m, b));
        }
    }
    let base = rows
        .iter()
        .find(|(m, _)| matches!(m, Method::ReadWrite))
        .map(|(_, r)| *r);
    let gib = args.bytes as f64 / (1u64 << 30) as f64;
    let (release, _) = kernel();
    if args.json {
        let v = json!({
            "bytes": args.bytes,
            "conns": args.conns,
            "dir": args.dir,
            "kernel": release,
            "cpus": thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "cpu_accounting": "RUSAGE_SELF delta minus sender threads' RUSAGE_THREAD (includes io-wq workers)",
            "results": rows.iter().map(|(m, r)| json!({
                "method": m.name(),
                "seconds": r.secs,
                "gb_per_s": args.bytes as f64 / r.secs / 1e9,
                "cpu_s_per_gib": r.cpu / gib,
                "speed_vs_read_write": base.map(|b| b.secs / r.secs),
            })).collect::<Vec<_>>(),
        });
        println!("{v}");
        return Ok(Outcome::Success);
    }
    let mut out = io::stdout().lock();
    writeln!(
        out,
        "recv bench: {} over loopback in {} connection(s) into {} (kernel {release}, {} CPUs)",
        human_bytes(args.bytes),
        args.conns,
        args.dir.display(),
        thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    )?;
    writeln!(
        out,
        "receiver CPU = getrusage(RUSAGE_SELF) delta - sender threads' RUSAGE_THREAD (io-wq workers included)"
    )?;
    writeln!(
        out,
        "{:<20} {:>8} {:>10} {:>14}",
        "method", "GB/s", "vs r/w", "CPU-s/GiB"
    )?;
    for (m, r) in &rows {
        let ratio = base.map_or(String::from("-"), |b| format!("{:.2}x", b.secs / r.secs));
        writeln!(
            out,
            "{:<20} {:>8.2} {:>10} {:>14.3}",
            m.name(),
            args.bytes as f64 / r.secs / 1e9,
            ratio,
            r.cpu / gib
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

/// One run: `conns` sender threads stream `bytes` between them; this
/// thread receives (the read/write baseline: one thread per connection).
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
    let share = bytes / conns as u64;
    let expected = share * conns as u64;

    let cpu0 = cpu_secs(UsageWho::RUSAGE_SELF)?;
    let started = Instant::now();
    let senders: Vec<_> = (0..conns)
        .map(|_| thread::spawn(move || send_share(addr, share)))
        .collect();
    let got = match method {
        Method::ReadWrite => read_write(&listener, files)?,
        Method::Ringmover(b) => ringmover(b, listener, files)?,
    };
    let secs = started.elapsed().as_secs_f64();
    let mut sender_cpu = 0.0;
    for s in senders {
        sender_cpu += s
            .join()
            .map_err(|_| anyhow::anyhow!("sender thread panicked"))?
            .context("sending")?;
    }
    let cpu = cpu_secs(UsageWho::RUSAGE_SELF)? - cpu0 - sender_cpu;
    for p in &paths {
        let _ = std::fs::remove_file(p);
    }
    if got != expected {
        bail!("received {got} bytes, expected {expected}");
    }
    Ok(Measure { secs, cpu })
}

/// A sender thread: `bytes` to `addr`; returns the thread's own CPU time.
fn send_share(addr: std::net::SocketAddr, bytes: u64) -> io::Result<f64> {
    let t0 = cpu_secs(UsageWho::RUSAGE_THREAD).map_err(io::Error::other)?;
    let mut s = TcpStream::connect(addr)?;
    let buf: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n])?;
        left -= n as u64;
    }
    drop(s);
    Ok(cpu_secs(UsageWho::RUSAGE_THREAD).map_err(io::Error::other)? - t0)
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
fn ringmover(backend: Backend, listener: TcpListener, mut files: Vec<File>) -> anyhow::Result<u64> {
    let conns = files.len();
    let mut r = Receiver::new(backend, RecvOptions::default())?;
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
                    r.attach(socket.into(), peer, f)?;
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
                r.attach(socket.into(), peer, dev_null()?)?;
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
        println!(
            "{}",
            json!({"idle_connections": n, "iou_wrk_threads": workers, "finished_after_close": finished})
        );
    } else {
        println!("{n} idle connections on io_uring: {workers} iou-wrk threads; {finished} finished after the peers closed");
    }
    Ok(Outcome::Success)
}
