//! The librdkafka callbacks: logs, errors and statistics, and the rebalance callback that resolves start offsets
//! before an assignment and drains and commits partitions before a revoke.

use std::sync::{Arc, Mutex, MutexGuard};

use kpipe_rdkafka_native::FetchQueue;
use rdkafka::TopicPartitionList;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, RebalanceProtocol};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;

use kpipe_api::v1alpha1::GroupProtocol;

use super::commit::commit_sync;
use super::dispatch::Dispatch;
use super::partitions_of;
use super::positions::parse_offset_reset_log;

/// The consumer's librdkafka context: every callback works on the shared [`Dispatch`]; the second field is the
/// group protocol the consumer was configured with (`spec.source.groupProtocol`); the third, the fetch queue that
/// the rebalance callback forwards newly assigned partitions to ([`FetchSlot`]).
pub struct WorkerContext(pub Arc<Dispatch>, pub GroupProtocol, pub(super) FetchSlot);

impl WorkerContext {
    pub fn new(dispatch: Arc<Dispatch>, protocol: GroupProtocol) -> Self {
        Self(dispatch, protocol, FetchSlot::default())
    }
}

/// The consumer loop's [`FetchQueue`] while the loop runs (empty before and after). The queue holds its consumer,
/// which holds this context: the loop empties the slot before it closes the consumer ([`FetchSlot::clear`]), which
/// breaks that cycle and destroys the queue while its client is still alive.
#[derive(Default)]
pub(super) struct FetchSlot(Mutex<Option<Arc<FetchQueue<WorkerContext>>>>);

impl FetchSlot {
    fn lock(&self) -> MutexGuard<'_, Option<Arc<FetchQueue<WorkerContext>>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn set(&self, queue: Arc<FetchQueue<WorkerContext>>) {
        *self.lock() = Some(queue);
    }

    pub(super) fn clear(&self) {
        self.lock().take();
    }

    fn get(&self) -> Option<Arc<FetchQueue<WorkerContext>>> {
        self.lock().clone()
    }
}

/// How a rebalance is applied to librdkafka's assignment: incrementally (`incremental_assign`/`incremental_unassign`,
/// the list names only the partitions that change hands) or eagerly (`assign`/`unassign`, the whole assignment).
///
/// The consumer protocol of KIP-848 is always incremental (librdkafka's `rd_kafka_rebalance_protocol` says
/// `COOPERATIVE` for it, and `NONE` before the first subscription, so the configured protocol decides); the classic
/// protocol follows the assignor librdkafka reports (`cooperative-sticky`: cooperative, an eager one otherwise).
pub fn incremental_rebalance(configured: GroupProtocol, reported: RebalanceProtocol) -> bool {
    configured == GroupProtocol::Consumer || matches!(reported, RebalanceProtocol::Cooperative)
}

impl ClientContext for WorkerContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        if fac == "OFFSET"
            && let Some((topic, partition)) = parse_offset_reset_log(message)
        {
            self.0.offset_reset_seen(&topic, partition);
        }
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", fac, "{message}")
            }
            RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", fac, "{message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => tracing::info!(target: "librdkafka", fac, "{message}"),
            RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", fac, "{message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // Unreachable brokers and security failures (rejected credentials, an untrusted or expired certificate)
        // make the worker unready with the reason, until a metadata request succeeds again.
        if matches!(
            error.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::AllBrokersDown
                    | RDKafkaErrorCode::Authentication
                    | RDKafkaErrorCode::SaslAuthenticationFailed
                    | RDKafkaErrorCode::SSL
            )
        ) {
            self.0.health.set_broker_error(Some(reason.to_owned()));
        }
        tracing::error!(target: "librdkafka", "{error}: {reason}");
    }

    fn stats(&self, stats: Statistics) {
        let parts = self.0.partitions();
        for (topic, t) in &stats.topics {
            for (id, p) in &t.partitions {
                if *id < 0 || !parts.contains_key(&(Arc::<str>::from(topic.as_str()), *id)) {
                    continue;
                }
                if p.consumer_lag >= 0 {
                    self.0.metrics.lag.with_label_values(&[topic, &id.to_string()]).set(p.consumer_lag);
                }
                if p.committed_offset >= 0 {
                    self.0
                        .metrics
                        .committed_offset
                        .with_label_values(&[topic, &id.to_string()])
                        .set(p.committed_offset);
                }
            }
        }
    }
}

impl ConsumerContext for WorkerContext {
    /// librdkafka's rebalance callback, as rust-rdkafka's default implementation, except that newly assigned
    /// partitions get explicit start offsets ([`Dispatch::resolve_starts`]) before they are assigned: setting them
    /// in the assignment is the only race-free way (a seek after the assignment races librdkafka's own
    /// committed-offset fetch).
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let assign = err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS;
        if assign {
            self.0.resolve_starts(consumer, tpl);
            // Before the assignment starts fetching: see `FetchQueue::forward`.
            if let Some(fetch) = self.2.get()
                && let Err(e) = fetch.forward(tpl)
            {
                tracing::warn!("records of some assigned partitions are read one by one: {e}");
            }
        }
        let rebalance = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => Rebalance::Assign(&*tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => Rebalance::Revoke(&*tpl),
            other => Rebalance::Error(KafkaError::Rebalance(other.into())),
        };
        self.pre_rebalance(consumer, &rebalance);
        let incremental = incremental_rebalance(self.1, consumer.rebalance_protocol());
        let applied = match (assign, incremental) {
            (true, true) => consumer.incremental_assign(tpl),
            (true, false) => consumer.assign(tpl),
            (false, true) => consumer.incremental_unassign(tpl),
            (false, false) => consumer.unassign(),
        };
        if let Err(e) = applied {
            tracing::error!(assign, "cannot apply the rebalance: {e}");
        }
        self.post_rebalance(consumer, &rebalance);
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let tps = partitions_of(tpl);
            if tps.is_empty() {
                return;
            }
            let lost = consumer.assignment_lost();
            self.0.metrics.rebalances.with_label_values(&[if lost { "lost" } else { "revoke" }]).inc();
            tracing::info!(partitions = ?tps, lost, "partitions revoked; draining");
            let mut offsets = self.0.drain(&tps);
            // Final offsets a shutdown could not commit: now, while these partitions are still ours, or never.
            // (A shutdown drained them already, so the two lists never name the same partition.)
            offsets.extend(self.0.held().take(&tps));
            if lost {
                tracing::warn!("assignment lost: not committing (another member owns these partitions now)");
            } else {
                commit_sync(consumer, &offsets, &self.0);
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) if tpl.count() > 0 => {
                self.0.metrics.rebalances.with_label_values(&["assign"]).inc();
                // librdkafka remembers a partition's pause flag across unassign/assign: a
                // partition we paused before it was revoked would come back paused for good.
                if let Err(e) = consumer.resume(tpl) {
                    tracing::warn!("cannot resume newly assigned partitions: {e}");
                }
                self.0.assign(tpl);
                self.0.forget_commits(None);
            }
            Rebalance::Revoke(_) => self.0.forget_commits(None),
            Rebalance::Error(e) => tracing::error!("rebalance error: {e}"),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_protocol_rebalances_are_always_incremental() {
        use RebalanceProtocol::*;
        for (i, reported) in [None, Eager, Cooperative].into_iter().enumerate() {
            assert!(incremental_rebalance(GroupProtocol::Consumer, reported), "case {i}");
        }
        assert!(incremental_rebalance(GroupProtocol::Classic, Cooperative));
        assert!(!incremental_rebalance(GroupProtocol::Classic, Eager));
        assert!(!incremental_rebalance(GroupProtocol::Classic, None));
    }
}
