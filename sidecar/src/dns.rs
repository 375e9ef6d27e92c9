//! The sidecar's DNS proxy. iptables sends the pod's DNS queries (UDP and TCP port 53) here.
//! Names under `clusterset.local` are answered from the mesh config as the Kubernetes
//! multi-cluster DNS specification asks: A/AAAA of `<svc>.<ns>.svc.clusterset.local` with the
//! ClusterSet IP (every endpoint address for a headless service), SRV
//! `_<port>._<proto>.<svc>.<ns>.svc.clusterset.local` for named ports,
//! `<hostname>.<cluster>.<svc>.<ns>.svc.clusterset.local` for each endpoint of a headless
//! service, NXDOMAIN (with the zone's SOA) for what is not exported. A mesh name with one of the
//! pod's search domains appended gets NXDOMAIN at once, so the resolver moves on to the next
//! candidate. Every other name goes to the pod's own nameservers through hickory-resolver.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use prometheus::{IntCounterVec, Opts, Registry};
use strait_api::snapshot::{ServiceEntry, Snapshot};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;

/// The zone the proxy answers for.
pub const ZONE: &str = "clusterset.local";
/// TTL of mesh answers and of negative answers (the SOA minimum): short, so clients follow
/// exports as they change.
pub const TTL: u32 = 5;
/// What the proxy answers over UDP without EDNS (RFC 1035).
const UDP_PLAIN_MAX: usize = 512;
/// What it offers with EDNS (the DNS flag day 2020 size).
const EDNS_MAX: u16 = 1232;

/// The pod's resolver settings: nameservers and search domains, as in resolv.conf.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResolvConf {
    pub nameservers: Vec<SocketAddr>,
    pub search: Vec<String>,
}

impl ResolvConf {
    pub fn parse(text: &str) -> Self {
        let mut conf = ResolvConf::default();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => {
                    if let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok()) {
                        conf.nameservers.push(SocketAddr::new(ip, 53));
                    }
                }
                Some("search") | Some("domain") => {
                    conf.search = words.map(|w| w.trim_end_matches('.').to_ascii_lowercase()).collect();
                }
                _ => {}
            }
        }
        conf
    }

    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {} for the DNS upstreams: {e}", path.display()))?;
        Ok(Self::parse(&text))
    }
}

/// Counters by where the answer came from (`mesh`, `search_miss`, `upstream`) and its code.
#[derive(Clone, Debug)]
pub struct DnsMetrics {
    pub queries: IntCounterVec,
}

impl DnsMetrics {
    pub fn new(registry: &Registry) -> Self {
        let queries = IntCounterVec::new(
            Opts::new(
                "strait_dns_queries_total",
                "DNS queries answered by the sidecar, by source (mesh, search_miss, upstream) and response code",
            ),
            &["source", "rcode"],
        )
        .expect("valid metric");
        let _ = registry.register(Box::new(queries.clone()));
        DnsMetrics { queries }
    }
}

pub struct DnsProxy {
    config: watch::Receiver<Arc<Snapshot>>,
    upstream: Option<TokioResolver>,
    search: Vec<String>,
    metrics: DnsMetrics,
}

fn name(s: &str) -> Name {
    Name::from_ascii(format!("{}.", s.trim_end_matches('.'))).unwrap_or_else(|_| Name::root())
}

fn soa() -> Record {
    let rdata = SOA::new(
        name(&format!("ns.dns.{ZONE}")),
        name(&format!("hostmaster.{ZONE}")),
        1,
        7200,
        1800,
        86400,
        TTL,
    );
    Record::from_rdata(name(ZONE), TTL, RData::SOA(rdata))
}

fn address(owner: &str, ip: IpAddr) -> Record {
    let rdata = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(name(owner), TTL, rdata)
}

fn record_type_of(ip: IpAddr) -> RecordType {
    if ip.is_ipv4() {
        RecordType::A
    } else {
        RecordType::AAAA
    }
}

/// A mesh answer: the response code and the answer records (empty with NOERROR is NODATA).
#[derive(Debug, PartialEq)]
pub struct MeshAnswer {
    pub code: ResponseCode,
    pub answers: Vec<Record>,
}

fn is_headless(svc: &ServiceEntry) -> bool {
    svc.clusterset_ip.is_none()
}

/// The DNS label of an endpoint in per-host names: its workload name.
fn hostname(workload: &str) -> String {
    workload.to_ascii_lowercase()
}

/// Answers a query for a name under `clusterset.local` (`qname` lowercase, no trailing dot)
/// from the mesh config; `None` when the name is outside the zone.
pub fn mesh_answer(snap: &Snapshot, qname: &str, qtype: RecordType) -> Option<MeshAnswer> {
    let rest = qname.strip_suffix(ZONE)?;
    if !(rest.is_empty() || rest.ends_with('.')) {
        return None;
    }
    let labels: Vec<&str> = rest
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
        .collect();
    let nx = MeshAnswer {
        code: ResponseCode::NXDomain,
        answers: vec![],
    };
    let nodata = MeshAnswer {
        code: ResponseCode::NoError,
        answers: vec![],
    };
    // Labels from the left: [extra..., svc, ns, "svc"].
    let n = labels.len();
    if n < 3 || labels[n - 1] != "svc" {
        // The zone apex and `svc.clusterset.local`, `<ns>.svc.clusterset.local` exist as empty
        // non-terminals; nothing else above the services does.
        return Some(if n == 0 || (n <= 2 && labels[n - 1] == "svc") {
            nodata
        } else {
            nx
        });
    }
    let (svc_name, ns) = (labels[n - 3], labels[n - 2]);
    let Some(svc) = snap.services.get(&format!("{ns}/{svc_name}")) else {
        return Some(nx);
    };
    let host = svc.host();
    // Each ready endpoint with its workload name.
    let ready = || {
        svc.endpoints
            .iter()
            .enumerate()
            .filter(|(_, e)| e.ready)
            .map(|(i, e)| (svc.workload(i), e))
    };
    match &labels[..n - 3] {
        [] => {
            let ips: Vec<IpAddr> = match svc.clusterset_ip {
                Some(ip) => vec![ip],
                None => {
                    let mut ips: Vec<IpAddr> = ready().map(|(_, e)| e.address.ip()).collect();
                    ips.sort();
                    ips.dedup();
                    ips
                }
            };
            let answers = ips
                .into_iter()
                .filter(|ip| record_type_of(*ip) == qtype || qtype == RecordType::ANY)
                .map(|ip| address(&host, ip))
                .collect();
            Some(MeshAnswer {
                code: ResponseCode::NoError,
                answers,
            })
        }
        [port, proto] if port.starts_with('_') && proto.starts_with('_') => {
            let (port, proto) = (&port[1..], &proto[1..]);
            let Some(p) = svc.ports.iter().find(|p| p.name == port) else {
                return Some(nx);
            };
            if proto != "tcp" {
                return Some(nx);
            }
            if qtype != RecordType::SRV && qtype != RecordType::ANY {
                return Some(nodata);
            }
            let targets: Vec<String> = if is_headless(svc) {
                ready()
                    .map(|(w, e)| format!("{}.{}.{host}", hostname(w), e.locality().cluster))
                    .collect()
            } else {
                vec![host.clone()]
            };
            let owner = format!("_{port}._{proto}.{host}");
            let answers = targets
                .iter()
                .map(|t| {
                    let weight = (100 / targets.len().max(1)) as u16;
                    Record::from_rdata(name(&owner), TTL, RData::SRV(SRV::new(0, weight, p.port, name(t))))
                })
                .collect();
            Some(MeshAnswer {
                code: ResponseCode::NoError,
                answers,
            })
        }
        [host_label, cluster] if is_headless(svc) => {
            let matches: Vec<IpAddr> = ready()
                .filter(|(w, e)| hostname(w) == *host_label && e.locality().cluster == *cluster)
                .map(|(_, e)| e.address.ip())
                .collect();
            if matches.is_empty() {
                return Some(nx);
            }
            let owner = format!("{host_label}.{cluster}.{host}");
            let answers = matches
                .into_iter()
                .filter(|ip| record_type_of(*ip) == qtype || qtype == RecordType::ANY)
                .map(|ip| address(&owner, ip))
                .collect();
            Some(MeshAnswer {
                code: ResponseCode::NoError,
                answers,
            })
        }
        [cluster] if is_headless(svc) && svc.endpoints.iter().any(|e| e.locality().cluster == *cluster) => Some(nodata),
        _ => Some(nx),
    }
}

/// Whether `qname` is a mesh name with one of the pod's search domains appended
/// (`echo.demo.svc.clusterset.local.demo.svc.cluster.local`): no such name exists.
fn search_expansion(qname: &str, search: &[String]) -> bool {
    search.iter().any(|domain| {
        qname
            .strip_suffix(domain.as_str())
            .and_then(|r| r.strip_suffix('.'))
            .is_some_and(|r| r.ends_with(&format!(".{ZONE}")) || r == ZONE)
    })
}

impl DnsProxy {
    /// `upstreams` empty: other names are answered SERVFAIL.
    pub fn new(
        config: watch::Receiver<Arc<Snapshot>>,
        resolv: &ResolvConf,
        exclude: &[SocketAddr],
        metrics: DnsMetrics,
    ) -> Self {
        let servers: Vec<NameServerConfig> = resolv
            .nameservers
            .iter()
            .filter(|ns| !exclude.contains(ns))
            .map(|ns| {
                let mut c = NameServerConfig::udp_and_tcp(ns.ip());
                for conn in &mut c.connections {
                    conn.port = ns.port();
                }
                c
            })
            .collect();
        let upstream = (!servers.is_empty()).then(|| {
            let mut opts = ResolverOpts::default();
            opts.timeout = Duration::from_secs(2);
            opts.attempts = 2;
            opts.ndots = 0;
            let mut builder = TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, vec![], servers),
                TokioRuntimeProvider::default(),
            );
            *builder.options_mut() = opts;
            builder.build()
        });
        DnsProxy {
            config,
            upstream: upstream.and_then(|r| r.ok()),
            search: resolv.search.clone(),
            metrics,
        }
    }

    fn count(&self, source: &str, code: ResponseCode) {
        self.metrics
            .queries
            .with_label_values(&[source, &code.to_string()])
            .inc();
    }

    /// Answers one query message; `None` for what is not a query at all (dropped). `udp` is
    /// set for a datagram: the answer then fits the client's EDNS payload size (512 bytes
    /// without EDNS), truncated with TC set when it does not, so the client asks over TCP.
    pub async fn answer(&self, query: &[u8], udp: bool) -> Option<Vec<u8>> {
        let request = Message::from_vec(query).ok()?;
        if request.metadata.message_type != MessageType::Query {
            return None;
        }
        let resp = self.respond(&request).await;
        let bytes = resp.to_vec().ok()?;
        let limit = request
            .edns
            .as_ref()
            .map_or(UDP_PLAIN_MAX, |e| e.max_payload().clamp(512, EDNS_MAX) as usize);
        if !udp || bytes.len() <= limit {
            return Some(bytes);
        }
        let mut truncated = resp.truncate();
        let bytes = truncated.to_vec().ok()?;
        if bytes.len() <= limit {
            return Some(bytes);
        }
        // Even the questions alone do not fit (several long names): the header and TC alone.
        truncated.queries.clear();
        truncated.to_vec().ok()
    }

    async fn respond(&self, request: &Message) -> Message {
        let mut resp = Message::response(request.metadata.id, request.metadata.op_code);
        resp.metadata.recursion_desired = request.metadata.recursion_desired;
        resp.metadata.recursion_available = true;
        resp.queries = request.queries.clone();
        if request.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(EDNS_MAX);
            resp.set_edns(edns);
        }
        let q = match (request.metadata.op_code, request.queries.as_slice()) {
            (OpCode::Query, [q]) if q.query_class == DNSClass::IN => q,
            _ => {
                resp.metadata.response_code = ResponseCode::NotImp;
                self.count("mesh", ResponseCode::NotImp);
                return resp;
            }
        };
        let qname = q.name.to_ascii().trim_end_matches('.').to_ascii_lowercase();
        let snap = self.config.borrow().clone();
        if let Some(mesh) = mesh_answer(&snap, &qname, q.query_type) {
            resp.metadata.authoritative = true;
            resp.metadata.response_code = mesh.code;
            if mesh.answers.is_empty() {
                resp.add_authority(soa());
            }
            resp.add_answers(mesh.answers);
            self.count("mesh", mesh.code);
        } else if search_expansion(&qname, &self.search) {
            resp.metadata.authoritative = true;
            resp.metadata.response_code = ResponseCode::NXDomain;
            resp.add_authority(soa());
            self.count("search_miss", ResponseCode::NXDomain);
        } else {
            self.forward(&mut resp, &q.name, q.query_type).await;
        }
        resp
    }

    async fn forward(&self, resp: &mut Message, qname: &Name, qtype: RecordType) {
        let Some(resolver) = &self.upstream else {
            resp.metadata.response_code = ResponseCode::ServFail;
            self.count("upstream", ResponseCode::ServFail);
            return;
        };
        let mut fqdn = qname.clone();
        fqdn.set_fqdn(true);
        match resolver.lookup(fqdn, qtype).await {
            Ok(lookup) => {
                resp.add_answers(lookup.answers().iter().cloned());
                resp.metadata.response_code = ResponseCode::NoError;
            }
            Err(e) if e.is_no_records_found() => {
                resp.metadata.response_code = if e.is_nx_domain() {
                    ResponseCode::NXDomain
                } else {
                    ResponseCode::NoError
                };
                if let Some(soa) = e.into_soa() {
                    resp.add_authority(soa.into_record_of_rdata());
                }
            }
            Err(e) => {
                tracing::debug!(name = %qname, error = %e, "upstream DNS lookup failed");
                resp.metadata.response_code = ResponseCode::ServFail;
            }
        }
        self.count("upstream", resp.metadata.response_code);
    }

    pub async fn serve_udp(self: Arc<Self>, socket: UdpSocket) {
        let socket = Arc::new(socket);
        let mut buf = vec![0u8; 4096];
        loop {
            let (n, from) = match socket.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "DNS receive failed");
                    continue;
                }
            };
            let query = buf[..n].to_vec();
            let this = self.clone();
            let socket = socket.clone();
            tokio::spawn(async move {
                if let Some(reply) = this.answer(&query, true).await {
                    let _ = socket.send_to(&reply, from).await;
                }
            });
        }
    }

    /// DNS over TCP: two-byte length prefixes, several queries per connection.
    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let this = self.clone();
            tokio::spawn(async move {
                loop {
                    let read = async {
                        let len = stream.read_u16().await? as usize;
                        let mut query = vec![0u8; len];
                        stream.read_exact(&mut query).await?;
                        Ok::<_, std::io::Error>(query)
                    };
                    let Ok(Ok(query)) = tokio::time::timeout(Duration::from_secs(10), read).await else {
                        return;
                    };
                    let Some(reply) = this.answer(&query, false).await else {
                        return;
                    };
                    let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                    framed.extend_from_slice(&reply);
                    if stream.write_all(&framed).await.is_err() {
                        return;
                    }
                }
            });
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use strait_api::locality::Locality;
    use strait_api::snapshot::{EndpointEntry, EndpointProfile, PortEntry, Protocol, Workloads};

    fn svc(name: &str, ip: Option<&str>, eps: &[(&str, &str, &str)]) -> Arc<ServiceEntry> {
        Arc::new(ServiceEntry {
            name: name.into(),
            namespace: "demo".into(),
            clusterset_ip: ip.map(|i| i.parse().unwrap()),
            ports: vec![PortEntry {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Http,
            }],
            endpoints: eps
                .iter()
                .map(|(_, cluster, addr)| EndpointEntry {
                    address: addr.parse().unwrap(),
                    ready: true,
                    profile: Arc::new(EndpointProfile {
                        locality: Arc::new(Locality {
                            cluster: cluster.to_string(),
                            ..Default::default()
                        }),
                        identity: Arc::new("spiffe://mesh.local/ns/demo/sa/x".parse().unwrap()),
                        labels: Default::default(),
                    }),
                })
                .collect(),
            workloads: Workloads::new(eps.iter().map(|(w, _, _)| *w)),
            identities: vec![],
            declared: vec![],
            spans: vec![],
        })
    }

    /// Two services of `demo`: `echo` (a ClusterSet IP, one endpoint in east) and `db` (none,
    /// one endpoint in east and one in west).
    pub(crate) fn snapshot() -> Snapshot {
        let mut snap = Snapshot::default();
        for s in [
            svc("echo", Some("240.0.0.7"), &[("echo-a", "east", "198.18.1.10:8080")]),
            svc(
                "db",
                None,
                &[
                    ("db-0", "east", "198.18.1.11:8080"),
                    ("db-1", "west", "198.18.2.11:8080"),
                ],
            ),
        ] {
            snap.services.insert(format!("demo/{}", s.name), s);
        }
        snap
    }

    fn ips(a: &MeshAnswer) -> Vec<String> {
        a.answers
            .iter()
            .map(|r| match &r.data {
                RData::A(a) => a.0.to_string(),
                RData::SRV(s) => format!("{} {}", s.port, s.target),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn answers_clusterset_names_from_the_mesh() {
        let snap = snapshot();
        let a = mesh_answer(&snap, "echo.demo.svc.clusterset.local", RecordType::A).unwrap();
        assert_eq!(
            (a.code, ips(&a)),
            (ResponseCode::NoError, vec!["240.0.0.7".to_string()])
        );
        assert_eq!(a.answers[0].ttl, TTL);
        let aaaa = mesh_answer(&snap, "echo.demo.svc.clusterset.local", RecordType::AAAA).unwrap();
        assert_eq!((aaaa.code, aaaa.answers.len()), (ResponseCode::NoError, 0));
        let srv = mesh_answer(&snap, "_http._tcp.echo.demo.svc.clusterset.local", RecordType::SRV).unwrap();
        assert_eq!(ips(&srv), vec!["80 echo.demo.svc.clusterset.local.".to_string()]);
        for missing in [
            "nope.demo.svc.clusterset.local",
            "_grpc._tcp.echo.demo.svc.clusterset.local",
            "_http._udp.echo.demo.svc.clusterset.local",
            "x.echo.demo.svc.clusterset.local",
            "other.clusterset.local",
        ] {
            assert_eq!(
                mesh_answer(&snap, missing, RecordType::A).unwrap().code,
                ResponseCode::NXDomain,
                "{missing}"
            );
        }
        assert_eq!(
            mesh_answer(&snap, "svc.clusterset.local", RecordType::A).unwrap().code,
            ResponseCode::NoError
        );
        assert!(mesh_answer(&snap, "echo.demo.svc.cluster.local", RecordType::A).is_none());
        assert!(mesh_answer(&snap, "notclusterset.local", RecordType::A).is_none());
    }

    #[test]
    fn headless_services_answer_every_endpoint_and_per_host_names() {
        let snap = snapshot();
        let a = mesh_answer(&snap, "db.demo.svc.clusterset.local", RecordType::A).unwrap();
        assert_eq!(ips(&a), vec!["198.18.1.11".to_string(), "198.18.2.11".to_string()]);
        let host = mesh_answer(&snap, "db-1.west.db.demo.svc.clusterset.local", RecordType::A).unwrap();
        assert_eq!(ips(&host), vec!["198.18.2.11".to_string()]);
        let wrong_cluster = mesh_answer(&snap, "db-1.east.db.demo.svc.clusterset.local", RecordType::A).unwrap();
        assert_eq!(wrong_cluster.code, ResponseCode::NXDomain);
        let srv = mesh_answer(&snap, "_http._tcp.db.demo.svc.clusterset.local", RecordType::SRV).unwrap();
        assert_eq!(
            ips(&srv),
            vec![
                "80 db-0.east.db.demo.svc.clusterset.local.".to_string(),
                "80 db-1.west.db.demo.svc.clusterset.local.".to_string()
            ]
        );
    }

    #[test]
    fn search_path_expansions_of_mesh_names_do_not_exist() {
        let search = vec!["demo.svc.cluster.local".to_string(), "cluster.local".to_string()];
        assert!(search_expansion(
            "echo.demo.svc.clusterset.local.demo.svc.cluster.local",
            &search
        ));
        assert!(search_expansion(
            "echo.demo.svc.clusterset.local.cluster.local",
            &search
        ));
        assert!(!search_expansion("echo.demo.svc.cluster.local", &search));
        assert!(!search_expansion("example.com.cluster.local", &search));
    }

    /// A query the fuzzer found (unknown opcode, four questions of long names): over UDP even
    /// its questions do not fit 512 bytes, so the answer is the header with TC set.
    #[tokio::test]
    async fn a_udp_answer_fits_even_when_the_questions_do_not() {
        let (_tx, rx) = watch::channel(Arc::new(snapshot()));
        let proxy = DnsProxy::new(
            rx,
            &ResolvConf::parse("search demo.svc.cluster.local svc.cluster.local\n"),
            &[],
            DnsMetrics::new(&Registry::new()),
        );
        let query = include_bytes!("../../fuzz/corpus/dns_query/unknown-opcode-long-names");
        assert!(proxy.answer(query, false).await.unwrap().len() > 512, "the full answer");
        let udp = Message::from_vec(&proxy.answer(query, true).await.unwrap()).unwrap();
        assert!(udp.metadata.truncation && udp.queries.is_empty(), "{udp:?}");
        assert_eq!(udp.metadata.response_code, ResponseCode::NotImp);
    }

    #[test]
    fn parses_resolv_conf() {
        let conf = ResolvConf::parse(
            "# x\nnameserver 10.96.0.10\nsearch demo.svc.cluster.local svc.cluster.local\noptions ndots:5\n",
        );
        assert_eq!(conf.nameservers, vec!["10.96.0.10:53".parse().unwrap()]);
        assert_eq!(conf.search, vec!["demo.svc.cluster.local", "svc.cluster.local"]);
    }
}
