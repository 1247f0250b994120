//! Go's `time.ParseDuration` grammar, which is what Kubernetes `metav1.Duration` fields accept
//! and what cluster users already write (`30s`, `1m30s`, `1.5h`, `250ms`). Hand-written because
//! the maintained Rust duration crates accept a different grammar (`30sec`, `1 minute`), and a
//! spec must mean the same thing locally and in the cluster.

use std::{fmt::Write as _, time::Duration};

const UNITS: [(&str, u128); 7] = [
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
];

/// Parses a non-negative Go duration. The error says what is wrong with the text.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let err =
        |why: &str| format!("\"{text}\" is not a duration ({why}); use e.g. 30s, 1m30s, 500ms");
    let mut rest = text.trim();
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(err("empty"));
    }
    if rest.starts_with('-') {
        return Err(err("negative"));
    }
    let mut total_ns: u128 = 0;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, after) = rest.split_at(num_len);
        if num.is_empty() || num == "." || num.matches('.').count() > 1 {
            return Err(err("expected a number"));
        }
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let Some(&(_, scale)) = UNITS.iter().find(|(u, _)| *u == unit) else {
            return Err(err(if unit.is_empty() {
                "missing unit"
            } else {
                "unknown unit"
            }));
        };
        let (int, frac) = num.split_once('.').unwrap_or((num, ""));
        let int: u128 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| err("number too large"))?
        };
        let mut ns = int.checked_mul(scale).ok_or_else(|| err("too large"))?;
        // Fractional part, exact to the nanosecond like Go.
        let mut place = scale;
        for d in frac.bytes().take(18) {
            place /= 10;
            ns += u128::from(d - b'0') * place;
        }
        total_ns = total_ns.checked_add(ns).ok_or_else(|| err("too large"))?;
        rest = after;
    }
    let secs = u64::try_from(total_ns / 1_000_000_000).map_err(|_| err("too large"))?;
    let nanos = u32::try_from(total_ns % 1_000_000_000).expect("remainder of a division by 1e9");
    Ok(Duration::new(secs, nanos))
}

/// Formats like Go's `Duration.String` for whole units (`1h30m0s`, `250ms`, `0s`).
#[must_use]
pub fn format_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".into();
    }
    if d < Duration::from_secs(1) {
        let ns = d.as_nanos();
        return if ns.is_multiple_of(1_000_000) {
            format!("{}ms", ns / 1_000_000)
        } else if ns.is_multiple_of(1_000) {
            format!("{}us", ns / 1_000)
        } else {
            format!("{ns}ns")
        };
    }
    let secs = d.as_secs();
    let mut out = String::new();
    if secs >= 3600 {
        let _ = write!(out, "{}h", secs / 3600);
    }
    if secs >= 60 {
        let _ = write!(out, "{}m", secs % 3600 / 60);
    }
    let frac = d.subsec_millis();
    if frac == 0 {
        let _ = write!(out, "{}s", secs % 60);
    } else {
        let _ = write!(out, "{}.{frac:03}s", secs % 60);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_grammar() {
        let ok = [
            ("30s", Duration::from_secs(30)),
            ("1m30s", Duration::from_secs(90)),
            ("1.5h", Duration::from_mins(90)),
            ("250ms", Duration::from_millis(250)),
            ("0", Duration::ZERO),
            ("1h0m0.5s", Duration::from_millis(3_600_500)),
            (".5s", Duration::from_millis(500)),
            ("10us", Duration::from_micros(10)),
        ];
        for (text, want) in ok {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
        for bad in [
            "",
            "10",
            "ten seconds",
            "-5s",
            "5d",
            "1..5s",
            "s",
            "99999999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn format_round_trips() {
        for text in ["30s", "1m30s", "1h0m0s", "250ms", "2m0.500s"] {
            let d = parse_duration(text).unwrap();
            assert_eq!(parse_duration(&format_duration(d)), Ok(d), "{text}");
        }
        assert_eq!(format_duration(Duration::from_secs(90)), "1m30s");
    }
}
