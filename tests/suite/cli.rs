//! The command line itself: help, completions, the man page, size units,
//! progress on a terminal and on a pipe.

use std::fs;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use crate::recv::{output_within, pattern, wait_child, Server};
use crate::util::{ringmover, scratch, stderr, stdout};

/// `ringmover ARGS`, bounded by a minute (a hang bound, not a speed check).
fn run(args: &[&str]) -> std::process::Output {
    output_within(
        ringmover().args(args).stdin(Stdio::null()),
        &format!("ringmover {}", args.join(" ")),
    )
}

#[test]
fn every_command_has_examples_and_exit_status_in_help() {
    for cmd in [
        &["--help"][..],
        &["probe", "--help"],
        &["recv", "--help"],
        &["send", "--help"],
        &["completions", "--help"],
        #[cfg(target_os = "linux")]
        &["bench", "--help"],
        #[cfg(target_os = "linux")]
        &["bench", "recv", "--help"],
        #[cfg(target_os = "linux")]
        &["bench", "gather", "--help"],
        #[cfg(target_os = "linux")]
        &["bench", "zerocopy", "--help"],
        #[cfg(target_os = "linux")]
        &["bench", "fanout", "--help"],
    ] {
        let o = run(cmd);
        assert!(o.status.success(), "{cmd:?}: {o:?}");
        let text = stdout(&o);
        assert!(text.contains("Examples:"), "{cmd:?}:\n{text}");
        assert!(text.contains("Exit status"), "{cmd:?}:\n{text}");
    }
    // Sizes say which suffix means what.
    let text = stdout(&run(&["recv", "--help"]));
    assert!(text.contains("KB, MB, GB"), "{text}");
    assert!(text.contains("powers of 1000"), "{text}");
}

#[test]
fn completions_for_every_shell() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef ringmover"),
        ("fish", "complete -c ringmover"),
        ("elvish", "ringmover"),
        ("powershell", "ringmover"),
    ] {
        let o = run(&["completions", shell]);
        assert!(o.status.success(), "{shell}: {o:?}");
        let text = stdout(&o);
        assert!(text.contains(marker), "{shell}:\n{text}");
        // Subcommands and their options are completed.
        assert!(
            text.contains("recv") && text.contains("max-bytes"),
            "{shell}"
        );
    }
    let o = run(&["completions", "tcsh"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(stderr(&o).contains("tcsh"), "{}", stderr(&o));
}

/// The bash script is valid bash: sourcing it defines the function.
#[test]
fn bash_completion_sources() {
    let o = run(&["completions", "bash"]);
    let dir = scratch("bash-completion");
    let script = dir.join("ringmover.bash");
    fs::write(&script, &o.stdout).unwrap();
    let check = output_within(
        Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source {} && complete -p ringmover",
                script.display()
            ))
            .stdin(Stdio::null()),
        "bash sourcing the completion script",
    );
    assert!(check.status.success(), "{check:?}");
    assert!(stdout(&check).contains("ringmover"), "{check:?}");
}

#[test]
fn man_page_covers_every_command() {
    let o = run(&["man"]);
    assert!(o.status.success(), "{o:?}");
    let text = stdout(&o);
    for page in [
        "ringmover",
        "ringmover-probe",
        "ringmover-recv",
        "ringmover-send",
    ] {
        assert!(text.contains(&format!(".TH {page} 1")), "{page}:\n{text}");
    }
    assert!(text.contains("Exit status"), "{text}");
    // Hidden: not offered in the help or completions.
    assert!(!stdout(&run(&["--help"])).contains("man "));
}

/// `--max-bytes 1KB` is 1000 bytes, `1KiB` (and `1K`) 1024.
#[test]
fn size_suffixes_mean_what_they_say() {
    for (size, quota) in [("1KB", 1000u64), ("1KiB", 1024), ("1k", 1024)] {
        let dir = scratch("sizes");
        let out = dir.join("got");
        let server = Server::start(
            "auto",
            &["--out", out.to_str().unwrap(), "--max-bytes", size],
        );
        let data = pattern(1024, 5);
        let o = output_within(
            ringmover()
                .args(["send", "-", "--raw", "--to", &server.addr.to_string()])
                .stdin({
                    let p = dir.join("in");
                    fs::write(&p, &data).unwrap();
                    fs::File::open(p).unwrap()
                }),
            "ringmover send of 1024 bytes",
        );
        let done = server.finish();
        let r = &done.records[0];
        if quota < 1024 {
            assert_eq!(r["outcome"], "quota", "{size}: {r}");
            assert_eq!(r["bytes"], quota, "{size}: {r}");
            assert!(!o.status.success(), "{size}: {o:?}");
        } else {
            assert_eq!(r["outcome"], "complete", "{size}: {r}");
            assert_eq!(fs::read(&out).unwrap(), data, "{size}");
            assert!(o.status.success(), "{size}: {o:?}");
        }
    }
    let o = run(&["recv", "--out", "/nonexistent/", "--max-bytes", "5XB"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        stderr(&o).contains("--max-bytes") && stderr(&o).contains("5XB"),
        "{}",
        stderr(&o)
    );
}

/// On a pipe: nothing without `--progress`; with it, a plain line each
/// second and a final line.
#[test]
fn progress_on_a_pipe_only_when_asked() {
    let dir = scratch("progress-pipe");
    let src = dir.join("src.bin");
    fs::write(&src, pattern(3 << 20, 9)).unwrap();
    for asked in [false, true] {
        let out = dir.join(format!("got-{asked}"));
        let mut args = vec!["--out", out.to_str().unwrap()];
        if asked {
            args.push("--progress");
        }
        let server = Server::start("auto", &args);
        let mut cmd = ringmover();
        // Raw: recv then counts exactly the file's bytes.
        cmd.args(["send", src.to_str().unwrap(), "--raw", "--to"])
            .arg(server.addr.to_string());
        if asked {
            cmd.arg("--progress");
        }
        let o = output_within(&mut cmd, "ringmover send of 3 MiB");
        let done = server.finish();
        assert!(o.status.success(), "{o:?}");
        assert!(done.status.success(), "{done:?}");
        let (send_err, recv_err) = (stderr(&o), done.stderr);
        if asked {
            assert!(send_err.contains(": sent 3 MiB in "), "{send_err}");
            assert!(
                recv_err.contains("received 3 MiB in 1 connection(s), 0 failed"),
                "{recv_err}"
            );
        } else {
            assert_eq!(send_err, "", "nothing on a pipe unless asked");
            // Only the address (read by Server) and the backend.
            assert_eq!(recv_err.lines().count(), 1, "{recv_err}");
        }
        assert!(!send_err.contains('\r'), "no redrawing on a pipe");
    }

    // A line a second while the bytes flow (stdin: no size, no ETA).
    let server = Server::start("auto", &["--out", dir.join("slow").to_str().unwrap()]);
    let mut child = ringmover()
        .args(["send", "-", "--progress", "--to"])
        .arg(server.addr.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&pattern(1 << 20, 10)).unwrap();
    // The pause is the scenario: progress lines come once a second.
    thread::sleep(Duration::from_millis(1300));
    stdin.write_all(&pattern(1 << 20, 11)).unwrap();
    drop(stdin);
    let status = wait_child(&mut child, "ringmover send - --progress");
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{status}: {err}");
    assert!(server.finish().status.success());
    let line = err
        .lines()
        .find(|l| l.contains(" at ") && l.contains("/s"))
        .unwrap_or_else(|| panic!("no progress line in {err:?}"));
    assert!(!line.contains("ETA"), "no size, no ETA: {line}");
    assert!(err.contains("sent 2 MiB in"), "{err}");
}

/// On a terminal: one line redrawn in place (carriage return, erase line)
/// with percentage and ETA, then a clean final line.
#[test]
#[cfg(target_os = "linux")]
fn progress_on_a_terminal_is_one_line_redrawn() {
    let (master, slave) = pty();
    let dir = scratch("progress-tty");
    let src = dir.join("src.bin");
    fs::write(&src, pattern(64 << 20, 12)).unwrap();
    let server = Server::start("auto", &["--out", dir.join("got").to_str().unwrap()]);
    let reader = thread::spawn(move || {
        let mut master = master;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO once the last holder of the terminal's other end exits.
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&seen).into_owned()
    });
    let mut child = ringmover()
        .args(["send", src.to_str().unwrap(), "--to"])
        .arg(server.addr.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(slave)
        .spawn()
        .unwrap();
    let status = wait_child(&mut child, "ringmover send on a terminal");
    drop(child);
    let text = reader.join().unwrap();
    assert!(status.success(), "{status}: {text:?}");
    assert!(server.finish().status.success());
    assert!(
        text.contains("\r\x1b[2K") || text.contains("\x1b[2K"),
        "redrawn in place: {text:?}"
    );
    assert!(text.contains("% ") && text.contains("ETA"), "{text:?}");
    let last = text.rsplit("\x1b[2K").next().unwrap_or_default();
    assert!(
        last.contains("sent 64 MiB in "),
        "clean final line: {text:?}"
    );
}

/// A pseudo-terminal (80x24): the master end, and the other end as a
/// child's stdio.
#[cfg(target_os = "linux")]
fn pty() -> (fs::File, Stdio) {
    use std::os::fd::FromRawFd;
    // SAFETY: plain libc calls on a descriptor we own; every result is
    // checked; ptsname_r writes at most `buf.len()` bytes.
    unsafe {
        let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        assert!(fd >= 0, "posix_openpt: {}", std::io::Error::last_os_error());
        let master = fs::File::from_raw_fd(fd);
        assert_eq!(libc::grantpt(fd), 0, "grantpt");
        assert_eq!(libc::unlockpt(fd), 0, "unlockpt");
        let ws = libc::winsize {
            ws_row: 24,
            ws_col: 80,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        assert_eq!(libc::ioctl(fd, libc::TIOCSWINSZ, &ws), 0, "TIOCSWINSZ");
        let mut buf = [0 as libc::c_char; 128];
        assert_eq!(
            libc::ptsname_r(fd, buf.as_mut_ptr(), buf.len()),
            0,
            "ptsname_r"
        );
        let name = std::ffi::CStr::from_ptr(buf.as_ptr())
            .to_string_lossy()
            .into_owned();
        let slave = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&name)
            .unwrap_or_else(|e| panic!("opening {name}: {e}"));
        (master, Stdio::from(slave))
    }
}

#[cfg(target_os = "linux")]
use std::os::unix::fs::OpenOptionsExt;

/// Output that cannot be written (stdout on /dev/full) is an error that
/// names standard output, from every command that prints a report. It
/// used to be a bare "No space left on device" from `completions` and
/// `man`.
#[test]
#[cfg(target_os = "linux")]
fn unwritable_stdout_is_named() {
    for args in [
        &["completions", "bash"][..],
        &["man"],
        &["probe"],
        &["probe", "--json"],
    ] {
        let full = fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let o = ringmover()
            .args(args)
            .stdin(Stdio::null())
            .stdout(full)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("ringmover: writing to stdout: No space left on device"),
            "{args:?}: {err}"
        );
    }
}
