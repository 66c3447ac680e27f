//! `ConsumerPipeline.status`: what the operator observed and decided.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Condition types the operator maintains.
pub mod condition {
    /// Workers are configured and the pipeline is healthy (may be at zero replicas).
    pub const READY: &str = "Ready";
    /// The replica count is changing towards the desired count.
    pub const SCALING: &str = "Scaling";
    /// Something the pipeline needs is wrong (missing Secret or topic, unreachable broker...).
    pub const DEGRADED: &str = "Degraded";
    /// At least one worker replica is wanted (there is work, or minReplicas > 0).
    pub const ACTIVE: &str = "Active";
    /// A backlog is not draining; the reason says why: `CrashLoopingWorkers`, `NoCapacity` (workers
    /// wanted but none ready), `NoWorkers` (none running, e.g. an external autoscaler at zero),
    /// `PartitionStuck`, `Retrying` (a live worker retries the head record of some partitions) or
    /// `NotDraining`. False with reason `Draining` or `NoBacklog` otherwise.
    pub const STALLED: &str = "Stalled";
    /// The group's committed offsets vanished while the pipeline was idle (expired after
    /// `offsets.retention.minutes`, deleted by an admin) and the operator restored the positions it
    /// had recorded; the message names the partitions. False again once a worker consumed from them.
    pub const OFFSETS_RESTORED: &str = "OffsetsRestored";
    /// A source topic was deleted and recreated (Kafka's topic ID changed): True while the operator
    /// holds the workers at zero and moves the group's committed offsets of the old topic to the
    /// new topic's log start; the message names the topics and their old and new IDs.
    pub const TOPIC_RECREATED: &str = "TopicRecreated";
}

/// Observed state of a ConsumerPipeline.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerPipelineStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Scaling, Degraded and Active, per Kubernetes API conventions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Worker replicas currently set on the Deployment.
    #[serde(default)]
    pub replicas: i32,
    /// Replicas the scaler wants.
    #[serde(default)]
    pub desired_replicas: i32,
    /// Worker replicas that are ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector of the worker pods, for the scale subresource (HPA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// The consumer group the workers use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// Last lag measurement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<LagSummary>,
    /// When the operator last changed the replica count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
    /// The worker pods as the operator last saw them: restarts tell a crash loop from a poison record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<WorkerSummary>,
    /// What the operator keeps of each source topic across its restarts and leader changes: the
    /// topic ID the group's committed offsets belong to, and the committed offsets it recorded while
    /// the pipeline was idle (the positions a vanished-offsets restore puts back).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub topics: Vec<TopicRecord>,
    /// Dead letters of this pipeline found in its dead-letter topic (`spec.deadLetter.topic`), by error class.
    /// Counted by the operator's dead-letter reader and written with the rest of the status; absent for pipelines
    /// without a dead-letter topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letters: Option<DeadLetterSummary>,
}

/// The operator's durable record of one source topic.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TopicRecord {
    /// The topic's name.
    pub name: String,
    /// Kafka's topic ID (base64url without padding, as `kafka-topics --describe` prints it) of the
    /// topic the group's committed offsets belong to. A different ID on the broker means the topic
    /// was deleted and recreated: the old offsets are discarded, never applied to the new topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic_id: Option<String>,
    /// The group's committed offset per partition as the operator last recorded it while the
    /// pipeline was idle (index = partition, -1 = nothing committed). Written when the pipeline
    /// becomes idle and when the offsets change while idle, never while workers commit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub committed_offsets: Vec<i64>,
}

/// Dead letters of a pipeline, counted from the records of its dead-letter topic whose `kpipe.pipeline` header
/// names it (a topic shared by pipelines is counted per pipeline). The operator reads each record once: a new
/// leader continues from `readOffsets`; records that retention removes after they were read stay counted, records it
/// removes before stay uncounted. `kubectl get cpl -o jsonpath='{.status.deadLetters}'` shows them.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterSummary {
    /// The dead-letter topic read.
    pub topic: String,
    /// Dead letters of this pipeline.
    pub total: i64,
    /// Dead letters by the value of their `kpipe.error.class` header (`timeout`, `http_503`, `rejected`, ...;
    /// `unknown` when the header is missing).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub by_class: BTreeMap<String, i64>,
    /// Per partition of the topic (key: the partition number), the offset up to which it has been read: the
    /// counts are complete when these equal the partitions' end offsets.
    #[serde(default)]
    pub read_offsets: BTreeMap<String, i64>,
    /// When the counts or read offsets last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_at: Option<Time>,
}

/// The worker pods of a pipeline (from the Pods' status).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct WorkerSummary {
    /// Worker pods that exist (any phase).
    pub pods: i32,
    /// Container restarts summed over the current worker pods.
    pub restarts: i32,
    /// Pods whose worker container restarted within the last few minutes or waits in
    /// `CrashLoopBackOff`.
    pub crash_looping: i32,
    /// Why a worker container last terminated (e.g. `OOMKilled`, `Error`), from the most recent
    /// restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_termination_reason: Option<String>,
}

/// Consumer-group lag summary from the last poll.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct LagSummary {
    /// Records not yet committed, summed over all partitions.
    pub total: i64,
    /// Partitions of the source topics.
    pub partitions: i32,
    /// Partitions with lag > 0.
    pub partitions_with_lag: i32,
    /// Partitions with lag whose committed offset has not moved for several polls (likely a poison
    /// record or a blocked partition); they do not drive scale-up.
    pub stuck_partitions: i32,
    /// Partitions whose head record a live worker reports it is retrying (through the commit
    /// metadata): they wait for the processor, not for more replicas, and are not stuck.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retrying_partitions: Option<i32>,
    /// Records committed per second over the recent polls, all replicas together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records_per_second: Option<i64>,
    /// Estimated seconds to drain the lag at the current rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_drain_seconds: Option<i64>,
    /// Records written to the source topics per second over the last minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arrival_records_per_second: Option<i64>,
    /// Part of `total` that is most likely processed already and only waits for its commit (commit rate ×
    /// the commit delay seen while the group kept up). More replicas cannot shrink it, so it does not drive
    /// scale-up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub awaiting_commit: Option<i64>,
    /// Records per second one replica handles: measured while the replicas had more work than they could
    /// do (`capacityMeasured: true`), else the highest rate a replica has shown (a lower bound). The scaler
    /// keeps enough replicas for the arrival rate at this capacity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_per_replica: Option<i64>,
    /// Whether `capacityPerReplica` was measured (true) or is a lower bound (false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_measured: Option<bool>,
}

impl ConsumerPipelineStatus {
    /// The condition of the given type, if present.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}
