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
//! other statuses go to the failure policy. A 429 or 503 with `Retry-After` (RFC 9110 §10.2.3) delays
//! the retry of those records at least as long as asked ([`crate::retry_after`]).
//!
//! CloudEvents (binary content mode, HTTP protocol binding 1.0): one request per record, attributes
//! in `ce-` headers whose values are percent-encoded as §3.1.3.2 requires (UTF-8, then space, `"`,
//! `%` and everything outside printable ASCII as `%XX`). The record key goes into the Kafka binding's
//! `partitionkey` extension (a String): a UTF-8 key as itself, any other key (e.g. Confluent
//! wire-format keys starting `00 00 00 01`) as standard base64, flagged by the extension
//! `kpipekeyencoding: base64`. Record headers in the Kafka protocol binding's form `ce_<name>` with a
//! UTF-8 value become the attribute or extension `<name>` ([`ce_header_attributes`]). Records are sent in the order `ordering` asks: `partition` one after
//! the other, `key` records of one key one after the other (keys in parallel), `unordered` all at once.
//! When a record fails, the later records it orders are not sent in that call (they fail as
//! `deferred`, not counted as attempts) so they can never overtake it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use futures::future::BoxFuture;
use kpipe_api::v1alpha1::{HttpFormat, HttpProcessor as HttpSpec, Ordering};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use prost::Message;
use serde::{Deserialize, Serialize};

use super::{BatchOutcome, Processor};
use crate::classify::{Failure, FailureClass, reqwest_failure};
use crate::proto;
use crate::record::Record;
use crate::retry_after;

/// What the CloudEvents HTTP binding (§3.1.3.2) requires to be percent-encoded in a header value
/// besides non-ASCII (which `utf8_percent_encode` always encodes): controls, space, `"` and `%`.
const CE_HEADER_VALUE: &AsciiSet = &CONTROLS.add(b' ').add(b'"').add(b'%');

/// A CloudEvents attribute value as an HTTP header value (§3.1.3.2).
pub fn ce_header_value(value: &str) -> String {
    utf8_percent_encode(value, CE_HEADER_VALUE).to_string()
}

/// Attributes kpipe sets itself on every CloudEvent (the record's coordinates, key and content
/// type); a record header cannot replace them.
const CE_OWN_ATTRIBUTES: &[&str] =
    &["specversion", "id", "source", "type", "subject", "time", "partitionkey", "kpipekeyencoding", "datacontenttype"];

/// The CloudEvents attributes a record carries in its own headers, as `(ce-<name>, encoded value)`
/// HTTP headers: a Kafka header `ce_<name>` (the CloudEvents Kafka protocol binding, §3.2.3) whose
/// name is a valid attribute name (1–20 lower-case letters or digits, CloudEvents core §3.1.1),
/// not one of [`CE_OWN_ATTRIBUTES`], and whose value is UTF-8, percent-encoded as any other value
/// (§3.1.3.2). Other headers are not mapped (a Kafka header name is not a CloudEvents attribute
/// name); the last of repeated headers wins.
pub fn ce_header_attributes(headers: &[(String, Option<Vec<u8>>)]) -> Vec<(String, String)> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in headers {
        let Some(attr) = name.strip_prefix("ce_") else { continue };
        let valid_name = (1..=20).contains(&attr.len())
            && attr.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            && !CE_OWN_ATTRIBUTES.contains(&attr);
        if let (true, Some(Ok(text))) = (valid_name, value.as_deref().map(std::str::from_utf8)) {
            out.insert(format!("ce-{attr}"), ce_header_value(text));
        }
    }
    out.into_iter().collect()
}

/// The `partitionkey` extension value of a record key and whether it is base64 (the key is not
/// UTF-8); see the module docs.
pub fn ce_partition_key(key: &[u8]) -> (String, bool) {
    match std::str::from_utf8(key) {
        Ok(text) => (ce_header_value(text), false),
        Err(_) => (base64::engine::general_purpose::STANDARD.encode(key), true),
    }
}

/// The wait a failed response asks for: its `Retry-After` on a 429 or 503, if valid.
fn retry_after_of(resp: &reqwest::Response) -> Option<Duration> {
    if !retry_after::applies_to(resp.status().as_u16()) {
        return None;
    }
    let value = resp.headers().get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    retry_after::parse(value, std::time::SystemTime::now())
}

/// Groups of batch indices to send one after the other (each group in order; groups in parallel),
/// as `ordering` requires: one group (`partition`), one per key with keyless records alone (`key`),
/// or one per record (`unordered`).
pub fn send_groups(records: &[Arc<Record>], ordering: Ordering) -> Vec<Vec<usize>> {
    match ordering {
        Ordering::Partition => vec![(0..records.len()).collect()],
        Ordering::Unordered => (0..records.len()).map(|i| vec![i]).collect(),
        Ordering::Key => {
            let mut groups: Vec<Vec<usize>> = Vec::new();
            let mut by_key: std::collections::HashMap<&[u8], usize> = std::collections::HashMap::new();
            for (i, r) in records.iter().enumerate() {
                match r.key.as_deref() {
                    None => groups.push(vec![i]),
                    Some(k) => match by_key.get(k) {
                        Some(&g) => groups[g].push(i),
                        None => {
                            by_key.insert(k, groups.len());
                            groups.push(vec![i]);
                        }
                    },
                }
            }
            groups
        }
    }
}

pub struct HttpProcessor {
    client: reqwest::Client,
    url: String,
    format: HttpFormat,
    headers: BTreeMap<String, String>,
    pipeline: String,
    source: String,
    ordering: Ordering,
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
            ordering: Ordering::Key,
        })
    }

    /// The pipeline's `ordering`, which CloudEvents mode (one request per record) keeps within a
    /// batch (default `key`).
    pub fn with_ordering(mut self, ordering: Ordering) -> Self {
        self.ordering = ordering;
        self
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
            Err(e) => return BatchOutcome::Failed(reqwest_failure(&e)),
        };
        let status = resp.status();
        let wait = retry_after_of(&resp);
        let bytes = match resp.bytes().await {
            Ok(b) => b,
            Err(e) => return BatchOutcome::Failed(reqwest_failure(&e)),
        };
        if !status.is_success() {
            let snippet = String::from_utf8_lossy(&bytes[..bytes.len().min(256)]).into_owned();
            return BatchOutcome::Failed(
                Failure::new(FailureClass::HttpStatus(status.as_u16()), format!("HTTP {status}: {snippet}"))
                    .with_retry_after(wait),
            );
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
        let ce = ce_header_value;
        let mut req = self
            .request()
            .header("ce-specversion", "1.0")
            .header("ce-id", ce(&format!("{}-{}-{}", record.topic, record.partition, record.offset)))
            .header("ce-source", ce(&self.source))
            .header("ce-type", "io.kpipe.record")
            .header("ce-subject", ce(&format!("{}/{}/{}", record.topic, record.partition, record.offset)));
        if let Some(ts) = record.timestamp_ms.and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok()) {
            req = req.header("ce-time", ce(&ts.to_string()));
        }
        if let Some(key) = &record.key {
            // The Kafka protocol binding's `partitionkey` extension.
            let (value, base64) = ce_partition_key(key);
            req = req.header("ce-partitionkey", value);
            if base64 {
                req = req.header("ce-kpipekeyencoding", "base64");
            }
        }
        for (name, value) in ce_header_attributes(&record.headers) {
            req = req.header(name, value);
        }
        // `datacontenttype` maps to Content-Type (§3.1.1); a value that is not a valid header value is
        // not a content type, so the default applies.
        let mut content_type = "application/octet-stream".to_owned();
        for (k, v) in &record.headers {
            if k.eq_ignore_ascii_case("content-type")
                && let Some(v) = v.as_ref().and_then(|v| std::str::from_utf8(v).ok())
                && reqwest::header::HeaderValue::from_str(v).is_ok()
            {
                content_type = v.to_owned();
            }
        }
        req = req.header("content-type", content_type);
        let resp = req.body(record.value.clone().unwrap_or_default()).send().await.map_err(|e| reqwest_failure(&e))?;
        let status = resp.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(Failure::new(FailureClass::HttpStatus(status.as_u16()), format!("HTTP {status}"))
                .with_retry_after(retry_after_of(&resp)))
        }
    }

    /// CloudEvents: one request per record, in the order `ordering` requires (see the module docs).
    async fn send_cloudevents(&self, records: &[Arc<Record>]) -> BatchOutcome {
        let groups = send_groups(records, self.ordering);
        let runs = groups.into_iter().map(|group| async move {
            let mut failed: Vec<(usize, Failure)> = Vec::new();
            let mut behind: Option<String> = None;
            for i in group {
                let Some(r) = records.get(i) else { continue };
                if let Some(why) = &behind {
                    failed.push((i, Failure::new(FailureClass::Deferred, why.clone())));
                    continue;
                }
                if let Err(f) = self.send_cloudevent(r).await {
                    behind = Some(format!("not sent: offset {} before it failed ({f})", r.offset));
                    failed.push((i, f));
                }
            }
            failed
        });
        let mut failed: Vec<(usize, Failure)> = futures::future::join_all(runs).await.into_iter().flatten().collect();
        failed.sort_by_key(|(i, _)| *i);
        BatchOutcome::Partial(failed)
    }
}

impl Processor for HttpProcessor {
    fn process<'a>(&'a self, records: &'a [Arc<Record>]) -> BoxFuture<'a, BatchOutcome> {
        Box::pin(async move {
            if self.format == HttpFormat::Cloudevents {
                self.send_cloudevents(records).await
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
    fn cloudevents_header_values_are_percent_encoded() {
        assert_eq!(ce_header_value("plain-ascii_1.0/x:y"), "plain-ascii_1.0/x:y");
        assert_eq!(ce_header_value("a b\"c%d"), "a%20b%22c%25d");
        assert_eq!(ce_header_value("käse €"), "k%C3%A4se%20%E2%82%AC");
        assert_eq!(ce_header_value("tab\tnl\n\u{7f}"), "tab%09nl%0A%7F");
        for v in ["käse", "a\u{1}b", "\"%\""] {
            assert!(reqwest::header::HeaderValue::from_str(&ce_header_value(v)).is_ok(), "{v:?}");
            let encoded = ce_header_value(v);
            let decoded = percent_encoding::percent_decode_str(&encoded).decode_utf8().unwrap();
            assert_eq!(decoded, v, "round trip");
        }
    }

    #[test]
    fn kafka_binding_headers_become_attributes() {
        let h = |k: &str, v: &[u8]| (k.to_string(), Some(v.to_vec()));
        let headers = vec![
            h("ce_region", "Zürich ☃".as_bytes()),
            h("ce_id", b"not-ours"),
            h("ce_Bad", b"x"),
            h("ce_waytoolongforanattributename", b"x"),
            h("ce_bin", &[0xff, 0xfe]),
            h("region", b"not a ce_ header"),
            ("ce_none".to_string(), None),
            h("ce_trace1", b"a"),
            h("ce_trace1", b"b"),
        ];
        assert_eq!(
            ce_header_attributes(&headers),
            vec![
                ("ce-region".to_string(), "Z%C3%BCrich%20%E2%98%83".to_string()),
                ("ce-trace1".to_string(), "b".to_string()),
            ]
        );
    }

    #[test]
    fn binary_keys_become_base64_partition_keys() {
        assert_eq!(ce_partition_key(b"order-1"), ("order-1".to_string(), false));
        assert_eq!(ce_partition_key("ü".as_bytes()), ("%C3%BC".to_string(), false));
        let (v, b64) = ce_partition_key(&[0, 0, 0, 1, 0xff]);
        assert!(b64);
        assert_eq!(base64::engine::general_purpose::STANDARD.decode(&v).unwrap(), vec![0, 0, 0, 1, 0xff]);
    }

    #[test]
    fn send_groups_follow_the_ordering() {
        let keys = [Some("a"), Some("b"), Some("a"), None, None, Some("b")];
        let recs: Vec<_> = keys.iter().enumerate().map(|(o, k)| Arc::new(test_record(o as i64, *k, "v"))).collect();
        assert_eq!(send_groups(&recs, Ordering::Key), vec![vec![0, 2], vec![1, 5], vec![3], vec![4]]);
        assert_eq!(send_groups(&recs, Ordering::Partition), vec![vec![0, 1, 2, 3, 4, 5]]);
        assert_eq!(send_groups(&recs, Ordering::Unordered).len(), 6);
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
