//! The clusterset simulator, small: real controllers, gateways and sidecars, synthetic catalogs
//! with endpoint churn. What it guards is behaviour, not speed: every change reaches every
//! other cluster, and the deltas leave each subscriber with exactly the catalog that stands.
//! (`cargo bench --bench clusterset` runs it at the published size and prints the figures.)

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use multicluster_tests::clusterset::{run, Size};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_change_reaches_every_other_cluster() {
    let size = Size {
        clusters: 3,
        services: 12,
        endpoints: 60,
        churn: 10.0,
        seconds: 5,
        sidecars: 1,
    };
    let report = run(size.clone()).await.unwrap();
    report.print();
    assert!(report.changes >= 40, "only {} changes were made", report.changes);
    assert_eq!(report.missing, 0, "changes never delivered");
    assert_eq!(
        report.delays.len() + report.superseded,
        report.changes * (size.clusters - 1),
        "each change is delivered once to each other cluster"
    );
    assert_eq!(
        report.final_endpoints,
        vec![size.clusters * size.endpoints; size.clusters],
        "after the churn every subscriber holds exactly the endpoints that stand"
    );
    assert!(report.peering_bytes_per_pair > 0.0, "peering bytes are counted");
    let doc = report.figures().to_json();
    for key in [
        "change_to_ack.p99",
        "controller.cpu_per_remote_cluster",
        "peering.bytes_per_pair",
    ] {
        assert!(doc["figures"][key]["value"].is_number(), "{key} missing in {doc}");
    }
}
