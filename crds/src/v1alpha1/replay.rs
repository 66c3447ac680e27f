//! `DeadLetterReplay`: re-process a pipeline's dead letters through its processor, once, like a Job.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Re-process the dead letters of a ConsumerPipeline (all of them, an offset or time range of the dead-letter
/// topic, or some error classes) through the pipeline's processor, once. Runs to completion like a Job; records
/// that fail again go to the parking topic, never back into the dead-letter topic.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kpipe.io",
    version = "v1alpha1",
    kind = "DeadLetterReplay",
    plural = "deadletterreplays",
    singular = "deadletterreplay",
    shortname = "dlr",
    category = "kpipe",
    namespaced,
    status = "DeadLetterReplayStatus",
    derive = "PartialEq",
    doc = "A one-off replay of a ConsumerPipeline's dead letters through its processor; failures go to a parking topic.",
    printcolumn(name = "Pipeline", type_ = "string", json_path = ".spec.pipelineRef.name"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Replayed", type_ = "integer", json_path = ".status.replayed"),
    printcolumn(name = "Succeeded", type_ = "integer", json_path = ".status.succeeded"),
    printcolumn(name = "FailedAgain", type_ = "integer", json_path = ".status.failedAgain"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("spec is immutable: create a new DeadLetterReplay"))]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterReplaySpec {
    /// The pipeline (same namespace) whose dead-letter topic is replayed through its processor.
    pub pipeline_ref: PipelineRef,
    /// Which dead letters to replay; empty replays all of the pipeline's dead letters present when the replay
    /// starts.
    #[serde(default)]
    pub selection: ReplaySelection,
    /// Topic (in the pipeline's cluster) that receives the records that fail again, with the replay's context
    /// headers added. It must exist and must not be the dead-letter topic or a source topic.
    #[schemars(length(min = 1, max = 249), regex(pattern = r"^[a-zA-Z0-9._-]+$"))]
    pub parking_topic: String,
}

/// A reference to a ConsumerPipeline in the replay's namespace.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PipelineRef {
    /// `metadata.name` of the pipeline.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
}

/// Which dead letters a replay takes. All given criteria must hold.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ReplaySelection {
    /// First offset of each dead-letter topic partition to replay (inclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub from_offset: Option<i64>,
    /// Offset of each dead-letter topic partition to stop at (exclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub to_offset: Option<i64>,
    /// Only dead letters written at or after this time (the dead letter's Kafka timestamp, RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
    /// Only dead letters written before this time (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Time>,
    /// Only dead letters whose `kpipe.error.class` is one of these (e.g. `http_503`, `timeout`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub error_classes: Vec<String>,
}

/// Phase of a replay.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ReplayPhase {
    /// Waiting for its pipeline or its dead-letter topic.
    #[default]
    Pending,
    /// The replay Job runs.
    Running,
    /// Every selected dead letter was replayed (succeeded or parked).
    Succeeded,
    /// The replay Job failed for good (its backoff limit was reached).
    Failed,
}

/// Progress of a replay.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterReplayStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pending, Running, Succeeded or Failed.
    #[serde(default)]
    pub phase: ReplayPhase,
    /// Complete and Failed, per Kubernetes API conventions (as a Job has).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The consumer group holding the replay's progress (its committed offsets on the dead-letter topic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// The dead-letter topic read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_topic: Option<String>,
    /// Per partition (key: partition number), the end offset when the replay started: it never reads beyond, so
    /// dead letters written during the replay are not part of it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub end_offsets: BTreeMap<String, i64>,
    /// Selected dead letters handed to the processor so far (each once, crash re-deliveries not counted).
    #[serde(default)]
    pub replayed: i64,
    /// Replayed dead letters the processor accepted.
    #[serde(default)]
    pub succeeded: i64,
    /// Replayed dead letters that failed again and went to the parking topic.
    #[serde(default)]
    pub failed_again: i64,
    /// Records of the topic not selected (other pipelines, other classes, outside the range).
    #[serde(default)]
    pub skipped: i64,
    /// When the replay Job was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the replay reached Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
}
