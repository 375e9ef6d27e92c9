//! One controller in Kubernetes mode at the published size of one cluster: what it costs idle,
//! under its peers' changes and under its own (see `multicluster_tests::kube_bench`). Prints
//! figures, asserts nothing about time; writes them also to `target/strait-bench/kube.json`.
//!
//! Run (as root, like `strait up --kube`): `cargo build --release --bin strait --bin
//! strait-sidecar && cargo bench -p multicluster-tests --bench kube` (flags after `--`:
//! `--services 300 --endpoints 4000 --rate 5 --seconds 30`; the defaults are one cluster of
//! Istio ambient's published multi-cluster test and its share of 50 changes/s over ten clusters).

#![allow(clippy::unwrap_used)]

use multicluster_tests::kube_bench::{run, Size};
use multicluster_tests::load::{bench_flags, flag_value};

fn args() -> Size {
    let mut a = Size::default();
    for (flag, value) in bench_flags() {
        match flag.as_str() {
            "--services" => a.services = flag_value(&flag, &value),
            "--endpoints" => a.endpoints = flag_value(&flag, &value),
            "--rate" => a.rate = flag_value(&flag, &value),
            "--seconds" => a.seconds = flag_value(&flag, &value),
            other => panic!("unknown flag {other}: use --services --endpoints --rate --seconds"),
        }
    }
    a
}

#[tokio::main]
async fn main() {
    multicluster_tests::load::bench_setup();
    let size = args();
    println!(
        "strait controller in Kubernetes mode: {} services x {} endpoints in east, {} changes/s, {}s per phase",
        size.services, size.endpoints, size.rate, size.seconds
    );
    let report = run(size).await.unwrap();
    report.print();
    report.figures().write();
}
