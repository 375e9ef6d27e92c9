//! What `strait up` runs: clusters, zones, workloads. The default is the three-cluster demo;
//! `--topology FILE` replaces it. Every mistake in a topology file is reported at once with
//! its field path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use strait_federation::config::{humantime_ms, parse_yaml};
use strait_trust::TrustDomain;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Topology {
    #[serde(default = "default_td")]
    pub trust_domain: TrustDomain,
    /// Cluster n gets the loopback range 127.<addressBase>.<n>.0/24.
    #[serde(default = "default_base")]
    pub address_base: u8,
    #[serde(default = "default_lease", with = "humantime_ms")]
    pub lease: Duration,
    #[serde(default = "default_ttl", with = "humantime_ms")]
    pub cert_ttl: Duration,
    /// Every controller's `batchWindow`: changes arriving within it of the last merge wait
    /// and go out together (default 100ms; at most a tenth of `lease`).
    #[serde(default = "strait_federation::config::default_batch_window", with = "humantime_ms")]
    pub batch_window: Duration,
    /// A locality policy file applied in every cluster (relative to the topology file).
    #[serde(default)]
    pub policy: Option<PathBuf>,
    pub services: Vec<ServiceDef>,
    pub clusters: Vec<ClusterDef>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceDef {
    pub name: String,
    #[serde(default = "default_ns")]
    pub namespace: String,
    pub port: u16,
    #[serde(default)]
    pub protocol: strait_federation::source::ProtocolSpec,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterDef {
    pub name: String,
    pub region: String,
    pub zones: Vec<String>,
    #[serde(default)]
    pub workloads: Vec<WorkloadDef>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadDef {
    pub service: String,
    pub zone: String,
    #[serde(default)]
    pub name: Option<String>,
    /// Your own program (an argv list) in place of the demo app. It gets `STRAIT_APP_ADDR`
    /// (`<ip>:<port>`, where to listen) and `STRAIT_APP_PORT` in its environment; its sidecar
    /// carries what it speaks (the service's `protocol`). A program that exits is reported and
    /// its endpoint goes not-ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Labels that travel with the workload's endpoint in the catalog, e.g. `version: v2`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A Kubernetes label key (optional DNS prefix, then a name of up to 63 characters) and value.
fn label_ok(key: &str, value: &str) -> bool {
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.len() <= 63
            && n.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && n.starts_with(|c: char| c.is_ascii_alphanumeric())
            && n.ends_with(|c: char| c.is_ascii_alphanumeric())
    };
    let key_ok = match key.split_once('/') {
        Some((prefix, name)) => !prefix.is_empty() && prefix.len() <= 253 && name_ok(name),
        None => name_ok(key),
    };
    key_ok && (value.is_empty() || name_ok(value))
}

fn default_td() -> TrustDomain {
    "mesh.local".parse().expect("valid trust domain")
}
fn default_base() -> u8 {
    10
}
fn default_lease() -> Duration {
    Duration::from_secs(10)
}
fn default_ttl() -> Duration {
    strait_trust::DEFAULT_WORKLOAD_TTL
}
fn default_ns() -> String {
    "demo".into()
}

/// The demo of the README: east (two zones), west, central.
pub const DEFAULT_TOPOLOGY: &str = r#"
trustDomain: mesh.local
addressBase: 10
lease: 10s
certTtl: 24h
services:
  - {name: echo, port: 80, protocol: http}
  - {name: greeter, port: 80, protocol: http}
  - {name: ledger, port: 7000, protocol: tcp}
clusters:
  - name: east
    region: us-east
    zones: [us-east-1a, us-east-1b]
    workloads:
      - {service: echo, zone: us-east-1a}
      - {service: echo, zone: us-east-1b}
  - name: west
    region: us-west
    zones: [us-west-2a]
    workloads:
      - {service: echo, zone: us-west-2a}
      - {service: greeter, zone: us-west-2a}
  - name: central
    region: eu-central
    zones: [eu-central-1a]
    workloads:
      - {service: echo, zone: eu-central-1a}
      - {service: ledger, zone: eu-central-1a}
"#;

pub(crate) use strait::daemons::dns_label;

impl Topology {
    pub fn default_demo() -> Self {
        serde_yaml::from_str(DEFAULT_TOPOLOGY).expect("the built-in topology is valid")
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read topology {}: {e}", path.display()))?;
        let mut t: Topology = parse_yaml(path, &text)?;
        let errors = t.validate();
        if !errors.is_empty() {
            anyhow::bail!("{}:\n  {}", path.display(), errors.join("\n  "));
        }
        if let Some(p) = &t.policy {
            if p.is_relative() {
                t.policy = Some(path.parent().unwrap_or(Path::new(".")).join(p));
            }
        }
        Ok(t)
    }

    /// Every problem, each naming its field and the fix.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = vec![];
        if self.address_base == 0 || self.address_base == 255 {
            errors.push("field `addressBase`: use 1-254 (clusters get 127.<addressBase>.<n>.0/24)".into());
        }
        if let Err(e) = strait_federation::config::check_batch_window(self.batch_window, self.lease) {
            errors.push(e);
        }
        if self.clusters.is_empty() {
            errors.push("field `clusters`: list at least one cluster".into());
        }
        if self.clusters.len() > 250 {
            errors.push("field `clusters`: at most 250 clusters fit the loopback plan".into());
        }
        for (i, s) in self.services.iter().enumerate() {
            if !dns_label(&s.name) {
                errors.push(format!(
                    "field `services[{i}].name`: {:?} is not a DNS label (e.g. echo)",
                    s.name
                ));
            }
            if s.port == 0 {
                errors.push(format!("field `services[{i}].port`: use 1-65535"));
            }
            if self.services[..i]
                .iter()
                .any(|o| o.name == s.name && o.namespace == s.namespace)
            {
                errors.push(format!("field `services[{i}].name`: {} is defined twice", s.name));
            }
        }
        for (i, c) in self.clusters.iter().enumerate() {
            if !dns_label(&c.name) {
                errors.push(format!(
                    "field `clusters[{i}].name`: {:?} is not a DNS label (e.g. east)",
                    c.name
                ));
            }
            if self.clusters[..i].iter().any(|o| o.name == c.name) {
                errors.push(format!(
                    "field `clusters[{i}].name`: cluster {} is defined twice",
                    c.name
                ));
            }
            if c.region.is_empty() {
                errors.push(format!("field `clusters[{i}].region`: give a region, e.g. us-east"));
            }
            if c.zones.is_empty() {
                errors.push(format!(
                    "field `clusters[{i}].zones`: list at least one zone, e.g. [us-east-1a]"
                ));
            }
            if c.workloads.len() > 200 {
                errors.push(format!(
                    "field `clusters[{i}].workloads`: at most 200 workloads per cluster"
                ));
            }
            for (j, w) in c.workloads.iter().enumerate() {
                if !self.services.iter().any(|s| s.name == w.service) {
                    errors.push(format!(
                        "field `clusters[{i}].workloads[{j}].service`: {:?} is not in `services`; add it there",
                        w.service
                    ));
                }
                if let Some(cmd) = &w.command {
                    if cmd.first().is_none_or(|p| p.trim().is_empty()) {
                        errors.push(format!(
                            "field `clusters[{i}].workloads[{j}].command`: give the program and its arguments, e.g. [python3, -m, http.server]"
                        ));
                    }
                }
                for (k, v) in &w.labels {
                    if !label_ok(k, v) {
                        errors.push(format!(
                            "field `clusters[{i}].workloads[{j}].labels.{k}`: {k}={v:?} is not a Kubernetes label (names of up to 63 letters, digits, -_. e.g. version: v2)"
                        ));
                    }
                }
                if !c.zones.contains(&w.zone) {
                    errors.push(format!(
                        "field `clusters[{i}].workloads[{j}].zone`: {:?} is not one of cluster {}'s zones ({})",
                        w.zone,
                        c.name,
                        c.zones.join(", ")
                    ));
                }
            }
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_topology_is_valid() {
        let t = Topology::default_demo();
        assert!(t.validate().is_empty());
        assert_eq!(t.clusters.len(), 3);
    }

    #[test]
    fn mistakes_are_named() {
        let mut t = Topology::default_demo();
        t.clusters[0].workloads[0].zone = "mars-1a".into();
        t.clusters[1].workloads[1].service = "nope".into();
        let errors = t.validate();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].contains("clusters[0].workloads[0].zone"));
        assert!(errors[1].contains("clusters[1].workloads[1].service"));
    }

    #[test]
    fn the_batch_window_defaults_and_is_checked_against_the_lease() {
        let mut t = Topology::default_demo();
        assert_eq!(t.batch_window, strait_federation::config::default_batch_window());
        t.lease = Duration::from_secs(2);
        t.batch_window = Duration::from_millis(500);
        let errors = t.validate();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("field `batchWindow`: 500ms is longer than a tenth of `lease` (2s)"),
            "{errors:?}"
        );
    }

    #[test]
    fn own_workloads_take_a_command_and_labels() {
        let t: Topology = serde_yaml::from_str(
            r#"
services: [{name: api, port: 8080, protocol: grpc}]
clusters:
  - name: east
    region: us-east
    zones: [us-east-1a]
    workloads:
      - {service: api, zone: us-east-1a, command: [my-server, --port, "8080"], labels: {version: v2}}
      - {service: api, zone: us-east-1a, command: [], labels: {"bad key!": x}}
"#,
        )
        .unwrap();
        let w = &t.clusters[0].workloads[0];
        assert_eq!(w.command.as_deref().unwrap()[0], "my-server");
        assert_eq!(w.labels["version"], "v2");
        let errors = t.validate();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].contains("workloads[1].command"), "{errors:?}");
        assert!(errors[1].contains("workloads[1].labels.bad key!"), "{errors:?}");
    }
}
