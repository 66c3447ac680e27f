//! The contract between the operator and a replay worker (`kpipe-worker` with `KPIPE_REPLAY_PLAN`), and the pure
//! rules of a dead-letter replay: which dead letters a replay selects, how the original record is restored from a
//! dead letter, and the progress a replay worker commits with its offsets.
//!
//! Progress lives in the replay consumer group's commit metadata, per dead-letter partition, committed together
//! with the offset it describes: a replay killed at any point resumes from the last commit with the counts of
//! exactly the records below it (records processed after that commit are processed again — at least once — but
//! counted once).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Env var carrying the [`ReplayPlan`] as JSON; its presence switches `kpipe-worker` into replay mode.
pub const ENV_REPLAY_PLAN: &str = "KPIPE_REPLAY_PLAN";

/// Header added to every replayed record handed to the processor: `<namespace>/<replay name>`.
pub const REPLAY_HEADER: &str = "kpipe.replay";
/// Prefix of the context headers a parked record gets on top of the dead letter's own.
pub const REPLAY_CONTEXT_PREFIX: &str = "kpipe.replay.";

/// The dead-letter context headers a worker adds ([`crate::worker_contract`]'s dead-letter writer); stripped to
/// restore the original record.
pub const CONTEXT_HEADERS: &[&str] = &[
    "kpipe.original.topic",
    "kpipe.original.partition",
    "kpipe.original.offset",
    "kpipe.original.timestamp",
    "kpipe.error.class",
    "kpipe.error.message",
    "kpipe.attempts",
    "kpipe.pipeline",
    "kpipe.payload.truncated",
    "kpipe.payload.omitted",
    "kpipe.payload.bytes",
];

/// What a replay worker does.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ReplayPlan {
    /// `<namespace>/<name>` of the DeadLetterReplay (the value of [`REPLAY_HEADER`]).
    pub replay: String,
    /// The dead-letter topic to read.
    pub dead_letter_topic: String,
    /// Where records that fail again go.
    pub parking_topic: String,
    /// The replay's consumer group (progress).
    pub group_id: String,
    /// Partition → offset to stop at (exclusive): the topic's end when the replay started.
    pub end_offsets: BTreeMap<i32, i64>,
    /// Which records of the topic are replayed.
    pub selection: Selection,
}

/// The resolved selection of a replay (times in Unix milliseconds).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Selection {
    /// `metadata.name` of the pipeline: only dead letters whose `kpipe.pipeline` header names it.
    pub pipeline: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_offset: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_offset: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub error_classes: Vec<String>,
}

/// A header as read from Kafka.
pub type Header = (String, Option<Vec<u8>>);

/// The truncation headers a reduced dead letter carries, in the order the writer puts them before its context headers.
const TRUNCATION_HEADERS: [&str; 3] = ["kpipe.payload.truncated", "kpipe.payload.omitted", "kpipe.payload.bytes"];

/// Splits a dead letter's headers into the original record's and the writer's context block (and whatever follows
/// it: a parked record's replay headers). The writer appends its block after the original headers: the truncation
/// headers of a reduced record, then the context headers in name order, which always start with `kpipe.attempts`. So
/// the block starts at the last `kpipe.attempts` (three headers earlier when the truncation headers precede it), and
/// headers of the same names before it are the original record's own: a pipeline that consumes another pipeline's
/// dead letters and dead-letters one again writes a second block after the first. `None` when the headers hold no
/// such block (no `kpipe.attempts`, or none followed by `kpipe.original.topic`).
fn split_context(headers: &[Header]) -> Option<(&[Header], &[Header])> {
    let attempts = headers.iter().rposition(|(k, _)| k == "kpipe.attempts")?;
    let start = attempts
        .checked_sub(TRUNCATION_HEADERS.len())
        .filter(|&s| headers[s..attempts].iter().map(|(k, _)| k.as_str()).eq(TRUNCATION_HEADERS))
        .unwrap_or(attempts);
    let (original, context) = headers.split_at(start);
    // A block without the original's coordinates is not the writer's.
    context.iter().any(|(k, _)| k == "kpipe.original.topic").then_some((original, context))
}

/// The headers of a dead letter that describe it: the writer's context block when there is one (see
/// [`split_context`]), else all of them. The replay selects by these, and the operator counts by these, so both read
/// the same `kpipe.pipeline` and `kpipe.error.class`.
pub fn context_headers(headers: &[Header]) -> &[Header] {
    split_context(headers).map_or(headers, |(_, context)| context)
}

/// The value of the first header named `key`, if it has one.
pub fn header<'a>(headers: &'a [Header], key: &str) -> Option<&'a [u8]> {
    headers.iter().find(|(k, _)| k == key).and_then(|(_, v)| v.as_deref())
}

fn header_str(headers: &[Header], key: &str) -> Option<String> {
    header(headers, key).map(|v| String::from_utf8_lossy(v).into_owned())
}

impl Selection {
    /// Whether the dead letter at `offset` with Kafka timestamp `timestamp_ms` and `headers` is replayed.
    pub fn selects(&self, offset: i64, timestamp_ms: Option<i64>, headers: &[Header]) -> bool {
        let headers = context_headers(headers);
        if header(headers, "kpipe.pipeline") != Some(self.pipeline.as_bytes()) {
            return false;
        }
        if self.from_offset.is_some_and(|f| offset < f) || self.to_offset.is_some_and(|t| offset >= t) {
            return false;
        }
        if let Some(ts) = timestamp_ms {
            if self.since_ms.is_some_and(|s| ts < s) || self.until_ms.is_some_and(|u| ts >= u) {
                return false;
            }
        } else if self.since_ms.is_some() || self.until_ms.is_some() {
            return false;
        }
        if !self.error_classes.is_empty() {
            let class = header_str(headers, "kpipe.error.class").unwrap_or_default();
            return self.error_classes.contains(&class);
        }
        true
    }
}

/// The original record a dead letter was made from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Original {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    /// The original headers, in order (the dead letter's context headers removed).
    pub headers: Vec<Header>,
    /// Whether the dead letter is a reference record (its value, maybe headers and key, were left out).
    pub truncated: bool,
}

/// Restores the original record's coordinates and headers from a dead letter's headers (see `split_context`: the
/// original's own headers are kept whatever their names, `kpipe.*` ones included). `None` when the context headers
/// are missing (not a kpipe dead letter).
pub fn restore(headers: &[Header]) -> Option<Original> {
    let (original, context) = match split_context(headers) {
        Some((original, context)) => (original.to_vec(), context),
        // Not in the writer's layout: every header of a context name is context, the rest the original's.
        None => (headers.iter().filter(|(k, _)| !CONTEXT_HEADERS.contains(&k.as_str())).cloned().collect(), headers),
    };
    let num = |k: &str| header_str(context, k).and_then(|v| v.parse::<i64>().ok());
    Some(Original {
        topic: header_str(context, "kpipe.original.topic")?,
        partition: i32::try_from(num("kpipe.original.partition")?).ok()?,
        offset: num("kpipe.original.offset")?,
        timestamp_ms: num("kpipe.original.timestamp"),
        headers: original,
        truncated: header(context, "kpipe.payload.truncated") == Some(b"true"),
    })
}

/// Counts a replay worker commits per dead-letter partition (cumulative up to the committed offset).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    pub replayed: i64,
    pub succeeded: i64,
    pub failed_again: i64,
    pub skipped: i64,
}

impl Progress {
    /// Sum of two partitions' progress.
    pub fn plus(self, o: Progress) -> Progress {
        Progress {
            replayed: self.replayed + o.replayed,
            succeeded: self.succeeded + o.succeeded,
            failed_again: self.failed_again + o.failed_again,
            skipped: self.skipped + o.skipped,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct ProgressDocument {
    kpipe: u32,
    replay: Progress,
}

/// The commit metadata for a partition's progress (`{"kpipe":1,"replay":{...}}`, ~80 bytes).
pub fn encode_progress(p: &Progress) -> String {
    serde_json::to_string(&ProgressDocument { kpipe: 1, replay: *p }).unwrap_or_default()
}

/// The progress in a commit's metadata; `None` for empty or foreign metadata.
pub fn decode_progress(metadata: &str) -> Option<Progress> {
    serde_json::from_str::<ProgressDocument>(metadata).ok().filter(|d| d.kpipe >= 1).map(|d| d.replay)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(k: &str, v: &str) -> Header {
        (k.to_string(), Some(v.as_bytes().to_vec()))
    }

    /// The writer's layout: the original record's headers, then the context headers in name order.
    fn dead_letter() -> Vec<Header> {
        vec![
            h("trace-id", "abc"),
            ("empty".to_string(), None),
            h("content-type", "application/json"),
            h("kpipe.attempts", "8"),
            h("kpipe.error.class", "http_503"),
            h("kpipe.error.message", "unavailable"),
            h("kpipe.original.offset", "41"),
            h("kpipe.original.partition", "3"),
            h("kpipe.original.timestamp", "1700000000000"),
            h("kpipe.original.topic", "orders"),
            h("kpipe.pipeline", "orders"),
        ]
    }

    #[test]
    fn restores_coordinates_and_the_original_headers_in_order() {
        let o = restore(&dead_letter()).unwrap();
        assert_eq!(
            (o.topic.as_str(), o.partition, o.offset, o.timestamp_ms),
            ("orders", 3, 41, Some(1_700_000_000_000))
        );
        assert_eq!(
            o.headers,
            vec![h("trace-id", "abc"), ("empty".to_string(), None), h("content-type", "application/json")]
        );
        assert!(!o.truncated);
        // A reduced dead letter: the truncation headers come right before the context headers.
        let mut r = dead_letter();
        let truncation =
            [h("kpipe.payload.truncated", "true"), h("kpipe.payload.omitted", "value"), h("kpipe.payload.bytes", "9")];
        r.splice(3..3, truncation);
        let o = restore(&r).unwrap();
        assert!(o.truncated);
        assert_eq!(o.headers.len(), 3, "{:?}", o.headers);
        assert_eq!(restore(&[h("x", "y")]), None, "not a dead letter");
        // Headers in another order (not the writer's): recognised by name.
        let mut shuffled = dead_letter();
        shuffled.rotate_left(4);
        let o = restore(&shuffled).unwrap();
        assert_eq!((o.topic.as_str(), o.offset), ("orders", 41));
        assert!(o.headers.iter().all(|(k, _)| !k.starts_with("kpipe.")), "{:?}", o.headers);
    }

    #[test]
    fn a_dead_letter_of_a_dead_letter_keeps_the_original_context_headers_as_headers() {
        // A pipeline "audit" reads "orders"' dead-letter topic and dead-letters one of those records again: its
        // writer appends a second context block after the first one, which is now part of the original record.
        let first = dead_letter();
        let mut second = first.clone();
        second.extend([
            h("kpipe.attempts", "1"),
            h("kpipe.error.class", "http_400"),
            h("kpipe.error.message", "bad"),
            h("kpipe.original.offset", "7"),
            h("kpipe.original.partition", "0"),
            h("kpipe.original.timestamp", "1700000000500"),
            h("kpipe.original.topic", "orders-dlq"),
            h("kpipe.pipeline", "audit"),
        ]);
        let o = restore(&second).unwrap();
        assert_eq!((o.topic.as_str(), o.partition, o.offset), ("orders-dlq", 0, 7));
        assert_eq!(o.headers, first, "the original record (a dead letter itself) keeps all its headers, in order");
        let audit = Selection { pipeline: "audit".into(), ..Default::default() };
        assert!(audit.selects(0, None, &second));
        assert!(!Selection { pipeline: "orders".into(), ..Default::default() }.selects(0, None, &second));
        let class = Selection { error_classes: vec!["http_400".into()], ..audit };
        assert!(class.selects(0, None, &second), "the class of the last failure");
        // A parked record (the dead letter plus the replay's headers) restores the same original.
        let mut parked = second.clone();
        parked.extend([h("kpipe.replay", "ns/r1"), h("kpipe.replay.error.class", "timeout")]);
        assert_eq!(restore(&parked).unwrap().headers, first);
    }

    #[test]
    fn selection_by_pipeline_range_time_and_class() {
        let all = Selection { pipeline: "orders".into(), ..Default::default() };
        assert!(all.selects(5, Some(10), &dead_letter()));
        let other = Selection { pipeline: "billing".into(), ..Default::default() };
        assert!(!other.selects(5, Some(10), &dead_letter()));
        let range = Selection { from_offset: Some(5), to_offset: Some(8), ..all.clone() };
        assert!(!range.selects(4, None, &dead_letter()) && range.selects(5, None, &dead_letter()));
        assert!(range.selects(7, None, &dead_letter()) && !range.selects(8, None, &dead_letter()));
        let time = Selection { since_ms: Some(100), until_ms: Some(200), ..all.clone() };
        assert!(!time.selects(0, Some(99), &dead_letter()) && time.selects(0, Some(100), &dead_letter()));
        assert!(!time.selects(0, Some(200), &dead_letter()) && !time.selects(0, None, &dead_letter()));
        let class = Selection { error_classes: vec!["timeout".into(), "http_503".into()], ..all.clone() };
        assert!(class.selects(0, None, &dead_letter()));
        let class = Selection { error_classes: vec!["timeout".into()], ..all };
        assert!(!class.selects(0, None, &dead_letter()));
    }

    #[test]
    fn progress_round_trips_through_commit_metadata() {
        let p = Progress { replayed: 10, succeeded: 9, failed_again: 1, skipped: 3 };
        let text = encode_progress(&p);
        assert!(text.len() < 200, "{text}");
        assert_eq!(decode_progress(&text), Some(p));
        assert_eq!(decode_progress(""), None);
        assert_eq!(decode_progress("{\"kpipe\":1,\"retrying\":{}}"), None);
        assert_eq!(p.plus(p).replayed, 20);
    }
}
