//! `strait up --kube`: each cluster backed by a real kube-apiserver with its own etcd (built
//! from the upstream Go modules by `multicluster-tests/kube/build.sh`, cached by version). The
//! demo workloads appear as Services, EndpointSlices (with the demo processes' real addresses)
//! and ServiceExports; controllers run in Kubernetes mode against their own API server only.

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};

use super::plan::ClusterPlan;
use super::procs::{self, Proc};

/// Where kube-apiserver and etcd are: `$STRAIT_KUBE_BIN_DIR`, else the build script's cache.
pub fn binaries() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("STRAIT_KUBE_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let cache = std::env::var_os("STRAIT_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/strait")))
        .context("set HOME or STRAIT_CACHE")?;
    let kube = cache.join("kube");
    let found = std::fs::read_dir(&kube).ok().and_then(|entries| {
        entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join("kube-apiserver").exists() && p.join("etcd").exists())
            .max()
    });
    found.with_context(|| {
        format!(
            "no kube-apiserver/etcd under {}: build them with multicluster-tests/kube/build.sh (needs Go), \
             or point STRAIT_KUBE_BIN_DIR at a directory holding both",
            kube.display()
        )
    })
}

/// `N` distinct free ports on `ip` for etcd and kube-apiserver to listen on, found by binding
/// each (every listener is held until all are taken: ports asked for one at a time can repeat).
/// They are taken below the kernel's ephemeral range (`ip_local_port_range`): a port from that
/// range, released here, can be handed to any outgoing connection before the daemon binds it
/// (etcd then exited with "address already in use"); below it, only another listener can take it.
fn free_ports<const N: usize>(ip: IpAddr) -> anyhow::Result<[u16; N]> {
    let (first, end) = listen_range();
    // From a random place, so that two `strait up`s starting together do not race for the same
    // ports.
    let span = u64::from(end - first);
    let offset = std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), ip) % span;
    let listeners: Vec<TcpListener> = (0..span)
        .map(|i| first + ((offset + i) % span) as u16)
        .filter_map(|port| TcpListener::bind(SocketAddr::new(ip, port)).ok())
        .take(N)
        .collect();
    anyhow::ensure!(
        listeners.len() == N,
        "no {N} free ports on {ip} between {first} and {end} (below the ephemeral range)"
    );
    let mut ports = [0; N];
    for (port, l) in ports.iter_mut().zip(&listeners) {
        *port = l.local_addr()?.port();
    }
    Ok(ports)
}

/// The ports [`free_ports`] chooses from: 10000 up to the first ephemeral port (32768 when
/// `/proc/sys/net/ipv4/ip_local_port_range` cannot be read; at least 1024 ports).
fn listen_range() -> (u16, u16) {
    let ephemeral_first = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let end = ephemeral_first.max(2048);
    (10000.min(end - 1024), end)
}

pub struct ApiServer {
    pub url: String,
    pub kubeconfig: PathBuf,
    /// kube-apiserver's log.
    pub log: PathBuf,
    pub procs: Vec<Proc>,
}

/// Starts etcd and kube-apiserver for one cluster on `ip`.
pub async fn start(
    cluster: &ClusterPlan,
    ip: IpAddr,
    service_range: &str,
    log_filter: &str,
) -> anyhow::Result<ApiServer> {
    let bins = binaries()?;
    let dir = cluster.dir.join("kube");
    std::fs::create_dir_all(&dir)?;
    let logs = dir.clone();
    let [etcd_client, etcd_peer, port] = free_ports(ip)?;
    let etcd = procs::spawn_exe(
        &format!("etcd-{}", cluster.name),
        &bins.join("etcd"),
        vec![
            "--name=default".into(),
            format!("--data-dir={}", dir.join("etcd").display()),
            format!("--listen-client-urls=http://{ip}:{etcd_client}"),
            format!("--advertise-client-urls=http://{ip}:{etcd_client}"),
            format!("--listen-peer-urls=http://{ip}:{etcd_peer}"),
            format!("--initial-advertise-peer-urls=http://{ip}:{etcd_peer}"),
            format!("--initial-cluster=default=http://{ip}:{etcd_peer}"),
            "--log-level=warn".into(),
            "--unsafe-no-fsync".into(),
        ],
        &logs.join("etcd.log"),
        log_filter,
    )?;

    // The API server's serving certificate (for its own address) and service-account key.
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("strait up apiserver CA {}", cluster.name),
    );
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let serving_key = rcgen::KeyPair::generate()?;
    let serving = rcgen::CertificateParams::new(vec![ip.to_string(), "localhost".to_string()])?
        .signed_by(&serving_key, &rcgen::Issuer::from_params(&ca_params, &ca_key))?;
    std::fs::write(dir.join("serving.crt"), serving.pem())?;
    std::fs::write(dir.join("serving.key"), serving_key.serialize_pem())?;
    let sa_key = rcgen::KeyPair::generate()?;
    std::fs::write(dir.join("sa.key"), sa_key.serialize_pem())?;
    std::fs::write(dir.join("sa.pub"), sa_key.public_key_pem())?;
    let token = hex::encode(rand::random::<[u8; 16]>());
    std::fs::write(
        dir.join("tokens.csv"),
        format!("{token},strait-admin,1,\"system:masters\"\n"),
    )?;

    let path = |f: &str| dir.join(f).display().to_string();
    let log = logs.join("kube-apiserver.log");
    let apiserver = procs::spawn_exe(
        &format!("kube-apiserver-{}", cluster.name),
        &bins.join("kube-apiserver"),
        vec![
            format!("--etcd-servers=http://{ip}:{etcd_client}"),
            format!("--bind-address={ip}"),
            format!("--advertise-address={ip}"),
            format!("--secure-port={port}"),
            format!("--cert-dir={}", path("certs")),
            format!("--tls-cert-file={}", path("serving.crt")),
            format!("--tls-private-key-file={}", path("serving.key")),
            format!("--service-cluster-ip-range={service_range}"),
            "--authorization-mode=RBAC".into(),
            format!("--token-auth-file={}", path("tokens.csv")),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", path("sa.pub")),
            format!("--service-account-signing-key-file={}", path("sa.key")),
            "--api-audiences=https://kubernetes.default.svc.cluster.local".into(),
            // No controller-manager runs, so nothing would create default service accounts.
            "--disable-admission-plugins=ServiceAccount".into(),
        ],
        &log,
        log_filter,
    )?;
    let url = format!("https://{ip}:{port}");
    let kubeconfig = dir.join("kubeconfig");
    let ca = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, ca_cert.pem());
    let name = &cluster.name;
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: {name}\n  cluster:\n    server: {url}\n    certificate-authority-data: {ca}\nusers:\n- name: admin-{name}\n  user:\n    token: {token}\ncontexts:\n- name: {name}\n  context:\n    cluster: {name}\n    user: admin-{name}\ncurrent-context: {name}\n"
        ),
    )?;
    Ok(ApiServer {
        url,
        kubeconfig,
        log,
        procs: vec![etcd, apiserver],
    })
}

pub async fn client(kubeconfig: &Path) -> anyhow::Result<Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// Waits until the API server answers `/readyz`. `procs` are its own processes (etcd and
/// kube-apiserver): if one exits, that is the answer at once, with the end of its log.
pub async fn wait_ready(api: &ApiServer, procs: &mut [Proc], timeout: Duration) -> anyhow::Result<Client> {
    let deadline = tokio::time::Instant::now() + timeout;
    let client = client(&api.kubeconfig).await?;
    loop {
        if let Some(e) = procs.iter_mut().find_map(|p| p.exit_error("while starting")) {
            return Err(e);
        }
        let req = http::Request::get("/readyz").body(Vec::new())?;
        let answer = match client.request_text(req).await {
            Ok(body) if body.trim() == "ok" => return Ok(client),
            Ok(body) => format!("/readyz says {}", body.trim()),
            Err(e) => e.to_string(),
        };
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "kube-apiserver at {} not ready after {timeout:?} ({answer}); see {}{}",
                api.url,
                api.log.display(),
                procs::log_tail(&api.log, 5)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Installs Strait's CRDs and waits until the API server serves them.
pub async fn install_crds(client: &Client) -> anyhow::Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply(strait_federation::k8s::FIELD_MANAGER).force();
    for crd in strait_federation::k8s::crd::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        // Gateway API's CRDs belong to the cluster: one already there is used as it is.
        if strait_federation::k8s::crd::is_shared(&name) && api.get_opt(&name).await?.is_some() {
            continue;
        }
        api.patch(&name, &params, &Patch::Apply(&crd)).await?;
        kube::runtime::wait::await_condition(
            api.clone(),
            &name,
            kube::runtime::wait::conditions::is_crd_established(),
        )
        .await?;
    }
    Ok(())
}

async fn ensure_namespace(client: &Client, ns: &str) -> anyhow::Result<()> {
    let obj: Namespace = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}
    }))?;
    Api::<Namespace>::all(client.clone())
        .patch(ns, &PatchParams::apply("strait-up").force(), &Patch::Apply(&obj))
        .await?;
    Ok(())
}

/// Writes one cluster's demo workloads as a Service, an EndpointSlice and a ServiceExport each.
pub async fn publish_demo(
    client: &Client,
    cluster: &ClusterPlan,
    services: &[super::topology::ServiceDef],
) -> anyhow::Result<()> {
    let params = PatchParams::apply("strait-up").force();
    for def in services {
        let workloads: Vec<_> = cluster.workloads.iter().filter(|w| w.service == def.name).collect();
        if workloads.is_empty() {
            continue;
        }
        let ns = &def.namespace;
        ensure_namespace(client, ns).await?;
        let proto = def.protocol.as_str();
        let svc: Service = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": def.name, "namespace": ns,
                         "annotations": {"strait.dev/service-account": def.name}},
            "spec": {"ports": [{"name": proto, "port": def.port, "protocol": "TCP",
                                "appProtocol": proto}]}
        }))?;
        Api::<Service>::namespaced(client.clone(), ns)
            .patch(&def.name, &params, &Patch::Apply(&svc))
            .await?;
        let inbound_port = workloads[0].inbound.port();
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{}-strait-up", def.name), "namespace": ns,
                         "labels": {"kubernetes.io/service-name": def.name}},
            "addressType": "IPv4",
            "ports": [{"name": proto, "port": inbound_port, "protocol": "TCP"}],
            "endpoints": workloads.iter().map(|w| serde_json::json!({
                "addresses": [w.inbound.ip().to_string()],
                "conditions": {"ready": true},
                "zone": w.zone,
                "hostname": w.name,
            })).collect::<Vec<_>>(),
        }))?;
        Api::<EndpointSlice>::namespaced(client.clone(), ns)
            .patch(&format!("{}-strait-up", def.name), &params, &Patch::Apply(&slice))
            .await?;
        let export = serde_json::json!({
            "apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
            "metadata": {"name": def.name, "namespace": ns}
        });
        Api::<strait_federation::k8s::crd::ServiceExport>::namespaced(client.clone(), ns)
            .patch(&def.name, &params, &Patch::Apply(&export))
            .await?;
    }
    Ok(())
}

/// The local routes that make each cluster's 198.18.x.0/24 workload range bindable on `lo`
/// (needs root); removed again when `strait up` stops.
#[derive(Default)]
pub struct LocalRoutes {
    subnets: Vec<String>,
}

impl LocalRoutes {
    pub fn add(plan: &super::plan::Plan) -> anyhow::Result<Self> {
        let mut routes = LocalRoutes::default();
        for n in 1..=plan.clusters.len() {
            let [a, b, c] = super::plan::Plan::workload_subnet(plan.topology.address_base, n);
            let subnet = format!("{a}.{b}.{c}.0/24");
            let out = std::process::Command::new("ip")
                .args(["route", "replace", "local", &subnet, "dev", "lo", "table", "local"])
                .output()
                .context("running `ip` (iproute2)")?;
            if !out.status.success() {
                routes.remove();
                anyhow::bail!(
                    "cannot route {subnet} to lo: {} (strait up --kube needs root: an API server refuses loopback \
                     endpoint addresses, so workloads get 198.18.0.0/15 addresses made local on lo)",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            routes.subnets.push(subnet);
        }
        Ok(routes)
    }

    pub fn remove(&self) {
        for subnet in &self.subnets {
            let _ = std::process::Command::new("ip")
                .args(["route", "del", "local", subnet, "dev", "lo", "table", "local"])
                .output();
        }
    }
}

/// Creates a service account and writes a token for it (audience `strait`, one day) to `out`;
/// the sidecar or gateway authenticates to its CA with it, checked by TokenReview.
pub async fn service_account_token(client: &Client, ns: &str, name: &str, out: &Path) -> anyhow::Result<()> {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::ServiceAccount;
    let params = PatchParams::apply("strait-up").force();
    ensure_namespace(client, ns).await?;
    let sa: ServiceAccount = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": ns}
    }))?;
    let api = Api::<ServiceAccount>::namespaced(client.clone(), ns);
    api.patch(name, &params, &Patch::Apply(&sa)).await?;
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![strait_api::TOKEN_AUDIENCE.to_string()],
            expiration_seconds: Some(24 * 3600),
            ..Default::default()
        },
        ..Default::default()
    };
    let token = api
        .create_token_request(name, &kube::api::PostParams::default(), &request)
        .await?
        .status
        .map(|s| s.token)
        .context("the API server returned no token")?;
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(out, token)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::net::{IpAddr, Ipv4Addr, TcpListener};

    use super::{free_ports, listen_range};

    #[test]
    fn a_clusters_ports_are_distinct_free_and_outside_the_ephemeral_range() {
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let (first, end) = listen_range();
        for _ in 0..200 {
            let ports: [u16; 3] = free_ports(ip).unwrap();
            assert_eq!(ports.iter().collect::<BTreeSet<_>>().len(), 3, "{ports:?}");
            assert!(
                ports.iter().all(|p| (first..end).contains(p)),
                "{ports:?} not in {first}..{end}"
            );
            // All three can be listened on together, as etcd and kube-apiserver will. A process
            // another test forks while `free_ports` holds its listeners holds copies of them until
            // it runs its program (they close on exec), so a bind at once may wait for that.
            let bind = |port: u16| {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
                loop {
                    match TcpListener::bind((ip, port)) {
                        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && std::time::Instant::now() < deadline => {
                            std::thread::sleep(std::time::Duration::from_millis(5))
                        }
                        other => break other.unwrap(),
                    }
                }
            };
            let held: Vec<_> = ports.iter().map(|p| bind(*p)).collect();
            assert_eq!(held.len(), 3);
        }
    }
}
