//! What a proxy's config costs in memory at the published clusterset size (10 clusters x 300
//! services x 4,000 endpoints per cluster: 40,000 endpoints): the heap a full catalog holds
//! once applied (resources and snapshot), per endpoint, and the decoded full update it is
//! built from; then the heap after endpoints churned one service at a time. Both ways a
//! controller sends a service: whole (every cluster's endpoints in one resource) and in parts
//! (its fields, and each cluster's endpoints as `endpoints/<ns>/<name>/<cluster>`, which is
//! what sidecars take), with what one endpoint's change costs on the wire each way.
//! Counted by jemalloc (the `strait` binary's allocator): bytes allocated and not freed.
//! Figures only; nothing is asserted. Also written to `target/strait-bench/catalog.json`.
//!
//! Run: `cargo bench -p strait-api --bench catalog`

#![allow(clippy::unwrap_used)]

/// The JSON document every benchmark writes, `target/strait-bench/<name>.json`: the same source
/// as the other benchmarks' (this crate cannot depend on `multicluster-tests`).
#[allow(dead_code, unused_imports)]
#[path = "../../multicluster-tests/src/figures.rs"]
mod figures;

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

/// Service `s` as a controller sends it whole: every cluster's endpoints of it (the
/// simulator's catalog: endpoint `e` of a cluster belongs to service `e % SERVICES`, two zones
/// each), all on port 10000 but for the `moved`-th endpoint, on `port`.
fn service(s: usize, moved: usize, port: u32) -> pb::Resource {
    let endpoints = (0..CLUSTERS).flat_map(|c| endpoints(c, s, moved, port)).collect();
    head(s, endpoints, port)
}

/// Cluster `c`'s endpoints of service `s`.
fn endpoints(c: usize, s: usize, moved: usize, port: u32) -> Vec<pb::Endpoint> {
    (s..ENDPOINTS_PER_CLUSTER)
        .step_by(SERVICES)
        .map(move |e| pb::Endpoint {
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
        .collect()
}

/// Cluster `c`'s endpoints of service `s` as a resource of their own.
fn part(c: usize, s: usize, moved: usize, port: u32) -> pb::Resource {
    pb::Resource {
        name: format!("endpoints/sim/svc-{s:04}/c{c:02}"),
        version: format!("{port}"),
        kind: Some(pb::resource::Kind::ServiceEndpoints(pb::ServiceEndpoints {
            namespace: "sim".into(),
            name: format!("svc-{s:04}"),
            cluster: format!("c{c:02}"),
            endpoints: endpoints(c, s, moved, port),
        })),
    }
}

/// Service `s` with `endpoints` (none: its fields alone, as sent in parts).
fn head(s: usize, endpoints: Vec<pb::Endpoint>, port: u32) -> pb::Resource {
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

/// How a controller sends the catalog.
#[derive(Clone, Copy, PartialEq)]
enum Form {
    Whole,
    Parts,
}

/// Service `s` in `form`: one resource, or its fields and one per cluster.
fn resources(form: Form, s: usize) -> Vec<pb::Resource> {
    match form {
        Form::Whole => vec![service(s, 0, 10_000)],
        Form::Parts => std::iter::once(head(s, vec![], 10_000))
            .chain((0..CLUSTERS).map(|c| part(c, s, 0, 10_000)))
            .collect(),
    }
}

/// The `i`th churn update's resources: endpoint `i` of a service moves to a new port (in every
/// cluster: the whole service; in parts: cluster `i % CLUSTERS`'s alone).
fn churn(form: Form, i: usize) -> Vec<pb::Resource> {
    let (s, moved, port) = (i % SERVICES, i % ENDPOINTS_PER_CLUSTER, 10_001 + i as u32);
    match form {
        Form::Whole => vec![service(s, moved, port)],
        Form::Parts => vec![part(i % CLUSTERS, s, moved, port)],
    }
}

/// Applies the full catalog in `form`, then 1,000 churn updates, printing and recording what
/// each costs; returns what the two forms are compared by: one churn update's bytes on the
/// wire and microseconds to apply, and the MiB held once the catalog is applied.
fn measure(form: Form, figures: &mut figures::Figures) -> [f64; 3] {
    let label = match form {
        Form::Whole => "whole",
        Form::Parts => "parts",
    };
    let endpoints = CLUSTERS * ENDPOINTS_PER_CLUSTER;
    let base = live();
    let full = pb::ConfigUpdate {
        version: 1,
        full: true,
        resources: (0..SERVICES).flat_map(|s| resources(form, s)).collect(),
        removed: vec![],
        more: false,
        ..Default::default()
    };
    let wire = full.encode_to_vec();
    drop(full);
    let before_decode = live();
    let decoded = pb::ConfigUpdate::decode(wire.as_slice()).unwrap();
    let decoded_bytes = live() - before_decode;
    println!(
        "[{label}] full update on the wire: {:.1} MiB ({:.0} B per endpoint); decoded: {:.1} MiB ({:.0} B per endpoint)",
        mib(wire.len()),
        wire.len() as f64 / endpoints as f64,
        mib(decoded_bytes),
        decoded_bytes as f64 / endpoints as f64
    );
    figures.add(&format!("{label}.full_update_wire"), mib(wire.len()), "MiB");
    figures.add(&format!("{label}.full_update_decoded"), mib(decoded_bytes), "MiB");
    drop(wire);
    let mut resources = Resources::default();
    let (snapshot, rejected) = resources.update(&Snapshot::default(), decoded);
    assert!(rejected.is_empty(), "{rejected:?}");
    let held = live() - base;
    println!(
        "[{label}] held once applied (resources + snapshot): {:.1} MiB, {:.0} B per endpoint",
        mib(held),
        held as f64 / endpoints as f64,
    );
    figures.add(&format!("{label}.held"), mib(held), "MiB");
    figures.add(
        &format!("{label}.held_per_endpoint"),
        held as f64 / endpoints as f64,
        "B",
    );
    let mut prev = snapshot;
    let (mut bytes, started) = (0usize, std::time::Instant::now());
    for i in 0..1000 {
        let update = pb::ConfigUpdate {
            version: 2 + i as u64,
            full: false,
            resources: churn(form, i),
            removed: vec![],
            more: false,
            ..Default::default()
        };
        bytes += update.encoded_len();
        let (next, _) = resources.update(&prev, update);
        prev = next;
    }
    let each = started.elapsed().as_secs_f64() * 1e6 / 1000.0;
    let after = live() - base;
    println!(
        "[{label}] 1,000 one-change updates: {:.0} B each on the wire, {each:.0} us each to apply; held after: {:.1} MiB",
        bytes as f64 / 1000.0,
        mib(after),
    );
    figures.add(&format!("{label}.churn_update_wire"), bytes as f64 / 1000.0, "B");
    figures.add(&format!("{label}.churn_update_apply"), each, "us");
    figures.add(&format!("{label}.held_after_churn"), mib(after), "MiB");
    drop(prev);
    drop(resources);
    [bytes as f64 / 1000.0, each, mib(held)]
}

fn main() {
    println!(
        "{CLUSTERS} clusters x {SERVICES} services x {ENDPOINTS_PER_CLUSTER} endpoints per cluster ({} endpoints)",
        CLUSTERS * ENDPOINTS_PER_CLUSTER
    );
    let mut figures = figures::Figures::new("catalog");
    let whole = measure(Form::Whole, &mut figures);
    let parts = measure(Form::Parts, &mut figures);
    for (k, (p, w)) in ["churn_update_wire", "churn_update_apply", "held"]
        .iter()
        .zip(parts.iter().zip(whole))
    {
        let key = format!("{k}.parts_over_whole");
        println!("{key}: {:.3}", p / w);
        figures.ratio(&key, p / w, None);
    }
    figures.write();
}
