//! What visibility and authorization cost: prints figures, asserts nothing about time.
//!
//! Run: `cargo build --release --bin strait --bin strait-sidecar && cargo bench -p multicluster-tests --bench telemetry`
//!
//! Two meshes from the release binary, one after the other, same topology and load (1,000
//! requests/s of 1 kB over 16 connections, open loop, `STRAIT_BENCH_SECONDS` per run, default
//! 10): "off" exports no spans and writes no access log; "on" samples 1 % of traces and
//! exports them over OTLP/HTTP (to a sink in this process that answers like a collector) and
//! writes a JSON access log line per request on every hop. Istio metrics are always on (there
//! is no switch for them). For each: added p50/p90/p99 of a sidecar pair over a direct call to
//! the same app. Then, on the "on" mesh, 50 AuthorizationPolicies on the destination (each an
//! ALLOW rule for another principal, plus the one that admits the caller): the destination
//! sidecar's RSS before and after, and the added latency with them.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use multicluster_tests::load::{load, rss_kib, Latencies, BODY, CONNECTIONS, RATE};
use multicluster_tests::{Mesh, MeshOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOPOLOGY: &str = r#"
trustDomain: mesh.local
services:
  - {name: client, port: 80, protocol: http}
  - {name: echo, port: 80, protocol: http}
  - {name: other, port: 80, protocol: http}
clusters:
  - name: east
    region: us-east
    zones: [us-east-1a]
    workloads:
      - {service: client, zone: us-east-1a}
      - {service: echo, zone: us-east-1a}
  - name: west
    region: us-west
    zones: [us-west-2a]
    workloads:
      - {service: other, zone: us-west-2a}
"#;

/// An OTLP/HTTP receiver that reads each request whole and answers 200 with an empty
/// `ExportTraceServiceResponse` (what a collector says); counts the requests.
async fn otlp_sink() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    async move {
                        use http_body_util::BodyExt;
                        let _ = req.into_body().collect().await;
                        seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let mut resp = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::new()));
                        resp.headers_mut()
                            .insert("content-type", "application/x-protobuf".parse().unwrap());
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, count)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Run {
    direct: Latencies,
    meshed: Latencies,
    errors: usize,
}

impl Run {
    fn added(&self, p: f64) -> f64 {
        ms(self.meshed.pct(p)) - ms(self.direct.pct(p))
    }
}

async fn measure(mesh: &Mesh, seconds: u64) -> Run {
    let client = mesh.workload("client", "us-east-1a");
    let echo = mesh.workload("echo", "us-east-1a");
    let url = "http://echo.demo.svc.clusterset.local/";
    // Warm-up: connections, pools, caches.
    let _ = load(client.outbound_proxy, url, true, 1).await;
    let (direct, derr) = load(echo.app_addr, &format!("http://{}/", echo.app_addr), false, seconds).await;
    let (meshed, merr) = load(client.outbound_proxy, url, true, seconds).await;
    Run {
        direct,
        meshed,
        errors: derr + merr,
    }
}

async fn start(extra: &[String]) -> Mesh {
    Mesh::start_with(MeshOptions {
        topology: Some(TOPOLOGY.into()),
        extra_args: extra.to_vec(),
        ..Default::default()
    })
    .await
    .unwrap()
}

/// `strait apply` of `yaml` on east's controller, waiting for every proxy.
fn apply(mesh: &Mesh, yaml: &str) {
    let (ok, out, err) = mesh.policy("apply", "east", "bench-authz", yaml, "60s");
    assert!(ok, "{out}{err}");
}

/// Asks the app through the mesh once and reads the answer (a request the rules must admit).
async fn one_call(proxy: SocketAddr) -> u16 {
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    s.write_all(b"GET http://echo.demo.svc.clusterset.local/ HTTP/1.1\r\nHost: echo.demo.svc.clusterset.local\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let seconds = multicluster_tests::load::bench_setup();
    println!(
        "strait telemetry cost: {RATE} req/s of {BODY} B over {CONNECTIONS} connections, open loop, {seconds}s per run\n"
    );

    let off_mesh = start(&["--trace-sampling".into(), "0".into()]).await;
    let off = measure(&off_mesh, seconds).await;
    drop(off_mesh);

    let (sink, exports) = otlp_sink().await;
    let on_mesh = start(&[
        "--otlp-endpoint".into(),
        format!("http://{sink}/v1/traces"),
        "--trace-sampling".into(),
        "1".into(),
        "--access-log".into(),
        "json".into(),
    ])
    .await;
    let on = measure(&on_mesh, seconds).await;
    let echo = on_mesh.workload("echo", "us-east-1a").clone();
    let client = on_mesh.workload("client", "us-east-1a").clone();
    let logged = std::fs::read_to_string(&echo.sidecar_log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with('{'))
        .count();

    println!(
        "{:<52} {:>8} {:>8} {:>8} {:>7}",
        "added latency over direct (ms), sidecar pair", "p50", "p90", "p99", "errors"
    );
    for (label, r) in [
        ("metrics only (no spans, no access log)", &off),
        ("metrics + 1% traces over OTLP + JSON access logs", &on),
    ] {
        println!(
            "{:<52} {:>+8.3} {:>+8.3} {:>+8.3} {:>7}",
            label,
            r.added(0.5),
            r.added(0.9),
            r.added(0.99),
            r.errors
        );
    }
    println!(
        "{:<52} {:>8.2}x (p99 added, on / off)",
        "",
        on.added(0.99) / off.added(0.99).max(0.001)
    );
    let mut figures = multicluster_tests::figures::Figures::new("telemetry");
    for (key, r) in [("metrics_only", &off), ("traces_and_access_logs", &on)] {
        for (q, name) in [(0.5, "p50"), (0.9, "p90"), (0.99, "p99")] {
            figures.add(&format!("{key}.added_{name}"), r.added(q), "ms");
        }
        figures.add(&format!("{key}.errors"), r.errors as f64, "requests");
    }
    figures.ratio(
        "traces_and_access_logs_over_metrics_only.added_p99",
        on.added(0.99) / off.added(0.99).max(0.001),
        None,
    );
    println!(
        "  (on: {} OTLP export requests received, {} access log lines on the destination sidecar)\n",
        exports.load(std::sync::atomic::Ordering::Relaxed),
        logged
    );

    // 50 AuthorizationPolicies on echo: 49 admit other principals, one admits the client.
    let before = rss_kib(echo.sidecar_pid);
    let mut yaml = String::new();
    for i in 0..50 {
        let principal = if i == 49 {
            "spiffe://mesh.local/ns/demo/sa/client".to_string()
        } else {
            format!("spiffe://mesh.local/ns/demo/sa/caller-{i}")
        };
        yaml.push_str(&format!(
            "---\napiVersion: policy.strait.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: echo-allow-{i}, namespace: demo}}\nspec:\n  targetRefs: [{{group: \"\", kind: Service, name: echo}}]\n  action: ALLOW\n  rules:\n    - from: [{{source: {{principals: [\"{principal}\"]}}}}]\n      to: [{{operation: {{methods: [GET, POST], paths: [\"/api/{i}/{{**}}\", \"/\"]}}}}]\n"
        ));
    }
    apply(&on_mesh, &yaml);
    assert_eq!(
        one_call(client.outbound_proxy).await,
        200,
        "the rules must admit the client"
    );
    let idle = rss_kib(echo.sidecar_pid);
    let with_rules = measure(&on_mesh, seconds).await;
    let after = rss_kib(echo.sidecar_pid);
    println!("destination sidecar with 50 AuthorizationPolicies (1 rule each):");
    println!(
        "  RSS {:.1} MiB before the policies, {:.1} MiB with them idle, {:.1} MiB after {seconds}s at {RATE} req/s",
        before as f64 / 1024.0,
        idle as f64 / 1024.0,
        after as f64 / 1024.0
    );
    println!(
        "  added latency p50 {:+.3} ms, p90 {:+.3} ms, p99 {:+.3} ms ({} errors)",
        with_rules.added(0.5),
        with_rules.added(0.9),
        with_rules.added(0.99),
        with_rules.errors
    );
    for (key, kib) in [("before", before), ("idle", idle), ("after_load", after)] {
        figures.add(&format!("authz_50.rss_{key}"), kib as f64 / 1024.0, "MiB");
    }
    for (q, name) in [(0.5, "p50"), (0.9, "p90"), (0.99, "p99")] {
        figures.add(&format!("authz_50.added_{name}"), with_rules.added(q), "ms");
    }
    figures.add("authz_50.errors", with_rules.errors as f64, "requests");
    figures.write();
}
