//! What a worker tells the operator through the consumer group's commit metadata.
//!
//! A Kafka offset commit carries a free-form metadata string per partition (OffsetCommit's
//! `committed_metadata`, returned by OffsetFetch; the broker caps it at `offset.metadata.max.bytes`,
//! 4096 bytes by default). kpipe workers put a small JSON document there when the record at the
//! partition's commit point is being retried, and re-commit the same offset with a fresh `at` on
//! every commit interval while it is. The operator reads it with the committed offsets it already
//! fetches for the lag, so it can tell a partition that a live worker is retrying from one that is
//! stuck, without a network path to every pod (pods may be unreachable from the operator, and the
//! report survives a pod restart). An empty or foreign metadata string means "no report".
//!
//! Document (version 1, ~100 bytes):
//! `{"kpipe":1,"retrying":{"offset":41,"attempts":3,"sinceMs":1732890000000,"atMs":1732890005000,"blocked":false}}`
//!
//! Optional fields (absent = false; older readers ignore them, older writers never set them):
//! `circuitOpen` (the worker's processor circuit breaker is open: the processor is unavailable and the
//! partition waits for it, spending no attempts) and `deadLetterFailing` (the record at the commit
//! point exhausted its attempts and its dead-letter write keeps failing).

use serde::{Deserialize, Serialize};

/// Version of the document written by this build.
pub const VERSION: u32 = 1;

/// The retry state of the record at a partition's commit point.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RetryReport {
    /// Offset of the record being retried (the committed offset when the report is current).
    pub offset: i64,
    /// Failed attempts so far.
    pub attempts: u32,
    /// When the record first failed, Unix milliseconds (worker clock).
    pub since_ms: u64,
    /// When this report was written, Unix milliseconds (worker clock). Reports older than the
    /// reader's freshness bound describe a worker that is gone.
    pub at_ms: u64,
    /// The record exhausted its attempts under `onFailure: block` (or a dead-letter write keeps
    /// failing) and is retried at the maximum backoff until it succeeds.
    #[serde(default)]
    pub blocked: bool,
    /// The worker's processor circuit breaker is open (the processor is unavailable): the partition
    /// waits for it to recover without spending attempts. More pods cannot help.
    #[serde(default, skip_serializing_if = "is_false")]
    pub circuit_open: bool,
    /// The record's dead-letter write failed several times in a row and is being retried.
    #[serde(default, skip_serializing_if = "is_false")]
    pub dead_letter_failing: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Serialize, Deserialize)]
struct Document {
    kpipe: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retrying: Option<RetryReport>,
}

/// The metadata string for a commit: the report as JSON, or empty when there is none.
pub fn encode(report: Option<&RetryReport>) -> String {
    match report {
        None => String::new(),
        Some(r) => serde_json::to_string(&Document { kpipe: VERSION, retrying: Some(*r) }).unwrap_or_default(),
    }
}

/// The retry report in a commit's metadata; `None` for empty, foreign or unreadable metadata
/// (never an error: metadata is advisory and other tools may have committed for the group).
pub fn decode(metadata: &str) -> Option<RetryReport> {
    if !metadata.starts_with('{') {
        return None;
    }
    serde_json::from_str::<Document>(metadata).ok().filter(|d| d.kpipe >= 1).and_then(|d| d.retrying)
}

impl RetryReport {
    /// Whether the report describes a retry that is still going on at `now_ms` (reader clock):
    /// written at most `fresh_for_ms` ago (a generous bound also absorbs clock skew between nodes)
    /// and about the record at `committed` (a commit that moved on ended the retry).
    pub fn is_current(&self, committed: Option<i64>, now_ms: u64, fresh_for_ms: u64) -> bool {
        committed == Some(self.offset) && now_ms.saturating_sub(self.at_ms) <= fresh_for_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> RetryReport {
        RetryReport {
            offset: 41,
            attempts: 3,
            since_ms: 1_000,
            at_ms: 6_000,
            blocked: false,
            circuit_open: false,
            dead_letter_failing: false,
        }
    }

    #[test]
    fn optional_flags_are_backwards_compatible() {
        let old = r#"{"kpipe":1,"retrying":{"offset":41,"attempts":3,"sinceMs":1000,"atMs":6000,"blocked":false}}"#;
        assert_eq!(decode(old), Some(report()), "a report from an older worker");
        assert_eq!(encode(Some(&report())), old, "flags that are false are not written");
        let r = RetryReport { circuit_open: true, dead_letter_failing: true, ..report() };
        let text = encode(Some(&r));
        assert!(text.contains("\"circuitOpen\":true") && text.contains("\"deadLetterFailing\":true"), "{text}");
        assert_eq!(decode(&text), Some(r));
    }

    #[test]
    fn round_trip_and_size() {
        let text = encode(Some(&report()));
        assert!(text.len() < 200, "well under offset.metadata.max.bytes: {text}");
        assert_eq!(decode(&text), Some(report()));
        assert_eq!(encode(None), "");
    }

    #[test]
    fn foreign_or_broken_metadata_is_no_report() {
        for m in ["", "hello", "{}", "{\"kpipe\":1}", "{\"kpipe\":1,\"retrying\":{\"offset\":\"x\"}}", "{not json"] {
            assert_eq!(decode(m), None, "{m:?}");
        }
    }

    #[test]
    fn current_only_when_fresh_and_at_the_commit_point() {
        let r = report();
        assert!(r.is_current(Some(41), 10_000, 60_000));
        assert!(!r.is_current(Some(42), 10_000, 60_000), "the commit moved on");
        assert!(!r.is_current(None, 10_000, 60_000));
        assert!(!r.is_current(Some(41), 6_000 + 60_001, 60_000), "the worker stopped reporting");
        assert!(r.is_current(Some(41), 5_000, 60_000), "a reader clock behind the writer's is fine");
    }
}
