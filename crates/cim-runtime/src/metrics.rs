//! Prometheus metrics every service exposes on `/metrics`.

use std::sync::{
    Arc,
    atomic::{AtomicI64, AtomicU64},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProjectionLabels {
    pub projection: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    pub target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ArchiveLabels {
    pub stream: String,
    pub target: String,
}

/// The service's metrics; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub requests: Family<EndpointLabels, Counter<u64, AtomicU64>>,
    pub errors: Family<EndpointLabels, Counter<u64, AtomicU64>>,
    pub latency: Family<EndpointLabels, Histogram>,
    pub in_flight: Gauge<i64, AtomicI64>,
    pub ready: Gauge<i64, AtomicI64>,
    pub nats_connected: Gauge<i64, AtomicI64>,
    pub nats_reconnects: Counter<u64, AtomicU64>,
    /// Events in the log not yet applied to a projection.
    pub projection_lag: Family<ProjectionLabels, Gauge<i64, AtomicI64>>,
    /// Stream sequence a projection has applied up to.
    pub projection_checkpoint: Family<ProjectionLabels, Gauge<i64, AtomicI64>>,
    /// 1 once the instance was told to drain.
    pub draining: Gauge<i64, AtomicI64>,
    /// Messages of a stream not yet archived and verified on a target (storage manager).
    pub archive_lag: Family<ArchiveLabels, Gauge<i64, AtomicI64>>,
    /// Stream sequence through which a stream is archived and verified on a target.
    pub archive_verified: Family<ArchiveLabels, Gauge<i64, AtomicI64>>,
    /// Unix time (seconds) of the last verification round of a stream that reached its target.
    pub archive_verified_time: Family<ArchiveLabels, Gauge<i64, AtomicI64>>,
    /// 1 while the last request to an archive target succeeded, 0 while it fails.
    pub archive_target_up: Family<TargetLabels, Gauge<i64, AtomicI64>>,
    /// Unix time (seconds) of the last request an archive target answered successfully.
    pub archive_target_ok_time: Family<TargetLabels, Gauge<i64, AtomicI64>>,
    /// 1 while the service says it is degraded (ready, but something it looks after is wrong).
    pub degraded: Gauge<i64, AtomicI64>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new(service: &str, instance: &str) -> Metrics {
        let mut registry = Registry::with_prefix_and_labels(
            "cim",
            [("service".into(), service.to_string().into()), ("instance".into(), instance.to_string().into())]
                .into_iter(),
        );
        let requests = Family::<EndpointLabels, Counter>::default();
        let errors = Family::<EndpointLabels, Counter>::default();
        let latency = Family::<EndpointLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0])
        });
        let in_flight = Gauge::<i64, AtomicI64>::default();
        let ready = Gauge::<i64, AtomicI64>::default();
        let nats_connected = Gauge::<i64, AtomicI64>::default();
        let nats_reconnects = Counter::<u64, AtomicU64>::default();
        let projection_lag = Family::<ProjectionLabels, Gauge<i64, AtomicI64>>::default();
        let projection_checkpoint = Family::<ProjectionLabels, Gauge<i64, AtomicI64>>::default();
        registry.register("requests", "Requests handled, by endpoint", requests.clone());
        registry.register("request_errors", "Requests answered with an error, by endpoint", errors.clone());
        registry.register("request_duration_seconds", "Time to handle a request, by endpoint", latency.clone());
        registry.register("in_flight_requests", "Requests being handled now", in_flight.clone());
        registry.register("ready", "1 when the service is ready (NATS connected, streams usable)", ready.clone());
        registry.register("nats_connected", "1 while connected to NATS", nats_connected.clone());
        registry.register("nats_reconnects", "Reconnections to NATS since start", nats_reconnects.clone());
        registry.register("projection_lag", "Events not yet applied to a projection", projection_lag.clone());
        registry.register(
            "projection_checkpoint",
            "Stream sequence a projection has applied up to",
            projection_checkpoint.clone(),
        );
        let draining = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "draining",
            "1 once the instance was told to drain (its node is being drained)",
            draining.clone(),
        );
        let archive_lag = Family::<ArchiveLabels, Gauge<i64, AtomicI64>>::default();
        let archive_verified = Family::<ArchiveLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "archive_lag",
            "Messages of a stream not yet archived and verified on a target",
            archive_lag.clone(),
        );
        registry.register(
            "archive_verified_sequence",
            "Stream sequence through which a stream is archived and verified on a target",
            archive_verified.clone(),
        );
        let archive_verified_time = Family::<ArchiveLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "archive_last_verified_timestamp_seconds",
            "Unix time of the last verification round of a stream that reached its target",
            archive_verified_time.clone(),
        );
        let archive_target_up = Family::<TargetLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "archive_target_up",
            "1 while the last request to an archive target succeeded, 0 while it fails",
            archive_target_up.clone(),
        );
        let archive_target_ok_time = Family::<TargetLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "archive_target_last_success_timestamp_seconds",
            "Unix time of the last request an archive target answered successfully",
            archive_target_ok_time.clone(),
        );
        let degraded = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "degraded",
            "1 while the service is ready but degraded (e.g. an archive target unreachable or behind)",
            degraded.clone(),
        );
        Metrics {
            registry: Arc::new(registry),
            requests,
            errors,
            latency,
            in_flight,
            ready,
            nats_connected,
            nats_reconnects,
            projection_lag,
            projection_checkpoint,
            draining,
            archive_lag,
            archive_verified,
            archive_verified_time,
            archive_target_up,
            archive_target_ok_time,
            degraded,
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_service_instance_and_endpoint() {
        let m = Metrics::new("registry", "r-1");
        let l = EndpointLabels { endpoint: "describe".into() };
        m.requests.get_or_create(&l).inc();
        m.latency.get_or_create(&l).observe(0.002);
        m.ready.set(1);
        let text = m.encode();
        assert!(
            text.contains(r#"cim_requests_total{service="registry",instance="r-1",endpoint="describe"} 1"#),
            "{text}"
        );
        assert!(text.contains("cim_request_duration_seconds_bucket"), "{text}");
        assert!(text.contains(r#"cim_ready{service="registry",instance="r-1"} 1"#), "{text}");
    }
}
