//! The objects of one cluster's install, built as JSON values from typed settings.

use serde_json::{json, Value};
use strait_federation::config::{ControllerConfig, GatewayRef, InjectorConfig, KubernetesSource};
use strait_federation::k8s::inject::{webhook_configuration, WEBHOOK_CONFIG};

pub const NAMESPACE: &str = strait_api::SYSTEM_NAMESPACE;
const CONTROLLER: &str = "strait-federation";
const GATEWAY: &str = "strait-gateway";
const GRPC_PORT: u16 = 15012;
const ADMIN_PORT: u16 = 15014;
const GATEWAY_PORT: u16 = 15443;
const GATEWAY_ADMIN_PORT: u16 = 15021;
const INJECTOR_PORT: u16 = 15017;
/// Where the controller keeps what it last heard from each peer (`stateDir`).
const STATE_DIR: &str = "/var/lib/strait/state";
/// The claim that holds it when it is to outlive the controller's pod ([`StateVolume`]).
const STATE_CLAIM: &str = "strait-federation-state";
/// The user and group the components run as ([`security_context`]).
const RUN_AS: u32 = 65532;

/// What differs between clusters.
#[derive(Clone, Debug)]
pub struct Settings {
    pub cluster: String,
    pub region: String,
    pub zone: String,
    pub gateway_address: std::net::SocketAddr,
    pub trust_domain: strait_trust::TrustDomain,
    pub image: String,
    /// Where the controller keeps its state: `None` for an emptyDir (kept across the
    /// container's restarts, not the pod's).
    pub state_volume: Option<StateVolume>,
}

/// A PersistentVolumeClaim for the controller's state: what its peers last told it outlives
/// its pod (an upgrade, a reschedule, a node drain), so a new pod resumes every peer and keeps
/// their policies in force while one is unreachable. One pod holds the claim at a time: the
/// Deployment replaces its pod with `Recreate`, never two controllers writing one directory.
#[derive(Clone, Debug)]
pub struct StateVolume {
    /// A Kubernetes quantity, e.g. `1Gi` ([`StateVolume::new`] checks it).
    pub size: String,
    /// `None`: the cluster's default StorageClass.
    pub storage_class: Option<String>,
}

impl StateVolume {
    /// Checks `size` (a whole number with a binary or decimal suffix, as Kubernetes writes
    /// storage sizes) and the class's name, each error naming the flag and the fix.
    pub fn new(size: &str, storage_class: Option<&str>) -> anyhow::Result<Self> {
        let digits = size.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        let suffix = &size[digits.len()..];
        let known = ["Ki", "Mi", "Gi", "Ti", "k", "M", "G", "T"];
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || !known.contains(&suffix) {
            anyhow::bail!(
                "--state-volume-size {size:?} is not a storage size: give a whole number with a unit ({}), e.g. 1Gi",
                known.join(", ")
            );
        }
        if let Some(class) = storage_class {
            let dns_subdomain = class.len() <= 253 && class.split('.').all(strait_api::dns_label);
            if !dns_subdomain {
                anyhow::bail!(
                    "--state-storage-class {class:?} is not a StorageClass name: lowercase letters, digits, '-' and '.', e.g. standard"
                );
            }
        }
        Ok(StateVolume {
            size: size.into(),
            storage_class: storage_class.map(str::to_string),
        })
    }

    fn claim(&self) -> Value {
        let mut spec = json!({"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": self.size}}});
        if let Some(class) = &self.storage_class {
            spec["storageClassName"] = json!(class);
        }
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta(STATE_CLAIM, CONTROLLER),
               "spec": spec})
    }
}

fn labels(component: &str) -> Value {
    json!({"app.kubernetes.io/name": component, "app.kubernetes.io/part-of": "strait",
           "app.kubernetes.io/managed-by": "strait-install"})
}

fn meta(name: &str, component: &str) -> Value {
    json!({"name": name, "namespace": NAMESPACE, "labels": labels(component)})
}

/// Locked down: no root, no privilege escalation, no capabilities, read-only root filesystem.
fn security_context() -> Value {
    json!({"runAsNonRoot": true, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "allowPrivilegeEscalation": false,
           "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]},
           "seccompProfile": {"type": "RuntimeDefault"}})
}

fn probe(path: &str, port: u16) -> Value {
    json!({"httpGet": {"path": path, "port": port}, "periodSeconds": 5, "failureThreshold": 3})
}

/// The controller's configuration in the cluster (the same typed struct the controller reads).
fn controller_config(s: &Settings) -> anyhow::Result<String> {
    let config = ControllerConfig {
        cluster: s.cluster.clone(),
        region: s.region.clone(),
        trust_domain: s.trust_domain.clone(),
        listen: format!("0.0.0.0:{GRPC_PORT}").parse()?,
        admin: format!("0.0.0.0:{ADMIN_PORT}").parse()?,
        ca_dir: "/etc/strait/ca".into(),
        bundle: "/etc/strait/ca/bundle.pem".into(),
        catalog_dir: None,
        routes_dir: None,
        // An emptyDir (kept across the container's restarts: a crash, an OOM kill) or, with a
        // state volume, a claim that outlives the pod.
        state_dir: Some(STATE_DIR.into()),
        kubernetes: Some(KubernetesSource {
            kubeconfig: None,
            injector: Some(InjectorConfig {
                listen: format!("0.0.0.0:{INJECTOR_PORT}").parse()?,
                url: None,
                image: s.image.clone(),
                controller_address: format!("{CONTROLLER}.{NAMESPACE}.svc:{GRPC_PORT}"),
            }),
        }),
        policy: None,
        gateway: GatewayRef {
            address: s.gateway_address,
            zone: s.zone.clone(),
        },
        peers: vec![],
        join_tokens: vec![],
        lease: std::time::Duration::from_secs(10),
        batch_window: strait_federation::config::default_batch_window(),
        cert_ttl: strait_trust::DEFAULT_WORKLOAD_TTL,
        clusterset_ip_range: "240.0.0.0/4".into(),
    };
    Ok(serde_yaml::to_string(&config)?)
}

/// Everything but the CRDs, in apply order.
pub fn manifests(s: &Settings) -> anyhow::Result<Vec<Value>> {
    let controller_rules = json!([
        {"apiGroups": [""], "resources": ["services", "namespaces", "pods", "nodes"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["multicluster.x-k8s.io"], "resources": ["serviceexports"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["multicluster.x-k8s.io"], "resources": ["serviceexports/status"], "verbs": ["patch", "update"]},
        {"apiGroups": ["multicluster.x-k8s.io"], "resources": ["serviceimports"],
         "verbs": ["get", "list", "watch", "create", "patch", "update", "delete"]},
        {"apiGroups": ["multicluster.x-k8s.io"], "resources": ["serviceimports/status"], "verbs": ["patch", "update"]},
        {"apiGroups": ["policy.strait.dev"], "resources": ["localitypolicies", "trafficpolicies", "authorizationpolicies"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["policy.strait.dev"], "resources": ["localitypolicies/status", "trafficpolicies/status", "authorizationpolicies/status"], "verbs": ["patch", "update"]},
        {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["httproutes", "grpcroutes"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["httproutes/status", "grpcroutes/status"], "verbs": ["patch", "update"]},
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
        {"apiGroups": ["admissionregistration.k8s.io"], "resources": ["mutatingwebhookconfigurations"],
         "resourceNames": [WEBHOOK_CONFIG], "verbs": ["get", "patch", "update"]}
    ]);
    let token_volume = json!({"name": "strait-token", "projected": {"sources": [{"serviceAccountToken": {
        "audience": strait_api::TOKEN_AUDIENCE, "expirationSeconds": 3600, "path": "token"}}]}});
    let mut objects = vec![
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": NAMESPACE, "labels": labels("strait")}}),
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(CONTROLLER, CONTROLLER)}),
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(GATEWAY, GATEWAY)}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": {"name": CONTROLLER, "labels": labels(CONTROLLER)}, "rules": controller_rules}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": CONTROLLER, "labels": labels(CONTROLLER)},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": CONTROLLER},
               "subjects": [{"kind": "ServiceAccount", "name": CONTROLLER, "namespace": NAMESPACE}]}),
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(CONTROLLER, CONTROLLER),
               "data": {"controller.yaml": controller_config(s)?}}),
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(CONTROLLER, CONTROLLER),
               "spec": {"replicas": 1, "selector": {"matchLabels": {"app.kubernetes.io/name": CONTROLLER}},
                "template": {"metadata": {"labels": labels(CONTROLLER)},
                 "spec": {"serviceAccountName": CONTROLLER,
                  "containers": [{"name": "controller", "image": s.image,
                    "args": ["federation", "--config", "/etc/strait/config/controller.yaml"],
                    "env": [{"name": "STRAIT_ADVERTISE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                    "ports": [{"name": "grpc", "containerPort": GRPC_PORT}, {"name": "admin", "containerPort": ADMIN_PORT},
                              {"name": "webhook", "containerPort": INJECTOR_PORT}],
                    "readinessProbe": probe("/ready", ADMIN_PORT), "livenessProbe": probe("/healthz", ADMIN_PORT),
                    "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
                    "securityContext": security_context(),
                    "volumeMounts": [{"name": "config", "mountPath": "/etc/strait/config", "readOnly": true},
                                     {"name": "ca", "mountPath": "/etc/strait/ca", "readOnly": true},
                                     {"name": "state", "mountPath": STATE_DIR}]}],
                  "volumes": [{"name": "config", "configMap": {"name": CONTROLLER}},
                              {"name": "ca", "secret": {"secretName": "strait-ca"}},
                              {"name": "state", "emptyDir": {"sizeLimit": "256Mi"}}]}}}}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": meta(CONTROLLER, CONTROLLER),
               "spec": {"selector": {"app.kubernetes.io/name": CONTROLLER},
                "ports": [{"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP"},
                          {"name": "admin", "port": ADMIN_PORT, "targetPort": "admin", "protocol": "TCP"},
                          {"name": "webhook", "port": INJECTOR_PORT, "targetPort": "webhook", "protocol": "TCP"}]}}),
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(GATEWAY, GATEWAY),
               "spec": {"replicas": 1, "selector": {"matchLabels": {"app.kubernetes.io/name": GATEWAY}},
                "template": {"metadata": {"labels": labels(GATEWAY)},
                 "spec": {"serviceAccountName": GATEWAY,
                  "containers": [{"name": "gateway", "image": s.image,
                    "args": ["gateway", "--cluster", s.cluster, "--region", s.region, "--zone", s.zone,
                             "--listen", format!("0.0.0.0:{GATEWAY_PORT}"), "--admin", format!("0.0.0.0:{GATEWAY_ADMIN_PORT}"),
                             "--controller", format!("{CONTROLLER}.{NAMESPACE}.svc:{GRPC_PORT}"),
                             "--trust-domain", s.trust_domain.to_string(), "--bundle", "/etc/strait/bundle/bundle.pem",
                             "--sa-token-file", "/var/run/secrets/strait/token"],
                    // QUIC, and the TCP+TLS fallback on the same port number.
                    "ports": [{"name": "quic", "containerPort": GATEWAY_PORT, "protocol": "UDP"},
                              {"name": "tls", "containerPort": GATEWAY_PORT, "protocol": "TCP"},
                              {"name": "admin", "containerPort": GATEWAY_ADMIN_PORT}],
                    "readinessProbe": probe("/ready", GATEWAY_ADMIN_PORT), "livenessProbe": probe("/healthz", GATEWAY_ADMIN_PORT),
                    "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
                    "securityContext": security_context(),
                    "volumeMounts": [{"name": "bundle", "mountPath": "/etc/strait/bundle", "readOnly": true},
                                     {"name": "strait-token", "mountPath": "/var/run/secrets/strait", "readOnly": true}]}],
                  "volumes": [{"name": "bundle", "secret": {"secretName": "strait-ca", "items": [{"key": "bundle.pem", "path": "bundle.pem"}]}},
                              token_volume]}}}}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": meta(GATEWAY, GATEWAY),
               "spec": {"type": "LoadBalancer", "selector": {"app.kubernetes.io/name": GATEWAY},
                "ports": [{"name": "quic", "port": GATEWAY_PORT, "targetPort": GATEWAY_PORT, "protocol": "UDP"},
                          {"name": "tls", "port": GATEWAY_PORT, "targetPort": GATEWAY_PORT, "protocol": "TCP"}]}}),
        // Without a caBundle: the controller fills it in with its trust domain's roots at start.
        webhook_configuration(None, None),
    ];
    if let Some(volume) = &s.state_volume {
        with_state_volume(&mut objects, volume);
    }
    Ok(objects)
}

/// The controller's state on `volume`'s claim instead of an emptyDir: the claim before the
/// Deployment, its pod replaced with `Recreate` (one pod holds a ReadWriteOnce claim), and the
/// volume's files given to the components' group (a claim's volume is root's as provisioned).
fn with_state_volume(objects: &mut Vec<Value>, volume: &StateVolume) {
    let Some(at) = objects
        .iter()
        .position(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == CONTROLLER)
    else {
        return;
    };
    let deployment = &mut objects[at];
    deployment["spec"]["strategy"] = json!({"type": "Recreate"});
    let pod = &mut deployment["spec"]["template"]["spec"];
    pod["securityContext"] = json!({"fsGroup": RUN_AS, "fsGroupChangePolicy": "OnRootMismatch"});
    if let Some(volumes) = pod["volumes"].as_array_mut() {
        for v in volumes.iter_mut().filter(|v| v["name"] == "state") {
            *v = json!({"name": "state", "persistentVolumeClaim": {"claimName": STATE_CLAIM}});
        }
    }
    objects.insert(at, volume.claim());
}

/// The namespace the demo services live in (labelled for injection).
pub const DEMO_NAMESPACE: &str = "demo";
const DEMO_APP_PORT: u16 = 8080;

/// The demo workloads of one cluster of the built-in three-cluster demo (the same services and
/// zones `strait up` runs): per service and zone a Deployment pinned to that zone's nodes, the
/// Service, and its ServiceExport. The namespace is labelled for sidecar injection.
pub fn demo(cluster: &str, image: &str) -> anyhow::Result<Vec<Value>> {
    use crate::up::topology::Topology;
    use strait_federation::source::ProtocolSpec;
    let topology = Topology::default_demo();
    let Some(def) = topology.clusters.iter().find(|c| c.name == cluster) else {
        let names: Vec<&str> = topology.clusters.iter().map(|c| c.name.as_str()).collect();
        anyhow::bail!(
            "--cluster-name {cluster:?} is not a demo cluster: use one of {}",
            names.join(", ")
        );
    };
    let demo_labels = |app: &str| json!({"app": app, "app.kubernetes.io/part-of": "strait-demo"});
    let mut objects = vec![json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": DEMO_NAMESPACE, "labels": {"strait.dev/inject": "enabled",
                                                         "app.kubernetes.io/part-of": "strait-demo"}}})];
    for svc in &topology.services {
        let zones: Vec<&str> = def
            .workloads
            .iter()
            .filter(|w| w.service == svc.name)
            .map(|w| w.zone.as_str())
            .collect();
        if zones.is_empty() {
            continue;
        }
        let tcp = matches!(svc.protocol, ProtocolSpec::Tcp);
        for zone in &zones {
            let name = format!("{}-{zone}", svc.name);
            let mut args = vec![
                "demo-app".to_string(),
                "--listen".into(),
                format!("0.0.0.0:{DEMO_APP_PORT}"),
                "--cluster".into(),
                def.name.clone(),
                "--region".into(),
                def.region.clone(),
                "--zone".into(),
                zone.to_string(),
                "--workload".into(),
                "$(POD_NAME)".into(),
                "--service".into(),
                svc.name.clone(),
            ];
            if tcp {
                args.push("--tcp".into());
            }
            objects.push(json!({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": name, "namespace": svc.namespace, "labels": demo_labels(&svc.name)},
                "spec": {"replicas": 1, "selector": {"matchLabels": {"app": svc.name, "demo.strait.dev/zone": zone}},
                 "template": {"metadata": {"labels": {"app": svc.name, "demo.strait.dev/zone": zone,
                                                      "app.kubernetes.io/part-of": "strait-demo"}},
                  "spec": {"nodeSelector": {"topology.kubernetes.io/zone": zone},
                   "containers": [{"name": "app", "image": image, "args": args,
                     "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                     "ports": [{"name": if tcp { "tcp" } else { "http" }, "containerPort": DEMO_APP_PORT}],
                     "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
                     "securityContext": security_context()}]}}}}));
        }
        let port = if tcp {
            json!({"name": "tcp", "port": svc.port, "targetPort": DEMO_APP_PORT, "protocol": "TCP"})
        } else {
            json!({"name": "http", "port": svc.port, "targetPort": DEMO_APP_PORT, "protocol": "TCP", "appProtocol": "http"})
        };
        objects.push(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": svc.name, "namespace": svc.namespace, "labels": demo_labels(&svc.name)},
            "spec": {"selector": {"app": svc.name}, "ports": [port]}}));
        objects.push(
            json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
            "metadata": {"name": svc.name, "namespace": svc.namespace, "labels": demo_labels(&svc.name)}}),
        );
    }
    Ok(objects)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_controller_config_in_the_configmap_parses_back() {
        let s = crate::install::example();
        let objects = manifests(&s).unwrap();
        let cm = objects.iter().find(|o| o["kind"] == "ConfigMap").unwrap();
        let text = cm["data"]["controller.yaml"].as_str().unwrap();
        let back: ControllerConfig = serde_yaml::from_str(text).unwrap();
        assert_eq!(back.cluster, "east");
        assert!(back.kubernetes.is_some() && back.catalog_dir.is_none());
        // The gateway Service carries QUIC and the TCP+TLS fallback on one port number.
        let gw = objects
            .iter()
            .find(|o| o["kind"] == "Service" && o["metadata"]["name"] == GATEWAY)
            .unwrap();
        let protocols: Vec<&str> = gw["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["protocol"].as_str().unwrap())
            .collect();
        assert_eq!(protocols, ["UDP", "TCP"]);
        // The webhook is part of the install; the controller only fills in its caBundle.
        let hook = objects
            .iter()
            .find(|o| o["kind"] == "MutatingWebhookConfiguration")
            .unwrap();
        assert!(hook["webhooks"][0]["clientConfig"]["caBundle"].is_null());
        assert_eq!(hook["webhooks"][0]["clientConfig"]["service"]["path"], "/inject");
        // Least privilege: no wildcard verbs or resources anywhere.
        let role = objects.iter().find(|o| o["kind"] == "ClusterRole").unwrap();
        assert!(!role.to_string().contains('*'));
    }

    /// With a state volume the controller's state is on a claim (before the Deployment that
    /// mounts it, one pod at a time, its files the components' group's); without, an emptyDir.
    #[test]
    fn a_state_volume_puts_the_controllers_state_on_a_claim() {
        let mut s = crate::install::example();
        let controller = |objects: &[Value]| -> Value {
            objects
                .iter()
                .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == CONTROLLER)
                .unwrap()
                .clone()
        };
        let state = |d: &Value| -> Value {
            d["spec"]["template"]["spec"]["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == "state")
                .unwrap()
                .clone()
        };
        let plain = manifests(&s).unwrap();
        assert!(plain.iter().all(|o| o["kind"] != "PersistentVolumeClaim"));
        assert_eq!(state(&controller(&plain))["emptyDir"]["sizeLimit"], "256Mi");
        assert!(controller(&plain)["spec"]["strategy"].is_null());

        s.state_volume = Some(StateVolume::new("2Gi", Some("standard")).unwrap());
        let objects = manifests(&s).unwrap();
        let claim = objects
            .iter()
            .position(|o| o["kind"] == "PersistentVolumeClaim")
            .unwrap();
        let deployment = objects
            .iter()
            .position(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == CONTROLLER)
            .unwrap();
        assert!(claim < deployment, "the claim is applied before the pod that mounts it");
        let claim = &objects[claim];
        assert_eq!(claim["metadata"]["name"], STATE_CLAIM);
        assert_eq!(claim["metadata"]["namespace"], NAMESPACE);
        assert_eq!(claim["spec"]["resources"]["requests"]["storage"], "2Gi");
        assert_eq!(claim["spec"]["storageClassName"], "standard");
        assert_eq!(claim["spec"]["accessModes"], json!(["ReadWriteOnce"]));
        let d = controller(&objects);
        assert_eq!(
            state(&d),
            json!({"name": "state", "persistentVolumeClaim": {"claimName": STATE_CLAIM}})
        );
        assert_eq!(d["spec"]["strategy"]["type"], "Recreate");
        assert_eq!(d["spec"]["template"]["spec"]["securityContext"]["fsGroup"], RUN_AS);
        // Nothing else moved.
        assert_eq!(objects.len(), plain.len() + 1);

        // Without a class: the cluster's default.
        s.state_volume = Some(StateVolume::new("500M", None).unwrap());
        let objects = manifests(&s).unwrap();
        let claim = objects.iter().find(|o| o["kind"] == "PersistentVolumeClaim").unwrap();
        assert!(claim["spec"]["storageClassName"].is_null());

        // Bad input is refused, naming the flag.
        for size in ["1GB", "Gi", "1.5Gi", "-1Gi", "1 Gi", ""] {
            let e = StateVolume::new(size, None).unwrap_err().to_string();
            assert!(
                e.contains("--state-volume-size") && e.contains("e.g. 1Gi"),
                "{size}: {e}"
            );
        }
        let e = StateVolume::new("1Gi", Some("Fast_SSD")).unwrap_err().to_string();
        assert!(e.contains("--state-storage-class"), "{e}");
    }
}

#[cfg(test)]
mod demo_tests {
    use super::*;

    #[test]
    fn the_demo_of_a_cluster_pins_each_workload_to_its_zone_and_exports_its_services() {
        let objects = demo("east", "strait:test").unwrap();
        let deployments: Vec<&str> = objects
            .iter()
            .filter(|o| o["kind"] == "Deployment")
            .map(|o| o["metadata"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(deployments, ["echo-us-east-1a", "echo-us-east-1b"]);
        let b = objects
            .iter()
            .find(|o| o["metadata"]["name"] == "echo-us-east-1b")
            .unwrap();
        assert_eq!(
            b["spec"]["template"]["spec"]["nodeSelector"]["topology.kubernetes.io/zone"],
            "us-east-1b"
        );
        let exports = objects.iter().filter(|o| o["kind"] == "ServiceExport").count();
        assert_eq!(exports, 1);
        let ns = &objects[0];
        assert_eq!(ns["metadata"]["labels"]["strait.dev/inject"], "enabled");
        // central runs the TCP ledger: a tcp port, and the app echoes bytes.
        let central = demo("central", "strait:test").unwrap();
        let ledger = central
            .iter()
            .find(|o| o["kind"] == "Service" && o["metadata"]["name"] == "ledger")
            .unwrap();
        assert_eq!(ledger["spec"]["ports"][0]["name"], "tcp");
        assert!(central
            .iter()
            .any(|o| o["spec"]["template"].to_string().contains("--tcp")));
        let err = demo("north", "strait:test").unwrap_err().to_string();
        assert!(
            err.contains("--cluster-name") && err.contains("east, west, central"),
            "{err}"
        );
    }
}
