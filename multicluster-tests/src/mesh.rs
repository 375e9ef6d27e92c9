use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// One mesh at a time per test binary: meshes are whole process trees and timing-sensitive
/// tests (failover under load) need the machine's cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
static STARTED: AtomicU32 = AtomicU32::new(0);

/// The repository's root, for files tests read from it (`deploy/`, `examples/`). Taken from
/// `CARGO_MANIFEST_DIR` as `cargo test` sets it when it runs the test, not as it was when the
/// test was compiled: cargo reuses a test binary built in another clone of the same sources
/// (a shared target directory), and the compile-time path then names that clone.
///
/// A test binary run by hand (no `CARGO_MANIFEST_DIR`) looks for the repository from the
/// current directory up, and only then trusts the compile-time path.
pub fn repo_dir() -> PathBuf {
    let is_repo = |dir: &&std::path::Path| dir.join("multicluster-tests/Cargo.toml").is_file();
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .into_iter()
        .chain(std::env::current_dir().ok())
        .find_map(|start| start.ancestors().find(is_repo).map(std::path::Path::to_path_buf))
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("multicluster-tests sits in the repository's root")
                .to_path_buf()
        })
}

/// The `strait` binary under test: `$STRAIT_BIN`, else `target/<profile>/strait` next to the
/// test executable.
pub fn strait_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("STRAIT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let bin = profile_dir.join("strait");
    assert!(
        bin.exists(),
        "{} does not exist: build it first (cargo build --bin strait --bin strait-sidecar) or set STRAIT_BIN; ./test.sh does both",
        bin.display()
    );
    bin
}

#[derive(Clone, Debug, Deserialize)]
pub struct Component {
    pub addr: String,
    pub admin_addr: SocketAddr,
    pub pid: u32,
    pub command: Vec<String>,
    pub log: PathBuf,
    #[serde(default)]
    pub catalog_dir: Option<PathBuf>,
    /// Where the controller reads HTTPRoute files.
    #[serde(default)]
    pub routes_dir: Option<PathBuf>,
    #[serde(default)]
    pub config: Option<PathBuf>,
    /// `--netns` only.
    #[serde(default)]
    pub netns: Option<String>,
    #[serde(default)]
    pub addresses: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct WorkloadInfo {
    pub name: String,
    pub service: String,
    pub namespace: String,
    pub zone: String,
    pub protocol: String,
    pub app_addr: SocketAddr,
    pub app_pid: u32,
    pub app_command: Vec<String>,
    pub sidecar_pid: u32,
    pub outbound_proxy: SocketAddr,
    pub inbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub sidecar_log: PathBuf,
    /// The executable the sidecar runs: `strait-sidecar` beside `strait` when it was built.
    #[serde(default)]
    pub sidecar_program: Option<PathBuf>,
    /// Its arguments (`Mesh::restart_program` starts it again with them).
    #[serde(default)]
    pub sidecar_command: Vec<String>,
    #[serde(default)]
    pub app_log: Option<PathBuf>,
    /// `demo` or `command` (the topology gave the workload's own program).
    #[serde(default)]
    pub app: String,
    /// `--netns` only: the workload's network namespace and address.
    #[serde(default)]
    pub netns: Option<String>,
    #[serde(default)]
    pub ip: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ClusterInfo {
    pub name: String,
    pub region: String,
    pub zones: Vec<String>,
    pub controller: Component,
    pub gateway: Component,
    pub workloads: Vec<WorkloadInfo>,
    /// `--kube` only: the cluster's API server.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    #[serde(default)]
    pub apiserver: Option<ApiServerInfo>,
}

impl ClusterInfo {
    /// A client of the cluster's API server (`--kube` only).
    pub async fn kube_client(&self) -> anyhow::Result<kube::Client> {
        let path = self
            .kubeconfig
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("cluster {} has no API server: start the mesh with kube", self.name))?;
        let kc = kube::config::Kubeconfig::read_from(path)?;
        let config = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }
}

/// The Multi-Cluster Services objects of `kind` (`ServiceExport`, `ServiceImport`) in `namespace`.
pub fn mcs_api(client: &kube::Client, namespace: &str, kind: &str) -> kube::Api<kube::api::DynamicObject> {
    let gvk = kube::api::GroupVersionKind::gvk("multicluster.x-k8s.io", "v1alpha1", kind);
    kube::Api::namespaced_with(client.clone(), namespace, &kube::api::ApiResource::from_gvk(&gvk))
}

#[derive(Clone, Debug, Deserialize)]
pub struct ApiServerInfo {
    pub pid: u32,
    pub log: PathBuf,
}

#[derive(Clone, Debug, Deserialize)]
pub struct MeshInfo {
    pub trust_domain: String,
    pub state_dir: PathBuf,
    pub bundle: PathBuf,
    pub clusters: Vec<ClusterInfo>,
}

#[derive(Clone, Debug, Default)]
pub struct MeshOptions {
    /// A topology file's YAML; `None` runs the built-in three-cluster demo.
    pub topology: Option<String>,
    pub lease: Option<Duration>,
    pub cert_ttl: Option<Duration>,
    /// Back every cluster with a real kube-apiserver (`strait up --kube`; needs root).
    pub kube: bool,
    /// Every component in its own network namespace (`strait up --netns`; needs root).
    pub netns: bool,
    /// More `strait up` flags (e.g. `--otlp-endpoint URL`, `--access-log json`).
    pub extra_args: Vec<String>,
}

/// The state letter (`R`, `S`, `Z`, ...) in a `/proc/.../stat` file: the field after the
/// parenthesised command name. `None` when the file cannot be read (the process is gone).
pub fn process_state(stat: &std::path::Path) -> Option<char> {
    let stat = std::fs::read_to_string(stat).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Every TCP and UDP socket on `port` (`ss -tuanp`'s lines), for a failure's message.
pub fn sockets_on(port: u16) -> String {
    let port = format!(":{port} ");
    let sockets = std::process::Command::new("ss")
        .arg("-tuanp")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    sockets
        .lines()
        .filter(|l| l.contains(&port))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A running mesh. Dropping it stops every process it started.
pub struct Mesh {
    pub info: MeshInfo,
    /// `strait up`'s output after its description: one JSON event a line (`exited`, ...).
    events: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    up: Child,
    extra: Vec<Child>,
    _turn: tokio::sync::MutexGuard<'static, ()>,
    /// The state directory and topology file, removed once the processes stopped (after
    /// `drop` below).
    _scratch: Vec<Scratch>,
}

/// A file or directory a test made under the temporary directory, removed when dropped unless
/// the thread is panicking: a failing test keeps its logs and state for whoever reads the
/// failure, a passing one leaves nothing behind.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(path: PathBuf) -> Self {
        Scratch(path)
    }

    /// `strait-<pid>-<name>` under the temporary directory: a name of this test process alone.
    pub fn temp(name: &str) -> Self {
        Scratch(std::env::temp_dir().join(format!("strait-{}-{name}", std::process::id())))
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        let _ = if self.0.is_dir() {
            std::fs::remove_dir_all(&self.0)
        } else {
            std::fs::remove_file(&self.0)
        };
    }
}

fn dur(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// A loopback range (`127.<base>.0.0/16`, and with `--netns` the namespaces `strait-<base>-…`)
/// no other mesh of this test process has used, and the mesh's number in the process. Tests
/// that run `strait up` themselves take theirs here too: a base picked any other way can
/// collide with a fixture's (two tests of one binary once both got 205 and the second's
/// `ip netns add` failed).
pub fn fresh_address_base() -> (u32, u8) {
    let n = STARTED.fetch_add(1, Ordering::SeqCst);
    (n, 20 + ((std::process::id() * 7 + n * 13) % 230) as u8)
}

impl Mesh {
    pub async fn start() -> anyhow::Result<Mesh> {
        Self::start_with(MeshOptions::default()).await
    }

    pub async fn start_with(opts: MeshOptions) -> anyhow::Result<Mesh> {
        let turn = ONE_AT_A_TIME.lock().await;
        // A fresh loopback range per mesh, so a lingering process of an earlier mesh never
        // answers for this one.
        let (n, base) = fresh_address_base();
        let state_dir = std::env::temp_dir().join(format!("strait-test-{}-{n}", std::process::id()));
        let mut cmd = Command::new(strait_bin());
        cmd.arg("up")
            .arg("--output")
            .arg("json")
            .arg("--address-base")
            .arg(base.to_string())
            .arg("--state-dir")
            .arg(&state_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        // Removed with the mesh; kept when it fails to start (its logs say why).
        let mut scratch = vec![state_dir.clone()];
        if let Some(t) = &opts.topology {
            std::fs::create_dir_all(&state_dir)?;
            let path = std::env::temp_dir().join(format!("strait-test-{}-{n}.yaml", std::process::id()));
            std::fs::write(&path, t)?;
            cmd.arg("--topology").arg(&path);
            scratch.push(path);
        }
        if let Some(l) = opts.lease {
            cmd.arg("--lease").arg(dur(l));
        }
        if opts.kube {
            cmd.arg("--kube");
        }
        if opts.netns {
            cmd.arg("--netns");
        }
        if let Some(t) = opts.cert_ttl {
            cmd.arg("--cert-ttl").arg(dur(t));
        }
        cmd.args(&opts.extra_args);
        let mut up = cmd.spawn().context("starting strait up")?;
        let stdout = up.stdout.take().context("strait up stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
            .await
            .context("strait up was not ready within 120s")??
            .context("strait up exited before it was ready")?;
        let info: MeshInfo = serde_json::from_str(&line).with_context(|| format!("strait up printed: {line}"))?;
        Ok(Mesh {
            info,
            events: lines,
            up,
            extra: vec![],
            _turn: turn,
            _scratch: scratch.into_iter().map(Scratch::new).collect(),
        })
    }

    /// The next event `strait up` printed (e.g. `{"event":"exited",...}` when a workload's
    /// own program exits), waiting up to `timeout`.
    pub async fn next_event(&mut self, timeout: Duration) -> anyhow::Result<serde_json::Value> {
        let line = tokio::time::timeout(timeout, self.events.next_line())
            .await
            .context("no event from strait up in time")??
            .context("strait up ended its output")?;
        serde_json::from_str(&line).with_context(|| format!("strait up printed: {line}"))
    }

    /// A process's peak resident memory so far (VmHWM), in bytes.
    pub fn peak_rss(pid: u32) -> anyhow::Result<u64> {
        Self::proc_status_kb(pid, "VmHWM:").map(|kb| kb * 1024)
    }

    /// A process's resident memory now (VmRSS), in bytes.
    pub fn rss(pid: u32) -> anyhow::Result<u64> {
        Self::proc_status_kb(pid, "VmRSS:").map(|kb| kb * 1024)
    }

    fn proc_status_kb(pid: u32, field: &str) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {field} for pid {pid}"))
    }

    /// The pid of the `strait up` process itself.
    pub fn up_pid(&self) -> Option<u32> {
        self.up.id()
    }

    /// Every pid `strait up` reported.
    pub fn all_pids(&self) -> Vec<u32> {
        self.info
            .clusters
            .iter()
            .flat_map(|c| {
                let mut v = vec![c.controller.pid, c.gateway.pid];
                v.extend(c.workloads.iter().flat_map(|w| [w.app_pid, w.sidecar_pid]));
                v
            })
            .collect()
    }

    pub fn cluster(&self, name: &str) -> &ClusterInfo {
        self.info
            .clusters
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no cluster {name}"))
    }

    /// The workload of `service` in `zone`.
    pub fn workload(&self, service: &str, zone: &str) -> &WorkloadInfo {
        self.info
            .clusters
            .iter()
            .flat_map(|c| &c.workloads)
            .find(|w| w.service == service && w.zone == zone)
            .unwrap_or_else(|| panic!("no {service} workload in zone {zone}"))
    }

    /// The workload called `name` (a topology entry's `name`, else `<service>-<zone>`).
    pub fn named(&self, name: &str) -> &WorkloadInfo {
        self.info
            .clusters
            .iter()
            .flat_map(|c| &c.workloads)
            .find(|w| w.name == name)
            .unwrap_or_else(|| panic!("no workload {name}"))
    }

    /// SIGKILLs a process, as a crash would, then waits (up to 5 s) until every thread of the
    /// process is gone or a zombie, so what it held (its listening sockets) is free when this
    /// returns: a component started again at once would otherwise find its address in use. (The
    /// main thread turns zombie before the others have exited; the sockets go with the last.)
    ///
    /// Panics, with the state of each of its threads, when one still runs after 5 s: what
    /// follows (a restart on its addresses, a figure about its absence) would be wrong.
    pub fn kill9(&self, pid: u32) {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        let task_states = || -> Vec<(String, char)> {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .map(|tasks| {
                    tasks
                        .flatten()
                        .filter_map(|t| {
                            let state = process_state(&t.path().join("stat"))?;
                            Some((t.file_name().to_string_lossy().into_owned(), state))
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let states = task_states();
            if states.iter().all(|(_, st)| matches!(st, 'Z' | 'X')) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "pid {pid} still runs 5 s after kill -9; its threads (tid, state): {states:?}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Starts a killed controller or gateway again with its own command (returns its pid), once
    /// its admin and listening addresses (a controller's gRPC, a gateway's tunnel and fallback)
    /// can be bound: a killed controller's listener was seen still bound for a moment after
    /// [`Mesh::kill9`] had found every thread of it gone (the restarted controller then exited
    /// with EADDRINUSE). Waits up to 10 s, printing any wait over 50 ms; fails with every socket
    /// on the port after that.
    ///
    /// `env` goes beside the test's environment: a gateway's join token, read with
    /// [`Mesh::restart_environment`] before it was killed (a controller needs none).
    pub async fn restart_component(&mut self, component: &Component, env: &[(String, String)]) -> anyhow::Result<u32> {
        let listen: SocketAddr = component
            .addr
            .parse()
            .with_context(|| format!("the component's address {:?}", component.addr))?;
        for addr in [component.admin_addr, listen] {
            let waited = std::time::Instant::now();
            // Only "in use" is waited for: an address of another network namespace (`--netns`)
            // cannot be bound from here at all. A gateway's tunnel is UDP.
            let in_use = |e: std::io::Error| e.kind() == std::io::ErrorKind::AddrInUse;
            while std::net::TcpListener::bind(addr).is_err_and(in_use)
                || (addr == listen && std::net::UdpSocket::bind(addr).is_err_and(in_use))
            {
                anyhow::ensure!(
                    waited.elapsed() < Duration::from_secs(10),
                    "{addr} of a killed component is still bound 10 s after it was killed:\n{}",
                    sockets_on(addr.port())
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if waited.elapsed() > Duration::from_millis(50) {
                println!(
                    "  {addr} of a killed component was still bound {:.0} ms after it was killed",
                    waited.elapsed().as_secs_f64() * 1e3
                );
            }
        }
        self.restart_program(&strait_bin(), &component.command, env, Some(&component.log))
    }

    /// The hosts of the services a sidecar holds (its admin `/config`); none when it cannot
    /// be read.
    pub async fn sidecar_hosts(admin: SocketAddr) -> Vec<String> {
        let config = Self::admin_json(admin, "/config").await.unwrap_or_default();
        config["services"]
            .as_array()
            .map(|a| a.iter().filter_map(|s| s["host"].as_str()).map(String::from).collect())
            .unwrap_or_default()
    }

    /// The variables of a running process's environment whose names start with `prefix`
    /// (`/proc/<pid>/environ`): what `strait up` gave it, to start it again with.
    pub fn environment(pid: u32, prefix: &str) -> Vec<(String, String)> {
        std::fs::read(format!("/proc/{pid}/environ"))
            .unwrap_or_default()
            .split(|b| *b == 0)
            .filter_map(|v| {
                let (k, v) = std::str::from_utf8(v).ok()?.split_once('=')?;
                k.starts_with(prefix).then(|| (k.to_string(), v.to_string()))
            })
            .collect()
    }

    /// What to start a running daemon of `strait up` again with, read before it is killed: the
    /// variables `strait up` gave it (its join token, its log filter), but not the order to
    /// exit with its parent's stdin, which a test does not give it.
    pub fn restart_environment(pid: u32) -> Vec<(String, String)> {
        let mut env = Self::environment(pid, "STRAIT_");
        env.retain(|(k, _)| k != "STRAIT_EXIT_WITH_PARENT");
        env
    }

    /// Starts a component again with the command `strait up` reported for it; returns its pid.
    pub fn restart(&mut self, command: &[String], log: Option<&std::path::Path>) -> anyhow::Result<u32> {
        self.restart_program(&strait_bin(), command, &[], log)
    }

    /// [`Mesh::restart`] of a component that runs another executable (a sidecar's
    /// `sidecar_program`), with `env` beside the test's environment (a sidecar's join token).
    pub fn restart_program(
        &mut self,
        program: &std::path::Path,
        command: &[String],
        env: &[(String, String)],
        log: Option<&std::path::Path>,
    ) -> anyhow::Result<u32> {
        let mut cmd = Command::new(program);
        cmd.args(command)
            .envs(env.iter().cloned())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        match log {
            Some(l) => {
                let f = std::fs::OpenOptions::new().append(true).create(true).open(l)?;
                cmd.stdout(f.try_clone()?).stderr(f);
            }
            None => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        let child = cmd.spawn()?;
        let pid = child.id().unwrap_or_default();
        self.extra.push(child);
        Ok(pid)
    }

    /// How the controller at `admin` sees peer `name` (`strait status`'s peer row).
    pub async fn peer_view(admin: SocketAddr, name: &str) -> anyhow::Result<serde_json::Value> {
        let status = Self::admin_json(admin, "/status").await?;
        status["peers"]
            .as_array()
            .and_then(|peers| peers.iter().find(|p| p["name"] == name))
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no peer {name} in {status}"))
    }

    /// Whether the sidecar of workload `node` is subscribed to the controller at `admin` and has
    /// acknowledged every version it was sent (at least one): after a controller's restart, the
    /// sidecar holds what the new process sent it.
    pub async fn sidecar_in_sync(admin: SocketAddr, node: &str) -> bool {
        let Ok(status) = Self::admin_json(admin, "/status").await else {
            return false;
        };
        status["proxies"].as_array().into_iter().flatten().any(|p| {
            p["kind"] == "sidecar"
                && p["node"] == node
                && p["acked_version"].as_u64().is_some_and(|v| v > 0)
                && p["acked_version"] == p["sent_version"]
        })
    }

    /// Runs `strait ARGS` with this mesh's operator credential (`strait up` issued it into the
    /// state directory); returns (success, stdout, stderr).
    pub fn strait(&self, args: &[&str]) -> (bool, String, String) {
        let out = std::process::Command::new(strait_bin())
            .args(args)
            .arg("--credentials")
            .arg(self.info.state_dir.join("operator"))
            .output()
            .expect("running strait");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `strait apply|delete -f` of `yaml` (kept as `<state>/<name>.yaml`) against `cluster`'s
    /// controller; `apply` waits up to `wait` for every cluster and proxy.
    pub fn policy(&self, verb: &str, cluster: &str, name: &str, yaml: &str, wait: &str) -> (bool, String, String) {
        let path = self.info.state_dir.join(format!("{name}.yaml"));
        std::fs::write(&path, yaml).expect("writing the policy file");
        let admin = self.cluster(cluster).controller.admin_addr.to_string();
        let file = path.to_string_lossy().into_owned();
        let mut args = vec![verb, "-f", &file, "--controller", &admin];
        if verb == "apply" {
            args.extend(["--wait", wait]);
        }
        self.strait(&args)
    }

    /// [`Mesh::policy`] with a 30 s wait, failing the caller with strait's output if it fails.
    pub fn policy_ok(&self, verb: &str, cluster: &str, name: &str, yaml: &str) {
        let (ok, out, err) = self.policy(verb, cluster, name, yaml, "30s");
        assert!(ok, "strait {verb} {name}: {out}{err}");
    }

    /// Waits until `cond` holds, polling; fails with `what` after `timeout`.
    pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut cond: F) -> anyhow::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if cond().await {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("timed out after {timeout:?} waiting for: {what}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// GETs an admin JSON view.
    pub async fn admin_json(addr: SocketAddr, path: &str) -> anyhow::Result<serde_json::Value> {
        let (status, body) = crate::client::plain_get(addr, path).await?;
        anyhow::ensure!(status == 200, "{addr}{path} answered {status}");
        Ok(serde_json::from_slice(&body)?)
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if let Some(pid) = self.up.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        // strait up stops its children on SIGTERM; give it the time it asks for.
        let deadline = std::time::Instant::now() + Duration::from_secs(9);
        while std::time::Instant::now() < deadline {
            if matches!(self.up.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.up.start_kill();
        for c in &mut self.extra {
            let _ = c.start_kill();
        }
    }
}
