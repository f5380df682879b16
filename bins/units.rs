//! Units on the command line and in reports: durations, byte sizes, rates
//! (for people; JSON units are in `json.rs`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Parses `30s`, `500ms`, `2m`, `1h` or a plain number of seconds (`1.5`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 30s, 500ms, 2m"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!(
            "invalid duration {s:?}: must be a non-negative number"
        ));
    }
    // `from_secs_f64` panics past u64 seconds: say so instead.
    Duration::try_from_secs_f64(v * scale).map_err(|_| format!("duration {s:?} is too long"))
}

/// The longest timeout accepted: a year. Deadlines are `Instant + timeout`,
/// which overflows (and panics) long before `Duration::MAX`.
const MAX_TIMEOUT: Duration = Duration::from_secs(365 * 86_400);

/// Parses a timeout: a duration greater than zero and at most a year.
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!("timeout {s:?} must be greater than 0"));
    }
    if d > MAX_TIMEOUT {
        return Err(format!("timeout {s:?} is longer than a year"));
    }
    Ok(d)
}

/// A timeout that may be switched off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit(pub Option<Duration>);

/// Parses a timeout as [`parse_timeout`] does, or `off` for none.
pub fn parse_limit(s: &str) -> Result<Limit, String> {
    if s.trim().eq_ignore_ascii_case("off") {
        Ok(Limit(None))
    } else {
        parse_timeout(s).map(|d| Limit(Some(d)))
    }
}

/// Parses a count of at least 1.
pub fn parse_count(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("invalid count {s:?}: expected a whole number")),
    }
}

/// Parses a byte count as dd(1) does: `1000`; `64K`, `64KiB`, `2G`,
/// `2GiB` (powers of 1024); `64KB`, `10GB` (powers of 1000). Case does not
/// matter.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let upper = t.to_ascii_uppercase();
    let (body, base) = if let Some(b) = upper.strip_suffix("IB") {
        (b, 1024u64)
    } else if let Some(b) = upper.strip_suffix('B') {
        (b, 1000)
    } else {
        (upper.as_str(), 1024)
    };
    let (num, power) = match body.chars().last() {
        Some('K') => (&body[..body.len() - 1], 1),
        Some('M') => (&body[..body.len() - 1], 2),
        Some('G') => (&body[..body.len() - 1], 3),
        Some('T') => (&body[..body.len() - 1], 4),
        // A bare `B` is bytes; a bare `iB` is nothing.
        _ if base == 1000 || body == upper => (body, 0),
        _ => {
            return Err(format!(
                "invalid size {s:?}: expected e.g. 1000, 64K, 10GB, 2GiB"
            ))
        }
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected e.g. 1000, 64K, 10GB, 2GiB"))?;
    n.checked_mul(base.pow(power))
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// The CLI's one byte formatter, in powers of 1024: `512 B`, `64 KiB`
/// (exact), `1.5 MiB` (one decimal otherwise).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut i = 0;
    while i + 1 < UNITS.len() && n >= 1u64 << (10 * (i + 1)) {
        i += 1;
    }
    let unit = 1u64 << (10 * i);
    if n % unit == 0 {
        return format!("{} {}", n / unit, UNITS[i]);
    }
    let v = n as f64 / unit as f64;
    // 1023.97 KiB would print as "1024.0 KiB".
    if v >= 1023.95 && i + 1 < UNITS.len() {
        return format!("{:.1} {}", v / 1024.0, UNITS[i + 1]);
    }
    format!("{v:.1} {}", UNITS[i])
}

/// A rate for people: `human_bytes` per second.
pub fn human_rate(bytes_per_s: f64) -> String {
    let n = if bytes_per_s.is_finite() && bytes_per_s > 0.0 {
        bytes_per_s as u64
    } else {
        0
    };
    format!("{}/s", human_bytes(n))
}

/// The current UTC time as `20261123T101507.123456Z`.
pub fn utc_stamp(now: SystemTime) -> String {
    let d = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{day:02}T{:02}{:02}{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("1e30").is_err(), "too long, not a panic");
    }

    #[test]
    fn timeouts_and_counts() {
        assert_eq!(parse_timeout("300ms"), Ok(Duration::from_millis(300)));
        assert!(parse_timeout("0").is_err());
        assert!(parse_timeout("1e19").is_err());
        assert!(parse_timeout("1e30").is_err());
        assert_eq!(parse_limit("off"), Ok(Limit(None)));
        assert_eq!(parse_limit("5m"), Ok(Limit(Some(Duration::from_secs(300)))));
        assert_eq!(parse_count("3"), Ok(3));
        assert!(parse_count("0").is_err());
        assert!(parse_count("-1").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2gib"), Ok(2 << 30));
        assert_eq!(parse_size("10GB"), Ok(10_000_000_000));
        assert_eq!(parse_size("64kB"), Ok(64_000));
        assert_eq!(parse_size("1TB"), Ok(1_000_000_000_000));
        assert_eq!(parse_size("512B"), Ok(512));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5iB").is_err());
        assert!(parse_size("GB").is_err());
        assert!(parse_size("99999999999T").is_err(), "too large, not a wrap");
    }

    #[test]
    fn byte_formatter() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(8 << 20), "8 MiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes((1 << 20) - 1), "1.0 MiB");
        assert!(
            human_bytes(u64::MAX).ends_with(" PiB"),
            "no panic at the top"
        );
        assert_eq!(human_rate(1048576.0), "1 MiB/s");
        assert_eq!(human_rate(f64::NAN), "0 B/s");
    }

    #[test]
    fn stamps() {
        let t = UNIX_EPOCH + Duration::from_micros(1_795_428_907_123_456);
        assert_eq!(utc_stamp(t), "20261123T101507.123456Z");
        assert_eq!(utc_stamp(UNIX_EPOCH), "19700101T000000.000000Z");
    }
}
