//! Abuse is refused and the process survives: request smuggling inputs get 400 and are never
//! forwarded; HTTP/2 rapid reset, CONTINUATION, SETTINGS and PING floods and slowloris heads
//! are bounded while other clients keep being served. Attacks are hand-built bytes on real
//! sockets against a real sidecar; each prints what it cost the proxy.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use multicluster_tests::{get_via, metric_sum, scrape, Mesh};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ECHO: &str = "http://echo.demo.svc.clusterset.local/";

/// Sends `raw` on a fresh connection and returns what came back until the proxy closed.
async fn raw_exchange(proxy: SocketAddr, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// An HTTP/2 frame: 24-bit length, type, flags, stream id.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 1;
const END_HEADERS: u8 = 4;

/// A GET for echo's `/` as an HPACK block: literal headers without indexing, no Huffman.
fn get_block() -> Vec<u8> {
    let mut b = vec![0x82, 0x86, 0x84]; // :method GET, :scheme http, :path /
    let authority = b"echo.demo.svc.clusterset.local";
    b.push(0x01); // literal without indexing, name index 1 (:authority)
    b.push(authority.len() as u8);
    b.extend_from_slice(authority);
    b
}

/// Runs `attack` against the sidecar while a well-behaved client calls through the same
/// sidecar every 50 ms; returns how many of its calls failed, with the proxy's RSS growth and
/// CPU seconds during the attack.
async fn under_attack<F, Fut>(mesh: &Mesh, attack: F) -> (usize, usize, u64, f64, u64)
where
    F: FnOnce(SocketAddr) -> Fut,
    Fut: std::future::Future<Output = u64> + Send + 'static,
{
    let caller = mesh.workload("echo", "us-east-1a").clone();
    let rss_before = Mesh::rss(caller.sidecar_pid).unwrap();
    let cpu_before = cpu_seconds(caller.sidecar_pid);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let bystander = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match get_via(caller.outbound_proxy, ECHO).await {
                    Ok((200, _)) => ok += 1,
                    _ => failed += 1,
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (ok, failed)
        })
    };
    let mut peak = rss_before;
    let attack = tokio::spawn(attack(caller.outbound_proxy));
    while !attack.is_finished() {
        peak = peak.max(Mesh::rss(caller.sidecar_pid).unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let attacker_bytes = attack.await.unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = bystander.await.unwrap();
    (
        ok,
        failed,
        peak.saturating_sub(rss_before),
        cpu_seconds(caller.sidecar_pid) - cpu_before,
        attacker_bytes,
    )
}

fn report(what: &str, (ok, failed, grew, cpu, sent): (usize, usize, u64, f64, u64)) {
    println!(
        "{what}: attacker sent {} KiB; proxy RSS +{} KiB ({:.4} bytes per attacker byte), {cpu:.2} s CPU; \
         bystander {ok} served, {failed} failed",
        sent >> 10,
        grew >> 10,
        grew as f64 / sent.max(1) as f64
    );
    assert_eq!(failed, 0, "{what}: other clients were not served");
    assert!(ok > 0, "{what}: the bystander made no call");
    assert!(grew < 32 * 1024 * 1024, "{what}: the proxy grew by {} MiB", grew >> 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_inputs_get_400_and_are_never_forwarded() {
    let mesh = Mesh::start().await.unwrap();
    let caller = mesh.workload("echo", "us-east-1a").clone();
    let p = caller.outbound_proxy;
    let before = scrape(caller.admin_addr).await.unwrap();
    let inbound_before = metric_sum(&before, "strait_inbound_requests_total", &[]);
    let host = "Host: echo.demo.svc.clusterset.local";
    let url = "http://echo.demo.svc.clusterset.local/";
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "Content-Length and Transfer-Encoding",
            format!(
                "POST {url} HTTP/1.1\r\n{host}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            )
            .into_bytes(),
            "400",
        ),
        (
            "duplicate differing Content-Length",
            format!("POST {url} HTTP/1.1\r\n{host}\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde")
                .into_bytes(),
            "400",
        ),
        (
            "obs-fold",
            format!("GET {url} HTTP/1.1\r\n{host}\r\nX-Folded: a\r\n b\r\n\r\n").into_bytes(),
            "400",
        ),
        (
            "invalid header bytes",
            [
                format!("GET {url} HTTP/1.1\r\n{host}\r\nX-Bad: a").as_bytes(),
                b"\x01b\r\n\r\n",
            ]
            .concat(),
            "400",
        ),
        (
            "oversized head",
            format!(
                "GET {url} HTTP/1.1\r\n{host}\r\nX-Big: {}\r\n\r\n",
                "a".repeat(100 * 1024)
            )
            .into_bytes(),
            "431",
        ),
    ];
    for (what, raw, status) in &cases {
        let answer = raw_exchange(p, raw).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{what}: expected {status}, got {answer:?}"
        );
        // The proxy is still there for everyone else.
        let (code, _) = get_via(p, ECHO).await.unwrap();
        assert_eq!(code, 200, "after {what}");
    }
    let after = scrape(caller.admin_addr).await.unwrap();
    // Only the well-formed calls reached the app's sidecar.
    assert_eq!(
        metric_sum(&after, "strait_inbound_requests_total", &[]) - inbound_before,
        cases.len() as f64,
        "a malformed request was forwarded"
    );
    assert_eq!(
        metric_sum(
            &after,
            "strait_rejected_connections_total",
            &[("reason", "content_length_and_transfer_encoding")]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_floods_and_slowloris_are_bounded_while_others_are_served() {
    let mesh = Mesh::start().await.unwrap();

    // Rapid reset (CVE-2023-44487): open a stream and reset it at once, 20,000 times.
    let r = under_attack(&mesh, |proxy| async move {
        let mut s = TcpStream::connect(proxy).await.unwrap();
        let mut sent = 0u64;
        let mut batch = PREFACE.to_vec();
        batch.extend(frame(SETTINGS, 0, 0, &[]));
        let block = get_block();
        for i in 0..20_000u32 {
            let id = 2 * i + 1;
            batch.extend(frame(HEADERS, END_STREAM | END_HEADERS, id, &block));
            batch.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
            if batch.len() > 64 * 1024 {
                sent += batch.len() as u64;
                if s.write_all(&batch).await.is_err() {
                    break; // the proxy closed the connection: the flood was cut off
                }
                batch.clear();
            }
        }
        sent
    })
    .await;
    report("rapid reset", r);

    // CONTINUATION flood: one header block that never ends.
    let r = under_attack(&mesh, |proxy| async move {
        let mut s = TcpStream::connect(proxy).await.unwrap();
        let mut sent = 0u64;
        let mut first = PREFACE.to_vec();
        first.extend(frame(SETTINGS, 0, 0, &[]));
        first.extend(frame(HEADERS, END_STREAM, 1, &get_block()));
        s.write_all(&first).await.unwrap();
        // Literal header "x-flood: aaaa…" repeated, 16 KiB a frame, up to 64 MiB.
        let mut payload = vec![];
        while payload.len() < 16 * 1024 - 80 {
            payload.extend_from_slice(&[0x00, 0x07]);
            payload.extend_from_slice(b"x-flood");
            payload.extend_from_slice(&[0x40]);
            payload.extend_from_slice(&[b'a'; 64]);
        }
        let cont = frame(CONTINUATION, 0, 1, &payload);
        for _ in 0..4096 {
            if tokio::time::timeout(Duration::from_secs(5), s.write_all(&cont))
                .await
                .map_or(true, |r| r.is_err())
            {
                break;
            }
            sent += cont.len() as u64;
        }
        sent
    })
    .await;
    report("CONTINUATION flood", r);

    // SETTINGS and PING floods from a client that never reads the answers.
    let r = under_attack(&mesh, |proxy| async move {
        let mut s = TcpStream::connect(proxy).await.unwrap();
        let mut sent = 0u64;
        let mut batch = PREFACE.to_vec();
        for i in 0..200_000u64 {
            if i % 2 == 0 {
                batch.extend(frame(PING, 0, 0, &i.to_be_bytes()));
            } else {
                batch.extend(frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]));
            }
            if batch.len() > 64 * 1024 {
                sent += batch.len() as u64;
                let w = tokio::time::timeout(Duration::from_secs(5), s.write_all(&batch)).await;
                if w.map_or(true, |r| r.is_err()) {
                    break; // cut off, or held back by TCP because the proxy stopped reading
                }
                batch.clear();
            }
        }
        sent
    })
    .await;
    report("SETTINGS and PING flood", r);

    // Slowloris: 300 connections that send a head one byte at a time and never finish it.
    let started = Instant::now();
    let r = under_attack(&mesh, |proxy| async move {
        let mut conns = vec![];
        for _ in 0..300 {
            if let Ok(s) = TcpStream::connect(proxy).await {
                conns.push(s);
            }
        }
        let mut sent = 0u64;
        let head = b"GET http://echo.demo.svc.clusterset.local/ HTTP/1.1\r\nX-Slow: ";
        let mut closed = 0;
        // Trickle for up to 20 s: the proxy's 10 s head timeout must close every one.
        for i in 0..200 {
            closed = 0;
            for s in conns.iter_mut() {
                let byte = head.get(i).copied().unwrap_or(b'a');
                if s.write_all(&[byte]).await.is_err() {
                    closed += 1;
                } else {
                    sent += 1;
                }
            }
            if closed == conns.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(closed, conns.len(), "slow heads were not cut off");
        sent
    })
    .await;
    println!(
        "slowloris: every slow connection was closed within {:?}",
        started.elapsed()
    );
    report("slowloris", r);
}
