//! Custom resources, as Rust types; `strait install` and `deploy/` get their CRDs from here.
//!
//! `ServiceExport` and `ServiceImport` follow the Multi-Cluster Services API
//! (`multicluster.x-k8s.io/v1alpha1`) as it defines them.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Marks a Service for export to the clusterset. As in the MCS API, it has no spec.
#[derive(CustomResource, Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "multicluster.x-k8s.io",
    version = "v1alpha1",
    kind = "ServiceExport",
    namespaced,
    no_spec,
    status = "ServiceExportStatus",
    shortname = "svcex"
)]
pub struct ServiceExportSpec {}

#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
pub struct ServiceExportStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A condition as Kubernetes writes them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}

impl From<&strait_api::pb::Condition> for Condition {
    /// A condition of the merge (the catalog's wire type) as Kubernetes writes it.
    fn from(c: &strait_api::pb::Condition) -> Self {
        Condition {
            type_: c.r#type.clone(),
            status: c.status.clone(),
            reason: (!c.reason.is_empty()).then(|| c.reason.clone()),
            message: (!c.message.is_empty()).then(|| c.message.clone()),
            last_transition_time: None,
        }
    }
}

/// The clusterset's view of an exported service, written by the controller in every cluster.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "multicluster.x-k8s.io",
    version = "v1alpha1",
    kind = "ServiceImport",
    namespaced,
    status = "ServiceImportStatus",
    shortname = "svcim"
)]
#[serde(rename_all = "camelCase")]
pub struct ServiceImportSpec {
    /// `ClusterSetIP` or `Headless`.
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
    pub ports: Vec<ServicePort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub protocol: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
    pub port: i32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ServiceImportStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<ClusterStatus>,
    /// Strait's addition: the merge's conditions (for example an MCS port conflict), so every
    /// cluster reports them, not only the exporting ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ClusterStatus {
    pub cluster: String,
}

/// The cluster's locality policy: Istio's `localityLbSetting` knobs plus `clusterOrder` and
/// outlier detection (the same fields as a policy file). Only the object named `default`
/// applies; a semantically bad one is reported on its status and the last good policy serves.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "policy.strait.dev",
    version = "v1alpha1",
    kind = "LocalityPolicy",
    status = "LocalityPolicyStatus",
    shortname = "locpol"
)]
pub struct LocalityPolicySpec {
    #[serde(flatten)]
    pub policy: crate::policy::PolicyFile,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalityPolicyStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Gateway API `HTTPRoute` (`gateway.networking.k8s.io/v1`) for mesh (GAMMA): the fields
/// Strait implements, with the upstream names and types. Installed only where the cluster has
/// no HTTPRoute CRD yet (an upstream one already there is used as it is).
#[derive(CustomResource, Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1",
    kind = "HTTPRoute",
    plural = "httproutes",
    namespaced,
    status = "RouteStatus"
)]
pub struct HttpRouteCrdSpec {
    #[serde(flatten)]
    pub spec: strait_api::routes::HttpRouteSpec,
}

/// Gateway API `GRPCRoute` (`gateway.networking.k8s.io/v1`), like [`HttpRouteCrdSpec`].
#[derive(CustomResource, Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1",
    kind = "GRPCRoute",
    plural = "grpcroutes",
    namespaced,
    status = "RouteStatus"
)]
pub struct GrpcRouteCrdSpec {
    #[serde(flatten)]
    pub spec: strait_api::routes::GrpcRouteSpec,
}

/// A route's status as Gateway API writes it: per parent, the controller and its conditions.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RouteStatus {
    #[serde(default)]
    pub parents: Vec<RouteParentStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteParentStatus {
    pub parent_ref: strait_api::routes::spec::ParentRef,
    pub controller_name: String,
    #[serde(default)]
    pub conditions: Vec<MetaCondition>,
}

/// `metav1.Condition`, every field the upstream schema requires.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetaCondition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
    pub last_transition_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// `TrafficPolicy` (`policy.strait.dev/v1alpha1`): retries, budgets, timeouts, circuit
/// breaking, outlier detection, faults, rate limits and locality for a Service or
/// ServiceImport, enforced in every cluster.
#[derive(CustomResource, Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "policy.strait.dev",
    version = "v1alpha1",
    kind = "TrafficPolicy",
    plural = "trafficpolicies",
    namespaced,
    status = "TrafficPolicyStatus",
    shortname = "tp"
)]
pub struct TrafficPolicyCrdSpec {
    #[serde(flatten)]
    pub spec: strait_api::traffic::TrafficPolicySpec,
}

/// `AuthorizationPolicy` (`policy.strait.dev/v1alpha1`): Istio's authorization semantics plus
/// clusters and trust domains as sources, enforced at every destination sidecar.
#[derive(CustomResource, Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "policy.strait.dev",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    plural = "authorizationpolicies",
    namespaced,
    status = "TrafficPolicyStatus",
    shortname = "ap"
)]
pub struct AuthorizationPolicyCrdSpec {
    #[serde(flatten)]
    pub spec: strait_api::authz::AuthorizationPolicySpec,
}

/// Where the policy applies: its conditions here and every cluster's report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicyStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub conditions: Vec<MetaCondition>,
    #[serde(default)]
    pub clusters: Vec<ClusterReport>,
}

/// One cluster's report on a route or policy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterReport {
    pub cluster: String,
    pub generation: i64,
    pub accepted: bool,
    #[serde(default)]
    pub message: String,
    pub proxies_acked: i64,
    pub proxies_total: i64,
}

/// Every CRD Strait needs, as the API server takes them.
pub fn crds() -> Vec<CustomResourceDefinition> {
    use kube::CustomResourceExt;
    let mut shared = vec![HTTPRoute::crd(), GRPCRoute::crd()];
    for crd in &mut shared {
        // `*.k8s.io` groups are protected: the API server wants the approval upstream has.
        crd.metadata.annotations.get_or_insert_with(Default::default).insert(
            "api-approved.kubernetes.io".into(),
            "https://github.com/kubernetes-sigs/gateway-api/pull/2466".into(),
        );
    }
    let mut all = vec![
        ServiceExport::crd(),
        ServiceImport::crd(),
        LocalityPolicy::crd(),
        TrafficPolicy::crd(),
        AuthorizationPolicy::crd(),
    ];
    all.extend(shared);
    all
}

/// CRDs owned by other projects: installed only where the cluster has none of that name.
pub fn is_shared(name: &str) -> bool {
    name.ends_with(".gateway.networking.k8s.io")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crds_match_the_mcs_api() {
        let crds = crds();
        let names: Vec<_> = crds
            .iter()
            .map(|c| c.metadata.name.clone().unwrap_or_default())
            .collect();
        assert_eq!(
            names,
            vec![
                "serviceexports.multicluster.x-k8s.io",
                "serviceimports.multicluster.x-k8s.io",
                "localitypolicies.policy.strait.dev",
                "trafficpolicies.policy.strait.dev",
                "authorizationpolicies.policy.strait.dev",
                "httproutes.gateway.networking.k8s.io",
                "grpcroutes.gateway.networking.k8s.io",
            ]
        );
        let export_schema = crds[0].spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap();
        assert!(!export_schema
            .required
            .clone()
            .unwrap_or_default()
            .contains(&"spec".to_string()));
        // Structural schemas: no `additionalProperties: false` beside `properties`, and no
        // field without a type (the API server refuses both).
        for crd in &crds[3..] {
            let text = serde_json::to_string(crd).unwrap();
            assert!(!text.contains("\"additionalProperties\":false"), "{text}");
        }
    }
}
