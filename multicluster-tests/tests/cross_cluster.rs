//! Calls by name across clusters, through real sidecars and gateways, with unmodified curl.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::time::Duration;

use multicluster_tests::{connect_tunnel, get_via, metric_sum, scrape, Mesh};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn curl(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "-m", "10"])
        .args(args)
        .output()
        .expect("curl is installed (test.sh installs it)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_by_name_reach_every_service_from_every_cluster() {
    let mesh = Mesh::start().await.unwrap();
    let from_east = mesh.workload("echo", "us-east-1a").outbound_proxy.to_string();
    // Every sidecar runs the sidecar-only executable built beside `strait` (./test.sh builds
    // both), and it is that process that answers below.
    let alone = std::fs::canonicalize(multicluster_tests::strait_bin().with_file_name("strait-sidecar")).unwrap();
    for w in mesh.info.clusters.iter().flat_map(|c| &c.workloads) {
        let program = w.sidecar_program.as_ref().map(|p| std::fs::canonicalize(p).unwrap());
        assert_eq!(program, Some(alone.clone()), "{}", w.name);
        let exe = std::fs::read_link(format!("/proc/{}/exe", w.sidecar_pid)).unwrap();
        assert!(exe.ends_with("strait-sidecar"), "{}: {}", w.name, exe.display());
    }
    let from_central = mesh.workload("echo", "eu-central-1a").outbound_proxy.to_string();

    // greeter runs only in west: reached from east and central through west's gateway.
    for proxy in [&from_east, &from_central] {
        let (code, body) = curl(&[
            "-x",
            &format!("http://{proxy}"),
            "http://greeter.demo.svc.clusterset.local/hello",
        ]);
        assert_eq!(code, 0, "curl failed: {body}");
        let v = json(&body);
        assert_eq!(v["cluster"], "west");
        assert_eq!(v["service"], "greeter");
        assert_eq!(v["path"], "/hello");
        assert_eq!(
            v["host"], "greeter.demo.svc.clusterset.local",
            "the app sees the name it was called by"
        );
    }

    // echo from east/us-east-1a stays in its zone.
    let (_, body) = curl(&[
        "-x",
        &format!("http://{from_east}"),
        "http://echo.demo.svc.clusterset.local/",
    ]);
    assert_eq!(json(&body)["zone"], "us-east-1a");

    // The TCP service (central only) through CONNECT: bytes come back unchanged.
    let mut tunnel = connect_tunnel(from_east.parse().unwrap(), "ledger.demo.svc.clusterset.local:7000")
        .await
        .unwrap();
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = tunnel.split();
    let send = async {
        w.write_all(&payload).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut echoed = vec![];
    let recv = async {
        tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut echoed))
            .await
            .unwrap()
            .unwrap();
    };
    tokio::join!(send, recv);
    assert_eq!(echoed, payload);

    // curl's own CONNECT (-p) reaches it too.
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "printf 'ping-ledger' | curl -sS -m 5 -p -x http://{from_east} telnet://ledger.demo.svc.clusterset.local:7000"
        ))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ping-ledger");

    // Unknown names and ports get a clear refusal, not a hang.
    let (status, body) = get_via(from_east.parse().unwrap(), "http://nope.demo.svc.clusterset.local/")
        .await
        .unwrap();
    assert_eq!(status, 404);
    assert!(String::from_utf8_lossy(&body).contains("not exported"), "{body:?}");
    let (status, body) = get_via(
        from_east.parse().unwrap(),
        "http://greeter.demo.svc.clusterset.local:8081/",
    )
    .await
    .unwrap();
    assert_eq!(status, 404);
    assert!(String::from_utf8_lossy(&body).contains("has no port 8081"));

    // Metrics: the east sidecar counted requests to west, the west gateway counted tunnel streams.
    let east_metrics = scrape(mesh.workload("echo", "us-east-1a").admin_addr).await.unwrap();
    assert!(
        metric_sum(
            &east_metrics,
            "strait_requests_total",
            &[
                ("source_cluster", "east"),
                ("destination_cluster", "west"),
                ("response_class", "2xx")
            ]
        ) >= 1.0,
        "{east_metrics}"
    );
    assert!(east_metrics.contains("strait_request_duration_seconds_bucket"));
    let west_gw = scrape(mesh.cluster("west").gateway.admin_addr).await.unwrap();
    assert!(
        metric_sum(
            &west_gw,
            "strait_tunnel_streams_total",
            &[
                ("source_cluster", "east"),
                ("destination_service", "greeter.demo"),
                ("status", "200")
            ]
        ) >= 1.0,
        "{west_gw}"
    );
    let ctl = scrape(mesh.cluster("east").controller.admin_addr).await.unwrap();
    assert!(metric_sum(&ctl, "strait_config_version", &[]) >= 1.0);
    let sidecar = scrape(mesh.workload("greeter", "us-west-2a").admin_addr).await.unwrap();
    assert!(metric_sum(&sidecar, "strait_config_updates_total", &[("result", "applied")]) >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_services_show_the_clusterset() {
    let mesh = Mesh::start().await.unwrap();
    let admin = mesh.cluster("east").controller.admin_addr.to_string();
    let bin = multicluster_tests::strait_bin();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&bin).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let status: serde_json::Value =
        serde_json::from_str(&run(&["status", "--controller", &admin, "--output", "json"])).unwrap();
    let peers = status["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 2);
    for p in peers {
        assert_eq!(p["connected"], true, "{p}");
        assert!(p["exported_services"].as_u64().unwrap() >= 2);
    }
    let table = run(&["status", "--controller", &admin]);
    assert!(
        table.contains("PEER") && table.contains("central") && table.contains("west"),
        "{table}"
    );

    let services: serde_json::Value =
        serde_json::from_str(&run(&["services", "--controller", &admin, "-o", "json"])).unwrap();
    let echo = services["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "echo")
        .unwrap();
    let clusters: Vec<&str> = echo["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["cluster"].as_str().unwrap())
        .collect();
    assert_eq!(clusters, vec!["central", "east", "west"]);
    assert!(
        echo["clusterset_ip"]
            .as_str()
            .unwrap()
            .parse::<std::net::Ipv4Addr>()
            .unwrap()
            .octets()[0]
            >= 240
    );
    let table = run(&["services", "--controller", &admin]);
    assert!(
        table.contains("echo.demo.svc.clusterset.local") && table.contains("us-east-1a,us-east-1b"),
        "{table}"
    );

    // Every controller computes the same ClusterSet IP for the same service.
    let west_admin = mesh.cluster("west").controller.admin_addr.to_string();
    let west: serde_json::Value =
        serde_json::from_str(&run(&["services", "--controller", &west_admin, "-o", "json"])).unwrap();
    let west_echo = west["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "echo")
        .unwrap();
    assert_eq!(west_echo["clusterset_ip"], echo["clusterset_ip"]);
}
