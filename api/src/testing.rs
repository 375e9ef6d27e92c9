//! Config resources written the short way, for the tests and benchmarks of every crate (the
//! daemons do not use this).

use crate::pb;

/// HTTP service `<namespace>/<name>` (port 80, ClusterSet IP 240.0.0.10) with `endpoints`, as
/// the resource `service/<namespace>/<name>` at `version`.
pub fn http_service(namespace: &str, name: &str, version: &str, endpoints: Vec<pb::Endpoint>) -> pb::Resource {
    pb::Resource {
        name: format!("service/{namespace}/{name}"),
        version: version.into(),
        kind: Some(pb::resource::Kind::Service(pb::Service {
            name: name.into(),
            namespace: namespace.into(),
            clusterset_ip: "240.0.0.10".into(),
            ports: vec![pb::ServicePort {
                name: "http".into(),
                port: 80,
                protocol: "http".into(),
            }],
            endpoints,
            ..Default::default()
        })),
    }
}

/// A ready endpoint of workload `workload` at `address` in `locality`, serving as
/// `spiffe://mesh.local/ns/demo/sa/echo`.
pub fn endpoint(address: &str, workload: &str, locality: pb::Locality) -> pb::Endpoint {
    pb::Endpoint {
        address: address.into(),
        workload: workload.into(),
        locality: Some(locality),
        identity: "spiffe://mesh.local/ns/demo/sa/echo".into(),
        ready: true,
        labels: Default::default(),
    }
}

/// Cluster `cluster`'s east-west gateway at `address`, reachable.
pub fn gateway(cluster: &str, address: &str, locality: pb::Locality) -> pb::Resource {
    pb::Resource {
        name: format!("gateway/{cluster}"),
        version: "1".into(),
        kind: Some(pb::resource::Kind::Gateway(pb::Gateway {
            cluster: cluster.into(),
            address: address.into(),
            identity: "spiffe://mesh.local/ns/strait-system/sa/strait-gateway".into(),
            locality: Some(locality),
            reachable: true,
        })),
    }
}
