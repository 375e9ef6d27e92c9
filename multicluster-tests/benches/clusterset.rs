//! The clusterset simulator: the control plane at a given size. Prints figures, asserts nothing
//! about time.
//!
//! Run: `cargo build --release --bin strait --bin strait-sidecar && cargo bench -p multicluster-tests --bench clusterset`
//! (flags after `--`: `--clusters 10 --services 300 --endpoints 4000 --churn 50 --seconds 30
//! --sidecars 1`; the defaults are Istio ambient's published multi-cluster test;
//! `--sidecar-scope demo` scopes the sidecars to their own namespace, away from the catalog;
//! `--sidecar-scope-authorized true` scopes them by authorization; `--policies 10` sets how many
//! AuthorizationPolicies the policy rounds write; `--batch-window 100` sets every controller's
//! `batchWindow` in milliseconds).
//!
//! `strait up` starts N real clusters (controller, gateway and K real sidecars each, peered over
//! the QUIC tunnel as in production). Each controller is then given a synthetic catalog: the same
//! `services` names in namespace `sim` in every cluster, `endpoints` endpoints per cluster spread
//! over them and over two zones (one catalog file per service), so each merged service has
//! endpoints in every cluster. Then,
//! for `seconds`, endpoints churn at `churn` changes/s across the clusterset (one endpoint of a
//! random cluster gets a new address, as when a pod is replaced). One probe per cluster
//! subscribes to that cluster's controller over the config stream (real mTLS gRPC, ACKing each
//! version as a sidecar does) and notes when each change from another cluster reaches it.
//!
//! Printed: time to the first complete catalog everywhere; change -> delivered to (and ACKed
//! by) the probe of every other cluster, p50/p99/max; each controller's RSS and CPU (share of a
//! core) during the churn, in total and per remote cluster; the encoded peering bytes per cluster
//! pair per second; each real sidecar's RSS holding the full catalog. Then the policy rounds:
//! AuthorizationPolicies written one after another, each in the next cluster, each refusing the
//! sidecars one service of `sim`: from `strait apply` to every proxy of each cluster having
//! acknowledged it (that cluster's own report), p50/p99/max; with sidecars scoped by
//! authorization, until each no longer holds the service, and after `strait delete` until it
//! holds it again. Written also to
//! `target/strait-bench/clusterset.json`.

#![allow(clippy::unwrap_used)]

use multicluster_tests::clusterset::{run, Size};
use multicluster_tests::load::{bench_flags, flag_value};

/// `--clusters N --services N --endpoints N --churn N --seconds N --sidecars N
/// [--sidecar-scope demo] [--sidecar-scope-authorized true] [--policies N] [--batch-window MS]`.
fn args() -> Size {
    let mut a = Size::default();
    for (flag, value) in bench_flags() {
        match flag.as_str() {
            "--clusters" => a.clusters = flag_value(&flag, &value),
            "--services" => a.services = flag_value(&flag, &value),
            "--endpoints" => a.endpoints = flag_value(&flag, &value),
            "--churn" => a.churn = flag_value(&flag, &value),
            "--seconds" => a.seconds = flag_value(&flag, &value),
            "--sidecars" => a.sidecars = flag_value(&flag, &value),
            "--sidecar-scope" => a.sidecar_scope = value.split(',').map(String::from).collect(),
            "--batch-window" => a.batch_window_ms = Some(flag_value(&flag, &value)),
            "--sidecar-scope-authorized" => a.sidecar_scope_authorized = flag_value(&flag, &value),
            "--policies" => a.policies = flag_value(&flag, &value),
            other => panic!(
                "unknown flag {other}: use --clusters --services --endpoints --churn --seconds --sidecars --sidecar-scope --sidecar-scope-authorized --policies --batch-window"
            ),
        }
    }
    a
}

#[tokio::main]
async fn main() {
    multicluster_tests::load::bench_setup();
    let a = args();
    println!(
        "strait clusterset simulator: {} clusters x {} services x {} endpoints per cluster, {} changes/s, {}s, {} sidecar(s) per cluster, batchWindow {}",
        a.clusters,
        a.services,
        a.endpoints,
        a.churn,
        a.seconds,
        a.sidecars,
        a.batch_window_ms.map_or("default".into(), |ms| format!("{ms} ms"))
    );
    let report = run(a).await.unwrap();
    report.print();
    report.figures().write();
}
