//! Unauthenticated floods: per window and source address, the first few failed-auth
//! records are written in full; the rest are counted and written as one
//! `UnauthenticatedRequestsSummary` record when the window closes (or at shutdown), so
//! strangers cannot fill the disk and no request goes uncounted.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::clock::iso8601;

/// Name of the summary records.
pub const SUMMARY_EVENT: &str = "UnauthenticatedRequestsSummary";
/// Sources listed one by one in a summary; the rest are added up as `otherSources`.
const LISTED_SOURCES: usize = 64;
/// Sources tracked one by one in a window; further ones share one bucket.
const TRACKED_SOURCES: usize = 10_000;
/// The bucket of sources beyond [`TRACKED_SOURCES`].
const OVERFLOW_SOURCE: &str = "other";

/// What to do with one unauthenticated request's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Write it in full.
    Write,
    /// Counted for the window's summary.
    Counted,
}

#[derive(Debug, Default)]
struct Source {
    written: u32,
    counted: BTreeMap<String, u64>,
}

#[derive(Debug)]
struct Window {
    opened: Instant,
    opened_wall: i64,
    sources: HashMap<String, Source>,
    counted: u64,
}

impl Window {
    fn new(wall: i64) -> Self {
        Self {
            opened: Instant::now(),
            opened_wall: wall,
            sources: HashMap::new(),
            counted: 0,
        }
    }
}

/// The per-window counters.
#[derive(Debug)]
pub struct FloodGate {
    window: Duration,
    in_full: u32,
    region: String,
    account: String,
    current: Mutex<Window>,
}

impl FloodGate {
    /// `in_full` records per source and `window` are written one by one; labels go into
    /// the summaries.
    pub fn new(window: Duration, in_full: u32, account: &str, region: &str, wall: i64) -> Self {
        Self {
            window,
            in_full,
            region: region.to_owned(),
            account: account.to_owned(),
            current: Mutex::new(Window::new(wall)),
        }
    }

    /// Decides about one request from `source` that failed with `code`; also returns
    /// the summary of the previous window if this request closed it.
    pub fn admit(&self, source: &str, code: &str, wall: i64) -> (Verdict, Option<Value>) {
        let mut w = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let closed = if w.opened.elapsed() >= self.window {
            let old = std::mem::replace(&mut *w, Window::new(wall));
            self.summary(old, wall)
        } else {
            None
        };
        let key = if w.sources.len() >= TRACKED_SOURCES && !w.sources.contains_key(source) {
            OVERFLOW_SOURCE
        } else {
            source
        };
        let s = w.sources.entry(key.to_owned()).or_default();
        let verdict = if s.written < self.in_full {
            s.written += 1;
            Verdict::Write
        } else {
            *s.counted.entry(code.to_owned()).or_insert(0) += 1;
            w.counted += 1;
            Verdict::Counted
        };
        (verdict, closed)
    }

    /// Closes the window if it is due (or at once with `force`) and returns its
    /// summary, if anything was counted.
    pub fn close(&self, wall: i64, force: bool) -> Option<Value> {
        let mut w = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if !force && w.opened.elapsed() < self.window {
            return None;
        }
        let old = std::mem::replace(&mut *w, Window::new(wall));
        self.summary(old, wall)
    }

    fn summary(&self, w: Window, wall: i64) -> Option<Value> {
        if w.counted == 0 {
            return None;
        }
        let mut sources: Vec<(String, Source)> = w
            .sources
            .into_iter()
            .filter(|(_, s)| !s.counted.is_empty())
            .collect();
        sources.sort_by_key(|(_, s)| std::cmp::Reverse(s.counted.values().sum::<u64>()));
        let entry = |ip: &str, counted: &BTreeMap<String, u64>| json!({"sourceIPAddress": ip, "count": counted.values().sum::<u64>(), "errorCodes": counted});
        let listed: Vec<Value> = sources
            .iter()
            .take(LISTED_SOURCES)
            .map(|(ip, s)| entry(ip, &s.counted))
            .collect();
        let mut other: BTreeMap<String, u64> = BTreeMap::new();
        for (_, s) in sources.iter().skip(LISTED_SOURCES) {
            for (code, n) in &s.counted {
                *other.entry(code.clone()).or_insert(0) += n;
            }
        }
        let mut data = json!({
            "windowStart": iso8601(w.opened_wall),
            "windowEnd": iso8601(wall),
            "requestsCounted": w.counted,
            "sources": listed,
        });
        if !other.is_empty() {
            data["otherSources"] = entry("other", &other);
        }
        Some(json!({
            "eventVersion": "1.08",
            "userIdentity": {"type": "Unknown"},
            "eventTime": iso8601(wall),
            "eventSource": "kms.amazonaws.com",
            "eventName": SUMMARY_EVENT,
            "awsRegion": self.region,
            "sourceIPAddress": Value::Null,
            "requestParameters": Value::Null,
            "responseElements": Value::Null,
            "additionalEventData": data,
            "eventID": uuid::Uuid::new_v4().to_string(),
            "readOnly": true,
            "resources": [],
            "eventType": "AwsServiceEvent",
            "managementEvent": true,
            "recipientAccountId": self.account,
            "eventCategory": "Management",
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_few_per_source_are_written_the_rest_summarised() {
        let gate = FloodGate::new(Duration::from_secs(3600), 2, "1", "r", 0);
        let mut written = 0;
        for i in 0..10 {
            let (v, closed) = gate.admit("10.0.0.1", if i % 2 == 0 { "A" } else { "B" }, 0);
            assert!(closed.is_none());
            written += usize::from(v == Verdict::Write);
        }
        assert_eq!(gate.admit("10.0.0.2", "A", 0).0, Verdict::Write);
        assert_eq!(written, 2);
        assert!(gate.close(0, false).is_none(), "the window is not due");
        let s = gate
            .close(5, true)
            .expect("counted requests are summarised");
        assert_eq!(s["eventName"], SUMMARY_EVENT);
        let d = &s["additionalEventData"];
        assert_eq!(d["requestsCounted"], 8);
        assert_eq!(d["sources"][0]["sourceIPAddress"], "10.0.0.1");
        assert_eq!(d["sources"][0]["errorCodes"], json!({"A": 4, "B": 4}));
        assert!(gate.close(6, true).is_none(), "nothing counted since");
    }

    #[test]
    fn a_request_after_the_window_closes_it() {
        let gate = FloodGate::new(Duration::ZERO, 0, "1", "r", 0);
        let (v, closed) = gate.admit("a", "A", 0);
        assert_eq!(v, Verdict::Counted);
        assert!(closed.is_none(), "the first window had nothing counted");
        let (_, closed) = gate.admit("a", "A", 1);
        assert_eq!(
            closed.expect("closed")["additionalEventData"]["requestsCounted"],
            1
        );
    }
}
