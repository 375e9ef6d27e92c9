//! `strait`: every daemon and every operator command in one executable.

mod cmd;
mod install;
mod up;

fn main() -> std::process::ExitCode {
    let cli = cmd::parse();
    cmd::init_tracing(&cli);
    // `STRAIT_WORKER_THREADS`: how many threads run tasks (default: one per CPU). A sidecar
    // given one CPU or less does better with 1 (less cross-thread waking; see the README's
    // "Scale and performance").
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = std::env::var("STRAIT_WORKER_THREADS").ok().and_then(|v| v.parse().ok()) {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cmd::dispatch(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
