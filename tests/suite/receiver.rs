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
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use ringmover::recv::{Event, Failure, Finished, Receiver, RecvOptions};
use ringmover::Backend;
use serde_json::Value;

for_each_backend!(
    out_of_fds_for_pipes_fails_nothing,
    accept_out_of_fds_backs_off_and_resumes,
    a_stopped_receiver_keeps_a_live_sender,
    a_failing_file_ends_only_its_connection,
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
struct RecvChild {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl RecvChild {
    fn start(backend: Option<Backend>, name: &str, args: &[&str]) -> RecvChild {
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

    fn stderr(&self) -> String {
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

    /// Sets the child's RLIMIT_NOFILE (soft and hard, with `prlimit(1)`)
    /// so that exactly `free` more fds can be opened.
    fn limit_free_fds(&self, free: usize) {
        let open = self.fds();
        // fds at or above the limit (inherited high numbers) take no room.
        let limit = (free..)
            .find(|&l| l - open.iter().filter(|&&fd| fd < l).count() == free)
            .unwrap();
        let out = Command::new("prlimit")
            .arg(format!("--pid={}", self.pid()))
            .arg(format!("--nofile={limit}:{limit}"))
            .output()
            .expect("running prlimit(1) (util-linux)");
        assert!(out.status.success(), "prlimit: {out:?}");
    }

    /// Sends the child `SIG<name>` with `kill(1)`.
    fn signal(&self, name: &str) {
        let out = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .output()
            .expect("running kill(1)");
        assert!(out.status.success(), "kill -{name}: {out:?}");
    }

    /// CPU time the child used so far (user + system).
    fn cpu(&self) -> Duration {
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
    fn finish(&mut self, secs: u64) -> (Vec<Value>, String) {
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
}

impl Drop for RecvChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The last few lines of `s` (a runaway log would drown the message).
fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    let n = lines.len();
    format!("({n} lines) ...{}", lines[n.saturating_sub(5)..].join("\n"))
}

/// The record for `peer`, which must have completed with exactly `data`.
fn assert_complete(records: &[Value], peer: SocketAddr, data: &[u8]) {
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
struct Sender {
    stream: TcpStream,
    peer: SocketAddr,
    data: Vec<u8>,
}

impl Sender {
    fn connect(addr: SocketAddr, data: Vec<u8>) -> Sender {
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
    fn send(self) -> thread::JoinHandle<()> {
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
    let base = child.fds().len();
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
    let base = child.fds().len();
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
                    r.attach(socket.into(), peer, f).expect("Receiver::attach");
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
