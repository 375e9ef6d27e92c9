//! `strait apply`, `strait delete` and `strait get routes|policies`: routes and policies as
//! data, outside Kubernetes. Writes go to a controller's write API over mTLS with the
//! operator's credential; reads come from its admin views, which show every cluster's report.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::Value;
use strait_api::pb;
use strait_api::pb::policy_service_client::PolicyServiceClient;

use super::{get_json, table, Output};

pub const APPLY_EXAMPLES: &str = "Examples:
  strait apply -f examples/policy/canary.yaml --controller 127.10.1.1:15014
  strait apply -f routes/ --controller 127.10.1.1:15014 --output json
  strait apply -f policy.yaml --controller 127.10.1.1:15014 --dry-run

Every object is clusterset-wide unless labelled strait.dev/scope: cluster. The command waits
(--wait, default 30s) until every cluster applied the new generation and every proxy
acknowledged it, showing progress; --wait 0s returns at once.";

pub const DELETE_EXAMPLES: &str = "Examples:
  strait delete -f examples/policy/canary.yaml --controller 127.10.1.1:15014";

#[derive(Args, Debug)]
pub struct ApplyArgs {
    /// YAML files (or directories of them) holding HTTPRoute and TrafficPolicy objects.
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<PathBuf>,
    /// The controller's admin address (`strait up` prints it).
    #[arg(long)]
    pub controller: SocketAddr,
    /// The operator credential (cert.pem, key.pem, bundle.pem); `strait up` writes one to
    /// ~/.config/strait/operator and to its state directory.
    #[arg(long, env = "STRAIT_CREDENTIALS")]
    pub credentials: Option<PathBuf>,
    /// Check and report, write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// How long to wait for every cluster and proxy to have the new version (0s: do not wait).
    #[arg(long, default_value = "30s", value_parser = parse_wait)]
    pub wait: Duration,
    #[arg(long, short, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<PathBuf>,
    /// The controller's admin address.
    #[arg(long)]
    pub controller: SocketAddr,
    #[arg(long, env = "STRAIT_CREDENTIALS")]
    pub credentials: Option<PathBuf>,
    #[arg(long, short, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Args, Debug)]
pub struct ObjectsArgs {
    /// The controller's admin address.
    #[arg(long)]
    pub controller: SocketAddr,
    /// table, wide (where each object applies, proxies that acknowledged it) or json.
    #[arg(long, short, value_enum, default_value_t)]
    pub output: Output,
}

fn parse_wait(s: &str) -> Result<Duration, String> {
    strait_api::routes::compile::parse_duration(s).or_else(|e| if s == "0" { Ok(Duration::ZERO) } else { Err(e) })
}

/// Where the CLI looks for the operator credential when none is named.
pub fn default_credentials() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    let dir = base.join("strait");
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir.join("operator"))
}

fn read_inputs(files: &[PathBuf]) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = vec![];
    for f in files {
        if f.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(f)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", f.display()))?
                .flatten()
                .map(|e| e.path())
                .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
                .collect();
            entries.sort();
            for p in entries {
                let text =
                    std::fs::read_to_string(&p).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?;
                out.push((p.display().to_string(), text));
            }
        } else {
            let text = std::fs::read_to_string(f).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", f.display()))?;
            out.push((f.display().to_string(), text));
        }
    }
    Ok(out)
}

/// A client of the controller's write API: its gRPC address from the admin view, mTLS with
/// the operator credential, the controller checked by its SPIFFE ID.
async fn client(
    controller: SocketAddr,
    credentials: Option<PathBuf>,
) -> anyhow::Result<PolicyServiceClient<tonic::transport::Channel>> {
    let status = get_json(controller, "/status").await?;
    let grpc = status["grpc_address"]
        .as_str()
        .ok_or_else(|| {
            anyhow::anyhow!("the controller at {controller} does not say its gRPC address (an older version?)")
        })?
        .to_string();
    let dir = credentials
        .or_else(default_credentials)
        .ok_or_else(|| anyhow::anyhow!("no operator credential: pass --credentials DIR"))?;
    let store = strait_trust::load_credentials(&dir).map_err(|e| {
        anyhow::anyhow!(
            "cannot load the operator credential from {}: {e} (strait up writes one; pass --credentials <state dir>/operator)",
            dir.display()
        )
    })?;
    let td = store.id().trust_domain().clone();
    let controller_id = strait_trust::SpiffeId::workload(&td, strait_api::SYSTEM_NAMESPACE, strait_api::FEDERATION_SA)?;
    let tls = strait_trust::client_config(
        Some(&store),
        store.bundle(),
        store.metrics(),
        strait_trust::PeerPolicy::OneOf(vec![controller_id]),
        &[strait_trust::ALPN_H2],
    )?;
    Ok(PolicyServiceClient::new(strait_api::transport::tls_channel(
        &grpc,
        Arc::new(tls),
    )))
}

fn status_error(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", e.message())
}

pub async fn apply(a: ApplyArgs) -> anyhow::Result<()> {
    let inputs = read_inputs(&a.files)?;
    let mut c = client(a.controller, a.credentials.clone()).await?;
    let mut results = vec![];
    for (source, yaml) in inputs {
        let resp = c
            .apply(pb::ApplyRequest {
                yaml,
                source,
                dry_run: a.dry_run,
            })
            .await
            .map_err(status_error)?;
        results.extend(resp.into_inner().results);
    }
    if a.output != Output::Json {
        for r in &results {
            println!(
                "{}/{}/{} {}{} (generation {})",
                r.kind.to_ascii_lowercase(),
                r.namespace,
                r.name,
                r.action,
                if a.dry_run { " (dry run)" } else { "" },
                r.generation
            );
        }
    }
    let mut converged = Value::Null;
    if !a.dry_run && !a.wait.is_zero() {
        converged = wait_applied(a.controller, &results, a.wait, a.output != Output::Json).await?;
    }
    if a.output == Output::Json {
        let out = serde_json::json!({
            "results": results.iter().map(|r| serde_json::json!({
                "kind": r.kind, "namespace": r.namespace, "name": r.name,
                "action": r.action, "generation": r.generation,
            })).collect::<Vec<_>>(),
            "status": converged,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

/// Polls the controller's views until every applied object is applied, at its new generation,
/// in every expected cluster and acknowledged by every proxy; prints progress as it changes.
/// Fails (naming what is missing or refused) when an object is not accepted or time runs out.
async fn wait_applied(
    controller: SocketAddr,
    results: &[pb::ApplyResult],
    limit: Duration,
    progress: bool,
) -> anyhow::Result<Value> {
    let started = Instant::now();
    let mut last_line = String::new();
    loop {
        let routes = get_json(controller, "/routes").await?;
        let policies = get_json(controller, "/policies").await?;
        let all: Vec<&Value> = routes["routes"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(policies["policies"].as_array().into_iter().flatten())
            .collect();
        let mut pending = vec![];
        let mut refused = vec![];
        let mut views = vec![];
        for r in results {
            let found = all.iter().find(|v| {
                v["kind"] == r.kind.as_str() && v["namespace"] == r.namespace.as_str() && v["name"] == r.name.as_str()
            });
            let Some(v) = found else {
                pending.push(format!("{}/{}: not yet read by the controller", r.namespace, r.name));
                continue;
            };
            views.push((*v).clone());
            let generation = v["generation"].as_u64().unwrap_or_default();
            let expected = v["expected_clusters"].as_u64().unwrap_or_default();
            let applied = v["applied_clusters"].as_array().map(Vec::len).unwrap_or_default() as u64;
            let acked = v["proxies_acked"].as_u64().unwrap_or_default();
            let total = v["proxies_total"].as_u64().unwrap_or_default();
            let name = format!("{}/{}/{}", r.kind.to_ascii_lowercase(), r.namespace, r.name);
            let local_refusal = v["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == "Accepted" && c["status"] == "False");
            if generation >= r.generation {
                if let Some(c) = local_refusal {
                    refused.push(format!(
                        "{name}: Accepted=False ({}): {}",
                        s(&c["reason"]),
                        s(&c["message"])
                    ));
                    continue;
                }
            }
            if generation < r.generation || applied < expected || acked < total {
                let missing: Vec<String> = v["missing_clusters"].as_array().into_iter().flatten().map(s).collect();
                pending.push(format!(
                    "{name}: applied in {applied}/{expected} clusters{}, {acked}/{total} proxies",
                    if missing.is_empty() {
                        String::new()
                    } else {
                        format!(" (waiting for {})", missing.join(", "))
                    }
                ));
            }
        }
        if !refused.is_empty() {
            anyhow::bail!("applied, but refused where it was checked:\n  {}", refused.join("\n  "));
        }
        if pending.is_empty() {
            if progress {
                for v in &views {
                    println!(
                        "{}/{}/{}: applied in {}/{} clusters, {}/{} proxies acknowledged generation {} ({:.1}s)",
                        s(&v["kind"]).to_ascii_lowercase(),
                        s(&v["namespace"]),
                        s(&v["name"]),
                        v["applied_clusters"].as_array().map(Vec::len).unwrap_or_default(),
                        v["expected_clusters"],
                        v["proxies_acked"],
                        v["proxies_total"],
                        v["generation"],
                        started.elapsed().as_secs_f64()
                    );
                }
            }
            return Ok(Value::Array(views));
        }
        let line = pending.join("; ");
        if progress && line != last_line {
            eprintln!("waiting: {line}");
            last_line = line;
        }
        if started.elapsed() >= limit {
            anyhow::bail!(
                "not everywhere after {limit:?}:\n  {}\n(the object is stored; it applies where it can and converges when clusters come back)",
                pending.join("\n  ")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn delete(a: DeleteArgs) -> anyhow::Result<()> {
    let inputs = read_inputs(&a.files)?;
    let mut c = client(a.controller, a.credentials).await?;
    let mut results = vec![];
    for (source, yaml) in inputs {
        let resp = c
            .delete(pb::ApplyRequest {
                yaml,
                source,
                dry_run: false,
            })
            .await
            .map_err(status_error)?;
        results.extend(resp.into_inner().results);
    }
    if a.output == Output::Json {
        let out: Vec<Value> = results
            .iter()
            .map(|r| serde_json::json!({"kind": r.kind, "namespace": r.namespace, "name": r.name, "action": r.action}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for r in &results {
            println!(
                "{}/{}/{} {}",
                r.kind.to_ascii_lowercase(),
                r.namespace,
                r.name,
                r.action
            );
        }
    }
    Ok(())
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// `strait get routes` and `strait get policies`.
pub async fn get(a: ObjectsArgs, list: &str) -> anyhow::Result<()> {
    let v = get_json(a.controller, &format!("/{list}")).await?;
    if a.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let empty = vec![];
    let condition = |r: &Value, kind: &str| {
        r["conditions"]
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .find(|c| c["type"] == kind)
            .map(|c| (s(&c["status"]), s(&c["reason"]), s(&c["message"])))
    };
    let wide = a.output == Output::Wide;
    let mut headers = vec![
        "KIND",
        "NAMESPACE",
        "NAME",
        "SCOPE",
        "GEN",
        "ACCEPTED",
        "RESOLVEDREFS",
        "APPLIED",
    ];
    if wide {
        headers.extend(["PROXIES", "ORIGIN", "NOT YET"]);
    }
    headers.push("MESSAGE");
    let rows: Vec<Vec<String>> = v[list]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|r| {
            let accepted = condition(r, "Accepted");
            let resolved = condition(r, "ResolvedRefs");
            let show = |c: &Option<(String, String, String)>| {
                c.as_ref()
                    .map(|c| format!("{} ({})", c.0, c.1))
                    .unwrap_or_else(|| "-".into())
            };
            let mut messages: Vec<String> = ["Accepted", "ResolvedRefs", "Conflict", "Overridden"]
                .iter()
                .filter_map(|k| condition(r, k))
                .map(|c| c.2)
                .filter(|m| !m.is_empty())
                .collect();
            if !wide {
                messages.truncate(1);
            }
            let applied = r["applied_clusters"].as_array().map(Vec::len).unwrap_or_default();
            let mut row = vec![
                s(&r["kind"]),
                s(&r["namespace"]),
                s(&r["name"]),
                s(&r["scope"]),
                s(&r["generation"]),
                show(&accepted),
                show(&resolved),
                format!("{applied}/{} clusters", s(&r["expected_clusters"])),
            ];
            if wide {
                let mut not_yet: Vec<String> = r["missing_clusters"]
                    .as_array()
                    .unwrap_or(&empty)
                    .iter()
                    .map(s)
                    .collect();
                not_yet.extend(r["proxies_pending"].as_array().unwrap_or(&empty).iter().map(s));
                row.push(format!(
                    "{}/{} acked gen {}",
                    s(&r["proxies_acked"]),
                    s(&r["proxies_total"]),
                    s(&r["generation"])
                ));
                row.push(s(&r["origin_cluster"]));
                row.push(if not_yet.is_empty() {
                    "-".into()
                } else {
                    not_yet.join(",")
                });
            }
            row.push(messages.join("; "));
            row
        })
        .collect();
    print!("{}", table(&headers, &rows));
    for e in v["file_errors"].as_array().unwrap_or(&empty) {
        println!("file {}: {}", s(&e["file"]), s(&e["error"]));
    }
    Ok(())
}

pub const EXPLAIN_EXAMPLES: &str = "Examples:
  strait route explain --controller 127.10.1.1:15014 --from east/echo-us-east-1a \\
      http://greeter.demo.svc.clusterset.local/ -H 'x-canary: 1'
  strait route explain --controller 127.10.1.1:15014 --from east/echo-us-east-1a \\
      http://echo.demo.svc.clusterset.local/status/503 --output json

--controller is the admin address of any cluster's controller (strait up prints them): for
another cluster's workload it asks that cluster's controller over the mesh, with the operator
credential (--credentials).";

#[derive(clap::Subcommand, Debug)]
pub enum RouteCommand {
    /// What a workload's sidecar would do with a request: the route and rule that match and
    /// why, filters, backends and weights, the TrafficPolicy, locality levels with health,
    /// and the endpoint it would pick. Nothing is sent.
    #[command(after_help = EXPLAIN_EXAMPLES)]
    Explain(ExplainArgs),
}

#[derive(Args, Debug)]
pub struct ExplainArgs {
    /// The calling workload, `<cluster>/<workload>` (as `strait status` lists proxies).
    #[arg(long)]
    pub from: String,
    /// The URL the workload would call.
    pub url: String,
    /// Request headers, `name: value` (repeatable).
    #[arg(short = 'H', long = "header")]
    pub headers: Vec<String>,
    #[arg(short = 'X', long, default_value = "GET")]
    pub method: String,
    /// The admin address of a controller (any cluster's).
    #[arg(long)]
    pub controller: SocketAddr,
    /// The operator credential, needed when --from names another cluster than the
    /// controller's (default: ~/.config/strait/operator, which `strait up` writes).
    #[arg(long, env = "STRAIT_CREDENTIALS")]
    pub credentials: Option<PathBuf>,
    #[arg(long, short, value_enum, default_value_t)]
    pub output: Output,
}

/// Asks the sidecar of `workload` in the controller's own cluster, at its admin address.
async fn local_explain(
    status: &serde_json::Value,
    cluster: &str,
    workload: &str,
    a: &ExplainArgs,
) -> anyhow::Result<serde_json::Value> {
    let empty = vec![];
    let proxies = status["proxies"].as_array().unwrap_or(&empty);
    let proxy = proxies
        .iter()
        .find(|p| p["node"] == workload && p["kind"] == "sidecar")
        .ok_or_else(|| {
            let known: Vec<String> = proxies
                .iter()
                .filter(|p| p["kind"] == "sidecar")
                .map(|p| s(&p["node"]))
                .collect();
            anyhow::anyhow!(
                "no sidecar {workload} in cluster {cluster}; its sidecars: {}",
                known.join(", ")
            )
        })?;
    let admin: SocketAddr = s(&proxy["admin"])
        .parse()
        .map_err(|_| anyhow::anyhow!("sidecar {workload} did not say its admin address (an older version?)"))?;
    let query = strait_api::admin::explain_query(&a.method, &a.url, &a.headers);
    get_json(admin, &format!("/explain?{query}")).await
}

pub async fn explain(a: ExplainArgs) -> anyhow::Result<()> {
    let (cluster, workload) = a.from.split_once('/').ok_or_else(|| {
        anyhow::anyhow!(
            "--from {:?}: use <cluster>/<workload>, e.g. east/echo-us-east-1a",
            a.from
        )
    })?;
    for h in &a.headers {
        if !h.contains(':') {
            anyhow::bail!("-H {h:?}: use 'name: value'");
        }
    }
    let status = get_json(a.controller, "/status").await?;
    let v = if status["cluster"] != cluster {
        // Another cluster's workload: that cluster's controller answers, asked over the mesh.
        let mut c = client(a.controller, a.credentials.clone()).await?;
        let answer = c
            .explain(pb::ExplainRequest {
                cluster: cluster.to_string(),
                workload: workload.to_string(),
                method: a.method.clone(),
                url: a.url.clone(),
                headers: a.headers.clone(),
            })
            .await
            .map_err(status_error)?;
        serde_json::from_str(&answer.into_inner().json)
            .map_err(|e| anyhow::anyhow!("cluster {cluster}'s answer is not JSON: {e}"))?
    } else {
        local_explain(&status, cluster, workload, &a).await?
    };
    let empty = vec![];
    if a.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let mut rows: Vec<Vec<String>> = vec![];
    let mut row = |k: &str, v: String| rows.push(vec![k.to_string(), v]);
    let headers = v["request"]["headers"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(s)
        .collect::<Vec<_>>();
    row(
        "Request",
        format!(
            "{} {}{} from {}/{workload} ({})",
            s(&v["request"]["method"]),
            s(&v["request"]["url"]),
            if headers.is_empty() {
                String::new()
            } else {
                format!(" [{}]", headers.join(", "))
            },
            cluster,
            s(&v["from"]["zone"])
        ),
    );
    if !v["service"].is_null() {
        row("Service", s(&v["service"]));
    }
    let route = &v["route"];
    if route["name"].is_null() {
        if !route.is_null() {
            row("Route", s(&route["why"]));
        }
    } else {
        row("Route", format!("{} rule {}", s(&route["name"]), s(&route["rule"])));
        let why: Vec<String> = route["why"].as_array().unwrap_or(&empty).iter().map(s).collect();
        row("Matched", why.join("; "));
        for f in route["filters"].as_array().unwrap_or(&empty) {
            row("Filter", s(f));
        }
        for b in route["backends"].as_array().unwrap_or(&empty) {
            row(
                "Backend",
                format!(
                    "{} weight {} ({:.0}%){}, {}",
                    s(&b["service"]),
                    s(&b["weight"]),
                    b["share_percent"].as_f64().unwrap_or_default(),
                    if b["resolved"] == false { " NOT IN CATALOG" } else { "" },
                    s(&b["kind"])
                ),
            );
        }
    }
    if !v["destination"].is_null() {
        row("Sent to", s(&v["destination"]));
    }
    if !v["traffic_policy"].is_null() {
        row("Policy", format!("TrafficPolicy {}", s(&v["traffic_policy"]["name"])));
        for setting in v["traffic_policy"]["settings"].as_array().unwrap_or(&empty) {
            row("", s(setting));
        }
    }
    for level in v["priorities"].as_array().unwrap_or(&empty) {
        let eps: Vec<String> = level["endpoints"]
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .map(|e| {
                let health = if e["healthy"] == true {
                    "healthy"
                } else if e["ready"] == false {
                    "not ready"
                } else if e["reachable"] == false {
                    "cluster unreachable"
                } else {
                    "ejected"
                };
                format!(
                    "{} ({}/{}) {health}",
                    s(&e["endpoint"]),
                    s(&e["cluster"]),
                    s(&e["zone"])
                )
            })
            .collect();
        row(&format!("Level {}", s(&level["level"])), eps.join(", "));
    }
    if !v["pick"].is_null() {
        row(
            "Pick",
            format!(
                "{} at {} ({}/{})",
                s(&v["pick"]["endpoint"]),
                s(&v["pick"]["address"]),
                s(&v["pick"]["cluster"]),
                s(&v["pick"]["zone"])
            ),
        );
    }
    if !v["error"].is_null() {
        row("Error", s(&v["error"]));
    }
    for r in rows {
        println!("{:<9} {}", r[0], r[1]);
    }
    Ok(())
}
