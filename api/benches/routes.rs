//! Route matching cost: 50 HTTPRoutes of 16 rules each attached to one service (the issue's
//! stated size), compiled into one table; prints the time to compile and build the table and
//! the per-request match time (p50/p99 over many requests, against a no-route baseline of
//! zero). Figures only; nothing is asserted.
//!
//! Run: `cargo bench -p strait-api --bench routes`

#![allow(clippy::unwrap_used)]

/// The JSON document every benchmark writes, `target/strait-bench/<name>.json`: the same source
/// as the other benchmarks' (this crate cannot depend on `multicluster-tests`).
#[allow(dead_code, unused_imports)]
#[path = "../../multicluster-tests/src/figures.rs"]
mod figures;

use std::sync::Arc;
use std::time::{Duration, Instant};

use strait_api::routes::compile::{compile_route, BackendLookup};
use strait_api::routes::{HttpRouteSpec, RequestView, RouteTable};

fn spec(route: usize) -> HttpRouteSpec {
    let mut rules = String::new();
    for rule in 0..16 {
        // A mix of what users write: prefixes, exact paths, headers, a regex, query params.
        let m = match rule % 4 {
            0 => format!("[{{path: {{type: PathPrefix, value: /r{route}/p{rule}}}}}]"),
            1 => format!("[{{path: {{type: Exact, value: /r{route}/e{rule}}}, method: GET}}]"),
            2 => format!("[{{path: {{type: PathPrefix, value: /r{route}}}, headers: [{{name: x-rule, value: \"{rule}\"}}]}}]"),
            _ => format!("[{{path: {{type: RegularExpression, value: \"/r{route}/x[0-9]+/{rule}\"}}, queryParams: [{{name: v, value: \"{rule}\"}}]}}]"),
        };
        rules.push_str(&format!(
            "  - matches: {m}\n    backendRefs: [{{name: b{rule}, port: 80, weight: 3}}, {{name: c{rule}, port: 80, weight: 1}}]\n"
        ));
    }
    serde_yaml::from_str(&format!("parentRefs: [{{name: api}}]\nrules:\n{rules}")).unwrap()
}

fn main() {
    let specs: Vec<HttpRouteSpec> = (0..50).map(spec).collect();
    let started = Instant::now();
    let routes: Vec<_> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let (r, errors) = compile_route("demo", &format!("r{i}"), s, &|_| BackendLookup::Found);
            assert!(errors.is_empty(), "{errors:?}");
            Arc::new(r.unwrap())
        })
        .collect();
    let table = RouteTable::new(&routes);
    let build = started.elapsed();
    println!("50 routes x 16 rules: compiled and indexed in {build:.2?}");
    let mut figures = figures::Figures::new("routes");
    figures.add("build", build.as_secs_f64() * 1e6, "us");

    let mut headers = http::HeaderMap::new();
    headers.insert("x-rule", "14".parse().unwrap());
    headers.insert("user-agent", "bench".parse().unwrap());
    // (label, method, path, query): first-route hits, last-route hits, and a miss.
    let cases = [
        ("exact, first route", "GET", "/r0/e1", None),
        ("prefix, last route", "GET", "/r49/p12/items/7", None),
        ("header, last route", "POST", "/r49/anything", None),
        ("regex+query, last route", "GET", "/r49/x123/15", Some("a=1&v=15")),
        ("no rule matches", "GET", "/nowhere", None),
    ];
    println!("{:<28} {:>10} {:>10}", "match (ns per request)", "p50", "p99");
    for (label, method, path, query) in cases {
        let mut samples: Vec<Duration> = Vec::with_capacity(20_000);
        for _ in 0..20_000 {
            let req = RequestView {
                method,
                path,
                query,
                headers: &headers,
            };
            let t = Instant::now();
            let hit = table.route(&req);
            samples.push(t.elapsed());
            std::hint::black_box(hit);
        }
        samples.sort();
        let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)].as_nanos();
        println!("{label:<28} {:>10} {:>10}", pct(0.5), pct(0.99));
        let key = label.replace([' ', ','], "_").replace("__", "_");
        figures.add(&format!("{key}.p50"), pct(0.5) as f64, "ns");
        figures.add(&format!("{key}.p99"), pct(0.99) as f64, "ns");
    }
    figures.write();
}
