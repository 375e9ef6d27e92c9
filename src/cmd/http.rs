//! A small HTTP GET for the CLI's reads of admin endpoints.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

/// GETs `path` from `addr` and returns (status, body).
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, Bytes)> {
    let fut = async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok::<_, anyhow::Error>((status, body))
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| anyhow::anyhow!("{addr} did not answer within 5s"))?
}

/// GETs a JSON view of an admin endpoint, with an error that says what to check.
pub async fn get_json(addr: SocketAddr, path: &str) -> anyhow::Result<serde_json::Value> {
    let (status, body) = get(addr, path).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot read http://{addr}{path}: {e} (is the controller running, and is {addr} its admin address?)"
        )
    })?;
    if status != 200 {
        anyhow::bail!(
            "http://{addr}{path} answered {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    Ok(serde_json::from_slice(&body)?)
}
