//! Losing a cluster, restarting a controller, and bad catalog files: the mesh keeps serving
//! what it can and converges when things come back.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::time::Duration;

use multicluster_tests::{get_via, LoadReport, Mesh, MeshOptions, Outcome};

const ECHO: &str = "http://echo.demo.svc.clusterset.local/";

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

async fn services_of(admin: std::net::SocketAddr) -> serde_json::Value {
    Mesh::admin_json(admin, "/services").await.unwrap()
}

fn exporters(services: &serde_json::Value, name: &str) -> Vec<String> {
    services["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .map(|s| {
            s["clusters"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["cluster"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_cluster_expires_after_its_lease_and_calls_fail_over() {
    let lease = Duration::from_secs(3);
    let mesh = Mesh::start_with(MeshOptions {
        lease: Some(lease),
        ..Default::default()
    })
    .await
    .unwrap();
    let caller = mesh.workload("echo", "us-east-1a").clone();
    // Both east zones down: east's echo traffic goes to west (nearest region).
    mesh.kill9(caller.app_pid);
    mesh.kill9(mesh.workload("echo", "us-east-1b").app_pid);
    let west = mesh.cluster("west").clone();
    let east_admin = mesh.cluster("east").controller.admin_addr;
    let central_admin = mesh.cluster("central").controller.admin_addr;
    // When the gateway really died, measured from the load's start (on a busy machine the kill
    // may come later than planned; every bound below counts from it).
    let killed_at = std::sync::Mutex::new(None::<Duration>);
    let report = LoadReport::run(caller.outbound_proxy, ECHO, 50, secs(12.0), |start| {
        let west = west.clone();
        let mesh = &mesh;
        let killed_at = &killed_at;
        async move {
            tokio::time::sleep_until((start + secs(3.0)).into()).await;
            // The whole west cluster goes away at once, its gateway first.
            mesh.kill9(west.gateway.pid);
            *killed_at.lock().unwrap() = Some(start.elapsed());
            for w in &west.workloads {
                mesh.kill9(w.app_pid);
                mesh.kill9(w.sidecar_pid);
            }
            mesh.kill9(west.controller.pid);
        }
    })
    .await;
    let killed = killed_at.lock().unwrap().expect("the cluster was killed");
    let after = |s: f64| killed + secs(s);
    let served_by = |from: Duration, to: Duration| report.zones_answered_between(from, to);
    // Requests answered before the planned kill (it never comes earlier) were all served by
    // west (one due before it and still in flight then may rightly fail over).
    assert!(
        served_by(secs(1.0), secs(3.0)).keys().all(|z| z == "us-west-2a"),
        "{:?}",
        served_by(secs(1.0), secs(3.0))
    );
    let slowest = report
        .samples
        .iter()
        .filter(|s| s.due >= killed && s.due < after(1.0))
        .map(|s| s.latency)
        .max()
        .unwrap_or_default();
    println!(
        "lost cluster: killed at {killed:?}; {} failed in the first second, {} after; slowest request due in the first second took {slowest:?}",
        report.failures_between(killed, after(1.0)),
        report.failures_between(after(1.0), secs(12.0))
    );
    // Requests in the dead tunnel are retried as soon as it is known dead (one idle timeout
    // of the tunnel), and no new request chooses west after that.
    assert!(
        report.failures_between(killed, after(1.0)) <= 3,
        "killed at {killed:?}: {:?}",
        report.failures()
    );
    assert_eq!(
        report.failures_between(after(1.0), secs(12.0)),
        0,
        "killed at {killed:?}: {:?}",
        report.failures()
    );
    assert!(
        report
            .zones_between(after(1.0), secs(12.0))
            .keys()
            .all(|z| z == "eu-central-1a"),
        "killed at {killed:?}: {:?}",
        report.zones_between(after(1.0), secs(12.0))
    );

    // After the lease, west's exports are gone everywhere.
    for admin in [east_admin, central_admin] {
        Mesh::eventually("west's exports expire", lease + Duration::from_secs(3), || async move {
            let s = services_of(admin).await;
            !exporters(&s, "echo").contains(&"west".to_string()) && exporters(&s, "greeter").is_empty()
        })
        .await
        .unwrap();
    }
    let west_peer = Mesh::peer_view(east_admin, "west").await.unwrap();
    assert_eq!(west_peer["lease_valid"], false, "{west_peer}");
    let (code, body) = get_via(caller.outbound_proxy, "http://greeter.demo.svc.clusterset.local/")
        .await
        .unwrap();
    assert_eq!(
        code,
        404,
        "greeter is no longer exported anywhere: {}",
        String::from_utf8_lossy(&body)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_keep_serving_without_their_controller_and_resubscribe() {
    let mut mesh = Mesh::start().await.unwrap();
    let east = mesh.cluster("east").clone();
    let caller = mesh.workload("echo", "us-east-1a").clone();
    mesh.kill9(east.controller.pid);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Last good config: local and cross-cluster calls still work.
    for url in [ECHO, "http://greeter.demo.svc.clusterset.local/"] {
        for _ in 0..5 {
            let (code, body) = get_via(caller.outbound_proxy, url).await.unwrap();
            assert_eq!(code, 200, "{url}: {}", String::from_utf8_lossy(&body));
        }
    }
    // West still reaches east's echo through east's gateway (peers keep the lease meanwhile).
    let west_caller = mesh.workload("greeter", "us-west-2a").clone();
    mesh.kill9(mesh.workload("echo", "us-west-2a").app_pid);
    let (code, _) = get_via(west_caller.outbound_proxy, ECHO).await.unwrap();
    assert_eq!(code, 200);

    // The controller comes back; proxies resubscribe and new config reaches them.
    mesh.restart_component(&east.controller, &[]).await.unwrap();
    Mesh::eventually("east's proxies resubscribe", Duration::from_secs(15), || async {
        Mesh::admin_json(east.controller.admin_addr, "/status")
            .await
            .map(|s| s["proxies"].as_array().map(|p| p.len()) == Some(3))
            .unwrap_or(false)
    })
    .await
    .unwrap();
    let catalog = east.controller.catalog_dir.clone().unwrap();
    std::fs::write(
        catalog.join("extra.yaml"),
        format!(
            "services:\n- name: extra\n  namespace: demo\n  serviceAccount: echo\n  ports: [{{port: 80, protocol: http}}]\n  endpoints:\n  - {{workload: {}, address: '{}', zone: us-east-1a}}\n",
            caller.name, caller.inbound_addr
        ),
    )
    .unwrap();
    for proxy in [caller.outbound_proxy, west_caller.outbound_proxy] {
        Mesh::eventually("the new service is callable", Duration::from_secs(15), || async move {
            matches!(
                get_via(proxy, "http://extra.demo.svc.clusterset.local/").await,
                Ok((200, _))
            )
        })
        .await
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_catalog_file_is_rejected_and_the_last_good_one_serves() {
    let mesh = Mesh::start().await.unwrap();
    let east = mesh.cluster("east").clone();
    let caller = mesh.workload("echo", "us-east-1a").clone();
    let file = east.controller.catalog_dir.clone().unwrap().join("services.yaml");
    let good = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, good.replace("port: 80", "port: eighty")).unwrap();
    Mesh::eventually(
        "the error names the file and field",
        Duration::from_secs(10),
        || async {
            let s = Mesh::admin_json(east.controller.admin_addr, "/status").await.unwrap();
            s["errors"].as_array().is_some_and(|e| {
                e.iter().any(|e| {
                    let e = e.as_str().unwrap_or_default();
                    e.contains("services.yaml") && e.contains("services[0].ports[0].port") && e.contains("eighty")
                })
            })
        },
    )
    .await
    .unwrap();
    // The last good catalog keeps serving, here and in the peers.
    for _ in 0..5 {
        let (code, body) = get_via(caller.outbound_proxy, ECHO).await.unwrap();
        assert_eq!(code, 200);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["zone"], "us-east-1a");
    }
    let s = services_of(mesh.cluster("west").controller.admin_addr).await;
    assert!(exporters(&s, "echo").contains(&"east".to_string()));

    // A semantic mistake (a bad name) is reported the same way.
    std::fs::write(&file, good.replace("name: echo", "name: Echo_1")).unwrap();
    Mesh::eventually("the name error is reported", Duration::from_secs(10), || async {
        let s = Mesh::admin_json(east.controller.admin_addr, "/status").await.unwrap();
        s["errors"].to_string().contains("services[0].name")
    })
    .await
    .unwrap();
    // Fixed: the error clears.
    std::fs::write(&file, &good).unwrap();
    Mesh::eventually("the error clears", Duration::from_secs(10), || async {
        let s = Mesh::admin_json(east.controller.admin_addr, "/status").await.unwrap();
        s["errors"].as_array().is_some_and(|e| e.is_empty())
    })
    .await
    .unwrap();
    let r = LoadReport::run(caller.outbound_proxy, ECHO, 20, secs(1.0), |_| async {}).await;
    assert!(r.samples.iter().all(|s| matches!(s.outcome, Outcome::Served { .. })));
}

#[test]
fn a_bad_topology_is_refused_with_the_field_named() {
    let path = multicluster_tests::Scratch::temp("bad-topology.yaml");
    let path = path.path();
    std::fs::write(
        path,
        "services:\n  - {name: echo, port: 80}\nclusters:\n  - name: east\n    region: us-east\n    zones: [us-east-1a]\n    workloads:\n      - {service: echo, zone: mars-1}\n",
    )
    .unwrap();
    let out = std::process::Command::new(multicluster_tests::strait_bin())
        .args(["up", "--topology"])
        .arg(path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("clusters[0].workloads[0].zone") && err.contains("mars-1"),
        "{err}"
    );
}

fn alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped) counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split(' ').nth(2).is_none_or(|state| state != "Z"))
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_process_outlives_strait_up() {
    // Stopped with SIGTERM (what Drop does): everything it started is gone.
    let mesh = Mesh::start().await.unwrap();
    let pids = mesh.all_pids();
    assert!(pids.iter().all(|p| alive(*p)));
    drop(mesh);
    Mesh::eventually("every component stops with strait up", Duration::from_secs(10), || {
        let pids = pids.clone();
        async move { pids.iter().all(|p| !alive(*p)) }
    })
    .await
    .unwrap();

    // Killed outright: the children notice their parent is gone and exit too.
    let mesh = Mesh::start().await.unwrap();
    let pids = mesh.all_pids();
    mesh.kill9(mesh.up_pid().unwrap());
    Mesh::eventually(
        "every component exits after strait up was killed",
        Duration::from_secs(10),
        || {
            let pids = pids.clone();
            async move { pids.iter().all(|p| !alive(*p)) }
        },
    )
    .await
    .unwrap();
}

/// A controller stopped with SIGTERM (as Kubernetes stops a pod, or `strait up` its children)
/// writes what it last heard from its peers before it exits: its state directory holds a
/// peer's change that arrived just before the signal (the peer log gathers a second of updates
/// before writing them; a SIGKILL loses those, and the peers send them again after a restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_controller_writes_what_it_heard_last_before_it_exits() {
    let mesh = Mesh::start().await.unwrap();
    let east = mesh.cluster("east").clone();
    let west = mesh.cluster("west").clone();
    let callee = mesh.workload("greeter", "us-west-2a").clone();
    std::fs::write(
        west.controller.catalog_dir.clone().unwrap().join("late.yaml"),
        format!(
            "services:\n- name: late\n  namespace: demo\n  serviceAccount: greeter\n  ports: [{{port: 80, protocol: http}}]\n  endpoints:\n  - {{workload: {}, address: '{}', zone: us-west-2a}}\n",
            callee.name, callee.inbound_addr
        ),
    )
    .unwrap();
    // Stopped as soon as it lists the new service (polled every 100 ms: well inside the
    // peer log's gathering of a second).
    Mesh::eventually("east hears of west's new service", Duration::from_secs(15), || async {
        exporters(&services_of(east.controller.admin_addr).await, "late") == ["west"]
    })
    .await
    .unwrap();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(east.controller.pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let stat = std::path::PathBuf::from(format!("/proc/{}/stat", east.controller.pid));
    Mesh::eventually("east's controller exits", Duration::from_secs(10), || async {
        matches!(multicluster_tests::process_state(&stat), None | Some('Z'))
    })
    .await
    .unwrap();
    // What it left, read as a restarted controller reads it.
    let peers: Vec<String> = mesh
        .info
        .clusters
        .iter()
        .map(|c| c.name.clone())
        .filter(|c| c != "east")
        .collect();
    let table = strait_federation::peering::PeerTable::default();
    let state = mesh.info.state_dir.join("east").join("state");
    let (_log, restored) = strait_federation::peerlog::PeerLog::open(&state, &table, &peers).unwrap();
    let west_state = table
        .snapshot()
        .into_iter()
        .find(|p| p.cluster == "west")
        .unwrap_or_else(|| {
            panic!(
                "nothing of west was written to {} before east's controller exited: {restored:?}",
                state.display()
            )
        });
    assert!(
        west_state.services.keys().any(|k| k.to_string() == "demo/late"),
        "west's new service was not written before east's controller exited; restored: {:?}",
        west_state.services.keys().collect::<Vec<_>>()
    );
    // It exited by its own stop, not by the signal's default action.
    let log = std::fs::read_to_string(&east.controller.log).unwrap();
    assert!(
        log.contains("stopping (SIGTERM or SIGINT)"),
        "east's controller did not stop on SIGTERM; its log:\n{log}"
    );
}

/// A sidecar or gateway whose controller is down waits for it (for its certificate) and still
/// stops on SIGTERM, by its own handler: it exits 0, where the signal's default action would end
/// it with the signal (and, as PID 1 of a container, where a signal without a handler is
/// ignored, the pod would wait its grace period for SIGKILL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_waiting_for_its_controller_stops_on_sigterm() {
    use std::os::unix::process::ExitStatusExt;
    let dir = multicluster_tests::Scratch::temp("proxy-sigterm");
    std::fs::create_dir_all(dir.path()).unwrap();
    let td: strait_trust::TrustDomain = "mesh.local".parse().unwrap();
    let root = strait_trust::Authority::new_root(&td, std::time::SystemTime::now()).unwrap();
    let mut bundle = strait_trust::TrustBundle::new();
    bundle.add_root(&td, root.cert().clone()).unwrap();
    let bundle_path = dir.path().join("bundle.pem");
    std::fs::write(&bundle_path, bundle.to_pem()).unwrap();
    // A controller address nobody listens on.
    let down = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let bundle_arg = bundle_path.to_str().unwrap();
    let common = [
        "--cluster",
        "east",
        "--region",
        "us-east",
        "--zone",
        "us-east-1a",
        "--admin",
        "127.0.0.1:0",
        "--controller",
        &down,
        "--bundle",
        bundle_arg,
    ];
    let sidecar: Vec<&str> = [
        "sidecar",
        "--workload",
        "w",
        "--service",
        "s",
        "--outbound",
        "127.0.0.1:0",
        "--inbound",
        "127.0.0.1:0",
        "--app",
        "127.0.0.1:9",
    ]
    .into_iter()
    .chain(common)
    .collect();
    let gateway: Vec<&str> = ["gateway", "--listen", "127.0.0.1:0"]
        .into_iter()
        .chain(common)
        .collect();
    for args in [sidecar, gateway] {
        let log = dir.path().join(format!("{}.log", args[0]));
        let out = std::fs::File::create(&log).unwrap();
        let mut child = std::process::Command::new(multicluster_tests::strait_bin())
            .args(&args)
            .env("STRAIT_JOIN_TOKEN", "not-a-token")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        // Waiting for the CA: it has tried at least once.
        Mesh::eventually("the proxy tries its controller", Duration::from_secs(10), || async {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("cannot obtain a certificate yet"))
        })
        .await
        .unwrap();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "strait {} still runs 10 s after SIGTERM; its log:\n{}",
                    args[0],
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            status.success(),
            "strait {} ended with {status:?} (signal {:?}), not by its own stop; its log:\n{}",
            args[0],
            status.signal(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_sidecar_drains_before_it_exits() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mesh = Mesh::start().await.unwrap();
    let caller = mesh.workload("echo", "us-east-1a").clone();
    let mut tunnel = multicluster_tests::connect_tunnel(caller.outbound_proxy, "ledger.demo.svc.clusterset.local:7000")
        .await
        .unwrap();
    // The app's HTTP/1.1 keep-alive connection to its sidecar, used once before the drain.
    let stream = tokio::net::TcpStream::connect(caller.outbound_proxy).await.unwrap();
    let (mut app, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let get = || {
        hyper::Request::get(ECHO)
            .header(hyper::header::HOST, "echo.demo.svc.clusterset.local")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    let first = app.send_request(get()).await.unwrap();
    assert_eq!(first.status(), 200);
    assert!(first.headers().get(hyper::header::CONNECTION).is_none());
    let _ = http_body_util::BodyExt::collect(first.into_body()).await.unwrap();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(caller.sidecar_pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    // New connections are no longer taken once the drain has started (within half a second;
    // the request below goes out as soon as that is seen, well inside the HTTP/1.1 grace) ...
    Mesh::eventually(
        "a draining sidecar takes no new connections",
        Duration::from_millis(500),
        || async { get_via(caller.outbound_proxy, ECHO).await.is_err() },
    )
    .await
    .unwrap();
    // ... an HTTP/1.1 request on the app's idle connection (no GOAWAY in HTTP/1.1 to say it is
    // closing) is still answered, with `Connection: close`, and then the connection ends ...
    let during = tokio::time::timeout(Duration::from_secs(5), app.send_request(get()))
        .await
        .expect("an answer during the drain")
        .expect("the idle HTTP/1.1 connection still takes a request during the drain");
    assert_eq!(during.status(), 200);
    assert_eq!(
        during.headers().get(hyper::header::CONNECTION).map(|v| v.as_bytes()),
        Some(&b"close"[..]),
        "{:?}",
        during.headers()
    );
    let _ = http_body_util::BodyExt::collect(during.into_body()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the connection ends after the answer that said close")
        .unwrap()
        .unwrap();
    // ... while the open tunnel keeps working during the drain.
    for i in 0..3 {
        let msg = format!("in flight {i}");
        tunnel.write_all(msg.as_bytes()).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tunnel.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg.as_bytes());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    drop(tunnel);
    Mesh::eventually("the sidecar exits once drained", Duration::from_secs(6), || async {
        !alive(caller.sidecar_pid)
    })
    .await
    .unwrap();
}
