//! Visibility, end to end: Istio's standard metrics scraped by a real Prometheus (Debian's
//! `prometheus`, started here) from a running three-cluster mesh, and read back with the PromQL
//! Kiali's graph runs — traffic edges grouped by Kiali's labels, error rate, p95 of 2xx, the
//! mTLS share — so an Istio user's dashboards work unchanged. Then traces: one trace across
//! sidecar, gateway and sidecar in a real Jaeger (OTLP/HTTP), W3C and B3 callers, sampling
//! decisions honoured, and access logs naming the same trace on every hop.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::time::Duration;

use multicluster_tests::jaeger::{self, parent, tag, Jaeger};
use multicluster_tests::prometheus::{value, Prometheus};
use multicluster_tests::{connect_tunnel, get_with, grpcurl_hello, Mesh, MeshOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What Kiali's graph groups request edges by (kiali `graph/telemetry/istio`): a series without
/// one of these is dropped from the graph.
const KIALI_GROUP_BY: &str = "source_cluster,source_workload_namespace,source_workload,source_canonical_service,\
source_canonical_revision,destination_cluster,destination_service_namespace,destination_service,\
destination_service_name,destination_workload_namespace,destination_workload,destination_canonical_service,\
destination_canonical_revision,request_protocol,response_code,grpc_response_status,response_flags";

/// Every standard label of `istio_requests_total` (Istio's metrics reference).
const STANDARD_LABELS: [&str; 25] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
];

fn label<'a>(sample: &'a serde_json::Value, name: &str) -> &'a str {
    sample["metric"][name].as_str().unwrap_or_default()
}

/// `strait apply` of `yaml` on `cluster`'s controller, waiting for every proxy.
fn apply(mesh: &Mesh, cluster: &str, yaml: &str) {
    mesh.policy_ok("apply", cluster, "observability-policy", yaml);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_metrics_in_a_real_prometheus_answer_kialis_queries() {
    let mesh = Mesh::start().await.unwrap();
    let mut targets: Vec<_> = mesh
        .info
        .clusters
        .iter()
        .flat_map(|c| c.workloads.iter().map(|w| w.admin_addr))
        .collect();
    targets.extend(mesh.info.clusters.iter().map(|c| c.gateway.admin_addr));
    let prom = Prometheus::start(mesh.info.state_dir.join("prometheus"), &targets)
        .await
        .unwrap();
    Mesh::eventually("prometheus scrapes every proxy", Duration::from_secs(20), || {
        prom.all_up()
    })
    .await
    .unwrap();

    // Traffic: HTTP across clusters (east → greeter in west), gRPC across clusters, TCP across
    // clusters (east → ledger in central), and a service whose calls all fail (an injected 503).
    // Each in two rounds a few scrapes apart: a counter's first sample gives no rate.
    let east = mesh.workload("echo", "us-east-1a");
    let http_and_grpc = || async {
        for i in 0..10 {
            let a = get_with(
                east.outbound_proxy,
                &format!("http://greeter.demo.svc.clusterset.local/hello/{i}"),
                &[],
            )
            .await
            .unwrap();
            assert_eq!(a.status, 200);
        }
        let (ok, out) = grpcurl_hello(east.outbound_proxy, "metrics", &[]);
        assert!(ok, "{out}");
    };
    http_and_grpc().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    http_and_grpc().await;
    let mut tunnel = connect_tunnel(east.outbound_proxy, "ledger.demo.svc.clusterset.local:7000")
        .await
        .unwrap();
    tunnel.write_all(&[7u8; 10_000]).await.unwrap();
    tunnel.shutdown().await.unwrap();
    let mut echoed = vec![];
    tokio::time::timeout(Duration::from_secs(10), tunnel.read_to_end(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(echoed.len(), 10_000);
    apply(
        &mesh,
        "west",
        r#"
apiVersion: policy.strait.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: echo-broken, namespace: demo}
spec:
  targetRefs: [{group: multicluster.x-k8s.io, kind: ServiceImport, name: echo}]
  fault: {abort: {httpStatus: 503, percentage: 100}}
"#,
    );
    for round in 0..2 {
        if round == 1 {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        for _ in 0..5 {
            let a = get_with(east.outbound_proxy, "http://echo.demo.svc.clusterset.local/", &[])
                .await
                .unwrap();
            assert_eq!(a.status, 503);
        }
    }

    // Kiali's edge query: the cross-cluster edge, with both clusters, as the caller reports it.
    let edges = format!("sum(rate(istio_requests_total{{reporter=\"source\"}}[1m])) by ({KIALI_GROUP_BY})");
    let has_edges = |found: &[serde_json::Value]| {
        found.iter().any(|e| {
            label(e, "destination_service_name") == "greeter"
                && label(e, "request_protocol") == "grpc"
                && value(e) > 0.0
        }) && found.iter().any(|e| {
            label(e, "destination_service_name") == "echo" && label(e, "response_flags") == "FI" && value(e) > 0.0
        })
    };
    let _ = Mesh::eventually(
        "the cross-cluster edge in Prometheus",
        Duration::from_secs(30),
        || async { has_edges(&prom.query(&edges).await.unwrap_or_default()) },
    )
    .await;
    let found = prom.query(&edges).await.unwrap();
    assert!(has_edges(&found), "edges missing: {found:#?}");
    let cross = found
        .iter()
        .find(|e| label(e, "destination_service_name") == "greeter" && label(e, "request_protocol") == "http")
        .unwrap_or_else(|| panic!("no HTTP edge to greeter: {found:#?}"));
    for (k, v) in [
        ("source_cluster", "east"),
        ("destination_cluster", "west"),
        ("source_workload", "echo-us-east-1a"),
        ("source_workload_namespace", "demo"),
        ("source_canonical_service", "echo"),
        ("destination_workload", "greeter-us-west-2a"),
        ("destination_canonical_service", "greeter"),
        ("destination_service", "greeter.demo.svc.clusterset.local"),
        ("destination_service_namespace", "demo"),
        ("response_code", "200"),
        ("response_flags", "-"),
    ] {
        assert_eq!(label(cross, k), v, "{k} on {cross:#}");
    }
    // Every edge has every label Kiali groups by (gRPC status only on gRPC, as in Istio).
    for e in &found {
        for k in KIALI_GROUP_BY.split(',') {
            let http = label(e, "request_protocol") == "http";
            if k == "grpc_response_status" && http {
                continue;
            }
            assert!(!label(e, k).is_empty(), "edge without {k}: {e:#}");
        }
    }
    let grpc = found.iter().find(|e| label(e, "request_protocol") == "grpc").unwrap();
    assert_eq!(label(grpc, "grpc_response_status"), "0", "{grpc:#}");
    assert_eq!(label(grpc, "destination_cluster"), "west", "{grpc:#}");

    // Every raw series of the family has all 25 standard labels, `unknown` where unknown.
    let raw = prom.query("istio_requests_total").await.unwrap();
    assert!(raw.len() >= 4, "{raw:#?}");
    for s in &raw {
        for k in STANDARD_LABELS {
            if k == "grpc_response_status" && label(s, "request_protocol") == "http" {
                continue;
            }
            assert!(!label(s, k).is_empty(), "series without {k}: {s:#}");
        }
    }
    // The destination side of the same edge: reported in west, mTLS verified, same clusters.
    let inbound = prom
        .query(&format!(
            "sum(rate(istio_requests_total{{reporter=\"destination\",destination_service_name=\"greeter\"}}[1m])) by ({KIALI_GROUP_BY},source_principal,connection_security_policy)"
        ))
        .await
        .unwrap();
    let http_in = inbound
        .iter()
        .find(|e| label(e, "request_protocol") == "http")
        .unwrap_or_else(|| panic!("{inbound:#?}"));
    assert_eq!(label(http_in, "source_cluster"), "east");
    assert_eq!(label(http_in, "source_workload"), "echo-us-east-1a");
    assert_eq!(
        label(http_in, "source_principal"),
        "spiffe://mesh.local/ns/demo/sa/echo"
    );
    assert_eq!(label(http_in, "connection_security_policy"), "mutual_tls");

    // Error rate (5xx over all, per destination service), as Kiali's health computes it.
    let errors = prom
        .query(
            "sum(rate(istio_requests_total{reporter=\"source\",response_code=~\"5..\"}[1m])) by (destination_service_name) \
             / sum(rate(istio_requests_total{reporter=\"source\"}[1m])) by (destination_service_name)",
        )
        .await
        .unwrap();
    let echo_errors = errors
        .iter()
        .find(|e| label(e, "destination_service_name") == "echo")
        .map(value);
    assert_eq!(echo_errors, Some(1.0), "{errors:#?}");
    assert!(
        !errors.iter().any(|e| label(e, "destination_service_name") == "greeter"),
        "greeter had no 5xx: {errors:#?}"
    );

    // p95 of successful requests on the edge (Kiali's response-time query) is a real number
    // within Envoy's buckets; there are exactly Envoy's 19 buckets plus +Inf.
    let p95 = prom
        .query(
            "histogram_quantile(0.95, sum(rate(istio_request_duration_milliseconds_bucket{reporter=\"source\",\
             response_code=~\"2[0-9]{2}\",grpc_response_status=~\"^$|0\"}[1m])) by (le,source_cluster,destination_cluster,destination_service_name))",
        )
        .await
        .unwrap();
    let greeter_p95 = p95
        .iter()
        .find(|e| label(e, "destination_service_name") == "greeter")
        .map(value)
        .unwrap_or(f64::NAN);
    assert!(greeter_p95 > 0.0 && greeter_p95 <= 3_600_000.0, "{p95:#?}");
    let buckets = prom
        .query("count(count by (le) (istio_request_duration_milliseconds_bucket))")
        .await
        .unwrap();
    assert_eq!(buckets.first().map(value), Some(20.0), "{buckets:#?}");

    // The mTLS share of the edge (Kiali's padlock): every request the destination saw.
    let mtls = prom
        .query(
            "sum(rate(istio_requests_total{reporter=\"destination\",connection_security_policy=\"mutual_tls\"}[1m])) by (destination_service_name) \
             / sum(rate(istio_requests_total{reporter=\"destination\"}[1m])) by (destination_service_name)",
        )
        .await
        .unwrap();
    let greeter_mtls = mtls
        .iter()
        .find(|e| label(e, "destination_service_name") == "greeter")
        .map(value);
    assert_eq!(greeter_mtls, Some(1.0), "{mtls:#?}");

    // gRPC messages both ways, and request/response sizes for throughput.
    let messages = prom
        .query("sum(istio_request_messages_total{request_protocol=\"grpc\"}) + sum(istio_response_messages_total{request_protocol=\"grpc\"})")
        .await
        .unwrap();
    assert!(messages.first().map(value).unwrap_or_default() >= 4.0, "{messages:#?}");
    let bytes = prom
        .query("sum(istio_response_bytes_sum{reporter=\"source\",destination_service_name=\"greeter\"})")
        .await
        .unwrap();
    assert!(bytes.first().map(value).unwrap_or_default() > 0.0, "{bytes:#?}");

    // TCP edges (Kiali's TCP graph reads istio_tcp_sent_bytes_total): the caller's, and the
    // gateway's hop into central, which reports as a source in its own cluster.
    let tcp = prom
        .query(
            "sum(istio_tcp_sent_bytes_total{destination_service_name=\"ledger\"}) by (reporter,source_workload,source_cluster,destination_cluster)",
        )
        .await
        .unwrap();
    let sent_by = |workload: &str| {
        tcp.iter()
            .find(|e| label(e, "source_workload") == workload && label(e, "reporter") == "source")
            .map(|e| (value(e), label(e, "source_cluster").to_string()))
    };
    assert_eq!(sent_by("echo-us-east-1a"), Some((10_000.0, "east".into())), "{tcp:#?}");
    let (gateway_bytes, gateway_cluster) = sent_by("gateway-central").unwrap_or_else(|| panic!("{tcp:#?}"));
    assert!(gateway_bytes >= 10_000.0, "{tcp:#?}");
    assert_eq!(gateway_cluster, "central");

    // deploy/observability: every query of the Grafana dashboard runs in this Prometheus (its
    // variables set to "all clusters"), and the ones this traffic feeds answer with data.
    let dir = multicluster_tests::repo_dir().join("deploy/observability");
    let dir = dir.display();
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{dir}/grafana-strait-clusterset.json")).unwrap())
            .unwrap();
    let mut answered = std::collections::BTreeMap::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap().to_string();
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
                .replace("$cluster", ".*");
            let result = prom
                .query(&expr)
                .await
                .unwrap_or_else(|e| panic!("panel {title:?}: {e}"));
            *answered.entry(title.clone()).or_insert(0) += result.len();
        }
    }
    for title in [
        "Requests/s (all clusters)",
        "Success rate (non-5xx)",
        "Error rate (5xx and gRPC failures)",
        "mTLS share (destination-verified)",
        "Traffic between clusters",
        "Latency p50 / p90 / p99 by service (caller's view)",
        "Proxy-made failures by response flag",
        "gRPC by status",
        "TCP bytes/s by service",
    ] {
        assert!(
            answered.get(title).copied().unwrap_or(0) > 0,
            "panel {title:?} has no data: {answered:?}"
        );
    }
    // Its scrape configuration for `strait up` is one Prometheus accepts.
    let check = std::process::Command::new("promtool")
        .args(["check", "config", &format!("{dir}/prometheus-strait-up.yaml")])
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
}

/// The access log lines (JSON) of a component's log file.
fn access_log(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("start_time").is_some())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_crosses_clusters_in_jaeger_and_every_hop_logs_it() {
    let dir = multicluster_tests::Scratch::temp("jaeger");
    let jaeger = Jaeger::start(dir.path()).await.unwrap();
    let mesh = Mesh::start_with(MeshOptions {
        extra_args: [
            "--otlp-endpoint",
            jaeger::OTLP_ENDPOINT,
            "--trace-sampling",
            "0",
            "--access-log",
            "json",
        ]
        .map(String::from)
        .to_vec(),
        ..Default::default()
    })
    .await
    .unwrap();
    let east = mesh.workload("echo", "us-east-1a");
    let greeter = mesh.workload("greeter", "us-west-2a");

    // The app's own span (W3C, sampled): the first call from east to greeter, so it also opens
    // the tunnel through west's gateway.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let app_span = "00f067aa0ba902b7";
    let a = get_with(
        east.outbound_proxy,
        "http://greeter.demo.svc.clusterset.local/traced",
        &[
            ("traceparent", &format!("00-{trace_id}-{app_span}-01")),
            ("tracestate", "app=1"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200);
    let mut spans = vec![];
    for _ in 0..100 {
        spans = jaeger.trace(trace_id).await;
        if spans.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let find = |service: &str| {
        spans
            .iter()
            .find(|s| s["serviceName"] == service)
            .unwrap_or_else(|| panic!("no span from {service}: {spans:#?}"))
            .clone()
    };
    let client = find("echo.demo");
    let gateway = find("gateway-west.strait-system");
    let server = find("greeter.demo");
    assert_eq!(spans.len(), 3, "{spans:#?}");
    let client_id = client["spanID"].as_str().unwrap().to_string();
    assert_eq!(parent(&client), app_span, "the client span continues the app's");
    assert_eq!(tag(&client, "span.kind"), "client");
    assert_eq!(parent(&gateway), client_id, "{gateway:#}");
    assert_eq!(parent(&server), client_id, "{server:#}");
    assert_eq!(tag(&server, "span.kind"), "server");
    for (span, status) in [(&client, "200"), (&server, "200")] {
        assert_eq!(tag(span, "http.status_code"), status);
        assert_eq!(tag(span, "strait.source_cluster"), "east");
        assert_eq!(tag(span, "strait.destination_cluster"), "west");
    }
    assert_eq!(
        tag(&client, "strait.destination_principal"),
        "spiffe://mesh.local/ns/demo/sa/greeter"
    );
    assert_eq!(
        tag(&server, "strait.source_principal"),
        "spiffe://mesh.local/ns/demo/sa/echo"
    );
    assert_eq!(tag(&gateway, "strait.source_cluster"), "east");
    assert_eq!(tag(&gateway, "strait.destination_workload"), "greeter-us-west-2a");

    // Both sidecars logged the request with the trace id, both clusters, the peer and the same
    // generated x-request-id.
    let wait_logs = || async {
        for _ in 0..50 {
            let out = access_log(&east.sidecar_log);
            let inn = access_log(&greeter.sidecar_log);
            if out.iter().any(|e| e["path"] == "/traced") && inn.iter().any(|e| e["path"] == "/traced") {
                return (out, inn);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no access log lines for /traced");
    };
    let (out, inn) = wait_logs().await;
    let o = out.iter().find(|e| e["path"] == "/traced").unwrap();
    let i = inn.iter().find(|e| e["path"] == "/traced").unwrap();
    for e in [o, i] {
        assert_eq!(e["trace_id"], trace_id, "{e}");
        assert_eq!(e["source_cluster"], "east", "{e}");
        assert_eq!(e["destination_cluster"], "west", "{e}");
        assert_eq!(e["response_code"], 200, "{e}");
        assert_eq!(e["response_flags"], "-", "{e}");
    }
    assert_eq!(o["upstream_cluster"], "outbound|80||greeter.demo.svc.clusterset.local");
    assert_eq!(o["peer_principal"], "spiffe://mesh.local/ns/demo/sa/greeter");
    assert_eq!(i["peer_principal"], "spiffe://mesh.local/ns/demo/sa/echo");
    let request_id = o["request_id"].as_str().unwrap();
    assert_eq!(request_id.len(), 36, "a generated UUID: {o}");
    assert_eq!(i["request_id"], request_id, "one id across the hops");

    // B3 (single header) callers join their trace too.
    let b3_trace = "80f198ee56343ba864fe8b2a57d3eff7";
    let a = get_with(
        east.outbound_proxy,
        "http://greeter.demo.svc.clusterset.local/b3",
        &[("b3", &format!("{b3_trace}-e457b5a2e4d86bd1-1"))],
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200);
    // An unsampled caller is honoured: nothing is exported for its trace. A malformed header
    // is dropped, never fatal (the call works, under a new trace id).
    let unsampled = "11111111111111111111111111111111";
    for tp in [
        format!("00-{unsampled}-2222222222222222-00"),
        "00-zz-not-a-trace-01".to_string(),
    ] {
        let a = get_with(
            east.outbound_proxy,
            "http://greeter.demo.svc.clusterset.local/unsampled",
            &[("traceparent", &tp)],
        )
        .await
        .unwrap();
        assert_eq!(a.status, 200);
    }
    // Per service: a TrafficPolicy samples every new trace of echo (the mesh samples none).
    apply(
        &mesh,
        "east",
        r#"
apiVersion: policy.strait.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: echo-traced, namespace: demo}
spec:
  targetRefs: [{group: multicluster.x-k8s.io, kind: ServiceImport, name: echo}]
  tracing: {randomSamplingPercentage: 100}
"#,
    );
    let a = get_with(
        east.outbound_proxy,
        "http://echo.demo.svc.clusterset.local/policy-sampled",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200);

    let mut b3_spans = vec![];
    for _ in 0..50 {
        b3_spans = jaeger.trace(b3_trace).await;
        if b3_spans.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let b3_client = b3_spans
        .iter()
        .find(|s| s["serviceName"] == "echo.demo")
        .unwrap_or_else(|| panic!("{b3_spans:#?}"));
    assert_eq!(parent(b3_client), "e457b5a2e4d86bd1");
    let logged = wait_for_entry(&east.sidecar_log, "/policy-sampled").await;
    let sampled_by_policy = logged["trace_id"].as_str().unwrap().to_string();
    let mut policy_spans = vec![];
    for _ in 0..50 {
        policy_spans = jaeger.trace(&sampled_by_policy).await;
        if !policy_spans.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        !policy_spans.is_empty(),
        "the TrafficPolicy's sampling exported trace {sampled_by_policy}"
    );
    // By now the unsampled trace would have been exported with the others; it was not.
    assert!(
        jaeger.trace(unsampled).await.is_empty(),
        "an unsampled caller's trace was exported"
    );
    let malformed = access_log(&east.sidecar_log)
        .into_iter()
        .filter(|e| e["path"] == "/unsampled")
        .map(|e| e["trace_id"].as_str().unwrap_or_default().to_string())
        .collect::<Vec<_>>();
    assert_eq!(malformed.len(), 2, "{malformed:?}");
    assert_eq!(malformed[0], unsampled);
    assert!(malformed[1].len() == 32 && malformed[1] != unsampled, "{malformed:?}");
    // A TCP connection is logged once it closes, with its bytes.
    let mut tunnel = connect_tunnel(east.outbound_proxy, "ledger.demo.svc.clusterset.local:7000")
        .await
        .unwrap();
    tunnel.write_all(b"ledger-line").await.unwrap();
    tunnel.shutdown().await.unwrap();
    let mut echoed = vec![];
    let _ = tokio::time::timeout(Duration::from_secs(10), tunnel.read_to_end(&mut echoed)).await;
    drop(tunnel);
    let mut tcp_entry = None;
    for _ in 0..50 {
        tcp_entry = access_log(&east.sidecar_log)
            .into_iter()
            .find(|e| e["upstream_cluster"] == "outbound|7000||ledger.demo.svc.clusterset.local");
        if tcp_entry.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tcp_entry = tcp_entry.expect("a TCP access log entry");
    assert_eq!(tcp_entry["bytes_received"], 11, "{tcp_entry}");
    assert_eq!(tcp_entry["bytes_sent"], 11, "{tcp_entry}");
    assert_eq!(tcp_entry["destination_cluster"], "central", "{tcp_entry}");
    assert_eq!(tcp_entry["method"], serde_json::Value::Null, "{tcp_entry}");

    // A request an HTTPRoute routed names it (and its rule) in the caller's log line.
    apply(
        &mesh,
        "east",
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: greeter-logged, namespace: demo}
spec:
  parentRefs: [{group: multicluster.x-k8s.io, kind: ServiceImport, name: greeter}]
  rules:
    - name: everything
      backendRefs: [{group: multicluster.x-k8s.io, kind: ServiceImport, name: greeter, port: 80}]
"#,
    );
    let a = get_with(
        east.outbound_proxy,
        "http://greeter.demo.svc.clusterset.local/routed",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200);
    let routed = wait_for_entry(&east.sidecar_log, "/routed").await;
    assert_eq!(routed["route_name"], "demo/greeter-logged/everything", "{routed}");

    // Nothing was dropped on the way.
    let metrics = multicluster_tests::scrape(east.admin_addr).await.unwrap();
    assert_eq!(
        multicluster_tests::metric_sum(&metrics, "strait_tracing_spans_dropped_total", &[]),
        0.0
    );
    assert!(multicluster_tests::metric_sum(&metrics, "strait_tracing_spans_total", &[("result", "exported")]) >= 2.0);
}

async fn wait_for_entry(log: &std::path::Path, path: &str) -> serde_json::Value {
    for _ in 0..50 {
        if let Some(e) = access_log(log).into_iter().find(|e| e["path"] == path) {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no access log entry for {path} in {}", log.display());
}

#[test]
fn a_sampling_rate_outside_0_to_100_is_refused_before_anything_starts() {
    let out = std::process::Command::new(multicluster_tests::strait_bin())
        .args(["up", "--trace-sampling", "150"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--trace-sampling") && err.contains("not a percentage from 0 to 100"),
        "{err}"
    );
    assert!(!err.contains("starting"), "processes were started: {err}");
}
