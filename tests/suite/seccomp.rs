//! A seccomp filter that makes a child look like a container whose policy
//! denies io_uring (Linux only, like seccomp and io_uring).

use std::os::unix::process::CommandExt;
use std::process::Command;

#[cfg(target_arch = "x86_64")]
pub(crate) const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
pub(crate) const AUDIT_ARCH: u32 = 0xC000_00B7;

/// `BPF_LD | BPF_W | BPF_ABS` (BPF_LD and BPF_W are 0).
pub(crate) const BPF_LD_W_ABS: u16 = 0x20;
/// `BPF_JMP | BPF_JEQ | BPF_K` (BPF_K is 0).
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
/// `BPF_RET | BPF_K`.
pub(crate) const BPF_RET_K: u16 = 0x06;
/// `offsetof(struct seccomp_data, nr)` and `arch`.
pub(crate) const NR_OFFSET: u32 = 0;
pub(crate) const ARCH_OFFSET: u32 = 4;
/// `offsetof(struct seccomp_data, args[1])`'s low word (little-endian).
pub(crate) const ARG1_OFFSET: u32 = 24;

pub(crate) fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

pub(crate) fn jeq(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: BPF_JMP_JEQ_K,
        jt,
        jf,
        k,
    }
}

/// A filter answering `errno` to io_uring_setup, io_uring_enter and
/// io_uring_register, as Docker's default profile does with EPERM.
fn io_uring_filter(errno: i32) -> Vec<libc::sock_filter> {
    let deny = libc::SECCOMP_RET_ERRNO | (errno as u32 & libc::SECCOMP_RET_DATA);
    vec![
        stmt(BPF_LD_W_ABS, ARCH_OFFSET),
        jeq(AUDIT_ARCH, 1, 0),
        stmt(BPF_RET_K, libc::SECCOMP_RET_ALLOW),
        stmt(BPF_LD_W_ABS, NR_OFFSET),
        jeq(libc::SYS_io_uring_setup as u32, 3, 0),
        jeq(libc::SYS_io_uring_enter as u32, 2, 0),
        jeq(libc::SYS_io_uring_register as u32, 1, 0),
        stmt(BPF_RET_K, libc::SECCOMP_RET_ALLOW),
        stmt(BPF_RET_K, deny),
    ]
}

/// Installs `filter` on the calling thread (and the threads it starts).
/// Allocates nothing, so it is safe between fork and exec.
pub(crate) fn install(filter: &[libc::sock_filter]) -> std::io::Result<()> {
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: plain prctl calls; `prog` points at `filter`, which outlives
    // the call; the kernel copies the program.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &prog as *const libc::sock_fprog,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Makes `cmd`'s child fail io_uring syscalls with `errno`.
pub fn deny_io_uring(cmd: &mut Command, errno: i32) -> &mut Command {
    // Built here, in the parent: the child only makes two prctl calls.
    let filter = io_uring_filter(errno);
    // SAFETY: the closure runs between fork and exec and allocates nothing
    // (a multi-threaded parent may have held the allocator's lock at fork).
    unsafe { cmd.pre_exec(move || install(&filter)) }
}

/// Set in a child that `run_where_io_uring_is_denied` started: the errno
/// name its filter answers io_uring with.
const DENIED_ENV: &str = "RINGMOVER_TEST_IO_URING_DENIED";

fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::EPERM => "EPERM",
        libc::ENOSYS => "ENOSYS",
        _ => panic!("no filter test uses errno {errno}"),
    }
}

/// In a child under the filter: checks that io_uring really is denied with
/// the errno the parent asked for and that `auto` selects epoll for that
/// reason, so the suite test that follows runs on the fallback.
fn assert_auto_falls_back(errno_name_: &str) {
    use ringmover::{Backend, BackendChoice, RingSupport, Selection};
    let (errno, cause) = match errno_name_ {
        "EPERM" => (libc::EPERM, "seccomp"),
        "ENOSYS" => (libc::ENOSYS, "enosys"),
        other => panic!("{DENIED_ENV}={other}: expected EPERM or ENOSYS"),
    };
    let RingSupport::Unavailable(why) = RingSupport::detect() else {
        panic!("{DENIED_ENV}={errno_name_} but io_uring works: no filter is installed");
    };
    assert_eq!(why.errno(), Some(errno), "{why}");
    assert_eq!(why.code(), cause, "{why}");
    let s = Selection::choose(BackendChoice::Auto).unwrap();
    assert_eq!(s.backend, Backend::Epoll, "{}", s.reason);
    assert!(!s.forced);
    assert_eq!(s.uring_unavailable.as_ref(), Some(why));
}

/// The body of each `auto_seccomp` test (see `for_each_backend!`): in the
/// test process, re-runs this one test in a child whose seccomp filter makes
/// io_uring fail with EPERM (Docker's default profile), and requires that it
/// ran and passed; in that child, checks the fallback and runs `body`.
pub fn run_where_io_uring_is_denied(module: &str, test: &str, body: impl FnOnce()) {
    if let Ok(name) = std::env::var(DENIED_ENV) {
        assert_auto_falls_back(&name);
        body();
        return;
    }
    // libtest names tests by their path below the crate.
    let module = module.split_once("::").map_or(module, |(_, rest)| rest);
    let name = format!("{module}::{test}");
    let out = rerun(&[&name, "--exact"], libc::EPERM);
    let listed = listed(&[&name, "--exact"]);
    assert_eq!(listed, 1, "{name} is not one test");
    assert_passed(&out, 1, &name);
}

/// Runs this test binary with `args` in a child whose filter answers
/// io_uring with `errno`, bounded generously (a hang, not a speed, bound).
fn rerun(args: &[&str], errno: i32) -> std::process::Output {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(args)
        .arg("--test-threads=2")
        .env(DENIED_ENV, errno_name(errno))
        .env_remove("RINGMOVER_BACKEND");
    deny_io_uring(&mut cmd, errno);
    crate::util::output_within(
        &mut cmd,
        std::time::Duration::from_secs(300),
        &format!(
            "{args:?} under a filter answering io_uring with {}",
            errno_name(errno)
        ),
    )
}

/// How many tests this binary has for `args` (filters).
fn listed(args: &[&str]) -> usize {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(args)
        .arg("--list")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.ends_with(": test"))
        .count()
}

/// `out` is a passing libtest run of exactly `n` tests: none filtered away
/// or ignored unnoticed.
fn assert_passed(out: &std::process::Output, n: usize, what: &str) {
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{what}: {}\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!("test result: ok. {n} passed; 0 failed; 0 ignored")),
        "{what}: expected {n} tests to pass\n{text}"
    );
}

/// The library suites' `auto` tests again under a filter answering ENOSYS
/// (what some container profiles and pre-5.1 kernels give): `auto` must
/// select epoll, classify the cause as `enosys`, and pass every test.
#[test]
fn library_suites_pass_on_epoll_when_io_uring_is_enosys() {
    let filters = ["send::auto_seccomp::", "zerocopy::auto_seccomp::"];
    let n = listed(&filters);
    assert!(n >= 10, "only {n} auto_seccomp tests in {filters:?}");
    let out = rerun(&filters, libc::ENOSYS);
    assert_passed(&out, n, &format!("{filters:?} under ENOSYS"));
}
