//! `strait trust`: create a trust domain's root, and per-cluster intermediates.

use std::path::PathBuf;
use std::time::SystemTime;

use clap::Subcommand;
use strait_trust::{Authority, TrustDomain};

#[derive(Subcommand, Debug)]
pub enum TrustCommand {
    /// Create the root CA of a trust domain.
    #[command(
        after_help = "Example:\n  strait trust init --trust-domain mesh.local --out ./trust\n\nWrites ca.pem, ca-key.pem (mode 0600) and bundle.pem (the roots to distribute)."
    )]
    Init {
        #[arg(long)]
        trust_domain: TrustDomain,
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing root in OUT.
        #[arg(long)]
        force: bool,
    },
    /// Create a cluster's intermediate CA, signed by a root made with `strait trust init`.
    #[command(
        after_help = "Example:\n  strait trust intermediate --root ./trust --trust-domain mesh.local --cluster east --out ./east-ca"
    )]
    Intermediate {
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        trust_domain: TrustDomain,
        #[arg(long)]
        cluster: String,
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(cmd: TrustCommand) -> anyhow::Result<()> {
    match cmd {
        TrustCommand::Init {
            trust_domain,
            out,
            force,
        } => {
            init(&trust_domain, &out, force)?;
            println!("created the root of trust domain {trust_domain} in {}", out.display());
            println!(
                "  bundle (distribute to every cluster): {}",
                out.join("bundle.pem").display()
            );
            println!(
                "  key (keep offline):                   {}",
                out.join("ca-key.pem").display()
            );
            Ok(())
        }
        TrustCommand::Intermediate {
            root,
            trust_domain,
            cluster,
            out,
        } => {
            let root = Authority::load(&root, &trust_domain)?;
            root.new_intermediate(&cluster, SystemTime::now())?.write(&out)?;
            println!("created the intermediate CA of cluster {cluster} in {}", out.display());
            Ok(())
        }
    }
}

/// Creates a root in `out` (used by `strait up` too).
pub fn init(td: &TrustDomain, out: &std::path::Path, force: bool) -> anyhow::Result<Authority> {
    if out.join("ca-key.pem").exists() && !force {
        anyhow::bail!(
            "{} already holds a root key; pass --force to replace it (every certificate it signed stops being trusted)",
            out.display()
        );
    }
    let root = Authority::new_root(td, SystemTime::now())?;
    root.write(out)?;
    std::fs::copy(out.join("ca.pem"), out.join("bundle.pem"))?;
    Ok(root)
}
