//! For meshes started with `strait up --netns`: delay and loss on the links between clusters,
//! and connections opened from inside a workload's network namespace, as its application
//! opens them.

use std::net::SocketAddr;
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::Context;

use crate::Mesh;

/// NFQUEUE number `nfq-netem` reads in each gateway namespace.
const QUEUE: &str = "7";

fn run(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(out.status.success(), "ip {}: {text}", args.join(" "));
    Ok(text)
}

/// Runs `cmd args` inside network namespace `ns`.
pub fn in_ns(ns: &str, cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut full = vec!["netns", "exec", ns, cmd];
    full.extend_from_slice(args);
    run(&full)
}

/// Delay and loss on what reaches every gateway from the other clusters while this lives (so
/// each direction between two clusters is delayed once and loses its share): the netem qdisc
/// on the hub's links towards the gateways where the kernel has it; where it has not (the CI
/// kernel is built without sch_netem), an NFQUEUE on what arrives on each gateway's `eth1`
/// that `nfq-netem` holds packets in, so the kernel really delivers them late or not at all.
///
/// On arrival, not on the sender's way out: by the receiving namespace's prerouting hook the
/// kernel has released the packet from its sender's socket (`ip_rcv` orphans it), as a real
/// link does once the packet is on the wire. Held at the sender's egress it still counted
/// against that socket for the whole delay, and TCP Small Queues then held the socket's next
/// writes too: a gateway's third write on a new fallback stream left a delay late, so a new
/// connection over the fallback took 1.6 inter-cluster round trips against QUIC's 1.1. TCP
/// autocorking held every second small write the same way; until this placement the
/// impairment turned it off in the mesh's namespaces.
pub struct Impairment {
    hub: String,
    links: Vec<String>,
    gateways: Vec<String>,
    emulators: Vec<Child>,
}

impl Impairment {
    /// `nfq_netem` is the emulator's path (`env!("CARGO_BIN_EXE_nfq-netem")` in a test or
    /// benchmark of this package).
    pub fn apply(mesh: &Mesh, nfq_netem: &str, delay: Duration, loss_percent: f64) -> anyhow::Result<Self> {
        let first = &mesh.info.clusters[0];
        let gw_ns = first
            .gateway
            .netns
            .as_deref()
            .context("the mesh was not started with --netns")?;
        let prefix = gw_ns
            .strip_suffix(&format!("{}-gateway", first.name))
            .context("gateway namespace names end in <cluster>-gateway")?;
        let mut me = Impairment {
            hub: format!("{prefix}hub"),
            links: vec![],
            gateways: vec![],
            emulators: vec![],
        };
        let delay_arg = format!("{}ms", delay.as_millis());
        let loss_arg = format!("{loss_percent}%");
        for n in 1..=mesh.info.clusters.len() {
            let link = format!("x{n}gw");
            let args = [
                "netns", "exec", &me.hub, "tc", "qdisc", "add", "dev", &link, "root", "netem", "delay", &delay_arg,
                "loss", &loss_arg,
            ];
            match run(&args) {
                Ok(_) => me.links.push(link),
                Err(e) if e.to_string().contains("qdisc kind is unknown") && me.links.is_empty() => break,
                Err(e) => return Err(e),
            }
        }
        if !me.links.is_empty() {
            return Ok(me);
        }
        for c in &mesh.info.clusters {
            let ns = c
                .gateway
                .netns
                .clone()
                .context("--netns reports each gateway's namespace")?;
            in_ns(
                &ns,
                "iptables",
                &[
                    "-t",
                    "mangle",
                    "-A",
                    "PREROUTING",
                    "-i",
                    "eth1",
                    "-j",
                    "NFQUEUE",
                    "--queue-num",
                    QUEUE,
                    "--queue-bypass",
                ],
            )?;
            me.gateways.push(ns.clone());
            me.emulators.push(
                Command::new("ip")
                    .args(["netns", "exec", &ns, nfq_netem, "--queue", QUEUE])
                    .args(["--delay-ms", &delay.as_millis().to_string()])
                    .args(["--loss-percent", &loss_percent.to_string()])
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .with_context(|| format!("starting {nfq_netem}"))?,
            );
        }
        // Until the emulators have bound their queues, --queue-bypass lets packets through.
        std::thread::sleep(Duration::from_millis(300));
        Ok(me)
    }

    /// How the impairment is made, for the figures' footnote.
    pub fn how(&self) -> &'static str {
        if self.links.is_empty() {
            "nfq-netem (NFQUEUE) on what reaches each gateway from the other cluster; this kernel has no netem qdisc"
        } else {
            "the netem qdisc on the bridge's link towards each gateway"
        }
    }
}

impl Drop for Impairment {
    fn drop(&mut self) {
        for l in &self.links {
            let _ = run(&["netns", "exec", &self.hub, "tc", "qdisc", "del", "dev", l, "root"]);
        }
        for e in &mut self.emulators {
            let _ = e.kill();
            let _ = e.wait();
        }
        for ns in &self.gateways {
            let _ = in_ns(ns, "iptables", &["-t", "mangle", "-F", "PREROUTING"]);
        }
    }
}

/// A TCP connection to `addr` opened inside network namespace `ns` (a socket belongs to the
/// namespace of the thread that creates it: a short-lived thread enters `ns` to connect).
pub async fn connect_in(ns: &str, addr: SocketAddr) -> anyhow::Result<tokio::net::TcpStream> {
    let path = format!("/run/netns/{ns}");
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let connected = (|| -> anyhow::Result<std::net::TcpStream> {
            let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering {path}"))?;
            let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                .with_context(|| format!("connecting to {addr} in {path}"))?;
            s.set_nonblocking(true)?;
            s.set_nodelay(true)?;
            Ok(s)
        })();
        let _ = tx.send(connected);
    });
    let std = rx.await.context("the connecting thread died")??;
    Ok(tokio::net::TcpStream::from_std(std)?)
}
