//! CEL rules (`x-kubernetes-validations`) for the cross-field checks the apiserver enforces.
//!
//! Each rule's message names the field it is about, because users read these messages from
//! `kubectl apply` errors.

use kube::core::{Message, Reason, Rule};

/// librdkafka properties users may set in `spec.source.config`: tuning knobs only. Security,
/// group membership, offset management and callbacks are owned by kpipe.
pub const ALLOWED_CLIENT_CONFIG: &[&str] = &[
    "client.rack",
    "connections.max.idle.ms",
    "fetch.error.backoff.ms",
    "fetch.max.bytes",
    "fetch.min.bytes",
    "fetch.queue.backoff.ms",
    "fetch.wait.max.ms",
    "heartbeat.interval.ms",
    "isolation.level",
    "max.partition.fetch.bytes",
    "max.poll.interval.ms",
    "message.max.bytes",
    "metadata.max.age.ms",
    "queued.max.messages.kbytes",
    "queued.min.messages",
    "receive.message.max.bytes",
    "reconnect.backoff.max.ms",
    "reconnect.backoff.ms",
    "retry.backoff.max.ms",
    "retry.backoff.ms",
    "session.timeout.ms",
    "socket.connection.setup.timeout.ms",
    "socket.keepalive.enable",
    "socket.timeout.ms",
    "ssl.endpoint.identification.algorithm",
    "topic.metadata.refresh.interval.ms",
];

/// Schema of `spec.source.config`: an object whose only properties are the allow-listed client
/// properties, so the apiserver rejects any other key as an unknown field (and prunes it when
/// strict field validation is off). A CEL allow-list over map keys would exceed the apiserver's
/// rule-cost budget, because map keys have no length bound.
pub fn client_config_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let properties: serde_json::Map<String, serde_json::Value> = ALLOWED_CLIENT_CONFIG
        .iter()
        .map(|key| {
            let doc = format!("librdkafka property `{key}` (as a string).");
            (key.to_string(), serde_json::json!({"type": "string", "maxLength": 256, "description": doc}))
        })
        .collect();
    schemars::json_schema!({
        "type": "object",
        "description": "Extra librdkafka client properties, restricted to an allow-list of tuning knobs (fetch sizes, \
            timeouts, client.rack, isolation.level, ...). Security, group and offset properties are set by kpipe and \
            cannot be overridden here.",
        "properties": properties,
    })
}

pub fn exactly_one_processor() -> Rule {
    Rule::new("[has(self.http), has(self.kafka), has(self.noop)].filter(x, x).size() == 1")
        .message("processor must set exactly one of http, kafka or noop")
        .reason(Reason::FieldValueInvalid)
}

pub fn dead_letter_required() -> Rule {
    Rule::new("!has(self.onFailure) || self.onFailure != 'deadLetter' || has(self.deadLetter)")
        .message("deadLetter.topic is required when onFailure is deadLetter")
        .field_path(".deadLetter")
        .reason(Reason::FieldValueRequired)
}

pub fn dead_letter_not_source() -> Rule {
    Rule::new("!has(self.deadLetter) || !(self.deadLetter.topic in self.source.topics)")
        .message("deadLetter.topic must not be one of source.topics (failed records would be consumed again)")
        .field_path(".deadLetter.topic")
        .reason(Reason::FieldValueInvalid)
}

pub fn forward_topic_not_source() -> Rule {
    Rule::new("!has(self.processor.kafka) || !(self.processor.kafka.topic in self.source.topics)")
        .message("processor.kafka.topic must not be one of source.topics (records would loop)")
        .field_path(".processor.kafka.topic")
        .reason(Reason::FieldValueInvalid)
}

pub fn concurrency_bounds() -> Rule {
    Rule::new("self.perPartition <= self.perWorker")
        .message("concurrency.perPartition must not exceed concurrency.perWorker")
        .reason(Reason::FieldValueInvalid)
}

pub fn uncommitted_bound() -> Rule {
    Rule::new("self.uncommittedPerPartition >= self.perPartition")
        .message("concurrency.uncommittedPerPartition must be at least concurrency.perPartition")
        .reason(Reason::FieldValueInvalid)
}

pub fn backoff_order() -> Rule {
    Rule::new("duration(self.initialBackoff) <= duration(self.maxBackoff)")
        .message("retry.initialBackoff must not exceed retry.maxBackoff")
        .reason(Reason::FieldValueInvalid)
}

pub fn min_le_max_replicas() -> Rule {
    Rule::new("self.minReplicas <= self.maxReplicas")
        .message("scaling.minReplicas must not exceed scaling.maxReplicas")
        .reason(Reason::FieldValueInvalid)
}

pub fn threshold_xor_drain() -> Rule {
    Rule::new("!(has(self.lagThreshold) && has(self.targetDrainSeconds))")
        .message("scaling.lagThreshold and scaling.targetDrainSeconds are mutually exclusive: set one")
        .reason(Reason::FieldValueForbidden)
}

pub fn duration_at_most(field: &str, max: &str) -> Rule {
    Rule::new(format!("duration(self) <= duration('{max}')"))
        .message(Message::Message(format!("{field} must be at most {max}")))
        .reason(Reason::FieldValueInvalid)
}

pub fn duration_between(field: &str, min: &str, max: &str) -> Rule {
    Rule::new(format!("duration(self) >= duration('{min}') && duration(self) <= duration('{max}')"))
        .message(Message::Message(format!("{field} must be between {min} and {max}")))
        .reason(Reason::FieldValueInvalid)
}
