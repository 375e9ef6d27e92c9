//! Clients that talk to the mesh the way an application does: HTTP through a sidecar's
//! outbound proxy (absolute-form, like `curl -x`), CONNECT tunnels, and a steady open-loop load.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn get_on(addr: SocketAddr, uri: &str, host: &str, timeout: Duration) -> anyhow::Result<(u16, Bytes)> {
    let fut = async {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = hyper::Request::get(uri)
            .header(hyper::header::HOST, host)
            .body(Empty::<Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok::<_, anyhow::Error>((status, body))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {addr} within {timeout:?}"))?
}

/// GET `path` from a plain HTTP server (admin endpoints).
pub async fn plain_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, Bytes)> {
    get_on(addr, path, &addr.to_string(), Duration::from_secs(5)).await
}

/// GET an absolute URL through a sidecar's outbound proxy; returns status and body.
pub async fn get_via(proxy: SocketAddr, url: &str) -> anyhow::Result<(u16, Bytes)> {
    let uri: hyper::Uri = url.parse()?;
    let host = uri.authority().map(|a| a.to_string()).unwrap_or_default();
    get_on(proxy, url, &host, Duration::from_secs(10)).await
}

/// An answer with its headers, for tests of what routes and policies add.
pub struct Answer {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
    }

    /// The `service` the demo app names in its JSON answer, else the body as text.
    pub fn service(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["service"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).into_owned())
    }
}

/// GET an absolute URL through a sidecar's outbound proxy with extra request headers.
pub async fn get_with(proxy: SocketAddr, url: &str, headers: &[(&str, &str)]) -> anyhow::Result<Answer> {
    request_with(proxy, "GET", url, headers).await
}

/// A bodyless request with `method` through a sidecar's outbound proxy.
pub async fn request_with(
    proxy: SocketAddr,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<Answer> {
    let uri: hyper::Uri = url.parse()?;
    let stream = TcpStream::connect(proxy).await?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder().method(method).uri(url).header(
        hyper::header::HOST,
        uri.authority().map(|a| a.as_str()).unwrap_or_default(),
    );
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        sender.send_request(req.body(Empty::<Bytes>::new())?),
    )
    .await
    .map_err(|_| anyhow::anyhow!("no answer from {proxy} within 10s"))??;
    let status = resp.status().as_u16();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Answer {
        status,
        headers: parts.headers,
        body,
    })
}

/// Opens a CONNECT tunnel through a sidecar's outbound proxy to `authority` (host:port).
pub async fn connect_tunnel(proxy: SocketAddr, authority: &str) -> anyhow::Result<TcpStream> {
    tunnel_over(TcpStream::connect(proxy).await?, authority).await
}

/// [`connect_tunnel`] over a connection to the proxy the caller already opened. Takes the
/// answer's head and nothing after it (bytes of a server that speaks first stay in the socket
/// for the caller), in one read once the head has arrived: it peeks, as a client with a
/// buffer would read, where reading byte by byte took some forty `read`s per tunnel and
/// counted them in the mesh bench's connection setup.
pub async fn tunnel_over(mut s: TcpStream, authority: &str) -> anyhow::Result<TcpStream> {
    const LIMIT: usize = 8192;
    s.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await?;
    let mut head = Vec::new();
    let mut buf = vec![0u8; LIMIT];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.peek(&mut buf)).await??;
        anyhow::ensure!(
            n > 0,
            "proxy closed during CONNECT (got {:?})",
            String::from_utf8_lossy(&head)
        );
        // The end may straddle what was taken before and what arrived since.
        let from = head.len().saturating_sub(3);
        let mut seen = head[from..].to_vec();
        seen.extend_from_slice(&buf[..n]);
        let take = match seen.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(at) => from + at + 4 - head.len(),
            // Not all of it yet: take what is there, so the next peek waits for more.
            None => n,
        };
        let start = head.len();
        head.resize(start + take, 0);
        s.read_exact(&mut head[start..]).await?;
        if head.ends_with(b"\r\n\r\n") {
            break;
        }
        anyhow::ensure!(head.len() < LIMIT, "CONNECT response too long");
    }
    let text = String::from_utf8_lossy(&head);
    anyhow::ensure!(text.starts_with("HTTP/1.1 200"), "CONNECT refused: {text}");
    Ok(s)
}

/// What one request of a load run got.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// 2xx, with the `cluster` and `zone` the demo app reported.
    Served {
        cluster: String,
        zone: String,
    },
    Status(u16),
    Error(String),
}

#[derive(Clone, Debug)]
pub struct Sample {
    /// When the request was due, from the start of the run.
    pub due: Duration,
    pub latency: Duration,
    pub outcome: Outcome,
}

#[derive(Debug, Default)]
pub struct LoadReport {
    pub samples: Vec<Sample>,
}

impl LoadReport {
    /// Sends GET `url` through `proxy` at `rps`, open loop (each request on its own connection,
    /// due at a fixed time whether or not earlier ones finished), for `duration`. `during` runs
    /// alongside, with the time the load started; use it to kill and restart things.
    pub async fn run<F, Fut>(proxy: SocketAddr, url: &str, rps: u32, duration: Duration, during: F) -> LoadReport
    where
        F: FnOnce(Instant) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let start = Instant::now();
        let interval = Duration::from_secs_f64(1.0 / rps as f64);
        let total = (duration.as_secs_f64() * rps as f64) as u32;
        let url = url.to_string();
        let load = async move {
            let mut handles = Vec::with_capacity(total as usize);
            for i in 0..total {
                let due = interval * i;
                tokio::time::sleep_until((start + due).into()).await;
                let url = url.clone();
                handles.push(tokio::spawn(async move {
                    let sent = Instant::now();
                    let outcome = match get_via(proxy, &url).await {
                        Ok((status, body)) if (200..300).contains(&status) => {
                            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                            Outcome::Served {
                                cluster: v["cluster"].as_str().unwrap_or_default().to_string(),
                                zone: v["zone"].as_str().unwrap_or_default().to_string(),
                            }
                        }
                        Ok((status, _)) => Outcome::Status(status),
                        Err(e) => Outcome::Error(e.to_string()),
                    };
                    Sample {
                        due,
                        latency: sent.elapsed(),
                        outcome,
                    }
                }));
            }
            let mut samples = vec![];
            for h in handles {
                if let Ok(s) = h.await {
                    samples.push(s);
                }
            }
            samples
        };
        let (samples, ()) = tokio::join!(load, during(start));
        LoadReport { samples }
    }

    pub fn failures(&self) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| !matches!(s.outcome, Outcome::Served { .. }))
            .collect()
    }

    /// Failures among requests due in `[from, to)` of the run.
    pub fn failures_between(&self, from: Duration, to: Duration) -> usize {
        self.failures().iter().filter(|s| s.due >= from && s.due < to).count()
    }

    /// Zones that served requests due in `[from, to)`, with counts.
    pub fn zones_between(&self, from: Duration, to: Duration) -> std::collections::BTreeMap<String, usize> {
        self.zones_where(|s| s.due >= from && s.due < to)
    }

    /// Zones that served requests due from `from` and answered before `to`, with counts: what
    /// was served before something happened at `to`, leaving out requests still in flight
    /// then (one due just before a kill may rightly fail over).
    pub fn zones_answered_between(&self, from: Duration, to: Duration) -> std::collections::BTreeMap<String, usize> {
        self.zones_where(|s| s.due >= from && s.due + s.latency < to)
    }

    fn zones_where(&self, pick: impl Fn(&Sample) -> bool) -> std::collections::BTreeMap<String, usize> {
        let mut out = std::collections::BTreeMap::new();
        for s in self.samples.iter().filter(|s| pick(s)) {
            if let Outcome::Served { zone, .. } = &s.outcome {
                *out.entry(zone.clone()).or_insert(0) += 1;
            }
        }
        out
    }

    /// Requests due in `[from, to)` served outside `zone`: (due, latency, zone), for messages.
    pub fn served_elsewhere(&self, from: Duration, to: Duration, zone: &str) -> Vec<(Duration, Duration, String)> {
        self.samples
            .iter()
            .filter(|s| s.due >= from && s.due < to)
            .filter_map(|s| match &s.outcome {
                Outcome::Served { zone: z, .. } if z != zone => Some((s.due, s.latency, z.clone())),
                _ => None,
            })
            .collect()
    }
}

/// Calls `strait.demo.v1.Demo/Hello` on greeter with the real grpcurl (`STRAIT_GRPCURL`;
/// `./test.sh` builds it) through a sidecar's outbound proxy; returns (success, output).
pub fn grpcurl_hello(proxy: SocketAddr, name: &str, headers: &[&str]) -> (bool, String) {
    let bin = std::env::var("STRAIT_GRPCURL").unwrap_or_else(|_| {
        format!(
            "{}/.cache/strait/bin/grpcurl",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    let proto_dir = crate::repo_dir().join("deploy/proto");
    let proto_dir = proto_dir.to_str().expect("a UTF-8 path");
    let data = format!(r#"{{"name":"{name}"}}"#);
    let mut args: Vec<String> = [
        "-plaintext",
        "-v",
        "-import-path",
        proto_dir,
        "-proto",
        "demo.proto",
        "-authority",
        "greeter.demo.svc.clusterset.local:80",
        "-d",
        &data,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for h in headers {
        args.push("-H".into());
        args.push(h.to_string());
    }
    args.push(proxy.to_string());
    args.push("strait.demo.v1.Demo/Hello".into());
    let out = std::process::Command::new(&bin)
        .args(&args)
        .output()
        .unwrap_or_else(|e| panic!("{bin}: {e} (test.sh builds grpcurl; set STRAIT_GRPCURL)"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::tunnel_over;

    /// A proxy that reads the CONNECT, then writes `parts` with a pause between them.
    async fn proxy(parts: Vec<&'static [u8]>) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut req = vec![0u8; 1024];
            let _ = s.read(&mut req).await.unwrap();
            for p in parts {
                s.write_all(p).await.unwrap();
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        addr
    }

    #[tokio::test]
    async fn the_answers_head_is_taken_whole_however_it_arrives_and_nothing_after_it() {
        let splits: [Vec<&'static [u8]>; 3] = [
            vec![b"HTTP/1.1 200 OK\r\n\r\nhello"],
            vec![b"HTTP/1.1 200 OK\r\n\r", b"\nhello"],
            vec![b"HTTP/1.1 200", b" OK\r\nx-a: 1\r\n", b"\r\n", b"hello"],
        ];
        for parts in splits {
            let addr = proxy(parts.clone()).await;
            let mut s = tunnel_over(TcpStream::connect(addr).await.unwrap(), "sink.demo:9000")
                .await
                .unwrap();
            let mut rest = [0u8; 5];
            s.read_exact(&mut rest).await.unwrap();
            assert_eq!(&rest, b"hello", "{parts:?}");
        }
    }

    #[tokio::test]
    async fn a_refusal_or_a_close_during_connect_is_an_error_that_quotes_the_answer() {
        let addr = proxy(vec![b"HTTP/1.1 503 Service Unavailable\r\n\r\n"]).await;
        let e = tunnel_over(TcpStream::connect(addr).await.unwrap(), "sink.demo:9000")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("CONNECT refused: HTTP/1.1 503"), "{e}");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let _ = s.read(&mut [0u8; 1024]).await;
            s.write_all(b"HTTP/1.1 2").await.unwrap();
        });
        let e = tunnel_over(TcpStream::connect(addr).await.unwrap(), "sink.demo:9000")
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("proxy closed during CONNECT (got \"HTTP/1.1 2\")"),
            "{e}"
        );
    }
}
