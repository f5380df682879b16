//! `ringmover`: a thin command line over the ringmover library.

// The benches measure io_uring against the alternatives, with Linux-only
// tools (epoll sink, veth namespaces, per-thread rusage, /proc).
#[cfg(target_os = "linux")]
mod bench;
mod probe;
mod recv;
mod send;
mod signals;
mod units;

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Move bytes between memory, sockets and files with as few copies and
/// system calls as the kernel allows (io_uring, with epoll/poll fallback).
///
/// The backend is chosen at run time; set RINGMOVER_BACKEND=uring|epoll|poll
/// to force one (forcing uring where it cannot work is an error).
#[derive(Debug, Parser)]
#[command(name = "ringmover", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Probe(probe::Args),
    Recv(recv::Args),
    Send(send::Args),
    #[cfg(target_os = "linux")]
    Bench(bench::Args),
}

/// How a subcommand ended, when it did not fail outright.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// A check failed (exit status 1), already reported.
    Failed,
    /// A usage error (exit status 2), already reported.
    Usage,
    /// Stopped by this signal (exit status 128 + its number), already
    /// reported.
    Signal(nix::sys::signal::Signal),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Probe(args) => probe::run(&args),
        Command::Recv(args) => recv::run(&args),
        Command::Send(args) => send::run(&args),
        #[cfg(target_os = "linux")]
        Command::Bench(args) => bench::run(&args),
    };
    match result {
        Ok(Outcome::Success) => ExitCode::SUCCESS,
        Ok(Outcome::Failed) => ExitCode::from(1),
        Ok(Outcome::Usage) => ExitCode::from(2),
        Ok(Outcome::Signal(sig)) => ExitCode::from(signals::exit_status(sig)),
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "ringmover: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// A closed stdout (`ringmover probe | head`) is not a failure. (`send`
/// reports its own errors, so a socket's EPIPE never arrives here.)
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
