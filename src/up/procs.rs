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
}

/// Starts `strait <args>` with its output in `log`.
pub fn spawn(name: &str, args: Vec<String>, token: Option<&str>, log: &Path, log_filter: &str) -> anyhow::Result<Proc> {
    spawn_with(name, &std::env::current_exe()?, args, token, log, log_filter)
}

/// Starts `strait <args>` behind a command prefix (`ip netns exec NS [setpriv ...]`).
pub fn spawn_in(
    name: &str,
    prefix: &[String],
    args: Vec<String>,
    token: Option<&str>,
    log: &Path,
    log_filter: &str,
) -> anyhow::Result<Proc> {
    let Some((exe, rest)) = prefix.split_first() else {
        return spawn(name, args, token, log, log_filter);
    };
    let mut full: Vec<String> = rest.to_vec();
    full.push(std::env::current_exe()?.display().to_string());
    full.extend(args);
    spawn_with(name, Path::new(exe), full, token, log, log_filter)
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
