//! The processes `strait up` starts: each component its own OS process, logging to a file,
//! tied to this one through its stdin so nothing outlives a killed `strait up`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::cmd::{EXIT_WITH_PARENT_ENV, JOIN_TOKEN_ENV};

pub struct Proc {
    pub name: String,
    pub pid: u32,
    /// The executable (`strait`, `strait-sidecar`, etcd, ...), even when started behind a prefix.
    pub program: PathBuf,
    pub args: Vec<String>,
    pub log: PathBuf,
    /// The user's own program (a topology `command`): its exit is reported, not fatal.
    pub user: bool,
    child: Child,
}

impl Proc {
    /// Whether the process has exited (and how), without waiting.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            _ => None,
        }
    }

    /// If the process has exited: an error that names it, says how it ended and `when`, and
    /// quotes the end of its log (where a daemon says why it gave up).
    pub fn exit_error(&mut self, when: &str) -> Option<anyhow::Error> {
        let status = self.exited()?;
        Some(anyhow::anyhow!(
            "{} exited ({status}) {when}; see {}{}",
            self.name,
            self.log.display(),
            log_tail(&self.log, 5)
        ))
    }
}

/// The last `n` non-empty lines of a log, each on its own indented line after a newline (or
/// nothing when the log is empty or unreadable). Reads at most the file's last 8 KiB.
pub fn log_tail(log: &Path, n: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut buf = vec![];
    if let Ok(mut f) = std::fs::File::open(log) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(8192)));
        let _ = f.read_to_end(&mut buf);
    }
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| format!("\n  | {l}"))
        .collect()
}

/// Starts `program <args>` (`strait` or `strait-sidecar`) behind a command prefix (`ip netns
/// exec NS [setpriv ...]`, or none).
pub fn spawn_in(
    name: &str,
    prefix: &[String],
    program: &Path,
    args: Vec<String>,
    token: Option<&str>,
    log: &Path,
    log_filter: &str,
) -> anyhow::Result<Proc> {
    let mut proc = match prefix.split_first() {
        None => spawn_with(name, program, args, token, log, log_filter)?,
        Some((exe, rest)) => {
            let mut full: Vec<String> = rest.to_vec();
            full.push(program.display().to_string());
            full.extend(args);
            spawn_with(name, Path::new(exe), full, token, log, log_filter)?
        }
    };
    proc.program = program.to_path_buf();
    Ok(proc)
}

/// The sidecar proxy alone, built beside `strait` (src/bin/strait-sidecar.rs).
pub const SIDECAR_EXE: &str = "strait-sidecar";

/// What `strait up` runs sidecars as: `strait-sidecar` beside this executable when it is there
/// (the same proxy without the controller, the Kubernetes client and the operator commands, so
/// each sidecar maps about half the code: README, "Scale and performance"), else this
/// executable's `sidecar` command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SidecarProgram {
    pub exe: PathBuf,
    /// The words before the sidecar's flags: `sidecar` for `strait`, none for `strait-sidecar`.
    pub command: Vec<String>,
}

impl SidecarProgram {
    /// `strait-sidecar` beside `strait` if it exists, else `strait sidecar` and a line saying
    /// how to build the smaller one.
    pub fn beside(strait: &Path) -> (Self, Option<String>) {
        let alone = strait.with_file_name(SIDECAR_EXE);
        if alone.is_file() {
            return (
                Self {
                    exe: alone,
                    command: vec![],
                },
                None,
            );
        }
        (
            Self {
                exe: strait.to_path_buf(),
                command: vec!["sidecar".into()],
            },
            Some(format!(
                "sidecars run as `strait sidecar`: {} is not there (cargo build --release --bin {SIDECAR_EXE} \
                 builds it; each sidecar then maps about half the code)",
                alone.display()
            )),
        )
    }

    /// Under `cargo run` of this package, builds `strait-sidecar` with the same profile first
    /// (a no-op when it is up to date), so a changed tree never runs an older sidecar beside a
    /// newer `strait`; then as [`SidecarProgram::beside`].
    pub async fn find(strait: &Path, progress: impl Fn(String)) -> (Self, Option<String>) {
        if let Some(build) = cargo_build_args(
            strait,
            std::env::var_os("CARGO").map(PathBuf::from),
            std::env::var("CARGO_PKG_NAME").ok().as_deref(),
            std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from),
        ) {
            progress(format!(
                "building {SIDECAR_EXE}, the sidecar proxy alone ({})",
                build.join(" ")
            ));
            let (cargo, args) = build.split_first().expect("cargo_build_args starts with cargo");
            let mut command = Command::new(cargo);
            command.args(args).stdin(Stdio::null());
            // What `cargo run` set for this process is not the user's environment: a build
            // script that watches one of them (ring watches CARGO_MANIFEST_DIR) would rebuild,
            // and the next `cargo run` rebuild it back.
            for (name, _) in std::env::vars_os() {
                if name.to_str().is_some_and(set_by_cargo_run) {
                    command.env_remove(name);
                }
            }
            match command.status().await {
                Ok(status) if status.success() => {}
                Ok(status) => progress(format!("building {SIDECAR_EXE} failed ({status})")),
                Err(e) => progress(format!("cannot run {cargo}: {e}")),
            }
        }
        Self::beside(strait)
    }
}

/// The variables `cargo run` sets for the program it runs (`CARGO` too: the build is started
/// by its path).
fn set_by_cargo_run(name: &str) -> bool {
    name.starts_with("CARGO_PKG_")
        || matches!(
            name,
            "CARGO"
                | "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "OUT_DIR"
        )
}

/// The `cargo build` that makes `strait-sidecar` beside `strait` when `strait` was started by
/// `cargo run` of this package (cargo sets `CARGO`, `CARGO_PKG_NAME` and `CARGO_MANIFEST_DIR`
/// for what it runs); the profile is the directory `strait` sits in, and the target directory
/// (and target, if one was given) where that directory is, so a `--target-dir` or `--target`
/// given to `cargo run` is kept: the nested build writes where `strait` was built, and never
/// leaves an older `strait-sidecar` there to be run.
fn cargo_build_args(
    strait: &Path,
    cargo: Option<PathBuf>,
    package: Option<&str>,
    manifest_dir: Option<PathBuf>,
) -> Option<Vec<String>> {
    let (cargo, manifest_dir) = (cargo?, manifest_dir?);
    if package != Some(env!("CARGO_PKG_NAME")) {
        return None;
    }
    let profile = strait.parent()?.file_name()?.to_str()?;
    let mut args = vec![
        cargo.display().to_string(),
        "build".into(),
        "--manifest-path".into(),
        manifest_dir.join("Cargo.toml").display().to_string(),
        "--bin".into(),
        SIDECAR_EXE.into(),
    ];
    match profile {
        "debug" => {}
        "release" => args.push("--release".into()),
        other => args.extend(["--profile".into(), other.to_string()]),
    }
    let (target_dir, triple) = target_of(strait)?;
    if let Some(triple) = triple {
        args.extend(["--target".into(), triple]);
    }
    args.extend(["--target-dir".into(), target_dir.display().to_string()]);
    Some(args)
}

/// The target directory an executable built by cargo sits in, and its target triple if it
/// was built with `--target`: `<dir>/<profile>/strait` or `<dir>/<triple>/<profile>/strait`,
/// told apart by the `CACHEDIR.TAG` cargo writes at the top of every target directory (the
/// first layout when neither has one).
fn target_of(strait: &Path) -> Option<(PathBuf, Option<String>)> {
    let above_profile = strait.parent()?.parent()?;
    let tagged = |dir: &Path| dir.join("CACHEDIR.TAG").is_file();
    if !tagged(above_profile) {
        if let (Some(root), Some(triple)) = (above_profile.parent(), above_profile.file_name()) {
            if tagged(root) {
                return Some((root.to_path_buf(), Some(triple.to_str()?.to_string())));
            }
        }
    }
    Some((above_profile.to_path_buf(), None))
}

/// Starts a user's program (a workload's `command`) behind `prefix`, with `env` added. Where
/// `setpriv` exists it gets SIGKILL when `strait up` dies, since it does not watch its stdin.
pub fn spawn_user(
    name: &str,
    prefix: &[String],
    command: &[String],
    env: &[(&str, String)],
    log: &Path,
) -> anyhow::Result<Proc> {
    let mut argv: Vec<String> = prefix.to_vec();
    if std::path::Path::new("/usr/bin/setpriv").exists() {
        argv.extend([
            "/usr/bin/setpriv".into(),
            "--pdeathsig".into(),
            "KILL".into(),
            "--".into(),
        ]);
    }
    argv.extend(command.iter().cloned());
    let (exe, rest) = argv
        .split_first()
        .ok_or_else(|| anyhow::anyhow!("{name}: the workload's command is empty"))?;
    let file = std::fs::File::create(log)?;
    let mut cmd = Command::new(exe);
    cmd.args(rest)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start {name} ({}): {e}", command.join(" ")))?;
    Ok(Proc {
        name: name.to_string(),
        pid: child.id().unwrap_or_default(),
        program: command.first().map(PathBuf::from).unwrap_or_default(),
        args: command.to_vec(),
        log: log.to_path_buf(),
        user: true,
        child,
    })
}

/// Starts another executable (etcd, kube-apiserver) the same way.
pub fn spawn_exe(name: &str, exe: &Path, args: Vec<String>, log: &Path, log_filter: &str) -> anyhow::Result<Proc> {
    spawn_with(name, exe, args, None, log, log_filter)
}

fn spawn_with(
    name: &str,
    exe: &Path,
    args: Vec<String>,
    token: Option<&str>,
    log: &Path,
    log_filter: &str,
) -> anyhow::Result<Proc> {
    let file = std::fs::File::create(log)?;
    let mut cmd = Command::new(exe);
    cmd.args(&args)
        .env(EXIT_WITH_PARENT_ENV, "1")
        .env("STRAIT_LOG", log_filter)
        .stdin(Stdio::piped())
        .stdout(file.try_clone()?)
        .stderr(file);
    if let Some(t) = token {
        cmd.env(JOIN_TOKEN_ENV, t);
    }
    let child = cmd.spawn().map_err(|e| anyhow::anyhow!("cannot start {name}: {e}"))?;
    let pid = child.id().unwrap_or_default();
    Ok(Proc {
        name: name.to_string(),
        pid,
        program: exe.to_path_buf(),
        args,
        log: log.to_path_buf(),
        user: false,
        child,
    })
}

/// SIGTERM everything (proxies drain for up to 5s), then SIGKILL what is still there.
pub async fn stop_all(procs: &mut [Proc]) {
    for p in procs.iter() {
        let _ = kill(Pid::from_raw(p.pid as i32), Signal::SIGTERM);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(7);
    for p in procs.iter_mut() {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        if tokio::time::timeout(remaining, p.child.wait()).await.is_err() {
            let _ = p.child.start_kill();
            let _ = p.child.wait().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::{cargo_build_args, log_tail, spawn_exe, SidecarProgram, SIDECAR_EXE};

    #[tokio::test]
    async fn a_daemon_that_exits_is_named_with_how_it_ended_and_the_end_of_its_log() {
        let dir = std::env::temp_dir().join(format!("strait-exit-error-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("kube-apiserver.log");
        let script = "echo starting; echo; for i in 1 2 3 4 5 6; do echo line $i; done; \
                      echo 'listen tcp 127.1.1.3:34377: bind: address already in use'; exit 1";
        let mut p = spawn_exe(
            "kube-apiserver-east",
            Path::new("/bin/sh"),
            vec!["-c".into(), script.into()],
            &log,
            "info",
        )
        .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let e = loop {
            if let Some(e) = p.exit_error("while starting") {
                break e.to_string();
            }
            assert!(std::time::Instant::now() < deadline, "the shell did not exit");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        let want = format!(
            "kube-apiserver-east exited (exit status: 1) while starting; see {}\n  | line 3\n  | line 4\n  \
             | line 5\n  | line 6\n  | listen tcp 127.1.1.3:34377: bind: address already in use",
            log.display()
        );
        assert_eq!(e, want);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_log_tail_reads_only_the_end_of_a_long_log_and_nothing_of_a_missing_one() {
        let dir = std::env::temp_dir().join(format!("strait-log-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("etcd.log");
        let mut text: String = (0..10_000).map(|i| format!("line {i}\n")).collect();
        text.push_str("\n\n");
        std::fs::write(&log, text).unwrap();
        assert_eq!(log_tail(&log, 2), "\n  | line 9998\n  | line 9999");
        assert_eq!(log_tail(&dir.join("missing.log"), 5), "");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn under_cargo_run_the_sidecar_is_built_with_the_same_profile_and_never_otherwise() {
        let cargo = || Some(PathBuf::from("/usr/bin/cargo"));
        let dir = || Some(PathBuf::from("/src/strait"));
        let release = cargo_build_args(Path::new("/t/release/strait"), cargo(), Some("strait"), dir()).unwrap();
        assert_eq!(
            release.join(" "),
            "/usr/bin/cargo build --manifest-path /src/strait/Cargo.toml --bin strait-sidecar --release --target-dir /t"
        );
        let debug = cargo_build_args(Path::new("/t/debug/strait"), cargo(), Some("strait"), dir()).unwrap();
        assert!(
            !debug.iter().any(|a| a.starts_with("--release") || a == "--profile"),
            "{debug:?}"
        );
        let custom = cargo_build_args(Path::new("/t/bench/strait"), cargo(), Some("strait"), dir()).unwrap();
        assert!(
            custom.join(" ").ends_with("--profile bench --target-dir /t"),
            "{custom:?}"
        );
        // `cargo run --target <triple> --target-dir <dir>`: both kept, told by cargo's tag file.
        let top = std::env::temp_dir().join(format!("strait-target-dir-{}", std::process::id()));
        let profile = top.join("x86_64-unknown-linux-gnu").join("release");
        std::fs::create_dir_all(&profile).unwrap();
        std::fs::write(top.join("CACHEDIR.TAG"), b"Signature: 8a477f597d28d172789f06886806bc55").unwrap();
        let cross = cargo_build_args(&profile.join("strait"), cargo(), Some("strait"), dir()).unwrap();
        assert!(
            cross.join(" ").ends_with(&format!(
                "--release --target x86_64-unknown-linux-gnu --target-dir {}",
                top.display()
            )),
            "{cross:?}"
        );
        // The plain layout with its tag: the directory above the profile.
        let plain = cargo_build_args(&top.join("release").join("strait"), cargo(), Some("strait"), dir()).unwrap();
        assert!(
            plain
                .join(" ")
                .ends_with(&format!("--release --target-dir {}", top.display())),
            "{plain:?}"
        );
        std::fs::remove_dir_all(&top).unwrap();
        // Started by a test of another package (cargo sets its name), or not by cargo at all.
        assert_eq!(
            cargo_build_args(Path::new("/t/debug/strait"), cargo(), Some("multicluster-tests"), dir()),
            None
        );
        assert_eq!(cargo_build_args(Path::new("/t/debug/strait"), None, None, None), None);
    }

    #[test]
    fn the_sidecar_executable_beside_strait_is_used_when_there_and_named_when_not() {
        let dir = std::env::temp_dir().join(format!("strait-sidecar-program-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let strait = dir.join("strait");
        let (program, note) = SidecarProgram::beside(&strait);
        assert_eq!(program.exe, strait);
        assert_eq!(program.command, vec!["sidecar".to_string()]);
        let note = note.unwrap();
        assert!(note.contains("cargo build --release --bin strait-sidecar"), "{note}");
        std::fs::write(dir.join(SIDECAR_EXE), b"").unwrap();
        let (program, note) = SidecarProgram::beside(&strait);
        assert_eq!(program.exe, dir.join(SIDECAR_EXE));
        assert!(program.command.is_empty() && note.is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
