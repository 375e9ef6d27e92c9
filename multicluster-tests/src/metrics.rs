//! Reading Prometheus text from admin endpoints.

use std::net::SocketAddr;

/// The Prometheus text of an admin endpoint.
pub async fn scrape(admin: SocketAddr) -> anyhow::Result<String> {
    let (status, body) = crate::client::plain_get(admin, "/metrics").await?;
    anyhow::ensure!(status == 200, "{admin}/metrics answered {status}");
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Sums the samples of `name` whose labels include every `key="value"` in `labels` (0 when
/// there are none).
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    // An empty f64 sum is -0.0, which prints as "-0".
    0.0 + text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let ok = labels
                .iter()
                .all(|(k, v)| label_text.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
            if ok {
                value.parse::<f64>().ok()
            } else {
                None
            }
        })
        .sum::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_matching_series() {
        let text =
            "# HELP x y\nstrait_requests_total{a=\"1\",b=\"2\"} 3\nstrait_requests_total{a=\"1\",b=\"3\"} 4\nother 9\n";
        assert_eq!(metric_sum(text, "strait_requests_total", &[("a", "1")]), 7.0);
        assert_eq!(metric_sum(text, "strait_requests_total", &[("b", "3")]), 4.0);
        assert_eq!(metric_sum(text, "other", &[]), 9.0);
    }
}
