//! Idle pipelines keep their place: the committed offsets of a pipeline's consumer group survive
//! scale-to-zero and `suspend`, and offsets that vanish anyway are restored, loudly.
//!
//! Why: Kafka deletes an *empty* group's committed offsets `offsets.retention.minutes` after the
//! group became empty (KIP-211; 7 days by default, a read-only broker config). A pipeline at zero
//! or suspended is exactly such a group, so without help a weekly topic behind a scale-to-zero
//! pipeline loses its place and the next worker starts from `startOffset` (duplicates for
//! `earliest`, silently skipped records for `latest`).
//!
//! What the operator does while a pipeline is idle (no worker pods, Deployment at 0):
//! - **Records** the last committed offset of every partition (and, while idle, the exact commit
//!   with its metadata, so a worker's retry report survives byte for byte).
//! - **Refreshes** them every [`refresh_every`] (a quarter of the broker's retention): an
//!   OffsetCommit of the same offsets and metadata as a client outside the group (generation -1).
//!   For a group Kafka treats as "simple" (no protocol type, e.g. one created by a restore) this
//!   restarts the retention clock of each offset. For an empty *consumer* group Kafka counts
//!   retention from the moment the group became empty, so a refresh does not extend it; there the
//!   restore below is what keeps the place.
//! - **Restores** vanished offsets: a partition whose committed offset disappeared or moved
//!   backwards while nothing consumed gets its recorded commit back before the scaler sees the lag
//!   (so no worker is started from `startOffset`), with a Warning Event and
//!   `kpipe_operator_offsets_restored_total`. The restored group is a simple group from then on,
//!   which refreshes keep alive.
//!
//! The record is persisted in `status.topics[].committedOffsets` ([`OffsetBook::export`], written by
//! the controller only while the pipeline is idle and only when it changed) and loaded by a
//! restarted or newly elected operator ([`OffsetBook::import`]), so a restore works across restarts.
//!
//! Limits: the persisted record has no commit metadata (a worker's retry report is not restored after
//! a restart); a partition whose log end moved backwards (topic recreated) is forgotten, not
//! restored; a deliberate rewind of an idle pipeline's group is undone like any other loss.
//!
//! The decision ([`OffsetBook::plan`]) is pure; [`OffsetKeeper`] does the I/O.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

use crate::group_offsets::{Commit, GroupOffsetsError, OffsetWriteError};
use crate::lag::PartitionOffsets;
use crate::leader::LeaderFence;
use crate::metrics::must;
use crate::probe::Cluster;
use crate::secured_offsets::OffsetClient;

/// A partition: (topic, partition index).
pub type Key = (String, i32);

/// Kafka's default `offsets.retention.minutes` (7 days), used when the broker cannot be asked.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long a retention read from the broker is trusted before it is read again.
const RETENTION_TTL: Duration = Duration::from_secs(3600);
/// How long the default is used after DescribeConfigs failed, before asking again.
const RETENTION_RETRY: Duration = Duration::from_secs(300);

/// How often an idle group's offsets are re-committed: a quarter of the broker's offset retention,
/// at least every 6 hours and at most every 10 seconds.
pub fn refresh_every(retention: Duration) -> Duration {
    (retention / 4).clamp(Duration::from_secs(10), Duration::from_secs(6 * 3600))
}

/// A partition whose committed offset vanished or moved backwards while nothing consumed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lost {
    pub topic: String,
    pub partition: i32,
    /// The offset the operator recorded last.
    pub recorded: i64,
    /// What the group has now (`None`: no committed offset).
    pub found: Option<i64>,
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.found {
            Some(o) => write!(f, "{}/{} (was {}, found {o})", self.topic, self.partition, self.recorded),
            None => write!(f, "{}/{} (was {}, found none)", self.topic, self.partition, self.recorded),
        }
    }
}

/// What to do with an idle (or busy) group this poll.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Consumers may be in the group: they own its offsets; only record what they committed.
    Record,
    /// Idle, and the exact commits (with metadata) are not known yet or changed: read them.
    ReadExact,
    /// Idle, offsets as recorded, refresh due: re-commit these (same offsets and metadata).
    Refresh(Vec<(Key, Commit)>),
    /// Idle, offsets vanished or moved backwards: commit these recorded commits back.
    Restore { lost: Vec<Lost>, commits: Vec<(Key, Commit)> },
    /// Idle, nothing due.
    Nothing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seen {
    offset: i64,
    log_end: i64,
}

/// What the operator remembers of one pipeline's group (in memory, per pipeline).
#[derive(Clone, Debug, Default)]
pub struct OffsetBook {
    /// Last committed offset seen per partition and the log end at that time.
    seen: BTreeMap<Key, Seen>,
    /// The exact commit (offset and metadata) at the recorded position, read while idle: what a
    /// refresh re-commits and a restore puts back.
    exact: BTreeMap<Key, Commit>,
    /// The last idle read per partition: (the offset the probe reported then, the real commit's
    /// offset). Under `startOffset: latest` the probe reports a never-committed partition as
    /// committed where the workers will start (`LagProbe::offsets_since`): not a commit to keep.
    read: BTreeMap<Key, (Option<i64>, Option<i64>)>,
    /// When (operator clock) the idle offsets were last committed by the operator.
    last_refresh: Option<Duration>,
}

impl OffsetBook {
    /// What the group really has committed on `p`, as far as the idle reads tell: `Some(None)` no
    /// commit, `Some(Some(o))` a commit at `o`, `None` unknown (the probe's value was never read
    /// exactly: read it).
    fn real(&self, p: &PartitionOffsets) -> Option<Option<i64>> {
        let key = (p.topic.clone(), p.partition);
        match (p.committed, self.read.get(&key)) {
            // The probe never hides a real commit.
            (None, _) => Some(None),
            (v, Some((probed, real))) if *probed == v => Some(*real),
            _ => None,
        }
    }

    /// Decide this poll's step. `idle`: no worker pod exists and none wanted (replicas 0, or
    /// suspended); `now`: the operator's monotonic clock; `every`: the refresh interval.
    pub fn plan(&self, offsets: &[PartitionOffsets], idle: bool, now: Duration, every: Duration) -> Step {
        if !idle {
            return Step::Record;
        }
        let mut real = Vec::with_capacity(offsets.len());
        for p in offsets {
            match self.real(p) {
                Some(r) => real.push(r),
                None => return Step::ReadExact,
            }
        }
        let mut lost = Vec::new();
        let mut commits = Vec::new();
        let mut present = Vec::new();
        for (p, found) in offsets.iter().zip(real) {
            let key = (p.topic.clone(), p.partition);
            match self.seen.get(&key) {
                // A log end never moves backwards: this is another log (topic recreated), not a loss.
                Some(s) if p.log_end < s.log_end => {}
                Some(s) if found.is_none_or(|c| c < s.offset) => {
                    lost.push(Lost { topic: p.topic.clone(), partition: p.partition, recorded: s.offset, found });
                    let commit = self
                        .exact
                        .get(&key)
                        .filter(|c| c.offset == s.offset)
                        .cloned()
                        .unwrap_or(Commit { offset: s.offset, metadata: String::new() });
                    commits.push((key, commit));
                }
                _ => {
                    if let (Some(o), Some(c)) = (found, self.exact.get(&key))
                        && c.offset == o
                    {
                        present.push((key, c.clone()));
                    }
                }
            }
        }
        if !lost.is_empty() {
            return Step::Restore { lost, commits };
        }
        let due = self.last_refresh.is_none_or(|t| now.saturating_sub(t) >= every);
        if due && !present.is_empty() { Step::Refresh(present) } else { Step::Nothing }
    }

    /// Record what the group has committed (every poll, busy or idle). Forgets partitions whose log
    /// end moved backwards; keeps the record of a partition whose commit is gone until a commit
    /// replaces it. Idle polls record only what the idle reads confirmed as real commits; busy polls
    /// record the probe's offsets and drop the idle reads (they go stale).
    pub fn record(&mut self, offsets: &[PartitionOffsets], idle: bool) {
        for p in offsets {
            let key = (p.topic.clone(), p.partition);
            if self.seen.get(&key).is_some_and(|s| p.log_end < s.log_end) {
                self.seen.remove(&key);
                self.exact.remove(&key);
                self.read.remove(&key);
            }
            let committed = if idle { self.real(p).flatten() } else { p.committed.filter(|_| !p.start_position) };
            match committed {
                Some(offset) => {
                    self.seen.insert(key, Seen { offset, log_end: p.log_end });
                }
                None => {
                    if let Some(s) = self.seen.get_mut(&key) {
                        s.log_end = s.log_end.max(p.log_end);
                    }
                }
            }
        }
        if !idle {
            self.exact.clear();
            self.read.clear();
            self.last_refresh = None;
        }
    }

    /// The result of an exact read (idle) of the partitions in `offsets`: `found` maps each to its
    /// commit (`None` or missing: no commit). A commit at or past the recorded position becomes the
    /// one to keep; one behind it (or none) is a loss, and the kept commit stays for the restore.
    pub fn set_read(&mut self, offsets: &[PartitionOffsets], found: &HashMap<Key, Option<Commit>>) {
        for p in offsets {
            let key = (p.topic.clone(), p.partition);
            let commit = found.get(&key).cloned().flatten();
            self.read.insert(key.clone(), (p.committed, commit.as_ref().map(|c| c.offset)));
            if let Some(c) = commit
                && self.seen.get(&key).is_none_or(|s| c.offset >= s.offset)
            {
                self.exact.insert(key, c);
            }
        }
    }

    /// Commits the operator wrote (a restore): they are the group's commits now.
    pub fn set_exact(&mut self, commits: impl IntoIterator<Item = (Key, Commit)>) {
        for (key, c) in commits {
            self.read.insert(key.clone(), (Some(c.offset), Some(c.offset)));
            self.exact.insert(key, c);
        }
    }

    /// The operator committed the idle offsets at `now` (refresh or restore).
    pub fn committed_at(&mut self, now: Duration) {
        self.last_refresh = Some(now);
    }

    /// Forget everything recorded of `topic` (it was deleted and recreated: its old offsets must
    /// never be restored onto the new topic).
    pub fn forget_topic(&mut self, topic: &str) {
        self.seen.retain(|(t, _), _| t != topic);
        self.exact.retain(|(t, _), _| t != topic);
        self.read.retain(|(t, _), _| t != topic);
    }

    /// The recorded offsets per topic, as persisted in `status.topics[].committedOffsets`: index =
    /// partition, -1 where nothing is recorded (a dense list: partitions are numbered 0..n).
    pub fn export(&self) -> BTreeMap<String, Vec<i64>> {
        let mut out: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        for ((topic, partition), s) in &self.seen {
            let Ok(i) = usize::try_from(*partition) else { continue };
            let list = out.entry(topic.clone()).or_default();
            if list.len() <= i {
                list.resize(i + 1, -1);
            }
            list[i] = s.offset;
        }
        out
    }

    /// Load a persisted record ([`OffsetBook::export`]'s shape) into a book that has recorded nothing
    /// yet (a restarted or newly elected operator). The log end of a loaded partition is taken as its
    /// offset (a lower bound). Returns the number of partitions loaded.
    pub fn import<'a>(&mut self, record: impl IntoIterator<Item = (&'a str, &'a [i64])>) -> usize {
        if !self.seen.is_empty() {
            return 0;
        }
        for (topic, offsets) in record {
            for (i, &offset) in offsets.iter().enumerate() {
                if let (true, Ok(partition)) = (offset >= 0, i32::try_from(i)) {
                    self.seen.insert((topic.to_string(), partition), Seen { offset, log_end: offset });
                }
            }
        }
        self.seen.len()
    }

    /// The recorded offset of a partition, if any.
    pub fn recorded(&self, topic: &str, partition: i32) -> Option<i64> {
        self.seen.get(&(topic.to_string(), partition)).map(|s| s.offset)
    }
}

/// Failure of keeping an idle group's offsets.
#[derive(Debug, thiserror::Error)]
pub enum KeepaliveError {
    #[error(transparent)]
    Read(#[from] GroupOffsetsError),
    #[error(transparent)]
    Write(#[from] OffsetWriteError),
    #[error("the blocking Kafka task failed: {0}")]
    Task(String),
}

/// What [`OffsetKeeper::tend`] did this poll.
#[derive(Debug, Default)]
pub struct Tended {
    /// Partitions whose recorded offsets were committed back (the probe's offsets were updated).
    pub restored: Vec<Lost>,
    /// Partitions found lost but not restored (see `error`).
    pub not_restored: Vec<Lost>,
    /// Partitions whose offsets were refreshed.
    pub refreshed: usize,
    /// The Kafka error of this poll's refresh or restore, if any.
    pub error: Option<KeepaliveError>,
}

struct KeeperCluster {
    offsets: OffsetClient,
    /// (retention, read at, read from the broker?)
    retention: Mutex<Option<(Duration, Instant, bool)>>,
}

/// Keeps idle groups' offsets alive for every pipeline, over one set of shared protocol
/// connections per plaintext cluster (independent of the number of pipelines).
pub struct OffsetKeeper {
    timeout: Duration,
    clusters: Mutex<HashMap<String, Arc<KeeperCluster>>>,
    /// `kpipe_operator_offsets_restored_total{namespace,pipeline}`: partitions restored.
    pub restored_total: IntCounterVec,
    /// `kpipe_operator_offsets_refreshed_total`: idle partitions re-committed.
    pub refreshed_total: IntCounter,
    /// Commits go out only while this fence is open (leader election).
    fence: LeaderFence,
}

impl OffsetKeeper {
    /// A keeper whose Kafka requests time out after `timeout`; its counters are registered in
    /// `registry` (a second registration of the same names is logged and left out of `/metrics`).
    pub fn new(timeout: Duration, registry: &Registry) -> Self {
        let restored_total = must(IntCounterVec::new(
            Opts::new(
                "kpipe_operator_offsets_restored_total",
                "Partitions whose committed offset vanished or moved backwards while the pipeline was idle and \
                 was restored from the operator's record",
            ),
            &["namespace", "pipeline"],
        ));
        let refreshed_total = must(IntCounter::with_opts(Opts::new(
            "kpipe_operator_offsets_refreshed_total",
            "Committed offsets of idle pipelines re-committed unchanged to keep them inside the broker's retention",
        )));
        for c in [
            Box::new(restored_total.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(refreshed_total.clone()),
        ] {
            if let Err(e) = registry.register(c) {
                tracing::warn!(error = %e, "offset keeper metrics not registered");
            }
        }
        Self {
            timeout,
            clusters: Mutex::new(HashMap::new()),
            restored_total,
            refreshed_total,
            fence: LeaderFence::always(),
        }
    }

    /// Send commits only while `fence` is open (checked right before each commit: the reads before it may take a
    /// while).
    pub fn set_fence(&mut self, fence: LeaderFence) {
        self.fence = fence;
    }

    /// Count `partitions` restored for `namespace/pipeline` (`kpipe_operator_offsets_restored_total`).
    pub fn record_restored(&self, namespace: &str, pipeline: &str, partitions: usize) {
        self.restored_total.with_label_values(&[namespace, pipeline]).inc_by(partitions as u64);
    }

    /// Forgets a deleted pipeline's metric series.
    pub fn forget(&self, namespace: &str, pipeline: &str) {
        let _ = self.restored_total.remove_label_values(&[namespace, pipeline]);
    }

    fn cluster(&self, cluster: &Cluster) -> Option<Arc<KeeperCluster>> {
        let mut map = self.clusters.lock().ok()?;
        Some(
            map.entry(cluster.key())
                .or_insert_with(|| {
                    Arc::new(KeeperCluster {
                        offsets: OffsetClient::for_cluster(cluster, self.timeout),
                        retention: Mutex::new(None),
                    })
                })
                .clone(),
        )
    }

    /// The broker's offset retention for `group`'s coordinator (cached; [`DEFAULT_RETENTION`] when
    /// it cannot be read).
    fn retention(c: &KeeperCluster, group: &str) -> Duration {
        if let Ok(cached) = c.retention.lock()
            && let Some((d, at, from_broker)) = *cached
            && at.elapsed() < if from_broker { RETENTION_TTL } else { RETENTION_RETRY }
        {
            return d;
        }
        let (d, from_broker) = match c.offsets.offsets_retention(group) {
            Ok(d) => (d, true),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read offsets.retention.minutes; assuming 7 days");
                (DEFAULT_RETENTION, false)
            }
        };
        if let Ok(mut cached) = c.retention.lock() {
            *cached = Some((d, Instant::now(), from_broker));
        }
        d
    }

    /// The topic IDs of `topics` ([`GroupOffsets::topic_ids`]); `None` where they cannot be read (a
    /// SASL/TLS cluster, see [`OffsetClient::topic_ids`]).
    pub async fn topic_ids(
        &self,
        cluster: &Cluster,
        topics: &[String],
    ) -> Option<Result<HashMap<String, Option<String>>, KeepaliveError>> {
        let kc = self.cluster(cluster)?;
        let topics = topics.to_vec();
        let res = tokio::task::spawn_blocking(move || kc.offsets.topic_ids(&topics)).await;
        match res {
            Ok(r) => r.map(|r| r.map_err(KeepaliveError::from)),
            Err(e) => Some(Err(KeepaliveError::Task(e.to_string()))),
        }
    }

    /// Commit `commits` for the empty `group` as a client outside it ([`GroupOffsets::commit_empty`]),
    /// only while this replica leads. `Ok(false)`: not sent (not the leader, or a cluster this keeper
    /// does not talk to).
    pub async fn commit_idle(
        &self,
        cluster: &Cluster,
        group: &str,
        commits: Vec<(Key, Commit)>,
    ) -> Result<bool, KeepaliveError> {
        let Some(kc) = self.cluster(cluster) else { return Ok(false) };
        let fence = self.fence.clone();
        let group = group.to_string();
        let res = tokio::task::spawn_blocking(move || {
            if !fence.may_act() {
                return Ok(false);
            }
            kc.offsets.commit_empty(&group, &commits).map(|()| true)
        })
        .await;
        match res {
            Ok(r) => r.map_err(KeepaliveError::from),
            Err(e) => Err(KeepaliveError::Task(e.to_string())),
        }
    }

    /// One poll of `group`: record its offsets in `book`; while `idle`, refresh them when due and
    /// restore vanished ones. Restored partitions get their recorded offset in `offsets`, so the
    /// lag the scaler sees is the lag from the restored position.
    pub async fn tend(
        &self,
        cluster: &Cluster,
        group: &str,
        offsets: &mut [PartitionOffsets],
        idle: bool,
        now: Duration,
        book: &mut OffsetBook,
    ) -> Tended {
        let mut out = Tended::default();
        let kc = if idle { self.cluster(cluster) } else { None };
        let Some(kc) = kc else {
            // Busy (or a cluster this keeper cannot talk to): record only.
            book.record(offsets, idle);
            return out;
        };
        let snapshot: Vec<PartitionOffsets> = offsets.to_vec();
        let group_owned = group.to_string();
        let mut work_book = book.clone();
        let fence = self.fence.clone();
        let res = tokio::task::spawn_blocking(move || {
            let every = refresh_every(Self::retention(&kc, &group_owned));
            let mut out = Tended::default();
            let mut step = work_book.plan(&snapshot, true, now, every);
            if step == Step::ReadExact {
                let parts: Vec<Key> = snapshot.iter().map(|p| (p.topic.clone(), p.partition)).collect();
                match kc.offsets.committed(&group_owned, &parts) {
                    Ok(found) => {
                        work_book.set_read(&snapshot, &found);
                        step = work_book.plan(&snapshot, true, now, every);
                    }
                    Err(e) => {
                        out.error = Some(e.into());
                        step = Step::Nothing;
                    }
                }
            }
            // The reads above may take a while: a commit goes out only while this replica still leads.
            if !fence.may_act() {
                step = Step::Nothing;
            }
            match step {
                Step::Refresh(commits) => match kc.offsets.commit_empty(&group_owned, &commits) {
                    Ok(()) => {
                        out.refreshed = commits.len();
                        work_book.committed_at(now);
                    }
                    Err(e) if e.group_has_members() => {}
                    Err(e) => out.error = Some(e.into()),
                },
                Step::Restore { lost, commits } => match kc.offsets.commit_empty(&group_owned, &commits) {
                    Ok(()) => {
                        work_book.set_exact(commits);
                        work_book.committed_at(now);
                        out.restored = lost;
                    }
                    Err(e) => {
                        out.not_restored = lost;
                        out.error = Some(e.into());
                    }
                },
                Step::Record | Step::ReadExact | Step::Nothing => {}
            }
            (out, work_book)
        })
        .await;
        match res {
            Ok((tended, new_book)) => {
                *book = new_book;
                out = tended;
            }
            Err(e) => out.error = Some(KeepaliveError::Task(e.to_string())),
        }
        for l in &out.restored {
            if let Some(p) = offsets.iter_mut().find(|p| p.topic == l.topic && p.partition == l.partition) {
                p.committed = Some(l.recorded);
            }
        }
        book.record(offsets, true);
        self.refreshed_total.inc_by(out.refreshed as u64);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVERY: Duration = Duration::from_secs(60);

    fn po(partition: i32, log_end: i64, committed: Option<i64>) -> PartitionOffsets {
        PartitionOffsets { topic: "t".into(), partition, log_start: 0, log_end, committed, ..Default::default() }
    }

    fn key(p: i32) -> Key {
        ("t".into(), p)
    }

    fn commit(offset: i64, metadata: &str) -> Commit {
        Commit { offset, metadata: metadata.into() }
    }

    /// A book that saw `offsets` while busy, then read the exact commits while idle.
    fn idle_book(offsets: &[PartitionOffsets], metadata: &str) -> OffsetBook {
        let mut b = OffsetBook::default();
        b.record(offsets, false);
        assert_eq!(b.plan(offsets, true, Duration::ZERO, EVERY), Step::ReadExact);
        let found = offsets.iter().map(|p| ((p.topic.clone(), p.partition), p.committed.map(|c| commit(c, metadata))));
        b.set_read(offsets, &found.collect());
        b.record(offsets, true);
        b
    }

    #[test]
    fn busy_groups_are_only_recorded() {
        let b = OffsetBook::default();
        assert_eq!(b.plan(&[po(0, 10, Some(5))], false, Duration::ZERO, EVERY), Step::Record);
        let mut b = idle_book(&[po(0, 10, Some(5))], "m");
        // Even a vanished offset is the consumers' business while they run.
        assert_eq!(b.plan(&[po(0, 10, None)], false, Duration::ZERO, EVERY), Step::Record);
        b.record(&[po(0, 12, Some(7))], false);
        assert_eq!(b.recorded("t", 0), Some(7));
    }

    #[test]
    fn idle_refreshes_the_exact_commits_when_due_only() {
        let offs = [po(0, 10, Some(5)), po(1, 10, None), po(2, 10, Some(10))];
        let mut b = idle_book(&offs, "{\"retry\":1}\u{0}bytes");
        let step = b.plan(&offs, true, Duration::from_secs(1), EVERY);
        let want =
            vec![(key(0), commit(5, "{\"retry\":1}\u{0}bytes")), (key(2), commit(10, "{\"retry\":1}\u{0}bytes"))];
        assert_eq!(step, Step::Refresh(want));
        b.committed_at(Duration::from_secs(1));
        assert_eq!(b.plan(&offs, true, Duration::from_secs(60), EVERY), Step::Nothing);
        assert!(matches!(b.plan(&offs, true, Duration::from_secs(61), EVERY), Step::Refresh(_)));
    }

    #[test]
    fn a_group_that_never_committed_has_nothing_to_keep() {
        let offs = [po(0, 10, None)];
        let mut b = OffsetBook::default();
        b.record(&offs, true);
        assert_eq!(b.plan(&offs, true, Duration::ZERO, EVERY), Step::Nothing);
    }

    #[test]
    fn vanished_or_rewound_offsets_are_restored_with_their_metadata() {
        let offs = [po(0, 10, Some(5)), po(1, 10, Some(8)), po(2, 10, Some(3))];
        let b = idle_book(&offs, "meta");
        let now = [po(0, 10, None), po(1, 10, Some(2)), po(2, 10, Some(3))];
        // A moved offset is read exactly first (it could be a start position the probe reports).
        assert_eq!(b.plan(&now, true, Duration::ZERO, EVERY), Step::ReadExact);
        let mut b = b;
        b.set_read(&now, &HashMap::from([(key(1), Some(commit(2, "reset"))), (key(2), Some(commit(3, "meta")))]));
        match b.plan(&now, true, Duration::ZERO, EVERY) {
            Step::Restore { lost, commits } => {
                assert_eq!(
                    lost,
                    vec![
                        Lost { topic: "t".into(), partition: 0, recorded: 5, found: None },
                        Lost { topic: "t".into(), partition: 1, recorded: 8, found: Some(2) },
                    ]
                );
                assert_eq!(commits, vec![(key(0), commit(5, "meta")), (key(1), commit(8, "meta"))]);
                assert_eq!(lost[0].to_string(), "t/0 (was 5, found none)");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn loss_seen_before_any_idle_read_restores_the_offset_without_metadata() {
        let mut b = OffsetBook::default();
        b.record(&[po(0, 10, Some(5))], false);
        match b.plan(&[po(0, 10, None)], true, Duration::ZERO, EVERY) {
            Step::Restore { commits, .. } => assert_eq!(commits, vec![(key(0), commit(5, ""))]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn forward_moves_while_idle_are_accepted_after_reading_them() {
        let offs = [po(0, 10, Some(5))];
        let mut b = idle_book(&offs, "m");
        let moved = [po(0, 10, Some(9))];
        assert_eq!(b.plan(&moved, true, Duration::ZERO, EVERY), Step::ReadExact);
        b.set_read(&moved, &HashMap::from([(key(0), Some(commit(9, "admin")))]));
        b.record(&moved, true);
        assert_eq!(b.plan(&moved, true, Duration::ZERO, EVERY), Step::Refresh(vec![(key(0), commit(9, "admin"))]));
        assert_eq!(b.recorded("t", 0), Some(9));
    }

    #[test]
    fn a_recreated_topic_is_forgotten_not_restored() {
        let offs = [po(0, 100, Some(90))];
        let mut b = idle_book(&offs, "m");
        let recreated = [po(0, 4, None)];
        assert_eq!(b.plan(&recreated, true, Duration::ZERO, EVERY), Step::Nothing);
        b.record(&recreated, true);
        assert_eq!(b.recorded("t", 0), None);
        assert_eq!(b.plan(&recreated, true, Duration::ZERO, EVERY), Step::Nothing);
    }

    #[test]
    fn a_lost_partition_stays_lost_until_restored_even_with_arrivals() {
        let offs = [po(0, 10, Some(10))];
        let mut b = idle_book(&offs, "m");
        // New records arrived and the offset expired: lag 15 from earliest, but the place was 10.
        let now = [po(0, 15, None)];
        b.record(&now, true);
        assert!(matches!(b.plan(&now, true, Duration::ZERO, EVERY), Step::Restore { .. }));
    }

    /// Under `latest` the probe reports a never-committed partition as committed where the workers
    /// will start. That is not a commit: it is never refreshed, and a real commit that vanishes
    /// behind such a value is still restored.
    #[test]
    fn start_positions_reported_by_the_probe_are_not_commits() {
        let offs = [po(0, 10, Some(7)), po(1, 10, Some(3))];
        let read = HashMap::from([(key(0), Some(commit(7, "m"))), (key(1), None)]);
        let mut b = OffsetBook::default();
        assert_eq!(b.plan(&offs, true, Duration::ZERO, EVERY), Step::ReadExact);
        b.set_read(&offs, &read);
        b.record(&offs, true);
        assert_eq!(b.recorded("t", 1), None, "a start position is not recorded as a commit");
        assert_eq!(b.plan(&offs, true, Duration::ZERO, EVERY), Step::Refresh(vec![(key(0), commit(7, "m"))]));
        // The real commit on partition 0 expires; the probe now reports the start position 2 there.
        let expired = [po(0, 10, Some(2)), po(1, 10, Some(3))];
        assert_eq!(b.plan(&expired, true, Duration::ZERO, EVERY), Step::ReadExact);
        b.set_read(&expired, &HashMap::from([(key(0), None), (key(1), None)]));
        match b.plan(&expired, true, Duration::ZERO, EVERY) {
            Step::Restore { lost, commits } => {
                assert_eq!(lost, vec![Lost { topic: "t".into(), partition: 0, recorded: 7, found: None }]);
                assert_eq!(commits, vec![(key(0), commit(7, "m"))]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_start_position_seen_while_busy_is_not_restored_when_idle() {
        // Workers run under `latest` before anything was committed: the probe reports the start position 5.
        let busy = [PartitionOffsets { start_position: true, ..po(0, 10, Some(5)) }];
        let mut b = OffsetBook::default();
        b.record(&busy, false);
        assert_eq!(b.recorded("t", 0), None);
        // Scaled to zero, still nothing committed: nothing vanished, nothing to restore.
        assert_eq!(b.plan(&busy, true, Duration::ZERO, EVERY), Step::ReadExact);
        b.set_read(&busy, &HashMap::from([(key(0), None)]));
        assert!(!matches!(b.plan(&busy, true, Duration::ZERO, EVERY), Step::Restore { .. }));
    }

    /// The record survives a restart: exported to status, imported by a fresh book, and a loss found
    /// by the fresh book's first idle poll is restored to the recorded offset.
    #[test]
    fn an_exported_record_restores_after_a_restart() {
        let offs = [po(0, 10, Some(5)), po(2, 10, Some(7))];
        let before = idle_book(&offs, "m");
        let exported = before.export();
        assert_eq!(exported, BTreeMap::from([("t".to_string(), vec![5, -1, 7])]));
        let mut fresh = OffsetBook::default();
        let loaded = fresh.import(exported.iter().map(|(t, o)| (t.as_str(), o.as_slice())));
        assert_eq!(loaded, 2);
        assert_eq!(fresh.recorded("t", 2), Some(7));
        // A book that recorded something already does not take an older record.
        assert_eq!(fresh.import([("t", &[1i64][..])]), 0);
        let expired = [po(0, 10, None), po(2, 12, None)];
        match fresh.plan(&expired, true, Duration::ZERO, EVERY) {
            Step::Restore { lost, commits } => {
                assert_eq!(lost.len(), 2);
                assert_eq!(commits, vec![(key(0), commit(5, "")), (key(2), commit(7, ""))]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_forgotten_topic_is_neither_restored_nor_exported() {
        let mut b = idle_book(&[po(0, 10, Some(5))], "m");
        b.forget_topic("t");
        assert_eq!(b.plan(&[po(0, 20, None)], true, Duration::ZERO, EVERY), Step::Nothing);
        assert!(b.export().is_empty());
    }

    #[test]
    fn refresh_interval_is_a_quarter_of_retention_within_bounds() {
        assert_eq!(refresh_every(Duration::from_secs(120)), Duration::from_secs(30));
        assert_eq!(refresh_every(Duration::from_secs(20)), Duration::from_secs(10));
        assert_eq!(refresh_every(DEFAULT_RETENTION), Duration::from_secs(6 * 3600));
    }
}
