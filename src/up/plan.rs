//! Turns a topology into concrete addresses, identities and files: each cluster's
//! intermediate CA, catalog and controller config, under one state directory.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use strait_federation::config::{ControllerConfig, GatewayRef, JoinToken, Peer};
use strait_federation::source::{CatalogFile, EndpointSpec, PortSpec, ProtocolSpec, ServiceSpec};

use super::topology::Topology;

pub const CONTROLLER_GRPC_PORT: u16 = 15012;
pub const CONTROLLER_ADMIN_PORT: u16 = 15014;
pub const GATEWAY_PORT: u16 = 15443;
pub const GATEWAY_ADMIN_PORT: u16 = 15021;
pub const APP_PORT: u16 = 8080;
pub const INBOUND_PORT: u16 = 15006;
pub const OUTBOUND_PORT: u16 = 15001;
pub const SIDECAR_ADMIN_PORT: u16 = 15000;
pub const INJECTOR_PORT: u16 = 15017;
pub const DNS_PROXY: &str = "127.0.0.1:15053";
/// The sidecar's UID in `strait up --netns` (what `strait sidecar init` excludes).
pub const SIDECAR_UID: u32 = 1337;
/// The bridge between clusters in `strait up --netns`: gateway n has 198.19.255.n on it.
pub const INTER_CLUSTER_NET: [u8; 3] = [198, 19, 255];

/// Where the components of a cluster live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every process on the cluster's loopback range (the default).
    Loopback,
    /// Workloads on 198.18.0.0/15 addresses made local on `lo` (`--kube`).
    Kube,
    /// Every component in its own network namespace (`--netns`).
    Netns,
}

#[derive(Clone, Debug)]
pub struct WorkloadPlan {
    pub name: String,
    pub service: String,
    pub namespace: String,
    pub zone: String,
    pub tcp: bool,
    /// The workload's own address (its pod IP in `--netns` and `--kube`).
    pub ip: IpAddr,
    /// What the catalog advertises: the inbound listener on loopback, the pod IP and app port
    /// (redirected to the inbound listener by iptables) in `--netns`.
    pub endpoint: SocketAddr,
    pub app: SocketAddr,
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
    pub token: String,
    /// The user's program in place of the demo app.
    pub command: Option<Vec<String>>,
    pub labels: std::collections::BTreeMap<String, String>,
}

#[derive(Clone, Debug)]
pub struct ClusterPlan {
    pub name: String,
    pub region: String,
    pub zones: Vec<String>,
    pub dir: PathBuf,
    pub controller: SocketAddr,
    pub controller_admin: SocketAddr,
    /// The gateway's address as other clusters dial it.
    pub gateway: SocketAddr,
    /// Where the gateway listens (UDP for QUIC, TCP for the fallback).
    pub gateway_listen: SocketAddr,
    pub gateway_admin: SocketAddr,
    pub gateway_token: String,
    pub workloads: Vec<WorkloadPlan>,
}

impl ClusterPlan {
    pub fn controller_config(&self) -> PathBuf {
        self.dir.join("controller.yaml")
    }

    /// Where `strait up --kube` writes a component's service-account token.
    pub fn token_file(&self, component: &str) -> PathBuf {
        self.dir.join("tokens").join(format!("{component}.token"))
    }
}

pub struct Plan {
    pub topology: Topology,
    pub mode: Mode,
    /// Clusters are backed by real API servers (`strait up --kube`).
    pub kube: bool,
    pub state_dir: PathBuf,
    pub bundle: PathBuf,
    pub clusters: Vec<ClusterPlan>,
    /// Flags for every sidecar and gateway: spans and access logs.
    pub telemetry: Vec<String>,
    /// `--scope-namespaces` for every sidecar (empty: every namespace).
    pub sidecar_scope: Vec<String>,
    /// `--scope-authorized` for every sidecar.
    pub sidecar_scope_authorized: bool,
}

/// The address of `host` in cluster number `cluster` (1-based).
pub fn cluster_ip(base: u8, cluster: usize, host: u8) -> IpAddr {
    ip(base, cluster, host)
}

fn ip(base: u8, cluster: usize, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, base, cluster as u8, host))
}

fn token() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

impl Plan {
    /// With `kube`, workloads get addresses from the benchmarking range 198.18.0.0/15 instead
    /// of loopback: an API server refuses loopback addresses in EndpointSlices. `strait up`
    /// makes each cluster's /24 local with a route on `lo` ([`Plan::workload_subnet`]).
    ///
    /// With `--netns`, cluster n's bridge carries the same /24: controller .1, gateway .2 (and
    /// 198.19.255.n on the bridge between clusters), workloads from .10, the host .254.
    pub fn new(topology: Topology, state_dir: &Path, mode: Mode) -> Self {
        let base = topology.address_base;
        let kube = mode == Mode::Kube;
        let netns = mode == Mode::Netns;
        let clusters = topology
            .clusters
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let n = i + 1;
                let infra = |host: u8| {
                    if netns {
                        Self::subnet_ip(base, n, host)
                    } else {
                        ip(base, n, host)
                    }
                };
                let mut used: Vec<String> = vec![];
                let workloads = c
                    .workloads
                    .iter()
                    .enumerate()
                    .map(|(j, w)| {
                        let def = topology.services.iter().find(|s| s.name == w.service);
                        let mut name = w.name.clone().unwrap_or_else(|| format!("{}-{}", w.service, w.zone));
                        if used.contains(&name) {
                            name = format!("{name}-{j}");
                        }
                        used.push(name.clone());
                        let host = if kube || netns {
                            Self::subnet_ip(base, n, 10 + j as u8)
                        } else {
                            ip(base, n, 10 + j as u8)
                        };
                        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
                        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
                        WorkloadPlan {
                            name,
                            service: w.service.clone(),
                            namespace: def.map(|d| d.namespace.clone()).unwrap_or_else(|| "demo".into()),
                            zone: w.zone.clone(),
                            tcp: def.is_some_and(|d| d.protocol == ProtocolSpec::Tcp),
                            ip: host,
                            endpoint: SocketAddr::new(host, if netns { APP_PORT } else { INBOUND_PORT }),
                            app: SocketAddr::new(if netns { lo } else { host }, APP_PORT),
                            inbound: SocketAddr::new(if netns { any } else { host }, INBOUND_PORT),
                            outbound: SocketAddr::new(if netns { any } else { host }, OUTBOUND_PORT),
                            admin: SocketAddr::new(host, SIDECAR_ADMIN_PORT),
                            token: token(),
                            command: w.command.clone(),
                            // As a Deployment's pods carry it: dashboards group by `app`.
                            labels: {
                                let mut labels = w.labels.clone();
                                labels.entry("app".into()).or_insert_with(|| w.service.clone());
                                labels
                            },
                        }
                    })
                    .collect();
                ClusterPlan {
                    name: c.name.clone(),
                    region: c.region.clone(),
                    zones: c.zones.clone(),
                    dir: state_dir.join(&c.name),
                    controller: SocketAddr::new(infra(1), CONTROLLER_GRPC_PORT),
                    controller_admin: SocketAddr::new(infra(1), CONTROLLER_ADMIN_PORT),
                    gateway: if netns {
                        let [a, b, c] = INTER_CLUSTER_NET;
                        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(a, b, c, n as u8)), GATEWAY_PORT)
                    } else {
                        SocketAddr::new(infra(2), GATEWAY_PORT)
                    },
                    gateway_listen: SocketAddr::new(
                        if netns {
                            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
                        } else {
                            infra(2)
                        },
                        GATEWAY_PORT,
                    ),
                    gateway_admin: SocketAddr::new(infra(2), GATEWAY_ADMIN_PORT),
                    gateway_token: token(),
                    workloads,
                }
            })
            .collect();
        Plan {
            topology,
            mode,
            kube,
            state_dir: state_dir.to_path_buf(),
            bundle: state_dir.join("trust").join("bundle.pem"),
            clusters,
            telemetry: vec![],
            sidecar_scope: vec![],
            sidecar_scope_authorized: false,
        }
    }

    /// The /24 (first three octets) of cluster `n`'s workloads in kube mode: one of the first 511
    /// /24s of 198.18.0.0/15, chosen by the address base so that meshes on one machine differ.
    /// The last, 198.19.255.0/24, is the bridge between clusters in `--netns` mode
    /// ([`INTER_CLUSTER_NET`]): with all 512, address base 127's third cluster got it, and its
    /// controller's route to the bridge failed ("File exists").
    pub fn workload_subnet(base: u8, n: usize) -> [u8; 3] {
        let index = (base as usize * 4 + n) % 511;
        [198, 18 + (index / 256) as u8, (index % 256) as u8]
    }

    /// Host `host` of cluster `n`'s /24 in 198.18.0.0/15.
    pub fn subnet_ip(base: u8, n: usize, host: u8) -> IpAddr {
        let [a, b, c] = Self::workload_subnet(base, n);
        IpAddr::V4(Ipv4Addr::new(a, b, c, host))
    }

    /// The kubeconfig of a cluster's API server (`strait up --kube`).
    pub fn kubeconfig(c: &ClusterPlan) -> PathBuf {
        c.dir.join("kube").join("kubeconfig")
    }

    /// Writes the trust root, every cluster's intermediate, catalog and controller config.
    /// With `kube`, controllers read their own cluster's API server instead of the catalog.
    /// Writes cluster `c`'s catalog file; the workloads named in `not_ready` have not-ready
    /// endpoints (their program exited). The controller picks up the change by itself.
    pub fn write_catalog(&self, c: &ClusterPlan, not_ready: &[String]) -> anyhow::Result<()> {
        let catalog = CatalogFile {
            services: self
                .topology
                .services
                .iter()
                .filter(|s| c.workloads.iter().any(|w| w.service == s.name))
                .map(|s| ServiceSpec {
                    name: s.name.clone(),
                    namespace: s.namespace.clone(),
                    ports: vec![PortSpec {
                        name: s.protocol.as_str().into(),
                        port: s.port,
                        protocol: s.protocol,
                    }],
                    service_account: s.name.clone(),
                    export: true,
                    endpoints: c
                        .workloads
                        .iter()
                        .filter(|w| w.service == s.name)
                        .map(|w| EndpointSpec {
                            workload: w.name.clone(),
                            address: w.endpoint,
                            zone: w.zone.clone(),
                            subzone: String::new(),
                            ready: !not_ready.contains(&w.name),
                            labels: w.labels.clone(),
                        })
                        .collect(),
                })
                .collect(),
        };
        let dir = c.dir.join("catalog");
        // Written aside and renamed, so the controller never reads half a file.
        let tmp = dir.join(".services.yaml.tmp");
        std::fs::write(&tmp, serde_yaml::to_string(&catalog)?)?;
        std::fs::rename(&tmp, dir.join("services.yaml"))?;
        Ok(())
    }

    /// Where `strait up` writes the operator's credential (for `strait apply` and `delete`).
    pub fn operator_dir(&self) -> PathBuf {
        self.state_dir.join("operator")
    }

    /// Issues the operator identity (`strait-system/strait-operator`, the only one a
    /// controller lets write routes and policies) into the state directory, and makes it the
    /// CLI's default credential (`~/.config/strait/operator`, replaced whole).
    fn write_operator(&self, root: &strait_trust::Authority) -> anyhow::Result<()> {
        let td = &self.topology.trust_domain;
        let id = strait_trust::SpiffeId::workload(
            td,
            strait_api::SYSTEM_NAMESPACE,
            strait_federation::policy_api::OPERATOR_SA,
        )?;
        let bundle = strait_trust::TrustBundle::load(&self.bundle)?;
        let ttl = std::time::Duration::from_secs(7 * 24 * 3600);
        strait_trust::write_credentials(&self.operator_dir(), root, &id, ttl, &bundle)?;
        if let Some(default) = crate::cmd::default_credentials() {
            let tmp = default.with_extension(format!("tmp{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            strait_trust::write_credentials(&tmp, root, &id, ttl, &bundle)?;
            let _ = std::fs::remove_dir_all(&default);
            if let Err(e) = std::fs::rename(&tmp, &default) {
                tracing::warn!(error = %e, dir = %default.display(), "cannot update the default operator credential");
            }
        }
        Ok(())
    }

    pub fn write(&self, kube: bool) -> anyhow::Result<()> {
        let td = &self.topology.trust_domain;
        let root = crate::cmd::trust_init(td, &self.state_dir.join("trust"), true)?;
        self.write_operator(&root)?;
        for c in &self.clusters {
            std::fs::create_dir_all(c.dir.join("catalog"))?;
            std::fs::create_dir_all(c.dir.join("routes"))?;
            root.new_intermediate(&c.name, SystemTime::now())?
                .write(&c.dir.join("ca"))?;
            self.write_catalog(c, &[])?;
            let mut tokens: Vec<JoinToken> = c
                .workloads
                .iter()
                .map(|w| JoinToken {
                    token: w.token.clone(),
                    namespace: w.namespace.clone(),
                    service_account: w.service.clone(),
                })
                .collect();
            tokens.push(JoinToken {
                token: c.gateway_token.clone(),
                namespace: strait_api::SYSTEM_NAMESPACE.into(),
                service_account: strait_api::GATEWAY_SA.into(),
            });
            let policy = match &self.topology.policy {
                Some(p) => {
                    let dest = c.dir.join("policy.yaml");
                    std::fs::copy(p, &dest).map_err(|e| anyhow::anyhow!("cannot copy policy {}: {e}", p.display()))?;
                    Some(dest)
                }
                None => None,
            };
            let config = ControllerConfig {
                cluster: c.name.clone(),
                region: c.region.clone(),
                trust_domain: td.clone(),
                listen: c.controller,
                admin: c.controller_admin,
                ca_dir: c.dir.join("ca"),
                bundle: self.bundle.clone(),
                catalog_dir: (!kube).then(|| c.dir.join("catalog")),
                routes_dir: Some(c.dir.join("routes")),
                state_dir: Some(c.dir.join("state")),
                kubernetes: kube.then(|| strait_federation::config::KubernetesSource {
                    kubeconfig: Some(Self::kubeconfig(c)),
                    injector: Some(strait_federation::config::InjectorConfig {
                        listen: SocketAddr::new(c.controller.ip(), INJECTOR_PORT),
                        url: Some(format!("https://{}:{INJECTOR_PORT}/inject", c.controller.ip())),
                        image: concat!("strait:", env!("CARGO_PKG_VERSION")).into(),
                        controller_address: c.controller.to_string(),
                    }),
                }),
                policy,
                gateway: GatewayRef {
                    address: c.gateway,
                    zone: c.zones.first().cloned().unwrap_or_default(),
                },
                peers: self
                    .clusters
                    .iter()
                    .filter(|p| p.name != c.name)
                    .map(|p| Peer {
                        name: p.name.clone(),
                        gateway: p.gateway,
                    })
                    .collect(),
                // With --kube, workloads prove who they are with service-account tokens instead.
                join_tokens: if kube { vec![] } else { tokens },
                lease: self.topology.lease,
                batch_window: self.topology.batch_window,
                cert_ttl: self.topology.cert_ttl,
                // 241.0.0.0/8 and up hold the API servers' Service ranges (strait up --kube).
                clusterset_ip_range: "240.0.0.0/8".into(),
            };
            std::fs::write(c.controller_config(), serde_yaml::to_string(&config)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_clusters_subnet_is_the_bridge_between_clusters() {
        for base in 1..=254u8 {
            for n in 1..=250 {
                assert_ne!(
                    Plan::workload_subnet(base, n),
                    INTER_CLUSTER_NET,
                    "address base {base}, cluster {n}"
                );
            }
            // One mesh's clusters never share a /24.
            let mut seen: Vec<[u8; 3]> = (1..=250).map(|n| Plan::workload_subnet(base, n)).collect();
            seen.sort();
            seen.dedup();
            assert_eq!(seen.len(), 250, "address base {base}");
        }
    }
}
