//! `strait install`: the manifests that install Strait in one cluster — CRDs generated from the
//! Rust types, least-privilege RBAC, the controller and gateway Deployments and Services — printed
//! as YAML, or applied with server-side apply; `--demo` does the same for the demo services. `--write-deploy DIR` regenerates `deploy/`, so
//! no hand-edited copy can drift from the code.

mod join;
mod manifests;

pub use join::{check, join, CheckArgs, JoinArgs};

use std::path::PathBuf;

use clap::Args;
use kube::api::{Patch, PatchParams};

pub use manifests::{manifests, Settings, StateVolume};

pub const EXAMPLES: &str = "Examples:
  strait install --cluster-name east --region us-east --zone us-east-1a --gateway-address 203.0.113.10:15443
  strait install --cluster-name east --region us-east --zone us-east-1a --gateway-address 203.0.113.10:15443 \\
      --apply --kubeconfig ~/.kube/config --context kind-east
  strait install --cluster-name east --region us-east --zone us-east-1a --gateway-address 203.0.113.10:15443 \\
      --state-volume-size 1Gi --state-storage-class standard   # peers' state outlives the pod
  strait install --crds-only | kubectl apply --server-side -f -
  strait install --demo --cluster-name west --apply --context kind-west   # the demo services of west
  strait install --write-deploy deploy/          # regenerate the manifests in the repository

Before the controller can start, give the cluster its intermediate CA (keys never go in manifests):
  strait trust intermediate --root ./trust --trust-domain mesh.local --cluster east --out ./east-ca
  kubectl -n strait-system create secret generic strait-ca \\
      --from-file=ca.pem=./east-ca/ca.pem --from-file=ca-key.pem=./east-ca/ca-key.pem --from-file=bundle.pem=./trust/bundle.pem";

#[derive(Args, Debug)]
pub struct InstallArgs {
    /// This cluster's name in the clusterset.
    #[arg(long, required_unless_present_any = ["crds_only", "write_deploy"])]
    pub cluster_name: Option<String>,
    #[arg(long, required_unless_present_any = ["crds_only", "write_deploy", "demo"])]
    pub region: Option<String>,
    /// The zone the gateway runs in.
    #[arg(long, default_value = "")]
    pub zone: String,
    /// Where peers reach this cluster's gateway (a LoadBalancer IP, or a node IP and NodePort).
    #[arg(long, required_unless_present_any = ["crds_only", "write_deploy", "demo"])]
    pub gateway_address: Option<std::net::SocketAddr>,
    #[arg(long, default_value = "mesh.local")]
    pub trust_domain: strait_trust::TrustDomain,
    #[arg(long, default_value = concat!("strait:", env!("CARGO_PKG_VERSION")))]
    pub image: String,
    /// Keep the controller's state (what each peer last told it) on a PersistentVolumeClaim of
    /// this size, e.g. 1Gi, instead of an emptyDir: it then outlives the controller's pod (an
    /// upgrade, a reschedule), so a new pod resumes every peer instead of being sent every
    /// export again, and keeps a peer's policies in force while that peer is unreachable. The
    /// controller's Deployment then replaces its pod with `Recreate` (one pod holds the claim).
    #[arg(long, value_name = "SIZE")]
    pub state_volume_size: Option<String>,
    /// The StorageClass of that claim (default: the cluster's default class).
    #[arg(long, value_name = "CLASS", requires = "state_volume_size")]
    pub state_storage_class: Option<String>,
    /// Print only the CRDs.
    #[arg(long)]
    pub crds_only: bool,
    /// Instead of Strait, the demo services of this cluster of the three-cluster demo
    /// (east, west or central): Deployments per zone, Services and ServiceExports in the
    /// namespace `demo`, which is labelled for sidecar injection.
    #[arg(long, conflicts_with = "crds_only")]
    pub demo: bool,
    /// Write deploy/crds.yaml, deploy/strait-example.yaml and deploy/demo/<cluster>.yaml into DIR.
    #[arg(long)]
    pub write_deploy: Option<PathBuf>,
    /// Apply to the cluster (server-side apply) instead of printing.
    #[arg(long)]
    pub apply: bool,
    /// With --apply: only validate on the server (server-side dry-run).
    #[arg(long, requires = "apply")]
    pub dry_run: bool,
    #[arg(long, requires = "apply")]
    pub kubeconfig: Option<PathBuf>,
    #[arg(long, requires = "apply")]
    pub context: Option<String>,
}

/// The clusters of the demo, each with a `deploy/demo/<cluster>.yaml`.
pub const DEMO_CLUSTERS: [&str; 3] = ["east", "west", "central"];

/// The example cluster `deploy/strait-example.yaml` is generated for.
fn example() -> Settings {
    Settings {
        cluster: "east".into(),
        region: "us-east".into(),
        zone: "us-east-1a".into(),
        gateway_address: "203.0.113.10:15443".parse().expect("valid address"),
        trust_domain: "mesh.local".parse().expect("valid trust domain"),
        image: concat!("strait:", env!("CARGO_PKG_VERSION")).into(),
        state_volume: None,
    }
}

pub fn to_yaml(objects: &[serde_json::Value]) -> anyhow::Result<String> {
    let mut out =
        String::from("# Generated by `strait install`; do not edit (run `strait install --write-deploy deploy/`).\n");
    for o in objects {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(o)?);
    }
    Ok(out)
}

fn crd_objects() -> anyhow::Result<Vec<serde_json::Value>> {
    strait_federation::k8s::crd::crds()
        .into_iter()
        .map(|c| Ok(serde_json::to_value(c)?))
        .collect()
}

pub async fn run(a: InstallArgs) -> anyhow::Result<()> {
    if let Some(dir) = &a.write_deploy {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("crds.yaml"), to_yaml(&crd_objects()?)?)?;
        std::fs::write(dir.join("strait-example.yaml"), to_yaml(&manifests(&example())?)?)?;
        std::fs::create_dir_all(dir.join("demo"))?;
        for cluster in DEMO_CLUSTERS {
            std::fs::write(
                dir.join("demo").join(format!("{cluster}.yaml")),
                to_yaml(&manifests::demo(cluster, &example().image)?)?,
            )?;
        }
        println!(
            "wrote {}, {} and {}",
            dir.join("crds.yaml").display(),
            dir.join("strait-example.yaml").display(),
            dir.join("demo").join("{east,west,central}.yaml").display()
        );
        return Ok(());
    }
    let objects = if a.crds_only {
        crd_objects()?
    } else if a.demo {
        manifests::demo(a.cluster_name.as_deref().unwrap_or_default(), &a.image)?
    } else {
        let cluster = a.cluster_name.clone().unwrap_or_default();
        if !strait_api::dns_label(&cluster) {
            anyhow::bail!(
                "--cluster-name {cluster:?} is not a DNS label: use lowercase letters, digits and '-' (e.g. east)"
            );
        }
        if a.region.as_deref().unwrap_or_default().is_empty() {
            anyhow::bail!("--region is empty: give the cluster's region, e.g. us-east");
        }
        let settings = Settings {
            cluster,
            region: a.region.clone().unwrap_or_default(),
            zone: a.zone.clone(),
            gateway_address: a
                .gateway_address
                .ok_or_else(|| anyhow::anyhow!("--gateway-address is required"))?,
            trust_domain: a.trust_domain.clone(),
            image: a.image.clone(),
            state_volume: a
                .state_volume_size
                .as_deref()
                .map(|size| StateVolume::new(size, a.state_storage_class.as_deref()))
                .transpose()?,
        };
        let mut all = crd_objects()?;
        all.extend(manifests(&settings)?);
        all
    };
    if !a.apply {
        print!("{}", to_yaml(&objects)?);
        return Ok(());
    }
    let client = kube_client(a.kubeconfig.as_deref(), a.context.as_deref()).await?;
    let n = apply(&client, &objects, a.dry_run, |line| eprintln!("{line}")).await?;
    eprintln!(
        "{} {n} objects",
        if a.dry_run {
            "validated (server-side dry-run)"
        } else {
            "applied"
        }
    );
    Ok(())
}

pub async fn kube_client(kubeconfig: Option<&std::path::Path>, context: Option<&str>) -> anyhow::Result<kube::Client> {
    let options = kube::config::KubeConfigOptions {
        context: context.map(str::to_string),
        ..Default::default()
    };
    let config = match kubeconfig {
        Some(path) => {
            kube::Config::from_custom_kubeconfig(kube::config::Kubeconfig::read_from(path)?, &options).await?
        }
        None => kube::Config::from_kubeconfig(&options).await?,
    };
    Ok(kube::Client::try_from(config)?)
}

/// Server-side applies objects in order (namespaces and CRDs first, as listed), reporting each.
pub async fn apply(
    client: &kube::Client,
    objects: &[serde_json::Value],
    dry_run: bool,
    report: impl Fn(String),
) -> anyhow::Result<usize> {
    let mut params = PatchParams::apply("strait-install").force();
    params.dry_run = dry_run;
    for o in objects {
        let api_version = o["apiVersion"].as_str().unwrap_or_default();
        let kind = o["kind"].as_str().unwrap_or_default();
        let name = o["metadata"]["name"].as_str().unwrap_or_default();
        if kind == "CustomResourceDefinition" && strait_federation::k8s::crd::is_shared(name) {
            // Gateway API's CRDs belong to the cluster: one already there is used as it is.
            let crds: kube::Api<
                k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
            > = kube::Api::all(client.clone());
            if crds
                .get_opt(name)
                .await
                .map_err(|e| anyhow::anyhow!("{kind} {name}: {e}"))?
                .is_some()
            {
                report(format!("  {kind}/{name} (already installed; kept)"));
                continue;
            }
        }
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let gvk = kube::api::GroupVersionKind::gvk(group, version, kind);
        let (resource, caps) = kube::discovery::pinned_kind(client, &gvk)
            .await
            .map_err(|e| anyhow::anyhow!("{kind} {name}: the API server does not serve {api_version}/{kind}: {e}"))?;
        let api: kube::Api<kube::api::DynamicObject> = match (caps.scope, o["metadata"]["namespace"].as_str()) {
            (kube::discovery::Scope::Namespaced, Some(ns)) => kube::Api::namespaced_with(client.clone(), ns, &resource),
            _ => kube::Api::all_with(client.clone(), &resource),
        };
        api.patch(name, &params, &Patch::Apply(o))
            .await
            .map_err(|e| anyhow::anyhow!("{kind} {name}: {e}"))?;
        report(format!("  {kind}/{name}"));
    }
    Ok(objects.len())
}
