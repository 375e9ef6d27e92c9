//! rustls configurations for every Strait connection: TLS 1.3 only, a certificate resolved from
//! the rotating [`CertStore`] at each handshake, and peers verified by SPIFFE ID.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert, StoresServerSessions};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};

use arc_swap::ArcSwap;

use crate::{CertStore, PeerPolicy, SpiffeId, SpiffeVerifier, TlsMetrics, TrustBundle, TrustError, WorkloadCert};

/// ALPN of the east-west QUIC tunnel.
pub const ALPN_TUNNEL: &[u8] = b"strait/1";
/// ALPN of sidecar-to-sidecar HTTP/2 inside mTLS (gRPC and any HTTP/2 an app speaks).
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN of sidecar-to-sidecar HTTP/1.1 inside mTLS (an app's HTTP/1 requests, one at a time
/// per pooled connection, as HAProxy and Envoy carry them).
pub const ALPN_H1: &[u8] = b"http/1.1";
/// ALPN of sidecar-to-sidecar opaque TCP inside mTLS.
pub const ALPN_TCP: &[u8] = b"strait-tcp/1";

/// Whether a server demands a client certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerAuth {
    RequireClientCert,
    /// Only for the CA endpoint, where workloads come before their first certificate.
    OptionalClientCert,
}

#[derive(Debug)]
struct StoreResolver(CertStore);

impl ResolvesServerCert for StoreResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().key.clone())
    }
}

impl ResolvesClientCert for StoreResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A server config presenting the store's identity and verifying clients by SPIFFE ID.
pub fn server_config(
    store: &CertStore,
    policy: PeerPolicy,
    auth: ServerAuth,
    alpn: &[&[u8]],
) -> Result<ServerConfig, TrustError> {
    let mut verifier = SpiffeVerifier::new(store.bundle().clone(), policy, store.metrics().clone());
    if auth == ServerAuth::OptionalClientCert {
        verifier = verifier.allow_anonymous_clients();
    }
    let mut config = ServerConfig::builder_with_provider(crate::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(StoreResolver(store.clone())));
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.session_storage = Arc::new(ResumableSessions::new(store.bundle().clone(), store.metrics().clone()));
    // One ticket per handshake: a resumed connection takes one and gets one, so a client keeps
    // one per connection it may open at once and the store holds no more than clients hold (with
    // rustls' default of two, every connection left one ticket behind: a server under connection
    // churn filled all RESUMABLE_SESSIONS, ~6 MB of RSS).
    config.send_tls13_tickets = 1;
    Ok(config)
}

/// How long a TLS 1.3 session may be resumed after the full handshake that verified its peer.
pub const RESUMPTION_MAX_AGE: Duration = Duration::from_secs(300);
/// Sessions one server keeps for resumption; the oldest go first.
const RESUMABLE_SESSIONS: usize = 4096;

/// The server side of TLS 1.3 resumption (stateful tickets: the ticket is only a key into this
/// store, nothing secret leaves the process). A resumed session skips certificate
/// verification, so it is honoured only while what verified the peer still holds: for
/// [`RESUMPTION_MAX_AGE`] after the full handshake, and only while the trust bundle is the one
/// it was verified against (a trust domain removed from the bundle ends every session of it at
/// once). The peer's certificates are kept with the session, so authorization on a resumed
/// connection sees the same identity the full handshake proved. Each ticket resumes once.
#[derive(Debug)]
struct ResumableSessions {
    bundle: Arc<ArcSwap<TrustBundle>>,
    sessions: Mutex<HashMap<Vec<u8>, Session>>,
    metrics: TlsMetrics,
}

#[derive(Debug)]
struct Session {
    at: Instant,
    bundle: Arc<TrustBundle>,
    value: Vec<u8>,
}

impl ResumableSessions {
    fn new(bundle: Arc<ArcSwap<TrustBundle>>, metrics: TlsMetrics) -> Self {
        ResumableSessions {
            bundle,
            sessions: Mutex::default(),
            metrics,
        }
    }

    fn valid(&self, s: &Session, now: Instant) -> bool {
        now.duration_since(s.at) < RESUMPTION_MAX_AGE && Arc::ptr_eq(&s.bundle, &self.bundle.load())
    }
}

impl Drop for ResumableSessions {
    fn drop(&mut self) {
        let held = self.sessions.get_mut().map(|s| s.len()).unwrap_or(0);
        self.metrics.resumable_sessions_changed(-(held as i64));
    }
}

impl StoresServerSessions for ResumableSessions {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        let Ok(mut sessions) = self.sessions.lock() else {
            return false;
        };
        let now = Instant::now();
        let before = sessions.len();
        if sessions.len() >= RESUMABLE_SESSIONS {
            sessions.retain(|_, s| self.valid(s, now));
        }
        if sessions.len() >= RESUMABLE_SESSIONS {
            if let Some(oldest) = sessions.iter().min_by_key(|(_, s)| s.at).map(|(k, _)| k.clone()) {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(
            key,
            Session {
                at: now,
                bundle: self.bundle.load_full(),
                value,
            },
        );
        self.metrics
            .resumable_sessions_changed(sessions.len() as i64 - before as i64);
        true
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        let sessions = self.sessions.lock().ok()?;
        sessions
            .get(key)
            .filter(|s| self.valid(s, Instant::now()))
            .map(|s| s.value.clone())
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        let session = self.sessions.lock().ok()?.remove(key)?;
        self.metrics.resumable_sessions_changed(-1);
        self.valid(&session, Instant::now()).then_some(session.value)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

/// Client configs kept per peer endpoint, so that a new connection to an endpoint resumes the
/// TLS 1.3 session of an earlier one (no certificates sent or verified, no signatures: the
/// setup of a new connection costs less) where the server still honours it. A config is built
/// for one endpoint, one set of identities it may prove and one list of ALPNs, so a session is only
/// ever resumed with the endpoint whose identity verified it. All are dropped when this
/// workload's certificate rotates or the trust bundle changes: no session outlives the
/// credentials it was made with.
pub struct ClientConfigs {
    store: CertStore,
    state: Mutex<ConfigsState>,
}

#[derive(Default)]
struct ConfigsState {
    cert: Option<Arc<WorkloadCert>>,
    bundle: Option<Arc<TrustBundle>>,
    configs: HashMap<ConfigKey, Arc<ClientConfig>>,
}

/// An endpoint, the identities it may prove and the ALPNs offered to it.
type ConfigKey = (String, Vec<SpiffeId>, Vec<Vec<u8>>);

/// Endpoints whose configs are kept before all are dropped and rebuilt on demand.
const KEPT_CONFIGS: usize = 4096;

impl ClientConfigs {
    pub fn new(store: CertStore) -> Self {
        ClientConfigs {
            store,
            state: Mutex::default(),
        }
    }

    pub fn metrics(&self) -> &TlsMetrics {
        self.store.metrics()
    }

    /// The config for connecting to `endpoint`, which must prove one of `expected`, offering
    /// the protocols `alpn` (most preferred first; the server chooses). Offering only
    /// [`crate::ALPN_TCP`] (an opaque stream), a resumed session may carry the client's first
    /// bytes as TLS 1.3 early data: a session resumes once (the server's store takes its
    /// ticket), so they cannot be replayed to the same server, and another server cannot read
    /// them; the server acts on them before the handshake ends.
    pub fn get(&self, endpoint: &str, expected: &[SpiffeId], alpn: &[&[u8]]) -> Result<Arc<ClientConfig>, TrustError> {
        let build = || {
            let mut config = client_config(
                Some(&self.store),
                self.store.bundle(),
                self.store.metrics(),
                PeerPolicy::OneOf(expected.to_vec()),
                alpn,
            )?;
            config.enable_early_data = alpn == [crate::ALPN_TCP];
            Ok(Arc::new(config))
        };
        let Ok(mut state) = self.state.lock() else {
            return build();
        };
        let cert = self.store.current();
        let bundle = self.store.bundle().load_full();
        if !same(&state.cert, &cert) || !same(&state.bundle, &bundle) || state.configs.len() >= KEPT_CONFIGS {
            state.configs.clear();
            state.cert = Some(cert);
            state.bundle = Some(bundle);
        }
        let key = (
            endpoint.to_string(),
            expected.to_vec(),
            alpn.iter().map(|p| p.to_vec()).collect(),
        );
        if let Some(config) = state.configs.get(&key) {
            return Ok(config.clone());
        }
        let config = build()?;
        state.configs.insert(key, config.clone());
        Ok(config)
    }
}

/// Whether `kept` is the very `now` (not an equal copy).
fn same<T>(kept: &Option<Arc<T>>, now: &Arc<T>) -> bool {
    kept.as_ref().is_some_and(|k| Arc::ptr_eq(k, now))
}

/// A client config presenting the store's identity (when `store` is given) and accepting only
/// servers the policy allows.
pub fn client_config(
    store: Option<&CertStore>,
    bundle: &Arc<ArcSwap<TrustBundle>>,
    metrics: &TlsMetrics,
    policy: PeerPolicy,
    alpn: &[&[u8]],
) -> Result<ClientConfig, TrustError> {
    let verifier = SpiffeVerifier::new(bundle.clone(), policy, metrics.clone());
    let builder = ClientConfig::builder_with_provider(crate::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match store {
        Some(store) => builder.with_client_cert_resolver(Arc::new(StoreResolver(store.clone()))),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}
