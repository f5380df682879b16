//! `ringmover probe`: what this kernel supports and which backend we get.

use std::io::{self, Write};

use anyhow::Context;
use ringmover::probe::{feature_names, RingSupport};
use ringmover::{KernelReport, Opcode};
use serde::Serialize;

use crate::json::{self, Line};
use crate::units::human_bytes;
use crate::Outcome;

/// Report what the running kernel supports for ringmover: io_uring opcodes
/// by name, IORING_FEAT_* features, accepted set-up flags, the relevant
/// sysctls and limits, and the backend this host gets and why.
///
/// Works without io_uring too: it then says why a ring cannot be set up
/// (ENOSYS, EPERM from the sysctl or a seccomp filter, ENOMEM).
#[derive(Debug, clap::Args)]
#[command(long_about, after_long_help = AFTER_HELP)]
pub struct Args {
    /// Print one `probe` JSON line (schema "ringmover.probe/1", see
    /// docs/probe-json.md); with --require, one `probe-require` line.
    #[arg(long)]
    json: bool,

    /// Check that these io_uring opcodes are supported, e.g.
    /// `--require send_zc,splice` (case-insensitive, IORING_OP_ prefix optional).
    #[arg(long, value_name = "OP[,OP...]", value_delimiter = ',')]
    require: Vec<String>,
}

const AFTER_HELP: &str = "\
Examples:
  ringmover probe
  ringmover probe --json | jq .backend
  ringmover probe --require send_zc,splice && echo zero-copy ready
  RINGMOVER_BACKEND=epoll ringmover probe

Exit status:
  0  the report was printed (with --require: every opcode is supported)
  1  --require: an opcode is missing; or RINGMOVER_BACKEND forces a backend
     that cannot work here
  2  bad command line, or --require names an unknown opcode (or none)";

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    let report = KernelReport::collect();
    let stdout = io::stdout();
    let mut out = stdout.lock();

    if !args.require.is_empty() {
        return require(&report, &args.require, args.json, &mut out);
    }

    if args.json {
        json::write(&mut out, &to_json(&report)).context("writing to stdout")?;
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
    // `--require "$OPS"` with OPS empty must not pass for a check.
    if wanted.is_empty() {
        eprintln!(
            "ringmover: --require names no opcode (e.g. --require send_zc,splice; \
             `ringmover probe` lists the names)"
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
        let line = Require {
            required: wanted.iter().map(ToString::to_string).collect(),
            missing: missing.iter().map(ToString::to_string).collect(),
            ok: missing.is_empty(),
        };
        json::write(out, &line).context("writing to stdout")?;
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

/// The `probe-require` JSON line.
#[derive(Debug, Serialize)]
struct Require {
    required: Vec<String>,
    missing: Vec<String>,
    ok: bool,
}

impl Line for Require {
    const TYPE: &'static str = "probe-require";
}

fn limit_human(v: Option<u64>) -> String {
    v.map_or_else(|| String::from("unlimited"), human_bytes)
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
            match r.registered_files {
                Some(Ok(())) => row(
                    out,
                    "registered files",
                    "sparse table accepted: each connection named by its slot (IOSQE_FIXED_FILE)",
                )?,
                Some(Err(errno)) => row(
                    out,
                    "registered files",
                    &format!(
                        "refused ({}): connections use plain fds",
                        std::io::Error::from_raw_os_error(errno)
                    ),
                )?,
                None => {}
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
            .map_or_else(|| String::from("absent"), human_bytes),
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

/// The `probe` JSON line, schema `ringmover.probe/1` (docs/probe-json.md).
#[derive(Debug, Serialize)]
struct Probe {
    schema: &'static str,
    kernel: Kernel,
    sysctl: Sysctl,
    io_uring: IoUring,
    limits: Limits,
    backend: BackendJson,
}

impl Line for Probe {
    const TYPE: &'static str = "probe";
}

#[derive(Debug, Serialize)]
struct Kernel {
    release: String,
    machine: String,
}

#[derive(Debug, Serialize)]
struct Sysctl {
    io_uring_disabled: Option<u32>,
    io_uring_group: Option<i64>,
    pipe_max_size: Option<u64>,
}

#[derive(Debug, Serialize)]
struct IoUring {
    available: bool,
    error: Option<RingError>,
    probe_supported: bool,
    opcodes: Vec<OpcodeJson>,
    features: Vec<String>,
    features_raw: u32,
    setup_flags: Vec<SetupFlagJson>,
    registered_files: Option<RegisteredFilesJson>,
}

#[derive(Debug, Serialize)]
struct RegisteredFilesJson {
    supported: bool,
    errno: Option<i32>,
}

#[derive(Debug, Serialize)]
struct RingError {
    errno: Option<i32>,
    cause: &'static str,
    explanation: String,
}

#[derive(Debug, Serialize)]
struct OpcodeJson {
    code: u8,
    name: String,
}

#[derive(Debug, Serialize)]
struct SetupFlagJson {
    name: &'static str,
    since: &'static str,
    supported: bool,
    errno: Option<i32>,
}

#[derive(Debug, Serialize)]
struct Limits {
    memlock_soft: Option<u64>,
    memlock_hard: Option<u64>,
    registrable_bytes: Option<u64>,
}

#[derive(Debug, Serialize)]
struct BackendJson {
    selected: Option<&'static str>,
    forced: bool,
    reason: Option<String>,
    fallbacks: Vec<FallbackJson>,
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct FallbackJson {
    op: String,
    instead: String,
}

fn to_json(r: &KernelReport) -> Probe {
    let io_uring = match &r.ring {
        RingSupport::Available { features, opcodes } => IoUring {
            available: true,
            error: None,
            probe_supported: opcodes.is_some(),
            opcodes: r
                .opcodes()
                .iter()
                .map(|op| OpcodeJson {
                    code: op.0,
                    name: op.to_string(),
                })
                .collect(),
            features: feature_names(*features),
            features_raw: *features,
            setup_flags: r
                .setup_flags
                .iter()
                .map(|f| SetupFlagJson {
                    name: f.flag.name,
                    since: f.flag.since,
                    supported: f.supported,
                    errno: f.errno,
                })
                .collect(),
            registered_files: r.registered_files.map(|res| RegisteredFilesJson {
                supported: res.is_ok(),
                errno: res.err(),
            }),
        },
        RingSupport::Unavailable(why) => IoUring {
            available: false,
            error: Some(RingError {
                errno: why.errno(),
                cause: why.code(),
                explanation: why.to_string(),
            }),
            probe_supported: false,
            opcodes: Vec::new(),
            features: Vec::new(),
            features_raw: 0,
            setup_flags: Vec::new(),
            registered_files: None,
        },
    };
    let backend = match &r.selection {
        Ok(s) => BackendJson {
            selected: Some(s.backend.name()),
            forced: s.forced,
            reason: Some(s.reason.clone()),
            fallbacks: s
                .fallbacks
                .iter()
                .map(|f| FallbackJson {
                    op: f.op.to_string(),
                    instead: f.instead.to_string(),
                })
                .collect(),
            error: None,
        },
        Err(e) => BackendJson {
            selected: None,
            forced: true,
            reason: None,
            fallbacks: Vec::new(),
            error: Some(e.to_string()),
        },
    };
    Probe {
        schema: "ringmover.probe/1",
        kernel: Kernel {
            release: r.kernel_release.clone(),
            machine: r.machine.clone(),
        },
        sysctl: Sysctl {
            io_uring_disabled: r.io_uring_disabled,
            io_uring_group: r.io_uring_group,
            pipe_max_size: r.pipe_max_size,
        },
        io_uring,
        limits: Limits {
            memlock_soft: r.memlock.and_then(|m| m.soft),
            memlock_hard: r.memlock.and_then(|m| m.hard),
            registrable_bytes: r.registrable_bytes(),
        },
        backend,
    }
}
