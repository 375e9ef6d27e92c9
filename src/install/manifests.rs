//! The objects of one cluster's install, built as JSON values from typed settings.

use serde_json::{json, Value};
use strait_federation::config::{ControllerConfig, GatewayRef, InjectorConfig, KubernetesSource};

pub const NAMESPACE: &str = strait_api::SYSTEM_NAMESPACE;
const CONTROLLER: &str = "strait-federation";
const GATEWAY: &str = "strait-gateway";
const GRPC_PORT: u16 = 15012;
const ADMIN_PORT: u16 = 15014;
const GATEWAY_PORT: u16 = 15443;
const GATEWAY_ADMIN_PORT: u16 = 15021;
const INJECTOR_PORT: u16 = 15017;

/// What differs between clusters.
#[derive(Clone, Debug)]
pub struct Settings {
    pub cluster: String,
    pub region: String,
    pub zone: String,
    pub gateway_address: std::net::SocketAddr,
    pub trust_domain: strait_trust::TrustDomain,
    pub image: String,
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
    json!({"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "allowPrivilegeEscalation": false,
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
        {"apiGroups": ["policy.strait.dev"], "resources": ["localitypolicies"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["policy.strait.dev"], "resources": ["localitypolicies/status"], "verbs": ["patch", "update"]},
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
        {"apiGroups": ["admissionregistration.k8s.io"], "resources": ["mutatingwebhookconfigurations"], "verbs": ["create"]},
        {"apiGroups": ["admissionregistration.k8s.io"], "resources": ["mutatingwebhookconfigurations"],
         "resourceNames": ["strait-sidecar-injector"], "verbs": ["get", "patch", "update"]}
    ]);
    let token_volume = json!({"name": "strait-token", "projected": {"sources": [{"serviceAccountToken": {
        "audience": strait_api::TOKEN_AUDIENCE, "expirationSeconds": 3600, "path": "token"}}]}});
    Ok(vec![
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
                                     {"name": "ca", "mountPath": "/etc/strait/ca", "readOnly": true}]}],
                  "volumes": [{"name": "config", "configMap": {"name": CONTROLLER}},
                              {"name": "ca", "secret": {"secretName": "strait-ca"}}]}}}}),
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
                    "ports": [{"name": "quic", "containerPort": GATEWAY_PORT, "protocol": "UDP"},
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
                "ports": [{"name": "quic", "port": GATEWAY_PORT, "targetPort": GATEWAY_PORT, "protocol": "UDP"}]}}),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_controller_config_in_the_configmap_parses_back() {
        let s = Settings {
            cluster: "east".into(),
            region: "us-east".into(),
            zone: "us-east-1a".into(),
            gateway_address: "203.0.113.10:15443".parse().unwrap(),
            trust_domain: "mesh.local".parse().unwrap(),
            image: "strait:test".into(),
        };
        let objects = manifests(&s).unwrap();
        let cm = objects.iter().find(|o| o["kind"] == "ConfigMap").unwrap();
        let text = cm["data"]["controller.yaml"].as_str().unwrap();
        let back: ControllerConfig = serde_yaml::from_str(text).unwrap();
        assert_eq!(back.cluster, "east");
        assert!(back.kubernetes.is_some() && back.catalog_dir.is_none());
        // Least privilege: no wildcard verbs or resources anywhere.
        let role = objects.iter().find(|o| o["kind"] == "ClusterRole").unwrap();
        assert!(!role.to_string().contains('*'));
    }
}
