//! HTTP front end: axum on tokio with a body cap, a request timeout and bounded
//! concurrency. Translates HTTP to [`Kms::execute`] and errors to AWS `__type` codes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::audit::{self, AuditLog};
use crate::clock::{OffsetClock, wall_clock_secs};
use crate::error::OpError;
use crate::ops::{Kms, Touched};
use crate::sigv4::Verifier;
use crate::wire::Operation;

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 256 * 1024;
/// Longest a request may take end to end.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Requests processed at once; further ones wait.
pub const MAX_CONCURRENCY: usize = 512;
/// Open connections at once; further accepts wait.
pub const MAX_CONNECTIONS: usize = 1024;
/// A client must send a complete request head within this time.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Path of the test-only clock endpoint (`--test-clock`).
pub const TEST_CLOCK_PATH: &str = "/_sealvol/test/clock";

/// Shared server state.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The service.
    pub kms: Arc<Kms>,
    /// Signature checks.
    pub verifier: Arc<Verifier>,
    /// Audit log.
    pub audit: AuditLog,
    /// The lifecycle clock (advanced only through the test endpoint).
    pub clock: Arc<OffsetClock>,
    /// Whether the test clock endpoint is on.
    pub test_clock: bool,
}

fn json_response(status: StatusCode, body: &Value, request_id: &str) -> Response {
    let mut r = (status, body.to_string()).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-amz-json-1.1"),
    );
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert("x-amzn-requestid", v);
    }
    r
}

fn error_response(status: u16, code: &str, message: &str, request_id: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    json_response(
        status,
        &json!({"__type": code, "message": message}),
        request_id,
    )
}

/// Builds the router.
pub fn router(state: AppState) -> Router {
    let mut r = Router::new().route("/", axum::routing::post(handle).fallback(not_found));
    if state.test_clock {
        r = r.route(
            TEST_CLOCK_PATH,
            axum::routing::post(advance_clock).get(advance_clock),
        );
    }
    r.fallback(not_found)
        .with_state(state)
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .layer(tower::limit::ConcurrencyLimitLayer::new(MAX_CONCURRENCY))
}

async fn not_found() -> Response {
    error_response(
        404,
        "UnknownOperationException",
        "Only POST / with X-Amz-Target is served",
        "",
    )
}

async fn advance_clock(State(st): State<AppState>, body: Bytes) -> Response {
    let secs = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["AdvanceSeconds"].as_i64())
        .unwrap_or(0);
    let offset = st.clock.advance(secs);
    json_response(
        StatusCode::OK,
        &json!({"OffsetSeconds": offset, "Now": crate::clock::Clock::now(st.clock.as_ref())}),
        "",
    )
}

async fn handle(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request<Body>,
) -> Response {
    let request_id = uuid::Uuid::new_v4().to_string();
    let (parts, body) = req.into_parts();
    let user_agent = parts
        .headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let target = parts
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let op = Operation::from_target(&target);
    let op_name = op.map(Operation::name).unwrap_or("Unknown");
    let source_ip = peer.ip().to_string();
    let body = match axum::body::to_bytes(body, BODY_LIMIT).await {
        Ok(b) => b,
        Err(_) => {
            let message = format!("Request body is larger than {BODY_LIMIT} bytes");
            let access_key = crate::sigv4::presented_access_key(&parts.headers);
            let event = audit::Event {
                time: wall_clock_secs(),
                name: op_name,
                caller: None,
                access_key_id: access_key.as_deref(),
                account: &st.kms.account,
                region: &st.kms.region,
                source_ip: &source_ip,
                user_agent: &user_agent,
                request_parameters: Value::Null,
                error: Some(("ValidationException", message.clone())),
                request_id: &request_id,
                resources: &[],
                read_only: false,
            };
            if st.audit.append(&audit::record(&event)).await.is_err() {
                return error_response(
                    500,
                    "KMSInternalException",
                    "The request could not be audited.",
                    &request_id,
                );
            }
            return error_response(413, "ValidationException", &message, &request_id);
        }
    };
    let auth = st.verifier.verify(&parts, &body, wall_clock_secs());
    let mut touched = Touched::default();
    let result: Result<Value, OpError> = match (&auth, op) {
        (Err(_), _) => Err(OpError::Internal(String::new())),
        (Ok(_), None) => Err(OpError::UnknownOperation(format!(
            "Unknown operation {target}"
        ))),
        (Ok(caller), Some(op)) => {
            let content_type = parts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !content_type.starts_with("application/x-amz-json-1.1")
                && !content_type.starts_with("application/json")
            {
                Err(OpError::Serialization(
                    "Content-Type must be application/x-amz-json-1.1".into(),
                ))
            } else {
                if op.runs_inline() {
                    st.kms.execute(caller, op, &body, &mut touched)
                } else {
                    let kms = st.kms.clone();
                    let caller = caller.clone();
                    let body = body.clone();
                    match tokio::task::spawn_blocking(move || {
                        let mut touched = Touched::default();
                        let r = kms.execute(&caller, op, &body, &mut touched);
                        (r, touched)
                    })
                    .await
                    {
                        Ok((r, t)) => {
                            touched = t;
                            r
                        }
                        Err(_) => Err(OpError::Internal("operation panicked".into())),
                    }
                }
            }
        }
    };
    let (status, code, message) = match (&auth, &result) {
        (Err(e), _) => (400, Some(e.code()), e.to_string()),
        (Ok(_), Err(e)) => {
            if let OpError::Internal(detail) = e {
                tracing::error!(request_id, op = op_name, detail, "internal error");
            }
            (e.status(), Some(e.code()), e.public_message())
        }
        (Ok(_), Ok(_)) => (200, None, String::new()),
    };
    // A refused forward-access token is audited under the service that presented it.
    let caller = match &auth {
        Ok(c) => Some(c),
        Err(e) => e.authenticated_signer(),
    };
    let access_key = crate::sigv4::presented_access_key(&parts.headers);
    let event = audit::Event {
        time: wall_clock_secs(),
        name: op_name,
        caller,
        access_key_id: access_key.as_deref(),
        account: &st.kms.account,
        region: &st.kms.region,
        source_ip: &source_ip,
        user_agent: &user_agent,
        request_parameters: audit::request_parameters(&body),
        error: code.map(|c| (c, message.clone())),
        request_id: &request_id,
        resources: &touched.keys,
        read_only: op.is_some_and(Operation::read_only),
    };
    if let Err(e) = st.audit.append(&audit::record(&event)).await {
        tracing::error!(request_id, error = %e, "audit record could not be written; refusing the request");
        return error_response(
            500,
            "KMSInternalException",
            "The request could not be audited.",
            &request_id,
        );
    }
    match result {
        Ok(v) if auth.is_ok() => json_response(StatusCode::OK, &v, &request_id),
        _ => error_response(
            status,
            code.unwrap_or("KMSInternalException"),
            &message,
            &request_id,
        ),
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets in-flight requests
/// finish (bounded by [`REQUEST_TIMEOUT`]). Connections are capped at
/// [`MAX_CONNECTIONS`]; each must send its request head within [`HEADER_READ_TIMEOUT`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let svc = tower::ServiceBuilder::new()
            .map_request(move |mut req: Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                req
            })
            .service(app.clone());
        let conn = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(
        REQUEST_TIMEOUT + Duration::from_secs(5),
        graceful.shutdown(),
    )
    .await
    .is_err()
    {
        tracing::warn!("connections still open at shutdown; closing them");
    }
}
