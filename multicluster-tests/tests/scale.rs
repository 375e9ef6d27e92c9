//! The clusterset simulator, small: real controllers, gateways and sidecars, synthetic catalogs
//! with endpoint churn. What it guards is behaviour, not speed: every change reaches every
//! other cluster, the deltas leave each subscriber with exactly the catalog that stands, and a
//! controller's restart, or every controller's at once, is not a resync storm.
//! (`cargo bench --bench clusterset` runs it at the published size and prints the figures.)

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::time::Duration;

use multicluster_tests::clusterset::{run, Size};
use multicluster_tests::{get_via, metric_sum, scrape, strait_bin, Mesh, MeshOptions, WorkloadInfo};

/// Both executables pack their relative relocations (DT_RELR, set in the root `build.rs`) where
/// the machine's glibc is 2.36 or later, as here. Unpacked, a position-independent executable
/// carries one 24-byte entry per pointer in its read-only data, which the loader reads at every
/// start: the sidecar's 21,088 of them were 0.5 MiB of each idle sidecar's RSS. On an older
/// glibc they must stay unpacked: a packed executable would not start there.
#[test]
fn the_executables_pack_their_relative_relocations() {
    let getconf = std::process::Command::new("getconf")
        .arg("GNU_LIBC_VERSION")
        .output()
        .expect("getconf runs");
    let glibc = String::from_utf8_lossy(&getconf.stdout).trim().to_string();
    let version: Vec<u32> = glibc
        .trim_start_matches("glibc ")
        .split('.')
        .map(|p| p.parse().unwrap_or(0))
        .collect();
    let packs = version >= vec![2, 36];
    let strait = strait_bin();
    for exe in [strait.clone(), strait.with_file_name("strait-sidecar")] {
        let readelf = |what: &str| {
            let out = std::process::Command::new("readelf")
                .args([what, "--wide"])
                .arg(&exe)
                .output()
                .expect("readelf (binutils) runs");
            assert!(out.status.success(), "readelf {what} {}: {out:?}", exe.display());
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let dynamic = readelf("--dynamic");
        let needs = readelf("--version-info").contains("GLIBC_ABI_DT_RELR");
        let unpacked = readelf("--relocs").lines().filter(|l| l.contains("_RELATIVE")).count();
        if packs {
            assert!(
                dynamic.contains("(RELR)") && needs,
                "{} has no packed relocations (DT_RELR) on {glibc}:\n{dynamic}",
                exe.display()
            );
            assert!(
                unpacked < 1_000,
                "{} still has {unpacked} unpacked relative relocations",
                exe.display()
            );
        } else {
            assert!(
                !dynamic.contains("(RELR)") && !needs,
                "{} needs DT_RELR, which {glibc} cannot load",
                exe.display()
            );
        }
    }
}

/// The release build optimises with the committed profile (`pgo/strait.profdata`, recorded by
/// `pgo/train.sh`): cargo runs every rustc through `pgo/rustc-wrapper` (`.cargo/config.toml`),
/// which adds the profile to the release profile's units only, on x86_64 Linux, with an LLVM at
/// least as new as the one that wrote it, and never to an instrumented build or when
/// `STRAIT_PGO=off`. Then this toolchain's rustc compiles a crate through the wrapper with the
/// profile and reports nothing about it: an unreadable profile is only a warning to rustc (and
/// a missing one makes the wrapper leave it out), which would leave the release executables
/// quietly unoptimised.
#[test]
fn release_units_compile_with_the_committed_profile() {
    // Not the compile-time path: a test binary built in another clone is reused (`repo_dir`).
    let repo = multicluster_tests::repo_dir();
    let wrapper = repo.join("pgo/rustc-wrapper");
    let profile = repo.join("pgo/strait.profdata");
    let config = std::fs::read_to_string(repo.join(".cargo/config.toml")).unwrap();
    assert!(
        config.contains("rustc-wrapper = \"pgo/rustc-wrapper\""),
        ".cargo/config.toml does not run rustc through pgo/rustc-wrapper:\n{config}"
    );
    let scratch = std::env::temp_dir().join(format!("strait-pgo-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    // A stand-in rustc that prints its arguments and claims the given LLVM version.
    let stub = |llvm: &str| {
        let path = scratch.join(format!("rustc-llvm-{llvm}"));
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\n[ \"$1\" = -vV ] && {{ echo 'LLVM version: {llvm}'; exit 0; }}\nprintf '%s\\n' \"$@\"\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        path
    };
    let (new, old) = (stub("99.1.0"), stub("14.0.6"));
    let run = |rustc: &std::path::Path, args: &[&str], env: &[(&str, &str)]| {
        let out = std::process::Command::new(&wrapper)
            .arg(rustc)
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let printed = String::from_utf8(out.stdout).unwrap();
        let expected: Vec<&str> = args.to_vec();
        let got: Vec<&str> = printed.lines().collect();
        assert_eq!(
            &got[..expected.len()],
            &expected[..],
            "the wrapper changed rustc's own arguments"
        );
        got[expected.len()..].join(" ")
    };
    let release = ["--crate-name", "probe", "-C", "opt-level=s", "-C", "lto"];
    let on_x86_64_linux = cfg!(all(target_arch = "x86_64", target_os = "linux"));
    let with_profile = format!("-Cprofile-use={} -Cllvm-args=-no-pgo-warn-mismatch", profile.display());
    assert_eq!(
        run(&new, &release, &[]),
        if on_x86_64_linux { with_profile.as_str() } else { "" },
        "a release unit"
    );
    for (what, args, env, rustc) in [
        (
            "a debug unit",
            &["--crate-name", "probe", "-C", "debuginfo=2"][..],
            &[][..],
            &new,
        ),
        (
            "a benchmark harness (O3)",
            &["--crate-name", "probe", "-C", "opt-level=3"][..],
            &[][..],
            &new,
        ),
        (
            "another target",
            &[&release[..], &["--target", "aarch64-unknown-linux-gnu"]].concat()[..],
            &[][..],
            &new,
        ),
        (
            "an instrumented build",
            &[&release[..], &["-Cprofile-generate=/tmp/x"]].concat()[..],
            &[][..],
            &new,
        ),
        ("STRAIT_PGO=off", &release[..], &[("STRAIT_PGO", "off")][..], &new),
        ("an older LLVM", &release[..], &[][..], &old),
    ] {
        assert_eq!(run(rustc, args, env), "", "{what} must compile without the profile");
    }
    // Cargo's environment reaches rustc whole, names with dashes too (CARGO_BIN_EXE_nfq-netem).
    let env = std::process::Command::new(&wrapper)
        .arg("env")
        .env("CARGO_BIN_EXE_probe-tool", "/probe")
        .output()
        .unwrap();
    let env = String::from_utf8_lossy(&env.stdout);
    assert!(
        env.lines().any(|l| l == "CARGO_BIN_EXE_probe-tool=/probe"),
        "the wrapper dropped a variable:\n{env}"
    );
    if on_x86_64_linux {
        let source = scratch.join("probe.rs");
        std::fs::write(&source, "pub fn triple(x: u32) -> u32 { x * 3 }\n").unwrap();
        let out = std::process::Command::new(&wrapper)
            .arg("rustc")
            .args([
                "--crate-type",
                "lib",
                "--crate-name",
                "probe",
                "-C",
                "opt-level=s",
                "--emit",
                "obj",
                "-o",
            ])
            .arg(scratch.join("probe.o"))
            .arg(&source)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "rustc with the profile: {stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&scratch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_change_reaches_every_other_cluster() {
    let size = Size {
        clusters: 3,
        services: 12,
        endpoints: 60,
        churn: 10.0,
        seconds: 5,
        sidecars: 1,
        sidecar_scope: vec![],
        batch_window_ms: None,
        sidecar_scope_authorized: true,
        policies: 3,
    };
    let report = run(size.clone()).await.unwrap();
    report.print();
    assert!(report.changes >= 40, "only {} changes were made", report.changes);
    // Each policy, written in each cluster in turn, was acknowledged by every cluster's proxies
    // and took its service from every sidecar, which held it again once it was deleted (`run`
    // waited for each of these, or failed).
    let p = &report.policies;
    assert_eq!(p.to_ack.len(), size.policies * size.clusters);
    assert_eq!(p.to_scoped_out.len(), size.policies * size.clusters * size.sidecars);
    assert_eq!(p.to_scoped_in.len(), p.to_scoped_out.len());
    // An edit that refuses them still: taken everywhere, and no sidecar got the service back
    // while it spread.
    assert_eq!(p.edit_to_ack.len(), p.to_ack.len());
    assert_eq!(
        (p.edit_regained, p.edit_watched),
        (0, p.to_scoped_out.len()),
        "sidecars that held the service again while an edit spread"
    );
    assert_eq!(report.missing, 0, "changes never delivered");
    assert_eq!(
        report.delays.len() + report.superseded,
        report.changes * (size.clusters - 1),
        "each change is delivered once to each other cluster"
    );
    assert_eq!(
        report.final_endpoints,
        vec![size.clusters * size.endpoints; size.clusters],
        "after the churn every subscriber holds exactly the endpoints that stand"
    );
    assert_eq!(
        report.sidecar_endpoints_wrong,
        vec![0; size.clusters * size.sidecars],
        "and so does every sidecar (scoped by authorization, refused nothing): endpoints wrong"
    );
    assert!(report.peering_bytes_per_pair > 0.0, "peering bytes are counted");
    // A churned endpoint is one of a service's five: its peers, which hold the service, are
    // sent that endpoint (and get exactly the standing catalog, above), not the service whole.
    let sent = report.peering_services;
    assert!(
        sent.patched > 0.0 && sent.patched >= sent.whole,
        "services sent during the churn: {sent:?}"
    );
    // A gateway's restart breaks the peering streams into its cluster. Each peer dials again
    // and, told what the cluster's controller still holds of it, sends what differs from that
    // (the churn had ended: its objects and traffic summary only), not every export again.
    let g = report.gateway_restart;
    assert_eq!(
        g.sent.full_bytes, 0.0,
        "every export resent after a gateway restart: {g:?}"
    );
    assert!(
        g.sent.resumed.0 >= (size.clusters - 1) as f64,
        "every peer resumed: {g:?}"
    );
    assert!(
        g.sent.resumed.1 < 0.5 * report.exports_to_one_cluster(),
        "the resumed peers sent {} B; the first sync's exports to one cluster were {} B",
        g.sent.resumed.1,
        report.exports_to_one_cluster()
    );
    // A controller keeps what it last heard from each peer, and when each of its services was
    // first exported (`stateDir`, which `strait up` sets). Restarted, it tells each peer what
    // it holds and is sent what differs, as its peers, who still hold its exports, tell it.
    // The churn had ended, so little differs (their objects and traffic summaries): no peer
    // sends every export again, whether one controller restarted or all of them at once (which
    // was the whole first sync again before the state was kept). `run` already waited until
    // every subscriber held the whole catalog again.
    println!(
        "restart of one controller: {:.2} of the first sync; of every controller: {:.2}",
        report.restart_extra() / report.initial_sync_bytes,
        report.restart_all_extra() / report.initial_sync_bytes
    );
    for (what, sent, extra, resuming) in [
        (
            "one controller",
            report.restart_peering,
            report.restart_extra(),
            2 * (size.clusters - 1),
        ),
        (
            "every controller",
            report.restart_all_peering,
            report.restart_all_extra(),
            size.clusters * (size.clusters - 1),
        ),
    ] {
        assert_eq!(
            sent.full_bytes, 0.0,
            "{what} restarted: every export resent to a peer: {sent:?}"
        );
        assert!(
            sent.resumed.0 >= resuming as f64,
            "{what} restarted: not every stream resumed: {sent:?}"
        );
        assert!(
            extra < 0.25 * report.initial_sync_bytes,
            "{what} restarted: {extra} bytes sent beyond quiet traffic; the whole first sync was {}",
            report.initial_sync_bytes
        );
    }
    // On the config stream, every sidecar and gateway of a restarted controller said what it
    // held and was sent only what differs from it; the probes, which say nothing, the whole
    // state. What differs (the churn had ended) is a small part of the whole.
    let proxies = |clusters: usize| (clusters * (size.sidecars + 1)) as f64;
    for (what, sent, clusters) in [
        ("one controller", report.restart_config, 1),
        ("every controller", report.restart_all_config, size.clusters),
    ] {
        let (full, resumed) = sent.per_proxy();
        assert!(
            sent.resumed.0 >= proxies(clusters) && sent.full.0 >= clusters as f64,
            "{what} restarted: {sent:?}"
        );
        assert!(
            resumed < 0.5 * full,
            "{what} restarted: {resumed} bytes to each proxy that said what it held, {full} to each that did not"
        );
    }
    assert_eq!(
        report.sidecar_held_bytes.len(),
        size.clusters * size.sidecars,
        "every sidecar logged what it held when it resumed"
    );
    let doc = report.figures().to_json();
    for key in [
        "change_to_ack.p99",
        "controller.cpu_per_remote_cluster",
        "peering.bytes_per_pair",
        "policy_to_ack.p99",
        "policy_to_scoped_out.max",
        "policy_edit_to_ack.p99",
        "policy_edit_regained",
        "restart.config_resumed_bytes_per_proxy",
        "gateway_restart.resumed_bytes",
        "restart_all.config_resumed_bytes_per_proxy",
    ] {
        assert!(doc["figures"][key]["value"].is_number(), "{key} missing in {doc}");
    }
}

/// `--sidecar-scope-namespaces demo`: the sidecars are sent none of the `sim` catalog (the
/// controller leaves those services out of their config stream), keep everything in `demo`,
/// and still call across clusters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_sidecar_holds_only_its_namespaces_and_still_calls_them() {
    let mesh = Mesh::start_with(MeshOptions {
        extra_args: vec!["--sidecar-scope-namespaces".into(), "demo".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let east = mesh.cluster("east");
    let catalog = east.controller.catalog_dir.clone().unwrap();
    std::fs::write(
        catalog.join("other.yaml"),
        "services:\n  - name: ledger-copy\n    namespace: other\n    serviceAccount: other\n    ports: [{port: 80}]\n    endpoints:\n      - {workload: x, address: \"10.9.9.9:80\", zone: us-east-1a}\n",
    )
    .unwrap();
    // The controller has it (its own view) ...
    Mesh::eventually(
        "the controller merges other/ledger-copy",
        Duration::from_secs(10),
        || async {
            Mesh::admin_json(east.controller.admin_addr, "/services")
                .await
                .map(|v| v.to_string().contains("ledger-copy"))
                .unwrap_or(false)
        },
    )
    .await
    .unwrap();
    // ... a sidecar scoped to demo is not sent it, and still holds and calls demo services.
    let w = &east.workloads[0];
    let hosts = Mesh::sidecar_hosts(w.admin_addr).await;
    assert!(!hosts.iter().any(|h| h.contains(".other.")), "{hosts:?}");
    assert!(hosts.iter().any(|h| h.starts_with("echo.demo.")), "{hosts:?}");
    let (status, _) = get_via(w.outbound_proxy, "http://greeter.demo.svc.clusterset.local/")
        .await
        .unwrap();
    assert_eq!(status, 200);
}

/// A sidecar scoped to its namespace is also sent the services its namespace's routes send
/// to in other namespaces (and only those), so a route across namespaces works for it; when
/// the route goes, so does the service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_sidecar_is_sent_what_its_routes_send_to_in_other_namespaces() {
    let mesh = Mesh::start_with(MeshOptions {
        topology: Some(
            "services:
  - {name: front, namespace: web, port: 80, protocol: http}
  - {name: echo, port: 80, protocol: http}
  - {name: greeter, port: 80, protocol: http}
clusters:
  - name: east
    region: us-east
    zones: [us-east-1a]
    workloads:
      - {service: front, zone: us-east-1a}
  - name: west
    region: us-west
    zones: [us-west-2a]
    workloads:
      - {service: echo, zone: us-west-2a}
      - {service: greeter, zone: us-west-2a}
"
            .into(),
        ),
        extra_args: vec!["--sidecar-scope-namespaces".into(), "web".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let front = mesh.workload("front", "us-east-1a");
    let echo = mesh.workload("echo", "us-west-2a");
    let hosts = || Mesh::sidecar_hosts(front.admin_addr);
    let holds = |hosts: &[String], prefix: &str| hosts.iter().any(|h| h.starts_with(prefix));
    let call = || async {
        let (status, body) = get_via(front.outbound_proxy, "http://front.web.svc.clusterset.local/")
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    // Scoped to web: front only.
    let (status, body) = call().await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&format!("\"workload\":\"{}\"", front.name)), "{body}");
    let before = hosts().await;
    assert!(
        holds(&before, "front.web.") && !holds(&before, "echo.demo."),
        "{before:?}"
    );
    // A route in web sends front's requests to echo in demo (a ServiceImport: every cluster's
    // endpoints): the sidecar is sent echo (not greeter) and its calls reach echo in west.
    let route = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: front-to-echo, namespace: web}
spec:
  parentRefs: [{name: front}]
  rules:
    - backendRefs: [{group: multicluster.x-k8s.io, kind: ServiceImport, name: echo, namespace: demo, port: 80}]
";
    mesh.policy_ok("apply", "east", "front-to-echo", route);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = call().await;
        if status == 200 && body.contains(&format!("\"workload\":\"{}\"", echo.name)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "front's calls never reached echo in demo: last {status} {body}; the sidecar holds {}; the route: {}",
            Mesh::admin_json(front.admin_addr, "/config").await.unwrap_or_default()["services"],
            Mesh::admin_json(mesh.cluster("east").controller.admin_addr, "/routes")
                .await
                .unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let with_route = hosts().await;
    assert!(holds(&with_route, "echo.demo."), "{with_route:?}");
    assert!(!holds(&with_route, "greeter.demo."), "{with_route:?}");
    // The route goes: so does echo, and front answers its calls again.
    mesh.policy_ok("delete", "east", "front-to-echo", route);
    Mesh::eventually("echo leaves the scoped sidecar", Duration::from_secs(15), || async {
        !holds(&hosts().await, "echo.demo.")
    })
    .await
    .unwrap();
    let (status, body) = call().await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&format!("\"workload\":\"{}\"", front.name)), "{body}");
}

/// `--sidecar-scope-authorized`: each sidecar is sent only the services whose
/// AuthorizationPolicies could let its identity in, as a caller in its cluster, and always its
/// own service. A policy applied in one cluster takes a service out of the sidecars it refuses
/// (by principal, or by cluster) in every cluster and leaves it with the others, who still call
/// it; deleting the policies brings it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_scoped_by_authorization_holds_what_may_let_it_in() {
    let mesh = Mesh::start_with(MeshOptions {
        extra_args: vec!["--sidecar-scope-authorized".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let east_echo = mesh.workload("echo", "us-east-1a");
    let west_echo = mesh.workload("echo", "us-west-2a");
    let west_greeter = mesh.workload("greeter", "us-west-2a");
    let ledger = mesh.workload("ledger", "eu-central-1a");
    let holds = |addr, prefix: &'static str| async move {
        Mesh::sidecar_hosts(addr).await.iter().any(|h| h.starts_with(prefix))
    };
    // The controller says how its sidecars are scoped (`strait status`).
    let status = Mesh::admin_json(mesh.cluster("east").controller.admin_addr, "/status")
        .await
        .unwrap();
    let scopes: Vec<&str> = status["proxies"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["kind"] == "sidecar")
        .map(|p| p["scope"].as_str().unwrap_or("?"))
        .collect();
    assert!(
        !scopes.is_empty() && scopes.iter().all(|s| *s == "authorized"),
        "{status}"
    );
    // No policy: every sidecar holds every service.
    for w in [east_echo, west_echo, west_greeter, ledger] {
        for svc in ["echo.demo.", "greeter.demo.", "ledger.demo."] {
            assert!(holds(w.admin_addr, svc).await, "{} lacks {svc}", w.name);
        }
    }
    // greeter lets in only ledger's identity (from any cluster); echo refuses west's callers.
    let readers = "apiVersion: policy.strait.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: greeter-readers, namespace: demo}
spec:
  targetRefs: [{kind: Service, name: greeter}]
  rules: [{from: [{source: {principals: [\"spiffe://mesh.local/ns/demo/sa/ledger\"]}}], to: [{operation: {methods: [GET]}}]}]
";
    let no_west = "apiVersion: policy.strait.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: echo-no-west, namespace: demo}
spec:
  targetRefs: [{group: multicluster.x-k8s.io, kind: ServiceImport, name: echo}]
  action: DENY
  rules: [{from: [{source: {clusters: [west]}}]}]
";
    // Istio's usual form, a selector: ledger's workloads let in only echo's identity.
    let ledger_callers = "apiVersion: policy.strait.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: ledger-callers, namespace: demo}
spec:
  selector: {matchLabels: {app: ledger}}
  rules: [{from: [{source: {principals: [\"spiffe://mesh.local/ns/demo/sa/echo\"]}}]}]
";
    mesh.policy_ok("apply", "east", "greeter-readers", readers);
    mesh.policy_ok("apply", "east", "echo-no-west", no_west);
    mesh.policy_ok("apply", "west", "ledger-callers", ledger_callers);
    for (w, svc, want) in [
        // By principal, in every cluster: echo's sidecars lose greeter, ledger's keeps it, and
        // greeter's own sidecar keeps its own service.
        (east_echo, "greeter.demo.", false),
        (west_echo, "greeter.demo.", false),
        (ledger, "greeter.demo.", true),
        (west_greeter, "greeter.demo.", true),
        // By cluster: west's greeter loses echo; west's echo keeps its own service; east's
        // sidecars keep echo.
        (west_greeter, "echo.demo.", false),
        (west_echo, "echo.demo.", true),
        (east_echo, "echo.demo.", true),
        // By the selector's labels: greeter's sidecar loses ledger, echo's keep it.
        (west_greeter, "ledger.demo.", false),
        (east_echo, "ledger.demo.", true),
        (west_echo, "ledger.demo.", true),
    ] {
        sidecar_settles(w, svc, want).await;
    }
    // A call to a service out of its scope is answered by the caller's sidecar, which says so;
    // those it may call still answer.
    let (status, body) = get_via(east_echo.outbound_proxy, "http://greeter.demo.svc.clusterset.local/")
        .await
        .unwrap();
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 404, "{body}");
    assert!(
        body.contains("not in this sidecar's scope") && body.contains("--scope-authorized"),
        "{body}"
    );
    let (status, _) = get_via(ledger.outbound_proxy, "http://greeter.demo.svc.clusterset.local/")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let (status, _) = get_via(east_echo.outbound_proxy, "http://echo.demo.svc.clusterset.local/")
        .await
        .unwrap();
    assert_eq!(status, 200);
    // Cluster-scoped policies of west, refusing west's callers: they bind west's workloads
    // only. Echo has workloads in east and central too, which let west's greeter in, so it
    // keeps echo; greeter's workloads are all in west, so west's echo loses greeter; east's
    // sidecars do not see them. (Their clusterset counterparts above do take echo away: those
    // every cluster holding echo's workloads enforces.)
    let west_only = |name: &str, target: &str| {
        format!(
            "apiVersion: policy.strait.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: demo, labels: {{strait.dev/scope: cluster}}}}
spec:
  targetRefs: [{{kind: Service, name: {target}}}]
  action: DENY
  rules: [{{from: [{{source: {{clusters: [west]}}}}]}}]
"
        )
    };
    let (echo_here, greeter_here) = (west_only("echo-here", "echo"), west_only("greeter-here", "greeter"));
    mesh.policy_ok("delete", "east", "echo-no-west", no_west);
    sidecar_settles(west_greeter, "echo.demo.", true).await;
    mesh.policy_ok("apply", "west", "echo-here", &echo_here);
    mesh.policy_ok("apply", "west", "greeter-here", &greeter_here);
    sidecar_settles(west_echo, "greeter.demo.", false).await;
    for (w, svc, want) in [
        (west_greeter, "echo.demo.", true),
        (west_greeter, "greeter.demo.", true),
        (east_echo, "echo.demo.", true),
        (ledger, "greeter.demo.", true),
    ] {
        assert_eq!(holds(w.admin_addr, svc).await, want, "{} holding {svc}", w.name);
    }
    mesh.policy_ok("delete", "west", "echo-here", &echo_here);
    mesh.policy_ok("delete", "west", "greeter-here", &greeter_here);
    // The policies go: the services come back.
    mesh.policy_ok("delete", "east", "greeter-readers", readers);
    mesh.policy_ok("delete", "west", "ledger-callers", ledger_callers);
    for (w, svc) in [
        (east_echo, "greeter.demo."),
        (west_echo, "greeter.demo."),
        (west_greeter, "echo.demo."),
        (west_greeter, "ledger.demo."),
    ] {
        sidecar_settles(w, svc, true).await;
    }
    let (status, _) = get_via(east_echo.outbound_proxy, "http://greeter.demo.svc.clusterset.local/")
        .await
        .unwrap();
    assert_eq!(status, 200);
}

/// Waits until `w`'s sidecar holds (`want`) or no longer holds a service whose host starts
/// with `svc`.
async fn sidecar_settles(w: &WorkloadInfo, svc: &str, want: bool) {
    let what = if want { "holds" } else { "does not hold" };
    Mesh::eventually(
        &format!("{}'s sidecar {what} {svc}", w.name),
        Duration::from_secs(15),
        || async {
            Mesh::sidecar_hosts(w.admin_addr)
                .await
                .iter()
                .any(|h| h.starts_with(svc))
                == want
        },
    )
    .await
    .unwrap();
}

/// One service of 60,000 endpoints (about 100 bytes each on the wire): its export (peering)
/// and the sidecars' config stream each carry it in one message of about 6 MB, larger than
/// gRPC's default limit of 4 MiB; it still reaches a sidecar in the other cluster whole. Then
/// that cluster's controller restarts: its sidecar subscribes again, says what it holds, and is
/// sent only what differs (not the 6 MB again). Then the sidecar itself restarts, holding
/// nothing: it is sent the whole catalog as one update in parts (the resources before the big
/// service, the big service alone, the rest). Each time it holds all of it and calls through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_larger_than_grpcs_default_message_limit_reaches_every_sidecar() {
    const ENDPOINTS: usize = 60_000;
    let mut mesh = Mesh::start().await.unwrap();
    let east = mesh.cluster("east");
    let mut yaml = String::from(
        "services:\n  - name: wide\n    namespace: big\n    serviceAccount: wide\n    ports: [{port: 80}]\n    endpoints:\n",
    );
    for i in 0..ENDPOINTS {
        yaml += &format!(
            "      - {{workload: w-{i}, address: \"10.{}.{}.{}:8080\", zone: us-east-1a}}\n",
            100 + i / 65536,
            (i / 256) % 256,
            i % 256
        );
    }
    std::fs::write(east.controller.catalog_dir.clone().unwrap().join("wide.yaml"), yaml).unwrap();
    let west = mesh.cluster("west").workloads[0].clone();
    let held = std::sync::atomic::AtomicUsize::new(0);
    // Every endpoint arrives, and the sidecar still calls across clusters with the big catalog
    // in place.
    let (west, held) = (&west, &held);
    let holds_all_and_calls = |when: &'static str| async move {
        let found = Mesh::eventually(
            "a west sidecar holds every endpoint of big/wide",
            Duration::from_secs(90),
            || async move {
                let Ok(config) = Mesh::admin_json(west.admin_addr, "/config").await else {
                    return false;
                };
                let n = config["services"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|s| s["host"].as_str() == Some("wide.big.svc.clusterset.local"))
                    .and_then(|s| s["endpoints"].as_array())
                    .map_or(0, |e| e.len());
                held.store(n, std::sync::atomic::Ordering::Relaxed);
                n == ENDPOINTS
            },
        )
        .await;
        assert!(
            found.is_ok(),
            "{when}: the west sidecar holds {held:?} of {ENDPOINTS} endpoints"
        );
        let (status, _) = get_via(west.outbound_proxy, "http://greeter.demo.svc.clusterset.local/")
            .await
            .unwrap();
        assert_eq!(status, 200, "{when}");
    };
    holds_all_and_calls("first").await;
    // Its heap, as the allocator counts it, holds the catalog: 60,000 endpoints are more than
    // 6 MB however compact; and it is part of the process's resident memory.
    let heap = metric_sum(
        &scrape(west.admin_addr).await.unwrap(),
        "strait_memory_allocated_bytes",
        &[],
    );
    let rss = Mesh::rss(west.sidecar_pid).unwrap() as f64;
    assert!(
        heap > 6e6 && heap < rss,
        "strait_memory_allocated_bytes {heap} (RSS {rss} bytes)"
    );

    // West's controller restarts; its sidecar and gateway say what they hold and are sent what
    // differs from it.
    let controller = mesh.cluster("west").controller.clone();
    mesh.kill9(controller.pid);
    mesh.restart_component(&controller, &[]).await.unwrap();
    let acked = Mesh::eventually(
        "the restarted west controller's proxies ACK its config",
        Duration::from_secs(60),
        || Mesh::sidecar_in_sync(controller.admin_addr, &west.name),
    )
    .await;
    assert!(acked.is_ok(), "{acked:?}");
    holds_all_and_calls("after its controller restarted").await;
    let sent = scrape(controller.admin_addr).await.unwrap();
    let sent = |what: &str, update: &str| metric_sum(&sent, what, &[("update", update)]);
    let (resumed, resumed_bytes) = (
        sent("strait_config_sent_updates_total", "resumed"),
        sent("strait_config_sent_bytes_total", "resumed"),
    );
    assert!(
        resumed >= 2.0 && sent("strait_config_sent_updates_total", "full") == 0.0 && resumed_bytes < 1e6,
        "the restarted controller sent {resumed} resumed updates ({resumed_bytes} bytes) and {} full ones",
        sent("strait_config_sent_updates_total", "full")
    );

    // The sidecar restarts (kill -9, then its own command): it holds nothing, and is sent the
    // whole state, the big service alone in a part.
    let env = Mesh::restart_environment(west.sidecar_pid);
    assert!(env.iter().any(|(k, _)| k == "STRAIT_JOIN_TOKEN"), "{env:?}");
    mesh.kill9(west.sidecar_pid);
    let program = west.sidecar_program.clone().unwrap_or_else(strait_bin);
    mesh.restart_program(&program, &west.sidecar_command, &env, Some(&west.sidecar_log))
        .unwrap();
    holds_all_and_calls("after the sidecar restarted").await;
    let log = std::fs::read_to_string(&west.sidecar_log).unwrap();
    let full = log
        .lines()
        .rfind(|l| l.contains("full config applied"))
        .unwrap_or_default();
    let parts: usize = full
        .split_once("parts=")
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    assert!(parts >= 3, "the restarted sidecar's full update: {full}");
}
