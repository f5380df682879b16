//! `ringmover probe`: the report matches the kernel, and it works and says
//! why where io_uring is forbidden (Linux) or absent (other Unix).

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

#[cfg(target_os = "linux")]
use crate::seccomp::deny_io_uring;
use crate::util::{output_within, ringmover, stderr, stdout, wait_within};

/// A probe takes milliseconds; a minute only bounds a hang.
const HANG: Duration = Duration::from_secs(60);

/// Runs `ringmover probe …` to completion, bounded by [`HANG`].
fn run(cmd: &mut Command) -> Output {
    output_within(cmd, HANG, "ringmover probe")
}

fn probe_json(cmd: &mut Command) -> Value {
    let out = run(cmd.args(["probe", "--json"]));
    assert!(
        out.status.success(),
        "probe --json failed: {}",
        stderr(&out)
    );
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 1, "one line: {text}");
    let v: Value = serde_json::from_str(&text).expect("probe --json prints JSON");
    assert_eq!(v["type"], "probe", "{v}");
    v
}

/// What `IORING_REGISTER_PROBE` says, asked through the io-uring crate: an
/// implementation independent of ours.
#[cfg(target_os = "linux")]
fn kernel_opcodes() -> Vec<u64> {
    let ring = io_uring::IoUring::new(2).expect("io_uring must work on the test host");
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .expect("IORING_REGISTER_PROBE");
    (0..=255u8)
        .filter(|&op| probe.is_supported(op))
        .map(u64::from)
        .collect()
}

#[test]
#[cfg(target_os = "linux")]
fn opcodes_equal_register_probe() {
    let v = probe_json(&mut ringmover());
    assert_eq!(v["schema"], "ringmover.probe/1");
    assert_eq!(v["io_uring"]["available"], true);
    let ours: Vec<u64> = v["io_uring"]["opcodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["code"].as_u64().unwrap())
        .collect();
    assert_eq!(ours, kernel_opcodes());
    assert_eq!(v["io_uring"]["opcodes"][2]["name"], "writev");
    assert_eq!(v["backend"]["selected"], "uring");
    assert_eq!(v["backend"]["forced"], false);
    let flags = v["io_uring"]["setup_flags"].as_array().unwrap();
    assert!(flags.iter().any(|f| f["name"] == "SQPOLL"), "{flags:?}");
    assert!(v["io_uring"]["features"]
        .as_array()
        .unwrap()
        .contains(&Value::from("NODROP")));
}

/// The probe's registered-files answer is what a ring of the io-uring
/// crate gets from the same kernel.
#[test]
#[cfg(target_os = "linux")]
fn registered_files_equal_a_sparse_registration() {
    let v = probe_json(&mut ringmover());
    let ring = io_uring::IoUring::new(2).expect("a ring");
    let kernel = ring.submitter().register_files_sparse(1);
    let ours = &v["io_uring"]["registered_files"];
    assert_eq!(ours["supported"], kernel.is_ok(), "{ours}");
    assert_eq!(
        ours["errno"].as_i64(),
        kernel.err().and_then(|e| e.raw_os_error()).map(i64::from),
        "{ours}"
    );
}

#[test]
#[cfg(target_os = "linux")]
fn text_report_names_things() {
    let out = run(ringmover().arg("probe"));
    assert!(out.status.success());
    let text = stdout(&out);
    for needle in [
        "kernel",
        "opcodes",
        "send_zc",
        "setup flags",
        "registered files",
        "RLIMIT_MEMLOCK",
        "pipe-max-size",
        "backend              uring",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}

#[test]
#[cfg(target_os = "linux")]
fn require_known_supported_ops_exits_0() {
    let kernel = kernel_opcodes();
    let out = run(ringmover().args(["probe", "--require", "SEND_ZC,splice"]));
    let expect_ok = kernel.contains(&47) && kernel.contains(&30);
    assert_eq!(out.status.success(), expect_ok, "{}", stderr(&out));
}

#[test]
fn require_unknown_name_exits_2() {
    let out = run(ringmover().args(["probe", "--require", "splice,frobnicate"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("frobnicate"), "{}", stderr(&out));
}

/// `--require "$OPS"` with OPS empty (or only commas) is a bad command
/// line, not a check that passed: it used to print `supported: ` and exit 0.
#[test]
fn require_with_no_opcode_exits_2() {
    for list in ["", ",", " , "] {
        let out = run(ringmover().args(["probe", "--require", list]));
        assert_eq!(out.status.code(), Some(2), "{list:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("names no opcode"), "{}", stderr(&out));
        assert_eq!(stdout(&out), "", "{list:?}");
    }
}

#[test]
fn require_missing_op_exits_1_naming_it() {
    let out = run(ringmover().args(["probe", "--require", "op250,writev"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("op250"), "{}", stderr(&out));
    // Only a Linux ring has writev; elsewhere every opcode is missing.
    let has_ring = cfg!(target_os = "linux");
    assert_eq!(
        stderr(&out).contains("writev"),
        !has_ring,
        "{}",
        stderr(&out)
    );
}

/// `--require --json`: one `probe-require` line naming what is missing.
#[test]
fn require_json_is_one_typed_line() {
    let out = run(ringmover().args(["probe", "--require", "op250,writev", "--json"]));
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 1, "{text}");
    let v: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(v["type"], "probe-require", "{v}");
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["required"], serde_json::json!(["op250", "writev"]), "{v}");
    assert!(v["missing"]
        .as_array()
        .unwrap()
        .contains(&Value::from("op250")));
}

#[test]
#[cfg(target_os = "linux")]
fn seccomp_eperm_selects_epoll_and_says_why() {
    let v = probe_json(deny_io_uring(&mut ringmover(), libc::EPERM));
    assert_eq!(v["io_uring"]["available"], false);
    assert_eq!(v["io_uring"]["error"]["errno"], libc::EPERM);
    assert_eq!(v["io_uring"]["error"]["cause"], "seccomp");
    assert_eq!(v["backend"]["selected"], "epoll");
    let reason = v["backend"]["reason"].as_str().unwrap();
    assert!(reason.contains("seccomp"), "{reason}");

    let out = run(deny_io_uring(&mut ringmover(), libc::EPERM).arg("probe"));
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(
        text.contains("unavailable: EPERM: forbidden by a seccomp filter"),
        "{text}"
    );
    assert!(text.contains("backend              epoll"), "{text}");
}

#[test]
#[cfg(target_os = "linux")]
fn seccomp_enosys_selects_epoll_and_says_why() {
    let v = probe_json(deny_io_uring(&mut ringmover(), libc::ENOSYS));
    assert_eq!(v["io_uring"]["available"], false);
    assert_eq!(v["io_uring"]["error"]["errno"], libc::ENOSYS);
    assert_eq!(v["io_uring"]["error"]["cause"], "enosys");
    let why = v["io_uring"]["error"]["explanation"].as_str().unwrap();
    // This kernel has the io_uring sysctls, so a filter is the likely cause.
    assert!(why.contains("seccomp filter"), "{why}");
    assert_eq!(v["backend"]["selected"], "epoll");
}

#[test]
#[cfg(target_os = "linux")]
fn require_under_seccomp_exits_1_and_says_why() {
    let out =
        run(deny_io_uring(&mut ringmover(), libc::EPERM).args(["probe", "--require", "splice"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("io_uring unavailable"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn forced_backends_are_reported() {
    for b in ringmover::Backend::compiled() {
        let v = probe_json(ringmover().env("RINGMOVER_BACKEND", b.name()));
        assert_eq!(v["backend"]["selected"], b.name());
        assert_eq!(v["backend"]["forced"], true);
    }
}

/// Off Linux: no io_uring, and why; poll is the backend; forcing a Linux
/// backend is an error naming it.
#[test]
#[cfg(not(target_os = "linux"))]
fn elsewhere_io_uring_is_absent_and_poll_is_selected() {
    let v = probe_json(&mut ringmover());
    assert_eq!(v["io_uring"]["available"], false);
    assert_eq!(v["io_uring"]["error"]["cause"], "not-linux");
    assert_eq!(v["backend"]["selected"], "poll");
    assert_eq!(v["backend"]["forced"], false);

    let out = run(ringmover().arg("probe"));
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("io_uring             unavailable: not Linux"),
        "{text}"
    );
    assert!(text.contains("backend              poll"), "{text}");

    for b in ["uring", "epoll"] {
        let out = run(ringmover().env("RINGMOVER_BACKEND", b).arg("probe"));
        assert_eq!(out.status.code(), Some(1));
        let want = format!("the {b} backend exists only on Linux");
        assert!(stdout(&out).contains(&want), "{}", stdout(&out));
    }
}

#[test]
#[cfg(target_os = "linux")]
fn forcing_uring_where_it_cannot_work_is_an_error() {
    let out = run(deny_io_uring(&mut ringmover(), libc::EPERM)
        .env("RINGMOVER_BACKEND", "uring")
        .arg("probe"));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("error: RINGMOVER_BACKEND=uring but io_uring is unavailable"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn unknown_backend_name_is_an_error() {
    let out = run(ringmover().env("RINGMOVER_BACKEND", "kqueue").arg("probe"));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("unknown backend \"kqueue\""),
        "{}",
        stdout(&out)
    );
}

#[test]
fn closed_stdout_is_not_an_error() {
    use std::process::Stdio;
    let mut child = ringmover()
        .arg("probe")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = wait_within(child, HANG, "ringmover probe with stdout closed");
    assert!(out.status.success(), "{}", stderr(&out));
}
