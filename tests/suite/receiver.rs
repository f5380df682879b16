//! The library's receive engine (`ringmover::recv::Receiver`) on every
//! backend: resource exhaustion, stopped processes, the wire format.
//!
//! Faults that are process-wide (the fd limit, `SIGSTOP`) are tried on a
//! `ringmover recv` child, a thin layer over the library, so the rest of
//! this test binary keeps its fds and keeps running.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use ringmover::recv::{Event, Finished, Receiver, RecvOptions};
use ringmover::Backend;

for_each_backend!(
    framed_streams_arrive_byte_exact,
    framed_streams_cut_short_are_never_complete,
    raw_streams_are_unchanged,
    the_quota_counts_framed_payload,
);

// ---------------------------------------------------------------- helpers

/// A fresh, empty scratch directory.
fn scratch(name: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "ringmover-receiver-{}-{name}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// `len` bytes that differ per `seed` and per position.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((i.wrapping_mul(2_654_435_761) >> 7) ^ seed.wrapping_mul(97) ^ (i / 253)) as u8)
        .collect()
}

// ------------------------------------------------ the library, in process

/// Runs `r` until `n` connections have finished (at most 20 s), attaching
/// each incoming one to the file `file_for(i)` makes.
fn serve(r: &mut Receiver, n: usize, mut file_for: impl FnMut(usize) -> File) -> Vec<Finished> {
    let mut done = Vec::new();
    let mut events = Vec::new();
    let mut attached = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while done.len() < n {
        assert!(
            Instant::now() < deadline,
            "{} of {n} connections finished in 20 s",
            done.len()
        );
        r.wait(Some(Duration::from_millis(100)), &mut events)
            .expect("Receiver::wait");
        for e in events.drain(..) {
            match e {
                Event::Incoming { socket, peer } => {
                    let f = file_for(attached);
                    attached += 1;
                    r.attach(socket, peer, f).expect("Receiver::attach");
                }
                Event::Finished(f) => done.push(f),
                Event::AcceptFailed(e) => panic!("accept: {e}"),
            }
        }
    }
    done
}

/// A receiver on `backend` listening on a fresh port for `n` connections.
fn receiver(backend: Option<Backend>, options: RecvOptions, n: u64) -> (Receiver, SocketAddr) {
    let backend = backend.unwrap_or_else(|| ringmover::Selection::from_env().unwrap().backend);
    let mut r = Receiver::new(backend, options).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    r.listen(listener, Some(n)).unwrap();
    (r, addr)
}

// ------------------------------------------ issue 12 item 10: wire format

/// `frames` as a framed stream: magic, each frame, the end marker.
fn framed(frames: &[&[u8]]) -> Vec<u8> {
    let mut v = ringmover::wire::MAGIC.to_vec();
    for f in frames {
        v.extend_from_slice(&ringmover::wire::frame_header(f.len() as u64));
        v.extend_from_slice(f);
    }
    v.extend_from_slice(&ringmover::wire::END);
    v
}

/// Writes `wire` in pieces of the sizes in `pieces` (cycled), the first
/// `dribble` bytes one at a time with a pause, so the receiver sees
/// partial magic and headers; then closes the write side, or resets if
/// `reset`. Returns the client's address.
fn write_stream(
    addr: SocketAddr,
    wire: Vec<u8>,
    pieces: &'static [usize],
    dribble: usize,
    reset: bool,
) -> (SocketAddr, thread::JoinHandle<()>) {
    let s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    let peer = s.local_addr().unwrap();
    let t = thread::spawn(move || {
        let mut s = s;
        let dribble = dribble.min(wire.len());
        for b in wire[..dribble].chunks(1) {
            s.write_all(b).expect("writing to the receiver");
            thread::sleep(Duration::from_millis(2));
        }
        let mut rest = &wire[dribble..];
        for &p in pieces.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let n = p.min(rest.len());
            s.write_all(&rest[..n]).expect("writing to the receiver");
            rest = &rest[n..];
        }
        if reset {
            crate::util::reset(s);
        } else {
            s.shutdown(Shutdown::Write).unwrap();
            let _ = s.read(&mut [0u8; 1]);
        }
    });
    (peer, t)
}

/// One stream to receive: what is sent, how, and what must come of it.
struct Case {
    name: &'static str,
    wire: Vec<u8>,
    dribble: usize,
    reset: bool,
    /// What the file must hold.
    want: Vec<u8>,
    framed: bool,
    /// `None`: complete; else the failure's kind name.
    outcome: Option<&'static str>,
}

/// Receives every case at once on one receiver; checks each outcome and
/// file, byte for byte.
fn receive_cases(backend: Option<Backend>, options: RecvOptions, cases: Vec<Case>) {
    let (mut r, addr) = receiver(backend, options, cases.len() as u64);
    let dir = scratch("wire");
    let mut writers = Vec::new();
    let mut by_peer = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        const PIECES: &[usize] = &[1, 3, 7, 8, 9, 13, 4093, 65_537, 5];
        let (peer, t) = write_stream(addr, c.wire.clone(), PIECES, c.dribble, c.reset);
        writers.push(t);
        by_peer.push((peer, i));
    }
    let paths: Vec<PathBuf> = (0..cases.len()).map(|i| dir.join(i.to_string())).collect();
    let created = paths.clone();
    let done = serve(&mut r, cases.len(), |i| {
        let mut f = File::options();
        f.read(true).write(true).create_new(true);
        f.open(&created[i]).unwrap()
    });
    for t in writers {
        t.join().unwrap();
    }
    for f in &done {
        let &(_, i) = by_peer.iter().find(|(p, _)| *p == f.peer).unwrap();
        let c = &cases[i];
        let got = match &f.result {
            Ok(()) => None,
            Err(e) => Some(e.kind_name()),
        };
        assert_eq!(got, c.outcome, "{}: {:?}", c.name, f.result);
        assert_eq!(f.framed, c.framed, "{}: framed", c.name);
        assert_eq!(f.bytes, c.want.len() as u64, "{}: bytes", c.name);
        let mut content = Vec::new();
        let mut file = f.file.try_clone().unwrap();
        use std::io::Seek;
        file.rewind().unwrap();
        file.read_to_end(&mut content).unwrap();
        assert!(
            content == c.want,
            "{}: file holds {} bytes, want {}",
            c.name,
            content.len(),
            c.want.len()
        );
    }
    fs::remove_dir_all(&dir).unwrap();
}

/// Framed transfers of every shape, byte-exact, in odd write sizes.
fn framed_streams_arrive_byte_exact(backend: Option<Backend>) {
    let big = pattern(3 << 20, 11);
    let small = pattern(5000, 12);
    let mut cases = vec![
        Case {
            name: "frames larger than a pipe, and of 1 byte",
            wire: framed(&[
                &big[..2 << 20],
                &big[2 << 20..(2 << 20) + 1],
                &big[(2 << 20) + 1..],
            ]),
            dribble: 0,
            reset: false,
            want: big.clone(),
            framed: true,
            outcome: None,
        },
        Case {
            name: "magic and headers a byte at a time",
            wire: framed(&[&small[..10], &small[10..]]),
            dribble: 40,
            reset: false,
            want: small.clone(),
            framed: true,
            outcome: None,
        },
        Case {
            name: "no frames at all",
            wire: framed(&[]),
            dribble: 16,
            reset: false,
            want: Vec::new(),
            framed: true,
            outcome: None,
        },
    ];
    let many: Vec<&[u8]> = small.chunks(7).collect();
    cases.push(Case {
        name: "715 frames of 7 bytes",
        wire: framed(&many),
        dribble: 0,
        reset: false,
        want: small.clone(),
        framed: true,
        outcome: None,
    });
    receive_cases(backend, RecvOptions::default(), cases);
}

/// A framed stream cut at any kind of point is never complete; the file
/// keeps the payload that arrived.
fn framed_streams_cut_short_are_never_complete(backend: Option<Backend>) {
    let a = pattern(70_000, 21);
    let b = pattern(300, 22);
    let wire = framed(&[&a, &b]);
    let head = 8; // the magic
    let frame_a = head + 8 + a.len();
    let cut = |name: &'static str, at: usize, want: Vec<u8>, dribble: usize| Case {
        name,
        wire: wire[..at].to_vec(),
        dribble,
        reset: false,
        want,
        framed: true,
        outcome: Some("truncated"),
    };
    let mut after_end = wire.clone();
    after_end.extend_from_slice(b"more");
    let cases = vec![
        cut("inside the magic", 3, Vec::new(), 3),
        cut("right after the magic", head, Vec::new(), 8),
        cut("inside a header", head + 5, Vec::new(), 13),
        cut("after a header", head + 8, Vec::new(), 0),
        cut("inside a payload", head + 8 + 1000, a[..1000].to_vec(), 0),
        cut("after a frame", frame_a, a.clone(), 0),
        cut("inside the second header", frame_a + 2, a.clone(), 0),
        cut(
            "inside the end marker",
            wire.len() - 3,
            [&a[..], &b[..]].concat(),
            0,
        ),
        Case {
            name: "bytes after the end marker",
            wire: after_end,
            dribble: 0,
            reset: false,
            want: [&a[..], &b[..]].concat(),
            framed: true,
            outcome: Some("protocol-error"),
        },
        Case {
            name: "a reset inside a payload",
            wire: wire[..head + 8 + 500].to_vec(),
            dribble: 0,
            reset: true,
            want: a[..500].to_vec(),
            framed: true,
            outcome: Some("reset"),
        },
    ];
    receive_cases(backend, RecvOptions::default(), cases);
}

/// Raw streams (nc, socat) are received as they come, including ones that
/// begin like the magic; with `raw: true` even a framed stream is.
fn raw_streams_are_unchanged(backend: Option<Backend>) {
    let data = pattern(400_000, 31);
    let mut like_magic = ringmover::wire::MAGIC[..5].to_vec();
    like_magic.extend_from_slice(b"...then not the magic");
    let raw = |name, wire: Vec<u8>, dribble| Case {
        name,
        want: wire.clone(),
        wire,
        dribble,
        reset: false,
        framed: false,
        outcome: None,
    };
    let cases = vec![
        raw("plain bytes", data.clone(), 0),
        raw("an empty stream", Vec::new(), 0),
        raw("the magic's first bytes, then not", like_magic.clone(), 9),
        raw("one byte", vec![0x89 ^ 1], 0),
    ];
    receive_cases(backend, RecvOptions::default(), cases);

    let options = RecvOptions {
        raw: true,
        ..RecvOptions::default()
    };
    let wire = framed(&[&data[..1000]]);
    let cases = vec![
        raw("framed, taken as raw", wire.clone(), 0),
        raw("a cut framed stream, taken as raw", wire[..20].to_vec(), 0),
    ];
    receive_cases(backend, options, cases);
}

/// `max_bytes` counts payload bytes of a framed stream.
fn the_quota_counts_framed_payload(backend: Option<Backend>) {
    let data = pattern(3000, 41);
    let options = RecvOptions {
        max_bytes: Some(2000),
        ..RecvOptions::default()
    };
    let case = |name, frames: &[&[u8]], want: &[u8], outcome| Case {
        name,
        wire: framed(frames),
        dribble: 0,
        reset: false,
        want: want.to_vec(),
        framed: true,
        outcome,
    };
    let cases = vec![
        case(
            "exactly the quota",
            &[&data[..1500], &data[1500..2000]],
            &data[..2000],
            None,
        ),
        case(
            "over it",
            &[&data[..1500], &data[1500..]],
            &data[..2000],
            Some("quota"),
        ),
    ];
    receive_cases(backend, options, cases);
}

/// Faults that need Linux's fd limits, `/proc`, `prlimit(1)` or
/// `/dev/full`. Its `ringmover recv` child is used by `recv.rs` too.
#[cfg(target_os = "linux")]
pub(crate) mod faults {
    use std::process::{Child, Command, ExitStatus, Stdio};

    use ringmover::recv::Failure;
    use serde_json::Value;

    use super::*;

    for_each_backend!(
        out_of_fds_for_pipes_fails_nothing,
        accept_out_of_fds_backs_off_and_resumes,
        a_stopped_receiver_keeps_a_live_sender,
        a_failing_file_ends_only_its_connection,
    );

    /// Waits until `cond` holds, at most `secs` seconds; panics naming `what`.
    fn wait_until(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !cond() {
            assert!(Instant::now() < deadline, "waited {secs} s for {what}");
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// A `ringmover recv --json` child writing into `dir/out`, its stdout and
    /// stderr in `dir`. Killed if the test panics.
    pub(crate) struct RecvChild {
        child: Child,
        pub(crate) addr: SocketAddr,
        dir: PathBuf,
    }

    impl RecvChild {
        pub(crate) fn start(backend: Option<Backend>, name: &str, args: &[&str]) -> RecvChild {
            let dir = scratch(name);
            fs::create_dir(dir.join("out")).unwrap();
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringmover"));
            cmd.env("RINGMOVER_BACKEND", backend.map_or("auto", |b| b.name()))
                .args(["recv", "--listen", "127.0.0.1:0", "--json", "--out"])
                .arg(dir.join("out"))
                .args(args)
                .stdin(Stdio::null())
                .stdout(File::create(dir.join("stdout")).unwrap())
                .stderr(File::create(dir.join("stderr")).unwrap());
            let child = cmd.spawn().expect("spawning ringmover recv");
            let mut c = RecvChild {
                child,
                addr: "0.0.0.0:0".parse().unwrap(),
                dir,
            };
            wait_until(20, "the `listening on` line", || {
                c.stderr()
                    .lines()
                    .next()
                    .is_some_and(|l| l.ends_with(|ch: char| ch.is_ascii_digit()))
            });
            let first = c.stderr().lines().next().unwrap().to_owned();
            c.addr = first
                .strip_prefix("listening on ")
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("expected `listening on ADDR`, got {first:?}"));
            c
        }

        fn pid(&self) -> u32 {
            self.child.id()
        }

        pub(crate) fn stderr(&self) -> String {
            fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
        }

        /// The child's open fd numbers.
        fn fds(&self) -> Vec<usize> {
            fs::read_dir(format!("/proc/{}/fd", self.pid()))
                .map(|d| {
                    d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                        .collect()
                })
                .unwrap_or_default()
        }

        /// The child's open fds once it has settled: the same count for 100 ms
        /// (it prints `listening on` before setting up its backend, which
        /// probes with fds of its own for a moment).
        pub(crate) fn settled_fds(&self) -> usize {
            let mut last = (self.fds().len(), Instant::now());
            wait_until(20, "the receiver's fds to settle", || {
                let n = self.fds().len();
                if n != last.0 {
                    last = (n, Instant::now());
                }
                last.1.elapsed() >= Duration::from_millis(100)
            });
            last.0
        }

        /// Sets the child's RLIMIT_NOFILE (soft and hard, with `prlimit(1)`)
        /// so that exactly `free` more fds can be opened.
        fn limit_free_fds(&self, free: usize) {
            let limit = self.limit_for(free);
            self.prlimit(&format!("{limit}:{limit}"));
        }

        /// Sets the child's soft RLIMIT_NOFILE (the hard one stays, so it
        /// may be raised again without privilege) so that exactly `free`
        /// more fds can be opened.
        pub(crate) fn leave_free_fds(&self, free: usize) {
            let limit = self.limit_for(free);
            self.prlimit(&format!("{limit}:"));
        }

        /// The RLIMIT_NOFILE that leaves exactly `free` more fds to open.
        fn limit_for(&self, free: usize) -> usize {
            let open = self.fds();
            // fds at or above the limit (inherited high numbers) take no room.
            (free..)
                .find(|&l| l - open.iter().filter(|&&fd| fd < l).count() == free)
                .unwrap()
        }

        /// `prlimit --pid=PID --nofile=SPEC`.
        fn prlimit(&self, spec: &str) {
            let out = Command::new("prlimit")
                .arg(format!("--pid={}", self.pid()))
                .arg(format!("--nofile={spec}"))
                .output()
                .expect("running prlimit(1) (util-linux)");
            assert!(out.status.success(), "prlimit: {out:?}");
        }

        /// Sends the child `SIG<name>` with `kill(1)`.
        pub(crate) fn signal(&self, name: &str) {
            let out = Command::new("kill")
                .arg(format!("-{name}"))
                .arg(self.pid().to_string())
                .output()
                .expect("running kill(1)");
            assert!(out.status.success(), "kill -{name}: {out:?}");
        }

        /// CPU time the child used so far (user + system).
        pub(crate) fn cpu(&self) -> Duration {
            let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
            // Fields after the `(comm)`, which may hold spaces: utime is the
            // 14th field of the line, the 12th after the comm.
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            let f: Vec<&str> = rest.split(' ').collect();
            let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
            let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
                .unwrap()
                .unwrap_or(100) as u64;
            Duration::from_millis(ticks * 1000 / hz)
        }

        /// Waits (at most `secs` s) for the child to exit; returns its JSON
        /// records and stderr.
        pub(crate) fn finish(&mut self, secs: u64) -> (Vec<Value>, String) {
            let deadline = Instant::now() + Duration::from_secs(secs);
            while self.child.try_wait().unwrap().is_none() {
                assert!(
                    Instant::now() < deadline,
                    "ringmover recv did not exit in {secs} s; stderr: {}",
                    tail(&self.stderr())
                );
                thread::sleep(Duration::from_millis(10));
            }
            let out = fs::read_to_string(self.dir.join("stdout")).unwrap();
            let records = out
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON {l:?}: {e}")))
                .collect();
            (records, self.stderr())
        }

        /// The exit status, once [`Self::finish`] has seen the child exit.
        pub(crate) fn status(&mut self) -> ExitStatus {
            self.child.wait().unwrap()
        }
    }

    impl Drop for RecvChild {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    /// The last few lines of `s` (a runaway log would drown the message).
    pub(crate) fn tail(s: &str) -> String {
        let lines: Vec<&str> = s.lines().collect();
        let n = lines.len();
        format!("({n} lines) ...{}", lines[n.saturating_sub(5)..].join("\n"))
    }

    /// The record for `peer`, which must have completed with exactly `data`.
    pub(crate) fn assert_complete(records: &[Value], peer: SocketAddr, data: &[u8]) {
        let r = records
            .iter()
            .find(|r| r["peer"] == peer.to_string())
            .unwrap_or_else(|| panic!("no record for {peer} in {records:?}"));
        assert_eq!(r["outcome"], "complete", "{r}");
        let got = fs::read(r["path"].as_str().unwrap()).unwrap();
        assert!(
            got == data,
            "{peer}: {} bytes, {} sent",
            got.len(),
            data.len()
        );
    }

    /// A client that connected and waits for the word to send `data`.
    pub(crate) struct Sender {
        pub(crate) stream: TcpStream,
        pub(crate) peer: SocketAddr,
        pub(crate) data: Vec<u8>,
    }

    impl Sender {
        pub(crate) fn connect(addr: SocketAddr, data: Vec<u8>) -> Sender {
            let stream = TcpStream::connect(addr).unwrap();
            stream
                .set_write_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            let peer = stream.local_addr().unwrap();
            Sender { stream, peer, data }
        }

        /// Sends everything, closes the write side and waits for the
        /// receiver's close, in a thread.
        pub(crate) fn send(self) -> thread::JoinHandle<()> {
            thread::spawn(move || {
                let mut s = self.stream;
                s.write_all(&self.data).expect("sending to the receiver");
                // The records say what the receiver made of it.
                let _ = s.shutdown(Shutdown::Write);
                let _ = s.read(&mut [0u8; 1]);
            })
        }
    }

    // ------------------------------------------------- issue 12: items 1 to 3

    /// Issue 12 item 1: with every fd taken by sockets and files, no pipe can
    /// be made (EMFILE from pipe2). Each connection must still end, here
    /// completely (its bytes are copied instead of spliced), and the receiver
    /// goes on serving.
    fn out_of_fds_for_pipes_fails_nothing(backend: Option<Backend>) {
        const CONNS: usize = 8;
        let total = (CONNS + 1).to_string();
        let mut child = RecvChild::start(backend, "nofile-pipes", &["--max-conns", &total]);
        let base = child.settled_fds();
        // Room for each connection's socket and file, and one fd more: a
        // pipe needs two.
        child.limit_free_fds(2 * CONNS + 1);
        let senders: Vec<Sender> = (0..CONNS)
            .map(|i| Sender::connect(child.addr, pattern(300_000 + i * 777, i as u64)))
            .collect();
        wait_until(20, "every connection to be accepted", || {
            child.fds().len() >= base + 2 * CONNS
        });
        let sent: Vec<(SocketAddr, Vec<u8>)> =
            senders.iter().map(|s| (s.peer, s.data.clone())).collect();
        let threads: Vec<_> = senders.into_iter().map(Sender::send).collect();
        for t in threads {
            t.join().unwrap();
        }
        // fds are free again: the receiver still serves.
        let last = Sender::connect(child.addr, pattern(100_000, 99));
        let last_sent = (last.peer, last.data.clone());
        last.send().join().unwrap();
        let (records, stderr) = child.finish(30);
        assert_eq!(records.len(), CONNS + 1, "{records:?}\n{stderr}");
        for (peer, data) in sent.iter().chain([&last_sent]) {
            assert_complete(&records, *peer, data);
        }
    }

    /// Issue 12 item 2: accept() failing with EMFILE must not spin. The
    /// listener backs off, the failure is reported once for the whole
    /// episode, and accepting resumes when fds free up.
    fn accept_out_of_fds_backs_off_and_resumes(backend: Option<Backend>) {
        const CONNS: usize = 4;
        let total = (CONNS + 1).to_string();
        let mut child = RecvChild::start(backend, "nofile-accept", &["--max-conns", &total]);
        let base = child.settled_fds();
        // Room for exactly CONNS sockets and their files.
        child.limit_free_fds(2 * CONNS);
        let mut senders: Vec<Sender> = (0..CONNS)
            .map(|i| Sender::connect(child.addr, pattern(50_000, i as u64)))
            .collect();
        wait_until(20, "every connection to be accepted", || {
            child.fds().len() >= base + 2 * CONNS
        });
        // One more: accept() now fails with EMFILE.
        let waiting = Sender::connect(child.addr, pattern(60_000, 77));
        wait_until(20, "the accept failure on stderr", || {
            child.stderr().contains("accepting")
        });
        let before = child.cpu();
        let measured = Instant::now();
        thread::sleep(Duration::from_millis(600));
        let spent = child.cpu().saturating_sub(before);
        let wall = measured.elapsed();
        let failures = child.stderr().matches("accepting").count();
        assert!(
            spent < wall / 3,
            "the receiver spun on accept: {spent:?} of CPU in {wall:?}; stderr {}",
            tail(&child.stderr())
        );
        assert_eq!(
            failures,
            1,
            "one report per episode: {}",
            tail(&child.stderr())
        );
        // One connection ends and frees two fds: the waiting one gets in.
        let mut sent: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
        let first = senders.remove(0);
        sent.push((first.peer, first.data.clone()));
        first.send().join().unwrap();
        sent.push((waiting.peer, waiting.data.clone()));
        waiting.send().join().unwrap();
        for s in senders {
            sent.push((s.peer, s.data.clone()));
            s.send().join().unwrap();
        }
        let (records, stderr) = child.finish(30);
        assert_eq!(records.len(), CONNS + 1, "{records:?}\n{}", tail(&stderr));
        for (peer, data) in &sent {
            assert_complete(&records, *peer, data);
        }
        assert_eq!(stderr.matches("accepting").count(), 1, "{}", tail(&stderr));
    }

    /// Issue 12 item 3: a receiver stopped (SIGSTOP, a cgroup freeze) for
    /// longer than its idle timeout, while its sender keeps writing, must not
    /// call the connection idle when it continues: data was there.
    fn a_stopped_receiver_keeps_a_live_sender(backend: Option<Backend>) {
        let mut child = RecvChild::start(
            backend,
            "sigstop",
            &["--max-conns", "1", "--idle-timeout", "1s"],
        );
        let mut s = TcpStream::connect(child.addr).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        let peer = s.local_addr().unwrap();
        let data = pattern(100 * 14, 5);
        for (i, piece) in data.chunks(100).enumerate() {
            if i == 2 {
                child.signal("STOP");
            }
            if i == 12 {
                child.signal("CONT");
            }
            s.write_all(piece).unwrap();
            thread::sleep(Duration::from_millis(150));
        }
        s.shutdown(Shutdown::Write).unwrap();
        let (records, stderr) = child.finish(20);
        assert_eq!(records.len(), 1, "{records:?}\n{stderr}");
        assert_complete(&records, peer, &data);
    }

    /// Issue 12 item 1: a file that cannot be written (ENOSPC from
    /// `/dev/full`) fails its own connection with the cause; another
    /// connection at the same time completes.
    fn a_failing_file_ends_only_its_connection(backend: Option<Backend>) {
        let (mut r, addr) = receiver(backend, RecvOptions::default(), 2);
        let dir = scratch("dev-full");
        let good_path = dir.join("good");
        let full = Sender::connect(addr, pattern(200_000, 1));
        let full_peer = full.peer;
        let full_writer = thread::spawn(move || {
            // The receiver closes before everything is sent.
            let mut s = full.stream;
            let _ = s.write_all(&full.data);
        });
        let good_data = pattern(300_000, 2);
        let mut good_writer = None;
        let done = serve(&mut r, 2, |i| {
            if i > 0 {
                return File::create(&good_path).unwrap();
            }
            // The first connection is the one to /dev/full; the second
            // connects only now, so the order is known.
            let data = good_data.clone();
            good_writer = Some(thread::spawn(move || {
                Sender::connect(addr, data).send().join()
            }));
            File::options().write(true).open("/dev/full").unwrap()
        });
        full_writer.join().unwrap();
        good_writer.unwrap().join().unwrap().unwrap();
        let bad = done.iter().find(|f| f.peer == full_peer).unwrap();
        match &bad.result {
            Err(Failure::Write(e)) => assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}"),
            other => panic!("expected an ENOSPC write error, got {other:?}"),
        }
        let ok = done.iter().find(|f| f.peer != full_peer).unwrap();
        assert!(ok.result.is_ok(), "{:?}", ok.result);
        assert_eq!(fs::read(&good_path).unwrap(), good_data);
        assert_eq!(r.active(), 0);
        fs::remove_dir_all(&dir).unwrap();
    }
}
