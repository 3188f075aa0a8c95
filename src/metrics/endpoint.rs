//! The agent's metrics endpoint: `GET /metrics` over HTTP/1.1 on one thread, and the
//! Prometheus file-based service discovery target the agent publishes for itself.
//!
//! The exposition text comes from `prometheus-client`'s encoder; this module only frames
//! it. Requests are read with a short timeout and a size cap, one at a time, and closed
//! after the answer: a stranger on the metrics port can delay a scrape, never the I/O
//! path (the FUSE threads never touch this thread). Bind it to loopback or a private
//! network: like every exporter it is unauthenticated.

use std::fs::Permissions;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;

/// The content type of the exposition (OpenMetrics text, as the encoder writes it).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// How long one client may take to send its request or read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// The most request bytes read (request line and headers; a scrape has no body).
const MAX_REQUEST: usize = 8192;

/// Metrics endpoint errors.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// `SEALVOL_METRICS_LISTEN` is not an address.
    #[error(
        "SEALVOL_METRICS_LISTEN={value:?} is not a socket address (use e.g. 127.0.0.1:9600, or port 0 for a free port)"
    )]
    Address {
        /// What was given.
        value: String,
    },
    /// Binding the listener failed.
    #[error("cannot serve metrics on {addr}: {source} (is the port in use?)")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The service-discovery target file cannot be written.
    #[error("cannot write the Prometheus target file {path}: {source}")]
    Target {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Encodes `registry` in the text exposition format.
///
/// # Errors
/// A collector failed to encode.
pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut text = String::with_capacity(4096);
    prometheus_client::encoding::text::encode(&mut text, registry)?;
    Ok(text)
}

/// A running metrics endpoint; dropping it removes its published target file (the
/// listener thread ends with the process).
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    labels: Vec<(String, String)>,
    target_file: Option<PathBuf>,
}

impl MetricsServer {
    /// Binds `addr` and serves `registry` from a background thread.
    ///
    /// # Errors
    /// The address cannot be bound.
    pub fn start(
        registry: Arc<Registry>,
        addr: SocketAddr,
        labels: Vec<(String, String)>,
    ) -> Result<Self, MetricsError> {
        let listener =
            TcpListener::bind(addr).map_err(|source| MetricsError::Bind { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| MetricsError::Bind { addr, source })?;
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    if let Err(e) = answer(stream, &registry) {
                        tracing::debug!("metrics client: {e}");
                    }
                }
            })
            .map_err(|source| MetricsError::Bind { addr, source })?;
        Ok(Self {
            addr: bound,
            labels,
            target_file: None,
        })
    }

    /// The bound address (the real port when 0 was asked for).
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Publishes this endpoint for Prometheus' file-based service discovery
    /// (`file_sd_configs`): `[{"targets": ["ADDR"], "labels": {..}}]` in `path`, written
    /// atomically, readable by a Prometheus running as another user (it names an address
    /// and ids, no secret). Removed when the server is dropped.
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn publish_target(&mut self, path: &Path) -> Result<(), MetricsError> {
        let labels: serde_json::Map<String, serde_json::Value> = self
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        let doc = serde_json::json!([{ "targets": [self.addr.to_string()], "labels": labels }]);
        let err = |source| MetricsError::Target {
            path: path.to_path_buf(),
            source,
        };
        // Explicit modes: the agent's umask (0077 under the systemd unit) must not hide the
        // target from a Prometheus running as its own user.
        if let Some(dir) = path.parent().filter(|d| !d.exists()) {
            std::fs::create_dir_all(dir).map_err(err)?;
            std::fs::set_permissions(dir, Permissions::from_mode(0o755)).map_err(err)?;
        }
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, doc.to_string()).map_err(err)?;
        std::fs::set_permissions(&tmp, Permissions::from_mode(0o644)).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)?;
        self.target_file = Some(path.to_path_buf());
        Ok(())
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(p) = self.target_file.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Reads one request and answers it: 200 with the exposition for `GET|HEAD /metrics`,
/// 405 for another method there, 404 elsewhere, 400 for what is not HTTP.
fn answer(mut stream: TcpStream, registry: &Registry) -> std::io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut len = 0;
    while len < buf.len() && !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf[len..])? {
            0 => break,
            n => len += n,
        }
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    let path = target.map(|t| t.split('?').next().unwrap_or(t));
    let (status, extra, body) = match (method, path, version) {
        (Some(m), Some("/metrics"), Some(v)) if v.starts_with("HTTP/1.") => {
            if m == "GET" || m == "HEAD" {
                match encode(registry) {
                    Ok(text) => ("200 OK", "", text),
                    Err(_) => (
                        "500 Internal Server Error",
                        "",
                        "a collector failed\n".into(),
                    ),
                }
            } else {
                (
                    "405 Method Not Allowed",
                    "Allow: GET, HEAD\r\n",
                    "only GET /metrics\n".into(),
                )
            }
        }
        (Some(_), Some(_), Some(v)) if v.starts_with("HTTP/1.") => {
            ("404 Not Found", "", "metrics are at /metrics\n".into())
        }
        _ => ("400 Bad Request", "", "not an HTTP/1 request\n".into()),
    };
    let content_type = if status.starts_with("200") {
        CONTENT_TYPE
    } else {
        "text/plain; charset=utf-8"
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != Some("HEAD") {
        out.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&out)
}
