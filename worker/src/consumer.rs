//! The Kafka edge: a dedicated thread polls the consumer (so rebalance callbacks never block the
//! async runtime), copies records out and dispatches them to per-partition tasks through bounded
//! channels, pauses partitions whose tasks are full, and commits the offsets the tasks report.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kpipe_api::offsets::{PartitionPosition, StartPoint, start_point};
use kpipe_api::v1alpha1::StartOffset;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::RebalanceProtocol;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};
use tokio::runtime::Handle;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::job::JobContext;
use crate::metrics::Metrics;
use crate::partition::{Input, PartitionProgress, PartitionSettings, PartitionTask};
use crate::record::Record;
use kpipe_api::commit_metadata;

type TopicPartition = (Arc<str>, i32);

/// Records handed to a partition task per channel message.
const CHUNK_RECORDS: usize = 256;
/// Overflow (records fetched while the task's channel is full) that pauses the partition.
const MAX_OVERFLOW_RECORDS: usize = 8_192;
const MIN_OVERFLOW_BYTES: u64 = 2 << 20;
/// How long a partly filled chunk may wait while other partitions keep the consumer busy.
const CHUNK_MAX_DELAY: Duration = Duration::from_millis(5);

struct PartitionHandle {
    topic: String,
    tx: mpsc::Sender<Vec<Input>>,
    /// Records fetched but not yet sent to the task (the next chunk).
    staged: Vec<Input>,
    staged_bytes: u64,
    /// Chunks that found the task's channel full; a large overflow pauses the partition.
    overflow: VecDeque<(Vec<Input>, u64)>,
    overflow_records: usize,
    overflow_bytes: u64,
    paused: bool,
    progress: Arc<PartitionProgress>,
    /// The offset last handed to the committer (forgotten again when its commit fails).
    last_committed: Option<i64>,
    task: JoinHandle<Option<i64>>,
}

/// Partitions to commit. The committer reads their committable offsets when it sends the commit: the freshest
/// offset, and never one of an earlier assignment of a partition that was revoked and assigned again meanwhile.
type CommitRequest = Vec<TopicPartition>;

/// Least time between two commits asked for early by partitions near their uncommitted bound.
const EARLY_COMMIT_GAP: Duration = Duration::from_millis(5);
/// How long after the shutdown timeout a shutdown may keep retrying a final commit the broker refused: the pod's
/// grace period is the shutdown timeout + 10 s, and this leaves 2 s of it for closing. The member only learns of
/// a rebalance at its next heartbeat (librdkafka does not rejoin on a refused commit), so the retry must be able
/// to outlast `heartbeat.interval.ms`.
const FINAL_COMMIT_MARGIN: Duration = Duration::from_secs(8);

/// Final offsets of a shutdown whose commit the broker refused, typically because a rebalance was in
/// progress (a new pod joining while this one stops). The revoke that rebalance brings commits them while the
/// partitions are still ours, or the shutdown retries them while they stay assigned. Never later: once a
/// partition is gone, its new owner may already have committed past them.
#[derive(Debug, Default)]
struct HeldOffsets(HashMap<TopicPartition, i64>);

impl HeldOffsets {
    fn hold(&mut self, offsets: impl IntoIterator<Item = (TopicPartition, i64)>) {
        self.0.extend(offsets);
    }

    /// Removes and returns the held offsets of `tps`.
    fn take(&mut self, tps: &[TopicPartition]) -> Vec<(TopicPartition, i64)> {
        tps.iter().filter_map(|tp| self.0.remove(tp).map(|o| (tp.clone(), o))).collect()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Wall-clock Unix milliseconds (0 if the clock is before 1970).
fn unix_millis() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The partitions of a list.
fn partitions_of(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements().iter().map(|e| (Arc::<str>::from(e.topic()), e.partition())).collect()
}

fn commit_list(offsets: &[(TopicPartition, i64)]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in offsets {
        if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset)) {
            tracing::error!(%topic, partition, "cannot build commit list: {e}");
        }
    }
    tpl
}

/// How long each offset lookup (OffsetFetch, ListOffsets) at assignment and before a commit may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a partition the group never committed on starts (the pipeline's `startOffset` and start time).
#[derive(Debug, Clone, Copy)]
pub struct StartPolicy {
    pub start_offset: StartOffset,
    /// When the pipeline started consuming, ms since the Unix epoch (`WorkerConfig::started_at_ms`).
    pub started_at_ms: Option<i64>,
}

/// Why the start offsets of newly assigned partitions could not be looked up.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("cannot read the committed offsets: {0}")]
    Committed(KafkaError),
    #[error("cannot list offsets ({what}): {source}")]
    ListOffsets { what: &'static str, source: KafkaError },
    #[error("no {what} offset for {topic} [{partition}]")]
    Missing { what: &'static str, topic: String, partition: i32 },
}

/// A list of `parts`, each at `offset`.
fn list_at(parts: &[TopicPartition], offset: Offset) -> Result<TopicPartitionList, KafkaError> {
    let mut tpl = TopicPartitionList::with_capacity(parts.len());
    for (topic, partition) in parts {
        tpl.add_partition_offset(topic, *partition, offset)?;
    }
    Ok(tpl)
}

/// ListOffsets for `parts` at `spec` (a timestamp, or `Beginning`/`End` for the watermarks), in one batched
/// request. Per partition: the offset, `None` when no record matches (a timestamp after the last record).
fn list_offsets<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    parts: &[TopicPartition],
    spec: Offset,
    what: &'static str,
) -> Result<HashMap<TopicPartition, Option<i64>>, LookupError> {
    let request = list_at(parts, spec).map_err(|source| LookupError::ListOffsets { what, source })?;
    let result = consumer
        .offsets_for_times(request, LOOKUP_TIMEOUT)
        .map_err(|source| LookupError::ListOffsets { what, source })?;
    let mut out = HashMap::with_capacity(parts.len());
    for e in result.elements() {
        e.error().map_err(|source| LookupError::ListOffsets { what, source })?;
        let offset = match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        };
        out.insert((Arc::<str>::from(e.topic()), e.partition()), offset);
    }
    Ok(out)
}

/// What [`lookup_starts`] found: each partition's position and start-time offset, and the retry reports in the
/// committed offsets' metadata.
type StartLookup =
    (Vec<(TopicPartition, PartitionPosition, Option<i64>)>, Vec<(TopicPartition, commit_metadata::RetryReport)>);

/// Reads what [`start_point`] needs for `parts`: watermarks, the group's committed offsets and, under `latest`
/// for never-committed partitions, the first offset at or after the pipeline's start time.
/// Also returns the retry reports found in the committed offsets' metadata (attempt budgets of records a previous
/// owner was retrying, issue 19 Deliver 5).
fn lookup_starts<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    parts: &[TopicPartition],
    policy: StartPolicy,
) -> Result<StartLookup, LookupError> {
    let request = list_at(parts, Offset::Invalid).map_err(LookupError::Committed)?;
    let committed = consumer.committed_offsets(request, LOOKUP_TIMEOUT).map_err(LookupError::Committed)?;
    let starts = list_offsets(consumer, parts, Offset::Beginning, "log start")?;
    let ends = list_offsets(consumer, parts, Offset::End, "log end")?;
    let mut out = Vec::with_capacity(parts.len());
    let mut inherited = Vec::new();
    for tp in parts {
        let missing = |what| LookupError::Missing { what, topic: tp.0.to_string(), partition: tp.1 };
        let log_end = ends.get(tp).copied().flatten().ok_or_else(|| missing("log end"))?;
        let log_start = starts.get(tp).copied().flatten().ok_or_else(|| missing("log start"))?;
        let entry = committed.find_partition(&tp.0, tp.1);
        let committed = match entry.as_ref().map(|e| e.offset()) {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        };
        // --- failure handling hook (issue 19): the previous owner's retry report at the commit point.
        if let Some(r) = entry.as_ref().and_then(|e| commit_metadata::decode(e.metadata()))
            && committed == Some(r.offset)
        {
            inherited.push((tp.clone(), r));
        }
        out.push((tp.clone(), PartitionPosition { log_start, log_end, committed }, None));
    }
    if let (StartOffset::Latest, Some(started)) = (policy.start_offset, policy.started_at_ms) {
        let fresh: Vec<TopicPartition> =
            out.iter().filter(|(_, p, _)| p.committed.is_none()).map(|(tp, _, _)| tp.clone()).collect();
        if !fresh.is_empty() {
            let since = list_offsets(consumer, &fresh, Offset::Offset(started), "start time")?;
            for (tp, p, s) in &mut out {
                if p.committed.is_none() {
                    // No record at or after the start time: everything from the log end on.
                    *s = Some(since.get(tp).copied().flatten().unwrap_or(p.log_end));
                }
            }
        }
    }
    Ok((out, inherited))
}

/// The log end of each of `parts` (one batched ListOffsets); an error per partition (e.g. the topic is gone).
fn log_ends<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    parts: &[TopicPartition],
) -> Result<HashMap<TopicPartition, Result<i64, KafkaError>>, KafkaError> {
    let request = list_at(parts, Offset::End)?;
    let result = consumer.offsets_for_times(request, LOOKUP_TIMEOUT)?;
    let mut out = HashMap::with_capacity(parts.len());
    for e in result.elements() {
        let end = e.error().and_then(|()| match e.offset() {
            Offset::Offset(o) => Ok(o),
            _ => Err(KafkaError::OffsetFetch(RDKafkaErrorCode::InvalidArgument)),
        });
        out.insert((Arc::<str>::from(e.topic()), e.partition()), end);
    }
    Ok(out)
}

/// The topic and partition named by librdkafka's offset-reset log line
/// (`"[thrd:main]: <topic> [<partition>]: offset reset (at offset 200 ..., broker 1) to offset BEGINNING ...: Offset
/// out of range"`, the thread prefix optional); `None` for any other line. Topic names have no spaces.
fn parse_offset_reset_log(message: &str) -> Option<(String, i32)> {
    let (head, _) = message.split_once("]: offset reset (at ")?;
    let (before, partition) = head.rsplit_once(" [")?;
    let topic = before.rsplit(' ').next().filter(|t| !t.is_empty())?;
    Some((topic.to_owned(), partition.parse().ok()?))
}

/// Whether a commit or lookup error means the partition's topic no longer exists.
fn topic_gone(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::UnknownTopicId
        )
    )
}

/// Everything the consumer callbacks and the dispatch loop share.
pub struct Dispatch {
    runtime: Handle,
    settings: PartitionSettings,
    jobs: Arc<JobContext>,
    worker_permits: Arc<Semaphore>,
    metrics: Metrics,
    health: Arc<Health>,
    partitions: Mutex<HashMap<TopicPartition, PartitionHandle>>,
    channel_capacity: usize,
    max_overflow_bytes: u64,
    /// Set by partition tasks near their uncommitted bound: commit before the interval is up.
    commit_requested: Arc<AtomicBool>,
    /// Held while committing, so a revoke's final commit can never be overtaken by an older offset the
    /// committer thread is still sending for the same partition.
    commit_lock: Mutex<()>,
    /// Final offsets whose commit failed at shutdown.
    held: Mutex<HeldOffsets>,
    /// Where never-committed partitions start.
    start: StartPolicy,
    /// Partitions whose log may have shrunk under us (librdkafka reset an out-of-range position, or a commit found
    /// the topic gone): their commits are checked against the log end first. Never held while calling librdkafka.
    suspects: Mutex<HashSet<TopicPartition>>,
}

pub struct WorkerContext(pub Arc<Dispatch>);

impl Dispatch {
    pub fn new(
        runtime: Handle,
        settings: PartitionSettings,
        jobs: Arc<JobContext>,
        per_worker: usize,
        metrics: Metrics,
        health: Arc<Health>,
        start: StartPolicy,
    ) -> Self {
        Self {
            runtime,
            settings,
            jobs,
            worker_permits: Arc::new(Semaphore::new(per_worker.max(1))),
            metrics,
            health,
            partitions: Mutex::new(HashMap::new()),
            channel_capacity: settings.max_pending_records.clamp(1024, 4096),
            max_overflow_bytes: settings.max_pending_bytes.max(MIN_OVERFLOW_BYTES),
            commit_requested: Arc::new(AtomicBool::new(false)),
            commit_lock: Mutex::new(()),
            held: Mutex::new(HeldOffsets::default()),
            start,
            suspects: Mutex::new(HashSet::new()),
        }
    }

    fn suspects(&self) -> MutexGuard<'_, HashSet<TopicPartition>> {
        self.suspects.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// librdkafka reset a partition whose fetch position was out of range (to the earliest retained record, as
    /// `auto.offset.reset` says): counted, and the partition's commits are checked against its log end until one
    /// passes.
    fn offset_reset_seen(&self, topic: &str, partition: i32) {
        self.metrics.offset_resets.with_label_values(&["out_of_range"]).inc();
        self.suspects().insert((Arc::from(topic), partition));
    }

    /// Sets the start offset of each newly assigned partition in `tpl` by the shared rule
    /// ([`kpipe_api::offsets::start_point`]): out-of-range committed offsets reset to the earliest retained record
    /// (counted and logged), never-committed partitions start where `startOffset` says. When the lookups fail the
    /// offsets stay unset and librdkafka resolves them: the committed offset, else `auto.offset.reset` (earliest).
    fn resolve_starts<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>, tpl: &mut TopicPartitionList) {
        let parts = partitions_of(tpl);
        if parts.is_empty() {
            return;
        }
        let (looked_up, inherited) = match lookup_starts(consumer, &parts, self.start) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(partitions = ?parts, "{e}; librdkafka resolves the start offsets (the committed offset, \
                    else the earliest retained record)");
                return;
            }
        };
        // --- failure handling hook (issue 19): attempt budgets survive rescheduling.
        for (tp, report) in inherited {
            self.health.inherit(&tp.0, tp.1, &report);
        }
        for (tp, position, since) in looked_up {
            let point = start_point(&position, self.start.start_offset, since);
            if let StartPoint::Reset { offset, committed, reason } = point {
                self.metrics.offset_resets.with_label_values(&[reason.as_str()]).inc();
                tracing::warn!(topic = %tp.0, partition = tp.1, committed, reset_to = offset, reason = reason.as_str(),
                    log_start = position.log_start, log_end = position.log_end,
                    "committed offset out of range: starting at the earliest retained record");
            } else {
                tracing::info!(topic = %tp.0, partition = tp.1, offset = point.offset(), start = ?point,
                    log_start = position.log_start, log_end = position.log_end, "start position");
            }
            if let Err(e) = tpl.set_partition_offset(&tp.0, tp.1, Offset::Offset(point.offset())) {
                tracing::warn!(topic = %tp.0, partition = tp.1, "cannot set the start offset: {e}");
            }
            self.suspects().remove(&tp);
        }
    }

    /// The offsets of `offsets` that may be committed: none beyond its partition's log end. Final commits
    /// (`verify_all`) look up every partition's log end; periodic commits only those of suspect partitions (a
    /// shrinking log is always preceded by an out-of-range reset or a failed commit), so the hot path costs nothing.
    /// Withheld offsets are counted and logged, and handed to the committer again later.
    fn within_log_end<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        offsets: Vec<(TopicPartition, i64)>,
        verify_all: bool,
    ) -> Vec<(TopicPartition, i64)> {
        let check: Vec<TopicPartition> = {
            let suspects = self.suspects();
            offsets.iter().map(|(tp, _)| tp).filter(|tp| verify_all || suspects.contains(*tp)).cloned().collect()
        };
        if check.is_empty() {
            return offsets;
        }
        let ends = match log_ends(consumer, &check) {
            Ok(ends) => ends,
            Err(e) => {
                tracing::warn!(partitions = ?check, "cannot read the log ends before committing: {e}");
                HashMap::new()
            }
        };
        let mut keep = Vec::with_capacity(offsets.len());
        let mut withheld = TopicPartitionList::new();
        for (tp, offset) in offsets {
            if !check.contains(&tp) {
                keep.push((tp, offset));
                continue;
            }
            let suspect = self.suspects().contains(&tp);
            let verdict = match ends.get(&tp) {
                Some(Ok(end)) if offset <= *end => Ok(()),
                Some(Ok(end)) => Err(format!("beyond the log end {end}")),
                Some(Err(e)) if topic_gone(e) => Err(format!("the topic is gone: {e}")),
                // Not verifiable: only a suspect partition is held back.
                _ if suspect => Err("its log end is unknown".to_owned()),
                _ => Ok(()),
            };
            match verdict {
                Ok(()) => {
                    self.suspects().remove(&tp);
                    keep.push((tp, offset));
                }
                Err(why) => {
                    self.metrics.commits_withheld.inc();
                    tracing::warn!(topic = %tp.0, partition = tp.1, offset,
                        "not committing offset {offset}: {why} (topic recreated or log truncated)");
                    self.suspects().insert(tp.clone());
                    if withheld.add_partition_offset(&tp.0, tp.1, Offset::Offset(offset)).is_err() {
                        tracing::debug!(topic = %tp.0, partition = tp.1, "cannot list a withheld offset");
                    }
                }
            }
        }
        if withheld.count() > 0 {
            self.forget_commits(Some(&withheld));
        }
        keep
    }

    fn partitions(&self) -> MutexGuard<'_, HashMap<TopicPartition, PartitionHandle>> {
        // A poisoned lock only means a panic elsewhere; the map itself is still consistent.
        self.partitions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn held(&self) -> MutexGuard<'_, HeldOffsets> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn assign(&self, tpl: &TopicPartitionList) {
        let mut parts = self.partitions();
        for tp in partitions_of(tpl) {
            if parts.contains_key(&tp) {
                continue;
            }
            let (tx, rx) = mpsc::channel(self.channel_capacity.div_ceil(CHUNK_RECORDS).max(2));
            let progress = Arc::new(PartitionProgress::new(self.commit_requested.clone()));
            let task = PartitionTask {
                topic: tp.0.to_string(),
                partition: tp.1,
                settings: self.settings,
                jobs: self.jobs.clone(),
                worker_permits: self.worker_permits.clone(),
                progress: progress.clone(),
            };
            let task = self.runtime.spawn(task.run(rx));
            tracing::info!(topic = %tp.0, partition = tp.1, "partition assigned");
            parts.insert(
                tp.clone(),
                PartitionHandle {
                    topic: tp.0.to_string(),
                    tx,
                    staged: Vec::with_capacity(CHUNK_RECORDS),
                    staged_bytes: 0,
                    overflow: VecDeque::new(),
                    overflow_records: 0,
                    overflow_bytes: 0,
                    paused: false,
                    progress,
                    last_committed: None,
                    task,
                },
            );
        }
        self.metrics.assigned_partitions.set(parts.len() as i64);
    }

    /// Stops the given partitions' tasks, waits for them to drain (bounded), and returns the final
    /// offsets to commit.
    fn drain(&self, tps: &[TopicPartition]) -> Vec<(TopicPartition, i64)> {
        let handles: Vec<(TopicPartition, PartitionHandle)> = {
            let mut parts = self.partitions();
            let taken = tps.iter().filter_map(|tp| parts.remove(tp).map(|h| (tp.clone(), h))).collect();
            self.metrics.assigned_partitions.set(parts.len() as i64);
            taken
        };
        let mut offsets = Vec::with_capacity(handles.len());
        // The tasks apply drain_timeout themselves; the margin covers a task stuck waiting for
        // worker permits.
        let deadline = Instant::now() + self.settings.drain_timeout + Duration::from_secs(2);
        for ((topic, partition), h) in handles {
            if h.paused {
                self.metrics.paused_partitions.dec();
            }
            drop(h.tx);
            let mut task = h.task;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let result = self.runtime.block_on(async { tokio::time::timeout(remaining, &mut task).await });
            let committable = match result {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    tracing::error!(%topic, partition, "partition task failed: {e}");
                    h.progress.committable()
                }
                Err(_) => {
                    task.abort();
                    tracing::warn!(%topic, partition, "partition task did not drain in time; aborted");
                    h.progress.committable()
                }
            };
            self.health.forget_partition(&topic, partition);
            let _ = self.metrics.lag.remove_label_values(&[&*topic, &partition.to_string()]);
            let _ = self.metrics.committed_offset.remove_label_values(&[&*topic, &partition.to_string()]);
            // Always part of the final synchronous commit, whatever the periodic commits did.
            if let Some(offset) = committable {
                offsets.push(((topic, partition), offset));
            }
        }
        offsets
    }

    fn all_partitions(&self) -> Vec<TopicPartition> {
        self.partitions().keys().cloned().collect()
    }

    /// Stages a record for its partition task. Records travel in chunks (fewer task wake-ups per
    /// record); a full chunk is sent at once, the rest by `flush`.
    fn dispatch<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>, record: Record) {
        let mut parts = self.partitions();
        let record_partition = record.partition;
        let Some(h) = parts.get_mut(&(record.topic.clone(), record.partition)) else {
            tracing::debug!(topic = %record.topic, partition = record.partition, "record for a partition not assigned; ignored");
            return;
        };
        h.staged_bytes += record.size_bytes();
        h.staged.push(Input::Record(record));
        if h.staged.len() >= CHUNK_RECORDS {
            self.send_staged(consumer, h, &record_partition);
        }
    }

    /// Sends the staged chunk, or parks it in the overflow when the task's channel is full.
    /// Only a large overflow pauses the partition: pausing is expensive (librdkafka drops the
    /// partition's prefetched records and re-fetches them on resume), so it is reserved for real
    /// backlogs.
    fn send_staged<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>, h: &mut PartitionHandle, partition: &i32) {
        if h.staged.is_empty() {
            return;
        }
        let chunk = std::mem::replace(&mut h.staged, Vec::with_capacity(CHUNK_RECORDS));
        let bytes = std::mem::take(&mut h.staged_bytes);
        let chunk = if h.overflow.is_empty() {
            match h.tx.try_send(chunk) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(chunk)) => chunk,
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    tracing::error!(topic = %h.topic, partition, "partition task ended unexpectedly");
                    return;
                }
            }
        } else {
            chunk
        };
        h.overflow_records += chunk.len();
        h.overflow_bytes += bytes;
        h.overflow.push_back((chunk, bytes));
        // librdkafka hands over a whole fetch response of a partition at once (up to
        // max.partition.fetch.bytes), so the overflow must absorb such a burst without pausing.
        if !h.paused && (h.overflow_records >= MAX_OVERFLOW_RECORDS || h.overflow_bytes >= self.max_overflow_bytes) {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&h.topic, *partition);
            if let Err(e) = consumer.pause(&tpl) {
                tracing::warn!(topic = %h.topic, partition, "cannot pause partition: {e}");
            }
            h.paused = true;
            self.metrics.paused_partitions.inc();
        }
    }

    /// Sends every staged chunk, moves overflow into tasks with room again, and resumes paused
    /// partitions once their overflow is empty and their channel at least half free (hysteresis
    /// against pause/resume churn). Returns whether any partition still has overflow.
    fn flush<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>) -> bool {
        let mut parts = self.partitions();
        let mut any_overflow = false;
        for ((_, partition), h) in parts.iter_mut() {
            while let Some((chunk, bytes)) = h.overflow.pop_front() {
                let records = chunk.len();
                match h.tx.try_send(chunk) {
                    Ok(()) => {
                        h.overflow_records -= records;
                        h.overflow_bytes -= bytes;
                    }
                    Err(mpsc::error::TrySendError::Full(chunk)) => {
                        h.overflow.push_front((chunk, bytes));
                        break;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        h.overflow.clear();
                        (h.overflow_records, h.overflow_bytes) = (0, 0);
                    }
                }
            }
            self.send_staged(consumer, h, partition);
            if !h.overflow.is_empty() {
                any_overflow = true;
            } else if h.paused && h.tx.capacity() * 2 >= h.tx.max_capacity() {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition(&h.topic, *partition);
                if let Err(e) = consumer.resume(&tpl) {
                    tracing::warn!(topic = %h.topic, partition, "cannot resume partition: {e}");
                }
                h.paused = false;
                self.metrics.paused_partitions.dec();
            } else if h.paused {
                any_overflow = true;
            }
        }
        any_overflow
    }

    /// Returns the partitions whose committable offset moved since it was last handed to the
    /// committer. On the regular interval (`with_positions`) it also tells idle partition tasks the
    /// consumer's fetch position, so commits can pass transaction markers at the log end; early
    /// commits, which can come every few milliseconds, skip that.
    fn periodic_commit<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>, with_positions: bool) -> CommitRequest {
        self.commit_requested.store(false, AtomicOrdering::Release);
        let positions = if with_positions { consumer.position().ok() } else { None };
        let mut request = CommitRequest::new();
        let mut parts = self.partitions();
        if let Some(positions) = positions {
            for e in positions.elements() {
                if let (Offset::Offset(pos), Some(h)) =
                    (e.offset(), parts.get_mut(&(Arc::<str>::from(e.topic()), e.partition())))
                    && h.overflow.is_empty()
                {
                    // In-band after every record below it; sent with the next flush.
                    h.staged.push(Input::Position(pos));
                }
            }
        }
        for ((topic, partition), h) in parts.iter_mut() {
            let Some(offset) = h.progress.committable() else { continue };
            // A record being retried at the commit point is re-reported on every regular interval (the
            // same offset, fresh metadata), so the operator sees a live retry rather than a stuck partition.
            let report_retry = with_positions && self.health.retry_report(topic, *partition, offset, 0).is_some();
            if h.last_committed != Some(offset) || report_retry {
                request.push((topic.clone(), *partition));
                h.last_committed = Some(offset);
            }
        }
        request
    }

    /// Forgets which offsets were already sent, so the next periodic commit sends every committable offset
    /// again. Called after a rebalance (commits made while the group rebalances are rejected) and after a
    /// failed commit: an unacknowledged commit must not widen the redelivery window of a later crash.
    fn forget_commits(&self, only: Option<&TopicPartitionList>) {
        let mut parts = self.partitions();
        match only {
            None => parts.values_mut().for_each(|h| h.last_committed = None),
            Some(tpl) => {
                for e in tpl.elements() {
                    if let Some(h) = parts.get_mut(&(Arc::<str>::from(e.topic()), e.partition())) {
                        h.last_committed = None;
                    }
                }
            }
        }
    }

    fn record_committed(&self, offsets: &TopicPartitionList) {
        let mut parts = self.partitions();
        for e in offsets.elements() {
            if let (Offset::Offset(o), None) = (e.offset(), e.error().err()) {
                self.metrics.committed_offset.with_label_values(&[e.topic(), &e.partition().to_string()]).set(o);
                if let Some(h) = parts.get_mut(&(Arc::<str>::from(e.topic()), e.partition())) {
                    h.last_committed = Some(o);
                    h.progress.acknowledge(o);
                }
            }
        }
    }
}

/// Commits final `offsets` synchronously and records what the broker acknowledged. Holds the commit lock, so the
/// committer thread and a revoke's final commit never overtake each other. Every offset is checked against its
/// partition's log end first (a revoke often follows a topic deletion); offsets beyond it are not committed. False
/// when the broker refused the commit.
fn commit_sync<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    offsets: &[(TopicPartition, i64)],
    dispatch: &Dispatch,
) -> bool {
    if offsets.is_empty() {
        return true;
    }
    let _committing = dispatch.commit_lock.lock().unwrap_or_else(|e| e.into_inner());
    let tpl = commit_list(&dispatch.within_log_end(consumer, offsets.to_vec(), true));
    if tpl.count() == 0 {
        return true;
    }
    tracing::info!(offsets = ?tpl.to_topic_map(), "final commit");
    commit_locked(consumer, &tpl, dispatch)
}

/// Commits and records the result; true when the broker acknowledged it (or there was nothing to commit).
fn commit_locked<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    tpl: &TopicPartitionList,
    dispatch: &Dispatch,
) -> bool {
    let started = Instant::now();
    let result = consumer.commit(tpl, CommitMode::Sync);
    dispatch.metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
    match result {
        Ok(()) => {
            dispatch.health.set_broker_error(None);
            dispatch.record_committed(tpl);
            tracing::debug!(offsets = ?tpl.to_topic_map(), "committed");
            true
        }
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => true,
        Err(e) => {
            dispatch.metrics.commit_failures.inc();
            tracing::warn!("commit failed: {e}");
            if topic_gone(&e) {
                // Deleted, perhaps about to be recreated: the next commits of these partitions check the log end.
                dispatch.suspects().extend(partitions_of(tpl));
            }
            dispatch.forget_commits(Some(tpl));
            false
        }
    }
}

/// Commits a periodic or early request for the partitions still assigned, each at its committable offset
/// of now. Synchronous, because the acknowledgement is what moves each partition's uncommitted window
/// (librdkafka posts async commit results only to an `offset_commit_cb`, which the event-based rust-rdkafka
/// consumer does not set).
fn commit_request<C: ConsumerContext>(consumer: &BaseConsumer<C>, request: &[TopicPartition], dispatch: &Dispatch) {
    // Taken before the offsets are read: a partition revoked meanwhile is gone from the map by then.
    let _committing = dispatch.commit_lock.lock().unwrap_or_else(|e| e.into_inner());
    let mut offsets = Vec::with_capacity(request.len());
    {
        let mut parts = dispatch.partitions();
        for tp in request {
            if let Some(h) = parts.get_mut(tp)
                && let Some(offset) = h.progress.committable()
            {
                h.last_committed = Some(offset);
                offsets.push((tp.clone(), offset));
            }
        }
    }
    // Each commit carries the partition's retry report (empty when none) in its metadata: how the operator tells
    // a partition a live worker retries from a stuck one (kpipe_api::commit_metadata).
    let now = unix_millis();
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in dispatch.within_log_end(consumer, offsets, false) {
        let report = dispatch.health.retry_report(&topic, partition, offset, now);
        let mut elem = tpl.add_partition(&topic, partition);
        elem.set_metadata(commit_metadata::encode(report.as_ref()));
        if let Err(e) = elem.set_offset(Offset::Offset(offset)) {
            tracing::warn!(%topic, partition, "cannot add offset to commit list: {e}");
        }
    }
    if tpl.count() > 0 {
        commit_locked(consumer, &tpl, dispatch);
    }
}

/// After a refused final commit at shutdown: keeps serving the consumer so the rebalance in progress can finish
/// (its revoke commits the held offsets) and retries those still assigned, until all are committed or the
/// `deadline`. Records fetched meanwhile belong to drained partitions and are not processed.
fn settle_held_offsets<C: ConsumerContext>(consumer: &BaseConsumer<C>, dispatch: &Dispatch, deadline: Instant) {
    let mut next_try = Instant::now() + Duration::from_millis(200);
    while !dispatch.held().is_empty() && Instant::now() < deadline {
        if let Some(Err(e)) = consumer.poll(Duration::from_millis(50)) {
            tracing::debug!("consumer error while retrying the final commit: {e}");
        }
        if Instant::now() < next_try {
            continue;
        }
        next_try = Instant::now() + Duration::from_millis(500);
        let Ok(assignment) = consumer.assignment() else { continue };
        let retry = dispatch.held().take(&partitions_of(&assignment));
        if !retry.is_empty() && !commit_sync(consumer, &retry, dispatch) {
            dispatch.held().hold(retry);
        }
    }
    let held = std::mem::take(&mut *dispatch.held());
    if !held.is_empty() {
        tracing::warn!(offsets = ?held.0, "final offsets not committed: their records will be delivered again");
    }
}

/// Merges queued requests into one, each partition once: a slow commit makes the next one bigger, not later.
fn merge_requests(mut request: CommitRequest, more: CommitRequest) -> CommitRequest {
    for tp in more {
        if !request.contains(&tp) {
            request.push(tp);
        }
    }
    request
}

/// The committer thread: commits requests from the poll thread one after another, so the poll thread never
/// waits for a broker round trip.
fn run_committer(consumer: &BaseConsumer<WorkerContext>, requests: std::sync::mpsc::Receiver<CommitRequest>) {
    while let Ok(mut request) = requests.recv() {
        while let Ok(more) = requests.try_recv() {
            request = merge_requests(request, more);
        }
        commit_request(consumer, &request, &consumer.context().0);
    }
}

impl ClientContext for WorkerContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        if fac == "OFFSET"
            && let Some((topic, partition)) = parse_offset_reset_log(message)
        {
            self.0.offset_reset_seen(&topic, partition);
        }
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", fac, "{message}")
            }
            RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", fac, "{message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => tracing::info!(target: "librdkafka", fac, "{message}"),
            RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", fac, "{message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // Unreachable brokers and security failures (rejected credentials, an untrusted or expired certificate)
        // make the worker unready with the reason, until a metadata request succeeds again.
        if matches!(
            error.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::AllBrokersDown
                    | RDKafkaErrorCode::Authentication
                    | RDKafkaErrorCode::SaslAuthenticationFailed
                    | RDKafkaErrorCode::SSL
            )
        ) {
            self.0.health.set_broker_error(Some(reason.to_owned()));
        }
        tracing::error!(target: "librdkafka", "{error}: {reason}");
    }

    fn stats(&self, stats: Statistics) {
        let parts = self.0.partitions();
        for (topic, t) in &stats.topics {
            for (id, p) in &t.partitions {
                if *id < 0 || !parts.contains_key(&(Arc::<str>::from(topic.as_str()), *id)) {
                    continue;
                }
                if p.consumer_lag >= 0 {
                    self.0.metrics.lag.with_label_values(&[topic, &id.to_string()]).set(p.consumer_lag);
                }
                if p.committed_offset >= 0 {
                    self.0
                        .metrics
                        .committed_offset
                        .with_label_values(&[topic, &id.to_string()])
                        .set(p.committed_offset);
                }
            }
        }
    }
}

impl ConsumerContext for WorkerContext {
    /// librdkafka's rebalance callback, as rust-rdkafka's default implementation, except that newly assigned
    /// partitions get explicit start offsets ([`Dispatch::resolve_starts`]) before they are assigned: setting them
    /// in the assignment is the only race-free way (a seek after the assignment races librdkafka's own
    /// committed-offset fetch).
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let assign = err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS;
        if assign {
            self.0.resolve_starts(consumer, tpl);
        }
        let rebalance = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => Rebalance::Assign(&*tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => Rebalance::Revoke(&*tpl),
            other => Rebalance::Error(KafkaError::Rebalance(other.into())),
        };
        self.pre_rebalance(consumer, &rebalance);
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let applied = match (assign, cooperative) {
            (true, true) => consumer.incremental_assign(tpl),
            (true, false) => consumer.assign(tpl),
            (false, true) => consumer.incremental_unassign(tpl),
            (false, false) => consumer.unassign(),
        };
        if let Err(e) = applied {
            tracing::error!(assign, "cannot apply the rebalance: {e}");
        }
        self.post_rebalance(consumer, &rebalance);
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let tps = partitions_of(tpl);
            if tps.is_empty() {
                return;
            }
            let lost = consumer.assignment_lost();
            self.0.metrics.rebalances.with_label_values(&[if lost { "lost" } else { "revoke" }]).inc();
            tracing::info!(partitions = ?tps, lost, "partitions revoked; draining");
            let mut offsets = self.0.drain(&tps);
            // Final offsets a shutdown could not commit: now, while these partitions are still ours, or never.
            // (A shutdown drained them already, so the two lists never name the same partition.)
            offsets.extend(self.0.held().take(&tps));
            if lost {
                tracing::warn!("assignment lost: not committing (another member owns these partitions now)");
            } else {
                commit_sync(consumer, &offsets, &self.0);
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) if tpl.count() > 0 => {
                self.0.metrics.rebalances.with_label_values(&["assign"]).inc();
                // librdkafka remembers a partition's pause flag across unassign/assign: a
                // partition we paused before it was revoked would come back paused for good.
                if let Err(e) = consumer.resume(tpl) {
                    tracing::warn!("cannot resume newly assigned partitions: {e}");
                }
                self.0.assign(tpl);
                self.0.forget_commits(None);
            }
            Rebalance::Revoke(_) => self.0.forget_commits(None),
            Rebalance::Error(e) => tracing::error!("rebalance error: {e}"),
            _ => {}
        }
    }
}

fn to_record(m: &BorrowedMessage<'_>, topic_cache: &mut Option<Arc<str>>) -> Record {
    let topic = match topic_cache {
        Some(t) if **t == *m.topic() => t.clone(),
        _ => {
            let t: Arc<str> = Arc::from(m.topic());
            *topic_cache = Some(t.clone());
            t
        }
    };
    let headers = m
        .headers()
        .map(|hs| hs.iter().map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec))).collect())
        .unwrap_or_default();
    Record {
        topic,
        partition: m.partition(),
        offset: m.offset(),
        timestamp_ms: m.timestamp().to_millis(),
        key: m.key().map(<[u8]>::to_vec),
        value: m.payload().map(<[u8]>::to_vec),
        headers,
        epoch: 0,
    }
}

pub struct ConsumerLoop {
    /// Shared with the committer thread only.
    pub consumer: Arc<BaseConsumer<WorkerContext>>,
    pub dispatch: Arc<Dispatch>,
    pub topics: Vec<String>,
    pub commit_interval: Duration,
    pub shutdown: CancellationToken,
}

impl ConsumerLoop {
    /// Runs on a dedicated OS thread until `shutdown` fires; then drains every partition,
    /// commits synchronously and closes the consumer (leaving the group). Fails only when the
    /// subscription is refused.
    pub fn run(self) -> Result<(), KafkaError> {
        let d = self.dispatch.clone();
        // Reach the brokers before subscribing so /readyz can say why we are not ready.
        let mut wait = Duration::from_millis(200);
        loop {
            if self.shutdown.is_cancelled() {
                return Ok(());
            }
            match self.consumer.fetch_metadata(Some(&self.topics[0]), Duration::from_secs(5)) {
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!("brokers not reachable yet: {e}; retrying in {wait:?}");
                    d.health.set_broker_error(Some(e.to_string()));
                    let until = Instant::now() + wait;
                    while Instant::now() < until && !self.shutdown.is_cancelled() {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    wait = (wait * 2).min(Duration::from_secs(10));
                }
            }
        }
        d.health.set_broker_error(None);
        let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        self.consumer.subscribe(&topics)?;
        d.health.set_subscribed();
        tracing::info!(?topics, "subscribed");
        let (commits, requests) = std::sync::mpsc::channel::<CommitRequest>();
        let committer = {
            let consumer = self.consumer.clone();
            std::thread::Builder::new().name("kpipe-committer".into()).spawn(move || run_committer(&consumer, requests))
        };
        // Without the thread (the OS refused one), commits run on this thread.
        let (commits, committer) = match committer {
            Ok(thread) => (Some(commits), Some(thread)),
            Err(e) => {
                tracing::error!("cannot start the committer thread, committing on the consumer thread: {e}");
                (None, None)
            }
        };
        let mut last_commit = Instant::now();
        let mut any_overflow = false;
        let mut staged = false;
        let mut last_flush = Instant::now();
        let mut last_probe = Instant::now();
        let mut topic_cache: Option<Arc<str>> = None;
        let mut iterations = 0u64;
        // Shared counters are updated in bulk: a per-record atomic on a cache line other
        // threads write too is measurable at a million records per second.
        let mut consumed = 0u64;
        loop {
            let timeout = if staged {
                Duration::ZERO
            } else if any_overflow {
                Duration::from_millis(5)
            } else {
                // Short enough that an early commit asked for by a partition task is sent promptly.
                Duration::from_millis(20)
            };
            let mut ran_dry = false;
            match self.consumer.poll(timeout) {
                Some(Ok(m)) => {
                    consumed += 1;
                    let record = to_record(&m, &mut topic_cache);
                    drop(m);
                    d.dispatch(&self.consumer, record);
                    staged = true;
                }
                Some(Err(e)) => tracing::warn!("consumer error: {e}"),
                None => ran_dry = true,
            }
            // Flush when the local queue ran dry, or every few ms under a constant stream (the
            // clock is read every 64 records only: it is not free on every machine).
            iterations = iterations.wrapping_add(1);
            if !ran_dry && !iterations.is_multiple_of(64) {
                continue;
            }
            d.metrics.consumed.inc_by(std::mem::take(&mut consumed));
            if self.shutdown.is_cancelled() {
                break;
            }
            let now = Instant::now();
            if (staged || any_overflow) && (ran_dry || now.duration_since(last_flush) >= CHUNK_MAX_DELAY) {
                any_overflow = d.flush(&self.consumer);
                staged = false;
                last_flush = now;
            }
            if d.health.has_broker_error() && last_probe.elapsed() >= Duration::from_secs(5) {
                // Idle consumers get no message or commit that would clear the error: probe.
                last_probe = Instant::now();
                if self.consumer.fetch_metadata(Some(&self.topics[0]), Duration::from_secs(1)).is_ok() {
                    d.health.set_broker_error(None);
                }
            }
            let due = last_commit.elapsed() >= self.commit_interval;
            let early = d.commit_requested.load(AtomicOrdering::Acquire) && last_commit.elapsed() >= EARLY_COMMIT_GAP;
            if due || early {
                let request = d.periodic_commit(&self.consumer, due);
                if !request.is_empty() {
                    match &commits {
                        Some(commits) => {
                            if let Err(std::sync::mpsc::SendError(request)) = commits.send(request) {
                                commit_request(&self.consumer, &request, &d);
                            }
                        }
                        None => commit_request(&self.consumer, &request, &d),
                    }
                }
                staged = true;
                last_commit = Instant::now();
            }
        }
        tracing::info!("shutting down: draining all partitions");
        let final_commit_deadline = Instant::now() + d.settings.drain_timeout + FINAL_COMMIT_MARGIN;
        drop(commits);
        if let Some(committer) = committer
            && committer.join().is_err()
        {
            tracing::error!("committer thread panicked");
        }
        let offsets = d.drain(&d.all_partitions());
        if !commit_sync(&self.consumer, &offsets, &d) {
            d.held().hold(offsets);
            settle_held_offsets(&self.consumer, &d, final_commit_deadline);
        }
        self.consumer.unsubscribe();
        // Dropping the last handle closes the consumer: it leaves the group (the revoke callback finds no
        // partitions left to drain).
        drop(self.consumer);
        tracing::info!("consumer closed");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_offsets_are_taken_once_and_only_for_the_named_partitions() {
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let mut held = HeldOffsets::default();
        held.hold([((a.clone(), 0), 10), ((a.clone(), 1), 20), ((b.clone(), 0), 30)]);
        let mut taken = held.take(&[(a.clone(), 1), (b.clone(), 0), (b.clone(), 7)]);
        taken.sort();
        assert_eq!(taken, vec![((a.clone(), 1), 20), ((b.clone(), 0), 30)]);
        assert!(held.take(&[(a.clone(), 1)]).is_empty(), "taken offsets are gone");
        assert!(!held.is_empty());
        assert_eq!(held.take(&[(a.clone(), 0)]), vec![((a, 0), 10)]);
        assert!(held.is_empty());
    }

    #[test]
    fn commit_lists_carry_every_offset() {
        let a: Arc<str> = Arc::from("a");
        let tpl = commit_list(&[((a.clone(), 0), 10), ((a.clone(), 3), 42)]);
        assert_eq!(partitions_of(&tpl), vec![(a.clone(), 0), (a, 3)]);
        assert_eq!(tpl.find_partition("a", 3).map(|e| e.offset()), Some(Offset::Offset(42)));
    }

    #[test]
    fn offset_reset_log_lines_name_their_partition() {
        let line = "orders.v2 [3]: offset reset (at offset 1000 (leader epoch 0), broker 1) to offset BEGINNING \
                    (leader epoch -1): fetch failed due to requested offset not available on the broker: Broker: \
                    Offset out of range";
        assert_eq!(parse_offset_reset_log(line), Some(("orders.v2".to_owned(), 3)));
        // As librdkafka 2.12 logs it on the bed (seen when a topic was recreated under a running worker).
        let seen = "[thrd:main]: recreate-190a5893 [0]: offset reset (at offset 1000 (leader epoch 0), broker 1) to \
                    offset BEGINNING (leader epoch -1): fetch failed due to requested offset not available on the \
                    broker: Broker: Offset out of range";
        assert_eq!(parse_offset_reset_log(seen), Some(("recreate-190a5893".to_owned(), 0)));
        assert_eq!(
            parse_offset_reset_log("orders [3]: offset reset (at INVALID, broker 1) to BEGINNING"),
            Some(("orders".into(), 3))
        );
        assert_eq!(parse_offset_reset_log("orders [x]: offset reset (at offset 1, broker 1)"), None);
        assert_eq!(parse_offset_reset_log("orders [3]: stored offset 5"), None);
        assert_eq!(parse_offset_reset_log("no brackets at all"), None);
    }

    #[test]
    fn queued_commit_requests_merge_to_each_partition_once() {
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let first = vec![(a.clone(), 0), (a.clone(), 1)];
        let second = vec![(a.clone(), 0), (b.clone(), 0), (a.clone(), 1)];
        let mut merged = merge_requests(first, second);
        merged.sort();
        assert_eq!(merged, vec![(a.clone(), 0), (a, 1), (b, 0)]);
    }
}
