//! `strait sidecar init` in a real network namespace with real iptables: the rules it writes,
//! idempotence, and a cleanup that removes exactly what it added. Needs root (CI has it): a
//! machine without it fails here loudly rather than skipping.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::process::Command;

use multicluster_tests::strait_bin;

struct Netns(String);

impl Netns {
    fn new() -> Netns {
        let name = format!("strait-init-{}", std::process::id());
        let out = Command::new("ip").args(["netns", "add", &name]).output().unwrap();
        assert!(
            out.status.success(),
            "ip netns add needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Netns(name)
    }

    fn run(&self, program: &str, args: &[&str]) -> (bool, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, program])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    fn nat_rules(&self) -> Vec<String> {
        let (ok, out) = self.run("iptables-save", &["-t", "nat"]);
        assert!(ok, "{out}");
        out.lines()
            .filter(|l| l.starts_with('-') || l.starts_with(':'))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

#[test]
fn init_writes_idempotent_rules_and_cleanup_removes_them() {
    let ns = Netns::new();
    let bin = strait_bin();
    let bin = bin.to_str().unwrap();
    let before = ns.nat_rules();
    let args = [
        "sidecar",
        "init",
        "--proxy-uid",
        "1337",
        "--exclude-cidrs",
        "169.254.169.254/32",
        "--exclude-inbound-ports",
        "9901",
    ];
    let (ok, out) = ns.run(bin, &args);
    assert!(ok, "{out}");
    let rules = ns.nat_rules();
    let has = |needle: &str| rules.iter().any(|r| r.contains(needle));
    assert!(has("-A OUTPUT -p tcp -j STRAIT_OUTPUT"), "{rules:#?}");
    assert!(has("-A STRAIT_OUTPUT -m owner --uid-owner 1337 -j RETURN"));
    assert!(has("-A STRAIT_OUTPUT -d 169.254.169.254/32 -j RETURN"));
    assert!(has("-A STRAIT_OUTPUT -p tcp -j REDIRECT --to-ports 15001"));
    assert!(has("-A PREROUTING -p tcp -j STRAIT_INBOUND"));
    assert!(has("-A STRAIT_INBOUND -p tcp -m tcp --dport 9901 -j RETURN"));
    assert!(has("-A STRAIT_INBOUND -p tcp -j REDIRECT --to-ports 15006"));
    assert!(has(
        "-A STRAIT_DNS -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053"
    ));
    assert!(has(
        "-A STRAIT_OUTPUT -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 15053"
    ));

    // Running it again leaves the same rules, not two copies.
    let (ok, out) = ns.run(bin, &args);
    assert!(ok, "{out}");
    assert_eq!(ns.nat_rules(), rules);

    // Cleanup removes exactly what init added.
    let (ok, out) = ns.run(bin, &["sidecar", "init", "--cleanup"]);
    assert!(ok, "{out}");
    assert_eq!(ns.nat_rules(), before);
}
