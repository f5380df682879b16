//! io_uring opcode numbers, their kernel names, and the release that
//! introduced each one we rely on.

use std::fmt;

/// The kernel names of io_uring opcodes, indexed by number, without the
/// `IORING_OP_` prefix (`include/uapi/linux/io_uring.h`, up to Linux 6.18).
const NAMES: &[&str] = &[
    "NOP",
    "READV",
    "WRITEV",
    "FSYNC",
    "READ_FIXED",
    "WRITE_FIXED",
    "POLL_ADD",
    "POLL_REMOVE",
    "SYNC_FILE_RANGE",
    "SENDMSG",
    "RECVMSG",
    "TIMEOUT",
    "TIMEOUT_REMOVE",
    "ACCEPT",
    "ASYNC_CANCEL",
    "LINK_TIMEOUT",
    "CONNECT",
    "FALLOCATE",
    "OPENAT",
    "CLOSE",
    "FILES_UPDATE",
    "STATX",
    "READ",
    "WRITE",
    "FADVISE",
    "MADVISE",
    "SEND",
    "RECV",
    "OPENAT2",
    "EPOLL_CTL",
    "SPLICE",
    "PROVIDE_BUFFERS",
    "REMOVE_BUFFERS",
    "TEE",
    "SHUTDOWN",
    "RENAMEAT",
    "UNLINKAT",
    "MKDIRAT",
    "SYMLINKAT",
    "LINKAT",
    "MSG_RING",
    "FSETXATTR",
    "SETXATTR",
    "FGETXATTR",
    "GETXATTR",
    "SOCKET",
    "URING_CMD",
    "SEND_ZC",
    "SENDMSG_ZC",
    "READ_MULTISHOT",
    "WAITID",
    "FUTEX_WAIT",
    "FUTEX_WAKE",
    "FUTEX_WAITV",
    "FIXED_FD_INSTALL",
    "FTRUNCATE",
    "BIND",
    "LISTEN",
    "RECV_ZC",
    "EPOLL_WAIT",
    "READV_FIXED",
    "WRITEV_FIXED",
    "PIPE",
];

/// An io_uring opcode number (`IORING_OP_*`).
///
/// Numbers newer than this crate still work: they display as `op<N>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[doc(alias = "IORING_OP")]
pub struct Opcode(pub u8);

impl Opcode {
    /// `IORING_OP_POLL_ADD` (Linux 5.1).
    pub const POLL_ADD: Opcode = Opcode(6);
    /// `IORING_OP_WRITEV` (Linux 5.1).
    pub const WRITEV: Opcode = Opcode(2);
    /// `IORING_OP_SENDMSG` (Linux 5.3).
    pub const SENDMSG: Opcode = Opcode(9);
    /// `IORING_OP_ASYNC_CANCEL` (Linux 5.5).
    pub const ASYNC_CANCEL: Opcode = Opcode(14);
    /// `IORING_OP_SEND` (Linux 5.6; with a destination address, 6.0).
    pub const SEND: Opcode = Opcode(26);
    /// `IORING_OP_SPLICE` (Linux 5.7).
    pub const SPLICE: Opcode = Opcode(30);
    /// `IORING_OP_SEND_ZC` (Linux 6.0).
    pub const SEND_ZC: Opcode = Opcode(47);
    /// `IORING_OP_SENDMSG_ZC` (Linux 6.1).
    pub const SENDMSG_ZC: Opcode = Opcode(48);

    /// The kernel name without the `IORING_OP_` prefix, if this crate knows it.
    pub fn name(self) -> Option<&'static str> {
        NAMES.get(usize::from(self.0)).copied()
    }

    /// Looks an opcode up by name, case-insensitively, with or without the
    /// `IORING_OP_` prefix; `op<N>` and a bare number are accepted too.
    pub fn from_name(name: &str) -> Option<Opcode> {
        let upper = name.trim().to_ascii_uppercase();
        let bare = upper.strip_prefix("IORING_OP_").unwrap_or(&upper);
        if let Some(i) = NAMES.iter().position(|n| *n == bare) {
            return u8::try_from(i).ok().map(Opcode);
        }
        let digits = bare.strip_prefix("OP").unwrap_or(bare);
        digits.parse::<u8>().ok().map(Opcode)
    }

    /// Every opcode number this crate has a name for.
    pub fn known() -> impl Iterator<Item = Opcode> {
        (0..NAMES.len()).filter_map(|i| u8::try_from(i).ok().map(Opcode))
    }
}

impl fmt::Display for Opcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(&n.to_ascii_lowercase()),
            None => write!(f, "op{}", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for op in Opcode::known() {
            let name = op.to_string();
            assert_eq!(Opcode::from_name(&name), Some(op), "{name}");
        }
        assert_eq!(Opcode::from_name("Send_ZC"), Some(Opcode::SEND_ZC));
        assert_eq!(Opcode::from_name("IORING_OP_SPLICE"), Some(Opcode::SPLICE));
        assert_eq!(Opcode::from_name("op200"), Some(Opcode(200)));
        assert_eq!(Opcode::from_name("sendfile"), None);
        assert_eq!(Opcode(200).to_string(), "op200");
        assert_eq!(Opcode::SENDMSG.name(), Some("SENDMSG"));
        assert_eq!(Opcode::WRITEV.name(), Some("WRITEV"));
        assert_eq!(Opcode::POLL_ADD.name(), Some("POLL_ADD"));
        assert_eq!(Opcode::ASYNC_CANCEL.name(), Some("ASYNC_CANCEL"));
        assert_eq!(Opcode::SPLICE.name(), Some("SPLICE"));
        assert_eq!(Opcode::SENDMSG_ZC.name(), Some("SENDMSG_ZC"));
        assert_eq!(Opcode(62).name(), Some("PIPE"));
    }
}
