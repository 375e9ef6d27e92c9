//! One controller in Kubernetes mode at the published size of one cluster: what it costs idle,
//! under its peers' changes and under its own. Prints figures, asserts nothing about time.
//!
//! Run (as root, like `strait up --kube`): `cargo build --release --bin strait --bin
//! strait-sidecar && cargo bench -p multicluster-tests --bench kube` (flags after `--`:
//! `--services 300 --endpoints 4000 --rate 5 --seconds 30`; the defaults are one cluster of
//! Istio ambient's published multi-cluster test and its share of 50 changes/s over ten clusters).
//!
//! `strait up --kube` starts the three-cluster demo, each cluster backed by a real kube-apiserver
//! and etcd. East is then given `services` Services, ServiceExports and EndpointSlices in
//! namespace `sim` (`endpoints` endpoints spread over them and two zones) through its API
//! server, and west one exported service. Once west has east's ServiceImports, east's
//! controller's CPU is measured for `seconds` three times: with nothing changing, while west's
//! EndpointSlice changes `rate` times a second (each change reaches east as a peer's update),
//! and while one of east's own EndpointSlices does. Also printed: how many config versions east
//! served in each phase (that the changes reached it) and its RSS. Written also to
//! `target/strait-bench/kube.json`.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use multicluster_tests::figures::Figures;
use multicluster_tests::haproxy::cpu_seconds;
use multicluster_tests::{mcs_api, metric_sum, scrape, ClusterInfo, Mesh, MeshOptions};
use serde_json::json;

struct Args {
    services: usize,
    endpoints: usize,
    rate: f64,
    seconds: u64,
}

fn args() -> Args {
    let mut a = Args {
        services: 300,
        endpoints: 4000,
        rate: 5.0,
        seconds: 30,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let value = argv.get(i + 1).cloned().unwrap_or_default();
        let bad = |flag: &str| -> ! { panic!("{flag} needs a number, got {value:?}") };
        match argv[i].as_str() {
            "--services" => a.services = value.parse().unwrap_or_else(|_| bad("--services")),
            "--endpoints" => a.endpoints = value.parse().unwrap_or_else(|_| bad("--endpoints")),
            "--rate" => a.rate = value.parse().unwrap_or_else(|_| bad("--rate")),
            "--seconds" => a.seconds = value.parse().unwrap_or_else(|_| bad("--seconds")),
            // cargo bench passes `--bench` to every harness; anything else is a mistake.
            "--bench" => {
                i += 1;
                continue;
            }
            other => panic!("unknown flag {other}: use --services --endpoints --rate --seconds"),
        }
        i += 2;
    }
    assert!(
        a.services > 0 && a.rate > 0.0,
        "--services and --rate must be above zero"
    );
    a
}

async fn client(c: &ClusterInfo) -> Client {
    c.kube_client().await.unwrap()
}

/// The EndpointSlice of service `name` with `count` endpoints, the `n`th version of it.
fn slice(name: &str, service: usize, count: usize, n: usize) -> EndpointSlice {
    let endpoints: Vec<_> = (0..count)
        .map(|j| {
            let host = (j + n) % 250 + 1;
            json!({"addresses": [format!("10.{}.{}.{host}", service / 250, service % 250)],
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
    .unwrap()
}

/// Writes `services` exported Services with `endpoints` endpoints spread over them.
async fn write_catalog(c: &Client, services: usize, endpoints: usize) {
    let params = PatchParams::apply("strait-bench").force();
    let ns: Namespace =
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "sim"}})).unwrap();
    Api::<Namespace>::all(c.clone())
        .patch("sim", &params, &Patch::Apply(&ns))
        .await
        .unwrap();
    futures::stream::iter(0..services)
        .map(|i| {
            let (c, params) = (c.clone(), params.clone());
            let count = endpoints / services + usize::from(i < endpoints % services);
            async move {
                let name = format!("svc-{i:03}");
                let svc: Service = serde_json::from_value(json!({
                    "apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": name, "namespace": "sim"},
                    "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
                }))
                .unwrap();
                Api::<Service>::namespaced(c.clone(), "sim")
                    .patch(&name, &params, &Patch::Apply(&svc))
                    .await
                    .unwrap();
                Api::<EndpointSlice>::namespaced(c.clone(), "sim")
                    .patch(&format!("{name}-1"), &params, &Patch::Apply(slice(&name, i, count, 0)))
                    .await
                    .unwrap();
                let export = json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
                                    "metadata": {"name": name, "namespace": "sim"}});
                mcs_api(&c, "sim", "ServiceExport")
                    .patch(&name, &params, &Patch::Apply(&export))
                    .await
                    .unwrap();
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<()>>()
        .await;
}

/// East's controller over `seconds` while `churn` runs: its share of a core and how many
/// config versions it served.
async fn phase(east: &ClusterInfo, seconds: u64, churn: Option<(&Client, usize, f64)>) -> (f64, f64) {
    let version = |text: &str| metric_sum(text, "strait_config_version", &[]);
    let before = version(&scrape(east.controller.admin_addr).await.unwrap());
    let cpu = cpu_seconds(east.controller.pid);
    let start = Instant::now();
    let mut n = 0usize;
    while start.elapsed() < Duration::from_secs(seconds) {
        match churn {
            Some((c, count, rate)) => {
                n += 1;
                Api::<EndpointSlice>::namespaced(c.clone(), "sim")
                    .patch(
                        "svc-000-1",
                        &PatchParams::apply("strait-bench").force(),
                        &Patch::Apply(slice("svc-000", 0, count, n)),
                    )
                    .await
                    .unwrap();
                let next = start + Duration::from_secs_f64(n as f64 / rate);
                tokio::time::sleep_until(next.into()).await;
            }
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let share = (cpu_seconds(east.controller.pid) - cpu) / start.elapsed().as_secs_f64();
    let after = version(&scrape(east.controller.admin_addr).await.unwrap());
    (share, after - before)
}

#[tokio::main]
async fn main() {
    multicluster_tests::load::bench_setup();
    let a = args();
    println!(
        "strait controller in Kubernetes mode: {} services x {} endpoints in east, {} changes/s, {}s per phase",
        a.services, a.endpoints, a.rate, a.seconds
    );
    let mesh = Mesh::start_with(MeshOptions {
        kube: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let cluster = |name: &str| mesh.info.clusters.iter().find(|c| c.name == name).unwrap();
    let (east, west) = (cluster("east"), cluster("west"));
    let (east_api, west_api) = (client(east).await, client(west).await);
    let written = Instant::now();
    write_catalog(&east_api, a.services, a.endpoints).await;
    write_catalog(&west_api, 1, 1).await;
    println!(
        "catalog written to east's API server in {:.1}s",
        written.elapsed().as_secs_f64()
    );
    // West has an import of every east service once east's controller exported them all.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let imports = mcs_api(&west_api, "sim", "ServiceImport")
            .list(&Default::default())
            .await
            .unwrap();
        if imports.items.len() >= a.services {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "west has {} of {} ServiceImports after 180 s",
            imports.items.len(),
            a.services
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "every service imported in west {:.1}s after the catalog was written",
        written.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(5)).await;

    let per_service = a.endpoints / a.services + usize::from(!a.endpoints.is_multiple_of(a.services));
    let (idle, idle_versions) = phase(east, a.seconds, None).await;
    let (peer, peer_versions) = phase(east, a.seconds, Some((&west_api, 1, a.rate))).await;
    let (local, local_versions) = phase(east, a.seconds, Some((&east_api, per_service, a.rate))).await;
    let rss = multicluster_tests::load::rss_kib(east.controller.pid) as f64 / 1024.0;

    let pct = |share: f64| share * 100.0;
    println!();
    println!("east's controller, share of a core (config versions served in the phase):");
    println!("  idle:                           {:.2}% ({idle_versions})", pct(idle));
    println!(
        "  west's EndpointSlice {}/s:       {:.2}% ({peer_versions})",
        a.rate,
        pct(peer)
    );
    println!(
        "  its own EndpointSlice {}/s:      {:.2}% ({local_versions})",
        a.rate,
        pct(local)
    );
    println!("  RSS after: {rss:.1} MiB");
    let mut f = Figures::new("kube");
    f.add("services", a.services as f64, "count");
    f.add("endpoints", a.endpoints as f64, "count");
    f.add("rate", a.rate, "changes/s");
    f.add("controller_cpu.idle", pct(idle), "% of a core");
    f.add("controller_cpu.peer_changes", pct(peer), "% of a core");
    f.add("controller_cpu.local_changes", pct(local), "% of a core");
    f.add("config_versions.idle", idle_versions, "count");
    f.add("config_versions.peer_changes", peer_versions, "count");
    f.add("config_versions.local_changes", local_versions, "count");
    f.add("controller_rss", rss, "MiB");
    f.write();
}
