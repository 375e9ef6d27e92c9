//! Real TLS handshakes over loopback sockets: the verifier accepts exactly the peers it should
//! and counts every refusal by reason.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use strait_trust::{
    client_config, server_config, Authority, CertStore, ClientConfigs, PeerPolicy, ServerAuth, SpiffeId, TlsMetrics,
    TrustBundle, TrustDomain, WorkloadCert,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Domain {
    td: TrustDomain,
    root: Authority,
    intermediate: Authority,
}

fn domain(name: &str) -> Domain {
    let td: TrustDomain = name.parse().unwrap();
    let root = Authority::new_root(&td, SystemTime::now()).unwrap();
    let intermediate = root.new_intermediate("east", SystemTime::now()).unwrap();
    Domain { td, root, intermediate }
}

fn bundle(d: &Domain) -> TrustBundle {
    let mut b = TrustBundle::new();
    b.add_root(&d.td, d.root.cert().clone()).unwrap();
    b
}

fn store(ca: &Authority, uris: &[String], not_after: SystemTime, trust: TrustBundle, metrics: TlsMetrics) -> CertStore {
    let (issued, key) = ca
        .issue_custom(uris, SystemTime::now() - Duration::from_secs(3600), not_after)
        .unwrap();
    let id: SpiffeId = uris[0].parse().unwrap();
    CertStore::new(WorkloadCert::new(id, issued, key).unwrap(), trust, metrics)
}

const PREFERRED_SUITE: rustls::CipherSuite = rustls::CipherSuite::TLS13_AES_128_GCM_SHA256;
const PREFERRED_GROUP: rustls::NamedGroup = rustls::NamedGroup::secp256r1;

fn day() -> SystemTime {
    SystemTime::now() + Duration::from_secs(86400)
}

/// Runs one handshake over a loopback socket; returns whether data flowed both ways.
async fn handshake(server: &CertStore, client: &CertStore, policy: PeerPolicy) -> bool {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sconf =
        Arc::new(server_config(server, PeerPolicy::AnyInBundle, ServerAuth::RequireClientCert, &[b"t"]).unwrap());
    let srv = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let Ok(mut tls) = tokio_rustls::TlsAcceptor::from(sconf).accept(tcp).await else {
            return;
        };
        let mut b = [0u8; 4];
        if tls.read_exact(&mut b).await.is_ok() {
            let _ = tls.write_all(&b).await;
        }
    });
    let cconf = client_config(Some(client), client.bundle(), client.metrics(), policy, &[b"t"]).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let ok = async {
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cconf))
            .connect(rustls::pki_types::ServerName::try_from("strait.mesh").unwrap(), tcp)
            .await
            .ok()?;
        tls.write_all(b"ping").await.ok()?;
        let mut b = [0u8; 4];
        tls.read_exact(&mut b).await.ok()?;
        Some(&b == b"ping")
    }
    .await
    .unwrap_or(false);
    let _ = tokio::time::timeout(Duration::from_secs(2), srv).await;
    ok
}

#[tokio::test]
async fn accepts_valid_peers_and_refuses_the_rest_with_reasons() {
    let mesh = domain("mesh.local");
    let other = domain("other.local");
    let server_metrics = TlsMetrics::unregistered();
    let id = |td: &str| format!("spiffe://{td}/ns/demo/sa/echo");
    let server = store(
        &mesh.intermediate,
        &[id("mesh.local")],
        day(),
        bundle(&mesh),
        server_metrics.clone(),
    );
    let client_of = |ca: &Authority, uris: &[String], not_after| {
        store(ca, uris, not_after, bundle(&mesh), TlsMetrics::unregistered())
    };

    // A valid peer of the trust domain.
    assert!(
        handshake(
            &server,
            &client_of(&mesh.intermediate, &[id("mesh.local")], day()),
            PeerPolicy::AnyInBundle
        )
        .await
    );

    // Another trust domain that the bundle does not hold.
    assert!(
        !handshake(
            &server,
            &client_of(&other.intermediate, &[id("other.local")], day()),
            PeerPolicy::AnyInBundle
        )
        .await
    );
    assert_eq!(server_metrics.failures("unknown_trust_domain"), 1);

    // Claims our trust domain but chains to another root.
    assert!(
        !handshake(
            &server,
            &client_of(&other.intermediate, &[id("mesh.local")], day()),
            PeerPolicy::AnyInBundle
        )
        .await
    );
    assert_eq!(server_metrics.failures("untrusted_chain"), 1);

    // Expired.
    let past = SystemTime::now() - Duration::from_secs(60);
    assert!(
        !handshake(
            &server,
            &client_of(&mesh.intermediate, &[id("mesh.local")], past),
            PeerPolicy::AnyInBundle
        )
        .await
    );
    assert_eq!(server_metrics.failures("expired"), 1);

    // Two URI SANs.
    let two = [id("mesh.local"), "spiffe://mesh.local/ns/demo/sa/admin".to_string()];
    assert!(
        !handshake(
            &server,
            &client_of(&mesh.intermediate, &two, day()),
            PeerPolicy::AnyInBundle
        )
        .await
    );
    assert_eq!(server_metrics.failures("multiple_uri_sans"), 1);

    // The client side refuses a server that is not the identity it expects.
    let client_metrics = TlsMetrics::unregistered();
    let client = store(
        &mesh.intermediate,
        &[id("mesh.local")],
        day(),
        bundle(&mesh),
        client_metrics.clone(),
    );
    let expect = PeerPolicy::OneOf(vec!["spiffe://mesh.local/ns/demo/sa/greeter".parse().unwrap()]);
    assert!(!handshake(&server, &client, expect).await);
    assert_eq!(client_metrics.failures("unexpected_identity"), 1);

    // A federated bundle (both roots) accepts the other domain.
    let mut both = bundle(&mesh);
    both.merge(&bundle(&other)).unwrap();
    let server2 = store(
        &mesh.intermediate,
        &[id("mesh.local")],
        day(),
        both,
        TlsMetrics::unregistered(),
    );
    assert!(
        handshake(
            &server2,
            &client_of(&other.intermediate, &[id("other.local")], day()),
            PeerPolicy::AnyInBundle
        )
        .await
    );
}

#[tokio::test]
async fn rotation_swaps_the_certificate_for_new_handshakes_only() {
    let mesh = domain("mesh.local");
    let id: SpiffeId = "spiffe://mesh.local/ns/demo/sa/echo".parse().unwrap();
    let (c1, k1) = mesh
        .intermediate
        .issue_with_key(&id, SystemTime::now(), Duration::from_secs(60))
        .unwrap();
    let store = CertStore::new(
        WorkloadCert::new(id.clone(), c1.clone(), k1).unwrap(),
        bundle(&mesh),
        TlsMetrics::unregistered(),
    );
    let (c2, k2) = mesh
        .intermediate
        .issue_with_key(&id, SystemTime::now(), Duration::from_secs(60))
        .unwrap();
    store.rotate(WorkloadCert::new(id, c2.clone(), k2).unwrap());
    assert_eq!(store.current().key.cert[0], c2.chain[0]);
    assert_ne!(c1.chain[0], c2.chain[0]);
    assert_eq!(c2.chain.len(), 2, "leaf and intermediate; the root travels in bundles");
    let client = store.clone();
    assert!(handshake(&store, &client, PeerPolicy::AnyInBundle).await);
}

#[test]
fn written_authorities_load_back() {
    let mesh = domain("mesh.local");
    let dir = std::env::temp_dir().join(format!("strait-trust-test-{}", std::process::id()));
    mesh.intermediate.write(&dir).unwrap();
    let loaded = Authority::load(&dir, &mesh.td).unwrap();
    assert_eq!(loaded.cert(), mesh.intermediate.cert());
    let id: SpiffeId = "spiffe://mesh.local/ns/a/sa/b".parse().unwrap();
    let (issued, _) = loaded
        .issue_with_key(&id, SystemTime::now(), Duration::from_secs(60))
        .unwrap();
    assert_eq!(issued.chain.len(), 2);
    let pem = bundle(&mesh).to_pem();
    let back = TrustBundle::from_pem("test", pem.as_bytes()).unwrap();
    assert!(back.roots_for(&mesh.td).is_some());
    let _ = std::fs::remove_dir_all(dir);
}

/// A workload of `mesh` with identity `id`, valid for a day.
fn member(mesh: &Domain, id: &SpiffeId) -> CertStore {
    store(
        &mesh.intermediate,
        &[id.to_string()],
        day(),
        bundle(mesh),
        TlsMetrics::unregistered(),
    )
}

/// A server (`echo`) and a client of one trust domain.
struct Pair {
    mesh: Domain,
    server_id: SpiffeId,
    client_id: SpiffeId,
    server: CertStore,
    client: CertStore,
}

fn pair() -> Pair {
    let mesh = domain("mesh.local");
    let server_id: SpiffeId = "spiffe://mesh.local/ns/demo/sa/echo".parse().unwrap();
    let client_id: SpiffeId = "spiffe://mesh.local/ns/demo/sa/client".parse().unwrap();
    let server = member(&mesh, &server_id);
    let client = member(&mesh, &client_id);
    Pair {
        mesh,
        server_id,
        client_id,
        server,
        client,
    }
}

fn serving(store: &CertStore) -> Arc<rustls::ServerConfig> {
    Arc::new(server_config(store, PeerPolicy::AnyInBundle, ServerAuth::RequireClientCert, &[b"t"]).unwrap())
}

/// What one end of a connection negotiated, and whom it saw.
#[derive(Debug)]
struct Negotiated {
    kind: Option<rustls::HandshakeKind>,
    suite: Option<rustls::CipherSuite>,
    group: Option<rustls::NamedGroup>,
    peer: Option<SpiffeId>,
}

impl Negotiated {
    fn of<D>(conn: &rustls::ConnectionCommon<D>) -> Negotiated {
        Negotiated {
            kind: conn.handshake_kind(),
            suite: conn.negotiated_cipher_suite().map(|s| s.suite()),
            group: conn.negotiated_key_exchange_group().map(|g| g.name()),
            peer: strait_trust::peer_identity(conn.peer_certificates()),
        }
    }
}

/// One connection over loopback: the client sends four bytes, the server echoes them, and the
/// client reads to the end (the server's tickets arrive after the handshake; reading them
/// stores them). What each end negotiated (client, server); `None` when either failed.
async fn echo_once(
    sconf: Arc<rustls::ServerConfig>,
    cconf: Arc<rustls::ClientConfig>,
) -> Option<(Negotiated, Negotiated)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let srv = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = tokio_rustls::TlsAcceptor::from(sconf).accept(tcp).await.ok()?;
        let mut b = [0u8; 4];
        tls.read_exact(&mut b).await.ok()?;
        tls.write_all(&b).await.ok()?;
        Some(Negotiated::of(tls.get_ref().1))
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(cconf)
        .connect(rustls::pki_types::ServerName::try_from("strait.mesh").unwrap(), tcp)
        .await
        .ok()?;
    tls.write_all(b"ping").await.ok()?;
    let mut b = [0u8; 4];
    tls.read_exact(&mut b).await.ok()?;
    assert_eq!(&b, b"ping");
    tls.shutdown().await.ok()?;
    let mut rest = vec![];
    let _ = tls.read_to_end(&mut rest).await;
    let client = Negotiated::of(tls.get_ref().1);
    let server = srv.await.ok()??;
    Some((client, server))
}

/// One connection with a kept client config: how the handshake went and who the server saw.
/// Every one, full or resumed, must have negotiated the suite and group `crypto_provider`
/// prefers.
async fn resumable_handshake(
    sconf: Arc<rustls::ServerConfig>,
    configs: &ClientConfigs,
    expected: &SpiffeId,
) -> Option<(rustls::HandshakeKind, rustls::HandshakeKind, Option<SpiffeId>)> {
    let config = configs
        .get("endpoint-a", std::slice::from_ref(expected), &[b"t"])
        .unwrap();
    let (client, server) = echo_once(sconf, config).await?;
    for end in [&client, &server] {
        assert_eq!(
            (end.suite, end.group),
            (Some(PREFERRED_SUITE), Some(PREFERRED_GROUP)),
            "{end:?}"
        );
    }
    Some((client.kind?, server.kind?, server.peer))
}

#[tokio::test]
async fn sessions_resume_with_the_proven_identity_until_the_bundle_changes() {
    use rustls::HandshakeKind::{Full, Resumed};
    let Pair {
        mesh,
        server_id,
        client_id,
        server,
        client,
    } = pair();
    let sconf = serving(&server);
    let configs = ClientConfigs::new(client.clone());

    let first = resumable_handshake(sconf.clone(), &configs, &server_id).await.unwrap();
    assert_eq!(first, (Full, Full, Some(client_id.clone())));
    // The next connection resumes, and the server still knows who the client proved to be.
    let second = resumable_handshake(sconf.clone(), &configs, &server_id).await.unwrap();
    assert_eq!(second, (Resumed, Resumed, Some(client_id.clone())));

    // A new bundle (as when a trust domain is removed) ends resumption on both sides: the
    // server no longer honours the ticket even for a client that still offers it.
    let stale = ClientConfigs::new(client.clone());
    resumable_handshake(sconf.clone(), &stale, &server_id).await.unwrap();
    server.set_bundle(bundle(&mesh));
    let after = resumable_handshake(sconf.clone(), &stale, &server_id).await.unwrap();
    assert_eq!(after, (Full, Full, Some(client_id.clone())));

    // A server with another identity is never resumed into: the kept config for an endpoint
    // expects that endpoint's identities, and a full handshake checks them.
    let other_id: SpiffeId = "spiffe://mesh.local/ns/demo/sa/other".parse().unwrap();
    let other = member(&mesh, &other_id);
    assert!(resumable_handshake(serving(&other), &configs, &server_id)
        .await
        .is_none());
}

#[tokio::test]
async fn a_resumed_connection_takes_one_ticket_and_leaves_one_so_the_store_does_not_grow() {
    use rustls::HandshakeKind::{Full, Resumed};
    let Pair {
        server_id,
        server,
        client,
        ..
    } = pair();
    let sconf = serving(&server);
    let configs = ClientConfigs::new(client);
    let mut held = vec![];
    let mut kinds = vec![];
    for _ in 0..12 {
        let (client_kind, server_kind, _) = resumable_handshake(sconf.clone(), &configs, &server_id).await.unwrap();
        kinds.push((client_kind, server_kind));
        held.push(server.metrics().resumable_sessions());
    }
    assert_eq!(kinds[0], (Full, Full));
    assert!(kinds[1..].iter().all(|k| *k == (Resumed, Resumed)), "{kinds:?}");
    // Each connection used the ticket of the one before and was given one: one session held,
    // however many connections came (with two tickets per handshake it was one per connection).
    assert_eq!(held, vec![1; 12], "sessions the server held after each connection");
    drop(sconf);
    assert_eq!(
        server.metrics().resumable_sessions(),
        0,
        "a dropped server config holds none"
    );
}

/// Presents one fixed identity, for a client config built outside `strait_trust`.
#[derive(Debug)]
struct Presents(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for Presents {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[tokio::test]
async fn a_peer_that_prefers_x25519_gets_it_without_a_retry() {
    // A Strait from before P-256 was preferred (ring's default order, X25519 first) beside a
    // newer server, as during an upgrade: the server takes the client's first group, for which
    // the ClientHello carries a share, so there is no HelloRetryRequest round trip. (A newer
    // client and an older server meet the same rule: the client's first group, P-256.)
    let Pair { server, client, .. } = pair();
    let mut older = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(strait_trust::SpiffeVerifier::new(
            client.bundle().clone(),
            PeerPolicy::AnyInBundle,
            TlsMetrics::unregistered(),
        )))
        .with_client_cert_resolver(Arc::new(Presents(client.current().key.clone())));
    older.alpn_protocols = vec![b"t".to_vec()];
    let (client, server) = echo_once(serving(&server), Arc::new(older)).await.unwrap();
    let x25519 = Some(rustls::NamedGroup::X25519);
    let full = Some(rustls::HandshakeKind::Full);
    assert_eq!((client.kind, client.group), (full, x25519));
    assert_eq!((server.kind, server.group), (full, x25519));
}
