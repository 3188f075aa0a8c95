//! Starting and stopping the daemon: open the state directory, bind, announce
//! readiness, serve until shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::audit::{AuditConfig, AuditError, AuditLog, Rotation};
use crate::clock::OffsetClock;
use crate::limits::{ConnectionLimits, MAX_CONNECTIONS};
use crate::metrics::Metrics;
use crate::ops::Kms;
use crate::server::{AppState, MAX_CONCURRENCY};
use crate::sigv4::Verifier;
use crate::state::{StateDir, StateError, write_private};

/// Daemon start-up failures.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// State directory.
    #[error(transparent)]
    State(#[from] StateError),
    /// Audit log.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// Binding or serving.
    #[error("listen on {addr}: {source}")]
    Listen {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
}

/// Daemon settings.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// State directory.
    pub state_dir: PathBuf,
    /// Listen address (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Account id.
    pub account: String,
    /// Region.
    pub region: String,
    /// File written (atomically) once listening.
    pub ready_file: Option<PathBuf>,
    /// Enables the test-only clock endpoint.
    pub test_clock: bool,
    /// Initial lifecycle-clock offset in seconds (tests).
    pub clock_offset_secs: i64,
    /// Audit log rotation by size.
    pub audit_rotation: Rotation,
    /// Open connections allowed per peer address.
    pub max_connections_per_peer: usize,
    /// Where `GET /metrics` is served (unauthenticated; off when `None`).
    pub metrics_listen: Option<SocketAddr>,
}

/// Runs the daemon until `shutdown` resolves.
pub async fn run(
    cfg: DaemonConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    let state = StateDir::open(&cfg.state_dir, &cfg.account, &cfg.region)?;
    let verifier = Verifier::new(&cfg.region, &cfg.account, state.verifier_keys()?);
    let metrics = Metrics::new();
    let audit_cfg = AuditConfig {
        append_seconds: Some(metrics.audit_append_seconds()),
        append_failures: Some(metrics.audit_append_failures()),
        rotation: cfg.audit_rotation,
        account: cfg.account.clone(),
        region: cfg.region.clone(),
        ..AuditConfig::default()
    };
    let audit = AuditLog::open_with(&cfg.state_dir.join("audit.log"), &audit_cfg)?;
    let max_connections = raise_open_files_limit(MAX_CONNECTIONS);
    let (listener, addr) = bind(cfg.listen).await?;
    let endpoint = format!("http://{addr}");
    let metrics_listener = match cfg.metrics_listen {
        Some(a) => Some(bind(a).await?),
        None => None,
    };
    let metrics_endpoint = metrics_listener
        .as_ref()
        .map(|(_, a)| format!("http://{a}"));
    state.write_client_files(&cfg.region, &endpoint)?;
    let clock = Arc::new(OffsetClock::new(cfg.clock_offset_secs));
    let StateDir { store, root, dir } = state;
    let kms = Arc::new(Kms::new(
        Arc::new(crate::cache::CachedStore::new(store)),
        root,
        clock.clone(),
        &cfg.account,
        &cfg.region,
    ));
    spawn_lifecycle_sweep(kms.clone());
    spawn_summary_flush(audit.clone(), audit_cfg.summary_window);
    let app = AppState {
        kms,
        verifier: Arc::new(verifier),
        audit,
        clock,
        test_clock: cfg.test_clock,
        slots: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENCY)),
        metrics: metrics.clone(),
    };
    let limits = ConnectionLimits::new(cfg.max_connections_per_peer, max_connections);
    if let Some(f) = &cfg.ready_file {
        let mut body =
            serde_json::json!({"endpoint": endpoint, "pid": std::process::id(), "state_dir": dir});
        if let Some(m) = &metrics_endpoint {
            body["metrics"] = m.clone().into();
        }
        write_private(f, &body.to_string())?;
    }
    let metrics_word = metrics_endpoint
        .as_ref()
        .map(|m| format!(" metrics={m}"))
        .unwrap_or_default();
    println!(
        "kms-daemon ready endpoint={endpoint}{metrics_word} state_dir={}",
        dir.display()
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let exporter =
        metrics_listener.map(|(l, _)| tokio::spawn(crate::metrics::listener::serve(l, metrics)));
    crate::server::serve(listener, app, limits, shutdown).await;
    if let Some(e) = exporter {
        e.abort();
    }
    tracing::info!("kms-daemon stopped");
    Ok(())
}

/// Binds `addr` and says which address it got (port 0 picks a free port).
async fn bind(addr: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr), DaemonError> {
    let fail = |source| DaemonError::Listen { addr, source };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(fail)?;
    let bound = listener.local_addr().map_err(fail)?;
    Ok((listener, bound))
}

/// How often due deletions and rotations are applied to keys nobody touches.
pub const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

fn spawn_lifecycle_sweep(kms: Arc<Kms>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            tick.tick().await;
            let k = kms.clone();
            match tokio::task::spawn_blocking(move || k.sweep()).await {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => tracing::info!(deleted = n, "key deletions completed"),
                Ok(Err(e)) => tracing::error!(error = %e, "lifecycle sweep failed"),
                Err(e) => tracing::error!(error = %e, "lifecycle sweep panicked"),
            }
        }
    });
}

/// Writes the unauthenticated-requests summary of each window once it is due, even if
/// no further request arrives to close it.
fn spawn_summary_flush(audit: AuditLog, window: std::time::Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(window.max(std::time::Duration::from_secs(1)));
        loop {
            tick.tick().await;
            if let Err(e) = audit.close_window(false).await {
                tracing::error!(error = %e, "unauthenticated-requests summary not written");
            }
        }
    });
}

/// Raises the soft open-files limit to the hard limit and returns how many connections
/// fit under it (at most `wanted`, leaving room for the database, the log and slack).
fn raise_open_files_limit(wanted: usize) -> usize {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return wanted;
    };
    let limit = if setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    let fit = usize::try_from(limit.saturating_sub(64)).unwrap_or(usize::MAX);
    wanted.min(fit.max(1))
}
