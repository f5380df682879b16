//! `ringmover send`: send a file or stdin to a TCP address.

use std::fs::File;
use std::io::{self, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ringmover::send::{reset_on_close, Format, SendPath, Sender};
use serde_json::json;

use crate::signals;
use crate::units::{gbps, human_bytes, parse_limit, Limit};
use crate::Outcome;

/// Send FILE (or stdin, given `-`) to a TCP address, then wait for the
/// receiver to close.
///
/// By default the bytes are framed for `ringmover recv` (a magic,
/// length-prefixed frames, an end marker; see docs/recv.md), so a transfer cut
/// short at any point, even by SIGKILL, never looks complete to it. --raw
/// sends the bytes alone, for any other receiver.
///
/// Exit status 0 only when every byte was sent and the receiver then closed
/// the connection cleanly. On any error, SIGINT or SIGTERM the connection
/// is reset (never closed with a FIN), so the receiver sees the failure.
/// The input is opened before connecting: a missing file never connects.
///
/// On Linux, regular files go with sendfile(2); stdin, devices, files
/// sendfile cannot read, and everything on other Unix go through a 64 KiB
/// read/write loop.
#[derive(Debug, clap::Args)]
#[command(long_about)]
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
    progress: crate::units::ProgressArgs,

    /// Print one JSON object on stdout after a successful send: to, path,
    /// bytes, seconds, gbps (Gbit/s), method.
    #[arg(long)]
    json: bool,
}

/// What the signal watcher needs to abort: the connection (a duplicate of
/// its fd) once there is one, and the bytes sent so far.
#[derive(Debug, Default)]
struct Abort {
    socket: Mutex<Option<TcpStream>>,
    sent: AtomicU64,
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    // Errors are reported here, never handed to main: a broken pipe from
    // the socket is a failed send, not a closed stdout.
    match send(args) {
        Ok(()) => Ok(Outcome::Success),
        Err(e) => {
            let _ = writeln!(io::stderr(), "ringmover: {e:#}");
            Ok(Outcome::Failed)
        }
    }
}

fn send(args: &Args) -> anyhow::Result<()> {
    let abort = Arc::new(Abort::default());
    let on_signal = abort.clone();
    let to = args.to.clone();
    signals::watch(move |sig| {
        // Reset, never FIN: the receiver must not take this for an end.
        let sent = on_signal.sent.load(Ordering::SeqCst);
        let connected = match on_signal.socket.lock() {
            Ok(guard) => guard.as_ref().map(reset_on_close).is_some(),
            Err(_) => false,
        };
        let what = if connected {
            format!("; reset the connection to {to} after {sent} bytes")
        } else {
            String::new()
        };
        let _ = writeln!(
            io::stderr(),
            "ringmover: interrupted by {}{what}",
            sig.as_str()
        );
        std::process::exit(signals::exit_status(sig).into());
    })
    .context("watching SIGINT and SIGTERM")?;

    // The input first: a missing file or a directory never connects.
    let is_stdin = args.input.as_os_str() == "-";
    let file = if is_stdin {
        None
    } else {
        let file =
            File::open(&args.input).with_context(|| format!("opening {}", args.input.display()))?;
        let meta = file
            .metadata()
            .with_context(|| format!("reading the metadata of {}", args.input.display()))?;
        if meta.is_dir() {
            bail!("{} is a directory", args.input.display());
        }
        Some(file)
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
    let started = Instant::now();
    let result = transfer(args, &socket, file.as_ref(), &abort);
    let (bytes, method) = match result {
        Ok(done) => done,
        Err((sent, e)) => {
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
    if args.progress.enabled() {
        let _ = writeln!(
            io::stderr(),
            "{}: sent {} in {secs:.2} s ({:.2} Gbit/s)",
            args.to,
            human_bytes(bytes),
            gbps(bytes, secs)
        );
    }
    if args.json {
        let v = json!({
            "to": args.to,
            "path": if is_stdin { "-".into() } else { args.input.to_string_lossy() },
            "bytes": bytes,
            "seconds": secs,
            "gbps": gbps(bytes, secs),
            "method": match method { SendPath::Sendfile => "sendfile", SendPath::Copy => "read-write" },
        });
        // A closed stdout loses only this report: the transfer succeeded.
        let _ = writeln!(io::stdout(), "{v}");
    }
    Ok(())
}

/// Sends everything and waits for the peer's close. On failure, returns
/// the bytes sent so far with the error.
fn transfer(
    args: &Args,
    socket: &TcpStream,
    file: Option<&File>,
    abort: &Abort,
) -> Result<(u64, SendPath), (u64, anyhow::Error)> {
    let show = args.progress.enabled();
    let mut last = (Instant::now(), 0u64);
    let mut progress = |total: u64| {
        abort.sent.store(total, Ordering::SeqCst);
        if show && last.0.elapsed() >= Duration::from_secs(1) {
            let rate = (total - last.1) as f64 / last.0.elapsed().as_secs_f64();
            let _ = writeln!(
                io::stderr(),
                "{}: {} ({}/s)",
                args.to,
                human_bytes(total),
                human_bytes(rate as u64)
            );
            last = (Instant::now(), total);
        }
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
            .stream(&mut io::stdin().lock(), &mut progress)
            .map(|()| SendPath::Copy),
        Some(f) => sender.file(f, &mut progress),
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
