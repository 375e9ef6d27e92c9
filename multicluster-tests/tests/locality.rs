//! Locality: traffic stays in the nearest healthy zone, fails over in order as apps die (with a
//! steady load running through every kill), and comes back when they return.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::time::Duration;

use multicluster_tests::{get_via, metric_sum, scrape, LoadReport, Mesh, MeshOptions};

const ECHO: &str = "http://echo.demo.svc.clusterset.local/";

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

fn only(zones: &std::collections::BTreeMap<String, usize>, zone: &str) -> bool {
    !zones.is_empty() && zones.keys().all(|z| z == zone)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_under_load_follows_locality_and_comes_back() {
    let mut mesh = Mesh::start().await.unwrap();
    let caller = mesh.workload("echo", "us-east-1a").clone();
    let a = mesh.workload("echo", "us-east-1a").clone();
    let b = mesh.workload("echo", "us-east-1b").clone();
    let mesh_ref = &mut mesh;
    let report = LoadReport::run(caller.outbound_proxy, ECHO, 50, secs(34.0), |start| async move {
        tokio::time::sleep_until((start + secs(4.0)).into()).await;
        mesh_ref.kill9(a.app_pid);
        tokio::time::sleep_until((start + secs(10.0)).into()).await;
        mesh_ref.kill9(b.app_pid);
        tokio::time::sleep_until((start + secs(16.0)).into()).await;
        mesh_ref.restart(&a.app_command, None).unwrap();
    })
    .await;

    let failures = report.failures();
    eprintln!(
        "{} requests, {} failed: {:?}",
        report.samples.len(),
        failures.len(),
        failures.iter().take(5).collect::<Vec<_>>()
    );
    assert!(report.samples.len() >= 1600);
    // Healthy: everything answered before the kill stays in the caller's zone (a request due
    // just before it and still in flight then may rightly fail over).
    assert!(
        only(&report.zones_answered_between(secs(0.0), secs(4.0)), "us-east-1a"),
        "{:?}; served elsewhere (due, latency, zone): {:?}",
        report.zones_answered_between(secs(0.0), secs(4.0)),
        report.served_elsewhere(secs(0.0), secs(4.0), "us-east-1a")
    );
    assert_eq!(report.failures_between(secs(0.0), secs(4.0)), 0);
    // us-east-1a dies: at most a few failures, none from one second after, served in us-east-1b.
    assert!(report.failures_between(secs(4.0), secs(5.0)) <= 3);
    assert_eq!(report.failures_between(secs(5.0), secs(10.0)), 0);
    assert!(
        only(&report.zones_answered_between(secs(5.0), secs(10.0)), "us-east-1b"),
        "{:?}; served elsewhere: {:?}",
        report.zones_answered_between(secs(5.0), secs(10.0)),
        report.served_elsewhere(secs(5.0), secs(10.0), "us-east-1b")
    );
    // us-east-1b dies too: the next cluster by region distance (us-west before eu-central).
    assert!(report.failures_between(secs(10.0), secs(11.0)) <= 3);
    assert_eq!(report.failures_between(secs(11.0), secs(34.0)), 0);
    assert!(
        only(&report.zones_answered_between(secs(11.0), secs(16.0)), "us-west-2a"),
        "{:?}; served elsewhere: {:?}",
        report.zones_answered_between(secs(11.0), secs(16.0)),
        report.served_elsewhere(secs(11.0), secs(16.0), "us-west-2a")
    );
    // us-east-1a is back: traffic returns to it once its ejection runs out.
    assert!(
        only(&report.zones_between(secs(31.0), secs(34.0)), "us-east-1a"),
        "{:?}",
        report.zones_between(secs(28.0), secs(34.0))
    );

    let m = scrape(caller.admin_addr).await.unwrap();
    assert!(
        metric_sum(&m, "strait_outlier_ejections_total", &[("destination_cluster", "east")]) >= 2.0,
        "{m}"
    );
}

fn topology(policy: &std::path::Path) -> String {
    format!(
        r#"
trustDomain: mesh.local
policy: {}
services:
  - {{name: echo, port: 80, protocol: http}}
clusters:
  - name: east
    region: us-east
    zones: [us-east-1a, us-east-1b]
    workloads:
      - {{service: echo, zone: us-east-1a}}
  - name: west
    region: us-west
    zones: [us-west-2a]
    workloads:
      - {{service: echo, zone: us-west-2a}}
  - name: central
    region: eu-central
    zones: [eu-central-1a]
    workloads:
      - {{service: echo, zone: eu-central-1a}}
"#,
        policy.display()
    )
}

async fn zone_of(proxy: std::net::SocketAddr) -> String {
    let (status, body) = get_via(proxy, ECHO).await.unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v["zone"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_policy_orders_regions_and_bad_policies_are_rejected() {
    let policy = multicluster_tests::Scratch::temp("policy.yaml");
    let policy = policy.path();
    std::fs::write(
        policy,
        "localityLbSetting:\n  failover:\n  - from: us-east\n    to: eu-central\n",
    )
    .unwrap();
    let mesh = Mesh::start_with(MeshOptions {
        topology: Some(topology(policy)),
        ..Default::default()
    })
    .await
    .unwrap();
    let caller = mesh.workload("echo", "us-east-1a").clone();
    assert_eq!(zone_of(caller.outbound_proxy).await, "us-east-1a");
    mesh.kill9(caller.app_pid);
    // Istio semantics: failover us-east -> eu-central beats the default (us-west is nearer).
    for _ in 0..10 {
        assert_eq!(zone_of(caller.outbound_proxy).await, "eu-central-1a");
    }

    // A policy with a mistake is rejected with the field named; the last good one keeps serving.
    let east_policy = mesh.info.state_dir.join("east").join("policy.yaml");
    std::fs::write(
        &east_policy,
        "localityLbSetting:\n  failover:\n  - from: us-east\n    to: us-east\n  distribute:\n  - from: 'us-east/*'\n    to: {'us-west/*': 90}\n",
    )
    .unwrap();
    let admin = mesh.cluster("east").controller.admin_addr;
    Mesh::eventually("the bad policy is reported", Duration::from_secs(10), || async {
        let s = Mesh::admin_json(admin, "/status").await.unwrap();
        s["policy_error"].as_str().is_some_and(|e| {
            e.contains("policy.yaml") && e.contains("localityLbSetting.failover[0].to") && e.contains("sum to 90")
        })
    })
    .await
    .unwrap();
    for _ in 0..5 {
        assert_eq!(
            zone_of(caller.outbound_proxy).await,
            "eu-central-1a",
            "the last good policy still applies"
        );
    }
    let m = scrape(admin).await.unwrap();
    assert!(metric_sum(&m, "strait_config_inputs_rejected_total", &[("source", "policy")]) >= 1.0);

    // A good change applies without a restart: an explicit cluster order now prefers west.
    std::fs::write(&east_policy, "clusterOrder: [east, west, central]\n").unwrap();
    Mesh::eventually("the new policy applies", Duration::from_secs(10), || async {
        zone_of(caller.outbound_proxy).await == "us-west-2a"
    })
    .await
    .unwrap();
}
