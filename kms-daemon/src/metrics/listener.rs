//! The metrics endpoint (`serve --metrics-listen`): its own listener, apart from the KMS
//! port, answering `GET /metrics` with [`Metrics::encode`]; 404 for any other path, 405
//! for other methods. Unauthenticated, as Prometheus exporters are: bind it to loopback
//! or a private network.
//!
//! A stranger hammering it must not slow KMS requests: it admits few connections (per
//! peer and in total, refused at once beyond that), each must send its request head
//! quickly, and one scrape is encoded at a time (others wait without holding a thread).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use tokio::sync::Semaphore;

use super::{CONTENT_TYPE, Metrics};
use crate::limits::ConnectionLimits;

/// The one path served.
pub const METRICS_PATH: &str = "/metrics";
/// Connections to the metrics endpoint open at once from one peer address.
pub const MAX_CONNECTIONS_PER_PEER: usize = 8;
/// Connections to the metrics endpoint open at once, all peers together.
pub const MAX_CONNECTIONS: usize = 64;
/// A scraper must send its request head within this time.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the metrics on `listener` until the task is dropped or aborted.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let limits = ConnectionLimits::new(MAX_CONNECTIONS_PER_PEER, MAX_CONNECTIONS);
    let one_encoding = Arc::new(Semaphore::new(1));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = limits.admit(peer.ip()) else {
            drop(stream);
            continue;
        };
        let (metrics, gate) = (metrics.clone(), one_encoding.clone());
        let svc = hyper::service::service_fn(move |req| {
            let (metrics, gate) = (metrics.clone(), gate.clone());
            async move { Ok::<_, Infallible>(answer(&req, &metrics, &gate).await) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), svc);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(slot);
        });
    }
}

/// The answer to one request on the metrics port.
async fn answer<B>(req: &Request<B>, metrics: &Metrics, gate: &Semaphore) -> Response<Full<Bytes>> {
    if req.uri().path() != METRICS_PATH {
        return plain(StatusCode::NOT_FOUND, "Only GET /metrics is served here\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "Only GET /metrics is served here\n",
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let Ok(_turn) = gate.acquire().await else {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    };
    match metrics.encode() {
        Ok(text) => {
            let mut r = Response::new(Full::new(Bytes::from(text)));
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
            r
        }
        Err(e) => {
            tracing::error!(error = %e, "metrics not encoded");
            plain(StatusCode::INTERNAL_SERVER_ERROR, "metrics not encoded\n")
        }
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method, path: &str) -> Request<()> {
        Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .expect("request")
    }

    #[tokio::test]
    async fn only_get_metrics_is_served() {
        let m = Metrics::new();
        let gate = Semaphore::new(1);
        let ok = answer(&request(Method::GET, "/metrics"), &m, &gate).await;
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(ok.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
        let other = answer(&request(Method::GET, "/"), &m, &gate).await;
        assert_eq!(other.status(), StatusCode::NOT_FOUND);
        let post = answer(&request(Method::POST, "/metrics"), &m, &gate).await;
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(post.headers()[header::ALLOW], "GET, HEAD");
    }
}
