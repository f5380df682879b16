//! The syscall layer: thin, documented wrappers that turn `-1` into
//! [`io::Error`] and retry `EINTR` in one place.
//!
//! Everything that talks to the kernel directly lives under `sys` or in a
//! backend; the rest of the crate is `#![deny(unsafe_code)]`.
#![allow(unsafe_code)]

use std::io;

pub(crate) mod net;
#[cfg(target_os = "linux")]
pub(crate) mod splice;
#[cfg(target_os = "linux")]
pub(crate) mod uring;

/// Turns a C-style return value into an [`io::Result`]: `-1` becomes
/// `io::Error::last_os_error()`.
pub(crate) fn cvt<T: IsMinusOne>(ret: T) -> io::Result<T> {
    if ret.is_minus_one() {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Runs `f` until it does not fail with `EINTR`.
pub(crate) fn retry<T, F: FnMut() -> io::Result<T>>(mut f: F) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Whether an `io_uring_enter(2)` error only means "reap and come back":
/// timed out (ETIME), interrupted (EINTR), completion queue backed up
/// (EBUSY), or no room to queue work yet (EAGAIN).
#[cfg(target_os = "linux")]
pub(crate) fn is_transient_enter_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
    )
}

/// Return types of C calls that report failure as `-1`.
pub(crate) trait IsMinusOne {
    fn is_minus_one(&self) -> bool;
}

macro_rules! impl_is_minus_one {
    ($($t:ty),*) => {$(
        impl IsMinusOne for $t {
            fn is_minus_one(&self) -> bool {
                *self == -1
            }
        }
    )*};
}
impl_is_minus_one!(i32, i64, isize);

/// Reads a small text file such as a sysctl under `/proc/sys`, trimmed.
/// `None` when it does not exist or cannot be read: callers report absence.
pub(crate) fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

/// `uname(2)`: the kernel release and machine.
pub(crate) fn uname() -> (String, String) {
    match nix::sys::utsname::uname() {
        Ok(u) => (
            u.release().to_string_lossy().into_owned(),
            u.machine().to_string_lossy().into_owned(),
        ),
        Err(_) => (String::from("unknown"), String::from("unknown")),
    }
}

/// `getrlimit(RLIMIT_MEMLOCK)`: (soft, hard), `None` meaning unlimited.
/// Called through libc: nix lacks `RLIMIT_MEMLOCK` on macOS.
pub(crate) fn memlock_limit() -> io::Result<(Option<u64>, Option<u64>)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit that outlives the call.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) })?;
    // rlim_t is u64 on Linux and macOS but i64 on FreeBSD.
    #[allow(clippy::useless_conversion)]
    let conv = |v: libc::rlim_t| {
        if v == libc::RLIM_INFINITY {
            None
        } else {
            u64::try_from(v).ok()
        }
    };
    Ok((conv(lim.rlim_cur), conv(lim.rlim_max)))
}

/// `signal(SIGXFSZ, SIG_IGN)`: a write past `RLIMIT_FSIZE` then fails with
/// `EFBIG` instead of killing the process.
pub(crate) fn ignore_sigxfsz() -> io::Result<()> {
    // SAFETY: SIG_IGN installs no handler code, so no async-signal-safety
    // contract is involved; it only changes the disposition of SIGXFSZ.
    let old = unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    if old == libc::SIG_ERR {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
