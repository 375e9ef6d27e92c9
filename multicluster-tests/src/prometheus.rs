//! A real Prometheus server (Debian's `prometheus`; `./test.sh` installs it) scraping a running
//! mesh, queried over its HTTP API the way Kiali and Grafana query it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Prometheus {
    pub addr: SocketAddr,
    child: Child,
    dir: PathBuf,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (`/metrics` on each) every second, with its data in
    /// `dir`; waits until it answers.
    pub async fn start(dir: PathBuf, targets: &[SocketAddr]) -> anyhow::Result<Prometheus> {
        let bin = std::env::var("STRAIT_PROMETHEUS").unwrap_or_else(|_| "prometheus".into());
        std::fs::create_dir_all(&dir)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let list = targets.iter().map(|t| format!("'{t}'")).collect::<Vec<_>>().join(", ");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
                 scrape_configs:\n  - job_name: strait\n    metrics_path: /metrics\n    static_configs: [{{targets: [{list}]}}]\n"
            ),
        )?;
        let log = std::fs::File::create(dir.join("prometheus.log"))?;
        let child = Command::new(&bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| anyhow::anyhow!("{bin}: {e} (Debian: apt-get install prometheus; ./test.sh installs it)"))?;
        let p = Prometheus { addr, child, dir };
        crate::Mesh::eventually("prometheus ready", Duration::from_secs(30), || async {
            matches!(crate::client::plain_get(addr, "/-/ready").await, Ok((200, _)))
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}; log: {}", p.dir.join("prometheus.log").display()))?;
        Ok(p)
    }

    /// Runs an instant query; returns the result vector (each `{metric: {...}, value: [t, "v"]}`).
    pub async fn query(&self, promql: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let (status, body) = crate::client::plain_get(
            self.addr,
            &format!("/api/v1/query?query={}", strait_api::admin::percent_encode(promql)),
        )
        .await?;
        let v: serde_json::Value = serde_json::from_slice(&body)?;
        anyhow::ensure!(status == 200 && v["status"] == "success", "{promql}: {status} {v}");
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// Whether every target is up (scraped without error).
    pub async fn all_up(&self) -> bool {
        match self.query("up == 0").await {
            Ok(down) => down.is_empty() && !self.query("up").await.unwrap_or_default().is_empty(),
            Err(_) => false,
        }
    }
}

/// The value of one result of an instant query.
pub fn value(sample: &serde_json::Value) -> f64 {
    sample["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
