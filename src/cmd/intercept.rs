//! `strait sidecar init`: a pod's interception rules (iptables, nat table). Outbound TCP goes to
//! the sidecar's outbound port, inbound TCP to its inbound port, DNS to its DNS port; the
//! sidecar's own UID, loopback-to-loopback traffic and the excluded ports and CIDRs pass
//! untouched. Idempotent (re-running replaces Strait's chains), and `--cleanup` removes exactly
//! what it added. It is what the injector's init container runs.

use std::process::Command;

use clap::Args;

const OUT_CHAIN: &str = "STRAIT_OUTPUT";
const IN_CHAIN: &str = "STRAIT_INBOUND";
const DNS_CHAIN: &str = "STRAIT_DNS";

#[derive(Args, Debug, Clone)]
pub struct InitArgs {
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
    #[arg(long, default_value_t = 15006)]
    pub inbound_port: u16,
    /// Where DNS queries (UDP and TCP port 53) go; 0 leaves DNS alone.
    #[arg(long, default_value_t = 15053)]
    pub dns_port: u16,
    /// The sidecar's UID: its own traffic is never redirected.
    #[arg(long, default_value_t = 1337)]
    pub proxy_uid: u32,
    /// Inbound ports not to intercept (comma-separated), besides the sidecar's own.
    #[arg(long, value_delimiter = ',')]
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound ports not to intercept (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub exclude_outbound_ports: Vec<u16>,
    /// Destination CIDRs not to intercept (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub exclude_cidrs: Vec<String>,
    /// Remove Strait's rules instead.
    #[arg(long)]
    pub cleanup: bool,
    /// Print the iptables commands instead of running them.
    #[arg(long)]
    pub dry_run: bool,
}

fn iptables(args: &[String], dry_run: bool, tolerate_failure: bool) -> anyhow::Result<()> {
    if dry_run {
        println!("iptables {}", args.join(" "));
        return Ok(());
    }
    let out = Command::new("iptables").args(args).output().map_err(|e| {
        anyhow::anyhow!(
            "cannot run iptables ({e}); install it (Debian: iptables) or run in the injected init container"
        )
    })?;
    if !out.status.success() && !tolerate_failure {
        anyhow::bail!(
            "iptables {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// One nat-table rule, written as iptables would print it (tokens never contain spaces).
fn nat(rule: String) -> Vec<String> {
    ["-t", "nat"]
        .into_iter()
        .map(str::to_string)
        .chain(rule.split_whitespace().map(str::to_string))
        .collect()
}

/// The commands that remove Strait's rules (each tolerated if already absent).
fn cleanup_commands() -> Vec<Vec<String>> {
    let mut cmds = vec![];
    for (parent, chain, proto) in [
        ("OUTPUT", OUT_CHAIN, "tcp"),
        ("PREROUTING", IN_CHAIN, "tcp"),
        ("OUTPUT", DNS_CHAIN, "udp"),
    ] {
        cmds.push(nat(format!("-D {parent} -p {proto} -j {chain}")));
    }
    for chain in [OUT_CHAIN, IN_CHAIN, DNS_CHAIN] {
        cmds.push(nat(format!("-F {chain}")));
        cmds.push(nat(format!("-X {chain}")));
    }
    cmds
}

/// Inbound ports never sent to the inbound listener: the sidecar's own and the exclusions.
fn inbound_skip(x: &InitArgs) -> Vec<u16> {
    let mut skip: Vec<u16> = vec![x.inbound_port, x.outbound_port, 15000, x.dns_port];
    skip.extend(&x.exclude_inbound_ports);
    skip.retain(|p| *p != 0);
    skip
}

/// The commands that install the rules, after a cleanup (so re-running is idempotent).
pub fn install_commands(x: &InitArgs) -> Vec<Vec<String>> {
    let uid = x.proxy_uid;
    let mut rules = vec![format!("-N {OUT_CHAIN}"), format!("-N {IN_CHAIN}")];
    // Outbound: the sidecar's own traffic and loopback-to-loopback traffic pass.
    // The sidecar calling its own pod's address (a local endpoint that is this very pod)
    // leaves through lo and never passes PREROUTING: send it to the inbound listener here.
    for port in inbound_skip(x) {
        rules.push(format!("-A {OUT_CHAIN} -o lo -p tcp --dport {port} -j RETURN"));
    }
    rules.push(format!(
        "-A {OUT_CHAIN} ! -d 127.0.0.1/32 -o lo -p tcp -m owner --uid-owner {uid} -j REDIRECT --to-ports {}",
        x.inbound_port
    ));
    rules.push(format!("-A {OUT_CHAIN} -m owner --uid-owner {uid} -j RETURN"));
    if x.dns_port != 0 {
        // DNS over TCP goes to the DNS proxy too, whatever nameserver the pod names.
        rules.push(format!(
            "-A {OUT_CHAIN} -p tcp --dport 53 -j REDIRECT --to-ports {}",
            x.dns_port
        ));
    }
    rules.push(format!("-A {OUT_CHAIN} -d 127.0.0.0/8 -j RETURN"));
    for cidr in &x.exclude_cidrs {
        rules.push(format!("-A {OUT_CHAIN} -d {cidr} -j RETURN"));
    }
    for port in &x.exclude_outbound_ports {
        rules.push(format!("-A {OUT_CHAIN} -p tcp --dport {port} -j RETURN"));
    }
    rules.push(format!(
        "-A {OUT_CHAIN} -p tcp -j REDIRECT --to-ports {}",
        x.outbound_port
    ));
    rules.push(format!("-A OUTPUT -p tcp -j {OUT_CHAIN}"));
    // Inbound: everything but the sidecar's own ports and the exclusions goes to inbound.
    for port in inbound_skip(x) {
        rules.push(format!("-A {IN_CHAIN} -p tcp --dport {port} -j RETURN"));
    }
    rules.push(format!(
        "-A {IN_CHAIN} -p tcp -j REDIRECT --to-ports {}",
        x.inbound_port
    ));
    rules.push(format!("-A PREROUTING -p tcp -j {IN_CHAIN}"));
    if x.dns_port != 0 {
        rules.push(format!("-N {DNS_CHAIN}"));
        rules.push(format!("-A {DNS_CHAIN} -m owner --uid-owner {uid} -j RETURN"));
        rules.push(format!(
            "-A {DNS_CHAIN} -p udp --dport 53 -j REDIRECT --to-ports {}",
            x.dns_port
        ));
        rules.push(format!("-A OUTPUT -p udp -j {DNS_CHAIN}"));
    }
    rules.into_iter().map(nat).collect()
}

pub fn run(x: InitArgs) -> anyhow::Result<()> {
    for cmd in cleanup_commands() {
        iptables(&cmd, x.dry_run, true)?;
    }
    if x.cleanup {
        eprintln!("removed Strait's interception rules");
        return Ok(());
    }
    for cmd in install_commands(&x) {
        iptables(&cmd, x.dry_run, false)?;
    }
    eprintln!(
        "interception on: outbound tcp -> {}, inbound tcp -> {}, dns -> {} (uid {} excluded)",
        x.outbound_port, x.inbound_port, x.dns_port, x.proxy_uid
    );
    Ok(())
}
