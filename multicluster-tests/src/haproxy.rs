//! A peer to measure Strait against, in the same run: a pair of HAProxy processes (Debian's
//! `haproxy`) as a mutual-TLS proxy pair in front of the same app — the caller's proxy takes
//! plain HTTP/1.1 and opens TLS 1.3 with a client certificate to the destination's proxy,
//! which requires and verifies it (one CA, certificates made with `openssl`) and forwards
//! plain HTTP to the app. Keep-alive and connection reuse on both hops, as the sidecars have.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct HaproxyPair {
    /// Where the caller sends its requests (plain HTTP, the app's Host header).
    pub front: SocketAddr,
    pub caller: Child,
    pub destination: Child,
    pub version: String,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl").current_dir(dir).args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A CA and two P-256 leaf certificates (`server`, `client`) signed by it, as HAProxy's PEM
/// bundles (certificate then key).
fn certificates(dir: &Path) -> anyhow::Result<()> {
    let curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let mut ca = vec!["req", "-x509"];
    ca.extend(curve);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=bench-ca",
    ]);
    openssl(dir, &ca)?;
    for name in ["server", "client"] {
        let (key, csr, crt) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"));
        let subject = format!("/CN={name}");
        let mut req = vec!["req"];
        req.extend(curve);
        req.extend(["-keyout", &key, "-out", &csr, "-subj", &subject]);
        openssl(dir, &req)?;
        let ext = dir.join(format!("{name}.ext"));
        std::fs::write(&ext, format!("subjectAltName=DNS:{name}\n"))?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ],
        )?;
        let pem = format!(
            "{}{}",
            std::fs::read_to_string(dir.join(&crt))?,
            std::fs::read_to_string(dir.join(&key))?
        );
        std::fs::write(dir.join(format!("{name}.pem")), pem)?;
    }
    Ok(())
}

fn spawn(bin: &str, config: &Path, log: &Path) -> anyhow::Result<Child> {
    Command::new(bin)
        .arg("-db")
        .arg("-f")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .map_err(|e| anyhow::anyhow!("{bin}: {e} (Debian: apt-get install haproxy)"))
}

/// Installs Debian's `haproxy` package when no `haproxy` runs here (the benchmark's peer); a
/// `STRAIT_HAPROXY` of the operator's is left as it is.
fn ensure_installed(bin: &str) -> anyhow::Result<()> {
    if bin != "haproxy" {
        return Ok(());
    }
    crate::load::install_debian_package("haproxy", "-v", "haproxy", "the benchmark's peer")
        .map_err(|e| anyhow::anyhow!("{e}, or set STRAIT_HAPROXY"))
}

impl HaproxyPair {
    /// Starts the pair in front of `app`, with certificates and configs in `dir`; waits until
    /// a request passes through both.
    pub async fn start(dir: PathBuf, app: SocketAddr) -> anyhow::Result<HaproxyPair> {
        let bin = std::env::var("STRAIT_HAPROXY").unwrap_or_else(|_| "haproxy".into());
        ensure_installed(&bin)?;
        std::fs::create_dir_all(&dir)?;
        certificates(&dir)?;
        let (front, back) = (free_port()?, free_port()?);
        let defaults = "defaults\n  mode http\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n  \
                        option http-keep-alive\n  http-reuse always\n";
        let d = dir.display();
        let caller = dir.join("caller.cfg");
        std::fs::write(
            &caller,
            format!(
                "global\n  maxconn 8192\n{defaults}frontend outbound\n  bind 127.0.0.1:{front}\n  default_backend peer\n\
                 backend peer\n  server peer 127.0.0.1:{back} ssl crt {d}/client.pem ca-file {d}/ca.pem verify required \
                 verifyhost server sni str(server) ssl-min-ver TLSv1.3\n"
            ),
        )?;
        let destination = dir.join("destination.cfg");
        std::fs::write(
            &destination,
            format!(
                "global\n  maxconn 8192\n{defaults}frontend inbound\n  bind 127.0.0.1:{back} ssl crt {d}/server.pem \
                 ca-file {d}/ca.pem verify required ssl-min-ver TLSv1.3\n  default_backend app\n\
                 backend app\n  server app {app}\n"
            ),
        )?;
        let version = Command::new(&bin)
            .arg("-v")
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string()
            })
            .unwrap_or_default();
        let pair = HaproxyPair {
            front: format!("127.0.0.1:{front}").parse()?,
            caller: spawn(&bin, &caller, &dir.join("caller.log"))?,
            destination: spawn(&bin, &destination, &dir.join("destination.log"))?,
            version,
        };
        let url = format!("http://{app}/");
        crate::Mesh::eventually("the HAProxy pair passes a request", Duration::from_secs(10), || {
            let url = url.clone();
            let front = pair.front;
            async move { matches!(crate::client::get_via(front, &url).await, Ok((200, _))) }
        })
        .await?;
        Ok(pair)
    }

    pub fn pids(&self) -> [u32; 2] {
        [self.caller.id(), self.destination.id()]
    }
}

impl Drop for HaproxyPair {
    fn drop(&mut self) {
        for c in [&mut self.caller, &mut self.destination] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// CPU time a process has used so far (user + system), from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: u32) -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    let ticks = *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    });
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces) in parentheses.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / ticks)
        })
        .unwrap_or_default()
}
