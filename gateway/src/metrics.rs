use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

/// Tunnel metrics of a gateway (server side) or of a sidecar's tunnel client.
#[derive(Clone, Debug)]
pub struct GatewayMetrics {
    /// Streams by source cluster, destination service and status.
    pub streams: IntCounterVec,
    pub active_streams: IntGauge,
    pub bytes: IntCounterVec,
    pub connect_latency: HistogramVec,
    /// Istio's standard metrics: the gateway reports the hop it makes (`reporter="source"`).
    pub istio: strait_api::telemetry::IstioMetrics,
}

impl GatewayMetrics {
    pub fn new(registry: &Registry) -> Self {
        let streams = IntCounterVec::new(
            Opts::new(
                "strait_tunnel_streams_total",
                "East-west tunnel streams, by source cluster, destination service and status",
            ),
            &["source_cluster", "destination_service", "status"],
        )
        .expect("valid metric");
        let active_streams =
            IntGauge::new("strait_tunnel_streams_active", "Tunnel streams open now").expect("valid metric");
        let bytes = IntCounterVec::new(
            Opts::new(
                "strait_tunnel_bytes_total",
                "Bytes carried by tunnel streams, by direction",
            ),
            &["direction"],
        )
        .expect("valid metric");
        let connect_latency = HistogramVec::new(
            HistogramOpts::new(
                "strait_tunnel_endpoint_connect_seconds",
                "Time from tunnel header to connected local endpoint",
            )
            .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]),
            &["destination_service"],
        )
        .expect("valid metric");
        for m in [
            Box::new(streams.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(active_streams.clone()),
            Box::new(bytes.clone()),
            Box::new(connect_latency.clone()),
        ] {
            let _ = registry.register(m);
        }
        GatewayMetrics {
            istio: strait_api::telemetry::IstioMetrics::new(registry),
            streams,
            active_streams,
            bytes,
            connect_latency,
        }
    }
}

/// The tunnel client's view (in sidecars and controllers): tunnels by transport, and whether
/// each gateway is reached over the TCP+TLS fallback.
#[derive(Clone, Debug)]
pub struct TunnelClientMetrics {
    pub tunnels: IntCounterVec,
    pub fallback: prometheus::IntGaugeVec,
    pub switches: IntCounterVec,
    pub lost: IntCounterVec,
    pub down: prometheus::IntGaugeVec,
}

impl TunnelClientMetrics {
    pub fn new(registry: &Registry) -> Self {
        let tunnels = IntCounterVec::new(
            Opts::new(
                "strait_tunnel_client_streams_total",
                "Tunnels opened to remote gateways, by transport (quic, tcp)",
            ),
            &["transport"],
        )
        .expect("valid metric");
        let fallback = prometheus::IntGaugeVec::new(
            Opts::new(
                "strait_tunnel_fallback_active",
                "1 while tunnels to the gateway use the TCP+TLS fallback because QUIC (UDP) fails",
            ),
            &["gateway"],
        )
        .expect("valid metric");
        let switches = IntCounterVec::new(
            Opts::new(
                "strait_tunnel_transport_switches_total",
                "Switches of the tunnel transport to a gateway, by the transport switched to",
            ),
            &["gateway", "to"],
        )
        .expect("valid metric");
        let lost = IntCounterVec::new(
            Opts::new(
                "strait_tunnel_gateway_lost_total",
                "Tunnel connections to a gateway that went silent (keep-alives unanswered) and were closed",
            ),
            &["gateway"],
        )
        .expect("valid metric");
        let down = prometheus::IntGaugeVec::new(
            Opts::new(
                "strait_tunnel_gateway_down",
                "1 while a gateway is unreachable over both QUIC and TCP+TLS: its endpoints are not chosen",
            ),
            &["gateway"],
        )
        .expect("valid metric");
        for m in [
            Box::new(tunnels.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(fallback.clone()),
            Box::new(switches.clone()),
            Box::new(lost.clone()),
            Box::new(down.clone()),
        ] {
            let _ = registry.register(m);
        }
        TunnelClientMetrics {
            tunnels,
            fallback,
            switches,
            lost,
            down,
        }
    }
}
