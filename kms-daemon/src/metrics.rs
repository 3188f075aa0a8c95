//! The daemon's Prometheus metrics: one [`Metrics`] registry (built with the
//! `prometheus-client` crate) holding every counter, gauge and histogram the request
//! path records into, and its encoding in the OpenMetrics text format. Serving it over
//! HTTP is [`listener`]'s job.
//!
//! Every label takes values from a fixed set (operation names from the operation table,
//! AWS error codes, fixed reason words), so no client can grow the registry. Recording
//! costs one label-set lookup (a read lock on an existing entry) and atomic adds.

pub mod listener;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::ops::Operation;

/// Content type of [`Metrics::encode`]'s output: the OpenMetrics text format the
/// crate's text encoder writes (it ends with `# EOF`).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The `outcome` label of a request that succeeded (failures carry their AWS code).
pub const OUTCOME_OK: &str = "ok";

/// The `operation` label value of requests whose `X-Amz-Target` names no operation.
pub const UNKNOWN_OPERATION: &str = "Unknown";

/// Metric encoding failures.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The text encoder failed (it writes to a `String`, so only a bug in a metric's
    /// encoding can cause this).
    #[error("encoding the metrics failed: {0}; this is a bug, please report it")]
    Encode(#[from] std::fmt::Error),
}

/// The `operation` label: an operation of the table, or [`UNKNOWN_OPERATION`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OperationLabel(pub Option<Operation>);

impl EncodeLabelValue for OperationLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.0.map_or(UNKNOWN_OPERATION, Operation::name), encoder)
    }
}

/// Labels of `kms_requests_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    /// The operation asked for.
    pub operation: OperationLabel,
    /// [`OUTCOME_OK`] or the AWS error code sent.
    pub outcome: &'static str,
}

/// Labels of `kms_request_duration_seconds`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OperationLabels {
    /// The operation asked for.
    pub operation: OperationLabel,
}

/// A `reason` label (auth failures, refused connections), from a fixed set of words.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why.
    pub reason: &'static str,
}

/// Labels of `kms_build_info`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// Handles of one operation's series, made once (see `Metrics::by_operation`).
#[derive(Debug)]
struct OperationSeries {
    ok: Counter,
    seconds: Histogram,
}

type HistogramFamily<S> = Family<S, Histogram, fn() -> Histogram>;

/// Latency buckets: 100 µs doubling to about 3.3 s (a cached Encrypt takes well under
/// a millisecond; an audited write waits for an fdatasync).
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// The registry and the handles the daemon records into.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Size of the last encoding, so the next one allocates its buffer once.
    last_len: AtomicUsize,
    requests: Family<RequestLabels, Counter>,
    request_seconds: HistogramFamily<OperationLabels>,
    /// Each operation's `ok` counter and duration histogram, indexed by
    /// `Operation as usize`: recording a success takes no lock, only atomic adds.
    by_operation: Vec<OperationSeries>,
    audit_append_seconds: Histogram,
    audit_append_failures: Counter,
    auth_failures: Family<ReasonLabels, Counter>,
    open_connections: Gauge,
    refused_connections: Family<ReasonLabels, Counter>,
    in_flight: Gauge,
}

impl Metrics {
    /// A registry with every metric registered; each operation's `ok` counter and
    /// duration histogram exist from the start (at zero), so rates work from the first
    /// scrape.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("kms");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "KMS requests answered, by operation (Unknown for unrecognised targets) and \
             outcome (ok, or the AWS error code sent, e.g. AccessDeniedException)",
            requests.clone(),
        );
        let request_seconds: HistogramFamily<OperationLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "request_duration",
            "Time from receiving a request to its audited answer, by operation",
            Unit::Seconds,
            request_seconds.clone(),
        );
        let audit_append_seconds = latency_histogram();
        registry.register_with_unit(
            "audit_append_duration",
            "Time to append one audit record and flush it to stable storage (fdatasync, \
             shared by concurrent requests)",
            Unit::Seconds,
            audit_append_seconds.clone(),
        );
        let audit_append_failures = Counter::default();
        registry.register(
            "audit_append_failures",
            "Audit records that could not be written or synced; each such request was \
             answered KMSInternalException instead of its result",
            audit_append_failures.clone(),
        );
        let auth_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "auth_failures",
            "Requests refused by authentication, by reason (signature_mismatch, \
             unknown_access_key, expired_or_skewed_date, malformed_auth, missing_auth, \
             wrong_scope, forward_token_*)",
            auth_failures.clone(),
        );
        let open_connections = Gauge::default();
        registry.register(
            "open_connections",
            "Client connections open on the KMS port",
            open_connections.clone(),
        );
        let refused_connections = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections closed at once because a cap was reached, by reason (peer_cap: \
             --max-connections-per-peer; total_cap: the server's total)",
            refused_connections.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "operations_in_flight",
            "Requests with a complete body being authenticated, executed and audited now",
            in_flight.clone(),
        );
        // A gauge at 1 rather than an OpenMetrics `info`: the Prometheus text parser
        // (promtool, older scrapers) knows no `info` type.
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register(
            "build_info",
            "The kms-daemon version (value always 1)",
            build_info,
        );
        let by_operation = Operation::ALL
            .iter()
            .map(|&op| {
                let operation = OperationLabel(Some(op));
                OperationSeries {
                    ok: requests
                        .get_or_create(&RequestLabels {
                            operation,
                            outcome: OUTCOME_OK,
                        })
                        .clone(),
                    seconds: request_seconds
                        .get_or_create(&OperationLabels { operation })
                        .clone(),
                }
            })
            .collect();
        Arc::new(Self {
            registry,
            last_len: AtomicUsize::new(4096),
            requests,
            request_seconds,
            by_operation,
            audit_append_seconds,
            audit_append_failures,
            auth_failures,
            open_connections,
            refused_connections,
            in_flight,
        })
    }

    /// Records one answered request: `outcome` is [`OUTCOME_OK`] or the AWS code sent.
    /// A success of a known operation touches only atomics; a failure also looks its
    /// label set up once.
    pub fn observe_request(&self, op: Option<Operation>, outcome: &'static str, took: Duration) {
        let seconds = took.as_secs_f64();
        let known = op.and_then(|o| self.by_operation.get(o as usize));
        match known {
            Some(series) if outcome == OUTCOME_OK => {
                series.ok.inc();
            }
            _ => {
                let operation = OperationLabel(op);
                self.requests
                    .get_or_create(&RequestLabels { operation, outcome })
                    .inc();
            }
        }
        match known {
            Some(series) => series.seconds.observe(seconds),
            None => self
                .request_seconds
                .get_or_create(&OperationLabels {
                    operation: OperationLabel(op),
                })
                .observe(seconds),
        }
    }

    /// The histogram the audit log records each append into (see
    /// [`crate::audit::AuditConfig::append_seconds`]).
    pub fn audit_append_seconds(&self) -> Histogram {
        self.audit_append_seconds.clone()
    }

    /// The counter the audit log counts failed appends in (see
    /// [`crate::audit::AuditConfig::append_failures`]).
    pub fn audit_append_failures(&self) -> Counter {
        self.audit_append_failures.clone()
    }

    /// Counts a request refused by authentication (`reason` from
    /// [`crate::sigv4::AuthError::reason`]).
    pub fn auth_failure(&self, reason: &'static str) {
        self.auth_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts a connection closed at once (`reason` from
    /// [`crate::limits::ConnectionRefused::reason`]).
    pub fn connection_refused(&self, reason: &'static str) {
        self.refused_connections
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Marks a connection open until the returned guard drops.
    pub fn connection_opened(&self) -> GaugeGuard {
        GaugeGuard::new(&self.open_connections)
    }

    /// Marks an operation in flight until the returned guard drops.
    pub fn operation_started(&self) -> GaugeGuard {
        GaugeGuard::new(&self.in_flight)
    }

    /// The registry in the OpenMetrics text format ([`CONTENT_TYPE`]), in one buffer
    /// sized from the previous encoding.
    pub fn encode(&self) -> Result<String, MetricsError> {
        let mut buf = String::with_capacity(self.last_len.load(Ordering::Relaxed) + 1024);
        prometheus_client::encoding::text::encode(&mut buf, &self.registry)?;
        self.last_len.store(buf.len(), Ordering::Relaxed);
        Ok(buf)
    }
}

/// Holds a gauge one higher while alive.
#[derive(Debug)]
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_shows_recorded_label_sets() {
        let m = Metrics::new();
        m.observe_request(
            Some(Operation::Encrypt),
            OUTCOME_OK,
            Duration::from_millis(2),
        );
        m.observe_request(None, "UnknownOperationException", Duration::from_millis(1));
        m.auth_failure("signature_mismatch");
        m.connection_refused("peer_cap");
        let open = m.connection_opened();
        let text = m.encode().expect("encodes");
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(
            text.contains(r#"kms_requests_total{operation="Encrypt",outcome="ok"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"kms_requests_total{operation="Decrypt",outcome="ok"} 0"#),
            "every operation's ok counter exists from the start: {text}"
        );
        assert!(text.contains(
            r#"kms_requests_total{operation="Unknown",outcome="UnknownOperationException"} 1"#
        ));
        assert!(
            text.contains(r#"kms_request_duration_seconds_count{operation="Encrypt"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"kms_auth_failures_total{reason="signature_mismatch"} 1"#));
        assert!(text.contains(r#"kms_connections_refused_total{reason="peer_cap"} 1"#));
        assert!(text.contains("kms_open_connections 1\n"), "{text}");
        assert!(text.contains("# TYPE kms_audit_append_duration_seconds histogram"));
        assert!(
            text.contains("kms_audit_append_failures_total 0\n"),
            "{text}"
        );
        assert!(text.contains(&format!(
            r#"kms_build_info{{version="{}"}} 1"#,
            env!("CARGO_PKG_VERSION")
        )));
        drop(open);
        assert!(
            m.encode()
                .expect("encodes")
                .contains("kms_open_connections 0\n")
        );
    }

    #[test]
    fn the_operation_table_is_indexed_by_discriminant() {
        for (i, &op) in Operation::ALL.iter().enumerate() {
            assert_eq!(op as usize, i, "{}", op.name());
        }
        let m = Metrics::new();
        m.observe_request(Some(Operation::Decrypt), OUTCOME_OK, Duration::ZERO);
        m.observe_request(
            Some(Operation::Decrypt),
            "AccessDeniedException",
            Duration::ZERO,
        );
        let text = m.encode().expect("encodes");
        assert!(text.contains(r#"kms_requests_total{operation="Decrypt",outcome="ok"} 1"#));
        assert!(text.contains(r#"kms_requests_total{operation="Encrypt",outcome="ok"} 0"#));
        assert!(text.contains(
            r#"kms_requests_total{operation="Decrypt",outcome="AccessDeniedException"} 1"#
        ));
        assert!(text.contains(r#"kms_request_duration_seconds_count{operation="Decrypt"} 2"#));
    }

    #[test]
    fn every_operation_name_is_a_label_value() {
        let text = Metrics::new().encode().expect("encodes");
        for op in Operation::ALL {
            assert!(
                text.contains(&format!(
                    r#"kms_request_duration_seconds_count{{operation="{}"}} 0"#,
                    op.name()
                )),
                "{}",
                op.name()
            );
        }
    }
}
