//! What users apply: `deploy/` is exactly what `strait install` generates (no drift), and every
//! manifest passes the real API server's validation (server-side dry-run, then a real apply).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::path::Path;

use multicluster_tests::{strait_bin, Mesh, MeshOptions};

const ONE_CLUSTER: &str = r#"
trustDomain: mesh.local
services:
  - {name: echo, port: 80, protocol: http}
clusters:
  - name: east
    region: us-east
    zones: [us-east-1a]
    workloads:
      - {service: echo, zone: us-east-1a}
"#;

fn strait(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(strait_bin()).args(args).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn deploy_directory_is_generated_not_hand_edited() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("deploy");
    let fresh = std::env::temp_dir().join(format!("strait-deploy-{}", std::process::id()));
    let (ok, out) = strait(&["install", "--write-deploy", fresh.to_str().unwrap()]);
    assert!(ok, "{out}");
    for file in ["crds.yaml", "strait-example.yaml"] {
        let committed = std::fs::read_to_string(repo.join(file)).unwrap_or_default();
        let generated = std::fs::read_to_string(fresh.join(file)).unwrap();
        assert!(
            committed == generated,
            "deploy/{file} differs from what `strait install` generates; run `strait install --write-deploy deploy/`"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_manifest_passes_the_api_server() {
    let mesh = Mesh::start_with(MeshOptions {
        topology: Some(ONE_CLUSTER.into()),
        kube: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let kubeconfig = mesh.cluster("east").kubeconfig.clone().unwrap();
    let args = [
        "install",
        "--cluster-name",
        "east",
        "--region",
        "us-east",
        "--zone",
        "us-east-1a",
        "--gateway-address",
        "203.0.113.10:15443",
        "--apply",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
    ];
    let mut dry = args.to_vec();
    dry.push("--dry-run");
    let (ok, out) = strait(&dry);
    assert!(ok, "server-side dry-run failed: {out}");
    assert!(
        out.contains("validated (server-side dry-run)") && out.contains("Deployment/strait-gateway"),
        "{out}"
    );
    let (ok, out) = strait(&args);
    assert!(ok, "apply failed: {out}");
    // Applying again changes nothing and succeeds (server-side apply is idempotent).
    let (ok, out) = strait(&args);
    assert!(ok, "second apply failed: {out}");

    // A bad setting is refused before anything reaches the cluster, naming the flag.
    let (ok, out) = strait(&[
        "install",
        "--cluster-name",
        "Bad_Name",
        "--region",
        "us-east",
        "--gateway-address",
        "203.0.113.10:15443",
        "--apply",
        "--dry-run",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
    ]);
    assert!(!ok && out.contains("--cluster-name"), "{out}");
}
