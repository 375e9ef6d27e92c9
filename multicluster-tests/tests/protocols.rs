//! What applications speak, carried whole: HTTP/1 on pooled HTTP/1.1 connections between the
//! sidecars of a cluster (and none lost when a destination drains), HTTP/1.1 trailers both
//! ways, a TCP client's first bytes moved to another endpoint when an app is down, streamed
//! bodies both ways with bounded proxy memory, retries that never resend a partial body,
//! WebSocket through the explicit proxy in a cluster and across clusters, server-sent events
//! flushed as written, TCP half-close, and a workload that runs the user's own program. Real
//! clients (curl, tokio-tungstenite) against real sidecars and gateways.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use multicluster_tests::{connect_tunnel, get_via, metric_sum, scrape, Mesh, MeshOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// east runs the caller (`client`) and `near`; west runs `far`, reached through its gateway.
const TOPOLOGY: &str = r#"
services:
  - {name: client, port: 80, protocol: http}
  - {name: near, port: 80, protocol: http}
  - {name: far, port: 80, protocol: http}
  - {name: pipe, port: 7000, protocol: tcp}
  - {name: own, port: 80, protocol: http}
clusters:
  - name: east
    region: us-east
    zones: [us-east-1a]
    workloads:
      - {service: client, zone: us-east-1a}
      - {service: near, zone: us-east-1a}
      - {service: own, zone: us-east-1a, labels: {version: v2},
         command: [python3, -c, "import os,http.server as h; h.HTTPServer((os.environ['STRAIT_APP_ADDR'].rsplit(':',1)[0], int(os.environ['STRAIT_APP_PORT'])), h.SimpleHTTPRequestHandler).serve_forever()"]}
      - {service: own, zone: us-east-1a, name: own-batch, command: [sh, -c, "sleep 1; exit 3"]}
  - name: west
    region: us-west
    zones: [us-west-2a]
    workloads:
      - {service: far, zone: us-west-2a}
      - {service: pipe, zone: us-west-2a}
"#;

async fn start() -> Mesh {
    start_with(TOPOLOGY).await
}

async fn start_with(topology: &str) -> Mesh {
    Mesh::start_with(MeshOptions {
        topology: Some(topology.into()),
        ..Default::default()
    })
    .await
    .unwrap()
}

fn transfer_bytes() -> u64 {
    std::env::var("STRAIT_TEST_TRANSFER_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(256)
        * 1024
        * 1024
}

/// Streams `bytes` zero bytes as a chunked POST body with curl (which reads its stdin as it
/// sends) and returns what the app says it received.
fn curl_upload(proxy: &str, url: &str, bytes: u64) -> serde_json::Value {
    let mut head = std::process::Command::new("head")
        .args(["-c", &bytes.to_string(), "/dev/zero"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = std::process::Command::new("curl")
        .args(["-sS", "-m", "300", "-x", proxy, "-X", "POST", "-T", "-", url])
        .stdin(head.stdout.take().unwrap())
        .output()
        .unwrap();
    head.wait().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "curl upload failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Downloads `url` through `proxy` to /dev/null with curl; returns the bytes received.
fn curl_download(proxy: &str, url: &str) -> u64 {
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "-m",
            "300",
            "-x",
            proxy,
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
            url,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl download failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways_with_bounded_proxy_memory() {
    let mesh = start().await;
    let caller = mesh.workload("client", "us-east-1a").clone();
    let near = mesh.workload("near", "us-east-1a").clone();
    let far = mesh.workload("far", "us-west-2a").clone();
    let west_gw = mesh.cluster("west").gateway.pid;
    let proxy = format!("http://{}", caller.outbound_proxy);
    let n = transfer_bytes();
    let procs = [
        ("calling sidecar", caller.sidecar_pid),
        ("in-cluster destination sidecar", near.sidecar_pid),
        ("cross-cluster destination sidecar", far.sidecar_pid),
        ("west gateway", west_gw),
    ];
    // Warm every path once, so pools and TLS sessions exist before the baseline.
    for host in ["near", "far"] {
        let (code, _) = get_via(
            caller.outbound_proxy,
            &format!("http://{host}.demo.svc.clusterset.local/"),
        )
        .await
        .unwrap();
        assert_eq!(code, 200);
    }
    let before: Vec<u64> = procs.iter().map(|(_, pid)| Mesh::peak_rss(*pid).unwrap()).collect();
    for host in ["near", "far"] {
        let url = format!("http://{host}.demo.svc.clusterset.local/upload");
        let started = Instant::now();
        let got = curl_upload(&proxy, &url, n);
        let up = started.elapsed();
        assert_eq!(got["body_bytes"], n, "{got}");
        assert_eq!(got["body_complete"], true, "{got}");
        let started = Instant::now();
        let down = curl_download(&proxy, &format!("http://{host}.demo.svc.clusterset.local/bytes/{n}"));
        assert_eq!(down, n);
        println!(
            "{host}: {} MiB up in {up:.2?} ({:.0} MB/s), down in {:.2?} ({:.0} MB/s)",
            n >> 20,
            n as f64 / up.as_secs_f64() / 1e6,
            started.elapsed(),
            n as f64 / started.elapsed().as_secs_f64() / 1e6
        );
    }
    for ((what, pid), before) in procs.iter().zip(before) {
        let after = Mesh::peak_rss(*pid).unwrap();
        let grew = after.saturating_sub(before);
        println!(
            "{what}: peak RSS {} MiB, grew {} KiB during the transfers",
            after >> 20,
            grew >> 10
        );
        // Flow control holds a fast sender back: a proxy holds windows, not bodies.
        assert!(
            grew < 24 * 1024 * 1024,
            "{what} grew by {} MiB while relaying {} MiB each way",
            grew >> 20,
            n >> 20
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_replay_small_bodies_and_never_resend_a_partial_one() {
    let mesh = Mesh::start().await.unwrap();
    let caller = mesh.workload("echo", "us-east-1a").clone();
    let proxy = format!("http://{}", caller.outbound_proxy);
    let url = "http://echo.demo.svc.clusterset.local/upload";
    // A slow 2 MiB PUT to the local endpoint, whose app dies once far more than the 64 KiB
    // replay buffer was sent: PUT is idempotent, but the body cannot be resent whole, so it is
    // not resent at all, and the caller is told why.
    let upload = std::process::Command::new("sh")
        .args([
            "-c",
            &format!(
                "head -c 2097152 /dev/zero | curl -sS -m 30 --limit-rate 256k -x {proxy} -T - -w ' %{{http_code}}' {url}"
            ),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // At 256 KiB/s, about 384 KiB were sent by then.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    mesh.kill9(caller.app_pid);
    let out = upload.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.ends_with(" 503"), "{text}");
    assert!(text.contains("replay buffer"), "{text}");
    let metrics = scrape(caller.admin_addr).await.unwrap();
    assert_eq!(
        metric_sum(
            &metrics,
            "strait_upstream_retries_skipped_total",
            &[("reason", "replay_buffer_exceeded")]
        ),
        1.0,
        "{metrics}"
    );
    // A small body is replayed whole on the next endpoint (once the dead one's ejection ends,
    // it is tried first again, and its sidecar says its app is gone).
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let got = curl_upload(&proxy, url, 1000);
    assert_eq!(got["body_bytes"], 1000, "{got}");
    assert_eq!(got["zone"], "us-east-1b", "{got}");
    let metrics = scrape(caller.admin_addr).await.unwrap();
    assert!(
        metric_sum(&metrics, "strait_upstream_retries_total", &[]) >= 1.0,
        "{metrics}"
    );
}

/// An app's HTTP/1 requests ride pooled HTTP/1.1 connections between the sidecars of a cluster,
/// one request at a time on each: four at once need four connections (HTTP/2 would carry them
/// on one), and the requests after them reuse those. Through a gateway they share the
/// endpoint's one HTTP/2 connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_requests_ride_pooled_http1_connections_between_the_sidecars_of_a_cluster() {
    let mesh = start().await;
    let caller = mesh.workload("client", "us-east-1a").clone();
    for host in ["near", "far"] {
        let service = format!("{host}.demo.svc.clusterset.local");
        let opened = || async {
            let text = scrape(caller.admin_addr).await.unwrap();
            metric_sum(
                &text,
                "strait_upstream_connections_opened_total",
                &[("destination_service", service.as_str())],
            )
        };
        let (code, _) = get_via(caller.outbound_proxy, &format!("http://{service}/"))
            .await
            .unwrap();
        assert_eq!(code, 200);
        let warm = opened().await;
        assert_eq!(warm, 1.0, "{host}: the first request opened one connection");
        let slow = format!("http://{service}/delay/300");
        let answers = futures::future::join_all((0..4).map(|_| get_via(caller.outbound_proxy, &slow))).await;
        assert!(answers.into_iter().all(|a| a.unwrap().0 == 200));
        let at_once = opened().await - warm;
        for _ in 0..8 {
            assert_eq!(
                get_via(caller.outbound_proxy, &format!("http://{service}/"))
                    .await
                    .unwrap()
                    .0,
                200
            );
        }
        let after = opened().await - warm - at_once;
        println!("{host}: 4 requests at once opened {at_once} connections, 8 after them {after}");
        if host == "near" {
            // The idle one takes a request, the other three dial (all four if it was not yet
            // back in the pool); then every request finds one ready.
            assert!((3.0..=4.0).contains(&at_once), "{host}: {at_once}");
            assert!(after <= 1.0, "{host}: {after} new connections for 8 requests in turn");
        } else {
            assert_eq!(
                (at_once, after),
                (0.0, 0.0),
                "{host}: one HTTP/2 connection through the tunnel"
            );
        }
    }
}

/// An HTTP/1.1 app's trailers (chunked bodies, declared in `Trailer`) arrive both ways: in the
/// cluster over HTTP/1.1 between the sidecars and across clusters over HTTP/2 through the
/// tunnel, where they are carried as HTTP/2 trailers and turned back into HTTP/1.1 at the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_trailers_pass_both_ways_in_a_cluster_and_across_clusters() {
    use http_body_util::BodyExt;
    let mesh = start().await;
    let caller = mesh.workload("client", "us-east-1a").clone();
    for (host, workload) in [("near", "near-us-east-1a"), ("far", "far-us-west-2a")] {
        let authority = format!("{host}.demo.svc.clusterset.local");
        let stream = tokio::net::TcpStream::connect(caller.outbound_proxy).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut fields = hyper::HeaderMap::new();
        fields.insert("x-checksum", "5d41402a".parse().unwrap());
        let frames = [
            hyper::body::Frame::data(bytes::Bytes::from_static(b"hello")),
            hyper::body::Frame::trailers(fields),
        ];
        let body =
            http_body_util::StreamBody::new(futures::stream::iter(frames.map(Ok::<_, std::convert::Infallible>)));
        let req = hyper::Request::post(format!("http://{authority}/trailers"))
            .header(hyper::header::HOST, &authority)
            .header(hyper::header::TRAILER, "x-checksum")
            // An HTTP/1.1 server sends trailers only to a client that says it takes them.
            .header(hyper::header::TE, "trailers")
            .body(body)
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), 200, "{host}");
        assert_eq!(resp.version(), hyper::Version::HTTP_11);
        let collected = resp.into_body().collect().await.unwrap();
        let got = collected.trailers().cloned().unwrap_or_default();
        let json: serde_json::Value = serde_json::from_slice(&collected.to_bytes()).unwrap();
        println!("{host}: app got {json}; caller got trailers {got:?}");
        assert_eq!(json["body_bytes"], 5, "{host}: {json}");
        assert_eq!(
            json["trailers"]["x-checksum"], "5d41402a",
            "{host}: the app never saw the request's trailer: {json}"
        );
        assert_eq!(
            got.get("x-checksum").map(|v| v.to_str().unwrap()),
            Some("5d41402a"),
            "{host}: {got:?}"
        );
        assert_eq!(
            got.get("x-served-by").map(|v| v.to_str().unwrap()),
            Some(workload),
            "{host}: {got:?}"
        );
    }
}

/// Destination sidecars that drain lose no request of a steady POST load on the pooled
/// HTTP/1.1 connections between the sidecars: a draining one answers what arrives with
/// `Connection: close` (so the caller drops a connection after an answer, never under a
/// request it is sending) before it closes what stayed idle. Three of four endpoints leave,
/// one after another, under 400 requests/s over 16 keep-alive connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_that_drain_lose_no_request_of_a_steady_post_load() {
    let mesh = start_with(
        r#"
services:
  - {name: client, port: 80, protocol: http}
  - {name: near, port: 80, protocol: http}
clusters:
  - name: east
    region: us-east
    zones: [us-east-1a]
    workloads:
      - {service: client, zone: us-east-1a}
      - {service: near, zone: us-east-1a}
      - {service: near, zone: us-east-1a, name: near-b}
      - {service: near, zone: us-east-1a, name: near-c}
      - {service: near, zone: us-east-1a, name: near-d}
"#,
    )
    .await;
    let caller = mesh.workload("client", "us-east-1a").clone();
    let leaving: Vec<u32> = ["near-b", "near-c", "near-d"]
        .iter()
        .map(|name| mesh.named(name).sidecar_pid)
        .collect();
    let mut streams = vec![];
    for _ in 0..16 {
        let s = tokio::net::TcpStream::connect(caller.outbound_proxy).await.unwrap();
        s.set_nodelay(true).unwrap();
        streams.push(s);
    }
    let load = tokio::spawn(multicluster_tests::load::load_over(
        streams,
        "http://near.demo.svc.clusterset.local/",
        true,
        400,
        2000,
    ));
    for pid in leaving {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let (served, errors) = load.await.unwrap();
    println!("{} requests served, {errors} failed", served.0.len());
    assert_eq!(errors, 0, "requests failed while three endpoints drained");
    assert_eq!(served.0.len(), 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_echo_both_ways_in_a_cluster_and_across_clusters() {
    let mesh = start().await;
    let caller = mesh.workload("client", "us-east-1a").clone();
    for (host, workload) in [("near", "near-us-east-1a"), ("far", "far-us-west-2a")] {
        // The client is pointed at its sidecar as if it were the server; Host names the service.
        let tcp = tokio::net::TcpStream::connect(caller.outbound_proxy).await.unwrap();
        let url = format!("ws://{host}.demo.svc.clusterset.local/ws");
        let (mut ws, resp) = tokio_tungstenite::client_async(url.as_str(), tcp).await.unwrap();
        assert_eq!(resp.status(), 101);
        // The server speaks first, then echoes what the client sends, many times over.
        let hello = ws.next().await.unwrap().unwrap();
        assert_eq!(hello.to_text().unwrap(), format!("hello from {workload}"));
        for i in 0..50 {
            let msg = format!("message {i} to {host}");
            ws.send(Message::text(msg.clone())).await.unwrap();
            assert_eq!(ws.next().await.unwrap().unwrap().to_text().unwrap(), msg);
        }
        let big = vec![7u8; 1 << 20];
        ws.send(Message::binary(big.clone())).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap().into_data().to_vec(), big);
        ws.close(None).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_arrive_as_written_and_tcp_half_close_passes_the_tunnel() {
    let mesh = start().await;
    let caller = mesh.workload("client", "us-east-1a").clone();

    // Server-sent events across clusters: each event is read while the stream is still open,
    // as far apart as the app wrote them (not all at once when the response ends).
    let mut s = tokio::net::TcpStream::connect(caller.outbound_proxy).await.unwrap();
    s.write_all(b"GET http://far.demo.svc.clusterset.local/sse?events=3&interval_ms=600 HTTP/1.1\r\nHost: far.demo.svc.clusterset.local\r\n\r\n")
        .await
        .unwrap();
    let mut seen = String::new();
    let mut arrivals = vec![];
    let mut buf = [0u8; 4096];
    while arrivals.len() < 3 {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "stream ended early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        while arrivals.len() < 3 && seen.contains(&format!("data: event {}", arrivals.len())) {
            arrivals.push(Instant::now());
        }
    }
    assert!(seen.contains("text/event-stream"), "{seen}");
    let spread = arrivals[2] - arrivals[0];
    assert!(
        spread >= Duration::from_millis(1_000),
        "events arrived {spread:?} apart: they were held back, not flushed as written"
    );

    // Expect: 100-continue (curl waits for the 100 before sending its body) and HEAD, across
    // clusters.
    let proxy = format!("http://{}", caller.outbound_proxy);
    let upload = std::env::temp_dir().join(format!("strait-expect-{}", std::process::id()));
    std::fs::write(&upload, "y".repeat(200_000)).unwrap();
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "-m",
            "10",
            "-x",
            &proxy,
            "-H",
            "Expect: 100-continue",
            "--data-binary",
        ])
        .arg(format!("@{}", upload.display()))
        .arg("http://far.demo.svc.clusterset.local/expect")
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&upload);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("\"body_bytes\":200000"),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "-m",
            "10",
            "-I",
            "-x",
            &proxy,
            "http://far.demo.svc.clusterset.local/bytes/1000",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(
        text.starts_with("http/1.1 200") && text.contains("content-length: 1000"),
        "{text}"
    );

    // TCP across clusters: the client shuts its write side; the far side still answers.
    let mut t = connect_tunnel(caller.outbound_proxy, "pipe.demo.svc.clusterset.local:7000")
        .await
        .unwrap();
    t.write_all(b"question").await.unwrap();
    t.shutdown().await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), t.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer, b"question", "the echo answered after the client's half-close");
}

/// A TCP client's first bytes go before the destination sidecar has said it reached its app:
/// as TLS early data behind the ClientHello once the caller resumes a session with that
/// sidecar, else right behind the handshake. When it could not, they go to another endpoint
/// and arrive there exactly once: an app that refuses connections (`flaky`: its program does
/// not listen) says so at once, an app that stopped accepting (`stuck`: its accept queue is
/// full, so a connect hangs until the sidecar's one-second limit) long after the client's
/// bytes were sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_clients_first_bytes_move_to_another_endpoint_when_the_app_is_down_and_arrive_once() {
    let mesh = start_with(
        r#"
services:
  - {name: client, port: 80, protocol: http}
  - {name: flaky, port: 7000, protocol: tcp}
  - {name: stuck, port: 7000, protocol: tcp}
clusters:
  - name: east
    region: us-east
    zones: [us-east-1a]
    workloads:
      - {service: client, zone: us-east-1a}
      - {service: flaky, zone: us-east-1a}
      - {service: flaky, zone: us-east-1a, name: flaky-deaf, command: [sleep, "3600"]}
      - {service: stuck, zone: us-east-1a}
      - {service: stuck, zone: us-east-1a, name: stuck-full, command: [python3, -c, "import os,socket,time; a=(os.environ['STRAIT_APP_ADDR'].rsplit(':',1)[0], int(os.environ['STRAIT_APP_PORT'])); s=socket.socket(); s.bind(a); s.listen(0); c=socket.create_connection(a); time.sleep(3600)"]}
"#,
    )
    .await;
    let caller = mesh.workload("client", "us-east-1a").clone();
    for service in ["flaky", "stuck"] {
        let host = format!("{service}.demo.svc.clusterset.local");
        for i in 0..12 {
            let mut t = connect_tunnel(caller.outbound_proxy, &format!("{host}:7000"))
                .await
                .unwrap();
            let msg = format!("message {i:02} to {service}");
            t.write_all(msg.as_bytes()).await.unwrap();
            let mut echo = vec![0u8; msg.len()];
            tokio::time::timeout(Duration::from_secs(10), t.read_exact(&mut echo))
                .await
                .unwrap_or_else(|_| panic!("{service} {i}: no echo"))
                .unwrap_or_else(|e| panic!("{service} {i}: {e}"));
            assert_eq!(echo, msg.as_bytes(), "{service} {i}");
            // Nothing more: the bytes reached the echo once.
            let mut more = [0u8; 64];
            let extra = tokio::time::timeout(Duration::from_millis(200), t.read(&mut more)).await;
            assert!(extra.is_err(), "{service} {i}: more than one echo: {extra:?}");
        }
        let text = scrape(caller.admin_addr).await.unwrap();
        let moved = metric_sum(
            &text,
            "strait_upstream_retries_total",
            &[("destination_service", host.as_str())],
        );
        println!("{service}: connections moved off the endpoint whose app is down: {moved}");
        assert!(
            moved >= 1.0,
            "{service}: the endpoint whose app is down was never tried"
        );
    }
    // Sessions were resumed with the first bytes as early data, the deaf endpoints' too (their
    // copy went on to the other endpoint).
    let text = scrape(caller.admin_addr).await.unwrap();
    let early = |outcome: &str| {
        metric_sum(
            &text,
            "strait_tls_early_data_total",
            &[("side", "client"), ("outcome", outcome)],
        )
    };
    println!(
        "early data: {} accepted, {} rejected",
        early("accepted"),
        early("rejected")
    );
    assert!(early("accepted") >= 10.0, "the first bytes rode early data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_runs_the_users_own_program_and_its_exit_is_reported() {
    let mut mesh = start().await;
    let caller = mesh.workload("client", "us-east-1a").clone();
    let own = mesh.named("own-us-east-1a").clone();
    assert_eq!(own.app, "command");
    // The batch workload exits 3: reported with its status, and its endpoint goes not-ready.
    let event = mesh.next_event(Duration::from_secs(20)).await.unwrap();
    assert_eq!(event["event"], "exited", "{event}");
    assert_eq!(event["workload"], "own-batch", "{event}");
    assert_eq!(event["status"], "exit status: 3", "{event}");
    assert_eq!(event["success"], false, "{event}");
    // The calling sidecar's config shows the endpoint not ready.
    let admin = caller.admin_addr;
    Mesh::eventually(
        "own-batch's endpoint is not ready",
        Duration::from_secs(10),
        || async move {
            let config = Mesh::admin_json(admin, "/config").await.unwrap_or_default();
            config["services"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|svc| svc["endpoints"].as_array().cloned().unwrap_or_default())
                .find(|e| e["workload"] == "own-batch")
                .is_some_and(|e| e["ready"] == false)
        },
    )
    .await
    .unwrap();
    let config = Mesh::admin_json(admin, "/config").await.unwrap();
    let labels: Vec<serde_json::Value> = config["services"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|svc| svc["endpoints"].as_array().cloned().unwrap_or_default())
        .filter(|e| e["workload"] == "own-us-east-1a")
        .map(|e| e["labels"].clone())
        .collect();
    // The topology's labels, plus the `app` label `strait up` gives every workload (as a
    // Deployment's pods carry one).
    assert_eq!(
        labels,
        vec![serde_json::json!({"app": "own", "version": "v2"})],
        "labels travel with the endpoint"
    );
    // The user's Python server answers through the mesh (every call goes to the ready one).
    for _ in 0..5 {
        let (code, body) = get_via(caller.outbound_proxy, "http://own.demo.svc.clusterset.local/")
            .await
            .unwrap();
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
        assert!(String::from_utf8_lossy(&body).contains("Directory listing"));
    }
    assert!(Mesh::rss(own.app_pid).is_ok(), "the user's program still runs");
}
