//! Access logs: one line per request and per TCP connection, in Istio's default text format
//! (Envoy's fields in Envoy's order, then Strait's: trace id, both clusters, the peer's
//! identity) or as JSON with the same fields as snake_case keys. Lines are formatted and
//! written by a background task; the request path only tries to queue an entry, and a full
//! queue drops it and counts `strait_access_log_dropped_total`.

use std::time::{Duration, SystemTime};

use prometheus::{IntCounter, Registry};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Istio's default `accessLogFormat` (TEXT encoding).
    Text,
    /// `accessLogEncoding: JSON`.
    Json,
}

/// Entries that may wait for the writer before new ones are dropped.
const QUEUE: usize = 4096;

/// One request (or TCP connection) as logged. Empty strings print as `-`.
#[derive(Clone, Debug, Default)]
pub struct Entry {
    pub start_time: Option<SystemTime>,
    pub method: String,
    pub path: String,
    pub protocol: String,
    pub response_code: u16,
    pub response_flags: String,
    pub response_code_details: String,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration: Duration,
    pub upstream_service_time: Option<Duration>,
    pub x_forwarded_for: String,
    pub user_agent: String,
    pub request_id: String,
    pub authority: String,
    pub upstream_host: String,
    /// `outbound|<port>||<fqdn>` on the caller's side, `inbound|<port>||` on the server's.
    pub upstream_cluster: String,
    pub downstream_local_address: String,
    pub downstream_remote_address: String,
    pub route_name: String,
    pub trace_id: String,
    pub source_cluster: String,
    pub destination_cluster: String,
    /// The other side's SPIFFE id: the server's for a client, the caller's for a server.
    pub peer_principal: String,
}

fn dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

/// RFC 3339 in UTC with milliseconds, as Envoy's `%START_TIME%`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

impl Entry {
    fn upstream_time(&self) -> String {
        self.upstream_service_time
            .map(|d| d.as_millis().to_string())
            .unwrap_or_default()
    }

    /// Istio's default TEXT line, then ` "<trace id>" <source cluster> <destination cluster>
    /// "<peer principal>"`.
    pub fn text(&self) -> String {
        let start = self.start_time.map(rfc3339).unwrap_or_default();
        format!(
            "[{}] \"{} {} {}\" {} {} {} - \"-\" {} {} {} {} \"{}\" \"{}\" \"{}\" \"{}\" \"{}\" {} - {} {} - {} \"{}\" {} {} \"{}\"",
            dash(&start),
            dash(&self.method),
            dash(&self.path),
            dash(&self.protocol),
            self.response_code,
            dash(&self.response_flags),
            dash(&self.response_code_details),
            self.bytes_received,
            self.bytes_sent,
            self.duration.as_millis(),
            dash(&self.upstream_time()),
            dash(&self.x_forwarded_for),
            dash(&self.user_agent),
            dash(&self.request_id),
            dash(&self.authority),
            dash(&self.upstream_host),
            dash(&self.upstream_cluster),
            dash(&self.downstream_local_address),
            dash(&self.downstream_remote_address),
            dash(&self.route_name),
            dash(&self.trace_id),
            dash(&self.source_cluster),
            dash(&self.destination_cluster),
            dash(&self.peer_principal),
        )
    }

    /// The same fields as one JSON object, Istio's snake_case keys, in the same order.
    pub fn json(&self) -> String {
        let start = self.start_time.map(rfc3339).unwrap_or_default();
        let fields: [(&str, serde_json::Value); 24] = [
            ("start_time", start.into()),
            ("method", self.method.as_str().into()),
            ("path", self.path.as_str().into()),
            ("protocol", self.protocol.as_str().into()),
            ("response_code", self.response_code.into()),
            ("response_flags", self.response_flags.as_str().into()),
            ("response_code_details", self.response_code_details.as_str().into()),
            ("bytes_received", self.bytes_received.into()),
            ("bytes_sent", self.bytes_sent.into()),
            ("duration", (self.duration.as_millis() as u64).into()),
            (
                "upstream_service_time",
                self.upstream_service_time.map(|d| d.as_millis() as u64).into(),
            ),
            ("x_forwarded_for", self.x_forwarded_for.as_str().into()),
            ("user_agent", self.user_agent.as_str().into()),
            ("request_id", self.request_id.as_str().into()),
            ("authority", self.authority.as_str().into()),
            ("upstream_host", self.upstream_host.as_str().into()),
            ("upstream_cluster", self.upstream_cluster.as_str().into()),
            (
                "downstream_local_address",
                self.downstream_local_address.as_str().into(),
            ),
            (
                "downstream_remote_address",
                self.downstream_remote_address.as_str().into(),
            ),
            ("route_name", self.route_name.as_str().into()),
            ("trace_id", self.trace_id.as_str().into()),
            ("source_cluster", self.source_cluster.as_str().into()),
            ("destination_cluster", self.destination_cluster.as_str().into()),
            ("peer_principal", self.peer_principal.as_str().into()),
        ];
        // Empty strings are null, as Envoy writes an absent value in JSON.
        let mut out = String::from("{");
        for (i, (k, v)) in fields.into_iter().enumerate() {
            let v = match v {
                serde_json::Value::String(s) if s.is_empty() => serde_json::Value::Null,
                v => v,
            };
            if i > 0 {
                out.push(',');
            }
            out.push_str(&format!("\"{k}\":{v}"));
        }
        out.push('}');
        out
    }
}

/// The proxy's access log: a bounded queue to a writer task on stdout.
#[derive(Clone, Debug)]
pub struct AccessLog {
    queue: Option<mpsc::Sender<Entry>>,
    dropped: IntCounter,
}

impl AccessLog {
    pub fn new(format: Option<LogFormat>, registry: &Registry) -> Self {
        let dropped = IntCounter::new(
            "strait_access_log_dropped_total",
            "Access log entries dropped because the writer fell behind (the request was not held up)",
        )
        .expect("valid metric");
        let _ = registry.register(Box::new(dropped.clone()));
        let Some(format) = format else {
            return AccessLog { queue: None, dropped };
        };
        let (tx, mut rx) = mpsc::channel::<Entry>(QUEUE);
        tokio::spawn(async move {
            let mut out = tokio::io::stdout();
            let mut buf = String::new();
            while let Some(e) = rx.recv().await {
                buf.clear();
                // Whatever else is queued goes out in the same write.
                let mut next = Some(e);
                while let Some(e) = next {
                    buf.push_str(&match format {
                        LogFormat::Text => e.text(),
                        LogFormat::Json => e.json(),
                    });
                    buf.push('\n');
                    next = if buf.len() < 64 * 1024 {
                        rx.try_recv().ok()
                    } else {
                        None
                    };
                }
                if out.write_all(buf.as_bytes()).await.is_err() {
                    return;
                }
                let _ = out.flush().await;
            }
        });
        AccessLog {
            queue: Some(tx),
            dropped,
        }
    }

    pub fn enabled(&self) -> bool {
        self.queue.is_some()
    }

    /// Queues the entry `make` builds, only when logs are on; never waits.
    pub fn log_with(&self, make: impl FnOnce() -> Entry) {
        if self.enabled() {
            self.log(make());
        }
    }

    /// Queues one entry; never waits.
    pub fn log(&self, entry: Entry) {
        if let Some(q) = &self.queue {
            if q.try_send(entry).is_err() {
                self.dropped.inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_follows_istios_default_format_and_json_has_the_same_fields() {
        let e = Entry {
            start_time: Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_185_865_602)),
            method: "GET".into(),
            path: "/status/418".into(),
            protocol: "HTTP/1.1".into(),
            response_code: 418,
            response_flags: "-".into(),
            response_code_details: "via_upstream".into(),
            bytes_sent: 135,
            duration: Duration::from_millis(4),
            upstream_service_time: Some(Duration::from_millis(4)),
            user_agent: "curl/8.0".into(),
            request_id: "8496".into(),
            authority: "httpbin:8000".into(),
            upstream_host: "10.44.1.27:80".into(),
            upstream_cluster: "outbound|8000||httpbin.foo.svc.clusterset.local".into(),
            source_cluster: "east".into(),
            destination_cluster: "west".into(),
            ..Default::default()
        };
        assert_eq!(
            e.text(),
            "[2026-12-02T04:31:05.602Z] \"GET /status/418 HTTP/1.1\" 418 - via_upstream - \"-\" 0 135 4 4 \"-\" \"curl/8.0\" \"8496\" \
             \"httpbin:8000\" \"10.44.1.27:80\" outbound|8000||httpbin.foo.svc.clusterset.local - - - - - \"-\" east west \"-\""
        );
        let j: serde_json::Value = serde_json::from_str(&e.json()).unwrap();
        assert_eq!(j["response_code"], 418);
        assert_eq!(j["upstream_service_time"], 4);
        assert_eq!(j["x_forwarded_for"], serde_json::Value::Null);
        assert_eq!(j["destination_cluster"], "west");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
    }
}
