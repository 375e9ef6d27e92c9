//! Command-line parsing and dispatch. Each command lives in its own module; daemons hand over
//! to their crate's `run` at once.

mod demo;
mod demo_http;
mod http;
mod inspect;
mod intercept;
mod policy;
mod trust;

use clap::{Parser, Subcommand, ValueEnum};

use crate::up;
use strait::daemons;

pub use daemons::{EXIT_WITH_PARENT_ENV, JOIN_TOKEN_ENV};
pub use http::{get as http_get, get_json};
pub use inspect::table;
pub use policy::default_credentials;
pub use trust::init as trust_init;

#[derive(Parser, Debug)]
#[command(name = "strait", version, about = "Strait: a multi-cluster service mesh", long_about = None)]
pub struct Cli {
    /// Log filter (tracing env-filter syntax), e.g. `info` or `strait_sidecar=debug`.
    #[arg(long, global = true, env = "STRAIT_LOG", default_value = "info,kube_client=off")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    #[default]
    Table,
    /// A table with more columns (`get routes`, `get policies`).
    Wide,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a whole mesh on this machine: clusters, controllers, gateways, demo workloads.
    #[command(after_help = up::EXAMPLES)]
    Up(up::UpArgs),
    /// Print or apply the manifests that install Strait in one Kubernetes cluster.
    #[command(after_help = crate::install::EXAMPLES)]
    Install(crate::install::InstallArgs),
    /// Link installed clusters: exchange names, gateway addresses and (across trust domains) bundles.
    #[command(
        after_help = "Example:\n  strait join --context kind-east --context kind-west --context kind-central\n  KUBECONFIG=east.yaml:west.yaml strait join --context east --context west"
    )]
    Join(crate::install::JoinArgs),
    /// Verify one cluster's install and its peering, and say what to fix.
    #[command(
        after_help = "Example:\n  strait check --context kind-east\n  strait check --context kind-east --output json"
    )]
    Check(crate::install::CheckArgs),
    /// Show the clusterset as one controller sees it: peers, leases, proxies.
    #[command(
        after_help = "Example:\n  strait status --controller 127.10.1.1:15014\n  strait status --controller 127.10.1.1:15014 --output json"
    )]
    Status(inspect::StatusArgs),
    /// Print the address of the clusterset page a controller serves (open it in a browser):
    /// every cluster, its workloads and gateways, live traffic, routes and policies.
    #[command(
        after_help = "Example:\n  strait dashboard --controller 127.10.1.1:15014\n  strait dashboard --controller 127.10.1.1:15014 --output json"
    )]
    Dashboard(inspect::DashboardArgs),
    /// Show the merged service catalog of one controller.
    #[command(after_help = "Example:\n  strait services --controller 127.10.1.1:15014")]
    Services(inspect::ServicesArgs),
    /// Show routes and policies and where they apply: `strait get routes|policies`.
    #[command(subcommand)]
    Get(inspect::GetCommand),
    /// Write HTTPRoutes and TrafficPolicies for the whole clusterset (outside Kubernetes).
    #[command(after_help = policy::APPLY_EXAMPLES)]
    Apply(policy::ApplyArgs),
    /// Explain how a workload's sidecar routes a request: `strait route explain`.
    #[command(subcommand)]
    Route(policy::RouteCommand),
    /// Remove routes and policies written with `strait apply`, in every cluster.
    #[command(after_help = policy::DELETE_EXAMPLES)]
    Delete(policy::DeleteArgs),
    /// Manage trust domains: roots and per-cluster intermediate CAs.
    #[command(subcommand)]
    Trust(trust::TrustCommand),
    /// Run a sidecar proxy (started by `strait up` or the injector).
    #[command(
        after_help = daemons::sidecar_help("strait sidecar")
    )]
    Sidecar(Box<daemons::SidecarArgs>),
    /// Write the pod's iptables interception rules (`strait sidecar init`; what the injected
    /// init container runs).
    #[command(
        name = "sidecar-init",
        hide = true,
        after_help = "Example:\n  strait sidecar init --proxy-uid 1337\n  strait sidecar init --cleanup\n  strait sidecar init --dry-run --exclude-cidrs 169.254.169.254/32"
    )]
    SidecarInit(intercept::InitArgs),
    /// Run an east-west gateway.
    #[command(
        after_help = "Example:\n  STRAIT_JOIN_TOKEN=... strait gateway --cluster east --region us-east --zone us-east-1a --listen 127.0.0.1:15443 \\\n    --admin 127.0.0.1:15021 --controller 127.0.0.1:15012 --trust-domain mesh.local --bundle bundle.pem"
    )]
    Gateway(daemons::GatewayArgs),
    /// Run a federation controller.
    #[command(after_help = "Example:\n  strait federation --config east/controller.yaml\n\n\
         Threads: one (a single-threaded runtime) unless STRAIT_WORKER_THREADS says more.")]
    Federation(daemons::FederationArgs),
    /// Run the demo app (HTTP JSON echo, or a TCP byte echo with --tcp).
    #[command(
        after_help = "Example:\n  strait demo-app --listen 127.0.0.1:8080 --cluster east --region us-east --zone us-east-1a --workload echo-1 --service echo"
    )]
    DemoApp(demo::DemoArgs),
}

/// `strait sidecar init ...` is `strait sidecar-init ...`: the proxy's own flags and the init
/// step's share the `sidecar` word, which clap cannot express as one command.
pub fn parse() -> Cli {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.len() > 2 && args[1] == "sidecar" && args[2] == "init" {
        args.splice(1..3, [std::ffi::OsString::from("sidecar-init")]);
    }
    Cli::parse_from(args)
}

pub async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    daemons::exit_with_parent();
    match cli.command {
        Command::Up(args) => up::run(args).await,
        Command::Install(args) => crate::install::run(args).await,
        Command::Join(args) => crate::install::join(args).await,
        Command::Check(args) => crate::install::check(args).await,
        Command::Status(args) => inspect::status(args).await,
        Command::Dashboard(args) => inspect::dashboard(args).await,
        Command::Services(args) => inspect::services(args).await,
        Command::Get(inspect::GetCommand::Routes(args)) => policy::get(args, "routes").await,
        Command::Get(inspect::GetCommand::Policies(args)) => policy::get(args, "policies").await,
        Command::Apply(args) => policy::apply(args).await,
        Command::Delete(args) => policy::delete(args).await,
        Command::Route(policy::RouteCommand::Explain(args)) => policy::explain(args).await,
        Command::Trust(cmd) => trust::run(cmd),
        Command::Sidecar(args) => daemons::sidecar(*args).await,
        Command::SidecarInit(args) => intercept::run(args),
        Command::Gateway(args) => daemons::gateway(args).await,
        Command::Federation(args) => daemons::federation(args).await,
        Command::DemoApp(args) => demo::run(args).await,
    }
}
