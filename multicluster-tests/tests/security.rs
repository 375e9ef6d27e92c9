//! Trust at the mesh's real listeners: a sidecar's inbound port and a gateway's QUIC port
//! refuse peers from other trust domains, with several URI SANs, or with expired certificates,
//! and count each refusal; a malformed tunnel header ends only its own stream; certificates
//! rotate under open connections.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use multicluster_tests::{connect_tunnel, get_via, metric_sum, scrape, Mesh, MeshOptions};
use strait_trust::{Authority, CertStore, PeerPolicy, SpiffeId, TlsMetrics, TrustBundle, TrustDomain, WorkloadCert};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn mesh_ca(mesh: &Mesh, cluster: &str) -> Authority {
    let td: TrustDomain = mesh.info.trust_domain.parse().unwrap();
    Authority::load(&mesh.info.state_dir.join(cluster).join("ca"), &td).unwrap()
}

fn client_store(ca: &Authority, uris: &[String], not_after: SystemTime, bundle: &TrustBundle) -> CertStore {
    let (issued, key) = ca
        .issue_custom(uris, SystemTime::now() - Duration::from_secs(7200), not_after)
        .unwrap();
    let id: SpiffeId = uris[0].parse().unwrap();
    CertStore::new(
        WorkloadCert::new(id, issued, key).unwrap(),
        bundle.clone(),
        TlsMetrics::unregistered(),
    )
}

/// Connects to a sidecar's inbound port with opaque-TCP ALPN; true if the sidecar accepted us
/// (it answers its status byte).
async fn inbound_accepts(addr: SocketAddr, store: &CertStore) -> bool {
    let config = strait_trust::client_config(
        Some(store),
        store.bundle(),
        store.metrics(),
        PeerPolicy::AnyInBundle,
        &[strait_trust::ALPN_TCP],
    )
    .unwrap();
    let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let attempt = async {
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(strait_api::transport::mesh_server_name(), tcp)
            .await
            .ok()?;
        let mut status = [9u8; 1];
        tls.read_exact(&mut status).await.ok()?;
        Some(status[0] == 0)
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

async fn quic_connect(gateway: SocketAddr, store: &CertStore) -> Option<quinn::Connection> {
    let tls = strait_trust::client_config(
        Some(store),
        store.bundle(),
        store.metrics(),
        PeerPolicy::AnyInBundle,
        &[strait_trust::ALPN_TUNNEL],
    )
    .unwrap();
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let conn = tokio::time::timeout(Duration::from_secs(3), endpoint.connect(gateway, "strait.mesh").ok()?)
        .await
        .ok()?
        .ok()?;
    // A refused client certificate surfaces as the connection closing right after the handshake.
    match tokio::time::timeout(Duration::from_millis(500), conn.closed()).await {
        Ok(_) => None,
        Err(_) => Some(conn),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_refuse_foreign_multi_san_and_expired_peers() {
    let mesh = Mesh::start().await.unwrap();
    let bundle = TrustBundle::load(&mesh.info.bundle).unwrap();
    let east_ca = mesh_ca(&mesh, "east");
    let target = mesh.workload("echo", "us-east-1a").clone();
    let id = "spiffe://mesh.local/ns/demo/sa/echo".to_string();
    let day = SystemTime::now() + Duration::from_secs(86400);

    // Control: a proper certificate of the mesh is accepted.
    assert!(
        inbound_accepts(
            target.inbound_addr,
            &client_store(&east_ca, std::slice::from_ref(&id), day, &bundle)
        )
        .await
    );

    // Another trust domain.
    let other_td: TrustDomain = "other.local".parse().unwrap();
    let other_root = Authority::new_root(&other_td, SystemTime::now()).unwrap();
    let foreign = client_store(
        &other_root,
        &["spiffe://other.local/ns/demo/sa/echo".to_string()],
        day,
        &bundle,
    );
    assert!(!inbound_accepts(target.inbound_addr, &foreign).await);
    // Our trust domain's name on a certificate from another root.
    let impostor = client_store(&other_root, std::slice::from_ref(&id), day, &bundle);
    assert!(!inbound_accepts(target.inbound_addr, &impostor).await);
    // More than one URI SAN.
    let two = client_store(
        &east_ca,
        &[id.clone(), "spiffe://mesh.local/ns/demo/sa/admin".into()],
        day,
        &bundle,
    );
    assert!(!inbound_accepts(target.inbound_addr, &two).await);
    // Expired.
    let expired = client_store(
        &east_ca,
        std::slice::from_ref(&id),
        SystemTime::now() - Duration::from_secs(60),
        &bundle,
    );
    assert!(!inbound_accepts(target.inbound_addr, &expired).await);
    // No TLS at all.
    let mut plain = tokio::net::TcpStream::connect(target.inbound_addr).await.unwrap();
    plain.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = vec![];
    let _ = tokio::time::timeout(Duration::from_secs(3), plain.read_to_end(&mut buf)).await;
    assert!(
        !String::from_utf8_lossy(&buf).contains("cluster"),
        "plaintext must never reach the app"
    );

    let m = scrape(target.admin_addr).await.unwrap();
    for reason in [
        "unknown_trust_domain",
        "untrusted_chain",
        "multiple_uri_sans",
        "expired",
    ] {
        assert_eq!(
            metric_sum(&m, "strait_tls_handshake_failures_total", &[("reason", reason)]),
            1.0,
            "{reason}: {m}"
        );
    }

    // The gateway's QUIC listener applies the same rules.
    let gw: SocketAddr = mesh.cluster("west").gateway.addr.parse().unwrap();
    assert!(
        quic_connect(gw, &client_store(&east_ca, std::slice::from_ref(&id), day, &bundle))
            .await
            .is_some()
    );
    assert!(quic_connect(gw, &foreign).await.is_none());
    assert!(quic_connect(gw, &two).await.is_none());
    let gm = scrape(mesh.cluster("west").gateway.admin_addr).await.unwrap();
    assert!(
        metric_sum(
            &gm,
            "strait_tls_handshake_failures_total",
            &[("reason", "unknown_trust_domain")]
        ) >= 1.0,
        "{gm}"
    );
    assert!(
        metric_sum(
            &gm,
            "strait_tls_handshake_failures_total",
            &[("reason", "multiple_uri_sans")]
        ) >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_tunnel_header_ends_only_its_stream() {
    let mesh = Mesh::start().await.unwrap();
    let bundle = TrustBundle::load(&mesh.info.bundle).unwrap();
    let store = client_store(
        &mesh_ca(&mesh, "east"),
        &["spiffe://mesh.local/ns/demo/sa/echo".to_string()],
        SystemTime::now() + Duration::from_secs(3600),
        &bundle,
    );
    let gw: SocketAddr = mesh.cluster("west").gateway.addr.parse().unwrap();
    let conn = quic_connect(gw, &store).await.expect("a valid peer connects");
    // A length far over the limit, then a length with garbage behind it.
    for bad in [vec![0xff, 0xff, 0xff, 0xff], vec![0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff]] {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&bad).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(64 * 1024))
            .await
            .unwrap();
        assert!(
            r.map(|b| b.is_empty()).unwrap_or(true),
            "the gateway must not answer a malformed header with data"
        );
    }
    // The same connection still carries a well-formed request; the process is alive.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    strait_api::tunnel::write_header(
        &mut send,
        &strait_api::pb::TunnelRequest {
            service: "nope".into(),
            namespace: "demo".into(),
            port: 80,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let resp: strait_api::pb::TunnelResponse = strait_api::tunnel::read_header(&mut recv).await.unwrap();
    assert_eq!(resp.status, strait_api::tunnel::status::UNKNOWN_SERVICE);
    let (code, _) = get_via(
        mesh.workload("echo", "us-east-1a").outbound_proxy,
        "http://greeter.demo.svc.clusterset.local/",
    )
    .await
    .unwrap();
    assert_eq!(code, 200);
    let gm = scrape(mesh.cluster("west").gateway.admin_addr).await.unwrap();
    assert!(
        metric_sum(&gm, "strait_tunnel_streams_total", &[("status", "400")]) >= 2.0,
        "{gm}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_without_dropping_open_connections() {
    // 4s certificates: every proxy renews every 2s.
    let mesh = Mesh::start_with(MeshOptions {
        cert_ttl: Some(Duration::from_secs(4)),
        ..Default::default()
    })
    .await
    .unwrap();
    let caller = mesh.workload("echo", "us-east-1a").clone();
    let mut tunnel = connect_tunnel(caller.outbound_proxy, "ledger.demo.svc.clusterset.local:7000")
        .await
        .unwrap();
    let issued_before = metric_sum(
        &scrape(mesh.cluster("east").controller.admin_addr).await.unwrap(),
        "strait_ca_requests_total",
        &[("result", "issued")],
    );
    // Ten seconds on one connection: several rotations on both ends.
    for i in 0..20u32 {
        let msg = format!("message {i}\n");
        tunnel.write_all(msg.as_bytes()).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), tunnel.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, msg.as_bytes());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let issued_after = metric_sum(
        &scrape(mesh.cluster("east").controller.admin_addr).await.unwrap(),
        "strait_ca_requests_total",
        &[("result", "issued")],
    );
    assert!(
        issued_after - issued_before >= 6.0,
        "east's proxies renewed: {issued_before} -> {issued_after}"
    );
    // New connections, made with the new certificates, work too.
    let (code, _) = get_via(caller.outbound_proxy, "http://greeter.demo.svc.clusterset.local/")
        .await
        .unwrap();
    assert_eq!(code, 200);
}
