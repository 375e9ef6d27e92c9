//! Strait's shared wire types and the pieces both proxies need.
//!
//! - [`pb`]: the protobuf messages and gRPC services (config stream, certificates, peering,
//!   tunnel header), generated from `proto/strait.proto`.
//! - [`locality`] and [`lb`]: localities and the locality-aware load balancer (priority levels,
//!   Envoy's priority load with overprovisioning, passive outlier detection), pure logic.
//! - [`routes`]: Gateway API HTTPRoute (GAMMA) as data: the upstream schema, its compilation
//!   into match tables with every field error named, and request matching, pure logic.
//! - [`authz`]: `AuthorizationPolicy` (Istio's semantics plus clusters and trust domains as
//!   sources), path normalization and the decision, pure logic.
//! - [`traffic`]: `TrafficPolicy` (retries and their budget, timeouts, circuit breaking,
//!   outlier detection, faults, rate limits, locality), its schema and checks, pure logic.
//! - [`snapshot`]: the validated, immutable config a proxy serves from.
//! - [`xds`]: the proxy side of the config stream; [`certs`]: certificate bootstrap and rotation.
//! - [`tunnel`]: the tunnel header codec; [`transport`]: gRPC over mTLS; [`admin`]: the admin
//!   HTTP endpoint (metrics, readiness) every daemon serves.

pub mod accesslog;
pub mod admin;
pub mod authz;
pub mod certs;
pub mod coalesce;
pub mod copy;
pub mod drain;
pub mod lb;
pub mod locality;
pub mod proxy;
pub mod routes;
pub mod snapshot;
pub mod telemetry;
#[doc(hidden)]
pub mod testing;
pub mod trace;
pub mod traffic;
pub mod transport;
pub mod tunnel;
pub mod xds;

#[allow(clippy::all, clippy::unwrap_used)]
pub mod pb {
    tonic::include_proto!("strait.v1");

    /// The controller's config-stream server, which sends each resource as bytes encoded once
    /// and shared by every subscriber (`proto/config_wire.proto`); proxies read the same bytes
    /// as [`ConfigUpdate`].
    pub mod wire {
        include!(concat!(env!("OUT_DIR"), "/wire/strait.v1.rs"));
    }
}

/// The largest config-stream or peering message a controller or proxy accepts. gRPC's
/// default (4 MiB) is a whole catalog of about 42,000 endpoints: a proxy connecting to a larger
/// clusterset, or a cluster exporting more, would be refused its first message. 256 MiB holds
/// millions; past that, scope proxies to the namespaces they call (`--scope-namespaces`).
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// The namespace of Strait's own components.
pub const SYSTEM_NAMESPACE: &str = "strait-system";
/// The service name under which a controller serves peering (reached through its gateway).
pub const FEDERATION_SERVICE: &str = "strait-federation";
/// Service accounts of the system components.
pub const FEDERATION_SA: &str = "strait-federation";
pub const GATEWAY_SA: &str = "strait-gateway";

/// The audience a service-account token must carry for the CA to accept it.
pub const TOKEN_AUDIENCE: &str = "strait";

/// Whether `v` is an RFC 1123 label (Kubernetes names of namespaces, services, clusters).
pub fn dns_label(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !v.starts_with('-')
        && !v.ends_with('-')
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

pub fn from_unix_ms(ms: i64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64)
}
