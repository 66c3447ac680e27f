//! The Kafka edge: a dedicated thread polls the consumer (so rebalance callbacks never block the async runtime),
//! copies records out and dispatches them to per-partition tasks through bounded channels, stops taking records
//! while a partition's task is full (and pauses a partition whose task stays full), and commits the offsets the tasks
//! report.
//!
//! - [`dispatch`]: partition tasks, chunked hand-off, overflow;
//! - [`backpressure`]: when the consumer holds for a partition, and when a partition is paused and resumed (a small
//!   state machine);
//! - [`commit`]: periodic, early and final commits (all synchronous), held final offsets;
//! - [`positions`]: start offsets of assigned partitions, the log-end check before commits;
//! - [`context`]: librdkafka callbacks (rebalance, logs, statistics);
//! - this file: the poll loop and shutdown.

mod backpressure;
mod commit;
mod context;
mod dispatch;
mod positions;
mod waker;

use std::sync::Arc;
use std::sync::atomic::Ordering as AtomicOrdering;
use std::time::{Duration, Instant};

use kpipe_rdkafka_native::{FetchQueue, MessageBatch};
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use tokio_util::sync::CancellationToken;

use commit::{
    CommitRequest, EARLY_COMMIT_GAP, FINAL_COMMIT_MARGIN, commit_request, commit_sync, run_committer,
    settle_held_offsets,
};
pub use context::WorkerContext;
pub use dispatch::Dispatch;
use dispatch::{TopicNames, fetched_record, to_record};
pub use positions::{LookupError, StartPolicy};
use waker::{FetchWaker, Resumed};

/// A topic and partition; the topic name is shared, not copied.
pub(super) type TopicPartition = (Arc<str>, i32);

/// Most records taken from the fetch queue in one call.
const FETCH_BATCH_RECORDS: usize = 256;

/// How long the consumer thread waits (serving events) between flushes while a partition holds.
const HOLD_WAIT: Duration = Duration::from_millis(1);

/// How long a partly filled chunk may wait while other partitions keep the consumer busy.
pub(super) const CHUNK_MAX_DELAY: Duration = Duration::from_millis(5);

/// Wall-clock Unix milliseconds (0 if the clock is before 1970).
pub(super) fn unix_millis() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The partitions of a list.
pub(super) fn partitions_of(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements().iter().map(|e| (Arc::<str>::from(e.topic()), e.partition())).collect()
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
            match self.consumer.fetch_metadata(self.topics.first().map(String::as_str), Duration::from_secs(5)) {
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
        // Records come in batches from the fetch queue that the rebalance callback forwards every assigned partition
        // to; the consumer queue brings rebalances, errors, commit results and statistics (and the records of a
        // partition that could not be forwarded). Made after subscribing and before the first poll, so before the
        // first assignment. Without it (librdkafka could not allocate a queue) every record comes through `poll`.
        let fetch = FetchQueue::new(self.consumer.clone()).map(Arc::new);
        match &fetch {
            Some(queue) => self.consumer.context().2.set(queue.clone()),
            None => tracing::warn!("cannot create a fetch queue; reading records one by one"),
        }
        let waker = FetchWaker::start(self.consumer.clone());
        let mut resumed = Resumed::new();
        let mut batch = MessageBatch::with_capacity(FETCH_BATCH_RECORDS);
        // The records of one batch, staged for their partitions together (`Dispatch::dispatch_all`).
        let mut fetched: Vec<crate::record::Record> = Vec::with_capacity(FETCH_BATCH_RECORDS);
        let mut last_commit = Instant::now();
        let mut any_overflow = false;
        let mut staged = false;
        let mut last_flush = Instant::now();
        let mut last_probe = Instant::now();
        let mut topic_names = TopicNames::new(&self.topics);
        let mut since_check = 0usize;
        // Shared counters are updated in bulk: a per-record atomic on a cache line other
        // threads write too is measurable at a million records per second.
        let mut consumed = 0u64;
        loop {
            let timeout = if staged {
                Duration::ZERO
            } else if any_overflow {
                Duration::from_millis(5)
            } else {
                // Short enough that an early commit asked for by a partition task is sent promptly (and, with a
                // fetch queue, that an idle consumer serves a rebalance promptly).
                Duration::from_millis(20)
            };
            let mut taken = 0;
            let mut dispatched = 0u64;
            // A partition whose overflow reached its limit holds the consumer: no records are taken (they wait in
            // librdkafka's bounded queue) until its task has taken the overflow or the hold turned into a pause.
            let holding = d.holding.load(AtomicOrdering::Relaxed);
            if let Some(fetch) = fetch.as_ref().filter(|_| !holding) {
                taken = fetch.consume(&mut batch, timeout, |m| match m.error() {
                    None => {
                        fetched.push(fetched_record(&m, &mut topic_names, &d.metrics));
                        dispatched += 1;
                    }
                    Some(code) => {
                        tracing::warn!(topic = %m.topic(), partition = m.partition(), "consumer error: {code:?}: {}",
                            m.error_text());
                    }
                });
                d.dispatch_all(&mut fetched);
            }
            // Events are served after every batch, so at once while records flow and within `timeout` when idle.
            let poll_timeout = if holding {
                HOLD_WAIT
            } else if fetch.is_some() {
                Duration::ZERO
            } else {
                timeout
            };
            // Without a fetch queue every record comes through `poll`, so a hold polls nothing (events wait; a hold
            // lasts at most `backpressure::HOLD_MAX`).
            let polled = if holding && fetch.is_none() {
                std::thread::sleep(HOLD_WAIT);
                None
            } else {
                self.consumer.poll(poll_timeout)
            };
            match polled {
                Some(Ok(m)) => {
                    let record = to_record(&m, &mut topic_names, &d.metrics);
                    drop(m);
                    d.dispatch(record);
                    dispatched += 1;
                    taken += 1;
                }
                Some(Err(e)) => {
                    tracing::warn!("consumer error: {e}");
                    taken += 1;
                }
                None => {}
            }
            // After the batch and before a commit reads the positions: see `Dispatch::reposition_went_back`. Pauses
            // come later, in a flush, from the position this seek set (breaker10's went-back test pauses after it).
            d.reposition_went_back(&self.consumer);
            consumed += dispatched;
            staged |= dispatched > 0;
            let ran_dry = taken == 0;
            // Flush when the local queue ran dry, or every few ms under a constant stream (the
            // clock is read every 64 records only: it is not free on every machine).
            since_check += taken;
            if !ran_dry && since_check < 64 {
                continue;
            }
            since_check = 0;
            d.metrics.consumed.inc_by(std::mem::take(&mut consumed));
            if self.shutdown.is_cancelled() {
                break;
            }
            let now = Instant::now();
            if (staged || any_overflow || holding) && (ran_dry || now.duration_since(last_flush) >= CHUNK_MAX_DELAY) {
                any_overflow = d.flush(&self.consumer, &mut resumed);
                // A broker thread whose partitions were all paused would see these only after its idle timeout.
                match &waker {
                    Some(waker) => waker.wake(std::mem::take(&mut resumed)),
                    None => resumed.clear(),
                }
                staged = false;
                last_flush = now;
            }
            if d.health.has_broker_error() && last_probe.elapsed() >= Duration::from_secs(5) {
                // Idle consumers get no message or commit that would clear the error: probe.
                last_probe = Instant::now();
                if self.consumer.fetch_metadata(self.topics.first().map(String::as_str), Duration::from_secs(1)).is_ok()
                {
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
        // It holds a consumer handle: gone before the consumer closes.
        if let Some(waker) = waker {
            waker.stop();
        }
        let offsets = d.drain(&d.all_partitions());
        if !commit_sync(&self.consumer, &offsets, &d) {
            d.held().hold(offsets);
            settle_held_offsets(&self.consumer, &d, final_commit_deadline);
        }
        self.consumer.unsubscribe();
        // The queue goes before its client (and the context's reference with it: see `FetchSlot`).
        drop(fetch);
        self.consumer.context().2.clear();
        // Dropping the last handle closes the consumer: it leaves the group (the revoke callback finds no
        // partitions left to drain).
        drop(self.consumer);
        tracing::info!("consumer closed");
        Ok(())
    }
}
