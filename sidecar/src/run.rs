//! Wiring of one sidecar process: listeners first (so a taken port fails fast), then the
//! certificate, the config stream, and readiness once the first config arrived.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::ser::{Serialize, SerializeStruct, Serializer};
use strait_api::admin::Admin;
use strait_api::drain::{Drain, Shutdown};
use strait_api::locality::Locality;
use strait_api::pb;
use strait_api::proxy::ControllerLink;
use strait_api::snapshot::{EndpointEntry, GatewayEntry, ServiceEntry, Snapshot};
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

/// The sidecar's `/config`: every service it holds with its endpoints, and the gateways, as
/// `{"version", "services", "gateways"}`. Written from the snapshot a service at a time as the
/// client reads it (a `WrittenView`): built as a `serde_json::Value` and pretty-printed, a
/// catalog of 40,000 endpoints took the sidecar from 15 to 94 MiB for the moment of the answer
/// (the clusterset bench's peak RSS), and written whole into memory still to 20.4, for a
/// catalog the proxy itself holds in under 8.
fn config_pieces(snap: Arc<Snapshot>) -> strait_api::admin::Pieces {
    let services: Vec<Arc<ServiceEntry>> = snap.services.values().cloned().collect();
    // 0: the head; 1..=n: service n - 1; then the gateways and the end.
    let mut next = 0;
    Box::new(move |out: &mut Vec<u8>| {
        // Writing into memory fails only on a map key that is not a string; these have none.
        let written = if next == 0 {
            out.extend_from_slice(b"{\"version\":");
            serde_json::to_writer(&mut *out, &snap.version).map(|()| out.extend_from_slice(b",\"services\":["))
        } else if let Some(svc) = services.get(next - 1) {
            if next > 1 {
                out.push(b',');
            }
            serde_json::to_writer(&mut *out, &ServiceView(svc))
        } else {
            out.extend_from_slice(b"],\"gateways\":");
            let gateway = |g: &GatewayEntry| serde_json::json!({"cluster": g.cluster, "address": g.address.to_string(), "reachable": g.reachable});
            serde_json::to_writer(&mut *out, &Each(|| snap.gateways.values().map(|g| gateway(g))))
                .map(|()| out.push(b'}'))
        };
        if let Err(e) = written {
            tracing::warn!(error = %e, "cannot write the /config view");
            return false;
        }
        next += 1;
        next <= services.len() + 1
    })
}

/// A sequence written from an iterator as it goes (nothing collected first).
struct Each<F>(F);

/// A value written as its `Display` text.
struct Shown<'a, T: ?Sized>(&'a T);

struct ServiceView<'a>(&'a ServiceEntry);

struct EndpointView<'a> {
    service: &'a ServiceEntry,
    index: usize,
    endpoint: &'a EndpointEntry,
}

impl<F, I> Serialize for Each<F>
where
    F: Fn() -> I,
    I: Iterator,
    I::Item: Serialize,
{
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq((self.0)())
    }
}

impl<T: std::fmt::Display + ?Sized> Serialize for Shown<'_, T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self.0)
    }
}

impl Serialize for ServiceView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let svc = self.0;
        let mut m = s.serialize_struct("Service", 4)?;
        m.serialize_field("host", &svc.host())?;
        m.serialize_field("clusterset_ip", &svc.clusterset_ip.as_ref().map(Shown))?;
        m.serialize_field("ports", &Each(|| svc.ports.iter().map(|p| p.port)))?;
        let endpoint = |(index, endpoint)| EndpointView {
            service: svc,
            index,
            endpoint,
        };
        m.serialize_field("endpoints", &Each(|| svc.endpoints.iter().enumerate().map(endpoint)))?;
        m.end()
    }
}

impl Serialize for EndpointView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let e = self.endpoint;
        let mut m = s.serialize_struct("Endpoint", 7)?;
        m.serialize_field("address", &Shown(&e.address))?;
        m.serialize_field("workload", self.service.workload(self.index))?;
        m.serialize_field("identity", &Shown(&**e.identity()))?;
        m.serialize_field("cluster", &e.locality().cluster)?;
        m.serialize_field("zone", &e.locality().zone)?;
        m.serialize_field("ready", &e.ready)?;
        m.serialize_field("labels", &**e.labels())?;
        m.end()
    }
}

pub async fn run(opts: SidecarOptions) -> anyhow::Result<()> {
    // Listened for from the start: a sidecar still waiting for its controller (down, or not
    // yet reachable) stops at once too. In a container it is PID 1, where a signal it has no
    // handler for is ignored: the pod would wait its grace period for SIGKILL.
    let mut shutdown = Shutdown::listen();
    let registry = strait_api::admin::new_registry();
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(Snapshot::default()));
    let view_rx = rx.clone();
    // `strait route explain` asks the outbound side, which exists once the certificate is in.
    let explainer: Arc<std::sync::OnceLock<Arc<Outbound>>> = Arc::default();
    let explain_with = explainer.clone();
    let admin = Admin::new(registry.clone())
        .written_view(
            "/config",
            Arc::new(move || {
                // The snapshot's own handle: the watch is not held while the view is written.
                config_pieces(view_rx.borrow().clone())
            }),
        )
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
    let Some(connected) = shutdown.or(opts.controller.connect(hello, &registry, tx)).await else {
        tracing::info!("stopped before the controller issued a certificate");
        return Ok(());
    };
    let (store, found) = connected?;
    // No zone given (the injector does not know the node yet): take the one the CA found.
    let mut opts = opts;
    if opts.locality.zone.is_empty() {
        match found.locality {
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
    if shutdown.or(ready_rx.wait_for(|s| s.version > 0)).await.is_some() {
        admin.set_ready(true);
        tracing::info!(workload = %opts.workload, outbound = %opts.outbound, inbound = %opts.inbound, "sidecar ready");
        tokio::select! {
            r = inbound_task => r??,
            () = shutdown.recv() => {}
        }
    }
    admin.set_ready(false);
    tracing::info!(deadline = ?opts.drain_timeout, "draining");
    let left = drain.drain(opts.drain_timeout).await;
    tracing::info!(connections_cut = left, "drained; exiting");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_view_lists_each_service_endpoint_and_gateway() {
        let mut snap = crate::dns::tests::snapshot();
        snap.version = 7;
        let mut labels = std::collections::BTreeMap::new();
        labels.insert("app".to_string(), "db".to_string());
        let db = Arc::make_mut(snap.services.get_mut("demo/db").unwrap());
        let profile = Arc::make_mut(&mut db.endpoints[1].profile);
        profile.labels = Arc::new(labels);
        Arc::make_mut(&mut profile.locality).zone = "west-1a".into();
        db.endpoints[1].ready = false;
        snap.gateways.insert(
            "west".into(),
            Arc::new(GatewayEntry {
                cluster: "west".into(),
                address: "127.0.0.9:15443".parse().unwrap(),
                identity: "spiffe://mesh.local/ns/strait-system/sa/gateway".parse().unwrap(),
                locality: Locality::default(),
                reachable: true,
            }),
        );
        let mut written = vec![];
        let mut pieces = config_pieces(Arc::new(snap));
        while pieces(&mut written) {}
        let view: serde_json::Value = serde_json::from_slice(&written).unwrap();
        let endpoint = |address: &str, workload: &str, cluster: &str, zone: &str, ready: bool, labels| {
            serde_json::json!({
                "address": address, "workload": workload, "identity": "spiffe://mesh.local/ns/demo/sa/x",
                "cluster": cluster, "zone": zone, "ready": ready, "labels": labels,
            })
        };
        assert_eq!(
            view,
            serde_json::json!({
                "version": 7,
                "services": [
                    {
                        "host": "db.demo.svc.clusterset.local",
                        "clusterset_ip": null,
                        "ports": [80],
                        "endpoints": [
                            endpoint("198.18.1.11:8080", "db-0", "east", "", true, serde_json::json!({})),
                            endpoint("198.18.2.11:8080", "db-1", "west", "west-1a", false, serde_json::json!({"app": "db"})),
                        ],
                    },
                    {
                        "host": "echo.demo.svc.clusterset.local",
                        "clusterset_ip": "240.0.0.7",
                        "ports": [80],
                        "endpoints": [endpoint("198.18.1.10:8080", "echo-a", "east", "", true, serde_json::json!({}))],
                    },
                ],
                "gateways": [{"cluster": "west", "address": "127.0.0.9:15443", "reachable": true}],
            })
        );
        // Nothing held yet: still one JSON document.
        let mut written = vec![];
        let mut pieces = config_pieces(Arc::new(Snapshot::default()));
        while pieces(&mut written) {}
        assert_eq!(
            String::from_utf8(written).unwrap(),
            r#"{"version":0,"services":[],"gateways":[]}"#
        );
    }
}
