//! A seccomp filter that makes a child look like a container whose policy
//! denies io_uring (Linux only, like seccomp and io_uring).

use std::os::unix::process::CommandExt;
use std::process::Command;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

/// `BPF_LD | BPF_W | BPF_ABS` (BPF_LD and BPF_W are 0).
const BPF_LD_W_ABS: u16 = 0x20;
/// `BPF_JMP | BPF_JEQ | BPF_K` (BPF_K is 0).
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
/// `BPF_RET | BPF_K`.
const BPF_RET_K: u16 = 0x06;
/// `offsetof(struct seccomp_data, nr)` and `arch`.
const NR_OFFSET: u32 = 0;
const ARCH_OFFSET: u32 = 4;

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jeq(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
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

/// Installs the io_uring-denying filter in the current thread.
/// Called in a freshly forked child (`pre_exec`) or in a child process.
pub fn install_io_uring_filter(errno: i32) -> std::io::Result<()> {
    let filter = io_uring_filter(errno);
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
    // SAFETY: the closure runs between fork and exec; it only builds a small
    // Vec (the child is single-threaded then) and calls prctl.
    unsafe { cmd.pre_exec(move || install_io_uring_filter(errno)) }
}
