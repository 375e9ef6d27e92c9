//! `GRPCRoute` (Gateway API v1, `apis/v1/grpcroute_types.go`) for mesh: service and method
//! matches, header matches, header modifiers, mirrors and weighted backends. A gRPC call is an
//! HTTP/2 POST to `/<package.Service>/<Method>`, so a GRPCRoute is carried out as the
//! equivalent HTTPRoute (its method match becomes a path match) and shares its compilation,
//! precedence and enforcement; only the schema and the error paths are its own.

use serde::{Deserialize, Serialize};

use super::spec::{
    HeaderModifier, HttpBackendRef, HttpRouteFilter, HttpRouteMatch, HttpRouteRule, HttpRouteSpec, ParentRef,
    PathMatch, PathMatchType, RequestMirror, StringMatchType, ValueMatch,
};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<GrpcRouteRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<GrpcRouteMatch>,
    #[serde(default)]
    pub filters: Vec<GrpcRouteFilter>,
    #[serde(default)]
    pub backend_refs: Vec<GrpcBackendRef>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<GrpcMethodMatch>,
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcMethodMatch {
    #[serde(rename = "type", default)]
    pub kind: StringMatchType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum GrpcFilterType {
    RequestHeaderModifier,
    ResponseHeaderModifier,
    RequestMirror,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteFilter {
    #[serde(rename = "type")]
    pub kind: GrpcFilterType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_header_modifier: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header_modifier: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_mirror: Option<RequestMirror>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcBackendRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    #[serde(default)]
    pub filters: Vec<GrpcRouteFilter>,
}

/// The path regex for a gRPC method match: `/<service>/<method>`, either side any name when
/// not given.
fn method_path(m: &GrpcMethodMatch) -> Result<PathMatch, String> {
    let any = "[^/]+";
    match m.kind {
        StringMatchType::Exact => {
            for (field, v) in [("service", &m.service), ("method", &m.method)] {
                if let Some(v) = v {
                    if v.is_empty() || v.contains('/') {
                        return Err(format!("{field}: {v:?} is not a gRPC {field} name"));
                    }
                }
            }
            Ok(match (&m.service, &m.method) {
                (Some(s), Some(me)) => PathMatch {
                    kind: PathMatchType::Exact,
                    value: format!("/{s}/{me}"),
                },
                (Some(s), None) => PathMatch {
                    kind: PathMatchType::PathPrefix,
                    value: format!("/{s}"),
                },
                (None, Some(me)) => PathMatch {
                    kind: PathMatchType::RegularExpression,
                    value: format!("/{any}/{}", regex::escape(me)),
                },
                (None, None) => return Err("set service, method or both".into()),
            })
        }
        StringMatchType::RegularExpression => Ok(PathMatch {
            kind: PathMatchType::RegularExpression,
            value: format!(
                "/(?:{})/(?:{})",
                m.service.as_deref().unwrap_or(any),
                m.method.as_deref().unwrap_or(any)
            ),
        }),
    }
}

fn filter(f: &GrpcRouteFilter) -> HttpRouteFilter {
    HttpRouteFilter {
        kind: match f.kind {
            GrpcFilterType::RequestHeaderModifier => super::spec::FilterType::RequestHeaderModifier,
            GrpcFilterType::ResponseHeaderModifier => super::spec::FilterType::ResponseHeaderModifier,
            GrpcFilterType::RequestMirror => super::spec::FilterType::RequestMirror,
        },
        request_header_modifier: f.request_header_modifier.clone(),
        response_header_modifier: f.response_header_modifier.clone(),
        request_redirect: None,
        url_rewrite: None,
        request_mirror: f.request_mirror.clone(),
    }
}

/// The HTTPRoute that does what a GRPCRoute says; an error names the GRPCRoute's field.
pub fn to_http(spec: &GrpcRouteSpec) -> Result<HttpRouteSpec, String> {
    let mut rules = vec![];
    for (i, r) in spec.rules.iter().enumerate() {
        let mut matches = vec![];
        if r.matches.is_empty() {
            // Every call, ranked below any method match (GRPCRoute precedence).
            matches.push(HttpRouteMatch {
                path: Some(PathMatch {
                    kind: PathMatchType::RegularExpression,
                    value: "/.*".into(),
                }),
                ..Default::default()
            });
        }
        for (j, m) in r.matches.iter().enumerate() {
            let path = match &m.method {
                Some(mm) => {
                    Some(method_path(mm).map_err(|e| format!("field `spec.rules[{i}].matches[{j}].method.{e}`"))?)
                }
                None => None,
            };
            matches.push(HttpRouteMatch {
                path,
                headers: m.headers.clone(),
                query_params: vec![],
                method: None,
            });
        }
        rules.push(HttpRouteRule {
            name: r.name.clone(),
            matches,
            filters: r.filters.iter().map(filter).collect(),
            backend_refs: r
                .backend_refs
                .iter()
                .map(|b| HttpBackendRef {
                    group: b.group.clone(),
                    kind: b.kind.clone(),
                    name: b.name.clone(),
                    namespace: b.namespace.clone(),
                    port: b.port,
                    weight: b.weight,
                    filters: b.filters.iter().map(filter).collect(),
                })
                .collect(),
            timeouts: None,
            retry: None,
        });
    }
    Ok(HttpRouteSpec {
        parent_refs: spec.parent_refs.clone(),
        hostnames: spec.hostnames.clone(),
        rules,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::compile::BackendLookup;
    use crate::routes::{compile_route, RequestView, RouteTable};

    #[test]
    fn method_matches_become_path_matches() {
        let spec: GrpcRouteSpec = serde_yaml::from_str(
            r#"
parentRefs: [{kind: Service, name: greeter}]
rules:
  - name: say-hello
    matches: [{method: {service: helloworld.Greeter, method: SayHello}}]
    backendRefs: [{name: greeter-v2, port: 50051}]
  - name: any-method-named-check
    matches: [{method: {method: Check}}]
    backendRefs: [{name: health, port: 50051}]
  - backendRefs: [{name: greeter, port: 50051}]
"#,
        )
        .expect("yaml");
        let http = to_http(&spec).expect("converts");
        let (compiled, errors) = compile_route("demo", "g", &http, &|_| BackendLookup::Found);
        assert!(errors.is_empty(), "{errors:?}");
        let table = RouteTable::new(&[std::sync::Arc::new(compiled.expect("compiled"))]);
        let headers = hyper::HeaderMap::new();
        let rule = |path: &str| {
            table
                .route(&RequestView {
                    method: "POST",
                    path,
                    query: None,
                    headers: &headers,
                })
                .and_then(|(_, r)| r.name.clone())
        };
        assert_eq!(rule("/helloworld.Greeter/SayHello").as_deref(), Some("say-hello"));
        assert_eq!(
            rule("/grpc.health.v1.Health/Check").as_deref(),
            Some("any-method-named-check")
        );
        assert_eq!(
            rule("/helloworld.Greeter/SayGoodbye"),
            None,
            "the catch-all rule has no name"
        );
        assert!(
            table
                .route(&RequestView {
                    method: "POST",
                    path: "/helloworld.Greeter/SayGoodbye",
                    query: None,
                    headers: &headers,
                })
                .is_some(),
            "the catch-all takes the rest"
        );
    }

    #[test]
    fn an_empty_method_match_names_its_field() {
        let spec: GrpcRouteSpec =
            serde_yaml::from_str("rules: [{matches: [{method: {}}], backendRefs: [{name: x}]}]").expect("yaml");
        let e = to_http(&spec).expect_err("refused");
        assert!(e.contains("spec.rules[0].matches[0].method"), "{e}");
    }
}
