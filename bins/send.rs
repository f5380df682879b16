//! `ringmover send`: send a file or stdin to a TCP address.

use std::fs::File;
use std::io::{self, Write};
use std::net::{Shutdown, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use ringmover::send::{send_file, send_stream, SendPath};
use serde_json::json;

use crate::units::{gbps, human_bytes};
use crate::Outcome;

/// Send FILE (or stdin, given `-`) to a TCP address, then close.
///
/// On Linux, regular files go with sendfile(2); stdin, files sendfile cannot
/// read, and everything on other Unix go through a 64 KiB read/write loop.
#[derive(Debug, clap::Args)]
#[command(long_about)]
pub struct Args {
    /// The file to send, or `-` for stdin.
    #[arg(value_name = "FILE|-")]
    input: PathBuf,

    /// Where to send it.
    #[arg(long, value_name = "ADDR")]
    to: String,

    #[command(flatten)]
    progress: crate::units::ProgressArgs,

    /// Print one JSON object on stdout: to, path, bytes, seconds, gbps
    /// (Gbit/s), method.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    let mut socket =
        TcpStream::connect(&args.to).with_context(|| format!("connecting to {}", args.to))?;
    let show = args.progress.enabled();
    let started = Instant::now();
    let mut last = (Instant::now(), 0u64);
    let mut progress = |total: u64| {
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
    let is_stdin = args.input.as_os_str() == "-";
    let (bytes, method) = if is_stdin {
        let n = send_stream(&mut io::stdin().lock(), &mut socket, &mut progress)
            .with_context(|| format!("sending stdin to {}", args.to))?;
        (n, SendPath::Copy)
    } else {
        let mut file =
            File::open(&args.input).with_context(|| format!("opening {}", args.input.display()))?;
        send_file(&mut file, &mut socket, &mut progress)
            .with_context(|| format!("sending {} to {}", args.input.display(), args.to))?
    };
    socket
        .shutdown(Shutdown::Write)
        .with_context(|| format!("closing the connection to {}", args.to))?;
    let secs = started.elapsed().as_secs_f64();
    if show {
        writeln!(
            io::stderr(),
            "{}: sent {} in {secs:.2} s ({:.2} Gbit/s)",
            args.to,
            human_bytes(bytes),
            gbps(bytes, secs)
        )?;
    }
    if args.json {
        let v = json!({
            "to": args.to,
            "path": if is_stdin { "-".into() } else { args.input.display().to_string() },
            "bytes": bytes,
            "seconds": secs,
            "gbps": gbps(bytes, secs),
            "method": match method { SendPath::Sendfile => "sendfile", SendPath::Copy => "read-write" },
        });
        writeln!(io::stdout(), "{v}").context("writing to stdout")?;
    }
    Ok(Outcome::Success)
}
