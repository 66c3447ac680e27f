//! The `http` processor: POST batches as JSON or protobuf, or single records as CloudEvents
//! (binary mode).
//!
//! JSON request body:
//! ```json
//! {"pipeline": "orders", "records": [
//!   {"topic": "orders", "partition": 0, "offset": 42, "timestamp": 1700000000000,
//!    "key": "k1", "value": "{\"id\":1}", "headers": [{"key": "h", "value": "x"}]}]}
//! ```
//! `key`/`value`/header `value` are UTF-8 strings; bytes that are not valid UTF-8 are sent as
//! `keyBase64`/`valueBase64`/`valueBase64` instead. Absent keys/values are omitted.
//!
//! Response: any 2xx means the batch succeeded, except the records named in an optional JSON
//! body `{"failed": [{"partition": 0, "offset": 42, "error": "why", "permanent": false}]}`
//! (`topic` may be given too). Only named records are retried; `permanent: true` sends a record
//! straight to the failure policy. Non-2xx fails the whole batch: 408/409/429/5xx are retried,
//! other statuses go to the failure policy.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use futures::future::BoxFuture;
use kpipe_api::v1alpha1::{HttpFormat, HttpProcessor as HttpSpec};
use prost::Message;
use serde::{Deserialize, Serialize};

use super::{BatchOutcome, Processor};
use crate::classify::{Failure, FailureClass, classify_reqwest};
use crate::proto;
use crate::record::Record;

pub struct HttpProcessor {
    client: reqwest::Client,
    url: String,
    format: HttpFormat,
    headers: BTreeMap<String, String>,
    pipeline: String,
    source: String,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot build HTTP client: {0}")]
pub struct HttpBuildError(#[from] reqwest::Error);

impl HttpProcessor {
    pub fn new(spec: &HttpSpec, namespace: &str, pipeline: &str) -> Result<Self, HttpBuildError> {
        let client = reqwest::Client::builder()
            .timeout(spec.timeout.as_std().max(Duration::from_millis(1)))
            .pool_max_idle_per_host(1024)
            .build()?;
        Ok(Self {
            client,
            url: spec.url.clone(),
            format: spec.format,
            headers: spec.headers.clone(),
            pipeline: pipeline.to_owned(),
            source: format!("/kpipe/{namespace}/{pipeline}"),
        })
    }

    fn request(&self) -> reqwest::RequestBuilder {
        let mut req = self.client.post(&self.url);
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        req
    }

    async fn send_batch(&self, records: &[Arc<Record>]) -> BatchOutcome {
        let (body, content_type) = match self.format {
            HttpFormat::Protobuf => (encode_protobuf(&self.pipeline, records), "application/x-protobuf"),
            _ => match encode_json(&self.pipeline, records) {
                Ok(b) => (b, "application/json"),
                Err(e) => return BatchOutcome::Failed(Failure::new(FailureClass::Encode, e.to_string())),
            },
        };
        let resp = match self.request().header("content-type", content_type).body(body).send().await {
            Ok(r) => r,
            Err(e) => return BatchOutcome::Failed(Failure::new(classify_reqwest(&e), e.to_string())),
        };
        let status = resp.status();
        let bytes = match resp.bytes().await {
            Ok(b) => b,
            Err(e) => return BatchOutcome::Failed(Failure::new(classify_reqwest(&e), e.to_string())),
        };
        if !status.is_success() {
            let snippet = String::from_utf8_lossy(&bytes[..bytes.len().min(256)]).into_owned();
            return BatchOutcome::Failed(Failure::new(
                FailureClass::HttpStatus(status.as_u16()),
                format!("HTTP {status}: {snippet}"),
            ));
        }
        let failed = match self.format {
            HttpFormat::Protobuf => match decode_protobuf_result(&bytes) {
                Ok(f) => f,
                Err(e) => return BatchOutcome::Failed(Failure::new(FailureClass::BadResponse, e)),
            },
            _ => decode_json_result(&bytes),
        };
        BatchOutcome::Partial(match_failed(records, failed))
    }

    async fn send_cloudevent(&self, record: &Record) -> Result<(), Failure> {
        let mut req = self
            .request()
            .header("ce-specversion", "1.0")
            .header("ce-id", format!("{}-{}-{}", record.topic, record.partition, record.offset))
            .header("ce-source", &self.source)
            .header("ce-type", "io.kpipe.record")
            .header("ce-subject", format!("{}/{}/{}", record.topic, record.partition, record.offset));
        if let Some(ts) = record.timestamp_ms.and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok()) {
            req = req.header("ce-time", ts.to_string());
        }
        if let Some(key) = &record.key {
            // The Kafka protocol binding's `partitionkey` extension.
            req = req.header("ce-partitionkey", String::from_utf8_lossy(key).into_owned());
        }
        let mut content_type = "application/octet-stream".to_owned();
        for (k, v) in &record.headers {
            if k.eq_ignore_ascii_case("content-type")
                && let Some(v) = v.as_ref().and_then(|v| std::str::from_utf8(v).ok())
            {
                content_type = v.to_owned();
            }
        }
        req = req.header("content-type", content_type);
        let resp = req
            .body(record.value.clone().unwrap_or_default())
            .send()
            .await
            .map_err(|e| Failure::new(classify_reqwest(&e), e.to_string()))?;
        let status = resp.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(Failure::new(FailureClass::HttpStatus(status.as_u16()), format!("HTTP {status}")))
        }
    }
}

impl Processor for HttpProcessor {
    fn process<'a>(&'a self, records: &'a [Arc<Record>]) -> BoxFuture<'a, BatchOutcome> {
        Box::pin(async move {
            if self.format == HttpFormat::Cloudevents {
                let results = futures::future::join_all(records.iter().map(|r| self.send_cloudevent(r))).await;
                let failed = results.into_iter().enumerate().filter_map(|(i, r)| r.err().map(|f| (i, f))).collect();
                BatchOutcome::Partial(failed)
            } else {
                self.send_batch(records).await
            }
        })
    }
}

#[derive(Serialize)]
struct JsonBatch<'a> {
    pipeline: &'a str,
    records: Vec<JsonRecord<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JsonRecord<'a> {
    topic: &'a str,
    partition: i32,
    offset: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    timestamp: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_base64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_base64: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    headers: Vec<JsonHeader<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JsonHeader<'a> {
    key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_base64: Option<String>,
}

/// Splits bytes into (utf8 text, base64) so JSON carries any content losslessly.
fn text_or_base64(bytes: Option<&[u8]>) -> (Option<&str>, Option<String>) {
    match bytes {
        None => (None, None),
        Some(b) => match std::str::from_utf8(b) {
            Ok(s) => (Some(s), None),
            Err(_) => (None, Some(base64::engine::general_purpose::STANDARD.encode(b))),
        },
    }
}

pub fn encode_json(pipeline: &str, records: &[Arc<Record>]) -> Result<Vec<u8>, serde_json::Error> {
    let records = records
        .iter()
        .map(|r| {
            let (key, key_base64) = text_or_base64(r.key.as_deref());
            let (value, value_base64) = text_or_base64(r.value.as_deref());
            JsonRecord {
                topic: &r.topic,
                partition: r.partition,
                offset: r.offset,
                timestamp: r.timestamp_ms,
                key,
                key_base64,
                value,
                value_base64,
                headers: r
                    .headers
                    .iter()
                    .map(|(k, v)| {
                        let (value, value_base64) = text_or_base64(v.as_deref());
                        JsonHeader { key: k, value, value_base64 }
                    })
                    .collect(),
            }
        })
        .collect();
    serde_json::to_vec(&JsonBatch { pipeline, records })
}

pub fn encode_protobuf(pipeline: &str, records: &[Arc<Record>]) -> Vec<u8> {
    proto::RecordBatch {
        pipeline: pipeline.to_owned(),
        records: records
            .iter()
            .map(|r| proto::Record {
                topic: r.topic.to_string(),
                partition: r.partition,
                offset: r.offset,
                timestamp_ms: r.timestamp_ms.unwrap_or(0),
                key: r.key.clone(),
                value: r.value.clone(),
                headers: r
                    .headers
                    .iter()
                    .map(|(k, v)| proto::Header { key: k.clone(), value: v.clone().unwrap_or_default() })
                    .collect(),
            })
            .collect(),
    }
    .encode_to_vec()
}

/// A record the endpoint names as failed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FailedRecord {
    #[serde(default)]
    pub topic: Option<String>,
    pub partition: i32,
    pub offset: i64,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub permanent: bool,
}

#[derive(Deserialize)]
struct JsonResult {
    #[serde(default)]
    failed: Vec<FailedRecord>,
}

/// A 2xx body that is empty or not a `{"failed": [...]}` document means "all succeeded".
pub fn decode_json_result(body: &[u8]) -> Vec<FailedRecord> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Vec::new();
    }
    serde_json::from_slice::<JsonResult>(body).map(|r| r.failed).unwrap_or_default()
}

pub fn decode_protobuf_result(body: &[u8]) -> Result<Vec<FailedRecord>, String> {
    let result = proto::BatchResult::decode(body).map_err(|e| format!("undecodable BatchResult: {e}"))?;
    Ok(result
        .failed
        .into_iter()
        .map(|f| FailedRecord {
            topic: (!f.topic.is_empty()).then_some(f.topic),
            partition: f.partition,
            offset: f.offset,
            error: (!f.error.is_empty()).then_some(f.error),
            permanent: f.permanent,
        })
        .collect())
}

/// Maps named failures to batch indices; names that match no record of the batch are ignored.
pub fn match_failed(records: &[Arc<Record>], failed: Vec<FailedRecord>) -> Vec<(usize, Failure)> {
    let mut out = Vec::new();
    for f in failed {
        let found = records.iter().position(|r| {
            r.partition == f.partition && r.offset == f.offset && f.topic.as_ref().is_none_or(|t| **t == *r.topic)
        });
        match found {
            Some(i) if !out.iter().any(|(j, _)| *j == i) => out.push((
                i,
                Failure::new(
                    FailureClass::Rejected { permanent: f.permanent },
                    f.error.unwrap_or_else(|| "named as failed by the processor".into()),
                ),
            )),
            Some(_) => {}
            None => {
                tracing::warn!(partition = f.partition, offset = f.offset, "processor named a record not in the batch")
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::test_record;

    #[test]
    fn json_carries_text_and_binary() {
        let mut r = test_record(7, Some("k"), "hello");
        r.value = Some(vec![0xff, 0x00]);
        r.headers = vec![("h".into(), Some(b"x".to_vec())), ("n".into(), None)];
        let body = encode_json("p", &[Arc::new(r)]).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["pipeline"], "p");
        assert_eq!(v["records"][0]["offset"], 7);
        assert_eq!(v["records"][0]["key"], "k");
        assert_eq!(v["records"][0]["valueBase64"], "/wA=");
        assert_eq!(v["records"][0]["headers"][0]["value"], "x");
        assert!(v["records"][0]["headers"][1].get("value").is_none());
    }

    #[test]
    fn failed_records_are_matched_by_partition_and_offset() {
        let recs: Vec<_> = (0..3).map(|o| Arc::new(test_record(o, None, "v"))).collect();
        let body = br#"{"failed":[{"partition":0,"offset":2,"error":"bad"},{"partition":0,"offset":99},{"topic":"other","partition":0,"offset":0},{"partition":0,"offset":1,"permanent":true}]}"#;
        let failed = match_failed(&recs, decode_json_result(body));
        assert_eq!(failed.len(), 2);
        assert_eq!(failed[0].0, 2);
        assert_eq!(failed[0].1.message, "bad");
        assert!(failed[0].1.class.is_retryable());
        assert_eq!(failed[1].0, 1);
        assert!(!failed[1].1.class.is_retryable());
    }

    #[test]
    fn non_json_or_empty_success_bodies_mean_all_done() {
        assert!(decode_json_result(b"").is_empty());
        assert!(decode_json_result(b"ok").is_empty());
        assert!(decode_json_result(b"{}").is_empty());
    }

    #[test]
    fn protobuf_round_trip() {
        let recs = vec![Arc::new(test_record(5, Some("k"), "v"))];
        let batch = proto::RecordBatch::decode(encode_protobuf("p", &recs).as_slice()).unwrap();
        assert_eq!(batch.records[0].offset, 5);
        assert_eq!(batch.records[0].key.as_deref(), Some(&b"k"[..]));
        let result = proto::BatchResult {
            failed: vec![proto::FailedRecord { partition: 0, offset: 5, permanent: true, ..Default::default() }],
        };
        let failed = match_failed(&recs, decode_protobuf_result(&result.encode_to_vec()).unwrap());
        assert_eq!(failed.len(), 1);
        assert!(decode_protobuf_result(&[0xff, 0xff, 0xff]).is_err());
    }
}
