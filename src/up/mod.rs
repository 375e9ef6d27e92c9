//! `strait up`: a whole mesh on one machine, no Kubernetes. Each cluster is a controller with a
//! file catalog, a gateway, and demo workloads (app + sidecar), every one its own OS process
//! on the cluster's loopback range. It prints what it started once everything is ready and
//! stops it all on SIGINT/SIGTERM.

mod kube;
mod netns;
mod plan;
mod procs;
pub(crate) mod topology;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;

use crate::cmd::{get_json, table, Output};
use plan::{ClusterPlan, Mode, Plan};
use procs::Proc;
use topology::Topology;

pub const EXAMPLES: &str = "Examples:
  strait up                          # three clusters: east (2 zones), west, central
  strait up --output json            # one JSON document on stdout once ready
  strait up --topology mesh.yaml     # your own clusters and workloads
  sudo strait up --netns             # workloads in network namespaces; then, e.g.:
    sudo ip netns exec strait-10-east-echo-us-east-1a curl http://greeter.demo.svc.clusterset.local/

A topology file:
  trustDomain: mesh.local
  addressBase: 10          # cluster n uses 127.10.n.0/24
  lease: 10s
  batchWindow: 100ms       # changes within it of the last merge go out together
  policy: failover.yaml    # optional locality policy, applied in every cluster
  services:
    - {name: echo, port: 80, protocol: http}
    - {name: ledger, port: 7000, protocol: tcp}
  clusters:
    - name: east
      region: us-east
      zones: [us-east-1a, us-east-1b]
      workloads:
        - {service: echo, zone: us-east-1a}
        - {service: ledger, zone: us-east-1b}
    - name: west
      region: us-west
      zones: [us-west-2a]
      workloads:
        - {service: echo, zone: us-west-2a}
        # your own program in the workload's place: it listens on $STRAIT_APP_ADDR
        - service: echo
          zone: us-west-2a
          labels: {version: v2}
          command: [python3, -m, http.server, --bind, 127.10.2.11, '8080']

A workload's `command` runs your program (its own process; with --netns in the workload's
namespace) with STRAIT_APP_ADDR=<ip>:<port> and STRAIT_APP_PORT set; the service's protocol
(http, grpc or tcp) says what it speaks; when it exits, strait up says so (with --output json
an {\"event\":\"exited\",...} line) and its endpoint goes not-ready. See examples/own-services.yaml.

Then call a service from any sidecar:
  curl -x http://127.10.1.10:15001 http://echo.demo.svc.clusterset.local/";

#[derive(Args, Debug)]
pub struct UpArgs {
    /// A topology file replacing the built-in three-cluster demo.
    #[arg(long)]
    pub topology: Option<PathBuf>,
    /// Where certificates, configs and logs go (default: a new directory under the system temp dir).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Override the topology's address base: clusters use 127.<BASE>.<n>.0/24.
    #[arg(long)]
    pub address_base: Option<u8>,
    /// Override the topology's export lease, e.g. 5s.
    #[arg(long, value_parser = strait_federation::config::humantime_ms::parse)]
    pub lease: Option<Duration>,
    /// Override the workload certificate lifetime, e.g. 1h.
    #[arg(long, value_parser = strait_federation::config::humantime_ms::parse)]
    pub cert_ttl: Option<Duration>,
    /// Log filter for the components.
    #[arg(long, default_value = "info")]
    pub component_log: String,
    /// Keep the state directory when stopping.
    #[arg(long)]
    pub keep_state: bool,
    /// Back each cluster with a real kube-apiserver + etcd; controllers run in Kubernetes mode
    /// and the demo workloads appear as Services, EndpointSlices and ServiceExports.
    #[arg(long, conflicts_with = "netns")]
    pub kube: bool,
    /// Put every component in its own network namespace (needs root): a bridge per cluster,
    /// only gateways on the bridge between clusters, iptables interception and the DNS proxy
    /// in every workload, so unmodified clients work: `ip netns exec <ns> curl http://…`.
    #[arg(long)]
    pub netns: bool,
    /// Every sidecar and gateway exports spans to this OTLP/HTTP URL, e.g.
    /// http://127.0.0.1:4318/v1/traces (a Jaeger all-in-one listens there).
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    /// Percentage of new traces sampled (0–100).
    #[arg(long, default_value_t = 1.0, value_parser = strait::daemons::percentage)]
    pub trace_sampling: f64,
    /// Access logs from every sidecar and gateway, into their log files: text (Istio's default
    /// format) or json.
    #[arg(long, value_parser = ["text", "json"])]
    pub access_log: Option<String>,
    /// Every sidecar is sent only the services of these namespaces (comma-separated; see
    /// `strait sidecar --scope-namespaces`). Default: every namespace.
    #[arg(long, value_delimiter = ',', value_parser = strait::daemons::namespace_name)]
    pub sidecar_scope_namespaces: Vec<String>,
    /// Every sidecar is sent only the services whose AuthorizationPolicies could let it in (see
    /// `strait sidecar --scope-authorized`). Default: off.
    #[arg(long)]
    pub sidecar_scope_authorized: bool,
    #[arg(long, short, value_enum, default_value_t)]
    pub output: Output,
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("strait up: {}", msg.as_ref());
}

fn s(a: SocketAddr) -> String {
    a.to_string()
}

struct Started {
    kube: Vec<Proc>,
    controllers: Vec<Proc>,
    gateways: Vec<Proc>,
    apps: Vec<Vec<Proc>>,
    sidecars: Vec<Vec<Proc>>,
}

impl Started {
    fn all_mut(&mut self) -> Vec<&mut Proc> {
        let mut v: Vec<&mut Proc> = vec![];
        v.extend(self.sidecars.iter_mut().flatten());
        v.extend(self.apps.iter_mut().flatten());
        v.extend(self.gateways.iter_mut());
        v.extend(self.controllers.iter_mut());
        v.extend(self.kube.iter_mut());
        v
    }
}

fn start(plan: &Plan, log_filter: &str, kube: Vec<Proc>, sidecar: &procs::SidecarProgram) -> anyhow::Result<Started> {
    let strait = std::env::current_exe()?;
    let logs = plan.state_dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let td = plan.topology.trust_domain.to_string();
    let bundle = plan.bundle.display().to_string();
    let ttl = strait_federation::config::humantime_ms::format(&plan.topology.cert_ttl);
    let mut started = Started {
        kube,
        controllers: vec![],
        gateways: vec![],
        apps: vec![],
        sidecars: vec![],
    };
    let names = netns::Names::new(plan.topology.address_base);
    let netns = plan.mode == Mode::Netns;
    let prefix = |ns: String, as_proxy: bool| {
        if netns {
            netns::exec_prefix(&ns, as_proxy)
        } else {
            vec![]
        }
    };
    for c in &plan.clusters {
        let name = format!("controller-{}", c.name);
        started.controllers.push(procs::spawn_in(
            &name,
            &prefix(names.controller(&c.name), false),
            &strait,
            vec![
                "federation".into(),
                "--config".into(),
                c.controller_config().display().to_string(),
            ],
            None,
            &logs.join(format!("{name}.log")),
            log_filter,
        )?);
        // Outside Kubernetes a join token (in the environment); with --kube a service-account
        // token file, checked by the CA with TokenReview.
        let identity = |controller: SocketAddr, component: &str| -> Vec<String> {
            let mut args = vec![
                "--controller".into(),
                s(controller),
                "--trust-domain".into(),
                td.clone(),
                "--bundle".into(),
                bundle.clone(),
                "--cert-ttl".into(),
                ttl.clone(),
            ];
            if plan.kube {
                args.push("--sa-token-file".into());
                args.push(c.token_file(component).display().to_string());
            }
            args.extend(plan.telemetry.iter().cloned());
            args
        };
        let token = |t: &str| if plan.kube { None } else { Some(t.to_string()) };
        let name = format!("gateway-{}", c.name);
        let mut args: Vec<String> = vec![
            "gateway".into(),
            "--cluster".into(),
            c.name.clone(),
            "--region".into(),
            c.region.clone(),
            "--zone".into(),
            c.zones[0].clone(),
            "--listen".into(),
            s(c.gateway_listen),
            "--admin".into(),
            s(c.gateway_admin),
        ];
        args.extend(identity(c.controller, "gateway"));
        started.gateways.push(procs::spawn_in(
            &name,
            &prefix(names.gateway(&c.name), false),
            &strait,
            args,
            token(&c.gateway_token).as_deref(),
            &logs.join(format!("{name}.log")),
            log_filter,
        )?);
        let mut apps = vec![];
        let mut sidecars = vec![];
        for w in &c.workloads {
            let name = format!("app-{}-{}", c.name, w.name);
            if let Some(command) = &w.command {
                let env = [
                    ("STRAIT_APP_ADDR", s(w.app)),
                    ("STRAIT_APP_PORT", w.app.port().to_string()),
                    ("STRAIT_OUTBOUND_PROXY", s(w.outbound)),
                    ("STRAIT_CLUSTER", c.name.clone()),
                    ("STRAIT_ZONE", w.zone.clone()),
                    ("STRAIT_WORKLOAD", w.name.clone()),
                ];
                apps.push(procs::spawn_user(
                    &name,
                    &prefix(names.workload(&c.name, &w.name), false),
                    command,
                    &env,
                    &logs.join(format!("{name}.log")),
                )?);
            } else {
                apps.push(demo_app(
                    plan,
                    c,
                    w,
                    &name,
                    &prefix(names.workload(&c.name, &w.name), false),
                    log_filter,
                )?);
            }
            let mut args: Vec<String> = sidecar.command.clone();
            args.extend(workload_args(c, w));
            args.extend([
                "--namespace".into(),
                w.namespace.clone(),
                "--outbound".into(),
                s(w.outbound),
                "--inbound".into(),
                s(w.inbound),
                "--admin".into(),
                s(w.admin),
                "--app".into(),
                s(w.app),
            ]);
            if netns {
                args.extend(["--dns".into(), plan::DNS_PROXY.into()]);
            }
            if !plan.sidecar_scope.is_empty() {
                args.extend(["--scope-namespaces".into(), plan.sidecar_scope.join(",")]);
            }
            if plan.sidecar_scope_authorized {
                args.push("--scope-authorized".into());
            }
            args.extend(identity(c.controller, &w.name));
            let name = format!("sidecar-{}-{}", c.name, w.name);
            sidecars.push(procs::spawn_in(
                &name,
                &prefix(names.workload(&c.name, &w.name), true),
                &sidecar.exe,
                args,
                token(&w.token).as_deref(),
                &logs.join(format!("{name}.log")),
                log_filter,
            )?);
        }
        started.apps.push(apps);
        started.sidecars.push(sidecars);
    }
    Ok(started)
}

/// Who and where a workload is, as the sidecar and the demo app take it.
fn workload_args(c: &ClusterPlan, w: &plan::WorkloadPlan) -> [String; 10] {
    [
        "--cluster".into(),
        c.name.clone(),
        "--region".into(),
        c.region.clone(),
        "--zone".into(),
        w.zone.clone(),
        "--workload".into(),
        w.name.clone(),
        "--service".into(),
        w.service.clone(),
    ]
}

/// The built-in demo app of a workload (echo, greeter, ledger; see `strait demo-app`).
fn demo_app(
    plan: &Plan,
    c: &ClusterPlan,
    w: &plan::WorkloadPlan,
    name: &str,
    prefix: &[String],
    log_filter: &str,
) -> anyhow::Result<Proc> {
    let mut args: Vec<String> = vec!["demo-app".into(), "--listen".into(), s(w.app)];
    args.extend(workload_args(c, w));
    if w.tcp {
        args.push("--tcp".into());
    }
    let log = plan.state_dir.join("logs").join(format!("{name}.log"));
    procs::spawn_in(name, prefix, &std::env::current_exe()?, args, None, &log, log_filter)
}

async fn ready(addr: SocketAddr) -> bool {
    matches!(crate::cmd::http_get(addr, "/ready").await, Ok((200, _)))
}

/// Waits until every component is ready, peering is complete, and every sidecar has every
/// service of the topology from every cluster that runs it.
async fn wait_ready(plan: &Plan, started: &mut Started, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut stage = String::new();
    loop {
        for p in started.all_mut() {
            if p.user {
                continue; // reported by `watch_apps`, not fatal
            }
            if let Some(e) = p.exit_error("while starting") {
                return Err(e);
            }
        }
        let mut admin_addrs: Vec<SocketAddr> = vec![];
        for c in &plan.clusters {
            admin_addrs.push(c.controller_admin);
            admin_addrs.push(c.gateway_admin);
            admin_addrs.extend(c.workloads.iter().map(|w| w.admin));
        }
        let mut not_ready = 0;
        for a in &admin_addrs {
            if !ready(*a).await {
                not_ready += 1;
            }
        }
        let now_stage = if not_ready > 0 {
            format!(
                "waiting for {not_ready} of {} components to be ready",
                admin_addrs.len()
            )
        } else {
            let links = peering_links(plan).await;
            let wanted = plan.clusters.len() * plan.clusters.len().saturating_sub(1);
            if links < wanted {
                format!("peering: {links} of {wanted} links up")
            } else {
                let synced = synced_sidecars(plan).await;
                let total: usize = plan.clusters.iter().map(|c| c.workloads.len()).sum();
                if synced == total {
                    return Ok(());
                }
                format!("catalog: {synced} of {total} sidecars see every service")
            }
        };
        if now_stage != stage {
            progress(&now_stage);
            stage = now_stage;
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "not ready after {}s ({stage}); logs are in {}",
                timeout.as_secs(),
                plan.state_dir.join("logs").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn peering_links(plan: &Plan) -> usize {
    let mut links = 0;
    for c in &plan.clusters {
        if let Ok(v) = get_json(c.controller_admin, "/status").await {
            links += v["peers"]
                .as_array()
                .map(|p| p.iter().filter(|p| p["lease_valid"] == true).count())
                .unwrap_or_default();
        }
    }
    links
}

/// Each service's endpoints, by host, that every sidecar should hold once synced: those of its
/// scope (`--sidecar-scope-namespaces`) when it has one.
fn expected_endpoints(plan: &Plan) -> std::collections::BTreeMap<String, usize> {
    let mut out = std::collections::BTreeMap::new();
    for c in &plan.clusters {
        let in_scope = |ns: &String| plan.sidecar_scope.is_empty() || plan.sidecar_scope.contains(ns);
        for w in c.workloads.iter().filter(|w| in_scope(&w.namespace)) {
            *out.entry(format!("{}.{}.svc.clusterset.local", w.service, w.namespace))
                .or_insert(0) += 1;
        }
    }
    out
}

async fn synced_sidecars(plan: &Plan) -> usize {
    let expected = expected_endpoints(plan);
    let mut synced = 0;
    for c in &plan.clusters {
        for w in &c.workloads {
            let Ok(v) = get_json(w.admin, "/config").await else {
                continue;
            };
            let empty = vec![];
            let services = v["services"].as_array().unwrap_or(&empty);
            let ok = expected.iter().all(|(host, n)| {
                services
                    .iter()
                    .any(|s| s["host"] == host.as_str() && s["endpoints"].as_array().map(|e| e.len()) == Some(*n))
            });
            if ok {
                synced += 1;
            }
        }
    }
    synced
}

fn describe(plan: &Plan, started: &Started) -> serde_json::Value {
    let clusters: Vec<serde_json::Value> = plan
        .clusters
        .iter()
        .enumerate()
        .map(|(i, c): (usize, &ClusterPlan)| {
            let names = netns::Names::new(plan.topology.address_base);
            let netns = plan.mode == Mode::Netns;
            let ns = |name: String| if netns { Some(name) } else { None };
            let n = i + 1;
            let ctl = &started.controllers[i];
            let gw = &started.gateways[i];
            json!({
                "name": c.name,
                "region": c.region,
                "zones": c.zones,
                "kubeconfig": if plan.kube { Some(Plan::kubeconfig(c)) } else { None },
                "apiserver": started.kube.get(2 * i + 1).map(|p| json!({"pid": p.pid, "log": p.log})),
                "controller": {
                    "addr": s(c.controller), "admin_addr": s(c.controller_admin), "pid": ctl.pid,
                    "command": ctl.args, "log": ctl.log, "config": c.controller_config(),
                    "catalog_dir": c.dir.join("catalog"), "routes_dir": c.dir.join("routes"),
                    "state_dir": c.dir.join("state"),
                    "netns": ns(names.controller(&c.name)),
                },
                "gateway": {
                    "addr": s(c.gateway), "admin_addr": s(c.gateway_admin), "pid": gw.pid,
                    "command": gw.args, "log": gw.log, "netns": ns(names.gateway(&c.name)),
                    "addresses": if netns {
                        vec![Plan::subnet_ip(plan.topology.address_base, n, 2).to_string(), c.gateway.ip().to_string()]
                    } else {
                        vec![c.gateway.ip().to_string()]
                    },
                },
                "workloads": c.workloads.iter().enumerate().map(|(j, w)| {
                    let app = &started.apps[i][j];
                    let sc = &started.sidecars[i][j];
                    json!({
                        "name": w.name, "service": w.service, "namespace": w.namespace, "zone": w.zone,
                        "protocol": plan.topology.services.iter().find(|d| d.name == w.service)
                            .map(|d| d.protocol.as_str()).unwrap_or("http"),
                        "app": if w.command.is_some() { "command" } else { "demo" },
                        "labels": w.labels,
                        "app_addr": s(w.app), "app_pid": app.pid, "app_command": app.args, "app_log": app.log,
                        "sidecar_pid": sc.pid, "outbound_proxy": s(w.outbound), "inbound_addr": s(w.inbound),
                        "admin_addr": s(w.admin), "sidecar_log": sc.log, "sidecar_command": sc.args, "sidecar_program": sc.program,
                        "ip": w.ip.to_string(), "endpoint": s(w.endpoint),
                        "netns": ns(names.workload(&c.name, &w.name)),
                        "dns": if netns { Some(plan::DNS_PROXY) } else { None },
                    })
                }).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "trust_domain": plan.topology.trust_domain.to_string(),
        "state_dir": plan.state_dir,
        "operator_credentials": plan.operator_dir(),
        "bundle": plan.bundle,
        "mode": match plan.mode { Mode::Loopback => "loopback", Mode::Kube => "kube", Mode::Netns => "netns" },
        "clusters": clusters,
    })
}

fn print_table(plan: &Plan, started: &Started) {
    let mut rows = vec![];
    for (i, c) in plan.clusters.iter().enumerate() {
        rows.push(vec![
            c.name.clone(),
            "controller".into(),
            "-".into(),
            format!("{} (admin {})", c.controller, c.controller_admin),
            started.controllers[i].pid.to_string(),
        ]);
        rows.push(vec![
            c.name.clone(),
            "gateway".into(),
            c.zones[0].clone(),
            format!("udp {} (admin {})", c.gateway, c.gateway_admin),
            started.gateways[i].pid.to_string(),
        ]);
        for (j, w) in c.workloads.iter().enumerate() {
            rows.push(vec![
                c.name.clone(),
                format!("{} ({})", w.name, w.service),
                w.zone.clone(),
                format!("proxy {} app {} (admin {})", w.outbound, w.app, w.admin),
                format!("{}/{}", started.apps[i][j].pid, started.sidecars[i][j].pid),
            ]);
        }
    }
    println!(
        "Strait is up: {} clusters in trust domain {}\n",
        plan.clusters.len(),
        plan.topology.trust_domain
    );
    print!(
        "{}",
        table(&["CLUSTER", "COMPONENT", "ZONE", "ADDRESSES", "PID(S)"], &rows)
    );
    let first = plan.clusters.first();
    if let (Mode::Netns, Some(c), Some(w)) = (plan.mode, first, first.and_then(|c| c.workloads.first())) {
        let ns = netns::Names::new(plan.topology.address_base).workload(&c.name, &w.name);
        println!(
            "\nTry it (unmodified clients inside {}'s network namespace in cluster {}):",
            w.name, c.name
        );
        for svc in &plan.topology.services {
            let host = format!("{}.{}.svc.clusterset.local", svc.name, svc.namespace);
            match svc.protocol {
                strait_federation::source::ProtocolSpec::Http => {
                    println!("  sudo ip netns exec {ns} curl http://{host}/")
                }
                strait_federation::source::ProtocolSpec::Grpc => {
                    println!("  sudo ip netns exec {ns} grpcurl -plaintext {host}:{} list", svc.port)
                }
                strait_federation::source::ProtocolSpec::Tcp => {
                    println!("  echo hi | sudo ip netns exec {ns} nc -q1 {host} {}", svc.port)
                }
            }
        }
        println!("  sudo ip netns exec {ns} dig +short echo.demo.svc.clusterset.local");
        println!("  strait status --controller {}", c.controller_admin);
    } else if let Some(w) = first.and_then(|c| c.workloads.first()) {
        println!(
            "\nTry it (from {}'s sidecar in cluster {}):",
            w.name, plan.clusters[0].name
        );
        for svc in &plan.topology.services {
            match svc.protocol {
                strait_federation::source::ProtocolSpec::Http => println!(
                    "  curl -x http://{} http://{}.{}.svc.clusterset.local/",
                    w.outbound, svc.name, svc.namespace
                ),
                strait_federation::source::ProtocolSpec::Grpc => println!(
                    "  grpcurl -plaintext -authority {}.{}.svc.clusterset.local:{} {} list   # h2c to the sidecar",
                    svc.name, svc.namespace, svc.port, w.outbound
                ),
                strait_federation::source::ProtocolSpec::Tcp => println!(
                    "  curl -sp -x http://{} telnet://{}.{}.svc.clusterset.local:{}   # TCP via CONNECT",
                    w.outbound, svc.name, svc.namespace, svc.port
                ),
            }
        }
        if let Some(c) = first {
            println!("  strait status --controller {}", c.controller_admin);
            println!("  strait services --controller {}", c.controller_admin);
            println!(
                "  strait apply -f examples/policy/canary.yaml --controller {}",
                c.controller_admin
            );
            println!("  strait get routes --controller {} --output wide", c.controller_admin);
        }
    }
    println!("\nLogs: {}   Stop: Ctrl-C", plan.state_dir.join("logs").display());
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    // Listen for SIGTERM/SIGINT from the start: one that arrives between two stages (say
    // right after the ready line) must still stop everything.
    let mut shutdown = strait_api::drain::Shutdown::listen();
    let mut topology = match &args.topology {
        Some(path) => Topology::load(path)?,
        None => Topology::default_demo(),
    };
    if let Some(b) = args.address_base {
        topology.address_base = b;
    }
    if let Some(l) = args.lease {
        topology.lease = l;
    }
    if let Some(t) = args.cert_ttl {
        topology.cert_ttl = t;
    }
    let errors = topology.validate();
    if !errors.is_empty() {
        anyhow::bail!("invalid topology:\n  {}", errors.join("\n  "));
    }
    let state_dir = match &args.state_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("strait-up-{}", std::process::id())),
    };
    if state_dir.exists() {
        std::fs::remove_dir_all(&state_dir)
            .map_err(|e| anyhow::anyhow!("cannot clear the state directory {}: {e}", state_dir.display()))?;
    }
    std::fs::create_dir_all(&state_dir)?;
    let mode = if args.kube {
        Mode::Kube
    } else if args.netns {
        Mode::Netns
    } else {
        Mode::Loopback
    };
    if args.netns && !nix::unistd::geteuid().is_root() {
        anyhow::bail!(
            "--netns creates network namespaces, bridges and iptables rules: run it as root (sudo strait up --netns)"
        );
    }
    let mut plan = Plan::new(topology, &state_dir, mode);
    plan.telemetry = telemetry_args(&args);
    plan.sidecar_scope = args.sidecar_scope_namespaces.clone();
    plan.sidecar_scope_authorized = args.sidecar_scope_authorized;
    progress(format!(
        "creating trust domain {} with {} cluster CAs in {}",
        plan.topology.trust_domain,
        plan.clusters.len(),
        state_dir.display()
    ));
    plan.write(args.kube)?;
    let mut network = if args.netns {
        progress("creating network namespaces, bridges and interception rules");
        netns::Network::create(&plan, &std::env::current_exe()?)?
    } else {
        netns::Network::default()
    };
    let mut kube_procs = vec![];
    let routes = if args.kube {
        kube::LocalRoutes::add(&plan)?
    } else {
        kube::LocalRoutes::default()
    };
    if args.kube {
        if let Err(e) = start_kube(&plan, &args.component_log, &mut kube_procs).await {
            procs::stop_all(&mut kube_procs).await;
            routes.remove();
            return Err(e);
        }
    }
    let (sidecar, note) = procs::SidecarProgram::find(&std::env::current_exe()?, progress).await;
    if let Some(note) = note {
        progress(note);
    }
    let total: usize = plan.clusters.iter().map(|c| 2 + 2 * c.workloads.len()).sum();
    progress(format!("starting {total} processes"));
    let mut started = match start(&plan, &args.component_log, kube_procs, &sidecar) {
        Ok(started) => started,
        Err(e) => {
            network.remove();
            return Err(e);
        }
    };
    let ready = tokio::select! {
        r = wait_ready(&plan, &mut started, Duration::from_secs(90)) => r,
        _ = shutdown.recv() => Err(anyhow::anyhow!("interrupted while starting")),
    };
    if let Err(e) = ready {
        procs::stop_all(&mut started_vec(&mut started)).await;
        routes.remove();
        network.remove();
        return Err(e);
    }
    progress("ready");
    match args.output {
        Output::Json => println!("{}", serde_json::to_string(&describe(&plan, &started))?),
        Output::Table | Output::Wide => print_table(&plan, &started),
    }
    let mut exited: Vec<String> = vec![];
    loop {
        tokio::select! {
            _ = shutdown.recv() => break,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {
                watch_apps(&plan, &mut started, &mut exited, args.output);
            }
        }
    }
    progress("stopping");
    procs::stop_all(&mut started_vec(&mut started)).await;
    routes.remove();
    network.remove();
    if !args.keep_state {
        let _ = std::fs::remove_dir_all(&state_dir);
    }
    Ok(())
}

/// Reports each user program (a workload `command`) that exited: a line in the table output,
/// an `exited` event line in JSON output, and its endpoint marked not ready in the catalog.
fn watch_apps(plan: &Plan, started: &mut Started, exited: &mut Vec<String>, output: Output) {
    use std::io::Write;
    for (i, c) in plan.clusters.iter().enumerate() {
        let mut changed = false;
        for (j, w) in c.workloads.iter().enumerate() {
            let app = &mut started.apps[i][j];
            if !app.user || exited.contains(&app.name) {
                continue;
            }
            let Some(status) = app.exited() else { continue };
            exited.push(app.name.clone());
            changed = true;
            let success = status == "exit status: 0";
            // Whoever reads our output may have stopped: never fail on a closed stdout.
            let mut out = std::io::stdout().lock();
            let _ = match output {
                Output::Json => writeln!(
                    out,
                    "{}",
                    json!({
                        "event": "exited", "cluster": c.name, "workload": w.name, "process": app.name,
                        "pid": app.pid, "status": status, "success": success, "log": app.log,
                    })
                ),
                Output::Table | Output::Wide => writeln!(
                    out,
                    "{:<10} {:<28} exited ({status}); its endpoint is not ready. Log: {}",
                    c.name,
                    w.name,
                    app.log.display()
                ),
            };
            let _ = out.flush();
        }
        if changed && plan.mode != Mode::Kube {
            let gone: Vec<String> = c
                .workloads
                .iter()
                .enumerate()
                .filter(|(j, _)| exited.contains(&started.apps[i][*j].name))
                .map(|(_, w)| w.name.clone())
                .collect();
            if let Err(e) = plan.write_catalog(c, &gone) {
                progress(format!("cannot update cluster {}'s catalog: {e}", c.name));
            }
        }
    }
}

fn started_vec(started: &mut Started) -> Vec<Proc> {
    let mut out = vec![];
    out.append(&mut started.sidecars.drain(..).flatten().collect());
    out.append(&mut started.apps.drain(..).flatten().collect());
    out.append(&mut started.gateways);
    out.append(&mut started.controllers);
    out.append(&mut started.kube);
    out
}

/// Starts every cluster's API server, installs the CRDs and publishes the demo workloads.
async fn start_kube(plan: &Plan, log_filter: &str, procs_out: &mut Vec<Proc>) -> anyhow::Result<()> {
    let bins = kube::binaries()?;
    progress(format!(
        "starting {} kube-apiservers with etcd ({})",
        plan.clusters.len(),
        bins.display()
    ));
    let mut servers = vec![];
    for (i, c) in plan.clusters.iter().enumerate() {
        let ip = plan::cluster_ip(plan.topology.address_base, i + 1, 3);
        let mut api = kube::start(c, ip, &format!("241.{}.0.0/16", i + 1), log_filter).await?;
        // Handed over at once, so that they are stopped whatever happens next.
        let own = procs_out.len()..procs_out.len() + api.procs.len();
        procs_out.append(&mut api.procs);
        servers.push((api, own));
    }
    for (c, (api, own)) in plan.clusters.iter().zip(servers) {
        let client = kube::wait_ready(&api, &mut procs_out[own], Duration::from_secs(60)).await?;
        kube::install_crds(&client).await?;
        kube::publish_demo(&client, c, &plan.topology.services).await?;
        kube::service_account_token(
            &client,
            strait_api::SYSTEM_NAMESPACE,
            strait_api::GATEWAY_SA,
            &c.token_file("gateway"),
        )
        .await?;
        for w in &c.workloads {
            kube::service_account_token(&client, &w.namespace, &w.service, &c.token_file(&w.name)).await?;
        }
        progress(format!(
            "cluster {}: kube-apiserver {} ready, demo services exported",
            c.name, api.url
        ));
    }
    Ok(())
}

/// What every sidecar and gateway is told about spans and access logs.
fn telemetry_args(a: &UpArgs) -> Vec<String> {
    let mut out = vec!["--trace-sampling".to_string(), a.trace_sampling.to_string()];
    if let Some(e) = &a.otlp_endpoint {
        out.extend(["--otlp-endpoint".into(), e.clone()]);
    }
    if let Some(f) = &a.access_log {
        out.extend(["--access-log".into(), f.clone()]);
    }
    out
}
