//! What users apply: `deploy/` is exactly what `strait install` generates (no drift), and every
//! manifest passes the real API server's validation (server-side dry-run, then a real apply).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use multicluster_tests::{repo_dir, strait_bin, Mesh, MeshOptions};

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

/// Runs `strait ARGS` (with KUBECONFIG set when given); returns success and all its output.
fn strait_kc(args: &[&str], kubeconfig: Option<&str>) -> (bool, String) {
    let mut cmd = std::process::Command::new(strait_bin());
    cmd.args(args);
    if let Some(kc) = kubeconfig {
        cmd.env("KUBECONFIG", kc);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn strait(args: &[&str]) -> (bool, String) {
    strait_kc(args, None)
}

#[test]
fn deploy_directory_is_generated_not_hand_edited() {
    let repo = repo_dir().join("deploy");
    let fresh = multicluster_tests::Scratch::temp("deploy");
    let fresh = fresh.path();
    let (ok, out) = strait(&["install", "--write-deploy", fresh.to_str().unwrap()]);
    assert!(ok, "{out}");
    for file in [
        "crds.yaml",
        "strait-example.yaml",
        "demo/east.yaml",
        "demo/west.yaml",
        "demo/central.yaml",
    ] {
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
    use strait_federation::k8s::inject::{ca_bundle_patch, WEBHOOK_CONFIG};
    let hooks = drop_dev_webhook(kubeconfig.to_str().unwrap()).await;
    let mut dry = args.to_vec();
    dry.push("--dry-run");
    let (ok, out) = strait(&dry);
    assert!(ok, "server-side dry-run failed: {out}");
    assert!(
        out.contains("validated (server-side dry-run)")
            && out.contains("Deployment/strait-gateway")
            && out.contains("MutatingWebhookConfiguration/strait-sidecar-injector"),
        "{out}"
    );
    // With the controller's state on a claim: the claim and the Deployment that mounts it pass
    // too. A bad size is refused before anything is sent, naming the flag.
    let mut claimed = dry.clone();
    claimed.extend(["--state-volume-size", "1Gi", "--state-storage-class", "standard"]);
    let (ok, out) = strait(&claimed);
    assert!(ok, "server-side dry-run with a state volume failed: {out}");
    assert!(out.contains("PersistentVolumeClaim/strait-federation-state"), "{out}");
    let mut bad = dry.clone();
    bad.extend(["--state-volume-size", "1GB"]);
    let (ok, out) = strait(&bad);
    assert!(
        !ok && out.contains("--state-volume-size") && !out.contains("validated"),
        "{out}"
    );
    let (ok, out) = strait(&args);
    assert!(ok, "apply failed: {out}");
    // The controller fills in the caBundle (what it does at start in a cluster)...
    hooks
        .patch(
            WEBHOOK_CONFIG,
            &kube::api::PatchParams::apply("strait-federation").force(),
            &kube::api::Patch::Apply(&ca_bundle_patch("-----BEGIN CERTIFICATE-----\n")),
        )
        .await
        .unwrap();
    // ...and applying the install again changes nothing and keeps it (server-side apply).
    let (ok, out) = strait(&args);
    assert!(ok, "second apply failed: {out}");
    let hook = hooks.get(WEBHOOK_CONFIG).await.unwrap();
    for w in &hook.webhooks.unwrap_or_default() {
        let cc = &w.client_config;
        assert!(
            cc.ca_bundle.as_ref().is_some_and(|b| !b.0.is_empty()),
            "{} lost its caBundle",
            w.name
        );
        assert_eq!(cc.service.as_ref().map(|s| s.name.as_str()), Some("strait-federation"));
        assert!(cc.url.is_none());
    }

    // The demo services of every demo cluster (what deploy/kind/up.sh applies).
    for cluster in ["east", "west", "central"] {
        let (ok, out) = strait(&[
            "install",
            "--demo",
            "--cluster-name",
            cluster,
            "--apply",
            "--dry-run",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
        ]);
        assert!(ok, "demo of {cluster}: server-side dry-run failed: {out}");
        assert!(out.contains("ServiceExport/echo"), "{out}");
    }

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

const TWO_CLUSTERS: &str = r#"
trustDomain: mesh.local
services:
  - {name: echo, port: 80, protocol: http}
clusters:
  - name: east
    region: us-east
    zones: [us-east-1a]
    workloads:
      - {service: echo, zone: us-east-1a}
  - name: west
    region: us-west
    zones: [us-west-2a]
    workloads:
      - {service: echo, zone: us-west-2a}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_exchanges_only_names_and_gateways_and_check_says_what_to_fix() {
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    let mesh = Mesh::start_with(MeshOptions {
        topology: Some(TWO_CLUSTERS.into()),
        kube: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let kc = |c: &str| mesh.cluster(c).kubeconfig.clone().unwrap().display().to_string();
    for (c, gw) in [("east", "203.0.113.10:15443"), ("west", "203.0.113.20:15443")] {
        drop_dev_webhook(&kc(c)).await;
        let (ok, out) = strait(&[
            "install",
            "--cluster-name",
            c,
            "--region",
            "r",
            "--zone",
            "z",
            "--gateway-address",
            gw,
            "--apply",
            "--kubeconfig",
            &kc(c),
        ]);
        assert!(ok, "{out}");
        // The cluster's intermediate CA, as the operator would create it.
        let client = kube_client(&kc(c)).await;
        let ca_dir = mesh.info.state_dir.join(c).join("ca");
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "strait-ca", "namespace": "strait-system"},
            "stringData": {
                "ca.pem": std::fs::read_to_string(ca_dir.join("ca.pem")).unwrap(),
                "ca-key.pem": std::fs::read_to_string(ca_dir.join("ca-key.pem")).unwrap(),
                "bundle.pem": std::fs::read_to_string(&mesh.info.bundle).unwrap(),
            }
        }))
        .unwrap();
        kube::Api::<Secret>::namespaced(client, "strait-system")
            .create(&Default::default(), &secret)
            .await
            .unwrap();
    }
    let both = format!("{}:{}", kc("east"), kc("west"));
    let (ok, out) = strait_kc(&["join", "--context", "east", "--context", "west"], Some(&both));
    assert!(ok, "{out}");
    for (c, peer, gw) in [
        ("east", "west", "203.0.113.20:15443"),
        ("west", "east", "203.0.113.10:15443"),
    ] {
        let client = kube_client(&kc(c)).await;
        let cm = kube::Api::<ConfigMap>::namespaced(client, "strait-system")
            .get("strait-federation")
            .await
            .unwrap();
        let text = cm.data.unwrap()["controller.yaml"].clone();
        assert!(text.contains(&format!("name: {peer}")) && text.contains(gw), "{text}");
        // Only names and addresses crossed over: no credentials of the other cluster.
        assert!(!text.contains("token") && !text.contains("BEGIN"), "{text}");
    }
    // check: the install is in place and joined; the Deployments cannot become available here
    // (no kubelet), and check says so with the fix.
    let (ok, out) = strait_kc(&["check", "--context", "east", "--output", "json"], Some(&both));
    assert!(!ok);
    let checks: serde_json::Value = serde_json::from_str(out.split("error:").next().unwrap()).unwrap();
    let verdict = |name: &str| {
        checks
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["check"].as_str().unwrap().starts_with(name))
            .unwrap()["ok"]
            .clone()
    };
    assert_eq!(verdict("CRD serviceexports"), true);
    assert_eq!(verdict("controller config"), true);
    assert_eq!(verdict("intermediate CA"), true);
    assert_eq!(verdict("joined"), true);
    assert_eq!(verdict("Deployment strait-federation"), false);
}

async fn kube_client(path: &str) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}

/// The API servers of `strait up --kube` have a controller outside the cluster that registered
/// its webhook by URL; an install calls the in-cluster Service instead (a configuration with both
/// is invalid), so a test that installs starts from no webhook configuration.
async fn drop_dev_webhook(
    kubeconfig: &str,
) -> kube::Api<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration> {
    let hooks = kube::Api::all(kube_client(kubeconfig).await);
    hooks
        .delete(strait_federation::k8s::inject::WEBHOOK_CONFIG, &Default::default())
        .await
        .unwrap();
    hooks
}
