//! Runs one batch to completion: process, retry the failed records with backoff, then apply the
//! failure policy. Every record ends processed, dead-lettered or dropped; records are reported
//! done as soon as they are, so the partition can commit and release their keys.
//!
//! What spends a record's budget (`retry.maxAttempts`, `retry.maxRecordAge`):
//! - a failure counts as an attempt, except: a failure carrying `Retry-After` (the server asked to
//!   come back later; the next try waits at least that long, RFC 9110 §10.2.3; `maxRecordAge` still
//!   applies), a failure of the downstream while the circuit breaker is open ([`crate::breaker`]:
//!   neither attempts nor age are spent, nothing is dead-lettered), and a `deferred` record (not sent
//!   because an earlier record of its key failed);
//! - every processor call first passes the circuit breaker and the adaptive concurrency limit
//!   ([`crate::aimd`]).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kpipe_api::v1alpha1::OnFailure;
use tokio::sync::mpsc::UnboundedSender;

use crate::aimd::ConcurrencyLimiter;
use crate::backoff::{BackoffPolicy, jitter_unit};
use crate::breaker::CircuitBreaker;
use crate::classify::{Failure, FailureClass};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::processor::kafka::{DeadLetterSink, Written};
use crate::processor::{BatchOutcome, Processor};
use crate::record::Record;

/// What a running batch holds while its processor calls run: its share of `concurrency.perWorker` and of the
/// worker's bytes in flight ([`crate::partition`]). [`JobContext::run`] gives it back while the batch waits out a
/// retry back-off and takes it again before the next attempt, so records that cannot succeed yet (a poison record
/// under `onFailure: block`, a downstream that is down) never keep other partitions' records waiting: with
/// `perPartition` equal to `perWorker`, one retrying batch used to hold every permit of the worker.
pub trait Lease: Send {
    /// Gives the permits back; a no-op when they are not held.
    fn release(&mut self);
    /// Takes permits for `records` (those still to be processed) again; waits for them.
    fn reacquire(&mut self, records: &[Arc<Record>]) -> impl Future<Output = Result<(), LeaseClosed>> + Send;
}

/// The permits a [`Lease`] takes from are closed: the worker is stopping.
#[derive(Debug, thiserror::Error)]
#[error("the worker's concurrency permits are closed")]
pub struct LeaseClosed;

/// A [`Lease`] that holds nothing (callers without permits, tests).
#[derive(Debug, Default)]
pub struct Unleased;

impl Lease for Unleased {
    fn release(&mut self) {}

    async fn reacquire(&mut self, _records: &[Arc<Record>]) -> Result<(), LeaseClosed> {
        Ok(())
    }
}

pub struct JobContext {
    pub processor: Arc<dyn Processor>,
    pub dead_letter: Option<Arc<dyn DeadLetterSink>>,
    pub on_failure: OnFailure,
    pub backoff: BackoffPolicy,
    pub metrics: Metrics,
    pub health: Arc<Health>,
    /// Gate that holds processor calls while the processor is unavailable (`None`: always closed).
    pub breaker: Option<Arc<CircuitBreaker>>,
    /// Adaptive limit on records in processor calls (`None`: only `concurrency.perWorker`).
    pub limiter: Option<Arc<ConcurrencyLimiter>>,
}

/// Dead-letter write failures in a row after which the record is reported as blocked with
/// `deadLetterFailing` (commit metadata → the operator's `DeadLetterFailing` reason).
pub const DEAD_LETTER_FAILING_AFTER: u32 = 3;

/// How long one dead-letter write may go unacknowledged before the record is reported the same way
/// (librdkafka retries a produce internally for up to `message.timeout.ms`, 5 minutes by default,
/// before it reports a failure; a DLQ that cannot take writes must show long before that).
pub const DEAD_LETTER_STALLED_AFTER: Duration = Duration::from_secs(15);

struct Attempt {
    record: Arc<Record>,
    attempts: u32,
    /// Gave up under the `block` policy: retried at max backoff forever.
    blocked: bool,
    /// When the record first failed, Unix milliseconds.
    first_failure_ms: Option<u64>,
    /// The server's `Retry-After` on the last failure.
    retry_after: Option<Duration>,
}

fn now_millis() -> Option<u64> {
    Some(SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_millis() as u64)
}

fn age_of(record: &Record, now_ms: Option<u64>) -> Option<Duration> {
    let ts = u64::try_from(record.timestamp_ms?).ok()?;
    Some(Duration::from_millis(now_ms?.saturating_sub(ts)))
}

impl JobContext {
    /// A context for unit tests: `processor` only, one attempt, failures dropped, no dead-letter topic.
    #[cfg(test)]
    pub(crate) fn for_tests(processor: Arc<dyn Processor>) -> Self {
        Self {
            processor,
            dead_letter: None,
            on_failure: OnFailure::Drop,
            backoff: BackoffPolicy {
                max_attempts: 1,
                initial: Duration::from_millis(1),
                max: Duration::from_millis(1),
                multiplier: 1.0,
                max_record_age: None,
            },
            metrics: Metrics::new().expect("metrics register"),
            health: Arc::new(Health::default()),
            breaker: None,
            limiter: None,
        }
    }

    /// Records the end-to-end latency of a done record (`now_ms` read once per group of records).
    fn finished(&self, record: &Record, now_ms: Option<u64>) {
        if let Some(age) = age_of(record, now_ms) {
            self.metrics.end_to_end_seconds.observe(age.as_secs_f64());
        }
    }

    /// `finished` for a group of records, with one update of the shared histogram.
    fn finished_all(&self, records: &[Arc<Record>], now_ms: Option<u64>) {
        let local = self.metrics.end_to_end_seconds.local();
        for r in records {
            if let Some(age) = age_of(r, now_ms) {
                local.observe(age.as_secs_f64());
            }
        }
        local.flush();
        self.metrics.processed.inc_by(records.len() as u64);
    }

    /// One processor call, through the circuit breaker and the concurrency limit; returns each
    /// record's failure (None = succeeded) and whether failures of this call count against the
    /// records' budgets (false when the circuit is open after it).
    async fn call(&self, batch: &[Arc<Record>]) -> (Vec<Option<Failure>>, bool) {
        let probe = match &self.breaker {
            Some(b) => b.admit().await,
            None => false,
        };
        let admission = match &self.limiter {
            Some(l) => Some(l.acquire(batch.len()).await),
            None => None,
        };
        self.metrics.batch_size.observe(batch.len() as f64);
        let started = Instant::now();
        let outcome = self.processor.process(batch).await;
        self.metrics.processing_seconds.observe(started.elapsed().as_secs_f64());
        let mut failures: Vec<Option<Failure>> = vec![None; batch.len()];
        match outcome {
            BatchOutcome::Failed(f) => failures.iter_mut().for_each(|slot| *slot = Some(f.clone())),
            BatchOutcome::Partial(list) => {
                for (i, f) in list {
                    if let Some(slot) = failures.get_mut(i) {
                        *slot = Some(f);
                    }
                }
            }
        }
        let classes = || failures.iter().flatten().map(|f| &f.class);
        // Unavailable: nothing succeeded and every failure (deferred records aside) is the downstream's.
        let unavailable = classes().any(FailureClass::is_unavailable)
            && failures
                .iter()
                .all(|f| f.as_ref().is_some_and(|f| f.class.is_unavailable() || f.class == FailureClass::Deferred));
        let counted = match &self.breaker {
            Some(b) => b.record(unavailable, probe),
            None => true,
        };
        // An outage (the circuit is open) is not overload: it must not leave the limit at its floor
        // when the downstream comes back.
        if let Some(l) = &self.limiter
            && counted
        {
            l.record(batch.len(), classes().any(FailureClass::is_overload));
        }
        drop(admission);
        (failures, counted)
    }

    /// Processes `records` until every one is done, reporting completed records on `done`. `lease` is released during
    /// each retry back-off and taken again for the records still to do; if it cannot be (the worker is stopping) the
    /// remaining records are left not done, so no commit passes them.
    pub async fn run(
        &self,
        records: Vec<Arc<Record>>,
        done: UnboundedSender<Vec<Arc<Record>>>,
        lease: &mut impl Lease,
    ) {
        let mut remaining: Vec<Attempt> = records
            .into_iter()
            .map(|record| {
                // A record a previous owner of the partition was retrying continues its budget.
                let (attempts, first) = match self.health.take_inherited(&record.topic, record.partition, record.offset)
                {
                    Some((n, since)) => (n, Some(since)),
                    None => (0, None),
                };
                Attempt { record, attempts, blocked: false, first_failure_ms: first, retry_after: None }
            })
            .collect();
        let mut round = 0u32;
        let mut isolate = false;
        while !remaining.is_empty() {
            if round > 0 {
                let all_blocked = remaining.iter().all(|a| a.blocked);
                let mut delay = if all_blocked { self.backoff.max } else { self.backoff.delay(round, jitter_unit()) };
                // Honour the longest wait a server asked for (RFC 9110 §10.2.3).
                if let Some(asked) = remaining.iter().filter_map(|a| a.retry_after).max() {
                    delay = delay.max(asked);
                }
                lease.release();
                tokio::time::sleep(delay).await;
            }
            let batch: Vec<Arc<Record>> = remaining.iter().map(|a| a.record.clone()).collect();
            if round > 0 && lease.reacquire(&batch).await.is_err() {
                tracing::debug!(
                    records = batch.len(),
                    "stopping during a retry back-off; the records stay uncommitted"
                );
                return;
            }
            round += 1;
            let failures: Vec<(Option<Failure>, bool)> = if isolate {
                // One record per call, in offset order (keeps key order), to find which records
                // the processor really rejects.
                let mut failures = Vec::with_capacity(batch.len());
                for r in &batch {
                    let (one, counted) = self.call(std::slice::from_ref(r)).await;
                    failures.push((one.into_iter().next().flatten(), counted));
                }
                failures
            } else {
                let (failures, counted) = self.call(&batch).await;
                // A multi-record batch rejected as a whole with a non-retryable error: the cause
                // may be one poison record. Retry each record alone once instead of sending the
                // whole batch down the failure policy; this round does not count as an attempt.
                if batch.len() > 1
                    && let Some(Some(f)) = failures.first()
                    && !f.class.is_retryable()
                    && failures.iter().all(|x| x.as_ref() == Some(f))
                {
                    tracing::info!(records = batch.len(), error = %f, "batch rejected as a whole; isolating records");
                    isolate = true;
                    continue;
                }
                failures.into_iter().map(|f| (f, counted)).collect()
            };
            let now_ms = now_millis();
            let mut succeeded = Vec::new();
            let mut retry = Vec::new();
            let mut give_up = Vec::new();
            for (mut a, (failure, counted)) in remaining.drain(..).zip(failures) {
                match failure {
                    None => {
                        if a.blocked {
                            self.metrics.blocked.dec();
                            self.health.unblock(&a.record.topic, a.record.partition, a.record.offset);
                        }
                        // Every failure registers the record (throttled, held and deferred ones spend no attempt).
                        if a.first_failure_ms.is_some() {
                            self.health.settled(&a.record.topic, a.record.partition, a.record.offset);
                        }
                        succeeded.push(a.record);
                    }
                    Some(f) => {
                        let throttled = f.retry_after.is_some();
                        // The downstream is down and the circuit open: the records wait for it.
                        let held = !counted && f.class.is_unavailable();
                        let deferred = f.class == FailureClass::Deferred;
                        if !(throttled || held || deferred) {
                            a.attempts += 1;
                        }
                        if throttled {
                            self.metrics.throttled.inc();
                        }
                        a.retry_after = f.retry_after;
                        let since = *a.first_failure_ms.get_or_insert(now_ms.unwrap_or_default());
                        // Reported to the operator (commit metadata) until the record is done.
                        self.health.retrying(&a.record.topic, a.record.partition, a.record.offset, a.attempts, since);
                        if !deferred {
                            self.metrics.failed.with_label_values(&[f.class.metric_label()]).inc();
                        }
                        if a.blocked {
                            self.health.block(&a.record.topic, a.record.partition, a.record.offset, f.to_string());
                            retry.push(a);
                        } else if held || deferred {
                            retry.push(a);
                        } else if f.class.is_retryable()
                            && self.backoff.may_retry(a.attempts, age_of(&a.record, now_ms)).is_ok()
                        {
                            self.metrics.retried.inc();
                            retry.push(a);
                        } else {
                            give_up.push((a, f));
                        }
                    }
                }
            }
            if !succeeded.is_empty() {
                self.finished_all(&succeeded, now_ms);
                let _ = done.send(succeeded);
            }
            if !give_up.is_empty() {
                let mut finished = Vec::new();
                for (a, f) in give_up {
                    match self.on_failure {
                        OnFailure::Drop => {
                            tracing::warn!(topic = %a.record.topic, partition = a.record.partition, offset = a.record.offset,
                                attempts = a.attempts, error = %f, "dropping record (onFailure: drop)");
                            self.metrics.dropped.inc();
                            self.finished(&a.record, now_ms);
                            finished.push(a.record);
                        }
                        OnFailure::DeadLetter if self.dead_letter.is_some() => {
                            self.write_dead_letter(&a.record, &f, a.attempts).await;
                            self.finished(&a.record, now_millis());
                            finished.push(a.record);
                        }
                        OnFailure::DeadLetter | OnFailure::Block => {
                            tracing::error!(topic = %a.record.topic, partition = a.record.partition, offset = a.record.offset,
                                attempts = a.attempts, error = %f, "record blocks its partition (onFailure: block)");
                            self.metrics.blocked.inc();
                            self.health.block(&a.record.topic, a.record.partition, a.record.offset, f.to_string());
                            retry.push(Attempt { blocked: true, ..a });
                        }
                    }
                }
                for r in &finished {
                    self.health.settled(&r.topic, r.partition, r.offset);
                }
                if !finished.is_empty() {
                    let _ = done.send(finished);
                }
            }
            remaining = retry;
        }
    }

    /// Writes to the dead-letter topic until the broker acknowledges it: the record must never be
    /// committed past without a DLQ copy. A record too large for the topic goes as a reference record
    /// ([`crate::size`]), so size never blocks the partition. Other failures are retried with backoff;
    /// after [`DEAD_LETTER_FAILING_AFTER`] in a row the record is reported blocked with
    /// `deadLetterFailing` until a write succeeds.
    async fn write_dead_letter(&self, record: &Record, failure: &Failure, attempts: u32) {
        let Some(dlq) = &self.dead_letter else { return };
        let mut tries = 0u32;
        let mut reported = false;
        loop {
            let write = dlq.write(record, failure, attempts);
            tokio::pin!(write);
            let result = tokio::select! {
                r = &mut write => r,
                _ = tokio::time::sleep(DEAD_LETTER_STALLED_AFTER) => {
                    if !reported {
                        reported = true;
                        self.dead_letter_failing(record, format!(
                            "dead-letter write not acknowledged for {}s", DEAD_LETTER_STALLED_AFTER.as_secs()));
                    }
                    write.await
                }
            };
            match result {
                Ok(written) => {
                    if reported {
                        self.health.dead_letter_failing(&record.topic, record.partition, record.offset, None);
                        self.health.unblock(&record.topic, record.partition, record.offset);
                    }
                    self.metrics.dead_lettered.with_label_values(&[&failure.class.label()]).inc();
                    if let Written::Reference(shape) = written {
                        self.metrics.dead_letter_truncated.inc();
                        tracing::warn!(topic = %record.topic, partition = record.partition, offset = record.offset,
                            omitted = shape.omitted().unwrap_or_default(), "record too large for the dead-letter topic: \
                            dead-lettered as a reference record");
                    }
                    tracing::warn!(topic = %record.topic, partition = record.partition, offset = record.offset,
                        attempts, error = %failure, "record dead-lettered");
                    return;
                }
                Err(e) => {
                    tries += 1;
                    self.metrics.dead_letter_errors.inc();
                    tracing::error!(topic = %record.topic, partition = record.partition, offset = record.offset,
                        error = %e, tries, "dead-letter write failed; retrying");
                    if tries >= DEAD_LETTER_FAILING_AFTER && !reported {
                        reported = true;
                        self.dead_letter_failing(record, format!("dead-letter write failing: {e}"));
                    }
                    tokio::time::sleep(self.backoff.ceiling(tries)).await;
                }
            }
        }
    }

    /// Reports a record whose dead-letter write keeps failing: blocked, `deadLetterFailing` in the
    /// commit metadata, listed on `/readyz`.
    fn dead_letter_failing(&self, record: &Record, why: String) {
        tracing::error!(topic = %record.topic, partition = record.partition, offset = record.offset, %why,
            "the dead-letter topic does not take the record: the partition waits");
        self.health.dead_letter_failing(&record.topic, record.partition, record.offset, Some(why.clone()));
        self.health.block(&record.topic, record.partition, record.offset, why);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use futures::future::BoxFuture;

    use super::*;
    use crate::classify::FailureClass;
    use crate::record::test_record;

    /// Fails each offset the given number of times with the given class, then succeeds.
    struct Scripted {
        failures: Mutex<HashMap<i64, (u32, FailureClass)>>,
        calls: Mutex<Vec<Vec<i64>>>,
    }

    impl Processor for Scripted {
        fn process<'a>(&'a self, records: &'a [Arc<Record>]) -> BoxFuture<'a, BatchOutcome> {
            Box::pin(async move {
                self.calls.lock().unwrap().push(records.iter().map(|r| r.offset).collect());
                let mut f = self.failures.lock().unwrap();
                let mut failed = Vec::new();
                for (i, r) in records.iter().enumerate() {
                    if let Some((n, class)) = f.get_mut(&r.offset)
                        && *n > 0
                    {
                        *n -= 1;
                        failed.push((i, Failure::new(class.clone(), "scripted")));
                    }
                }
                BatchOutcome::Partial(failed)
            })
        }
    }

    struct MemoryDlq {
        written: Mutex<Vec<(i64, String, u32)>>,
        fail_first: Mutex<u32>,
        /// How long each write takes.
        slow: Mutex<Duration>,
    }

    impl DeadLetterSink for MemoryDlq {
        fn write<'a>(
            &'a self,
            r: &'a Record,
            f: &'a Failure,
            attempts: u32,
        ) -> BoxFuture<'a, Result<Written, Failure>> {
            Box::pin(async move {
                let slow = *self.slow.lock().unwrap();
                tokio::time::sleep(slow).await;
                let mut n = self.fail_first.lock().unwrap();
                if *n > 0 {
                    *n -= 1;
                    return Err(Failure::new(FailureClass::Produce { retryable: true }, "broker down"));
                }
                self.written.lock().unwrap().push((r.offset, f.class.label(), attempts));
                Ok(Written::Full)
            })
        }
    }

    fn ctx(
        script: &[(i64, u32, FailureClass)],
        on_failure: OnFailure,
        dlq_fail_first: u32,
    ) -> (JobContext, Arc<Scripted>, Arc<MemoryDlq>) {
        let p = Arc::new(Scripted {
            failures: Mutex::new(script.iter().map(|(o, n, c)| (*o, (*n, c.clone()))).collect()),
            calls: Mutex::new(vec![]),
        });
        let d = Arc::new(MemoryDlq {
            written: Mutex::new(vec![]),
            fail_first: Mutex::new(dlq_fail_first),
            slow: Mutex::new(Duration::ZERO),
        });
        let c = JobContext {
            processor: p.clone(),
            dead_letter: Some(d.clone()),
            on_failure,
            backoff: BackoffPolicy {
                max_attempts: 3,
                initial: Duration::from_millis(10),
                max: Duration::from_millis(100),
                multiplier: 2.0,
                max_record_age: None,
            },
            metrics: Metrics::new().unwrap(),
            health: Arc::new(Health::default()),
            breaker: None,
            limiter: None,
        };
        (c, p, d)
    }

    fn batch(n: i64) -> Vec<Arc<Record>> {
        (0..n).map(|o| Arc::new(test_record(o, None, "v"))).collect()
    }

    async fn run(c: &JobContext, records: Vec<Arc<Record>>) -> Vec<i64> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        c.run(records, tx, &mut Unleased).await;
        let mut done = Vec::new();
        while let Ok(d) = rx.try_recv() {
            done.extend(d.iter().map(|r| r.offset));
        }
        done
    }

    #[tokio::test(start_paused = true)]
    async fn only_failed_records_are_retried() {
        let (c, p, _) = ctx(&[(1, 2, FailureClass::HttpStatus(503))], OnFailure::DeadLetter, 0);
        let done = run(&c, batch(3)).await;
        assert_eq!(done, vec![0, 2, 1]);
        assert_eq!(*p.calls.lock().unwrap(), vec![vec![0, 1, 2], vec![1], vec![1]]);
        assert_eq!(c.metrics.retried.get(), 2);
        assert_eq!(c.metrics.processed.get(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn non_retryable_goes_straight_to_dead_letter_and_dlq_failures_are_retried() {
        let (c, p, d) = ctx(&[(0, 100, FailureClass::HttpStatus(400))], OnFailure::DeadLetter, 2);
        let done = run(&c, batch(2)).await;
        assert_eq!(done, vec![1, 0]);
        assert_eq!(p.calls.lock().unwrap().len(), 1);
        assert_eq!(*d.written.lock().unwrap(), vec![(0, "http_400".to_string(), 1)]);
        assert_eq!(c.metrics.dead_letter_errors.get(), 2);
        assert_eq!(c.metrics.dead_lettered.with_label_values(&["http_400"]).get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn exhausted_retries_are_dead_lettered_with_attempt_count() {
        let (c, p, d) = ctx(&[(0, 100, FailureClass::Timeout)], OnFailure::DeadLetter, 0);
        run(&c, batch(1)).await;
        assert_eq!(p.calls.lock().unwrap().len(), 3);
        assert_eq!(*d.written.lock().unwrap(), vec![(0, "timeout".to_string(), 3)]);
    }

    /// Fails any call whose batch contains offset 1 as a whole with a 400.
    struct PoisonOne;

    impl Processor for PoisonOne {
        fn process<'a>(&'a self, records: &'a [Arc<Record>]) -> BoxFuture<'a, BatchOutcome> {
            Box::pin(async move {
                if records.iter().any(|r| r.offset == 1) {
                    BatchOutcome::Failed(Failure::new(FailureClass::HttpStatus(400), "poison"))
                } else {
                    BatchOutcome::ok()
                }
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_whole_batch_rejection_is_isolated_to_the_poison_record() {
        let (mut c, _, d) = ctx(&[], OnFailure::DeadLetter, 0);
        c.processor = Arc::new(PoisonOne);
        let mut done = run(&c, batch(4)).await;
        done.sort();
        assert_eq!(done, vec![0, 1, 2, 3]);
        assert_eq!(*d.written.lock().unwrap(), vec![(1, "http_400".to_string(), 1)]);
        assert_eq!(c.metrics.processed.get(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn drop_policy_counts_and_moves_on() {
        let (c, _, d) = ctx(&[(0, 100, FailureClass::HttpStatus(422))], OnFailure::Drop, 0);
        assert_eq!(run(&c, batch(1)).await, vec![0]);
        assert_eq!(c.metrics.dropped.get(), 1);
        assert!(d.written.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn block_policy_retries_at_max_backoff_until_it_succeeds() {
        let (c, p, _) = ctx(&[(0, 10, FailureClass::HttpStatus(400))], OnFailure::Block, 0);
        let started = tokio::time::Instant::now();
        let c = Arc::new(c);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let job = tokio::spawn({
            let c = c.clone();
            async move { c.run(batch(1), tx, &mut Unleased).await }
        });
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(c.metrics.blocked.get(), 1);
        assert!(c.health.readiness().detail.contains("blocked: t/0@0"));
        assert!(rx.try_recv().is_err(), "blocked record is not done");
        job.await.unwrap();
        assert_eq!(p.calls.lock().unwrap().len(), 11);
        assert!(started.elapsed() >= Duration::from_millis(900), "max backoff between blocked retries");
        assert_eq!(c.metrics.blocked.get(), 0);
        assert_eq!(rx.try_recv().unwrap()[0].offset, 0);
    }

    /// Answers every call with the given failure `n` times, then succeeds.
    struct FailsNTimes {
        left: Mutex<u32>,
        failure: Failure,
        calls: Mutex<Vec<tokio::time::Instant>>,
    }

    impl Processor for FailsNTimes {
        fn process<'a>(&'a self, _records: &'a [Arc<Record>]) -> BoxFuture<'a, BatchOutcome> {
            Box::pin(async move {
                self.calls.lock().unwrap().push(tokio::time::Instant::now());
                let mut n = self.left.lock().unwrap();
                if *n > 0 {
                    *n -= 1;
                    return BatchOutcome::Failed(self.failure.clone());
                }
                BatchOutcome::ok()
            })
        }
    }

    fn failing(n: u32, failure: Failure) -> Arc<FailsNTimes> {
        Arc::new(FailsNTimes { left: Mutex::new(n), failure, calls: Mutex::new(vec![]) })
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_waited_for_and_spends_no_attempts() {
        let (mut c, _, d) = ctx(&[], OnFailure::DeadLetter, 0);
        // 3 attempts allowed; the server throttles 10 times with Retry-After: 20 s.
        let p = failing(
            10,
            Failure::new(FailureClass::HttpStatus(429), "slow down").with_retry_after(Some(Duration::from_secs(20))),
        );
        c.processor = p.clone();
        assert_eq!(run(&c, batch(5)).await, vec![0, 1, 2, 3, 4]);
        assert!(d.written.lock().unwrap().is_empty(), "nothing dead-lettered");
        let calls = p.calls.lock().unwrap();
        assert_eq!(calls.len(), 11);
        for w in calls.windows(2) {
            assert!(w[1] - w[0] >= Duration::from_secs(20), "retried after {:?}", w[1] - w[0]);
        }
        assert_eq!(c.metrics.throttled.get(), 50);
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_circuit_spends_no_attempts_and_dead_letters_nothing() {
        use crate::breaker::{BreakerSettings, CircuitBreaker};
        let (mut c, _, d) = ctx(&[], OnFailure::DeadLetter, 0);
        let settings = BreakerSettings { min_calls: 2, ..BreakerSettings::default() };
        c.breaker = Some(Arc::new(CircuitBreaker::new(settings, c.metrics.clone(), c.health.clone())));
        c.limiter = Some(Arc::new(crate::aimd::ConcurrencyLimiter::new(1, 16, c.metrics.clone())));
        // Down (503, a sign of overload too) for 40 calls: far beyond the 3 attempts.
        let p = failing(40, Failure::new(FailureClass::HttpStatus(503), "service unavailable"));
        c.processor = p.clone();
        let started = tokio::time::Instant::now();
        assert_eq!(run(&c, batch(3)).await, vec![0, 1, 2]);
        assert!(d.written.lock().unwrap().is_empty(), "the DLQ is not for a downstream that is down");
        assert_eq!(p.calls.lock().unwrap().len(), 41);
        assert!(c.metrics.circuit_opened.get() >= 1);
        // Halved once by the 503 before the circuit opened, then left alone: not at its floor of 1.
        assert_eq!(c.limiter.as_ref().unwrap().limit(), 8, "an outage is not overload");
        assert_eq!(c.metrics.circuit_state.get(), 0, "closed after recovery");
        // Probes at 5, 10, 20, 40, 60, 60, ... s: the outage costs minutes of waiting, not attempts.
        assert!(started.elapsed() >= Duration::from_secs(600), "{:?}", started.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_persistently_failing_dead_letter_write_is_reported() {
        let (c, _, d) = ctx(&[(0, 100, FailureClass::HttpStatus(400))], OnFailure::DeadLetter, 5);
        let c = Arc::new(c);
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let job = tokio::spawn({
            let c = c.clone();
            async move { c.run(batch(1), tx, &mut Unleased).await }
        });
        tokio::time::sleep(Duration::from_millis(150)).await;
        let r = c.health.retry_report("t", 0, 0, 1).expect("reported");
        assert!(r.dead_letter_failing && r.blocked, "{r:?}");
        job.await.unwrap();
        assert_eq!(c.metrics.dead_letter_errors.get(), 5);
        assert_eq!(d.written.lock().unwrap().len(), 1);
        assert_eq!(c.health.retry_report("t", 0, 0, 1), None, "settled");
    }

    #[tokio::test(start_paused = true)]
    async fn an_inherited_attempt_budget_continues() {
        let (c, p, d) = ctx(&[(0, 100, FailureClass::Timeout)], OnFailure::DeadLetter, 0);
        let report = kpipe_api::commit_metadata::RetryReport {
            offset: 0,
            attempts: 2,
            since_ms: 1_000,
            at_ms: 2_000,
            ..Default::default()
        };
        c.health.inherit("t", 0, &report);
        run(&c, batch(1)).await;
        assert_eq!(p.calls.lock().unwrap().len(), 1, "2 of 3 attempts were spent by the previous owner");
        assert_eq!(*d.written.lock().unwrap(), vec![(0, "timeout".to_string(), 3)]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unacknowledged_dead_letter_write_is_reported_before_it_fails() {
        let (c, _, d) = ctx(&[(0, 100, FailureClass::HttpStatus(400))], OnFailure::DeadLetter, 0);
        *d.slow.lock().unwrap() = Duration::from_secs(60);
        let c = Arc::new(c);
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let job = tokio::spawn({
            let c = c.clone();
            async move { c.run(batch(1), tx, &mut Unleased).await }
        });
        tokio::time::sleep(Duration::from_secs(14)).await;
        assert!(!c.health.retry_report("t", 0, 0, 1).unwrap().dead_letter_failing, "not yet");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let r = c.health.retry_report("t", 0, 0, 1).unwrap();
        assert!(r.dead_letter_failing && r.blocked, "{r:?}");
        job.await.unwrap();
        assert_eq!(d.written.lock().unwrap().len(), 1);
        assert_eq!(c.health.retry_report("t", 0, 0, 1), None, "cleared once written");
    }
}
