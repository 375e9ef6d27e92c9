//! Delay and loss between clusters: prints figures, asserts nothing about time. Needs root.
//!
//! Run: `cargo build --release --bin strait --bin strait-sidecar && cargo bench -p multicluster-tests --bench loss`
//!
//! A `strait up --netns` mesh from the release binary (every process in its own network
//! namespace, only gateways on the bridge between clusters): a caller in `east`, an HTTP app
//! (`remote`) and a TCP echo (`sink`) in `west`. What reaches each gateway from the other
//! cluster is delayed 20 ms and loses 1 % of its packets (`STRAIT_BENCH_DELAY_MS`,
//! `STRAIT_BENCH_LOSS_PERCENT`; the netem qdisc, or `nfq-netem` where the kernel has none).
//!
//! From inside the caller's namespace, through its sidecar, as its application would:
//! small requests (1 kB POSTs to `remote`, `STRAIT_BENCH_RPS` = 50/s over 64 keep-alive
//! connections, open loop, `STRAIT_BENCH_SECONDS` = 20 s), first alone, then beside a bulk
//! echo to `sink` through the same sidecar and the same gateway pair (one connection, written
//! as fast as it drains). Both over the QUIC tunnel, then again with UDP to west's gateway
//! dropped in the caller's namespace, so the same hops and the same inner mTLS ride the TCP+TLS
//! fallback (full-duplex HTTP/2 streams sharing one TCP connection).
//!
//! Also the time a new connection takes to its first echoed byte over each transport (50 each,
//! with the impairment on), and that time in inter-cluster round trips.
//!
//! Prints p50/p90/p99/max of the small requests, failures, the bulk's MB/s, and QUIC / TCP p99
//! beside bulk (goal <= 0.5x: a lost packet of the bulk stream must not hold up the others).
//! Figures also go to `target/strait-bench/loss.json`.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use multicluster_tests::figures::Figures;
use multicluster_tests::load::{load_over, Latencies};
use multicluster_tests::netem::{connect_in, in_ns, Impairment};
use multicluster_tests::{metric_sum, scrape, tunnel_over, Mesh, MeshOptions, WorkloadInfo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOPOLOGY: &str = r#"
trustDomain: mesh.local
services:
  - {name: client, port: 80, protocol: http}
  - {name: remote, port: 80, protocol: http}
  - {name: sink, port: 9000, protocol: tcp}
clusters:
  - name: east
    region: us-east
    zones: [us-east-1a]
    workloads:
      - {service: client, zone: us-east-1a}
  - name: west
    region: us-west
    zones: [us-west-2a]
    workloads:
      - {service: remote, zone: us-west-2a}
      - {service: sink, zone: us-west-2a}
"#;

/// The caller's sidecar, as its application reaches it from inside its namespace.
const PROXY: &str = "127.0.0.1:15001";
const URL: &str = "http://remote.demo.svc.clusterset.local/small";
const SINK: &str = "sink.demo.svc.clusterset.local:9000";
/// Enough keep-alive connections that a slow answer does not hold up the requests due after
/// it (HTTP/1.1 answers one request at a time per connection): the figures are the path's.
const CONNECTIONS: usize = 64;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn proxy_conn(ns: &str) -> tokio::net::TcpStream {
    connect_in(ns, PROXY.parse().unwrap()).await.unwrap()
}

/// Echoes through a tunnel to `sink` as fast as it drains until `stop` changes; MB/s received.
async fn bulk_until(ns: String, mut stop: tokio::sync::watch::Receiver<bool>) -> f64 {
    let stream = tunnel_over(proxy_conn(&ns).await, SINK).await.unwrap();
    let (mut r, mut w) = stream.into_split();
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 16 * 1024];
        while w.write_all(&chunk).await.is_ok() {}
    });
    let mut got = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            n = r.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n as u64,
            },
        }
    }
    writer.abort();
    got as f64 / 1e6 / started.elapsed().as_secs_f64()
}

struct Run {
    lat: Latencies,
    errors: usize,
    bulk_mbps: Option<f64>,
    /// Upstream connections the caller's sidecar opened and requests it retried meanwhile.
    opened: f64,
    retried: f64,
}

/// The caller sidecar's upstream connections opened and requests retried so far.
async fn upstream_counts(admin: SocketAddr) -> (f64, f64) {
    let text = scrape(admin).await.unwrap_or_default();
    (
        metric_sum(&text, "strait_upstream_connections_opened_total", &[]),
        metric_sum(&text, "strait_upstream_retries_total", &[]),
    )
}

/// Small requests for `seconds`, beside a bulk echo when `with_bulk`.
async fn small_requests(ns: &str, admin: SocketAddr, rate: u32, seconds: u64, with_bulk: bool) -> Run {
    let before = upstream_counts(admin).await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let bulk = with_bulk.then(|| tokio::spawn(bulk_until(ns.to_string(), stop_rx)));
    if bulk.is_some() {
        // Let the bulk transfer fill the path before the first small request.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let mut streams = vec![];
    for _ in 0..CONNECTIONS {
        streams.push(proxy_conn(ns).await);
    }
    let (lat, errors) = load_over(streams, URL, true, rate, rate as u64 * seconds).await;
    let _ = stop_tx.send(true);
    let bulk_mbps = match bulk {
        Some(b) => Some(b.await.unwrap()),
        None => None,
    };
    let after = upstream_counts(admin).await;
    Run {
        lat,
        errors,
        bulk_mbps,
        opened: after.0 - before.0,
        retried: after.1 - before.1,
    }
}

/// Opens tunnels to `sink` until the caller's `strait_tunnel_fallback_active` reads `want`.
async fn await_transport(ns: &str, admin: SocketAddr, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(mut s) = tunnel_over(proxy_conn(ns).await, SINK).await {
            let _ = s.write_all(b"x").await;
            let mut b = [0u8; 1];
            let _ = tokio::time::timeout(Duration::from_millis(500), s.read(&mut b)).await;
        }
        let text = scrape(admin).await.unwrap_or_default();
        if metric_sum(&text, "strait_tunnel_fallback_active", &[]) == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the caller never reached strait_tunnel_fallback_active {want}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// UDP from the caller's namespace to one gateway dropped (iptables) while this lives.
struct DropUdp {
    ns: String,
    rule: Vec<String>,
}

impl DropUdp {
    fn to(ns: &str, gateway: SocketAddr) -> Self {
        let rule: Vec<String> = [
            "OUTPUT",
            "-p",
            "udp",
            "-d",
            &gateway.ip().to_string(),
            "--dport",
            &gateway.port().to_string(),
            "-j",
            "DROP",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut args = vec!["-I"];
        args.extend(rule.iter().map(String::as_str));
        in_ns(ns, "iptables", &args).unwrap();
        DropUdp {
            ns: ns.to_string(),
            rule,
        }
    }
}

impl Drop for DropUdp {
    fn drop(&mut self) {
        let mut args = vec!["-D"];
        args.extend(self.rule.iter().map(String::as_str));
        let _ = in_ns(&self.ns, "iptables", &args);
    }
}

/// New connections to `sink`, each until its first echoed byte: a new tunnel stream on the
/// pooled connection to the gateway, the inner mTLS session with the destination sidecar.
async fn setup_times(ns: &str, n: usize) -> Latencies {
    let mut times = vec![];
    for _ in 0..n {
        let started = Instant::now();
        let mut s = tunnel_over(proxy_conn(ns).await, SINK).await.unwrap();
        s.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        times.push(started.elapsed());
    }
    Latencies(times)
}

fn print_setup(label: &str, l: &Latencies, rtt: Duration, figures: &mut Figures, key: &str) {
    println!(
        "  {label:<38} {:>8.1} {:>8.1} {:>8.1}   p50 = {:.2} inter-cluster round trips",
        ms(l.pct(0.5)),
        ms(l.pct(0.9)),
        ms(l.pct(0.99)),
        l.pct(0.5).as_secs_f64() / rtt.as_secs_f64()
    );
    for (p, name) in [(0.5, "p50"), (0.9, "p90"), (0.99, "p99")] {
        figures.add(&format!("setup.{key}.{name}"), ms(l.pct(p)), "ms");
    }
}

fn print_row(label: &str, r: &Run) {
    println!(
        "  {label:<38} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>7} {:>9} {:>6} {:>7}",
        ms(r.lat.pct(0.5)),
        ms(r.lat.pct(0.9)),
        ms(r.lat.pct(0.99)),
        ms(r.lat.pct(1.0)),
        r.errors,
        r.bulk_mbps.map(|m| format!("{m:.2}")).unwrap_or_else(|| "-".into()),
        r.opened,
        r.retried,
    );
}

fn record(figures: &mut Figures, key: &str, r: &Run) {
    for (p, name) in [(0.5, "p50"), (0.9, "p90"), (0.99, "p99"), (1.0, "max")] {
        figures.add(&format!("{key}.{name}"), ms(r.lat.pct(p)), "ms");
    }
    figures.add(&format!("{key}.failed"), r.errors as f64, "requests");
    figures.add(&format!("{key}.upstream_connections_opened"), r.opened, "connections");
    figures.add(&format!("{key}.retries"), r.retried, "requests");
    if let Some(m) = r.bulk_mbps {
        figures.add(&format!("{key}.bulk"), m, "MB/s");
    }
}

#[tokio::main]
async fn main() {
    // The release binary, as every bench; this one's runs default to 20 s, not 10.
    multicluster_tests::load::bench_setup();
    let seconds: u64 = env_or("STRAIT_BENCH_SECONDS", 20);
    let rate: u32 = env_or("STRAIT_BENCH_RPS", 50);
    let delay = Duration::from_millis(env_or("STRAIT_BENCH_DELAY_MS", 20));
    let loss: f64 = env_or("STRAIT_BENCH_LOSS_PERCENT", 1.0);
    let mut figures = Figures::new("loss");
    let mesh = Mesh::start_with(MeshOptions {
        topology: Some(TOPOLOGY.into()),
        netns: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let client: WorkloadInfo = mesh.workload("client", "us-east-1a").clone();
    let ns = client.netns.clone().expect("--netns reports each workload's namespace");
    let west_gateway: SocketAddr = mesh.cluster("west").gateway.addr.parse().unwrap();
    let impaired = Impairment::apply(&mesh, env!("CARGO_BIN_EXE_nfq-netem"), delay, loss).unwrap();
    println!(
        "strait loss benchmark: {} ms delay and {loss} % loss on what reaches each gateway from the other cluster ({})",
        delay.as_millis(),
        impaired.how()
    );
    println!("small requests: {rate}/s of 1 kB over {CONNECTIONS} connections, open loop, {seconds} s per run\n");

    // Warm-up: the tunnel, the pools and the inner mTLS sessions.
    let _ = small_requests(&ns, client.admin_addr, rate, 2, false).await;
    const SETUPS: usize = 50;
    let quic_setup = setup_times(&ns, SETUPS).await;
    let quic_alone = small_requests(&ns, client.admin_addr, rate, seconds, false).await;
    let quic_bulk = small_requests(&ns, client.admin_addr, rate, seconds, true).await;
    let (tcp_setup, tcp_alone, tcp_bulk) = {
        let _udp_dropped = DropUdp::to(&ns, west_gateway);
        await_transport(&ns, client.admin_addr, 1.0).await;
        let _ = small_requests(&ns, client.admin_addr, rate, 2, false).await;
        let setup = setup_times(&ns, SETUPS).await;
        let alone = small_requests(&ns, client.admin_addr, rate, seconds, false).await;
        let bulk = small_requests(&ns, client.admin_addr, rate, seconds, true).await;
        (setup, alone, bulk)
    };
    drop(impaired);

    println!(
        "  {:<38} {:>8} {:>8} {:>8} {:>8} {:>7} {:>9} {:>6} {:>7}",
        "small requests (ms)", "p50", "p90", "p99", "max", "failed", "bulk MB/s", "conns", "retries"
    );
    print_row("QUIC tunnel, alone", &quic_alone);
    print_row("QUIC tunnel, beside bulk", &quic_bulk);
    print_row("TCP+TLS fallback, alone", &tcp_alone);
    print_row("TCP+TLS fallback, beside bulk", &tcp_bulk);
    println!(
        "\n  {:<38} {:>8} {:>8} {:>8}",
        format!("new connection, first echoed byte ({SETUPS})"),
        "p50",
        "p90",
        "p99"
    );
    let rtt = 2 * delay;
    print_setup("QUIC tunnel", &quic_setup, rtt, &mut figures, "quic");
    print_setup("TCP+TLS fallback", &tcp_setup, rtt, &mut figures, "tcp_fallback");
    let ratio = ms(quic_bulk.lat.pct(0.99)) / ms(tcp_bulk.lat.pct(0.99));
    println!(
        "  QUIC / TCP fallback p99 beside bulk: {:.1} / {:.1} ms = {ratio:.3}x   (goal: <= 0.5x)",
        ms(quic_bulk.lat.pct(0.99)),
        ms(tcp_bulk.lat.pct(0.99))
    );
    record(&mut figures, "quic.alone", &quic_alone);
    record(&mut figures, "quic.beside_bulk", &quic_bulk);
    record(&mut figures, "tcp_fallback.alone", &tcp_alone);
    record(&mut figures, "tcp_fallback.beside_bulk", &tcp_bulk);
    figures.ratio("quic_over_tcp_fallback.p99_beside_bulk", ratio, Some(0.5));
    figures.ratio(
        "quic_over_tcp_fallback.p99_alone",
        ms(quic_alone.lat.pct(0.99)) / ms(tcp_alone.lat.pct(0.99)),
        None,
    );
    figures.write();
}
