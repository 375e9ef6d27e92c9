//! The per-workload proxy.
//!
//! Outbound: the app's connection arrives on the outbound listener (an explicit HTTP proxy:
//! absolute-form requests and CONNECT); the sidecar finds the service, picks an endpoint with
//! the locality-aware balancer, and connects — mTLS straight to a local endpoint's sidecar, or
//! through the remote cluster's gateway with the mTLS session inside the QUIC stream. Connect
//! failures are retried on another endpoint and feed passive outlier detection.
//!
//! Inbound: terminate mTLS, note the peer's identity, forward plaintext to the app on loopback.

pub mod dns;
pub mod inbound;
pub mod lb;
pub mod metrics;
pub mod outbound;
pub mod policy;
mod run;
pub mod splice;
pub mod telemetry;
pub mod upstream;

pub use run::{run, SidecarOptions};

/// Response header the inbound sidecar sets when it could not reach its app: the request never
/// reached application code, so the caller may retry it elsewhere.
pub const UPSTREAM_FAILURE_HEADER: &str = "x-strait-upstream-failure";
/// Request header telling the inbound sidecar to speak HTTP/2 to its app because the calling app
/// spoke HTTP/2 (gRPC). Set only by outbound sidecars, inside mTLS.
pub const APP_PROTOCOL_HEADER: &str = "x-strait-app-protocol";
/// Request header that carried the caller's cluster before it was read from the caller's
/// certificate; removed wherever it appears so no app can plant it.
pub const SOURCE_CLUSTER_HEADER: &str = "x-strait-source-cluster";

/// Sent by a calling sidecar to the destination's (inside mTLS, never taken from an app): the
/// route rule (`<ns>/<svc>#<rule>`) whose TrafficPolicy's rate limit applies to the request,
/// which the destination enforces but cannot see (the caller matched the route).
pub const RATE_LIMIT_TARGET_HEADER: &str = "x-strait-rate-limit-target";

/// A byte stream the proxy can carry: TCP, TLS, a QUIC stream, an upgraded HTTP connection.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Io for T {}

/// Bounds on what one client can make a proxy hold or wait for. Every one has a flag on
/// `strait sidecar`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyLimits {
    /// Bytes of a request body kept so a failed attempt can be resent; a request that sent
    /// more is not retried.
    pub replay_buffer: usize,
    /// The largest request head: request line and headers (HTTP/1.1), header list (HTTP/2).
    pub max_header_bytes: usize,
    /// Concurrent streams a client may open on one HTTP/2 connection.
    pub max_concurrent_streams: u32,
    /// How long a client may take to send a whole request head (slowloris).
    pub header_read_timeout: std::time::Duration,
    /// An opaque TCP connection (or an upgraded one) with no byte either way for this long
    /// is closed.
    pub tcp_idle_timeout: std::time::Duration,
}

impl Default for ProxyLimits {
    fn default() -> Self {
        ProxyLimits {
            replay_buffer: outbound::DEFAULT_REPLAY_BUFFER,
            max_header_bytes: 64 * 1024,
            max_concurrent_streams: 1024,
            header_read_timeout: std::time::Duration::from_secs(10),
            tcp_idle_timeout: std::time::Duration::from_secs(3600),
        }
    }
}
