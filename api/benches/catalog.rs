//! What a proxy's config costs in memory at the published clusterset size (10 clusters x 300
//! services x 4,000 endpoints per cluster: 40,000 endpoints): the heap a full catalog holds
//! once applied (resources and snapshot), per endpoint, and the decoded full update it is
//! built from; then the heap after endpoints churned one service at a time.
//! Counted by jemalloc (the `strait` binary's allocator): bytes allocated and not freed. Figures only; nothing is asserted.
//!
//! Run: `cargo bench -p strait-api --bench catalog`

#![allow(clippy::unwrap_used)]

use prost::Message;
use strait_api::pb;
use strait_api::snapshot::{Resources, Snapshot};
use tikv_jemalloc_ctl::{epoch, stats};

/// The allocator the `strait` binary uses, so the figures are what a proxy holds.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Bytes allocated and not yet freed, process-wide.
fn live() -> usize {
    epoch::advance().unwrap();
    stats::allocated::read().unwrap()
}

const CLUSTERS: usize = 10;
const SERVICES: usize = 300;
const ENDPOINTS_PER_CLUSTER: usize = 4000;

/// Service `s` as a controller sends it: every cluster's endpoints of it (the simulator's
/// catalog: endpoint `e` of a cluster belongs to service `e % SERVICES`, two zones each), all
/// on port 10000 but for the `moved`-th endpoint, on `port`.
fn service(s: usize, moved: usize, port: u32) -> pb::Resource {
    let endpoints = (0..CLUSTERS)
        .flat_map(|c| {
            (s..ENDPOINTS_PER_CLUSTER).step_by(SERVICES).map(move |e| pb::Endpoint {
                address: format!(
                    "10.{c}.{}.{}:{}",
                    e / 250,
                    e % 250 + 1,
                    if e == moved { port } else { 10_000 }
                ),
                workload: format!("w-{c}-{e}"),
                locality: Some(pb::Locality {
                    cluster: format!("c{c:02}"),
                    region: format!("region-{c}"),
                    zone: format!("z{c:02}-{}", ["a", "b"][e % 2]),
                    subzone: String::new(),
                }),
                identity: "spiffe://mesh.local/ns/sim/sa/sim".into(),
                ready: true,
                labels: Default::default(),
            })
        })
        .collect();
    pb::Resource {
        name: format!("service/sim/svc-{s:04}"),
        version: format!("{port}"),
        kind: Some(pb::resource::Kind::Service(pb::Service {
            name: format!("svc-{s:04}"),
            namespace: "sim".into(),
            clusterset_ip: format!("240.0.{}.{}", s / 250, s % 250 + 1),
            ports: vec![pb::ServicePort {
                name: "http".into(),
                port: 80,
                protocol: "http".into(),
            }],
            endpoints,
            conditions: vec![],
            identities: vec![],
        })),
    }
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn main() {
    let endpoints = CLUSTERS * ENDPOINTS_PER_CLUSTER;
    let base = live();
    let full = pb::ConfigUpdate {
        version: 1,
        full: true,
        resources: (0..SERVICES).map(|s| service(s, 0, 10_000)).collect(),
        removed: vec![],
        more: false,
    };
    let wire = full.encode_to_vec();
    drop(full);
    let before_decode = live();
    let decoded = pb::ConfigUpdate::decode(wire.as_slice()).unwrap();
    let decoded_bytes = live() - before_decode;
    println!(
        "{CLUSTERS} clusters x {SERVICES} services x {ENDPOINTS_PER_CLUSTER} endpoints per cluster ({endpoints} endpoints)"
    );
    println!(
        "full update on the wire: {:.1} MiB ({:.0} B per endpoint); decoded: {:.1} MiB ({:.0} B per endpoint)",
        mib(wire.len()),
        wire.len() as f64 / endpoints as f64,
        mib(decoded_bytes),
        decoded_bytes as f64 / endpoints as f64
    );
    drop(wire);
    let mut resources = Resources::default();
    let (snapshot, rejected) = resources.update(&Snapshot::default(), decoded);
    assert!(rejected.is_empty(), "{rejected:?}");
    let held = live() - base;
    println!(
        "held once applied (resources + snapshot): {:.1} MiB, {:.0} B per endpoint",
        mib(held),
        held as f64 / endpoints as f64,
    );
    // Churn as the simulator's: one endpoint moves to a new port, one update each.
    let mut prev = snapshot;
    for i in 0..1000 {
        let update = pb::ConfigUpdate {
            version: 2 + i as u64,
            full: false,
            resources: vec![service(i % SERVICES, i % ENDPOINTS_PER_CLUSTER, 10_001 + i as u32)],
            removed: vec![],
            more: false,
        };
        let (next, _) = resources.update(&prev, update);
        prev = next;
    }
    println!("after 1,000 one-service updates: held {:.1} MiB", mib(live() - base),);
    drop(prev);
    drop(resources);
}
