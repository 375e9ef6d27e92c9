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

fn args() -> Size {
    let mut a = Size::default();
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
