//! `ringmover`: a thin command line over the ringmover library.

// The benches measure io_uring against the alternatives, with Linux-only
// tools (epoll sink, veth namespaces, per-thread rusage, /proc).
#[cfg(target_os = "linux")]
mod bench;
mod json;
mod probe;
mod progress;
mod recv;
mod send;
mod signals;
mod units;

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};

/// Move bytes between memory, sockets and files with as few copies and
/// system calls as the kernel allows (io_uring, with epoll/poll fallback).
///
/// The backend is chosen at run time; set RINGMOVER_BACKEND=uring|epoll|poll
/// to force one (forcing uring where it cannot work is an error).
#[derive(Debug, Parser)]
#[command(name = "ringmover", version, about, long_about, after_long_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

const AFTER_HELP: &str = "\
Examples:
  ringmover probe                                   # what this kernel supports, which backend
  ringmover recv --listen 0.0.0.0:7000 --out /srv/incoming
  ringmover send backup.tar --to host:7000
  ringmover bench recv --bytes 256MiB
  ringmover completions bash > /etc/bash_completion.d/ringmover

`ringmover COMMAND --help` gives each command's examples and exit status.
--json output: one object per line, each with a `type` (docs/cli-json.md).

Exit status (every command):
  0    success
  1    failure (said on stderr)
  2    bad command line
  130  interrupted by SIGINT, 143 by SIGTERM (recv, send)";

#[derive(Debug, Subcommand)]
enum Command {
    Probe(probe::Args),
    Recv(recv::Args),
    Send(send::Args),
    #[cfg(target_os = "linux")]
    Bench(bench::Args),
    Completions(CompletionsArgs),
    /// Print the man page (roff) on stdout: `ringmover man > ringmover.1`.
    #[command(hide = true)]
    Man,
}

/// Print a shell completion script on stdout.
#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
Examples:
  ringmover completions bash > ~/.local/share/bash-completion/completions/ringmover
  ringmover completions zsh > ~/.zfunc/_ringmover
  ringmover completions fish > ~/.config/fish/completions/ringmover.fish

Exit status:
  0  the script was printed
  2  bad command line (an unknown shell)")]
struct CompletionsArgs {
    /// The shell: bash, elvish, fish, powershell or zsh.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

fn completions(args: &CompletionsArgs) -> anyhow::Result<Outcome> {
    let mut out = Vec::new();
    clap_complete::generate(args.shell, &mut Cli::command(), "ringmover", &mut out);
    std::io::stdout()
        .write_all(&out)
        .context("writing to stdout")?;
    Ok(Outcome::Success)
}

/// The man page of ringmover and of every subcommand, one roff document.
fn man() -> anyhow::Result<Outcome> {
    let mut out = Vec::new();
    let cmd = Cli::command();
    clap_mangen::Man::new(cmd.clone()).render(&mut out)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let sub = sub
            .clone()
            .display_name(format!("ringmover-{}", sub.get_name()))
            .bin_name(format!("ringmover {}", sub.get_name()));
        clap_mangen::Man::new(sub).render(&mut out)?;
    }
    std::io::stdout()
        .write_all(&out)
        .context("writing to stdout")?;
    Ok(Outcome::Success)
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
        Command::Completions(args) => completions(&args),
        Command::Man => man(),
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
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        super::Cli::command().debug_assert();
    }

    /// Every command (and subcommand) has examples and an exit status in
    /// its long help.
    #[test]
    fn every_command_has_examples_and_exit_status() {
        fn walk(cmd: &clap::Command, path: &str) {
            let path = format!("{path} {}", cmd.get_name());
            if !cmd.is_hide_set() && cmd.get_name() != "help" {
                let after = cmd
                    .get_after_long_help()
                    .map(ToString::to_string)
                    .unwrap_or_default();
                assert!(after.contains("Examples:"), "{path}: no examples");
                assert!(after.contains("Exit status"), "{path}: no exit status");
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &path);
            }
        }
        walk(&super::Cli::command(), "");
    }
}
