//! What a valid ConsumerPipeline is, stated once for both enforcers: the patterns and CEL rules
//! (`x-kubernetes-validations`) the apiserver evaluates, and [`check`], the same rules in Rust for
//! the operator (a pipeline admitted before a rule existed, or a worker run by hand).
//!
//! Each rule's message names the field it is about, because users read these messages from
//! `kubectl apply` errors. The regular expressions are written in the syntax Go's RE2 (the
//! apiserver) and Rust's `regex` crate share, and [`check`] evaluates the very same constants.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use kube::core::{Message, Reason, Rule};
use regex::Regex;

use crate::Duration;
use crate::v1alpha1::{ConsumerPipelineSpec, GroupProtocol, Processor, SaslMechanism};

/// Longest pipeline name: the name is the value of the workers' `app.kubernetes.io/instance`
/// label (at most 63 characters); the children are named `<name>-worker`.
pub const MAX_PIPELINE_NAME_LEN: usize = 63;

/// Kafka topic names: ASCII letters, digits, `.`, `_`, `-` (and never `.` or `..`, see
/// [`topic_name_rule`]).
pub const TOPIC_PATTERN: &str = r"^[A-Za-z0-9._\-]+$";

macro_rules! port {
    () => {
        "([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
    };
}
/// A bracketed IPv6 address in any of the RFC 4291 text forms without an embedded IPv4 part: eight
/// groups, or fewer around one `::`.
macro_rules! ipv6_literal {
    () => {
        concat!(
            r"\[(([0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}|([0-9A-Fa-f]{1,4}:){1,7}:|",
            r"([0-9A-Fa-f]{1,4}:){1,6}:[0-9A-Fa-f]{1,4}|([0-9A-Fa-f]{1,4}:){1,5}(:[0-9A-Fa-f]{1,4}){1,2}|",
            r"([0-9A-Fa-f]{1,4}:){1,4}(:[0-9A-Fa-f]{1,4}){1,3}|([0-9A-Fa-f]{1,4}:){1,3}(:[0-9A-Fa-f]{1,4}){1,4}|",
            r"([0-9A-Fa-f]{1,4}:){1,2}(:[0-9A-Fa-f]{1,4}){1,5}|[0-9A-Fa-f]{1,4}:(:[0-9A-Fa-f]{1,4}){1,6}|",
            r":((:[0-9A-Fa-f]{1,4}){1,7}|:))\]"
        )
    };
}

/// A bootstrap broker: `host:port` (DNS name or IPv4 address) or `[IPv6]:port`, port 1–65535. An
/// IPv6 address needs its brackets: in `fd00::1:9092` the port cannot be told apart.
pub const BOOTSTRAP_SERVER_PATTERN: &str = concat!(
    r"^([A-Za-z0-9_]([A-Za-z0-9_\-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_\-]*[A-Za-z0-9_])?)*\.?|",
    ipv6_literal!(),
    "):",
    port!(),
    "$"
);

/// The HTTP processor's endpoint: scheme `http` or `https` in any case, a host (DNS name whose last
/// label is not all digits, dotted-quad IPv4 or `[IPv6]`), an optional port 1–65535, then an
/// optional path/query of printable ASCII. No user info: credentials do not belong in the spec.
pub const HTTP_URL_PATTERN: &str = concat!(
    r"^[Hh][Tt][Tt][Pp][Ss]?://(",
    r"((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])|",
    ipv6_literal!(),
    r"|([A-Za-z0-9_\-]+\.)*[0-9]*[A-Za-z_\-][A-Za-z0-9_\-]*\.?",
    ")(:",
    port!(),
    r")?([/?#][!-~]*)?$"
);

/// An HTTP header name: an RFC 9110 token.
pub const HEADER_NAME_PATTERN: &str = r"^[!#$%&'*+.^_`|~0-9A-Za-z\-]+$";
/// An HTTP header value: no control characters other than tab.
pub const HEADER_VALUE_PATTERN: &str = r"^[^\x00-\x08\x0A-\x1F\x7F]*$";
/// A DNS-1123 subdomain (ServiceAccount and Secret names).
pub const DNS_SUBDOMAIN_PATTERN: &str = r"^[a-z0-9]([\-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([\-a-z0-9]*[a-z0-9])?)*$";
/// A label or annotation key: `[prefix/]name`, the prefix a DNS subdomain (at most 253
/// characters, checked separately), the name at most 63 characters.
pub const QUALIFIED_NAME_PATTERN: &str = r"^([a-z0-9]([\-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([\-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([\-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$";
/// A label value: empty, or at most 63 characters of alphanumerics, `-`, `_`, `.`, beginning and
/// ending with an alphanumeric.
pub const LABEL_VALUE_PATTERN: &str = r"^([A-Za-z0-9]([\-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$";
/// A key in a Secret: alphanumerics, `-`, `_`, `.`; not `.`, `..` or starting with `..`.
pub const SECRET_KEY_PATTERN: &str = r"^\.?[\-_A-Za-z0-9][\-._A-Za-z0-9]*$";
/// A container image reference: printable ASCII without spaces.
pub const IMAGE_PATTERN: &str = r"^[!-~]+$";
/// Value of an integer librdkafka property: decimal without leading zeros (librdkafka reads
/// `010` as octal and `0x10` as hex, so neither is accepted).
pub const CLIENT_INT_PATTERN: &str = r"^(0|-?[1-9][0-9]{0,9})$";

/// Largest `batch.maxBytes`.
pub const MAX_BATCH_BYTES: u64 = 1 << 30;

/// Range of `processor.http.timeout`.
pub const HTTP_TIMEOUT_RANGE: (&str, &str) = ("1ms", "5m");
/// Upper bound of `batch.maxWait`.
pub const MAX_WAIT_MAX: &str = "1m";
/// Upper bound of `retry.initialBackoff` and `retry.maxBackoff`.
pub const BACKOFF_MAX: &str = "1h";
/// Upper bound of `retry.maxRecordAge`.
pub const MAX_RECORD_AGE_MAX: &str = "8760h";
/// Range of `scaling.pollInterval`.
pub const POLL_INTERVAL_RANGE: (&str, &str) = ("1s", "5m");
/// Range of `processor.circuitBreaker.window`.
pub const BREAKER_WINDOW_RANGE: (&str, &str) = ("1s", "1h");
/// Range of `processor.circuitBreaker.openDuration` and `maxOpenDuration`.
pub const BREAKER_OPEN_RANGE: (&str, &str) = ("100ms", "1h");
/// Upper bound of `scaling.scaleDownStabilization`.
pub const SCALE_DOWN_STABILIZATION_MAX: &str = "1h";
/// Upper bound of `scaling.cooldownToZero`.
pub const COOLDOWN_TO_ZERO_MAX: &str = "24h";

/// The value of `fetch.max.bytes` the worker sets when `source.config` does not (its consumer
/// tuning); the cross-property rules below compare against it.
pub const WORKER_DEFAULT_FETCH_MAX_BYTES: i64 = 4_194_304;

/// How a librdkafka passthrough property's value is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientProperty {
    /// A decimal integer in `min..=max` (librdkafka's own range).
    Int { min: i64, max: i64, default: i64 },
    /// `true` or `false`.
    Bool,
    /// One of the listed values.
    Enum(&'static [&'static str]),
    /// Free text (at most 256 characters).
    Text,
}

/// librdkafka properties users may set in `spec.source.config` (tuning knobs only; security, group
/// membership, offset management and callbacks are owned by kpipe), with the value each accepts.
/// Ranges and defaults are librdkafka's (`CONFIGURATION.md`).
pub const CLIENT_CONFIG: &[(&str, ClientProperty)] = &[
    ("client.rack", ClientProperty::Text),
    ("connections.max.idle.ms", int(0, 2_147_483_647, 0)),
    ("fetch.error.backoff.ms", int(0, 300_000, 500)),
    ("fetch.max.bytes", int(0, 2_147_483_135, WORKER_DEFAULT_FETCH_MAX_BYTES)),
    ("fetch.min.bytes", int(1, 100_000_000, 1)),
    ("fetch.queue.backoff.ms", int(0, 300_000, 1000)),
    ("fetch.wait.max.ms", int(0, 300_000, 500)),
    ("group.remote.assignor", ClientProperty::Enum(&["uniform", "range"])),
    ("heartbeat.interval.ms", int(1, 3_600_000, 3000)),
    ("isolation.level", ClientProperty::Enum(&["read_uncommitted", "read_committed"])),
    ("max.partition.fetch.bytes", int(1, 1_000_000_000, 1_048_576)),
    ("max.poll.interval.ms", int(1, 86_400_000, 300_000)),
    ("message.max.bytes", int(1000, 1_000_000_000, 1_000_000)),
    ("metadata.max.age.ms", int(1, 86_400_000, 900_000)),
    ("queued.max.messages.kbytes", int(1, 2_097_151, 65_536)),
    ("queued.min.messages", int(1, 10_000_000, 100_000)),
    ("receive.message.max.bytes", int(1000, 2_147_483_647, 100_000_000)),
    ("reconnect.backoff.max.ms", int(0, 3_600_000, 10_000)),
    ("reconnect.backoff.ms", int(0, 3_600_000, 100)),
    ("retry.backoff.max.ms", int(1, 300_000, 1000)),
    ("retry.backoff.ms", int(1, 300_000, 100)),
    ("session.timeout.ms", int(1, 3_600_000, 45_000)),
    ("socket.connection.setup.timeout.ms", int(1000, 2_147_483_647, 30_000)),
    ("socket.keepalive.enable", ClientProperty::Bool),
    ("socket.timeout.ms", int(10, 300_000, 60_000)),
    ("ssl.endpoint.identification.algorithm", ClientProperty::Enum(&["none", "https"])),
    ("topic.metadata.refresh.interval.ms", int(-1, 3_600_000, 300_000)),
];

const fn int(min: i64, max: i64, default: i64) -> ClientProperty {
    ClientProperty::Int { min, max, default }
}

/// The allow-listed property names (see [`CLIENT_CONFIG`]).
pub const ALLOWED_CLIENT_CONFIG: &[&str] = &{
    let mut names = [""; CLIENT_CONFIG.len()];
    let mut i = 0;
    while i < CLIENT_CONFIG.len() {
        names[i] = CLIENT_CONFIG[i].0;
        i += 1;
    }
    names
};

/// Relations between client properties that librdkafka refuses to start without (consumer
/// `conf_finalize`): `(larger, smaller, slack, only when larger is set)`: larger ≥ smaller + slack.
pub const CLIENT_CONFIG_RELATIONS: &[(&str, &str, i64, bool)] = &[
    ("max.poll.interval.ms", "session.timeout.ms", 0, false),
    ("fetch.max.bytes", "message.max.bytes", 0, false),
    ("receive.message.max.bytes", "fetch.max.bytes", 512, true),
    ("reconnect.backoff.max.ms", "reconnect.backoff.ms", 0, false),
];

fn property(key: &str) -> Option<ClientProperty> {
    CLIENT_CONFIG.iter().find(|(k, _)| *k == key).map(|(_, p)| *p)
}

fn int_default(key: &str) -> i64 {
    match property(key) {
        Some(ClientProperty::Int { default, .. }) => default,
        _ => 0,
    }
}

/// A CEL string literal holding `text` verbatim (a raw string; none of the patterns contains `"`).
fn cel_raw(text: &str) -> String {
    format!("r\"{text}\"")
}

/// CEL's name for a property whose name contains dots.
fn cel_field(key: &str) -> String {
    key.replace('.', "__dot__")
}

fn client_property_message(key: &str, p: ClientProperty) -> String {
    match p {
        ClientProperty::Int { min, max, .. } => {
            format!("source.config.{key} must be a decimal integer from {min} to {max}")
        }
        ClientProperty::Bool => format!("source.config.{key} must be true or false"),
        ClientProperty::Enum(values) => format!("source.config.{key} must be one of {}", values.join(", ")),
        ClientProperty::Text => format!("source.config.{key} must be at most 256 characters"),
    }
}

/// Schema of `spec.source.config`: an object whose only properties are the allow-listed client
/// properties (so the apiserver rejects any other key as an unknown field), each value checked by
/// its type, plus the cross-property relations librdkafka enforces at start-up.
pub fn client_config_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let properties: serde_json::Map<String, serde_json::Value> = CLIENT_CONFIG
        .iter()
        .map(|(key, p)| {
            let mut schema = serde_json::json!({"type": "string", "maxLength": 256});
            let doc = match p {
                ClientProperty::Int { min, max, .. } => {
                    schema["x-kubernetes-validations"] = serde_json::json!([{
                        "rule": format!(
                            "self.matches({}) && int(self) >= {min} && int(self) <= {max}",
                            cel_raw(CLIENT_INT_PATTERN)
                        ),
                        "message": client_property_message(key, *p),
                        "reason": "FieldValueInvalid",
                    }]);
                    format!("librdkafka property `{key}`: an integer from {min} to {max}, as a string.")
                }
                ClientProperty::Bool => {
                    schema["enum"] = serde_json::json!(["true", "false"]);
                    format!("librdkafka property `{key}`: \"true\" or \"false\".")
                }
                ClientProperty::Enum(values) => {
                    schema["enum"] = serde_json::json!(values);
                    format!("librdkafka property `{key}`: one of {}.", values.join(", "))
                }
                ClientProperty::Text => format!("librdkafka property `{key}` (as a string)."),
            };
            schema["description"] = serde_json::Value::String(doc);
            (key.to_string(), schema)
        })
        .collect();
    let relations: Vec<serde_json::Value> = CLIENT_CONFIG_RELATIONS
        .iter()
        .map(|(larger, smaller, slack, only_when_set)| {
            let value = |key: &str| {
                let f = cel_field(key);
                format!(
                    "(has(self.{f}) && self.{f}.matches({re}) ? int(self.{f}) : {d})",
                    re = cel_raw(CLIENT_INT_PATTERN),
                    d = int_default(key)
                )
            };
            let plus = if *slack > 0 { format!(" + {slack}") } else { String::new() };
            let compare = format!("{} >= {}{plus}", value(larger), value(smaller));
            let rule = if *only_when_set { format!("!has(self.{}) || {compare}", cel_field(larger)) } else { compare };
            serde_json::json!({
                "rule": rule,
                "message": relation_message(larger, smaller, *slack),
                "reason": "FieldValueInvalid",
            })
        })
        .collect();
    schemars::json_schema!({
        "type": "object",
        "properties": properties,
        "x-kubernetes-validations": relations,
    })
}

fn relation_message(larger: &str, smaller: &str, slack: i64) -> String {
    let plus = if slack > 0 { format!(" + {slack}") } else { String::new() };
    format!(
        "source.config.{larger} must be at least source.config.{smaller}{plus} (librdkafka refuses to start otherwise; \
         unset values count as {} and {})",
        int_default(larger),
        int_default(smaller)
    )
}

/// Client properties librdkafka refuses with `group.protocol=consumer` (its `conf_finalize`: "not supported for
/// `group.protocol=consumer`. It is defined broker side"), with the broker property that replaces each. Of the
/// others it refuses, `partition.assignment.strategy` and `group.protocol.type` are not in [`CLIENT_CONFIG`] at
/// all (kpipe sets the assignor itself).
pub const BROKER_SIDE_WITH_CONSUMER_PROTOCOL: &[(&str, &str)] = &[
    ("session.timeout.ms", "group.consumer.session.timeout.ms"),
    ("heartbeat.interval.ms", "group.consumer.heartbeat.interval.ms"),
];

/// The property that picks the broker's assignor under `groupProtocol: consumer` (meaningless under `classic`).
pub const REMOTE_ASSIGNOR: &str = "group.remote.assignor";

fn broker_side_message(key: &str) -> String {
    let broker = BROKER_SIDE_WITH_CONSUMER_PROTOCOL.iter().find(|(k, _)| *k == key).map_or("", |(_, b)| *b);
    format!(
        "source.config.{key} is not supported with source.groupProtocol consumer: the broker sets it ({broker}); \
         librdkafka refuses to start otherwise"
    )
}

fn remote_assignor_message() -> String {
    format!(
        "source.config.{REMOTE_ASSIGNOR} needs source.groupProtocol consumer (with classic kpipe's client-side \
         cooperative-sticky assignor applies)"
    )
}

/// `source.config.<key>` is refused with `groupProtocol: consumer` (one of [`BROKER_SIDE_WITH_CONSUMER_PROTOCOL`]).
pub fn not_with_consumer_protocol(key: &str) -> Rule {
    Rule::new(format!(
        "!has(self.groupProtocol) || self.groupProtocol != 'consumer' || !has(self.config) || !has(self.config.{})",
        cel_field(key)
    ))
    .message(Message::Message(broker_side_message(key)))
    .field_path(".config")
    .reason(Reason::FieldValueForbidden)
}

/// `source.config.group.remote.assignor` only with `groupProtocol: consumer`.
pub fn remote_assignor_needs_consumer_protocol() -> Rule {
    Rule::new(format!(
        "!has(self.config) || !has(self.config.{}) || (has(self.groupProtocol) && self.groupProtocol == 'consumer')",
        cel_field(REMOTE_ASSIGNOR)
    ))
    .message(Message::Message(remote_assignor_message()))
    .field_path(".config")
    .reason(Reason::FieldValueForbidden)
}

/// What `groupProtocol` forbids in `config`, as `(field, message)`: the broker-side properties under `consumer`,
/// the remote assignor under `classic`.
pub fn group_protocol_problems(protocol: GroupProtocol, config: &BTreeMap<String, String>) -> Vec<(String, String)> {
    let field = |key: &str| format!("spec.source.config.{key}");
    match protocol {
        GroupProtocol::Consumer => BROKER_SIDE_WITH_CONSUMER_PROTOCOL
            .iter()
            .filter(|(key, _)| config.contains_key(*key))
            .map(|(key, _)| (field(key), broker_side_message(key)))
            .collect(),
        GroupProtocol::Classic if config.contains_key(REMOTE_ASSIGNOR) => {
            vec![(field(REMOTE_ASSIGNOR), remote_assignor_message())]
        }
        GroupProtocol::Classic => Vec::new(),
    }
}

/// A list of topic names (`source.topics`): 1–64 distinct valid names.
pub fn topic_list_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "minItems": 1,
        "maxItems": 64,
        "x-kubernetes-list-type": "set",
        "items": topic_schema_value(),
    })
}

/// One topic name (`deadLetter.topic`, `processor.kafka.topic`).
pub fn topic_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::Schema::try_from(topic_schema_value()).unwrap_or_default()
}

fn topic_schema_value() -> serde_json::Value {
    serde_json::json!({
        "type": "string",
        "minLength": 1,
        "maxLength": 249,
        "pattern": TOPIC_PATTERN,
        "x-kubernetes-validations": [topic_name_rule_value()],
    })
}

fn topic_name_rule_value() -> serde_json::Value {
    serde_json::json!({
        "rule": "self != '.' && self != '..'",
        "message": "a topic name must not be '.' or '..' (Kafka forbids both)",
        "reason": "FieldValueInvalid",
    })
}

/// Bootstrap servers: 1–32 `host:port` / `[IPv6]:port` entries.
pub fn bootstrap_servers_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "minItems": 1,
        "maxItems": 32,
        "items": {
            "type": "string",
            "maxLength": 253,
            "x-kubernetes-validations": [{
                "rule": format!("self.matches({})", cel_raw(BOOTSTRAP_SERVER_PATTERN)),
                "message": "source.bootstrapServers entries must be host:port or [IPv6]:port (brackets required \
                    around an IPv6 address) with a port from 1 to 65535",
                "reason": "FieldValueInvalid",
            }],
        },
    })
}

/// The HTTP processor's URL.
pub fn http_url_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    url_schema(HTTP_URL_MESSAGE)
}

/// An http(s) URL string ([`HTTP_URL_PATTERN`], at most 2048 characters) rejected with `message`.
fn url_schema(message: &str) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "maxLength": 2048,
        "x-kubernetes-validations": [{
            "rule": format!("self.matches({})", cel_raw(HTTP_URL_PATTERN)),
            "message": message,
            "reason": "FieldValueInvalid",
        }],
    })
}

const HTTP_URL_MESSAGE: &str = "processor.http.url must be http:// or https:// (any case), a host (DNS name, IPv4 or \
    [IPv6]), an optional port from 1 to 65535 and an optional path of printable ASCII without spaces; no user info";

/// HTTP request headers: at most 32, names RFC 9110 tokens, values without control characters.
pub fn http_headers_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "maxProperties": 32,
        "additionalProperties": {"type": "string", "maxLength": 4096, "pattern": HEADER_VALUE_PATTERN},
        "x-kubernetes-validations": [{
            "rule": format!("self.all(k, k.matches({}))", cel_raw(HEADER_NAME_PATTERN)),
            "message": "processor.http.headers names must be HTTP tokens (RFC 9110: letters, digits and \
                !#$%&'*+-.^_`|~, no spaces or colons)",
            "reason": "FieldValueInvalid",
        }],
    })
}

fn qualified_keys_rule(field: &str) -> serde_json::Value {
    serde_json::json!({
        "rule": format!(
            "self.all(k, k.matches({}) && (!k.contains('/') || k.indexOf('/') <= 253))",
            cel_raw(QUALIFIED_NAME_PATTERN)
        ),
        "message": format!(
            "{field} keys must be qualified names: [prefix/]name, name at most 63 characters of alphanumerics, '-', \
             '_' or '.' beginning and ending with an alphanumeric, prefix a lower-case DNS subdomain"
        ),
        "reason": "FieldValueInvalid",
    })
}

/// Labels of the worker pods (`worker.podLabels`) and `worker.nodeSelector`: Kubernetes label keys
/// and values.
pub fn labels_schema(field: &str) -> schemars::Schema {
    schemars::Schema::try_from(serde_json::json!({
        "type": "object",
        // Bounds the key rule's CEL cost estimate (without it the apiserver rejects the CRD: the estimate
        // assumes as many keys as fit in a request).
        "maxProperties": MAX_WORKER_MAP_ENTRIES,
        "additionalProperties": {"type": "string", "maxLength": 63, "pattern": LABEL_VALUE_PATTERN},
        "x-kubernetes-validations": [qualified_keys_rule(field)],
    }))
    .unwrap_or_default()
}

/// Most entries of `worker.podLabels`, `worker.podAnnotations` and `worker.nodeSelector`.
pub const MAX_WORKER_MAP_ENTRIES: i64 = 64;

/// `worker.podLabels`.
pub fn pod_labels_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    labels_schema("worker.podLabels")
}

/// `worker.nodeSelector`.
pub fn node_selector_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    labels_schema("worker.nodeSelector")
}

/// `worker.podAnnotations`: Kubernetes annotation keys, any values.
pub fn pod_annotations_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::Schema::try_from(serde_json::json!({
        "type": "object",
        "maxProperties": MAX_WORKER_MAP_ENTRIES,
        "additionalProperties": {"type": "string"},
        "x-kubernetes-validations": [qualified_keys_rule("worker.podAnnotations")],
    }))
    .unwrap_or_default()
}

/// Why a processor is refused when it does not name exactly one kind.
pub const NOOP_HINT: &str = "processor must set exactly one of http, kafka or noop (a bare `noop:` is null and is \
    dropped by the apiserver: write `noop: {}`)";

pub fn exactly_one_processor() -> Rule {
    Rule::new("[has(self.http), has(self.kafka), has(self.noop)].filter(x, x).size() == 1")
        .message(NOOP_HINT)
        .reason(Reason::FieldValueInvalid)
}

/// `PLAIN` sends the password as is: only over TLS.
pub fn plain_needs_tls() -> Rule {
    Rule::new("!has(self.sasl) || self.sasl.mechanism != 'PLAIN' || has(self.tls)")
        .message("SASL PLAIN sends the password in clear: set source.auth.tls as well")
        .field_path(".tls")
        .reason(Reason::FieldValueRequired)
}

/// Username/password mechanisms take `secretRef`, OAUTHBEARER takes `oidc`.
pub fn sasl_credentials() -> Rule {
    Rule::new(
        "self.mechanism == 'OAUTHBEARER' ? (has(self.oidc) && !has(self.secretRef)) : (has(self.secretRef) && \
         !has(self.oidc))",
    )
    .message(SASL_CREDENTIALS_MESSAGE)
    .reason(Reason::FieldValueInvalid)
}

const SASL_CREDENTIALS_MESSAGE: &str = "sasl.mechanism OAUTHBEARER takes sasl.oidc (and no secretRef); PLAIN and \
    SCRAM-* take sasl.secretRef (and no oidc)";

/// The OIDC token endpoint: the same URL syntax as `processor.http.url`.
pub fn token_endpoint_url_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    url_schema(TOKEN_URL_MESSAGE)
}

const TOKEN_URL_MESSAGE: &str = "sasl.oidc.tokenEndpointUrl must be http:// or https://, a host (DNS name, IPv4 or \
    [IPv6]), an optional port from 1 to 65535 and an optional path of printable ASCII without spaces; no user info";

/// Pattern of a SASL extension key (RFC 7628 section 3.1: `key = 1*(ALPHA)`).
pub const SASL_EXTENSION_KEY_PATTERN: &str = "^[A-Za-z]+$";
/// Pattern of a SASL extension value as librdkafka passes them (`k=v,k=v`): printable ASCII without `,`, `=`.
pub const SASL_EXTENSION_VALUE_PATTERN: &str = "^[ -+\\--<>-~]*$";

/// OAUTHBEARER SASL extensions: at most 16, keys letters only and not `auth`.
pub fn sasl_extensions_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "maxProperties": 16,
        "additionalProperties": {"type": "string", "maxLength": 1024, "pattern": SASL_EXTENSION_VALUE_PATTERN},
        "x-kubernetes-validations": [{
            "rule": format!("self.all(k, k.matches({}) && k != 'auth')", cel_raw(SASL_EXTENSION_KEY_PATTERN)),
            "message": "sasl.oidc.extensions keys must be letters only (RFC 7628) and not 'auth'",
            "reason": "FieldValueInvalid",
        }],
    })
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

pub fn dead_letter_not_forward_topic() -> Rule {
    Rule::new(
        "!has(self.deadLetter) || !has(self.processor.kafka) || self.deadLetter.topic != self.processor.kafka.topic",
    )
    .message("deadLetter.topic must not be processor.kafka.topic (failed records would be mixed into the output)")
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
    Rule::new("!has(self.perPartition) || !has(self.perWorker) || self.perPartition <= self.perWorker")
        .message("concurrency.perPartition must not exceed concurrency.perWorker")
        .reason(Reason::FieldValueInvalid)
}

pub fn uncommitted_bound() -> Rule {
    Rule::new("!has(self.perPartition) || self.uncommittedPerPartition >= self.perPartition")
        .message("concurrency.uncommittedPerPartition must be at least concurrency.perPartition")
        .reason(Reason::FieldValueInvalid)
}

pub fn backoff_order() -> Rule {
    Rule::new("duration(self.initialBackoff) <= duration(self.maxBackoff)")
        .message("retry.initialBackoff must not exceed retry.maxBackoff")
        .reason(Reason::FieldValueInvalid)
}

pub fn open_duration_order() -> Rule {
    Rule::new("duration(self.openDuration) <= duration(self.maxOpenDuration)")
        .message("processor.circuitBreaker.openDuration must not exceed processor.circuitBreaker.maxOpenDuration")
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

pub fn duration_between(field: &str, (min, max): (&str, &str)) -> Rule {
    Rule::new(format!("duration(self) >= duration('{min}') && duration(self) <= duration('{max}')"))
        .message(Message::Message(format!("{field} must be between {min} and {max}")))
        .reason(Reason::FieldValueInvalid)
}

/// A rule broken: the field (path from the object root, as the apiserver names it) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// e.g. `spec.source.bootstrapServers[0]`.
    pub field: String,
    pub message: String,
}

struct Patterns {
    topic: Regex,
    bootstrap: Regex,
    url: Regex,
    header_name: Regex,
    header_value: Regex,
    dns_subdomain: Regex,
    qualified_name: Regex,
    label_value: Regex,
    secret_key: Regex,
    image: Regex,
    client_int: Regex,
}

static PATTERNS: LazyLock<Result<Patterns, regex::Error>> = LazyLock::new(|| {
    Ok(Patterns {
        topic: Regex::new(TOPIC_PATTERN)?,
        bootstrap: Regex::new(BOOTSTRAP_SERVER_PATTERN)?,
        url: Regex::new(HTTP_URL_PATTERN)?,
        header_name: Regex::new(HEADER_NAME_PATTERN)?,
        header_value: Regex::new(HEADER_VALUE_PATTERN)?,
        dns_subdomain: Regex::new(DNS_SUBDOMAIN_PATTERN)?,
        qualified_name: Regex::new(QUALIFIED_NAME_PATTERN)?,
        label_value: Regex::new(LABEL_VALUE_PATTERN)?,
        secret_key: Regex::new(SECRET_KEY_PATTERN)?,
        image: Regex::new(IMAGE_PATTERN)?,
        client_int: Regex::new(CLIENT_INT_PATTERN)?,
    })
});

/// Checks a pipeline named `name` against every rule of the schema that the Rust types do not
/// already enforce by construction (types, enums, exactly-one processor), returning the first
/// problem. The apiserver enforces the same rules at admission; this catches objects admitted
/// under an older schema and hand-written worker configurations.
pub fn check(name: &str, spec: &ConsumerPipelineSpec) -> Result<(), FieldError> {
    match problems(name, spec).into_iter().next() {
        Some(problem) => Err(problem),
        None => Ok(()),
    }
}

/// Every problem [`check`] would report, in field order.
pub fn problems(name: &str, spec: &ConsumerPipelineSpec) -> Vec<FieldError> {
    let mut out = Vec::new();
    let mut bad = |field: String, message: String| out.push(FieldError { field, message });
    let p = match PATTERNS.as_ref() {
        Ok(p) => p,
        Err(e) => {
            bad("spec".into(), format!("kpipe's validation patterns do not compile: {e}"));
            return out;
        }
    };
    if name.len() > MAX_PIPELINE_NAME_LEN {
        bad("metadata.name".into(), format!("must be at most {MAX_PIPELINE_NAME_LEN} characters"));
    }
    let topic_ok = |t: &str| t.len() <= 249 && p.topic.is_match(t) && t != "." && t != "..";

    let s = &spec.source;
    if s.bootstrap_servers.is_empty() || s.bootstrap_servers.len() > 32 {
        bad("spec.source.bootstrapServers".into(), "must list 1 to 32 brokers".into());
    }
    for (i, server) in s.bootstrap_servers.iter().enumerate() {
        if server.len() > 253 || !p.bootstrap.is_match(server) {
            bad(
                format!("spec.source.bootstrapServers[{i}]"),
                "must be host:port or [IPv6]:port with a port from 1 to 65535".into(),
            );
        }
    }
    if s.topics.is_empty() || s.topics.len() > 64 {
        bad("spec.source.topics".into(), "must list 1 to 64 topics".into());
    }
    for (i, topic) in s.topics.iter().enumerate() {
        if !topic_ok(topic) {
            bad(format!("spec.source.topics[{i}]"), "not a valid Kafka topic name".into());
        } else if s.topics[..i].contains(topic) {
            bad(format!("spec.source.topics[{i}]"), format!("duplicate topic {topic:?}"));
        }
    }
    if let Some(group) = &s.group_id
        && (group.is_empty() || group.len() > 249 || !p.topic.is_match(group))
    {
        bad("spec.source.groupId".into(), "must be 1 to 249 letters, digits, '.', '_' or '-'".into());
    }
    if let Some(auth) = &s.auth {
        let secret = |field: &str, name: &str, out: &mut Vec<(String, String)>| {
            if name.len() > 253 || !p.dns_subdomain.is_match(name) {
                out.push((field.into(), "must be a Secret name (a lower-case DNS subdomain)".into()));
            }
        };
        let key = |field: &str, key: &str, out: &mut Vec<(String, String)>| {
            if key.len() > 253 || !p.secret_key.is_match(key) {
                out.push((field.into(), "must be a Secret key (alphanumerics, '-', '_', '.'; not '.' or '..')".into()));
            }
        };
        let mut found = Vec::new();
        if let Some(sasl) = &auth.sasl {
            let oauth = sasl.mechanism == SaslMechanism::OAuthBearer;
            if oauth != sasl.oidc.is_some() || oauth == sasl.secret_ref.is_some() {
                found.push(("spec.source.auth.sasl".into(), SASL_CREDENTIALS_MESSAGE.into()));
            }
            if sasl.mechanism == SaslMechanism::Plain && auth.tls.is_none() {
                found.push((
                    "spec.source.auth.tls".into(),
                    "SASL PLAIN sends the password in clear: set source.auth.tls as well".into(),
                ));
            }
            if let Some(r) = &sasl.secret_ref {
                secret("spec.source.auth.sasl.secretRef.name", &r.name, &mut found);
                key("spec.source.auth.sasl.secretRef.usernameKey", &r.username_key, &mut found);
                key("spec.source.auth.sasl.secretRef.passwordKey", &r.password_key, &mut found);
            }
            if let Some(o) = &sasl.oidc {
                if o.token_endpoint_url.len() > 2048
                    || !p.url.is_match(&o.token_endpoint_url)
                    || url::Url::parse(&o.token_endpoint_url).is_err()
                {
                    found.push(("spec.source.auth.sasl.oidc.tokenEndpointUrl".into(), TOKEN_URL_MESSAGE.into()));
                }
                let r = &o.client_secret_ref;
                secret("spec.source.auth.sasl.oidc.clientSecretRef.name", &r.name, &mut found);
                key("spec.source.auth.sasl.oidc.clientSecretRef.clientIdKey", &r.client_id_key, &mut found);
                key("spec.source.auth.sasl.oidc.clientSecretRef.clientSecretKey", &r.client_secret_key, &mut found);
                if o.extensions.len() > 16 {
                    found.push(("spec.source.auth.sasl.oidc.extensions".into(), "at most 16 extensions".into()));
                }
                for (k, v) in &o.extensions {
                    let key_ok = !k.is_empty() && k != "auth" && k.chars().all(|c| c.is_ascii_alphabetic());
                    let value_ok =
                        v.len() <= 1024 && v.chars().all(|c| (' '..='~').contains(&c) && c != ',' && c != '=');
                    if !key_ok || !value_ok {
                        found.push((
                            format!("spec.source.auth.sasl.oidc.extensions.{k}"),
                            "keys letters only (not 'auth'); values printable ASCII without ',' or '='".into(),
                        ));
                    }
                }
                if let Some(scope) = &o.scope
                    && (scope.is_empty()
                        || scope.len() > 1024
                        || scope.split(' ').any(|t| {
                            t.is_empty() || !t.chars().all(|c| ('!'..='~').contains(&c) && c != '"' && c != '\\')
                        }))
                {
                    found.push((
                        "spec.source.auth.sasl.oidc.scope".into(),
                        "space-separated scope tokens of printable ASCII without '\"' or '\\'".into(),
                    ));
                }
            }
        }
        if let Some(tls) = &auth.tls {
            if let Some(ca) = &tls.ca_secret_ref {
                secret("spec.source.auth.tls.caSecretRef.name", &ca.name, &mut found);
                key("spec.source.auth.tls.caSecretRef.key", &ca.key, &mut found);
            }
            if let Some(client) = &tls.client_cert_secret_ref {
                secret("spec.source.auth.tls.clientCertSecretRef.name", &client.name, &mut found);
            }
        }
        for (field, message) in found {
            bad(field, message);
        }
    }
    for (field, message) in client_config_problems(&s.config, p) {
        bad(field, message);
    }
    for (field, message) in group_protocol_problems(s.group_protocol, &s.config) {
        bad(field, message);
    }

    match &spec.processor.kind {
        Processor::Http(h) => {
            if h.url.len() > 2048 || !p.url.is_match(&h.url) {
                bad("spec.processor.http.url".into(), HTTP_URL_MESSAGE.into());
            } else if let Err(e) = url::Url::parse(&h.url) {
                // What a pattern cannot see (a malformed `xn--` IDNA label): the worker's HTTP client parses the
                // URL with this crate, so the operator rejects it before any worker starts.
                bad("spec.processor.http.url".into(), format!("processor.http.url does not parse: {e}"));
            }
            if let Some(message) = duration_out_of(h.timeout, HTTP_TIMEOUT_RANGE.0, HTTP_TIMEOUT_RANGE.1) {
                bad("spec.processor.http.timeout".into(), message);
            }
            if h.headers.len() > 32 {
                bad("spec.processor.http.headers".into(), "at most 32 headers".into());
            }
            for (name, value) in &h.headers {
                if !p.header_name.is_match(name) {
                    bad("spec.processor.http.headers".into(), format!("header name {name:?} is not an HTTP token"));
                }
                if value.len() > 4096 || !p.header_value.is_match(value) {
                    bad(
                        format!("spec.processor.http.headers.{name}"),
                        "header value must not contain control characters".into(),
                    );
                }
            }
        }
        Processor::Kafka(k) => {
            if !topic_ok(&k.topic) {
                bad("spec.processor.kafka.topic".into(), "not a valid Kafka topic name".into());
            }
            if s.topics.contains(&k.topic) {
                bad("spec.processor.kafka.topic".into(), "must not be one of source.topics".into());
            }
            if k.headers.len() > 32 {
                bad("spec.processor.kafka.headers".into(), "at most 32 headers".into());
            }
        }
        Processor::Noop(_) => {}
    }
    if let Some(cb) = &spec.processor.circuit_breaker {
        let (w_min, w_max) = BREAKER_WINDOW_RANGE;
        if let Some(message) = duration_out_of(cb.window, w_min, w_max) {
            bad("spec.processor.circuitBreaker.window".into(), message);
        }
        if let Some(n) = cb.minimum_calls
            && !(1..=10_000).contains(&n)
        {
            bad("spec.processor.circuitBreaker.minimumCalls".into(), "must be from 1 to 10000".into());
        }
        if !(1..=100).contains(&cb.failure_rate_threshold) {
            bad("spec.processor.circuitBreaker.failureRateThreshold".into(), "must be from 1 to 100".into());
        }
        let (o_min, o_max) = BREAKER_OPEN_RANGE;
        if let Some(message) = duration_out_of(cb.open_duration, o_min, o_max) {
            bad("spec.processor.circuitBreaker.openDuration".into(), message);
        }
        if let Some(message) = duration_out_of(cb.max_open_duration, o_min, o_max) {
            bad("spec.processor.circuitBreaker.maxOpenDuration".into(), message);
        }
        if cb.open_duration > cb.max_open_duration {
            bad(
                "spec.processor.circuitBreaker".into(),
                "processor.circuitBreaker.openDuration must not exceed processor.circuitBreaker.maxOpenDuration".into(),
            );
        }
    }

    let c = &spec.concurrency;
    let in_range = |v: u32, min: u32, max: u32| (min..=max).contains(&v);
    if c.per_partition.is_some_and(|v| !in_range(v, 1, 10_000)) {
        bad("spec.concurrency.perPartition".into(), "must be from 1 to 10000".into());
    }
    if c.per_worker.is_some_and(|v| !in_range(v, 1, 100_000)) {
        bad("spec.concurrency.perWorker".into(), "must be from 1 to 100000".into());
    }
    if !in_range(c.uncommitted_per_partition, 1, 1_000_000) {
        bad("spec.concurrency.uncommittedPerPartition".into(), "must be from 1 to 1000000".into());
    }
    if let (Some(partition), Some(worker)) = (c.per_partition, c.per_worker)
        && partition > worker
    {
        bad("spec.concurrency".into(), "concurrency.perPartition must not exceed concurrency.perWorker".into());
    }
    if c.per_partition.is_some_and(|partition| c.uncommitted_per_partition < partition) {
        bad(
            "spec.concurrency".into(),
            "concurrency.uncommittedPerPartition must be at least concurrency.perPartition".into(),
        );
    }

    let b = &spec.batch;
    if !in_range(b.max_records, 1, 100_000) {
        bad("spec.batch.maxRecords".into(), "must be from 1 to 100000".into());
    }
    if !(1..=MAX_BATCH_BYTES).contains(&b.max_bytes.as_u64()) {
        bad("spec.batch.maxBytes".into(), "must be from 1 byte to 1Gi".into());
    }
    if let Some(message) = duration_out_of(b.max_wait, "0s", MAX_WAIT_MAX) {
        bad("spec.batch.maxWait".into(), message);
    }

    let r = &spec.retry;
    if !(1..=1000).contains(&r.max_attempts) {
        bad("spec.retry.maxAttempts".into(), "must be from 1 to 1000".into());
    }
    if !(1.0..=10.0).contains(&r.multiplier) {
        bad("spec.retry.multiplier".into(), "must be from 1 to 10".into());
    }
    if let Some(message) = duration_out_of(r.initial_backoff, "0s", BACKOFF_MAX) {
        bad("spec.retry.initialBackoff".into(), message);
    }
    if let Some(message) = duration_out_of(r.max_backoff, "0s", BACKOFF_MAX) {
        bad("spec.retry.maxBackoff".into(), message);
    }
    if r.initial_backoff > r.max_backoff {
        bad("spec.retry".into(), "retry.initialBackoff must not exceed retry.maxBackoff".into());
    }
    if let Some(age) = r.max_record_age
        && let Some(message) = duration_out_of(age, "0s", MAX_RECORD_AGE_MAX)
    {
        bad("spec.retry.maxRecordAge".into(), message);
    }

    if let Some(dl) = &spec.dead_letter {
        if !topic_ok(&dl.topic) {
            bad("spec.deadLetter.topic".into(), "not a valid Kafka topic name".into());
        }
        if s.topics.contains(&dl.topic) {
            bad("spec.deadLetter.topic".into(), "must not be one of source.topics".into());
        }
        if let Processor::Kafka(k) = &spec.processor.kind
            && k.topic == dl.topic
        {
            bad("spec.deadLetter.topic".into(), "must not be processor.kafka.topic".into());
        }
    } else if spec.on_failure == Some(crate::v1alpha1::OnFailure::DeadLetter) {
        bad("spec.deadLetter".into(), "deadLetter.topic is required when onFailure is deadLetter".into());
    }

    let sc = &spec.scaling;
    if !(0..=1000).contains(&sc.min_replicas) {
        bad("spec.scaling.minReplicas".into(), "must be from 0 to 1000".into());
    }
    if !(1..=1000).contains(&sc.max_replicas) {
        bad("spec.scaling.maxReplicas".into(), "must be from 1 to 1000".into());
    }
    if sc.min_replicas > sc.max_replicas {
        bad("spec.scaling".into(), "scaling.minReplicas must not exceed scaling.maxReplicas".into());
    }
    if sc.lag_threshold.is_some_and(|t| t < 1) {
        bad("spec.scaling.lagThreshold".into(), "must be at least 1".into());
    }
    if sc.target_drain_seconds.is_some_and(|t| !(1..=86_400).contains(&t)) {
        bad("spec.scaling.targetDrainSeconds".into(), "must be from 1 to 86400".into());
    }
    if sc.lag_threshold.is_some() && sc.target_drain_seconds.is_some() {
        bad("spec.scaling".into(), "scaling.lagThreshold and scaling.targetDrainSeconds are mutually exclusive".into());
    }
    if sc.activation_lag < 0 {
        bad("spec.scaling.activationLag".into(), "must not be negative".into());
    }
    if let Some(message) = duration_out_of(sc.poll_interval, POLL_INTERVAL_RANGE.0, POLL_INTERVAL_RANGE.1) {
        bad("spec.scaling.pollInterval".into(), message);
    }
    if let Some(message) = duration_out_of(sc.scale_down_stabilization, "0s", SCALE_DOWN_STABILIZATION_MAX) {
        bad("spec.scaling.scaleDownStabilization".into(), message);
    }
    if let Some(message) = duration_out_of(sc.cooldown_to_zero, "0s", COOLDOWN_TO_ZERO_MAX) {
        bad("spec.scaling.cooldownToZero".into(), message);
    }
    if spec.replicas.is_some_and(|r| !(0..=10_000).contains(&r)) {
        bad("spec.replicas".into(), "must be from 0 to 10000".into());
    }

    let w = &spec.worker;
    if let Some(image) = &w.image
        && (image.len() > 512 || !p.image.is_match(image))
    {
        bad("spec.worker.image".into(), "must be 1 to 512 printable characters without spaces".into());
    }
    if let Some(sa) = &w.service_account_name
        && (sa.len() > 253 || !p.dns_subdomain.is_match(sa))
    {
        bad(
            "spec.worker.serviceAccountName".into(),
            "must be a ServiceAccount name (a lower-case DNS subdomain)".into(),
        );
    }
    let key_ok = |k: &str| p.qualified_name.is_match(k) && k.find('/').is_none_or(|slash| slash <= 253);
    for (field, map, values_are_labels) in [
        ("podLabels", &w.pod_labels, true),
        ("nodeSelector", &w.node_selector, true),
        ("podAnnotations", &w.pod_annotations, false),
    ] {
        for (k, v) in map {
            if !key_ok(k) {
                bad(format!("spec.worker.{field}"), format!("key {k:?} is not a qualified name ([prefix/]name)"));
            }
            if values_are_labels && (v.len() > 63 || !p.label_value.is_match(v)) {
                bad(format!("spec.worker.{field}.{k}"), "must be a label value (at most 63 characters)".into());
            }
        }
    }
    if w.env.len() > 64 {
        bad("spec.worker.env".into(), "at most 64 variables".into());
    }
    if w.tolerations.len() > 32 {
        bad("spec.worker.tolerations".into(), "at most 32 tolerations".into());
    }
    out
}

fn client_config_problems(config: &BTreeMap<String, String>, p: &Patterns) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (key, value) in config {
        let field = format!("spec.source.config.{key}");
        let Some(prop) = property(key) else {
            out.push((field, "not an allow-listed librdkafka property".into()));
            continue;
        };
        let ok = value.len() <= 256
            && match prop {
                ClientProperty::Int { min, max, .. } => {
                    p.client_int.is_match(value) && value.parse::<i64>().is_ok_and(|v| (min..=max).contains(&v))
                }
                ClientProperty::Bool => value == "true" || value == "false",
                ClientProperty::Enum(values) => values.contains(&value.as_str()),
                ClientProperty::Text => true,
            };
        if !ok {
            out.push((field, client_property_message(key, prop)));
        }
    }
    let value = |key: &str| {
        config
            .get(key)
            .filter(|v| p.client_int.is_match(v))
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or_else(|| int_default(key))
    };
    for (larger, smaller, slack, only_when_set) in CLIENT_CONFIG_RELATIONS {
        if *only_when_set && !config.contains_key(*larger) {
            continue;
        }
        if value(larger) < value(smaller) + slack {
            out.push(("spec.source.config".into(), relation_message(larger, smaller, *slack)));
        }
    }
    out
}

/// `None` when `min <= d <= max`, else the message (bounds are the same literals the CEL rules use).
fn duration_out_of(d: Duration, min: &str, max: &str) -> Option<String> {
    let (lo, hi) = (min.parse::<Duration>().ok()?, max.parse::<Duration>().ok()?);
    (d < lo || d > hi).then(|| format!("must be between {min} and {max}"))
}
