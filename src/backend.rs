//! Run-time backend selection: which of `uring`, `epoll` and `poll` this
//! process uses, and why.
//!
//! `Auto` picks io_uring when a ring can be set up and has the opcodes the
//! batched-send engine needs, else epoll on Linux, else poll. Opcodes that
//! are missing on a working ring are recorded as per-operation fallbacks.
//! Forcing a backend that cannot work is an error, never a silent fallback.

use std::fmt;
use std::io;
use std::str::FromStr;

use crate::opcode::Opcode;
use crate::probe::{RingSupport, RingUnavailable};

/// The environment variable that forces a backend.
pub const BACKEND_ENV: &str = "RINGMOVER_BACKEND";

/// A backend: the leaf that moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Backend {
    /// io_uring (Linux 5.1+): one submission for many operations.
    Uring,
    /// epoll(7) readiness with non-blocking syscalls (Linux).
    Epoll,
    /// poll(2) readiness with non-blocking syscalls (every Unix).
    Poll,
}

impl Backend {
    /// Every backend, in order of preference.
    pub const ALL: [Backend; 3] = [Backend::Uring, Backend::Epoll, Backend::Poll];

    /// The lower-case name used by `RINGMOVER_BACKEND` and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Uring => "uring",
            Backend::Epoll => "epoll",
            Backend::Poll => "poll",
        }
    }

    /// Whether this backend is compiled into this build.
    pub fn is_compiled(self) -> bool {
        match self {
            Backend::Uring | Backend::Epoll => cfg!(target_os = "linux"),
            Backend::Poll => true,
        }
    }

    /// The backends compiled into this build (all on Linux, `Poll`
    /// elsewhere), in order of preference.
    pub fn compiled() -> impl Iterator<Item = Backend> {
        Backend::ALL.into_iter().filter(|b| b.is_compiled())
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the caller asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum BackendChoice {
    /// Pick the best backend that works here.
    #[default]
    Auto,
    /// This backend or an error.
    Force(Backend),
}

/// An unknown backend name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownBackend(pub String);

impl fmt::Display for UnknownBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown backend {:?}: expected auto, uring, epoll or poll",
            self.0
        )
    }
}

impl std::error::Error for UnknownBackend {}

impl FromStr for BackendChoice {
    type Err = UnknownBackend;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(BackendChoice::Auto),
            "uring" | "io_uring" | "io-uring" => Ok(BackendChoice::Force(Backend::Uring)),
            "epoll" => Ok(BackendChoice::Force(Backend::Epoll)),
            "poll" => Ok(BackendChoice::Force(Backend::Poll)),
            _ => Err(UnknownBackend(s.to_owned())),
        }
    }
}

impl BackendChoice {
    /// Reads `RINGMOVER_BACKEND`; unset means `Auto`.
    pub fn from_env() -> io::Result<BackendChoice> {
        match std::env::var(BACKEND_ENV) {
            Ok(v) => v.parse().map_err(|e: UnknownBackend| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("{BACKEND_ENV}: {e}"))
            }),
            Err(std::env::VarError::NotPresent) => Ok(BackendChoice::Auto),
            Err(std::env::VarError::NotUnicode(_)) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{BACKEND_ENV} is not valid UTF-8"),
            )),
        }
    }
}

/// Opcodes the io_uring backend cannot work without.
pub const REQUIRED_OPS: &[Opcode] = &[Opcode::WRITEV, Opcode::SENDMSG, Opcode::POLL_ADD];

/// Opcodes with a per-operation fallback, and what replaces each.
pub const OPTIONAL_OPS: &[(Opcode, &str)] = &[
    (
        Opcode::ASYNC_CANCEL,
        "wait for in-flight sends instead of cancelling them",
    ),
    (Opcode::SEND, "SENDMSG for every datagram"),
    (Opcode::SEND_ZC, "copying SENDMSG"),
    (Opcode::SENDMSG_ZC, "copying SENDMSG"),
];

/// An opcode this host's rings lack, and the path used instead.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OpFallback {
    /// The missing opcode.
    pub op: Opcode,
    /// What runs instead.
    pub instead: &'static str,
}

/// The backend chosen for this process, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Selection {
    /// The backend in use.
    pub backend: Backend,
    /// Whether `RINGMOVER_BACKEND` (or the caller) forced it.
    pub forced: bool,
    /// One sentence saying why.
    pub reason: String,
    /// Why io_uring was not used, when it was not.
    pub uring_unavailable: Option<RingUnavailable>,
    /// Opcodes missing on a working ring, each with its fallback.
    pub fallbacks: Vec<OpFallback>,
}

impl Selection {
    /// Selects per `RINGMOVER_BACKEND` (unset: `Auto`).
    pub fn from_env() -> io::Result<Selection> {
        Selection::choose(BackendChoice::from_env()?)
    }

    /// Selects a backend for `choice` on this host.
    pub fn choose(choice: BackendChoice) -> io::Result<Selection> {
        Selection::choose_with(choice, RingSupport::detect())
    }

    /// Selects a backend for `choice` given what the ring probe found.
    pub fn choose_with(choice: BackendChoice, ring: &RingSupport) -> io::Result<Selection> {
        let missing: Vec<Opcode> = REQUIRED_OPS
            .iter()
            .copied()
            .filter(|&op| !ring.supports(op))
            .collect();
        let fallbacks = || -> Vec<OpFallback> {
            OPTIONAL_OPS
                .iter()
                .filter(|(op, _)| !ring.supports(*op))
                .map(|&(op, instead)| OpFallback { op, instead })
                .collect()
        };
        let readiness = if cfg!(target_os = "linux") {
            Backend::Epoll
        } else {
            Backend::Poll
        };
        match (choice, ring) {
            (BackendChoice::Force(b), _) if !b.is_compiled() => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{BACKEND_ENV}={b}: the {b} backend exists only on Linux"),
            )),
            (BackendChoice::Force(Backend::Uring), RingSupport::Unavailable(why)) => {
                Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("{BACKEND_ENV}=uring but io_uring is unavailable: {why}"),
                ))
            }
            (BackendChoice::Force(Backend::Uring), _) if !missing.is_empty() => {
                Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!(
                        "{BACKEND_ENV}=uring but the kernel lacks required opcodes: {}",
                        join(&missing)
                    ),
                ))
            }
            (BackendChoice::Force(Backend::Uring), _) => Ok(Selection {
                backend: Backend::Uring,
                forced: true,
                reason: format!("forced by {BACKEND_ENV}=uring"),
                uring_unavailable: None,
                fallbacks: fallbacks(),
            }),
            (BackendChoice::Force(b), _) => Ok(Selection {
                backend: b,
                forced: true,
                reason: format!("forced by {BACKEND_ENV}={b}"),
                uring_unavailable: Some(RingUnavailable::NotTried),
                fallbacks: Vec::new(),
            }),
            (BackendChoice::Auto, RingSupport::Unavailable(why)) => Ok(Selection {
                backend: readiness,
                forced: false,
                reason: format!("io_uring unavailable ({why}); using {readiness}"),
                uring_unavailable: Some(why.clone()),
                fallbacks: Vec::new(),
            }),
            (BackendChoice::Auto, _) if !missing.is_empty() => Ok(Selection {
                backend: readiness,
                forced: false,
                reason: format!(
                    "io_uring lacks required opcodes ({}); using {readiness}",
                    join(&missing)
                ),
                uring_unavailable: None,
                fallbacks: Vec::new(),
            }),
            (BackendChoice::Auto, _) => Ok(Selection {
                backend: Backend::Uring,
                forced: false,
                reason: String::from("io_uring ring set up and has every required opcode"),
                uring_unavailable: None,
                fallbacks: fallbacks(),
            }),
        }
    }
}

fn join(ops: &[Opcode]) -> String {
    ops.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring_with(ops: &[u8]) -> RingSupport {
        RingSupport::Available {
            features: 0,
            opcodes: Some(ops.to_vec()),
        }
    }

    #[test]
    fn parses_names() {
        assert_eq!("EPOLL".parse(), Ok(BackendChoice::Force(Backend::Epoll)));
        assert_eq!("auto".parse(), Ok(BackendChoice::Auto));
        assert!("kqueue".parse::<BackendChoice>().is_err());
    }

    #[test]
    fn auto_falls_back_when_ring_is_forbidden() {
        let ring = RingSupport::Unavailable(RingUnavailable::ForbiddenByPolicy {
            seccomp_active: true,
        });
        let s = Selection::choose_with(BackendChoice::Auto, &ring).unwrap();
        assert_eq!(s.backend, Backend::Epoll);
        assert!(s.reason.contains("seccomp"), "{}", s.reason);
        let err = Selection::choose_with(BackendChoice::Force(Backend::Uring), &ring).unwrap_err();
        assert!(err.to_string().contains("unavailable"), "{err}");
    }

    #[test]
    fn missing_optional_op_is_a_recorded_fallback() {
        // 5.6-like: WRITEV, POLL_ADD, SENDMSG, ASYNC_CANCEL, SEND but no SEND_ZC.
        let ring = ring_with(&[2, 6, 9, 14, 26]);
        let s = Selection::choose_with(BackendChoice::Auto, &ring).unwrap();
        assert_eq!(s.backend, Backend::Uring);
        let ops: Vec<Opcode> = s.fallbacks.iter().map(|f| f.op).collect();
        assert_eq!(ops, vec![Opcode::SEND_ZC, Opcode::SENDMSG_ZC]);
        // 5.5-like: no SEND either; datagrams go as SENDMSG.
        let s = Selection::choose_with(BackendChoice::Auto, &ring_with(&[2, 6, 9, 14])).unwrap();
        let ops: Vec<Opcode> = s.fallbacks.iter().map(|f| f.op).collect();
        assert_eq!(ops, vec![Opcode::SEND, Opcode::SEND_ZC, Opcode::SENDMSG_ZC]);
    }

    #[test]
    fn missing_required_op_means_readiness_backend() {
        let ring = ring_with(&[2, 6]);
        let s = Selection::choose_with(BackendChoice::Auto, &ring).unwrap();
        assert_eq!(s.backend, Backend::Epoll);
        assert!(s.reason.contains("sendmsg"), "{}", s.reason);
        assert!(Selection::choose_with(BackendChoice::Force(Backend::Uring), &ring).is_err());
    }
}
