//! The `kafka` processor (forward to another topic) and the dead-letter writer. Both produce with
//! an idempotent producer (acks=all) and count a record done only once the broker acknowledged it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use kpipe_api::v1alpha1::{KafkaProcessor as KafkaSpec, KeyPolicy};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::{BatchOutcome, Processor};
use crate::classify::{Failure, FailureClass};
use crate::record::Record;

/// How long one produce may wait in librdkafka's queue before it counts as failed (and retried).
const PRODUCE_QUEUE_TIMEOUT: Duration = Duration::from_secs(30);

fn classify_produce(err: &KafkaError) -> FailureClass {
    let permanent = matches!(
        err.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
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

async fn produce(
    producer: &FutureProducer,
    topic: &str,
    record: &Record,
    key: Option<&[u8]>,
    extra_headers: &[(String, Vec<u8>)],
) -> Result<(), Failure> {
    let mut fr: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers_of(record, extra_headers));
    if let Some(k) = key {
        fr = fr.key(k);
    }
    if let Some(v) = record.value.as_deref() {
        fr = fr.payload(v);
    }
    if let Some(ts) = record.timestamp_ms {
        fr = fr.timestamp(ts);
    }
    producer
        .send(fr, PRODUCE_QUEUE_TIMEOUT)
        .await
        .map(|_| ())
        .map_err(|(e, _)| Failure::new(classify_produce(&e), e.to_string()))
}

pub struct KafkaForwarder {
    producer: FutureProducer,
    topic: String,
    keep_key: bool,
    headers: Vec<(String, Vec<u8>)>,
}

impl KafkaForwarder {
    pub fn new(producer: FutureProducer, spec: &KafkaSpec) -> Self {
        Self {
            producer,
            topic: spec.topic.clone(),
            keep_key: spec.key == KeyPolicy::Keep,
            headers: spec.headers.iter().map(|(k, v)| (k.clone(), v.as_bytes().to_vec())).collect(),
        }
    }
}

impl Processor for KafkaForwarder {
    fn process<'a>(&'a self, records: &'a [Arc<Record>]) -> BoxFuture<'a, BatchOutcome> {
        Box::pin(async move {
            let sends = records.iter().map(|r| {
                let key = if self.keep_key { r.key.as_deref() } else { None };
                produce(&self.producer, &self.topic, r, key, &self.headers)
            });
            let results = futures::future::join_all(sends).await;
            BatchOutcome::Partial(
                results.into_iter().enumerate().filter_map(|(i, r)| r.err().map(|f| (i, f))).collect(),
            )
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

/// Writes failed records to the dead-letter topic.
pub trait DeadLetterSink: Send + Sync {
    fn write<'a>(
        &'a self,
        record: &'a Record,
        failure: &'a Failure,
        attempts: u32,
    ) -> BoxFuture<'a, Result<(), Failure>>;
}

pub struct KafkaDeadLetter {
    pub producer: FutureProducer,
    pub topic: String,
    /// `<namespace>/<name>` of the pipeline.
    pub pipeline: String,
}

impl DeadLetterSink for KafkaDeadLetter {
    fn write<'a>(
        &'a self,
        record: &'a Record,
        failure: &'a Failure,
        attempts: u32,
    ) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(async move {
            let headers = dead_letter_headers(record, failure, attempts, &self.pipeline);
            produce(&self.producer, &self.topic, record, record.key.as_deref(), &headers).await
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
    }
}
