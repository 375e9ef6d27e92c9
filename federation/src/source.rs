//! The file catalog source: a directory of YAML files, each listing services this cluster
//! exports and their endpoints. It needs nothing else to run (no Kubernetes), which is what
//! `strait up` uses. Files are re-read when they change; a file with a mistake is reported
//! (file, field, fix) and its last good content keeps serving.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use strait_api::pb;
use strait_trust::{SpiffeId, TrustDomain};

use crate::catalog::{same_export, Key, Services, Touched};
use crate::config::parse_yaml;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CatalogFile {
    pub services: Vec<ServiceSpec>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    pub namespace: String,
    pub ports: Vec<PortSpec>,
    /// The service account of the endpoints; their identity is spiffe://<td>/ns/<ns>/sa/<sa>.
    pub service_account: String,
    /// Whether other clusters see it (a ServiceExport, in MCS terms). Default true.
    #[serde(default = "yes")]
    pub export: bool,
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortSpec {
    #[serde(default)]
    pub name: String,
    pub port: u16,
    #[serde(default)]
    pub protocol: ProtocolSpec,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProtocolSpec {
    /// HTTP/1.1 and HTTP/2 (h2c), told apart per connection.
    #[default]
    Http,
    /// gRPC: HTTP/2 end to end.
    Grpc,
    Tcp,
}

impl ProtocolSpec {
    /// The name on the wire and in port names: `http`, `grpc`, `tcp`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProtocolSpec::Http => "http",
            ProtocolSpec::Grpc => "grpc",
            ProtocolSpec::Tcp => "tcp",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointSpec {
    pub workload: String,
    /// The workload's inbound sidecar address.
    pub address: SocketAddr,
    pub zone: String,
    #[serde(default)]
    pub subzone: String,
    #[serde(default = "yes")]
    pub ready: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn yes() -> bool {
    true
}

pub(crate) fn dns_label(field: &str, v: &str) -> Result<(), String> {
    let ok = !v.is_empty()
        && v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !v.starts_with('-')
        && !v.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "field `{field}`: {v:?} is not a DNS label (lowercase letters, digits and '-', at most 63, e.g. \"echo\")"
        ))
    }
}

/// Checks what serde cannot: names, unique ports, zones. Returns every problem at once.
pub fn validate(file: &CatalogFile) -> Vec<String> {
    let mut errors = vec![];
    let mut services = std::collections::HashSet::new();
    for (i, s) in file.services.iter().enumerate() {
        let at = format!("services[{i}]");
        if !services.insert((&s.namespace, &s.name)) {
            errors.push(format!(
                "field `{at}.name`: service {}/{} is listed twice in this file; list each service once",
                s.namespace, s.name
            ));
        }
        for (f, v) in [
            ("name", &s.name),
            ("namespace", &s.namespace),
            ("serviceAccount", &s.service_account),
        ] {
            if let Err(e) = dns_label(&format!("{at}.{f}"), v) {
                errors.push(e);
            }
        }
        if s.ports.is_empty() {
            errors.push(format!(
                "field `{at}.ports`: a service needs at least one port, e.g. [{{port: 80, protocol: http}}]"
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (j, p) in s.ports.iter().enumerate() {
            if p.port == 0 {
                errors.push(format!("field `{at}.ports[{j}].port`: 0 is not a port (use 1-65535)"));
            }
            if !seen.insert(p.port) {
                errors.push(format!("field `{at}.ports[{j}].port`: port {} is listed twice", p.port));
            }
        }
        for (j, e) in s.endpoints.iter().enumerate() {
            if e.zone.is_empty() {
                errors.push(format!(
                    "field `{at}.endpoints[{j}].zone`: the zone is required (e.g. us-east-1a)"
                ));
            }
            if e.workload.is_empty() {
                errors.push(format!(
                    "field `{at}.endpoints[{j}].workload`: the workload name is required"
                ));
            }
        }
    }
    errors
}

/// One service of this cluster.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalService {
    /// Shared until its definition changes, so the merge skips it by pointer.
    pub service: Arc<pb::ExportedService>,
    pub exported: bool,
}

/// A problem with one catalog file.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SourceError {
    pub file: PathBuf,
    pub message: String,
}

impl std::fmt::Display for SourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.message)
    }
}

#[derive(Default)]
struct FileState {
    /// Its inode when last read: a file replaced (renamed over) has a new one, which the
    /// directory listing gives without a `stat`.
    inode: u64,
    /// The last listing of the directory that showed it (a file not in the latest is gone).
    listed: u64,
    fingerprint: Fingerprint,
    good: Option<CatalogFile>,
    /// `good`'s services as exports by `<ns>/<name>`, made when first asked for after it was
    /// read: an unchanged file's services are the same `Arc`s from one call to the next.
    made: Option<BTreeMap<String, LocalService>>,
    error: Option<String>,
}

/// When a file was created (its birth time; its last modification where the filesystem keeps
/// none), or `None` when it cannot be read.
fn created(path: &Path) -> Option<SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    meta.created().or_else(|_| meta.modified()).ok()
}

/// Reads the catalog directory; [`FileSource::poll`] returns whether anything changed.
pub struct FileSource {
    dir: PathBuf,
    /// By file name (not path: comparing paths walks their components).
    files: BTreeMap<std::ffi::OsString, FileState>,
    /// When each service was first exported (unix ms), by `<ns>/<name>`.
    first_seen: HashMap<String, i64>,
    /// Where `first_seen` is kept across restarts ([`FileSource::keeping_stamps_in`]).
    stamps: Option<PathBuf>,
    /// The directory's modification time at the last listing, and when every file was last
    /// looked at.
    scanned: Option<(Option<SystemTime>, std::time::Instant)>,
    /// Counts the directory's listings.
    listings: u64,
    /// Bumped whenever a poll finds a change: what [`FileSource::services`] returns is the same
    /// while this is.
    pub changes: u64,
    /// The files (good content) that define each service, by `<ns>/<name>`: the first one by
    /// name is the definition, any other is reported.
    defined_in: BTreeMap<String, BTreeSet<std::ffi::OsString>>,
    /// The services whose definitions may have changed since [`FileSource::services`] last
    /// returned them; `None`: every one (nothing was returned yet).
    touched: Option<BTreeSet<String>>,
    /// An inotify watch of the directory, when the kernel gives one: a poll reads the names of
    /// the files written, renamed or removed since the last and looks at those alone, and the
    /// listing and full scan run only every [`SAFETY_SCAN`] (for what a watch cannot see, such
    /// as a change made on another host of a network filesystem). Without one (or after the
    /// queue overflowed, or the directory itself moved) polling works as before.
    watch: Option<DirWatch>,
}

/// An inotify watch of a directory (`watch_flags`), read without blocking; inside a Tokio
/// runtime a second watch of it blocks in a thread of its own and wakes
/// [`DirWatch::changed`], so a loop can wait for the directory instead of waking to poll it.
/// (Registering the watch's descriptor with the runtime would take `unsafe`, or a deprecated
/// unsound call; the thread sleeps in `read` and costs a few KiB.) The thread ends at the
/// first event after the watch is dropped, or when the directory goes.
pub struct DirWatch {
    wake: Option<std::sync::Arc<tokio::sync::Notify>>,
    inotify: nix::sys::inotify::Inotify,
    dir: PathBuf,
    /// What the directory holds, for messages ("catalog", "policy").
    what: &'static str,
}

/// What a watch saw since it was last read.
pub enum Seen {
    /// The YAML files written, renamed, removed or touched (none: nothing happened).
    Files(BTreeSet<std::ffi::OsString>),
    /// Its queue overflowed: anything may have changed (later events stay queued).
    Overflowed,
    /// The directory was removed or moved, or the watch failed: it is gone.
    Gone,
}

impl DirWatch {
    /// A watch of `dir`, or `None` (logged) when the kernel gives none.
    pub fn new(dir: &Path, what: &'static str) -> Option<DirWatch> {
        use nix::sys::inotify::{InitFlags, Inotify};
        let watch = |flags: InitFlags| Inotify::init(flags).and_then(|w| w.add_watch(dir, watch_flags()).map(|_| w));
        let inotify = match watch(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC) {
            Ok(w) => w,
            Err(e) => {
                tracing::info!(dir = %dir.display(), error = %e, "no inotify watch of the {what} directory; polling it");
                return None;
            }
        };
        let wake = tokio::runtime::Handle::try_current()
            .ok()
            .and_then(|_| watch(InitFlags::IN_CLOEXEC).ok())
            .and_then(|blocking| {
                let wake = std::sync::Arc::new(tokio::sync::Notify::new());
                let weak = std::sync::Arc::downgrade(&wake);
                std::thread::Builder::new()
                    .name(format!("strait-watch-{what}"))
                    .spawn(move || loop {
                        match blocking.read_events() {
                            Err(nix::errno::Errno::EINTR) => {}
                            Err(_) => return,
                            Ok(events) => {
                                let Some(wake) = weak.upgrade() else { return };
                                wake.notify_one();
                                let gone = nix::sys::inotify::AddWatchFlags::IN_IGNORED;
                                if events.iter().any(|e| e.mask.contains(gone)) {
                                    return;
                                }
                            }
                        }
                    })
                    .ok()
                    .map(|_| wake)
            });
        Some(DirWatch {
            wake,
            inotify,
            dir: dir.to_path_buf(),
            what,
        })
    }

    /// What happened since the last read (without waiting).
    pub fn read(&self) -> Seen {
        use nix::errno::Errno;
        use nix::sys::inotify::AddWatchFlags as F;
        let mut names = BTreeSet::new();
        loop {
            match self.inotify.read_events() {
                Ok(events) => {
                    for e in events {
                        if e.mask.intersects(F::IN_DELETE_SELF | F::IN_MOVE_SELF | F::IN_IGNORED) {
                            tracing::warn!(dir = %self.dir.display(), "the {} directory was removed or moved; polling it", self.what);
                            return Seen::Gone;
                        }
                        if e.mask.contains(F::IN_Q_OVERFLOW) {
                            return Seen::Overflowed;
                        }
                        names.extend(e.name.filter(|n| is_yaml(Path::new(n))));
                    }
                }
                Err(Errno::EAGAIN) => return Seen::Files(names),
                Err(Errno::EINTR) => {}
                Err(e) => {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read the {} directory's watch; polling it", self.what);
                    return Seen::Gone;
                }
            }
        }
    }

    /// Resolves when the directory changed since the last wake (never without a waking
    /// thread). Read the watch with [`DirWatch::read`] afterwards.
    pub async fn changed(&self) {
        match &self.wake {
            Some(wake) => wake.notified().await,
            None => std::future::pending().await,
        }
    }

    /// [`DirWatch::changed`] of `watch`, or never.
    pub async fn wait(watch: Option<&DirWatch>) {
        match watch {
            Some(w) => w.changed().await,
            None => std::future::pending().await,
        }
    }

    /// Whether a loop may wait on [`DirWatch::changed`] instead of polling.
    pub fn wakes(&self) -> bool {
        self.wake.is_some()
    }
}

/// With a watch, the directory is still listed and every file looked at this often.
pub const SAFETY_SCAN: std::time::Duration = std::time::Duration::from_secs(10);

/// What the watch reports: a file written and closed, renamed in or out, removed, or its
/// attributes changed (`touch`); and the directory itself removed or moved. Not a file being
/// created or written to: it is read once it is closed, not half-written.
fn watch_flags() -> nix::sys::inotify::AddWatchFlags {
    use nix::sys::inotify::AddWatchFlags as F;
    F::IN_CLOSE_WRITE
        | F::IN_MOVED_TO
        | F::IN_MOVED_FROM
        | F::IN_DELETE
        | F::IN_ATTRIB
        | F::IN_DELETE_SELF
        | F::IN_MOVE_SELF
}

/// A file edited in place leaves its directory's mtime alone: every file is looked at again at
/// least this often. Files created, replaced (renamed over) or removed change the directory,
/// and are seen at the next poll.
pub const FULL_SCAN: std::time::Duration = std::time::Duration::from_millis(500);

/// When a file last changed, as far as polling can tell: modification time and size.
pub type Fingerprint = (Option<SystemTime>, u64);

/// The YAML files (`.yaml`, `.yml`) of a directory, each with its fingerprint.
pub fn yaml_files(dir: &Path) -> std::io::Result<Vec<(PathBuf, Fingerprint)>> {
    let mut out = vec![];
    for entry in std::fs::read_dir(dir)?.flatten() {
        let path = entry.path();
        if is_yaml(&path) {
            out.push((path, fingerprint(entry.metadata().ok())));
        }
    }
    Ok(out)
}

fn is_yaml(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
}

fn fingerprint(meta: Option<std::fs::Metadata>) -> Fingerprint {
    (
        meta.as_ref().and_then(|m| m.modified().ok()),
        meta.map(|m| m.len()).unwrap_or_default(),
    )
}

impl FileSource {
    pub fn new(dir: &Path) -> Self {
        FileSource {
            dir: dir.to_path_buf(),
            files: BTreeMap::new(),
            first_seen: HashMap::new(),
            stamps: None,
            scanned: None,
            listings: 0,
            changes: 0,
            defined_in: BTreeMap::new(),
            touched: None,
            watch: DirWatch::new(dir, "catalog"),
        }
    }

    /// Keeps when each service was first exported in `file` (JSON, in the controller's
    /// `stateDir`), read now and written whenever a service appears: a restarted controller
    /// stamps its exports as before though their files were replaced since (an editor or a
    /// deployment tool that writes a new file and renames it over the old one gives it a new
    /// creation time), so its peers find them unchanged and a conflict keeps its winner. A file
    /// that cannot be read is reported, and the stamps start again from the files.
    pub fn keeping_stamps_in(mut self, file: PathBuf) -> Self {
        let stored =
            match std::fs::read(&file) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                read => Some(read.map_err(|e| e.to_string()).and_then(|bytes| {
                    serde_json::from_slice::<HashMap<String, i64>>(&bytes).map_err(|e| e.to_string())
                })),
            };
        match stored {
            Some(Ok(stamps)) => self.first_seen = stamps,
            Some(Err(error)) => {
                tracing::warn!(path = %file.display(), %error, "cannot read the stored export times; stamping exports from their files' creation times")
            }
            None => {}
        }
        self.stamps = Some(file);
        self
    }

    /// Writes `first_seen` to its file (a new file renamed over the old).
    fn store_stamps(&self) {
        let Some(file) = &self.stamps else { return };
        let fresh = file.with_extension("new");
        let written = serde_json::to_vec(&self.first_seen)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&fresh, bytes))
            .and_then(|()| std::fs::rename(&fresh, file));
        if let Err(e) = written {
            tracing::warn!(path = %file.display(), error = %e, "cannot store the export times; a restart stamps exports from their files' creation times");
        }
    }

    /// The YAML files the watch saw change since the last call; `None` when there is no
    /// watch or it cannot be trusted this time (its queue overflowed: everything is looked at).
    fn watched(&mut self) -> Option<BTreeSet<std::ffi::OsString>> {
        match self.watch.as_ref()?.read() {
            Seen::Files(names) => Some(names),
            Seen::Overflowed => {
                self.scanned = None;
                None
            }
            Seen::Gone => {
                self.watch = None;
                None
            }
        }
    }

    /// The directory's watch, when a loop may wait on it instead of polling.
    pub fn waker(&self) -> Option<&DirWatch> {
        self.watch.as_ref().filter(|w| w.wakes())
    }

    /// Re-reads changed files. When the directory changed (a file created, renamed over or
    /// removed) its listing is read at once and only files with a new name or inode are looked
    /// at; every [`FULL_SCAN`] every file's modification time and size are (edits in place). A
    /// poll that finds neither costs one stat, whatever the number of files. With a watch of
    /// the directory, only the files it names are looked at, and the above runs every
    /// [`SAFETY_SCAN`].
    pub fn poll(&mut self) -> bool {
        let names = self.watched();
        let safety_due = self.scanned.is_none_or(|(_, at)| at.elapsed() >= SAFETY_SCAN);
        match names {
            Some(names) if !safety_due => self.look_at(names),
            _ => self.scan(),
        }
    }

    /// Looks at the named files: read again if their inode or fingerprint changed, forgotten if
    /// they are gone.
    fn look_at(&mut self, names: BTreeSet<std::ffi::OsString>) -> bool {
        use std::os::unix::fs::MetadataExt;
        let mut changed = false;
        for name in names {
            match std::fs::symlink_metadata(self.dir.join(&name)) {
                Ok(meta) => {
                    let (inode, fp) = (meta.ino(), fingerprint(Some(meta)));
                    let known = self.files.get(&name).is_some_and(|s| {
                        s.inode == inode && s.fingerprint == fp && (s.good.is_some() || s.error.is_some())
                    });
                    if !known {
                        self.read(name, inode, fp, self.listings);
                        changed = true;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => changed |= self.forget(&name),
                Err(e) => {
                    tracing::warn!(file = %self.dir.join(&name).display(), error = %e, "cannot look at a catalog file; keeping its last good content");
                }
            }
        }
        if changed {
            self.changes += 1;
        }
        changed
    }

    /// The listing and, when due, the full scan ([`FileSource::poll`] without a watch).
    fn scan(&mut self) -> bool {
        use std::os::unix::fs::DirEntryExt;
        let dir_mtime = std::fs::metadata(&self.dir).and_then(|m| m.modified()).ok();
        let full = self.scanned.is_none_or(|(_, at)| at.elapsed() >= FULL_SCAN);
        if !full && self.scanned.is_some_and(|(seen, _)| seen == dir_mtime) {
            return false;
        }
        // Read before the listing: a change during it shows as a newer mtime at the next poll.
        let last_full = match self.scanned {
            Some((_, at)) if !full => at,
            _ => std::time::Instant::now(),
        };
        self.scanned = Some((dir_mtime, last_full));
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read the catalog directory; keeping the last catalog");
                return false;
            }
        };
        let mut changed = false;
        self.listings += 1;
        let listing = self.listings;
        for entry in entries.flatten() {
            let name = entry.file_name();
            if !is_yaml(Path::new(&name)) {
                continue;
            }
            let inode = entry.ino();
            // Marks it listed; a file read before with the same inode is looked at no further
            // unless this is a full scan, and then only its fingerprint.
            let known = match self.files.get_mut(&name) {
                Some(s) if s.inode == inode && (s.good.is_some() || s.error.is_some()) => {
                    s.listed = listing;
                    if !full {
                        continue;
                    }
                    Some(s.fingerprint)
                }
                _ => None,
            };
            let fp = fingerprint(entry.metadata().ok());
            if known == Some(fp) {
                continue;
            }
            self.read(name, inode, fp, listing);
            changed = true;
        }
        let gone: Vec<std::ffi::OsString> = self
            .files
            .iter()
            .filter(|(_, s)| s.listed != listing)
            .map(|(name, _)| name.clone())
            .collect();
        for name in &gone {
            self.forget(name);
        }
        let changed = changed || !gone.is_empty();
        if changed {
            self.changes += 1;
        }
        changed
    }

    /// Forgets a file that is gone; returns whether it was known.
    fn forget(&mut self, name: &std::ffi::OsString) -> bool {
        let Some(state) = self.files.remove(name) else {
            return false;
        };
        self.define(name, keys_of(state.good.as_ref()), vec![]);
        true
    }

    /// Moves file `name`'s entries in [`FileSource::defined_in`] from the services of `before`
    /// to those of `now`, and marks all of them touched.
    fn define(&mut self, name: &std::ffi::OsString, before: Vec<String>, now: Vec<String>) {
        for key in before {
            if let Some(files) = self.defined_in.get_mut(&key) {
                files.remove(name);
                if files.is_empty() {
                    self.defined_in.remove(&key);
                }
            }
            if let Some(t) = &mut self.touched {
                t.insert(key);
            }
        }
        for key in now {
            self.defined_in.entry(key.clone()).or_default().insert(name.clone());
            if let Some(t) = &mut self.touched {
                t.insert(key);
            }
        }
    }

    /// Reads and checks one file, keeping its last good content when the new one is bad.
    fn read(&mut self, name: std::ffi::OsString, inode: u64, fp: Fingerprint, listing: u64) {
        let path = self.dir.join(&name);
        let state = self.files.entry(name.clone()).or_default();
        state.listed = listing;
        state.inode = inode;
        state.fingerprint = fp;
        let parsed = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read: {e}"))
            .and_then(|text| parse_yaml::<CatalogFile>(&path, &text).map_err(|e| strip_path(&e.to_string(), &path)))
            .and_then(|file| {
                let errors = validate(&file);
                if errors.is_empty() {
                    Ok(file)
                } else {
                    Err(errors.join("; "))
                }
            });
        match parsed {
            Ok(file) => {
                let (before, now) = (keys_of(state.good.as_ref()), keys_of(Some(&file)));
                state.good = Some(file);
                state.made = None;
                state.error = None;
                self.define(&name, before, now);
            }
            Err(message) => {
                tracing::error!(file = %path.display(), error = %message, "catalog file rejected; its last good content keeps serving");
                state.error = Some(message);
            }
        }
    }

    pub fn errors(&self) -> Vec<SourceError> {
        self.files
            .iter()
            .filter_map(|(p, s)| {
                s.error.as_ref().map(|m| SourceError {
                    file: self.dir.join(p),
                    message: m.clone(),
                })
            })
            .collect()
    }

    /// This cluster's services that changed since the last call (every one at the first), with
    /// whether each is exported to peers, and the problems of every file.
    pub fn services(
        &mut self,
        cluster: &str,
        region: &str,
        td: &TrustDomain,
        now: SystemTime,
    ) -> (LocalUpdate, Vec<SourceError>) {
        let touched = self.touched.replace(BTreeSet::new());
        let keys: Vec<String> = match &touched {
            Some(t) => t.iter().cloned().collect(),
            None => self.defined_in.keys().cloned().collect(),
        };
        let mut out = BTreeMap::new();
        let stamped = self.first_seen.len();
        // A service no longer defined by any file loses its stamp: exported again later, it is
        // a new export (as a ServiceExport deleted and created again is), and the stored stamps
        // do not grow with every service that ever was. At the first call every stamp read back
        // is looked at, afterwards the services that changed.
        let mut unstamped = false;
        if touched.is_none() {
            let before = self.first_seen.len();
            let defined = &self.defined_in;
            self.first_seen.retain(|key, _| defined.contains_key(key));
            unstamped = self.first_seen.len() != before;
        }
        for key in keys {
            // The first file by name that defines it.
            let file_name = self.defined_in.get(&key).and_then(|files| files.first());
            // When a service was exported (the MCS rules' "oldest export wins"): when the file
            // defining it was created (a file is the export, as a ServiceExport object is),
            // so that a restarted controller stamps its exports as before (its peers find them
            // unchanged, and a conflict keeps its winner).
            let since = || {
                file_name
                    .and_then(|f| created(&self.dir.join(f)))
                    .map_or(now, |t| t.min(now))
            };
            let state = file_name.and_then(|f| self.files.get_mut(f));
            let local = state.and_then(|state| {
                let file = state.good.as_ref()?;
                let made = state.made.get_or_insert_with(|| {
                    file.services
                        .iter()
                        .map(|spec| {
                            let key = format!("{}/{}", spec.namespace, spec.name);
                            let exported_at = *self
                                .first_seen
                                .entry(key.clone())
                                .or_insert_with(|| strait_api::unix_ms(since()));
                            let service = Arc::new(to_export(spec, cluster, region, td, exported_at));
                            (
                                key,
                                LocalService {
                                    service,
                                    exported: spec.export,
                                },
                            )
                        })
                        .collect()
                });
                made.get(&key).cloned()
            });
            if local.is_none() && !self.defined_in.contains_key(&key) {
                unstamped |= self.first_seen.remove(&key).is_some();
            }
            out.insert(key, local);
        }
        if unstamped || self.first_seen.len() != stamped {
            self.store_stamps();
        }
        let mut errors = self.errors();
        for (key, files) in self.defined_in.iter().filter(|(_, files)| files.len() > 1) {
            for file_name in files.iter().skip(1) {
                errors.push(SourceError {
                    file: self.dir.join(file_name),
                    message: format!(
                        "service {key} is already defined in another catalog file; define each service once"
                    ),
                });
            }
        }
        errors.sort_by(|a, b| a.file.cmp(&b.file));
        let update = match touched {
            Some(_) => LocalUpdate::Changed(out),
            None => LocalUpdate::All(out.into_iter().filter_map(|(k, s)| Some((k, s?))).collect()),
        };
        (update, errors)
    }
}

/// What a catalog source's services changed since it was last asked.
#[derive(Debug)]
pub enum LocalUpdate {
    /// Every service this cluster has.
    All(BTreeMap<String, LocalService>),
    /// The services that may have changed, by `<ns>/<name>`: each one's definition now, or
    /// `None` when it is gone. Any other is as it was.
    Changed(BTreeMap<String, Option<LocalService>>),
}

/// This cluster's services as the merge and the peers take them, kept up to date by
/// [`LocalCatalog::apply`]: a service that did not change keeps its `Arc` (so everything after
/// skips it by pointer), and an update's cost follows the services it touched, not the catalog.
#[derive(Clone, Default)]
pub struct LocalCatalog {
    /// Every local service, for the merge.
    pub all: Arc<Services>,
    /// The exported ones, for peers.
    pub exported: Arc<Services>,
}

impl LocalCatalog {
    /// Applies a source's update; returns the services it changed (for the merge).
    pub fn apply(&mut self, update: LocalUpdate) -> Touched {
        let changed = match update {
            LocalUpdate::Changed(changed) => changed,
            // Every service: those of before that it does not hold are gone.
            LocalUpdate::All(services) => {
                let mut changed: BTreeMap<String, Option<LocalService>> =
                    self.all.keys().map(|k| (k.to_string(), None)).collect();
                changed.extend(services.into_iter().map(|(k, s)| (k, Some(s))));
                changed
            }
        };
        let ptr = |s: Option<&Arc<pb::ExportedService>>| s.map(Arc::as_ptr);
        let mut touched = BTreeSet::new();
        for (k, local) in changed {
            let before = self.all.get_key_value(k.as_str());
            let key: Key = before.map(|(key, _)| key.clone()).unwrap_or_else(|| k.as_str().into());
            // The service as it is now: the one of before when it is the same.
            let now = local.map(|l| match before {
                Some((_, b)) if same_export(b, &l.service) => (b.clone(), l.exported),
                _ => (l.service, l.exported),
            });
            if ptr(before.map(|(_, b)| b)) != ptr(now.as_ref().map(|(n, _)| n)) {
                let all = Arc::make_mut(&mut self.all);
                match &now {
                    Some((service, _)) => all.insert(key.clone(), service.clone()),
                    None => all.remove(&key),
                };
                touched.insert(key.clone());
            }
            let exported_now = now.and_then(|(service, exported)| exported.then_some(service));
            if ptr(self.exported.get(&key)) != ptr(exported_now.as_ref()) {
                let exported = Arc::make_mut(&mut self.exported);
                match exported_now {
                    Some(service) => exported.insert(key, service),
                    None => exported.remove(&key),
                };
            }
        }
        Touched::Keys(touched)
    }
}

/// The `<ns>/<name>` of each service of a file.
fn keys_of(file: Option<&CatalogFile>) -> Vec<String> {
    file.map(|f| {
        f.services
            .iter()
            .map(|s| format!("{}/{}", s.namespace, s.name))
            .collect()
    })
    .unwrap_or_default()
}

fn strip_path(msg: &str, path: &Path) -> String {
    msg.strip_prefix(&format!("{}: ", path.display()))
        .unwrap_or(msg)
        .to_string()
}

fn to_export(
    spec: &ServiceSpec,
    cluster: &str,
    region: &str,
    td: &TrustDomain,
    exported_at: i64,
) -> pb::ExportedService {
    let identity = SpiffeId::workload(td, &spec.namespace, &spec.service_account)
        .map(|id| id.to_string())
        .unwrap_or_default();
    pb::ExportedService {
        name: spec.name.clone(),
        namespace: spec.namespace.clone(),
        ports: spec
            .ports
            .iter()
            .map(|p| pb::ServicePort {
                name: p.name.clone(),
                port: p.port as u32,
                protocol: p.protocol.as_str().into(),
            })
            .collect(),
        endpoints: spec
            .endpoints
            .iter()
            .map(|e| pb::Endpoint {
                address: e.address.to_string(),
                workload: e.workload.clone(),
                locality: Some(pb::Locality {
                    cluster: cluster.into(),
                    region: region.into(),
                    zone: e.zone.clone(),
                    subzone: e.subzone.clone(),
                }),
                identity: identity.clone(),
                ready: e.ready,
                labels: e.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            })
            .collect(),
        exported_at_unix_ms: exported_at,
        identities: vec![identity],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_files_are_seen_at_once_and_edits_in_place_within_a_full_scan() {
        files_are_seen(false);
    }

    #[test]
    fn with_a_watch_every_change_is_seen_at_the_next_poll_without_listing_the_directory() {
        files_are_seen(true);
    }

    #[test]
    fn a_restarted_source_stamps_its_exports_as_before() {
        let dir = std::env::temp_dir().join(format!("strait-source-stamp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), svc(80)).unwrap();
        let born = strait_api::unix_ms(created(&dir.join("a.yaml")).unwrap());
        let td: TrustDomain = "mesh.local".parse().unwrap();
        let stamps = |source: &mut FileSource, now: SystemTime| -> Vec<(String, i64)> {
            let stamped: Vec<(String, Option<LocalService>)> = match source.services("east", "us-east", &td, now).0 {
                LocalUpdate::All(m) => m.into_iter().map(|(k, v)| (k, Some(v))).collect(),
                LocalUpdate::Changed(m) => m.into_iter().collect(),
            };
            stamped
                .into_iter()
                .filter_map(|(k, v)| Some((k, v?.service.exported_at_unix_ms)))
                .collect()
        };
        let hour = std::time::Duration::from_secs(3600);
        let later = SystemTime::now() + hour;
        let mut first = FileSource::new(&dir);
        first.poll();
        assert_eq!(stamps(&mut first, later), [("demo/echo".to_string(), born)]);
        // The controller restarts an hour later: its export is stamped as before.
        let mut again = FileSource::new(&dir);
        again.poll();
        assert_eq!(stamps(&mut again, later + hour), [("demo/echo".to_string(), born)]);
        // A service that appears while it runs is stamped when its file was created.
        std::fs::write(dir.join("b.yaml"), svc(81).replace("name: echo", "name: other")).unwrap();
        let b_born = strait_api::unix_ms(created(&dir.join("b.yaml")).unwrap());
        poll_until_seen(&mut again, "a new file was never seen");
        assert_eq!(
            stamps(&mut again, later + hour * 2),
            [("demo/other".to_string(), b_born)]
        );
        // Never later than the controller's clock says it is.
        let mut early = FileSource::new(&dir);
        early.poll();
        let long_ago = SystemTime::UNIX_EPOCH + hour;
        assert!(stamps(&mut early, long_ago)
            .iter()
            .all(|(_, at)| *at == strait_api::unix_ms(long_ago)));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_restarted_source_keeps_its_stamps_though_the_file_was_replaced() {
        let dir = std::env::temp_dir().join(format!("strait-source-kept-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let catalog = dir.join("catalog");
        std::fs::create_dir_all(&catalog).unwrap();
        let kept = dir.join("exported-at.json");
        std::fs::write(catalog.join("a.yaml"), svc(80)).unwrap();
        let born = strait_api::unix_ms(created(&catalog.join("a.yaml")).unwrap());
        let td: TrustDomain = "mesh.local".parse().unwrap();
        let stamp = |source: &mut FileSource| -> i64 {
            source.poll();
            match source.services("east", "us-east", &td, SystemTime::now()).0 {
                LocalUpdate::All(m) => m["demo/echo"].service.exported_at_unix_ms,
                LocalUpdate::Changed(_) => unreachable!("the first call returns every service"),
            }
        };
        let mut first = FileSource::new(&catalog).keeping_stamps_in(kept.clone());
        assert_eq!(stamp(&mut first), born);
        // The file is replaced by a new one (written aside, renamed over it): a new creation
        // time. A restarted source keeps the stamp it stored; without the stored stamps, it
        // takes the new file's.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(catalog.join("a.yaml.tmp"), svc(81)).unwrap();
        std::fs::rename(catalog.join("a.yaml.tmp"), catalog.join("a.yaml")).unwrap();
        let reborn = strait_api::unix_ms(created(&catalog.join("a.yaml")).unwrap());
        assert!(reborn > born);
        assert_eq!(
            stamp(&mut FileSource::new(&catalog).keeping_stamps_in(kept.clone())),
            born
        );
        assert_eq!(stamp(&mut FileSource::new(&catalog)), reborn);
        // A stored file that cannot be read: stamped from the files again.
        std::fs::write(&kept, "not json").unwrap();
        assert_eq!(
            stamp(&mut FileSource::new(&catalog).keeping_stamps_in(kept.clone())),
            reborn
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_service_no_longer_defined_loses_its_stored_stamp() {
        let dir = std::env::temp_dir().join(format!("strait-source-pruned-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let catalog = dir.join("catalog");
        std::fs::create_dir_all(&catalog).unwrap();
        let kept = dir.join("exported-at.json");
        let stored = || -> Vec<String> {
            let map: HashMap<String, i64> = serde_json::from_slice(&std::fs::read(&kept).unwrap()).unwrap();
            let mut keys: Vec<String> = map.into_keys().collect();
            keys.sort();
            keys
        };
        let td: TrustDomain = "mesh.local".parse().unwrap();
        std::fs::write(catalog.join("a.yaml"), svc(80)).unwrap();
        std::fs::write(catalog.join("b.yaml"), svc(81).replace("name: echo", "name: other")).unwrap();
        let mut source = FileSource::new(&catalog).keeping_stamps_in(kept.clone());
        source.poll();
        source.services("east", "us-east", &td, SystemTime::now());
        assert_eq!(stored(), ["demo/echo", "demo/other"]);
        // b.yaml goes: its service's stamp goes with it.
        std::fs::remove_file(catalog.join("b.yaml")).unwrap();
        poll_until_seen(&mut source, "a removed file was never seen");
        let (update, _) = source.services("east", "us-east", &td, SystemTime::now());
        assert!(matches!(update, LocalUpdate::Changed(m) if m.get("demo/other").is_some_and(Option::is_none)));
        assert_eq!(stored(), ["demo/echo"]);
        // A stored stamp of a service no file defines any more (removed while the controller
        // was down) is dropped at the next start.
        let mut extra: HashMap<String, i64> = serde_json::from_slice(&std::fs::read(&kept).unwrap()).unwrap();
        extra.insert("demo/gone".into(), 1);
        std::fs::write(&kept, serde_json::to_vec(&extra).unwrap()).unwrap();
        let mut again = FileSource::new(&catalog).keeping_stamps_in(kept.clone());
        again.poll();
        again.services("east", "us-east", &td, SystemTime::now());
        assert_eq!(stored(), ["demo/echo"]);
        // Defined again later: a new export, stamped when its new file was created.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(catalog.join("c.yaml"), svc(82).replace("name: echo", "name: other")).unwrap();
        let reborn = strait_api::unix_ms(created(&catalog.join("c.yaml")).unwrap());
        poll_until_seen(&mut again, "a new file was never seen");
        let (update, _) = again.services("east", "us-east", &td, SystemTime::now());
        let LocalUpdate::Changed(m) = update else {
            panic!("a later call returns what changed")
        };
        assert_eq!(m["demo/other"].as_ref().unwrap().service.exported_at_unix_ms, reborn);
        assert_eq!(stored(), ["demo/echo", "demo/other"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Polls `source` until it sees a change, within three full scans.
    fn poll_until_seen(source: &mut FileSource, never: &str) {
        let started = std::time::Instant::now();
        while !source.poll() {
            assert!(started.elapsed() < FULL_SCAN * 3, "{never}");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    fn svc(port: u16) -> String {
        format!("services:\n- name: echo\n  namespace: demo\n  serviceAccount: echo\n  ports: [{{port: {port}}}]\n")
    }

    fn files_are_seen(watched: bool) {
        let dir = std::env::temp_dir().join(format!("strait-source-{}-{watched}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut source = FileSource::new(&dir);
        assert!(source.watch.is_some(), "this kernel gives an inotify watch");
        if !watched {
            source.watch = None;
        }
        assert!(!source.poll());
        let listings = source.listings;
        std::fs::write(dir.join("a.yaml"), svc(80)).unwrap();
        assert!(source.poll(), "a new file changes the directory: seen at the next poll");
        assert!(!source.poll(), "nothing changed");
        // Same size, new content, same inode: only the full scan notices.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(dir.join("a.yaml"), svc(81)).unwrap();
        poll_until_seen(&mut source, "an edit in place was never seen");
        let td: TrustDomain = "mesh.local".parse().unwrap();
        let mut catalog = LocalCatalog::default();
        let update = |source: &mut FileSource, catalog: &mut LocalCatalog| {
            let (update, errors) = source.services("east", "us-east", &td, SystemTime::now());
            let keys: Vec<String> = match &update {
                LocalUpdate::All(m) => m.keys().cloned().collect(),
                LocalUpdate::Changed(m) => m.keys().cloned().collect(),
            };
            catalog.apply(update);
            (keys, errors)
        };
        update(&mut source, &mut catalog);
        assert_eq!(catalog.all["demo/echo"].ports[0].port, 81);
        // Replaced (written aside and renamed over, as editors and kubectl-style tools do):
        // a new inode in the listing, seen at the next poll, even at the same size.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(dir.join("a.tmp"), svc(83)).unwrap();
        std::fs::rename(dir.join("a.tmp"), dir.join("a.yaml")).unwrap();
        assert!(source.poll(), "a file renamed over is seen at once");
        assert!(!source.poll(), "nothing changed");
        assert_eq!(update(&mut source, &mut catalog).0, ["demo/echo"]);
        assert_eq!(catalog.all["demo/echo"].ports[0].port, 83);
        // Another file: only its service is looked at; the first one's is the very same export.
        let before = catalog.clone();
        std::fs::write(dir.join("b.yaml"), svc(82).replace("echo", "other")).unwrap();
        assert!(source.poll());
        assert_eq!(update(&mut source, &mut catalog).0, ["demo/other"]);
        assert!(Arc::ptr_eq(&before.all["demo/echo"], &catalog.all["demo/echo"]));
        assert_eq!(catalog.all["demo/other"].ports[0].port, 82);
        // A service defined again in a later file: reported there, the first definition serves
        // until its file goes.
        std::fs::write(dir.join("c.yaml"), svc(84)).unwrap();
        assert!(source.poll());
        let (_, errors) = update(&mut source, &mut catalog);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].file, dir.join("c.yaml"));
        assert!(
            errors[0].message.contains("service demo/echo is already defined"),
            "{errors:?}"
        );
        assert_eq!(catalog.all["demo/echo"].ports[0].port, 83);
        std::fs::remove_file(dir.join("a.yaml")).unwrap();
        assert!(source.poll());
        let (touched, errors) = update(&mut source, &mut catalog);
        assert_eq!((touched, errors), (vec!["demo/echo".to_string()], vec![]));
        assert_eq!(catalog.all["demo/echo"].ports[0].port, 84);
        std::fs::remove_file(dir.join("b.yaml")).unwrap();
        std::fs::remove_file(dir.join("c.yaml")).unwrap();
        assert!(source.poll(), "a removed file changes the directory");
        assert!(source.files.is_empty());
        update(&mut source, &mut catalog);
        assert!(catalog.all.is_empty() && catalog.exported.is_empty());
        // With a watch, all of the above without listing the directory once.
        assert_eq!(
            source.listings == listings,
            watched,
            "{} listings",
            source.listings - listings
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_watch_wakes_a_waiting_loop_when_a_file_is_written_and_not_before() {
        let dir = std::env::temp_dir().join(format!("strait-source-{}-wakes", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let watch = DirWatch::new(&dir, "catalog").expect("this kernel gives an inotify watch");
        assert!(watch.wakes(), "inside a runtime a thread wakes the loop");
        let quiet = tokio::time::timeout(std::time::Duration::from_millis(200), watch.changed()).await;
        assert!(quiet.is_err(), "nothing written, no wake");
        std::fs::write(dir.join("a.yaml"), svc(80)).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), watch.changed())
            .await
            .expect("woken by the write");
        match watch.read() {
            Seen::Files(names) => assert!(names.contains(std::ffi::OsStr::new("a.yaml")), "{names:?}"),
            _ => panic!("the write is read as a file"),
        }
        // Without a runtime there is no thread: the loop polls.
        let polled = std::thread::spawn({
            let dir = dir.clone();
            move || DirWatch::new(&dir, "catalog").map(|w| w.wakes())
        })
        .join()
        .unwrap();
        assert_eq!(polled, Some(false));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_watched_directory_removed_falls_back_to_polling() {
        let dir = std::env::temp_dir().join(format!("strait-source-{}-moved", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut source = FileSource::new(&dir);
        assert!(source.watch.is_some());
        assert!(!source.poll());
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), svc(80)).unwrap();
        assert!(source.poll(), "the new directory's file is seen by listing it");
        assert!(source.watch.is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_rebuilt_catalog_shares_what_did_not_change() {
        let svc = |name: &str, address: &str| LocalService {
            service: Arc::new(pb::ExportedService {
                name: name.into(),
                namespace: "demo".into(),
                endpoints: vec![pb::Endpoint {
                    address: address.into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            exported: true,
        };
        let mut catalog = LocalCatalog::default();
        catalog.apply(LocalUpdate::All(
            [("demo/a", svc("a", "127.0.0.1:1")), ("demo/b", svc("b", "127.0.0.1:2"))]
                .into_iter()
                .map(|(k, s)| (k.to_string(), s))
                .collect(),
        ));
        let before = catalog.clone();
        let b = svc("b", "127.0.0.1:9");
        let touched = catalog.apply(LocalUpdate::All(
            [("demo/a", svc("a", "127.0.0.1:1")), ("demo/b", b.clone())]
                .into_iter()
                .map(|(k, s)| (k.to_string(), s))
                .collect(),
        ));
        assert!(Arc::ptr_eq(&before.all["demo/a"], &catalog.all["demo/a"]));
        assert!(!Arc::ptr_eq(&before.all["demo/b"], &catalog.all["demo/b"]));
        assert_eq!(catalog.all["demo/b"], b.service);
        assert_eq!(touched, Touched::Keys(["demo/b".into()].into()));
        // A service left out of a whole update is gone.
        let touched = catalog.apply(LocalUpdate::All([("demo/b".to_string(), b)].into()));
        assert!(!catalog.all.contains_key("demo/a") && !catalog.exported.contains_key("demo/a"));
        assert_eq!(touched, Touched::Keys(["demo/a".into()].into()));
    }

    #[test]
    fn validation_names_every_bad_field() {
        let file: CatalogFile = serde_yaml::from_str(
            "services:\n- name: Echo\n  namespace: demo\n  serviceAccount: echo\n  ports: [{port: 80}, {port: 80}]\n  endpoints: [{workload: w, address: '127.0.0.1:1', zone: ''}]\n",
        )
        .unwrap();
        let errors = validate(&file);
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors[0].contains("services[0].name"));
        assert!(errors[1].contains("listed twice"));
        assert!(errors[2].contains("zone"));
        let twice: CatalogFile = serde_yaml::from_str(
            "services:\n- {name: a, namespace: demo, serviceAccount: a, ports: [{port: 80}]}\n- {name: a, namespace: demo, serviceAccount: b, ports: [{port: 81}]}\n",
        )
        .unwrap();
        assert_eq!(
            validate(&twice),
            ["field `services[1].name`: service demo/a is listed twice in this file; list each service once"]
        );
    }

    #[test]
    fn unknown_fields_are_named() {
        let err = parse_yaml::<CatalogFile>(
            Path::new("c.yaml"),
            "services:\n- name: a\n  namespace: b\n  serviceAccount: c\n  ports: [{port: 80, protocl: tcp}]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("c.yaml") && err.contains("services[0].ports[0]") && err.contains("protocl"),
            "{err}"
        );
    }
}
