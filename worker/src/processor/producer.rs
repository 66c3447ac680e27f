//! The producer behind the Kafka forwarder and the dead-letter writer: librdkafka's producer (rust-rdkafka's
//! `ThreadedProducer`, which serves delivery reports on its own thread) with one acknowledgement count per call.
//!
//! rust-rdkafka's `FutureProducer` gives every record its own future and channel. The forwarder sends a whole batch
//! and needs only the outcome of each record once all are acknowledged, so here a call's records share one
//! [`Acks`]: each delivery report fills in its record's result and counts down, and the last one wakes the caller.
//! Measured on the forwarder (callgrind, 300,000 × 100 B, docs/BENCHMARKS.md): the per-record futures and their
//! channels cost about 2,000 instructions per record, a sixth of the forwarder's total.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use tokio::sync::Notify;

/// How long a record may wait for room in librdkafka's queue (`queue.buffering.max.*`) before it fails with
/// `QueueFull` (retryable).
pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a sender sleeps while librdkafka's queue is full.
const QUEUE_FULL_BACKOFF: Duration = Duration::from_millis(2);

/// One record to produce: borrowed key and value, owned headers, and the create time (Unix ms; `None`: now).
#[derive(Debug)]
pub struct Outgoing<'a> {
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub headers: Option<OwnedHeaders>,
    pub timestamp_ms: Option<i64>,
}

/// The outcomes of one call's records, filled in by delivery reports.
struct Acks {
    /// Records not yet acknowledged or failed.
    remaining: AtomicUsize,
    /// The error of each failed record, by its index in the call.
    failed: Mutex<Vec<(usize, KafkaError)>>,
    /// Woken when `remaining` reaches 0.
    done: Notify,
}

impl Acks {
    fn new(records: usize) -> Self {
        Self { remaining: AtomicUsize::new(records), failed: Mutex::new(Vec::new()), done: Notify::new() }
    }

    /// Record `index` is finished (`error`: how it failed).
    fn finish(&self, index: usize, error: Option<KafkaError>) {
        if let Some(e) = error
            && let Ok(mut failed) = self.failed.lock()
        {
            failed.push((index, e));
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.notify_one();
        }
    }
}

/// What a record carries to its delivery report.
pub struct Ticket {
    acks: Arc<Acks>,
    index: usize,
}

/// Routes delivery reports to their call's [`Acks`].
pub struct AckContext;

impl ClientContext for AckContext {}

impl ProducerContext for AckContext {
    type DeliveryOpaque = Box<Ticket>;

    fn delivery(&self, result: &DeliveryResult<'_>, ticket: Box<Ticket>) {
        let error = result.as_ref().err().map(|(e, _)| e.clone());
        ticket.acks.finish(ticket.index, error);
    }
}

/// librdkafka's `batch.size` when the configuration does not set it, in bytes.
const LIBRDKAFKA_BATCH_SIZE: u64 = 1_000_000;

/// An idempotent producer (the worker's producer configuration, `kafka_config::producer`) whose calls complete once
/// every record of the call is acknowledged or failed.
pub struct KafkaProducer {
    config: ClientConfig,
    inner: RwLock<Arc<ThreadedProducer<AckContext>>>,
    /// The `batch.size` of `inner`, in bytes.
    batch_size: AtomicU64,
}

impl KafkaProducer {
    /// Creates the producer from `config`. Errors: librdkafka refused the configuration.
    pub fn new(config: &ClientConfig) -> KafkaResult<Self> {
        let batch_size = config.get("batch.size").and_then(|v| v.parse::<u64>().ok()).unwrap_or(LIBRDKAFKA_BATCH_SIZE);
        Ok(Self {
            config: config.clone(),
            inner: RwLock::new(Arc::new(config.create_with_context(AckContext)?)),
            batch_size: AtomicU64::new(batch_size),
        })
    }

    fn current(&self) -> Arc<ThreadedProducer<AckContext>> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Makes the producer's batches fit a topic whose `max.message.bytes` is `max_message_bytes`: librdkafka packs
    /// the queued records of a partition into one batch up to `batch.size`, and the broker refuses a batch over the
    /// topic's limit whole, so a limit lowered after start-up refused every batch of records that each fit, for good.
    /// A producer with a smaller `batch.size` replaces this one (librdkafka cannot change it on a running producer);
    /// calls under way finish on the old one. Returns whether it was replaced.
    pub fn fit_batches_to(&self, max_message_bytes: u64) -> bool {
        let wanted = max_message_bytes.saturating_sub(crate::size::BATCH_OVERHEAD).max(1);
        if self.batch_size.load(Ordering::Acquire) <= wanted {
            return false;
        }
        let mut config = self.config.clone();
        config.set("batch.size", wanted.to_string());
        match config.create_with_context(AckContext) {
            Ok(producer) => {
                *self.inner.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(producer);
                self.batch_size.store(wanted, Ordering::Release);
                tracing::warn!(
                    batch_size = wanted,
                    "an output topic's max.message.bytes went down: producer batches \
                    capped to it (a new producer)"
                );
                true
            }
            Err(e) => {
                tracing::warn!(batch_size = wanted, "cannot create a producer with smaller batches: {e}");
                false
            }
        }
    }

    /// Produces one record to `topic` and waits for its acknowledgement.
    pub async fn send(&self, topic: &str, record: Outgoing<'_>) -> Result<(), KafkaError> {
        let mut results = self.send_all(topic, vec![record]).await;
        results.pop().unwrap_or(Err(KafkaError::NoMessageReceived))
    }

    /// Produces `records` to `topic` in order (so records of one partition are written in this order: the producer
    /// is idempotent) and waits until each is acknowledged or failed. Returns one result per record, in order.
    pub async fn send_all(&self, topic: &str, records: Vec<Outgoing<'_>>) -> Vec<Result<(), KafkaError>> {
        let count = records.len();
        let acks = Arc::new(Acks::new(count));
        let producer = self.current();
        for (index, record) in records.into_iter().enumerate() {
            let ticket = Box::new(Ticket { acks: acks.clone(), index });
            let mut base = BaseRecord::with_opaque_to(topic, ticket);
            if let Some(k) = record.key {
                base = base.key(k);
            }
            if let Some(v) = record.value {
                base = base.payload(v);
            }
            if let Some(h) = record.headers {
                base = base.headers(h);
            }
            if let Some(ts) = record.timestamp_ms {
                base = base.timestamp(ts);
            }
            if let Err((error, refused)) = Self::enqueue(&producer, base).await {
                // Not queued: no delivery report will come for it.
                drop(refused);
                acks.finish(index, Some(error));
            }
        }
        while acks.remaining.load(Ordering::Acquire) > 0 {
            acks.done.notified().await;
        }
        let mut results: Vec<Result<(), KafkaError>> = (0..count).map(|_| Ok(())).collect();
        if let Ok(mut failed) = acks.failed.lock() {
            for (index, error) in failed.drain(..) {
                if let Some(slot) = results.get_mut(index) {
                    *slot = Err(error);
                }
            }
        }
        results
    }

    /// Hands `record` to librdkafka, waiting up to [`QUEUE_TIMEOUT`] while its queue is full.
    async fn enqueue<'a>(
        producer: &ThreadedProducer<AckContext>,
        mut record: BaseRecord<'a, [u8], [u8], Box<Ticket>>,
    ) -> Result<(), (KafkaError, BaseRecord<'a, [u8], [u8], Box<Ticket>>)> {
        let deadline = Instant::now() + QUEUE_TIMEOUT;
        loop {
            match producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), refused))
                    if Instant::now() < deadline =>
                {
                    record = refused;
                    tokio::time::sleep(QUEUE_FULL_BACKOFF).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits up to `timeout` for every queued record to be delivered (shutdown).
    pub fn flush(&self, timeout: Duration) -> KafkaResult<()> {
        self.current().flush(timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_last_report_wakes_the_caller_with_each_records_outcome() {
        let acks = Arc::new(Acks::new(3));
        let waiter = {
            let acks = acks.clone();
            tokio::spawn(async move {
                while acks.remaining.load(Ordering::Acquire) > 0 {
                    acks.done.notified().await;
                }
                acks.failed.lock().map(|f| f.iter().map(|(i, _)| *i).collect::<Vec<_>>()).unwrap_or_default()
            })
        };
        acks.finish(2, None);
        acks.finish(0, Some(KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)));
        assert!(!waiter.is_finished(), "one record is still outstanding");
        acks.finish(1, None);
        let failed = tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap();
        assert_eq!(failed, vec![0]);
    }

    #[tokio::test]
    async fn a_report_that_comes_before_the_caller_waits_still_wakes_it() {
        let acks = Acks::new(1);
        // The caller saw a record outstanding and is about to wait; the report comes in first.
        assert!(acks.remaining.load(Ordering::Acquire) > 0);
        acks.finish(0, None);
        tokio::time::timeout(Duration::from_secs(5), acks.done.notified())
            .await
            .expect("the permit the last report left wakes the wait");
    }
}
