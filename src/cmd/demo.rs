//! The demo app: answers HTTP with JSON naming where it runs (and httpbin-style paths, see
//! `demo_http.rs`), gRPC `strait.demo.v1.Demo/Hello` (deploy/proto/demo.proto) on the same
//! port over HTTP/2, or echoes TCP bytes.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use clap::Args;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
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
                    let grpc = req
                        .headers()
                        .get(hyper::header::CONTENT_TYPE)
                        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                    if grpc {
                        let path = req.uri().path().to_string();
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        return Ok::<_, Infallible>(grpc_reply(&a, &path, &body));
                    }
                    Ok::<_, Infallible>(super::demo_http::handle(a, req).await)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// The one gRPC method of the demo.
pub const GRPC_HELLO: &str = "/strait.demo.v1.Demo/Hello";

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Field 1 (a string) of a protobuf message, if it comes first.
fn first_string(msg: &[u8]) -> Option<String> {
    if *msg.first()? != 0x0a {
        return None;
    }
    let (mut len, mut shift, mut i) = (0usize, 0, 1);
    loop {
        let b = *msg.get(i)?;
        i += 1;
        len |= ((b & 0x7f) as usize) << shift;
        shift += 7;
        if b < 0x80 || shift > 28 {
            break;
        }
    }
    String::from_utf8(msg.get(i..i + len)?.to_vec()).ok()
}

fn grpc_reply(a: &DemoArgs, path: &str, body: &[u8]) -> hyper::Response<BoxBody<Bytes, Infallible>> {
    let (status, message) = if path != GRPC_HELLO {
        ("12", None)
    } else {
        // A gRPC frame: compressed flag, 4-byte length, the message.
        let name = body.get(5..).and_then(first_string).unwrap_or_else(|| "world".into());
        let mut msg = vec![];
        for (field, value) in [
            (1u8, format!("hello {name} from {} in {}", a.workload, a.cluster)),
            (2, a.cluster.clone()),
            (3, a.workload.clone()),
            (4, a.zone.clone()),
        ] {
            msg.push(field << 3 | 2);
            varint(value.len() as u64, &mut msg);
            msg.extend_from_slice(value.as_bytes());
        }
        let mut frame = vec![0u8];
        frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        frame.extend_from_slice(&msg);
        ("0", Some(Bytes::from(frame)))
    };
    let mut trailers = hyper::HeaderMap::new();
    trailers.insert("grpc-status", hyper::header::HeaderValue::from_static(status));
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = message
        .map(|m| Ok(Frame::data(m)))
        .into_iter()
        .chain(std::iter::once(Ok(Frame::trailers(trailers))))
        .collect();
    let mut resp = hyper::Response::new(StreamBody::new(futures::stream::iter(frames)).boxed());
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/grpc"),
    );
    resp
}
