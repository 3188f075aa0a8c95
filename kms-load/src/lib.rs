//! Load generator for any AWS-KMS-compatible endpoint (kms-daemon, moto_server, ...):
//! N concurrent clients, each with one keep-alive HTTP/1.1 connection, every request
//! SigV4-signed; reports requests per second and latency percentiles. Optionally while
//! [`SlowClients`] hold many connections open with unfinished bodies (from several
//! loopback source addresses), as strangers trying to stall the service would.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use base64::Engine;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde::Serialize;
use serde_json::{Value, json};

/// Load-generator failures.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Bad endpoint URL.
    #[error("endpoint must look like http://HOST:PORT, got {0}")]
    Endpoint(String),
    /// Connecting or speaking HTTP.
    #[error("http: {0}")]
    Http(String),
    /// A setup call failed.
    #[error("{op} failed with HTTP {status}: {body}")]
    Setup {
        /// Operation.
        op: String,
        /// Status.
        status: u16,
        /// Response body.
        body: String,
    },
    /// Reading profile files.
    #[error("profile {0}: {1}")]
    Profile(String, String),
}

/// Where and as whom to send.
#[derive(Debug, Clone)]
pub struct Target {
    /// `http://host:port`.
    pub endpoint: String,
    /// Region for signing.
    pub region: String,
    /// Access key id.
    pub access_key: String,
    /// Secret.
    pub secret_key: String,
}

impl Target {
    /// Reads a profile from the `credentials` and `config` files the daemon writes.
    pub fn from_state_dir(dir: &Path, profile: &str) -> Result<Self, LoadError> {
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name))
                .map_err(|e| LoadError::Profile(profile.into(), e.to_string()))
        };
        let creds = ini_section(&read("credentials")?, profile);
        let config = ini_section(&read("config")?, &format!("profile {profile}"));
        let get = |m: &[(String, String)], k: &str| {
            m.iter()
                .find(|(a, _)| a == k)
                .map(|(_, v)| v.clone())
                .ok_or_else(|| LoadError::Profile(profile.into(), format!("{k} missing")))
        };
        Ok(Self {
            endpoint: get(&config, "endpoint_url")?,
            region: get(&config, "region")?,
            access_key: get(&creds, "aws_access_key_id")?,
            secret_key: get(&creds, "aws_secret_access_key")?,
        })
    }
}

fn ini_section(text: &str, section: &str) -> Vec<(String, String)> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = name.trim() == section;
        } else if inside && let Some((k, v)) = line.split_once('=') {
            out.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    out
}

/// The operation under load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
pub enum LoadOp {
    /// Decrypt one 64-byte data key blob with a two-pair context.
    Decrypt,
    /// GenerateDataKeyWithoutPlaintext, 64 bytes, two-pair context.
    GenerateDataKeyWithoutPlaintext,
}

/// One measured run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Operation.
    pub operation: LoadOp,
    /// Concurrent clients.
    pub clients: usize,
    /// Measured seconds.
    pub seconds: f64,
    /// Successful requests.
    pub requests: u64,
    /// Failed requests.
    pub errors: u64,
    /// Successful requests per second.
    pub requests_per_second: f64,
    /// Median latency in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile latency in milliseconds.
    pub p99_ms: f64,
    /// Worst latency in milliseconds.
    pub max_ms: f64,
    /// Connections the server closed (0 means every client kept one connection alive).
    pub reconnects: u64,
}

/// One keep-alive connection.
pub struct Connection {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: String,
    target: Target,
    /// How often the server closed the connection and it was reopened.
    pub reconnects: u64,
}

impl Connection {
    /// Opens a connection.
    pub async fn open(target: &Target) -> Result<Self, LoadError> {
        let host = target
            .endpoint
            .strip_prefix("http://")
            .map(|h| h.trim_end_matches('/'))
            .ok_or_else(|| LoadError::Endpoint(target.endpoint.clone()))?;
        let stream = tokio::net::TcpStream::connect(host)
            .await
            .map_err(|e| LoadError::Http(e.to_string()))?;
        stream
            .set_nodelay(true)
            .map_err(|e| LoadError::Http(e.to_string()))?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| LoadError::Http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self {
            sender,
            host: host.to_owned(),
            target: target.clone(),
            reconnects: 0,
        })
    }

    /// Sends one signed KMS call; returns status and body.
    pub async fn call(&mut self, op: &str, body: &Value) -> Result<(u16, Bytes), LoadError> {
        let payload = serde_json::to_vec(body).map_err(|e| LoadError::Http(e.to_string()))?;
        let target_header = format!("TrentService.{op}");
        let headers = [
            ("host", self.host.as_str()),
            ("content-type", "application/x-amz-json-1.1"),
            ("x-amz-target", target_header.as_str()),
        ];
        let identity: Identity = Credentials::new(
            &self.target.access_key,
            &self.target.secret_key,
            None,
            None,
            "kms-load",
        )
        .into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.target.region)
            .name("kms")
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| LoadError::Http(e.to_string()))?
            .into();
        let signable = SignableRequest::new(
            "POST",
            format!("http://{}/", self.host),
            headers.iter().copied(),
            SignableBody::Bytes(&payload),
        )
        .map_err(|e| LoadError::Http(e.to_string()))?;
        let (instructions, _) = sign(signable, &params)
            .map_err(|e| LoadError::Http(e.to_string()))?
            .into_parts();
        let mut req = hyper::Request::post("/");
        for (k, v) in headers {
            req = req.header(k, v);
        }
        for (k, v) in instructions.headers() {
            req = req.header(k, v);
        }
        let req = req
            .body(Full::new(Bytes::from(payload)))
            .map_err(|e| LoadError::Http(e.to_string()))?;
        if self.sender.is_closed() || self.sender.ready().await.is_err() {
            // The server closed the connection (e.g. an HTTP/1.0 server such as
            // werkzeug's): reconnect and count it.
            let fresh = Self::open(&self.target).await?;
            self.sender = fresh.sender;
            self.reconnects += 1;
            self.sender
                .ready()
                .await
                .map_err(|e| LoadError::Http(e.to_string()))?;
        }
        let resp = self
            .sender
            .send_request(req)
            .await
            .map_err(|e| LoadError::Http(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| LoadError::Http(e.to_string()))?
            .to_bytes();
        Ok((status, body))
    }

    async fn setup_call(&mut self, op: &str, body: &Value) -> Result<Value, LoadError> {
        let (status, bytes) = self.call(op, body).await?;
        if status != 200 {
            return Err(LoadError::Setup {
                op: op.into(),
                status,
                body: String::from_utf8_lossy(&bytes).into_owned(),
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| LoadError::Http(e.to_string()))
    }
}

fn context() -> Value {
    json!({"aws:workspaces:sid-directoryid": "S-1-5-21-1000@d-9067000000", "aws:ebs:id": "vol-0load"})
}

/// Creates a key (or uses `key_id`) and, for Decrypt, a data-key blob; returns the
/// request body each load request sends.
pub async fn prepare(
    target: &Target,
    op: LoadOp,
    key_id: Option<String>,
) -> Result<Value, LoadError> {
    let mut c = Connection::open(target).await?;
    let key_id = match key_id {
        Some(k) => k,
        None => c
            .setup_call("CreateKey", &json!({"Description": "kms-load"}))
            .await?["KeyMetadata"]["KeyId"]
            .as_str()
            .ok_or_else(|| LoadError::Http("CreateKey response without KeyId".into()))?
            .to_owned(),
    };
    let gdk = json!({"KeyId": key_id, "NumberOfBytes": 64, "EncryptionContext": context()});
    Ok(match op {
        LoadOp::GenerateDataKeyWithoutPlaintext => gdk,
        LoadOp::Decrypt => {
            let out = c
                .setup_call("GenerateDataKeyWithoutPlaintext", &gdk)
                .await?;
            let blob = out["CiphertextBlob"]
                .as_str()
                .ok_or_else(|| LoadError::Http("no CiphertextBlob".into()))?;
            // Sanity: it must decode as base64.
            base64::engine::general_purpose::STANDARD
                .decode(blob)
                .map_err(|e| LoadError::Http(e.to_string()))?;
            json!({"CiphertextBlob": blob, "EncryptionContext": context()})
        }
    })
}

fn op_name(op: LoadOp) -> &'static str {
    match op {
        LoadOp::Decrypt => "Decrypt",
        LoadOp::GenerateDataKeyWithoutPlaintext => "GenerateDataKeyWithoutPlaintext",
    }
}

fn percentile(sorted: &[u64], pct: usize) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    // Nearest-rank: the smallest value with at least pct% of samples at or below it.
    let rank = (pct * sorted.len()).div_ceil(100);
    let idx = rank.clamp(1, sorted.len()) - 1;
    sorted[idx] as f64 / 1000.0
}

/// Runs `clients` concurrent clients for `duration` (after `warmup`) sending `body`.
pub async fn run(
    target: &Target,
    op: LoadOp,
    body: Value,
    clients: usize,
    warmup: Duration,
    duration: Duration,
) -> Result<Report, LoadError> {
    let start_at = Instant::now() + warmup;
    let stop_at = start_at + duration;
    let mut tasks = Vec::with_capacity(clients);
    for _ in 0..clients {
        let mut conn = Connection::open(target).await?;
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat_us = Vec::with_capacity(1 << 16);
            let mut errors = 0u64;
            loop {
                let t0 = Instant::now();
                if t0 >= stop_at {
                    break;
                }
                let res = conn.call(op_name(op), &body).await;
                let elapsed = t0.elapsed();
                if t0 < start_at {
                    continue;
                }
                match res {
                    Ok((200, _)) => {
                        lat_us.push(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX))
                    }
                    Ok(_) => errors += 1,
                    Err(_) => {
                        errors += 1;
                        match Connection::open(&conn.target).await {
                            Ok(c) => conn = c,
                            Err(_) => break,
                        }
                    }
                }
            }
            (lat_us, errors, conn.reconnects)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    let mut reconnects = 0;
    for t in tasks {
        let (l, e, r) = t.await.map_err(|e| LoadError::Http(e.to_string()))?;
        all.extend(l);
        errors += e;
        reconnects += r;
    }
    all.sort_unstable();
    let secs = duration.as_secs_f64();
    Ok(Report {
        operation: op,
        clients,
        seconds: secs,
        requests: all.len() as u64,
        errors,
        requests_per_second: all.len() as f64 / secs,
        p50_ms: percentile(&all, 50),
        p99_ms: percentile(&all, 99),
        max_ms: all.last().map(|m| *m as f64 / 1000.0).unwrap_or(0.0),
        reconnects,
    })
}

/// Unauthenticated connections that each send a request head and part of its body,
/// then stall; a connection the server closes is reopened at once.
#[derive(Debug)]
pub struct SlowClients {
    open: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl SlowClients {
    /// Starts `n` slow connections to `target`'s endpoint, spread over `sources` local
    /// addresses 127.0.0.2, 127.0.0.3, ... (so per-address caps let them in).
    pub fn start(target: &Target, n: usize, sources: usize) -> Result<Self, LoadError> {
        use std::sync::atomic::Ordering;
        let host = target
            .endpoint
            .strip_prefix("http://")
            .map(|h| h.trim_end_matches('/'))
            .ok_or_else(|| LoadError::Endpoint(target.endpoint.clone()))?;
        let server: std::net::SocketAddr = host
            .parse()
            .map_err(|_| LoadError::Endpoint(target.endpoint.clone()))?;
        let open = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let tasks = (0..n)
            .map(|i| {
                let offset = u8::try_from(i % sources.clamp(1, 250)).unwrap_or(0);
                let source = std::net::Ipv4Addr::new(127, 0, 0, 2 + offset);
                let open = open.clone();
                let mut stopped = stopped.clone();
                tokio::spawn(async move {
                    while !*stopped.borrow() {
                        let Ok(mut s) = slow_connection(source, server).await else {
                            // Refused (over a cap) or out of descriptors: retry soon.
                            tokio::select! {
                                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                                _ = stopped.changed() => {}
                            }
                            continue;
                        };
                        open.fetch_add(1, Ordering::Relaxed);
                        tokio::select! {
                            () = closed_by_server(&mut s) => {}
                            _ = stopped.changed() => {}
                        }
                        open.fetch_sub(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Ok(Self { open, stop, tasks })
    }

    /// Connections open (head and partial body sent, not yet closed by the server).
    pub fn open(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until at least `n` are open, or `timeout` passes; returns how many are.
    pub async fn wait_open(&self, n: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        while self.open() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.open()
    }

    /// Closes them all.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

async fn slow_connection(
    source: std::net::Ipv4Addr,
    server: std::net::SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind((source, 0).into())?;
    let s = socket.connect(server).await?;
    let mut rest: &[u8] =
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-amz-json-1.1\r\n\
          X-Amz-Target: TrentService.Decrypt\r\nContent-Length: 4096\r\n\r\n{\"CiphertextBlob\":";
    while !rest.is_empty() {
        s.writable().await?;
        match s.try_write(rest) {
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(s)
}

/// Resolves once the server has answered or closed the connection.
async fn closed_by_server(s: &mut tokio::net::TcpStream) {
    let mut sink = [0u8; 512];
    loop {
        if s.readable().await.is_err() {
            return;
        }
        match s.try_read(&mut sink) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            // Bytes (an answer), end of stream or an error: the server is done with it.
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ini_sections_and_percentiles() {
        let text = "[admin]\naws_access_key_id = A\n\n[profile admin]\nregion = r\n[ebs]\naws_access_key_id = B\n";
        assert_eq!(
            ini_section(text, "ebs"),
            vec![("aws_access_key_id".to_owned(), "B".to_owned())]
        );
        assert_eq!(
            ini_section(text, "profile admin"),
            vec![("region".to_owned(), "r".to_owned())]
        );
        let v: Vec<u64> = (1..=100).map(|x| x * 1000).collect();
        assert_eq!(percentile(&v, 50), 50.0);
        assert_eq!(percentile(&v, 99), 99.0);
        assert_eq!(percentile(&[], 99), 0.0);
    }
}
