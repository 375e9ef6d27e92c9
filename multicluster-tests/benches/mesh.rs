//! The mesh benchmark: prints figures, asserts nothing about time.
//!
//! Run: `cargo build --release --bin strait --bin strait-sidecar && cargo bench -p multicluster-tests --bench mesh`
//!
//! In one run, against a mesh started from the release binary:
//! - added p50/p90/p99 latency over a direct call, at a fixed 1,000 requests/s of 1 kB over 16
//!   connections, open loop (latency counted from each request's intended send time), for
//!   (a) a sidecar pair in one cluster and (b) a cross-cluster call through the gateway;
//! - bulk throughput through the QUIC tunnel (CONNECT, cross-cluster) beside the same path over
//!   the TCP+TLS fallback (UDP to the gateway dropped with iptables for that run: same hops, same
//!   inner mTLS), with the CPU seconds per GiB of the proxies on the path for each, and a
//!   single-hop TCP+TLS baseline and plain TCP to the same app;
//! - streamed HTTP upload and download throughput (1 GiB each way by default,
//!   `STRAIT_BENCH_STREAM_MIB`) direct, through a sidecar pair and cross-cluster, with how much
//!   each proxy's resident memory grew during the transfer;
//! - the same proxy-pair figures for an HAProxy 2.6 mutual-TLS pair (Debian's `haproxy`) in front
//!   of the same app at the same load, side by side with Strait's sidecar pair: added latency,
//!   CPU seconds per 1,000 requests, RSS and private memory (RSS less the pages shared with other
//!   processes, such as the executable's text every sidecar on a node shares) of each proxy, and
//!   the ratios;
//! - each proxy's peak RSS.
//!
//! - new connection setup: a new cross-cluster connection until its first echoed byte, beside a
//!   direct connection to the app (added p50/p90/p99).
//! - HTTP/2 from the application: h2load (nghttp2's load generator, Debian's `nghttp2-client`,
//!   installed by the benchmark) with prior knowledge, the same GETs direct to the app, through
//!   the sidecar pair and across clusters, closed loop: requests/s, mean time per request and
//!   the CPU seconds per 1,000 requests of the caller's and the destination's sidecar.
//!
//! `STRAIT_BENCH_ONLY=latency,setup,bulk,stream,http2` runs only those sections (the HAProxy
//! comparison is part of `latency`). Every figure is also written to `target/strait-bench/mesh.json`.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use multicluster_tests::figures::Figures;
use multicluster_tests::{connect_tunnel, metric_sum, scrape, Mesh, MeshOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOPOLOGY: &str = r#"
trustDomain: mesh.local
services:
  - {name: client, port: 80, protocol: http}
  - {name: echo, port: 80, protocol: http}
  - {name: remote, port: 80, protocol: http}
  - {name: sink, port: 9000, protocol: tcp}
clusters:
  - name: east
    region: us-east
    zones: [us-east-1a]
    workloads:
      - {service: client, zone: us-east-1a}
      - {service: echo, zone: us-east-1a}
  - name: west
    region: us-west
    zones: [us-west-2a]
    workloads:
      - {service: remote, zone: us-west-2a}
      - {service: sink, zone: us-west-2a}
"#;

const RATE: u32 = multicluster_tests::load::RATE;
const CONNECTIONS: usize = multicluster_tests::load::CONNECTIONS;
const BODY: usize = multicluster_tests::load::BODY;
use multicluster_tests::haproxy::{cpu_seconds, HaproxyPair};
use multicluster_tests::load::{install_debian_package, load, peak_rss_kib, private_kib, rss_kib, Latencies};

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

fn added_ms(mesh: Duration, direct: Duration) -> f64 {
    (mesh.as_secs_f64() - direct.as_secs_f64()) * 1000.0
}

fn added(mesh: Duration, direct: Duration) -> String {
    format!("{:+.3}", added_ms(mesh, direct))
}

/// Echoes `total` bytes through a stream and returns MB/s.
async fn bulk<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(stream: S, total: usize) -> f64 {
    let (mut r, mut w) = tokio::io::split(stream);
    let start = Instant::now();
    let writer = async move {
        let chunk = vec![7u8; 64 * 1024];
        let mut sent = 0;
        while sent < total {
            let n = chunk.len().min(total - sent);
            w.write_all(&chunk[..n]).await.unwrap();
            sent += n;
        }
        w.flush().await.unwrap();
        w
    };
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0;
        while got < total {
            let n = r.read(&mut buf).await.unwrap();
            assert!(n > 0, "stream closed early");
            got += n;
        }
    };
    let (_w, ()) = tokio::join!(writer, reader);
    total as f64 / 1e6 / start.elapsed().as_secs_f64()
}

/// The TCP+TLS baseline: the same echo over one rustls TLS 1.3 session on loopback.
async fn tls_baseline(mesh: &Mesh, total: usize) -> f64 {
    let td: strait_trust::TrustDomain = "mesh.local".parse().unwrap();
    let ca = strait_trust::Authority::load(&mesh.info.state_dir.join("east").join("ca"), &td).unwrap();
    let bundle = strait_trust::TrustBundle::load(&mesh.info.bundle).unwrap();
    let id: strait_trust::SpiffeId = "spiffe://mesh.local/ns/demo/sa/bench".parse().unwrap();
    let store = strait_trust::CertStore::issued_by(
        &ca,
        id,
        Duration::from_secs(3600),
        bundle,
        strait_trust::TlsMetrics::unregistered(),
    )
    .unwrap();
    let sconf = strait_trust::server_config(
        &store,
        strait_trust::PeerPolicy::AnyInBundle,
        strait_trust::ServerAuth::RequireClientCert,
        &[b"b"],
    )
    .unwrap();
    let cconf = strait_trust::client_config(
        Some(&store),
        store.bundle(),
        store.metrics(),
        strait_trust::PeerPolicy::AnyInBundle,
        &[b"b"],
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let tls = tokio_rustls::TlsAcceptor::from(Arc::new(sconf))
            .accept(tcp)
            .await
            .unwrap();
        let (mut r, mut w) = tokio::io::split(tls);
        let _ = tokio::io::copy(&mut r, &mut w).await;
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cconf))
        .connect(strait_api::transport::mesh_server_name(), tcp)
        .await
        .unwrap();
    bulk(tls, total).await
}

/// One streamed HTTP/1.1 exchange over a fresh connection to `target` (an app, or a sidecar's
/// explicit proxy with `absolute`): uploads `bytes` (chunked, 64 KiB frames) to `url`, or with
/// `download` GETs `url` and reads the body. Returns MB/s.
async fn stream_http(target: SocketAddr, url: &str, absolute: bool, bytes: u64, download: bool) -> f64 {
    let uri: hyper::Uri = url.parse().unwrap();
    let host = uri.authority().unwrap().to_string();
    let path = if absolute {
        url.to_string()
    } else {
        uri.path().to_string()
    };
    let tcp = tokio::net::TcpStream::connect(target).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let started = Instant::now();
    let chunk = Bytes::from(vec![0u8; 64 * 1024]);
    let frames = futures::stream::unfold(bytes, move |left| {
        let chunk = chunk.clone();
        async move {
            (left > 0 && !download).then(|| {
                let n = left.min(chunk.len() as u64);
                (
                    Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(chunk.slice(..n as usize))),
                    left - n,
                )
            })
        }
    });
    let req = hyper::Request::builder()
        .method(if download { "GET" } else { "POST" })
        .uri(path)
        .header("host", host)
        .body(http_body_util::StreamBody::new(frames))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = 0u64;
    while let Some(frame) = body.frame().await {
        got += frame.unwrap().data_ref().map_or(0, |d| d.len() as u64);
    }
    if download {
        assert_eq!(got, bytes, "short download");
    }
    bytes as f64 / started.elapsed().as_secs_f64() / 1e6
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Bulk echo through the caller's CONNECT tunnel to the `sink` service: MB/s, and the CPU the
/// processes on the path (`pids`) used together per GiB they carried (both directions counted).
async fn tunnel_bulk(proxy: SocketAddr, pids: &[u32], total: usize) -> (f64, f64) {
    let before: Vec<f64> = pids.iter().map(|p| cpu_seconds(*p)).collect();
    let stream = connect_tunnel(proxy, "sink.demo.svc.clusterset.local:9000")
        .await
        .unwrap();
    let mbps = bulk(stream, total).await;
    let used: f64 = pids.iter().zip(&before).map(|(p, b)| cpu_seconds(*p) - b).sum();
    (mbps, used / (2.0 * total as f64 / GIB))
}

/// UDP to one loopback port dropped (iptables) while this lives: the tunnel client then takes
/// its TCP+TLS fallback to that gateway, exactly as when a network drops UDP.
struct DropUdp(String);

impl DropUdp {
    fn to(port: u16) -> Self {
        let port = port.to_string();
        let ok = std::process::Command::new("iptables")
            .args(["-I", "OUTPUT", "-o", "lo", "-p", "udp", "--dport", &port, "-j", "DROP"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "iptables -I OUTPUT failed: the TCP fallback run needs root and iptables"
        );
        DropUdp(port)
    }
}

impl Drop for DropUdp {
    fn drop(&mut self) {
        let _ = std::process::Command::new("iptables")
            .args([
                "-D", "OUTPUT", "-o", "lo", "-p", "udp", "--dport", &self.0, "-j", "DROP",
            ])
            .status();
    }
}

/// Opens tunnels to `sink` until the caller's `strait_tunnel_fallback_active` reads `want`.
async fn await_transport(proxy: SocketAddr, admin: SocketAddr, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut s) = connect_tunnel(proxy, "sink.demo.svc.clusterset.local:9000").await {
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

/// Runs `work` while sampling the RSS of `pids` every 20 ms; returns its result and each
/// process's largest growth over its RSS before the work (KiB).
async fn with_rss<T>(pids: &[u32], work: impl std::future::Future<Output = T>) -> (T, Vec<u64>) {
    let before: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();
    let mut peak = before.clone();
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => {
                let grew = peak.iter().zip(&before).map(|(p, b)| p.saturating_sub(*b)).collect();
                return (out, grew);
            }
            _ = tokio::time::sleep(Duration::from_millis(20)) => {
                for (i, pid) in pids.iter().enumerate() {
                    peak[i] = peak[i].max(rss_kib(*pid));
                }
            }
        }
    }
}

#[tokio::main]
async fn main() {
    let seconds = multicluster_tests::load::bench_setup();
    let only = std::env::var("STRAIT_BENCH_ONLY").unwrap_or_default();
    let wanted = |section: &str| only.is_empty() || only.split(',').any(|s| s.trim() == section);
    let mut figures = Figures::new("mesh");
    let mesh = Mesh::start_with(MeshOptions {
        topology: Some(TOPOLOGY.into()),
        ..Default::default()
    })
    .await
    .unwrap();
    let client = mesh.workload("client", "us-east-1a").clone();
    let echo = mesh.workload("echo", "us-east-1a").clone();
    let remote = mesh.workload("remote", "us-west-2a").clone();
    let sink = mesh.workload("sink", "us-west-2a").clone();
    let gateway_west = mesh.cluster("west").gateway.pid;
    println!("strait mesh benchmark: {RATE} req/s of {BODY} B over {CONNECTIONS} connections, open loop, {seconds}s per run\n");

    // Warm-up: connections, pools and caches.
    let _ = load(client.outbound_proxy, "http://echo.demo.svc.clusterset.local/", true, 1).await;
    let _ = load(
        client.outbound_proxy,
        "http://remote.demo.svc.clusterset.local/",
        true,
        1,
    )
    .await;

    if wanted("latency") {
        latency(&mesh, &client, &echo, &remote, seconds, &mut figures).await;
    }
    if wanted("setup") {
        setup_section(&client, &sink, &mut figures).await;
    }
    if wanted("bulk") {
        bulk_section(&mesh, &client, &sink, gateway_west, &mut figures).await;
    }
    if wanted("stream") {
        stream_section(&client, &echo, &remote, gateway_west, &mut figures).await;
    }
    if wanted("http2") {
        http2_section(&client, &echo, &remote, &mut figures).await;
    }

    println!("\npeak RSS (VmHWM)");
    let mut procs: Vec<(String, String, u32)> = vec![];
    for c in &mesh.info.clusters {
        procs.push((
            format!("controller {}", c.name),
            format!("controller.{}", c.name),
            c.controller.pid,
        ));
        procs.push((
            format!("gateway {}", c.name),
            format!("gateway.{}", c.name),
            c.gateway.pid,
        ));
        for w in &c.workloads {
            procs.push((
                format!("sidecar {}", w.name),
                format!("sidecar.{}", w.name),
                w.sidecar_pid,
            ));
        }
    }
    for (name, key, pid) in procs {
        let mib = peak_rss_kib(pid) as f64 / 1024.0;
        println!("  {name:<40} {mib:>8.1} MiB");
        figures.add(&format!("peak_rss.{key}"), mib, "MiB");
    }
    figures.write();
}

/// What one h2load run reported.
struct H2load {
    per_second: f64,
    mean_ms: f64,
    succeeded: u64,
    failed: u64,
}

/// `h2load` with prior knowledge: `requests` GETs of `url` over 4 connections of 8 concurrent
/// streams each, with `authority` as the `:authority` when given.
async fn h2load(url: String, authority: Option<&str>, requests: u64) -> H2load {
    let mut cmd = std::process::Command::new("h2load");
    cmd.args(["-n", &requests.to_string(), "-c", "4", "-m", "8"]);
    if let Some(a) = authority {
        cmd.arg(format!("--header=:authority: {a}"));
    }
    cmd.arg(&url);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "h2load {url}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // "finished in 2.98s, 16768.36 req/s, ..."; "requests: 50000 total, 50000 started, 50000
    // done, 50000 succeeded, 0 failed, ..."; "time for request:  12us  850us  1.66ms  65us ..."
    let line = |prefix: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .unwrap_or_default()
    };
    let word_before = |l: &str, marker: &str| -> f64 {
        let words: Vec<&str> = l.split([' ', ',']).filter(|w| !w.is_empty()).collect();
        words
            .iter()
            .position(|w| *w == marker)
            .and_then(|i| words.get(i.checked_sub(1)?)?.parse().ok())
            .unwrap_or_else(|| panic!("h2load printed no {marker:?} figure: {l:?}\n{text}"))
    };
    let requests_line = line("requests:");
    let mean = line("time for request:")
        .split_whitespace()
        .nth(5)
        .unwrap_or_else(|| panic!("h2load printed no time per request:\n{text}"));
    let mean_ms = if let Some(us) = mean.strip_suffix("us") {
        us.parse::<f64>().unwrap() / 1000.0
    } else if let Some(ms) = mean.strip_suffix("ms") {
        ms.parse().unwrap()
    } else {
        mean.strip_suffix('s').unwrap().parse::<f64>().unwrap() * 1000.0
    };
    H2load {
        per_second: word_before(line("finished in"), "req/s"),
        mean_ms,
        succeeded: word_before(requests_line, "succeeded") as u64,
        failed: ["failed", "errored", "timeout"]
            .iter()
            .map(|m| word_before(requests_line, m) as u64)
            .sum(),
    }
}

/// HTTP/2 from the application (the protocol gRPC rides on): the same GETs with h2load direct to
/// the app, through the sidecar pair and across clusters (the caller's sidecar serves the app's
/// HTTP/2 and routes each stream), closed loop; the CPU each sidecar used per 1,000 requests.
async fn http2_section(
    client: &multicluster_tests::WorkloadInfo,
    echo: &multicluster_tests::WorkloadInfo,
    remote: &multicluster_tests::WorkloadInfo,
    figures: &mut Figures,
) {
    const REQUESTS: u64 = 50_000;
    install_debian_package("h2load", "--version", "nghttp2-client", "the HTTP/2 load generator").unwrap();
    let version = std::process::Command::new("h2load")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let proxy = format!("http://{}/", client.outbound_proxy);
    // Warm-up: the caller's HTTP/2 connections and its pool to each destination.
    for host in ["echo.demo.svc.clusterset.local", "remote.demo.svc.clusterset.local"] {
        h2load(proxy.clone(), Some(host), 2_000).await;
    }
    println!(
        "\nHTTP/2 from the application ({version}, prior knowledge, {REQUESTS} GETs over 4 connections x 8 streams, closed loop)"
    );
    println!(
        "  {:<48} {:>9} {:>9} {:>7}   {:>22}",
        "", "req/s", "mean ms", "failed", "CPU s/1000 req (c, d)"
    );
    for (key, label, app, host, destination) in [
        (
            "pair",
            "(a) sidecar pair, one cluster",
            echo.app_addr,
            "echo.demo.svc.clusterset.local",
            echo,
        ),
        (
            "cross_cluster",
            "(b) cross-cluster through the gateway",
            remote.app_addr,
            "remote.demo.svc.clusterset.local",
            remote,
        ),
    ] {
        let direct = h2load(format!("http://{app}/"), None, REQUESTS).await;
        let pids = [client.sidecar_pid, destination.sidecar_pid];
        let before = pids.map(cpu_seconds);
        let meshed = h2load(proxy.clone(), Some(host), REQUESTS).await;
        let cpu = [0, 1].map(|i| (cpu_seconds(pids[i]) - before[i]) / (meshed.succeeded.max(1) as f64 / 1000.0));
        for (how, r, cpu) in [("direct", &direct, None), ("via mesh", &meshed, Some(cpu))] {
            println!(
                "  {:<48} {:>9.0} {:>9.3} {:>7}   {}",
                format!("{label}: {how}"),
                r.per_second,
                r.mean_ms,
                r.failed,
                cpu.map_or(String::new(), |c| format!("{:>10.4} {:>10.4}", c[0], c[1]))
            );
            let how = how.replace(' ', "_");
            figures.add(
                &format!("http2.{key}.{how}.requests_per_second"),
                r.per_second,
                "requests/s",
            );
            figures.add(&format!("http2.{key}.{how}.mean"), r.mean_ms, "ms");
            figures.add(&format!("http2.{key}.{how}.failed"), r.failed as f64, "requests");
        }
        figures.add(&format!("http2.{key}.cpu_caller"), cpu[0], "s/1000 req");
        figures.add(&format!("http2.{key}.cpu_destination"), cpu[1], "s/1000 req");
        figures.add(
            &format!("http2.{key}.throughput_ratio"),
            meshed.per_second / direct.per_second.max(f64::MIN_POSITIVE),
            "x",
        );
    }
}

/// Added latency of a sidecar pair and of a cross-cluster call, then the HAProxy pair beside
/// the sidecar pair.
async fn latency(
    mesh: &Mesh,
    client: &multicluster_tests::WorkloadInfo,
    echo: &multicluster_tests::WorkloadInfo,
    remote: &multicluster_tests::WorkloadInfo,
    seconds: u64,
    figures: &mut Figures,
) {
    println!(
        "{:<44} {:>9} {:>9} {:>9} {:>7}",
        "latency (ms)", "p50", "p90", "p99", "errors"
    );
    let mut rows = vec![];
    let mut strait_pair = None;
    for (key, label, app, url) in [
        (
            "pair",
            "(a) sidecar pair, one cluster",
            echo.app_addr,
            "http://echo.demo.svc.clusterset.local/",
        ),
        (
            "cross_cluster",
            "(b) cross-cluster through the gateway",
            remote.app_addr,
            "http://remote.demo.svc.clusterset.local/",
        ),
    ] {
        let (direct, derr) = load(app, &format!("http://{app}/"), false, seconds).await;
        let pair = [client.sidecar_pid, echo.sidecar_pid];
        let cpu_before = pair.map(cpu_seconds);
        let (meshed, merr) = load(client.outbound_proxy, url, true, seconds).await;
        if key == "pair" {
            let used = [0, 1].map(|i| cpu_seconds(pair[i]) - cpu_before[i]);
            let per_thousand = used.map(|c| c / (meshed.0.len().max(1) as f64 / 1000.0));
            strait_pair = Some((per_thousand, pair.map(rss_kib), pair.map(private_kib)));
        }
        for (how, lat, err) in [("direct", &direct, derr), ("via mesh", &meshed, merr)] {
            println!(
                "{:<44} {:>9} {:>9} {:>9} {:>7}",
                format!("{label}: {how}"),
                ms(lat.pct(0.5)),
                ms(lat.pct(0.9)),
                ms(lat.pct(0.99)),
                err
            );
        }
        figures.add(&format!("{key}.errors"), merr as f64, "requests");
        rows.push((key, label, direct, meshed));
    }
    println!();
    println!(
        "{:<44} {:>9} {:>9} {:>9}",
        "added latency over direct (ms)", "p50", "p90", "p99"
    );
    for (key, label, direct, meshed) in &rows {
        println!(
            "{:<44} {:>9} {:>9} {:>9}",
            label,
            added(meshed.pct(0.5), direct.pct(0.5)),
            added(meshed.pct(0.9), direct.pct(0.9)),
            added(meshed.pct(0.99), direct.pct(0.99))
        );
        for (p, name) in [(0.5, "p50"), (0.9, "p90"), (0.99, "p99")] {
            figures.add(
                &format!("{key}.added_{name}"),
                added_ms(meshed.pct(p), direct.pct(p)),
                "ms",
            );
        }
    }

    // The peer, in the same run: an HAProxy mutual-TLS pair in front of the same app, same load.
    let haproxy = HaproxyPair::start(mesh.info.state_dir.join("haproxy"), echo.app_addr)
        .await
        .unwrap();
    let app_url = format!("http://{}/", echo.app_addr);
    let (hdirect, _) = load(echo.app_addr, &app_url, false, seconds).await;
    let hpids = haproxy.pids();
    let before = hpids.map(cpu_seconds);
    let (hmeshed, herr) = load(haproxy.front, &app_url, false, seconds).await;
    let hcpu = [0, 1].map(|i| (cpu_seconds(hpids[i]) - before[i]) / (hmeshed.0.len().max(1) as f64 / 1000.0));
    let (hrss, hprivate) = (hpids.map(rss_kib), hpids.map(private_kib));
    let (scpu, srss, sprivate) = strait_pair.unwrap();
    let (_, _, sdirect, smeshed) = rows.iter().find(|r| r.0 == "pair").unwrap();
    let added3 = |m: &Latencies, d: &Latencies| [0.5, 0.9, 0.99].map(|p| added_ms(m.pct(p), d.pct(p)));
    let s_added = added3(smeshed, sdirect);
    let h_added = added3(&hmeshed, &hdirect);
    println!(
        "\nside by side, proxy pair in one cluster, same app and load ({}; {herr} errors)",
        haproxy.version
    );
    println!(
        "  {:<28} {:>8} {:>8} {:>8}   {:>22}   {:>18}   {:>18}",
        "", "+p50 ms", "+p90 ms", "+p99 ms", "CPU s/1000 req (c, d)", "RSS MiB (c, d)", "private MiB (c, d)"
    );
    for (name, key, a, cpu, rss, private) in [
        ("strait sidecar pair", "strait", s_added, scpu, srss, sprivate),
        ("haproxy mTLS pair", "haproxy", h_added, hcpu, hrss, hprivate),
    ] {
        println!(
            "  {name:<28} {:>+8.3} {:>+8.3} {:>+8.3}   {:>10.3} {:>10.3}   {:>8.1} {:>8.1}   {:>8.1} {:>8.1}",
            a[0],
            a[1],
            a[2],
            cpu[0],
            cpu[1],
            rss[0] as f64 / 1024.0,
            rss[1] as f64 / 1024.0,
            private[0] as f64 / 1024.0,
            private[1] as f64 / 1024.0
        );
        for (i, p) in ["p50", "p90", "p99"].iter().enumerate() {
            figures.add(&format!("side_by_side.{key}.added_{p}"), a[i], "ms");
        }
        for (i, side) in ["caller", "destination"].iter().enumerate() {
            figures.add(&format!("side_by_side.{key}.cpu_{side}"), cpu[i], "s/1000 req");
            figures.add(&format!("side_by_side.{key}.rss_{side}"), rss[i] as f64 / 1024.0, "MiB");
            figures.add(
                &format!("side_by_side.{key}.private_{side}"),
                private[i] as f64 / 1024.0,
                "MiB",
            );
        }
    }
    // An added latency at or below zero (the direct run had the worse figure: noise) has no
    // meaningful ratio; it is printed as n/a and left out of the figures.
    let added_ratio = |i: usize| (h_added[i] > 0.0).then(|| s_added[i] / h_added[i]);
    let shown = |r: Option<f64>| r.map_or_else(|| "n/a".to_string(), |r| format!("{r:.2}x"));
    println!(
        "  {:<28} {:>8} {:>8} {:>8}   {:>9.2}x {:>9.2}x   (strait / haproxy; goal <= 1.0x)",
        "ratio",
        shown(added_ratio(0)),
        shown(added_ratio(1)),
        shown(added_ratio(2)),
        scpu[0] / hcpu[0].max(1e-9),
        scpu[1] / hcpu[1].max(1e-9)
    );
    for (i, p) in ["p50", "p90", "p99"].iter().enumerate() {
        let goal = (*p == "p99").then_some(1.0);
        if let Some(r) = added_ratio(i) {
            figures.ratio(&format!("side_by_side.added_{p}.strait_over_haproxy"), r, goal);
        }
    }
    for (i, side) in ["caller", "destination"].iter().enumerate() {
        figures.ratio(
            &format!("side_by_side.cpu_{side}.strait_over_haproxy"),
            scpu[i] / hcpu[i].max(1e-9),
            Some(1.0),
        );
    }
    let vcpu = (scpu[0] + scpu[1]) / 2.0;
    println!(
        "  strait: {vcpu:.3} vCPU per 1,000 req/s per proxy (caller, destination: {:.3}, {:.3}; goal <= 0.05)",
        scpu[0], scpu[1]
    );
    figures.add("side_by_side.strait.vcpu_per_1000_rps_per_proxy", vcpu, "vCPU");
}

/// Connects, sends one byte and reads its echo; returns the time taken.
async fn first_echo(stream: impl std::future::Future<Output = tokio::net::TcpStream>) -> Duration {
    let start = Instant::now();
    let mut s = stream.await;
    s.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    start.elapsed()
}

/// New connection setup: an application's new cross-cluster connection (through its sidecar,
/// a new stream on the pooled QUIC connection to the gateway, a new inner mTLS session with the
/// destination sidecar) until its first echoed byte, beside a direct TCP connection to the app.
async fn setup_section(
    client: &multicluster_tests::WorkloadInfo,
    sink: &multicluster_tests::WorkloadInfo,
    figures: &mut Figures,
) {
    const N: usize = 300;
    // The caller's TLS counters, from one scrape: full and resumed handshakes, and how many
    // of those resumed carried early data.
    let tls_counts = || async {
        let text = scrape(client.admin_addr).await.unwrap_or_default();
        let sum = |name, labels: &[(&str, &str)]| metric_sum(&text, name, labels);
        [
            sum("strait_tls_handshakes_total", &[("side", "client"), ("kind", "full")]),
            sum(
                "strait_tls_handshakes_total",
                &[("side", "client"), ("kind", "resumed")],
            ),
            sum(
                "strait_tls_early_data_total",
                &[("side", "client"), ("outcome", "accepted")],
            ),
        ]
    };
    let before = tls_counts().await;
    let sink_rss_before = rss_kib(sink.sidecar_pid);
    let mut direct = vec![];
    let mut mesh = vec![];
    // Of each mesh connection: until the caller's sidecar answered its CONNECT (what an
    // application behind interception does not do), then the byte there and back.
    let (mut answered, mut echoed) = (vec![], vec![]);
    for _ in 0..N {
        direct.push(first_echo(async { tokio::net::TcpStream::connect(sink.app_addr).await.unwrap() }).await);
        let start = Instant::now();
        let mut at = start;
        let total = first_echo(async {
            let s = connect_tunnel(client.outbound_proxy, "sink.demo.svc.clusterset.local:9000")
                .await
                .unwrap();
            at = Instant::now();
            s
        })
        .await;
        mesh.push(total);
        answered.push(at - start);
        echoed.push(total - (at - start));
    }
    let after = tls_counts().await;
    let [full, resumed, early] = [0, 1, 2].map(|i| after[i] - before[i]);
    let (direct, mesh) = (Latencies(direct), Latencies(mesh));
    let (answered, echoed) = (Latencies(answered), Latencies(echoed));
    println!(
        "
new connection to the first echoed byte, {N} each (ms)   p50       p90       p99"
    );
    for (label, l) in [
        ("direct TCP to the app", &direct),
        ("cross-cluster via sidecar and gateway", &mesh),
        ("  of which: until CONNECT is answered", &answered),
        ("  of which: then the byte there and back", &echoed),
    ] {
        println!(
            "  {label:<46} {:>9} {:>9} {:>9}",
            ms(l.pct(0.5)),
            ms(l.pct(0.9)),
            ms(l.pct(0.99))
        );
    }
    println!(
        "  {:<46} {:>9} {:>9} {:>9}   (goal: <= +0.5 ms)",
        "added",
        added(mesh.pct(0.5), direct.pct(0.5)),
        added(mesh.pct(0.9), direct.pct(0.9)),
        added(mesh.pct(0.99), direct.pct(0.99))
    );
    println!(
        "  inner mTLS handshakes of the caller's sidecar meanwhile: {resumed} resumed ({early} with the first bytes as early data), {full} full"
    );
    figures.add("setup.inner_tls.resumed", resumed, "handshakes");
    figures.add("setup.inner_tls.early_data", early, "handshakes");
    figures.add("setup.inner_tls.full", full, "handshakes");
    // What the destination keeps of so many connections: sessions held for resumption (one
    // ticket per handshake, each resuming once) and its RSS.
    let held = metric_sum(
        &scrape(sink.admin_addr).await.unwrap_or_default(),
        "strait_tls_resumable_sessions",
        &[],
    ) as u64;
    let (rss_before, rss_after) = (
        sink_rss_before as f64 / 1024.0,
        rss_kib(sink.sidecar_pid) as f64 / 1024.0,
    );
    println!(
        "  destination sidecar after them: {held} sessions held for resumption, RSS {rss_before:.1} -> {rss_after:.1} MiB"
    );
    figures.add("setup.destination.resumable_sessions", held as f64, "sessions");
    figures.add("setup.destination.rss_after", rss_after, "MiB");
    for (p, name) in [(0.5, "p50"), (0.9, "p90"), (0.99, "p99")] {
        figures.add(
            &format!("setup.cross_cluster.added_{name}"),
            added_ms(mesh.pct(p), direct.pct(p)),
            "ms",
        );
        figures.add(
            &format!("setup.cross_cluster.connect_answered_{name}"),
            answered.pct(p).as_secs_f64() * 1e3,
            "ms",
        );
        figures.add(
            &format!("setup.cross_cluster.first_byte_echoed_{name}"),
            echoed.pct(p).as_secs_f64() * 1e3,
            "ms",
        );
    }
}

/// Bulk echo: plain TCP and a one-hop TCP+TLS baseline, then the cross-cluster tunnel over QUIC
/// and over the TCP+TLS fallback through the same hops.
async fn bulk_section(
    mesh: &Mesh,
    client: &multicluster_tests::WorkloadInfo,
    sink: &multicluster_tests::WorkloadInfo,
    gateway_west: u32,
    figures: &mut Figures,
) {
    let mib: usize = std::env::var("STRAIT_BENCH_BULK_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let total = mib * 1024 * 1024;
    let plain = bulk(tokio::net::TcpStream::connect(sink.app_addr).await.unwrap(), total).await;
    let tls = tls_baseline(mesh, total).await;
    let path = [client.sidecar_pid, gateway_west, sink.sidecar_pid];
    let (quic, quic_cpu) = tunnel_bulk(client.outbound_proxy, &path, total).await;
    let port: SocketAddr = mesh.cluster("west").gateway.addr.parse().unwrap();
    let (tcp, tcp_cpu) = {
        let _udp_dropped = DropUdp::to(port.port());
        await_transport(client.outbound_proxy, client.admin_addr, 1.0).await;
        tunnel_bulk(client.outbound_proxy, &path, total).await
    };
    await_transport(client.outbound_proxy, client.admin_addr, 0.0).await;
    println!(
        "\nbulk echo throughput, {mib} MiB each way (MB/s; CPU of caller sidecar + gateway + destination sidecar)"
    );
    println!("  plain TCP to the app (loopback)                    {plain:>10.1}");
    println!("  one-hop TCP+TLS 1.3 (rustls, loopback)             {tls:>10.1}");
    println!("  cross-cluster tunnel over QUIC                     {quic:>10.1}   {quic_cpu:>6.2} CPU s/GiB");
    println!("  cross-cluster tunnel over the TCP+TLS fallback     {tcp:>10.1}   {tcp_cpu:>6.2} CPU s/GiB");
    println!(
        "  QUIC / TCP fallback, same hops and inner mTLS      {:>9.2}x   {:>6.2}x CPU per GiB   (goal >= 1.0x throughput)",
        quic / tcp,
        quic_cpu / tcp_cpu
    );
    figures.add("bulk.plain_tcp", plain, "MB/s");
    figures.add("bulk.one_hop_tls", tls, "MB/s");
    figures.add("bulk.quic", quic, "MB/s");
    figures.add("bulk.tcp_fallback", tcp, "MB/s");
    figures.add("bulk.quic_cpu", quic_cpu, "CPU s/GiB");
    figures.add("bulk.tcp_fallback_cpu", tcp_cpu, "CPU s/GiB");
    figures.ratio_at_least("bulk.quic_over_tcp_fallback", quic / tcp, 1.0);
    figures.ratio("bulk.quic_cpu_over_tcp_fallback", quic_cpu / tcp_cpu, None);
}

/// Streamed HTTP bodies direct, through a sidecar pair and cross-cluster, with RSS growth.
async fn stream_section(
    client: &multicluster_tests::WorkloadInfo,
    echo: &multicluster_tests::WorkloadInfo,
    remote: &multicluster_tests::WorkloadInfo,
    gateway_west: u32,
    figures: &mut Figures,
) {
    let stream_mib: u64 = std::env::var("STRAIT_BENCH_STREAM_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    let bytes = stream_mib * 1024 * 1024;
    println!("\nstreamed HTTP bodies, {stream_mib} MiB each way (MB/s; RSS growth of each proxy during the transfer)");
    for (key, label, app, host, pids) in [
        (
            "pair",
            "sidecar pair, one cluster",
            echo.app_addr,
            "echo",
            vec![("caller", client.sidecar_pid), ("destination", echo.sidecar_pid)],
        ),
        (
            "cross_cluster",
            "cross-cluster via the gateway",
            remote.app_addr,
            "remote",
            vec![
                ("caller", client.sidecar_pid),
                ("gateway", gateway_west),
                ("destination", remote.sidecar_pid),
            ],
        ),
    ] {
        let up_url = format!("http://{host}.demo.svc.clusterset.local/upload");
        let down_url = format!("http://{host}.demo.svc.clusterset.local/bytes/{bytes}");
        let direct_up = stream_http(app, &up_url, false, bytes, false).await;
        let direct_down = stream_http(app, &down_url, false, bytes, true).await;
        let only: Vec<u32> = pids.iter().map(|(_, p)| *p).collect();
        let (up, grew_up) = with_rss(&only, stream_http(client.outbound_proxy, &up_url, true, bytes, false)).await;
        let (down, grew_down) = with_rss(&only, stream_http(client.outbound_proxy, &down_url, true, bytes, true)).await;
        let growth: Vec<String> = pids
            .iter()
            .zip(grew_up.iter().zip(&grew_down))
            .map(|((name, _), (u, d))| format!("{name} +{:.1}/+{:.1} MiB", *u as f64 / 1024.0, *d as f64 / 1024.0))
            .collect();
        println!(
            "  {label:<32} upload {up:>7.1} ({:.2}x direct {direct_up:.1})  download {down:>7.1} ({:.2}x direct {direct_down:.1})",
            up / direct_up,
            down / direct_down
        );
        println!("  {:<32} RSS growth up/down: {}", "", growth.join(", "));
        figures.add(&format!("stream.{key}.upload"), up, "MB/s");
        figures.add(&format!("stream.{key}.download"), down, "MB/s");
        figures.ratio(&format!("stream.{key}.upload_over_direct"), up / direct_up, None);
        figures.ratio(&format!("stream.{key}.download_over_direct"), down / direct_down, None);
        for ((name, _), (u, d)) in pids.iter().zip(grew_up.iter().zip(&grew_down)) {
            figures.add(
                &format!("stream.{key}.rss_growth_{name}"),
                (*u).max(*d) as f64 / 1024.0,
                "MiB",
            );
        }
    }
}
