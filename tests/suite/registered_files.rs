//! io_uring's registered file table (`IOSQE_FIXED_FILE`): slots taken at
//! attach and freed at detach, connections beyond the table on their
//! plain fd, and the whole ring on plain fds where the kernel refuses the
//! table. Every byte is read back.

use std::io::{Read, Seek, SeekFrom};
use std::net::UdpSocket;
use std::time::Duration;

use bytes::Bytes;
use ringmover::{Backend, Mover, MoverBuilder, RegisteredFiles};

use crate::send::{builder, no_errors, on_own_thread, pattern, pieces, slow_reader, tcp_pairs};

fn build(backend: Option<Backend>, b: MoverBuilder) -> Mover {
    let m = b.build().expect("building the mover");
    if let Some(b) = backend {
        assert_eq!(m.backend(), b);
    }
    m
}

/// What one round attaches: streams, a UDP socket and a file.
enum Target {
    Tcp(std::thread::JoinHandle<Vec<u8>>),
    Udp(UdpSocket),
    File(std::fs::File),
}

const STREAMS: usize = 5;
const DATAGRAMS: usize = 20;

/// Seven connections (five TCP streams, a UDP socket, a file) attached in
/// an order that turns with `round`, each sent its own pattern, flushed,
/// then detached (in reverse on odd rounds) and checked byte for byte. A
/// stream's reader reads to EOF, which comes only once the detached fd is
/// closed and the file table let go of the socket.
fn one_round(m: &mut Mover, round: usize) {
    let (ours, peers) = tcp_pairs(STREAMS);
    let mut fds: Vec<(std::os::fd::OwnedFd, Target)> = ours
        .into_iter()
        .zip(peers)
        .map(|(a, p)| {
            // A small send buffer: sends complete in parts, retried by the
            // kernel on the same (registered or plain) file.
            nix::sys::socket::setsockopt(&a, nix::sys::socket::sockopt::SndBuf, &16384).unwrap();
            (a.into(), Target::Tcp(slow_reader(p, 7000)))
        })
        .collect();
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
    tx.connect(rx.local_addr().unwrap()).unwrap();
    fds.push((tx.into(), Target::Udp(rx)));
    let file = tempfile::tempfile().unwrap();
    fds.push((file.try_clone().unwrap().into(), Target::File(file)));
    let n = fds.len();
    fds.rotate_left(round % n);

    let mut attached = Vec::new();
    for (i, (fd, target)) in fds.into_iter().enumerate() {
        let conn = m.attach(fd).unwrap();
        let seed = (round * 100 + i) as u64;
        let want = match &target {
            Target::Udp(_) => {
                let mut all = Vec::new();
                for d in 0..DATAGRAMS {
                    let body = pattern(seed + d as u64, 1000);
                    m.send(conn, [Bytes::from(body.clone())]).unwrap();
                    all.extend(body);
                }
                all
            }
            _ => {
                let data = Bytes::from(pattern(seed, 256 << 10));
                m.send(conn, pieces(&data, seed)).unwrap();
                data.to_vec()
            }
        };
        attached.push((conn, target, want));
    }
    let mut done = Vec::new();
    m.flush_and_wait(&mut done).unwrap();
    no_errors(&done);
    if round % 2 == 1 {
        attached.reverse();
    }
    for (conn, target, want) in attached {
        let d = m.detach(conn).unwrap();
        assert!(d.unsent.is_empty() && d.written == 0, "round {round}");
        drop(d.fd);
        let got = match target {
            Target::Tcp(reader) => reader.join().unwrap(),
            Target::Udp(rx) => {
                rx.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut got = Vec::new();
                let mut buf = [0u8; 2048];
                for _ in 0..DATAGRAMS {
                    let n = rx.recv(&mut buf).expect("a datagram");
                    got.extend_from_slice(&buf[..n]);
                }
                got
            }
            Target::File(mut f) => {
                let mut got = Vec::new();
                f.seek(SeekFrom::Start(0)).unwrap();
                f.read_to_end(&mut got).unwrap();
                got
            }
        };
        assert!(
            got == want,
            "round {round}: {} of {} bytes, or not the bytes sent",
            got.len(),
            want.len()
        );
    }
}

/// A table of 4 slots and 7 connections a round, 8 rounds: slots are
/// reused after every detach, the 3 connections a round beyond the table
/// use their plain fd, and every kind of connection arrives byte-exact
/// both ways (the attach order turns, so each kind gets a slot in some
/// rounds and not in others).
pub fn file_table_slots_are_reused_and_overflow_to_plain_fds(b: Option<Backend>) {
    const SLOTS: u32 = 4;
    const ROUNDS: usize = 8;
    // Bounded: a slot that kept its socket after detach would leave a
    // reader waiting for EOF forever.
    on_own_thread(
        "attach/detach rounds",
        Duration::from_secs(120),
        move || {
            let mut m = build(b, builder(b).registered_files(SLOTS));
            for round in 0..ROUNDS {
                one_round(&mut m, round);
            }
            let s = m.stats();
            if m.backend() == Backend::Uring {
                assert_eq!(m.registered_files(), RegisteredFiles::On { slots: SLOTS });
                assert_eq!(s.unregistered_files, 3 * ROUNDS as u64, "{s:?}");
                assert!(
                    s.fixed_file_sqes > 0 && s.fixed_file_sqes < s.sqes,
                    "some SQEs name a slot, the rest a plain fd: {s:?}"
                );
            } else {
                assert_eq!(m.registered_files(), RegisteredFiles::Off);
                assert_eq!((s.fixed_file_sqes, s.unregistered_files), (0, 0));
            }
        },
    );
}

/// By default a uring `Mover` registers one slot per fd the process may
/// open (at most 65,536) and every request of a connection names its slot.
#[cfg(target_os = "linux")]
#[test]
fn uring_registers_a_file_table_by_default() {
    let mut m = build(Some(Backend::Uring), builder(Some(Backend::Uring)));
    let (soft, _) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let slots = soft.min(1 << 16) as u32;
    assert_eq!(m.registered_files(), RegisteredFiles::On { slots });
    one_round(&mut m, 0);
    let s = m.stats();
    assert_eq!(s.fixed_file_sqes, s.sqes, "{s:?}");
    assert_eq!(s.unregistered_files, 0);
}

/// `IORING_REGISTER_FILES2`, the request that registers a sparse table.
#[cfg(target_os = "linux")]
const IORING_REGISTER_FILES2: u32 = 13;

/// Makes the calling thread's `io_uring_register(fd, IORING_REGISTER_FILES2,
/// ..)` fail with EINVAL (what a kernel before 5.19 answers a sparse table),
/// every other call untouched. For the rest of the thread's life.
#[cfg(target_os = "linux")]
fn refuse_file_tables() {
    use crate::seccomp::{
        install, jeq, stmt, ARCH_OFFSET, ARG1_OFFSET, AUDIT_ARCH, BPF_LD_W_ABS, BPF_RET_K,
        NR_OFFSET,
    };
    let refuse = libc::SECCOMP_RET_ERRNO | libc::EINVAL as u32;
    install(&[
        stmt(BPF_LD_W_ABS, ARCH_OFFSET),
        jeq(AUDIT_ARCH, 1, 0),
        stmt(BPF_RET_K, libc::SECCOMP_RET_ALLOW),
        stmt(BPF_LD_W_ABS, NR_OFFSET),
        jeq(libc::SYS_io_uring_register as u32, 0, 3),
        stmt(BPF_LD_W_ABS, ARG1_OFFSET),
        jeq(IORING_REGISTER_FILES2, 0, 1),
        stmt(BPF_RET_K, refuse),
        stmt(BPF_RET_K, libc::SECCOMP_RET_ALLOW),
    ])
    .expect("installing the seccomp filter");
}

/// A kernel that refuses the table (here a seccomp filter answering
/// EINVAL, as before 5.19), or a builder asking for none: the ring works
/// on plain fds, says why, and nothing names a slot.
#[cfg(target_os = "linux")]
#[test]
fn uring_without_a_file_table_uses_plain_fds_and_says_why() {
    on_own_thread(
        "a ring refused its file table",
        Duration::from_secs(60),
        || {
            let mut m = build(
                Some(Backend::Uring),
                builder(Some(Backend::Uring)).registered_files(0),
            );
            assert_eq!(m.registered_files(), RegisteredFiles::Off);
            one_round(&mut m, 1);
            refuse_file_tables();
            let mut r = build(Some(Backend::Uring), builder(Some(Backend::Uring)));
            assert_eq!(
                r.registered_files(),
                RegisteredFiles::Refused {
                    errno: libc::EINVAL
                }
            );
            one_round(&mut r, 2);
            for m in [m, r] {
                let s = m.stats();
                assert!(s.sqes > 0);
                assert_eq!((s.fixed_file_sqes, s.unregistered_files), (0, 0), "{s:?}");
            }
        },
    );
}

for_each_backend!(auto; file_table_slots_are_reused_and_overflow_to_plain_fds);
