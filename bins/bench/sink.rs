//! The benches' built-in loopback sink: one thread, epoll, `recv(MSG_TRUNC)`
//! so the data is discarded in the kernel without a copy, counting bytes so
//! each bench can check that everything sent arrived. `ringmover bench
//! sink` runs it as its own process.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::thread::JoinHandle;

use anyhow::Context;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::socket::{recv, MsgFlags};

/// A running sink.
#[derive(Debug)]
pub struct Sink {
    pub addr: SocketAddr,
    /// The sink thread, which a bench leaves out of the sender's CPU.
    pub tid: i32,
    thread: JoinHandle<anyhow::Result<u64>>,
}

impl Sink {
    /// Listens on loopback and serves `n` connections until each closes.
    pub fn start(n: usize) -> anyhow::Result<Sink> {
        let listener = listen_loopback()?;
        let addr = listener.local_addr()?;
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("sink".into())
            .spawn(move || {
                let _ = tx.send(super::gettid());
                serve(listener, Some(n))
            })?;
        let tid = rx
            .recv()
            .map_err(|_| anyhow::anyhow!("the sink thread died at start"))?;
        Ok(Sink { addr, thread, tid })
    }

    /// `sink`'s thread, for [`super::CpuMeter::start`].
    pub fn tids(sink: &Option<Sink>) -> Vec<i32> {
        sink.iter().map(|s| s.tid).collect()
    }

    /// Waits for every connection to close; returns the bytes received.
    pub fn finish(self) -> anyhow::Result<u64> {
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the sink thread panicked"))?
    }
}

/// Connects `n` sockets (TCP_NODELAY) to `to`, or to a fresh built-in sink.
pub fn connect(n: usize, to: Option<SocketAddr>) -> anyhow::Result<(Vec<TcpStream>, Option<Sink>)> {
    let (addr, sink) = match to {
        Some(a) => (a, None),
        None => {
            let s = Sink::start(n)?;
            (s.addr, Some(s))
        }
    };
    let socks = (0..n)
        .map(|_| TcpStream::connect(addr).with_context(|| format!("connecting to {addr}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for s in &socks {
        s.set_nodelay(true)?;
    }
    Ok((socks, sink))
}

/// The receiving ends of stalled connections: accepted, held, never read.
/// Once a connection's socket buffers (ours to send, theirs to receive)
/// are full, every write to it waits, as to a client that stopped reading.
/// It lives in the bench itself, so `--to` an external sink (which reads
/// everything it gets) can still be measured with stalled connections.
#[derive(Debug)]
pub struct StalledPeers {
    _held: Vec<TcpStream>,
}

/// Connects `n` sockets (TCP_NODELAY) to a loopback listener of this
/// process that accepts them and never reads.
pub fn connect_stalled(n: usize) -> anyhow::Result<(Vec<TcpStream>, StalledPeers)> {
    let listener = listen_loopback()?;
    // Small socket buffers on both ends (the peer's inherited from the
    // listener), so a stalled connection fills them within a few writes,
    // not after the megabytes loopback autotuning would let it take: a
    // short cell, or a loaded machine, still sees it stall.
    use nix::sys::socket::{setsockopt, sockopt};
    setsockopt(&listener, sockopt::RcvBuf, &4096)
        .context("shrinking the stalled peers' receive buffers")?;
    let addr = listener.local_addr()?;
    let mut socks = Vec::with_capacity(n);
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let s = TcpStream::connect(addr)
            .with_context(|| format!("connecting a stalled connection to {addr}"))?;
        s.set_nodelay(true)?;
        setsockopt(&s, sockopt::SndBuf, &16384)
            .context("shrinking a stalled connection's send buffer")?;
        // Accepted at once, one by one: the backlog never fills.
        let (peer, _) = listener
            .accept()
            .context("accepting a stalled connection")?;
        socks.push(s);
        held.push(peer);
    }
    Ok((socks, StalledPeers { _held: held }))
}

/// `ringmover bench sink`: the same sink as its own process, so the
/// senders' CPU accounting and the sink's are separate (`bench ... --to`).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address to listen on, e.g. 127.0.0.1:7000 (port 0: any free port).
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
}

/// Serves every connection that comes until killed; prints the address.
pub fn run(args: &Args) -> anyhow::Result<crate::Outcome> {
    // How many will come is the senders' business: take all the
    // descriptors we may (soft limit up to the hard one), best effort.
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
    let listener = listen(args.listen).with_context(|| format!("listening on {}", args.listen))?;
    eprintln!("listening on {}", listener.local_addr()?);
    serve(listener, None)?;
    Ok(crate::Outcome::Success)
}

/// Epoll token of the listener.
const LISTENER: u64 = u64::MAX;

/// Accepts and drains connections: `Some(n)` until `n` have come and all
/// of them closed (returning the bytes received), `None` forever.
fn serve(listener: TcpListener, n: Option<usize>) -> anyhow::Result<u64> {
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    listener.set_nonblocking(true)?;
    epoll.add(
        listener.as_fd(),
        EpollEvent::new(EpollFlags::EPOLLIN, LISTENER),
    )?;
    let mut socks: Vec<Option<TcpStream>> = Vec::new();
    let mut free = Vec::new();
    let (mut accepted, mut open) = (0usize, 0usize);
    let mut total = 0u64;
    let mut events = vec![EpollEvent::empty(); 1024];
    let mut buf = vec![0u8; 4 << 20];
    while n.is_none_or(|n| accepted < n || open > 0) {
        let k = match epoll.wait(&mut events, 1000u16) {
            Ok(k) => k,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        for ev in &events[..k] {
            if ev.data() == LISTENER {
                while n.is_none_or(|n| accepted < n) {
                    let s = match listener.accept() {
                        Ok((s, _)) => s,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        // A standalone sink outlives a client that gave up.
                        Err(e) if n.is_none() => {
                            eprintln!("sink: accepting: {e}");
                            break;
                        }
                        Err(e) => return Err(e).context("sink: accepting"),
                    };
                    s.set_nonblocking(true)?;
                    // Wake only once 64 KiB wait (or at EOF): the sink stays
                    // cheap, so the sender, not the sink, is what is measured.
                    super::set_rcvlowat(&s, 64 << 10)?;
                    let i = free.pop().unwrap_or_else(|| {
                        socks.push(None);
                        socks.len() - 1
                    });
                    epoll.add(s.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, i as u64))?;
                    socks[i] = Some(s);
                    accepted += 1;
                    open += 1;
                }
                continue;
            }
            let i = ev.data() as usize;
            let Some(s) = socks[i].as_ref() else { continue };
            // One recv per readiness report: level-triggered epoll says
            // again if more is left, so no extra EAGAIN round trip.
            // TCP with MSG_TRUNC: the kernel discards, nothing is copied.
            let closed = match recv(s.as_raw_fd(), &mut buf, MsgFlags::MSG_TRUNC) {
                Ok(0) => true,
                Ok(m) => {
                    total += m as u64;
                    false
                }
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => false,
                // A standalone sink drops a reset connection, nothing more.
                Err(e) if n.is_none() => {
                    eprintln!("sink: recv: {e}");
                    true
                }
                Err(e) => return Err(e).context("sink: recv"),
            };
            if closed {
                epoll.delete(s.as_fd())?;
                socks[i] = None;
                free.push(i);
                open -= 1;
            }
        }
    }
    Ok(total)
}

/// A loopback listener on an ephemeral port (see [`listen`]).
fn listen_loopback() -> anyhow::Result<TcpListener> {
    listen(SocketAddr::from(([127, 0, 0, 1], 0)))
}

/// A listener on `addr` with the largest backlog (std's is 128), so ten
/// thousand connects never wait on SYN retries while the sink accepts.
fn listen(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    use nix::sys::socket::{
        bind, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
        SockaddrStorage,
    };
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    // As std sets it: a restarted sink may bind while old connections linger.
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    nix::sys::socket::listen(&fd, Backlog::MAXCONN)?;
    Ok(TcpListener::from(fd))
}
