//! `ringmover probe`: what this kernel supports and which backend we get.

use std::io::{self, Write};

use anyhow::Context;
use ringmover::probe::{feature_names, RingSupport};
use ringmover::{KernelReport, Opcode};
use serde_json::{json, Value};

use crate::Outcome;

/// Report what the running kernel supports for ringmover: io_uring opcodes
/// by name, IORING_FEAT_* features, accepted set-up flags, the relevant
/// sysctls and limits, and the backend this host gets and why.
///
/// Works without io_uring too: it then says why a ring cannot be set up
/// (ENOSYS, EPERM from the sysctl or a seccomp filter, ENOMEM).
///
/// Exit status: 0 on success; with --require, 1 when an opcode is missing and
/// 2 for an unknown opcode name. 1 when RINGMOVER_BACKEND forces a backend
/// that cannot work here.
#[derive(Debug, clap::Args)]
#[command(long_about)]
pub struct Args {
    /// Print JSON (schema "ringmover.probe/1", see docs/probe-json.md).
    #[arg(long)]
    json: bool,

    /// Check that these io_uring opcodes are supported, e.g.
    /// `--require send_zc,splice` (case-insensitive, IORING_OP_ prefix optional).
    #[arg(long, value_name = "OP[,OP...]", value_delimiter = ',')]
    require: Vec<String>,
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    let report = KernelReport::collect();
    let stdout = io::stdout();
    let mut out = stdout.lock();

    if !args.require.is_empty() {
        return require(&report, &args.require, args.json, &mut out);
    }

    if args.json {
        let text = serde_json::to_string_pretty(&to_json(&report))?;
        writeln!(out, "{text}").context("writing to stdout")?;
    } else {
        write_text(&report, &mut out).context("writing to stdout")?;
    }
    Ok(if report.selection.is_ok() {
        Outcome::Success
    } else {
        Outcome::Failed
    })
}

fn require(
    report: &KernelReport,
    names: &[String],
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<Outcome> {
    let mut wanted = Vec::new();
    let mut unknown = Vec::new();
    for name in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
        match Opcode::from_name(name) {
            Some(op) => wanted.push(op),
            None => unknown.push(name.to_owned()),
        }
    }
    if !unknown.is_empty() {
        eprintln!(
            "ringmover: unknown io_uring opcode name(s): {} (see `ringmover probe` for the names)",
            unknown.join(", ")
        );
        return Ok(Outcome::Usage);
    }
    let missing: Vec<Opcode> = wanted
        .iter()
        .copied()
        .filter(|&op| !report.ring.supports(op))
        .collect();
    let list = |ops: &[Opcode]| {
        ops.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if json {
        let v = json!({
            "required": wanted.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "missing": missing.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "ok": missing.is_empty(),
        });
        writeln!(out, "{v}").context("writing to stdout")?;
    } else if missing.is_empty() {
        writeln!(out, "supported: {}", list(&wanted)).context("writing to stdout")?;
    }
    if missing.is_empty() {
        return Ok(Outcome::Success);
    }
    let why = match &report.ring {
        RingSupport::Unavailable(why) => format!(" (io_uring unavailable: {why})"),
        RingSupport::Available { .. } => format!(" (kernel {})", report.kernel_release),
    };
    eprintln!(
        "ringmover: missing io_uring opcodes: {}{why}",
        list(&missing)
    );
    Ok(Outcome::Failed)
}

fn bytes_human(n: u64) -> String {
    const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (unit, size) in UNITS {
        if n >= size && n % size == 0 {
            return format!("{} {unit}", n / size);
        }
    }
    format!("{n} B")
}

fn limit_human(v: Option<u64>) -> String {
    v.map_or_else(|| String::from("unlimited"), bytes_human)
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref()
        .map_or_else(|| String::from("absent"), ToString::to_string)
}

fn write_text(r: &KernelReport, out: &mut impl Write) -> io::Result<()> {
    let row = |out: &mut dyn Write, k: &str, v: &str| writeln!(out, "{k:<20} {v}");
    row(
        out,
        "kernel",
        &format!("{} ({})", r.kernel_release, r.machine),
    )?;
    row(out, "io_uring_disabled", &opt(&r.io_uring_disabled))?;
    row(out, "io_uring_group", &opt(&r.io_uring_group))?;
    match &r.ring {
        RingSupport::Available { features, opcodes } => {
            row(out, "io_uring", "available")?;
            let ops = r.opcodes();
            let note = if opcodes.is_none() {
                " (no IORING_REGISTER_PROBE before 5.6: assuming the 5.1 set)"
            } else {
                ""
            };
            row(out, "opcodes", &format!("{} supported{note}", ops.len()))?;
            for chunk in ops.chunks(5) {
                let line: Vec<String> = chunk
                    .iter()
                    .map(|op| format!("{:>2} {:<18}", op.0, op.to_string()))
                    .collect();
                writeln!(out, "  {}", line.join("").trim_end())?;
            }
            row(out, "features", &feature_names(*features).join(" "))?;
            let (yes, no): (Vec<_>, Vec<_>) = r.setup_flags.iter().partition(|f| f.supported);
            let names = |v: &[&ringmover::probe::SetupFlagResult]| {
                v.iter().map(|f| f.flag.name).collect::<Vec<_>>().join(" ")
            };
            row(out, "setup flags", &names(&yes))?;
            if !no.is_empty() {
                row(out, "  rejected", &names(&no))?;
            }
        }
        RingSupport::Unavailable(why) => {
            row(out, "io_uring", &format!("unavailable: {why}"))?;
        }
    }
    if let Some(m) = r.memlock {
        row(
            out,
            "RLIMIT_MEMLOCK",
            &format!(
                "{} (hard {}): registered buffers up to {}",
                limit_human(m.soft),
                limit_human(m.hard),
                limit_human(r.registrable_bytes())
            ),
        )?;
    }
    row(
        out,
        "pipe-max-size",
        &r.pipe_max_size
            .map_or_else(|| String::from("absent"), bytes_human),
    )?;
    match &r.selection {
        Ok(s) => {
            row(out, "backend", &format!("{} ({})", s.backend, s.reason))?;
            for f in &s.fallbacks {
                row(out, "  fallback", &format!("{}: {}", f.op, f.instead))?;
            }
        }
        Err(e) => row(out, "backend", &format!("error: {e}"))?,
    }
    Ok(())
}

fn to_json(r: &KernelReport) -> Value {
    let io_uring = match &r.ring {
        RingSupport::Available { features, opcodes } => json!({
            "available": true,
            "error": Value::Null,
            "probe_supported": opcodes.is_some(),
            "opcodes": r.opcodes().iter().map(|op| json!({"code": op.0, "name": op.to_string()})).collect::<Vec<_>>(),
            "features": feature_names(*features),
            "features_raw": features,
            "setup_flags": r.setup_flags.iter().map(|f| json!({
                "name": f.flag.name,
                "since": f.flag.since,
                "supported": f.supported,
                "errno": f.errno,
            })).collect::<Vec<_>>(),
        }),
        RingSupport::Unavailable(why) => json!({
            "available": false,
            "error": {
                "errno": why.errno(),
                "cause": why.code(),
                "explanation": why.to_string(),
            },
            "probe_supported": false,
            "opcodes": [],
            "features": [],
            "features_raw": 0,
            "setup_flags": [],
        }),
    };
    let backend = match &r.selection {
        Ok(s) => json!({
            "selected": s.backend.name(),
            "forced": s.forced,
            "reason": s.reason,
            "fallbacks": s.fallbacks.iter().map(|f| json!({"op": f.op.to_string(), "instead": f.instead})).collect::<Vec<_>>(),
            "error": Value::Null,
        }),
        Err(e) => json!({
            "selected": Value::Null,
            "forced": true,
            "reason": Value::Null,
            "fallbacks": [],
            "error": e,
        }),
    };
    json!({
        "schema": "ringmover.probe/1",
        "kernel": {"release": r.kernel_release, "machine": r.machine},
        "sysctl": {
            "io_uring_disabled": r.io_uring_disabled,
            "io_uring_group": r.io_uring_group,
            "pipe_max_size": r.pipe_max_size,
        },
        "io_uring": io_uring,
        "limits": {
            "memlock_soft": r.memlock.and_then(|m| m.soft),
            "memlock_hard": r.memlock.and_then(|m| m.hard),
            "registrable_bytes": r.registrable_bytes(),
        },
        "backend": backend,
    })
}
