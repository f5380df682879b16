//! Probe and choose: what this kernel offers, which backend the crate
//! selects and why, which operations fall back to what, and the same as
//! an engine reports it once built. The library half of `ringmover
//! probe`, in a few lines.
//!
//! `cargo run --example probe` (RINGMOVER_BACKEND=epoll forces a backend).

use ringmover::{Backend, KernelReport, Mover, Opcode, RingSupport};

fn main() -> std::io::Result<()> {
    let report = KernelReport::collect();
    println!("kernel {} ({})", report.kernel_release, report.machine);
    match &report.ring {
        RingSupport::Available { features, .. } => println!(
            "io_uring: available, {} opcodes, features {:#x}",
            report.opcodes().len(),
            features
        ),
        RingSupport::Unavailable(why) => println!("io_uring: unavailable: {why}"),
    }
    let accepted: Vec<&str> = report
        .setup_flags
        .iter()
        .filter(|f| f.supported)
        .map(|f| f.flag.name)
        .collect();
    println!("set-up flags accepted: {}", accepted.join(", "));
    for op in [Opcode::SEND_ZC, Opcode::SENDMSG_ZC, Opcode::SPLICE] {
        println!("  {op}: {}", RingSupport::detect().supports(op));
    }
    let compiled: Vec<&str> = Backend::compiled().map(Backend::name).collect();
    println!("backends compiled in: {}", compiled.join(", "));

    // What a Mover built here selects: the backend, why, and each
    // operation that runs on a fallback path.
    let mover = Mover::builder().build()?;
    let selection = mover.selection();
    println!(
        "selected: {}{} ({})",
        selection.backend,
        if selection.forced { ", forced" } else { "" },
        selection.reason
    );
    if let Some(why) = &selection.uring_unavailable {
        println!("  io_uring not used: {why}");
    }
    if selection.fallbacks.is_empty() {
        println!("fallbacks: none");
    }
    for f in &selection.fallbacks {
        println!("fallback: {} missing, using {}", f.op, f.instead);
    }
    println!("zero-copy policy in force: {:?}", mover.zero_copy());
    Ok(())
}
