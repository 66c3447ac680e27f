//! Where partitions start and how far commits may go: the start offsets of newly assigned partitions (the shared
//! `start_point` rule), and the log-end check that keeps commits inside a log that may have shrunk (topic recreated,
//! log truncated).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kpipe_api::commit_metadata;
use kpipe_api::offsets::{PartitionPosition, StartPoint, start_point};
use kpipe_api::v1alpha1::StartOffset;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Offset, TopicPartitionList};

use super::dispatch::Dispatch;
use super::{TopicPartition, partitions_of};

pub(super) const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a partition the group never committed on starts (the pipeline's `startOffset` and start time).
#[derive(Debug, Clone, Copy)]
pub struct StartPolicy {
    pub start_offset: StartOffset,
    /// When the pipeline started consuming, ms since the Unix epoch (`WorkerConfig::started_at_ms`).
    pub started_at_ms: Option<i64>,
}

/// Why the start offsets of newly assigned partitions could not be looked up.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("cannot read the committed offsets: {0}")]
    Committed(KafkaError),
    #[error("cannot list offsets ({what}): {source}")]
    ListOffsets { what: &'static str, source: KafkaError },
    #[error("no {what} offset for {topic} [{partition}]")]
    Missing { what: &'static str, topic: String, partition: i32 },
}

/// A list of `parts`, each at `offset`.
pub(super) fn list_at(parts: &[TopicPartition], offset: Offset) -> Result<TopicPartitionList, KafkaError> {
    let mut tpl = TopicPartitionList::with_capacity(parts.len());
    for (topic, partition) in parts {
        tpl.add_partition_offset(topic, *partition, offset)?;
    }
    Ok(tpl)
}

/// ListOffsets for `parts` at `spec` (a timestamp, or `Beginning`/`End` for the watermarks), in one batched
/// request. Per partition: the offset, `None` when no record matches (a timestamp after the last record).
pub(super) fn list_offsets<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    parts: &[TopicPartition],
    spec: Offset,
    what: &'static str,
) -> Result<HashMap<TopicPartition, Option<i64>>, LookupError> {
    let request = list_at(parts, spec).map_err(|source| LookupError::ListOffsets { what, source })?;
    let result = consumer
        .offsets_for_times(request, LOOKUP_TIMEOUT)
        .map_err(|source| LookupError::ListOffsets { what, source })?;
    let mut out = HashMap::with_capacity(parts.len());
    for e in result.elements() {
        e.error().map_err(|source| LookupError::ListOffsets { what, source })?;
        let offset = match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        };
        out.insert((Arc::<str>::from(e.topic()), e.partition()), offset);
    }
    Ok(out)
}

/// What [`lookup_starts`] found: each partition's position and start-time offset, and the retry reports in the
/// committed offsets' metadata.
pub(super) type StartLookup =
    (Vec<(TopicPartition, PartitionPosition, Option<i64>)>, Vec<(TopicPartition, commit_metadata::RetryReport)>);

/// Reads what [`start_point`] needs for `parts`: watermarks, the group's committed offsets and, under `latest`
/// for never-committed partitions, the first offset at or after the pipeline's start time.
/// Also returns the retry reports found in the committed offsets' metadata (attempt budgets of records a previous
/// owner was retrying, issue 19 Deliver 5).
pub(super) fn lookup_starts<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    parts: &[TopicPartition],
    policy: StartPolicy,
) -> Result<StartLookup, LookupError> {
    let request = list_at(parts, Offset::Invalid).map_err(LookupError::Committed)?;
    let committed = consumer.committed_offsets(request, LOOKUP_TIMEOUT).map_err(LookupError::Committed)?;
    let starts = list_offsets(consumer, parts, Offset::Beginning, "log start")?;
    let ends = list_offsets(consumer, parts, Offset::End, "log end")?;
    let mut out = Vec::with_capacity(parts.len());
    let mut inherited = Vec::new();
    for tp in parts {
        let missing = |what| LookupError::Missing { what, topic: tp.0.to_string(), partition: tp.1 };
        let log_end = ends.get(tp).copied().flatten().ok_or_else(|| missing("log end"))?;
        let log_start = starts.get(tp).copied().flatten().ok_or_else(|| missing("log start"))?;
        let entry = committed.find_partition(&tp.0, tp.1);
        let committed = match entry.as_ref().map(|e| e.offset()) {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        };
        // --- failure handling hook (issue 19): the previous owner's retry report at the commit point.
        if let Some(r) = entry.as_ref().and_then(|e| commit_metadata::decode(e.metadata()))
            && committed == Some(r.offset)
        {
            inherited.push((tp.clone(), r));
        }
        out.push((tp.clone(), PartitionPosition { log_start, log_end, committed }, None));
    }
    if let (StartOffset::Latest, Some(started)) = (policy.start_offset, policy.started_at_ms) {
        let fresh: Vec<TopicPartition> =
            out.iter().filter(|(_, p, _)| p.committed.is_none()).map(|(tp, _, _)| tp.clone()).collect();
        if !fresh.is_empty() {
            let since = list_offsets(consumer, &fresh, Offset::Offset(started), "start time")?;
            for (tp, p, s) in &mut out {
                if p.committed.is_none() {
                    // No record at or after the start time: everything from the log end on.
                    *s = Some(since.get(tp).copied().flatten().unwrap_or(p.log_end));
                }
            }
        }
    }
    Ok((out, inherited))
}

/// The log end of each of `parts` (one batched ListOffsets); an error per partition (e.g. the topic is gone).
pub(super) fn log_ends<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    parts: &[TopicPartition],
) -> Result<HashMap<TopicPartition, Result<i64, KafkaError>>, KafkaError> {
    let request = list_at(parts, Offset::End)?;
    let result = consumer.offsets_for_times(request, LOOKUP_TIMEOUT)?;
    let mut out = HashMap::with_capacity(parts.len());
    for e in result.elements() {
        let end = e.error().and_then(|()| match e.offset() {
            Offset::Offset(o) => Ok(o),
            _ => Err(KafkaError::OffsetFetch(RDKafkaErrorCode::InvalidArgument)),
        });
        out.insert((Arc::<str>::from(e.topic()), e.partition()), end);
    }
    Ok(out)
}

/// The topic and partition named by librdkafka's offset-reset log line
/// (`"[thrd:main]: <topic> [<partition>]: offset reset (at offset 200 ..., broker 1) to offset BEGINNING ...: Offset
/// out of range"`, the thread prefix optional); `None` for any other line. Topic names have no spaces.
pub(super) fn parse_offset_reset_log(message: &str) -> Option<(String, i32)> {
    let (head, _) = message.split_once("]: offset reset (at ")?;
    let (before, partition) = head.rsplit_once(" [")?;
    let topic = before.rsplit(' ').next().filter(|t| !t.is_empty())?;
    Some((topic.to_owned(), partition.parse().ok()?))
}

/// Whether a commit or lookup error means the partition's topic no longer exists.
pub(super) fn topic_gone(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::UnknownTopicId
        )
    )
}

impl Dispatch {
    /// librdkafka reset a partition whose fetch position was out of range (to the earliest retained record, as
    /// `auto.offset.reset` says): counted, and the partition's commits are checked against its log end until one
    /// passes.
    pub(super) fn offset_reset_seen(&self, topic: &str, partition: i32) {
        self.metrics.offset_resets.with_label_values(&["out_of_range"]).inc();
        self.suspects().insert((Arc::from(topic), partition));
    }

    /// Sets the start offset of each newly assigned partition in `tpl` by the shared rule
    /// ([`kpipe_api::offsets::start_point`]): out-of-range committed offsets reset to the earliest retained record
    /// (counted and logged), never-committed partitions start where `startOffset` says. When the lookups fail the
    /// offsets stay unset and librdkafka resolves them: the committed offset, else `auto.offset.reset` (earliest).
    pub(super) fn resolve_starts<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>, tpl: &mut TopicPartitionList) {
        let parts = partitions_of(tpl);
        if parts.is_empty() {
            return;
        }
        let (looked_up, inherited) = match lookup_starts(consumer, &parts, self.start) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(partitions = ?parts, "{e}; librdkafka resolves the start offsets (the committed offset, \
                    else the earliest retained record)");
                return;
            }
        };
        // --- failure handling hook (issue 19): attempt budgets survive rescheduling.
        for (tp, report) in inherited {
            self.health.inherit(&tp.0, tp.1, &report);
        }
        for (tp, position, since) in looked_up {
            let point = start_point(&position, self.start.start_offset, since);
            if let StartPoint::Reset { offset, committed, reason } = point {
                self.metrics.offset_resets.with_label_values(&[reason.as_str()]).inc();
                tracing::warn!(topic = %tp.0, partition = tp.1, committed, reset_to = offset, reason = reason.as_str(),
                    log_start = position.log_start, log_end = position.log_end,
                    "committed offset out of range: starting at the earliest retained record");
            } else {
                tracing::info!(topic = %tp.0, partition = tp.1, offset = point.offset(), start = ?point,
                    log_start = position.log_start, log_end = position.log_end, "start position");
            }
            if let Err(e) = tpl.set_partition_offset(&tp.0, tp.1, Offset::Offset(point.offset())) {
                tracing::warn!(topic = %tp.0, partition = tp.1, "cannot set the start offset: {e}");
            }
            self.suspects().remove(&tp);
        }
    }

    /// The offsets of `offsets` that may be committed: none beyond its partition's log end. Final commits
    /// (`verify_all`) look up every partition's log end; periodic commits only those of suspect partitions (a
    /// shrinking log is always preceded by an out-of-range reset or a failed commit), so the hot path costs nothing.
    /// Withheld offsets are counted and logged, and handed to the committer again later.
    pub(super) fn within_log_end<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        offsets: Vec<(TopicPartition, i64)>,
        verify_all: bool,
    ) -> Vec<(TopicPartition, i64)> {
        let check: Vec<TopicPartition> = {
            let suspects = self.suspects();
            offsets.iter().map(|(tp, _)| tp).filter(|tp| verify_all || suspects.contains(*tp)).cloned().collect()
        };
        if check.is_empty() {
            return offsets;
        }
        let ends = match log_ends(consumer, &check) {
            Ok(ends) => ends,
            Err(e) => {
                tracing::warn!(partitions = ?check, "cannot read the log ends before committing: {e}");
                HashMap::new()
            }
        };
        let mut keep = Vec::with_capacity(offsets.len());
        let mut withheld = TopicPartitionList::new();
        for (tp, offset) in offsets {
            if !check.contains(&tp) {
                keep.push((tp, offset));
                continue;
            }
            let suspect = self.suspects().contains(&tp);
            let verdict = match ends.get(&tp) {
                Some(Ok(end)) if offset <= *end => Ok(()),
                Some(Ok(end)) => Err(format!("beyond the log end {end}")),
                Some(Err(e)) if topic_gone(e) => Err(format!("the topic is gone: {e}")),
                // Not verifiable: only a suspect partition is held back.
                _ if suspect => Err("its log end is unknown".to_owned()),
                _ => Ok(()),
            };
            match verdict {
                Ok(()) => {
                    self.suspects().remove(&tp);
                    keep.push((tp, offset));
                }
                Err(why) => {
                    self.metrics.commits_withheld.inc();
                    tracing::warn!(topic = %tp.0, partition = tp.1, offset,
                        "not committing offset {offset}: {why} (topic recreated or log truncated)");
                    self.suspects().insert(tp.clone());
                    if withheld.add_partition_offset(&tp.0, tp.1, Offset::Offset(offset)).is_err() {
                        tracing::debug!(topic = %tp.0, partition = tp.1, "cannot list a withheld offset");
                    }
                }
            }
        }
        if withheld.count() > 0 {
            self.forget_commits(Some(&withheld));
        }
        keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_reset_log_lines_name_their_partition() {
        let line = "orders.v2 [3]: offset reset (at offset 1000 (leader epoch 0), broker 1) to offset BEGINNING \
                    (leader epoch -1): fetch failed due to requested offset not available on the broker: Broker: \
                    Offset out of range";
        assert_eq!(parse_offset_reset_log(line), Some(("orders.v2".to_owned(), 3)));
        // As librdkafka 2.12 logs it on the bed (seen when a topic was recreated under a running worker).
        let seen = "[thrd:main]: recreate-190a5893 [0]: offset reset (at offset 1000 (leader epoch 0), broker 1) to \
                    offset BEGINNING (leader epoch -1): fetch failed due to requested offset not available on the \
                    broker: Broker: Offset out of range";
        assert_eq!(parse_offset_reset_log(seen), Some(("recreate-190a5893".to_owned(), 0)));
        assert_eq!(
            parse_offset_reset_log("orders [3]: offset reset (at INVALID, broker 1) to BEGINNING"),
            Some(("orders".into(), 3))
        );
        assert_eq!(parse_offset_reset_log("orders [x]: offset reset (at offset 1, broker 1)"), None);
        assert_eq!(parse_offset_reset_log("orders [3]: stored offset 5"), None);
        assert_eq!(parse_offset_reset_log("no brackets at all"), None);
    }
}
