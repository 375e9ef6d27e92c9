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
mod run;
pub mod upstream;

pub use run::{run, SidecarOptions};

/// Response header the inbound sidecar sets when it could not reach its app: the request never
/// reached application code, so the caller may retry it elsewhere.
pub const UPSTREAM_FAILURE_HEADER: &str = "x-strait-upstream-failure";
/// Request header telling the inbound sidecar to speak HTTP/2 to its app because the calling app
/// spoke HTTP/2 (gRPC). Set only by outbound sidecars, inside mTLS.
pub const APP_PROTOCOL_HEADER: &str = "x-strait-app-protocol";
/// Request header carrying the caller's cluster (inside mTLS, for metrics).
pub const SOURCE_CLUSTER_HEADER: &str = "x-strait-source-cluster";

/// A byte stream the proxy can carry: TCP, TLS, a QUIC stream, an upgraded HTTP connection.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Io for T {}

/// Buffer size for splicing opaque streams: large copies mean fewer TLS records and syscalls.
pub(crate) const SPLICE_BUF: usize = 64 * 1024;
