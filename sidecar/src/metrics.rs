use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

#[derive(Clone, Debug)]
pub struct SidecarMetrics {
    pub requests: IntCounterVec,
    pub latency: HistogramVec,
    pub connections: IntCounterVec,
    pub retries: IntCounterVec,
    pub retries_skipped: IntCounterVec,
    pub ejections: IntCounterVec,
    pub panics: IntCounterVec,
    pub inbound_requests: IntCounterVec,
    pub passthrough: IntCounterVec,
    pub rejected: IntCounterVec,
    /// TrafficPolicy at work: faults injected, requests rate limited, refused by a full pool,
    /// mirrored.
    pub policy: IntCounterVec,
    pub upstream_connections: IntCounterVec,
    pub authz: IntCounterVec,
    /// Istio's standard metrics.
    /// Shared with every request's recorder (one pointer to clone, not ten).
    pub istio: std::sync::Arc<strait_api::telemetry::IstioMetrics>,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    let _ = registry.register(Box::new(c.clone()));
    c
}

impl SidecarMetrics {
    pub fn new(registry: &Registry) -> Self {
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "strait_request_duration_seconds",
                "Outbound request latency as the app sees it",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["source_cluster", "destination_cluster", "destination_service"],
        )
        .expect("valid metric");
        let _ = registry.register(Box::new(latency.clone()));
        SidecarMetrics {
            istio: std::sync::Arc::new(strait_api::telemetry::IstioMetrics::new(registry)),
            requests: counter(
                registry,
                "strait_requests_total",
                "Outbound HTTP requests by source and destination cluster, service and response class",
                &[
                    "source_cluster",
                    "destination_cluster",
                    "destination_service",
                    "response_class",
                ],
            ),
            latency,
            connections: counter(
                registry,
                "strait_connections_total",
                "Proxied connections by direction, source and destination cluster, service and result",
                &[
                    "direction",
                    "source_cluster",
                    "destination_cluster",
                    "destination_service",
                    "result",
                ],
            ),
            retries: counter(
                registry,
                "strait_upstream_retries_total",
                "Attempts retried on another endpoint, by destination service and reason",
                &["destination_service", "reason"],
            ),
            retries_skipped: counter(
                registry,
                "strait_upstream_retries_skipped_total",
                "Failed attempts that were not retried, by destination service and why \
                 (replay_buffer_exceeded, not_idempotent, client_body_failed, attempts_exhausted, \
                 retry_budget_exhausted)",
                &["destination_service", "reason"],
            ),
            ejections: counter(
                registry,
                "strait_outlier_ejections_total",
                "Endpoints ejected by passive outlier detection, by destination cluster and service",
                &["destination_cluster", "destination_service"],
            ),
            panics: counter(
                registry,
                "strait_lb_panic_total",
                "Picks made while every ready endpoint of the service was ejected (Envoy's panic \
                 routing: try them anyway rather than fail), by destination service",
                &["destination_service"],
            ),
            inbound_requests: counter(
                registry,
                "strait_inbound_requests_total",
                "Requests received from other sidecars, by source cluster and response class",
                &["source_cluster", "response_class"],
            ),
            rejected: counter(
                registry,
                "strait_rejected_connections_total",
                "Client connections refused before any request was forwarded, by reason \
                 (not_http, content_length_and_transfer_encoding, obs_fold)",
                &["reason"],
            ),
            policy: counter(
                registry,
                "strait_traffic_policy_actions_total",
                "Requests a TrafficPolicy or route acted on, by destination service and action \
                 (fault_delay, fault_abort, rate_limited, rate_limited_shadow, pool_overflow, \
                 retry_budget_exhausted, mirrored, mirror_failed, mirror_skipped)",
                &["destination_service", "action"],
            ),
            authz: counter(
                registry,
                "strait_authz_decisions_total",
                "Authorization decisions at this inbound sidecar, by policy (<ns>/<name>), rule index, \
                 action (ALLOW, DENY, AUDIT, NONE) and decision (allow, deny, audit)",
                &["policy", "rule", "action", "decision"],
            ),
            upstream_connections: counter(
                registry,
                "strait_upstream_connections_opened_total",
                "HTTP/2 connections this proxy opened to endpoints (dials started), by destination service",
                &["destination_service"],
            ),
            passthrough: counter(
                registry,
                "strait_passthrough_connections_total",
                "Intercepted connections to destinations outside the mesh, by result (ok, reset, connect_failed, refused)",
                &["result"],
            ),
        }
    }
}

/// `2xx`, `4xx`, `5xx`, ...
pub fn response_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}
