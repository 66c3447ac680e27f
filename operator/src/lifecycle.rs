//! Topic and offset lifecycle, seen from the operator: which partitions of a pipeline have a committed
//! offset outside the retained log (retention passed it, or the topic was recreated or truncated), and the
//! Warning Event that says so. The workers reset such partitions to the earliest retained record by the
//! same rule ([`kpipe_api::offsets::start_point`]), which is also what [`crate::lag::partition_lag`] counts.
//!
//! Pure: the controller passes the probe's offsets and raises the Event.

use kpipe_api::offsets::{PartitionPosition, ResetReason, StartPoint, start_point};
use kpipe_api::v1alpha1::StartOffset;

use crate::lag::PartitionOffsets;

/// Reason of the Warning Event raised while committed offsets are out of range.
pub const OFFSET_OUT_OF_RANGE: &str = "OffsetOutOfRange";

/// Partitions listed by name in one Event message; the rest are counted.
const MAX_LISTED: usize = 5;

/// The shared rule's view of one probed partition.
pub fn position(p: &PartitionOffsets) -> PartitionPosition {
    PartitionPosition { log_start: p.log_start, log_end: p.log_end, committed: p.committed }
}

/// One partition whose committed offset is out of range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutOfRange {
    pub topic: String,
    pub partition: i32,
    /// The group's committed offset.
    pub committed: i64,
    /// Where the workers start instead: the earliest retained record (the log start).
    pub reset_to: i64,
    pub reason: ResetReason,
}

/// The partitions of `offsets` whose committed offset is out of range, in input order. Independent of
/// `startOffset`: an out-of-range committed offset always resets to the earliest retained record.
pub fn out_of_range(offsets: &[PartitionOffsets]) -> Vec<OutOfRange> {
    offsets
        .iter()
        .filter_map(|p| match start_point(&position(p), StartOffset::Earliest, None) {
            StartPoint::Reset { offset, committed, reason } => {
                Some(OutOfRange { topic: p.topic.clone(), partition: p.partition, committed, reset_to: offset, reason })
            }
            _ => None,
        })
        .collect()
}

/// The message of the [`OFFSET_OUT_OF_RANGE`] Warning Event for `offsets`, `None` when every committed offset is
/// in range. Names up to five partitions (`topic/partition committed N: reason, reset to M`) and counts the rest.
pub fn out_of_range_message(offsets: &[PartitionOffsets]) -> Option<String> {
    let found = out_of_range(offsets);
    if found.is_empty() {
        return None;
    }
    let listed: Vec<String> = found
        .iter()
        .take(MAX_LISTED)
        .map(|o| {
            let why = match o.reason {
                ResetReason::BelowLogStart => "deleted by retention",
                ResetReason::AboveLogEnd => "beyond the log end (topic recreated or truncated)",
            };
            format!("{}/{} committed {}: {why}, reset to {}", o.topic, o.partition, o.committed, o.reset_to)
        })
        .collect();
    let more = found.len().saturating_sub(MAX_LISTED);
    let tail = if more > 0 { format!(" and {more} more") } else { String::new() };
    Some(format!(
        "committed offsets out of range; workers start at the earliest retained record: {}{tail}",
        listed.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lag::partition_lag;

    fn po(partition: i32, log_start: i64, log_end: i64, committed: Option<i64>) -> PartitionOffsets {
        PartitionOffsets { topic: "t".into(), partition, log_start, log_end, committed, ..Default::default() }
    }

    #[test]
    fn lists_exactly_the_out_of_range_partitions() {
        let offsets =
            [po(0, 500, 700, Some(200)), po(1, 0, 100, Some(50)), po(2, 0, 100, Some(1000)), po(3, 0, 9, None)];
        let found = out_of_range(&offsets);
        assert_eq!(
            found,
            vec![
                OutOfRange {
                    topic: "t".into(),
                    partition: 0,
                    committed: 200,
                    reset_to: 500,
                    reason: ResetReason::BelowLogStart
                },
                OutOfRange {
                    topic: "t".into(),
                    partition: 2,
                    committed: 1000,
                    reset_to: 0,
                    reason: ResetReason::AboveLogEnd
                },
            ]
        );
        let msg = out_of_range_message(&offsets).unwrap();
        assert!(msg.contains("t/0 committed 200: deleted by retention, reset to 500"), "{msg}");
        assert!(msg.contains("t/2 committed 1000: beyond the log end"), "{msg}");
        assert_eq!(out_of_range_message(&offsets[1..2]), None);
        let many: Vec<_> = (0..8).map(|p| po(p, 10, 20, Some(1))).collect();
        assert!(out_of_range_message(&many).unwrap().ends_with(" and 3 more"));
    }

    /// The operator's lag counts from where the worker starts: for every partition the lag is the distance from
    /// the shared rule's start point to the log end, and an out-of-range partition's lag is its retained records.
    #[test]
    fn lag_agrees_with_the_start_rule() {
        for log_start in 0..4 {
            for log_end in log_start..6 {
                for committed in (0..8).map(Some).chain([None]) {
                    for start in [StartOffset::Earliest, StartOffset::Latest] {
                        let p = po(0, log_start, log_end, committed);
                        let point = start_point(&position(&p), start, None);
                        assert_eq!(partition_lag(&p, start), log_end - point.offset(), "{p:?} {start:?}");
                        if !out_of_range(std::slice::from_ref(&p)).is_empty() {
                            assert_eq!(partition_lag(&p, start), log_end - log_start, "{p:?} resets to the log start");
                        }
                    }
                }
            }
        }
    }
}
