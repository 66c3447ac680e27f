//! The `kafka` processor (forward to another topic) and the dead-letter writer. Both produce with
//! an idempotent producer (acks=all) and count a record done only once the broker acknowledged it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use kpipe_api::v1alpha1::{KafkaProcessor as KafkaSpec, KeyPolicy};
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::util::Timeout;

use super::producer::{KafkaProducer, Outgoing};
use super::{BatchOutcome, Processor};
use crate::classify::{Failure, FailureClass};
use crate::metrics::Metrics;
use crate::record::Record;
use crate::size::{self, Shape};

/// The producer's own limit on one request (librdkafka `message.max.bytes`), set by the worker so
/// that the topics' `max.message.bytes` is what decides (librdkafka's default, 1,000,000, is below
/// Kafka's default topic limit of 1,048,588).
pub const PRODUCER_MESSAGE_MAX_BYTES: u64 = 64 << 20;

/// Kafka's default `max.message.bytes` (the broker's `message.max.bytes`), used while a topic's own
/// value cannot be read.
pub const KAFKA_DEFAULT_MAX_MESSAGE_BYTES: u64 = 1_048_588;

/// How long one read of a topic's configuration may take.
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether a produce error says the record is too large for the topic (or the producer).
pub fn is_too_large(err: &KafkaError) -> bool {
    matches!(
        err.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::MessageBatchTooLarge)
    )
}

fn classify_produce(err: &KafkaError) -> FailureClass {
    let permanent = matches!(
        err.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::MessageBatchTooLarge
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::InvalidRecord
        )
    );
    FailureClass::Produce { retryable: !permanent }
}

fn headers_of(record: &Record, extra: &[(String, Vec<u8>)]) -> OwnedHeaders {
    let mut h = OwnedHeaders::new_with_capacity(record.headers.len() + extra.len());
    for (k, v) in &record.headers {
        h = h.insert(Header { key: k, value: v.as_deref() });
    }
    for (k, v) in extra {
        h = h.insert(Header { key: k, value: Some(v.as_slice()) });
    }
    h
}

/// A topic's size limit as far as kpipe knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Read from the topic's configuration (capped by [`PRODUCER_MESSAGE_MAX_BYTES`]).
    Known(u64),
    /// The configuration could not be read (no DescribeConfigs permission, brokers unreachable):
    /// [`KAFKA_DEFAULT_MAX_MESSAGE_BYTES`] is assumed.
    Assumed(u64),
}

impl Limit {
    pub fn bytes(self) -> u64 {
        match self {
            Self::Known(b) | Self::Assumed(b) => b,
        }
    }
}

/// The records a topic refuses for what they are, not for their size: Kafka refuses a record
/// - with `INVALID_TIMESTAMP` when its create time is more than `message.timestamp.before.max.ms` in the past or
///   `message.timestamp.after.max.ms` in the future (KIP-937; older brokers: `message.timestamp.difference.max.ms` both
///   ways), never with `message.timestamp.type: LogAppendTime`;
/// - with `INVALID_RECORD` when it has no key and the topic's `cleanup.policy` includes `compact`.
///
/// The broker refuses the whole produce request such a record is in, so one of them would fail every record batched
/// with it; the forwarder checks each record first and fails only that one, permanently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TopicRules {
    /// Milliseconds a timestamp may lie in the past (`None`: unbounded).
    pub before_ms: Option<i64>,
    /// Milliseconds a timestamp may lie in the future (`None`: unbounded).
    pub after_ms: Option<i64>,
    /// A compacted topic: every record needs a key.
    pub compacted: bool,
}

impl TopicRules {
    /// From a topic's configuration entries (name, value); Kafka's `Long.MAX_VALUE` means unbounded.
    pub fn from_config<'a>(entries: impl IntoIterator<Item = (&'a str, Option<&'a str>)>) -> Self {
        let (mut kind, mut before, mut after, mut difference, mut compacted) = (None, None, None, None, false);
        for (name, value) in entries {
            let ms = || value.and_then(|v| v.parse::<i64>().ok()).filter(|v| *v >= 0 && *v < i64::MAX);
            match name {
                "message.timestamp.type" => kind = value,
                "message.timestamp.before.max.ms" => before = ms(),
                "message.timestamp.after.max.ms" => after = ms(),
                "message.timestamp.difference.max.ms" => difference = ms(),
                "cleanup.policy" => compacted = value.is_some_and(|v| v.split(',').any(|p| p.trim() == "compact")),
                _ => {}
            }
        }
        if kind == Some("LogAppendTime") {
            return Self { compacted, ..Self::default() };
        }
        Self { before_ms: before.or(difference), after_ms: after.or(difference), compacted }
    }

    /// Why a record (`has_key`: whether it has a key) stamped `timestamp_ms` would be refused at `now_ms` (both Unix
    /// milliseconds), if it would.
    pub fn refuses(&self, has_key: bool, timestamp_ms: Option<i64>, now_ms: i64) -> Option<String> {
        if self.compacted && !has_key {
            return Some("a record without a key, refused by a compacted topic (cleanup.policy compact)".to_owned());
        }
        let timestamp_ms = timestamp_ms?;
        if let Some(before) = self.before_ms
            && timestamp_ms < now_ms.saturating_sub(before)
        {
            return Some(format!(
                "timestamp {timestamp_ms}: more than message.timestamp.before.max.ms {before} in the past"
            ));
        }
        if let Some(after) = self.after_ms
            && timestamp_ms > now_ms.saturating_add(after)
        {
            return Some(format!(
                "timestamp {timestamp_ms}: more than message.timestamp.after.max.ms {after} in the future"
            ));
        }
        None
    }
}

/// How long a failed read of a topic's configuration is remembered before it is tried again.
const UNKNOWN_LIMIT_TTL: Duration = Duration::from_secs(60);

/// What kpipe knows of a topic it produces to: its size limit and the rules it refuses records by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicFacts {
    pub limit: Limit,
    /// What the topic refuses besides size (none while the configuration is unknown).
    pub rules: TopicRules,
}

/// The `max.message.bytes` and [`TopicRules`] of the topics kpipe produces to, read once per topic
/// through the admin API (DescribeConfigs), cached, and read again after the broker refused a record
/// as too large ([`TopicLimits::invalidate`]). A failed read assumes Kafka's default size and no rules,
/// and is retried after [`UNKNOWN_LIMIT_TTL`] (never once per record).
pub struct TopicLimits {
    admin: Option<AdminClient<DefaultClientContext>>,
    /// Per topic: what is known, and when it is to be read again (`None`: not until invalidated).
    cache: Mutex<HashMap<String, (TopicFacts, Option<std::time::Instant>)>>,
}

impl TopicLimits {
    /// `admin`: `None` assumes [`KAFKA_DEFAULT_MAX_MESSAGE_BYTES`] for every topic (tests).
    pub fn new(admin: Option<AdminClient<DefaultClientContext>>) -> Self {
        Self { admin, cache: Mutex::new(HashMap::new()) }
    }

    /// A fixed, known limit for `topic` (tests, or a value known otherwise).
    pub fn with_limit(self, topic: &str, bytes: u64) -> Self {
        if let Ok(mut c) = self.cache.lock() {
            let facts = TopicFacts { limit: Limit::Known(bytes), rules: TopicRules::default() };
            c.insert(topic.to_owned(), (facts, None));
        }
        self
    }

    /// The largest record `topic` accepts, in bytes (a record batch of one record, see [`crate::size`]).
    pub async fn max_message_bytes(&self, topic: &str) -> u64 {
        self.limit(topic).await.bytes()
    }

    /// The topic's limit and whether it was read or assumed.
    pub async fn limit(&self, topic: &str) -> Limit {
        self.facts(topic).await.limit
    }

    /// The topic's size limit and rules, from the cache or read now.
    pub async fn facts(&self, topic: &str) -> TopicFacts {
        let now = std::time::Instant::now();
        let cached = self.cache.lock().ok().and_then(|c| c.get(topic).copied());
        if let Some((facts, expires)) = cached
            && expires.is_none_or(|e| now < e)
        {
            return facts;
        }
        let assumed =
            TopicFacts { limit: Limit::Assumed(KAFKA_DEFAULT_MAX_MESSAGE_BYTES), rules: TopicRules::default() };
        let Some(admin) = &self.admin else { return assumed };
        // One re-read at a time: meanwhile other callers keep the value they had.
        if let Some((facts, _)) = cached
            && let Ok(mut c) = self.cache.lock()
        {
            c.insert(topic.to_owned(), (facts, Some(now + DESCRIBE_TIMEOUT)));
        }
        let opts = AdminOptions::new().request_timeout(Some(Timeout::After(DESCRIBE_TIMEOUT)));
        let read = match admin.describe_configs(&[ResourceSpecifier::Topic(topic)], &opts).await {
            Ok(results) => results.into_iter().flatten().find_map(|r| {
                let bytes = r.get("max.message.bytes").and_then(|e| e.value.as_deref()?.parse::<u64>().ok())?;
                let rules = TopicRules::from_config(r.entries.iter().map(|e| (e.name.as_str(), e.value.as_deref())));
                Some((bytes, rules))
            }),
            Err(e) => {
                tracing::warn!(topic, "cannot read the topic's configuration: {e}");
                None
            }
        };
        let entry = match read {
            Some((bytes, rules)) => {
                let bytes = bytes.min(PRODUCER_MESSAGE_MAX_BYTES);
                tracing::info!(topic, max_message_bytes = bytes, ?rules, "topic limits");
                (TopicFacts { limit: Limit::Known(bytes), rules }, None)
            }
            // What was read before stays (a failed re-read must not shrink the limit to the default and refuse
            // records the topic takes); retried later.
            None => match cached {
                Some((known @ TopicFacts { limit: Limit::Known(_), .. }, _)) => (known, Some(now + UNKNOWN_LIMIT_TTL)),
                _ => {
                    tracing::warn!(topic, assumed = KAFKA_DEFAULT_MAX_MESSAGE_BYTES, "topic size limit unknown");
                    (assumed, Some(now + UNKNOWN_LIMIT_TTL))
                }
            },
        };
        if let Ok(mut c) = self.cache.lock() {
            c.insert(topic.to_owned(), entry);
        }
        entry.0
    }

    /// The smallest limit of `topics` (read now): the producer's `batch.size` must not exceed it, or
    /// librdkafka batches records for that topic beyond what the broker accepts (the broker then
    /// refuses the whole batch as too large).
    pub async fn smallest(&self, topics: &[&str]) -> u64 {
        let mut least = u64::MAX;
        for t in topics {
            least = least.min(self.max_message_bytes(t).await);
        }
        least
    }

    /// Marks the cached limit of `topic` for a re-read (the broker refused a record kpipe judged to
    /// fit). A limit that could not be read stays assumed until its retry time.
    pub fn invalidate(&self, topic: &str) {
        if self.admin.is_some()
            && let Ok(mut c) = self.cache.lock()
            && let Some((known @ TopicFacts { limit: Limit::Known(_), .. }, _)) = c.get(topic).copied()
        {
            // Re-read at the next use; the known value stays until a read replaces it.
            c.insert(topic.to_owned(), (known, Some(std::time::Instant::now())));
        }
    }
}

fn produce_failure(e: &KafkaError) -> Failure {
    Failure::new(classify_produce(e), e.to_string())
}

pub struct KafkaForwarder {
    producer: Arc<KafkaProducer>,
    topic: String,
    keep_key: bool,
    headers: Vec<(String, Vec<u8>)>,
    limits: Arc<TopicLimits>,
    metrics: Metrics,
}

impl KafkaForwarder {
    pub fn new(producer: Arc<KafkaProducer>, spec: &KafkaSpec, limits: Arc<TopicLimits>, metrics: Metrics) -> Self {
        Self {
            producer,
            topic: spec.topic.clone(),
            keep_key: spec.key == KeyPolicy::Keep,
            headers: spec.headers.iter().map(|(k, v)| (k.clone(), v.as_bytes().to_vec())).collect(),
            limits,
            metrics,
        }
    }

    /// The record to produce for `r`, or why it must not be produced: a record larger than the output topic's
    /// `max.message.bytes`, or one the topic refuses for what it is ([`TopicRules`]), is a permanent failure (sent
    /// down the failure policy, never retried). Returns the record and its size in bytes.
    fn outgoing<'r>(
        &self,
        r: &'r Record,
        limit: u64,
        rules: TopicRules,
        now_ms: i64,
    ) -> Result<(Outgoing<'r>, u64), Failure> {
        let key = if self.keep_key { r.key.as_deref() } else { None };
        // Refused before producing: the broker would refuse the whole request it is batched in.
        if let Some(why) = rules.refuses(key.is_some(), r.timestamp_ms, now_ms) {
            return Err(Failure::new(
                FailureClass::Produce { retryable: false },
                format!("{why}: topic {}", self.topic),
            ));
        }
        let headers = r
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_deref()))
            .chain(self.headers.iter().map(|(k, v)| (k.as_str(), Some(v.as_slice()))));
        let bytes = size::record_size(key, r.value.as_deref(), headers);
        if bytes > limit {
            self.metrics.too_large.inc();
            return Err(Failure::new(
                FailureClass::Produce { retryable: false },
                format!("record of about {bytes} bytes exceeds max.message.bytes {limit} of topic {}", self.topic),
            ));
        }
        // No header list at all for a record without headers: librdkafka would allocate an empty one.
        let headers = (!r.headers.is_empty() || !self.headers.is_empty()).then(|| headers_of(r, &self.headers));
        Ok((Outgoing { key, value: r.value.as_deref(), headers, timestamp_ms: r.timestamp_ms }, bytes))
    }

    /// The failure for a record of `bytes` bytes the broker refused with `e`; `fresh`: the topic's limit read again
    /// after a refusal as too large (once per batch). Refused as too large: either the topic's limit went down, or
    /// the producer batched this record with others beyond the limit, and then the record alone fits, the producer's
    /// batches are made to fit the limit ([`KafkaProducer::fit_batches_to`]) and the record is retried.
    fn refused(&self, e: &KafkaError, bytes: u64, fresh: Option<Limit>) -> Failure {
        let Some(fresh) = fresh.filter(|_| is_too_large(e)) else {
            return produce_failure(e);
        };
        // With the limit unknown, the broker's word is all there is: the record is too large.
        if bytes > fresh.bytes() || matches!(fresh, Limit::Assumed(_)) {
            self.metrics.too_large.inc();
            produce_failure(e)
        } else {
            self.producer.fit_batches_to(fresh.bytes());
            Failure::new(
                FailureClass::Produce { retryable: true },
                format!("{e} (the record alone, about {bytes} bytes, fits the limit {}: retried)", fresh.bytes()),
            )
        }
    }
}

impl Processor for KafkaForwarder {
    /// Produces the batch in order and fails exactly the records that could not be produced.
    fn process<'a>(&'a self, records: &'a [Arc<Record>]) -> BoxFuture<'a, BatchOutcome> {
        Box::pin(async move {
            let TopicFacts { limit, rules } = self.limits.facts(&self.topic).await;
            let limit = limit.bytes();
            let now_ms = i64::try_from(crate::consumer::unix_millis()).unwrap_or(i64::MAX);
            let mut failed = Vec::new();
            // (index in `records`, size in bytes) of each record produced.
            let mut sent = Vec::with_capacity(records.len());
            let mut outgoing = Vec::with_capacity(records.len());
            for (i, r) in records.iter().enumerate() {
                match self.outgoing(r, limit, rules, now_ms) {
                    Ok((o, bytes)) => {
                        outgoing.push(o);
                        sent.push((i, bytes));
                    }
                    Err(f) => failed.push((i, f)),
                }
            }
            let results = self.producer.send_all(&self.topic, outgoing).await;
            // Refused as too large: the limit is read again once for the whole batch.
            let fresh = if results.iter().any(|r| r.as_ref().is_err_and(is_too_large)) {
                self.limits.invalidate(&self.topic);
                Some(self.limits.limit(&self.topic).await)
            } else {
                None
            };
            for ((i, bytes), result) in sent.into_iter().zip(results) {
                if let Err(e) = result {
                    failed.push((i, self.refused(&e, bytes, fresh)));
                }
            }
            failed.sort_by_key(|(i, _)| *i);
            BatchOutcome::Partial(failed)
        })
    }
}

/// Context headers added to a dead-lettered record.
pub fn dead_letter_headers(
    record: &Record,
    failure: &Failure,
    attempts: u32,
    pipeline: &str,
) -> Vec<(String, Vec<u8>)> {
    let mut h: BTreeMap<&str, String> = BTreeMap::new();
    h.insert("kpipe.original.topic", record.topic.to_string());
    h.insert("kpipe.original.partition", record.partition.to_string());
    h.insert("kpipe.original.offset", record.offset.to_string());
    if let Some(ts) = record.timestamp_ms {
        h.insert("kpipe.original.timestamp", ts.to_string());
    }
    h.insert("kpipe.error.class", failure.class.label());
    // Bounded so a huge error body cannot make the DLQ record too large.
    let mut message = failure.message.clone();
    if message.len() > 1024 {
        let mut cut = 1024;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    h.insert("kpipe.error.message", message);
    h.insert("kpipe.attempts", attempts.to_string());
    h.insert("kpipe.pipeline", pipeline.to_owned());
    h.into_iter().map(|(k, v)| (k.to_owned(), v.into_bytes())).collect()
}

/// How a dead letter was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The whole record with context headers.
    Full,
    /// A reference record: the full copy exceeds the topic's `max.message.bytes` (see [`crate::size`]).
    Reference(Shape),
}

/// Writes failed records to the dead-letter topic.
pub trait DeadLetterSink: Send + Sync {
    fn write<'a>(
        &'a self,
        record: &'a Record,
        failure: &'a Failure,
        attempts: u32,
    ) -> BoxFuture<'a, Result<Written, Failure>>;
}

pub struct KafkaDeadLetter {
    pub producer: Arc<KafkaProducer>,
    pub topic: String,
    /// `metadata.name` of the pipeline: the value of the `kpipe.pipeline` context header.
    pub pipeline: String,
    pub limits: Arc<TopicLimits>,
}

impl DeadLetterSink for KafkaDeadLetter {
    /// Writes the largest [`Shape`] that fits the topic's `max.message.bytes`; when the broker still
    /// refuses it as too large, reads the limit again and tries the next smaller shape, down to
    /// [`Shape::Bare`] (coordinates and error only). Other errors are returned (the caller retries).
    fn write<'a>(
        &'a self,
        record: &'a Record,
        failure: &'a Failure,
        attempts: u32,
    ) -> BoxFuture<'a, Result<Written, Failure>> {
        Box::pin(async move {
            let context = dead_letter_headers(record, failure, attempts, &self.pipeline);
            let mut at_most = Shape::Full;
            loop {
                let limit = self.limits.max_message_bytes(&self.topic).await;
                let shape = size::dead_letter_shape(record, &context, limit, at_most);
                let mut extra = size::truncation_headers(record, shape);
                extra.extend(context.iter().cloned());
                let headers = if shape.keeps_headers() {
                    headers_of(record, &extra)
                } else {
                    extra.iter().fold(OwnedHeaders::new_with_capacity(extra.len()), |h, (k, v)| {
                        h.insert(Header { key: k, value: Some(v.as_slice()) })
                    })
                };
                let key = record.key.as_deref().filter(|_| shape.keeps_key());
                let value = record.value.as_deref().filter(|_| shape.keeps_value());
                // Stamped with the time of dead-lettering (the original is `kpipe.original.timestamp`): the
                // DLQ's time-based retention then counts from when the record failed, and a topic with
                // `message.timestamp.before.max.ms` does not refuse a dead letter for its age.
                let dead_letter = Outgoing { key, value, headers: Some(headers), timestamp_ms: None };
                match self.producer.send(&self.topic, dead_letter).await {
                    Ok(()) if shape == Shape::Full => return Ok(Written::Full),
                    Ok(()) => return Ok(Written::Reference(shape)),
                    Err(e) if is_too_large(&e) => {
                        self.limits.invalidate(&self.topic);
                        let fresh = self.limits.limit(&self.topic).await;
                        if matches!(fresh, Limit::Known(l) if size::dead_letter_size(record, &context, shape) <= l) {
                            // The record alone fits: the producer batched it with others beyond the
                            // limit. Retried as it is (never cut for a reason that is not its own size), with
                            // batches that fit.
                            self.producer.fit_batches_to(fresh.bytes());
                            return Err(Failure::new(
                                FailureClass::Produce { retryable: true },
                                format!("{e} (the dead letter alone fits the limit {}: retried)", fresh.bytes()),
                            ));
                        }
                        match shape.smaller() {
                            Some(s) => {
                                tracing::warn!(topic = %self.topic, ?shape, "dead letter refused as too large; trying smaller");
                                at_most = s;
                            }
                            None => return Err(produce_failure(&e)),
                        }
                    }
                    Err(e) => return Err(produce_failure(&e)),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::test_record;

    #[test]
    fn dead_letter_context_headers() {
        let r = test_record(42, Some("k"), "v");
        let f = Failure::new(FailureClass::HttpStatus(400), "é".repeat(1000));
        let h: BTreeMap<_, _> = dead_letter_headers(&r, &f, 3, "ns/p").into_iter().collect();
        let s = |k: &str| String::from_utf8(h[k].clone()).unwrap();
        assert_eq!(s("kpipe.original.topic"), "t");
        assert_eq!(s("kpipe.original.partition"), "0");
        assert_eq!(s("kpipe.original.offset"), "42");
        assert_eq!(s("kpipe.original.timestamp"), "1700000000000");
        assert_eq!(s("kpipe.error.class"), "http_400");
        assert!(s("kpipe.error.message").len() <= 1024);
        assert_eq!(s("kpipe.attempts"), "3");
        assert_eq!(s("kpipe.pipeline"), "ns/p");
        // A replay strips exactly the context headers this writer adds (one list in kpipe_api::replay).
        for k in h.keys() {
            assert!(kpipe_api::replay::CONTEXT_HEADERS.contains(&k.as_str()), "{k} missing from CONTEXT_HEADERS");
        }
    }

    #[test]
    fn topic_rules_follow_the_topic_configuration() {
        let w = TopicRules::from_config([
            ("message.timestamp.type", Some("CreateTime")),
            ("message.timestamp.before.max.ms", Some("600000")),
            ("message.timestamp.after.max.ms", Some("9223372036854775807")),
            ("cleanup.policy", Some("delete")),
        ]);
        assert_eq!(w, TopicRules { before_ms: Some(600_000), after_ms: None, compacted: false });
        let now = 1_800_000_000_000;
        assert!(w.refuses(true, Some(now - 600_001), now).is_some_and(|why| why.contains("before.max.ms 600000")));
        assert_eq!(w.refuses(true, Some(now - 600_000), now), None);
        assert_eq!(w.refuses(false, Some(now + 86_400_000), now), None, "unbounded in the future; keys optional");
        assert_eq!(w.refuses(true, None, now), None, "no timestamp: the producer stamps it now");
        // Older brokers: one difference both ways; a log-append-time topic refuses no timestamp.
        let legacy = TopicRules::from_config([("message.timestamp.difference.max.ms", Some("1000"))]);
        assert_eq!(legacy, TopicRules { before_ms: Some(1000), after_ms: Some(1000), compacted: false });
        assert!(legacy.refuses(true, Some(now + 1001), now).is_some());
        assert!(legacy.refuses(true, Some(now - 1001), now).is_some());
        let append = TopicRules::from_config([
            ("message.timestamp.type", Some("LogAppendTime")),
            ("message.timestamp.before.max.ms", Some("1")),
        ]);
        assert_eq!(append.refuses(true, Some(0), now), None);
        assert_eq!(TopicRules::default().refuses(false, Some(i64::MIN), now), None);
        // A compacted topic needs keys.
        let compacted = TopicRules::from_config([("cleanup.policy", Some("compact,delete"))]);
        assert!(compacted.refuses(false, Some(now), now).is_some_and(|why| why.contains("without a key")));
        assert_eq!(compacted.refuses(true, Some(now), now), None);
    }

    #[tokio::test]
    async fn limits_are_known_or_assumed() {
        let l = TopicLimits::new(None).with_limit("small", 20_000);
        assert_eq!(l.limit("small").await, Limit::Known(20_000));
        assert_eq!(l.limit("other").await, Limit::Assumed(KAFKA_DEFAULT_MAX_MESSAGE_BYTES));
        assert_eq!(l.smallest(&["other", "small"]).await, 20_000);
        l.invalidate("small");
        assert_eq!(l.limit("small").await, Limit::Known(20_000), "without an admin client nothing is re-read");
    }
}
