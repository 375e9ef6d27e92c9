//! Wiring of one gateway process: certificate from the cluster CA, config stream from the
//! controller, the QUIC listener and its TCP+TLS fallback, the admin endpoint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use strait_api::admin::Admin;
use strait_api::drain::{Drain, Shutdown};
use strait_api::locality::Locality;
use strait_api::pb;
use strait_api::proxy::ControllerLink;
use strait_api::snapshot::Snapshot;

use crate::{Gateway, GatewayMetrics, GatewayOptions};

#[derive(Clone, Debug)]
pub struct GatewayRunOptions {
    pub name: String,
    pub locality: Locality,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub controller: ControllerLink,
    /// How long streams in flight may take to finish on shutdown.
    pub drain_timeout: Duration,
    /// Spans and access logs.
    pub telemetry: strait_api::telemetry::TelemetryOptions,
}

pub async fn run(opts: GatewayRunOptions) -> anyhow::Result<()> {
    // Listened for from the start, as the sidecar does (`strait_sidecar::run`): a gateway
    // waiting for its controller stops at once too, PID 1 of a container or not.
    let mut shutdown = Shutdown::listen();
    let registry = strait_api::admin::new_registry();
    let admin = Admin::new(registry.clone());
    let admin_listener = strait_api::admin::bind(opts.admin).await?;
    tokio::spawn(admin.clone().serve(admin_listener));

    let (tx, rx) = tokio::sync::watch::channel(Arc::new(Snapshot::default()));
    let hello = pb::Hello {
        node: opts.name.clone(),
        kind: "gateway".into(),
        cluster: opts.locality.cluster.clone(),
        have_version: 0,
        admin: opts.admin.to_string(),
        namespaces: vec![],
        // The config client says it takes updates in parts.
        ..Default::default()
    };
    let Some(connected) = shutdown.or(opts.controller.connect(hello, &registry, tx)).await else {
        tracing::info!("stopped before the controller issued a certificate");
        return Ok(());
    };
    let (store, granted) = connected?;
    if granted.quic_reset_key.is_none() {
        tracing::warn!("the CA gave no QUIC reset key (a controller of an older build): after a restart, clients of this gateway's predecessor wait out their idle timeout");
    }

    let tracer = match &opts.telemetry.otlp_endpoint {
        Some(endpoint) => strait_api::trace::Tracer::otlp(
            endpoint,
            &format!("{}.{}", opts.name, strait_api::SYSTEM_NAMESPACE),
            opts.telemetry.trace_sampling,
            &registry,
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?,
        None => strait_api::trace::Tracer::disabled(&registry),
    };
    let access = strait_api::accesslog::AccessLog::new(opts.telemetry.access_log, &registry);
    let gateway = Arc::new(
        Gateway::new(
            GatewayOptions {
                cluster: opts.locality.cluster.clone(),
                listen: opts.listen,
                connect_timeout: Duration::from_secs(1),
                quic_reset_key: granted.quic_reset_key,
            },
            store,
            rx.clone(),
            GatewayMetrics::new(&registry),
        )
        .named(&opts.name)
        .telemetry(tracer, access),
    );
    let endpoint = gateway.bind()?;
    let tcp = gateway.bind_tcp().await?;
    let drain = Drain::new();
    let serve = tokio::spawn(gateway.clone().serve(endpoint.clone(), drain.watch()));
    let fallback = tokio::spawn(gateway.serve_tcp(tcp, drain.watch()));
    let mut ready = rx.clone();
    if shutdown.or(ready.wait_for(|s| s.version > 0)).await.is_some() {
        admin.set_ready(true);
        tracing::info!(listen = %opts.listen, "gateway ready");
        tokio::select! {
            r = serve => r?,
            r = fallback => r??,
            () = shutdown.recv() => {}
        }
    }
    admin.set_ready(false);
    tracing::info!(deadline = ?opts.drain_timeout, "draining");
    let left = drain.drain(opts.drain_timeout).await;
    endpoint.close(quinn::VarInt::from_u32(0), b"gateway shutting down");
    endpoint.wait_idle().await;
    tracing::info!(streams_cut = left, "drained; exiting");
    Ok(())
}
