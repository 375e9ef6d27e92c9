//! Wiring of one controller process: its own identity from its intermediate CA, the gRPC
//! server (config stream, CA, peering) on one mTLS port, peer clients, and the loop that
//! re-reads local sources and re-merges the catalog whenever anything changes or a lease
//! runs out.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use futures::FutureExt;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use serde_json::json;
use strait_api::admin::Admin;
use strait_api::pb;
use strait_api::pb::certificate_service_server::CertificateServiceServer;
use strait_api::pb::peering_service_server::PeeringServiceServer;
use strait_api::pb::policy_service_server::PolicyServiceServer;
use strait_api::pb::wire::config_service_server::ConfigServiceServer;
use strait_gateway::TunnelClient;
use strait_trust::{
    next_rotation, Authority, CertStore, PeerPolicy, RotationPlan, ServerAuth, SpiffeId, TlsMetrics, TrustBundle,
    WorkloadCert,
};

use crate::catalog::{merge_with, same_merged, Changes, IpRange, MergeMemo, Merged};
use crate::k8s::{ImportWriter, KubeSource};
use crate::peering::{ExportChange, Exports, PeerClient, PeerTable, PeeringServer};
use crate::resources::{build_with, same_versions, AuthzScopes, BuildMemo, ConfigState, Others, RouteReach};
use crate::source::{FileSource, LocalCatalog, SourceError};
use crate::xds::XdsServer;
use crate::{policy, ControllerConfig, FEDERATION_PORT};

/// What the admin views show, refreshed by the merge loop.
#[derive(Default)]
struct View {
    merged: Merged,
    source_errors: Vec<SourceError>,
    policy_error: Option<String>,
    version: u64,
    /// Routes and policies: this cluster's status of each (with proxy counts), what was
    /// written here, and problems of whole files.
    statuses: BTreeMap<String, pb::ObjectStatus>,
    authored: BTreeMap<String, crate::objects::Authored>,
    effective: BTreeMap<String, crate::objects::Effective>,
    object_file_errors: Vec<(PathBuf, String)>,
}

/// The locality policy file, re-read when it changes; a bad version keeps the last good one.
struct PolicyWatch {
    path: Option<PathBuf>,
    fingerprint: Option<(Option<SystemTime>, u64)>,
    current: pb::LocalityPolicy,
    error: Option<String>,
}

impl PolicyWatch {
    fn new(path: Option<PathBuf>) -> Self {
        PolicyWatch {
            path,
            fingerprint: None,
            current: policy::compile(&policy::PolicyFile::default(), "defaults"),
            error: None,
        }
    }

    /// Returns Some(true) when a new policy was accepted, Some(false) when one was rejected.
    fn poll(&mut self) -> Option<bool> {
        let path = self.path.as_ref()?;
        let meta = std::fs::metadata(path).ok();
        let fp = (
            meta.as_ref().and_then(|m| m.modified().ok()),
            meta.map(|m| m.len()).unwrap_or_default(),
        );
        if self.fingerprint == Some(fp) {
            return None;
        }
        self.fingerprint = Some(fp);
        match policy::load(path) {
            Ok(p) => {
                self.current = policy::compile(&p, &path.display().to_string());
                self.error = None;
                tracing::info!(file = %path.display(), "locality policy applied");
                Some(true)
            }
            Err(e) => {
                tracing::error!(error = %e, "locality policy rejected; the last good policy keeps serving");
                self.error = Some(e);
                Some(false)
            }
        }
    }
}

fn spawn_self_rotation(authority: Arc<Authority>, store: CertStore, ttl: Duration) {
    tokio::spawn(async move {
        loop {
            let cert = store.current();
            if let RotationPlan::RenewIn(wait) = next_rotation(cert.not_before, cert.not_after, SystemTime::now()) {
                tokio::time::sleep(wait).await;
            }
            let renewed = authority
                .issue_with_key(&cert.id, SystemTime::now(), ttl)
                .and_then(|(issued, key)| WorkloadCert::new(cert.id.clone(), issued, key));
            match renewed {
                Ok(c) => store.rotate(c),
                Err(e) => {
                    tracing::error!(error = %e, "cannot renew the controller's own certificate");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
}

pub async fn run(cfg: ControllerConfig) -> anyhow::Result<()> {
    // Listened for from the start: a controller still starting (its API server not answering
    // yet, say) stops at once too. In a container it is PID 1, where a signal it has no
    // handler for is ignored: the pod would wait its grace period for SIGKILL.
    let mut shutdown = strait_api::drain::Shutdown::listen();
    let table = PeerTable::default();
    // What was last heard from each peer, if kept: restored before anything is served.
    let log = match &cfg.state_dir {
        Some(dir) => {
            // Reading and decoding every peer's file (at the published size a whole state of
            // about 0.4 MB, and up to 1 MiB of updates after it) is work for a blocking thread.
            let configured: Vec<String> = cfg.peers.iter().map(|p| p.name.clone()).collect();
            let (dir, restoring) = (dir.clone(), table.clone());
            let opened =
                tokio::task::spawn_blocking(move || crate::peerlog::PeerLog::open(&dir, &restoring, &configured));
            Some(opened.await??.0)
        }
        None => None,
    };
    match shutdown.or(serve(cfg, table, log.clone())).await {
        Some(served) => served,
        None => stop(log.as_ref()).await,
    }
}

/// The controller until it stops, holding what `table` and `log` restored of its peers.
async fn serve(cfg: ControllerConfig, table: PeerTable, log: Option<crate::peerlog::PeerLog>) -> anyhow::Result<()> {
    let registry = strait_api::admin::new_registry();
    let tls_metrics = TlsMetrics::new(&registry);
    let range: IpRange = cfg
        .clusterset_ip_range
        .parse()
        .map_err(|e| anyhow::anyhow!("clustersetIpRange: {e}"))?;
    let td = cfg.trust_domain.clone();
    let authority = Arc::new(Authority::load(&cfg.ca_dir, &td)?);
    let bundle = TrustBundle::load(&cfg.bundle)?;
    let my_id = SpiffeId::workload(&td, strait_api::SYSTEM_NAMESPACE, strait_api::FEDERATION_SA)?;
    let store = CertStore::issued_by(&authority, my_id.clone(), cfg.cert_ttl, bundle.clone(), tls_metrics)?;
    spawn_self_rotation(authority.clone(), store.clone(), cfg.cert_ttl);

    let admin_listener = strait_api::admin::bind(cfg.admin).await?;
    let grpc_listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind the controller's gRPC address {}: {e}", cfg.listen))?;

    let (state_tx, state_rx) = tokio::sync::watch::channel(Arc::new(ConfigState::default()));
    let xds = XdsServer::new(state_rx, &registry);
    let kube_api = match &cfg.kubernetes {
        Some(k) => Some(kube_client(k).await?),
        None => None,
    };
    if let (Some(k), Some(client)) = (&cfg.kubernetes, &kube_api) {
        if let Some(injector) = &k.injector {
            start_injector(&cfg, injector, &authority, client, &bundle).await?;
        }
    }
    let ca = crate::ca::CaServer::new(
        authority.clone(),
        &cfg.join_tokens,
        kube_api.clone(),
        cfg.cert_ttl,
        bundle.to_pem(),
        &registry,
    );
    let peering = PeeringServer {
        table: table.clone(),
        own_cluster: cfg.cluster.clone(),
        log,
    };
    let server_tls = strait_trust::server_config(
        &store,
        PeerPolicy::AnyInBundle,
        ServerAuth::OptionalClientCert,
        &[strait_trust::ALPN_H2],
    )?;
    let incoming = strait_api::transport::tls_incoming(grpc_listener, Arc::new(server_tls));
    let applied = Arc::new(tokio::sync::Notify::new());
    // Peering tolerates silence for half a lease (the lease decides when exports expire).
    let tunnel = TunnelClient::new(SocketAddr::new(cfg.listen.ip(), 0), store.clone())?
        .with_metrics(strait_gateway::TunnelClientMetrics::new(&registry))
        .with_idle_timeout(cfg.lease / 2)
        .with_handshake_timeout(cfg.lease / 2);
    let mut peer_channels = BTreeMap::new();
    for peer in &cfg.peers {
        let channel = crate::peering::peer_channel(&store, &tunnel, peer.gateway, &cfg.cluster)?;
        peer_channels.insert(peer.name.clone(), channel);
    }
    let policy_api = crate::policy_api::PolicyApi {
        dir: cfg.routes_dir.clone(),
        changed: applied.clone(),
        lock: tokio::sync::Mutex::new(()),
        explain: crate::policy_api::Explainer {
            cluster: cfg.cluster.clone(),
            xds: xds.clone(),
            peers: peer_channels,
        },
    };
    let grpc = tonic::transport::Server::builder()
        .add_service(ConfigServiceServer::new(xds.clone()))
        .add_service(CertificateServiceServer::new(ca))
        .add_service(PeeringServiceServer::new(peering).max_decoding_message_size(strait_api::MAX_MESSAGE_BYTES))
        .add_service(PolicyServiceServer::new(policy_api))
        .serve_with_incoming(incoming);
    let grpc_task = tokio::spawn(grpc);

    let gateway_id = SpiffeId::workload(&td, strait_api::SYSTEM_NAMESPACE, strait_api::GATEWAY_SA)?;
    let own_gateway = pb::Gateway {
        cluster: cfg.cluster.clone(),
        address: cfg.gateway.address.to_string(),
        identity: gateway_id.to_string(),
        locality: Some(pb::Locality {
            cluster: cfg.cluster.clone(),
            region: cfg.region.clone(),
            zone: cfg.gateway.zone.clone(),
            subzone: String::new(),
        }),
        reachable: true,
    };
    let (exports_tx, exports_rx) = tokio::sync::watch::channel(Arc::new(Exports::default()));
    // This cluster's traffic, read from its proxies' metrics, for every clusterset page.
    let (traffic_tx, traffic_rx) = tokio::sync::watch::channel(Arc::new(pb::TrafficSummary {
        cluster: cfg.cluster.clone(),
        ..Default::default()
    }));
    tokio::spawn(Arc::new(crate::clusterset::TrafficCollector::new(&cfg.cluster)).run(xds.clone(), traffic_tx));
    let peering_metrics = crate::peering::PeeringMetrics::new(&registry)?;
    for peer in &cfg.peers {
        let (store, tunnel, gateway, cluster) = (store.clone(), tunnel.clone(), peer.gateway, cfg.cluster.clone());
        let client = PeerClient {
            peer: peer.clone(),
            cluster: cfg.cluster.clone(),
            region: cfg.region.clone(),
            lease: cfg.lease,
            gateway: own_gateway.clone(),
            dial: Arc::new(move || crate::peering::peer_channel(&store, &tunnel, gateway, &cluster)),
            exports: exports_rx.clone(),
            traffic: traffic_rx.clone(),
            metrics: peering_metrics.clone(),
        };
        tokio::spawn(client.run());
    }

    let mut own_traffic = traffic_rx.clone();
    let mut rate_shares = crate::rateshare::RateShares::default();
    let view = Arc::new(Mutex::new(View::default()));
    let (admin, page) = admin_views(&cfg, &registry, view.clone(), table.clone(), xds.clone(), traffic_rx);
    // The admin address: the clusterset page and its API (axum), the admin views behind them.
    let router = crate::clusterset::router(Arc::new(page), admin.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(admin_listener, router).await {
            tracing::warn!(error = %e, "the admin server stopped");
        }
    });

    // Where this cluster's gateway reaches the controller: its pod IP in Kubernetes (the
    // Deployment sets STRAIT_ADVERTISE_IP), else the listen address.
    let advertise = std::env::var("STRAIT_ADVERTISE_IP")
        .ok()
        .and_then(|ip| ip.parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, cfg.listen.port()))
        .unwrap_or(cfg.listen);
    let federation_service = pb::Service {
        name: strait_api::FEDERATION_SERVICE.into(),
        namespace: strait_api::SYSTEM_NAMESPACE.into(),
        clusterset_ip: String::new(),
        ports: vec![pb::ServicePort {
            name: "grpc".into(),
            port: FEDERATION_PORT as u32,
            protocol: "tcp".into(),
        }],
        endpoints: vec![pb::Endpoint {
            address: advertise.to_string(),
            workload: "controller".into(),
            locality: own_gateway.locality.clone(),
            identity: my_id.to_string(),
            ready: true,
            labels: Default::default(),
        }],
        conditions: vec![],
        identities: vec![my_id.to_string()],
    };
    let bundles = vec![pb::TrustBundle {
        trust_domain: td.to_string(),
        pem: bundle.to_pem(),
    }];
    let rejected = IntCounterVec::new(
        Opts::new(
            "strait_config_inputs_rejected_total",
            "Catalog and policy files rejected, by source",
        ),
        &["source"],
    )?;
    let versions = IntGauge::new("strait_config_version", "Version of the config this controller serves")?;
    let peers_alive = IntGauge::new("strait_peers_alive", "Peer clusters whose lease is valid")?;
    registry.register(Box::new(rejected.clone()))?;
    registry.register(Box::new(versions.clone()))?;
    registry.register(Box::new(peers_alive.clone()))?;

    let mut source = match (&cfg.catalog_dir, &cfg.kubernetes) {
        (Some(dir), _) => match &cfg.state_dir {
            Some(state) => Source::File(FileSource::new(dir).keeping_stamps_in(state.join(EXPORT_STAMPS))),
            None => Source::File(FileSource::new(dir)),
        },
        (None, Some(_)) => {
            let client = kube_api.clone().context("Kubernetes mode without a client")?;
            let watched = KubeSource::start(client.clone(), Duration::from_secs(30)).await?;
            tracing::info!("Kubernetes source ready");
            Source::Kube(Box::new(watched), ImportWriter::new(client))
        }
        (None, None) => anyhow::bail!("the controller config names no source (catalogDir or kubernetes)"),
    };
    // The merge the ServiceImports were last written for, and the count of namespace changes
    // then (Kubernetes mode).
    let mut last_merged: Option<(Merged, u64)> = None;
    // The local catalog's change count and the merge the ServiceExports' conditions were last
    // written for (Kubernetes mode).
    let mut export_statuses_of: Option<(u64, Merged)> = None;
    let mut local_memo: Option<OwnCatalog> = None;
    let mut merge_memo = MergeMemo::default();
    let mut build_memo = BuildMemo::new(&cfg.cluster);
    let mut policy_generation: Option<i64> = None;
    let mut policy_watch = PolicyWatch::new(cfg.policy.clone());
    if let Some(dir) = &cfg.routes_dir {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create the policy directory {}: {e}", dir.display()))?;
    }
    let mut object_store = crate::objects::ObjectStore::new(cfg.routes_dir.as_deref(), &cfg.cluster);
    let mut last_good: BTreeMap<String, pb::PolicyObject> = BTreeMap::new();
    // The routes proxies were last sent, and where they reach (made again when they change).
    let mut reach: (Vec<pb::HttpRoute>, Arc<RouteReach>) = Default::default();
    // The authorization policies proxies were last sent, for proxies scoped by them.
    let mut authz_scopes = AuthzScopes::default();
    let expected_clusters: Vec<String> = std::iter::once(cfg.cluster.clone())
        .chain(cfg.peers.iter().map(|p| p.name.clone()))
        .collect();
    let mut last_errors: Vec<SourceError> = vec![];
    let started_at = Instant::now();
    let mut version = 0u64;
    // When the last pass woken by a change began, and whether this one is (the first is).
    let mut last_change_pass: Option<Instant> = None;
    let mut for_change = true;
    loop {
        // Changes that arrive within `batchWindow` of the last pass for a change wait for it
        // to end and go out together: one merge, one build and one push for many changes under
        // churn, and no wait for a change after a quiet spell. A periodic pass (ACK counts,
        // leases) starts no window: a change right after one goes out at once, not up to a
        // window later (which an isolated change used to wait one time in five).
        if for_change {
            if let Some(next) = last_change_pass.map(|t| t + cfg.batch_window) {
                if Instant::now() < next {
                    tokio::time::sleep_until(next.into()).await;
                }
            }
            last_change_pass = Some(Instant::now());
        }
        // This pass sees every peer change so far; a wake-up stored for them is spent here, so
        // they do not cause another pass (a change from now on stores a new one).
        let _ = table.changed().notified().now_or_never();
        if let Source::File(files) = &mut source {
            files.poll();
        }
        if let Source::Kube(watched, _) = &source {
            if let Some(p) = watched.locality_policy() {
                let generation = p.metadata.generation;
                if generation != policy_generation {
                    policy_generation = generation;
                    let errors = policy::validate(&p.spec.policy);
                    let error = (!errors.is_empty()).then(|| format!("LocalityPolicy default: {}", errors.join("; ")));
                    match &error {
                        None => {
                            policy_watch.current = policy::compile(&p.spec.policy, "LocalityPolicy default");
                            policy_watch.error = None;
                            tracing::info!("LocalityPolicy default applied");
                        }
                        Some(e) => {
                            rejected.with_label_values(&["policy"]).inc();
                            tracing::error!(error = %e, "LocalityPolicy rejected; the last good policy keeps serving");
                            policy_watch.error = Some(e.clone());
                        }
                    }
                    if let Err(e) = watched.report_policy(generation, error.as_deref()).await {
                        tracing::warn!(error = %e, "cannot write the LocalityPolicy status");
                        policy_generation = None;
                    }
                }
            }
        }
        if policy_watch.poll() == Some(false) {
            rejected.with_label_values(&["policy"]).inc();
        }
        object_store.poll();
        if let Source::Kube(watched, _) = &source {
            object_store.set_kube(watched.objects.objects());
        }
        let now = Instant::now();
        // This cluster's own catalog, rebuilt only when its source changed: most passes are
        // for a peer's change, and rebuilding (and comparing) the whole local catalog on each
        // made a change's cost grow with the catalog. The count is read before the rebuild.
        let source_changes = match &source {
            Source::File(files) => files.changes,
            Source::Kube(watched, _) => watched.changes(),
        };
        let local_changed = local_memo.as_ref().map(|m| m.changes) != Some(source_changes);
        // What changed in each cluster since the last merge: the peers' updates say it; this
        // cluster's is found below when its catalog is rebuilt.
        let mut changes = Changes::new();
        if local_changed {
            let (local, errors) = match &mut source {
                Source::File(files) => files.services(&cfg.cluster, &cfg.region, &td, SystemTime::now()),
                Source::Kube(watched, _) => watched.services(&cfg.cluster, &cfg.region, &td, SystemTime::now()),
            };
            // Only the services the source says it touched are looked at; those that did not
            // change keep their `Arc`, so the merge and the peering senders skip them by pointer.
            let mut catalog = local_memo.take().map(|m| m.catalog).unwrap_or_default();
            changes.insert(cfg.cluster.clone(), catalog.apply(local));
            local_memo = Some(OwnCatalog {
                changes: source_changes,
                catalog,
                errors,
            });
        }
        let Some(own) = local_memo.as_ref() else { continue };
        let errors = own.errors.clone();
        if errors != last_errors {
            rejected
                .with_label_values(&["catalog"])
                .inc_by(errors.iter().filter(|e| !last_errors.contains(e)).count() as u64);
            last_errors = errors.clone();
        }

        let mut by_cluster: BTreeMap<String, Arc<crate::catalog::Services>> = BTreeMap::new();
        by_cluster.insert(cfg.cluster.clone(), own.catalog.all.clone());
        let mut gateways = vec![own_gateway.clone()];
        // Taken right before the snapshot, with no wait between: it holds every change taken.
        changes.extend(table.take_changes());
        let peers = table.snapshot();
        let mut alive = 0;
        for p in &peers {
            let is_alive = p.alive(now);
            if is_alive {
                alive += 1;
                by_cluster.insert(p.cluster.clone(), p.services.clone());
            }
            if let Some(g) = &p.gateway {
                let mut g = g.clone();
                g.reachable = is_alive;
                gateways.push(g);
            }
        }
        peers_alive.set(alive);
        let merged = merge_with(&mut merge_memo, &by_cluster, &changes, range);
        // Peers' maps are held only while the pass reads them: a peer's update that arrives
        // while a reference is held here copies its whole map to change it (the table changes
        // a map in place only when nothing else holds it).
        drop(by_cluster);
        // Routes and policies: ours (both scopes) and every peer's clusterset ones, merged,
        // then checked against this cluster's catalog.
        let own_objects: Vec<pb::PolicyObject> = object_store
            .objects
            .values()
            .filter(|a| a.good)
            .map(|a| a.object.clone())
            .collect();
        let peer_objects: Vec<pb::PolicyObject> = peers.iter().flat_map(|p| p.objects.iter().cloned()).collect();
        let effective = crate::objects::effective(&own_objects, &peer_objects);
        let checked = crate::objects::check(&effective, &merged, &mut last_good, &cfg.cluster);
        // Destination-total rate limits, divided by where the requests arrive in every cluster.
        {
            let own = own_traffic.borrow_and_update().clone();
            let summaries: Vec<&pb::TrafficSummary> = std::iter::once(&*own)
                .chain(
                    peers
                        .iter()
                        .filter(|p| p.alive(now))
                        .filter_map(|p| p.traffic.as_deref()),
                )
                .collect();
            rate_shares.update(&checked.policies, &merged, &summaries, now);
        }
        let resources = build_with(
            &mut build_memo,
            &merged,
            merge_memo.last_change(),
            &Others {
                system_services: std::slice::from_ref(&federation_service),
                gateways: &gateways,
                policy: &policy_watch.current,
                bundles: &bundles,
                objects: &checked,
                built: rate_shares.resources(),
            },
        );
        // Warm once every configured peer has pushed since this start, or one lease has passed.
        let warm = started_at.elapsed() >= cfg.lease
            || cfg
                .peers
                .iter()
                .all(|p| peers.iter().any(|s| s.cluster == p.name && s.alive(now)));
        if reach.0 != checked.routes {
            reach = (checked.routes.clone(), Arc::new(RouteReach::of(&checked.routes)));
        }
        // Every peer's report on each object: where each policy is enforced (scoping by
        // authorization) and, in Kubernetes, each object's status.
        let peer_reports: Vec<&pb::ObjectStatus> = peers.iter().flat_map(|p| p.statuses.iter()).collect();
        let enforcement = crate::objects::enforcement(
            crate::objects::AUTHORIZATION_POLICY,
            &checked.statuses,
            &peer_reports,
            &expected_clusters,
        );
        let authz_scope = authz_scopes.update(&cfg.cluster, &checked.authz, &enforcement, &merged);
        let changed = !same_versions(&state_tx.borrow().resources, &resources)
            || state_tx.borrow().warm != warm
            // A policy now enforced in every cluster (or no longer) moves services in or out of
            // the scope of proxies scoped by authorization, with no resource changed.
            || !Arc::ptr_eq(&state_tx.borrow().authz, &authz_scope);
        if changed || version == 0 {
            version += 1;
            versions.set(version as i64);
            tracing::debug!(version, services = merged.len(), "catalog rebuilt");
            let since = ConfigState::since_from(&state_tx.borrow(), &resources, version);
            state_tx.send_replace(Arc::new(ConfigState {
                version,
                resources,
                warm,
                since,
                reach: reach.1.clone(),
                authz: authz_scope,
            }));
        }
        // Each object's status here, with how many of this cluster's proxies have its
        // current version; then what peers get from us.
        let mut statuses = checked.statuses;
        crate::objects::schema_statuses(&object_store, &cfg.cluster, &mut statuses);
        count_acks(&mut statuses, &state_tx.borrow(), &xds.proxies());
        if let (Source::Kube(watched, _), true) = (&source, warm) {
            // Each route's and policy's status in this cluster's API server, with every
            // cluster's report.
            let mut reports = BTreeMap::new();
            for (k, a) in object_store
                .objects
                .iter()
                .filter(|(_, a)| crate::objects::is_kube(&a.file))
            {
                let own = statuses.get(k);
                let scope = a.object.cluster_scope;
                if let Some(sum) =
                    crate::objects::summarize(k, own, Some(a), scope, &peer_reports, &expected_clusters, &cfg.cluster)
                {
                    reports.insert(k.clone(), (own.map(|s| s.conditions.clone()).unwrap_or_default(), sum));
                }
            }
            watched.objects.write_statuses(&reports).await;
        }
        drop(peers);
        let objects_out = object_store.exported();
        let statuses_out: Vec<pb::ObjectStatus> = statuses.values().cloned().collect();
        exports_tx.send_if_modified(|cur| {
            // Unchanged exports keep their `Arc`, so peering senders skip comparing them;
            // changed ones say which services changed, so each sender looks at those alone.
            let exported = &own.catalog.exported;
            let change = (local_changed && !Arc::ptr_eq(&cur.services, exported))
                .then(|| ExportChange::between(&cur.services, exported))
                .flatten();
            let services_changed = change.is_some();
            if services_changed || cur.objects != objects_out || cur.statuses != statuses_out {
                *cur = Arc::new(Exports {
                    services: if services_changed {
                        exported.clone()
                    } else {
                        cur.services.clone()
                    },
                    change: change.map(Arc::new).or_else(|| cur.change.clone()),
                    objects: objects_out,
                    statuses: statuses_out,
                });
                true
            } else {
                false
            }
        });
        if let Source::Kube(watched, writer) = &mut source {
            // Like sidecars, the cluster's ServiceImports wait until the catalog is complete.
            let namespaces = watched.namespace_changes();
            if warm
                && !last_merged
                    .as_ref()
                    .is_some_and(|(last, ns)| *ns == namespaces && same_merged(last, &merged))
            {
                match writer.sync(&merged, |ns| watched.namespace_exists(ns)).await {
                    Ok(()) => last_merged = Some((merged.clone(), namespaces)),
                    Err(e) => tracing::warn!(error = %e, "cannot write ServiceImports yet; retrying"),
                }
            }
            // The ServiceExports' conditions follow from the local catalog (its source's change
            // count) and the merge: made again only when either changed since they were last
            // written (or the write failed), not on every pass.
            let statuses_current = export_statuses_of
                .as_ref()
                .is_some_and(|(changes, m)| *changes == source_changes && same_merged(m, &merged));
            if warm && !statuses_current {
                let conditions = watched.export_conditions(&merged, &errors);
                match writer.sync_export_status(&conditions).await {
                    Ok(()) => export_statuses_of = Some((source_changes, merged.clone())),
                    Err(e) => tracing::warn!(error = %e, "cannot write ServiceExport conditions yet; retrying"),
                }
            }
        }
        if let Ok(mut v) = view.lock() {
            *v = View {
                merged,
                source_errors: errors,
                policy_error: policy_watch.error.clone(),
                version,
                statuses,
                authored: object_store.objects.clone(),
                effective,
                object_file_errors: object_store
                    .file_errors
                    .iter()
                    .flat_map(|(p, errs)| errs.iter().map(|e| (p.clone(), e.clone())))
                    .collect(),
            };
        }
        admin.set_ready(true);
        if grpc_task.is_finished() {
            anyhow::bail!("the controller's gRPC server stopped");
        }
        let wake = table
            .next_expiry(now)
            .map(|t| t + Duration::from_millis(5))
            .unwrap_or(now + Duration::from_secs(3600));
        // While cold, wake when the grace period ends even if nothing else happens.
        let wake = if warm {
            wake
        } else {
            wake.min(started_at + cfg.lease + Duration::from_millis(5))
        };
        // Rebuild at once when a peer, the API server or `strait apply` changes something, when
        // a catalog or object file changes (its directory's watch wakes the loop; a directory
        // without one is polled every FILE_POLL), and every REFRESH regardless (proxy ACK
        // counts and lease expiries).
        let refresh = (Instant::now() + REFRESH).min(wake);
        for_change = loop {
            let kube_changed = async {
                match &source {
                    Source::Kube(watched, _) => watched.changed().notified().await,
                    Source::File(_) => std::future::pending().await,
                }
            };
            let catalog_watch = match &source {
                Source::File(files) => files.waker(),
                Source::Kube(..) => None,
            };
            let polled = (matches!(source, Source::File(_)) && catalog_watch.is_none()) || object_store.polled();
            let step = if polled {
                (Instant::now() + FILE_POLL).min(refresh)
            } else {
                refresh
            };
            tokio::select! {
                _ = tokio::time::sleep_until(step.into()) => {}
                _ = crate::source::DirWatch::wait(catalog_watch) => {}
                _ = crate::source::DirWatch::wait(object_store.waker()) => {}
                _ = table.changed().notified() => break true,
                _ = kube_changed => break true,
                _ = applied.notified() => break true,
                // A new traffic summary goes to the peers at once; dividing rate limits by it
                // here at once too keeps this cluster's view of it close to theirs.
                Ok(()) = own_traffic.changed() => break true,
            }
            if Instant::now() >= refresh {
                break false;
            }
            let files_changed = match &mut source {
                Source::File(files) => files.poll(),
                Source::Kube(..) => false,
            };
            if object_store.poll() | files_changed {
                break true;
            }
        };
    }
}

/// On SIGTERM or SIGINT: the peer log writes what it gathered (the updates of its last
/// second, which a killed controller loses and its peers send again after its restart), then
/// the controller exits. Everything it serves is in memory or written as it changes.
async fn stop(log: Option<&crate::peerlog::PeerLog>) -> anyhow::Result<()> {
    tracing::info!("stopping (SIGTERM or SIGINT)");
    if let Some(log) = log {
        if tokio::time::timeout(STOP_WRITE, log.flush()).await.is_err() {
            tracing::warn!(
                "the peers' state was not written within {STOP_WRITE:?}; a restart holds a little less of it, which the peers send again"
            );
        }
    }
    Ok(())
}

/// How long a stopping controller waits for the peer log's last write.
const STOP_WRITE: Duration = Duration::from_secs(5);

/// How often the merge loop runs with nothing else waking it.
const REFRESH: Duration = Duration::from_millis(500);
/// How often catalog and object files are checked when their directory has no watch (a stat
/// each; only a changed file is read).
const FILE_POLL: Duration = Duration::from_millis(50);

/// Serves the injection webhook with a certificate from the cluster CA and registers it.
async fn start_injector(
    cfg: &ControllerConfig,
    injector: &crate::config::InjectorConfig,
    authority: &Authority,
    client: &kube::Client,
    bundle: &TrustBundle,
) -> anyhow::Result<()> {
    use crate::k8s::inject;
    let mut names = vec![
        format!("strait-federation.{}.svc", strait_api::SYSTEM_NAMESPACE),
        format!("strait-federation.{}.svc.cluster.local", strait_api::SYSTEM_NAMESPACE),
    ];
    if let Some(host) = injector
        .url
        .as_deref()
        .and_then(|u| u.parse::<http::Uri>().ok())
        .and_then(|u| u.host().map(str::to_string))
    {
        names.push(host);
    }
    // A serving certificate for the API server (checked by DNS name or IP, not SPIFFE ID).
    let (issued, key) = authority.issue_tls_server(&names, SystemTime::now(), Duration::from_secs(365 * 24 * 3600))?;
    let tls = rustls::ServerConfig::builder_with_provider(strait_trust::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(
            issued.chain,
            rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(key)),
        )?;
    let settings = inject::InjectSettings {
        image: injector.image.clone(),
        cluster: cfg.cluster.clone(),
        region: cfg.region.clone(),
        trust_domain: cfg.trust_domain.to_string(),
        controller: injector.controller_address.clone(),
        bundle_pem: bundle.to_pem(),
    };
    let listen = injector.listen;
    tokio::spawn(async move {
        if let Err(e) = inject::serve(listen, tls, settings).await {
            tracing::error!(error = %e, "the injection webhook stopped");
        }
    });
    inject::register(client, injector.url.as_deref(), &bundle.to_pem()).await?;
    tracing::info!(%listen, "sidecar injection webhook registered");
    Ok(())
}

/// The file in `stateDir` where the file source keeps when each service was first exported.
const EXPORT_STAMPS: &str = "exported-at.json";

/// Where this cluster's services come from.
enum Source {
    File(FileSource),
    Kube(Box<KubeSource>, ImportWriter),
}

async fn kube_client(k: &crate::config::KubernetesSource) -> anyhow::Result<kube::Client> {
    let config = match &k.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| anyhow::anyhow!("kubernetes.kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default()).await?
        }
        None => kube::Config::incluster().map_err(|e| {
            anyhow::anyhow!("not running in a pod ({e}); set kubernetes.kubeconfig in the controller config")
        })?,
    };
    Ok(kube::Client::try_from(config)?)
}

/// This cluster's catalog as the last change of its source left it.
struct OwnCatalog {
    /// The source's change count it was built at.
    changes: u64,
    catalog: LocalCatalog,
    errors: Vec<SourceError>,
}

fn admin_views(
    cfg: &ControllerConfig,
    registry: &Registry,
    view: Arc<Mutex<View>>,
    table: PeerTable,
    xds: XdsServer,
    traffic: tokio::sync::watch::Receiver<Arc<pb::TrafficSummary>>,
) -> (Admin, crate::clusterset::Page) {
    let configured: Vec<String> = cfg.peers.iter().map(|p| p.name.clone()).collect();
    let expected: Vec<String> = std::iter::once(cfg.cluster.clone())
        .chain(configured.iter().cloned())
        .collect();
    let cluster = cfg.cluster.clone();
    let region = cfg.region.clone();
    let lease_ms = cfg.lease.as_millis() as u64;
    let grpc_address = cfg.listen.to_string();
    let trust_domain = cfg.trust_domain.to_string();
    let status_view = view.clone();
    let routes_view = view.clone();
    let table_view = table.clone();
    let table_view_page = table.clone();
    let status: strait_api::admin::JsonView = Arc::new(move || {
        let v = status_view.lock();
        let (version, errors, policy_error) = match &v {
            Ok(v) => (
                v.version,
                v.source_errors.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
                v.policy_error.clone(),
            ),
            Err(_) => (0, vec![], None),
        };
        json!({
            "cluster": cluster,
            "region": region,
            "lease_ms": lease_ms,
            "grpc_address": grpc_address,
            "trust_domain": trust_domain,
            "config_version": version,
            "peers": table.views(&configured),
            "proxies": xds.proxies(),
            "errors": errors,
            "policy_error": policy_error,
        })
    });
    let endpoints_view = view.clone();
    let endpoints: strait_api::admin::JsonView = Arc::new(move || {
        let Ok(v) = endpoints_view.lock() else {
            return json!({"endpoints": []});
        };
        let list: Vec<serde_json::Value> = v
            .merged
            .values()
            .flat_map(|s| {
                s.endpoints().map(move |e| {
                    let loc = e.locality.clone().unwrap_or_default();
                    json!({
                        "cluster": loc.cluster,
                        "zone": loc.zone,
                        "workload": e.workload,
                        "service": s.name,
                        "namespace": s.namespace,
                        "ready": e.ready,
                    })
                })
            })
            .collect();
        json!({"endpoints": list})
    });
    let services: strait_api::admin::JsonView = Arc::new(move || {
        let Ok(v) = view.lock() else {
            return json!({"services": []});
        };
        let list: Vec<serde_json::Value> = v
            .merged
            .values()
            .map(|s| {
                let mut clusters: BTreeMap<String, (Vec<String>, usize, usize)> = BTreeMap::new();
                for e in s.endpoints() {
                    let loc = e.locality.clone().unwrap_or_default();
                    let entry = clusters.entry(loc.cluster.clone()).or_default();
                    if !entry.0.contains(&loc.zone) {
                        entry.0.push(loc.zone.clone());
                    }
                    entry.1 += 1;
                    if e.ready {
                        entry.2 += 1;
                    }
                }
                json!({
                    "name": s.name,
                    "namespace": s.namespace,
                    "clusterset_ip": s.clusterset_ip.to_string(),
                    "ports": s.ports.iter().map(|p| json!({"port": p.port, "protocol": p.protocol})).collect::<Vec<_>>(),
                    "clusters": clusters.into_iter().map(|(c, (zones, total, ready))| json!({
                        "cluster": c, "zones": zones, "endpoints": total, "ready": ready,
                    })).collect::<Vec<_>>(),
                    "conditions": s.conditions.iter().map(|c| json!({
                        "type": c.r#type, "status": c.status, "reason": c.reason, "message": c.message,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        json!({ "services": list })
    });
    let objects_view = |kinds: &'static [&'static str], list: &'static str| -> strait_api::admin::JsonView {
        let view = routes_view.clone();
        let table = table_view.clone();
        let expected = expected.clone();
        let cluster = cfg.cluster.clone();
        Arc::new(move || {
            let Ok(v) = view.lock() else {
                return json!({ list: [] });
            };
            let peers = table.snapshot();
            objects_json(&v, &peers, &expected, &cluster, kinds, list)
        })
    };
    let routes = objects_view(&[crate::objects::HTTP_ROUTE, crate::objects::GRPC_ROUTE], "routes");
    let policies = objects_view(
        &[crate::objects::TRAFFIC_POLICY, crate::objects::AUTHORIZATION_POLICY],
        "policies",
    );
    let admin = Admin::new(registry.clone())
        .view("/status", status.clone())
        .view("/services", services.clone())
        .view("/routes", routes.clone())
        .view("/policies", policies.clone());
    let page = crate::clusterset::Page {
        cluster: cfg.cluster.clone(),
        region: cfg.region.clone(),
        status,
        services,
        endpoints,
        routes,
        policies,
        traffic,
        peers: table_view_page,
        registry: registry.clone(),
    };
    (admin, page)
}

/// Adds to each status how many of this cluster's sidecars acknowledged a config version that
/// holds the object's current version (and did not reject it), naming a few that have not.
fn count_acks(
    statuses: &mut BTreeMap<String, pb::ObjectStatus>,
    state: &ConfigState,
    proxies: &[crate::xds::ProxyStatus],
) {
    let sidecars: Vec<&crate::xds::ProxyStatus> = proxies.iter().filter(|p| p.kind == "sidecar").collect();
    for s in statuses.values_mut() {
        s.proxies_total = sidecars.len() as u32;
        s.proxies_acked = 0;
        s.proxies_pending.clear();
        if !s.serving {
            continue;
        }
        let name = crate::objects::resource_name(&s.kind, &s.namespace, &s.name);
        let Some(since) = state.since.get(name.as_str()) else {
            continue;
        };
        let rejection = format!("{name}:");
        for p in &sidecars {
            let rejected = p.rejected.iter().any(|r| r.starts_with(&rejection));
            if p.acked_version >= *since && !rejected {
                s.proxies_acked += 1;
            } else if s.proxies_pending.len() < 5 {
                s.proxies_pending.push(p.node.clone());
            }
        }
    }
}

/// An admin view of routes or policies: each object with its conditions here and, from every
/// cluster's report, where its current version is applied and how many proxies have it.
fn objects_json(
    v: &View,
    peers: &[crate::peering::PeerState],
    expected: &[String],
    cluster: &str,
    kinds: &[&str],
    list: &str,
) -> serde_json::Value {
    let keys: std::collections::BTreeSet<&String> = v
        .statuses
        .keys()
        .chain(v.authored.keys())
        .filter(|k| kinds.iter().any(|kind| k.starts_with(&format!("{kind}/"))))
        .collect();
    let cond =
        |c: &pb::Condition| json!({"type": c.r#type, "status": c.status, "reason": c.reason, "message": c.message});
    let mut out = vec![];
    for k in keys {
        let own = v.statuses.get(k);
        let authored = v.authored.get(k);
        let eff = v.effective.get(k);
        let cluster_scope = eff
            .map(|e| e.object.cluster_scope)
            .or(authored.map(|a| a.object.cluster_scope))
            .unwrap_or(false);
        let peer_reports: Vec<&pb::ObjectStatus> = peers.iter().flat_map(|p| p.statuses.iter()).collect();
        let Some(sum) = crate::objects::summarize(k, own, authored, cluster_scope, &peer_reports, expected, cluster)
        else {
            continue;
        };
        let (namespace, name) = match (own, authored) {
            (Some(s), _) => (s.namespace.clone(), s.name.clone()),
            (None, Some(a)) => (a.object.namespace.clone(), a.object.name.clone()),
            (None, None) => continue,
        };
        let kind = k.split('/').next().unwrap_or_default();
        out.push(json!({
            "kind": kind,
            "namespace": namespace,
            "name": name,
            "origin_cluster": sum.origin,
            "generation": sum.generation,
            "scope": if cluster_scope { "cluster" } else { "clusterset" },
            "locked_fields": eff.map(|e| e.object.locked_fields.clone()).unwrap_or_default(),
            "file": authored.map(|a| a.file.clone()),
            "serving": own.is_some_and(|s| s.serving),
            "serving_generation": own.map(|s| s.serving_generation).unwrap_or_default(),
            "conditions": own.map(|s| s.conditions.iter().map(cond).collect::<Vec<_>>()).unwrap_or_default(),
            "applied_clusters": sum.applied,
            "missing_clusters": sum.missing,
            "expected_clusters": sum.expected,
            "proxies_acked": sum.proxies_acked,
            "proxies_total": sum.proxies_total,
            "proxies_pending": sum.pending,
            "clusters": sum.reports.iter().map(|s| json!({
                "cluster": s.cluster,
                "origin_cluster": s.origin_cluster,
                "generation": s.generation,
                "serving_generation": s.serving_generation,
                "proxies_acked": s.proxies_acked,
                "proxies_total": s.proxies_total,
                "conditions": s.conditions.iter().map(cond).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        }));
    }
    json!({
        list: out,
        "file_errors": v.object_file_errors.iter().map(|(p, e)| json!({"file": p, "error": e})).collect::<Vec<_>>(),
    })
}
