//! `ringmover recv`: accept TCP connections and write each into a file.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use ringmover::recv::{self, ConnId, Event, Finished, Receiver, RecvOptions};
use ringmover::send::reset_on_close;
use ringmover::Backend;
use ringmover::Selection;
use serde::Serialize;

use crate::json::{self, Line};
use crate::progress::{Meter, ProgressArgs};
use crate::signals::Interrupt;
use crate::units::{human_bytes, human_rate, parse_count, parse_size, parse_timeout, utc_stamp};
use crate::Outcome;

mod threads;
use threads::{FromWorker, Shards};

/// Receive TCP connections into files.
///
/// With --out DIR, each connection goes to its own file named from the UTC
/// time and the peer (never colliding with an existing name). With --out
/// FILE, one connection goes to FILE and ringmover exits.
///
/// Bytes go to NAME.part, renamed to NAME only after a complete transfer
/// (and fsync with --fsync). On reset, idle timeout, quota or interruption,
/// NAME.part keeps exactly the bytes received and stderr names the peer and
/// reason. Nothing is created before a connection arrives.
///
/// Out of file descriptors (EMFILE, ENFILE), nothing fails: new connections
/// wait in the listen backlog, and one accepted whose file cannot be
/// created yet waits, unread, until a descriptor frees up (at most
/// --idle-timeout); stderr says so once.
///
/// SIGINT/SIGTERM stop accepting and report every live connection as
/// `interrupted` (its .part kept). A closed stdout or stderr never stops
/// the transfers.
///
/// The first line on stderr is `listening on ADDR:PORT` (the real port when
/// :0 was given), the second `backend: NAME (why)`.
#[derive(Debug, clap::Args)]
#[command(long_about, after_long_help = AFTER_HELP)]
pub struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7000")]
    listen: String,

    /// Output directory (one file per connection) or file (one
    /// connection), or - for standard output (one connection; spliced
    /// straight into a pipe, e.g. `recv --out - | tar x`; not with --json).
    #[arg(long, value_name = "PATH")]
    out: PathBuf,

    /// Take one connection, then exit (implied when --out is a file).
    #[arg(long)]
    once: bool,

    /// Fail a connection whose peer sends more than this many bytes (e.g.
    /// 10GB = 10^10 bytes, 10GiB or 10G = 10 * 2^30); the .part file keeps
    /// exactly this many.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_bytes: Option<u64>,

    /// Accept this many connections (at least 1), then exit once they have
    /// finished.
    #[arg(long, value_name = "N", value_parser = parse_count)]
    max_conns: Option<u64>,

    /// Fail a connection that sends nothing for this long, or that waits
    /// this long for a file descriptor for its file (e.g. 30s, 500ms; more
    /// than 0, at most a year).
    #[arg(long, value_name = "DURATION", value_parser = parse_timeout)]
    idle_timeout: Option<Duration>,

    /// Write files with O_DIRECT, bypassing the page cache (cheaper and
    /// steadier for large streams; the file still holds exactly the bytes
    /// received). A file system that refuses O_DIRECT is written through
    /// the page cache, and stderr says so. Not for --out -.
    #[arg(long)]
    direct: bool,

    /// Take every stream as raw bytes: no detection of `ringmover send`'s
    /// framing (for a raw stream that may begin like it).
    #[arg(long)]
    raw: bool,

    /// fsync each file before renaming it into place, and its directory after.
    #[arg(long)]
    fsync: bool,

    /// Replace an existing output file (and a stale .part). Only regular
    /// files are replaced, never followed through a symbolic link.
    #[arg(long)]
    overwrite: bool,

    /// Receive threads, each with its own io_uring ring (or epoll set);
    /// one acceptor hands each connection to the least busy (1 to 64).
    /// The default is one per CPU, at most 4: an idle thread costs nothing,
    /// and a connection is only ever on one thread.
    #[arg(long, value_name = "N", default_value_t = threads::default_threads(), value_parser = parse_threads)]
    threads: usize,

    #[command(flatten)]
    progress: ProgressArgs,

    /// Print one `recv-connection` JSON line per connection on stdout as it
    /// ends: peer, path, bytes, seconds, gb_per_s, backend, outcome, error
    /// (see docs/cli-json.md).
    #[arg(long)]
    json: bool,
}

const AFTER_HELP: &str = "\
Examples:
  ringmover recv --out /srv/incoming                       # one file per connection
  ringmover recv --listen 0.0.0.0:7000 --out backup.tar    # one connection, then exit
  ringmover recv --listen [::]:7000 --out in/ --max-bytes 10GiB --idle-timeout 30s
  ringmover recv --listen 127.0.0.1:0 --out in/ --max-conns 4 --json --no-progress

Sizes: K, M, G, T and KiB, MiB, GiB, TiB are powers of 1024; KB, MB, GB,
TB powers of 1000 (10GB = 10000000000 bytes).

Progress: on a terminal, one line redrawn in place with bytes, rate and the
live connections; elsewhere nothing unless --progress (then a line every
second).

Exit status:
  0    every connection completed
  1    a connection failed (its .part kept), or recv could not start
  2    bad command line
  130  interrupted by SIGINT (143: SIGTERM); live connections reported
       as `interrupted`";

/// The `recv-connection` JSON line (docs/cli-json.md).
#[derive(Debug, Serialize)]
struct Connection {
    peer: String,
    /// Lossy: JSON strings are Unicode, file names need not be.
    path: String,
    bytes: u64,
    seconds: f64,
    gb_per_s: f64,
    backend: &'static str,
    /// `off`, `direct` or `refused` (O_DIRECT output); null when the
    /// connection never got that far (attach errors, interruptions).
    direct: Option<&'static str>,
    outcome: &'static str,
    error: Option<String>,
}

impl Line for Connection {
    const TYPE: &'static str = "recv-connection";
}

impl Connection {
    #[allow(clippy::too_many_arguments)]
    fn new(
        peer: SocketAddr,
        path: &Path,
        bytes: u64,
        seconds: f64,
        backend: Backend,
        outcome: &'static str,
        error: Option<String>,
    ) -> Connection {
        Connection {
            peer: peer.to_string(),
            path: path.to_string_lossy().into_owned(),
            bytes,
            seconds,
            gb_per_s: json::gb_per_s(bytes, seconds),
            backend: backend.name(),
            direct: None,
            outcome,
            error,
        }
    }
}

/// Where connections go.
#[derive(Debug)]
enum Destination {
    /// One file per connection in this directory.
    Dir(PathBuf),
    /// This one file; `taken` once its connection arrived.
    File { path: PathBuf, taken: bool },
    /// Standard output (`--out -`), one connection.
    Stdout { taken: bool },
}

/// A connection's output: the final name and the .part being written.
#[derive(Debug)]
struct Output {
    path: PathBuf,
    part: PathBuf,
    /// How long the connection waited for a descriptor for it (see
    /// [`Waiting`]): reported times run from the accept.
    waited: Duration,
}

/// An accepted connection with no output yet: creating it failed with
/// EMFILE or ENFILE. Nothing reads the socket, so its bytes wait in the
/// kernel and TCP flow control holds the sender.
#[derive(Debug)]
struct Pending {
    socket: TcpStream,
    peer: SocketAddr,
    accepted: Instant,
    /// The output it last failed to create, and why; `None` while it has
    /// not been tried (it came behind one that waits).
    last: Option<(PathBuf, io::Error)>,
}

impl Pending {
    /// The output it waits for: the one it last failed to create, else
    /// `out` (where outputs go).
    fn path<'a>(&'a self, out: &'a Path) -> &'a Path {
        self.last.as_ref().map_or(out, |(path, _)| path)
    }

    /// Why it waits.
    fn why(&self) -> String {
        match &self.last {
            Some((path, e)) => format!("creating {}: {e}", path.display()),
            None => "no descriptor for its file yet (it came behind one waiting for one)".into(),
        }
    }
}

/// Accepted connections waiting for a descriptor for their output, oldest
/// first. While any wait, the listener is held (`Receiver::set_accepting`):
/// a descriptor that frees up goes to their files, not to another accept,
/// and new connections wait in the listen backlog.
#[derive(Debug, Default)]
struct Waiting {
    queue: VecDeque<Pending>,
    /// This episode (since the queue was last empty) was said on stderr.
    said: bool,
    /// When the oldest last failed to get its output.
    tried: Option<Instant>,
    /// A connection ended since: descriptors are free, try at once.
    freed: bool,
}

/// How often connections waiting for a descriptor try again: as often as
/// the listener after an accept failure.
const FD_RETRY: Duration = recv::ACCEPT_BACKOFF;

impl Waiting {
    fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Whether to offer the oldest its output now: it never tried, a
    /// connection ended since, or [`FD_RETRY`] passed.
    fn due(&self, now: Instant) -> bool {
        !self.queue.is_empty() && (self.freed || self.tried.is_none_or(|t| now >= t + FD_RETRY))
    }

    /// When the loop must look again: the next retry, or the oldest's
    /// `--idle-timeout` if sooner.
    fn next(&self, idle: Option<Duration>) -> Option<Instant> {
        let oldest = self.queue.front()?;
        let retry = self.tried.map(|t| t + FD_RETRY);
        let expiry = idle.map(|d| oldest.accepted + d);
        retry.into_iter().chain(expiry).min()
    }

    /// Every connection was offered its output, until one went back to
    /// wait (`failed`) or none was left.
    fn tried(&mut self, now: Instant, failed: bool) {
        self.freed = false;
        self.tried = failed.then_some(now);
        if self.queue.is_empty() {
            self.said = false;
        }
    }

    /// Takes those that waited `idle` or longer (oldest first).
    fn expired(&mut self, idle: Option<Duration>, now: Instant) -> Vec<Pending> {
        let Some(d) = idle else {
            return Vec::new();
        };
        let n = self
            .queue
            .iter()
            .take_while(|p| now >= p.accepted + d)
            .count();
        let gone = self.queue.drain(..n).collect();
        if self.queue.is_empty() {
            *self = Waiting::default();
        }
        gone
    }
}

/// Why an accepted connection did not start.
#[derive(Debug)]
enum Unstarted {
    /// No descriptor for its output (EMFILE, ENFILE): it waits.
    NoFd(Pending),
    /// It failed for good, as `outcome` (`file-error`, `attach-error`).
    Failed {
        path: PathBuf,
        outcome: &'static str,
        why: String,
    },
}

/// Whether `e` says the process (EMFILE) or the system (ENFILE) is out of
/// file descriptors: a shortage that passes as connections end.
fn out_of_fds(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// How often the loop looks at the signal flag while nothing happens.
const TICK: Duration = Duration::from_millis(100);

/// How often the progress line is brought up to date.
const PROGRESS_TICK: Duration = Duration::from_millis(250);

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    // Before any other thread starts (they inherit the blocked signals).
    let interrupt = Interrupt::watch().context("watching SIGINT and SIGTERM")?;
    recv::ignore_sigxfsz().context("ignoring SIGXFSZ")?;
    raise_nofile_limit();
    let selection = Selection::from_env().context("selecting a backend")?;
    let backend = selection.backend;

    let to_stdout = args.out.as_os_str() == "-";
    if to_stdout && args.json {
        eprintln!(
            "ringmover: --json prints on standard output, which --out - uses for the data; \
             leave out --json (the outcome is on stderr and in the exit status)"
        );
        return Ok(Outcome::Usage);
    }
    if to_stdout && args.direct {
        eprintln!("ringmover: --direct writes files at aligned offsets; --out - is a stream");
        return Ok(Outcome::Usage);
    }
    let mut dest = if to_stdout {
        Destination::Stdout { taken: false }
    } else if args.out.is_dir() {
        Destination::Dir(args.out.clone())
    } else if args.out.as_os_str().to_string_lossy().ends_with('/') {
        match args.out.metadata() {
            Err(e) => bail!("output directory {}: {e}", args.out.display()),
            Ok(_) => bail!("output directory {}: not a directory", args.out.display()),
        }
    } else {
        // Checked now, created only when the connection arrives.
        check_output_file(&args.out, args.overwrite)?;
        Destination::File {
            path: args.out.clone(),
            taken: false,
        }
    };
    let limit = match &dest {
        Destination::File { .. } | Destination::Stdout { .. } => Some(1),
        Destination::Dir(_) if args.once => Some(1),
        Destination::Dir(_) => args.max_conns,
    };

    let addr = resolve(&args.listen)?;
    let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    let local = listener
        .local_addr()
        .with_context(|| format!("reading the address bound for {addr}"))?;
    let mut console = Console::new(args.json);
    console.say(format_args!("listening on {local}"));
    // Always: which path the bytes take, and why (the JSON lines say it too).
    console.say(format_args!("backend: {backend} ({})", selection.reason));
    let options = RecvOptions {
        max_bytes: args.max_bytes,
        idle_timeout: args.idle_timeout,
        raw: args.raw,
        direct: args.direct,
        // The rest (pipe size, and whatever later versions add) as defaults.
        ..RecvOptions::default()
    };
    let mut receiver = Receiver::new(backend, options.clone())
        .with_context(|| format!("starting the {backend} backend"))?;
    for f in receiver.fallbacks() {
        console.say(format_args!("fallback: {}: {}", f.op, f.instead));
    }
    receiver
        .listen(listener, limit)
        .with_context(|| format!("watching the listener on {local}"))?;
    // One connection needs one thread.
    let mut shards = if args.threads > 1 && limit != Some(1) {
        let main = receiver.waker().context("making a waker")?;
        let shards = Shards::start(
            args.threads,
            backend,
            &options,
            main,
            args.progress.mode() != crate::progress::Mode::Off,
        )
        .with_context(|| format!("starting {} receive threads", args.threads))?;
        Some(shards)
    } else {
        None
    };

    let mut outputs: HashMap<ConnId, Output> = HashMap::new();
    let mut waiting = Waiting::default();
    let mut failed = 0u64;
    let mut events = Vec::new();
    // Progress: bytes of finished connections, plus the live ones'.
    console.meter = Meter::new(args.progress.mode(), local.to_string(), None);
    let started = Instant::now();
    let (mut done_bytes, mut done_conns) = (0u64, 0u64);
    let mut last_tick = Instant::now();

    while receiver.is_listening()
        || receiver.active() > 0
        || shards.as_ref().is_some_and(|s| s.active() > 0)
        || !waiting.is_empty()
    {
        if let Some(sig) = interrupt.received() {
            let mut live = receiver.progress();
            // Closes the listener and every connection; after this no
            // byte moves, so the .part sizes reported are final.
            drop(receiver);
            let (more, late) = shards.take().map(Shards::stop).unwrap_or_default();
            live.extend(more);
            // Ended before the signal, reported after it: settled as usual.
            for m in late {
                if let FromWorker::Finished(done) = m {
                    if let Some(output) = outputs.remove(&done.id) {
                        let dir_mode = matches!(dest, Destination::Dir(_));
                        finish(done, &output, args, dir_mode, backend, &mut console);
                    }
                }
            }
            return Ok(interrupted(
                sig,
                live,
                &mut outputs,
                waiting.queue,
                &args.out,
                backend,
                &mut console,
            ));
        }
        // Soon enough for connections waiting for a descriptor.
        let timeout = waiting.next(args.idle_timeout).map_or(TICK, |t| {
            t.saturating_duration_since(Instant::now()).min(TICK)
        });
        receiver
            .wait(Some(timeout), &mut events)
            .context("waiting for connections")?;
        if let Some(s) = &mut shards {
            for m in s.take() {
                match m {
                    FromWorker::Finished(done) => events.push(Event::Finished(done)),
                    FromWorker::AttachFailed { key, peer, error } => {
                        let Some(output) = outputs.remove(&key) else {
                            continue;
                        };
                        waiting.freed = true;
                        failed += 1;
                        let e = format!("receiving into {}: {error}", output.part.display());
                        console.say(format_args!("ringmover: {peer}: {e}"));
                        console.record(&Connection::new(
                            peer,
                            &output.part,
                            0,
                            0.0,
                            backend,
                            "attach-error",
                            Some(e),
                        ));
                    }
                    FromWorker::Failed(e) => {
                        return Err(e).context("waiting for connections (receive thread)")
                    }
                }
            }
        }
        for event in events.drain(..) {
            match event {
                // Oldest first: offered their output below, in order.
                Event::Incoming { socket, peer } => waiting.queue.push_back(Pending {
                    socket,
                    peer,
                    accepted: Instant::now(),
                    last: None,
                }),
                Event::Finished(done) => {
                    let Some(output) = outputs.remove(&done.id) else {
                        continue;
                    };
                    done_bytes += done.bytes;
                    done_conns += 1;
                    waiting.freed = true;
                    let dir_mode = matches!(dest, Destination::Dir(_));
                    let ok = finish(done, &output, args, dir_mode, backend, &mut console);
                    if !ok {
                        failed += 1;
                    }
                }
                Event::AcceptFailed(e) => {
                    // No connection failed: they wait in the listen backlog
                    // and are accepted when the listener retries, so the
                    // exit status stays each connection's (docs/cli-json.md).
                    console.say(format_args!(
                        "ringmover: accepting on {local}: {e} (connections wait in the \
                         backlog; retrying every {} ms)",
                        recv::ACCEPT_BACKOFF.as_millis()
                    ));
                }
            }
        }
        let now = Instant::now();
        if waiting.due(now) {
            let mut short = false;
            while let Some(p) = waiting.queue.pop_front() {
                let (peer, accepted) = (p.peer, p.accepted);
                match start(p, &mut dest, args.overwrite, &mut receiver, &mut shards) {
                    Ok((id, mut output)) => {
                        output.waited = accepted.elapsed();
                        outputs.insert(id, output);
                    }
                    Err(Unstarted::NoFd(p)) => {
                        if !std::mem::replace(&mut waiting.said, true) {
                            console.say(format_args!(
                                "ringmover: {peer}: {} (the connection waits, unread; \
                                 retrying every {} ms)",
                                p.why(),
                                FD_RETRY.as_millis()
                            ));
                        }
                        // The rest would get no descriptor either.
                        waiting.queue.push_front(p);
                        short = true;
                        break;
                    }
                    Err(Unstarted::Failed { path, outcome, why }) => {
                        // Only this connection fails; the server goes on.
                        failed += 1;
                        let secs = accepted.elapsed().as_secs_f64();
                        console.say(format_args!("ringmover: {peer}: {why}"));
                        console.record(&Connection::new(
                            peer,
                            &path,
                            0,
                            secs,
                            backend,
                            outcome,
                            Some(why),
                        ));
                    }
                }
            }
            waiting.tried(now, short);
        }
        // Waiting is bounded as sending nothing is (`--idle-timeout`).
        for p in waiting.expired(args.idle_timeout, Instant::now()) {
            failed += 1;
            let waited = args.idle_timeout.unwrap_or_default();
            let why = format!(
                "{} (waited {waited:?} for a descriptor, --idle-timeout)",
                p.why()
            );
            // Unread bytes make the close a reset anyway; this makes sure.
            let _ = reset_on_close(&p.socket);
            console.say(format_args!("ringmover: {}: {why}", p.peer));
            console.record(&Connection::new(
                p.peer,
                p.path(&args.out),
                0,
                p.accepted.elapsed().as_secs_f64(),
                backend,
                "file-error",
                Some(why),
            ));
        }
        // Held while any wait: a descriptor that frees up goes to their
        // files, not to yet another accept (which would only wait too).
        receiver.set_accepting(waiting.is_empty());
        if console.meter.enabled() && last_tick.elapsed() >= PROGRESS_TICK {
            last_tick = Instant::now();
            let mut live = receiver.progress();
            live.extend(shards.as_ref().map(Shards::progress).unwrap_or_default());
            let bytes = done_bytes + live.iter().map(|p| p.bytes).sum::<u64>();
            let note = format!("{} live, {done_conns} done", live.len());
            console.meter.update(bytes, &note);
        }
    }
    console.meter.finish(Some(format_args!(
        "received {} in {done_conns} connection(s), {failed} failed, in {}",
        human_bytes(done_bytes),
        crate::progress::clock(started.elapsed())
    )));
    Ok(if failed == 0 {
        Outcome::Success
    } else {
        Outcome::Failed
    })
}

/// Creates the output of accepted connection `p` and hands both to the
/// receiver (or a receive thread). Out of descriptors for the output, `p`
/// comes back, to wait.
fn start(
    mut p: Pending,
    dest: &mut Destination,
    overwrite: bool,
    receiver: &mut Receiver,
    shards: &mut Option<Shards>,
) -> Result<(ConnId, Output), Unstarted> {
    let peer = p.peer;
    let (output, file) = match open_output(dest, peer, overwrite) {
        Ok(opened) => opened,
        Err((path, e)) if out_of_fds(&e) => {
            p.last = Some((path, e));
            return Err(Unstarted::NoFd(p));
        }
        Err((path, e)) => {
            let why = format!("creating {}: {e}", path.display());
            return Err(Unstarted::Failed {
                path,
                outcome: "file-error",
                why,
            });
        }
    };
    let attached = match shards {
        Some(s) => s.dispatch(p.socket, peer, file),
        None if is_stdout(&output) => receiver.attach_sequential(p.socket, peer, file),
        None => receiver.attach(p.socket, peer, file),
    };
    match attached {
        Ok(id) => Ok((id, output)),
        Err(e) => Err(Unstarted::Failed {
            why: format!("receiving into {}: {e}", output.part.display()),
            path: output.part,
            outcome: "attach-error",
        }),
    }
}

/// Stops everything on a signal: every live connection is reported as
/// `interrupted`, its .part kept with what reached it; so is every
/// connection still waiting for a descriptor, reset, with nothing received.
fn interrupted(
    sig: nix::sys::signal::Signal,
    live: Vec<recv::Progress>,
    outputs: &mut HashMap<ConnId, Output>,
    waiting: VecDeque<Pending>,
    out: &Path,
    backend: Backend,
    console: &mut Console,
) -> Outcome {
    console.meter.finish(None);
    let why = format!("interrupted by {}", sig.as_str());
    for p in live {
        let Some(output) = outputs.remove(&p.id) else {
            continue;
        };
        // A file's size says what reached it (`--direct` writes may have
        // been in flight); standard output is no file to measure (and a
        // file named `-` in the current directory is not it).
        let bytes = match is_stdout(&output) {
            true => p.bytes,
            false => std::fs::metadata(&output.part).map_or(p.bytes, |m| m.len()),
        };
        let secs = (p.elapsed + output.waited).as_secs_f64();
        console.say(format_args!(
            "ringmover: {}: {why}; {}",
            p.peer,
            kept(&output, bytes)
        ));
        console.record(&Connection::new(
            p.peer,
            &output.part,
            bytes,
            secs,
            backend,
            "interrupted",
            Some(why.clone()),
        ));
    }
    for p in waiting {
        // Closed as `p` goes: a reset, so that its sender cannot take the
        // close for the end of the stream.
        let _ = reset_on_close(&p.socket);
        console.say(format_args!(
            "ringmover: {}: {why} while waiting for a descriptor ({}); \
             nothing received, connection reset",
            p.peer,
            p.why()
        ));
        console.record(&Connection::new(
            p.peer,
            p.path(out),
            0,
            p.accepted.elapsed().as_secs_f64(),
            backend,
            "interrupted",
            Some(why.clone()),
        ));
    }
    Outcome::Signal(sig)
}

/// stdout (JSON records) and stderr (messages) that may be closed under
/// us (`recv --json | head -1`): a failed write is never fatal, since the
/// transfers matter more than their reports. The first failure on stdout
/// is said once on stderr, if that is still open.
/// Progress (when shown) is drawn on stderr below the messages.
#[derive(Debug)]
struct Console {
    json: bool,
    stdout_open: bool,
    stderr_open: bool,
    meter: Meter,
}

impl Console {
    fn new(json: bool) -> Console {
        Console {
            json,
            stdout_open: true,
            stderr_open: true,
            meter: Meter::new(crate::progress::Mode::Off, "", None),
        }
    }

    /// A line on stderr (above the progress line).
    fn say(&mut self, line: fmt::Arguments<'_>) {
        if self.stderr_open && !self.meter.println(line) {
            self.stderr_open = false;
        }
    }

    /// A JSON line on stdout (with --json).
    fn record(&mut self, line: &Connection) {
        if !self.json || !self.stdout_open {
            return;
        }
        if let Err(e) = json::write(&mut io::stdout().lock(), line) {
            self.stdout_open = false;
            self.say(format_args!(
                "ringmover: writing to stdout: {e}; still receiving, \
                 further records are not printed"
            ));
        }
    }
}

/// Settles one finished connection: rename on success, report either way.
/// Returns whether it completed.
fn finish(
    done: Finished,
    output: &Output,
    args: &Args,
    dir_mode: bool,
    backend: Backend,
    console: &mut Console,
) -> bool {
    let secs = (done.elapsed + output.waited).as_secs_f64();
    let (path, outcome, error) = match done.result {
        Ok(()) if is_stdout(output) => match sync_stdout(&done.file, args) {
            Ok(()) => (output.path.clone(), "complete", None),
            Err(e) => (output.path.clone(), "write-error", Some(format!("{e:#}"))),
        },
        Ok(()) => match persist(&done.file, output, args, dir_mode) {
            Ok(path) => (path, "complete", None),
            Err(e) => (output.part.clone(), "write-error", Some(format!("{e:#}"))),
        },
        Err(why) => (
            output.part.clone(),
            why.kind_name(),
            Some(describe(&why, output)),
        ),
    };
    drop(done.file);
    if let recv::DirectOutcome::Refused(e) = &done.direct {
        console.say(format_args!(
            "ringmover: {}: O_DIRECT refused ({e}); written through the page cache",
            done.peer
        ));
    }
    if let Some(e) = &error {
        let kept = match is_stdout(output) {
            true => kept(output, done.bytes),
            false => format!("kept {} bytes in {}", done.bytes, path.display()),
        };
        console.say(format_args!("ringmover: {}: {e}; {kept}", done.peer));
    } else if console.meter.enabled() {
        console.say(format_args!(
            "{}: done, {} in {secs:.2} s ({}) -> {}",
            done.peer,
            human_bytes(done.bytes),
            human_rate(done.bytes as f64 / secs),
            path.display()
        ));
    }
    let ok = error.is_none();
    let mut line = Connection::new(done.peer, &path, done.bytes, secs, backend, outcome, error);
    line.direct = Some(done.direct.name());
    console.record(&line);
    ok
}

/// Why a connection failed, naming the output a write failed on (the
/// library's words say only "the file").
fn describe(why: &recv::Failure, output: &Output) -> String {
    match why {
        recv::Failure::Write(e) if is_stdout(output) => format!("writing standard output: {e}"),
        recv::Failure::Write(e) => format!("writing {}: {e}", output.part.display()),
        other => other.to_string(),
    }
}

/// The output of `--out -`.
fn is_stdout(output: &Output) -> bool {
    output.part.as_os_str() == "-"
}

/// What a connection that did not complete left behind.
fn kept(output: &Output, bytes: u64) -> String {
    if is_stdout(output) {
        format!("wrote {bytes} bytes to standard output")
    } else {
        format!("kept {bytes} bytes in {}", output.part.display())
    }
}

/// `--fsync` with `--out -`: standard output is synced when it is a
/// regular file (a pipe or terminal has nothing to sync).
fn sync_stdout(file: &File, args: &Args) -> anyhow::Result<()> {
    if args.fsync && file.metadata().is_ok_and(|m| m.is_file()) {
        file.sync_all().context("fsync standard output")?;
    }
    Ok(())
}

/// fsync (when asked) and rename NAME.part to NAME; returns the final path.
fn persist(file: &File, output: &Output, args: &Args, dir_mode: bool) -> anyhow::Result<PathBuf> {
    if args.fsync {
        file.sync_all()
            .with_context(|| format!("fsync {}", output.part.display()))?;
    }
    // Only a named output file may be replaced; directory mode never clobbers.
    let replace = args.overwrite && !dir_mode;
    let target = rename_into_place(&output.part, &output.path, replace, dir_mode)?;
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

/// Renames `part` to `path`. `replace`: an existing regular file at `path`
/// is replaced (anything else is refused). Otherwise the rename never
/// replaces anything; with `pick_another`, a taken name becomes `path-1`,
/// `path-2`, ...
fn rename_into_place(
    part: &Path,
    path: &Path,
    replace: bool,
    pick_another: bool,
) -> anyhow::Result<PathBuf> {
    let mut target = path.to_owned();
    let mut n = 0;
    loop {
        let renamed = if replace {
            refuse_special(&target)
                .map_err(anyhow::Error::from)
                .and_then(|()| std::fs::rename(part, &target).map_err(anyhow::Error::from))
        } else {
            rename_noreplace(part, &target).map_err(anyhow::Error::from)
        };
        match renamed {
            Ok(()) => return Ok(target),
            // Someone took the name meanwhile; pick another.
            Err(e)
                if pick_another
                    && n < 1000
                    && e.downcast_ref::<io::Error>()
                        .is_some_and(|e| e.kind() == io::ErrorKind::AlreadyExists) =>
            {
                n += 1;
                target = suffixed(path, n);
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("renaming {} to {}", part.display(), target.display())
                })
            }
        }
    }
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

/// Start-up checks for `--out FILE`, touching nothing: FILE and FILE.part
/// must not exist, or (with `overwrite`) be regular files.
fn check_output_file(out: &Path, overwrite: bool) -> anyhow::Result<()> {
    let part = part_path(out);
    for (path, is_part) in [(out, false), (part.as_path(), true)] {
        match path.symlink_metadata() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => bail!("checking {}: {e}", path.display()),
            Ok(_) if !overwrite && is_part => bail!("{}", stale_part(path)),
            Ok(_) if !overwrite => bail!(
                "refusing to overwrite existing file {} (pass --overwrite to replace it)",
                path.display()
            ),
            Ok(_) => refuse_special(path)?,
        }
    }
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match dir.metadata() {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => bail!("{} is not a directory", dir.display()),
        Err(e) => bail!("output directory {}: {e}", dir.display()),
    }
}

/// What to say about a .part that is in the way.
fn stale_part(part: &Path) -> String {
    format!(
        "{} exists (left by an interrupted run?): remove it, or pass --overwrite to replace it",
        part.display()
    )
}

/// Fails unless `path` is absent or a regular file: `--overwrite` never
/// replaces a symbolic link, FIFO, socket, device or directory.
fn refuse_special(path: &Path) -> io::Result<()> {
    let kind = match path.symlink_metadata() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
        Ok(m) => m.file_type(),
    };
    let what = if kind.is_file() {
        return Ok(());
    } else if kind.is_symlink() {
        "a symbolic link"
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_block_device() || kind.is_char_device() {
        "a device"
    } else {
        "not a regular file"
    };
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!(
            "refusing to replace {}: it is {what} (--overwrite replaces only regular files)",
            path.display()
        ),
    ))
}

/// Opens the output for a new connection from `peer`.
fn open_output(
    dest: &mut Destination,
    peer: SocketAddr,
    overwrite: bool,
) -> Result<(Output, File), (PathBuf, io::Error)> {
    match dest {
        // Taken only once opened: a connection that waits for a
        // descriptor (EMFILE) tries again.
        Destination::Stdout { taken } => {
            let dash = PathBuf::from("-");
            if *taken {
                let e = io::Error::new(io::ErrorKind::AlreadyExists, "only one connection");
                return Err((dash, e));
            }
            let out = io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| (dash.clone(), e))?;
            *taken = true;
            let output = Output {
                path: dash.clone(),
                part: dash,
                waited: Duration::ZERO,
            };
            Ok((output, File::from(out)))
        }
        Destination::File { path, taken } => {
            let part = part_path(path);
            if *taken {
                return Err((
                    path.clone(),
                    io::Error::new(io::ErrorKind::AlreadyExists, "only one connection per file"),
                ));
            }
            match create_part(&part, overwrite) {
                Ok(file) => {
                    *taken = true;
                    let output = Output {
                        path: path.clone(),
                        part,
                        waited: Duration::ZERO,
                    };
                    Ok((output, file))
                }
                Err(e) => Err((part, e)),
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
            unique_output(&base)
        }
    }
}

/// Creates BASE.part, or BASE-1.part, BASE-2.part, ...: the first whose
/// final name and .part are both free.
fn unique_output(base: &Path) -> Result<(Output, File), (PathBuf, io::Error)> {
    let mut n = 0;
    loop {
        let path = if n == 0 {
            base.to_owned()
        } else {
            suffixed(base, n)
        };
        let part = part_path(&path);
        if path.symlink_metadata().is_ok() {
            n += 1;
            continue;
        }
        match create_part(&part, false) {
            Ok(file) => {
                let waited = Duration::ZERO;
                return Ok((Output { path, part, waited }, file));
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
            Err(e) => return Err((part, e)),
        }
    }
}

/// Creates `part` for writing with `O_CREAT | O_EXCL | O_NOFOLLOW`, so
/// nothing planted there is ever written through. With `replace`, an
/// existing regular file is unlinked first (a symbolic link, FIFO or
/// device is refused).
fn create_part(part: &Path, replace: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW);
    for _ in 0..3 {
        match o.open(part) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && replace => {
                refuse_special(part)?;
                match std::fs::remove_file(part) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(io::Error::new(e.kind(), stale_part(part)))
            }
            other => return other,
        }
    }
    // Someone keeps putting it back between our unlink and open.
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("{} keeps reappearing", part.display()),
    ))
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

/// `--threads`: 1 to 64.
fn parse_threads(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n @ 1..=64) => Ok(n),
        Ok(_) => Err("must be 1 to 64".into()),
        Err(_) => Err(format!("invalid count {s:?}: expected a whole number")),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory, removed when dropped (also when a test fails).
    fn scratch(name: &str) -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix(&format!("ringmover-recv-unit-{name}-"))
            .tempdir()
            .expect("creating a scratch directory")
    }

    /// Taken names (final or .part) get `-1`, `-2`, ...
    #[test]
    fn colliding_names_get_suffixes() {
        let tmp = scratch("collide");
        let dir = tmp.path();
        let base = dir.join("stamp_127.0.0.1_9");
        std::fs::write(&base, b"taken").unwrap();
        std::fs::write(part_path(&suffixed(&base, 1)), b"in use").unwrap();
        let (output, _file) = unique_output(&base).unwrap();
        assert_eq!(output.path, suffixed(&base, 2));
        assert_eq!(output.part, part_path(&suffixed(&base, 2)));
        assert!(output.part.exists());
        assert_eq!(std::fs::read(&base).unwrap(), b"taken");
        assert_eq!(
            std::fs::read(part_path(&suffixed(&base, 1))).unwrap(),
            b"in use"
        );
    }

    /// Directory mode never replaces: a name taken after the .part was
    /// made moves the rename to `-1`; without a fallback it fails.
    #[test]
    fn rename_never_overwrites() {
        let tmp = scratch("rename");
        let dir = tmp.path();
        let path = dir.join("name");
        let part = part_path(&path);
        std::fs::write(&part, b"new").unwrap();
        std::fs::write(&path, b"someone else's").unwrap();
        let e = rename_into_place(&part, &path, false, false).unwrap_err();
        assert!(format!("{e:#}").contains("File exists"), "{e:#}");
        assert_eq!(std::fs::read(&path).unwrap(), b"someone else's");
        std::fs::write(suffixed(&path, 1), b"also taken").unwrap();
        let got = rename_into_place(&part, &path, false, true).unwrap();
        assert_eq!(got, suffixed(&path, 2));
        assert_eq!(std::fs::read(&got).unwrap(), b"new");
        assert_eq!(std::fs::read(&path).unwrap(), b"someone else's");
        assert_eq!(std::fs::read(suffixed(&path, 1)).unwrap(), b"also taken");
        assert!(!part.exists());
    }

    /// `--overwrite` replaces a regular file but never a symlink or FIFO.
    #[test]
    fn replace_only_regular_files() {
        let tmp = scratch("replace");
        let dir = tmp.path();
        let path = dir.join("name");
        let part = part_path(&path);
        let victim = dir.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        std::fs::write(&part, b"new").unwrap();
        let e = rename_into_place(&part, &path, true, false).unwrap_err();
        assert!(format!("{e:#}").contains("symbolic link"), "{e:#}");
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"old").unwrap();
        assert_eq!(rename_into_place(&part, &path, true, false).unwrap(), path);
        assert_eq!(std::fs::read(&path).unwrap(), b"new");

        std::os::unix::fs::symlink(&victim, &part).unwrap();
        let e = create_part(&part, true).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        std::fs::remove_file(&part).unwrap();
        std::fs::write(&part, b"stale").unwrap();
        let e = create_part(&part, false).unwrap_err();
        assert!(e.to_string().contains("--overwrite"), "{e}");
        create_part(&part, true).unwrap();
        assert_eq!(std::fs::read(&part).unwrap(), b"");
    }
}
