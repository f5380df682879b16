//! `ringmover send`: send a file or stdin to a TCP address.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ringmover::send::{reset_on_close, Format, SendPath, Sender};
use serde::Serialize;

use crate::json::{self, Line};
use crate::progress::{Meter, ProgressArgs};
use crate::signals;
use crate::units::{human_bytes, human_rate, parse_limit, Limit};
use crate::Outcome;

/// Send FILE (or stdin, given `-`) to a TCP address, then wait for the
/// receiver to close.
///
/// By default the bytes are framed for `ringmover recv` (a magic,
/// length-prefixed frames, an end marker; see docs/recv.md), so a transfer cut
/// short at any point, even by SIGKILL, never looks complete to it. --raw
/// sends the bytes alone, for any other receiver.
///
/// On any error, SIGINT or SIGTERM the connection is reset (never closed
/// with a FIN), so the receiver sees the failure. The input is opened
/// before connecting: a missing file never connects.
///
/// On Linux, regular files go with sendfile(2); stdin, devices, files
/// sendfile cannot read, files of /proc, /sys and other pseudo file systems
/// (whose sizes say nothing), and everything on other Unix go through a
/// 64 KiB read/write loop, to the end of the input.
#[derive(Debug, Clone, clap::Args)]
#[command(long_about, after_long_help = AFTER_HELP)]
pub struct Args {
    /// The file to send, or `-` for stdin.
    #[arg(value_name = "FILE|-")]
    input: PathBuf,

    /// Where to send it.
    #[arg(long, value_name = "ADDR")]
    to: String,

    /// Send the bytes without ringmover's framing (for nc, socat, ...;
    /// `ringmover recv` accepts both). A raw receiver must close the
    /// connection after the end of the stream (nc: -N or -q 0).
    #[arg(long)]
    raw: bool,

    /// Fail when the receiver takes no byte for this long, or has not
    /// closed the connection this long after the last one (e.g. 30s,
    /// 500ms; `off` waits forever).
    #[arg(long, value_name = "DURATION|off", default_value = "5m", value_parser = parse_limit)]
    idle_timeout: Limit,

    #[command(flatten)]
    progress: ProgressArgs,

    /// Print one `send-summary` JSON line on stdout when the send ends,
    /// whether it succeeded or not (see docs/cli-json.md).
    #[arg(long)]
    json: bool,
}

const AFTER_HELP: &str = "\
Examples:
  ringmover send backup.tar --to host:7000
  tar c dir | ringmover send - --to host:7000
  ringmover send disk.img --to host:7000 --json --no-progress
  ringmover send notes.txt --raw --to host:9000     # to `nc -l -N 9000`

Progress: on a terminal, one line redrawn in place with bytes, rate,
percentage and ETA (when the size is known); elsewhere nothing unless
--progress (then a line every second).

Exit status:
  0    every byte was sent and the receiver then closed the connection cleanly
  1    the send failed (input, connection, timeout, reset by the receiver)
  2    bad command line
  130  interrupted by SIGINT (143: SIGTERM); the connection was reset";

/// The `send-summary` JSON line (docs/cli-json.md).
#[derive(Debug, Serialize)]
struct Summary<'a> {
    to: &'a str,
    /// The input as given (`-` for stdin; lossy UTF-8).
    path: String,
    /// Payload bytes sent (all of them on success).
    bytes: u64,
    seconds: f64,
    gb_per_s: f64,
    /// `sendfile` or `read-write`; null when the send failed.
    method: Option<&'static str>,
    /// `complete`, `failed` or `interrupted`.
    outcome: &'static str,
    error: Option<String>,
}

impl Line for Summary<'_> {
    const TYPE: &'static str = "send-summary";
}

impl Args {
    fn summary(
        &self,
        bytes: u64,
        seconds: f64,
        method: Option<&'static str>,
        outcome: &'static str,
        error: Option<String>,
    ) -> Summary<'_> {
        Summary {
            to: &self.to,
            path: self.input.to_string_lossy().into_owned(),
            bytes,
            seconds,
            gb_per_s: json::gb_per_s(bytes, seconds),
            method,
            outcome,
            error,
        }
    }

    /// Prints `summary` with --json. A closed stdout loses only the report.
    fn report(&self, summary: &Summary<'_>) {
        if self.json {
            let _ = json::write(&mut io::stdout().lock(), summary);
        }
    }
}

/// What the signal watcher and the failure report need: the connection (a
/// duplicate of its fd) once there is one, when sending started, the bytes
/// sent so far, and the progress bar to clear.
#[derive(Debug, Default)]
struct Abort {
    socket: Mutex<Option<TcpStream>>,
    started: OnceLock<Instant>,
    sent: AtomicU64,
    bar: OnceLock<indicatif::ProgressBar>,
}

impl Abort {
    fn seconds(&self) -> f64 {
        self.started
            .get()
            .map_or(0.0, |t| t.elapsed().as_secs_f64())
    }
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    // Errors are reported here, never handed to main: a broken pipe from
    // the socket is a failed send, not a closed stdout.
    let abort = Arc::new(Abort::default());
    match send(args, &abort) {
        Ok(()) => Ok(Outcome::Success),
        Err(e) => {
            let _ = writeln!(io::stderr(), "ringmover: {e:#}");
            let sent = abort.sent.load(Ordering::SeqCst);
            args.report(&args.summary(
                sent,
                abort.seconds(),
                None,
                "failed",
                Some(format!("{e:#}")),
            ));
            Ok(Outcome::Failed)
        }
    }
}

fn send(args: &Args, abort: &Arc<Abort>) -> anyhow::Result<()> {
    let on_signal = abort.clone();
    let report_args = args.clone();
    signals::watch(move |sig| {
        // Reset, never FIN: the receiver must not take this for an end.
        let sent = on_signal.sent.load(Ordering::SeqCst);
        let connected = match on_signal.socket.lock() {
            Ok(guard) => guard.as_ref().map(reset_on_close).is_some(),
            Err(_) => false,
        };
        if let Some(bar) = on_signal.bar.get() {
            bar.finish_and_clear();
        }
        let what = if connected {
            format!(
                "; reset the connection to {} after {sent} bytes",
                report_args.to
            )
        } else {
            String::new()
        };
        let why = format!("interrupted by {}{what}", sig.as_str());
        let _ = writeln!(io::stderr(), "ringmover: {why}");
        report_args.report(&report_args.summary(
            sent,
            on_signal.seconds(),
            None,
            "interrupted",
            Some(why),
        ));
        std::process::exit(signals::exit_status(sig).into());
    })
    .context("watching SIGINT and SIGTERM")?;

    // The input first: a missing file or a directory never connects.
    let is_stdin = args.input.as_os_str() == "-";
    let (file, size) = if is_stdin {
        (None, None)
    } else {
        let file =
            File::open(&args.input).with_context(|| format!("opening {}", args.input.display()))?;
        let meta = file
            .metadata()
            .with_context(|| format!("reading the metadata of {}", args.input.display()))?;
        if meta.is_dir() {
            bail!("{} is a directory", args.input.display());
        }
        // Size 0 (/proc, devices) says nothing about what will be read,
        // nor does a pseudo file system's size (sysfs says 4096).
        let pseudo = size_says_nothing(&file);
        let size = (meta.is_file() && meta.len() > 0 && !pseudo).then_some(meta.len());
        (
            Some(Input {
                file,
                stream: pseudo,
            }),
            size,
        )
    };
    let name = if is_stdin {
        "stdin".to_owned()
    } else {
        args.input.display().to_string()
    };

    let socket =
        TcpStream::connect(&args.to).with_context(|| format!("connecting to {}", args.to))?;
    if let Ok(dup) = socket.try_clone() {
        if let Ok(mut slot) = abort.socket.lock() {
            *slot = Some(dup);
        }
    }
    let started = *abort.started.get_or_init(Instant::now);
    let mut meter = Meter::new(args.progress.mode(), args.to.clone(), size);
    if let Some(bar) = meter.bar() {
        let _ = abort.bar.set(bar);
    }
    let result = transfer(args, &socket, file.as_ref(), abort, &mut meter);
    let (bytes, method) = match result {
        Ok(done) => done,
        Err((sent, e)) => {
            meter.finish(None);
            // Best effort: if SO_LINGER cannot be set, the close is a FIN,
            // and the framing still tells a ringmover receiver.
            let _ = reset_on_close(&socket);
            return Err(e).with_context(|| {
                format!(
                    "sending {name} to {} (reset the connection after {sent} bytes)",
                    args.to
                )
            });
        }
    };
    let secs = started.elapsed().as_secs_f64();
    meter.finish(Some(format_args!(
        "{}: sent {} in {secs:.2} s ({})",
        args.to,
        human_bytes(bytes),
        human_rate(bytes as f64 / secs)
    )));
    let method = match method {
        SendPath::Sendfile => "sendfile",
        SendPath::Copy => "read-write",
    };
    args.report(&args.summary(bytes, secs, Some(method), "complete", None));
    Ok(())
}

/// Reads from `R`, waiting with poll(2) whenever it says `EAGAIN`: a
/// stdin that another process made non-blocking (`O_NONBLOCK` is on the
/// open file description they share, e.g. a pipe from a Node.js producer)
/// is read as if it were blocking, not taken for a failed input.
#[derive(Debug)]
struct WaitingReader<R>(R);

impl<R: Read + AsFd> Read for WaitingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use nix::errno::Errno;
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        loop {
            match self.0.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut fds = [PollFd::new(self.0.as_fd(), PollFlags::POLLIN)];
                    match poll(&mut fds, PollTimeout::NONE) {
                        Ok(_) | Err(Errno::EINTR) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                other => return other,
            }
        }
    }
}

/// An input file.
#[derive(Debug)]
struct Input {
    file: File,
    /// Read to its end like stdin (its size is no promise to frame by).
    stream: bool,
}

/// Sends everything and waits for the peer's close. On failure, returns
/// the bytes sent so far with the error.
fn transfer(
    args: &Args,
    socket: &TcpStream,
    file: Option<&Input>,
    abort: &Abort,
    meter: &mut Meter,
) -> Result<(u64, SendPath), (u64, anyhow::Error)> {
    let mut progress = |total: u64| {
        abort.sent.store(total, Ordering::SeqCst);
        meter.update(total, "");
    };
    let format = if args.raw {
        Format::Raw
    } else {
        Format::Framed
    };
    let idle = args.idle_timeout.0;
    let mut sender = Sender::new(socket, format, idle).map_err(|e| (0, e.into()))?;
    let method = match file {
        None => sender
            .stream(&mut WaitingReader(io::stdin().lock()), &mut progress)
            .map(|()| SendPath::Copy),
        // Read to its end, as stdin: its size is no promise to frame by.
        Some(Input { file, stream: true }) => sender
            .stream(&mut &*file, &mut progress)
            .map(|()| SendPath::Copy),
        Some(Input { file, .. }) => sender.file(file, &mut progress),
    };
    let method = method.map_err(|e| (sender.sent(), explain(e, idle)))?;
    let sent = sender.sent();
    let bytes = sender.finish().map_err(|e| {
        let e = explain(e, idle).context(format!(
            "after the last byte (all {sent} were sent, not all acknowledged)"
        ));
        (sent, e)
    })?;
    Ok((bytes, method))
}

/// Whether `file` lives on a pseudo file system whose sizes are not the
/// length of what a read returns: sysfs reports 4096 for a 6-byte
/// `/sys/class/net/lo/mtu`, so a frame declared from the size would end
/// short and the send would fail.
#[cfg(target_os = "linux")]
fn size_says_nothing(file: &File) -> bool {
    use nix::sys::statfs::{self, fstatfs};
    let pseudo = [
        statfs::PROC_SUPER_MAGIC,
        statfs::SYSFS_MAGIC,
        statfs::DEBUGFS_MAGIC,
        statfs::TRACEFS_MAGIC,
        statfs::SECURITYFS_MAGIC,
        statfs::CGROUP_SUPER_MAGIC,
        statfs::CGROUP2_SUPER_MAGIC,
    ];
    fstatfs(file).is_ok_and(|s| pseudo.contains(&s.filesystem_type()))
}

/// Elsewhere /proc files report size 0 (streamed anyway).
#[cfg(not(target_os = "linux"))]
fn size_says_nothing(_file: &File) -> bool {
    false
}

/// Adds what the user can act on to a transfer error.
fn explain(e: io::Error, idle: Option<Duration>) -> anyhow::Error {
    let hint = match (e.kind(), e.raw_os_error()) {
        (io::ErrorKind::TimedOut, _) => idle.map(|d| format!("--idle-timeout {d:?}")),
        (_, Some(libc::EPIPE | libc::ECONNRESET)) => {
            Some("the receiver closed the connection before taking everything".to_owned())
        }
        _ => None,
    };
    match hint {
        Some(h) => anyhow::Error::new(e).context(h),
        None => e.into(),
    }
}
