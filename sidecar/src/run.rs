//! Wiring of one sidecar process: listeners first (so a taken port fails fast), then the
//! certificate, the config stream, and readiness once the first config arrived.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use strait_api::admin::Admin;
use strait_api::drain::{shutdown_signal, Drain};
use strait_api::locality::Locality;
use strait_api::pb;
use strait_api::proxy::ControllerLink;
use strait_api::snapshot::Snapshot;
use strait_gateway::TunnelClient;
use tokio::net::TcpListener;

use crate::dns::{DnsMetrics, DnsProxy, ResolvConf};
use crate::inbound::Inbound;
use crate::lb::Balancer;
use crate::metrics::SidecarMetrics;
use crate::outbound::{Outbound, UnknownDestinations};
use crate::upstream::Upstreams;

#[derive(Clone, Debug)]
pub struct SidecarOptions {
    pub workload: String,
    pub service: String,
    pub namespace: String,
    pub locality: Locality,
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
    pub app: SocketAddr,
    pub controller: ControllerLink,
    /// Intercepted connections to destinations the mesh does not know.
    pub unknown_destinations: UnknownDestinations,
    /// The DNS proxy's address and the pod's resolver settings (its upstreams).
    pub dns: Option<(SocketAddr, ResolvConf)>,
    /// How long in-flight work may take to finish on shutdown.
    pub drain_timeout: Duration,
    pub limits: crate::ProxyLimits,
    /// Spans and access logs.
    pub telemetry: strait_api::telemetry::TelemetryOptions,
    /// Only services in these namespaces are sent to this sidecar (empty: every namespace).
    pub scope_namespaces: Vec<String>,
    /// Only services whose AuthorizationPolicies could let this workload in are sent to it.
    pub scope_authorized: bool,
}

async fn bind(what: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind the {what} listener on {addr}: {e} (is another process using it?)"))
}

fn config_view(snap: &Snapshot) -> serde_json::Value {
    serde_json::json!({
        "version": snap.version,
        "services": snap.services.values().map(|s| serde_json::json!({
            "host": s.host(),
            "clusterset_ip": s.clusterset_ip.map(|ip| ip.to_string()),
            "ports": s.ports.iter().map(|p| p.port).collect::<Vec<_>>(),
            "endpoints": s.endpoints.iter().enumerate().map(|(i, e)| serde_json::json!({
                "address": e.address.to_string(),
                "workload": s.workload(i),
                "identity": e.identity().to_string(),
                "cluster": e.locality().cluster,
                "zone": e.locality().zone,
                "ready": e.ready,
                "labels": &**e.labels(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "gateways": snap.gateways.values().map(|g| serde_json::json!({
            "cluster": g.cluster, "address": g.address.to_string(), "reachable": g.reachable,
        })).collect::<Vec<_>>(),
    })
}

pub async fn run(opts: SidecarOptions) -> anyhow::Result<()> {
    let registry = strait_api::admin::new_registry();
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(Snapshot::default()));
    let view_rx = rx.clone();
    // `strait route explain` asks the outbound side, which exists once the certificate is in.
    let explainer: Arc<std::sync::OnceLock<Arc<Outbound>>> = Arc::default();
    let explain_with = explainer.clone();
    let admin = Admin::new(registry.clone())
        .view("/config", Arc::new(move || config_view(&view_rx.borrow())))
        .query_view(
            "/explain",
            Arc::new(move |q: &[(String, String)]| {
                let Some(outbound) = explain_with.get() else {
                    return serde_json::json!({"error": "the sidecar is still starting"});
                };
                let get = |k: &str| q.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
                let headers: Vec<(String, String)> = q
                    .iter()
                    .filter(|(k, _)| k == "header")
                    .filter_map(|(_, v)| v.split_once(':'))
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                    .collect();
                outbound.explain(get("method").unwrap_or("GET"), get("url").unwrap_or_default(), &headers)
            }),
        );
    let admin_listener = strait_api::admin::bind(opts.admin).await?;
    let inbound_listener = bind("inbound", opts.inbound).await?;
    let outbound_listener = bind("outbound", opts.outbound).await?;
    let dns_sockets = match &opts.dns {
        Some((addr, _)) => {
            let udp = tokio::net::UdpSocket::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot bind the DNS proxy on udp {addr}: {e}"))?;
            Some((udp, bind("DNS (tcp)", *addr).await?))
        }
        None => None,
    };
    tokio::spawn(admin.clone().serve(admin_listener));

    let hello = pb::Hello {
        node: opts.workload.clone(),
        kind: "sidecar".into(),
        cluster: opts.locality.cluster.clone(),
        have_version: 0,
        admin: opts.admin.to_string(),
        namespaces: opts.scope_namespaces.clone(),
        scope_authorized: opts.scope_authorized,
        service: format!("{}/{}", opts.namespace, opts.service),
        // The config client says it takes updates in parts.
        ..Default::default()
    };
    let (store, found) = opts.controller.connect(hello, &registry, tx).await?;
    // No zone given (the injector does not know the node yet): take the one the CA found.
    let mut opts = opts;
    if opts.locality.zone.is_empty() {
        match found {
            Some(l) => {
                opts.locality.zone = l.zone;
                if opts.locality.region.is_empty() {
                    opts.locality.region = l.region;
                }
                opts.locality.subzone = l.subzone;
                tracing::info!(region = %opts.locality.region, zone = %opts.locality.zone, "locality from the node");
            }
            None => tracing::warn!("no --zone given and the CA does not know this workload's node; locality-aware routing treats it as zoneless"),
        }
    }

    let metrics = SidecarMetrics::new(&registry);
    let telemetry = Arc::new(
        crate::telemetry::Telemetry::new(
            crate::telemetry::LocalWorkload::new(
                &opts.workload,
                &opts.namespace,
                &store.id().to_string(),
                &opts.locality.cluster,
                Some(opts.inbound),
            ),
            &opts.telemetry,
            &format!("{}.{}", opts.service, opts.namespace),
            &registry,
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    let tunnel = TunnelClient::new(SocketAddr::new(opts.outbound.ip(), 0), store.clone())?
        .with_metrics(strait_gateway::TunnelClientMetrics::new(&registry));
    let own = telemetry.clone();
    let balancer = Balancer::new(opts.locality.clone(), tunnel.health(), metrics.clone()).with_labels(Arc::new(
        move |snap: &strait_api::snapshot::Snapshot| own.local.labels(snap),
    ));
    let upstreams = Upstreams::new(opts.locality.cluster.clone(), store.clone(), tunnel)
        .with_metrics(metrics.upstream_connections.clone());
    let outbound = Arc::new(
        Outbound::new(
            opts.locality.cluster.clone(),
            rx.clone(),
            balancer,
            upstreams,
            metrics.clone(),
        )
        .unknown_destinations(opts.unknown_destinations)
        .scope(&opts.scope_namespaces, opts.scope_authorized)
        .limits(opts.limits.clone())
        .telemetry(telemetry.clone()),
    );
    if let (Some((udp, tcp)), Some((addr, resolv))) = (dns_sockets, &opts.dns) {
        let dns = Arc::new(DnsProxy::new(rx.clone(), resolv, &[*addr], DnsMetrics::new(&registry)));
        tokio::spawn(dns.clone().serve_udp(udp));
        tokio::spawn(dns.serve_tcp(tcp));
    }
    let inbound = Arc::new(
        Inbound::new(
            opts.locality.cluster.clone(),
            opts.service.clone(),
            opts.app,
            store.clone(),
            metrics,
        )
        .limits(opts.limits.clone())
        .policies(rx.clone(), &opts.namespace)
        .telemetry(telemetry),
    );
    let drain = Drain::new();
    let inbound_task = tokio::spawn(inbound.serve(inbound_listener, drain.watch()));
    let _ = explainer.set(outbound.clone());
    let reaper = outbound.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            reaper.reap_idle();
        }
    });
    tokio::spawn(outbound.serve(outbound_listener, drain.watch()));

    let mut ready_rx = rx.clone();
    let _ = ready_rx.wait_for(|s| s.version > 0).await;
    admin.set_ready(true);
    tracing::info!(workload = %opts.workload, outbound = %opts.outbound, inbound = %opts.inbound, "sidecar ready");
    tokio::select! {
        r = inbound_task => r??,
        _ = shutdown_signal() => {}
    }
    admin.set_ready(false);
    tracing::info!(deadline = ?opts.drain_timeout, "draining");
    let left = drain.drain(opts.drain_timeout).await;
    tracing::info!(connections_cut = left, "drained; exiting");
    Ok(())
}
