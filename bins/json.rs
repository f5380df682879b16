//! One JSON convention for every `--json` output (docs/cli-json.md).
//!
//! Each report is one JSON object on one line of stdout, with a `type`
//! first naming what the line is (cargo's `--message-format json` style):
//! `{"type":"recv-connection",...}`. Units are the same everywhere: byte
//! counts are integers named for what they count (`bytes`, `payload`, ...),
//! durations are `seconds` (a float), rates are `gb_per_s` (1e9 bytes per
//! second), CPU cost is `cpu_s_per_gb` (CPU-seconds per 1e9 bytes).
//!
//! A line is a serde-derived struct that implements [`Line`], written with
//! [`write`]. (For a `serde_json::json!` value, [`write_typed`].)

use std::io::{self, Write};

use serde::Serialize;

/// A struct printed as one `--json` line of type [`Line::TYPE`].
pub trait Line: Serialize {
    /// The line's `type`, e.g. `"recv-connection"`.
    const TYPE: &'static str;
}

/// `{"type": TYPE, ...the fields of line}`.
#[derive(Serialize)]
struct Typed<'a, T: ?Sized> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(flatten)]
    line: &'a T,
}

fn typed_string<T: Serialize + ?Sized>(kind: &str, line: &T) -> serde_json::Result<String> {
    serde_json::to_string(&Typed { kind, line })
}

/// Writes `line` and a newline to `out`, and flushes it (a reader of a
/// pipe sees each line as it happens).
pub fn write<T: Line>(out: &mut impl Write, line: &T) -> io::Result<()> {
    write_typed(out, T::TYPE, line)
}

/// Writes `line` (which must serialize to a JSON object, e.g. a
/// `serde_json::json!({...})`) as one line of type `kind`.
pub fn write_typed<T: Serialize + ?Sized>(
    out: &mut impl Write,
    kind: &str,
    line: &T,
) -> io::Result<()> {
    let text = typed_string(kind, line).map_err(io::Error::other)?;
    writeln!(out, "{text}")?;
    out.flush()
}

/// Bytes per second in GB/s (1e9 bytes per second): every `gb_per_s`.
pub fn gb_per_s(bytes: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        bytes as f64 / seconds / 1e9
    } else {
        0.0
    }
}

/// CPU-seconds per 1e9 bytes: every `cpu_s_per_gb` (the benches, Linux only).
#[cfg(target_os = "linux")]
pub fn cpu_s_per_gb(cpu_seconds: f64, bytes: u64) -> f64 {
    if bytes > 0 {
        cpu_seconds / (bytes as f64 / 1e9)
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Sample {
        bytes: u64,
        error: Option<String>,
    }

    impl Line for Sample {
        const TYPE: &'static str = "sample";
    }

    #[test]
    fn type_comes_first_on_one_line() {
        let mut out = Vec::new();
        let s = Sample {
            bytes: 3,
            error: None,
        };
        write(&mut out, &s).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"type\":\"sample\",\"bytes\":3,\"error\":null}\n"
        );
        let mut out = Vec::new();
        write_typed(&mut out, "other", &serde_json::json!({"a": 1})).unwrap();
        assert_eq!(out, b"{\"type\":\"other\",\"a\":1}\n");
    }

    #[test]
    fn a_non_object_is_an_error_not_a_panic() {
        let mut out = Vec::new();
        assert!(write_typed(&mut out, "x", &5).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn units() {
        assert_eq!(gb_per_s(2_000_000_000, 2.0), 1.0);
        assert_eq!(gb_per_s(5, 0.0), 0.0);
        #[cfg(target_os = "linux")]
        assert_eq!(cpu_s_per_gb(0.5, 1_000_000_000), 0.5);
    }
}
