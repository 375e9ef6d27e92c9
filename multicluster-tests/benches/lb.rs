//! What a request pays its sidecar to choose an endpoint, as a service's endpoints grow: prints
//! figures, asserts nothing about time.
//!
//! Run: `cargo bench -p multicluster-tests --bench lb`
//!
//! In this process, the sidecar's balancer (`strait_sidecar::lb::Balancer`, the code every
//! request runs: readiness, the cluster's gateway, outlier ejections, locality priority, the
//! priority load) picks among one service's endpoints spread over 10 clusters of 3 zones each,
//! from a caller in the first zone of the first cluster, with the mesh's default locality
//! failover. For 1, 10, 100 and 1,000 endpoints: nanoseconds per pick with every endpoint
//! healthy, and with one remote cluster's gateway ejected (so health is not uniform), and each
//! as a ratio to one endpoint's. A request's whole cost in a sidecar is ~150 µs on this
//! machine (the `mesh` bench), the figure to read these against. Figures also go to
//! `target/strait-bench/lb.json`.

#![allow(clippy::unwrap_used)]

use std::time::Instant;

use multicluster_tests::figures::Figures;
use strait_api::locality::Locality;
use strait_api::pb;
use strait_api::snapshot::{Resources, Snapshot};
use strait_api::testing;
use strait_sidecar::lb::Balancer;

const CLUSTERS: usize = 10;
const ZONES: usize = 3;

fn locality(c: usize, z: usize) -> pb::Locality {
    pb::Locality {
        cluster: format!("c{c}"),
        region: format!("r{c}"),
        zone: format!("r{c}-z{z}"),
        ..Default::default()
    }
}

/// One service of `n` endpoints dealt round-robin over the clusters and their zones, and each
/// remote cluster's gateway.
fn snapshot(n: usize) -> Snapshot {
    let endpoints = (0..n)
        .map(|i| {
            let (c, z) = (i % CLUSTERS, (i / CLUSTERS) % ZONES);
            let address = format!("10.{c}.{}.{}:8080", i / 250, i % 250 + 1);
            pb::Endpoint {
                labels: [("app".to_string(), "echo".to_string()), ("version".into(), "v1".into())].into(),
                ..testing::endpoint(&address, &format!("echo-{i}"), locality(c, z))
            }
        })
        .collect();
    let service = testing::http_service("demo", "echo", "1", endpoints);
    let gateways =
        (1..CLUSTERS).map(|c| testing::gateway(&format!("c{c}"), &format!("127.0.{c}.2:15443"), locality(c, 0)));
    let mut resources = Resources::default();
    let rejected = resources.apply(pb::ConfigUpdate {
        version: 1,
        full: true,
        resources: std::iter::once(service).chain(gateways).collect(),
        ..Default::default()
    });
    assert!(rejected.is_empty(), "{rejected:?}");
    let snap = resources.snapshot(1);
    assert_eq!(snap.services["demo/echo"].endpoints.len(), n);
    snap
}

/// Nanoseconds per pick, over `picks` picks; and how many went to the caller's own zone. With
/// `eject`, cluster c1's gateway fails before every 1,000 picks (so its ejection, 2 s, never
/// runs out during the run).
fn measure(balancer: &Balancer, snap: &Snapshot, picks: usize, eject: bool) -> (f64, usize) {
    let svc = &snap.services["demo/echo"];
    let start = Instant::now();
    let mut local = 0;
    for p in 0..picks {
        if eject && p % 1000 == 0 {
            balancer.gateway_failure(snap, "c1");
        }
        let i = balancer.pick(snap, svc, &[]).unwrap();
        local += usize::from(svc.endpoints[i].locality().zone == "r0-z0");
    }
    (start.elapsed().as_nanos() as f64 / picks as f64, local)
}

fn main() {
    let mut figures = Figures::new("lb");
    println!("balancer: ns per pick among one service's endpoints over {CLUSTERS} clusters x {ZONES} zones\n");
    println!(
        "{:>10} {:>14} {:>10} {:>22} {:>10}",
        "endpoints", "all healthy", "ratio", "one gateway ejected", "ratio"
    );
    let mut base: Option<(f64, f64)> = None;
    for n in [1usize, 10, 100, 1000] {
        let snap = snapshot(n);
        let caller = Locality {
            cluster: "c0".into(),
            region: "r0".into(),
            zone: "r0-z0".into(),
            subzone: String::new(),
        };
        let registry = prometheus::Registry::new();
        let balancer = Balancer::new(
            caller,
            strait_gateway::GatewayHealth::default(),
            strait_sidecar::metrics::SidecarMetrics::new(&registry),
        );
        let picks = (2_000_000 / n).clamp(20_000, 500_000);
        measure(&balancer, &snap, picks / 10, false);
        let (healthy, local) = measure(&balancer, &snap, picks, false);
        assert!(local > 0, "the caller's own zone takes traffic");
        // One remote cluster's gateway ejected: its endpoints are out.
        let (ejected, _) = measure(&balancer, &snap, picks, true);
        let (h1, e1) = *base.get_or_insert((healthy, ejected));
        println!(
            "{n:>10} {healthy:>14.0} {:>9.1}x {ejected:>22.0} {:>9.1}x",
            healthy / h1,
            ejected / e1
        );
        figures.add(&format!("pick_ns.healthy.{n}"), healthy, "ns");
        figures.add(&format!("pick_ns.gateway_ejected.{n}"), ejected, "ns");
        figures.ratio(&format!("pick_ns.healthy.{n}_over_1"), healthy / h1, None);
        figures.ratio(&format!("pick_ns.gateway_ejected.{n}_over_1"), ejected / e1, None);
    }
    figures.write();
}
