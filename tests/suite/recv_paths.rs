//! `ringmover recv --threads`, `--out -` and `--direct`, on every backend.

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;

use crate::recv::{
    connect, files_in, part_of, path_of, pattern, record_for, recv_command, scratch, send_bytes,
    serve_into_dir, size_of, wait_child, wait_until, Server, PATIENCE,
};

const BIN: &str = env!("CARGO_BIN_EXE_ringmover");

for_each_backend!(
    threads_spread_many_connections_byte_exact,
    direct_many_connections_byte_exact,
    threads_keep_max_conns_exact,
    threads_report_every_interrupted_connection,
    stdout_into_a_pipe_is_byte_exact,
    stdout_into_a_file_writes_at_its_position,
    stdout_reset_or_truncated_exits_non_zero,
    stdout_reader_that_stops_reading_does_not_block_sigint,
    stdout_write_error_names_standard_output,
    direct_is_byte_exact_on_disk_and_tmpfs,
    direct_quota_keeps_exactly_max_bytes,
    direct_refused_falls_back_to_the_page_cache,
    direct_write_error_keeps_exactly_what_was_written,
);

fn name(backend: Option<ringmover::Backend>) -> &'static str {
    backend.map_or("auto", |b| b.name())
}

/// The names of the threads of process `pid`.
fn thread_names(pid: u32) -> Vec<String> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|t| fs::read_to_string(t.path().join("comm")).ok())
                .map(|c| c.trim().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------- --threads

/// 40 concurrent connections over 2 receive threads: every byte lands in
/// its own file, and both threads exist.
fn threads_spread_many_connections_byte_exact(backend: Option<ringmover::Backend>) {
    many_connections(backend, 40, 1000, &[]);
}

/// The same under --direct, with streams of a few buffers each: more
/// writes want to be in flight than a receiver allows at once.
fn direct_many_connections_byte_exact(backend: Option<ringmover::Backend>) {
    many_connections(backend, 24, 1_500_000, &["--direct"]);
}

/// `n` concurrent connections of about `base` bytes each over 2 threads.
fn many_connections(backend: Option<ringmover::Backend>, n: usize, base: usize, extra: &[&str]) {
    let count = n.to_string();
    let mut args = vec!["--threads", "2", "--max-conns", &count];
    args.extend_from_slice(extra);
    let (dir, out, server) = serve_into_dir(backend, "threads-many", &args);
    wait_until("threads recv-0 and recv-1 in recv", || {
        let names = thread_names(server.pid());
        ["recv-0", "recv-1"]
            .iter()
            .all(|t| names.iter().any(|n| n == t))
    });
    let addr = server.addr;
    let senders: Vec<_> = (0..n)
        .map(|i| {
            thread::spawn(move || {
                let data = pattern(base + i * 7919, 100 + i as u64);
                (send_bytes(addr, &data), data)
            })
        })
        .collect();
    let sent: Vec<(SocketAddr, Vec<u8>)> = senders.into_iter().map(|t| t.join().unwrap()).collect();
    let done = server.finish();
    assert!(done.status.success(), "{}", done.stderr);
    assert_eq!(done.records.len(), n, "{done:?}");
    for (peer, data) in &sent {
        let r = record_for(&done, *peer);
        assert_eq!(r["outcome"], "complete", "{r}");
        assert_eq!(r["bytes"], data.len() as u64, "{r}");
        let got = fs::read(path_of(r)).unwrap();
        assert!(
            got == *data,
            "{peer}: {} bytes, not what was sent",
            got.len()
        );
    }
    assert_eq!(files_in(&out).len(), n, "one file per connection");
    fs::remove_dir_all(&dir).unwrap();
}

/// `--max-conns 3` with 2 threads and 6 clients: exactly 3 are received.
fn threads_keep_max_conns_exact(backend: Option<ringmover::Backend>) {
    let args = ["--threads", "2", "--max-conns", "3"];
    let (dir, out, server) = serve_into_dir(backend, "threads-max", &args);
    // Six clients; the first three must get in. Once recv has taken three
    // it closes its listener, so a later one may be refused or reset: that
    // is the limit working, not a failure.
    let socks: Vec<_> = (0..6)
        .filter_map(|i| {
            let s = if i < 3 {
                connect(server.addr)
            } else {
                std::net::TcpStream::connect(server.addr).ok()?
            };
            let mut s = s;
            let sent = s
                .write_all(&pattern(5000, i))
                .and_then(|()| s.shutdown(Shutdown::Write));
            if i < 3 {
                sent.expect("sending to recv");
            }
            Some(s)
        })
        .collect();
    let done = server.finish();
    drop(socks);
    assert!(done.status.success(), "{}", done.stderr);
    assert_eq!(done.records.len(), 3, "{done:?}");
    assert!(done.records.iter().all(|r| r["outcome"] == "complete"));
    assert_eq!(files_in(&out).len(), 3, "{:?}", files_in(&out));
    fs::remove_dir_all(&dir).unwrap();
}

/// SIGINT with connections live on both threads: each is reported, its
/// .part holding exactly what was sent.
fn threads_report_every_interrupted_connection(backend: Option<ringmover::Backend>) {
    let (dir, out, server) = serve_into_dir(backend, "threads-int", &["--threads", "2"]);
    let mut live = Vec::new();
    for i in 0..4u64 {
        let mut s = connect(server.addr);
        let peer = s.local_addr().unwrap();
        let data = pattern(3000 + i as usize * 20_000, 60 + i);
        s.write_all(&data).expect("sending to recv");
        wait_until("recv to write what was sent", || {
            part_of(&out, peer).is_some_and(|p| size_of(&p) == data.len() as u64)
        });
        live.push((s, peer, data));
    }
    server.signal(nix::sys::signal::Signal::SIGINT);
    let done = server.finish();
    assert_eq!(done.status.code(), Some(130), "{done:?}");
    assert_eq!(done.records.len(), 4, "{done:?}");
    for (_s, peer, data) in &live {
        let r = record_for(&done, *peer);
        assert_eq!(r["outcome"], "interrupted", "{r}");
        assert_eq!(r["bytes"], data.len() as u64, "{r}");
        assert!(fs::read(path_of(r)).unwrap() == *data, "{r}");
        assert!(
            done.stderr
                .contains(&format!("ringmover: {peer}: interrupted by SIGINT")),
            "{}",
            done.stderr
        );
    }
    fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------- --out -

/// `recv --out -` with stdout as given; returns the child, its address and
/// a thread collecting stderr after the `listening on` line.
fn start_stdout(
    backend: Option<ringmover::Backend>,
    stdout: Stdio,
    extra: &[&str],
) -> (std::process::Child, SocketAddr, thread::JoinHandle<String>) {
    let mut args = vec!["--listen", "127.0.0.1:0", "--out", "-"];
    args.extend_from_slice(extra);
    let mut cmd = recv_command(name(backend), &args);
    cmd.stdout(stdout);
    let mut child = cmd.spawn().expect("spawning ringmover recv --out -");
    let mut err = child.stderr.take().unwrap();
    let mut first = Vec::new();
    let mut b = [0u8; 1];
    while err.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
        first.push(b[0]);
    }
    let first = String::from_utf8_lossy(&first).into_owned();
    let addr = first
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("expected `listening on`, got {first:?}"))
        .parse()
        .unwrap();
    let stderr = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    (child, addr, stderr)
}

/// `ringmover send FILE` (framed, sendfile) to `addr`.
fn send_file(path: &Path, addr: SocketAddr) {
    let mut child = Command::new(BIN)
        .args(["send", path.to_str().unwrap(), "--to", &addr.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_child(&mut child, "ringmover send").success());
}

/// Into a pipe the test reads: byte-exact (spliced from the socket into it).
fn stdout_into_a_pipe_is_byte_exact(backend: Option<ringmover::Backend>) {
    let dir = scratch("stdout-pipe");
    let data = pattern(5 << 20, 77);
    let src = dir.join("src");
    fs::write(&src, &data).unwrap();
    let (mut child, addr, stderr) = start_stdout(backend, Stdio::piped(), &[]);
    let mut out = child.stdout.take().unwrap();
    let reader = thread::spawn(move || {
        let mut v = Vec::new();
        out.read_to_end(&mut v).unwrap();
        v
    });
    send_file(&src, addr);
    let status = wait_child(&mut child, "recv --out -");
    let got = reader.join().unwrap();
    let stderr = stderr.join().unwrap();
    assert!(status.success(), "{status}: {stderr}");
    assert!(
        got == data,
        "{} bytes, not the {} sent",
        got.len(),
        data.len()
    );
    fs::remove_dir_all(&dir).unwrap();
}

/// Into a file that already holds a header: the payload follows it (the
/// file's own position), nothing before it is overwritten.
fn stdout_into_a_file_writes_at_its_position(backend: Option<ringmover::Backend>) {
    let dir = scratch("stdout-file");
    let data = pattern(3 << 20, 78);
    let src = dir.join("src");
    fs::write(&src, &data).unwrap();
    let path = dir.join("out");
    let mut f = fs::File::create(&path).unwrap();
    f.write_all(b"header\n").unwrap();
    let (mut child, addr, stderr) = start_stdout(backend, Stdio::from(f), &["--fsync"]);
    send_file(&src, addr);
    let status = wait_child(&mut child, "recv --out - > file");
    let stderr = stderr.join().unwrap();
    assert!(status.success(), "{status}: {stderr}");
    let got = fs::read(&path).unwrap();
    assert_eq!(&got[..7], b"header\n");
    assert!(
        got[7..] == data[..],
        "{} bytes after the header",
        got.len() - 7
    );
    fs::remove_dir_all(&dir).unwrap();
}

/// A reset, and a framed stream cut short: exit status 1 and a message;
/// `--json` with `--out -` is a usage error.
fn stdout_reset_or_truncated_exits_non_zero(backend: Option<ringmover::Backend>) {
    // Reset after some bytes.
    let (mut child, addr, stderr) = start_stdout(backend, Stdio::piped(), &[]);
    let mut out = child.stdout.take().unwrap();
    const SENT: usize = 100_000;
    let (arrived, all_arrived) = std::sync::mpsc::channel();
    let reader = thread::spawn(move || {
        let mut v = vec![0u8; SENT];
        let first = out.read_exact(&mut v);
        let _ = arrived.send(());
        if first.is_ok() {
            let _ = out.read_to_end(&mut v);
        }
        v
    });
    let data = pattern(SENT, 79);
    let s = connect(addr);
    let peer = s.local_addr().unwrap();
    (&s).write_all(&data).unwrap();
    all_arrived
        .recv_timeout(PATIENCE)
        .expect("the bytes sent to reach stdout");
    crate::recv::reset(s);
    let status = wait_child(&mut child, "recv --out - after a reset");
    let got = reader.join().unwrap();
    let stderr = stderr.join().unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("ringmover: {peer}: connection reset"))
            && stderr.contains("wrote 100000 bytes to standard output"),
        "{stderr}"
    );
    assert!(got == data, "stdout holds what arrived before the reset");

    // Framed, cut inside a frame.
    let (mut child, addr, stderr) = start_stdout(backend, Stdio::piped(), &[]);
    let mut out = child.stdout.take().unwrap();
    let reader = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let mut wire = ringmover::wire::MAGIC.to_vec();
    wire.extend_from_slice(&ringmover::wire::frame_header(1000));
    wire.extend_from_slice(&[5u8; 300]);
    send_bytes(addr, &wire);
    let status = wait_child(&mut child, "recv --out - after a truncated stream");
    let got = reader.join().unwrap();
    let stderr = stderr.join().unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("stopped early"), "{stderr}");
    assert_eq!(got, vec![5u8; 300]);

    let o = Command::new(BIN)
        .env("RINGMOVER_BACKEND", name(backend))
        .args(["recv", "--listen", "127.0.0.1:0", "--out", "-", "--json"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--json"),
        "{o:?}"
    );
    let o = Command::new(BIN)
        .env("RINGMOVER_BACKEND", name(backend))
        .args(["recv", "--listen", "127.0.0.1:0", "--out", "-", "--direct"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--direct"),
        "{o:?}"
    );
}

/// A reader that stops reading (a stopped pager, a stuck `tar x`): the
/// output pipe fills, and SIGINT still ends `recv --out -` at once with
/// status 130 and the bytes that reached the pipe. It used to block in a
/// splice(2) into the full pipe, deaf to SIGINT for as long as the reader
/// lived. Reproduce: `ringmover recv --out - | sleep 600`, send 50 MB,
/// then `kill -INT` the receiver.
fn stdout_reader_that_stops_reading_does_not_block_sigint(backend: Option<ringmover::Backend>) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    // O_CLOEXEC: no other test's child may inherit an end.
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    // Kept to see, with poll(2), when the pipe is full.
    let probe = write_end.try_clone().unwrap();
    let (mut child, addr, stderr) = start_stdout(backend, Stdio::from(write_end), &[]);
    // However much the pipe holds (splice moves socket pages into its
    // slots by reference, so a few MiB or more): the same MiB again and
    // again until the receiver is gone (then a reset: expected), at most
    // 256 MiB.
    let block = pattern(1 << 20, 81);
    let s = connect(addr);
    let peer = s.local_addr().unwrap();
    let writer = thread::spawn(move || {
        for _ in 0..256 {
            if (&s).write_all(&block).is_err() {
                break;
            }
        }
        s
    });
    wait_until("the output pipe to fill", || {
        let mut fds = [PollFd::new(probe.as_fd(), PollFlags::POLLOUT)];
        poll(&mut fds, PollTimeout::ZERO).unwrap() == 0
    });
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("recv --out - ignored SIGINT for 5 s while its output pipe was full");
        }
        thread::sleep(std::time::Duration::from_millis(10));
    };
    drop(probe);
    let mut got = Vec::new();
    fs::File::from(read_end).read_to_end(&mut got).unwrap();
    let stderr = stderr.join().unwrap();
    drop(writer.join().unwrap());
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "ringmover: {peer}: interrupted by SIGINT; wrote {} bytes to standard output",
            got.len()
        )),
        "{} bytes in the pipe: {stderr}",
        got.len()
    );
    let block = pattern(1 << 20, 81);
    assert!(
        got.chunks(1 << 20).all(|c| c == &block[..c.len()]),
        "the pipe holds the stream's start"
    );
}

/// `recv --out - > /dev/full`: exit status 1, and the message names
/// standard output (it used to say "writing the file").
fn stdout_write_error_names_standard_output(backend: Option<ringmover::Backend>) {
    let full = fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let (mut child, addr, stderr) = start_stdout(backend, Stdio::from(full), &[]);
    let peer = send_bytes(addr, &pattern(10_000, 82));
    let status = wait_child(&mut child, "recv --out - > /dev/full");
    let stderr = stderr.join().unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "ringmover: {peer}: writing standard output: No space left on device"
        )),
        "{stderr}"
    );
}

// ---------------------------------------------------------------- --direct

/// Sizes around the block (4096) and buffer (512 KiB) boundaries.
const DIRECT_SIZES: [usize; 7] = [0, 1, 4095, 4096, 524_288, 524_289, (3 << 20) + 17];

/// Receives DIRECT_SIZES into `out` with `--direct`; checks every file.
fn direct_round(backend: Option<ringmover::Backend>, out: &Path, expect: &str) {
    let server = Server::start(
        name(backend),
        &[
            "--out",
            out.to_str().unwrap(),
            "--direct",
            "--max-conns",
            &DIRECT_SIZES.len().to_string(),
        ],
    );
    let sent: Vec<(SocketAddr, Vec<u8>)> = DIRECT_SIZES
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let data = pattern(n, 200 + i as u64);
            (send_bytes(server.addr, &data), data)
        })
        .collect();
    let done = server.finish();
    assert!(done.status.success(), "{}", done.stderr);
    for (peer, data) in &sent {
        let r = record_for(&done, *peer);
        assert_eq!(r["outcome"], "complete", "{r}");
        assert_eq!(r["direct"], expect, "{r}");
        assert_eq!(r["bytes"], data.len() as u64, "{r}");
        let path = path_of(r);
        assert_eq!(
            size_of(&path),
            data.len() as u64,
            "exact size, no padding: {r}"
        );
        assert!(fs::read(&path).unwrap() == *data, "{r}");
    }
}

/// On the disk (the temp directory here is ext4) and on tmpfs (which
/// accepts O_DIRECT since Linux 6.6).
fn direct_is_byte_exact_on_disk_and_tmpfs(backend: Option<ringmover::Backend>) {
    let dir = scratch("direct");
    let out = dir.join("out");
    fs::create_dir(&out).unwrap();
    direct_round(backend, &out, "direct");
    fs::remove_dir_all(&dir).unwrap();
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        let out = shm.join(format!(
            "ringmover-direct-{}-{}",
            std::process::id(),
            name(backend)
        ));
        let _ = fs::remove_dir_all(&out);
        fs::create_dir(&out).unwrap();
        // Refused or not, every byte must arrive; which one is reported.
        let expect = if opens_direct(&out.join("probe")) {
            "direct"
        } else {
            "refused"
        };
        let _ = fs::remove_file(out.join("probe"));
        direct_round(backend, &out, expect);
        fs::remove_dir_all(&out).unwrap();
    }
}

/// Whether a file can be created with O_DIRECT at `path`.
fn opens_direct(path: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    fs::File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .is_ok()
}

/// The quota under --direct: the .part holds exactly --max-bytes (not a
/// block more, not a block less).
fn direct_quota_keeps_exactly_max_bytes(backend: Option<ringmover::Backend>) {
    const MAX: usize = 1_000_003;
    let max = MAX.to_string();
    let args = ["--direct", "--max-conns", "1", "--max-bytes", &max];
    let (dir, _out, server) = serve_into_dir(backend, "direct-quota", &args);
    let data = pattern(3 << 20, 300);
    let (done, peer) = crate::recv::send_until_refused(server, &data);
    let r = record_for(&done, peer);
    assert_eq!(r["outcome"], "quota", "{r}");
    assert_eq!(r["bytes"], MAX as u64, "{r}");
    let part = path_of(r);
    assert!(part.to_string_lossy().ends_with(".part"), "{r}");
    assert!(fs::read(&part).unwrap() == data[..MAX], "{r}");
    fs::remove_dir_all(&dir).unwrap();
}

/// A file system that refuses O_DIRECT (ramfs, mounted in a private mount
/// namespace: needs root and unshare(1), skipped otherwise): the transfer
/// still completes through the page cache, and stderr and --json say so.
fn direct_refused_falls_back_to_the_page_cache(backend: Option<ringmover::Backend>) {
    let dir = scratch("direct-ramfs");
    let mnt = dir.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let usable = Command::new("unshare")
        .args(["-m", "sh", "-c", "mount -t ramfs ramfs \"$1\"", "sh"])
        .arg(&mnt)
        .output()
        .is_ok_and(|o| o.status.success());
    if !usable {
        eprintln!("skipped: cannot mount ramfs in a mount namespace (needs root and unshare)");
        fs::remove_dir_all(&dir).unwrap();
        return;
    }
    // recv runs inside the namespace; after it exits, the shell checks the
    // file there and prints its size and SHA-256 on stderr.
    let script = r#"mount -t ramfs ramfs "$1" || exit 99
"$2" recv --listen 127.0.0.1:0 --json --direct --out "$1/f"; st=$?
echo "size $(wc -c < "$1/f") sha $(sha256sum < "$1/f" | cut -d' ' -f1)" >&2
exit $st"#;
    let mut cmd = Command::new("unshare");
    cmd.env("RINGMOVER_BACKEND", name(backend))
        .args(["-m", "sh", "-c", script, "sh"])
        .arg(&mnt)
        .arg(BIN)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let server = Server::spawn(cmd);
    let data = pattern(700_001, 400);
    let src = dir.join("src");
    fs::write(&src, &data).unwrap();
    let want = crate::recv::sha256_file(&src);
    let peer = send_bytes(server.addr, &data);
    let done = server.finish();
    assert!(done.status.success(), "{}", done.stderr);
    let r = record_for(&done, peer);
    assert_eq!(r["outcome"], "complete", "{r}");
    assert_eq!(r["direct"], "refused", "{r}");
    assert!(
        done.stderr.contains("O_DIRECT refused") && done.stderr.contains("page cache"),
        "{}",
        done.stderr
    );
    assert!(
        done.stderr
            .contains(&format!("size {} sha {want}", data.len())),
        "{}",
        done.stderr
    );
    fs::remove_dir_all(&dir).unwrap();
}

/// RLIMIT_FSIZE at an unaligned size under --direct: the write that
/// crosses it fails (EFBIG) while others may be in flight; the connection
/// is a write error and the .part holds exactly the bytes before the limit.
fn direct_write_error_keeps_exactly_what_was_written(backend: Option<ringmover::Backend>) {
    crate::recv::fsize_limit_is_a_write_error(backend, (1 << 20) + 1000, &["--direct"]);
}
