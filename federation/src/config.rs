//! The controller's own configuration file (YAML), parsed into types that hold only valid
//! values; every bad field is reported at once with its path and the fix.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use strait_trust::TrustDomain;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ControllerConfig {
    pub cluster: String,
    pub region: String,
    pub trust_domain: TrustDomain,
    /// gRPC (mTLS) address: config stream, CA, peering.
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    /// The directory holding `ca.pem`/`ca-key.pem` of this cluster's intermediate CA.
    pub ca_dir: PathBuf,
    /// PEM roots of every trust domain this cluster accepts.
    pub bundle: PathBuf,
    /// Directory of catalog files (the file source). Set this or `kubernetes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalog_dir: Option<PathBuf>,
    /// Kubernetes mode: read Services, EndpointSlices and ServiceExports from this cluster's
    /// API server and write ServiceImports back. Set this or `catalogDir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesSource>,
    /// Optional locality policy file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PathBuf>,
    /// Optional directory of HTTPRoute files (`gateway.networking.k8s.io/v1`), applied to this
    /// cluster's proxies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes_dir: Option<PathBuf>,
    /// Optional directory where the controller keeps what it last heard from each peer (one
    /// file per peer), so that after a restart it asks each peer only for what changed
    /// instead of every export, serves its proxies the clusterset's catalog at once, and keeps
    /// enforcing the clusterset policies of a peer it cannot reach. Unset: kept in memory only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// This cluster's gateway, announced to peers.
    pub gateway: GatewayRef,
    #[serde(default)]
    pub peers: Vec<Peer>,
    #[serde(default)]
    pub join_tokens: Vec<JoinToken>,
    /// Lease on exports; a peer silent this long is dropped. Default 10s.
    #[serde(default = "default_lease", with = "humantime_ms")]
    pub lease: Duration,
    /// The shortest time between two rebuilds of this cluster's catalog. A change that
    /// arrives sooner waits for the window to end, and every change in it goes out in one
    /// rebuild and one push to proxies; a change after a quiet window goes out at once.
    /// Default 100ms (Istio's debounce default); at most a tenth of `lease`. At the published
    /// scale (10 clusters, 50 changes/s) 50ms cost every controller 21 % more CPU and every
    /// sidecar 17 % more, for a change→ACK p99 of 108 instead of 197 ms (README).
    #[serde(default = "default_batch_window", with = "humantime_ms")]
    pub batch_window: Duration,
    /// Lifetime of workload certificates. Default 24h.
    #[serde(default = "default_ttl", with = "humantime_ms")]
    pub cert_ttl: Duration,
    /// ClusterSet IP range (never routed). Default 240.0.0.0/4.
    #[serde(default = "default_range")]
    pub clusterset_ip_range: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubernetesSource {
    /// A kubeconfig for this cluster only; absent = the in-cluster service account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
    /// The sidecar-injecting admission webhook; absent = no injection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub injector: Option<InjectorConfig>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InjectorConfig {
    /// HTTPS address the webhook listens on.
    pub listen: SocketAddr,
    /// The URL the API server calls; absent = the strait-federation Service in strait-system.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The image of injected sidecars.
    pub image: String,
    /// How injected sidecars reach this controller (host:port).
    #[serde(default = "default_controller_address")]
    pub controller_address: String,
}

fn default_controller_address() -> String {
    "strait-federation.strait-system.svc:15012".into()
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayRef {
    pub address: SocketAddr,
    pub zone: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Peer {
    pub name: String,
    /// UDP address of the peer's east-west gateway.
    pub gateway: SocketAddr,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JoinToken {
    pub token: String,
    pub namespace: String,
    pub service_account: String,
}

fn default_lease() -> Duration {
    Duration::from_secs(10)
}
pub fn default_batch_window() -> Duration {
    Duration::from_millis(100)
}
fn default_ttl() -> Duration {
    strait_trust::DEFAULT_WORKLOAD_TTL
}
fn default_range() -> String {
    "240.0.0.0/4".into()
}

/// Durations as `500ms`, `10s`, `5m`, `24h`.
pub mod humantime_ms {
    use std::time::Duration;

    pub fn parse(s: &str) -> Result<Duration, String> {
        let s = s.trim();
        let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len()));
        let n: f64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a duration (use e.g. 500ms, 10s, 5m, 24h)"))?;
        let secs = match unit {
            "ms" => n / 1000.0,
            "s" | "" => n,
            "m" => n * 60.0,
            "h" => n * 3600.0,
            _ => return Err(format!("{s:?} has an unknown unit (use ms, s, m or h)")),
        };
        if secs <= 0.0 {
            return Err(format!("{s:?} must be positive"));
        }
        Ok(Duration::from_secs_f64(secs))
    }

    pub fn format(d: &Duration) -> String {
        if d.as_millis().is_multiple_of(1000) {
            format!("{}s", d.as_secs())
        } else {
            format!("{}ms", d.as_millis())
        }
    }

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(d))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = <String as serde::Deserialize>::deserialize(d)?;
        parse(&s).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Parses YAML into `T`, naming the field path of the first error and the file.
pub fn parse_yaml<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        let location = inner
            .location()
            .map(|l| format!(" (line {}, column {})", l.line(), l.column()))
            .unwrap_or_default();
        let message = if field == "." || field.is_empty() {
            format!("{inner}{location}")
        } else {
            format!("field `{field}`: {inner}{location}")
        };
        ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        }
    })
}

impl ControllerConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config: ControllerConfig = parse_yaml(path, &text)?;
        if config.catalog_dir.is_some() == config.kubernetes.is_some() {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                message: "set exactly one source: `catalogDir` (a directory of catalog files) or `kubernetes` \
                          (this cluster's API server)"
                    .into(),
            });
        }
        // Cluster names are DNS labels (they name peers' files in `stateDir`, too).
        let names = std::iter::once(("cluster".to_string(), &config.cluster)).chain(
            config
                .peers
                .iter()
                .enumerate()
                .map(|(i, p)| (format!("peers[{i}].name"), &p.name)),
        );
        for (field, name) in names {
            if !strait_api::dns_label(name) {
                return Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    message: format!(
                        "field `{field}`: {name:?} is not a cluster name: use lowercase letters, digits and '-' (a DNS label, e.g. east)"
                    ),
                });
            }
        }
        if let Some(state) = &config.state_dir {
            let shared = [("catalogDir", &config.catalog_dir), ("routesDir", &config.routes_dir)]
                .into_iter()
                .find(|(_, dir)| dir.as_ref() == Some(state));
            if let Some((field, _)) = shared {
                return Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    message: format!(
                        "field `stateDir`: {} is also `{field}`; the controller writes its own files there, so give it a directory of its own",
                        state.display()
                    ),
                });
            }
        }
        check_batch_window(config.batch_window, config.lease).map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(config)
    }
}

/// `batchWindow` may be at most a tenth of `lease` (the controller config's rule, and the
/// `strait up` topology's, which writes both into every controller's config).
pub fn check_batch_window(window: Duration, lease: Duration) -> Result<(), String> {
    if window > lease / 10 {
        return Err(format!(
            "field `batchWindow`: {} is longer than a tenth of `lease` ({}); changes would wait \
             too long to reach proxies and peers. Use e.g. 100ms",
            humantime_ms::format(&window),
            humantime_ms::format(&lease)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_format() {
        assert_eq!(humantime_ms::parse("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(humantime_ms::parse("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(humantime_ms::parse("24h").unwrap(), Duration::from_secs(86400));
        assert!(humantime_ms::parse("0s").is_err());
        assert!(humantime_ms::parse("ten").is_err());
        assert_eq!(humantime_ms::format(&Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn the_batch_window_defaults_and_is_bounded_by_the_lease() {
        let dir = std::env::temp_dir().join(format!("strait-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("controller.yaml");
        let base = "cluster: east\nregion: us-east\ntrustDomain: mesh.local\nlisten: 127.0.0.1:15012\n\
                    admin: 127.0.0.1:15014\ncaDir: /tmp/ca\nbundle: /tmp/bundle.pem\ncatalogDir: /tmp/catalog\n\
                    gateway: {address: 127.0.0.1:15443, zone: a}\n";
        std::fs::write(&path, base).unwrap();
        let c = ControllerConfig::load(&path).unwrap();
        assert_eq!(c.batch_window, Duration::from_millis(100));
        std::fs::write(&path, format!("{base}batchWindow: 5ms\n")).unwrap();
        assert_eq!(
            ControllerConfig::load(&path).unwrap().batch_window,
            Duration::from_millis(5)
        );
        std::fs::write(&path, format!("{base}lease: 3s\nbatchWindow: 500ms\n")).unwrap();
        let e = ControllerConfig::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("`batchWindow`") && e.contains("tenth of `lease` (3s)"),
            "{e}"
        );
        std::fs::write(&path, format!("{base}batchWindow: 0ms\n")).unwrap();
        let e = ControllerConfig::load(&path).unwrap_err().to_string();
        assert!(e.contains("`batchWindow`") && e.contains("positive"), "{e}");
        // Cluster names are DNS labels.
        let peer = "peers: [{name: ../west, gateway: 127.0.0.1:15443}]\n";
        std::fs::write(&path, format!("{base}{peer}")).unwrap();
        let e = ControllerConfig::load(&path).unwrap_err().to_string();
        assert!(e.contains("`peers[0].name`") && e.contains("DNS label"), "{e}");
        // The state directory is the controller's own.
        std::fs::write(&path, format!("{base}stateDir: /tmp/state\n")).unwrap();
        assert_eq!(
            ControllerConfig::load(&path).unwrap().state_dir,
            Some(PathBuf::from("/tmp/state"))
        );
        std::fs::write(&path, format!("{base}stateDir: /tmp/catalog\n")).unwrap();
        let e = ControllerConfig::load(&path).unwrap_err().to_string();
        assert!(e.contains("`stateDir`") && e.contains("`catalogDir`"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
