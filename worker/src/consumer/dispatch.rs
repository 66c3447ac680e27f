//! Partition dispatch: one task per assigned partition, records staged into chunks and handed over through bounded
//! channels, the overflow that absorbs a fetch burst, and the hold, pause and resume that bound it ([`Backpressure`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kpipe_rdkafka_native::{CopiedHeaders, FetchedMessage, Header, copy_headers};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Message};
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

use super::backpressure::{Action, AfterFlush, Backpressure, HoldClock, HoldEdge, OverflowLimit};
use super::commit::HeldOffsets;
use super::positions::StartPolicy;
use super::waker::Resumed;
use super::{TopicPartition, partitions_of};

/// The assigned partitions by topic and partition. Hashed with FNV-1a rather than SipHash: the poll thread looks a
/// partition up for every record (SipHash was 5 % of a noop worker's instructions, measured with callgrind), and the
/// keys are topic names from the spec and partition numbers from the broker, not attacker-chosen.
pub(super) type PartitionMap = HashMap<TopicPartition, PartitionHandle, BuildHasherDefault<Fnv>>;

/// FNV-1a, 64 bits.
#[derive(Debug, Clone, Copy)]
pub(super) struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Records handed to a partition task per channel message, at most.
pub(super) const CHUNK_RECORDS: usize = 256;
/// Bytes (`Record::size_bytes`) after which a chunk is handed over even with fewer records: the channel counts
/// chunks, so large records would otherwise fill it with up to `CHUNK_RECORDS` of them per slot.
pub(super) const CHUNK_BYTES: u64 = 256 << 10;
/// The worker-wide bound on bytes of records fetched and not yet started (staged, overflowing, in partition
/// channels and pending in partition tasks), at least: DESIGN §2 "memory stays flat with any backlog", goal RSS ≤
/// 128 MiB. Per-partition bounds alone let it grow with the partition count (about 4 MiB per partition of 2 kB
/// records: 552 MiB RSS with 128 partitions). 24 MiB, not 32: counted with each record's bookkeeping since session 13,
/// and with pauses rarer a noop drain holds more of it (peak RSS 130 MiB with 32 MiB, 123 MiB with 24).
pub(super) const MIN_BUFFER_BUDGET_BYTES: u64 = 24 << 20;
/// What a partition may always hold unstarted, whatever the worker-wide total: every partition keeps work while
/// others hold the budget (a stalled partition cannot starve the rest).
pub(super) const BUFFER_FLOOR_BYTES: u64 = CHUNK_BYTES;
/// The share of the worker-wide budget one partition's overflow (records fetched while its task's channel is full,
/// in `Record::buffered_bytes`) may take before the consumer holds for it (and pauses it if it does not drain): a
/// third, 8 MiB by default.
pub(super) const OVERFLOWS_IN_BUDGET: u64 = 3;

pub(super) struct PartitionHandle {
    pub(super) topic: String,
    pub(super) tx: mpsc::Sender<Vec<Input>>,
    /// Records fetched but not yet sent to the task (the next chunk).
    pub(super) staged: Vec<Input>,
    pub(super) staged_bytes: u64,
    /// Bytes of every chunk put into the task's channel so far (see [`PartitionProgress::unstarted_bytes`]).
    pub(super) sent_bytes: u64,
    /// Chunks that found the task's channel full; a large overflow holds the consumer, then pauses the partition.
    pub(super) overflow: VecDeque<(Vec<Input>, u64)>,
    pub(super) overflow_bytes: u64,
    /// Consuming, holding the consumer, or paused in librdkafka.
    pub(super) backpressure: Backpressure,
    pub(super) progress: Arc<PartitionProgress>,
    /// The offset last handed to the committer (forgotten again when its commit fails).
    pub(super) last_committed: Option<i64>,
    /// The offset after the last record handed to this partition (see [`Dispatch::reposition_went_back`]).
    pub(super) next_offset: Option<i64>,
    /// A record came below `next_offset` since the last reposition: the offsets went back.
    pub(super) went_back: bool,
    pub(super) task: JoinHandle<Option<i64>>,
    /// Tells the task to stop taking records and drain.
    pub(super) stop: CancellationToken,
}

/// The worker-wide bound on buffered bytes for a per-partition pending bound of `max_pending_bytes`.
fn buffer_budget_bytes(max_pending_bytes: u64) -> u64 {
    (4 * max_pending_bytes).max(MIN_BUFFER_BUDGET_BYTES)
}

/// The overflow that holds the consumer for a partition (and pauses it if it does not drain): a third of the
/// worker-wide budget (so always above the pending bound), so a decompressed fetch response fits (the noop worker
/// paused after most fetches with the 2 MiB it had before: 110 pauses in a drain of 2M records of 100 B, none then)
/// and one partition's backlog still leaves two thirds of the budget to the others.
fn overflow_limit_bytes(max_pending_bytes: u64) -> u64 {
    buffer_budget_bytes(max_pending_bytes) / OVERFLOWS_IN_BUDGET
}

/// Everything the consumer callbacks and the dispatch loop share.
pub struct Dispatch {
    pub(super) runtime: Handle,
    pub(super) settings: PartitionSettings,
    pub(super) jobs: Arc<JobContext>,
    pub(super) worker_permits: Arc<Semaphore>,
    /// The worker's bytes-in-flight budget ([`crate::partition::InFlightBytes`]).
    pub(super) in_flight_bytes: crate::partition::InFlightBytes,
    pub(super) metrics: Metrics,
    pub(super) health: Arc<Health>,
    pub(super) partitions: Mutex<PartitionMap>,
    pub(super) channel_capacity: usize,
    pub(super) overflow_limit: OverflowLimit,
    /// Worker-wide bound on bytes fetched and not started ([`MIN_BUFFER_BUDGET_BYTES`]).
    pub(super) buffer_budget: u64,
    /// Those bytes as last counted ([`Dispatch::flush`] counts them; handing chunks over adds to it in between).
    pub(super) buffered_bytes: AtomicU64,
    /// Set by partition tasks near their uncommitted bound: commit before the interval is up.
    pub(super) commit_requested: Arc<AtomicBool>,
    /// Held while committing, so a revoke's final commit can never be overtaken by an older offset the
    /// committer thread is still sending for the same partition.
    pub(super) commit_lock: Mutex<()>,
    /// Final offsets whose commit failed at shutdown.
    pub(super) held: Mutex<HeldOffsets>,
    /// Where never-committed partitions start.
    pub(super) start: StartPolicy,
    /// Partitions whose log may have shrunk under us (librdkafka reset an out-of-range position, or a commit found
    /// the topic gone): their commits are checked against the log end first. Never held while calling librdkafka.
    pub(super) suspects: Mutex<HashSet<TopicPartition>>,
    /// Some partition's offsets went back since the last [`Dispatch::reposition_went_back`].
    pub(super) went_back: AtomicBool,
    /// Some partition holds (its overflow reached the limit): the consumer thread takes no records until the next
    /// [`Dispatch::flush`] finds every hold released or turned into a pause (see [`super::backpressure`]), or a drain
    /// took every holding partition away. Set only through [`Dispatch::set_holding`].
    pub(super) holding: AtomicBool,
    /// Times the holds (`kpipe_worker_consumer_holds_total`, `kpipe_worker_consumer_held_seconds_total`).
    hold_clock: Mutex<HoldClock>,
}

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
            in_flight_bytes: crate::partition::InFlightBytes::new(settings.limits.max_bytes),
            metrics,
            health,
            partitions: Mutex::new(PartitionMap::default()),
            channel_capacity: settings.max_pending_records.clamp(1024, 4096),
            overflow_limit: OverflowLimit { bytes: overflow_limit_bytes(settings.max_pending_bytes) },
            buffer_budget: buffer_budget_bytes(settings.max_pending_bytes),
            buffered_bytes: AtomicU64::new(0),
            commit_requested: Arc::new(AtomicBool::new(false)),
            commit_lock: Mutex::new(()),
            held: Mutex::new(HeldOffsets::default()),
            start,
            suspects: Mutex::new(HashSet::new()),
            went_back: AtomicBool::new(false),
            holding: AtomicBool::new(false),
            hold_clock: Mutex::new(HoldClock::default()),
        }
    }

    /// Whether some partition holds, as of `now` (see [`Dispatch::holding`]); counts and times the consumer's holds.
    fn set_holding(&self, holding: bool, now: Instant) {
        // Only this method writes `holding`, so an unchanged value is no edge: the clock's lock is taken only on one
        // (a flush runs every few milliseconds under load).
        if self.holding.swap(holding, AtomicOrdering::Relaxed) == holding {
            return;
        }
        match self.hold_clock.lock().unwrap_or_else(|e| e.into_inner()).set(holding, now) {
            Some(HoldEdge::Started) => self.metrics.consumer_holds.inc(),
            Some(HoldEdge::Ended(held)) => self.metrics.consumer_held_seconds.inc_by(held.as_secs_f64()),
            None => {}
        }
    }

    pub(super) fn suspects(&self) -> MutexGuard<'_, HashSet<TopicPartition>> {
        self.suspects.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn partitions(&self) -> MutexGuard<'_, PartitionMap> {
        // A poisoned lock only means a panic elsewhere; the map itself is still consistent.
        self.partitions.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn held(&self) -> MutexGuard<'_, HeldOffsets> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn assign(&self, tpl: &TopicPartitionList) {
        let mut parts = self.partitions();
        for tp in partitions_of(tpl) {
            if parts.contains_key(&tp) {
                continue;
            }
            let (tx, rx) = mpsc::channel(self.channel_capacity.div_ceil(CHUNK_RECORDS).max(2));
            let progress = Arc::new(PartitionProgress::new(self.commit_requested.clone()));
            let stop = CancellationToken::new();
            let task = PartitionTask {
                topic: tp.0.to_string(),
                partition: tp.1,
                settings: self.settings,
                jobs: self.jobs.clone(),
                worker_permits: self.worker_permits.clone(),
                in_flight_bytes: self.in_flight_bytes.clone(),
                progress: progress.clone(),
                stop: stop.clone(),
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
                    sent_bytes: 0,
                    overflow: VecDeque::new(),
                    overflow_bytes: 0,
                    backpressure: Backpressure::new(self.overflow_limit),
                    progress,
                    last_committed: None,
                    next_offset: None,
                    went_back: false,
                    task,
                    stop,
                },
            );
        }
        self.metrics.assigned_partitions.set(parts.len() as i64);
    }

    /// Stops the given partitions' tasks, waits for them to drain (bounded), and returns the final
    /// offsets to commit.
    pub(super) fn drain(&self, tps: &[TopicPartition]) -> Vec<(TopicPartition, i64)> {
        let handles: Vec<(TopicPartition, PartitionHandle)> = {
            let mut parts = self.partitions();
            let taken = tps.iter().filter_map(|tp| parts.remove(tp).map(|h| (tp.clone(), h))).collect();
            self.metrics.assigned_partitions.set(parts.len() as i64);
            // A hold of a partition taken away ends here, not after the wait for its task below.
            if !parts.values().any(|h| h.backpressure.is_holding()) {
                self.set_holding(false, Instant::now());
            }
            taken
        };
        let mut offsets = Vec::with_capacity(handles.len());
        // The tasks apply drain_timeout themselves; the margin covers a task stuck waiting for
        // worker permits.
        let deadline = Instant::now() + self.settings.drain_timeout + Duration::from_secs(2);
        // Every task stops starting records before any is waited for: one stopped at its turn would keep
        // starting records (more abandoned work, more re-delivery) while the shared deadline shrinks.
        for (_, h) in &handles {
            h.stop.cancel();
        }
        for ((topic, partition), h) in handles {
            if h.backpressure.is_paused() {
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

    pub(super) fn all_partitions(&self) -> Vec<TopicPartition> {
        self.partitions().keys().cloned().collect()
    }

    /// Stages a record for its partition task. Records travel in chunks (fewer task wake-ups per
    /// record); a full chunk is sent at once, the rest by `flush`.
    pub(super) fn dispatch(&self, record: Record) {
        let mut parts = self.partitions();
        match parts.get_mut(&(record.topic.clone(), record.partition)) {
            Some(h) => self.stage(h, record),
            None => Self::not_assigned(&record),
        }
    }

    /// [`Dispatch::dispatch`] for a batch of records, emptying `records`: the partitions lock is taken once and a
    /// partition looked up once per run of its records (a fetch response brings each partition's records together).
    pub(super) fn dispatch_all(&self, records: &mut Vec<Record>) {
        if records.is_empty() {
            return;
        }
        let mut parts = self.partitions();
        let mut records = records.drain(..).peekable();
        while let Some(first) = records.next() {
            let Some(h) = parts.get_mut(&(first.topic.clone(), first.partition)) else {
                Self::not_assigned(&first);
                continue;
            };
            let (topic, partition) = (first.topic.clone(), first.partition);
            self.stage(h, first);
            let same_partition =
                |r: &Record| r.partition == partition && (Arc::ptr_eq(&r.topic, &topic) || r.topic == topic);
            while let Some(record) = records.next_if(same_partition) {
                self.stage(h, record);
            }
        }
    }

    fn not_assigned(record: &Record) {
        tracing::debug!(topic = %record.topic, partition = record.partition, "record for a partition not assigned; ignored");
    }

    fn stage(&self, h: &mut PartitionHandle, record: Record) {
        let offset = record.offset;
        if h.next_offset.is_some_and(|next| offset < next) {
            h.went_back = true;
            self.went_back.store(true, AtomicOrdering::Relaxed);
        }
        h.next_offset = Some(offset + 1);
        h.staged_bytes += record.buffered_bytes();
        let partition = record.partition;
        h.staged.push(Input::Record(record));
        if h.staged.len() >= CHUNK_RECORDS || h.staged_bytes >= CHUNK_BYTES {
            self.send_staged(h, &partition);
        }
    }

    /// Re-positions librdkafka on the partitions whose offsets went back (librdkafka reset an out-of-range position
    /// to a lower offset: the topic was recreated, the log truncated), at the offset after the last record handed
    /// out. Call it after every batch and before a commit reads the positions (and before the flush that may pause
    /// the partition: the pause then keeps the position this seek set).
    ///
    /// `rd_kafka_consume_batch_queue` only ever raises librdkafka's application position (`rktp_app_pos`;
    /// `rd_kafka_consumer_poll` sets it to every record it returns), so after such a reset the position stays at
    /// the old, higher offset until records pass it. librdkafka resumes a paused partition there (the records in
    /// between were never fetched: 10,232 of 30,000 skipped in `breaker10::a_pause_after_the_position_went_back_
    /// skips_nothing`), and the periodic commit hands it to the partition task as an `Input::Position` (the commit
    /// would pass records not yet received). A seek resets the application position and fetches the partition again
    /// from the given offset (its records still queued are discarded by the seek's version barrier, not lost).
    pub(super) fn reposition_went_back<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>) {
        if !self.went_back.swap(false, AtomicOrdering::Relaxed) {
            return;
        }
        let seeks: Vec<(String, i32, i64)> = self
            .partitions()
            .iter_mut()
            .filter(|(_, h)| h.went_back)
            .filter_map(|((_, partition), h)| {
                h.went_back = false;
                h.next_offset.map(|next| (h.topic.clone(), *partition, next))
            })
            .collect();
        // Not under the partitions lock: the seek waits for librdkafka's partition thread.
        for (topic, partition, offset) in seeks {
            match consumer.seek(&topic, partition, Offset::Offset(offset), Duration::from_secs(5)) {
                Ok(()) => tracing::info!(%topic, partition, offset, "offsets went back: fetching again from the \
                    offset after the last record handed out (librdkafka's position stayed at the old offset)"),
                Err(e) => tracing::warn!(%topic, partition, offset, "offsets went back and the position cannot be \
                    reset: {e}; a pause of this partition may resume at the old offset"),
            }
        }
    }

    /// Sends the staged chunk, or parks it in the overflow when the task's channel is full or the worker's buffer
    /// budget spent; a large overflow holds the consumer thread ([`Dispatch::holding`]), and only one that does not
    /// drain pauses the partition (in [`Dispatch::flush`]).
    pub(super) fn send_staged(&self, h: &mut PartitionHandle, partition: &i32) {
        if h.staged.is_empty() {
            return;
        }
        let chunk = std::mem::replace(&mut h.staged, Vec::with_capacity(CHUNK_RECORDS));
        let bytes = std::mem::take(&mut h.staged_bytes);
        let total = self.buffered_bytes.fetch_add(bytes, AtomicOrdering::Relaxed) + bytes;
        let within_budget = self.may_hand_over(h, total);
        let chunk = if h.overflow.is_empty() && within_budget {
            match h.tx.try_send(chunk) {
                Ok(()) => {
                    h.sent_bytes += bytes;
                    return;
                }
                Err(mpsc::error::TrySendError::Full(chunk)) => chunk,
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    tracing::error!(topic = %h.topic, partition, "partition task ended unexpectedly");
                    return;
                }
            }
        } else {
            chunk
        };
        h.overflow_bytes += bytes;
        h.overflow.push_back((chunk, bytes));
        // librdkafka hands over a whole fetch response of a partition at once (up to max.partition.fetch.bytes of
        // compressed records, several MiB once decompressed), so the overflow must absorb such a burst: past its limit
        // (or over the worker's buffer budget) the consumer thread holds until the task has taken it, and only an
        // overflow that does not drain pauses the partition (`super::backpressure`).
        let now = Instant::now();
        if h.backpressure.overflowed(h.overflow_bytes, !within_budget, now) == Some(Action::Hold) {
            self.set_holding(true, now);
        }
    }

    /// Pauses a partition whose hold did not drain in time.
    fn pause<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>, h: &mut PartitionHandle, partition: i32) {
        tracing::debug!(topic = %h.topic, partition, overflow_bytes = h.overflow_bytes, "the task did not take its \
            overflow while the consumer held: pausing the partition");
        let tpl = Self::one_partition(h, partition);
        match consumer.pause(&tpl).and_then(|()| partition_errors(&tpl)) {
            Ok(()) => {
                self.metrics.paused_partitions.inc();
                self.metrics.partition_pauses.inc();
            }
            Err(e) => {
                // Not paused: held again at the next overflow instead of believing the partition paused.
                tracing::warn!(topic = %h.topic, partition, "cannot pause partition: {e}");
                h.backpressure.pause_failed();
            }
        }
    }

    /// Resumes a paused partition whose overflow drained and adds it to `resumed` (its broker's fetcher is woken).
    /// A failed resume is only logged, as before the hold existed (the backpressure state already counts the
    /// partition as fetching).
    fn resume<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        h: &PartitionHandle,
        partition: i32,
        resumed: &mut Resumed,
    ) {
        let tpl = Self::one_partition(h, partition);
        match consumer.resume(&tpl).and_then(|()| partition_errors(&tpl)) {
            Ok(()) => resumed.push((h.topic.clone(), partition)),
            Err(e) => tracing::warn!(topic = %h.topic, partition, "cannot resume partition: {e}"),
        }
        self.metrics.paused_partitions.dec();
    }

    fn one_partition(h: &PartitionHandle, partition: i32) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&h.topic, partition);
        tpl
    }

    /// Whether `h` may hand another chunk to its task with `total` bytes buffered worker-wide: within the budget, or
    /// while its task holds less than [`BUFFER_FLOOR_BYTES`] unstarted.
    fn may_hand_over(&self, h: &PartitionHandle, total: u64) -> bool {
        total < self.buffer_budget || h.progress.unstarted_bytes(h.sent_bytes) < BUFFER_FLOOR_BYTES
    }

    /// Whether paused `h` may fetch again with `total` bytes buffered worker-wide: below half the budget
    /// (hysteresis), or while its task holds less than [`BUFFER_FLOOR_BYTES`] unstarted.
    fn may_resume(&self, h: &PartitionHandle, total: u64) -> bool {
        total < self.buffer_budget / 2 || h.progress.unstarted_bytes(h.sent_bytes) < BUFFER_FLOOR_BYTES
    }

    /// Sends every staged chunk, moves overflow into tasks with room again, releases holds whose overflow drained,
    /// pauses partitions that held for [`super::backpressure::HOLD_MAX`], and resumes paused partitions once their
    /// overflow is empty and their channel at least half free (hysteresis against pause/resume churn); the partitions
    /// it resumes are added to `resumed`, and [`Dispatch::holding`] says whether any partition still holds. Returns
    /// whether any partition still has overflow, holds or waits paused.
    pub(super) fn flush<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>, resumed: &mut Resumed) -> bool {
        self.flush_at(consumer, resumed, Instant::now())
    }

    /// [`Dispatch::flush`] with the clock read at `now` (holds are timed against it).
    fn flush_at<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>, resumed: &mut Resumed, now: Instant) -> bool {
        let mut parts = self.partitions();
        let mut any_overflow = false;
        let mut any_holding = false;
        let mut total: u64 =
            parts.values().map(|h| h.staged_bytes + h.overflow_bytes + h.progress.unstarted_bytes(h.sent_bytes)).sum();
        for ((_, partition), h) in parts.iter_mut() {
            while let Some((chunk, bytes)) = h.overflow.pop_front() {
                if !self.may_hand_over(h, total) {
                    h.overflow.push_front((chunk, bytes));
                    break;
                }
                match h.tx.try_send(chunk) {
                    Ok(()) => {
                        h.overflow_bytes -= bytes;
                        h.sent_bytes += bytes;
                    }
                    Err(mpsc::error::TrySendError::Full(chunk)) => {
                        h.overflow.push_front((chunk, bytes));
                        break;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        total = total.saturating_sub(h.overflow_bytes);
                        h.overflow.clear();
                        h.overflow_bytes = 0;
                    }
                }
            }
            self.send_staged(h, partition);
            let overflow_empty = h.overflow.is_empty();
            let after = AfterFlush {
                overflow_empty,
                free_slots: h.tx.capacity(),
                max_slots: h.tx.max_capacity(),
                may_hand_over: self.may_hand_over(h, total),
                may_resume: self.may_resume(h, total),
                now,
            };
            match h.backpressure.flushed(after) {
                Some(Action::Pause) => self.pause(consumer, h, *partition),
                Some(Action::Resume) => self.resume(consumer, h, *partition, resumed),
                Some(Action::Hold | Action::Release) | None => {}
            }
            any_overflow |= h.backpressure.waiting(overflow_empty);
            any_holding |= h.backpressure.is_holding();
        }
        self.set_holding(any_holding, now);
        self.buffered_bytes.store(total, AtomicOrdering::Relaxed);
        self.metrics.buffered_bytes.set(i64::try_from(total).unwrap_or(i64::MAX));
        any_overflow
    }
}

/// The errors librdkafka set on the partitions of a pause or resume: it reports a partition of a topic the client does
/// not know there (`_UNKNOWN_PARTITION`), and only invalid arguments in its return value
/// (`rd_kafka_toppars_pause_resume`, librdkafka 2.12; a partition of a known topic is found or created, so a revoked
/// one is paused without error).
fn partition_errors(tpl: &TopicPartitionList) -> KafkaResult<()> {
    tpl.elements().iter().try_for_each(|e| {
        e.error().map_err(|err| {
            KafkaError::PauseResume(err.rdkafka_error_code().map_or_else(|| err.to_string(), |code| code.to_string()))
        })
    })
}

/// The topic of each polled record as a shared name. A consumer of a single topic (topic names are plain names,
/// never patterns: `kpipe_api::rules::TOPIC_PATTERN`) gets only that topic's records and never reads the name from
/// librdkafka (a C string checked for UTF-8 on every call: 3 % of a noop worker's instructions, measured with
/// callgrind); with several topics the last name is reused while records of one topic follow each other.
#[derive(Debug, Default)]
pub(super) struct TopicNames {
    only: Option<Arc<str>>,
    last: Option<Arc<str>>,
}

impl TopicNames {
    pub(super) fn new(subscribed: &[String]) -> Self {
        match subscribed {
            [one] => Self { only: Some(Arc::from(one.as_str())), last: None },
            _ => Self::default(),
        }
    }

    /// The shared name of a record's topic: `is` says whether a name is the record's, `read` reads it.
    fn resolve(&mut self, is: impl FnOnce(&str) -> bool, read: impl FnOnce() -> Arc<str>) -> Arc<str> {
        if let Some(t) = &self.only {
            return t.clone();
        }
        match &self.last {
            Some(t) if is(t) => t.clone(),
            _ => {
                let t = read();
                self.last = Some(t.clone());
                t
            }
        }
    }
}

/// A record polled from the consumer queue (partitions that could not be forwarded to the fetch queue).
pub(super) fn to_record(m: &BorrowedMessage<'_>, topics: &mut TopicNames, metrics: &Metrics) -> Record {
    let topic = topics.resolve(|t| t == m.topic(), || Arc::from(m.topic()));
    let headers = copied(copy_headers(m), &topic, m.partition(), m.offset(), metrics);
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

/// A record taken from the fetch queue.
pub(super) fn fetched_record(m: &FetchedMessage<'_>, topics: &mut TopicNames, metrics: &Metrics) -> Record {
    let topic = topics.resolve(|t| m.topic_is(t), || Arc::from(m.topic()));
    let headers = copied(m.headers(), &topic, m.partition(), m.offset(), metrics);
    Record {
        topic,
        partition: m.partition(),
        offset: m.offset(),
        timestamp_ms: m.timestamp_ms(),
        key: m.key().map(<[u8]>::to_vec),
        value: m.payload().map(<[u8]>::to_vec),
        headers,
        epoch: 0,
    }
}

/// The headers of a record; header keys that were not UTF-8 are counted, and the first one is logged.
fn copied(headers: CopiedHeaders, topic: &str, partition: i32, offset: i64, metrics: &Metrics) -> Vec<Header> {
    if headers.lossy_keys > 0 {
        if metrics.header_keys_replaced.get() == 0 {
            tracing::warn!(%topic, partition, offset, "a header key is not UTF-8; passed on with U+FFFD in place of \
                the invalid bytes (counted in kpipe_worker_header_keys_replaced_total; only the first is logged)");
        }
        metrics.header_keys_replaced.inc_by(headers.lossy_keys as u64);
    }
    headers.headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_the_reference_vectors() {
        let hash = |bytes: &[u8]| {
            let mut h = Fnv::default();
            h.write(bytes);
            h.finish()
        };
        assert_eq!(hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(hash(b"foobar"), 0x8594_4171_f739_67e8);
    }

    /// Counts the records it processed per partition; a batch with a record keyed `slow` takes 600 ms, one keyed
    /// `stuck` 60 s, one keyed `instant` no time, any other 2 ms.
    #[derive(Default)]
    struct Counting {
        done: Mutex<HashMap<i32, usize>>,
    }

    impl crate::processor::Processor for Counting {
        fn process<'a>(
            &'a self,
            records: &'a [Arc<Record>],
        ) -> futures::future::BoxFuture<'a, crate::processor::BatchOutcome> {
            Box::pin(async move {
                let keyed = |key: &[u8]| records.iter().any(|r| r.key.as_deref() == Some(key));
                let millis = if keyed(b"stuck") {
                    60_000
                } else if keyed(b"slow") {
                    600
                } else if keyed(b"instant") {
                    0
                } else {
                    2
                };
                tokio::time::sleep(Duration::from_millis(millis)).await;
                let mut done = self.done.lock().unwrap();
                for r in records {
                    *done.entry(r.partition).or_default() += 1;
                }
                crate::processor::BatchOutcome::ok()
            })
        }
    }

    /// A dispatch on `runtime` whose partition tasks run `processor`: partition ordering, batches of 4, one batch in
    /// flight per partition, 64 per worker, 64 MiB pending per partition.
    fn dispatch_for_tests(runtime: &tokio::runtime::Runtime, processor: Arc<Counting>) -> Dispatch {
        dispatch_with_pending_bytes(runtime, processor, 64 << 20)
    }

    fn dispatch_with_pending_bytes(
        runtime: &tokio::runtime::Runtime,
        processor: Arc<Counting>,
        max_pending_bytes: u64,
    ) -> Dispatch {
        let settings = PartitionSettings {
            ordering: kpipe_api::v1alpha1::Ordering::Partition,
            limits: crate::scheduler::BatchLimits { max_records: 4, max_bytes: 1 << 20, max_wait: Duration::ZERO },
            per_partition: 1,
            max_pending_records: 4_096,
            max_pending_bytes,
            drain_timeout: Duration::from_secs(5),
            max_uncommitted: 100_000,
        };
        let start = StartPolicy { start_offset: kpipe_api::v1alpha1::StartOffset::Earliest, started_at_ms: None };
        let jobs = Arc::new(JobContext::for_tests(processor));
        Dispatch::new(runtime.handle().clone(), settings, jobs, 64, Metrics::new().unwrap(), Arc::default(), start)
    }

    /// An overflow past the limit holds the consumer (`Dispatch::holding`) instead of pausing: a task that takes it
    /// releases the hold, and one that does not is paused once the hold has lasted `HOLD_MAX`.
    #[test]
    fn a_full_overflow_holds_until_the_task_takes_it_and_pauses_only_a_task_that_does_not() {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let processor = Arc::new(Counting::default());
        // Budget 24 MiB, an overflow of 8 MiB holds.
        let d = dispatch_with_pending_bytes(&runtime, processor.clone(), 1 << 20);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition("t", 0);
        tpl.add_partition("t", 1);
        d.assign(&tpl);
        let consumer = unconnected_consumer();
        // Never connects, but knows the topic once assigned, so librdkafka pauses its partitions.
        consumer.assign(&tpl).unwrap();
        let state = |partition: i32| {
            let parts = d.partitions();
            let h = &parts[&(Arc::<str>::from("t"), partition)];
            (h.backpressure.is_holding(), h.backpressure.is_paused(), h.overflow_bytes)
        };
        // The clock the flushes read: holds started after `t0`, so no hold times out until it is moved on.
        let t0 = Instant::now();
        let mut resumed = Resumed::new();

        // A task that keeps up: 40 MiB at once overflow both the budget and the partition's limit.
        d.dispatch_all(&mut megabyte_records(0, 0..40, "instant"));
        assert!(d.holding.load(AtomicOrdering::Relaxed), "a full overflow holds the consumer");
        assert!(state(0).0);
        let deadline = Instant::now() + Duration::from_secs(10);
        while d.holding.load(AtomicOrdering::Relaxed) {
            assert!(Instant::now() < deadline, "the task never took the overflow: {:?}", state(0));
            d.flush_at(&consumer, &mut resumed, t0);
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(state(0), (false, false, 0), "released, not paused, overflow handed over");
        assert_eq!(d.metrics.partition_pauses.get(), 0);

        // A task that does not: its first batch never finishes, so the overflow stays.
        d.dispatch_all(&mut megabyte_records(1, 0..40, "stuck"));
        assert!(d.holding.load(AtomicOrdering::Relaxed));
        d.flush_at(&consumer, &mut resumed, t0);
        assert!(state(1).0, "still within HOLD_MAX: holding");
        d.flush_at(&consumer, &mut resumed, Instant::now() + super::super::backpressure::HOLD_MAX);
        let (holding, paused, overflow) = state(1);
        assert!(!holding && paused && overflow > 0, "paused with its overflow kept: {:?}", state(1));
        assert!(!d.holding.load(AtomicOrdering::Relaxed), "the consumer takes records again");
        assert_eq!(d.metrics.partition_pauses.get(), 1);
        while processor.done.lock().unwrap().get(&0).copied() != Some(40) {
            assert!(Instant::now() < deadline, "partition 0 did not process its 40 records");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Records of 1 MiB (a task's overflow fills after a few) at `offsets` of partition `partition` of topic `t`.
    fn megabyte_records(partition: i32, offsets: std::ops::Range<i64>, key: &str) -> Vec<Record> {
        let megabyte = "x".repeat(1 << 20);
        offsets
            .map(|o| {
                let mut r = crate::record::test_record(o, Some(key), &megabyte);
                r.partition = partition;
                r
            })
            .collect()
    }

    /// A consumer that never reaches a broker (librdkafka still serves assign, pause and resume locally).
    fn unconnected_consumer() -> BaseConsumer {
        rdkafka::ClientConfig::new().set("bootstrap.servers", "127.0.0.1:9").set("group.id", "unit").create().unwrap()
    }

    /// librdkafka reports a pause of a partition of a topic it does not know in the partition list, not in its return
    /// value: such a pause is neither counted nor believed (a partition believed paused would wait for a resume while
    /// librdkafka kept fetching it), and the next overflow holds the consumer again.
    #[test]
    fn a_pause_librdkafka_refuses_for_the_partition_is_not_counted_and_the_next_overflow_holds_again() {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let processor = Arc::new(Counting::default());
        let d = dispatch_with_pending_bytes(&runtime, processor, 1 << 20);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition("t", 0);
        d.assign(&tpl);
        // The consumer knows no topic `t`: librdkafka answers the pause with _UNKNOWN_PARTITION for it.
        let consumer = unconnected_consumer();
        let state = || {
            let parts = d.partitions();
            let h = &parts[&(Arc::<str>::from("t"), 0)];
            (h.backpressure.is_holding(), h.backpressure.is_paused())
        };
        let mut resumed = Resumed::new();
        d.dispatch_all(&mut megabyte_records(0, 0..40, "stuck"));
        assert!(d.holding.load(AtomicOrdering::Relaxed));
        assert_eq!(d.metrics.consumer_holds.get(), 1);
        d.flush_at(&consumer, &mut resumed, Instant::now() + super::super::backpressure::HOLD_MAX);
        assert_eq!(state(), (false, false), "the refused pause leaves the partition consuming, not believed paused");
        assert_eq!(d.metrics.partition_pauses.get(), 0, "a refused pause is not counted");
        assert_eq!(d.metrics.paused_partitions.get(), 0);
        d.dispatch_all(&mut megabyte_records(0, 40..41, "stuck"));
        assert!(d.holding.load(AtomicOrdering::Relaxed), "the overflow is still full: the consumer holds again");
        assert_eq!(d.metrics.consumer_holds.get(), 2);
    }

    /// A hold of a partition that is revoked (drained) ends with the drain, before the drain waits for the task, and
    /// is timed to there: the consumer takes records of its other partitions again at once.
    #[test]
    fn a_drain_ends_the_hold_of_the_partitions_it_takes_away() {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let processor = Arc::new(Counting::default());
        let d = dispatch_with_pending_bytes(&runtime, processor, 1 << 20);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition("t", 0);
        tpl.add_partition("t", 1);
        d.assign(&tpl);
        d.dispatch_all(&mut megabyte_records(0, 0..40, "instant"));
        assert!(d.holding.load(AtomicOrdering::Relaxed), "a full overflow holds the consumer");
        assert_eq!(d.metrics.consumer_holds.get(), 1);
        d.drain(&[(Arc::from("t"), 1)]);
        assert!(d.holding.load(AtomicOrdering::Relaxed), "partition 0 still holds: a drain of another keeps the hold");
        assert_eq!(d.metrics.consumer_held_seconds.get(), 0.0, "not ended yet");
        d.drain(&[(Arc::from("t"), 0)]);
        assert!(!d.holding.load(AtomicOrdering::Relaxed), "no partition left that holds");
        assert!(d.metrics.consumer_held_seconds.get() > 0.0, "the hold was timed when it ended");
        d.assign(&tpl);
        d.dispatch_all(&mut megabyte_records(1, 0..40, "instant"));
        assert_eq!(d.metrics.consumer_holds.get(), 2, "the next hold is a new one");
    }

    #[test]
    fn a_drain_stops_every_partition_before_it_waits_for_any() {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let processor = Arc::new(Counting::default());
        let d = dispatch_for_tests(&runtime, processor.clone());
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition("t", 0);
        tpl.add_partition("t", 1);
        d.assign(&tpl);
        // Partition 0 starts with a slow record, so its drain waits for it; partition 1 has plenty of fast work.
        let record = |partition, offset, key| {
            let mut r = crate::record::test_record(offset, Some(key), "v");
            r.partition = partition;
            Input::Record(r)
        };
        {
            let parts = d.partitions();
            let tx = |p: i32| parts[&(Arc::<str>::from("t"), p)].tx.clone();
            tx(0).try_send((0..8).map(|o| record(0, o, if o == 0 { "slow" } else { "k" })).collect()).unwrap();
            tx(1).try_send((0..2_000).map(|o| record(1, o, "k")).collect()).unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
        let before = processor.done.lock().unwrap().get(&1).copied().unwrap_or(0);
        assert!(before > 0 && before < 2_000, "partition 1 is processing: {before}");
        let offsets = d.drain(&[(Arc::from("t"), 0), (Arc::from("t"), 1)]);
        let done = processor.done.lock().unwrap().clone();
        // Stopped together, partition 1 finishes only the batch it had started; stopped after partition 0's
        // drain it would have gone on for another 600 ms (a few hundred records).
        assert!(done[&1] <= before + 4, "partition 1 went on from {before} to {} records during the drain", done[&1]);
        // Each commit covers exactly what its partition processed (both in offset order, from 0).
        let committed: HashMap<i32, i64> = offsets.into_iter().map(|((_, p), o)| (p, o)).collect();
        assert!(done[&0] >= 1, "partition 0 finished its slow record");
        assert_eq!(committed[&0], done[&0] as i64);
        assert_eq!(committed[&1], done[&1] as i64);
    }

    #[test]
    fn a_batch_is_staged_by_runs_into_the_right_partitions_in_order() {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let d = dispatch_for_tests(&runtime, Arc::new(Counting::default()));
        let mut tpl = TopicPartitionList::new();
        for (topic, partition) in [("t", 0), ("t", 1), ("u", 0)] {
            tpl.add_partition(topic, partition);
        }
        d.assign(&tpl);
        let (t, u): (Arc<str>, Arc<str>) = (Arc::from("t"), Arc::from("u"));
        let record = |topic: &Arc<str>, partition, offset| {
            let mut r = crate::record::test_record(offset, None, "v");
            r.topic = topic.clone();
            r.partition = partition;
            r
        };
        // Runs of t/0, then u/0 (same partition number, another topic), t/1, t/2 (not assigned), t/0 again, and
        // u/0 under a topic name that is equal but not the same allocation.
        let mut batch = vec![
            record(&t, 0, 0),
            record(&t, 0, 1),
            record(&u, 0, 7),
            record(&t, 1, 0),
            record(&t, 1, 1),
            record(&t, 2, 0),
            record(&t, 0, 2),
            record(&Arc::from("u"), 0, 8),
        ];
        d.dispatch_all(&mut batch);
        assert!(batch.is_empty(), "the batch is taken");
        let parts = d.partitions();
        let staged = |topic: &str, partition: i32| -> Vec<i64> {
            parts[&(Arc::<str>::from(topic), partition)]
                .staged
                .iter()
                .filter_map(|i| match i {
                    Input::Record(r) => Some(r.offset),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(staged("t", 0), [0, 1, 2]);
        assert_eq!(staged("u", 0), [7, 8]);
        assert_eq!(staged("t", 1), [0, 1]);
        assert!(!parts.contains_key(&(t.clone(), 2)), "an unassigned partition gets nothing");
        assert_eq!(parts[&(t.clone(), 0)].next_offset, Some(3));
    }

    #[test]
    fn a_decompressed_fetch_response_fits_in_a_partitions_overflow() {
        // The defaults: batch.maxBytes 1 MiB, so a pending bound of 2 MiB (`run::partition_settings`).
        let pending = 2 << 20;
        let limit = overflow_limit_bytes(pending);
        // One fetch of max.partition.fetch.bytes (256 KiB) of lz4-compressed 100 B records held about 16,000 records
        // in the peers benchmark; with the old bound (8,192 records or 2 MiB) the noop worker paused after most
        // fetches (110 pauses in a 2M-record drain; a pause drops the prefetched records, fetched again on resume).
        let fetch_response = 16_000 * (100 + crate::record::RECORD_OVERHEAD_BYTES);
        assert!(limit >= fetch_response, "overflow bound {limit} B, one decompressed fetch {fetch_response} B");
        // One partition's overflow leaves two thirds of the worker-wide budget to the others.
        assert_eq!(limit, buffer_budget_bytes(pending) / OVERFLOWS_IN_BUDGET);
        // Large batches raise both bounds together, the overflow's above the pending bound.
        assert_eq!(buffer_budget_bytes(64 << 20), 256 << 20);
        assert!(overflow_limit_bytes(64 << 20) > 64 << 20, "above the pending bound");
        assert_eq!(buffer_budget_bytes(pending), 24 << 20, "the default budget");
    }

    #[test]
    fn only_a_single_subscription_fixes_the_topic() {
        assert_eq!(TopicNames::new(&["orders".to_owned()]).only.as_deref(), Some("orders"));
        assert!(TopicNames::new(&["a".to_owned(), "b".to_owned()]).only.is_none());
    }
}
