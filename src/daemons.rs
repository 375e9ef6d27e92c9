//! The daemon subcommands: flags in, the crate's `run` out.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use strait_api::certs::Credential;
use strait_api::locality::Locality;
use strait_api::proxy::ControllerLink;
use strait_trust::{TrustBundle, TrustDomain};

/// Set by `strait up` on its children: exit when the parent goes away (stdin closes), so a
/// killed `strait up` leaves no process behind.
pub const EXIT_WITH_PARENT_ENV: &str = "STRAIT_EXIT_WITH_PARENT";
/// The trust bundle as PEM text, for containers that get it in their environment.
pub const TRUST_BUNDLE_ENV: &str = "STRAIT_TRUST_BUNDLE";
/// Join tokens travel in the environment, not on the command line where `ps` shows them.
pub const JOIN_TOKEN_ENV: &str = "STRAIT_JOIN_TOKEN";

pub fn exit_with_parent() {
    if std::env::var_os(EXIT_WITH_PARENT_ENV).is_none() {
        return;
    }
    std::thread::spawn(|| {
        use std::io::Read;
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        std::process::exit(0);
    });
}

#[derive(Args, Debug, Clone)]
pub struct Identity {
    /// The cluster controller's gRPC address (CA and config stream), host:port.
    #[arg(long, value_parser = host_port)]
    pub controller: String,
    #[arg(long, default_value = "mesh.local")]
    pub trust_domain: TrustDomain,
    /// PEM file with the trust domain's root(s); without it, the PEM text in
    /// $STRAIT_TRUST_BUNDLE (what the injector sets).
    #[arg(long)]
    pub bundle: Option<PathBuf>,
    /// Requested certificate lifetime, e.g. 24h, 10m.
    #[arg(long, value_parser = parse_duration)]
    pub cert_ttl: Option<std::time::Duration>,
    /// A service-account token file (audience `strait`) to authenticate to the CA instead of a
    /// join token; Kubernetes mounts one as a projected volume.
    #[arg(long)]
    pub sa_token_file: Option<PathBuf>,
    /// On SIGTERM, how long in-flight work may take to finish.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub drain_timeout: std::time::Duration,
}

impl Identity {
    fn link(self) -> anyhow::Result<ControllerLink> {
        Ok(ControllerLink {
            controller: self.controller,
            bundle: match &self.bundle {
                Some(path) => TrustBundle::load(path)?,
                None => {
                    let pem = std::env::var(TRUST_BUNDLE_ENV).map_err(|_| {
                        anyhow::anyhow!(
                            "give --bundle FILE or set {TRUST_BUNDLE_ENV} to the trust domain's roots (PEM)"
                        )
                    })?;
                    TrustBundle::from_pem(TRUST_BUNDLE_ENV, pem.as_bytes())?
                }
            },
            trust_domain: self.trust_domain,
            credential: match self.sa_token_file {
                Some(path) => Credential::ServiceAccountToken(path),
                None => Credential::JoinToken(join_token()?),
            },
            cert_ttl: self.cert_ttl,
        })
    }
}

fn host_port(s: &str) -> Result<String, String> {
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(s.to_string()),
        _ => Err(format!(
            "{s:?} is not host:port (e.g. 127.10.1.1:15012 or strait-federation.strait-system.svc:15012)"
        )),
    }
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    strait_federation::config::humantime_ms::parse(s)
}

#[derive(Args, Debug, Clone)]
pub struct Where {
    #[arg(long)]
    pub cluster: String,
    #[arg(long)]
    pub region: String,
    /// Empty: a sidecar takes the zone its cluster's CA reports (in Kubernetes, the
    /// `topology.kubernetes.io/zone` label of the pod's node).
    #[arg(long, default_value = "")]
    pub zone: String,
    #[arg(long, default_value = "")]
    pub subzone: String,
}

impl Where {
    fn locality(&self) -> Locality {
        Locality {
            cluster: self.cluster.clone(),
            region: self.region.clone(),
            zone: self.zone.clone(),
            subzone: self.subzone.clone(),
        }
    }
}

/// The sidecar's `--help` epilogue (an example and the thread default), for `program`:
/// `strait sidecar` or `strait-sidecar`.
pub fn sidecar_help(program: &str) -> String {
    format!(
        "Example:\n  STRAIT_JOIN_TOKEN=... {program} --workload echo-1 --service echo --cluster east --region us-east --zone us-east-1a \\\n    \
         --outbound 127.0.0.1:15001 --inbound 127.0.0.1:15006 --admin 127.0.0.1:15000 --app 127.0.0.1:8080 \\\n    \
         --controller 127.0.0.1:15012 --trust-domain mesh.local --bundle bundle.pem\n\n\
         Threads: one (a single-threaded runtime) unless STRAIT_WORKER_THREADS says more."
    )
}

#[derive(Args, Debug)]
pub struct SidecarArgs {
    #[arg(long)]
    pub workload: String,
    #[arg(long)]
    pub service: String,
    #[arg(long, default_value = "demo")]
    pub namespace: String,
    #[command(flatten)]
    pub at: Where,
    /// The outbound listener: connections iptables redirected here are routed by their original
    /// destination; connections made to it directly are an explicit HTTP proxy (absolute-form
    /// and CONNECT).
    #[arg(long)]
    pub outbound: SocketAddr,
    /// Intercepted connections to destinations the mesh does not know: pass them through
    /// (allow-any) or refuse them (registry-only).
    #[arg(long, value_enum, default_value_t = OutboundTraffic::AllowAny)]
    pub outbound_traffic: OutboundTraffic,
    /// Only services in these namespaces (comma-separated) are sent to this sidecar, so its
    /// memory and config traffic follow what it calls rather than the clusterset's size, like
    /// Istio's Sidecar egress hosts; so are the services elsewhere that routes for their
    /// services send to (backendRefs, mirrors). Other services are unknown to it (see
    /// --outbound-traffic). Default: every namespace. Example: --scope-namespaces demo,payments
    #[arg(long, value_delimiter = ',', value_parser = namespace_name)]
    pub scope_namespaces: Vec<String>,
    /// Only services that could let this workload in are sent to this sidecar: those whose
    /// AuthorizationPolicies (as this cluster's controller serves them) allow some request of
    /// its identity; one that refuses it everything is unknown to it, as if out of scope. With
    /// --scope-namespaces, only the services of the scope that could. Its own service is always
    /// sent. Default: off (every service, whatever the policies). Example: --scope-authorized
    #[arg(long)]
    pub scope_authorized: bool,
    /// The DNS proxy's address (UDP and TCP), where `strait sidecar init` sends port 53, e.g.
    /// 127.0.0.1:15053. Off when not given.
    #[arg(long)]
    pub dns: Option<SocketAddr>,
    /// Where the pod's own nameservers and search domains are (names outside the mesh go there).
    #[arg(long, default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,
    /// The inbound mTLS listener other sidecars connect to.
    #[arg(long)]
    pub inbound: SocketAddr,
    #[arg(long)]
    pub admin: SocketAddr,
    /// The app's own plaintext address.
    #[arg(long)]
    pub app: SocketAddr,
    #[command(flatten)]
    pub limits: Limits,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    #[command(flatten)]
    pub identity: Identity,
}

/// Spans and access logs (metrics are always on, at the admin address's /metrics).
#[derive(Args, Debug, Clone)]
pub struct TelemetryArgs {
    /// Export spans over OTLP/HTTP (protobuf) to this URL, e.g. http://127.0.0.1:4318/v1/traces
    /// (Jaeger, the OpenTelemetry Collector). Without it no span is exported; trace context is
    /// still propagated.
    #[arg(long, env = "STRAIT_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Percentage of new traces sampled, 0–100 (Istio's default is 1); a caller's decision in
    /// traceparent or B3 is honoured, and a TrafficPolicy's tracing.randomSamplingPercentage
    /// overrides it for its service.
    #[arg(long, default_value_t = 1.0, value_parser = percentage)]
    pub trace_sampling: f64,
    /// Write an access log line per request and per TCP connection to stdout: Istio's default
    /// text format, or JSON with the same fields.
    #[arg(long, value_enum)]
    pub access_log: Option<AccessLogFormat>,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum AccessLogFormat {
    Text,
    Json,
}

pub use strait_api::dns_label;

/// A Kubernetes namespace name (an RFC 1123 label).
pub fn namespace_name(s: &str) -> Result<String, String> {
    if dns_label(s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a namespace name (lowercase letters, digits and '-', at most 63, e.g. demo)"
        ))
    }
}

pub fn percentage(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!("{s:?} is not a percentage from 0 to 100 (e.g. 1 or 0.5)")),
    }
}

impl From<TelemetryArgs> for strait_api::telemetry::TelemetryOptions {
    fn from(a: TelemetryArgs) -> Self {
        strait_api::telemetry::TelemetryOptions {
            otlp_endpoint: a.otlp_endpoint,
            trace_sampling: a.trace_sampling,
            access_log: a.access_log.map(|f| match f {
                AccessLogFormat::Text => strait_api::accesslog::LogFormat::Text,
                AccessLogFormat::Json => strait_api::accesslog::LogFormat::Json,
            }),
        }
    }
}

/// Bounds on what one client can make the sidecar hold or wait for.
#[derive(Args, Debug, Clone)]
pub struct Limits {
    /// Bytes of each request body kept so a failed attempt can be resent to another endpoint;
    /// a request that already sent more is not retried.
    #[arg(long, default_value_t = strait_sidecar::ProxyLimits::default().replay_buffer)]
    pub retry_buffer_bytes: usize,
    /// The largest request head (request line and headers; an HTTP/2 header list); larger
    /// heads get 431 (HTTP/1.1) or a stream reset (HTTP/2).
    #[arg(long, default_value_t = strait_sidecar::ProxyLimits::default().max_header_bytes)]
    pub max_header_bytes: usize,
    /// Concurrent streams a client may open on one HTTP/2 connection.
    #[arg(long, default_value_t = strait_sidecar::ProxyLimits::default().max_concurrent_streams)]
    pub max_concurrent_streams: u32,
    /// How long a client may take to send a request head before the connection is closed.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub header_read_timeout: std::time::Duration,
    /// Opaque TCP (and upgraded, e.g. WebSocket) connections idle this long are closed.
    #[arg(long, value_parser = parse_duration, default_value = "1h")]
    pub tcp_idle_timeout: std::time::Duration,
}

impl From<Limits> for strait_sidecar::ProxyLimits {
    fn from(l: Limits) -> Self {
        strait_sidecar::ProxyLimits {
            replay_buffer: l.retry_buffer_bytes,
            max_header_bytes: l.max_header_bytes,
            max_concurrent_streams: l.max_concurrent_streams,
            header_read_timeout: l.header_read_timeout,
            tcp_idle_timeout: l.tcp_idle_timeout,
        }
    }
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum OutboundTraffic {
    AllowAny,
    RegistryOnly,
}

#[derive(Args, Debug)]
pub struct GatewayArgs {
    #[command(flatten)]
    pub at: Where,
    /// UDP address of the QUIC listener.
    #[arg(long)]
    pub listen: SocketAddr,
    #[arg(long)]
    pub admin: SocketAddr,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    #[command(flatten)]
    pub identity: Identity,
}

#[derive(Args, Debug)]
pub struct FederationArgs {
    /// The controller's configuration file (YAML).
    #[arg(long)]
    pub config: PathBuf,
}

fn join_token() -> anyhow::Result<String> {
    std::env::var(JOIN_TOKEN_ENV)
        .map_err(|_| anyhow::anyhow!("set {JOIN_TOKEN_ENV} to the join token this workload was given"))
}

pub async fn sidecar(a: SidecarArgs) -> anyhow::Result<()> {
    strait_sidecar::run(strait_sidecar::SidecarOptions {
        workload: a.workload,
        service: a.service,
        namespace: a.namespace,
        locality: a.at.locality(),
        outbound: a.outbound,
        inbound: a.inbound,
        admin: a.admin,
        app: a.app,
        unknown_destinations: match a.outbound_traffic {
            OutboundTraffic::AllowAny => strait_sidecar::outbound::UnknownDestinations::PassThrough,
            OutboundTraffic::RegistryOnly => strait_sidecar::outbound::UnknownDestinations::Refuse,
        },
        dns: match a.dns {
            Some(addr) => Some((addr, strait_sidecar::dns::ResolvConf::read(&a.resolv_conf)?)),
            None => None,
        },
        drain_timeout: a.identity.drain_timeout,
        limits: a.limits.into(),
        telemetry: a.telemetry.into(),
        scope_namespaces: a.scope_namespaces,
        scope_authorized: a.scope_authorized,
        controller: a.identity.link()?,
    })
    .await
}

pub async fn gateway(a: GatewayArgs) -> anyhow::Result<()> {
    strait_gateway::run(strait_gateway::GatewayRunOptions {
        name: format!("gateway-{}", a.at.cluster),
        locality: a.at.locality(),
        listen: a.listen,
        admin: a.admin,
        drain_timeout: a.identity.drain_timeout,
        telemetry: a.telemetry.into(),
        controller: a.identity.link()?,
    })
    .await
}

pub async fn federation(a: FederationArgs) -> anyhow::Result<()> {
    let config = strait_federation::ControllerConfig::load(&a.config)?;
    strait_federation::run(config).await
}
