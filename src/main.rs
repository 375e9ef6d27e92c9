//! `strait`: every daemon and every operator command in one executable.

mod cmd;
mod install;
mod up;

/// jemalloc instead of glibc's malloc: glibc keeps an arena per thread that allocated and
/// seldom gives their freed pages back, so a controller or proxy applying catalog updates on
/// several threads held two to four times its live data. In the 10-cluster simulator the
/// controller's RSS fell from 167 to 92 MiB (CPU 10.3 to 8.2 % of a core) and a sidecar's
/// from 72 to 47 MiB; the data path's CPU and RSS were unchanged (README, "Scale and
/// performance"). Its options (one arena, freed pages returned within a second) are compiled
/// in from `.cargo/config.toml`, which says why.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
