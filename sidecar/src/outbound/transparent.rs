//! Intercepted connections: iptables redirected the app's connection to the outbound port, so the
//! destination the app dialled is read back with `SO_ORIGINAL_DST`. A ClusterSet IP and port
//! names a service (a workload address names one endpoint); the first bytes tell the protocol:
//! HTTP/1.1 and HTTP/2 with prior knowledge (gRPC) are proxied per request, TLS and anything else
//! as opaque TCP. Destinations the mesh does not know pass through unchanged, or are refused
//! when the sidecar runs with `--outbound-traffic registry-only`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use strait_api::drain::Watch;
use strait_api::snapshot::{Protocol, ServiceEntry, Snapshot};
use tokio::net::TcpStream;

use super::tcp::NoEndpoint;
use super::Outbound;

/// What an intercepted connection's destination names.
#[derive(Debug)]
pub(crate) enum Destination {
    /// A service by its ClusterSet IP and one of its ports.
    Service(Arc<ServiceEntry>, u16),
    /// One endpoint of a service by its own address (headless services, pod addresses).
    Endpoint(Arc<ServiceEntry>, usize, u16),
    /// Nothing the mesh knows.
    Unknown,
}

/// What to do with connections to destinations the mesh does not know (Istio's
/// `outboundTrafficPolicy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UnknownDestinations {
    /// Connect to the original destination as the app asked (Istio's `ALLOW_ANY`).
    #[default]
    PassThrough,
    /// Close the connection (Istio's `REGISTRY_ONLY`).
    Refuse,
}

/// The protocol an app speaks, told from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sniffed {
    Http1,
    H2,
    Tls,
    Opaque,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Request methods that mark HTTP/1.1 (RFC 9110, PATCH, and WebDAV's), like Envoy's HTTP
/// inspector: a first word outside this list is not taken for HTTP.
const METHODS: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
    b"PROPFIND ",
    b"PROPPATCH ",
    b"MKCOL ",
    b"COPY ",
    b"MOVE ",
    b"LOCK ",
    b"UNLOCK ",
    b"REPORT ",
    b"SEARCH ",
];

/// Decides the protocol from a connection's first bytes, or `None` while they could still be
/// the start of more than one answer.
pub fn sniff(first: &[u8]) -> Option<Sniffed> {
    if first.is_empty() {
        return None;
    }
    if first.len() >= H2_PREFACE.len() && first.starts_with(H2_PREFACE) {
        return Some(Sniffed::H2);
    }
    // A TLS record header: handshake (22), major version 3.
    if first[0] == 0x16 {
        return if first.len() < 2 {
            None
        } else if first[1] == 0x03 {
            Some(Sniffed::Tls)
        } else {
            Some(Sniffed::Opaque)
        };
    }
    if METHODS.iter().any(|m| first.starts_with(m)) {
        return Some(Sniffed::Http1);
    }
    let could_be = |full: &[u8]| first.len() < full.len() && full.starts_with(first);
    if could_be(H2_PREFACE) || METHODS.iter().any(|m| could_be(m)) {
        return None;
    }
    Some(Sniffed::Opaque)
}

/// The destination a redirected connection was addressed to, if iptables redirected it.
pub fn original_destination(stream: &TcpStream) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let dst = sock.original_dst_v4().ok()?.as_socket()?;
    let local = stream.local_addr().ok()?;
    (dst != local).then_some(dst)
}

pub(crate) fn destination(snap: &Snapshot, dst: SocketAddr) -> Destination {
    if let Some(svc) = snap.service_by_ip(dst.ip()) {
        if svc.port(dst.port()).is_some() {
            return Destination::Service(svc.clone(), dst.port());
        }
        return Destination::Unknown;
    }
    match snap.endpoint_by_addr(dst) {
        Some((svc, i)) => {
            let port = svc.ports.first().map(|p| p.port).unwrap_or(dst.port());
            Destination::Endpoint(svc.clone(), i, port)
        }
        None => Destination::Unknown,
    }
}

impl Outbound {
    /// Handles one intercepted connection to `dst`.
    pub(super) async fn transparent(self: Arc<Self>, stream: TcpStream, dst: SocketAddr, drain: Watch) {
        let snap = self.config.borrow().clone();
        match destination(&snap, dst) {
            Destination::Unknown => self.pass_through(stream, dst).await,
            Destination::Endpoint(svc, i, port) => self.opaque(stream, snap, &svc, port, Some(i)).await,
            Destination::Service(svc, port) => {
                let declared_tcp = svc.port(port).is_some_and(|p| p.protocol == Protocol::Tcp);
                let sniffed = if declared_tcp {
                    // Declared TCP: no sniffing, so server-first protocols are not delayed.
                    None
                } else {
                    detect(&stream, self.sniff_timeout).await
                };
                match sniffed {
                    // An HTTP connection holds no snapshot: each request reads the config.
                    Some(Sniffed::Http1) => {
                        drop(snap);
                        let (max, wait) = (self.limits.max_header_bytes, self.limits.header_read_timeout);
                        if let Some(stream) = super::head::admit(stream, max, wait, &self.metrics.rejected).await {
                            self.serve_http(stream, dst, svc, port, drain, true).await;
                        }
                    }
                    Some(Sniffed::H2) => {
                        drop(snap);
                        self.serve_http(stream, dst, svc, port, drain, false).await
                    }
                    // Bytes that are neither HTTP nor TLS on a port declared HTTP: answered as
                    // an HTTP/2 server answers a broken preface, as the port promised HTTP.
                    // Ports that carry other protocols are declared `tcp`.
                    Some(Sniffed::Opaque) => super::refuse_non_http(stream, &self.metrics.rejected).await,
                    // TLS, or a server-first protocol (nothing sent yet): carried as bytes.
                    Some(Sniffed::Tls) | None => self.opaque(stream, snap, &svc, port, None).await,
                }
            }
        }
    }

    /// Carries an intercepted connection as bytes. Takes the snapshot it was accepted with and
    /// drops it once an endpoint took the connection, so that a long connection does not pin
    /// an old config version (its routes, policies and every service then held) for its life,
    /// as a CONNECT tunnel does not.
    async fn opaque(
        &self,
        mut stream: TcpStream,
        snap: Arc<Snapshot>,
        svc: &ServiceEntry,
        port: u16,
        only: Option<usize>,
    ) {
        let host = svc.host();
        let mut tries = super::tcp::Tries::only(only);
        // Boxed: this future lives as long as the connection (see `dial_tcp`).
        let settled = match Box::pin(self.dial_tcp(&snap, svc, port, &mut tries)).await {
            Ok(dialled) => self.settle(&mut stream, &snap, svc, port, dialled, &mut tries).await,
            Err(e) => Err(e),
        };
        drop(snap);
        match settled {
            Ok(settled) => self.splice(stream, settled, svc, port).await,
            Err(NoEndpoint { tried, last_error }) => {
                // The app sees a reset, as from a host that refused the connection.
                tracing::info!(service = %host, tried, error = %last_error, "no endpoint took an intercepted connection");
            }
        }
    }

    /// Serves an intercepted HTTP connection to `svc`, found at `dst` when it was accepted.
    async fn serve_http(
        self: Arc<Self>,
        stream: TcpStream,
        dst: SocketAddr,
        svc: Arc<ServiceEntry>,
        port: u16,
        mut drain: Watch,
        h1: bool,
    ) {
        let this = self.clone();
        let leaving = super::Leaving::default();
        let marks = leaving.clone();
        let service = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
            let this = this.clone();
            // Each request reads the config as it is now, as on the explicit listener: a
            // keep-alive connection (a gRPC client's one HTTP/2 connection, open for hours)
            // follows route, policy and endpoint changes. The service at the address the
            // connection was made to; the one it was made to, if that address no longer
            // names a service with this port.
            let snap = this.config.borrow().clone();
            let svc = match destination(&snap, dst) {
                Destination::Service(now, _) => now,
                _ => svc.clone(),
            };
            marks.answer(false, async move {
                super::http::absolute_uri(&mut req, || svc.host());
                this.forward_to(&snap, &svc, port, req).await
            })
        });
        // hyper's auto builder tells HTTP/1.1 from the HTTP/2 preface the sniffer already saw.
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        super::auto_limits(&mut builder, &self.limits);
        let result = super::drive!(
            builder.serve_connection_with_upgrades(TokioIo::new(stream), service),
            drain,
            h1.then_some(&leaving)
        );
        if let Err(e) = result {
            tracing::debug!(error = %e, "intercepted HTTP connection ended with an error");
        }
    }

    async fn pass_through(&self, mut stream: TcpStream, dst: SocketAddr) {
        if self.unknown == UnknownDestinations::Refuse {
            self.metrics.passthrough.with_label_values(&["refused"]).inc();
            tracing::info!(destination = %dst, "refused a connection to a destination outside the mesh (registry-only)");
            return;
        }
        // The sidecar's own traffic is not intercepted, so this reaches `dst` itself.
        let upstream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(dst)).await;
        let Ok(Ok(mut upstream)) = upstream else {
            self.metrics.passthrough.with_label_values(&["connect_failed"]).inc();
            return;
        };
        let _ = upstream.set_nodelay(true);
        let result = strait_api::copy::copy_both_ways(&mut stream, &mut upstream).await;
        self.metrics
            .passthrough
            .with_label_values(&[if result.is_ok() { "ok" } else { "reset" }])
            .inc();
    }
}

/// Waits for enough of the app's first bytes to tell the protocol; `None` when the app sent
/// nothing within `timeout` (a server-first protocol, carried as opaque TCP).
pub(super) async fn detect(stream: &TcpStream, timeout: Duration) -> Option<Sniffed> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; 32];
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await;
        match peeked {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
            Ok(Ok(n)) => {
                if let Some(found) = sniff(&buf[..n]) {
                    return Some(found);
                }
                // Part of a preface or method arrived: wait briefly for the rest.
                if tokio::time::Instant::now() >= deadline {
                    return Some(Sniffed::Opaque);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_protocols_from_first_bytes() {
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n"), Some(Sniffed::Http1));
        assert_eq!(sniff(b"POST /x HTTP/1.1\r\n"), Some(Sniffed::Http1));
        assert_eq!(sniff(b"CONNECT a:7000 HTTP/1.1\r\n"), Some(Sniffed::Http1));
        assert_eq!(sniff(b"INVALID CONNECTION PREFACE"), Some(Sniffed::Opaque));
        assert_eq!(sniff(H2_PREFACE), Some(Sniffed::H2));
        assert_eq!(sniff(&[0x16, 0x03, 0x01, 0x02, 0x00]), Some(Sniffed::Tls));
        assert_eq!(sniff(b"\x00\x00\x00\x01binary"), Some(Sniffed::Opaque));
        assert_eq!(sniff(b"HELLO\r\n"), Some(Sniffed::Opaque));
        assert_eq!(sniff(b"GETX"), Some(Sniffed::Opaque));
    }

    #[test]
    fn waits_while_a_prefix_is_ambiguous() {
        assert_eq!(sniff(b""), None);
        assert_eq!(sniff(b"G"), None);
        assert_eq!(sniff(b"PO"), None);
        assert_eq!(sniff(b"PRI * HTTP/2"), None);
        assert_eq!(sniff(&[0x16]), None);
        // "PRI " is no HTTP/1 method we proxy, and the preface is not complete yet.
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r"), None);
    }
}
