//! Progress on stderr, like pv: on a terminal one line redrawn in place
//! (indicatif) with bytes, rate, and with a known size the percentage and
//! ETA; with `--progress` on a pipe or file, a plain line every second;
//! otherwise nothing. A clean final line either way.

use std::io::{self, IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

use crate::units::{human_bytes, human_rate};

/// `--progress` / `--no-progress`, shared by `recv` and `send`.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct ProgressArgs {
    /// Show progress on stderr even when it is not a terminal (then as a
    /// plain line every second). On a terminal it is the default: one line
    /// redrawn in place.
    #[arg(long, overrides_with = "no_progress")]
    progress: bool,

    /// Never show progress.
    #[arg(long)]
    no_progress: bool,
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Off,
    /// One line redrawn in place (stderr is a terminal).
    Bar,
    /// A plain line every second (`--progress`, stderr not a terminal).
    Lines,
}

impl ProgressArgs {
    pub fn mode(&self) -> Mode {
        if self.no_progress {
            Mode::Off
        } else if io::stderr().is_terminal() {
            Mode::Bar
        } else if self.progress {
            Mode::Lines
        } else {
            Mode::Off
        }
    }
}

/// How often a plain progress line is printed.
const LINE_EVERY: Duration = Duration::from_secs(1);

/// One transfer's progress (or a server's, summed over its connections).
#[derive(Debug)]
pub struct Meter {
    mode: Mode,
    bar: Option<ProgressBar>,
    label: String,
    total: Option<u64>,
    note: String,
    /// (when, bytes) of the last plain line, for its rate.
    last: (Instant, u64),
}

impl Meter {
    /// `label` starts every line (e.g. the peer); `total` is the size when
    /// known (then percentage and ETA).
    pub fn new(mode: Mode, label: impl Into<String>, total: Option<u64>) -> Meter {
        let label = label.into();
        let bar = (mode == Mode::Bar).then(|| {
            let bar = match total {
                Some(n) => ProgressBar::with_draw_target(Some(n), ProgressDrawTarget::stderr()),
                None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
            };
            bar.set_style(style(total.is_some()));
            bar.set_prefix(label.clone());
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Meter {
            mode,
            bar,
            label,
            total,
            note: String::new(),
            last: (Instant::now(), 0),
        }
    }

    /// Whether anything is shown.
    pub fn enabled(&self) -> bool {
        self.mode != Mode::Off
    }

    /// The bar, for a thread that must clear it before exiting.
    pub fn bar(&self) -> Option<ProgressBar> {
        self.bar.clone()
    }

    /// `bytes` moved so far; `note` is shown after the figures (e.g. `3
    /// connections`).
    pub fn update(&mut self, bytes: u64, note: &str) {
        match self.mode {
            Mode::Off => {}
            Mode::Bar => {
                if let Some(bar) = &self.bar {
                    bar.set_position(bytes);
                    if note != self.note {
                        self.note = note.to_owned();
                        bar.set_message(self.note.clone());
                    }
                }
            }
            Mode::Lines => {
                let elapsed = self.last.0.elapsed();
                if elapsed < LINE_EVERY {
                    return;
                }
                let rate = bytes.saturating_sub(self.last.1) as f64 / elapsed.as_secs_f64();
                self.last = (Instant::now(), bytes);
                let line = self.plain_line(bytes, rate, note);
                let _ = writeln!(io::stderr(), "{line}");
            }
        }
    }

    fn plain_line(&self, bytes: u64, rate: f64, note: &str) -> String {
        let mut line = format!("{}: {}", self.label, human_bytes(bytes));
        if let Some(total) = self.total.filter(|&t| t > 0) {
            let pct = (bytes.min(total) as f64 * 100.0 / total as f64) as u32;
            line += &format!(" of {} ({pct}%)", human_bytes(total));
        }
        line += &format!(" at {}", human_rate(rate));
        if let Some(total) = self.total {
            if rate > 0.0 && bytes < total {
                let eta = Duration::from_secs_f64((total - bytes) as f64 / rate);
                line += &format!(", ETA {}", clock(eta));
            }
        }
        if !note.is_empty() {
            line += &format!(", {note}");
        }
        line
    }

    /// Prints `line` on stderr above the bar (never through it). Returns
    /// whether stderr took it.
    pub fn println(&self, line: std::fmt::Arguments<'_>) -> bool {
        let write = || writeln!(io::stderr(), "{line}").is_ok();
        match &self.bar {
            Some(bar) => bar.suspend(write),
            None => write(),
        }
    }

    /// Removes the bar; then `last` (the final line), if any, is printed
    /// when progress is shown.
    pub fn finish(&mut self, last: Option<std::fmt::Arguments<'_>>) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if let (true, Some(line)) = (self.enabled(), last) {
            let _ = writeln!(io::stderr(), "{line}");
        }
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// `H:MM:SS` or `M:SS`.
pub fn clock(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s % 3600 / 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

/// The bar's line, with this module's byte formatter (not indicatif's).
fn style(sized: bool) -> ProgressStyle {
    let template = if sized {
        "{prefix}: {bytes_h} of {total_h} [{wide_bar}] {percent:>3}% {rate_h} ETA {eta_h}"
    } else {
        "{spinner} {prefix}: {bytes_h} at {rate_h}, {elapsed_h} {msg}"
    };
    ProgressStyle::with_template(template)
        .expect("a valid progress template")
        .progress_chars("=> ")
        .with_key(
            "bytes_h",
            |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = w.write_str(&human_bytes(s.pos()));
            },
        )
        .with_key(
            "total_h",
            |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = w.write_str(&human_bytes(s.len().unwrap_or(0)));
            },
        )
        .with_key(
            "rate_h",
            |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = w.write_str(&human_rate(s.per_sec()));
            },
        )
        .with_key("eta_h", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = w.write_str(&clock(s.eta()));
        })
        .with_key(
            "elapsed_h",
            |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = w.write_str(&clock(s.elapsed()));
            },
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks() {
        assert_eq!(clock(Duration::from_secs(5)), "0:05");
        assert_eq!(clock(Duration::from_secs(754)), "12:34");
        assert_eq!(clock(Duration::from_secs(3723)), "1:02:03");
    }

    #[test]
    fn plain_lines_say_percentage_and_eta_when_the_size_is_known() {
        let m = Meter::new(Mode::Lines, "host:1", Some(4 << 20));
        assert_eq!(
            m.plain_line(1 << 20, (1 << 20) as f64, ""),
            "host:1: 1 MiB of 4 MiB (25%) at 1 MiB/s, ETA 0:03"
        );
        let m = Meter::new(Mode::Lines, "listening", None);
        assert_eq!(
            m.plain_line(1536, 0.0, "2 connections"),
            "listening: 1.5 KiB at 0 B/s, 2 connections"
        );
    }

    #[test]
    fn the_template_is_valid() {
        let _ = style(true);
        let _ = style(false);
    }
}
