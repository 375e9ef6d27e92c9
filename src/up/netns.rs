//! `strait up --netns`: every controller, gateway and workload in its own network namespace.
//! One hub namespace holds a bridge per cluster and the bridge between clusters; only gateway
//! namespaces have a leg on the latter, so a cross-cluster call that succeeds went through a
//! gateway. The host gets an address on each cluster bridge (.254) to reach admin endpoints,
//! but routes nothing. Workloads route by default via their gateway, which
//! masquerades outgoing traffic and forwards nothing inbound; there is no route to another
//! cluster's workloads at all. Everything lives inside namespaces named `strait-<base>-…`, so
//! deleting them removes every bridge, veth and rule; a later run deletes leftovers first.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;

use super::plan::{Plan, INTER_CLUSTER_NET, OUTBOUND_PORT, SIDECAR_UID};

/// The names of one mesh's namespaces and host links, derived from its address base.
pub struct Names {
    base: u8,
}

impl Names {
    pub fn new(base: u8) -> Self {
        Names { base }
    }
    fn prefix(&self) -> String {
        format!("strait-{}-", self.base)
    }
    pub fn hub(&self) -> String {
        format!("{}hub", self.prefix())
    }
    pub fn controller(&self, cluster: &str) -> String {
        format!("{}{cluster}-controller", self.prefix())
    }
    pub fn gateway(&self, cluster: &str) -> String {
        format!("{}{cluster}-gateway", self.prefix())
    }
    pub fn workload(&self, cluster: &str, workload: &str) -> String {
        format!("{}{cluster}-{workload}", self.prefix())
    }
    /// The host's veth on cluster n's bridge (interface names are at most 15 bytes).
    fn host_link(&self, n: usize) -> String {
        format!("st{}h{n}", self.base)
    }
}

fn run(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run {cmd} ({e}); `strait up --netns` needs iproute2 and iptables"))?;
    if !out.status.success() {
        anyhow::bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run("ip", args).map(|_| ())
}

fn in_ns(ns: &str, cmd: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut full = vec!["netns", "exec", ns, cmd];
    full.extend_from_slice(args);
    run("ip", &full).map(|_| ())
}

/// Namespaces, links and files one `strait up --netns` created; removed by [`Network::remove`].
#[derive(Default)]
pub struct Network {
    namespaces: Vec<String>,
    host_links: Vec<String>,
    etc_dirs: Vec<PathBuf>,
}

/// Deletes what an earlier run with the same address base left behind (after a crash or
/// SIGKILL): its namespaces (killing what still runs in them), host links and resolv.conf files.
pub fn remove_leftovers(names: &Names) -> usize {
    let listed = run("ip", &["netns", "list"]).unwrap_or_default();
    let mut removed = 0;
    for ns in listed.lines().filter_map(|l| l.split_whitespace().next()) {
        if ns.starts_with(&names.prefix()) {
            kill_inside(ns);
            let _ = ip(&["netns", "del", ns]);
            let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(ns));
            removed += 1;
        }
    }
    for n in 1..=16 {
        let _ = ip(&["link", "del", &names.host_link(n)]);
    }
    removed
}

fn kill_inside(ns: &str) {
    if let Ok(pids) = run("ip", &["netns", "pids", ns]) {
        for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

fn cidr(ip: IpAddr) -> String {
    format!("{ip}/24")
}

impl Network {
    fn add_ns(&mut self, name: &str) -> anyhow::Result<()> {
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"])
    }

    /// A veth from the hub's `bridge` into `ns` (as `dev`), with `addr` on it.
    fn attach(&self, hub: &str, hub_if: &str, bridge: &str, ns: &str, dev: &str, addr: &str) -> anyhow::Result<()> {
        ip(&[
            "-n", hub, "link", "add", hub_if, "type", "veth", "peer", "name", dev, "netns", ns,
        ])?;
        ip(&["-n", hub, "link", "set", hub_if, "master", bridge, "up"])?;
        ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
        ip(&["-n", ns, "link", "set", dev, "up"])
    }

    /// Builds the whole network for `plan` (after removing leftovers of an earlier run).
    pub fn create(plan: &Plan, strait: &std::path::Path) -> anyhow::Result<Network> {
        let names = Names::new(plan.topology.address_base);
        let stale = remove_leftovers(&names);
        if stale > 0 {
            super::progress(format!("removed {stale} network namespaces left by an earlier run"));
        }
        let mut net = Network::default();
        match net.build(plan, &names, strait) {
            Ok(()) => Ok(net),
            Err(e) => {
                net.remove();
                Err(e)
            }
        }
    }

    fn build(&mut self, plan: &Plan, names: &Names, strait: &std::path::Path) -> anyhow::Result<()> {
        let hub = names.hub();
        self.add_ns(&hub)?;
        ip(&["-n", &hub, "link", "add", "br-x", "type", "bridge"])?;
        ip(&["-n", &hub, "link", "set", "br-x", "up"])?;
        let [x1, x2, x3] = INTER_CLUSTER_NET;
        let inter = format!("{x1}.{x2}.{x3}.0/24");
        for (i, c) in plan.clusters.iter().enumerate() {
            let n = i + 1;
            let base = plan.topology.address_base;
            let bridge = format!("br-c{n}");
            ip(&["-n", &hub, "link", "add", &bridge, "type", "bridge"])?;
            ip(&["-n", &hub, "link", "set", &bridge, "up"])?;
            let gw_ip = Plan::subnet_ip(base, n, 2).to_string();

            // The host's leg: admin endpoints and the CLI reach the cluster from here.
            let host_link = names.host_link(n);
            let hub_side = format!("c{n}host");
            ip(&[
                "link", "add", &host_link, "type", "veth", "peer", "name", &hub_side, "netns", &hub,
            ])?;
            self.host_links.push(host_link.clone());
            ip(&["-n", &hub, "link", "set", &hub_side, "master", &bridge, "up"])?;
            ip(&["addr", "add", &cidr(Plan::subnet_ip(base, n, 254)), "dev", &host_link])?;
            ip(&["link", "set", &host_link, "up"])?;

            // The gateway: one leg in the cluster, one on the bridge between clusters.
            let gw = names.gateway(&c.name);
            self.add_ns(&gw)?;
            self.attach(
                &hub,
                &format!("c{n}gw"),
                &bridge,
                &gw,
                "eth0",
                &cidr(Plan::subnet_ip(base, n, 2)),
            )?;
            self.attach(
                &hub,
                &format!("x{n}gw"),
                "br-x",
                &gw,
                "eth1",
                &format!("{}/24", c.gateway.ip()),
            )?;
            in_ns(&gw, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
            for rule in [
                "-t nat -A POSTROUTING -o eth1 -j MASQUERADE",
                "-A FORWARD -i eth0 -o eth1 -j ACCEPT",
                "-A FORWARD -i eth1 -o eth0 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
                "-A FORWARD -j DROP",
            ] {
                let args: Vec<&str> = rule.split(' ').collect();
                in_ns(&gw, "iptables", &args)?;
            }

            let ctl = names.controller(&c.name);
            self.add_ns(&ctl)?;
            self.attach(
                &hub,
                &format!("c{n}ctl"),
                &bridge,
                &ctl,
                "eth0",
                &cidr(c.controller.ip()),
            )?;
            ip(&["-n", &ctl, "route", "add", &inter, "via", &gw_ip])?;

            for (j, w) in c.workloads.iter().enumerate() {
                let ns = names.workload(&c.name, &w.name);
                self.add_ns(&ns)?;
                self.attach(&hub, &format!("c{n}w{j}"), &bridge, &ns, "eth0", &cidr(w.ip))?;
                // A default route (as a pod has, to its node): without one the kernel refuses a
                // connect to a ClusterSet IP before iptables could redirect it. The gateway
                // forwards only to the bridge between clusters.
                ip(&["-n", &ns, "route", "add", "default", "via", &gw_ip])?;
                // `ip netns exec` shows this file as /etc/resolv.conf inside the namespace:
                // the host's leg stands in for the cluster DNS server, like a node-local resolver.
                let etc = PathBuf::from("/etc/netns").join(&ns);
                std::fs::create_dir_all(&etc)?;
                self.etc_dirs.push(etc.clone());
                std::fs::write(
                    etc.join("resolv.conf"),
                    format!(
                        "nameserver {}\nsearch {ns_}.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n",
                        Plan::subnet_ip(base, n, 254),
                        ns_ = w.namespace
                    ),
                )?;
                // What the injected init container does in a pod.
                in_ns(
                    &ns,
                    &strait.display().to_string(),
                    &[
                        "sidecar-init",
                        "--proxy-uid",
                        &SIDECAR_UID.to_string(),
                        "--outbound-port",
                        &OUTBOUND_PORT.to_string(),
                    ],
                )?;
            }
        }
        Ok(())
    }

    /// Removes every namespace (and with them bridges, veths and rules), host link and file.
    pub fn remove(&mut self) {
        for ns in self.namespaces.drain(..).rev() {
            kill_inside(&ns);
            let _ = ip(&["netns", "del", &ns]);
        }
        for link in self.host_links.drain(..) {
            let _ = ip(&["link", "del", &link]);
        }
        for dir in self.etc_dirs.drain(..) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The command prefix that runs a program inside `ns`, as the sidecar's UID when `as_proxy`.
pub fn exec_prefix(ns: &str, as_proxy: bool) -> Vec<String> {
    let mut v: Vec<String> = ["ip", "netns", "exec", ns].iter().map(|s| s.to_string()).collect();
    if as_proxy {
        let uid = SIDECAR_UID.to_string();
        v.extend(
            ["setpriv", "--reuid", &uid, "--regid", &uid, "--clear-groups", "--"]
                .iter()
                .map(|s| s.to_string()),
        );
    }
    v
}
