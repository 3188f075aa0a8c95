//! The audit log: one CloudTrail-shaped JSON line per request, appended and
//! fdatasync'ed before the response is sent. Concurrent requests share one sync
//! (group commit). Plaintext and key material are never written. Every record is capped
//! at [`MAX_RECORD_BYTES`]; the file rotates by size ([`rotate`]); floods of
//! unauthenticated requests are summarised rather than written one by one ([`flood`]).

mod flood;
mod rotate;

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::{Arc, mpsc};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use serde_json::{Map, Value, json};
use tokio::sync::oneshot;

use crate::clock::{iso8601, wall_clock_secs};
use crate::principal::Caller;

pub use flood::{SUMMARY_EVENT, Verdict};
pub use rotate::{Rotation, all_files, rotated};

/// Largest record written; larger `requestParameters` are replaced by a marker.
pub const MAX_RECORD_BYTES: usize = 16 * 1024;

/// Audit failures.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// Opening, writing or syncing the log failed.
    #[error("audit log I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The writer thread is gone.
    #[error("audit writer stopped")]
    Stopped,
}

/// How the log is kept.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// Size rotation.
    pub rotation: Rotation,
    /// Window over which unauthenticated requests are summarised.
    pub summary_window: Duration,
    /// Unauthenticated records written in full per source address and window.
    pub in_full_per_source: u32,
    /// Account written into summary records.
    pub account: String,
    /// Region written into summary records.
    pub region: String,
    /// Where the time of each append (write and fdatasync) is recorded, if anywhere.
    pub append_seconds: Option<Histogram>,
    /// Where appends that failed are counted, if anywhere.
    pub append_failures: Option<Counter>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            rotation: Rotation::default(),
            summary_window: Duration::from_secs(60),
            in_full_per_source: 10,
            account: String::new(),
            region: String::new(),
            append_seconds: None,
            append_failures: None,
        }
    }
}

type Job = (Vec<u8>, oneshot::Sender<Result<(), String>>);

/// Handle to the group-committing writer thread.
#[derive(Debug, Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Job>,
    flood: Arc<flood::FloodGate>,
    append_seconds: Option<Histogram>,
    append_failures: Option<Counter>,
}

const MAX_BATCH: usize = 4096;

fn writer(mut file: rotate::LogFile, rx: mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let mut buf = Vec::with_capacity(batch.iter().map(|(b, _)| b.len()).sum());
        for (line, _) in &batch {
            buf.extend_from_slice(line);
        }
        let res = file.write_batch(&buf).map_err(|e| e.to_string());
        for (_, done) in batch {
            let _ = done.send(res.clone());
        }
    }
}

/// One record as a line of at most [`MAX_RECORD_BYTES`]: oversize `requestParameters`
/// become `{"omitted": .., "originalSize": N}`, then oversize free-text fields are cut.
fn fit(record: &Value) -> Result<Vec<u8>, AuditError> {
    let encode = |v: &Value| {
        let mut line = serde_json::to_vec(v).map_err(|e| AuditError::Io(e.into()))?;
        line.push(b'\n');
        Ok::<_, AuditError>(line)
    };
    let line = encode(record)?;
    if line.len() <= MAX_RECORD_BYTES {
        return Ok(line);
    }
    let mut r = record.clone();
    let original = serde_json::to_vec(&r["requestParameters"]).map_or(0, |v| v.len());
    r["requestParameters"] = json!({
        "omitted": "requestParameters exceed the audit record cap",
        "originalSize": original,
    });
    let line = encode(&r)?;
    if line.len() <= MAX_RECORD_BYTES {
        return Ok(line);
    }
    for field in ["userAgent", "errorMessage"] {
        if let Some(s) = r[field].as_str()
            && s.len() > 512
        {
            let cut: String = s.chars().take(512).collect();
            r[field] = json!(format!("{cut}... ({} bytes)", s.len()));
        }
    }
    let line = encode(&r)?;
    if line.len() <= MAX_RECORD_BYTES {
        return Ok(line);
    }
    // Nothing a client controls is left uncut; keep the envelope only.
    let mut min = Map::new();
    for k in [
        "eventVersion",
        "eventTime",
        "eventSource",
        "eventName",
        "awsRegion",
        "requestID",
        "eventID",
        "errorCode",
    ] {
        min.insert(k.to_owned(), r[k].clone());
    }
    min.insert(
        "omitted".into(),
        json!("record exceeds the audit record cap"),
    );
    encode(&Value::Object(min))
}

impl AuditLog {
    /// Opens (creating, 0600) the log for appending and starts the writer, with the
    /// default [`AuditConfig`].
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        Self::open_with(path, &AuditConfig::default())
    }

    /// Opens (creating, 0600) the log for appending and starts the writer.
    pub fn open_with(path: &Path, cfg: &AuditConfig) -> Result<Self, AuditError> {
        let file = rotate::open_append(path)?;
        drop_torn_tail(&file)?;
        // Make the file's directory entry durable too, or a crash could lose the
        // whole (synced) log of a first start.
        rotate::sync_dir(path)?;
        let file = rotate::LogFile::new(file, Some(path.to_owned()), cfg.rotation)?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer(file, rx))?;
        Ok(Self::with_writer(tx, cfg))
    }

    fn with_writer(tx: mpsc::Sender<Job>, cfg: &AuditConfig) -> Self {
        let flood = flood::FloodGate::new(
            cfg.summary_window,
            cfg.in_full_per_source,
            &cfg.account,
            &cfg.region,
            wall_clock_secs(),
        );
        Self {
            tx,
            flood: Arc::new(flood),
            append_seconds: cfg.append_seconds.clone(),
            append_failures: cfg.append_failures.clone(),
        }
    }

    /// Appends one record; resolves once it is on stable storage.
    pub async fn append(&self, record: &Value) -> Result<(), AuditError> {
        let started = std::time::Instant::now();
        let result = self.append_line(record).await;
        if let Some(h) = &self.append_seconds {
            h.observe(started.elapsed().as_secs_f64());
        }
        if let (Err(_), Some(c)) = (&result, &self.append_failures) {
            c.inc();
        }
        result
    }

    async fn append_line(&self, record: &Value) -> Result<(), AuditError> {
        let line = fit(record)?;
        let (done, wait) = oneshot::channel();
        self.tx
            .send((line, done))
            .map_err(|_| AuditError::Stopped)?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(AuditError::Io(std::io::Error::other(e))),
            Err(_) => Err(AuditError::Stopped),
        }
    }

    /// Records a request that was not authenticated (failed from `source` with
    /// `code`): `record` is built and written in full for the first few per source and
    /// window, else the request is counted into the window's summary. Resolves once
    /// whatever was written is durable.
    pub async fn append_unauthenticated(
        &self,
        source: &str,
        code: &str,
        record: impl FnOnce() -> Value,
    ) -> Result<Verdict, AuditError> {
        let (verdict, closed) = self.flood.admit(source, code, wall_clock_secs());
        if let Some(summary) = closed {
            self.append(&summary).await?;
        }
        if verdict == Verdict::Write {
            self.append(&record()).await?;
        }
        Ok(verdict)
    }

    /// Writes the summary of the current window if it is due (`force`: at once, as at
    /// shutdown) and anything was counted.
    pub async fn close_window(&self, force: bool) -> Result<(), AuditError> {
        match self.flood.close(wall_clock_secs(), force) {
            Some(summary) => self.append(&summary).await,
            None => Ok(()),
        }
    }
}

/// A crash can leave a partly written last line (never an acknowledged one: those are
/// synced whole before the response). Cut it off so the next record starts on a line
/// of its own.
fn drop_torn_tail(file: &File) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    let mut last = [0u8; 1];
    file.read_exact_at(&mut last, len - 1)?;
    if last[0] == b'\n' {
        return Ok(());
    }
    let mut end = len;
    let mut keep = 0;
    let mut buf = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..usize::try_from(end - start).unwrap_or(0)];
        file.read_exact_at(chunk, start)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            keep = start + i as u64 + 1;
            break;
        }
        end = start;
    }
    tracing::warn!(
        bytes = len - keep,
        "dropping a torn record at the end of the audit log"
    );
    file.set_len(keep)?;
    file.sync_all()
}

/// Request fields never copied into the audit log.
const SECRET_FIELDS: &[&str] = &[
    "Plaintext",
    "CiphertextBlob",
    "GrantToken",
    "GrantTokens",
    "Recipient",
];

/// CloudTrail's `requestParameters`: the request with secrets and blobs removed and
/// top-level names in lowerCamelCase.
pub fn request_parameters(body: &[u8]) -> Value {
    let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(body) else {
        return Value::Null;
    };
    let mut out = Map::new();
    for (k, v) in m {
        if SECRET_FIELDS.contains(&k.as_str()) {
            continue;
        }
        let mut name = k.clone();
        if let Some(first) = name.get(0..1) {
            let lower = first.to_ascii_lowercase();
            name.replace_range(0..1, &lower);
        }
        out.insert(name, v);
    }
    Value::Object(out)
}

/// Everything a record is made of.
#[derive(Debug)]
pub struct Event<'a> {
    /// Epoch seconds (wall clock).
    pub time: i64,
    /// Operation name (or "Unknown").
    pub name: &'a str,
    /// The authenticated caller, if authentication succeeded.
    pub caller: Option<&'a Caller>,
    /// Access key presented, if any.
    pub access_key_id: Option<&'a str>,
    /// Account and region.
    pub account: &'a str,
    /// Region.
    pub region: &'a str,
    /// Peer address.
    pub source_ip: &'a str,
    /// User agent.
    pub user_agent: &'a str,
    /// Sanitized parameters.
    pub request_parameters: Value,
    /// Error code and message on failure.
    pub error: Option<(&'a str, String)>,
    /// Request id.
    pub request_id: &'a str,
    /// Key ARNs touched.
    pub resources: &'a [String],
    /// Read-only operation.
    pub read_only: bool,
}

/// Builds the CloudTrail-shaped record.
pub fn record(e: &Event<'_>) -> Value {
    let identity = match e.caller {
        Some(c) => {
            let eff = c.effective();
            let mut id = json!({
                "type": eff.identity_type(),
                "arn": eff.arn(),
                "accessKeyId": c.effective_access_key_id(),
            });
            if let Some(acct) = eff.account() {
                id["accountId"] = json!(acct);
                id["principalId"] = json!(acct);
            }
            if let Some(svc) = c.invoked_by() {
                id["invokedBy"] = json!(svc);
            }
            id
        }
        None => json!({"type": "Unknown", "accessKeyId": e.access_key_id}),
    };
    let mut r = json!({
        "eventVersion": "1.08",
        "userIdentity": identity,
        "eventTime": iso8601(e.time),
        "eventSource": "kms.amazonaws.com",
        "eventName": e.name,
        "awsRegion": e.region,
        "sourceIPAddress": e.source_ip,
        "userAgent": e.user_agent,
        "requestParameters": e.request_parameters,
        "responseElements": Value::Null,
        "requestID": e.request_id,
        "eventID": uuid::Uuid::new_v4().to_string(),
        "readOnly": e.read_only,
        "resources": e.resources.iter().map(|arn| json!({"accountId": e.account, "type": "AWS::KMS::Key", "ARN": arn})).collect::<Vec<_>>(),
        "eventType": "AwsApiCall",
        "managementEvent": true,
        "recipientAccountId": e.account,
        "eventCategory": "Management",
    });
    if let Some((code, msg)) = &e.error {
        r["errorCode"] = json!(code);
        r["errorMessage"] = json!(msg);
    }
    r
}

/// Reads the log and returns the lines about `key_id` (id or ARN), optionally only
/// of one event name.
pub fn query(path: &Path, key_id: &str, event: Option<&str>) -> Result<Vec<String>, AuditError> {
    let mut out = Vec::new();
    for file in all_files(path) {
        let f = match File::open(&file) {
            Ok(f) => f,
            // Rotated away between listing and opening.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e.into()),
        };
        for line in BufReader::new(f).lines() {
            query_line(line?, key_id, event, &mut out);
        }
    }
    Ok(out)
}

fn query_line(line: String, key_id: &str, event: Option<&str>, out: &mut Vec<String>) {
    let Ok(v) = serde_json::from_str::<Value>(&line) else {
        return;
    };
    if event.is_some_and(|e| v["eventName"] != e) {
        return;
    }
    let about_key = v["resources"].as_array().is_some_and(|rs| {
        rs.iter().any(|r| {
            r["ARN"]
                .as_str()
                .is_some_and(|a| a == key_id || a.ends_with(&format!("/{key_id}")))
        })
    }) || v["requestParameters"]["keyId"].as_str() == Some(key_id);
    if about_key {
        out.push(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_parameters_drop_secrets() {
        let p = request_parameters(br#"{"KeyId":"k","Plaintext":"c2VjcmV0","EncryptionContext":{"a":"b"},"GrantTokens":["t"]}"#);
        assert_eq!(p, json!({"keyId": "k", "encryptionContext": {"a": "b"}}));
        assert_eq!(request_parameters(b"not json"), Value::Null);
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_before_appending() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        std::fs::write(&path, b"{\"eventName\":\"A\"}\n{\"eventNa").expect("write");
        let log = AuditLog::open(&path).expect("opens");
        log.append(&json!({"eventName": "B"}))
            .await
            .expect("durable");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text, "{\"eventName\":\"A\"}\n{\"eventName\":\"B\"}\n");
    }

    #[tokio::test]
    async fn a_record_that_cannot_be_written_fails_the_append() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        std::fs::write(&path, b"").expect("create");
        // A read-only handle: every write fails, as on a full or broken disk.
        let file = File::open(&path).expect("open read-only");
        let (tx, rx) = mpsc::channel();
        let file = rotate::LogFile::new(file, None, Rotation::default()).expect("wrap");
        std::thread::spawn(move || writer(file, rx));
        let log = AuditLog::with_writer(tx, &AuditConfig::default());
        assert!(log.append(&json!({"eventName": "Decrypt"})).await.is_err());
    }

    #[tokio::test]
    async fn appended_records_are_queryable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path).expect("opens");
        let res = vec!["arn:aws:kms:us-east-1:111122223333:key/abc".to_owned()];
        for name in ["Decrypt", "Encrypt"] {
            let ev = Event {
                time: 0,
                name,
                caller: None,
                access_key_id: None,
                account: "111122223333",
                region: "us-east-1",
                source_ip: "127.0.0.1",
                user_agent: "t",
                request_parameters: json!({"encryptionContext": {"a": "b"}}),
                error: None,
                request_id: "r",
                resources: &res,
                read_only: false,
            };
            log.append(&record(&ev)).await.expect("durable");
        }
        assert_eq!(query(&path, "abc", None).expect("reads").len(), 2);
        assert_eq!(
            query(&path, "abc", Some("Decrypt")).expect("reads").len(),
            1
        );
        assert_eq!(query(&path, "other", None).expect("reads").len(), 0);
    }

    #[test]
    fn oversize_records_are_capped_with_a_marker() {
        let big = "x".repeat(200 * 1024);
        let rec =
            json!({"eventName": "Encrypt", "requestParameters": {"keyId": big}, "userAgent": "ua"});
        let line = fit(&rec).expect("fits");
        assert!(line.len() <= MAX_RECORD_BYTES);
        let v: Value = serde_json::from_slice(&line).expect("json");
        assert!(v["requestParameters"]["originalSize"].as_u64() > Some(200 * 1024));
        assert_eq!(v["userAgent"], "ua");
        let huge_ua = json!({"eventName": "X", "userAgent": big, "errorMessage": big});
        assert!(fit(&huge_ua).expect("fits").len() <= MAX_RECORD_BYTES);
    }

    #[tokio::test]
    async fn appends_are_timed_and_failures_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = AuditConfig {
            append_seconds: Some(Histogram::new([0.001])),
            append_failures: Some(Counter::default()),
            ..AuditConfig::default()
        };
        let log = AuditLog::open_with(&dir.path().join("audit.log"), &cfg).expect("opens");
        log.append(&json!({"eventName": "Encrypt"}))
            .await
            .expect("written");
        let (tx, rx) = mpsc::channel();
        drop(rx);
        let stopped = AuditLog::with_writer(tx, &cfg);
        assert!(matches!(
            stopped.append(&json!({"eventName": "Encrypt"})).await,
            Err(AuditError::Stopped)
        ));
        assert_eq!(cfg.append_failures.as_ref().map(Counter::get), Some(1));
        let mut text = String::new();
        let mut registry = prometheus_client::registry::Registry::default();
        if let Some(h) = cfg.append_seconds.clone() {
            registry.register("append", "appends", h);
        }
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        assert!(text.contains("append_count 2"), "{text}");
    }

    #[tokio::test]
    async fn unauthenticated_floods_are_counted_and_flushed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        let cfg = AuditConfig {
            in_full_per_source: 3,
            ..AuditConfig::default()
        };
        let log = AuditLog::open_with(&path, &cfg).expect("opens");
        for _ in 0..10 {
            log.append_unauthenticated(
                "10.1.1.1",
                "InvalidSignatureException",
                || json!({"eventName": "Decrypt"}),
            )
            .await
            .expect("durable");
        }
        log.close_window(true).await.expect("flushed");
        let lines: Vec<Value> = std::fs::read_to_string(&path)
            .expect("read")
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[3]["eventName"], SUMMARY_EVENT);
        assert_eq!(lines[3]["additionalEventData"]["requestsCounted"], 7);
    }
}
