//! `strait status` and `strait services`: read a controller's admin views and print them.

use std::net::SocketAddr;

use clap::Args;
use serde_json::Value;

use super::{get_json, Output};

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The controller's admin address (`controller.admin_addr` in `strait up --output json`).
    #[arg(long)]
    pub controller: SocketAddr,
    #[arg(long, short, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Args, Debug)]
pub struct DashboardArgs {
    /// The controller's admin address (`controller.admin_addr` in `strait up --output json`).
    #[arg(long)]
    pub controller: SocketAddr,
    #[arg(long, short, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Args, Debug)]
pub struct ServicesArgs {
    /// The controller's admin address.
    #[arg(long)]
    pub controller: SocketAddr,
    #[arg(long, short, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(clap::Subcommand, Debug)]
pub enum GetCommand {
    /// HTTPRoutes: conditions (Accepted, ResolvedRefs, Conflict, Overridden), scope, and where
    /// each is applied (every cluster reports back through peering).
    #[command(
        after_help = "Examples:\n  strait get routes --controller 127.10.1.1:15014\n  strait get routes --controller 127.10.1.1:15014 --output wide\n  strait get routes --controller 127.10.1.1:15014 --output json"
    )]
    Routes(super::policy::ObjectsArgs),
    /// TrafficPolicies, shown like routes.
    #[command(after_help = "Examples:\n  strait get policies --controller 127.10.1.1:15014 --output wide")]
    Policies(super::policy::ObjectsArgs),
}

/// Prints rows under headers with aligned columns.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(headers.iter().map(|h| h.to_string()).collect());
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.clone()));
        out.push('\n');
    }
    out
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn ago(ms: i64) -> String {
    if ms <= 0 {
        return "never".into();
    }
    let now = strait_api::unix_ms(std::time::SystemTime::now());
    format!("{:.1}s ago", (now - ms).max(0) as f64 / 1000.0)
}

/// The clusterset page's URL, once the controller answered its API, and the clusters it sees.
pub async fn dashboard(a: DashboardArgs) -> anyhow::Result<()> {
    let v = get_json(a.controller, "/api/clusterset").await?;
    let url = format!("http://{}/", a.controller);
    if a.output == Output::Json {
        let out = serde_json::json!({"url": url, "cluster": v["cluster"], "clusters": v["clusters"]});
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("{url}");
    let empty = vec![];
    let rows: Vec<Vec<String>> = v["clusters"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|c| {
            vec![
                s(&c["name"]),
                s(&c["state"]),
                c["zones"]
                    .as_array()
                    .map(|z| z.iter().map(s).collect::<Vec<_>>().join(","))
                    .unwrap_or_default(),
                c["gateway"]["transport"].as_str().unwrap_or("-").to_string(),
            ]
        })
        .collect();
    print!("{}", table(&["CLUSTER", "STATE", "ZONES", "TUNNEL"], &rows));
    println!(
        "{} traffic edges over the last {}s; the page refreshes itself (JSON: {url}api/clusterset)",
        v["edges"].as_array().map_or(0, Vec::len),
        v["window_ms"].as_u64().unwrap_or(0) / 1000
    );
    Ok(())
}

pub async fn status(a: StatusArgs) -> anyhow::Result<()> {
    let v = get_json(a.controller, "/status").await?;
    if a.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "cluster {} (region {}), config version {}, lease {}ms",
        s(&v["cluster"]),
        s(&v["region"]),
        s(&v["config_version"]),
        s(&v["lease_ms"])
    );
    let empty = vec![];
    let peers = v["peers"].as_array().unwrap_or(&empty);
    let rows: Vec<Vec<String>> = peers
        .iter()
        .map(|p| {
            vec![
                s(&p["name"]),
                if p["connected"].as_bool() == Some(true) {
                    "yes"
                } else {
                    "no"
                }
                .into(),
                if p["lease_valid"].as_bool() == Some(true) {
                    format!("valid ({}ms left)", p["lease_expires_in_ms"])
                } else {
                    "expired".into()
                },
                ago(p["last_renewed_unix_ms"].as_i64().unwrap_or_default()),
                s(&p["exported_services"]),
                s(&p["gateway"]),
            ]
        })
        .collect();
    println!();
    print!(
        "{}",
        table(
            &["PEER", "CONNECTED", "LEASE", "LAST RENEWED", "EXPORTS", "GATEWAY"],
            &rows
        )
    );
    let proxies = v["proxies"].as_array().unwrap_or(&empty);
    println!("\n{} proxies subscribed", proxies.len());
    // Scoped proxies by scope: a service such a proxy does not hold is out of its scope.
    let mut scopes: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for p in proxies {
        if let Some(scope) = p["scope"].as_str().filter(|s| !s.is_empty()) {
            *scopes.entry(scope).or_default() += 1;
        }
    }
    for (scope, n) in scopes {
        println!("  {n} scoped to {scope}");
    }
    let rejected: Vec<&Value> = proxies
        .iter()
        .filter(|p| p["rejected"].as_array().is_some_and(|r| !r.is_empty()))
        .collect();
    for p in rejected {
        println!("  {} rejected: {}", s(&p["node"]), p["rejected"]);
    }
    for e in v["errors"].as_array().unwrap_or(&empty) {
        println!("catalog error: {}", s(e));
    }
    if !v["policy_error"].is_null() {
        println!("policy error: {}", s(&v["policy_error"]));
    }
    Ok(())
}

pub async fn services(a: ServicesArgs) -> anyhow::Result<()> {
    let v = get_json(a.controller, "/services").await?;
    if a.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let empty = vec![];
    let rows: Vec<Vec<String>> = v["services"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|svc| {
            let ports: Vec<String> = svc["ports"]
                .as_array()
                .unwrap_or(&empty)
                .iter()
                .map(|p| format!("{}/{}", p["port"], s(&p["protocol"])))
                .collect();
            let clusters = svc["clusters"].as_array().unwrap_or(&empty);
            let placement: Vec<String> = clusters
                .iter()
                .map(|c| {
                    let zones: Vec<String> = c["zones"].as_array().unwrap_or(&empty).iter().map(s).collect();
                    format!("{}({})", s(&c["cluster"]), zones.join(","))
                })
                .collect();
            let ready: u64 = clusters.iter().map(|c| c["ready"].as_u64().unwrap_or_default()).sum();
            let total: u64 = clusters
                .iter()
                .map(|c| c["endpoints"].as_u64().unwrap_or_default())
                .sum();
            let conflict = svc["conditions"]
                .as_array()
                .unwrap_or(&empty)
                .iter()
                .find(|c| c["type"] == "Conflict" && c["status"] == "True")
                .map(|c| s(&c["message"]))
                .unwrap_or_else(|| "-".into());
            vec![
                format!("{}.{}.svc.clusterset.local", s(&svc["name"]), s(&svc["namespace"])),
                s(&svc["clusterset_ip"]),
                ports.join(","),
                placement.join(" "),
                format!("{ready}/{total}"),
                if ready == total && total > 0 {
                    "healthy".into()
                } else if ready > 0 {
                    "degraded".into()
                } else {
                    "down".into()
                },
                conflict,
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "SERVICE",
                "CLUSTERSET IP",
                "PORTS",
                "CLUSTERS(ZONES)",
                "READY",
                "HEALTH",
                "CONFLICT"
            ],
            &rows
        )
    );
    Ok(())
}
