//! `strait join` and `strait check`: link installed clusters by exchanging only what peering
//! needs — each cluster's name, gateway address and, where trust domains differ, trust
//! bundles — and verify one cluster's install. No kubeconfig or token of one cluster is ever
//! written into another.

use std::collections::BTreeMap;

use clap::Args;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Patch, PatchParams};
use kube::Api;
use strait_federation::config::{ControllerConfig, Peer};

use super::manifests::NAMESPACE;

const CONFIG: &str = "strait-federation";

#[derive(Args, Debug)]
pub struct JoinArgs {
    /// A kubeconfig context of each cluster to join (at least two). Use KUBECONFIG=a:b to
    /// combine files.
    #[arg(long = "context", required = true, num_args = 1)]
    pub contexts: Vec<String>,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    #[arg(long)]
    pub context: Option<String>,
    #[arg(long, short, value_enum, default_value_t)]
    pub output: crate::cmd::Output,
}

async fn client(context: &str) -> anyhow::Result<kube::Client> {
    super::kube_client(None, Some(context))
        .await
        .map_err(|e| anyhow::anyhow!("context {context}: {e}"))
}

async fn read_config(client: &kube::Client, context: &str) -> anyhow::Result<ControllerConfig> {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), NAMESPACE)
        .get_opt(CONFIG)
        .await?
        .ok_or_else(|| {
            anyhow::anyhow!(
                "context {context}: no ConfigMap {NAMESPACE}/{CONFIG}; run `strait install --apply` there first"
            )
        })?;
    let text = cm
        .data
        .and_then(|d| d.get("controller.yaml").cloned())
        .ok_or_else(|| anyhow::anyhow!("context {context}: ConfigMap {CONFIG} has no controller.yaml"))?;
    Ok(serde_yaml::from_str(&text)?)
}

async fn bundle(client: &kube::Client) -> anyhow::Result<Option<String>> {
    Ok(Api::<Secret>::namespaced(client.clone(), NAMESPACE)
        .get_opt("strait-ca")
        .await?
        .and_then(|s| s.data)
        .and_then(|d| d.get("bundle.pem").map(|b| String::from_utf8_lossy(&b.0).into_owned())))
}

pub async fn join(a: JoinArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.contexts.len() >= 2, "name at least two clusters with --context");
    let mut clusters = vec![];
    for ctx in &a.contexts {
        eprintln!("reading {ctx} ...");
        let c = client(ctx).await?;
        let config = read_config(&c, ctx).await?;
        let bundle = bundle(&c).await?;
        clusters.push((ctx.clone(), c, config, bundle));
    }
    let names: Vec<&str> = clusters.iter().map(|c| c.2.cluster.as_str()).collect();
    let mut unique = names.clone();
    unique.sort();
    unique.dedup();
    anyhow::ensure!(
        unique.len() == names.len(),
        "two contexts name the same cluster ({names:?}); cluster names must differ"
    );
    let params = PatchParams::apply("strait-join").force();
    for (ctx, c, config, own_bundle) in &clusters {
        let mut updated = config.clone();
        updated.peers = clusters
            .iter()
            .filter(|o| o.2.cluster != config.cluster)
            .map(|o| Peer {
                name: o.2.cluster.clone(),
                gateway: o.2.gateway.address,
            })
            .collect();
        let cm = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": CONFIG, "namespace": NAMESPACE},
            "data": {"controller.yaml": serde_yaml::to_string(&updated)?}});
        Api::<ConfigMap>::namespaced(c.clone(), NAMESPACE)
            .patch(CONFIG, &params, &Patch::Apply(&cm))
            .await?;
        // Federation: roots of other trust domains join this cluster's bundle.
        let foreign: Vec<&String> = clusters
            .iter()
            .filter(|o| o.2.trust_domain != config.trust_domain)
            .filter_map(|o| o.3.as_ref())
            .collect();
        if !foreign.is_empty() {
            let mut merged = own_bundle
                .clone()
                .ok_or_else(|| anyhow::anyhow!("context {ctx}: no Secret {NAMESPACE}/strait-ca with bundle.pem"))?;
            for b in foreign {
                if !merged.contains(b.trim()) {
                    merged.push_str(b);
                }
            }
            let secret = serde_json::json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "strait-ca", "namespace": NAMESPACE},
                "stringData": {"bundle.pem": merged}});
            Api::<Secret>::namespaced(c.clone(), NAMESPACE)
                .patch("strait-ca", &params, &Patch::Apply(&secret))
                .await?;
        }
        // The controller reads its config at start: roll it.
        let restart = serde_json::json!({"spec": {"template": {"metadata": {"annotations": {
            "strait.dev/joined-at": strait_api::unix_ms(std::time::SystemTime::now()).to_string()}}}}});
        Api::<Deployment>::namespaced(c.clone(), NAMESPACE)
            .patch(CONFIG, &PatchParams::default(), &Patch::Merge(&restart))
            .await?;
        let peers: Vec<String> = updated
            .peers
            .iter()
            .map(|p| format!("{} ({})", p.name, p.gateway))
            .collect();
        println!("{:<12} {:<10} peers: {}", ctx, config.cluster, peers.join(", "));
    }
    Ok(())
}

/// One verdict of `strait check`.
#[derive(serde::Serialize)]
struct Check {
    check: String,
    ok: bool,
    fix: String,
}

pub async fn check(a: CheckArgs) -> anyhow::Result<()> {
    let c = super::kube_client(None, a.context.as_deref()).await?;
    let mut checks = vec![];
    let mut add = |check: &str, ok: bool, fix: &str| {
        checks.push(Check {
            check: check.into(),
            ok,
            fix: if ok { String::new() } else { fix.into() },
        })
    };
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let crds = Api::<CustomResourceDefinition>::all(c.clone());
    for name in [
        "serviceexports.multicluster.x-k8s.io",
        "serviceimports.multicluster.x-k8s.io",
    ] {
        let present = crds.get_opt(name).await?.is_some();
        add(
            &format!("CRD {name}"),
            present,
            "strait install --crds-only | kubectl apply --server-side -f -",
        );
    }
    let config = read_config(&c, a.context.as_deref().unwrap_or("current")).await;
    add(
        "controller config (ConfigMap strait-federation)",
        config.is_ok(),
        "strait install --cluster-name ... --apply",
    );
    let secret = Api::<Secret>::namespaced(c.clone(), NAMESPACE)
        .get_opt("strait-ca")
        .await?;
    let keys: BTreeMap<String, bool> = ["ca.pem", "ca-key.pem", "bundle.pem"]
        .iter()
        .map(|k| {
            (
                k.to_string(),
                secret
                    .as_ref()
                    .and_then(|s| s.data.as_ref())
                    .is_some_and(|d| d.contains_key(*k)),
            )
        })
        .collect();
    add(
        "intermediate CA (Secret strait-ca with ca.pem, ca-key.pem, bundle.pem)",
        keys.values().all(|v| *v),
        "strait trust intermediate ... then kubectl -n strait-system create secret generic strait-ca --from-file=...",
    );
    for name in [CONFIG, "strait-gateway"] {
        let d = Api::<Deployment>::namespaced(c.clone(), NAMESPACE)
            .get_opt(name)
            .await?;
        let available = d
            .as_ref()
            .and_then(|d| d.status.as_ref())
            .and_then(|s| s.available_replicas)
            .unwrap_or_default()
            > 0;
        add(
            &format!("Deployment {name} available"),
            available,
            &format!("kubectl -n {NAMESPACE} describe deployment {name}"),
        );
    }
    let peers = config.as_ref().map(|c| c.peers.len()).unwrap_or_default();
    add(
        "joined to at least one peer",
        peers > 0,
        "strait join --context <this> --context <other>",
    );
    if a.output == crate::cmd::Output::Json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        for ch in &checks {
            println!(
                "{} {}{}",
                if ch.ok { "[ok]  " } else { "[FAIL]" },
                ch.check,
                if ch.ok {
                    String::new()
                } else {
                    format!("\n        fix: {}", ch.fix)
                }
            );
        }
    }
    if checks.iter().all(|c| c.ok) {
        Ok(())
    } else {
        anyhow::bail!(
            "{} of {} checks failed",
            checks.iter().filter(|c| !c.ok).count(),
            checks.len()
        )
    }
}
