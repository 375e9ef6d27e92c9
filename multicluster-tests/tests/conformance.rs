//! Conformance measured by tools nobody here wrote, through transparent interception in
//! network namespaces (`strait up --netns`, needs root): the grpc-go interop client against the
//! grpc-go interop server, both run as `strait up` workloads (the topology's `command`), in one
//! cluster and across clusters; and h2spec against the transparent outbound listener (h2c prior
//! knowledge to a ClusterSet IP) and the HTTP/2 side of the explicit listener; and a
//! WebSocket client (tokio-tungstenite) echoing across clusters through interception. test.sh builds
//! the tools from the Go module proxy and passes their paths in STRAIT_GRPC_INTEROP_SERVER,
//! STRAIT_GRPC_INTEROP_CLIENT and STRAIT_H2SPEC.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::process::Command;
use std::time::Duration;

use multicluster_tests::{Mesh, MeshOptions};

const CASES: &[&str] = &[
    "empty_unary",
    "large_unary",
    "client_streaming",
    "server_streaming",
    "ping_pong",
    "empty_stream",
    "timeout_on_sleeping_server",
    "cancel_after_begin",
    "cancel_after_first_response",
    "status_code_and_message",
    "special_status_message",
    "custom_metadata",
    "unimplemented_method",
    "unimplemented_service",
];

fn tool(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set: run the tests with ./test.sh, which builds it"))
}

/// A shell script that waits for the server to answer through the mesh, then runs every case
/// once and stops at the first failure.
fn client_script(client: &str) -> String {
    let target = "--server_host=interop.demo.svc.clusterset.local --server_port=8080";
    format!(
        "i=0; until {client} {target} --test_case=empty_unary >/dev/null 2>&1; do i=$((i+1)); \
         [ $i -ge 90 ] && echo 'server never answered' && exit 2; sleep 1; done; \
         for t in {cases}; do {client} {target} --test_case=$t || {{ echo \"FAIL $t\"; exit 1; }}; echo \"PASS $t\"; done",
        cases = CASES.join(" ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_interop_and_h2spec_pass_through_interception() {
    let server = tool("STRAIT_GRPC_INTEROP_SERVER");
    let client = tool("STRAIT_GRPC_INTEROP_CLIENT");
    let h2spec = tool("STRAIT_H2SPEC");
    let script = client_script(&client);
    let topology = format!(
        r#"
services:
  - {{name: interop, port: 8080, protocol: grpc}}
  - {{name: runner, port: 80, protocol: http}}
  - {{name: web, port: 80, protocol: http}}
clusters:
  - name: east
    region: us-east
    zones: [us-east-1a]
    workloads:
      - {{service: interop, zone: us-east-1a, command: [{server}, --port=8080]}}
      - {{service: runner, zone: us-east-1a, name: same-cluster-client, command: [sh, -c, {script:?}]}}
  - name: west
    region: us-west
    zones: [us-west-2a]
    workloads:
      - {{service: runner, zone: us-west-2a, name: cross-cluster-client, command: [sh, -c, {script:?}]}}
      - {{service: web, zone: us-west-2a}}
"#
    );
    let mut mesh = Mesh::start_with(MeshOptions {
        netns: true,
        topology: Some(topology),
        ..Default::default()
    })
    .await
    .unwrap();

    // Both interop clients run to the end: one event each, with its exit status.
    let mut results = vec![];
    while results.len() < 2 {
        let event = mesh.next_event(Duration::from_secs(240)).await.unwrap();
        if event["event"] != "exited" {
            continue;
        }
        let log = std::fs::read_to_string(event["log"].as_str().unwrap()).unwrap_or_default();
        let passed: Vec<&str> = log.lines().filter_map(|l| l.strip_prefix("PASS ")).collect();
        println!(
            "grpc interop, {}: {} of {} passed",
            event["workload"].as_str().unwrap(),
            passed.len(),
            CASES.len()
        );
        results.push((
            event["workload"].as_str().unwrap().to_string(),
            event["success"] == true,
            passed.len(),
            log,
        ));
    }
    for (workload, ok, passed, log) in &results {
        assert!(
            *ok && *passed == CASES.len(),
            "{workload}: {passed}/{} passed\n{log}",
            CASES.len()
        );
    }

    // A WebSocket client (tokio-tungstenite) in east's namespace, unmodified: its connection to
    // web's ClusterSet IP is intercepted, upgraded, and echoed both ways by west's app.
    let client_ns = mesh.cluster("east").workloads[1].netns.clone().unwrap();
    let out = Command::new("ip")
        .args(["netns", "exec", &client_ns, env!("CARGO_BIN_EXE_ws-client")])
        .args(["ws://web.demo.svc.clusterset.local/ws", "50"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "WebSocket through interception: {text}");
    assert!(text.contains("greeting: hello from web-us-west-2a"), "{text}");
    println!(
        "WebSocket through interception across clusters: {}",
        text.trim().replace('\n', "; ")
    );

    // h2spec, HTTP/2 with prior knowledge: to a ClusterSet IP through interception (west's
    // web, across clusters), and to the explicit listener's HTTP/2 side.
    let east_ns = mesh.cluster("east").workloads[1].netns.clone().unwrap();
    for (what, host, port) in [
        ("transparent listener", "web.demo.svc.clusterset.local", "80"),
        ("explicit listener", "127.0.0.1", "15001"),
    ] {
        let out = Command::new("ip")
            .args(["netns", "exec", &east_ns, &h2spec, "-h", host, "-p", port, "-o", "5"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let summary = text
            .lines()
            .rev()
            .find(|l| l.contains("tests,") && l.contains("passed"))
            .unwrap_or("no summary")
            .trim()
            .to_string();
        println!("h2spec against the {what}: {summary}");
        assert!(
            summary.contains(" 0 failed"),
            "h2spec against the {what}: {summary}\n{text}"
        );
    }
}
