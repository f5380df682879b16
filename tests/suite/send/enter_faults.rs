//! Real `io_uring_enter` failures, on demand, for the engine's error paths.
//!
//! A seccomp filter on the calling thread hands every `io_uring_enter` to a
//! supervisor thread (`SECCOMP_RET_USER_NOTIF`, Linux 5.0), which lets the
//! call run (`SECCOMP_USER_NOTIF_FLAG_CONTINUE`, 5.5) or makes the kernel
//! fail it with the errno the test chose. ringmover itself is unchanged:
//! the kernel refuses the call exactly as it would for a real cause (EEXIST
//! from a second issuer, EINTR from a signal, EBUSY from a backed-up CQ).
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The arguments of one `io_uring_enter(fd, to_submit, min_complete, flags, ..)`.
#[derive(Debug, Clone, Copy)]
pub struct Enter {
    pub to_submit: u32,
    pub min_complete: u32,
}

impl Enter {
    /// A pure submission (what the engine makes when the SQ ring is full).
    pub fn submits_only(&self) -> bool {
        self.to_submit > 0 && self.min_complete == 0
    }
}

#[derive(Debug)]
struct Rule {
    errno: i32,
    left: usize,
    which: fn(&Enter) -> bool,
}

/// The fault plan shared with the supervisor.
#[derive(Debug, Clone)]
pub struct EnterFaults {
    rule: Arc<Mutex<Option<Rule>>>,
    failed: Arc<AtomicUsize>,
}

impl EnterFaults {
    /// Fails the next `count` enters that `which` selects with `errno`.
    pub fn fail_next(&self, errno: i32, count: usize, which: fn(&Enter) -> bool) {
        *self.rule.lock().unwrap() = Some(Rule {
            errno,
            left: count,
            which,
        });
    }

    /// Lets every enter run from now on.
    pub fn clear(&self) {
        *self.rule.lock().unwrap() = None;
    }

    /// Enters failed so far.
    pub fn failed(&self) -> usize {
        self.failed.load(Ordering::SeqCst)
    }

    fn decide(&self, enter: &Enter) -> Option<i32> {
        let mut rule = self.rule.lock().unwrap();
        let r = rule.as_mut()?;
        if r.left == 0 || !(r.which)(enter) {
            return None;
        }
        r.left -= 1;
        self.failed.fetch_add(1, Ordering::SeqCst);
        Some(r.errno)
    }
}

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

/// Installs the filter on the calling thread, for the rest of its life (so
/// call it on a thread the test made for this), and starts the supervisor,
/// which ends when that thread does. Needs root or no_new_privs (set here).
pub fn install() -> EnterFaults {
    let op = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    // BPF_LD|BPF_W|BPF_ABS = 0x20, BPF_JMP|BPF_JEQ|BPF_K = 0x15, BPF_RET|BPF_K = 0x06;
    // seccomp_data: nr at offset 0, arch at 4.
    let filter = [
        op(0x20, 0, 0, 4),
        op(0x15, 1, 0, AUDIT_ARCH),
        op(0x06, 0, 0, libc::SECCOMP_RET_ALLOW),
        op(0x20, 0, 0, 0),
        op(0x15, 0, 1, libc::SYS_io_uring_enter as u32),
        op(0x06, 0, 0, libc::SECCOMP_RET_USER_NOTIF),
        op(0x06, 0, 0, libc::SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prctl and seccomp(2) with a program that outlives the call
    // (the kernel copies it); the new listener fd is owned at once.
    let listener = unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        let fd = libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
            &prog as *const libc::sock_fprog,
        );
        assert!(
            fd >= 0,
            "installing the seccomp user-notification filter: {}",
            std::io::Error::last_os_error()
        );
        OwnedFd::from_raw_fd(fd as i32)
    };
    let faults = EnterFaults {
        rule: Arc::new(Mutex::new(None)),
        failed: Arc::new(AtomicUsize::new(0)),
    };
    let plan = faults.clone();
    std::thread::spawn(move || supervise(listener, plan));
    faults
}

/// Answers each notification until the filtered thread is gone (POLLHUP).
fn supervise(listener: OwnedFd, plan: EnterFaults) {
    loop {
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        if unsafe { libc::poll(&mut pfd, 1, -1) } < 0 {
            continue;
        }
        if pfd.revents & libc::POLLIN == 0 {
            return;
        }
        // SAFETY: all-zero is a valid seccomp_notif, which RECV requires.
        let mut notif: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        // SAFETY: the ioctl writes one seccomp_notif into `notif`.
        if unsafe {
            libc::ioctl(
                listener.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_RECV,
                &mut notif,
            )
        } != 0
        {
            continue;
        }
        let enter = Enter {
            to_submit: notif.data.args[1] as u32,
            min_complete: notif.data.args[2] as u32,
        };
        let mut resp = libc::seccomp_notif_resp {
            id: notif.id,
            val: 0,
            error: 0,
            flags: 0,
        };
        match plan.decide(&enter) {
            Some(errno) => resp.error = -errno,
            None => resp.flags = libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32,
        }
        // SAFETY: the ioctl reads one seccomp_notif_resp. It fails only if
        // the call was interrupted meanwhile; the thread then retries it.
        unsafe {
            libc::ioctl(
                listener.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_SEND,
                &mut resp,
            )
        };
    }
}
