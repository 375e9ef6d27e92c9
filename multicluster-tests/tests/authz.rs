//! Authorization across clusters: AuthorizationPolicies written with `strait apply` in one
//! cluster are enforced by every destination sidecar on the verified peer identity (and the
//! cluster whose CA issued it): deny a cluster, default-deny a namespace then allow one
//! principal and method, designed-out path bypasses, TCP reset, status and counters.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::net::SocketAddr;
use std::time::Duration;

use multicluster_tests::{connect_tunnel, metric_sum, request_with, scrape, Mesh};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ECHO: &str = "http://echo.demo.svc.clusterset.local";
const GREETER: &str = "http://greeter.demo.svc.clusterset.local";

fn apply(mesh: &Mesh, cluster: &str, name: &str, yaml: &str, verb: &str) {
    mesh.policy_ok(verb, cluster, name, yaml);
}

async fn status(proxy: SocketAddr, method: &str, url: &str) -> u16 {
    request_with(proxy, method, url, &[]).await.unwrap().status
}

const DENY_WEST: &str = r#"
apiVersion: policy.strait.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: echo-no-west, namespace: demo}
spec:
  targetRefs: [{group: multicluster.x-k8s.io, kind: ServiceImport, name: echo}]
  action: DENY
  rules: [{from: [{source: {clusters: [west]}}]}]
"#;

const DENY_ADMIN: &str = r#"
apiVersion: policy.strait.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: echo-no-admin, namespace: demo}
spec:
  targetRefs: [{kind: Service, name: echo}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin/{**}"]}}]}]
"#;

const DEFAULT_DENY: &str = r#"
apiVersion: policy.strait.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-by-default, namespace: demo}
spec: {}
"#;

const ALLOW_ECHO_GET: &str = r#"
apiVersion: policy.strait.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: greeter-readers, namespace: demo}
spec:
  targetRefs: [{kind: Service, name: greeter}]
  action: ALLOW
  rules:
    - from: [{source: {principals: ["spiffe://mesh.local/ns/demo/sa/echo"], clusters: [east, central]}}]
      to: [{operation: {methods: [GET], paths: ["/api/{**}"]}}]
"#;

const GREETER_NOT_FROM_EAST: &str = r#"
apiVersion: policy.strait.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: greeter-no-east, namespace: demo}
spec:
  targetRefs: [{kind: Service, name: greeter}]
  action: DENY
  rules: [{from: [{source: {clusters: [east]}}]}]
"#;

const LEDGER_NOT_FROM_EAST: &str = r#"
apiVersion: policy.strait.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: ledger-no-east, namespace: demo}
spec:
  targetRefs: [{kind: Service, name: ledger}]
  action: DENY
  rules: [{from: [{source: {clusters: [east]}}]}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_policies_apply_in_every_cluster_on_verified_identity() {
    let mesh = Mesh::start().await.unwrap();
    let east = mesh.workload("echo", "us-east-1a").outbound_proxy;
    let west = mesh.workload("greeter", "us-west-2a").outbound_proxy;
    let west_echo = mesh.workload("echo", "us-west-2a").clone();
    let central = mesh.workload("ledger", "eu-central-1a").outbound_proxy;
    let root = format!("{ECHO}/");

    // Deny a cluster in one line, written in east: west's callers are refused by every echo
    // sidecar (west's own included); east's and central's are not.
    apply(&mesh, "east", "deny-west", DENY_WEST, "apply");
    let refused = request_with(west, "GET", &root, &[]).await.unwrap();
    assert_eq!(refused.status, 403, "{}", refused.service());
    assert!(
        refused
            .service()
            .contains("RBAC: access denied by demo/echo-no-west rule 0"),
        "{}",
        refused.service()
    );
    assert_eq!(status(east, "GET", &root).await, 200);
    assert_eq!(status(central, "GET", &root).await, 200);
    let text = scrape(west_echo.admin_addr).await.unwrap();
    assert!(
        metric_sum(
            &text,
            "strait_authz_decisions_total",
            &[("policy", "demo/echo-no-west"), ("decision", "deny")]
        ) >= 1.0
    );

    // Paths are normalized once; the decision and the application see the same path, so no
    // spelling of /admin gets through.
    apply(&mesh, "east", "deny-admin", DENY_ADMIN, "apply");
    for bypass in [
        "/admin/x",
        "//admin/x",
        "/admin%2Fx",
        "/admin%5cx",
        "/public/../admin/x",
        "/%61dmin/x",
        "/admin/x?y=1",
    ] {
        assert_eq!(status(east, "GET", &format!("{ECHO}{bypass}")).await, 403, "{bypass}");
    }
    assert_eq!(status(east, "GET", &format!("{ECHO}/a%00b")).await, 400);
    let seen = request_with(east, "GET", &format!("{ECHO}/public//x/./y"), &[])
        .await
        .unwrap();
    assert_eq!(seen.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&seen.body).unwrap();
    assert_eq!(v["path"], "/public/x/y", "the application gets the normalized path");

    // Default-deny for the namespace, then one principal, from two clusters, for GET on /api.
    apply(&mesh, "west", "default-deny", DEFAULT_DENY, "apply");
    assert_eq!(status(east, "GET", &format!("{GREETER}/api/x")).await, 403);
    apply(&mesh, "west", "greeter-readers", ALLOW_ECHO_GET, "apply");
    assert_eq!(
        status(east, "GET", &format!("{GREETER}/api/x")).await,
        200,
        "echo in east, GET /api"
    );
    assert_eq!(status(east, "POST", &format!("{GREETER}/api/x")).await, 403, "not POST");
    assert_eq!(
        status(east, "GET", &format!("{GREETER}/other")).await,
        403,
        "not outside /api"
    );
    assert_eq!(
        status(central, "GET", &format!("{GREETER}/api/x")).await,
        403,
        "ledger is not echo"
    );
    let west_greeter_proxy = mesh.workload("echo", "us-west-2a").outbound_proxy;
    assert_eq!(
        status(west_greeter_proxy, "GET", &format!("{GREETER}/api/x")).await,
        403,
        "echo, but in west"
    );

    // Status: every policy applied in every cluster.
    let admin = mesh.cluster("central").controller.admin_addr.to_string();
    let out = std::process::Command::new(multicluster_tests::strait_bin())
        .args(["get", "policies", "--controller", &admin, "--output", "wide"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    println!("{table}");
    assert_eq!(table.matches("AuthorizationPolicy").count(), 4, "{table}");
    assert_eq!(table.matches("3/3 clusters").count(), 4, "{table}");

    // A cluster cut off in one line: a connection already open to greeter is refused by
    // greeter's sidecar; a new one is refused at west's gateway already, before any byte
    // crosses into west.
    apply(&mesh, "west", "greeter-readers", ALLOW_ECHO_GET, "delete");
    apply(&mesh, "central", "greeter-no-east", GREETER_NOT_FROM_EAST, "apply");
    assert_eq!(status(east, "GET", &format!("{GREETER}/api/x")).await, 403);
    let fresh = mesh.workload("echo", "us-east-1b").outbound_proxy;
    let refused = request_with(fresh, "GET", &format!("{GREETER}/api/x"), &[])
        .await
        .unwrap();
    assert_eq!(refused.status, 403, "{}", refused.service());
    assert!(
        refused.service().contains("at the gateway of cluster west"),
        "{}",
        refused.service()
    );
    let text = scrape(mesh.cluster("west").gateway.admin_addr).await.unwrap();
    assert!(
        metric_sum(
            &text,
            "strait_tunnel_streams_total",
            &[("source_cluster", "east"), ("status", "403")]
        ) >= 1.0
    );
    assert_eq!(
        status(west_greeter_proxy, "GET", &format!("{GREETER}/api/x")).await,
        403,
        "west: default deny still"
    );

    // TCP: denied connections are reset before any byte reaches the application.
    apply(&mesh, "west", "deny-default", DEFAULT_DENY, "delete");
    apply(&mesh, "central", "ledger", LEDGER_NOT_FROM_EAST, "apply");
    let echoes = |proxy: SocketAddr| async move {
        let Ok(mut s) = connect_tunnel(proxy, "ledger.demo.svc.clusterset.local:7000").await else {
            return false;
        };
        if s.write_all(b"ping\n").await.is_err() {
            return false;
        }
        let mut buf = [0u8; 5];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await,
            Ok(Ok(_))
        ) && &buf == b"ping\n"
    };
    assert!(echoes(west).await, "west may reach ledger");
    assert!(!echoes(east).await, "east is cut off from ledger");
}
