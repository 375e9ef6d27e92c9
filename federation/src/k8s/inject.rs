//! The sidecar injector: a mutating admission webhook. Pods in a namespace labelled
//! `strait.dev/inject=enabled`, or labelled `strait.dev/inject: "true"` themselves, come back
//! from the API server with the sidecar container and its init step (`strait sidecar init`,
//! which writes the pod's interception rules). The webhook serves HTTPS with a certificate from
//! the cluster's intermediate CA; its configuration's caBundle is the trust domain's roots.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};

/// Opt-in label (on a namespace or a pod).
pub const INJECT_LABEL: &str = "strait.dev/inject";
pub const SIDECAR_NAME: &str = "strait-sidecar";
/// The sidecar container's executable in the Strait image.
pub const SIDECAR_COMMAND: &str = "/usr/local/bin/strait-sidecar";
pub const INIT_NAME: &str = "strait-init";
/// The UID the sidecar runs as; `strait sidecar init` excludes it from interception.
pub const SIDECAR_UID: i64 = 1337;

/// What the injected sidecar needs to know about its cluster.
#[derive(Clone, Debug)]
pub struct InjectSettings {
    pub image: String,
    pub cluster: String,
    pub region: String,
    pub trust_domain: String,
    pub controller: String,
    pub bundle_pem: String,
}

/// Pod annotation: the namespaces (comma-separated) whose services the sidecar is sent
/// (`strait sidecar --scope-namespaces`), so its memory follows what it calls.
pub const SCOPE_ANNOTATION: &str = "strait.dev/scope-namespaces";

/// Pod annotation, "true" or "false": the sidecar is sent only the services whose
/// AuthorizationPolicies could let the pod in (`strait sidecar --scope-authorized`).
pub const SCOPE_AUTHORIZED_ANNOTATION: &str = "strait.dev/scope-authorized";

/// The JSON patch that injects the sidecar into `pod`, None when it must not be touched, or
/// why the pod is refused (a bad `strait.dev/` annotation, named with the fix).
pub fn patch_for(pod: &Value, s: &InjectSettings) -> Result<Option<Value>, String> {
    let spec = &pod["spec"];
    let annotations = &pod["metadata"]["annotations"];
    if annotations[INJECT_LABEL] == "false" || annotations["strait.dev/injected"] == "true" {
        return Ok(None);
    }
    let Some(containers) = spec["containers"].as_array() else {
        return Ok(None);
    };
    if containers.iter().any(|c| c["name"] == SIDECAR_NAME) || spec["hostNetwork"] == true {
        return Ok(None);
    }
    let scope = match &annotations[SCOPE_ANNOTATION] {
        Value::Null => None,
        Value::String(v) => {
            let names: Vec<&str> = v.split(',').map(str::trim).filter(|n| !n.is_empty()).collect();
            if names.is_empty() {
                return Err(format!(
                    "annotation {SCOPE_ANNOTATION} is empty; name the namespaces the workload calls, e.g. \"demo,payments\", or remove it"
                ));
            }
            for n in &names {
                crate::source::dns_label(&format!("metadata.annotations[{SCOPE_ANNOTATION}]"), n)?;
            }
            Some(names.join(","))
        }
        other => return Err(format!("annotation {SCOPE_ANNOTATION} must be a string, not {other}")),
    };
    let scope_authorized = match &annotations[SCOPE_AUTHORIZED_ANNOTATION] {
        Value::Null => false,
        Value::String(v) if v == "true" => true,
        Value::String(v) if v == "false" => false,
        other => {
            return Err(format!(
                "annotation {SCOPE_AUTHORIZED_ANNOTATION} is {other}; use \"true\" or \"false\", or remove it"
            ))
        }
    };
    // The app's first declared port is what the inbound sidecar forwards to.
    let app_port = containers
        .iter()
        .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
        .find_map(|p| p["containerPort"].as_u64())
        .unwrap_or(8080);
    let service = pod["metadata"]["labels"]["app"]
        .as_str()
        .or_else(|| spec["serviceAccountName"].as_str())
        .unwrap_or("default")
        .to_string();
    let env = |name: &str, path: &str| json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}});
    let mut args = json!([
        "--workload",
        "$(POD_NAME)",
        "--service",
        service,
        "--namespace",
        "$(POD_NAMESPACE)",
        "--cluster",
        s.cluster,
        "--region",
        s.region,
        "--outbound",
        "0.0.0.0:15001",
        "--inbound",
        "0.0.0.0:15006",
        "--admin",
        "0.0.0.0:15000",
        "--dns",
        "127.0.0.1:15053",
        "--app",
        format!("127.0.0.1:{app_port}"),
        "--controller",
        s.controller,
        "--trust-domain",
        s.trust_domain,
        "--sa-token-file",
        "/var/run/secrets/strait/token"
    ]);
    if let (Some(scope), Some(list)) = (scope, args.as_array_mut()) {
        list.extend([json!("--scope-namespaces"), json!(scope)]);
    }
    if let (true, Some(list)) = (scope_authorized, args.as_array_mut()) {
        list.push(json!("--scope-authorized"));
    }
    let sidecar = json!({
        "name": SIDECAR_NAME,
        "image": s.image,
        // The sidecar proxy alone (deploy/Dockerfile builds it beside `strait`): about half the
        // code of the full executable mapped in every pod.
        "command": [SIDECAR_COMMAND],
        "args": args,
        "env": [env("POD_NAME", "metadata.name"), env("POD_NAMESPACE", "metadata.namespace"),
                {"name": "STRAIT_TRUST_BUNDLE", "value": s.bundle_pem}],
        "ports": [{"name": "strait-admin", "containerPort": 15000}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": 15000}, "periodSeconds": 2},
        "securityContext": {"runAsUser": SIDECAR_UID, "runAsGroup": SIDECAR_UID, "runAsNonRoot": true,
                            "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "strait-token", "mountPath": "/var/run/secrets/strait", "readOnly": true}],
    });
    let init = json!({
        "name": INIT_NAME,
        "image": s.image,
        "args": ["sidecar", "init", "--outbound-port", "15001", "--inbound-port", "15006", "--dns-port", "15053",
                 "--proxy-uid", SIDECAR_UID.to_string()],
        "securityContext": {"runAsUser": 0, "runAsNonRoot": false, "allowPrivilegeEscalation": false,
                            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}},
    });
    let token = json!({"name": "strait-token", "projected": {"sources": [{"serviceAccountToken": {
        "audience": strait_api::TOKEN_AUDIENCE, "expirationSeconds": 3600, "path": "token"}}]}});
    let mut ops = vec![];
    if spec["serviceAccountName"].is_null() {
        // The projected token needs a named account; this is what the ServiceAccount admission
        // plugin would have set.
        ops.push(json!({"op": "add", "path": "/spec/serviceAccountName", "value": "default"}));
    }
    match spec["initContainers"].as_array() {
        // First, so interception is in place before any other init container talks.
        Some(_) => ops.push(json!({"op": "add", "path": "/spec/initContainers/0", "value": init})),
        None => ops.push(json!({"op": "add", "path": "/spec/initContainers", "value": [init]})),
    }
    ops.push(json!({"op": "add", "path": "/spec/containers/-", "value": sidecar}));
    match spec["volumes"].as_array() {
        Some(_) => ops.push(json!({"op": "add", "path": "/spec/volumes/-", "value": token})),
        None => ops.push(json!({"op": "add", "path": "/spec/volumes", "value": [token]})),
    }
    if pod["metadata"]["annotations"].is_object() {
        ops.push(json!({"op": "add", "path": "/metadata/annotations/strait.dev~1injected", "value": "true"}));
    } else {
        ops.push(json!({"op": "add", "path": "/metadata/annotations", "value": {"strait.dev/injected": "true"}}));
    }
    Ok(Some(Value::Array(ops)))
}

/// Answers one AdmissionReview. Denies only a pod whose `strait.dev/` annotations are wrong
/// (with the fix); a pod the injector cannot handle otherwise is admitted as is.
pub fn review(body: &Value, s: &InjectSettings) -> Value {
    let request = &body["request"];
    let uid = request["uid"].clone();
    let mut response = json!({"uid": uid, "allowed": true});
    if request["kind"]["kind"] == "Pod" {
        match patch_for(&request["object"], s) {
            Ok(Some(patch)) => {
                response["patchType"] = json!("JSONPatch");
                response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(patch.to_string()));
            }
            Ok(None) => {}
            Err(why) => {
                response["allowed"] = json!(false);
                response["status"] = json!({"code": 400, "message": format!("strait sidecar injection: {why}")});
            }
        }
    }
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response})
}

/// Serves `/inject` over HTTPS until the task is dropped.
pub async fn serve(listen: SocketAddr, tls: rustls::ServerConfig, settings: InjectSettings) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind the injection webhook on {listen}: {e}"))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let settings = Arc::new(settings);
    loop {
        let (tcp, remote) = listener.accept().await?;
        let acceptor = acceptor.clone();
        let settings = settings.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                tracing::debug!(%remote, "webhook TLS handshake failed");
                return;
            };
            let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let settings = settings.clone();
                async move {
                    let body = Limited::new(req.into_body(), 4 * 1024 * 1024).collect().await;
                    let answer = match body
                        .ok()
                        .and_then(|b| serde_json::from_slice::<Value>(&b.to_bytes()).ok())
                    {
                        Some(review_req) => review(&review_req, &settings),
                        None => json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                                       "response": {"uid": "", "allowed": true}}),
                    };
                    let mut resp = hyper::Response::new(Full::new(Bytes::from(answer.to_string())));
                    resp.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("application/json"),
                    );
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}

/// Name of the MutatingWebhookConfiguration the controller keeps up to date.
pub const WEBHOOK_CONFIG: &str = "strait-sidecar-injector";

/// The MutatingWebhookConfiguration: `strait install` applies it without a caBundle, and the
/// controller fills in the caBundle (and the URL, when it runs outside the cluster) at start.
/// `ca_bundle_pem` is None for the install's copy.
pub fn webhook_configuration(url: Option<&str>, ca_bundle_pem: Option<&str>) -> Value {
    let mut client_config = match url {
        Some(u) => json!({"url": u}),
        None => json!({"service": {"name": "strait-federation", "namespace": strait_api::SYSTEM_NAMESPACE,
                                   "path": "/inject", "port": 15017}}),
    };
    if let Some(pem) = ca_bundle_pem {
        client_config["caBundle"] = json!(base64::engine::general_purpose::STANDARD.encode(pem));
    }
    let rules = json!([{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"],
                        "scope": "Namespaced"}]);
    let hook = |name: &str, ns_selector: Value, object_selector: Value| {
        json!({"name": name, "clientConfig": client_config, "rules": rules,
               "namespaceSelector": ns_selector, "objectSelector": object_selector,
               // Closed: a pod that should get a sidecar is not admitted without one.
               "failurePolicy": "Fail", "sideEffects": "None", "admissionReviewVersions": ["v1"],
               "timeoutSeconds": 5, "reinvocationPolicy": "Never"})
    };
    let not_opted_out = json!({"matchExpressions": [{"key": INJECT_LABEL, "operator": "NotIn", "values": ["false"]}]});
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": WEBHOOK_CONFIG, "labels": {super::MANAGED_BY.0: super::MANAGED_BY.1}},
        "webhooks": [
            hook("namespace.inject.strait.dev",
                 json!({"matchLabels": {INJECT_LABEL: "enabled"}}), not_opted_out),
            hook("pod.inject.strait.dev",
                 json!({"matchExpressions": [{"key": INJECT_LABEL, "operator": "NotIn", "values": ["enabled"]},
                                             {"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                                              "values": ["kube-system", strait_api::SYSTEM_NAMESPACE]}]}),
                 json!({"matchLabels": {INJECT_LABEL: "true"}})),
        ],
    })
}

/// The part of the webhook configuration the controller owns in a cluster installed by
/// `strait install`: each webhook's caBundle (server-side apply merges it by webhook name, so a
/// later `strait install --apply` keeps it).
pub fn ca_bundle_patch(ca_bundle_pem: &str) -> Value {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_bundle_pem);
    let hooks: Vec<Value> = webhook_configuration(None, None)["webhooks"]
        .as_array()
        .map(|hooks| {
            hooks
                .iter()
                .map(|h| json!({"name": h["name"], "clientConfig": {"caBundle": ca}}))
                .collect()
        })
        .unwrap_or_default();
    json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
           "metadata": {"name": WEBHOOK_CONFIG}, "webhooks": hooks})
}

/// Makes the API server call this controller's webhook. In a cluster (no `url`) the install
/// created the configuration and this fills in its caBundle (the roots that sign the webhook's
/// certificate); outside a cluster (`strait up --kube`) it writes the whole configuration with
/// the URL to call.
pub async fn register(client: &kube::Client, url: Option<&str>, ca_bundle_pem: &str) -> anyhow::Result<()> {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    let api: kube::Api<MutatingWebhookConfiguration> = kube::Api::all(client.clone());
    let config = match url {
        Some(_) => webhook_configuration(url, Some(ca_bundle_pem)),
        None => {
            if api.get_opt(WEBHOOK_CONFIG).await?.is_none() {
                anyhow::bail!(
                    "the MutatingWebhookConfiguration {WEBHOOK_CONFIG} does not exist: apply the install \
                     (`strait install ... --apply`), then restart the controller"
                );
            }
            ca_bundle_patch(ca_bundle_pem)
        }
    };
    api.patch(
        WEBHOOK_CONFIG,
        &kube::api::PatchParams::apply(super::FIELD_MANAGER).force(),
        &kube::api::Patch::Apply(&config),
    )
    .await
    .map_err(|e| anyhow::anyhow!("cannot register the injection webhook {WEBHOOK_CONFIG}: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> InjectSettings {
        InjectSettings {
            image: "strait:test".into(),
            cluster: "east".into(),
            region: "us-east".into(),
            trust_domain: "mesh.local".into(),
            controller: "strait-federation.strait-system.svc:15012".into(),
            bundle_pem: "PEM".into(),
        }
    }

    #[test]
    fn injects_once_and_respects_opt_out() {
        let pod = json!({"metadata": {"name": "a", "labels": {"app": "echo"}},
                         "spec": {"containers": [{"name": "app", "ports": [{"containerPort": 9090}]}]}});
        let patch = patch_for(&pod, &settings()).unwrap().unwrap();
        let text = patch.to_string();
        assert!(text.contains(SIDECAR_NAME) && text.contains(INIT_NAME) && text.contains("127.0.0.1:9090"));
        assert!(text.contains("\"--service\",\"echo\""));
        // The proxy runs as the sidecar-only executable, its flags straight after it.
        assert!(text.contains(&format!("\"command\":[\"{SIDECAR_COMMAND}\"]")), "{text}");
        assert!(text.contains("\"args\":[\"--workload\""), "{text}");
        assert!(!text.contains("--scope-namespaces"), "every namespace by default");
        assert!(!text.contains("--scope-authorized"), "every service by default");
        let opted_out = json!({"metadata": {"annotations": {"strait.dev/inject": "false"}}, "spec": {"containers": [{"name": "app"}]}});
        assert!(patch_for(&opted_out, &settings()).unwrap().is_none());
        let already = json!({"metadata": {}, "spec": {"containers": [{"name": "app"}, {"name": SIDECAR_NAME}]}});
        assert!(patch_for(&already, &settings()).unwrap().is_none());
    }

    #[test]
    fn a_scope_annotation_becomes_the_sidecars_scope_and_a_bad_one_refuses_the_pod() {
        let pod = |scope: Value| {
            json!({"metadata": {"name": "a", "annotations": {SCOPE_ANNOTATION: scope}},
                   "spec": {"containers": [{"name": "app"}]}})
        };
        let text = patch_for(&pod(json!("demo, payments")), &settings())
            .unwrap()
            .unwrap()
            .to_string();
        assert!(text.contains("\"--scope-namespaces\",\"demo,payments\""), "{text}");
        let err = patch_for(&pod(json!("demo,Pay_ments")), &settings()).unwrap_err();
        assert!(
            err.contains(SCOPE_ANNOTATION) && err.contains("\"Pay_ments\" is not a DNS label"),
            "{err}"
        );
        assert!(patch_for(&pod(json!(" , ")), &settings())
            .unwrap_err()
            .contains("is empty"));
        // Scoped by authorization too, or refused when the annotation is neither true nor false.
        let both = json!({"metadata": {"name": "a", "annotations": {SCOPE_ANNOTATION: "demo", SCOPE_AUTHORIZED_ANNOTATION: "true"}},
                          "spec": {"containers": [{"name": "app"}]}});
        let text = patch_for(&both, &settings()).unwrap().unwrap().to_string();
        assert!(
            text.contains("\"--scope-namespaces\",\"demo\",\"--scope-authorized\""),
            "{text}"
        );
        let yes = json!({"metadata": {"name": "a", "annotations": {SCOPE_AUTHORIZED_ANNOTATION: "yes"}},
                         "spec": {"containers": [{"name": "app"}]}});
        let err = patch_for(&yes, &settings()).unwrap_err();
        assert!(
            err.contains(SCOPE_AUTHORIZED_ANNOTATION) && err.contains("\"true\" or \"false\""),
            "{err}"
        );
        let review_req = json!({"request": {"uid": "u1", "kind": {"kind": "Pod"}, "object": pod(json!("Bad"))}});
        let answer = review(&review_req, &settings());
        assert_eq!(answer["response"]["allowed"], false);
        assert!(answer["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains(SCOPE_ANNOTATION));
    }
}
