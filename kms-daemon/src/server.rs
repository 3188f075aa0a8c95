//! HTTP front end: axum on tokio. Translates HTTP to [`Kms::execute`] and errors to AWS
//! `__type` codes. A request's body is read under the limits of [`crate::limits`]
//! before it takes one of [`MAX_CONCURRENCY`] operation slots; once dispatched, the
//! operation and its audit record complete together in a task of their own, whatever
//! the client does (hangs up, times out).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, State};
use axum::http::{Request, StatusCode, header, request::Parts};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::audit::{self, AuditLog};
use crate::clock::{OffsetClock, wall_clock_secs};
use crate::error::OpError;
use crate::limits::{self, BodyError, ConnectionLimits};
use crate::metrics::{Metrics, OUTCOME_OK};
use crate::ops::{Kms, Operation, Touched};
use crate::response::{
    ErrorCode, closing_error_response, error_response, json_response, secret_json,
};
use crate::sigv4::Verifier;

pub use crate::limits::BODY_LIMIT;

/// Operations executing at once; further requests (with complete bodies) wait.
pub const MAX_CONCURRENCY: usize = 512;
/// A client must send a complete request head within this time.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// At shutdown, how long dispatched operations get to finish and be audited.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
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
    /// Operation slots ([`MAX_CONCURRENCY`]).
    pub slots: Arc<Semaphore>,
    /// Where requests, auth failures and connections are counted.
    pub metrics: Arc<Metrics>,
}

impl AppState {
    /// Waits (up to `grace`) until no dispatched operation is running, so each has
    /// written its audit record.
    pub async fn drain_operations(&self, grace: Duration) -> bool {
        let all = u32::try_from(MAX_CONCURRENCY).unwrap_or(u32::MAX);
        tokio::time::timeout(grace, self.slots.acquire_many(all))
            .await
            .is_ok_and(|p| p.is_ok())
    }
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
    r.fallback(not_found).with_state(state)
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

/// What the audit record needs to know about a request, whatever became of it.
struct RequestMeta {
    request_id: String,
    op: Option<Operation>,
    target: String,
    source_ip: String,
    user_agent: String,
    access_key: Option<String>,
}

impl RequestMeta {
    fn new(parts: &Parts, peer: SocketAddr) -> Self {
        let header = |name: &str| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        let target = header("x-amz-target");
        Self {
            request_id: uuid::Uuid::new_v4().to_string(),
            op: Operation::from_target(&target),
            target,
            source_ip: peer.ip().to_string(),
            user_agent: header(header::USER_AGENT.as_str()),
            access_key: crate::sigv4::presented_access_key(&parts.headers),
        }
    }

    fn op_name(&self) -> &'static str {
        self.op.map(Operation::name).unwrap_or("Unknown")
    }

    fn event<'a>(
        &'a self,
        st: &'a AppState,
        caller: Option<&'a crate::principal::Caller>,
        request_parameters: Value,
        error: Option<(&'a str, String)>,
        resources: &'a [String],
    ) -> audit::Event<'a> {
        audit::Event {
            time: wall_clock_secs(),
            name: self.op_name(),
            caller,
            access_key_id: self.access_key.as_deref(),
            account: &st.kms.account,
            region: &st.kms.region,
            source_ip: &self.source_ip,
            user_agent: &self.user_agent,
            request_parameters,
            error,
            request_id: &self.request_id,
            resources,
            read_only: self.op.is_some_and(Operation::read_only),
        }
    }
}

fn not_audited(request_id: &str) -> Response {
    error_response(
        500,
        "KMSInternalException",
        "The request could not be audited.",
        request_id,
    )
}

async fn handle(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request<Body>,
) -> Response {
    let started = tokio::time::Instant::now();
    let (parts, mut body) = req.into_parts();
    let meta = RequestMeta::new(&parts, peer);
    let counted = Counted {
        metrics: st.metrics.clone(),
        op: meta.op,
        started,
    };
    let declared = limits::declared_length(&parts.headers);
    let deadline = tokio::time::Instant::now() + limits::body_deadline(declared);
    let body = match limits::read_body(&mut body, declared, deadline).await {
        Ok(b) => b,
        Err(e) => {
            if e == BodyError::TooLarge {
                limits::drain(body);
            }
            return spawn_detached(counted, refuse(st, meta, e)).await;
        }
    };
    let Ok(slot) = st.slots.clone().acquire_owned().await else {
        return error_response(
            503,
            "KMSInternalException",
            "The service is shutting down.",
            &meta.request_id,
        );
    };
    spawn_detached(counted, dispatch(st, meta, parts, body, slot)).await
}

/// What [`spawn_detached`] records about a request once it is answered.
struct Counted {
    metrics: Arc<Metrics>,
    op: Option<Operation>,
    started: tokio::time::Instant,
}

/// Runs `work` in a task of its own: if the client goes away, the handler's future is
/// dropped but the task (operation, audit record and metrics) runs to the end.
async fn spawn_detached(
    counted: Counted,
    work: impl std::future::Future<Output = Response> + Send + 'static,
) -> Response {
    let task = async move {
        let r = work.await;
        let outcome = if r.status().is_success() {
            OUTCOME_OK
        } else {
            r.extensions()
                .get::<ErrorCode>()
                .map_or("KMSInternalException", |c| c.0)
        };
        counted
            .metrics
            .observe_request(counted.op, outcome, counted.started.elapsed());
        r
    };
    match tokio::spawn(task).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "request task failed");
            error_response(
                500,
                "KMSInternalException",
                "An internal error occurred.",
                "",
            )
        }
    }
}

/// A request whose body was refused: audited as unauthenticated (it was never
/// verified), without parameters.
async fn refuse(st: AppState, meta: RequestMeta, e: BodyError) -> Response {
    let message = e.to_string();
    if !audit_stranger(&st, &meta, e.code(), &message).await {
        return not_audited(&meta.request_id);
    }
    closing_error_response(e.status(), e.code(), &message, &meta.request_id)
}

/// Audits a request no authenticated caller made (a refused body, failed
/// authentication): without parameters (the body is a stranger's), and through the flood
/// gate, which summarises floods rather than writing them one by one. `false` if the
/// record could not be written.
async fn audit_stranger(st: &AppState, meta: &RequestMeta, code: &str, message: &str) -> bool {
    let record =
        || audit::record(&meta.event(st, None, Value::Null, Some((code, message.to_owned())), &[]));
    st.audit
        .append_unauthenticated(&meta.source_ip, code, record)
        .await
        .is_ok()
}

/// Authenticates, executes and audits one request with a complete body.
async fn dispatch(
    st: AppState,
    meta: RequestMeta,
    parts: Parts,
    body: Bytes,
    _slot: OwnedSemaphorePermit,
) -> Response {
    let request_id = meta.request_id.as_str();
    let _in_flight = st.metrics.operation_started();
    let caller = match st.verifier.verify(&parts, &body, wall_clock_secs()) {
        Ok(c) => c,
        Err(e) if e.authenticated_signer().is_some() => {
            st.metrics.auth_failure(e.reason());
            // The request's own signature verified; only the forward-access token it
            // carries was refused: audited one by one, under the service that signed.
            let event = meta.event(
                &st,
                e.authenticated_signer(),
                audit::request_parameters(&body),
                Some((e.code(), e.to_string())),
                &[],
            );
            if st.audit.append(&audit::record(&event)).await.is_err() {
                return not_audited(request_id);
            }
            return error_response(400, e.code(), &e.to_string(), request_id);
        }
        Err(e) => {
            st.metrics.auth_failure(e.reason());
            let message = e.to_string();
            if !audit_stranger(&st, &meta, e.code(), &message).await {
                return not_audited(request_id);
            }
            return error_response(400, e.code(), &message, request_id);
        }
    };
    let mut touched = Touched::default();
    let result = match meta.op {
        None => Err(OpError::UnknownOperation(format!(
            "Unknown operation {}",
            meta.target
        ))),
        Some(op) => execute(&st, &caller, op, &parts, body.clone(), &mut touched).await,
    };
    let error = result.as_ref().err().map(|e| {
        if let OpError::Internal(detail) = e {
            tracing::error!(request_id, op = meta.op_name(), detail, "internal error");
        }
        (e.code(), e.public_message())
    });
    let event = meta.event(
        &st,
        Some(&caller),
        audit::request_parameters(&body),
        error,
        &touched.keys,
    );
    if let Err(e) = st.audit.append(&audit::record(&event)).await {
        tracing::error!(request_id, error = %e, "audit record could not be written; refusing the request");
        return not_audited(request_id);
    }
    match result {
        Ok(v) => secret_json(v, request_id),
        Err(e) => error_response(e.status(), e.code(), &e.public_message(), request_id),
    }
}

async fn execute(
    st: &AppState,
    caller: &crate::principal::Caller,
    op: Operation,
    parts: &Parts,
    body: Bytes,
    touched: &mut Touched,
) -> Result<Value, OpError> {
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type.starts_with("application/x-amz-json-1.1")
        && !content_type.starts_with("application/json")
    {
        return Err(OpError::Serialization(
            "Content-Type must be application/x-amz-json-1.1".into(),
        ));
    }
    if op.runs_inline() {
        return st.kms.execute(caller, op, &body, touched);
    }
    let kms = st.kms.clone();
    let caller = caller.clone();
    match tokio::task::spawn_blocking(move || {
        let mut touched = Touched::default();
        let r = kms.execute(&caller, op, &body, &mut touched);
        (r, touched)
    })
    .await
    {
        Ok((r, t)) => {
            *touched = t;
            r
        }
        Err(_) => Err(OpError::Internal("operation panicked".into())),
    }
}

/// Serves on `listener` until `shutdown` resolves, then lets open connections finish
/// and waits for dispatched operations and their audit records (bounded by
/// [`SHUTDOWN_GRACE`]). Connections are admitted by `limits` right after accept (the
/// accept loop never waits); each must send its request head within
/// [`HEADER_READ_TIMEOUT`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    limits: Arc<ConnectionLimits>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    let app = router(state.clone());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        // Queue body buffers for vectored writes instead of copying them into the
        // connection's write buffer: response bodies stay in their wiped buffers.
        .writev(true)
        .keep_alive(true);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors or similar: back off briefly, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let slot = match limits.admit(peer.ip()) {
            Ok(s) => s,
            Err(refused) => {
                state.metrics.connection_refused(refused.reason());
                tracing::debug!(%peer, %refused, "connection closed at once");
                drop(stream);
                continue;
            }
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
        let open = state.metrics.connection_opened();
        tokio::spawn(async move {
            let _ = conn.await;
            drop(slot);
            drop(open);
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open at shutdown; closing them");
    }
    if !state.drain_operations(SHUTDOWN_GRACE).await {
        tracing::warn!("operations still running at shutdown");
    }
    if let Err(e) = state.audit.close_window(true).await {
        tracing::error!(error = %e, "the last unauthenticated-requests summary was not written");
    }
}
