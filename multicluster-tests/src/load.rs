//! Load generation and process measurements for the benchmarks (they print figures; nothing
//! here asserts on time). A benchmark fails loudly on a broken setup, so it unwraps.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

pub const RATE: u32 = 1_000;
pub const CONNECTIONS: usize = 16;
pub const BODY: usize = 1024;

pub struct Latencies(pub Vec<Duration>);

impl Latencies {
    pub fn pct(&self, p: f64) -> Duration {
        let mut v = self.0.clone();
        v.sort();
        percentile(&v, p)
    }
}

/// The `p` quantile (0..=1) of durations already sorted; zero when there are none.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    match sorted.len() {
        0 => Duration::ZERO,
        n => sorted[((n as f64 * p) as usize).min(n - 1)],
    }
}

/// Open-loop load: requests become due every 1/RATE s; a dedicated OS thread releases each at
/// its due time (thread sleeps are precise to tens of microseconds, tokio's timer only to a
/// millisecond); 16 keep-alive connections take them in order; latency runs from the due time
/// to the full response, so queueing behind a slow request counts.
pub async fn load(target: SocketAddr, url: &str, absolute: bool, seconds: u64) -> (Latencies, usize) {
    let mut streams = vec![];
    for _ in 0..CONNECTIONS {
        let stream = tokio::net::TcpStream::connect(target).await.unwrap();
        stream.set_nodelay(true).unwrap();
        streams.push(stream);
    }
    load_over(streams, url, absolute, RATE, RATE as u64 * seconds).await
}

/// [`load`]'s open loop at `rate` requests/s, `total` requests, over connections the caller
/// opened (one keep-alive HTTP/1.1 connection each).
pub async fn load_over(
    streams: Vec<tokio::net::TcpStream>,
    url: &str,
    absolute: bool,
    rate: u32,
    total: u64,
) -> (Latencies, usize) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let body = Bytes::from(vec![b'x'; BODY]);
    let uri: String = if absolute {
        url.to_string()
    } else {
        url.parse::<hyper::Uri>().unwrap().path().to_string()
    };
    let host = url.parse::<hyper::Uri>().unwrap().authority().unwrap().to_string();
    let mut workers = vec![];
    for stream in streams {
        let rx = rx.clone();
        let body = body.clone();
        let uri = uri.clone();
        let host = host.clone();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        workers.push(tokio::spawn(async move {
            let mut lat = vec![];
            let mut errors = 0;
            loop {
                let next = rx.lock().await.recv().await;
                let Some(due) = next else { break };
                let req = hyper::Request::post(&uri)
                    .header(hyper::header::HOST, &host)
                    .body(Full::new(body.clone()))
                    .unwrap();
                match sender.send_request(req).await {
                    Ok(resp) if resp.status().is_success() => {
                        let _ = resp.into_body().collect().await;
                        lat.push(due.elapsed());
                    }
                    _ => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let dispatcher = std::thread::spawn(move || {
        let start = Instant::now();
        let interval = Duration::from_secs_f64(1.0 / rate as f64);
        for i in 0..total {
            let due = start + interval * i as u32;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if tx.send(due).is_err() {
                return;
            }
        }
    });
    let mut all = vec![];
    let mut errors = 0;
    for w in workers {
        let (l, e) = w.await.unwrap();
        all.extend(l);
        errors += e;
    }
    let _ = dispatcher.join();
    (Latencies(all), errors)
}

/// The sum of the named KiB fields of a `/proc/<pid>/<file>` (0 if the process is gone).
fn proc_kib(pid: u32, file: &str, fields: &[&str]) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_default()
        .lines()
        .filter(|l| fields.iter().any(|f| l.starts_with(f)))
        .filter_map(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .sum()
}

/// Resident memory now, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    proc_kib(pid, "status", &["VmRSS:"])
}

/// Resident memory this process alone holds, KiB: its private pages (heap, stacks, and
/// pages of its files no other process has touched), from `/proc/<pid>/smaps_rollup`.
/// Unlike RSS it leaves out the executable's text shared with every other process
/// running the same binary, which is what each additional proxy on a node costs.
pub fn private_kib(pid: u32) -> u64 {
    proc_kib(pid, "smaps_rollup", &["Private_Clean:", "Private_Dirty:"])
}

/// Peak resident memory, KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    proc_kib(pid, "status", &["VmHWM:"])
}

/// Installs Debian's `package` when `bin probe_arg` does not run here: the benchmarks install
/// their peers and load generators themselves, as `./test.sh` installs what the tests need,
/// with apt-get as root, else through sudo.
pub fn install_debian_package(bin: &str, probe_arg: &str, package: &str, purpose: &str) -> anyhow::Result<()> {
    let runs = || {
        std::process::Command::new(bin)
            .arg(probe_arg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok()
    };
    if runs() {
        return Ok(());
    }
    eprintln!("installing Debian's {package} (apt-get install {package}), {purpose}");
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let apt = |args: &[&str]| -> anyhow::Result<()> {
        let mut cmd = if root {
            std::process::Command::new("apt-get")
        } else {
            std::process::Command::new("sudo")
        };
        if !root {
            cmd.arg("apt-get");
        }
        let status = cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive").status()?;
        anyhow::ensure!(status.success(), "apt-get {} failed ({status})", args.join(" "));
        Ok(())
    };
    apt(&["update", "-qq"])
        .and_then(|()| apt(&["install", "-y", "-qq", package]))
        .map_err(|e| anyhow::anyhow!("cannot install {package}: {e} (Debian: apt-get install {package})"))?;
    anyhow::ensure!(runs(), "{package} was installed but {bin} does not run");
    Ok(())
}

/// The `--flag value` pairs a bench was given after `--` (`cargo bench` adds `--bench`
/// itself, which is skipped).
pub fn bench_flags() -> Vec<(String, String)> {
    let mut argv = std::env::args().skip(1).filter(|a| a != "--bench");
    let mut flags = vec![];
    while let Some(flag) = argv.next() {
        flags.push((flag, argv.next().unwrap_or_default()));
    }
    flags
}

/// `value` parsed as flag `flag`'s, or a stop that names the flag.
pub fn flag_value<T: std::str::FromStr>(flag: &str, value: &str) -> T {
    value
        .parse()
        .unwrap_or_else(|_| panic!("{flag} needs a number, got {value:?}"))
}

/// Points the mesh fixture at the release binary next to the running benchmark (unless
/// `STRAIT_BIN` says otherwise) and returns the seconds per run (`STRAIT_BENCH_SECONDS`,
/// default 10).
pub fn bench_setup() -> u64 {
    if std::env::var_os("STRAIT_BIN").is_none() {
        let exe = std::env::current_exe().unwrap();
        let release = exe.parent().unwrap().parent().unwrap().join("strait");
        assert!(
            release.exists() && release.with_file_name("strait-sidecar").exists(),
            "build the release binaries first: cargo build --release --bin strait --bin strait-sidecar"
        );
        std::env::set_var("STRAIT_BIN", &release);
    }
    std::env::var("STRAIT_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10)
}
