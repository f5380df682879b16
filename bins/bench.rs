//! `ringmover bench`: measured comparisons with their baselines in the same
//! run. One sub-subcommand per workload; add a variant and a module beside
//! this one (`bench_<name>.rs`) for the next.

use crate::Outcome;

/// Benchmarks: each prints ringmover's backends beside a plain baseline.
#[derive(Debug, clap::Subcommand)]
pub enum Bench {
    /// A loopback TCP stream into a page-cache file: each backend against a
    /// read/write loop with a 64 KiB buffer.
    Recv(crate::bench_recv::Args),
}

pub fn run(bench: &Bench) -> anyhow::Result<Outcome> {
    match bench {
        Bench::Recv(args) => crate::bench_recv::run(args),
    }
}
