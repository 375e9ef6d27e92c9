//! The demo app's HTTP paths, httpbin-style, so every proxy feature can be tried by hand:
//! `/bytes/{n}` (n bytes, streamed), `/status/{code}` (`?zone=Z`: only in zone Z), `/delay/{ms}`, `/headers`,
//! `/sse?events=N&interval_ms=M` (server-sent events, each flushed as written), `/ws`
//! (a WebSocket echo), `/trailers` (request trailers echoed as response trailers), and anything else: JSON naming where it runs, with the number of body
//! bytes received (counted as they stream, never buffered).

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::demo::DemoArgs;

pub type DemoBody = BoxBody<Bytes, Infallible>;

const CHUNK: usize = 64 * 1024;

fn full(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<DemoBody> {
    let mut resp = Response::new(Full::new(body.into()).boxed());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn streamed(
    content_type: &'static str,
    frames: impl futures::Stream<Item = Bytes> + Send + Sync + 'static,
) -> Response<DemoBody> {
    let body = StreamBody::new(frames.map(|b| Ok::<_, Infallible>(Frame::data(b))));
    let mut resp = Response::new(BodyExt::boxed(body));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn query(req: &Request<hyper::body::Incoming>, key: &str) -> Option<u64> {
    query_text(req, key)?.parse().ok()
}

fn query_text<'a>(req: &'a Request<hyper::body::Incoming>, key: &str) -> Option<&'a str> {
    req.uri()
        .query()?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

pub async fn handle(a: DemoArgs, mut req: Request<hyper::body::Incoming>) -> Response<DemoBody> {
    let path = req.uri().path().to_string();
    let mut segments = path.trim_start_matches('/').splitn(2, '/');
    match (segments.next().unwrap_or(""), segments.next()) {
        ("bytes", Some(n)) => match n.parse::<u64>() {
            Ok(n) => {
                let chunks = futures::stream::unfold(n, |left| async move {
                    (left > 0).then(|| {
                        let take = left.min(CHUNK as u64);
                        (Bytes::from(vec![b'x'; take as usize]), left - take)
                    })
                });
                let mut resp = streamed("application/octet-stream", chunks);
                resp.headers_mut().insert(hyper::header::CONTENT_LENGTH, n.into());
                resp
            }
            Err(_) => full(StatusCode::BAD_REQUEST, "text/plain", "use /bytes/<count>\n"),
        },
        ("status", Some(code)) => match code.parse::<u16>().ok().and_then(|c| StatusCode::from_u16(c).ok()) {
            // `?zone=Z`: only the app in zone Z answers the code, the others as for `/`
            // (one failing zone, for trying outlier detection by hand).
            Some(_) if query_text(&req, "zone").is_some_and(|z| z != a.zone) => {
                describe(&a, req, serde_json::Value::Null).await
            }
            Some(code) => {
                let mut resp = full(code, "text/plain", format!("{code}\n"));
                // `?retry_after=S`: a Retry-After to honour (rate limits, overload).
                if let Some(secs) = query(&req, "retry_after") {
                    resp.headers_mut().insert(hyper::header::RETRY_AFTER, secs.into());
                }
                resp
            }
            None => full(StatusCode::BAD_REQUEST, "text/plain", "use /status/<100-999>\n"),
        },
        ("delay", Some(ms)) => match ms.parse::<u64>() {
            Ok(ms) => {
                tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
                describe(&a, req, serde_json::json!({"delayed_ms": ms})).await
            }
            Err(_) => full(StatusCode::BAD_REQUEST, "text/plain", "use /delay/<milliseconds>\n"),
        },
        ("headers", None) => {
            let headers: serde_json::Map<String, serde_json::Value> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
                .collect();
            full(
                StatusCode::OK,
                "application/json",
                serde_json::json!({"headers": headers}).to_string() + "\n",
            )
        }
        ("sse", None) => {
            let events = query(&req, "events").unwrap_or(5);
            let interval = Duration::from_millis(query(&req, "interval_ms").unwrap_or(500));
            let workload = a.workload.clone();
            let frames = futures::stream::unfold(0u64, move |i| {
                let workload = workload.clone();
                async move {
                    if i >= events {
                        return None;
                    }
                    if i > 0 {
                        tokio::time::sleep(interval).await;
                    }
                    Some((
                        Bytes::from(format!("id: {i}\ndata: event {i} from {workload}\n\n")),
                        i + 1,
                    ))
                }
            });
            let mut resp = streamed("text/event-stream", frames);
            resp.headers_mut()
                .insert(hyper::header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            resp
        }
        ("ws", None) => websocket(&a, &mut req),
        ("trailers", None) => trailers(&a, req).await,
        _ => describe(&a, req, serde_json::Value::Null).await,
    }
}

/// JSON naming where the app runs, with what the request carried.
async fn describe(a: &DemoArgs, req: Request<hyper::body::Incoming>, extra: serde_json::Value) -> Response<DemoBody> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let host = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default()
        .to_string();
    // Counted frame by frame: a 1 GiB upload costs no memory here.
    let mut body = req.into_body();
    let mut body_bytes = 0u64;
    let mut complete = true;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => body_bytes += f.data_ref().map_or(0, |d| d.len() as u64),
            Err(_) => {
                complete = false;
                break;
            }
        }
    }
    let mut json = serde_json::json!({
        "service": a.service,
        "cluster": a.cluster,
        "region": a.region,
        "zone": a.zone,
        "workload": a.workload,
        "method": method,
        "path": path,
        "host": host,
        "body_bytes": body_bytes,
        "body_complete": complete,
    });
    if let (Some(map), serde_json::Value::Object(more)) = (json.as_object_mut(), extra) {
        map.extend(more);
    }
    full(StatusCode::OK, "application/json", json.to_string() + "\n")
}

/// Trailers both ways (HTTP/1.1 chunked or HTTP/2): the answer is JSON naming the request's
/// trailers and body bytes, sent chunked and followed by those trailers again plus
/// `x-served-by: <workload>`, all declared in the answer's `Trailer` header as HTTP/1.1 wants.
async fn trailers(a: &DemoArgs, req: Request<hyper::body::Incoming>) -> Response<DemoBody> {
    let collected = match req.into_body().collect().await {
        Ok(c) => c,
        Err(e) => return full(StatusCode::BAD_REQUEST, "text/plain", format!("request body: {e}\n")),
    };
    let mut fields = collected.trailers().cloned().unwrap_or_default();
    let received: serde_json::Map<String, serde_json::Value> = fields
        .iter()
        .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
        .collect();
    let body_bytes = collected.to_bytes().len();
    if let Ok(v) = HeaderValue::from_str(&a.workload) {
        fields.insert("x-served-by", v);
    }
    let declared = fields.keys().map(|k| k.as_str()).collect::<Vec<_>>().join(", ");
    let json = serde_json::json!({"trailers": received, "body_bytes": body_bytes}).to_string() + "\n";
    let frames = [Frame::data(Bytes::from(json)), Frame::trailers(fields)];
    let body = StreamBody::new(futures::stream::iter(frames.map(Ok::<_, Infallible>)));
    let mut resp = Response::new(BodyExt::boxed(body));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Ok(v) = HeaderValue::from_str(&declared) {
        resp.headers_mut().insert(hyper::header::TRAILER, v);
    }
    resp
}

/// A WebSocket echo: every text or binary message comes back as sent.
fn websocket(a: &DemoArgs, req: &mut Request<hyper::body::Incoming>) -> Response<DemoBody> {
    let Some(key) = req.headers().get("sec-websocket-key") else {
        return full(StatusCode::BAD_REQUEST, "text/plain", "/ws takes a WebSocket upgrade\n");
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let upgrade = hyper::upgrade::on(req);
    let workload = a.workload.clone();
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        let (mut tx, mut rx) = ws.split();
        let hello = format!("hello from {workload}");
        if tx
            .send(tokio_tungstenite::tungstenite::Message::text(hello))
            .await
            .is_err()
        {
            return;
        }
        while let Some(Ok(msg)) = rx.next().await {
            if msg.is_close() {
                break;
            }
            if (msg.is_text() || msg.is_binary()) && tx.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut resp = Response::new(Full::new(Bytes::new()).boxed());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(hyper::header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(hyper::header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert("sec-websocket-accept", v);
    }
    resp
}
