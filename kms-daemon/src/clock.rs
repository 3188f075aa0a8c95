//! The daemon's notion of "now" for key lifecycle (rotation, deletion windows).
//!
//! Injectable so tests can advance time; SigV4 freshness deliberately uses the real
//! wall clock, not this one, so a shifted key clock never breaks request signing.
//! Calendar arithmetic (epoch seconds to and from dates) is the `time` crate's.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time};

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

/// ISO 8601 UTC (`2026-11-28T10:53:46Z`) for epoch seconds (clamped to the years
/// -9999..=9999 the `time` crate represents).
pub fn iso8601(secs: i64) -> String {
    let min = PrimitiveDateTime::MIN.assume_utc().unix_timestamp();
    let max = PrimitiveDateTime::MAX.assume_utc().unix_timestamp();
    let t = OffsetDateTime::from_unix_timestamp(secs.clamp(min, max))
        .expect("clamped to the representable range");
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Parses SigV4's basic ISO 8601 form `YYYYMMDDTHHMMSSZ` into epoch seconds.
pub fn parse_amz_date(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u16> {
        let part = s.get(r)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    let small = |r| num(r).and_then(|n| u8::try_from(n).ok());
    // Only real calendar times: the signature covers the header text, while the verifier
    // signs the parsed instant, so a date that does not round-trip (second 60, 30 Feb)
    // must be refused as malformed rather than fail as a bad signature (found by the
    // sigv4 fuzz target; seeds/sigv4/regress-leap-second). `time` refuses both.
    let date = Date::from_calendar_date(
        i32::from(num(0..4)?),
        Month::try_from(small(4..6)?).ok()?,
        small(6..8)?,
    )
    .ok()?;
    let time = Time::from_hms(small(9..11)?, small(11..13)?, small(13..15)?).ok()?;
    Some(
        PrimitiveDateTime::new(date, time)
            .assume_utc()
            .unix_timestamp(),
    )
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
        assert_eq!(parse_amz_date("20261128T245346Z"), None, "no hour 24");
        assert_eq!(parse_amz_date("20261128 105346Z"), None);
        assert_eq!(parse_amz_date("+0261128T105346Z"), None, "no sign");
        assert_eq!(parse_amz_date("00000101T000000Z"), Some(-62_167_219_200));
        assert_eq!(iso8601(-62_167_219_200), "0000-01-01T00:00:00Z");
        assert_eq!(iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601(-1), "1969-12-31T23:59:59Z");
        assert_eq!(iso8601(253_402_300_799), "9999-12-31T23:59:59Z");
    }

    #[test]
    fn offset_clock_advances() {
        let c = OffsetClock::new(0);
        let before = c.now();
        c.advance(86_400 * 366);
        assert!(c.now() >= before + 86_400 * 366);
    }
}
