//! What Strait's two executables share: `strait` (every daemon and operator command) and
//! `strait-sidecar` (the sidecar proxy alone, so each pod's proxy maps less code; README,
//! "Scale and performance"). Both take the daemons' flags from [`daemons`] and start through
//! [`main`].

pub mod daemons;

use std::future::Future;

/// jemalloc instead of glibc's malloc: glibc keeps an arena per thread that allocated and
/// seldom gives their freed pages back, so a controller or proxy applying catalog updates on
/// several threads held two to four times its live data. In the 10-cluster simulator the
/// controller's RSS fell from 167 to 92 MiB (CPU 10.3 to 8.2 % of a core) and a sidecar's
/// from 72 to 47 MiB; the data path's CPU and RSS were unchanged (README, "Scale and
/// performance"). Its options (one arena, freed pages returned within a second) are compiled
/// in from `.cargo/config.toml`, which says why.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Logs to stderr through `filter` (tracing env-filter syntax; `info` if it does not parse).
pub fn init_tracing(filter: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(true)
        .try_init();
}

/// Runs `work` on a tokio runtime sized by [`worker_threads`] (`one_thread`: the daemon runs one
/// thread unless `STRAIT_WORKER_THREADS` says otherwise) and turns its outcome into the
/// process's exit code, printing the error chain.
pub fn main<F>(one_thread: bool, work: F) -> std::process::ExitCode
where
    F: Future<Output = anyhow::Result<()>>,
{
    let threads = match worker_threads(std::env::var("STRAIT_WORKER_THREADS").ok().as_deref(), one_thread) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let mut builder = match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// How many threads run tasks: `STRAIT_WORKER_THREADS` if set, else one for a sidecar and a
/// controller (`one_thread`), else `None`: one per CPU (the gateway, which carries all of its
/// cluster's cross-cluster traffic).
///
/// One thread is a single-threaded runtime, as Linkerd's proxy given one core: no waking
/// across threads. In the mesh bench a sidecar used 10-20 % less CPU per request; in the
/// clusterset bench a controller (one merge loop, the rest waiting on the network) about 20 %
/// less CPU (README, "Scale and performance").
fn worker_threads(env: Option<&str>, one_thread: bool) -> Result<Option<usize>, String> {
    match env.map(str::trim) {
        None | Some("") => Ok(one_thread.then_some(1)),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => Err(format!(
                "STRAIT_WORKER_THREADS={v:?} is not a number of threads: set a whole number, 1 or more \
                 (1 runs one thread, the sidecar's and the controller's default), or unset it (one per CPU \
                 for the gateway)"
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::worker_threads;

    #[test]
    fn sidecars_and_controllers_run_one_thread_unless_told_and_a_bad_count_is_refused_by_name() {
        assert_eq!(worker_threads(None, true), Ok(Some(1)));
        assert_eq!(worker_threads(None, false), Ok(None));
        assert_eq!(worker_threads(Some(""), false), Ok(None));
        assert_eq!(worker_threads(Some("4"), true), Ok(Some(4)));
        assert_eq!(worker_threads(Some(" 1 "), false), Ok(Some(1)));
        for bad in ["0", "two", "-1", "1.5"] {
            let e = worker_threads(Some(bad), true).unwrap_err();
            assert!(e.contains("STRAIT_WORKER_THREADS") && e.contains("whole number"), "{e}");
        }
    }
}
