//! The one rule for where a consumer group starts reading a partition, shared by the worker (which
//! seeks there when it is assigned the partition) and the operator (whose lag is the distance from
//! there to the log end). Both call [`start_point`]; nothing else decides it.
//!
//! The rule (docs/api.md, "Offsets and topic lifecycle"):
//!
//! - A committed offset inside the retained log (`log_start ≤ committed ≤ log_end`) is where the
//!   group continues.
//! - A committed offset outside it — below the log start because retention deleted the records,
//!   or above the log end because the topic was deleted and recreated or its log truncated — is
//!   reset to the **earliest retained record** (`log_start`), whatever `startOffset` says: the
//!   records there were never processed by this group, and starting at the end would skip them.
//! - A partition the group never committed on starts at `log_start` under `earliest`; under
//!   `latest` at the first record produced at or after the pipeline started consuming (looked up
//!   by timestamp, see [`crate::worker_contract::WorkerConfig::started_at_ms`]), or at the log end
//!   when that lookup is not available.

use crate::v1alpha1::StartOffset;

/// Offsets of one partition as read from the cluster (ListOffsets + OffsetFetch). Offsets are
/// Kafka record offsets; `log_end` is the high watermark (the offset the next record gets).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionPosition {
    /// First retained offset (low watermark).
    pub log_start: i64,
    /// High watermark: one past the last record.
    pub log_end: i64,
    /// The group's committed offset, `None` when the group never committed on the partition.
    pub committed: Option<i64>,
}

/// Why a committed offset was not used as it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResetReason {
    /// Retention (or a delete-records call) removed the records at the committed offset.
    BelowLogStart,
    /// The committed offset is beyond the log end: the topic was deleted and recreated, or its log
    /// truncated (unclean leader election).
    AboveLogEnd,
}

impl ResetReason {
    /// The `reason` label of `kpipe_worker_offset_resets_total` and the word used in Events.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BelowLogStart => "below_log_start",
            Self::AboveLogEnd => "above_log_end",
        }
    }
}

/// Where the group starts on a partition and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartPoint {
    /// Continue at the committed offset.
    Committed(i64),
    /// The committed offset was out of range: start at the earliest retained record.
    Reset { offset: i64, committed: i64, reason: ResetReason },
    /// Never committed, `startOffset: earliest`: the log start.
    Earliest(i64),
    /// Never committed, `startOffset: latest`: the first record produced since the pipeline started.
    Since(i64),
    /// Never committed, `startOffset: latest` without a start-time lookup: the log end.
    LogEnd(i64),
}

impl StartPoint {
    /// The offset the first fetch reads.
    pub fn offset(self) -> i64 {
        match self {
            Self::Committed(o)
            | Self::Reset { offset: o, .. }
            | Self::Earliest(o)
            | Self::Since(o)
            | Self::LogEnd(o) => o,
        }
    }

    /// The reset, if the committed offset was out of range.
    pub fn reset(self) -> Option<ResetReason> {
        match self {
            Self::Reset { reason, .. } => Some(reason),
            _ => None,
        }
    }

    /// Records from here to the log end (never negative).
    pub fn lag(self, log_end: i64) -> i64 {
        (log_end - self.offset()).max(0)
    }
}

/// Where a consumer of `p` starts, by the rule in the module documentation.
///
/// `since` is, under `latest`, the offset of the first record whose timestamp is at or after the
/// pipeline's start (Kafka's offsets-for-times; the log end when no such record exists); `None`
/// when it was not looked up (the start then falls back to the log end). It is ignored under
/// `earliest` and whenever the group has a committed offset. Inputs from a broker that are
/// inconsistent (a log start above the log end, negative offsets) are clamped, never trusted to
/// produce an offset outside `[log_start, log_end]` except a committed offset inside it.
pub fn start_point(p: &PartitionPosition, start: StartOffset, since: Option<i64>) -> StartPoint {
    let log_end = p.log_end.max(0);
    let log_start = p.log_start.clamp(0, log_end);
    match p.committed {
        Some(c) if c < log_start => {
            StartPoint::Reset { offset: log_start, committed: c, reason: ResetReason::BelowLogStart }
        }
        Some(c) if c > log_end => {
            StartPoint::Reset { offset: log_start, committed: c, reason: ResetReason::AboveLogEnd }
        }
        Some(c) => StartPoint::Committed(c),
        None => match (start, since) {
            (StartOffset::Earliest, _) => StartPoint::Earliest(log_start),
            (StartOffset::Latest, Some(o)) => StartPoint::Since(o.clamp(log_start, log_end)),
            (StartOffset::Latest, None) => StartPoint::LogEnd(log_end),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(log_start: i64, log_end: i64, committed: Option<i64>) -> PartitionPosition {
        PartitionPosition { log_start, log_end, committed }
    }

    #[test]
    fn the_rule_table() {
        use StartOffset::*;
        let reset = |offset, committed, reason| StartPoint::Reset { offset, committed, reason };
        let cases = [
            ("committed inside", pos(0, 100, Some(40)), Latest, None, StartPoint::Committed(40)),
            ("committed at the log end", pos(0, 100, Some(100)), Earliest, None, StartPoint::Committed(100)),
            ("committed at the log start", pos(50, 100, Some(50)), Latest, None, StartPoint::Committed(50)),
            // Issue 13, item 3: under latest the reset goes to the earliest retained record, not the end.
            (
                "trimmed by retention, latest",
                pos(500, 700, Some(200)),
                Latest,
                Some(700),
                reset(500, 200, ResetReason::BelowLogStart),
            ),
            (
                "trimmed by retention, earliest",
                pos(500, 700, Some(200)),
                Earliest,
                None,
                reset(500, 200, ResetReason::BelowLogStart),
            ),
            // Issue 13, item 1: topic recreated with 100 records, the group had 1000.
            ("recreated topic", pos(0, 100, Some(1000)), Latest, Some(100), reset(0, 1000, ResetReason::AboveLogEnd)),
            (
                "recreated, retention since",
                pos(30, 100, Some(1000)),
                Earliest,
                None,
                reset(30, 1000, ResetReason::AboveLogEnd),
            ),
            ("never committed, earliest", pos(10, 100, None), Earliest, Some(90), StartPoint::Earliest(10)),
            ("never committed, latest since start", pos(0, 100, None), Latest, Some(90), StartPoint::Since(90)),
            // Issue 13, item 2: a partition added after the start is read from its beginning.
            ("new partition, latest", pos(0, 25, None), Latest, Some(0), StartPoint::Since(0)),
            ("latest, nothing since start", pos(0, 100, None), Latest, Some(100), StartPoint::Since(100)),
            ("latest, lookup below retention", pos(40, 100, None), Latest, Some(5), StartPoint::Since(40)),
            ("latest without lookup", pos(0, 100, None), Latest, None, StartPoint::LogEnd(100)),
            ("empty partition", pos(0, 0, None), Earliest, None, StartPoint::Earliest(0)),
            ("broken watermarks", pos(120, 100, Some(110)), Earliest, None, reset(100, 110, ResetReason::AboveLogEnd)),
        ];
        for (name, p, start, since, want) in cases {
            assert_eq!(start_point(&p, start, since), want, "{name}");
        }
    }

    #[test]
    fn lag_counts_from_the_start_point() {
        let p = pos(500, 700, Some(200));
        assert_eq!(start_point(&p, StartOffset::Latest, None).lag(p.log_end), 200, "retention: counts from log start");
        let p = pos(0, 100, Some(1000));
        assert_eq!(start_point(&p, StartOffset::Earliest, None).lag(p.log_end), 100, "recreated: the new records");
        assert_eq!(ResetReason::AboveLogEnd.as_str(), "above_log_end");
        assert_eq!(ResetReason::BelowLogStart.as_str(), "below_log_start");
    }

    #[test]
    fn start_is_always_inside_the_log_or_a_valid_commit() {
        // Exhaustive over a small grid instead of a property test (no proptest in this crate).
        for log_start in -1..6 {
            for log_end in -1..6 {
                for committed in (-2..8).map(Some).chain([None]) {
                    for since in (-2..8).map(Some).chain([None]) {
                        for start in [StartOffset::Earliest, StartOffset::Latest] {
                            let p = pos(log_start, log_end, committed);
                            let s = start_point(&p, start, since);
                            let (lo, hi) = (log_start.clamp(0, log_end.max(0)), log_end.max(0));
                            assert!((lo..=hi).contains(&s.offset()), "{p:?} {start:?} {since:?} -> {s:?}");
                            assert_eq!(s.reset().is_some(), committed.is_some_and(|c| c < lo || c > hi));
                            assert!(s.lag(log_end) >= 0);
                        }
                    }
                }
            }
        }
    }
}
