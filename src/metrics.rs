//! The agent's Prometheus metrics: per served volume, bytes and operations read and
//! written, flushes, discards, errors, requests in flight, the volume's size and its rekey
//! progress; for a WorkSpace, the time of its last snapshot. Encoded by the
//! `prometheus-client` crate, served over HTTP by [`endpoint`].
//!
//! Off unless `SEALVOL_METRICS_LISTEN` names an address (the controller's agents inherit it):
//! an exporter is unauthenticated, so it binds where the operator says (loopback or a
//! private network). Counting is one relaxed atomic add per counter on the I/O path, and
//! nothing at all when metrics are off (`Export::io` is `None`).

use std::borrow::Cow;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

use crate::device::Device;

pub mod endpoint;

pub use endpoint::{MetricsError, MetricsServer};

/// The environment variable that turns the agents' metrics on (`HOST:PORT`; port 0 picks
/// a free one, published in the agent's record and its Prometheus target file).
pub const LISTEN_ENV: &str = "SEALVOL_METRICS_LISTEN";

/// The label set of per-volume series: the served file's name (`disk`, `root`, `user`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VolumeLabel {
    /// The served file.
    pub volume: String,
}

/// The label set of the error counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The served file.
    pub volume: String,
    /// `read`, `write`, `flush` or `discard`.
    pub op: String,
}

/// One agent's metrics while it is being set up: families to hand out per volume and
/// collectors to add; [`AgentMetrics::serve`] freezes it and starts the endpoint.
#[derive(Debug)]
pub struct AgentMetrics {
    registry: Registry,
    target_labels: Vec<(String, String)>,
    read_bytes: Family<VolumeLabel, Counter>,
    written_bytes: Family<VolumeLabel, Counter>,
    reads: Family<VolumeLabel, Counter>,
    writes: Family<VolumeLabel, Counter>,
    flushes: Family<VolumeLabel, Counter>,
    discards: Family<VolumeLabel, Counter>,
    errors: Family<ErrorLabels, Counter>,
    in_flight: Family<VolumeLabel, Gauge>,
}

impl AgentMetrics {
    /// A registry whose every series carries `labels` (e.g. `workspace_id`).
    #[must_use]
    pub fn new(labels: &[(&str, &str)]) -> Self {
        let target_labels: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect();
        let registry = Registry::with_labels(
            target_labels
                .iter()
                .map(|(k, v)| (Cow::Owned(k.clone()), Cow::Owned(v.clone()))),
        );
        let mut m = Self {
            registry,
            target_labels,
            read_bytes: Family::default(),
            written_bytes: Family::default(),
            reads: Family::default(),
            writes: Family::default(),
            flushes: Family::default(),
            discards: Family::default(),
            errors: Family::default(),
            in_flight: Family::default(),
        };
        let counters = [
            (
                "sealvol_volume_read_bytes",
                "Plaintext bytes read from the volume through FUSE.",
                m.read_bytes.clone(),
            ),
            (
                "sealvol_volume_written_bytes",
                "Plaintext bytes written to the volume through FUSE.",
                m.written_bytes.clone(),
            ),
            (
                "sealvol_volume_reads",
                "FUSE read requests served.",
                m.reads.clone(),
            ),
            (
                "sealvol_volume_writes",
                "FUSE write requests served.",
                m.writes.clone(),
            ),
            (
                "sealvol_volume_flushes",
                "fsync requests served (the backing file flushed to disk).",
                m.flushes.clone(),
            ),
            (
                "sealvol_volume_discards",
                "Discard (punch hole) requests served.",
                m.discards.clone(),
            ),
        ];
        for (name, help, family) in counters {
            m.registry.register(name, help, family);
        }
        m.registry.register(
            "sealvol_volume_errors",
            "Requests that failed, by operation (each is also logged).",
            m.errors.clone(),
        );
        m.registry.register(
            "sealvol_volume_in_flight_requests",
            "Requests being served right now.",
            m.in_flight.clone(),
        );
        m
    }

    /// The agent's metrics when `SEALVOL_METRICS_LISTEN` is set, else `None`.
    ///
    /// # Errors
    /// The variable is set but is not a socket address.
    pub fn from_env(
        labels: &[(&str, &str)],
    ) -> Result<Option<(Self, std::net::SocketAddr)>, MetricsError> {
        let Some(listen) = std::env::var_os(LISTEN_ENV) else {
            return Ok(None);
        };
        let text = listen.to_string_lossy();
        let addr = text.trim().parse().map_err(|_| MetricsError::Address {
            value: text.to_string(),
        })?;
        Ok(Some((Self::new(labels), addr)))
    }

    /// The counters of the served file `volume`.
    #[must_use]
    pub fn volume_io(&self, volume: &str) -> VolumeIo {
        let l = VolumeLabel {
            volume: volume.to_string(),
        };
        let err = |op: &str| {
            self.errors
                .get_or_create(&ErrorLabels {
                    volume: volume.to_string(),
                    op: op.to_string(),
                })
                .clone()
        };
        VolumeIo(Arc::new(IoCounters {
            read_bytes: self.read_bytes.get_or_create(&l).clone(),
            written_bytes: self.written_bytes.get_or_create(&l).clone(),
            reads: self.reads.get_or_create(&l).clone(),
            writes: self.writes.get_or_create(&l).clone(),
            flushes: self.flushes.get_or_create(&l).clone(),
            discards: self.discards.get_or_create(&l).clone(),
            read_errors: err("read"),
            write_errors: err("write"),
            flush_errors: err("flush"),
            discard_errors: err("discard"),
            in_flight: self.in_flight.get_or_create(&l).clone(),
        }))
    }

    /// Adds the size and rekey progress of `volumes`, read at each scrape.
    pub fn watch_devices(&mut self, volumes: Vec<(String, Arc<Device>)>) {
        self.registry
            .register_collector(Box::new(DeviceCollector { volumes }));
    }

    /// Adds a collector (e.g. the WorkSpace's last snapshot time).
    pub fn add_collector(&mut self, collector: Box<dyn Collector>) {
        self.registry.register_collector(collector);
    }

    /// The text exposition of everything registered (what a scrape returns).
    ///
    /// # Errors
    /// A collector failed to encode.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        endpoint::encode(&self.registry)
    }

    /// Freezes the registry and serves it at `addr` (see [`endpoint`]).
    ///
    /// # Errors
    /// The address cannot be bound.
    pub fn serve(self, addr: std::net::SocketAddr) -> Result<MetricsServer, MetricsError> {
        MetricsServer::start(Arc::new(self.registry), addr, self.target_labels)
    }
}

#[derive(Debug)]
struct IoCounters {
    read_bytes: Counter,
    written_bytes: Counter,
    reads: Counter,
    writes: Counter,
    flushes: Counter,
    discards: Counter,
    read_errors: Counter,
    write_errors: Counter,
    flush_errors: Counter,
    discard_errors: Counter,
    in_flight: Gauge,
}

/// One served file's counters (cheap to clone; every clone counts into the same series).
#[derive(Debug, Clone)]
pub struct VolumeIo(Arc<IoCounters>);

/// Which request a [`VolumeIo`] records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    /// A read.
    Read,
    /// A write.
    Write,
    /// A flush (fsync).
    Flush,
    /// A discard.
    Discard,
}

/// Counts a request in flight until dropped.
#[derive(Debug)]
pub struct InFlight<'a>(&'a Gauge);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Counts a request in flight until dropped, owning its counters: for a request
/// answered on another thread (asynchronous backing I/O).
#[derive(Debug)]
pub struct OwnedInFlight(VolumeIo);

impl OwnedInFlight {
    /// The counters of the request it counts.
    #[must_use]
    pub fn io(&self) -> &VolumeIo {
        &self.0
    }
}

impl Drop for OwnedInFlight {
    fn drop(&mut self) {
        (self.0).0.in_flight.dec();
    }
}

impl VolumeIo {
    /// Marks a request in flight until the guard drops.
    #[must_use]
    pub fn start(&self) -> InFlight<'_> {
        self.0.in_flight.inc();
        InFlight(&self.0.in_flight)
    }

    /// [`VolumeIo::start`] for a request that finishes on another thread.
    #[must_use]
    pub fn start_owned(&self) -> OwnedInFlight {
        self.0.in_flight.inc();
        OwnedInFlight(self.clone())
    }

    /// Records a finished request of `op` that moved `bytes` (`Err`: it failed).
    pub fn done(&self, op: IoOp, outcome: Result<u64, ()>) {
        let c = &self.0;
        let (requests, bytes, errors) = match op {
            IoOp::Read => (&c.reads, Some(&c.read_bytes), &c.read_errors),
            IoOp::Write => (&c.writes, Some(&c.written_bytes), &c.write_errors),
            IoOp::Flush => (&c.flushes, None, &c.flush_errors),
            IoOp::Discard => (&c.discards, None, &c.discard_errors),
        };
        match outcome {
            Ok(n) => {
                requests.inc();
                if let Some(bytes) = bytes {
                    bytes.inc_by(n);
                }
            }
            Err(()) => {
                errors.inc();
            }
        }
    }
}

/// Size and rekey progress of the served devices, read at scrape time (no cost on I/O).
#[derive(Debug)]
struct DeviceCollector {
    volumes: Vec<(String, Arc<Device>)>,
}

impl Collector for DeviceCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        type Reading = fn(&Device) -> i64;
        let gauges: [(&str, &str, Reading); 3] = [
            (
                "sealvol_volume_size_bytes",
                "The volume's data size.",
                |d| i64::try_from(d.size()).unwrap_or(i64::MAX),
            ),
            (
                "sealvol_rekey_in_progress",
                "1 while the volume is being re-encrypted under a new key.",
                |d| i64::from(d.rekey_boundary().is_some()),
            ),
            (
                "sealvol_rekey_done_bytes",
                "Bytes already re-encrypted by the rekey in progress (0 when none).",
                |d| {
                    d.rekey_boundary()
                        .map_or(0, |b| i64::try_from(b).unwrap_or(i64::MAX))
                },
            ),
        ];
        for (name, help, read) in gauges {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (volume, device) in &self.volumes {
                let label = VolumeLabel {
                    volume: volume.clone(),
                };
                ConstGauge::new(read(device)).encode(family.encode_family(&label)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
