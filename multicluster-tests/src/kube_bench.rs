//! One controller in Kubernetes mode at the published size of one cluster: what it costs idle,
//! under its peers' changes and under its own. `cargo bench -p multicluster-tests --bench kube`
//! runs it at that size and prints the figures; `tests/kubernetes.rs` runs it small, for
//! behaviour only.
//!
//! `strait up --kube` starts the three-cluster demo, each cluster backed by a real kube-apiserver
//! and etcd. East is then given `services` Services, ServiceExports and EndpointSlices in
//! namespace `sim` (`endpoints` endpoints spread over them and two zones) through its API
//! server, and west one exported service (`sim/svc-000`, which east exports too). Once west has
//! east's ServiceImports, east's controller's CPU is measured for `seconds` three times: with
//! nothing changing, while west's EndpointSlice changes `rate` times a second (each change
//! reaches east as a peer's update), and while one of east's own EndpointSlices does. After each
//! churn phase, how long until a sidecar in east holds that phase's last change. Also: how many
//! config versions east served in each phase, what it sent its peers (bytes, and services whole
//! or as patches), and its RSS.

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;

use crate::clusterset::PeeringServices;
use crate::figures::Figures;
use crate::haproxy::cpu_seconds;
use crate::{mcs_api, metric_sum, scrape, ClusterInfo, Mesh, MeshOptions};

#[derive(Clone, Debug)]
pub struct Size {
    pub services: usize,
    pub endpoints: usize,
    /// EndpointSlice changes a second in each churn phase.
    pub rate: f64,
    /// Length of each phase.
    pub seconds: u64,
}

impl Default for Size {
    /// One cluster of Istio ambient's published multi-cluster test, and its share of 50
    /// changes/s over ten clusters.
    fn default() -> Self {
        Size {
            services: 300,
            endpoints: 4000,
            rate: 5.0,
            seconds: 30,
        }
    }
}

/// East's controller in one phase.
#[derive(Clone, Debug, Default)]
pub struct Phase {
    /// Its share of a core.
    pub cpu: f64,
    /// Config versions it served.
    pub versions: f64,
    /// EndpointSlice changes made.
    pub changes: usize,
    /// From the API server's answer to the phase's last change until a sidecar in east held it
    /// (its `/config` polled, 5 ms apart; none: not within 30 s, or no change was made).
    pub last_change_seen: Option<Duration>,
    /// What it sent its peers.
    pub sent: Sent,
}

/// What east's controller sent its peers (west and central) during a phase: encoded bytes of its
/// export updates, and the services in them, whole or as patches of the endpoints that changed.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sent {
    pub bytes: f64,
    pub services: PeeringServices,
}

impl Sent {
    fn read(metrics: &str) -> Sent {
        Sent {
            bytes: metric_sum(metrics, "strait_peering_sent_bytes_total", &[]),
            services: PeeringServices::of(metrics),
        }
    }

    fn since(self, before: Sent) -> Sent {
        Sent {
            bytes: self.bytes - before.bytes,
            services: self.services.since(before.services),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Report {
    pub size: Size,
    /// Writing the catalog to east's API server, and until west had all of it imported.
    pub written: Duration,
    pub imported: Duration,
    pub idle: Phase,
    pub peer: Phase,
    pub local: Phase,
    pub rss_mib: f64,
}

/// The EndpointSlice of service `name` with `count` endpoints, the `n`th version of it: each
/// version one pod replaced (the first address out, the next one in), each pod's zone its own.
fn slice(name: &str, service: usize, count: usize, n: usize) -> anyhow::Result<EndpointSlice> {
    let endpoints: Vec<_> = (n..n + count)
        .map(|j| {
            json!({"addresses": [address(service, j)],
                   "zone": format!("zone-{}", j % 2), "conditions": {"ready": true}})
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-1"), "namespace": "sim", "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))
    .map_err(Into::into)
}

/// The address of service `service`'s endpoint `j` (mod 250).
fn address(service: usize, j: usize) -> String {
    format!("10.{}.{}.{}", service / 250, service % 250, j % 250 + 1)
}

/// Writes `services` exported Services with `endpoints` endpoints spread over them.
async fn write_catalog(c: &Client, services: usize, endpoints: usize) -> anyhow::Result<()> {
    let params = PatchParams::apply("strait-bench").force();
    let ns: Namespace =
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "sim"}}))?;
    Api::<Namespace>::all(c.clone())
        .patch("sim", &params, &Patch::Apply(&ns))
        .await?;
    let written: Vec<anyhow::Result<()>> = futures::stream::iter(0..services)
        .map(|i| {
            let (c, params) = (c.clone(), params.clone());
            let count = endpoints / services + usize::from(i < endpoints % services);
            async move {
                let name = format!("svc-{i:03}");
                let svc: Service = serde_json::from_value(json!({
                    "apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": name, "namespace": "sim"},
                    "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
                }))?;
                Api::<Service>::namespaced(c.clone(), "sim")
                    .patch(&name, &params, &Patch::Apply(&svc))
                    .await?;
                Api::<EndpointSlice>::namespaced(c.clone(), "sim")
                    .patch(&format!("{name}-1"), &params, &Patch::Apply(slice(&name, i, count, 0)?))
                    .await?;
                let export = json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
                                    "metadata": {"name": name, "namespace": "sim"}});
                mcs_api(&c, "sim", "ServiceExport")
                    .patch(&name, &params, &Patch::Apply(&export))
                    .await?;
                Ok(())
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    written.into_iter().collect()
}

/// Whether east's sidecar at `admin` holds endpoint `address` of `sim/svc-000` from `cluster`.
async fn holds(admin: std::net::SocketAddr, cluster: &str, address: &str) -> bool {
    let Ok(config) = Mesh::admin_json(admin, "/config").await else {
        return false;
    };
    config["services"].as_array().is_some_and(|services| {
        services
            .iter()
            .filter(|s| s["host"] == "svc-000.sim.svc.clusterset.local")
            .flat_map(|s| s["endpoints"].as_array().into_iter().flatten())
            .any(|e| e["cluster"] == cluster && e["address"] == address)
    })
}

/// East's controller over `seconds` while `churn` (a cluster's API server and name, and the
/// endpoints of its slice) changes `sim/svc-000`'s EndpointSlice `rate` times a second.
async fn phase(
    east: &ClusterInfo,
    seconds: u64,
    rate: f64,
    churn: Option<(&Client, &str, usize)>,
) -> anyhow::Result<Phase> {
    let version = |text: &str| metric_sum(text, "strait_config_version", &[]);
    let metrics = scrape(east.controller.admin_addr).await?;
    let (before, sent) = (version(&metrics), Sent::read(&metrics));
    let cpu = cpu_seconds(east.controller.pid);
    let start = Instant::now();
    let mut n = 0usize;
    let mut last_written = start;
    while start.elapsed() < Duration::from_secs(seconds) {
        match churn {
            Some((c, _, count)) => {
                n += 1;
                Api::<EndpointSlice>::namespaced(c.clone(), "sim")
                    .patch(
                        "svc-000-1",
                        &PatchParams::apply("strait-bench").force(),
                        &Patch::Apply(slice("svc-000", 0, count, n)?),
                    )
                    .await?;
                last_written = Instant::now();
                let next = start + Duration::from_secs_f64(n as f64 / rate);
                // The phase ends with its last change, so its delivery is timed from there.
                if next >= start + Duration::from_secs(seconds) {
                    break;
                }
                tokio::time::sleep_until(next.into()).await;
            }
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let cpu = (cpu_seconds(east.controller.pid) - cpu) / start.elapsed().as_secs_f64();
    let metrics = scrape(east.controller.admin_addr).await?;
    let (versions, sent) = (version(&metrics) - before, Sent::read(&metrics).since(sent));
    // The last change: its last endpoint's address, which no earlier version of the slice had.
    let mut last_change_seen = None;
    if let (Some((_, cluster, count)), true) = (churn, n > 0) {
        let admin = east.workloads.first().map(|w| w.admin_addr);
        while let Some(admin) = admin.filter(|_| last_written.elapsed() < Duration::from_secs(30)) {
            if holds(admin, cluster, &format!("{}:8080", address(0, n + count - 1))).await {
                last_change_seen = Some(last_written.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    Ok(Phase {
        cpu,
        versions,
        changes: n,
        last_change_seen,
        sent,
    })
}

/// Starts the mesh, writes the catalogs, measures the three phases.
pub async fn run(size: Size) -> anyhow::Result<Report> {
    anyhow::ensure!(
        size.services > 0 && size.rate > 0.0,
        "--services and --rate must be above zero"
    );
    let mesh = Mesh::start_with(MeshOptions {
        kube: true,
        ..Default::default()
    })
    .await?;
    let cluster = |name: &str| {
        mesh.info
            .clusters
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| anyhow::anyhow!("the demo has no cluster {name}"))
    };
    let (east, west) = (cluster("east")?, cluster("west")?);
    let (east_api, west_api) = (east.kube_client().await?, west.kube_client().await?);
    let started = Instant::now();
    write_catalog(&east_api, size.services, size.endpoints).await?;
    write_catalog(&west_api, 1, 1).await?;
    let written = started.elapsed();
    // West has an import of every east service once east's controller exported them all.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let imports = mcs_api(&west_api, "sim", "ServiceImport")
            .list(&Default::default())
            .await?;
        if imports.items.len() >= size.services {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "west has {} of {} ServiceImports after 180 s",
            imports.items.len(),
            size.services
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let imported = started.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;

    let per_service = size.endpoints / size.services + usize::from(!size.endpoints.is_multiple_of(size.services));
    let idle = phase(east, size.seconds, size.rate, None).await?;
    let peer = phase(east, size.seconds, size.rate, Some((&west_api, "west", 1))).await?;
    let local = phase(east, size.seconds, size.rate, Some((&east_api, "east", per_service))).await?;
    let rss_mib = crate::load::rss_kib(east.controller.pid) as f64 / 1024.0;
    Ok(Report {
        size,
        written,
        imported,
        idle,
        peer,
        local,
        rss_mib,
    })
}

impl Report {
    pub fn print(&self) {
        let pct = |share: f64| share * 100.0;
        let seen = |p: &Phase| match p.last_change_seen {
            Some(d) => format!(
                "its last change in east's sidecar {:.0} ms after it was written",
                d.as_secs_f64() * 1000.0
            ),
            None => "last change not seen in east's sidecar".into(),
        };
        println!(
            "catalog written to east's API server in {:.1}s; every service imported in west {:.1}s after writing \
             began",
            self.written.as_secs_f64(),
            self.imported.as_secs_f64()
        );
        println!();
        println!("east's controller, share of a core (config versions served in the phase):");
        println!(
            "  idle:                           {:.2}% ({})",
            pct(self.idle.cpu),
            self.idle.versions
        );
        println!(
            "  west's EndpointSlice {}/s:       {:.2}% ({} for {} changes; {})",
            self.size.rate,
            pct(self.peer.cpu),
            self.peer.versions,
            self.peer.changes,
            seen(&self.peer)
        );
        println!(
            "  its own EndpointSlice {}/s:      {:.2}% ({} for {} changes; {})",
            self.size.rate,
            pct(self.local.cpu),
            self.local.versions,
            self.local.changes,
            seen(&self.local)
        );
        println!("  RSS after: {:.1} MiB", self.rss_mib);
        println!();
        println!("east's controller sent its two peers (export updates' encoded bytes; services whole / as patches):");
        for (name, p) in [
            ("idle:", &self.idle),
            ("west's EndpointSlice:", &self.peer),
            ("its own EndpointSlice:", &self.local),
        ] {
            println!(
                "  {name:<22} {:.0} B ({:.0} B/s); {} whole, {} as patches",
                p.sent.bytes,
                p.sent.bytes / self.size.seconds as f64,
                p.sent.services.whole,
                p.sent.services.patched
            );
        }
    }

    pub fn figures(&self) -> Figures {
        let pct = |share: f64| share * 100.0;
        let mut f = Figures::new("kube");
        f.add("services", self.size.services as f64, "count");
        f.add("endpoints", self.size.endpoints as f64, "count");
        f.add("rate", self.size.rate, "changes/s");
        f.add("imported_in_west", self.imported.as_secs_f64(), "s");
        for (name, p) in [
            ("idle", &self.idle),
            ("peer_changes", &self.peer),
            ("local_changes", &self.local),
        ] {
            f.add(&format!("controller_cpu.{name}"), pct(p.cpu), "% of a core");
            f.add(&format!("config_versions.{name}"), p.versions, "count");
            f.add(&format!("peering_sent.{name}"), p.sent.bytes, "bytes");
            f.add(
                &format!("peering_services_whole.{name}"),
                p.sent.services.whole,
                "count",
            );
            f.add(
                &format!("peering_services_patched.{name}"),
                p.sent.services.patched,
                "count",
            );
            if let Some(d) = p.last_change_seen {
                f.add(
                    &format!("last_change_in_sidecar.{name}"),
                    d.as_secs_f64() * 1000.0,
                    "ms",
                );
            }
        }
        f.add("controller_rss", self.rss_mib, "MiB");
        f
    }
}
