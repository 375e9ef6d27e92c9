//! The east-west protocol: a QUIC listener (quinn, ALPN `strait/1`, mutual TLS) that remote
//! sidecars and controllers tunnel through, the client they use, and forwarding to local
//! endpoints.
//!
//! A tunnel stream opens with a length-prefixed `TunnelRequest` (service, port, chosen
//! endpoint, trace context, deadline) and is answered with a `TunnelResponse`; after that the
//! stream carries the caller's own TLS session with the destination sidecar, end to end. The
//! gateway routes on the header alone and never holds a key that could read the payload.
//!
//! Where UDP is dropped, the same header opens an HTTP/2 CONNECT stream over TCP+TLS (ALPN
//! `h2`) on the same port; the client falls back on its own and returns to QUIC when it can.

mod client;
mod metrics;
mod run;
mod server;

pub use client::{TunnelClient, TunnelError, TunnelIo, TunnelStream};
pub use metrics::{GatewayMetrics, TunnelClientMetrics};
pub use run::{run, GatewayRunOptions};
pub use server::{Gateway, GatewayOptions};

/// QUIC transport settings shared by both ends.
fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // A dead peer is noticed within the idle timeout: in-flight streams then fail and callers
    // retry elsewhere instead of hanging.
    t.keep_alive_interval(Some(std::time::Duration::from_millis(1_000)));
    t.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(3_000))));
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(4096));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    // Room for bulk transfers on fast links (one tunnel carries many streams).
    t.stream_receive_window(quinn::VarInt::from_u32(8 * 1024 * 1024));
    t.receive_window(quinn::VarInt::from_u32(32 * 1024 * 1024));
    t.send_window(32 * 1024 * 1024);
    t
}
