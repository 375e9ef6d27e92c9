//! `strait-sidecar`: the sidecar proxy alone. The same flags and behaviour as `strait sidecar`,
//! in an executable without the controller, the Kubernetes client and the operator commands,
//! so each pod's proxy maps far less code (README, "Scale and performance"). `strait up` and
//! the injector run it; `strait sidecar` stays for anyone who has only the one executable.

use clap::Parser;
use strait::daemons::{self, SidecarArgs};

#[derive(Parser, Debug)]
#[command(
    name = "strait-sidecar",
    version,
    about = "Strait's sidecar proxy (the same as `strait sidecar`, in a smaller executable)",
    after_help = format!(
        "{}\nInterception rules for a pod are written by `strait sidecar init` (the full executable).",
        daemons::sidecar_help("strait-sidecar")
    )
)]
struct Cli {
    /// Log filter (tracing env-filter syntax), e.g. `info` or `strait_sidecar=debug`.
    #[arg(long, env = "STRAIT_LOG", default_value = "info")]
    log: String,
    #[command(flatten)]
    sidecar: SidecarArgs,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    strait::init_tracing(&cli.log);
    daemons::exit_with_parent();
    strait::main(true, daemons::sidecar(cli.sidecar))
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    #[test]
    fn the_flags_are_consistent_and_the_same_as_strait_sidecar() {
        super::Cli::command().debug_assert();
        let parsed = super::Cli::try_parse_from([
            "strait-sidecar",
            "--workload",
            "echo-1",
            "--service",
            "echo",
            "--cluster",
            "east",
            "--region",
            "us-east",
            "--outbound",
            "127.0.0.1:15001",
            "--inbound",
            "127.0.0.1:15006",
            "--admin",
            "127.0.0.1:15000",
            "--app",
            "127.0.0.1:8080",
            "--controller",
            "127.0.0.1:15012",
        ]);
        assert!(parsed.is_ok(), "{parsed:?}");
        let e = super::Cli::try_parse_from(["strait-sidecar", "--workload", "w"]).unwrap_err();
        assert!(e.to_string().contains("--service"), "{e}");
    }
}
