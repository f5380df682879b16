//! ringmover moves bytes between memory, sockets and files with as few
//! copies and system calls as the kernel allows: io_uring where it works,
//! epoll or poll(2) where it does not, chosen at run time and reported.
//!
//! ```
//! use ringmover::{KernelReport, Selection};
//!
//! let selection = Selection::from_env()?;
//! println!("backend: {} ({})", selection.backend, selection.reason);
//!
//! let report = KernelReport::collect();
//! println!("{} supported io_uring opcodes", report.opcodes().len());
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! Layers (see `docs/design.md`): a backend-neutral core above
//! interchangeable backends (`uring`, `epoll`, `poll`) behind one small
//! interface, above the syscall layer (`sys`), the only place besides the
//! backends where `unsafe` is allowed.
#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod backend;
mod driver;
pub mod fixed;
pub mod mover;
pub mod opcode;
pub mod outbox;
mod packet;
pub mod probe;
pub mod recv;
pub mod send;
pub mod shard;
mod sys;
pub mod wake;
pub mod wire;
mod write;

pub use backend::{Backend, BackendChoice, OpFallback, Selection, BACKEND_ENV};
pub use fixed::{FixedBufMut, FixedBufPool};
pub use mover::{
    Completion, Conn, ConnError, Detached, Mover, MoverBuilder, RegisteredFiles, Segmentation,
    SendError, SendErrorKind, Stats, ZeroCopy, DEFAULT_COPY_THRESHOLD,
};
pub use opcode::Opcode;
pub use packet::Packet;
pub use probe::{KernelReport, RingSupport, RingUnavailable};
pub use shard::{Group, Shards};
pub use wake::Waker;
pub use write::write_to;

/// Compiles README.md's Rust example as a doctest, so it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
