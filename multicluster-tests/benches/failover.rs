//! Failover time: prints figures, asserts nothing about time.
//!
//! Run: `cargo build --release --bin strait --bin strait-sidecar && cargo bench -p multicluster-tests --bench failover`
//!
//! One mesh from the release binary, three clusters. A caller in `us-east-1a` sends GETs at
//! 1,000 requests/s (`STRAIT_BENCH_RPS`), open loop, each on a new connection to its sidecar,
//! for `STRAIT_BENCH_SECONDS` (default 10) per scenario; three seconds in, something dies:
//! - **zone**: the only endpoint of `echo` in the caller's zone (its app and its sidecar, both
//!   `kill -9`, as when a pod's node dies); traffic should move to `us-east-1b`;
//! - **gateway restart**: cluster `west`'s gateway, `kill -9` and at once its own command again
//!   (as a supervisor restarts it); calls to `remote` should move to `eu-central` only for as
//!   long as it is away, and come back to `west` (the figure "fully moved" is then when every
//!   request was served by `west` again);
//! - **cluster**: cluster `west`, the nearest one serving `remote` (its gateway and controller,
//!   `kill -9`); traffic should move to `eu-central`.
//!
//! For each: the requests that failed, when (by send time, after the kill) the last one failed,
//! failures sent more than 1 s / 2 s after the kill, and when traffic had fully moved (every
//! request sent from then on answered by the new place), the p99 before the kill, the slowest
//! request after it, and when the disturbance settled (the send time of the last request slower
//! than 5x the p99 before, at least 50 ms). Goals: 0 failed after 1 s for a zone,
//! after 2 s for a cluster. Figures also go to `target/strait-bench/failover.json`.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use multicluster_tests::figures::Figures;
use multicluster_tests::{LoadReport, Mesh, MeshOptions, Outcome};

const TOPOLOGY: &str = r#"
trustDomain: mesh.local
services:
  - {name: client, port: 80, protocol: http}
  - {name: echo, port: 80, protocol: http}
  - {name: remote, port: 80, protocol: http}
clusters:
  - name: east
    region: us-east
    zones: [us-east-1a, us-east-1b]
    workloads:
      - {service: client, zone: us-east-1a}
      - {service: echo, zone: us-east-1a}
      - {service: echo, zone: us-east-1b}
  - name: west
    region: us-west
    zones: [us-west-2a]
    workloads:
      - {service: remote, zone: us-west-2a}
  - name: central
    region: eu-central
    zones: [eu-central-1a]
    workloads:
      - {service: remote, zone: eu-central-1a}
"#;

const KILL_AT: Duration = Duration::from_secs(3);

struct Moved {
    requests: usize,
    failed: usize,
    /// Send time after the kill of the last failed request.
    last_failure: Option<Duration>,
    after_1s: usize,
    after_2s: usize,
    /// From the kill until every request sent from then on was answered by `to`.
    moved: Option<Duration>,
    before_kill_elsewhere: usize,
    /// p99 latency of the requests sent before the kill.
    p99_before: Duration,
    /// The slowest request sent after the kill.
    slowest: Duration,
    /// From the kill until the last request sent that was slower than [`slow_after`] of
    /// `p99_before` (the time callers could notice).
    settled: Option<Duration>,
}

/// A request slower than this after a kill counts as disturbed by it.
fn slow_after(p99_before: Duration) -> Duration {
    (p99_before * 5).max(Duration::from_millis(50))
}

fn analyse(report: &LoadReport, to_zone: &str, from_zone: &str) -> Moved {
    let mut samples: Vec<_> = report.samples.iter().collect();
    samples.sort_by_key(|s| s.due);
    let after = |d: Duration| d.checked_sub(KILL_AT);
    let failed: Vec<_> = samples
        .iter()
        .filter(|s| !matches!(s.outcome, Outcome::Served { .. }))
        .collect();
    let late = |limit: Duration| {
        failed
            .iter()
            .filter(|s| after(s.due).is_some_and(|a| a > limit))
            .count()
    };
    // The earliest send time after which no request was answered anywhere but `to_zone`.
    let last_not_moved = samples
        .iter()
        .rev()
        .find(|s| !matches!(&s.outcome, Outcome::Served { zone, .. } if zone == to_zone))
        .map(|s| s.due);
    let moved = match last_not_moved {
        None => Some(Duration::ZERO),
        Some(d) if d + Duration::from_millis(1) >= samples.last().map(|s| s.due).unwrap_or_default() => None,
        Some(d) => Some(after(d).unwrap_or_default()),
    };
    let mut before: Vec<Duration> = samples.iter().filter(|s| s.due < KILL_AT).map(|s| s.latency).collect();
    before.sort();
    let p99_before = before
        .get((before.len() as f64 * 0.99) as usize)
        .copied()
        .unwrap_or_default();
    let after_kill = || samples.iter().filter(|s| s.due >= KILL_AT);
    Moved {
        p99_before,
        slowest: after_kill().map(|s| s.latency).max().unwrap_or_default(),
        settled: after_kill()
            .filter(|s| s.latency > slow_after(p99_before))
            .map(|s| s.due - KILL_AT)
            .max(),
        requests: samples.len(),
        failed: failed.len(),
        last_failure: failed.iter().filter_map(|s| after(s.due)).max(),
        after_1s: late(Duration::from_secs(1)),
        after_2s: late(Duration::from_secs(2)),
        moved,
        before_kill_elsewhere: samples
            .iter()
            .filter(|s| s.due < KILL_AT)
            .filter(|s| !matches!(&s.outcome, Outcome::Served { zone, .. } if zone == from_zone))
            .count(),
    }
}

/// GETs of `url` through `proxy` at `rps` for `run`, with `kill` done [`KILL_AT`] in.
async fn killed_under_load<F, Fut>(
    proxy: std::net::SocketAddr,
    url: &str,
    rps: u32,
    run: Duration,
    kill: F,
) -> LoadReport
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    LoadReport::run(proxy, url, rps, run, |start| async move {
        tokio::time::sleep_until((start + KILL_AT).into()).await;
        kill().await;
    })
    .await
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("never".into(), |d| format!("{:.3} s", d.as_secs_f64()))
}

#[tokio::main]
async fn main() {
    let seconds = multicluster_tests::load::bench_setup();
    let rps: u32 = std::env::var("STRAIT_BENCH_RPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let mut mesh = Mesh::start_with(MeshOptions {
        topology: Some(TOPOLOGY.into()),
        ..Default::default()
    })
    .await
    .unwrap();
    let caller = mesh.workload("client", "us-east-1a").clone();
    let near = mesh.workload("echo", "us-east-1a").clone();
    let mut west = mesh.cluster("west").clone();
    // Warm: every path used once, so each scenario starts from connections in use.
    for url in [
        "http://echo.demo.svc.clusterset.local/",
        "http://remote.demo.svc.clusterset.local/",
    ] {
        let r = LoadReport::run(caller.outbound_proxy, url, 100, Duration::from_secs(2), |_| async {}).await;
        assert!(r.failures().is_empty(), "{url} fails before anything was killed");
    }
    println!(
        "strait failover benchmark: {rps} GET/s, open loop, a new connection per request, kill -9 at {}s of {seconds}s\n",
        KILL_AT.as_secs()
    );
    let mut figures = Figures::new("failover");
    let run = Duration::from_secs(seconds.max(KILL_AT.as_secs() + 3));
    let (proxy, echo, remote) = (
        caller.outbound_proxy,
        "http://echo.demo.svc.clusterset.local/",
        "http://remote.demo.svc.clusterset.local/",
    );
    let mesh_ref = &mesh;
    let zone = killed_under_load(proxy, echo, rps, run, || async move {
        mesh_ref.kill9(near.app_pid);
        mesh_ref.kill9(near.sidecar_pid);
    })
    .await;
    let zone = analyse(&zone, "us-east-1b", "us-east-1a");
    let env = Mesh::restart_environment(west.gateway.pid);
    let restarted = std::cell::Cell::new(None);
    let (mesh_mut, gateway, restarted_ref) = (&mut mesh, &west.gateway, &restarted);
    let gateway_restart = killed_under_load(proxy, remote, rps, run, || async move {
        let killed = std::time::Instant::now();
        mesh_mut.kill9(gateway.pid);
        let pid = mesh_mut.restart_component(gateway, &env).await.unwrap();
        restarted_ref.set(Some((pid, killed.elapsed())));
    })
    .await;
    let (pid, restarted_after) = restarted.get().unwrap();
    west.gateway.pid = pid;
    let gateway_restart = analyse(&gateway_restart, "us-west-2a", "us-west-2a");
    let mesh_ref = &mesh;
    let cluster = killed_under_load(proxy, remote, rps, run, || async move {
        mesh_ref.kill9(west.gateway.pid);
        mesh_ref.kill9(west.controller.pid);
    })
    .await;
    let cluster = analyse(&cluster, "eu-central-1a", "us-west-2a");

    println!(
        "{:<40} {:>8} {:>6} {:>12} {:>4} {:>4} {:>11} {:>10} {:>10} {:>11}",
        "scenario (time after the kill)",
        "requests",
        "failed",
        "last failure",
        ">1s",
        ">2s",
        "fully moved",
        "p99 before",
        "slowest",
        "settled"
    );
    for (key, label, m, goal) in [
        (
            "zone",
            "zone lost: us-east-1a -> us-east-1b",
            &zone,
            "goal: 0 failed after 1 s",
        ),
        (
            "gateway_restart",
            "gateway restarted: west (kill -9, start)",
            &gateway_restart,
            "fully moved: back to west",
        ),
        (
            "cluster",
            "cluster lost: west -> central",
            &cluster,
            "goal: 0 failed after 2 s",
        ),
    ] {
        println!(
            "{label:<40} {:>8} {:>6} {:>12} {:>4} {:>4} {:>11} {:>10} {:>10} {:>11}   ({goal})",
            m.requests,
            m.failed,
            secs(m.last_failure),
            m.after_1s,
            m.after_2s,
            secs(m.moved),
            format!("{:.1} ms", m.p99_before.as_secs_f64() * 1000.0),
            format!("{:.1} ms", m.slowest.as_secs_f64() * 1000.0),
            secs(m.settled),
        );
        if m.before_kill_elsewhere > 0 {
            println!(
                "  note: {} requests before the kill were not served in the nearest place",
                m.before_kill_elsewhere
            );
        }
        figures.add(&format!("{key}.requests"), m.requests as f64, "requests");
        figures.add(&format!("{key}.failed"), m.failed as f64, "requests");
        figures.add(
            &format!("{key}.last_failure_after_kill"),
            m.last_failure.map_or(0.0, |d| d.as_secs_f64()),
            "s",
        );
        figures.add(&format!("{key}.failed_after_1s"), m.after_1s as f64, "requests");
        figures.add(&format!("{key}.failed_after_2s"), m.after_2s as f64, "requests");
        figures.add(
            &format!("{key}.p99_before_kill"),
            m.p99_before.as_secs_f64() * 1000.0,
            "ms",
        );
        figures.add(
            &format!("{key}.slowest_after_kill"),
            m.slowest.as_secs_f64() * 1000.0,
            "ms",
        );
        figures.add(
            &format!("{key}.settled_after_kill"),
            m.settled.map_or(0.0, |d| d.as_secs_f64()),
            "s",
        );
        figures.add(
            &format!("{key}.fully_moved_after_kill"),
            m.moved.map_or(f64::NAN, |d| d.as_secs_f64()),
            "s",
        );
    }
    println!(
        "  the gateway's new process was started {:.3} s after the kill (once its addresses could be bound)",
        restarted_after.as_secs_f64()
    );
    figures.add("gateway_restart.started_after_kill", restarted_after.as_secs_f64(), "s");
    figures.write();
}
