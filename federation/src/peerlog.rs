//! What a controller last heard from each peer, kept on disk (`stateDir`), so that a restarted
//! controller starts from it: it tells each peer what it holds and is sent what differs (a
//! restart of every controller at once is then not a resync of the whole clusterset), serves
//! its proxies the clusterset's catalog as it stood while the leases it read run, and keeps
//! enforcing a peer's clusterset policies though that peer is out of reach.
//!
//! One file per configured peer, `<cluster>.exports`: length-delimited `ExportUpdate`s, applied
//! in order. It starts with the peer's whole state (an update with `full` set, its objects and
//! statuses, then one update per exported service) and grows by each update received after it,
//! as received (without its traffic summary, which is stale by the next start). Once what was
//! appended outgrows the whole state (and 1 MiB), the whole state is written again to a new
//! file that replaces the old one. A writer thread does the encoding of whole states and all
//! file work; the peering stream encodes its update (the size of the change) and queues it.
//! The writer gathers what is queued for up to [`GATHER`] and then writes each peer's records
//! with one call: under churn a peer's updates arrive several times a second, and one write
//! (and one wake of the writer) for each was most of what the log cost. A controller killed
//! before its last records were written comes back holding a little less, which its peers,
//! told what it holds, send again; one stopped (SIGTERM) writes them first ([`PeerLog::flush`]).
//!
//! A file's modification time is the last update's arrival (a whole state is dated when the
//! peer was last heard from): a peer restored from it has the lease that update gave, less the
//! time since. A file that ends in a torn record (the machine
//! died mid-write) is read up to it, and cut there at the start (keeping its date) before
//! anything is appended.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use prost::Message;
use strait_api::pb;

use crate::peering::PeerTable;

/// A file's name for `cluster`'s state.
const SUFFIX: &str = "exports";

/// Appended bytes that never cause a rewrite (a small catalog's renewals).
const COMPACT_MIN: u64 = 1 << 20;

/// How long the writer gathers queued records (from the first) before writing them.
const GATHER: Duration = Duration::from_secs(1);

/// Gathered bytes written at once, before [`GATHER`] has passed (a burst of large updates).
const GATHER_MAX: usize = 1 << 20;

/// The handle the peering server queues received updates on.
#[derive(Clone)]
pub struct PeerLog {
    tx: tokio::sync::mpsc::Sender<Entry>,
    /// The writer, woken when the queue is nearly full.
    writer: std::thread::Thread,
}

/// Records the queue holds; the writer is woken before its gathering ends once a quarter of
/// this is left.
const QUEUE: usize = 1024;

enum Entry {
    /// An update as received, encoded, already applied to the table, and when it arrived.
    Append {
        cluster: String,
        record: Vec<u8>,
        at: SystemTime,
    },
    /// The table holds a new whole state of the peer (it sent every export): write it.
    Rewrite { cluster: String },
    /// Write what is gathered now, then say so (the process is ending).
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// What loading a state directory found.
#[derive(Debug, Default, PartialEq)]
pub struct Restored {
    /// Each peer restored, with the services it exports and the updates read.
    pub peers: BTreeMap<String, (usize, usize)>,
    /// Files of clusters that are not configured peers (removed, not loaded).
    pub dropped: Vec<String>,
    /// Each restored file's bytes read (up to a torn record, if any) and modification time:
    /// where the writer appends, and the date it keeps.
    ends: BTreeMap<String, (u64, SystemTime)>,
}

impl PeerLog {
    /// Restores every configured peer's file in `dir` into `table` (creating `dir` when it does
    /// not exist), then starts the writer. A file that cannot be read is reported and left
    /// out: that peer is sent every export again, as on a first start.
    pub fn open(dir: &Path, table: &PeerTable, configured: &[String]) -> anyhow::Result<(PeerLog, Restored)> {
        std::fs::create_dir_all(dir).map_err(|e| {
            anyhow::anyhow!(
                "field `stateDir`: cannot create {}: {e}; give a directory the controller may write, or leave `stateDir` out to keep peers' state in memory only",
                dir.display()
            )
        })?;
        let restored = restore(dir, table, configured)?;
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
        let writer = Writer {
            dir: dir.to_path_buf(),
            table: table.clone(),
            configured: configured.iter().cloned().collect(),
            files: BTreeMap::new(),
            failed: BTreeMap::new(),
        };
        // Every restored file is appended to where it was read up to (a torn record is cut
        // off first), on the writer's thread: nothing is written again at a start.
        let ends = restored.ends.clone();
        let writer = std::thread::Builder::new()
            .name("peer-log".into())
            .spawn(move || writer.run(ends, rx))?
            .thread()
            .clone();
        Ok((PeerLog { tx, writer }, restored))
    }

    /// `update`'s record, taken before the table takes the update: `None` for an update of
    /// every export (the writer then writes the whole state from the table instead). Its
    /// traffic summary is left out.
    pub fn record(update: &mut pb::ExportUpdate) -> Option<Vec<u8>> {
        if update.full {
            return None;
        }
        let traffic = (update.traffic_included, update.traffic.take());
        update.traffic_included = false;
        let record = update.encode_length_delimited_to_vec();
        (update.traffic_included, update.traffic) = traffic;
        Some(record)
    }

    /// Queues what [`PeerLog::record`] made of an update of `cluster`, once the table applied
    /// it (so a whole state written meanwhile holds it, or the record follows that state).
    pub async fn append(&self, cluster: &str, record: Option<Vec<u8>>) {
        let cluster = cluster.to_string();
        let entry = match record {
            Some(record) => Entry::Append {
                cluster,
                record,
                at: SystemTime::now(),
            },
            None => Entry::Rewrite { cluster },
        };
        // The writer ends only with the process.
        let _ = self.tx.send(entry).await;
        if self.tx.capacity() < QUEUE / 4 {
            self.writer.unpark();
        }
    }

    /// Writes what the writer has gathered at once, instead of at the end of its gathering,
    /// and returns when it is written: called as the controller stops (SIGTERM), so that the
    /// updates of its last [`GATHER`] are not lost with the process (its peers would send them
    /// again after a restart, as after a crash).
    pub async fn flush(&self) {
        let (done, written) = tokio::sync::oneshot::channel();
        if self.tx.send(Entry::Flush(done)).await.is_ok() {
            self.writer.unpark();
            let _ = written.await;
        }
    }
}

/// The path of `cluster`'s file in `dir`.
fn path_of(dir: &Path, cluster: &str) -> PathBuf {
    dir.join(format!("{cluster}.{SUFFIX}"))
}

/// Reads every file in `dir` into `table` ([`PeerLog::open`]).
fn restore(dir: &Path, table: &PeerTable, configured: &[String]) -> anyhow::Result<Restored> {
    let mut restored = Restored::default();
    let entries =
        std::fs::read_dir(dir).map_err(|e| anyhow::anyhow!("field `stateDir`: cannot list {}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(cluster) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(&format!(".{SUFFIX}")))
        else {
            continue;
        };
        if !configured.iter().any(|c| c == cluster) {
            // A peer taken out of the configuration: its exports and policies must not come
            // back.
            tracing::info!(peer = %cluster, path = %path.display(), "removing the stored state of a cluster that is no longer a peer");
            let _ = std::fs::remove_file(&path);
            restored.dropped.push(cluster.to_string());
            continue;
        }
        let started = Instant::now();
        match restore_one(&path, cluster, table) {
            Ok(Some(ReadBack { counts, end })) => {
                restored.ends.insert(cluster.to_string(), end);
                tracing::info!(
                    peer = %cluster,
                    services = counts.0,
                    updates = counts.1,
                    ms = started.elapsed().as_millis() as u64,
                    "restored what was last heard from the peer"
                );
                restored.peers.insert(cluster.to_string(), counts);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(
                peer = %cluster,
                path = %path.display(),
                error = %e,
                "cannot read the peer's stored state; it is sent every export again"
            ),
        }
    }
    Ok(restored)
}

/// What [`restore_one`] read of a peer's file.
struct ReadBack {
    /// The services the peer exports, and the updates read.
    counts: (usize, usize),
    /// The bytes of whole records, and the file's modification time.
    end: (u64, SystemTime),
}

/// One peer's file into `table`; `None` for a file with no whole state at its start.
fn restore_one(path: &Path, cluster: &str, table: &PeerTable) -> anyhow::Result<Option<ReadBack>> {
    let bytes = std::fs::read(path)?;
    let written = std::fs::metadata(path)?.modified()?;
    let mut rest = bytes.as_slice();
    let mut updates = vec![];
    // The bytes of whole records read (a record that fails to decode may have been read in
    // part).
    let mut end = 0;
    while !rest.is_empty() {
        let update = match pb::ExportUpdate::decode_length_delimited(&mut rest) {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(peer = %cluster, path = %path.display(), error = %e, updates = updates.len(), "the end of the peer's stored state is torn; read up to it");
                break;
            }
        };
        if update.cluster != cluster {
            anyhow::bail!(
                "update {} names cluster {:?}, not {cluster:?}",
                updates.len() + 1,
                update.cluster
            );
        }
        if updates.is_empty() && !update.full {
            anyhow::bail!("it does not start with the peer's whole state");
        }
        updates.push(update);
        end = bytes.len() - rest.len();
    }
    // Applied only once every record was read and checked: a file refused is refused whole.
    let read = updates.len();
    let now = Instant::now();
    for update in updates {
        // A patch refused leaves its service as the last record whole or patched made it:
        // its digest then differs from the peer's, which resends it when the stream resumes.
        if let Err(e) = table.apply(update, now) {
            tracing::warn!(peer = %cluster, path = %path.display(), error = %e, "a stored update did not apply whole");
        }
    }
    if read == 0 {
        return Ok(None);
    }
    let age = SystemTime::now().duration_since(written).unwrap_or_default();
    Ok(table.restored(cluster, written, age, now).map(|services| ReadBack {
        counts: (services, read),
        end: (end as u64, written),
    }))
}

/// The writer thread's state: each peer's open file.
struct Writer {
    dir: PathBuf,
    table: PeerTable,
    configured: BTreeSet<String>,
    files: BTreeMap<String, Open>,
    /// When writing a peer's whole state last failed (a full disk): its records are dropped
    /// until [`RETRY_AFTER`] has passed, then the whole state is tried again.
    failed: BTreeMap<String, Instant>,
}

/// How long after a failed write a peer's whole state is tried again.
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(10);

/// What the writer gathered, by peer.
#[derive(Default)]
struct Gathered {
    peers: BTreeMap<String, Pending>,
    bytes: usize,
    /// Told once what was gathered is written ([`PeerLog::flush`]).
    flushes: Vec<tokio::sync::oneshot::Sender<()>>,
}

#[derive(Default)]
struct Pending {
    /// Records to append, in the order they arrived, and when the last did.
    records: Vec<u8>,
    last: Option<SystemTime>,
    /// The peer sent every export: its whole state is written from the table instead.
    rewrite: bool,
}

impl Gathered {
    /// Adds everything queued now; false once the queue is closed (the process is ending).
    fn take_queued(&mut self, rx: &mut tokio::sync::mpsc::Receiver<Entry>) -> bool {
        loop {
            match rx.try_recv() {
                Ok(entry) => self.add(entry),
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => return true,
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => return false,
            }
        }
    }

    fn add(&mut self, entry: Entry) {
        match entry {
            Entry::Append { cluster, record, at } => {
                let peer = self.peers.entry(cluster).or_default();
                if !peer.rewrite {
                    self.bytes += record.len();
                    peer.records.extend_from_slice(&record);
                    peer.last = Some(at);
                }
            }
            Entry::Rewrite { cluster } => {
                let peer = self.peers.entry(cluster).or_default();
                self.bytes -= peer.records.len();
                peer.rewrite = true;
                peer.records = vec![];
            }
            Entry::Flush(done) => self.flushes.push(done),
        }
    }
}

struct Open {
    file: File,
    /// Bytes of the whole state the file starts with ...
    whole: u64,
    /// ... and appended after it.
    appended: u64,
}

impl Writer {
    fn run(mut self, restored: BTreeMap<String, (u64, SystemTime)>, mut rx: tokio::sync::mpsc::Receiver<Entry>) {
        for (cluster, (end, written)) in restored {
            self.reopen(&cluster, end, written);
        }
        // Woken by the first record, then asleep until the gathering ends (or the queue fills:
        // [`PeerLog::append`] wakes it early; or a flush is asked for), taking what was queued
        // meanwhile: waiting on the queue instead would wake this thread for each record.
        while let Some(first) = rx.blocking_recv() {
            let deadline = Instant::now() + GATHER;
            let mut gathered = Gathered::default();
            gathered.add(first);
            let open = loop {
                let open = gathered.take_queued(&mut rx);
                let now = Instant::now();
                if !open || gathered.bytes >= GATHER_MAX || now >= deadline || !gathered.flushes.is_empty() {
                    break open;
                }
                std::thread::park_timeout(deadline - now);
            };
            let flushes = std::mem::take(&mut gathered.flushes);
            self.write(gathered);
            for done in flushes {
                let _ = done.send(());
            }
            if !open {
                return;
            }
        }
    }

    /// Writes what was gathered: each peer's records with one call, or its whole state when a
    /// rewrite was asked for (the table then holds every record gathered: each was queued
    /// after the table applied it).
    fn write(&mut self, gathered: Gathered) {
        for (cluster, peer) in gathered.peers {
            if peer.rewrite {
                self.rewrite(&cluster);
            } else if let Some(at) = peer.last {
                self.append(&cluster, &peer.records, at);
            }
        }
    }

    /// Appends `records` to `cluster`'s file, dated `at`, when the last of them arrived (a
    /// restored lease runs from it).
    fn append(&mut self, cluster: &str, records: &[u8], at: SystemTime) {
        if !self.configured.contains(cluster) {
            return;
        }
        let Some(open) = self.files.get_mut(cluster) else {
            // The first update since this start, or since a write failed: the table holds it
            // already.
            if self.failed.get(cluster).is_some_and(|at| at.elapsed() < RETRY_AFTER) {
                return;
            }
            return self.rewrite(cluster);
        };
        match open.file.write_all(records).and_then(|()| open.file.set_modified(at)) {
            Ok(()) => {
                open.appended += records.len() as u64;
                if open.appended > open.whole.max(COMPACT_MIN) {
                    self.rewrite(cluster);
                }
            }
            Err(e) => {
                tracing::warn!(peer = %cluster, error = %e, "cannot append to the peer's stored state; writing it whole");
                self.rewrite(cluster);
            }
        }
    }

    /// Appends to `cluster`'s restored file from `end`, the bytes read of it: a torn record
    /// after them is cut off, and the file keeps its date `written` (when the peer was last
    /// heard from). Its whole state is written again instead if it cannot be opened.
    fn reopen(&mut self, cluster: &str, end: u64, written: SystemTime) {
        let path = path_of(&self.dir, cluster);
        let opened = (|| {
            let file = File::options().append(true).open(&path)?;
            if file.metadata()?.len() > end {
                file.set_len(end)?;
                file.set_modified(written)?;
            }
            Ok::<_, std::io::Error>(file)
        })();
        match opened {
            Ok(file) => {
                self.files.insert(
                    cluster.to_string(),
                    // What it holds counts as whole state: written again once as much again
                    // (and 1 MiB) is appended.
                    Open {
                        file,
                        whole: end,
                        appended: 0,
                    },
                );
            }
            Err(e) => {
                tracing::warn!(peer = %cluster, path = %path.display(), error = %e, "cannot append to the peer's stored state; writing it whole");
                self.rewrite(cluster);
            }
        }
    }

    /// Writes `cluster`'s whole state from the table to a new file that replaces the old one.
    fn rewrite(&mut self, cluster: &str) {
        if !self.configured.contains(cluster) {
            return;
        }
        self.files.remove(cluster);
        let Some((whole, heard)) = self.table.whole_state(cluster) else {
            return;
        };
        let path = path_of(&self.dir, cluster);
        let fresh = path.with_extension(format!("{SUFFIX}.new"));
        let written = (|| {
            let mut file = File::create(&fresh)?;
            file.write_all(&whole)?;
            // Dated when the peer was last heard from, not now: the next start gives the peer
            // the lease left from then.
            file.set_modified(heard)?;
            std::fs::rename(&fresh, &path)?;
            Ok::<_, std::io::Error>(file)
        })();
        match written {
            Ok(file) => {
                self.failed.remove(cluster);
                self.files.insert(
                    cluster.to_string(),
                    Open {
                        file,
                        whole: whole.len() as u64,
                        appended: 0,
                    },
                );
            }
            Err(e) => {
                tracing::warn!(
                    peer = %cluster,
                    path = %path.display(),
                    error = %e,
                    "cannot write the peer's stored state (the file written before, if any, stays); trying again in 10 s"
                );
                let _ = std::fs::remove_file(&fresh);
                self.failed.insert(cluster.to_string(), Instant::now());
            }
        }
    }
}

/// `state`'s whole state as records: an update with `full` set and everything but the
/// services, then one update per service, each with the peer's region and lease too (a record
/// is applied as an update, and an update without them would leave the peer restored with no
/// region and the shortest lease). Encoded field by field, so the services are not copied into
/// a message first.
pub(crate) fn whole_state_records(
    cluster: &str,
    region: &str,
    lease_ms: u64,
    gateway: Option<&pb::Gateway>,
    objects: &[pb::PolicyObject],
    statuses: &[pb::ObjectStatus],
    services: &crate::catalog::Services,
) -> Vec<u8> {
    let head = pb::ExportUpdate {
        cluster: cluster.to_string(),
        region: region.to_string(),
        lease_ms,
        full: true,
        gateway: gateway.cloned(),
        objects_included: true,
        objects: objects.to_vec(),
        statuses_included: true,
        statuses: statuses.to_vec(),
        ..Default::default()
    };
    let mut out = head.encode_length_delimited_to_vec();
    // What every service's record starts with: the head's cluster, region and lease.
    let common = pb::ExportUpdate {
        cluster: head.cluster,
        region: head.region,
        lease_ms,
        ..Default::default()
    }
    .encode_to_vec();
    for svc in services.values() {
        let len = common.len() + prost::encoding::message::encoded_len(UPSERTS_TAG, &**svc);
        prost::encoding::encode_varint(len as u64, &mut out);
        out.extend_from_slice(&common);
        prost::encoding::message::encode(UPSERTS_TAG, &**svc, &mut out);
    }
    out
}

/// `ExportUpdate.upserts` (api/proto/strait.proto).
const UPSERTS_TAG: u32 = 6;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    /// A directory of this test's own, removed at its end.
    struct Dir(PathBuf);

    impl Dir {
        fn new(test: u32) -> Dir {
            let dir = std::env::temp_dir().join(format!("strait-peerlog-{}-{test}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Dir(dir)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn svc(name: &str, port: u32) -> pb::ExportedService {
        pb::ExportedService {
            name: name.into(),
            namespace: "demo".into(),
            ports: vec![pb::ServicePort {
                name: "http".into(),
                port,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn update(full: bool, upserts: Vec<pb::ExportedService>, removed: Vec<&str>) -> pb::ExportUpdate {
        pb::ExportUpdate {
            cluster: "east".into(),
            region: "us-east".into(),
            lease_ms: 10_000,
            full,
            upserts,
            removed: removed.into_iter().map(String::from).collect(),
            ..Default::default()
        }
    }

    /// What the table holds of `east`: each service's name and port, and its policies' names.
    fn held(table: &PeerTable) -> (Vec<(String, u32)>, Vec<String>) {
        let east = table
            .snapshot()
            .into_iter()
            .find(|p| p.cluster == "east")
            .expect("east held");
        (
            east.services
                .iter()
                .map(|(k, s)| (k.to_string(), s.ports[0].port))
                .collect(),
            east.objects.iter().map(|o| o.name.clone()).collect(),
        )
    }

    /// Takes `u` from `east` as the peering server does: its record, the table applies it, the
    /// record is queued. The record's length; `None` for a whole state (written from the table).
    async fn receive(table: &PeerTable, log: &PeerLog, mut u: pb::ExportUpdate) -> Option<u64> {
        let record = PeerLog::record(&mut u);
        let len = record.as_ref().map(|r| r.len() as u64);
        table.apply(u, Instant::now()).expect("applied");
        log.append("east", record).await;
        len
    }

    /// Waits for the writer to have written `want` (the file's bytes, read as records).
    fn written(dir: &Path, want: impl Fn(&PeerTable) -> bool) -> PeerTable {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let table = PeerTable::default();
            if restore(dir, &table, &["east".into()]).is_ok() && table.snapshot().len() == 1 && want(&table) {
                return table;
            }
            assert!(Instant::now() < deadline, "the writer never wrote the state wanted");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[tokio::test]
    async fn a_restart_restores_each_peers_exports_and_policies_from_the_log() {
        let dir = Dir::new(line!());
        let table = PeerTable::default();
        let configured = vec!["east".to_string()];
        let (log, restored) = PeerLog::open(dir.path(), &table, &configured).unwrap();
        assert_eq!(restored, Restored::default());

        // A whole state with a policy, then a change, a removal and a renewal that carries a
        // traffic summary: each applied, then queued, as the peering server does.
        let mut first = update(true, vec![svc("a", 80), svc("b", 81), svc("c", 82)], vec![]);
        first.objects_included = true;
        first.objects = vec![pb::PolicyObject {
            name: "deny-all".into(),
            ..Default::default()
        }];
        let mut change = update(false, vec![svc("b", 8081)], vec!["demo/c"]);
        change.traffic_included = true;
        change.traffic = Some(pb::TrafficSummary {
            cluster: "east".into(),
            ..Default::default()
        });
        for u in [first, change] {
            receive(&table, &log, u).await;
        }
        let want = (
            vec![("demo/a".to_string(), 80), ("demo/b".to_string(), 8081)],
            vec!["deny-all".to_string()],
        );
        written(dir.path(), |t| held(t) == want);

        // A new controller on the same directory holds the same, as a live peer whose lease
        // runs from the file's last write, disconnected until it renews; digests alike, so the
        // peer resumes against it.
        let again = PeerTable::default();
        let (_log, restored) = PeerLog::open(dir.path(), &again, &configured).unwrap();
        assert_eq!(restored.peers["east"].0, 2);
        assert_eq!(held(&again), want);
        let east = again.snapshot().remove(0);
        assert!(east.alive(Instant::now()) && !east.connected, "{east:?}");
        assert_eq!(
            (east.region.as_str(), east.lease),
            ("us-east", Duration::from_secs(10)),
            "the region and lease the peer's updates gave"
        );
        assert!(east.traffic.is_none(), "the traffic summary is not kept");
        assert!(east.expires_at <= Instant::now() + Duration::from_secs(10));
        assert_eq!(again.held("east"), table.held("east"));
        assert!(
            !again.take_changes().is_empty(),
            "the merge is told of the restored peer"
        );
    }

    #[tokio::test]
    async fn appended_updates_are_folded_into_a_whole_state_once_they_outgrow_it() {
        let dir = Dir::new(line!());
        let table = PeerTable::default();
        let configured = vec!["east".to_string()];
        let (log, _) = PeerLog::open(dir.path(), &table, &configured).unwrap();
        let first = update(true, vec![svc("a", 1)], vec![]);
        assert!(
            receive(&table, &log, first).await.is_none(),
            "a whole state is written from the table"
        );
        // Changes of one service until what was appended is half again COMPACT_MIN: the file
        // was written whole again (one service) once it passed COMPACT_MIN, instead of growing
        // by every change. Tens of thousands of records, queued faster than a gathering ends:
        // the writer is woken as the queue fills (asleep until each gathering's end, this loop
        // would wait a second for every QUEUE records).
        let mut appended = 0;
        let mut port = 1;
        while appended < COMPACT_MIN * 3 / 2 {
            port += 1;
            appended += receive(&table, &log, update(false, vec![svc("a", port)], vec![]))
                .await
                .unwrap();
        }
        written(dir.path(), |t| held(t).0 == vec![("demo/a".to_string(), port)]);
        let size = std::fs::metadata(path_of(dir.path(), "east")).unwrap().len();
        assert!(
            size < COMPACT_MIN,
            "{size} bytes after {appended} appended: never written whole again"
        );
    }

    /// A log in `dir` whose file holds east's whole state: one service, `a` on port 80.
    async fn log_holding_a(dir: &Path) -> (PeerTable, PeerLog) {
        let table = PeerTable::default();
        let (log, _) = PeerLog::open(dir, &table, &["east".into()]).unwrap();
        receive(&table, &log, update(true, vec![svc("a", 80)], vec![])).await;
        written(dir, |t| held(t).0 == vec![("demo/a".to_string(), 80)]);
        (table, log)
    }

    #[tokio::test]
    async fn records_gathered_are_appended_together_and_dated_when_the_last_arrived() {
        let dir = Dir::new(line!());
        let (table, log) = log_holding_a(dir.path()).await;
        let path = path_of(dir.path(), "east");
        let whole = std::fs::metadata(&path).unwrap().len();

        // Three changes queued at once: appended after the whole state as they came (no
        // rewrite), the file dated when the last arrived, not when the writer wrote them.
        let mut records = 0;
        for (name, port) in [("b", 81), ("a", 8080), ("c", 82)] {
            records += receive(&table, &log, update(false, vec![svc(name, port)], vec![]))
                .await
                .unwrap();
        }
        let queued = SystemTime::now();
        let want = vec![
            ("demo/a".to_string(), 8080),
            ("demo/b".to_string(), 81),
            ("demo/c".to_string(), 82),
        ];
        written(dir.path(), |t| held(t).0 == want);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), whole + records);
        let dated = std::fs::metadata(&path).unwrap().modified().unwrap();
        assert!(
            dated <= queued,
            "dated {dated:?}, after the last record was queued ({queued:?})"
        );
    }

    #[tokio::test]
    async fn a_flush_writes_what_was_gathered_before_the_gathering_ends() {
        let dir = Dir::new(line!());
        let (table, log) = log_holding_a(dir.path()).await;

        // A change, then a flush (as on SIGTERM): the file holds it when the flush returns,
        // read once, not waited for (the writer would otherwise write it after GATHER).
        receive(&table, &log, update(false, vec![svc("a", 8080)], vec![])).await;
        log.flush().await;
        let read = PeerTable::default();
        restore(dir.path(), &read, &["east".into()]).unwrap();
        assert_eq!(
            held(&read).0,
            vec![("demo/a".to_string(), 8080)],
            "not written by the flush"
        );
        // With nothing gathered, a flush returns as well.
        tokio::time::timeout(Duration::from_secs(10), log.flush())
            .await
            .expect("a flush with nothing gathered returns");
    }

    #[tokio::test]
    async fn a_torn_end_is_read_up_to_and_a_file_of_another_cluster_is_refused() {
        let dir = Dir::new(line!());
        let services: crate::catalog::Services = [svc("a", 80), svc("b", 81)]
            .into_iter()
            .map(|s| (format!("demo/{}", s.name).into(), Arc::new(s)))
            .collect();
        let mut bytes = whole_state_records("east", "us-east", 10_000, None, &[], &[], &services);
        let change = update(false, vec![svc("a", 8080)], vec![]).encode_length_delimited_to_vec();
        bytes.extend_from_slice(&change[..change.len() - 3]);
        std::fs::write(path_of(dir.path(), "east"), &bytes).unwrap();
        // Another cluster's state under a configured peer's name is refused whole; a file of a
        // cluster that is no longer a peer is removed.
        std::fs::write(
            path_of(dir.path(), "west"),
            whole_state_records("south", "eu", 10_000, None, &[], &[], &services),
        )
        .unwrap();
        std::fs::write(path_of(dir.path(), "gone"), &bytes).unwrap();
        let table = PeerTable::default();
        let configured = vec!["east".to_string(), "west".to_string()];
        let restored = restore(dir.path(), &table, &configured).unwrap();
        assert_eq!(restored.peers.keys().collect::<Vec<_>>(), vec!["east"]);
        assert_eq!(restored.dropped, vec!["gone".to_string()]);
        assert!(!path_of(dir.path(), "gone").exists());
        assert_eq!(
            held(&table).0,
            vec![("demo/a".to_string(), 80), ("demo/b".to_string(), 81)]
        );
        // A start cuts the torn record off and appends after what it read: an update received
        // then is read back after the whole state.
        let table = PeerTable::default();
        let (log, _) = PeerLog::open(dir.path(), &table, &configured).unwrap();
        receive(&table, &log, update(false, vec![svc("b", 8181)], vec![])).await;
        written(dir.path(), |t| {
            held(t).0 == vec![("demo/a".to_string(), 80), ("demo/b".to_string(), 8181)]
        });
    }

    #[test]
    fn a_peer_heard_from_longer_ago_than_its_lease_is_held_but_not_alive() {
        let dir = Dir::new(line!());
        let services: crate::catalog::Services = [(Arc::from("demo/a"), Arc::new(svc("a", 80)))].into_iter().collect();
        let path = path_of(dir.path(), "east");
        // The whole state and a torn record after it.
        let whole = whole_state_records("east", "us-east", 10_000, None, &[], &[], &services);
        std::fs::write(&path, [&whole[..], &[0x80, 0x80, 0x80]].concat()).unwrap();
        let old = SystemTime::now() - Duration::from_secs(60);
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let table = PeerTable::default();
        let (_log, restored) = PeerLog::open(dir.path(), &table, &["east".into()]).unwrap();
        assert_eq!(restored.peers["east"], (1, 2), "one service: the head and its update");
        let east = table.snapshot().remove(0);
        assert!(
            !east.alive(Instant::now()),
            "a lease that ran out while the controller was down"
        );
        assert_eq!(
            table.held("east").len(),
            1,
            "still what the peer is asked to resume against"
        );
        // The start cut the torn record off and kept the file's date: the next start finds
        // the peer as long silent, not heard from just now.
        let started = Instant::now();
        while std::fs::metadata(&path).unwrap().len() == whole.len() as u64 + 3 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the torn record was never cut off"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), old);
        let again = PeerTable::default();
        restore(dir.path(), &again, &["east".into()]).unwrap();
        assert!(
            !again.snapshot()[0].alive(Instant::now()),
            "restored as alive after a start"
        );
    }
}
