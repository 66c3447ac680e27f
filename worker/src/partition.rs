//! One task per assigned partition: receives records from the dispatcher, schedules batches
//! (ordering, batching, concurrency), runs jobs, tracks which offset may be committed, and drains
//! when its input closes (revoke or shutdown).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering as AtomicOrdering};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::job::{JobContext, Lease, LeaseClosed};
use crate::metrics::Metrics;
use crate::record::Record;
use crate::scheduler::{BatchLimits, Next, Scheduler};
use crate::tracker::{OffsetTracker, Rebase};
use crate::window::UncommittedWindow;

/// What the dispatcher sends a partition task, in fetch order.
#[derive(Debug)]
pub enum Input {
    Record(Record),
    /// The consumer's fetch position: every record below it was sent before this.
    Position(i64),
}

/// Shared between a partition task and the consumer thread: the task publishes what may be committed, the consumer
/// reports which commits the broker acknowledged.
#[derive(Debug)]
pub struct PartitionProgress {
    committable: AtomicI64,
    acknowledged: AtomicI64,
    acknowledged_changed: Notify,
    /// Worker-wide: some partition wants a commit before the commit interval is up.
    commit_requested: Arc<AtomicBool>,
    /// Bytes (`Record::buffered_bytes`) of the records the task took from its channel so far (only the task adds).
    taken_bytes: AtomicU64,
    /// Bytes (`Record::buffered_bytes`) of the records the task holds pending, not yet started (only the task stores).
    pending_bytes: AtomicU64,
}

impl PartitionProgress {
    pub fn new(commit_requested: Arc<AtomicBool>) -> Self {
        Self {
            committable: AtomicI64::new(-1),
            acknowledged: AtomicI64::new(-1),
            acknowledged_changed: Notify::new(),
            commit_requested,
            taken_bytes: AtomicU64::new(0),
            pending_bytes: AtomicU64::new(0),
        }
    }

    /// Bytes of records the task holds and has not started: those still in its channel (`sent_bytes`: everything
    /// the consumer thread put into the channel so far) and its pending ones. Read by the consumer thread for the
    /// worker-wide buffer bound (`consumer::dispatch`); recomputed from the task's own counts, so nothing can leak.
    pub fn unstarted_bytes(&self, sent_bytes: u64) -> u64 {
        sent_bytes.saturating_sub(self.taken_bytes.load(AtomicOrdering::Relaxed))
            + self.pending_bytes.load(AtomicOrdering::Relaxed)
    }

    pub fn committable(&self) -> Option<i64> {
        let v = self.committable.load(AtomicOrdering::Acquire);
        (v >= 0).then_some(v)
    }

    fn set(&self, offset: Option<i64>) {
        if let Some(o) = offset {
            self.committable.store(o, AtomicOrdering::Release);
        }
    }

    /// The broker acknowledged a commit of `offset` for this partition.
    pub fn acknowledge(&self, offset: i64) {
        if self.acknowledged.fetch_max(offset, AtomicOrdering::AcqRel) < offset {
            self.acknowledged_changed.notify_one();
        }
    }

    /// Asks the consumer thread to commit before the commit interval is up.
    fn request_commit(&self) {
        self.commit_requested.store(true, AtomicOrdering::Release);
    }

    /// The partition's tracker re-based to lower offsets: acknowledgements of commits made before say nothing
    /// about the new offsets. (One still in flight may land after this; it only lets the uncommitted window count
    /// a few records as acknowledged early, never moves a commit.)
    fn rebased(&self) {
        self.acknowledged.store(-1, AtomicOrdering::Release);
    }

    pub fn acknowledged(&self) -> Option<i64> {
        let v = self.acknowledged.load(AtomicOrdering::Acquire);
        (v >= 0).then_some(v)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct PartitionSettings {
    pub ordering: kpipe_api::v1alpha1::Ordering,
    pub limits: BatchLimits,
    pub per_partition: usize,
    /// Most records/bytes received but not yet sent to the processor (beyond this the dispatcher
    /// pauses the partition).
    pub max_pending_records: usize,
    pub max_pending_bytes: u64,
    /// How long in-flight work may finish after the input closed before it is abandoned.
    pub drain_timeout: Duration,
    /// Records started but not yet below an acknowledged commit (`concurrency.uncommittedPerPartition`).
    pub max_uncommitted: usize,
}

/// Worker-wide bound on the bytes of records in processor calls (started, not finished), whatever
/// `concurrency.perWorker` allows: 8192 records in flight (a forwarder's default) of 1 MiB each would otherwise hold
/// 8 GiB. With the 24 MiB of fetched records not yet started (`consumer::dispatch`) and the forwarder's copies in
/// librdkafka's queue, a worker stays near DESIGN's 128 MiB whatever the record size. The floor of
/// [`InFlightBytes`]: pipelines with larger batches get [`BATCHES_IN_BUDGET`] of them.
pub const IN_FLIGHT_BUDGET_BYTES: u64 = 32 << 20;
/// Batches of the largest size (`batch.maxBytes`) the bytes budget holds at once, and so the share of the budget one
/// batch may take at most. A batch that cannot finish (`onFailure: block` against a poison record, a downstream that
/// never answers) keeps its share; with a share of the whole budget, one such batch would stop every other partition
/// of the worker, and their backlogs would wait behind a partition they do not depend on.
pub const BATCHES_IN_BUDGET: u64 = 4;
const IN_FLIGHT_PERMIT_BYTES: u64 = 1024;

/// The bytes-in-flight budget of one worker, shared by its partitions: `max(IN_FLIGHT_BUDGET_BYTES,
/// BATCHES_IN_BUDGET × batch.maxBytes)`, counted in KiB permits. A batch takes the permits of its bytes, at least 1
/// and at most `1 / BATCHES_IN_BUDGET` of the budget (a batch over that, e.g. one record larger than `maxBytes`,
/// counts as that share and so never waits for ever).
#[derive(Debug, Clone)]
pub struct InFlightBytes {
    permits: Arc<Semaphore>,
    batch_share: u32,
}

impl InFlightBytes {
    /// The budget for batches of at most `max_batch_bytes` (`batch.maxBytes`).
    pub fn new(max_batch_bytes: u64) -> Self {
        let budget = IN_FLIGHT_BUDGET_BYTES.max(BATCHES_IN_BUDGET.saturating_mul(max_batch_bytes));
        // batch.maxBytes is at most 1 GiB (the CRD's bound), so this is at most 4 Mi permits.
        let all = u32::try_from(budget / IN_FLIGHT_PERMIT_BYTES).unwrap_or(u32::MAX);
        let batch_share = u32::try_from(u64::from(all) / BATCHES_IN_BUDGET).unwrap_or(u32::MAX).max(1);
        Self { permits: Arc::new(Semaphore::new(all as usize)), batch_share }
    }

    /// The budget, bytes.
    pub fn budget_bytes(&self) -> u64 {
        u64::from(self.batch_share) * BATCHES_IN_BUDGET * IN_FLIGHT_PERMIT_BYTES
    }

    /// The permits a batch of `bytes` takes: at least 1, at most the batch share.
    fn permits_for(&self, bytes: u64) -> u32 {
        u32::try_from(bytes.div_ceil(IN_FLIGHT_PERMIT_BYTES).clamp(1, u64::from(self.batch_share))).unwrap_or(u32::MAX)
    }

    async fn acquire(&self, bytes: u64) -> Result<tokio::sync::OwnedSemaphorePermit, tokio::sync::AcquireError> {
        self.permits.clone().acquire_many_owned(self.permits_for(bytes)).await
    }
}

/// What a running batch holds: its records of `concurrency.perWorker` and its bytes of [`InFlightBytes`].
struct JobPermits {
    _records: tokio::sync::OwnedSemaphorePermit,
    _bytes: tokio::sync::OwnedSemaphorePermit,
}

impl JobPermits {
    /// Waits for permits for `batch`: one of `worker_permits` per record, its bytes of `in_flight_bytes`.
    async fn take(
        worker_permits: &Arc<Semaphore>,
        in_flight_bytes: &InFlightBytes,
        batch: &[Arc<Record>],
    ) -> Result<Self, tokio::sync::AcquireError> {
        let n = u32::try_from(batch.len()).unwrap_or(u32::MAX);
        // Clamped to perWorker at start-up, so this cannot wait forever.
        let records = worker_permits.clone().acquire_many_owned(n).await?;
        let bytes: u64 = batch.iter().map(|r| r.size_bytes()).sum();
        let bytes = in_flight_bytes.acquire(bytes).await?;
        Ok(Self { _records: records, _bytes: bytes })
    }
}

/// A batch's permits as a [`Lease`]: given back during retry back-offs.
struct JobLease {
    worker_permits: Arc<Semaphore>,
    in_flight_bytes: InFlightBytes,
    held: Option<JobPermits>,
}

impl Lease for JobLease {
    fn release(&mut self) {
        self.held = None;
    }

    async fn reacquire(&mut self, records: &[Arc<Record>]) -> Result<(), LeaseClosed> {
        if self.held.is_none() {
            let permits = JobPermits::take(&self.worker_permits, &self.in_flight_bytes, records)
                .await
                .map_err(|_| LeaseClosed)?;
            self.held = Some(permits);
        }
        Ok(())
    }
}

pub struct PartitionTask {
    pub topic: String,
    pub partition: i32,
    pub settings: PartitionSettings,
    pub jobs: Arc<JobContext>,
    pub worker_permits: Arc<Semaphore>,
    /// The worker's bytes budget, shared by its partitions.
    pub in_flight_bytes: InFlightBytes,
    pub progress: Arc<PartitionProgress>,
    /// Cancelled on revoke and shutdown: stop taking records and drain. (Closing the input says the same, but a
    /// task whose pending records are full does not read its input, so it would only notice once a job finished.)
    pub stop: CancellationToken,
}

impl PartitionTask {
    /// Offers the commit point to the consumer, and asks for an early commit when the uncommitted window needs one.
    fn publish(&self, tracker: &OffsetTracker, window: &mut UncommittedWindow, held_back: bool) {
        let Some(point) = tracker.committable() else { return };
        self.progress.set(Some(point));
        window.published(point, tracker.settled());
        if window.wants_commit(tracker, held_back) {
            self.progress.request_commit();
        }
    }

    /// The partition's offsets went back (see [`OffsetTracker::received`]): the records not yet started at or above
    /// the new offset are forgotten (the consumer delivers them again, or they no longer exist), the uncommitted
    /// window restarts, and the regression is counted and logged. Nothing is refused.
    fn rebased(
        &self,
        rebase: Rebase,
        tracker: &OffsetTracker,
        scheduler: &mut Scheduler,
        window: &mut UncommittedWindow,
    ) {
        let discarded = scheduler.discard_from(rebase.to);
        window.rebased(tracker);
        self.progress.rebased();
        let metrics = &self.jobs.metrics;
        metrics.offset_regressions.inc();
        metrics.in_flight.sub(rebase.forgotten as i64);
        tracing::warn!(topic = %self.topic, partition = self.partition, from = rebase.from, to = rebase.to,
            forgotten = rebase.forgotten, discarded, epoch = rebase.epoch,
            "offsets went back (the consumer was reset or the topic recreated): tracker re-based, every record from \
             the new offset on is processed");
    }

    /// Records a job reported finished: done for the tracker (of their epoch only), out of flight for the scheduler.
    fn settle(done: &[Arc<Record>], tracker: &mut OffsetTracker, scheduler: &mut Scheduler, metrics: &Metrics) {
        let settled = done.iter().filter(|r| tracker.done(r.offset, r.epoch)).count();
        metrics.in_flight.sub(settled as i64);
        scheduler.complete(done);
    }

    /// A job left the set: only a panic needs telling (its records stay unfinished and are delivered again).
    fn job_ended(&self, joined: Result<(), tokio::task::JoinError>) {
        if let Err(e) = joined
            && e.is_panic()
        {
            tracing::error!(topic = %self.topic, partition = self.partition, "batch job panicked: {e}");
        }
    }

    /// Runs `batch` as a job holding `permit` (its share of the worker-wide in-flight budget) until it ends;
    /// the job reports finished records on `done`.
    /// Waits for the permits `batch` needs: records first, then bytes (every task takes them in that order, and a
    /// running batch holds both until it ends, so waiting cannot deadlock). `Err`: the worker is shutting down.
    fn spawn_job(
        &self,
        jobs: &mut JoinSet<()>,
        batch: Vec<Arc<Record>>,
        permit: JobPermits,
        done: &mpsc::UnboundedSender<Vec<Arc<Record>>>,
    ) {
        let ctx = self.jobs.clone();
        let done = done.clone();
        let mut lease = JobLease {
            worker_permits: self.worker_permits.clone(),
            in_flight_bytes: self.in_flight_bytes.clone(),
            held: Some(permit),
        };
        jobs.spawn(async move {
            ctx.run(batch, done, &mut lease).await;
            drop(lease);
        });
    }

    /// Runs until the input closes and in-flight work drained (or the drain deadline passed).
    /// Returns the final committable offset.
    pub async fn run(self, mut input: mpsc::Receiver<Vec<Input>>) -> Option<i64> {
        let s = self.settings;
        let metrics = self.jobs.metrics.clone();
        let mut scheduler = Scheduler::new(s.ordering, s.limits, s.per_partition);
        let mut tracker = OffsetTracker::new();
        let mut window = UncommittedWindow::new(s.max_uncommitted);
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Vec<Arc<Record>>>();
        let mut jobs = JoinSet::new();
        let mut input_open = true;

        let mut held_back = false;
        // The highest offset handed to a job: the drain fills the gaps below it (see below).
        let mut highest_started: Option<i64> = None;
        while input_open && !self.stop.is_cancelled() {
            // Finished jobs leave the set here, not only in the select below: under a steady stream of completions
            // the biased select keeps taking `done` first, and finished jobs would stay in the set (a task's memory
            // each).
            while let Some(joined) = jobs.try_join_next() {
                self.job_ended(joined);
            }
            if let Some(offset) = self.progress.acknowledged() {
                window.acknowledged(offset);
            }
            let horizon = window.horizon(&tracker);
            let mut wake = None;
            loop {
                match scheduler.next_within(Instant::now().into_std(), self.worker_permits.available_permits(), horizon)
                {
                    Next::Ready(batch) => {
                        highest_started = highest_started.max(batch.iter().map(|r| r.offset).max());
                        let permit = match JobPermits::take(&self.worker_permits, &self.in_flight_bytes, &batch).await {
                            Ok(p) => p,
                            Err(_) => return tracker.committable(),
                        };
                        self.spawn_job(&mut jobs, batch, permit, &done_tx);
                    }
                    Next::WaitUntil(t) => {
                        wake = Some(Instant::from_std(t));
                        break;
                    }
                    Next::Idle => break,
                }
            }
            let holding = horizon.is_some_and(|h| scheduler.last_pending_offset().is_some_and(|p| p >= h));
            if holding && !held_back {
                metrics.commit_waits.inc();
                if window.wants_commit(&tracker, true) {
                    self.progress.request_commit();
                }
            }
            held_back = holding;
            self.progress.pending_bytes.store(scheduler.pending_buffered_bytes(), AtomicOrdering::Relaxed);
            let room =
                scheduler.pending_len() < s.max_pending_records && scheduler.pending_bytes() < s.max_pending_bytes;
            tokio::select! {
                biased;
                Some(done) = done_rx.recv() => {
                    Self::settle(&done, &mut tracker, &mut scheduler, &metrics);
                    self.publish(&tracker, &mut window, held_back);
                }
                _ = self.progress.acknowledged_changed.notified() => {}
                Some(joined) = jobs.join_next(), if !jobs.is_empty() => self.job_ended(joined),
                _ = self.stop.cancelled() => break,
                chunk = input.recv(), if room => {
                    let mut next = chunk;
                    let mut received = 0i64;
                    let mut received_bytes = 0u64;
                    let now = Instant::now().into_std();
                    // Take what is already queued in one go (fewer scheduler passes per record).
                    loop {
                        let Some(chunk) = next else {
                            input_open = false;
                            break;
                        };
                        for item in chunk {
                            match item {
                                Input::Record(mut r) => {
                                    let rebase = tracker.received(r.offset);
                                    r.epoch = tracker.epoch();
                                    if let Some(rebase) = rebase {
                                        self.rebased(rebase, &tracker, &mut scheduler, &mut window);
                                    }
                                    received += 1;
                                    received_bytes += r.buffered_bytes();
                                    scheduler.push(Arc::new(r), now);
                                }
                                Input::Position(p) => {
                                    if let Some(rebase) = tracker.observe_position(p) {
                                        self.rebased(rebase, &tracker, &mut scheduler, &mut window);
                                    }
                                }
                            }
                        }
                        if scheduler.pending_len() >= s.max_pending_records || scheduler.pending_bytes() >= s.max_pending_bytes {
                            break;
                        }
                        match input.try_recv() {
                            Ok(m) => next = Some(m),
                            Err(mpsc::error::TryRecvError::Empty) => break,
                            Err(mpsc::error::TryRecvError::Disconnected) => next = None,
                        }
                    }
                    metrics.in_flight.add(received);
                    self.progress.taken_bytes.fetch_add(received_bytes, AtomicOrdering::Relaxed);
                    self.progress.pending_bytes.store(scheduler.pending_buffered_bytes(), AtomicOrdering::Relaxed);
                    self.publish(&tracker, &mut window, held_back);
                }
                _ = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {}
            }
        }

        // Input closed. Start nothing beyond the highest offset already started, but do start the records below
        // it that are still pending (held back by key order, the per-partition limit or a lingering batch): the
        // commit point is the first record not done, so every record finished above such a gap would otherwise be
        // delivered again by the partition's next owner. Then let in-flight batches finish until the deadline.
        let fill_below = highest_started.map(|o| o + 1);
        let deadline = Instant::now() + s.drain_timeout;
        loop {
            // Completions first. A job reports its records before it ends, so once the set below is empty every
            // report is already here; deciding on an empty set with reports still queued would stop the fill early
            // (their keys still look in flight) and leave records below the highest started to the next owner.
            while let Ok(done) = done_rx.try_recv() {
                Self::settle(&done, &mut tracker, &mut scheduler, &metrics);
            }
            let mut wake = None;
            if let Some(horizon) = fill_below {
                loop {
                    let now = Instant::now();
                    match scheduler.next_within(now.into_std(), self.worker_permits.available_permits(), Some(horizon))
                    {
                        Next::Ready(batch) => {
                            let permits = JobPermits::take(&self.worker_permits, &self.in_flight_bytes, &batch);
                            let Ok(Ok(permit)) = tokio::time::timeout_at(deadline, permits).await else {
                                // Out of time (or shutting down): these records stay pending and are re-delivered.
                                scheduler.complete(&batch);
                                break;
                            };
                            self.spawn_job(&mut jobs, batch, permit, &done_tx);
                        }
                        Next::WaitUntil(t) => {
                            wake = Some(Instant::from_std(t).min(deadline));
                            break;
                        }
                        Next::Idle => break,
                    }
                }
            }
            if jobs.is_empty() && wake.is_none() {
                break;
            }
            tokio::select! {
                Some(done) = done_rx.recv() => Self::settle(&done, &mut tracker, &mut scheduler, &metrics),
                _ = jobs.join_next(), if !jobs.is_empty() => {}
                _ = tokio::time::sleep_until(wake.unwrap_or(deadline)), if wake.is_some() => {}
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(topic = %self.topic, partition = self.partition, jobs = jobs.len(),
                        "drain deadline passed; abandoning in-flight batches (they will be re-delivered)");
                    jobs.abort_all();
                    break;
                }
            }
        }
        let abandoned_pending = scheduler.pending_len();
        while jobs.join_next().await.is_some() {}
        drop(done_tx);
        while let Ok(done) = done_rx.try_recv() {
            Self::settle(&done, &mut tracker, &mut scheduler, &metrics);
        }
        metrics.in_flight.sub(tracker.outstanding() as i64);
        let committable = tracker.committable();
        self.progress.set(committable);
        tracing::info!(topic = %self.topic, partition = self.partition, ?committable,
            abandoned_pending, abandoned = tracker.outstanding(), "partition drained");
        committable
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use futures::future::BoxFuture;
    use kpipe_api::v1alpha1::Ordering;

    use super::*;
    use crate::processor::{BatchOutcome, Processor};
    use crate::record::test_record;

    /// Records the offsets it was given, in call order; each call takes `delay`, or `slow_key_delay` when its first
    /// record has the key `slow`.
    struct Recording {
        seen: Mutex<Vec<i64>>,
        delay: Duration,
        slow_key_delay: Duration,
    }

    impl Processor for Recording {
        fn process<'a>(&'a self, records: &'a [Arc<Record>]) -> BoxFuture<'a, BatchOutcome> {
            Box::pin(async move {
                let slow = records.first().and_then(|r| r.key.as_deref()) == Some(b"slow".as_slice());
                tokio::time::sleep(if slow { self.slow_key_delay } else { self.delay }).await;
                self.seen.lock().unwrap().extend(records.iter().map(|r| r.offset));
                BatchOutcome::ok()
            })
        }
    }

    fn recording(delay: Duration, slow_key_delay: Duration) -> Arc<Recording> {
        Arc::new(Recording { seen: Mutex::new(vec![]), delay, slow_key_delay })
    }

    fn task(processor: Arc<Recording>) -> PartitionTask {
        task_with(processor, Ordering::Partition, 16)
    }

    fn task_with(processor: Arc<dyn Processor>, ordering: Ordering, max_records: usize) -> PartitionTask {
        let jobs = JobContext::for_tests(processor);
        PartitionTask {
            topic: "t".into(),
            partition: 0,
            settings: PartitionSettings {
                ordering,
                limits: BatchLimits { max_records, max_bytes: 1 << 20, max_wait: Duration::ZERO },
                per_partition: 16,
                max_pending_records: 256,
                max_pending_bytes: 1 << 20,
                drain_timeout: Duration::from_secs(5),
                max_uncommitted: 100_000,
            },
            jobs: Arc::new(jobs),
            worker_permits: Arc::new(Semaphore::new(64)),
            in_flight_bytes: InFlightBytes::new(1 << 20),
            progress: Arc::new(PartitionProgress::new(Arc::new(AtomicBool::new(false)))),
            stop: CancellationToken::new(),
        }
    }

    /// Tracks the bytes of records in its calls at once; each call takes `delay`.
    struct BytesInCalls {
        now: std::sync::atomic::AtomicU64,
        max: std::sync::atomic::AtomicU64,
        records: std::sync::atomic::AtomicUsize,
        delay: Duration,
    }

    impl Processor for BytesInCalls {
        fn process<'a>(&'a self, records: &'a [Arc<Record>]) -> BoxFuture<'a, BatchOutcome> {
            Box::pin(async move {
                let bytes: u64 = records.iter().map(|r| r.size_bytes()).sum();
                let now = self.now.fetch_add(bytes, AtomicOrdering::SeqCst) + bytes;
                self.max.fetch_max(now, AtomicOrdering::SeqCst);
                tokio::time::sleep(self.delay).await;
                self.now.fetch_sub(bytes, AtomicOrdering::SeqCst);
                self.records.fetch_add(records.len(), AtomicOrdering::SeqCst);
                BatchOutcome::ok()
            })
        }
    }

    /// Records in flight are bounded by bytes worker-wide, not only by count: 1 MiB records with room for 200 of
    /// them by perWorker and perPartition never put more than IN_FLIGHT_BUDGET_BYTES into processor calls at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bytes_in_flight_stay_within_the_worker_budget() {
        let processor = Arc::new(BytesInCalls {
            now: Default::default(),
            max: Default::default(),
            records: Default::default(),
            delay: Duration::from_millis(30),
        });
        let mut t = task_with(processor.clone(), Ordering::Unordered, 1);
        t.settings.per_partition = 200;
        t.worker_permits = Arc::new(Semaphore::new(200));
        t.settings.max_pending_bytes = 256 << 20;
        let (tx, rx) = mpsc::channel(256);
        let handle = tokio::spawn(t.run(rx));
        let value = "x".repeat(1 << 20);
        let n = 200;
        for start in (0..n).step_by(10) {
            tx.send((start..start + 10).map(|o| Input::Record(test_record(o, None, &value))).collect()).await.unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while processor.records.load(AtomicOrdering::SeqCst) < n as usize {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} records processed",
                processor.records.load(AtomicOrdering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(tx);
        assert_eq!(handle.await.unwrap(), Some(n));
        let max = processor.max.load(AtomicOrdering::SeqCst);
        assert!(max <= IN_FLIGHT_BUDGET_BYTES, "{max} bytes in flight at once (budget {IN_FLIGHT_BUDGET_BYTES})");
        assert!(max > IN_FLIGHT_BUDGET_BYTES / 2, "the budget was not used: at most {max} bytes in flight");
    }

    #[test]
    fn a_batch_takes_its_bytes_in_kib_but_at_most_its_share_of_the_budget() {
        let budget = InFlightBytes::new(1 << 20);
        assert_eq!(budget.budget_bytes(), IN_FLIGHT_BUDGET_BYTES);
        let share = u32::try_from(IN_FLIGHT_BUDGET_BYTES / 1024 / BATCHES_IN_BUDGET).unwrap();
        assert_eq!(budget.permits_for(0), 1);
        assert_eq!(budget.permits_for(1), 1);
        assert_eq!(budget.permits_for(1025), 2);
        assert_eq!(budget.permits_for(IN_FLIGHT_BUDGET_BYTES / BATCHES_IN_BUDGET), share);
        assert_eq!(budget.permits_for(10 * IN_FLIGHT_BUDGET_BYTES), share, "a huge batch takes its share, no more");
        // Larger batches get a larger budget: BATCHES_IN_BUDGET of them still fit.
        let large = InFlightBytes::new(64 << 20);
        assert_eq!(large.budget_bytes(), BATCHES_IN_BUDGET * (64 << 20));
        assert_eq!(large.permits_for(64 << 20), (64 << 20) / 1024);
        assert_eq!(InFlightBytes::new(1 << 30).budget_bytes(), BATCHES_IN_BUDGET << 30, "the CRD's largest batch");
    }

    /// A batch that never finishes (a blocked retry) keeps only its share of the worker's bytes budget: another
    /// partition of the same worker goes on. With a share of the whole budget, one record larger than the budget,
    /// stuck, stopped every partition of the worker.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stuck_batch_larger_than_the_budget_does_not_stop_the_other_partitions() {
        let budget = InFlightBytes::new(1 << 20);
        let stuck = recording(Duration::ZERO, Duration::from_secs(3600));
        let mut a = task_with(stuck.clone(), Ordering::Partition, 1);
        a.in_flight_bytes = budget.clone();
        a.settings.max_pending_bytes = 256 << 20;
        let healthy = recording(Duration::from_millis(1), Duration::ZERO);
        let mut b = task_with(healthy.clone(), Ordering::Unordered, 4);
        b.partition = 1;
        b.in_flight_bytes = budget.clone();
        let (tx_a, rx_a) = mpsc::channel(16);
        let (tx_b, rx_b) = mpsc::channel(256);
        let stuck_task = tokio::spawn(a.run(rx_a));
        let huge = "x".repeat(usize::try_from(IN_FLIGHT_BUDGET_BYTES).unwrap() + (8 << 20));
        tx_a.send(vec![Input::Record(test_record(0, Some("slow"), &huge))]).await.unwrap();
        // The stuck batch has started (it holds its permits) before the other partition asks for any.
        let deadline = Instant::now() + Duration::from_secs(10);
        while budget.permits.available_permits() == usize::try_from(IN_FLIGHT_BUDGET_BYTES / 1024).unwrap() {
            assert!(Instant::now() < deadline, "the large batch never started");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let value = "v".repeat(100 << 10);
        let _healthy_task = tokio::spawn(b.run(rx_b));
        tx_b.send((0..50).map(|o| Input::Record(test_record(o, None, &value))).collect()).await.unwrap();
        until_seen(&healthy, 50).await;
        assert!(stuck.seen.lock().unwrap().is_empty(), "the stuck batch finished: the test did not test anything");
        stuck_task.abort();
    }

    /// Rejects every record it is given, as a poison record would be (non-retryable: `onFailure` decides).
    #[derive(Default)]
    struct RejectsAll {
        calls: std::sync::atomic::AtomicUsize,
    }

    impl Processor for RejectsAll {
        fn process<'a>(&'a self, _records: &'a [Arc<Record>]) -> BoxFuture<'a, BatchOutcome> {
            self.calls.fetch_add(1, AtomicOrdering::SeqCst);
            Box::pin(async {
                BatchOutcome::Failed(crate::classify::Failure::new(
                    crate::classify::FailureClass::HttpStatus(422),
                    "poison",
                ))
            })
        }
    }

    /// A batch that keeps failing (poison records under `onFailure: block`) gives its permits back between attempts:
    /// with `perPartition` equal to `perWorker` (4) it takes every permit of the worker while it runs, and another
    /// partition of the worker still gets through its 50 records. When the batch held its permits through its
    /// back-offs, the other partition processed none.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_blocked_batch_gives_the_workers_permits_back_between_attempts() {
        let permits = Arc::new(Semaphore::new(4));
        let poison = Arc::new(RejectsAll::default());
        let mut a = task_with(poison.clone(), Ordering::Partition, 4);
        a.settings.per_partition = 4;
        a.worker_permits = permits.clone();
        a.jobs = Arc::new(JobContext {
            on_failure: kpipe_api::v1alpha1::OnFailure::Block,
            backoff: crate::backoff::BackoffPolicy {
                max_attempts: 1,
                initial: Duration::from_millis(50),
                max: Duration::from_millis(200),
                multiplier: 2.0,
                max_record_age: None,
            },
            ..JobContext::for_tests(poison.clone())
        });
        let healthy = recording(Duration::from_millis(1), Duration::ZERO);
        let mut b = task_with(healthy.clone(), Ordering::Unordered, 4);
        b.partition = 1;
        b.settings.per_partition = 4;
        b.worker_permits = permits.clone();
        let (tx_a, rx_a) = mpsc::channel(16);
        let (tx_b, rx_b) = mpsc::channel(256);
        let blocked = tokio::spawn(a.run(rx_a));
        tx_a.send((0..4).map(|o| Input::Record(test_record(o, Some("poison"), "v"))).collect()).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while poison.calls.load(AtomicOrdering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "the poison batch never started");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _healthy_task = tokio::spawn(b.run(rx_b));
        tx_b.send(chunk(0..50)).await.unwrap();
        until_seen(&healthy, 50).await;
        // And the blocked batch takes its permits again for its next attempts.
        let calls = poison.calls.load(AtomicOrdering::SeqCst);
        while poison.calls.load(AtomicOrdering::SeqCst) < calls + 2 {
            assert!(Instant::now() < deadline, "the blocked batch was not retried after the other partition's work");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(!blocked.is_finished(), "the poison batch is still blocked: the test tested what it says");
        blocked.abort();
    }

    fn chunk(offsets: std::ops::Range<i64>) -> Vec<Input> {
        offsets.map(|o| Input::Record(test_record(o, None, "v"))).collect()
    }

    /// Waits until the processor saw `n` records (or fails after 10 s).
    async fn until_seen(p: &Recording, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while p.seen.lock().unwrap().len() < n {
            assert!(Instant::now() < deadline, "only {} of {n} records processed", p.seen.lock().unwrap().len());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_record_is_processed_in_order_and_committed_when_the_input_closes() {
        let processor = recording(Duration::from_micros(100), Duration::ZERO);
        let t = task(processor.clone());
        let progress = t.progress.clone();
        let (tx, rx) = mpsc::channel(64);
        let handle = tokio::spawn(t.run(rx));
        for start in (0..3_000).step_by(100) {
            tx.send(chunk(start..start + 100)).await.unwrap();
        }
        until_seen(&processor, 3_000).await;
        assert_eq!(*processor.seen.lock().unwrap(), (0..3_000).collect::<Vec<_>>(), "partition order");
        drop(tx);
        assert_eq!(handle.await.unwrap(), Some(3_000));
        assert_eq!(progress.committable(), Some(3_000));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopped_task_drains_at_once_even_with_its_pending_records_full() {
        // Slow processing: the pending records stay full, so the task does not read its input.
        let processor = recording(Duration::from_millis(20), Duration::ZERO);
        let t = task(processor.clone());
        let stop = t.stop.clone();
        let (tx, rx) = mpsc::channel(64);
        let handle = tokio::spawn(t.run(rx));
        for start in (0..5_000).step_by(100) {
            tx.send(chunk(start..start + 100)).await.unwrap();
        }
        until_seen(&processor, 32).await;
        // A revoke: the stop signal is obeyed while the input is still open and full.
        stop.cancel();
        let committable = tokio::time::timeout(Duration::from_secs(2), handle)
            .await
            .expect("the task drains within a few batches' time")
            .unwrap()
            .expect("a committable offset");
        // Every record below the commit point was processed, in order, and nothing above what was processed is
        // claimed; the rest is left to the partition's next owner.
        let seen = processor.seen.lock().unwrap().clone();
        assert!(committable as usize <= seen.len() && seen.len() < 1_000, "{committable} / {}", seen.len());
        assert_eq!(seen[..committable as usize], (0..committable).collect::<Vec<_>>()[..]);
        drop(tx);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_drain_starts_what_waited_behind_its_key_even_when_the_blocking_job_ended_first() {
        // Offsets 0 and 1 share a slow key, 2 has another key: 2 finishes while 0 runs and 1 waits behind it. The
        // drain must start 1 once 0 is done, however the task learns of it (the job's report, or the job ending
        // first with its report still queued), or 2 is delivered again by the next owner. The order in which the
        // two arrive is up to tokio, so the case runs repeatedly.
        for round in 0..20 {
            let processor = recording(Duration::ZERO, Duration::from_millis(30));
            let t = task_with(processor.clone(), Ordering::Key, 1);
            let stop = t.stop.clone();
            let (tx, rx) = mpsc::channel(4);
            let handle = tokio::spawn(t.run(rx));
            let record = |offset, key| Input::Record(test_record(offset, Some(key), "v"));
            tx.send(vec![record(0, "slow"), record(1, "slow"), record(2, "fast")]).await.unwrap();
            until_seen(&processor, 1).await;
            assert_eq!(*processor.seen.lock().unwrap(), vec![2], "round {round}: 2 first, 0 still running");
            stop.cancel();
            let committable = handle.await.unwrap();
            assert_eq!(*processor.seen.lock().unwrap(), vec![2, 0, 1], "round {round}");
            assert_eq!(committable, Some(3), "round {round}: the commit covers every finished record");
        }
    }
}
