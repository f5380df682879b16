//! Raw `io_uring_setup(2)` and `io_uring_register(2)` for the probe.
//!
//! The probe needs what the `io-uring` crate does not expose: the raw
//! `features` word, the errno of a failed set-up with every flag combination
//! we try, and opcodes newer than the crate knows. A ring made here is never
//! mapped: it exists only to be asked questions and closed.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use super::cvt;

const IORING_REGISTER_PROBE: libc::c_uint = 8;
const IORING_REGISTER_FILES2: libc::c_uint = 13;
const IORING_RSRC_REGISTER_SPARSE: u32 = 1;

/// `struct io_uring_rsrc_register`.
#[repr(C)]
struct RsrcRegister {
    nr: u32,
    flags: u32,
    resv2: u64,
    data: u64,
    tags: u64,
}
/// `IO_URING_OP_SUPPORTED` in `struct io_uring_probe_op.flags`.
const IO_URING_OP_SUPPORTED: u16 = 1;
/// Room for every opcode number the probe ABI can describe.
const PROBE_OPS: usize = 256;

/// `struct io_sqring_offsets` / `struct io_cqring_offsets` (same size).
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct RingOffsets {
    a: [u32; 8],
    user_addr: u64,
}

/// `struct io_uring_params` (120 bytes since Linux 5.1).
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct Params {
    sq_entries: u32,
    cq_entries: u32,
    flags: u32,
    sq_thread_cpu: u32,
    sq_thread_idle: u32,
    features: u32,
    wq_fd: u32,
    resv: [u32; 3],
    sq_off: RingOffsets,
    cq_off: RingOffsets,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct ProbeOp {
    op: u8,
    resv: u8,
    flags: u16,
    resv2: u32,
}

#[repr(C)]
struct ProbeBuf {
    last_op: u8,
    ops_len: u8,
    resv: u16,
    resv2: [u32; 3],
    ops: [ProbeOp; PROBE_OPS],
}

/// A ring that was set up for questions only.
#[derive(Debug)]
pub(crate) struct ProbeRing {
    fd: OwnedFd,
    /// `io_uring_params.features` as the kernel filled it.
    pub(crate) features: u32,
}

/// What to ask of `io_uring_setup`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SetupArgs {
    pub(crate) entries: u32,
    pub(crate) flags: u32,
    pub(crate) cq_entries: u32,
    pub(crate) wq_fd: Option<RawFd>,
}

/// `io_uring_setup(entries, &params)`: sets up a ring and returns its fd.
///
/// # References
/// `man 2 io_uring_setup`
pub(crate) fn setup(args: SetupArgs) -> io::Result<ProbeRing> {
    let mut p = Params {
        flags: args.flags,
        cq_entries: args.cq_entries,
        wq_fd: args.wq_fd.map_or(0, |fd| fd as u32),
        // SQPOLL: go idle at once, the ring is closed right away anyway.
        sq_thread_idle: 1,
        ..Params::default()
    };
    // SAFETY: `p` is a valid, writable `io_uring_params` that outlives the
    // call; the kernel writes only within its 120 bytes.
    let ret = cvt(unsafe {
        libc::syscall(
            libc::SYS_io_uring_setup,
            args.entries as libc::c_long,
            &mut p as *mut Params,
        )
    })?;
    // SAFETY: io_uring_setup(2) returned a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(ret as RawFd) };
    Ok(ProbeRing {
        fd,
        features: p.features,
    })
}

impl ProbeRing {
    /// `io_uring_register(fd, IORING_REGISTER_PROBE, &probe, 256)`: the
    /// supported opcode numbers, in order (Linux 5.6).
    pub(crate) fn supported_opcodes(&self) -> io::Result<Vec<u8>> {
        let mut buf = Box::new(ProbeBuf {
            last_op: 0,
            ops_len: 0,
            resv: 0,
            resv2: [0; 3],
            ops: [ProbeOp {
                op: 0,
                resv: 0,
                flags: 0,
                resv2: 0,
            }; PROBE_OPS],
        });
        use std::os::fd::AsRawFd;
        // SAFETY: `buf` is a zeroed `io_uring_probe` with room for
        // PROBE_OPS entries, as the last argument says; it outlives the call.
        cvt(unsafe {
            libc::syscall(
                libc::SYS_io_uring_register,
                self.fd.as_raw_fd() as libc::c_long,
                IORING_REGISTER_PROBE as libc::c_long,
                &mut *buf as *mut ProbeBuf,
                PROBE_OPS as libc::c_long,
            )
        })?;
        let n = usize::from(buf.ops_len).min(PROBE_OPS);
        Ok(buf.ops[..n]
            .iter()
            .filter(|o| o.flags & IO_URING_OP_SUPPORTED != 0)
            .map(|o| o.op)
            .collect())
    }

    /// `io_uring_register(fd, IORING_REGISTER_FILES2, ...)` with
    /// `IORING_RSRC_REGISTER_SPARSE`: whether the ring takes a sparse table
    /// of `slots` registered files (Linux 5.19), as the engine's rings do.
    pub(crate) fn register_sparse_files(&self, slots: u32) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let reg = RsrcRegister {
            nr: slots,
            flags: IORING_RSRC_REGISTER_SPARSE,
            resv2: 0,
            data: 0,
            tags: 0,
        };
        // SAFETY: `reg` is a live `io_uring_rsrc_register` whose size is the
        // last argument; a sparse registration reads no `data` or `tags`.
        cvt(unsafe {
            libc::syscall(
                libc::SYS_io_uring_register,
                self.fd.as_raw_fd() as libc::c_long,
                IORING_REGISTER_FILES2 as libc::c_long,
                &reg as *const RsrcRegister,
                std::mem::size_of::<RsrcRegister>() as libc::c_long,
            )
        })?;
        Ok(())
    }

    /// The ring's fd, for `IORING_SETUP_ATTACH_WQ` trials.
    pub(crate) fn raw_fd(&self) -> RawFd {
        use std::os::fd::AsRawFd;
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_has_the_kernel_size() {
        assert_eq!(std::mem::size_of::<Params>(), 120);
        assert_eq!(std::mem::size_of::<ProbeOp>(), 8);
    }
}
