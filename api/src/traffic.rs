//! `TrafficPolicy` (`policy.strait.dev/v1alpha1`): what Gateway API lacks, attached by
//! `targetRefs` to a `Service` or `ServiceImport` (optionally one named route rule): retries
//! beyond GEP-1731 with a retry budget, timeouts, circuit breaking, outlier detection, fault
//! injection, local rate limiting and per-service locality. Field names follow Istio's
//! DestinationRule/VirtualService and Gateway API's BackendTrafficPolicy so users recognise
//! them. Unknown fields are refused, so a policy is never enforced more loosely than written.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::routes::compile::parse_duration;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicySpec {
    #[serde(default)]
    pub target_refs: Vec<TargetRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<TimeoutsSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPoolSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<FaultSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<LocalitySpec>,
    /// Tracing of calls to the target (Istio's Telemetry API name): the share of new traces
    /// sampled, overriding the mesh's (an incoming decision is still honoured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<TracingSpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TracingSpec {
    /// 0.0–100.0, in steps as small as 0.01.
    pub random_sampling_percentage: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRef {
    #[serde(default)]
    pub group: String,
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// A route rule's name: the policy applies only to requests that rule routed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetrySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_on: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_other_clusters: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BudgetSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_retries_per_second: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TimeoutsSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_idle: Option<String>,
    /// The whole call (like a route's timeouts.request), where no route sets one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionPoolSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierSpec {
    #[serde(default, rename = "consecutive5xxErrors", skip_serializing_if = "Option::is_none")]
    pub consecutive_5xx_errors: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
    /// Envoy's failure-percentage ejection, judged every `interval`; absent: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_percentage: Option<FailurePercentageSpec>,
}

/// `outlierDetection.failurePercentage` (Envoy's `failure_percentage_*`, Kuma's
/// `detectors.failurePercentage`): at each interval, an endpoint that took at least
/// `requestVolume` requests (default 50), of which at least `threshold` % (default 85) failed,
/// is ejected, when at least `minimumHosts` endpoints (default 5) took that many.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailurePercentageSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum_hosts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_volume: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<DelaySpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<AbortSpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DelaySpec {
    pub fixed_delay: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<f64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AbortSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// A gRPC status: a code number or its name (`UNAVAILABLE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "int_or_string")]
    pub grpc_status: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<f64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitSpec {
    pub requests_per_second: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// `proxy` (each destination proxy allows the rate) or `destination` (the rate is the
    /// total for the service, divided among its ready endpoints in every cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// `enforce` or `shadow` (count what would be limited, let it through).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalitySpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failover: Vec<FailoverSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failover_priority: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailoverSpec {
    pub from: String,
    pub to: String,
}

/// A Kubernetes int-or-string field.
fn int_or_string(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"x-kubernetes-int-or-string": true})
}

/// What a retry is allowed on (Envoy's `retry_on` names, gRPC status names, or a code).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RetryOn {
    ConnectFailure,
    Reset,
    RefusedStream,
    /// Any 5xx answer.
    FiveXx,
    /// 502, 503, 504.
    GatewayError,
    Status(u16),
    /// A gRPC status code in the response head or trailers-only response.
    Grpc(u32),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Budget {
    pub percent: f64,
    pub interval: Duration,
    pub min_per_second: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub per_try: Option<Duration>,
    pub retry_on: Vec<RetryOn>,
    pub budget: Budget,
    pub other_clusters: bool,
}

impl RetryPolicy {
    pub fn retries_status(&self, status: u16, grpc: Option<u32>) -> bool {
        self.retry_on.iter().any(|r| match r {
            RetryOn::FiveXx => status >= 500,
            RetryOn::GatewayError => matches!(status, 502..=504),
            RetryOn::Status(s) => *s == status,
            RetryOn::Grpc(code) => grpc == Some(*code),
            _ => false,
        })
    }

    pub fn retries_connect_failure(&self) -> bool {
        self.retry_on.iter().any(|r| matches!(r, RetryOn::ConnectFailure))
    }

    pub fn retries_reset(&self) -> bool {
        self.retry_on
            .iter()
            .any(|r| matches!(r, RetryOn::Reset | RetryOn::RefusedStream))
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Abort {
    Http(u16),
    Grpc(u32),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    pub delay: Option<(Duration, f64)>,
    pub abort: Option<(Abort, f64)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
    pub per_destination: bool,
    pub shadow: bool,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Pool {
    pub max_connections: Option<u32>,
    pub max_pending: Option<u32>,
    pub max_requests: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Outlier {
    pub consecutive_5xx: u32,
    pub consecutive_gateway: u32,
    pub interval: Duration,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
    pub failure_percentage: Option<crate::lb::FailurePercentage>,
}

/// A checked policy, ready for the proxies.
#[derive(Clone, Debug, PartialEq)]
pub struct CompiledPolicy {
    pub namespace: String,
    pub name: String,
    pub targets: Vec<PolicyTarget>,
    pub retry: Option<RetryPolicy>,
    pub connect_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub stream_idle_timeout: Option<Duration>,
    pub request_timeout: Option<Duration>,
    pub pool: Option<Pool>,
    pub outlier: Option<Outlier>,
    pub fault: Option<Fault>,
    pub rate_limit: Option<RateLimit>,
    pub failover: Vec<(String, String)>,
    pub failover_priority: Vec<String>,
    /// Percentage of new traces sampled for calls to the target.
    pub trace_sampling: Option<f64>,
}

impl CompiledPolicy {
    /// Takes from a newer policy on the same target every setting this one leaves unset.
    pub fn fill_from(&mut self, newer: &CompiledPolicy) {
        fn fill<T: Clone>(mine: &mut Option<T>, theirs: &Option<T>) {
            if mine.is_none() {
                mine.clone_from(theirs);
            }
        }
        fill(&mut self.retry, &newer.retry);
        fill(&mut self.connect_timeout, &newer.connect_timeout);
        fill(&mut self.idle_timeout, &newer.idle_timeout);
        fill(&mut self.stream_idle_timeout, &newer.stream_idle_timeout);
        fill(&mut self.request_timeout, &newer.request_timeout);
        fill(&mut self.pool, &newer.pool);
        fill(&mut self.outlier, &newer.outlier);
        fill(&mut self.fault, &newer.fault);
        fill(&mut self.rate_limit, &newer.rate_limit);
        fill(&mut self.trace_sampling, &newer.trace_sampling);
        if self.failover.is_empty() {
            self.failover.clone_from(&newer.failover);
        }
        if self.failover_priority.is_empty() {
            self.failover_priority.clone_from(&newer.failover_priority);
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyTarget {
    pub namespace: String,
    pub name: String,
    /// A `ServiceImport` (every cluster's endpoints) rather than a `Service`.
    pub clusterset: bool,
    pub rule: Option<String>,
}

/// One problem, with its field path (from `spec`) and the fix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {message}")]
pub struct PolicyError {
    pub field: String,
    pub message: String,
    /// A target that is not in the catalog (ResolvedRefs), not a bad value (Accepted).
    pub unresolved: bool,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> PolicyError {
    PolicyError {
        field: field.into(),
        message: message.into(),
        unresolved: false,
    }
}

/// gRPC status names (`UNAVAILABLE`, `unavailable`, `resource-exhausted`) to codes.
pub fn grpc_code(name: &str) -> Option<u32> {
    const NAMES: [&str; 17] = [
        "ok",
        "cancelled",
        "unknown",
        "invalid_argument",
        "deadline_exceeded",
        "not_found",
        "already_exists",
        "permission_denied",
        "resource_exhausted",
        "failed_precondition",
        "aborted",
        "out_of_range",
        "unimplemented",
        "internal",
        "unavailable",
        "data_loss",
        "unauthenticated",
    ];
    let n = name.to_ascii_lowercase().replace('-', "_");
    NAMES.iter().position(|x| *x == n).map(|i| i as u32)
}

fn duration(field: &str, value: &Option<String>, errors: &mut Vec<PolicyError>) -> Option<Duration> {
    let v = value.as_ref()?;
    match parse_duration(v) {
        Ok(d) if d.is_zero() => {
            errors.push(err(field, "must be more than zero; leave the field out for no limit"));
            None
        }
        Ok(d) => Some(d),
        Err(e) => {
            errors.push(err(field, e));
            None
        }
    }
}

fn percentage(field: &str, p: Option<f64>, errors: &mut Vec<PolicyError>) -> f64 {
    let p = p.unwrap_or(100.0);
    if !(0.0..=100.0).contains(&p) || p.is_nan() {
        errors.push(err(field, format!("{p} is not a percentage between 0 and 100")));
    }
    p.clamp(0.0, 100.0) / 100.0
}

/// What a target refers to, as the catalog has it.
pub enum TargetLookup {
    Found,
    NotFound,
}

/// Checks a policy field by field. Returns the compiled policy (None when any field is
/// invalid: a policy is applied whole or not at all) and every problem found.
pub fn compile_policy(
    namespace: &str,
    name: &str,
    spec: &TrafficPolicySpec,
    lookup: &dyn Fn(&str, &str) -> TargetLookup,
) -> (Option<CompiledPolicy>, Vec<PolicyError>) {
    let mut errors = vec![];
    let mut targets = vec![];
    if spec.target_refs.is_empty() {
        errors.push(err(
            "spec.targetRefs",
            "names no target; add {group: multicluster.x-k8s.io, kind: ServiceImport, name: <service>}",
        ));
    }
    for (i, t) in spec.target_refs.iter().enumerate() {
        let f = format!("spec.targetRefs[{i}]");
        let clusterset = match (t.group.as_str(), t.kind.as_str()) {
            ("" | "core", "Service") => false,
            ("multicluster.x-k8s.io", "ServiceImport") => true,
            (g, k) => {
                errors.push(err(
                    format!("{f}.kind"),
                    format!("{g}/{k} cannot be a target; use kind Service (group \"\") or ServiceImport (group multicluster.x-k8s.io)"),
                ));
                continue;
            }
        };
        let ns = t.namespace.clone().unwrap_or_else(|| namespace.to_string());
        if ns != namespace {
            errors.push(err(
                format!("{f}.namespace"),
                "a policy may only target services of its own namespace",
            ));
            continue;
        }
        if let TargetLookup::NotFound = lookup(&ns, &t.name) {
            errors.push(PolicyError {
                field: format!("{f}.name"),
                message: format!("service {ns}/{} is not in the catalog of any cluster", t.name),
                unresolved: true,
            });
        }
        targets.push(PolicyTarget {
            namespace: ns,
            name: t.name.clone(),
            clusterset,
            rule: t.section_name.clone(),
        });
    }
    let retry = spec.retry.as_ref().map(|r| {
        let mut retry_on = vec![];
        let list: Vec<String> = if r.retry_on.is_empty() {
            vec!["connect-failure".into(), "reset".into(), "refused-stream".into()]
        } else {
            r.retry_on.clone()
        };
        for (i, name) in list.iter().enumerate() {
            let on = match name.as_str() {
                "connect-failure" => Some(RetryOn::ConnectFailure),
                "reset" => Some(RetryOn::Reset),
                "refused-stream" => Some(RetryOn::RefusedStream),
                "5xx" => Some(RetryOn::FiveXx),
                "gateway-error" => Some(RetryOn::GatewayError),
                s if s.len() == 3 && s.parse::<u16>().is_ok_and(|c| (400..600).contains(&c)) => {
                    s.parse().ok().map(RetryOn::Status)
                }
                s => grpc_code(s).filter(|c| *c != 0).map(RetryOn::Grpc),
            };
            match on {
                Some(on) => retry_on.push(on),
                None => errors.push(err(
                    format!("spec.retry.retryOn[{i}]"),
                    format!("{name:?} is not a retry condition; use connect-failure, reset, refused-stream, 5xx, gateway-error, an HTTP status (\"503\") or a gRPC status (unavailable)"),
                )),
            }
        }
        let attempts = r.attempts.unwrap_or(2);
        if attempts > 10 {
            errors.push(err("spec.retry.attempts", "at most 10 retries"));
        }
        let b = r.budget.clone().unwrap_or_default();
        let percent = b.percent.unwrap_or(20);
        if percent > 100 {
            errors.push(err("spec.retry.budget.percent", "a percentage between 0 and 100"));
        }
        RetryPolicy {
            attempts: attempts.min(10),
            per_try: duration("spec.retry.perTryTimeout", &r.per_try_timeout, &mut errors),
            retry_on,
            budget: Budget {
                percent: f64::from(percent.min(100)) / 100.0,
                interval: duration("spec.retry.budget.interval", &b.interval, &mut errors)
                    .unwrap_or(Duration::from_secs(10)),
                min_per_second: b.min_retries_per_second.unwrap_or(10),
            },
            other_clusters: r.retry_other_clusters.unwrap_or(true),
        }
    });
    let t = spec.timeouts.clone().unwrap_or_default();
    let connect_timeout = duration("spec.timeouts.connect", &t.connect, &mut errors);
    let idle_timeout = duration("spec.timeouts.idle", &t.idle, &mut errors);
    let stream_idle_timeout = duration("spec.timeouts.streamIdle", &t.stream_idle, &mut errors);
    let request_timeout = duration("spec.timeouts.request", &t.request, &mut errors);
    if let (Some(r), Some(per_try)) = (request_timeout, retry.as_ref().and_then(|r| r.per_try)) {
        if per_try > r {
            errors.push(err(
                "spec.retry.perTryTimeout",
                format!("{per_try:?} is longer than timeouts.request ({r:?}); make it shorter"),
            ));
        }
    }
    let pool = spec.connection_pool.as_ref().map(|p| {
        // maxPendingRequests: 0 is meaningful (no queue: refuse at once when full).
        for (field, v) in [("maxConnections", p.max_connections), ("maxRequests", p.max_requests)] {
            if v == Some(0) {
                errors.push(err(
                    format!("spec.connectionPool.{field}"),
                    "0 would refuse every request; leave the field out for no limit",
                ));
            }
        }
        Pool {
            max_connections: p.max_connections,
            max_pending: p.max_pending_requests,
            max_requests: p.max_requests,
            max_requests_per_connection: p.max_requests_per_connection.filter(|n| *n > 0),
        }
    });
    let outlier = spec.outlier_detection.as_ref().map(|o| {
        let max = o.max_ejection_percent.unwrap_or(10);
        if max > 100 {
            errors.push(err(
                "spec.outlierDetection.maxEjectionPercent",
                "a percentage between 0 and 100",
            ));
        }
        Outlier {
            consecutive_5xx: o.consecutive_5xx_errors.unwrap_or(5),
            consecutive_gateway: o.consecutive_gateway_errors.unwrap_or(0),
            interval: duration("spec.outlierDetection.interval", &o.interval, &mut errors)
                .unwrap_or(Duration::from_secs(10)),
            base_ejection: duration(
                "spec.outlierDetection.baseEjectionTime",
                &o.base_ejection_time,
                &mut errors,
            )
            .unwrap_or(Duration::from_secs(30)),
            max_ejection_percent: max.min(100),
            failure_percentage: o.failure_percentage.as_ref().map(|f| {
                let threshold = f.threshold.unwrap_or(85);
                if threshold > 100 {
                    errors.push(err(
                        "spec.outlierDetection.failurePercentage.threshold",
                        "a percentage between 0 and 100",
                    ));
                }
                crate::lb::FailurePercentage {
                    threshold: threshold.min(100),
                    minimum_hosts: f.minimum_hosts.unwrap_or(5),
                    request_volume: f.request_volume.unwrap_or(50).max(1),
                }
            }),
        }
    });
    let fault = spec.fault.as_ref().map(|f| {
        let delay = f.delay.as_ref().and_then(|d| {
            let p = percentage("spec.fault.delay.percentage", d.percentage, &mut errors);
            duration("spec.fault.delay.fixedDelay", &Some(d.fixed_delay.clone()), &mut errors).map(|t| (t, p))
        });
        let abort = f.abort.as_ref().and_then(|a| {
            let p = percentage("spec.fault.abort.percentage", a.percentage, &mut errors);
            let what = match (a.http_status, &a.grpc_status) {
                (Some(s), None) if (200..600).contains(&s) => Some(Abort::Http(s)),
                (Some(s), None) => {
                    errors.push(err(
                        "spec.fault.abort.httpStatus",
                        format!("{s} is not an HTTP status (200-599)"),
                    ));
                    None
                }
                (None, Some(g)) => {
                    let code = match g {
                        serde_json::Value::Number(n) => n.as_u64().filter(|c| (1..=16).contains(c)).map(|c| c as u32),
                        serde_json::Value::String(s) => grpc_code(s).filter(|c| *c != 0),
                        _ => None,
                    };
                    if code.is_none() {
                        errors.push(err(
                            "spec.fault.abort.grpcStatus",
                            format!("{g} is not a gRPC status; use a code 1-16 or a name like UNAVAILABLE"),
                        ));
                    }
                    code.map(Abort::Grpc)
                }
                (Some(_), Some(_)) => {
                    errors.push(err("spec.fault.abort", "set httpStatus or grpcStatus, not both"));
                    None
                }
                (None, None) => {
                    errors.push(err("spec.fault.abort", "set httpStatus or grpcStatus"));
                    None
                }
            };
            what.map(|w| (w, p))
        });
        Fault { delay, abort }
    });
    let rate_limit = spec.rate_limit.as_ref().map(|r| {
        if r.requests_per_second.is_nan() || r.requests_per_second <= 0.0 {
            errors.push(err(
                "spec.rateLimit.requestsPerSecond",
                "must be more than zero (to refuse everything, use fault.abort at 100 percent)",
            ));
        }
        let per_destination = match r.scope.as_deref() {
            None | Some("proxy") => false,
            Some("destination") => true,
            Some(other) => {
                errors.push(err(
                    "spec.rateLimit.scope",
                    format!("{other:?} is not a scope; use proxy or destination"),
                ));
                false
            }
        };
        let shadow = match r.mode.as_deref() {
            None | Some("enforce") => false,
            Some("shadow") => true,
            Some(other) => {
                errors.push(err(
                    "spec.rateLimit.mode",
                    format!("{other:?} is not a mode; use enforce or shadow"),
                ));
                false
            }
        };
        RateLimit {
            per_second: r.requests_per_second.max(0.0),
            burst: r.burst.unwrap_or(0),
            per_destination,
            shadow,
        }
    });
    let trace_sampling = spec.tracing.as_ref().map(|t| {
        let p = t.random_sampling_percentage;
        if !(0.0..=100.0).contains(&p) {
            errors.push(err(
                "spec.tracing.randomSamplingPercentage",
                format!("{p} is not a percentage; use 0 to 100 (e.g. 1 samples one trace in a hundred)"),
            ));
        }
        p.clamp(0.0, 100.0)
    });
    let loc = spec.locality.clone().unwrap_or_default();
    if errors.iter().any(|e| !e.unresolved) {
        return (None, errors);
    }
    let compiled = CompiledPolicy {
        namespace: namespace.to_string(),
        name: name.to_string(),
        targets,
        retry,
        connect_timeout,
        idle_timeout,
        stream_idle_timeout,
        request_timeout,
        pool,
        outlier,
        fault,
        rate_limit,
        failover: loc.failover.into_iter().map(|f| (f.from, f.to)).collect(),
        failover_priority: loc.failover_priority,
        trace_sampling,
    };
    (Some(compiled), errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> TrafficPolicySpec {
        serde_yaml::from_str(yaml).expect("valid yaml")
    }

    #[test]
    fn the_issue_example_compiles() {
        let s = spec(
            r#"
targetRefs: [{group: multicluster.x-k8s.io, kind: ServiceImport, name: greeter}]
retry: {attempts: 3, perTryTimeout: 500ms, retryOn: [connect-failure, reset, refused-stream, "503", unavailable],
        budget: {percent: 20, interval: 10s, minRetriesPerSecond: 10}, retryOtherClusters: true}
timeouts: {connect: 2s, idle: 1h, streamIdle: 30m}
connectionPool: {maxConnections: 1024, maxPendingRequests: 1024, maxRequests: 4096, maxRequestsPerConnection: 0}
outlierDetection: {consecutive5xxErrors: 5, consecutiveGatewayErrors: 3, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 50}
fault: {delay: {fixedDelay: 2s, percentage: 10}, abort: {httpStatus: 503, percentage: 5}}
rateLimit: {requestsPerSecond: 100, burst: 20, scope: destination, mode: enforce}
locality: {failover: [{from: us-east, to: us-west}], failoverPriority: [topology.kubernetes.io/region]}
"#,
        );
        let (p, errors) = compile_policy("demo", "greeter", &s, &|_, _| TargetLookup::Found);
        assert!(errors.is_empty(), "{errors:?}");
        let p = p.expect("compiled");
        let r = p.retry.expect("retry");
        assert_eq!(r.attempts, 3);
        assert!(r.retries_status(503, None) && !r.retries_status(500, None));
        assert!(r.retries_status(200, Some(14)));
        assert_eq!(r.budget.percent, 0.2);
        assert_eq!(p.fault.expect("fault").abort, Some((Abort::Http(503), 0.05)));
        assert!(p.rate_limit.expect("rl").per_destination);
        assert!(p.targets[0].clusterset);
    }

    #[test]
    fn every_bad_field_is_named() {
        let s = spec(
            r#"
targetRefs: [{group: apps, kind: Deployment, name: x}]
retry: {retryOn: [sometimes]}
fault: {abort: {grpcStatus: BOGUS}}
rateLimit: {requestsPerSecond: 0, scope: galaxy}
"#,
        );
        let (p, errors) = compile_policy("demo", "x", &s, &|_, _| TargetLookup::Found);
        assert!(p.is_none());
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        for f in [
            "spec.targetRefs[0].kind",
            "spec.retry.retryOn[0]",
            "spec.fault.abort.grpcStatus",
            "spec.rateLimit.requestsPerSecond",
            "spec.rateLimit.scope",
        ] {
            assert!(fields.contains(&f), "{f} missing from {fields:?}");
        }
    }

    #[test]
    fn a_missing_target_is_unresolved_not_invalid() {
        let s = spec("targetRefs: [{kind: Service, name: gone}]\nfault: {abort: {httpStatus: 500}}");
        let (p, errors) = compile_policy("demo", "x", &s, &|_, _| TargetLookup::NotFound);
        assert!(p.is_some(), "still compiled; it applies when the service appears");
        assert!(errors[0].unresolved);
    }
}
