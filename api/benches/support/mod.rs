//! What the benchmarks of this crate share: their figures written as one JSON document,
//! `target/strait-bench/<name>.json`, in the format of the other benchmarks' documents
//! (`multicluster-tests/src/figures.rs`, which this crate cannot depend on).

/// Writes figures (key, value, unit) and ratios (key, value) and says where; a failure to
/// write is reported, not fatal.
pub fn write_json(name: &str, figures: &[(String, f64, &'static str)], ratios: &[(String, f64)]) {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|exe| exe.ancestors().nth(3).map(std::path::PathBuf::from))
        })
        .unwrap_or_else(|| "target".into())
        .join("strait-bench");
    // JSON has no NaN or infinity: a figure that could not be measured is null.
    let finite = |v: f64| {
        if v.is_finite() {
            serde_json::json!(v)
        } else {
            serde_json::Value::Null
        }
    };
    let doc = serde_json::json!({
        "bench": name,
        "unix_time": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default(),
        "machine": {
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        },
        "figures": figures
            .iter()
            .map(|(k, v, unit)| (k.clone(), serde_json::json!({"value": finite(*v), "unit": unit})))
            .collect::<serde_json::Map<_, _>>(),
        "ratios": ratios
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::json!({"value": finite(*v)})))
            .collect::<serde_json::Map<_, _>>(),
    });
    let path = dir.join(format!("{name}.json"));
    match std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap_or_default()))
    {
        Ok(()) => println!("\nfigures written to {}", path.display()),
        Err(e) => eprintln!("cannot write {}: {e}", path.display()),
    }
}
