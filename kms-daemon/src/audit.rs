//! The audit log: one CloudTrail-shaped JSON line per request, appended and
//! fdatasync'ed before the response is sent. Concurrent requests share one sync
//! (group commit). Plaintext and key material are never written.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::sync::mpsc;

use serde_json::{Map, Value, json};
use tokio::sync::oneshot;

use crate::clock::iso8601;
use crate::principal::Caller;

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

type Job = (Vec<u8>, oneshot::Sender<Result<(), String>>);

/// Handle to the group-committing writer thread.
#[derive(Debug, Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Job>,
}

const MAX_BATCH: usize = 4096;

fn writer(mut file: File, rx: mpsc::Receiver<Job>) {
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
        let res = file
            .write_all(&buf)
            .and_then(|()| file.sync_data())
            .map_err(|e| e.to_string());
        for (_, done) in batch {
            let _ = done.send(res.clone());
        }
    }
}

impl AuditLog {
    /// Opens (creating, 0600) the log for appending and starts the writer.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .mode(0o600)
            .open(path)?;
        drop_torn_tail(&file)?;
        // Make the file's directory entry durable too, or a crash could lose the
        // whole (synced) log of a first start.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer(file, rx))?;
        Ok(Self { tx })
    }

    /// Appends one record; resolves once it is on stable storage.
    pub async fn append(&self, record: &Value) -> Result<(), AuditError> {
        let mut line = serde_json::to_vec(record).map_err(|e| AuditError::Io(e.into()))?;
        line.push(b'\n');
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
    let f = File::open(path)?;
    let mut out = Vec::new();
    for line in BufReader::new(f).lines() {
        let line = line?;
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if event.is_some_and(|e| v["eventName"] != e) {
            continue;
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
    Ok(out)
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
        std::thread::spawn(move || writer(file, rx));
        let log = AuditLog { tx };
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
}
