//! `ringmover bench`: strategies side by side, in one run, with CPU-seconds
//! per GB (stable on a noisy machine, unlike wall time; see [`CpuMeter`]).

mod gather;
mod recv;
mod sink;
mod stream;
mod udp;
mod zerocopy;

use std::time::Duration;

use anyhow::Context;

use crate::Outcome;

/// Measure ringmover against the usual ways of doing the same job.
#[derive(Debug, clap::Args)]
#[command(after_long_help = AFTER_HELP)]
pub struct Args {
    #[command(subcommand)]
    which: Which,
}

const AFTER_HELP: &str = "\
Examples:
  ringmover bench gather --seconds 0.3 --conns 1,100 --shape small,srs
  ringmover bench recv --bytes 256MiB --runs 3
  ringmover bench zerocopy --sizes 4K,64K,1M --transport tcp
  ringmover bench fanout --conns 1,100 --json

Every bench prints a table, or with --json one line per row (`bench-gather`,
`bench-recv`, `bench-zerocopy`, `bench-fanout`; see docs/cli-json.md).

Exit status:
  0  every cell ran
  1  a cell failed (named on stderr)
  2  bad command line";

#[derive(Debug, clap::Subcommand)]
enum Which {
    #[command(after_long_help = concat!(
        "Examples:\n",
        "  ringmover bench gather\n",
        "  ringmover bench gather --seconds 0.3 --conns 1,100 --shape small,srs\n",
        "  ringmover bench gather --payload 1MiB --piece 16KiB --header 64 --json\n",
        "  ringmover bench sink --listen 127.0.0.1:7000 &\n",
        "  ringmover bench gather --to 127.0.0.1:7000 --conns 10000 --stalled 0,1 --queue 16K --shape small\n\n",
        "Exit status:\n",
        "  0  every cell ran\n",
        "  1  a cell failed (named on stderr)\n",
        "  2  bad command line",
    ))]
    Gather(gather::Args),
    /// A loopback TCP stream into a page-cache file: each backend against a
    /// read/write loop with a 64 KiB buffer.
    Recv(recv::Args),
    #[command(after_long_help = concat!(
        "Examples:\n",
        "  ringmover bench zerocopy\n",
        "  ringmover bench zerocopy --sizes 4K,64K,1M --strategy copy,zerocopy --transport tcp\n",
        "  sudo ringmover bench zerocopy --transport udp-veth --json\n\n",
        "Exit status:\n",
        "  0  every cell ran (udp-veth is skipped, with a note, where it cannot be set up)\n",
        "  1  a cell failed (named on stderr)\n",
        "  2  bad command line",
    ))]
    Zerocopy(zerocopy::ZcArgs),
    #[command(after_long_help = concat!(
        "Examples:\n",
        "  ringmover bench fanout\n",
        "  ringmover bench fanout --conns 1,100 --payload 4MiB --json\n\n",
        "Exit status:\n",
        "  0  every cell ran\n",
        "  1  a cell failed (named on stderr)\n",
        "  2  bad command line",
    ))]
    Fanout(zerocopy::FanoutArgs),
    Udp(udp::Args),
    /// The benches' discarding TCP sink as its own process, for `--to`.
    #[command(hide = true)]
    Sink(sink::Args),
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    match &args.which {
        Which::Gather(a) => gather::run(a),
        Which::Recv(a) => recv::run(a),
        Which::Zerocopy(a) => zerocopy::run_zc(a),
        Which::Fanout(a) => zerocopy::run_fanout(a),
        Which::Udp(a) => udp::run(a),
        Which::Sink(a) => sink::run(a),
    }
}

/// Options every side-by-side bench takes.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// How long each cell (strategy × size or connection count) runs.
    #[arg(long, value_parser = crate::units::parse_duration, default_value = "1s")]
    pub seconds: Duration,

    /// One JSON line per result row (`bench-gather`, `bench-zerocopy`,
    /// `bench-fanout`; see docs/cli-json.md).
    #[arg(long)]
    pub json: bool,
}

/// The CPU a bench charges to what it measures: this process's CPU (every
/// thread, so io_uring workers count) minus the threads named in `exclude`
/// (the built-in sink), plus the kernel's `ksoftirqd/N` threads.
///
/// Counting only the sending thread flattered batching: a flush of a
/// thousand loopback sends overruns the softirq budget, and the kernel
/// finishes that network work in ksoftirqd, which no getrusage of ours sees
/// (about 8% of the work, measured here). ksoftirqd also serves other
/// processes, so on a busy machine this overcounts a little, never under.
#[derive(Debug)]
pub struct CpuMeter {
    exclude: Vec<i32>,
    softirqd: Vec<i32>,
    start: Duration,
    start_user: Duration,
}

impl CpuMeter {
    /// Starts measuring now.
    pub fn start(exclude: &[i32]) -> CpuMeter {
        let softirqd = ksoftirqd_pids();
        let mut m = CpuMeter {
            exclude: exclude.to_vec(),
            softirqd,
            start: Duration::ZERO,
            start_user: Duration::ZERO,
        };
        m.start = m.total();
        m.start_user = m.user();
        m
    }

    /// The part of [`elapsed`](Self::elapsed) spent in user space, by this
    /// process's threads less the excluded ones (ksoftirqd has none). The
    /// kernel splits a thread's exact CPU time into user and system by its
    /// tick samples, so this is an estimate, good to a few percent over a
    /// second.
    pub fn elapsed_user(&self) -> Duration {
        self.user().saturating_sub(self.start_user)
    }

    fn user(&self) -> Duration {
        let me = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
            .map_or(Duration::ZERO, |r| tv(r.user_time()));
        let excluded: Duration = self.exclude.iter().map(|&t| task_user(t)).sum();
        me.saturating_sub(excluded)
    }

    /// CPU charged since `start`.
    pub fn elapsed(&self) -> Duration {
        self.total().saturating_sub(self.start)
    }

    fn total(&self) -> Duration {
        let me = process_cpu();
        let excluded: Duration = self
            .exclude
            .iter()
            .map(|t| task_cpu(&format!("/proc/self/task/{t}/schedstat")))
            .sum();
        let softirq: Duration = self
            .softirqd
            .iter()
            .map(|p| task_cpu(&format!("/proc/{p}/schedstat")))
            .sum();
        (me + softirq).saturating_sub(excluded)
    }
}

/// A thread's identity for [`CpuMeter::start`]'s `exclude`.
pub fn gettid() -> i32 {
    nix::unistd::gettid().as_raw()
}

/// CPU time (user + system) of every thread of this process.
fn process_cpu() -> Duration {
    rusage_cpu(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .expect("getrusage(RUSAGE_SELF) cannot fail")
}

/// CPU time (user + system) that `getrusage(who)` reports.
pub fn rusage_cpu(who: nix::sys::resource::UsageWho) -> std::io::Result<Duration> {
    let r = nix::sys::resource::getrusage(who)?;
    Ok(tv(r.user_time()) + tv(r.system_time()))
}

fn tv(t: nix::sys::time::TimeVal) -> Duration {
    Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000)
}

/// A thread of this process's user time, from `/proc/self/task/T/stat`
/// (`utime`, in clock ticks; 0 when the thread is gone).
fn task_user(tid: i32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the parenthesised name, which may hold spaces; utime is
    // the 14th field, the 12th after the name.
    let ticks = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(11)?.parse::<u64>().ok())
        .unwrap_or(0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100, |hz| hz.max(1) as u64);
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}

/// A task's time on CPU from its `schedstat` (nanoseconds; 0 when the task
/// is gone or the kernel lacks CONFIG_SCHED_INFO).
fn task_cpu(path: &str) -> Duration {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(Duration::ZERO, Duration::from_nanos)
}

fn ksoftirqd_pids() -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        comm.starts_with("ksoftirqd/").then_some(pid)
    })
    .collect()
}

/// Makes room for `need` more file descriptors than are open now: raises
/// `RLIMIT_NOFILE`'s soft limit (up to the hard one), and the hard limit
/// too where the kernel lets us (root, up to `fs.nr_open`). `what` says
/// who needs them ("10000 connections"), for the note on stderr when the
/// limit moves and for the error when it cannot, which ends with `hint`
/// (another way to need fewer) when given.
pub fn reserve_fds(need: u64, what: &str, hint: Option<&str>) -> anyhow::Result<()> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    // Already open (std streams, the sink's listener), plus room for the
    // few each cell opens besides its sockets (rings, epoll, eventfds).
    let open = std::fs::read_dir("/proc/self/fd").map_or(16, |d| d.count() as u64);
    let need = need + open + 64;
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(RLIMIT_NOFILE)")?;
    if soft >= need {
        return Ok(());
    }
    if hard >= need {
        setrlimit(Resource::RLIMIT_NOFILE, need, hard)
            .with_context(|| format!("setrlimit(RLIMIT_NOFILE, {need}, {hard})"))?;
        eprintln!(
            "note: raised RLIMIT_NOFILE's soft limit from {soft} to {need}: {what} need about {need} file descriptors"
        );
        return Ok(());
    }
    // Above the hard limit: only root (CAP_SYS_RESOURCE) may raise it, and
    // never above fs.nr_open; the kernel says EPERM either way.
    match setrlimit(Resource::RLIMIT_NOFILE, need, need) {
        Ok(()) => {
            eprintln!(
                "note: raised RLIMIT_NOFILE from {soft} (hard limit {hard}) to {need}: {what} need about {need} file descriptors"
            );
            Ok(())
        }
        Err(e) => {
            let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok());
            let fix = match nr_open {
                Some(max) if need > max => format!(
                    "that is above fs.nr_open ({max}), the most any process may open: \
                     raise it (sysctl fs.nr_open, as root)"
                ),
                _ if nix::unistd::geteuid().is_root() && !has_cap_sys_resource() => format!(
                    "this process is root but without CAP_SYS_RESOURCE (a container that \
                     drops it?), which raising the hard limit needs: raise it where the bench \
                     is started (e.g. `docker run --ulimit nofile={need}:{need}`)"
                ),
                _ => format!(
                    "raising the hard limit needs root (CAP_SYS_RESOURCE): run the bench as \
                     root, or raise the limit before it starts (`ulimit -n {need}` in a root shell)"
                ),
            };
            let hint = hint.map_or_else(String::new, |h| format!("; or {h}"));
            anyhow::bail!(
                "{what} need about {need} file descriptors, above RLIMIT_NOFILE's hard limit \
                 of {hard} (soft {soft}), and raising it failed ({e}): {fix}; or use fewer \
                 --conns{hint}"
            )
        }
    }
}

/// Whether this process holds CAP_SYS_RESOURCE (bit 24 of `CapEff` in
/// /proc/self/status), which raising a hard resource limit needs.
fn has_cap_sys_resource() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

/// Resets the process's peak RSS (`VmHWM`) so each run reports its own.
pub fn reset_peak_rss() {
    // What earlier cells freed stays resident in the allocator's arenas
    // (tokio's 200 MiB of buffers, say) and would count as the next
    // cell's peak: hand it back to the kernel first.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap memory; no pointer is
    // involved.
    unsafe {
        libc::malloc_trim(0);
    }
    // Linux 4.0+: writing 5 to clear_refs resets VmHWM. Best effort.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak RSS in bytes since the last reset (`VmHWM`).
pub fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// `setsockopt(fd, SOL_SOCKET, SO_RCVLOWAT, bytes)`: a bench sink is woken
/// only once `bytes` wait (or at EOF). nix has no wrapper for it.
pub fn set_rcvlowat(fd: &impl std::os::fd::AsRawFd, bytes: i32) -> std::io::Result<()> {
    // SAFETY: `bytes` is a live c_int and its size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&bytes as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Bytes the peer of TCP socket `fd` has acknowledged (`tcpi_bytes_acked`,
/// Linux 4.1): what its kernel received, whatever is still queued in the
/// sender, in user space or in flight. 0 if the kernel cannot say.
pub fn bytes_acked(fd: std::os::fd::RawFd) -> u64 {
    // SAFETY: all-zero is a valid tcp_info (integers only).
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is a live tcp_info and `len` its size; the kernel
    // writes at most `len` bytes and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        info.tcpi_bytes_acked
    } else {
        0
    }
}
