//! The demo app: answers HTTP with JSON naming where it runs, or echoes TCP bytes.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    #[arg(long)]
    pub listen: SocketAddr,
    #[arg(long)]
    pub cluster: String,
    #[arg(long, default_value = "")]
    pub region: String,
    #[arg(long)]
    pub zone: String,
    #[arg(long)]
    pub workload: String,
    #[arg(long)]
    pub service: String,
    /// Echo TCP bytes instead of answering HTTP.
    #[arg(long)]
    pub tcp: bool,
}

pub async fn run(a: DemoArgs) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind the demo app on {}: {e}", a.listen))?;
    tracing::info!(listen = %a.listen, service = %a.service, tcp = a.tcp, "demo app ready");
    loop {
        let (mut stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        if a.tcp {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
            continue;
        }
        let a = a.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let a = a.clone();
                async move {
                    let method = req.method().to_string();
                    let path = req.uri().path().to_string();
                    let host = req
                        .headers()
                        .get(hyper::header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    let body = req
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let json = serde_json::json!({
                        "service": a.service,
                        "cluster": a.cluster,
                        "region": a.region,
                        "zone": a.zone,
                        "workload": a.workload,
                        "method": method,
                        "path": path,
                        "host": host,
                        "body_bytes": body.len(),
                    });
                    let mut resp = hyper::Response::new(Full::new(Bytes::from(json.to_string() + "\n")));
                    resp.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("application/json"),
                    );
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
