//! HTTPRoutes (Gateway API, GAMMA) enforced by the calling sidecars: a route file written to a
//! controller shapes calls from that cluster within a second: weighted split across clusters,
//! header-matched canary, response header filter. A bad route is reported on its status with
//! the field and keeps its last good version serving, and other routes are untouched.
//! (Clusterset-wide distribution and `strait apply`: `policy.rs`.)

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use multicluster_tests::{get_with, Mesh};

const GREETER: &str = "http://greeter.demo.svc.clusterset.local/";

/// One GET through a sidecar's explicit proxy; returns status, the `x-route` response header
/// and the service that answered.
async fn call(proxy: SocketAddr, url: &str, headers: &[(&str, &str)]) -> (u16, Option<String>, String) {
    let a = get_with(proxy, url, headers).await.unwrap();
    (a.status, a.header("x-route"), a.service())
}

const SPLIT: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: greeter-split, namespace: demo}
spec:
  parentRefs: [{group: multicluster.x-k8s.io, kind: ServiceImport, name: greeter}]
  rules:
    - name: canary
      matches: [{headers: [{name: x-canary, value: "1"}]}]
      filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-route, value: canary}]}}]
      backendRefs: [{group: multicluster.x-k8s.io, kind: ServiceImport, name: echo, port: 80}]
    - name: split
      backendRefs:
        - {group: multicluster.x-k8s.io, kind: ServiceImport, name: greeter, port: 80, weight: 90}
        - {group: multicluster.x-k8s.io, kind: ServiceImport, name: echo, port: 80, weight: 10}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_splits_and_matches_and_a_bad_one_keeps_its_last_good_version() {
    let mesh = Mesh::start().await.unwrap();
    let east = mesh.cluster("east").clone();
    let caller = mesh.workload("echo", "us-east-1a").outbound_proxy;
    let dir = east
        .controller
        .routes_dir
        .clone()
        .expect("strait up reports the routes directory");
    let written = Instant::now();
    std::fs::write(dir.join("greeter.yaml"), SPLIT).unwrap();
    // The first request shaped by the route.
    loop {
        let (_, route, _) = call(caller, GREETER, &[("x-canary", "1")]).await;
        if route.as_deref() == Some("canary") {
            break;
        }
        assert!(written.elapsed() < Duration::from_secs(10), "the route was not applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "route applied: first shaped request {:?} after the file was written",
        written.elapsed()
    );

    // Header match: every canary call goes to echo, with the response filter's header.
    for _ in 0..20 {
        let (code, route, service) = call(caller, GREETER, &[("x-canary", "1")]).await;
        assert_eq!(
            (code, route.as_deref(), service.as_str()),
            (200, Some("canary"), "echo")
        );
    }
    // Weighted split: 90/10 within ±3 % over 2,000 calls.
    let mut greeter = 0;
    for _ in 0..2000 {
        let (code, route, service) = call(caller, GREETER, &[]).await;
        assert_eq!(code, 200);
        assert_eq!(route, None, "only the canary rule sets x-route");
        greeter += usize::from(service == "greeter");
    }
    println!("split 90/10: {greeter} of 2000 calls went to greeter");
    assert!((1740..=1860).contains(&greeter), "{greeter} of 2000 to greeter");

    // A bad version (backendRequest longer than request) is refused with its field; the last
    // good version keeps serving; a second, valid route elsewhere is unaffected.
    let bad = SPLIT.replace(
        "    - name: split\n",
        "    - name: split\n      timeouts: {request: 1s, backendRequest: 2s}\n",
    );
    std::fs::write(dir.join("greeter.yaml"), bad).unwrap();
    let admin = east.controller.admin_addr;
    Mesh::eventually("the bad version is reported", Duration::from_secs(10), || async move {
        let v = Mesh::admin_json(admin, "/routes").await.unwrap_or_default();
        v.to_string().contains("rules[1].timeouts.backendRequest")
    })
    .await
    .unwrap();
    let v = Mesh::admin_json(admin, "/routes").await.unwrap();
    let route = &v["routes"][0];
    assert_eq!(route["serving"], true, "{v}");
    let accepted = route["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Accepted")
        .unwrap();
    assert_eq!(accepted["status"], "False", "{v}");
    assert!(
        accepted["message"]
            .as_str()
            .unwrap()
            .contains("last good version keeps serving"),
        "{v}"
    );
    let (_, route, service) = call(caller, GREETER, &[("x-canary", "1")]).await;
    assert_eq!(
        (route.as_deref(), service.as_str()),
        (Some("canary"), "echo"),
        "the last good version serves"
    );
    // The operator sees it with the CLI too.
    let out = std::process::Command::new(multicluster_tests::strait_bin())
        .args(["get", "routes", "--controller", &admin.to_string()])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    assert!(table.starts_with("KIND       NAMESPACE  NAME"), "{table}");
    assert!(
        table.contains("greeter-split") && table.contains("False (UnsupportedValue)") && table.contains("0/3 clusters"),
        "{table}"
    );

    // Removing the file removes the route: greeter answers for itself again.
    std::fs::remove_file(dir.join("greeter.yaml")).unwrap();
    Mesh::eventually("the route is gone", Duration::from_secs(10), || async move {
        let (_, route, service) = call(caller, GREETER, &[("x-canary", "1")]).await;
        route.is_none() && service == "greeter"
    })
    .await
    .unwrap();
}

const TIMEOUTS: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo-resilience, namespace: demo}
spec:
  parentRefs: [{group: multicluster.x-k8s.io, kind: ServiceImport, name: echo}]
  rules:
    - name: per-try
      matches: [{path: {type: PathPrefix, value: /delay}, headers: [{name: x-test, value: per-try}]}]
      timeouts: {request: 5s, backendRequest: 300ms}
      backendRefs: [{group: multicluster.x-k8s.io, kind: ServiceImport, name: echo, port: 80}]
    - name: whole
      matches: [{path: {type: PathPrefix, value: /delay}, headers: [{name: x-test, value: whole}]}]
      timeouts: {request: 500ms}
      backendRefs: [{group: multicluster.x-k8s.io, kind: ServiceImport, name: echo, port: 80}]
    - name: retry-503
      matches: [{path: {type: PathPrefix, value: /status}}]
      retry: {codes: [503], attempts: 2, backoff: 100ms}
      backendRefs: [{group: multicluster.x-k8s.io, kind: ServiceImport, name: echo, port: 80}]
    - backendRefs: [{group: multicluster.x-k8s.io, kind: ServiceImport, name: echo, port: 80}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_timeouts_and_retries_on_status_codes() {
    let mesh = Mesh::start().await.unwrap();
    let east = mesh.cluster("east").clone();
    let caller = mesh.workload("echo", "us-east-1a").clone();
    let dir = east.controller.routes_dir.clone().unwrap();
    std::fs::write(dir.join("echo.yaml"), TIMEOUTS).unwrap();
    let proxy = caller.outbound_proxy;
    Mesh::eventually("the route is applied", Duration::from_secs(10), || async move {
        let (code, _, _) = call(
            proxy,
            "http://echo.demo.svc.clusterset.local/delay/2000",
            &[("x-test", "whole")],
        )
        .await;
        code == 504
    })
    .await
    .unwrap();
    // The whole call is cut at timeouts.request.
    let (code, _, body) = call(
        proxy,
        "http://echo.demo.svc.clusterset.local/delay/2000",
        &[("x-test", "whole")],
    )
    .await;
    assert_eq!(code, 504, "{body}");
    assert!(body.contains("request timeout"), "{body}");
    // Each attempt is cut at timeouts.backendRequest and retried on the next endpoint (GET is
    // idempotent); all three are slow, so the caller gets 504 naming the per-try timeout.
    let before = multicluster_tests::scrape(caller.admin_addr).await.unwrap();
    let (code, _, body) = call(
        proxy,
        "http://echo.demo.svc.clusterset.local/delay/2000",
        &[("x-test", "per-try")],
    )
    .await;
    assert_eq!(code, 504, "{body}");
    assert!(body.contains("per-try timeout"), "{body}");
    // A fast enough answer passes.
    let (code, _, service) = call(
        proxy,
        "http://echo.demo.svc.clusterset.local/delay/50",
        &[("x-test", "per-try")],
    )
    .await;
    assert_eq!((code, service.as_str()), (200, "echo"));
    // retry.codes: a 503 is retried on other endpoints, twice; the last answer is returned.
    let started = Instant::now();
    let (code, _, body) = call(proxy, "http://echo.demo.svc.clusterset.local/status/503", &[]).await;
    assert_eq!(code, 503, "{body}");
    // Backoff 100 ms, then 200 ms: a lower bound only.
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    let after = multicluster_tests::scrape(caller.admin_addr).await.unwrap();
    let retries = |m: &str| {
        multicluster_tests::metric_sum(
            m,
            "strait_upstream_retries_total",
            &[("destination_service", "echo.demo.svc.clusterset.local")],
        )
    };
    assert!(
        retries(&after) - retries(&before) >= 4.0,
        "per-try timeouts (2) and status retries (2) are retries: {} → {}",
        retries(&before),
        retries(&after)
    );
}
