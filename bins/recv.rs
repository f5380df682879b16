//! `ringmover recv`: accept TCP connections and write each into a file.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use ringmover::recv::{self, ConnId, Event, Finished, Receiver, RecvOptions};
use ringmover::{Backend, Selection};
use serde_json::json;

use crate::units::{gbps, human_bytes, parse_duration, parse_size, utc_stamp};
use crate::Outcome;

/// Receive TCP connections into files.
///
/// With --out DIR, each connection goes to its own file named from the UTC
/// time and the peer (never colliding with an existing name). With --out
/// FILE, one connection goes to FILE and ringmover exits.
///
/// Bytes go to NAME.part, renamed to NAME only after a clean end of stream
/// (and fsync with --fsync). On reset, idle timeout or quota, NAME.part
/// keeps exactly the bytes received and stderr names the peer and reason.
///
/// The first line on stderr is `listening on ADDR:PORT` (the real port when
/// :0 was given). Exit status 0 iff every connection completed.
#[derive(Debug, clap::Args)]
#[command(long_about)]
pub struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7000")]
    listen: String,

    /// Output directory (one file per connection) or file (one connection).
    #[arg(long, value_name = "PATH")]
    out: PathBuf,

    /// Take one connection, then exit (implied when --out is a file).
    #[arg(long)]
    once: bool,

    /// Fail a connection whose peer sends more than this many bytes (e.g.
    /// 10M); the .part file keeps exactly this many.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    max_bytes: Option<u64>,

    /// Accept this many connections, then exit once they have finished.
    #[arg(long, value_name = "N")]
    max_conns: Option<u64>,

    /// Fail a connection that sends nothing for this long (e.g. 30s, 500ms).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    idle_timeout: Option<Duration>,

    /// fsync each file before renaming it into place, and its directory after.
    #[arg(long)]
    fsync: bool,

    /// Replace an existing output file (and a stale .part).
    #[arg(long)]
    overwrite: bool,

    #[command(flatten)]
    progress: crate::units::ProgressArgs,

    /// Print one JSON object per connection on stdout: peer, path, bytes,
    /// seconds, gbps (Gbit/s), backend, outcome, error.
    #[arg(long)]
    json: bool,
}

/// Where connections go.
#[derive(Debug)]
enum Destination {
    /// One file per connection in this directory.
    Dir(PathBuf),
    /// This file; its .part is already created.
    File { path: PathBuf, part: Option<File> },
}

/// A connection's output: the final name and the .part being written.
#[derive(Debug)]
struct Output {
    path: PathBuf,
    part: PathBuf,
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    recv::ignore_sigxfsz().context("ignoring SIGXFSZ")?;
    raise_nofile_limit();
    let selection = Selection::from_env().context("selecting a backend")?;
    let backend = selection.backend;

    let mut dest = if args.out.is_dir() {
        Destination::Dir(args.out.clone())
    } else if args.out.as_os_str().to_string_lossy().ends_with('/') {
        bail!("output directory {} does not exist", args.out.display());
    } else {
        let part = part_path(&args.out);
        if !args.overwrite && args.out.symlink_metadata().is_ok() {
            bail!(
                "refusing to overwrite existing file {} (pass --overwrite to replace it)",
                args.out.display()
            );
        }
        let file = create_part(&part, args.overwrite)
            .with_context(|| format!("creating {}", part.display()))?;
        Destination::File {
            path: args.out.clone(),
            part: Some(file),
        }
    };
    let limit = match &dest {
        Destination::File { .. } => Some(1),
        Destination::Dir(_) if args.once => Some(1),
        Destination::Dir(_) => args.max_conns,
    };

    let addr = resolve(&args.listen)?;
    let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    let local = listener
        .local_addr()
        .with_context(|| format!("reading the address bound for {addr}"))?;
    let mut err = io::stderr();
    writeln!(err, "listening on {local}").context("writing to stderr")?;

    let progress = args.progress.enabled();
    if progress {
        writeln!(err, "backend: {backend} ({})", selection.reason)?;
    }
    let options = RecvOptions {
        max_bytes: args.max_bytes,
        idle_timeout: args.idle_timeout,
        pipe_size: None,
        ..RecvOptions::default()
    };
    let mut receiver = Receiver::new(backend, options)
        .with_context(|| format!("starting the {backend} backend"))?;
    for f in receiver.fallbacks() {
        writeln!(err, "fallback: {}: {}", f.op, f.instead)?;
    }
    receiver
        .listen(listener, limit)
        .with_context(|| format!("watching the listener on {local}"))?;

    let mut outputs: HashMap<ConnId, Output> = HashMap::new();
    let mut rates: HashMap<ConnId, u64> = HashMap::new();
    let mut failed = 0u64;
    let mut events = Vec::new();
    let mut last_tick = Instant::now();
    let stdout = io::stdout();
    let tick = Duration::from_secs(1);

    while receiver.is_listening() || receiver.active() > 0 {
        receiver
            .wait(Some(tick), &mut events)
            .context("waiting for connections")?;
        for event in events.drain(..) {
            match event {
                Event::Incoming { socket, peer } => {
                    let attached = open_output(&mut dest, peer)
                        .map_err(|(path, e)| {
                            let why = format!("creating {}: {e}", path.display());
                            (path, "file-error", why)
                        })
                        .and_then(|(output, file)| {
                            match receiver.attach(socket.into(), peer, file) {
                                Ok(id) => Ok((id, output)),
                                Err(e) => {
                                    let why =
                                        format!("receiving into {}: {e}", output.part.display());
                                    Err((output.part, "attach-error", why))
                                }
                            }
                        });
                    match attached {
                        Ok((id, output)) => {
                            outputs.insert(id, output);
                        }
                        Err((path, outcome, e)) => {
                            // Only this connection fails; the server goes on.
                            failed += 1;
                            writeln!(err, "ringmover: {peer}: {e}")?;
                            if args.json {
                                let v = json!({
                                    "peer": peer.to_string(), "path": path, "bytes": 0,
                                    "seconds": 0.0, "gbps": 0.0, "backend": backend.name(),
                                    "outcome": outcome, "error": e,
                                });
                                writeln!(stdout.lock(), "{v}").context("writing to stdout")?;
                            }
                        }
                    }
                }
                Event::Finished(done) => {
                    let Some(output) = outputs.remove(&done.id) else {
                        continue;
                    };
                    rates.remove(&done.id);
                    let ok = finish(done, &output, args, backend, progress, &mut err, &stdout)?;
                    if !ok {
                        failed += 1;
                    }
                }
                Event::AcceptFailed(e) => {
                    failed += 1;
                    writeln!(err, "ringmover: accepting on {local}: {e}")?;
                }
            }
        }
        if progress && last_tick.elapsed() >= tick {
            let secs = last_tick.elapsed().as_secs_f64();
            last_tick = Instant::now();
            for p in receiver.progress() {
                let before = rates.insert(p.id, p.bytes).unwrap_or(0);
                let rate = (p.bytes - before) as f64 / secs;
                writeln!(
                    err,
                    "{}: {} ({}/s)",
                    p.peer,
                    human_bytes(p.bytes),
                    human_bytes(rate as u64)
                )?;
            }
        }
    }
    Ok(if failed == 0 {
        Outcome::Success
    } else {
        Outcome::Failed
    })
}

/// Settles one finished connection: rename on success, report either way.
/// Returns whether it completed.
fn finish(
    done: Finished,
    output: &Output,
    args: &Args,
    backend: Backend,
    progress: bool,
    err: &mut io::Stderr,
    stdout: &io::Stdout,
) -> anyhow::Result<bool> {
    let secs = done.elapsed.as_secs_f64();
    let (path, outcome, error) = match done.result {
        Ok(()) => match persist(&done.file, output, args) {
            Ok(path) => (path, "complete", None),
            Err(e) => (output.part.clone(), "write-error", Some(format!("{e:#}"))),
        },
        Err(why) => (output.part.clone(), why.kind_name(), Some(why.to_string())),
    };
    drop(done.file);
    if let Some(e) = &error {
        writeln!(
            err,
            "ringmover: {}: {e}; kept {} bytes in {}",
            done.peer,
            done.bytes,
            path.display()
        )?;
    } else if progress {
        writeln!(
            err,
            "{}: done, {} in {secs:.2} s ({:.2} Gbit/s) -> {}",
            done.peer,
            human_bytes(done.bytes),
            gbps(done.bytes, secs),
            path.display()
        )?;
    }
    if args.json {
        let v = json!({
            "peer": done.peer.to_string(),
            "path": path,
            "bytes": done.bytes,
            "seconds": secs,
            "gbps": gbps(done.bytes, secs),
            "backend": backend.name(),
            "outcome": outcome,
            "error": error,
        });
        writeln!(stdout.lock(), "{v}").context("writing to stdout")?;
    }
    Ok(error.is_none())
}

/// fsync (when asked) and rename NAME.part to NAME; returns the final path.
fn persist(file: &File, output: &Output, args: &Args) -> anyhow::Result<PathBuf> {
    if args.fsync {
        file.sync_all()
            .with_context(|| format!("fsync {}", output.part.display()))?;
    }
    // Only a named output file may be replaced; directory mode never clobbers.
    let dir_mode = args.out.is_dir();
    let replace = args.overwrite && !dir_mode;
    let mut target = output.path.clone();
    let mut n = 0;
    loop {
        let renamed = if replace {
            std::fs::rename(&output.part, &target)
        } else {
            rename_noreplace(&output.part, &target)
        };
        match renamed {
            Ok(()) => break,
            // Directory mode: someone took the name meanwhile; pick another.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir_mode && n < 1000 => {
                n += 1;
                target = suffixed(&output.path, n);
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("renaming {} to {}", output.part.display(), target.display())
                })
            }
        }
    }
    if args.fsync {
        let dir = target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("fsync {}", dir.display()))?;
    }
    Ok(target)
}

/// `renameat2(from, to, RENAME_NOREPLACE)`: never replaces `to`.
#[cfg(target_os = "linux")]
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use nix::fcntl::{renameat2, RenameFlags};
    renameat2(None, from, None, to, RenameFlags::RENAME_NOREPLACE).map_err(io::Error::from)
}

/// `link(from, to)` then `unlink(from)`: without `renameat2` this is how to
/// never replace `to`, since `link` fails with `EEXIST` when it exists.
#[cfg(not(target_os = "linux"))]
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::hard_link(from, to)?;
    std::fs::remove_file(from).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "{} is in place, but removing {} failed: {e}",
                to.display(),
                from.display()
            ),
        )
    })
}

/// Opens the output for a new connection from `peer`.
fn open_output(
    dest: &mut Destination,
    peer: SocketAddr,
) -> Result<(Output, File), (PathBuf, io::Error)> {
    match dest {
        Destination::File { path, part } => {
            let part_name = part_path(path);
            match part.take() {
                Some(file) => Ok((
                    Output {
                        path: path.clone(),
                        part: part_name,
                    },
                    file,
                )),
                None => Err((
                    path.clone(),
                    io::Error::new(io::ErrorKind::AlreadyExists, "only one connection per file"),
                )),
            }
        }
        Destination::Dir(dir) => {
            let peer_name = match peer {
                SocketAddr::V4(a) => format!("{}_{}", a.ip(), a.port()),
                SocketAddr::V6(a) => {
                    format!("{}_{}", a.ip().to_string().replace(':', "."), a.port())
                }
            };
            let base = dir.join(format!("{}_{peer_name}", utc_stamp(SystemTime::now())));
            let mut n = 0;
            loop {
                let path = if n == 0 {
                    base.clone()
                } else {
                    suffixed(&base, n)
                };
                let part = part_path(&path);
                if path.symlink_metadata().is_ok() {
                    n += 1;
                    continue;
                }
                match create_part(&part, false) {
                    Ok(file) => return Ok((Output { path, part }, file)),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                    Err(e) => return Err((part, e)),
                }
            }
        }
    }
}

/// Creates `part` for writing: O_EXCL unless `replace`.
fn create_part(part: &Path, replace: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.write(true).mode(0o644).custom_flags(libc::O_CLOEXEC);
    if replace {
        o.create(true).truncate(true);
    } else {
        o.create_new(true);
    }
    o.open(part)
}

fn part_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".part");
    PathBuf::from(s)
}

fn suffixed(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!("-{n}"));
    PathBuf::from(s)
}

fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("resolving {addr}"))?
        .next()
        .with_context(|| format!("resolving {addr}: no address"))
}

/// Many connections need many fds (socket + pipe pair each): lift the soft
/// RLIMIT_NOFILE to the hard limit. Failure only means fewer connections.
pub fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}
