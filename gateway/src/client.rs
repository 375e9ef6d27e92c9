//! The tunnel client: one QUIC connection per remote gateway, one stream per proxied
//! connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use strait_api::pb;
use strait_api::tunnel::{read_header, status, write_header, HeaderError};
use strait_trust::{CertStore, PeerPolicy, SpiffeId};

/// A proxied connection through a remote gateway: read and write like a socket.
pub type TunnelStream = tokio::io::Join<quinn::RecvStream, quinn::SendStream>;

/// Why a tunnel could not be opened. All of these happen before any application byte was sent,
/// so the caller may retry elsewhere.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("cannot reach gateway {gateway}: {detail}")]
    Connect { gateway: SocketAddr, detail: String },
    #[error("gateway {gateway} stream failed: {detail}")]
    Stream { gateway: SocketAddr, detail: String },
    #[error("gateway {gateway} answered {status}: {message}")]
    Refused {
        gateway: SocketAddr,
        status: u32,
        message: String,
    },
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error("TLS configuration: {0}")]
    Config(String),
}

#[derive(Clone)]
pub struct TunnelClient {
    endpoint: quinn::Endpoint,
    store: CertStore,
    connections: Arc<Mutex<HashMap<SocketAddr, quinn::Connection>>>,
}

impl TunnelClient {
    /// A client endpoint bound to `bind` (use port 0).
    pub fn new(bind: SocketAddr, store: CertStore) -> std::io::Result<Self> {
        let endpoint = quinn::Endpoint::client(bind)?;
        Ok(TunnelClient {
            endpoint,
            store,
            connections: Arc::default(),
        })
    }

    async fn connection(&self, gateway: SocketAddr, identity: &SpiffeId) -> Result<quinn::Connection, TunnelError> {
        if let Some(conn) = self.connections.lock().map_err(|_| poisoned())?.get(&gateway) {
            if conn.close_reason().is_none() {
                return Ok(conn.clone());
            }
        }
        let connect_err = |detail: String| TunnelError::Connect { gateway, detail };
        let tls = strait_trust::client_config(
            Some(&self.store),
            self.store.bundle(),
            self.store.metrics(),
            PeerPolicy::OneOf(vec![identity.clone()]),
            &[strait_trust::ALPN_TUNNEL],
        )
        .map_err(|e| TunnelError::Config(e.to_string()))?;
        let quic =
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| TunnelError::Config(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(Arc::new(crate::transport_config()));
        let connecting = self
            .endpoint
            .connect_with(config, gateway, "strait.mesh")
            .map_err(|e| connect_err(e.to_string()))?;
        let conn = tokio::time::timeout(std::time::Duration::from_secs(2), connecting)
            .await
            .map_err(|_| connect_err("QUIC handshake timed out".into()))?
            .map_err(|e| connect_err(e.to_string()))?;
        tracing::debug!(%gateway, "QUIC connection established");
        self.connections
            .lock()
            .map_err(|_| poisoned())?
            .insert(gateway, conn.clone());
        Ok(conn)
    }

    /// Opens a stream to `req`'s service through the gateway at `gateway`.
    pub async fn open(
        &self,
        gateway: SocketAddr,
        identity: &SpiffeId,
        req: &pb::TunnelRequest,
    ) -> Result<(TunnelStream, pb::TunnelResponse), TunnelError> {
        let conn = self.connection(gateway, identity).await?;
        let stream_err = |detail: String| TunnelError::Stream { gateway, detail };
        let (mut send, mut recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => {
                // The cached connection died under us: forget it so the next call reconnects.
                self.forget(gateway);
                return Err(stream_err(e.to_string()));
            }
        };
        write_header(&mut send, req).await?;
        let resp: pb::TunnelResponse = tokio::time::timeout(std::time::Duration::from_secs(5), read_header(&mut recv))
            .await
            .map_err(|_| stream_err("no answer to tunnel header".into()))??;
        if resp.status != status::OK {
            return Err(TunnelError::Refused {
                gateway,
                status: resp.status,
                message: resp.message,
            });
        }
        Ok((tokio::io::join(recv, send), resp))
    }

    pub fn forget(&self, gateway: SocketAddr) {
        if let Ok(mut c) = self.connections.lock() {
            c.remove(&gateway);
        }
    }
}

fn poisoned() -> TunnelError {
    TunnelError::Config("connection cache lock poisoned".into())
}
