//! `ringmover send` against plain TCP listeners in the test: what it puts
//! on the wire (decoded with `ringmover::wire`), its exit status, and that
//! every failure reaches the receiver as a reset, never as a clean end.
//! The backend variable is set for uniformity; `send` uses no backend.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ringmover::wire::{self, Deframer, Detect, Want};
use serde_json::Value;

use crate::recv::{output_within, pattern, scratch, wait_child, wait_until, Server, PATIENCE};
use crate::util::Scratch;

const BIN: &str = env!("CARGO_BIN_EXE_ringmover");

for_each_backend!(
    framed_output_decodes_to_the_input,
    raw_output_is_the_input,
    send_fails_unless_everything_was_accepted,
    input_is_opened_before_connecting,
    signals_reset_the_connection,
    a_shrinking_file_resets_the_connection,
    a_stalled_receiver_fails_the_send,
    a_sysfs_file_is_sent_whole,
    non_blocking_stdin_is_waited_for,
);

// ---------------------------------------------------------------- helpers

fn send_command(backend: Option<ringmover::Backend>) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env("RINGMOVER_BACKEND", backend.map_or("auto", |b| b.name()))
        .arg("send")
        .stdin(Stdio::null());
    cmd
}

/// A fresh scratch directory holding `src.bin` of `len` pattern bytes.
fn source(name: &str, len: usize, seed: u64) -> (Scratch, PathBuf, Vec<u8>) {
    let dir = scratch(name);
    let data = pattern(len, seed);
    let path = dir.join("src.bin");
    fs::write(&path, &data).unwrap();
    (dir, path, data)
}

fn listen() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

/// Accepts one connection within [`PATIENCE`], with read and write
/// timeouts of [`PATIENCE`].
fn accept(l: &TcpListener) -> TcpStream {
    l.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(PATIENCE)).unwrap();
                s.set_write_timeout(Some(PATIENCE)).unwrap();
                return s;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < deadline,
                    "no connection from ringmover send within {PATIENCE:?}"
                );
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accepting: {e}"),
        }
    }
}

/// Reads until the end of stream (`Ok`) or an error (a reset); `seen`
/// follows the count. A read timeout fails the test.
fn read_all(s: &mut TcpStream, seen: &AtomicU64) -> (Vec<u8>, io::Result<()>) {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (got, Ok(())),
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                seen.store(got.len() as u64, Ordering::SeqCst);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                panic!("ringmover send went silent for {PATIENCE:?} without closing")
            }
            Err(e) => return (got, Err(e)),
        }
    }
}

/// A listener thread: accepts one connection, reads it to the end, then
/// closes. Returns the address, the count seen so far, and the thread.
type Reader = thread::JoinHandle<(Vec<u8>, io::Result<()>)>;
fn reader() -> (SocketAddr, Arc<AtomicU64>, Reader) {
    let (l, addr) = listen();
    let seen = Arc::new(AtomicU64::new(0));
    let count = seen.clone();
    let t = thread::spawn(move || {
        let mut s = accept(&l);
        read_all(&mut s, &count)
    });
    (addr, seen, t)
}

/// What a framed stream decodes to.
#[derive(Debug)]
struct Decoded {
    payload: Vec<u8>,
    frames: usize,
    ended: bool,
}

/// Decodes `bytes` as [`wire`] says a receiver must; fails the test on
/// bytes after the end marker.
fn deframe(bytes: &[u8]) -> Decoded {
    assert_eq!(
        wire::detect(&bytes[..bytes.len().min(8)]),
        Detect::Framed,
        "the stream starts with the magic"
    );
    let mut d = Deframer::new();
    let mut out = Decoded {
        payload: Vec::new(),
        frames: 0,
        ended: false,
    };
    let mut rest = &bytes[wire::MAGIC.len()..];
    while !rest.is_empty() {
        match d.want() {
            Want::Header(_) => {
                rest = &rest[d.header(rest)..];
                if matches!(d.want(), Want::Payload(_)) {
                    out.frames += 1;
                }
            }
            Want::Payload(left) => {
                let n = (rest.len() as u64).min(left) as usize;
                out.payload.extend_from_slice(&rest[..n]);
                d.payload(n as u64);
                rest = &rest[n..];
            }
            Want::End => panic!("{} bytes after the end marker", rest.len()),
        }
    }
    out.ended = d.ended();
    out
}

/// Waits for `child` (see [`wait_child`]) and reads its piped stderr.
fn exit_and_stderr(child: &mut std::process::Child, what: &str) -> (ExitStatus, String) {
    let status = wait_child(child, what);
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut err).unwrap();
    }
    (status, err)
}

/// The one `send-summary` line `send --json` printed.
fn json_of(o: &std::process::Output) -> Value {
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(text.lines().count(), 1, "one line: {o:?}");
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("send --json printed no JSON ({e}): {o:?}"));
    assert_eq!(v["type"], "send-summary", "{v}");
    let outcome = if o.status.success() {
        "complete"
    } else {
        "failed"
    };
    assert_eq!(v["outcome"], outcome, "{v}");
    assert_eq!(v["error"].is_null(), o.status.success(), "{v}");
    v
}

/// A failed send's summary: `failed`, the error as on stderr, at most
/// `at_most` bytes sent, no method.
fn assert_failed_summary(o: &std::process::Output, at_most: u64) {
    let v = json_of(o);
    let err = String::from_utf8_lossy(&o.stderr);
    let said = v["error"].as_str().expect("an error");
    assert!(err.contains(said), "stderr {err:?} says {said:?}");
    assert!(v["bytes"].as_u64().unwrap() <= at_most, "{v}");
    assert!(v["method"].is_null(), "{v}");
}

fn is_reset(r: &io::Result<()>) -> bool {
    matches!(r, Err(e) if e.kind() == io::ErrorKind::ConnectionReset)
}

// ---------------------------------------------------------------- tests

/// A regular file (frames of 8 MiB), an empty file, a /proc file (size 0,
/// copied) and stdin (a frame per read): each decodes to exactly its input,
/// ends with the end marker, and send exits 0 after the listener closes.
fn framed_output_decodes_to_the_input(backend: Option<ringmover::Backend>) {
    let dir = scratch("framed");
    let big = pattern((20 << 20) + 3, 71);
    let big_path = dir.join("big.bin");
    fs::write(&big_path, &big).unwrap();
    let empty_path = dir.join("empty.bin");
    fs::write(&empty_path, b"").unwrap();
    let proc_version = fs::read("/proc/version").unwrap();
    let cases: [(&Path, &[u8], Option<usize>, &str); 3] = [
        (&big_path, &big, Some(3), "sendfile"),
        (&empty_path, b"", Some(0), "read-write"),
        (
            Path::new("/proc/version"),
            &proc_version,
            None,
            "read-write",
        ),
    ];
    for (path, want, frames, method) in cases {
        let (addr, _, t) = reader();
        let o = output_within(
            send_command(backend)
                .arg(path)
                .args(["--json", "--to", &addr.to_string()]),
            &format!("ringmover send {}", path.display()),
        );
        let (got, end) = t.join().unwrap();
        assert!(o.status.success(), "{}: {o:?}", path.display());
        assert!(end.is_ok(), "{}: a clean end: {end:?}", path.display());
        let d = deframe(&got);
        assert!(d.ended, "{}: ends with the end marker", path.display());
        assert!(d.payload == want, "{}: payload differs", path.display());
        if let Some(n) = frames {
            assert_eq!(d.frames, n, "{}", path.display());
        }
        let v = json_of(&o);
        assert_eq!(v["bytes"], want.len() as u64, "{v}");
        assert_eq!(v["method"], method, "{v}");
    }

    // stdin: written in uneven pieces through a pipe.
    let data = pattern(1_000_003, 72);
    let (addr, _, t) = reader();
    let mut child = send_command(backend)
        .args(["-", "--json", "--to", &addr.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for piece in data.chunks(77_777) {
        stdin.write_all(piece).expect("feeding send's stdin");
    }
    drop(stdin);
    let status = wait_child(&mut child, "ringmover send - of 1 MB");
    let (got, end) = t.join().unwrap();
    assert!(status.success(), "{status}");
    assert!(end.is_ok(), "{end:?}");
    let d = deframe(&got);
    assert!(
        d.ended && d.payload == data,
        "stdin payload, {} frames",
        d.frames
    );
    assert!(d.frames >= 2, "a frame per read: {}", d.frames);
}

/// `--raw`: the bytes alone, no magic, no frames.
fn raw_output_is_the_input(backend: Option<ringmover::Backend>) {
    let (_dir, path, data) = source("raw", 3 << 20, 73);
    let (addr, _, t) = reader();
    let o = output_within(
        send_command(backend)
            .arg(&path)
            .args(["--raw", "--json", "--to", &addr.to_string()]),
        "ringmover send --raw",
    );
    let (got, end) = t.join().unwrap();
    assert!(o.status.success(), "{o:?}");
    assert!(end.is_ok(), "{end:?}");
    assert!(got == data, "raw bytes differ ({} bytes)", got.len());
    assert_eq!(json_of(&o)["bytes"], data.len() as u64);
}

/// Exit status 1 unless every byte was taken and the peer then closed
/// cleanly: against `recv --max-bytes 64K`, a peer that reads 64 KiB and
/// closes, and a peer that reads everything and then resets.
fn send_fails_unless_everything_was_accepted(backend: Option<ringmover::Backend>) {
    let (dir, path, _) = source("refused", 1 << 20, 74);
    let send = |addr: SocketAddr, what: &str| {
        output_within(
            send_command(backend)
                .arg(&path)
                .args(["--json", "--to", &addr.to_string()]),
            &format!("ringmover send to {what}"),
        )
    };

    // ringmover recv over quota.
    let out = dir.join("out");
    fs::create_dir(&out).unwrap();
    let server = Server::start(
        backend.map_or("auto", |b| b.name()),
        &[
            "--out",
            out.to_str().unwrap(),
            "--once",
            "--max-bytes",
            "64K",
        ],
    );
    let o = send(server.addr, "recv --max-bytes 64K");
    let done = server.finish();
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("reset the connection after"), "{err}");
    assert_failed_summary(&o, 1 << 20);
    assert_eq!(done.records[0]["outcome"], "quota", "{done:?}");

    // A peer that takes 64 KiB and closes.
    let (l, addr) = listen();
    let t = thread::spawn(move || {
        let mut s = accept(&l);
        let mut some = vec![0u8; 64 << 10];
        s.read_exact(&mut some).expect("reading 64 KiB");
    });
    let o = send(addr, "a peer that stops at 64 KiB");
    t.join().unwrap();
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("closed the connection before taking everything"),
        "{err}"
    );

    // A peer that reads everything, then resets instead of closing.
    let (l, addr) = listen();
    let t = thread::spawn(move || {
        let mut s = accept(&l);
        let (got, end) = read_all(&mut s, &AtomicU64::new(0));
        ringmover::send::reset_on_close(&s).unwrap();
        (got, end)
    });
    let o = send(addr, "a peer that resets at the end");
    let (got, end) = t.join().unwrap();
    assert!(end.is_ok() && deframe(&got).ended, "everything was sent");
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("after the last byte"), "{err}");
    // Everything was sent, not acknowledged: the count says so.
    let v = json_of(&o);
    assert_eq!(v["bytes"], 1 << 20, "{v}");
}

/// A missing file or a directory fails before connecting: the receiver
/// never sees a connection (so never a 0-byte "complete" transfer).
fn input_is_opened_before_connecting(backend: Option<ringmover::Backend>) {
    let dir = scratch("noinput");
    let (l, addr) = listen();
    l.set_nonblocking(true).unwrap();
    for (input, says) in [
        (dir.join("missing"), "No such file"),
        (dir.to_path_buf(), "is a directory"),
    ] {
        let o = output_within(
            send_command(backend)
                .arg(&input)
                .args(["--json", "--to", &addr.to_string()]),
            "ringmover send of a bad input",
        );
        assert_eq!(o.status.code(), Some(1), "{o:?}");
        assert_failed_summary(&o, 0);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(&input.display().to_string()) && err.contains(says),
            "{err}"
        );
        match l.accept() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            other => panic!("send connected anyway: {other:?}"),
        }
    }
}

/// SIGINT to `send -` mid-transfer, and SIGTERM from `timeout` to `send
/// /dev/zero`: the receiver sees a reset, never a clean end, and never the
/// end marker.
fn signals_reset_the_connection(backend: Option<ringmover::Backend>) {
    // SIGINT after 1 MiB of 2, with stdin still open.
    let (addr, seen, t) = reader();
    let mut child = send_command(backend)
        .args(["-", "--json", "--to", &addr.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(&pattern(1 << 20, 75))
        .expect("feeding send's stdin");
    wait_until("the listener to receive the first MiB", || {
        seen.load(Ordering::SeqCst) > 1 << 20
    });
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let (status, err) = exit_and_stderr(&mut child, "ringmover send after SIGINT");
    drop(stdin);
    let (got, end) = t.join().unwrap();
    assert_eq!(status.code(), Some(130), "{status}: {err}");
    assert!(err.contains("interrupted by SIGINT"), "{err}");
    // --json says so too: one `interrupted` summary.
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    assert_eq!(v["type"], "send-summary", "{v}");
    assert_eq!(v["outcome"], "interrupted", "{v}");
    assert!(v["error"].as_str().unwrap().contains("SIGINT"), "{v}");
    assert!(v["bytes"].as_u64().unwrap() >= 1 << 20, "{v}");
    assert!(is_reset(&end), "a reset, not a clean end: {end:?}");
    assert!(!deframe(&got).ended, "no end marker");

    // `timeout 0.05 ringmover send /dev/zero`; longer if the machine is
    // too busy for send to connect in 50 ms.
    for secs in ["0.05", "0.5", "5"] {
        let (l, addr) = listen();
        let seen = AtomicU64::new(0);
        let mut child = Command::new("timeout")
            .args([secs, BIN, "send", "/dev/zero", "--to", &addr.to_string()])
            .env("RINGMOVER_BACKEND", backend.map_or("auto", |b| b.name()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("running timeout (coreutils)");
        l.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + PATIENCE;
        let conn = loop {
            if let Ok((s, _)) = l.accept() {
                break Some(s);
            }
            if child.try_wait().unwrap().is_some() {
                break l.accept().ok().map(|(s, _)| s);
            }
            assert!(Instant::now() < deadline, "timeout {secs} did not end");
            thread::sleep(Duration::from_millis(1));
        };
        let Some(mut s) = conn else {
            wait_child(&mut child, "timeout");
            continue; // killed before connecting: try a longer timeout
        };
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        let (got, end) = read_all(&mut s, &seen);
        let status = wait_child(&mut child, "timeout ringmover send /dev/zero");
        assert_eq!(status.code(), Some(124), "timeout ended it: {status}");
        assert!(is_reset(&end), "a reset, not a clean end: {end:?}");
        if got.len() >= 8 {
            assert!(!deframe(&got).ended, "no end marker");
        }
        return;
    }
    panic!("ringmover send never connected within 5 s");
}

/// A file that shrinks after its frame was declared (or, raw, after its
/// size was read): the receiver gets a reset in the middle, never a clean
/// end after a prefix, and send says why.
fn a_shrinking_file_resets_the_connection(backend: Option<ringmover::Backend>) {
    for raw in [false, true] {
        let (_dir, path, _) = source("shrink", 32 << 20, 76);
        let (l, addr) = listen();
        // A small window, so sending stalls well inside the file.
        nix::sys::socket::setsockopt(&l, nix::sys::socket::sockopt::RcvBuf, &4096).unwrap();
        let mut cmd = send_command(backend);
        cmd.arg(&path).args(["--to", &addr.to_string()]);
        if raw {
            cmd.arg("--raw");
        }
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut s = accept(&l);
        let mut head = [0u8; 16];
        s.read_exact(&mut head).expect("reading the first 16 bytes");
        if !raw {
            assert_eq!(head[..8], wire::MAGIC);
            assert_eq!(head[8..], wire::frame_header(8 << 20));
        }
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        let (got, end) = read_all(&mut s, &AtomicU64::new(0));
        let (status, err) = exit_and_stderr(&mut child, "ringmover send of a shrinking file");
        assert_eq!(status.code(), Some(1), "raw {raw}, {status}: {err}");
        assert!(err.contains("shrank"), "raw {raw}: {err}");
        assert!(
            is_reset(&end),
            "raw {raw}: a reset, not a clean end after {} bytes: {end:?}",
            got.len() + head.len()
        );
    }
}

/// `--idle-timeout`: a peer that stops reading, and a peer that reads
/// everything but never closes, fail the send after that long.
fn a_stalled_receiver_fails_the_send(backend: Option<ringmover::Backend>) {
    // Accepts and never reads (until send has given up).
    let (l, addr) = listen();
    let (gave_up, wait) = std::sync::mpsc::channel::<()>();
    let t = thread::spawn(move || {
        let s = accept(&l);
        let _ = wait.recv_timeout(PATIENCE);
        drop(s);
    });
    let o = output_within(
        send_command(backend).args([
            "/dev/zero",
            "--idle-timeout",
            "300ms",
            "--to",
            &addr.to_string(),
        ]),
        "ringmover send to a peer that never reads",
    );
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--idle-timeout 300ms") && err.contains("took no bytes"),
        "{err}"
    );
    gave_up.send(()).unwrap();
    t.join().unwrap();

    // Reads to the end, never closes (until send has given up).
    let (l, addr) = listen();
    let (gave_up, wait) = std::sync::mpsc::channel::<()>();
    let t = thread::spawn(move || {
        let mut s = accept(&l);
        let (got, end) = read_all(&mut s, &AtomicU64::new(0));
        let _ = wait.recv_timeout(PATIENCE);
        (got, end)
    });
    let o = output_within(
        send_command(backend).args([
            "/proc/version",
            "--idle-timeout",
            "300ms",
            "--to",
            &addr.to_string(),
        ]),
        "ringmover send to a peer that never closes",
    );
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("did not close"), "{err}");
    gave_up.send(()).unwrap();
    let (got, end) = t.join().unwrap();
    assert!(end.is_ok() && deframe(&got).ended, "everything was sent");
}

/// A sysfs file reports size 4096 whatever it holds: it is read to its end
/// and sent whole (framed), and send exits 0. It used to declare a
/// 4096-byte frame from the size, find 6 bytes, and fail ("the file shrank
/// while being sent"). Reproduce: `ringmover send /sys/class/net/lo/mtu
/// --to HOST:PORT` against `ringmover recv`.
#[cfg(target_os = "linux")]
fn a_sysfs_file_is_sent_whole(backend: Option<ringmover::Backend>) {
    let path = Path::new("/sys/class/net/lo/mtu");
    let want = fs::read(path).expect("sysfs mounted, with /sys/class/net/lo/mtu");
    let size = fs::metadata(path).unwrap().len();
    assert!(
        size > want.len() as u64,
        "{}: size {size}, {} bytes: not the case this test is about",
        path.display(),
        want.len()
    );
    let (addr, _, t) = reader();
    let o = output_within(
        send_command(backend)
            .arg(path)
            .args(["--json", "--to", &addr.to_string()]),
        "ringmover send /sys/class/net/lo/mtu",
    );
    let (got, end) = t.join().unwrap();
    assert!(o.status.success(), "{o:?}");
    assert!(end.is_ok(), "a clean end: {end:?}");
    let d = deframe(&got);
    assert!(d.ended, "ends with the end marker");
    assert_eq!(d.payload, want);
    let v = json_of(&o);
    assert_eq!(v["bytes"], want.len() as u64, "{v}");
    assert_eq!(v["method"], "read-write", "{v}");
}

#[cfg(not(target_os = "linux"))]
fn a_sysfs_file_is_sent_whole(_backend: Option<ringmover::Backend>) {}

/// `send -` whose stdin pipe another process made non-blocking (the flag
/// is shared through the open file description): a pause in the input is
/// waited for, not a failure. It used to fail with "Resource temporarily
/// unavailable (os error 11)" and reset the connection at the first pause.
/// Reproduce: a Python parent that sets O_NONBLOCK on the pipe it gives
/// `ringmover send - --to HOST:PORT` as stdin, then writes with pauses.
fn non_blocking_stdin_is_waited_for(backend: Option<ringmover::Backend>) {
    use nix::fcntl::OFlag;
    // O_CLOEXEC: no other test's child may inherit the write end.
    #[cfg(not(target_os = "macos"))]
    let (read_end, write_end) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).unwrap();
    // No pipe2 there: the flags one by one (a child spawned in between
    // may inherit the ends; this suite runs on Linux).
    #[cfg(target_os = "macos")]
    let (read_end, write_end) = {
        use nix::fcntl::{fcntl, FcntlArg, FdFlag};
        use std::os::fd::AsRawFd;
        let (r, w) = nix::unistd::pipe().unwrap();
        for fd in [&r, &w] {
            fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).unwrap();
        }
        fcntl(r.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).unwrap();
        (r, w)
    };
    let (addr, seen, t) = reader();
    let mut child = send_command(backend)
        .args(["-", "--to", &addr.to_string()])
        .stdin(Stdio::from(read_end))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = fs::File::from(write_end);
    let (first, second) = (pattern(1000, 83), pattern(2000, 84));
    input.write_all(&first).unwrap();
    // The magic, a frame header and the first piece reached the reader:
    // send is now reading an empty non-blocking pipe.
    let framed = (wire::MAGIC.len() + 8 + first.len()) as u64;
    wait_until("the first piece to arrive", || {
        seen.load(Ordering::SeqCst) >= framed
    });
    input.write_all(&second).unwrap();
    drop(input);
    let (status, stderr) = exit_and_stderr(&mut child, "ringmover send - (non-blocking stdin)");
    let (got, end) = t.join().unwrap();
    assert!(status.success(), "{status}: {stderr}");
    assert!(end.is_ok(), "a clean end: {end:?}");
    let d = deframe(&got);
    assert!(d.ended, "ends with the end marker");
    assert!(
        d.payload == [first, second].concat(),
        "{} payload bytes",
        d.payload.len()
    );
}
