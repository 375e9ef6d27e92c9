//! The sidecar's DNS proxy: any datagram an app sends to port 53. Mesh names are answered from
//! a small catalog; with no upstream nameservers, other names get SERVFAIL (no network).
#![no_main]

use std::sync::{Arc, OnceLock};

use hickory_proto::op::Message;
use libfuzzer_sys::fuzz_target;
use strait_api::pb;
use strait_api::snapshot::{Resources, Snapshot};
use strait_sidecar::dns::{DnsMetrics, DnsProxy, ResolvConf};

fn catalog() -> Snapshot {
    let service = |name: &str, ip: &str, eps: &[&str]| pb::Resource {
        name: format!("service/demo/{name}"),
        version: "1".into(),
        kind: Some(pb::resource::Kind::Service(pb::Service {
            name: name.into(),
            namespace: "demo".into(),
            clusterset_ip: ip.into(),
            ports: vec![pb::ServicePort { name: "http".into(), port: 80, protocol: "http".into() }],
            endpoints: eps
                .iter()
                .map(|a| pb::Endpoint {
                    address: (*a).into(),
                    workload: format!("{name}-{a}"),
                    locality: Some(pb::Locality { cluster: "east".into(), ..Default::default() }),
                    identity: format!("spiffe://mesh.local/ns/demo/sa/{name}"),
                    ready: true,
                    labels: Default::default(),
                })
                .collect(),
            ..Default::default()
        })),
    };
    let update = pb::ConfigUpdate {
        version: 1,
        full: true,
        resources: vec![
            service("echo", "240.0.0.7", &["198.18.1.10:8080"]),
            service("db", "", &["198.18.1.11:8080", "198.18.2.11:8080"]),
        ],
        removed: vec![],
        more: false,
        ..Default::default()
    };
    let mut resources = Resources::default();
    resources.apply(update);
    resources.snapshot(1)
}

struct Fixture {
    runtime: tokio::runtime::Runtime,
    proxy: DnsProxy,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let (_tx, rx) = tokio::sync::watch::channel(Arc::new(catalog()));
        let resolv = ResolvConf::parse("search demo.svc.cluster.local svc.cluster.local\n");
        let proxy = runtime.block_on(async {
            DnsProxy::new(rx, &resolv, &[], DnsMetrics::new(&prometheus::Registry::new()))
        });
        Fixture { runtime, proxy }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    // A UDP answer fits what the client said it can take: 512 bytes without EDNS, its EDNS
    // payload size (512 at least, our 1232 at most) with.
    let max = match Message::from_vec(data) {
        Ok(query) => query.edns.map_or(512, |e| usize::from(e.max_payload()).clamp(512, 1232)),
        Err(_) => 512,
    };
    for udp in [false, true] {
        if let Some(answer) = f.runtime.block_on(f.proxy.answer(data, udp)) {
            assert!(!udp || answer.len() <= max, "UDP answer of {} bytes over {max}", answer.len());
        }
    }
});
