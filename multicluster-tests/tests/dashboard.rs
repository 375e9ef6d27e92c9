//! The clusterset page, in a real headless browser (Debian's `chromium`; `./test.sh` installs
//! it): every controller's page shows all three demo clusters, the cross-cluster edge with its
//! mTLS mark once traffic flows, no console errors, and a killed cluster as lost within its
//! lease. Screenshots go to `$CARGO_TARGET_DIR/strait-screenshots/` (or the temp dir).
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use multicluster_tests::{get_with, Mesh, MeshOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn chromium() -> String {
    std::env::var("STRAIT_CHROMIUM").unwrap_or_else(|_| "chromium".into())
}

/// Runs headless chromium on `url` with `args`; returns (stdout, stderr).
fn browse(profile: &Path, url: &str, args: &[&str]) -> (String, String) {
    let out = std::process::Command::new(chromium())
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--virtual-time-budget=4000", "--enable-logging=stderr", "--v=0"])
        .args(args)
        .arg(url)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (Debian: apt-get install chromium; ./test.sh installs it)",
                chromium()
            )
        });
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The page's DOM after its scripts ran, and what the browser console said.
fn dom(profile: &Path, url: &str) -> (String, Vec<String>) {
    let (out, err) = browse(profile, url, &["--dump-dom"]);
    let console = err
        .lines()
        .filter(|l| l.contains(":CONSOLE") || l.contains("Uncaught"))
        .map(str::to_string)
        .collect();
    (out, console)
}

fn screenshot(profile: &Path, url: &str, name: &str) -> PathBuf {
    let dir = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir())
        .join("strait-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.png"));
    let _ = std::fs::remove_file(&path);
    browse(
        profile,
        url,
        &[&format!("--screenshot={}", path.display()), "--window-size=1280,1100"],
    );
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    assert!(size > 10_000, "screenshot {} is {size} bytes", path.display());
    println!("screenshot: {}", path.display());
    path
}

/// One server-sent event from the page's stream, read raw.
async fn first_event(admin: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(b"GET /api/clusterset/events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&got).contains("\"clusters\"") {
        let n = tokio::time::timeout_at(deadline, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "stream closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clusterset_page_shows_every_cluster_and_marks_a_lost_one() {
    let mesh = Mesh::start_with(MeshOptions {
        lease: Some(Duration::from_secs(3)),
        ..Default::default()
    })
    .await
    .unwrap();
    let east_admin = mesh.cluster("east").controller.admin_addr;
    let url = format!("http://{east_admin}/");
    let profile = mesh.info.state_dir.join("chromium-profile");
    let caller = mesh.workload("echo", "us-east-1a");

    // Traffic east → greeter (west), until east's page has the edge with both clusters' view
    // of it (rates from east's sidecar, the mTLS mark from west's).
    let mut edge = serde_json::Value::Null;
    for _ in 0..60 {
        for i in 0..5 {
            let a = get_with(
                caller.outbound_proxy,
                &format!("http://greeter.demo.svc.clusterset.local/page/{i}"),
                &[],
            )
            .await
            .unwrap();
            assert_eq!(a.status, 200);
        }
        let page = Mesh::admin_json(east_admin, "/api/clusterset").await.unwrap();
        if let Some(e) = page["edges"].as_array().into_iter().flatten().find(|e| {
            e["source_workload"] == "echo-us-east-1a"
                && e["destination_workload"] == "greeter-us-west-2a"
                && e["mtls"].as_f64() == Some(1.0)
                && e["rps"].as_f64().unwrap_or_default() > 0.0
        }) {
            edge = e.clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(edge["source_cluster"], "east", "{edge}");
    assert_eq!(edge["destination_cluster"], "west", "{edge}");
    assert_eq!(edge["error_rate"].as_f64(), Some(0.0), "{edge}");
    assert!(edge["p99_ms"].as_f64().unwrap_or_default() > 0.0, "{edge}");

    // Traffic goes on while the browser renders the page: an edge is the rates over the last
    // 10 s, and with the traffic stopped here it ages out of the window while a browser slow to
    // start on a busy machine is still loading (CI once rendered the page 8 s on, edgeless).
    let flowing = Arc::new(AtomicBool::new(true));
    let traffic = tokio::spawn({
        let (flowing, proxy) = (flowing.clone(), caller.outbound_proxy);
        async move {
            while flowing.load(Ordering::Relaxed) {
                let _ = get_with(proxy, "http://greeter.demo.svc.clusterset.local/live", &[]).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });

    // The page, rendered: three clusters, the edge with its padlock, no console errors.
    let rendering = std::time::Instant::now();
    let (html, console) = dom(&profile, &url);
    let rendered_in = rendering.elapsed();
    let edges_now = Mesh::admin_json(east_admin, "/api/clusterset").await.unwrap()["edges"].clone();
    assert!(console.is_empty(), "browser console: {console:#?}");
    for (cluster, state) in [("east", "local"), ("west", "connected"), ("central", "connected")] {
        assert!(
            html.contains(&format!("data-cluster=\"{cluster}\" data-state=\"{state}\"")),
            "{cluster} not shown as {state}: {html}"
        );
    }
    assert!(
        html.contains(
            "data-source=\"east/echo-us-east-1a\" data-destination=\"west/greeter-us-west-2a\" data-mtls=\"true\""
        ),
        "no cross-cluster edge with mTLS in the page rendered in {rendered_in:?} (the edge before: {edge}; the edges after: {edges_now}): {html}"
    );
    assert!(
        html.contains("us-west-2a") && html.contains("eu-central-1a"),
        "zones missing"
    );
    screenshot(&profile, &url, "clusterset-live");
    flowing.store(false, Ordering::Relaxed);
    traffic.await.unwrap();

    // The same data streams as server-sent events.
    let event = first_event(east_admin).await;
    assert!(
        event.contains("text/event-stream") && event.contains("event: clusterset"),
        "{event}"
    );

    // West's controller and gateway die: within its lease (3s) east's page shows it lost, and
    // west's last edges as stale, not silently gone.
    let west = mesh.cluster("west");
    mesh.kill9(west.controller.pid);
    mesh.kill9(west.gateway.pid);
    let mut lost = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let page = Mesh::admin_json(east_admin, "/api/clusterset").await.unwrap();
        lost = page["clusters"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["name"] == "west" && c["state"] == "lost");
        if lost {
            break;
        }
    }
    assert!(lost, "west was not marked lost within 10s of a 3s lease");
    let (html, console) = dom(&profile, &url);
    assert!(console.is_empty(), "browser console: {console:#?}");
    assert!(html.contains("data-cluster=\"west\" data-state=\"lost\""), "{html}");
    assert!(
        html.contains("data-cluster=\"central\" data-state=\"connected\""),
        "{html}"
    );
    screenshot(&profile, &url, "clusterset-west-lost");

    // `strait dashboard` names the page.
    let out = std::process::Command::new(multicluster_tests::strait_bin())
        .args(["dashboard", "--controller", &east_admin.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains(&url), "{text}");
}
