//! Commits: periodic and early requests sent by the committer thread, final commits on revoke and at shutdown, all
//! synchronous (the acknowledgement moves each partition's uncommitted window), and the final offsets a refused
//! shutdown commit holds until the rebalance in progress lets them through.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering as AtomicOrdering;
use std::time::{Duration, Instant};

use kpipe_api::commit_metadata;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Offset, TopicPartitionList};

use crate::partition::Input;

use super::context::WorkerContext;
use super::dispatch::Dispatch;
use super::positions::topic_gone;
use super::{TopicPartition, partitions_of, unix_millis};

/// Partitions to commit. The committer reads their committable offsets when it sends the commit: the freshest
/// offset, and never one of an earlier assignment of a partition that was revoked and assigned again meanwhile.
pub(super) type CommitRequest = Vec<TopicPartition>;

/// Least time between two commits asked for early by partitions near their uncommitted bound.
pub(super) const EARLY_COMMIT_GAP: Duration = Duration::from_millis(5);
/// How long after the shutdown timeout a shutdown may keep retrying a final commit the broker refused: the pod's
/// grace period is the shutdown timeout + 10 s, and this leaves 2 s of it for closing. The member only learns of
/// a rebalance at its next heartbeat (librdkafka does not rejoin on a refused commit), so the retry must be able
/// to outlast `heartbeat.interval.ms`.
pub(super) const FINAL_COMMIT_MARGIN: Duration = Duration::from_secs(8);

/// Final offsets of a shutdown whose commit the broker refused, typically because a rebalance was in
/// progress (a new pod joining while this one stops). The revoke that rebalance brings commits them while the
/// partitions are still ours, or the shutdown retries them while they stay assigned. Never later: once a
/// partition is gone, its new owner may already have committed past them.
#[derive(Debug, Default)]
pub(super) struct HeldOffsets(HashMap<TopicPartition, i64>);

impl HeldOffsets {
    pub(super) fn hold(&mut self, offsets: impl IntoIterator<Item = (TopicPartition, i64)>) {
        self.0.extend(offsets);
    }

    /// Removes and returns the held offsets of `tps`.
    pub(super) fn take(&mut self, tps: &[TopicPartition]) -> Vec<(TopicPartition, i64)> {
        tps.iter().filter_map(|tp| self.0.remove(tp).map(|o| (tp.clone(), o))).collect()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

pub(super) fn commit_list(offsets: &[(TopicPartition, i64)]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in offsets {
        if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset)) {
            tracing::error!(%topic, partition, "cannot build commit list: {e}");
        }
    }
    tpl
}

impl Dispatch {
    /// Returns the partitions whose committable offset moved since it was last handed to the
    /// committer. On the regular interval (`with_positions`) it also tells idle partition tasks the
    /// consumer's fetch position, so commits can pass transaction markers at the log end; early
    /// commits, which can come every few milliseconds, skip that.
    pub(super) fn periodic_commit<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        with_positions: bool,
    ) -> CommitRequest {
        self.commit_requested.store(false, AtomicOrdering::Release);
        let positions = if with_positions { consumer.position().ok() } else { None };
        let mut request = CommitRequest::new();
        let mut parts = self.partitions();
        if let Some(positions) = positions {
            for e in positions.elements() {
                if let (Offset::Offset(pos), Some(h)) =
                    (e.offset(), parts.get_mut(&(Arc::<str>::from(e.topic()), e.partition())))
                    && h.overflow.is_empty()
                {
                    // In-band after every record below it; sent with the next flush.
                    h.staged.push(Input::Position(pos));
                }
            }
        }
        for ((topic, partition), h) in parts.iter_mut() {
            let Some(offset) = h.progress.committable() else { continue };
            // A record being retried at the commit point is re-reported on every regular interval (the
            // same offset, fresh metadata), so the operator sees a live retry rather than a stuck partition.
            let report_retry = with_positions && self.health.retry_report(topic, *partition, offset, 0).is_some();
            if h.last_committed != Some(offset) || report_retry {
                request.push((topic.clone(), *partition));
                h.last_committed = Some(offset);
            }
        }
        request
    }

    /// Forgets which offsets were already sent, so the next periodic commit sends every committable offset
    /// again. Called after a rebalance (commits made while the group rebalances are rejected) and after a
    /// failed commit: an unacknowledged commit must not widen the redelivery window of a later crash.
    pub(super) fn forget_commits(&self, only: Option<&TopicPartitionList>) {
        let mut parts = self.partitions();
        match only {
            None => parts.values_mut().for_each(|h| h.last_committed = None),
            Some(tpl) => {
                for e in tpl.elements() {
                    if let Some(h) = parts.get_mut(&(Arc::<str>::from(e.topic()), e.partition())) {
                        h.last_committed = None;
                    }
                }
            }
        }
    }

    pub(super) fn record_committed(&self, offsets: &TopicPartitionList) {
        let mut parts = self.partitions();
        for e in offsets.elements() {
            if let (Offset::Offset(o), None) = (e.offset(), e.error().err()) {
                self.metrics.committed_offset.with_label_values(&[e.topic(), &e.partition().to_string()]).set(o);
                if let Some(h) = parts.get_mut(&(Arc::<str>::from(e.topic()), e.partition())) {
                    h.last_committed = Some(o);
                    h.progress.acknowledge(o);
                }
            }
        }
    }
}

/// Commits final `offsets` synchronously and records what the broker acknowledged. Holds the commit lock, so the
/// committer thread and a revoke's final commit never overtake each other. Every offset is checked against its
/// partition's log end first (a revoke often follows a topic deletion); offsets beyond it are not committed. False
/// when the broker refused the commit.
pub(super) fn commit_sync<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    offsets: &[(TopicPartition, i64)],
    dispatch: &Dispatch,
) -> bool {
    if offsets.is_empty() {
        return true;
    }
    let _committing = dispatch.commit_lock.lock().unwrap_or_else(|e| e.into_inner());
    let tpl = commit_list(&dispatch.within_log_end(consumer, offsets.to_vec(), true));
    if tpl.count() == 0 {
        return true;
    }
    tracing::info!(offsets = ?tpl.to_topic_map(), "final commit");
    commit_locked(consumer, &tpl, dispatch)
}

/// Attempts of a commit the broker refuses with STALE_MEMBER_EPOCH, and the pause between them. Under the consumer
/// group protocol (KIP-848) every OffsetCommit carries the member epoch, and the broker refuses one that is not the
/// member's current epoch, as it can be during a rebalance. librdkafka (2.12, `rd_kafka_cgrp_op_handle_OffsetCommit`)
/// does not retry a manual commit on that error; it sends the next heartbeat at once, on its own thread, which brings
/// the current epoch. So a commit a revoke or a shutdown depends on is tried again after a moment: 5 × 200 ms at most.
pub(super) const STALE_EPOCH_ATTEMPTS: u32 = 5;
pub(super) const STALE_EPOCH_PAUSE: Duration = Duration::from_millis(200);

/// Whether a commit failed only because the member epoch was stale (consumer group protocol), so a retry can pass.
pub(super) fn stale_member_epoch(e: &KafkaError) -> bool {
    matches!(e, KafkaError::ConsumerCommit(RDKafkaErrorCode::StaleMemberEpoch))
}

/// Commits and records the result; true when the broker acknowledged it (or there was nothing to commit). A stale
/// member epoch is retried ([`STALE_EPOCH_ATTEMPTS`]).
pub(super) fn commit_locked<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    tpl: &TopicPartitionList,
    dispatch: &Dispatch,
) -> bool {
    let started = Instant::now();
    let mut result = consumer.commit(tpl, CommitMode::Sync);
    for _ in 1..STALE_EPOCH_ATTEMPTS {
        match &result {
            Err(e) if stale_member_epoch(e) => {
                tracing::info!("commit refused: stale member epoch (a rebalance is under way); retrying");
                std::thread::sleep(STALE_EPOCH_PAUSE);
                result = consumer.commit(tpl, CommitMode::Sync);
            }
            _ => break,
        }
    }
    dispatch.metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
    match result {
        Ok(()) => {
            dispatch.health.set_broker_error(None);
            dispatch.record_committed(tpl);
            tracing::debug!(offsets = ?tpl.to_topic_map(), "committed");
            true
        }
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => true,
        Err(e) => {
            dispatch.metrics.commit_failures.inc();
            tracing::warn!("commit failed: {e}");
            if topic_gone(&e) {
                // Deleted, perhaps about to be recreated: the next commits of these partitions check the log end.
                dispatch.suspects().extend(partitions_of(tpl));
            }
            dispatch.forget_commits(Some(tpl));
            false
        }
    }
}

/// Commits a periodic or early request for the partitions still assigned, each at its committable offset
/// of now. Synchronous, because the acknowledgement is what moves each partition's uncommitted window
/// (librdkafka posts async commit results only to an `offset_commit_cb`, which the event-based rust-rdkafka
/// consumer does not set).
pub(super) fn commit_request<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    request: &[TopicPartition],
    dispatch: &Dispatch,
) {
    // Taken before the offsets are read: a partition revoked meanwhile is gone from the map by then.
    let _committing = dispatch.commit_lock.lock().unwrap_or_else(|e| e.into_inner());
    let mut offsets = Vec::with_capacity(request.len());
    {
        let mut parts = dispatch.partitions();
        for tp in request {
            if let Some(h) = parts.get_mut(tp)
                && let Some(offset) = h.progress.committable()
            {
                h.last_committed = Some(offset);
                offsets.push((tp.clone(), offset));
            }
        }
    }
    // Each commit carries the partition's retry report (empty when none) in its metadata: how the operator tells
    // a partition a live worker retries from a stuck one (kpipe_api::commit_metadata).
    let now = unix_millis();
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in dispatch.within_log_end(consumer, offsets, false) {
        let report = dispatch.health.retry_report(&topic, partition, offset, now);
        let mut elem = tpl.add_partition(&topic, partition);
        elem.set_metadata(commit_metadata::encode(report.as_ref()));
        if let Err(e) = elem.set_offset(Offset::Offset(offset)) {
            tracing::warn!(%topic, partition, "cannot add offset to commit list: {e}");
        }
    }
    if tpl.count() > 0 {
        commit_locked(consumer, &tpl, dispatch);
    }
}

/// After a refused final commit at shutdown: keeps serving the consumer so the rebalance in progress can finish
/// (its revoke commits the held offsets) and retries those still assigned, until all are committed or the
/// `deadline`. Records fetched meanwhile belong to drained partitions and are not processed.
pub(super) fn settle_held_offsets<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    dispatch: &Dispatch,
    deadline: Instant,
) {
    let mut next_try = Instant::now() + Duration::from_millis(200);
    while !dispatch.held().is_empty() && Instant::now() < deadline {
        if let Some(Err(e)) = consumer.poll(Duration::from_millis(50)) {
            tracing::debug!("consumer error while retrying the final commit: {e}");
        }
        if Instant::now() < next_try {
            continue;
        }
        next_try = Instant::now() + Duration::from_millis(500);
        let Ok(assignment) = consumer.assignment() else { continue };
        let retry = dispatch.held().take(&partitions_of(&assignment));
        if !retry.is_empty() && !commit_sync(consumer, &retry, dispatch) {
            dispatch.held().hold(retry);
        }
    }
    let held = std::mem::take(&mut *dispatch.held());
    if !held.is_empty() {
        tracing::warn!(offsets = ?held.0, "final offsets not committed: their records will be delivered again");
    }
}

/// Merges queued requests into one, each partition once: a slow commit makes the next one bigger, not later.
pub(super) fn merge_requests(mut request: CommitRequest, more: CommitRequest) -> CommitRequest {
    for tp in more {
        if !request.contains(&tp) {
            request.push(tp);
        }
    }
    request
}

/// The committer thread: commits requests from the poll thread one after another, so the poll thread never
/// waits for a broker round trip.
pub(super) fn run_committer(
    consumer: &BaseConsumer<WorkerContext>,
    requests: std::sync::mpsc::Receiver<CommitRequest>,
) {
    while let Ok(mut request) = requests.recv() {
        while let Ok(more) = requests.try_recv() {
            request = merge_requests(request, more);
        }
        commit_request(consumer, &request, &consumer.context().0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_offsets_are_taken_once_and_only_for_the_named_partitions() {
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let mut held = HeldOffsets::default();
        held.hold([((a.clone(), 0), 10), ((a.clone(), 1), 20), ((b.clone(), 0), 30)]);
        let mut taken = held.take(&[(a.clone(), 1), (b.clone(), 0), (b.clone(), 7)]);
        taken.sort();
        assert_eq!(taken, vec![((a.clone(), 1), 20), ((b.clone(), 0), 30)]);
        assert!(held.take(&[(a.clone(), 1)]).is_empty(), "taken offsets are gone");
        assert!(!held.is_empty());
        assert_eq!(held.take(&[(a.clone(), 0)]), vec![((a, 0), 10)]);
        assert!(held.is_empty());
    }

    #[test]
    fn only_a_stale_member_epoch_is_retried() {
        assert!(stale_member_epoch(&KafkaError::ConsumerCommit(RDKafkaErrorCode::StaleMemberEpoch)));
        assert!(!stale_member_epoch(&KafkaError::ConsumerCommit(RDKafkaErrorCode::UnknownMemberId)));
        assert!(!stale_member_epoch(&KafkaError::ConsumerCommit(RDKafkaErrorCode::IllegalGeneration)));
        assert!(STALE_EPOCH_PAUSE * STALE_EPOCH_ATTEMPTS < FINAL_COMMIT_MARGIN, "retries fit the final commit margin");
    }

    #[test]
    fn commit_lists_carry_every_offset() {
        let a: Arc<str> = Arc::from("a");
        let tpl = commit_list(&[((a.clone(), 0), 10), ((a.clone(), 3), 42)]);
        assert_eq!(partitions_of(&tpl), vec![(a.clone(), 0), (a, 3)]);
        assert_eq!(tpl.find_partition("a", 3).map(|e| e.offset()), Some(Offset::Offset(42)));
    }

    #[test]
    fn queued_commit_requests_merge_to_each_partition_once() {
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let first = vec![(a.clone(), 0), (a.clone(), 1)];
        let second = vec![(a.clone(), 0), (b.clone(), 0), (a.clone(), 1)];
        let mut merged = merge_requests(first, second);
        merged.sort();
        assert_eq!(merged, vec![(a.clone(), 0), (a, 1), (b, 0)]);
    }
}
