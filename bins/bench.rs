//! `ringmover bench`: strategies side by side, in one run, with CPU-seconds
//! per GB from getrusage (stable on a noisy machine, unlike wall time).

mod gather;

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
    Recv(crate::bench_recv::Args),
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    match &args.which {
        Which::Gather(a) => gather::run(a),
        Which::Recv(a) => crate::bench_recv::run(a),
    }
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

/// Parses `1.5`, `2s`, `500ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, scale) = if let Some(v) = s.strip_suffix("ms") {
        (v, 1e-3)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 2, 2s, 500ms)"))?;
    if !(v.is_finite() && v >= 0.0) {
        return Err(format!("{s:?} is not a duration"));
    }
    Ok(Duration::from_secs_f64(v * scale))
}

/// Parses `156K`, `10KiB`, `512`, `1M`.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let upper = t.to_ascii_uppercase();
    let digits_end = upper
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(upper.len());
    let (num, unit) = upper.split_at(digits_end);
    let n: usize = num
        .parse()
        .map_err(|_| format!("{t:?} is not a size (e.g. 512, 10K, 156KiB, 1M)"))?;
    let mul = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => return Err(format!("{t:?}: unknown unit {unit:?}")),
    };
    n.checked_mul(mul)
        .ok_or_else(|| format!("{t:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!(parse_size("156K"), Ok(156 * 1024));
        assert_eq!(parse_size("10KiB"), Ok(10 * 1024));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("12X").is_err());
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("-1").is_err());
    }
}
