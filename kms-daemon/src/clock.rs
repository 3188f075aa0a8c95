//! The daemon's notion of "now" for key lifecycle (rotation, deletion windows).
//!
//! Injectable so tests can advance time; SigV4 freshness deliberately uses the real
//! wall clock, not this one, so a shifted key clock never breaks request signing.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A source of the current time in whole seconds since the Unix epoch.
pub trait Clock: Send + Sync {
    /// Seconds since the Unix epoch.
    fn now(&self) -> i64;
}

/// Wall clock plus an adjustable offset (the offset is only changed by tests).
#[derive(Debug, Default)]
pub struct OffsetClock {
    offset_secs: AtomicI64,
}

impl OffsetClock {
    /// A clock starting at the given offset from wall-clock time.
    pub fn new(offset_secs: i64) -> Self {
        Self {
            offset_secs: AtomicI64::new(offset_secs),
        }
    }

    /// Moves the clock forward (or back, if negative) by `secs`; returns the new offset.
    pub fn advance(&self, secs: i64) -> i64 {
        self.offset_secs.fetch_add(secs, Ordering::SeqCst) + secs
    }

    /// The current offset from wall-clock time in seconds.
    pub fn offset(&self) -> i64 {
        self.offset_secs.load(Ordering::SeqCst)
    }
}

impl Clock for OffsetClock {
    fn now(&self) -> i64 {
        wall_clock_secs().saturating_add(self.offset_secs.load(Ordering::SeqCst))
    }
}

/// Real wall-clock time in seconds since the epoch.
pub fn wall_clock_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Days since 1970-01-01 for a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month, day) for a count of days since 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    (
        y,
        u32::try_from(m).unwrap_or(1),
        u32::try_from(d).unwrap_or(1),
    )
}

/// ISO 8601 UTC (`2026-11-28T10:53:46Z`) for epoch seconds.
pub fn iso8601(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Parses SigV4's basic ISO 8601 form `YYYYMMDDTHHMMSSZ` into epoch seconds.
pub fn parse_amz_date(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    let (y, mo, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (h, mi, se) = (num(9..11)?, num(11..13)?, num(13..15)?);
    // Only real calendar times: the signature covers the header text, while the verifier
    // signs the parsed instant, so a date that does not round-trip (second 60, 30 Feb)
    // must be refused as malformed rather than fail as a bad signature (found by the
    // sigv4 fuzz target; seeds/sigv4/regress-leap-second).
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let month_days = match mo {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if !(1..=12).contains(&mo) || !(1..=month_days).contains(&d) || h > 23 || mi > 59 || se > 59 {
        return None;
    }
    let days = days_from_civil(y, u32::try_from(mo).ok()?, u32::try_from(d).ok()?);
    Some(days * 86_400 + h * 3600 + mi * 60 + se)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amz_date_round_trips_through_iso() {
        let t = parse_amz_date("20261128T105346Z").expect("valid date");
        assert_eq!(iso8601(t), "2026-11-28T10:53:46Z");
        assert_eq!(parse_amz_date("19700101T000000Z"), Some(0));
        assert_eq!(parse_amz_date("2026112XT105346Z"), None);
        assert_eq!(parse_amz_date("20261328T105346Z"), None);
        assert_eq!(parse_amz_date("20261128T120060Z"), None, "no leap seconds");
        assert_eq!(parse_amz_date("20260230T000000Z"), None, "no 30 February");
        assert!(
            parse_amz_date("20240229T000000Z").is_some(),
            "2024 is a leap year"
        );
        assert_eq!(parse_amz_date("21000229T000000Z"), None, "2100 is not");
    }

    #[test]
    fn offset_clock_advances() {
        let c = OffsetClock::new(0);
        let before = c.now();
        c.advance(86_400 * 366);
        assert!(c.now() >= before + 86_400 * 366);
    }
}
