//! The figures a benchmark prints, also written as one JSON document so runs can be compared
//! by scripts: `target/strait-bench/<name>.json` (the cargo target directory of the running
//! benchmark, or `CARGO_TARGET_DIR`).
//!
//! ```json
//! {"bench": "mesh", "unix_time": 1796000000, "machine": {"cpus": 2, "kernel": "6.1.0"},
//!  "figures": {"pair.added_p99": {"value": 0.31, "unit": "ms"}, ...},
//!  "ratios": {"pair.added_p99.strait_over_haproxy": {"value": 0.9, "goal_at_most": 1.0}}}
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{json, Value};

pub struct Figures {
    name: String,
    figures: BTreeMap<String, Value>,
    ratios: BTreeMap<String, Value>,
}

impl Figures {
    pub fn new(name: &str) -> Self {
        Figures {
            name: name.to_string(),
            figures: BTreeMap::new(),
            ratios: BTreeMap::new(),
        }
    }

    /// One measured figure with its unit (`ms`, `MB/s`, `MiB`, `s/1000 req`, ...).
    pub fn add(&mut self, key: &str, value: f64, unit: &str) {
        self.figures
            .insert(key.to_string(), json!({"value": finite(value), "unit": unit}));
    }

    /// A ratio of two figures of this run, with the goal it is held to (`None`: no goal).
    pub fn ratio(&mut self, key: &str, value: f64, goal_at_most: Option<f64>) {
        let mut v = json!({"value": finite(value)});
        if let Some(g) = goal_at_most {
            v["goal_at_most"] = json!(g);
        }
        self.ratios.insert(key.to_string(), v);
    }

    /// A ratio whose goal is a floor (`value >= goal_at_least`).
    pub fn ratio_at_least(&mut self, key: &str, value: f64, goal_at_least: f64) {
        self.ratios.insert(
            key.to_string(),
            json!({"value": finite(value), "goal_at_least": goal_at_least}),
        );
    }

    pub fn to_json(&self) -> Value {
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        json!({
            "bench": self.name,
            "unix_time": unix,
            "machine": {
                "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
                "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            },
            "figures": self.figures,
            "ratios": self.ratios,
        })
    }

    /// Writes the document and says where; a failure to write is reported, not fatal.
    pub fn write(&self) -> Option<PathBuf> {
        let dir = target_dir().join("strait-bench");
        let path = dir.join(format!("{}.json", self.name));
        let body = serde_json::to_string_pretty(&self.to_json()).unwrap_or_default();
        match std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, body)) {
            Ok(()) => {
                println!("\nfigures written to {}", path.display());
                Some(path)
            }
            Err(e) => {
                eprintln!("cannot write {}: {e}", path.display());
                None
            }
        }
    }
}

/// JSON has no NaN or infinity: a figure that could not be measured is null.
fn finite(v: f64) -> Value {
    if v.is_finite() {
        json!(v)
    } else {
        Value::Null
    }
}

/// `CARGO_TARGET_DIR`, or the target directory the running benchmark was built in
/// (`<target>/release/deps/<bench>`).
fn target_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(d);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("target"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_carries_units_goals_and_no_nan() {
        let mut f = Figures::new("unit");
        f.add("a.p99", 0.25, "ms");
        f.add("b.missing", f64::NAN, "ms");
        f.ratio("a.over_peer", 0.8, Some(1.0));
        f.ratio_at_least("quic.over_tcp", 1.2, 1.0);
        let v = f.to_json();
        assert_eq!(v["bench"], "unit");
        assert_eq!(v["figures"]["a.p99"]["unit"], "ms");
        assert_eq!(v["figures"]["a.p99"]["value"], 0.25);
        assert!(v["figures"]["b.missing"]["value"].is_null());
        assert_eq!(v["ratios"]["a.over_peer"]["goal_at_most"], 1.0);
        assert_eq!(v["ratios"]["quic.over_tcp"]["goal_at_least"], 1.0);
        assert!(v["machine"]["cpus"].as_u64().unwrap() >= 1);
    }
}
