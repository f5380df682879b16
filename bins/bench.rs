//! `ringmover bench`: strategies side by side, in one run, with CPU-seconds
//! per GB from getrusage (stable on a noisy machine, unlike wall time).

mod gather;
mod recv;
mod sink;
mod zerocopy;

use std::time::Duration;

use crate::Outcome;

/// Measure ringmover against the usual ways of doing the same job.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    which: Which,
}

#[derive(Debug, clap::Subcommand)]
enum Which {
    Gather(gather::Args),
    /// A loopback TCP stream into a page-cache file: each backend against a
    /// read/write loop with a 64 KiB buffer.
    Recv(recv::Args),
    Zerocopy(zerocopy::ZcArgs),
    Fanout(zerocopy::FanoutArgs),
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    match &args.which {
        Which::Gather(a) => gather::run(a),
        Which::Recv(a) => recv::run(a),
        Which::Zerocopy(a) => zerocopy::run_zc(a),
        Which::Fanout(a) => zerocopy::run_fanout(a),
    }
}

/// Options every side-by-side bench takes.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// How long each cell (strategy × size or connection count) runs.
    #[arg(long, value_parser = crate::units::parse_duration, default_value = "1s")]
    pub seconds: Duration,

    /// One JSON object per result line.
    #[arg(long)]
    pub json: bool,
}

/// CPU time (user + system) of the calling thread.
pub fn thread_cpu() -> Duration {
    let r = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_THREAD)
        .expect("getrusage(RUSAGE_THREAD) cannot fail for the calling thread");
    let tv =
        |t: nix::sys::time::TimeVal| Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000);
    tv(r.user_time()) + tv(r.system_time())
}

/// Resets the process's peak RSS (`VmHWM`) so each run reports its own.
pub fn reset_peak_rss() {
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
