//! Shared test support: running the real binary.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// A fresh scratch directory, removed when dropped: also when the test
/// fails (a panic unwinds through it). Derefs to its path.
#[derive(Debug)]
pub struct Scratch(tempfile::TempDir);

/// Creates a [`Scratch`] named after `name` (for someone looking in /tmp
/// while a test runs).
pub fn scratch(name: &str) -> Scratch {
    tempfile::Builder::new()
        .prefix(&format!("ringmover-suite-{name}-"))
        .tempdir()
        .map(Scratch)
        .expect("creating a scratch directory")
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        self.0.path()
    }
}

impl AsRef<std::ffi::OsStr> for Scratch {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.path().as_os_str()
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        self.0.path()
    }
}

/// The built `ringmover` binary, with `RINGMOVER_BACKEND` cleared so each
/// test states the backend it wants.
pub fn ringmover() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringmover"));
    cmd.env_remove("RINGMOVER_BACKEND");
    cmd
}

/// Runs `cmd` to completion and returns its output.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("spawning ringmover")
}

/// `stdout` as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `stderr` as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A `--json` run's rows, one per stdout line, after checking it
/// succeeded (failing with its stderr otherwise).
pub fn json_rows(o: &Output) -> Vec<serde_json::Value> {
    assert!(o.status.success(), "{}", stderr(o));
    stdout(o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Runs `cmd` to completion, its output captured, killing it and failing
/// the test if it takes longer than `limit` (a hang bound, not a speed
/// check): `what` names what was waited for.
pub fn output_within(cmd: &mut Command, limit: std::time::Duration, what: &str) -> Output {
    use std::process::Stdio;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {what}: {e}"));
    wait_within(child, limit, what)
}

/// Waits for `child`, collecting what is left of its piped stdout and
/// stderr, killing it and failing the test after `limit` (see
/// [`output_within`]).
pub fn wait_within(
    mut child: std::process::Child,
    limit: std::time::Duration,
    what: &str,
) -> Output {
    use std::io::Read;
    // Drained on threads so a chatty child never blocks on a full pipe.
    fn drain(r: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut v);
            }
            v
        })
    }
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = String::from_utf8_lossy(&err.join().unwrap()).into_owned();
            panic!("{what}: still running after {limit:?}, killed\n{stderr}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// Closes `s` with a reset: SO_LINGER 0, then close (RST, not FIN).
pub fn reset(s: std::net::TcpStream) {
    nix::sys::socket::setsockopt(
        &s,
        nix::sys::socket::sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )
    .expect("setting SO_LINGER 0");
    drop(s);
}
