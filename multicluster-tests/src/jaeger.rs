//! A real trace backend: Jaeger (v2, the OpenTelemetry-Collector-based all-in-one from the Go
//! module `github.com/jaegertracing/jaeger` v1.76.0, built and cached by `./test.sh`), with
//! in-memory storage, receiving OTLP/HTTP on 127.0.0.1:4318 and answering its query API on
//! 127.0.0.1:16686.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Jaeger {
    child: Child,
    pub query: SocketAddr,
}

/// Where spans go: Jaeger's OTLP/HTTP receiver.
pub const OTLP_ENDPOINT: &str = "http://127.0.0.1:4318/v1/traces";

impl Jaeger {
    /// Starts Jaeger (`STRAIT_JAEGER`, else the cached build) logging into `dir`, and waits
    /// until its query API answers.
    pub async fn start(dir: &Path) -> anyhow::Result<Jaeger> {
        let bin = std::env::var("STRAIT_JAEGER").unwrap_or_else(|_| {
            format!(
                "{}/.cache/strait/bin/jaeger-v1.76.0",
                std::env::var("HOME").unwrap_or_default()
            )
        });
        std::fs::create_dir_all(dir)?;
        let log = std::fs::File::create(dir.join("jaeger.log"))?;
        let child = Command::new(&bin)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| anyhow::anyhow!("{bin}: {e} (./test.sh builds Jaeger; or set STRAIT_JAEGER)"))?;
        let j = Jaeger {
            child,
            query: "127.0.0.1:16686".parse()?,
        };
        let query = j.query;
        crate::Mesh::eventually("jaeger's query API", Duration::from_secs(60), || async move {
            matches!(crate::client::plain_get(query, "/api/services").await, Ok((200, _)))
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}; log: {}", dir.join("jaeger.log").display()))?;
        // What answered must be this Jaeger, not another one holding its ports.
        let mut j = j;
        if let Ok(Some(status)) = j.child.try_wait() {
            anyhow::bail!(
                "jaeger exited ({status}); is another one using 127.0.0.1:4318/16686? log: {}",
                dir.join("jaeger.log").display()
            );
        }
        Ok(j)
    }

    /// The spans of one trace (Jaeger's JSON: each with `spanID`, `operationName`,
    /// `references`, `tags`, and `serviceName` copied in from its process); empty if unknown.
    pub async fn trace(&self, trace_id: &str) -> Vec<serde_json::Value> {
        let Ok((200, body)) = crate::client::plain_get(self.query, &format!("/api/traces/{trace_id}")).await else {
            return vec![];
        };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) else {
            return vec![];
        };
        let mut spans = vec![];
        for t in v["data"].as_array().into_iter().flatten() {
            for s in t["spans"].as_array().into_iter().flatten() {
                let mut s = s.clone();
                let process = s["processID"].as_str().unwrap_or_default().to_string();
                s["serviceName"] = t["processes"][&process]["serviceName"].clone();
                spans.push(s);
            }
        }
        spans
    }
}

/// A span's tag value, as a string.
pub fn tag(span: &serde_json::Value, key: &str) -> String {
    span["tags"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| t["key"] == key)
        .map(|t| match &t["value"] {
            serde_json::Value::String(s) => s.clone(),
            v => v.to_string(),
        })
        .unwrap_or_default()
}

/// The span id a span's CHILD_OF reference names.
pub fn parent(span: &serde_json::Value) -> String {
    span["references"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["refType"] == "CHILD_OF")
        .and_then(|r| r["spanID"].as_str())
        .unwrap_or_default()
        .to_string()
}

impl Drop for Jaeger {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
