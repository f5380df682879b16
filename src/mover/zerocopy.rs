//! Zero-copy sends: the policy (`ZeroCopy`), what `Auto` learns per
//! connection (`ZcProbe`), and what a notification teaches it.

use super::{live_mut, Conn, Mover};
use crate::driver::Token;

/// When sends avoid the copy into the kernel (io_uring `SEND_ZC`, 6.0, and
/// `SENDMSG_ZC`, 6.1). Elsewhere, and where the opcodes are missing, every
/// send copies (a recorded per-operation fallback).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ZeroCopy {
    /// Always copy.
    #[default]
    Never,
    /// Zero-copy every socket send.
    Always,
    /// Zero-copy sends of at least `min_bytes`, asking the kernel to report
    /// (`IORING_SEND_ZC_REPORT_USAGE`, 6.2) whether it copied anyway; a
    /// connection whose sends get copied (loopback, veth) switches to the copy
    /// path, which is cheaper there.
    Auto {
        /// Smallest send worth pinning pages for (zero-copy rarely pays
        /// below a few KiB).
        min_bytes: usize,
    },
}

impl ZeroCopy {
    /// `Auto` with a 16 KiB threshold.
    pub const AUTO: ZeroCopy = ZeroCopy::Auto {
        min_bytes: 16 << 10,
    };
}

/// `ZeroCopy::Auto` learns per connection: one zero-copy send first (the
/// probe), copies while its notification is outstanding, then either
/// zero-copies everything (the kernel did not copy) or nothing (it did:
/// loopback, veth delivery). Notification latency thus costs at most one
/// slow send, never a stream of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ZcProbe {
    Untried,
    Probing,
    Pays,
}

impl ZcProbe {
    /// Whether a batch of `bytes` goes zero-copy under `policy`; under
    /// `Auto` the first one that qualifies is the probe.
    pub(super) fn wants(&mut self, policy: ZeroCopy, bytes: usize) -> bool {
        match policy {
            ZeroCopy::Never => false,
            ZeroCopy::Always => true,
            ZeroCopy::Auto { min_bytes } => {
                bytes >= min_bytes
                    && match *self {
                        ZcProbe::Untried => {
                            *self = ZcProbe::Probing;
                            true
                        }
                        ZcProbe::Probing => false,
                        ZcProbe::Pays => true,
                    }
            }
        }
    }
}

impl Mover {
    /// A zero-copy send's notification: count it, and under `Auto` learn
    /// from it whether zero-copy pays on its connection.
    pub(super) fn notified(&mut self, token: Token, copied: bool) {
        self.zc_notified += 1;
        self.zc_copied += u64::from(copied);
        let threshold = self.copy_threshold;
        if let (ZeroCopy::Auto { .. }, Some(st)) = (
            self.zero_copy,
            live_mut(&mut self.slots, Conn::from_token(token)),
        ) {
            if copied {
                st.demote_to_copy(threshold);
            } else if st.zc_probe == ZcProbe::Probing {
                st.zc_probe = ZcProbe::Pays;
            }
        }
    }
}
