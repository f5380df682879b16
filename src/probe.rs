//! What the running kernel supports, and why a ring can or cannot be set up.
//!
//! [`KernelReport::collect`] gathers everything `ringmover probe` prints;
//! [`RingSupport::detect`] is the cheap part that backend selection needs,
//! probed once per process and cached.

use std::fmt;
use std::io;
use std::sync::OnceLock;

use crate::backend::Selection;
use crate::opcode::Opcode;

/// `IORING_FEAT_*` flag names by bit, from `include/uapi/linux/io_uring.h`.
const FEATURE_NAMES: &[&str] = &[
    "SINGLE_MMAP",
    "NODROP",
    "SUBMIT_STABLE",
    "RW_CUR_POS",
    "CUR_PERSONALITY",
    "FAST_POLL",
    "POLL_32BITS",
    "SQPOLL_NONFIXED",
    "EXT_ARG",
    "NATIVE_WORKERS",
    "RSRC_TAGS",
    "CQE_SKIP",
    "LINKED_FILE",
    "REG_REG_RING",
    "RECVSEND_BUNDLE",
    "MIN_TIMEOUT",
    "RW_ATTR",
    "NO_IOWAIT",
];

/// Names of the `IORING_FEAT_*` bits set in `features`; unknown bits show
/// as `bit<N>`.
pub fn feature_names(features: u32) -> Vec<String> {
    (0..32)
        .filter(|bit| features & (1u32 << bit) != 0)
        .map(|bit| match FEATURE_NAMES.get(bit as usize) {
            Some(n) => (*n).to_owned(),
            None => format!("bit{bit}"),
        })
        .collect()
}

/// An `IORING_SETUP_*` flag the probe tries, with what it needs beside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SetupFlag {
    /// Kernel name without the `IORING_SETUP_` prefix.
    pub name: &'static str,
    /// The flag's bit.
    pub bit: u32,
    /// Other flags the kernel requires with it.
    requires: u32,
    /// The release that introduced it.
    pub since: &'static str,
}

const fn flag(name: &'static str, bit: u32, requires: u32, since: &'static str) -> SetupFlag {
    SetupFlag {
        name,
        bit,
        requires,
        since,
    }
}

const SETUP_IOPOLL: u32 = 1 << 0;
const SETUP_SQPOLL: u32 = 1 << 1;
const SETUP_CQSIZE: u32 = 1 << 3;
const SETUP_ATTACH_WQ: u32 = 1 << 5;
const SETUP_COOP_TASKRUN: u32 = 1 << 8;
const SETUP_SINGLE_ISSUER: u32 = 1 << 12;

/// The set-up flags `ringmover probe` tries, oldest first.
pub const SETUP_FLAGS: &[SetupFlag] = &[
    flag("IOPOLL", SETUP_IOPOLL, 0, "5.1"),
    flag("SQPOLL", SETUP_SQPOLL, 0, "5.1"),
    flag("SQ_AFF", 1 << 2, SETUP_SQPOLL, "5.1"),
    flag("CQSIZE", SETUP_CQSIZE, 0, "5.5"),
    flag("CLAMP", 1 << 4, 0, "5.6"),
    flag("ATTACH_WQ", SETUP_ATTACH_WQ, 0, "5.6"),
    flag("R_DISABLED", 1 << 6, 0, "5.10"),
    flag("SUBMIT_ALL", 1 << 7, 0, "5.18"),
    flag("COOP_TASKRUN", SETUP_COOP_TASKRUN, 0, "5.19"),
    flag("TASKRUN_FLAG", 1 << 9, SETUP_COOP_TASKRUN, "5.19"),
    flag("SQE128", 1 << 10, 0, "5.19"),
    flag("CQE32", 1 << 11, 0, "5.19"),
    flag("SINGLE_ISSUER", SETUP_SINGLE_ISSUER, 0, "6.0"),
    flag("DEFER_TASKRUN", 1 << 13, SETUP_SINGLE_ISSUER, "6.1"),
    flag("NO_SQARRAY", 1 << 16, 0, "6.6"),
    flag("HYBRID_IOPOLL", 1 << 17, SETUP_IOPOLL, "6.13"),
];

/// Why `io_uring_setup(2)` failed, classified from its errno and the host.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RingUnavailable {
    /// `ENOSYS`: the kernel has no io_uring (before 5.1 or built without
    /// `CONFIG_IO_URING`), or a seccomp filter answers ENOSYS.
    NoSyscall {
        /// A seccomp filter is active on this process, so the filter is the
        /// likelier cause on a kernel that has the `io_uring_disabled` sysctl.
        seccomp_likely: bool,
    },
    /// `EPERM` from `kernel.io_uring_disabled`.
    DisabledBySysctl {
        /// The sysctl's value (1: only `io_uring_group` or CAP_SYS_ADMIN; 2: nobody).
        value: u32,
    },
    /// `EPERM` with the sysctl allowing io_uring: a seccomp filter or
    /// container policy (Docker's default profile) denies it.
    ForbiddenByPolicy {
        /// `Seccomp: 2` in `/proc/self/status`.
        seccomp_active: bool,
    },
    /// `ENOMEM`: before 5.12 rings were charged to `RLIMIT_MEMLOCK`.
    MemlockLimit,
    /// `RINGMOVER_BACKEND` forced another backend, so no ring was tried.
    NotTried,
    /// Not Linux: io_uring does not exist here.
    NotLinux,
    /// Any other errno.
    Other {
        /// The raw errno.
        errno: i32,
    },
}

impl RingUnavailable {
    /// The errno this was classified from, if any.
    pub fn errno(&self) -> Option<i32> {
        match self {
            RingUnavailable::NoSyscall { .. } => Some(libc::ENOSYS),
            RingUnavailable::DisabledBySysctl { .. }
            | RingUnavailable::ForbiddenByPolicy { .. } => Some(libc::EPERM),
            RingUnavailable::MemlockLimit => Some(libc::ENOMEM),
            RingUnavailable::Other { errno } => Some(*errno),
            RingUnavailable::NotTried | RingUnavailable::NotLinux => None,
        }
    }

    /// A stable machine-readable name (used in `--json`).
    pub fn code(&self) -> &'static str {
        match self {
            RingUnavailable::NoSyscall { .. } => "enosys",
            RingUnavailable::DisabledBySysctl { .. } => "sysctl",
            RingUnavailable::ForbiddenByPolicy { .. } => "seccomp",
            RingUnavailable::MemlockLimit => "memlock",
            RingUnavailable::NotTried => "not-tried",
            RingUnavailable::NotLinux => "not-linux",
            RingUnavailable::Other { .. } => "other",
        }
    }
}

impl fmt::Display for RingUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RingUnavailable::NoSyscall { seccomp_likely: true } => f.write_str(
                "ENOSYS: io_uring_setup is not available; a seccomp filter is active and this kernel has the io_uring sysctls, so the filter most likely denies it",
            ),
            RingUnavailable::NoSyscall { seccomp_likely: false } => f.write_str(
                "ENOSYS: this kernel has no io_uring (before Linux 5.1, or built without CONFIG_IO_URING)",
            ),
            RingUnavailable::DisabledBySysctl { value: 2 } => f.write_str(
                "EPERM: io_uring is disabled for everyone by kernel.io_uring_disabled=2",
            ),
            RingUnavailable::DisabledBySysctl { value } => write!(
                f,
                "EPERM: kernel.io_uring_disabled={value} allows io_uring only to kernel.io_uring_group and CAP_SYS_ADMIN, and this process has neither"
            ),
            RingUnavailable::ForbiddenByPolicy { seccomp_active: true } => f.write_str(
                "EPERM: forbidden by a seccomp filter (container policy such as Docker's default profile); kernel.io_uring_disabled allows it",
            ),
            RingUnavailable::ForbiddenByPolicy { seccomp_active: false } => f.write_str(
                "EPERM: forbidden by security policy (LSM or container); kernel.io_uring_disabled allows it",
            ),
            RingUnavailable::MemlockLimit => f.write_str(
                "ENOMEM: the ring does not fit RLIMIT_MEMLOCK (kernels before 5.12 charge rings to it); raise `ulimit -l`",
            ),
            RingUnavailable::NotTried => {
                f.write_str("not tried: RINGMOVER_BACKEND forces another backend")
            }
            RingUnavailable::NotLinux => f.write_str("not Linux"),
            RingUnavailable::Other { errno } => write!(
                f,
                "io_uring_setup failed: {}",
                io::Error::from_raw_os_error(*errno)
            ),
        }
    }
}

/// Whether a ring can be set up here, and with which opcodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingSupport {
    /// A ring was set up.
    Available {
        /// `io_uring_params.features`.
        features: u32,
        /// Supported opcode numbers, ascending. `None` before Linux 5.6 (no
        /// `IORING_REGISTER_PROBE`): assume only the 5.1 set.
        opcodes: Option<Vec<u8>>,
    },
    /// No ring could be set up.
    Unavailable(RingUnavailable),
}

impl RingSupport {
    /// Tries to set up a ring once per process and caches the answer.
    pub fn detect() -> &'static RingSupport {
        static CACHE: OnceLock<RingSupport> = OnceLock::new();
        CACHE.get_or_init(detect_uncached)
    }

    /// Whether `op` can be submitted on this host's rings.
    pub fn supports(&self, op: Opcode) -> bool {
        match self {
            RingSupport::Available {
                opcodes: Some(ops), ..
            } => ops.binary_search(&op.0).is_ok(),
            // Before 5.6 there is no probe: the 5.1 set is NOP..=SYNC_FILE_RANGE.
            RingSupport::Available { opcodes: None, .. } => op.0 <= 8,
            RingSupport::Unavailable(_) => false,
        }
    }
}

#[cfg(target_os = "linux")]
fn detect_uncached() -> RingSupport {
    use crate::sys::uring::{setup, SetupArgs};
    match setup(SetupArgs {
        entries: 2,
        ..SetupArgs::default()
    }) {
        Ok(ring) => {
            // EINVAL: kernel before 5.6, which has no IORING_REGISTER_PROBE.
            let opcodes = ring.supported_opcodes().ok();
            RingSupport::Available {
                features: ring.features,
                opcodes,
            }
        }
        Err(e) => RingSupport::Unavailable(classify(e.raw_os_error().unwrap_or(0))),
    }
}

#[cfg(not(target_os = "linux"))]
fn detect_uncached() -> RingSupport {
    RingSupport::Unavailable(RingUnavailable::NotLinux)
}

/// Reads `Seccomp:` from `/proc/self/status`: 2 means a filter is active.
#[cfg(target_os = "linux")]
fn seccomp_mode() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Whether this process may use io_uring under `io_uring_disabled=1`:
/// effective uid 0 stands for CAP_SYS_ADMIN, or membership of the group.
#[cfg(target_os = "linux")]
fn allowed_by_group(group: Option<i64>) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let Some(g) = group.and_then(|g| u32::try_from(g).ok()) else {
        return false;
    };
    let gid = nix::unistd::Gid::from_raw(g);
    nix::unistd::getegid() == gid || nix::unistd::getgroups().is_ok_and(|gs| gs.contains(&gid))
}

/// What classifying a failed set-up reads from the host besides the errno.
/// Kept apart so the causes a test host cannot safely produce (the sysctl is
/// machine-wide; rings are not charged to `RLIMIT_MEMLOCK` since 5.12) are
/// tested with injected values.
#[cfg(target_os = "linux")]
#[derive(Debug, Clone, Copy)]
struct HostFacts {
    /// `kernel.io_uring_disabled` (6.6+), `None` when absent.
    io_uring_disabled: Option<u32>,
    /// Root, or in `kernel.io_uring_group`: what `io_uring_disabled=1` allows.
    allowed_by_group: bool,
    /// `Seccomp: 2` in `/proc/self/status`.
    seccomp_active: bool,
}

#[cfg(target_os = "linux")]
impl HostFacts {
    fn read() -> HostFacts {
        HostFacts {
            io_uring_disabled: crate::sys::read_trimmed("/proc/sys/kernel/io_uring_disabled")
                .and_then(|v| v.parse().ok()),
            allowed_by_group: allowed_by_group(
                crate::sys::read_trimmed("/proc/sys/kernel/io_uring_group")
                    .and_then(|v| v.parse().ok()),
            ),
            seccomp_active: seccomp_mode() == Some(2),
        }
    }
}

/// Why `io_uring_setup` failed with `errno` on this host.
#[cfg(target_os = "linux")]
fn classify(errno: i32) -> RingUnavailable {
    classify_with(errno, HostFacts::read())
}

/// Why `io_uring_setup` failed with `errno` on a host with `host`'s facts.
#[cfg(target_os = "linux")]
fn classify_with(errno: i32, host: HostFacts) -> RingUnavailable {
    match errno {
        libc::ENOSYS => RingUnavailable::NoSyscall {
            // The sysctl (6.6+) proves the kernel has io_uring: ENOSYS then
            // comes from a filter.
            seccomp_likely: host.seccomp_active && host.io_uring_disabled.is_some(),
        },
        libc::EPERM => match host.io_uring_disabled {
            Some(2) => RingUnavailable::DisabledBySysctl { value: 2 },
            Some(1) if !host.allowed_by_group => RingUnavailable::DisabledBySysctl { value: 1 },
            _ => RingUnavailable::ForbiddenByPolicy {
                seccomp_active: host.seccomp_active,
            },
        },
        libc::ENOMEM => RingUnavailable::MemlockLimit,
        errno => RingUnavailable::Other { errno },
    }
}

/// The outcome of trying one set-up flag.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SetupFlagResult {
    /// The flag tried.
    pub flag: SetupFlag,
    /// Whether `io_uring_setup` accepted it.
    pub supported: bool,
    /// The errno when it did not.
    pub errno: Option<i32>,
}

/// `RLIMIT_MEMLOCK`, `None` meaning unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct MemlockLimit {
    /// Soft limit in bytes.
    pub soft: Option<u64>,
    /// Hard limit in bytes.
    pub hard: Option<u64>,
}

/// Everything `ringmover probe` reports about this host.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct KernelReport {
    /// `uname -r`.
    pub kernel_release: String,
    /// `uname -m`.
    pub machine: String,
    /// `kernel.io_uring_disabled` (Linux 6.6), if present.
    pub io_uring_disabled: Option<u32>,
    /// `kernel.io_uring_group` (Linux 6.6), if present; -1 means none.
    pub io_uring_group: Option<i64>,
    /// Whether a ring can be set up, and its opcodes and features.
    pub ring: RingSupport,
    /// Every set-up flag tried (empty when no ring can be set up).
    pub setup_flags: Vec<SetupFlagResult>,
    /// Whether a ring takes a sparse table of registered files (Linux
    /// 5.19), which the engine's rings use to name each connection's fd
    /// (`IOSQE_FIXED_FILE`, no `fget`/`fput` per request): `None` without
    /// a ring, else `Ok` or the errno of the refusal (then connections use
    /// their plain fds; [`crate::Mover::registered_files`] says so too).
    pub registered_files: Option<Result<(), i32>>,
    /// `RLIMIT_MEMLOCK`.
    pub memlock: Option<MemlockLimit>,
    /// `/proc/sys/fs/pipe-max-size`.
    pub pipe_max_size: Option<u64>,
    /// The backend this process gets, and why.
    pub selection: Result<Selection, String>,
}

impl KernelReport {
    /// Probes the host. Cheap: a few dozen syscalls, no ring is mapped.
    pub fn collect() -> KernelReport {
        let (kernel_release, machine) = crate::sys::uname();
        let ring = RingSupport::detect().clone();
        let (setup_flags, registered_files) = match ring {
            RingSupport::Available { .. } => (try_setup_flags(), try_registered_files()),
            RingSupport::Unavailable(_) => (Vec::new(), None),
        };
        KernelReport {
            kernel_release,
            machine,
            io_uring_disabled: crate::sys::read_trimmed("/proc/sys/kernel/io_uring_disabled")
                .and_then(|v| v.parse().ok()),
            io_uring_group: crate::sys::read_trimmed("/proc/sys/kernel/io_uring_group")
                .and_then(|v| v.parse().ok()),
            ring,
            setup_flags,
            registered_files,
            memlock: crate::sys::memlock_limit()
                .ok()
                .map(|(soft, hard)| MemlockLimit { soft, hard }),
            pipe_max_size: crate::sys::read_trimmed("/proc/sys/fs/pipe-max-size")
                .and_then(|v| v.parse().ok()),
            selection: Selection::from_env().map_err(|e| e.to_string()),
        }
    }

    /// Supported opcodes (empty without a ring).
    pub fn opcodes(&self) -> Vec<Opcode> {
        match &self.ring {
            RingSupport::Available {
                opcodes: Some(ops), ..
            } => ops.iter().map(|&o| Opcode(o)).collect(),
            RingSupport::Available { opcodes: None, .. } => (0..=8).map(Opcode).collect(),
            RingSupport::Unavailable(_) => Vec::new(),
        }
    }

    /// How many bytes of registered buffers `RLIMIT_MEMLOCK` allows: `None`
    /// when unlimited. Since Linux 5.12 rings themselves are not charged,
    /// but registered buffers are (unless CAP_IPC_LOCK).
    pub fn registrable_bytes(&self) -> Option<u64> {
        self.memlock.and_then(|m| m.soft)
    }
}

#[cfg(target_os = "linux")]
fn try_setup_flags() -> Vec<SetupFlagResult> {
    use crate::sys::uring::{setup, SetupArgs};
    let base = setup(SetupArgs {
        entries: 1,
        ..SetupArgs::default()
    })
    .ok();
    SETUP_FLAGS
        .iter()
        .map(|&f| {
            let flags = f.bit | f.requires;
            let args = SetupArgs {
                entries: 1,
                flags,
                cq_entries: if flags & SETUP_CQSIZE != 0 { 4 } else { 0 },
                wq_fd: if flags & SETUP_ATTACH_WQ != 0 {
                    base.as_ref().map(|r| r.raw_fd())
                } else {
                    None
                },
            };
            match setup(args) {
                Ok(_) => SetupFlagResult {
                    flag: f,
                    supported: true,
                    errno: None,
                },
                Err(e) => SetupFlagResult {
                    flag: f,
                    supported: false,
                    errno: e.raw_os_error(),
                },
            }
        })
        .collect()
}

#[cfg(not(target_os = "linux"))]
fn try_setup_flags() -> Vec<SetupFlagResult> {
    Vec::new()
}

#[cfg(target_os = "linux")]
fn try_registered_files() -> Option<Result<(), i32>> {
    use crate::sys::uring::{setup, SetupArgs};
    let ring = setup(SetupArgs {
        entries: 1,
        ..SetupArgs::default()
    })
    .ok()?;
    Some(
        ring.register_sparse_files(1)
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EINVAL)),
    )
}

#[cfg(not(target_os = "linux"))]
fn try_registered_files() -> Option<Result<(), i32>> {
    None
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn host(disabled: Option<u32>, allowed: bool, seccomp: bool) -> HostFacts {
        HostFacts {
            io_uring_disabled: disabled,
            allowed_by_group: allowed,
            seccomp_active: seccomp,
        }
    }

    /// The sysctl cases, which a test cannot set for real: the sysctl is
    /// machine-wide and the other tests of this run need io_uring.
    #[test]
    fn eperm_is_the_sysctl_when_it_forbids_us() {
        let c = classify_with(libc::EPERM, host(Some(2), true, false));
        assert_eq!(c, RingUnavailable::DisabledBySysctl { value: 2 });
        assert_eq!((c.code(), c.errno()), ("sysctl", Some(libc::EPERM)));
        assert!(c.to_string().contains("io_uring_disabled=2"), "{c}");

        let c = classify_with(libc::EPERM, host(Some(1), false, true));
        assert_eq!(c, RingUnavailable::DisabledBySysctl { value: 1 });
        assert!(c.to_string().contains("io_uring_group"), "{c}");
    }

    #[test]
    fn eperm_is_policy_when_the_sysctl_allows_us() {
        for disabled in [None, Some(0)] {
            let c = classify_with(libc::EPERM, host(disabled, false, true));
            assert_eq!(
                c,
                RingUnavailable::ForbiddenByPolicy {
                    seccomp_active: true
                }
            );
            assert_eq!(c.code(), "seccomp");
        }
        // `=1` does not stop root or a member of io_uring_group.
        let c = classify_with(libc::EPERM, host(Some(1), true, false));
        assert_eq!(
            c,
            RingUnavailable::ForbiddenByPolicy {
                seccomp_active: false
            }
        );
        assert!(c.to_string().contains("LSM"), "{c}");
    }

    #[test]
    fn enosys_blames_a_filter_only_on_a_kernel_with_io_uring() {
        let likely =
            |disabled, seccomp| match classify_with(libc::ENOSYS, host(disabled, false, seccomp)) {
                RingUnavailable::NoSyscall { seccomp_likely } => seccomp_likely,
                other => panic!("{other:?}"),
            };
        assert!(likely(Some(0), true));
        assert!(
            !likely(None, true),
            "pre-6.6: could be a kernel without io_uring"
        );
        assert!(!likely(Some(0), false));
    }

    /// ENOMEM came from RLIMIT_MEMLOCK before 5.12; 6.x kernels do not
    /// charge rings to it, so only the classification is tested.
    #[test]
    fn enomem_is_the_memlock_limit_and_other_errnos_are_kept() {
        let c = classify_with(libc::ENOMEM, host(Some(0), true, false));
        assert_eq!(c, RingUnavailable::MemlockLimit);
        assert_eq!((c.code(), c.errno()), ("memlock", Some(libc::ENOMEM)));
        assert!(c.to_string().contains("ulimit -l"), "{c}");

        let c = classify_with(libc::EINVAL, host(Some(0), true, false));
        assert_eq!(
            c,
            RingUnavailable::Other {
                errno: libc::EINVAL
            }
        );
        assert_eq!(c.errno(), Some(libc::EINVAL));
    }

    /// Each cause reaches `auto`'s reason and makes forcing uring an error.
    #[test]
    fn every_cause_falls_back_to_epoll_and_says_why() {
        use crate::backend::{Backend, BackendChoice, Selection};
        for (errno, facts, needle) in [
            (
                libc::EPERM,
                host(Some(2), true, false),
                "io_uring_disabled=2",
            ),
            (libc::ENOMEM, host(None, true, false), "RLIMIT_MEMLOCK"),
            (libc::ENOSYS, host(None, true, false), "no io_uring"),
        ] {
            let ring = RingSupport::Unavailable(classify_with(errno, facts));
            let s = Selection::choose_with(BackendChoice::Auto, &ring).unwrap();
            assert_eq!(s.backend, Backend::Epoll);
            assert!(s.reason.contains(needle), "{}", s.reason);
            let forced = Selection::choose_with(BackendChoice::Force(Backend::Uring), &ring);
            assert!(forced.unwrap_err().to_string().contains(needle));
        }
    }
}
