//! `ConsumerPipeline.spec`: what the user asks for.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, EnvVar, ResourceRequirements, Toleration};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::status::ConsumerPipelineStatus;
use crate::{ByteSize, Duration, rules};

/// A Kafka consumer pipeline that kpipe runs serverless-style: worker pods consume the source
/// topics, hand records to the processor in batches, retry failures, dead-letter what keeps
/// failing, and commit only offsets whose records are done. The operator scales the workers on
/// consumer-group lag, from zero up to one pod per partition.
// Several printer columns share a type, which clippy mistakes for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kpipe.io",
    version = "v1alpha1",
    kind = "ConsumerPipeline",
    plural = "consumerpipelines",
    singular = "consumerpipeline",
    shortname = "cpl",
    category = "kpipe",
    namespaced,
    status = "ConsumerPipelineStatus",
    derive = "PartialEq",
    doc = "A Kafka consumer pipeline run by kpipe: worker pods that consume topics, process records in batches with retries and a dead-letter topic, commit in order, and scale on consumer-group lag (to zero and back).",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".status.desiredReplicas",
        description = "Replicas the scaler wants"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".status.replicas",
        description = "Worker replicas running"
    ),
    printcolumn(
        name = "Lag",
        type_ = "integer",
        json_path = ".status.lag.total",
        description = "Records of consumer-group lag"
    ),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        description = "Why the pipeline is (not) Ready: e.g. WorkersReady, ScaledToZero, CrashLoopingWorkers, Retrying"
    ),
    printcolumn(
        name = "DeadLetters",
        type_ = "integer",
        json_path = ".status.deadLetters.total",
        description = "Dead letters of the pipeline in its dead-letter topic"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = rules::dead_letter_required())]
#[x_kube(validation = rules::dead_letter_not_source())]
#[x_kube(validation = rules::dead_letter_not_forward_topic())]
#[x_kube(validation = rules::forward_topic_not_source())]
#[serde(rename_all = "camelCase")]
pub struct ConsumerPipelineSpec {
    /// Suspend the pipeline: scale the workers to zero and stop autoscaling. Committed offsets are
    /// kept, so resuming continues where the pipeline stopped.
    #[serde(default, skip_serializing_if = "is_false")]
    pub suspend: bool,

    /// Where records come from: the Kafka cluster, topics, consumer group and credentials.
    pub source: Source,

    /// What processes the records: exactly one of `http`, `kafka` or `noop`, and optionally the
    /// `circuitBreaker` that guards it.
    #[x_kube(validation = rules::exactly_one_processor())]
    pub processor: ProcessorSpec,

    /// Which records may be processed concurrently. `partition`: strictly one at a time, in offset
    /// order, per partition. `key`: records with the same key in order, different keys in
    /// parallel. `unordered`: any record in parallel. Commits are always in offset order.
    #[serde(default)]
    pub ordering: Ordering,

    /// Bounds on records being processed at once.
    #[serde(default)]
    pub concurrency: Concurrency,

    /// How records are grouped into processor requests.
    #[serde(default)]
    pub batch: Batch,

    /// How failed records are retried before the failure policy applies.
    #[serde(default)]
    pub retry: Retry,

    /// What happens to a record that still fails after its retries (or fails with a
    /// non-retryable error). `deadLetter`: write it to `deadLetter.topic` with context headers,
    /// then move on. `block`: keep retrying at the maximum backoff; the partition stalls and the
    /// stall shows in metrics and status. `drop`: count it and move on (data is lost, so it must be
    /// chosen explicitly). Default: `deadLetter` when `deadLetter` is set, otherwise `block`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<OnFailure>,

    /// The dead-letter topic for records that exhaust their retries. Required when `onFailure` is
    /// `deadLetter`. It lives in the source cluster and must not be one of the source topics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<DeadLetter>,

    /// How the operator sizes the worker Deployment from consumer-group lag.
    #[serde(default)]
    pub scaling: Scaling,

    /// Pieces of the worker pod template.
    #[serde(default)]
    pub worker: WorkerTemplate,

    /// Desired replicas when `scaling.mode` is `external`: written through the scale subresource by
    /// an HPA, KEDA or `kubectl scale`. Ignored (and left alone) in `auto` mode, where the operator
    /// decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10000))]
    pub replicas: Option<i32>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The Kafka side of the pipeline.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = rules::not_with_consumer_protocol("session.timeout.ms"))]
#[x_kube(validation = rules::not_with_consumer_protocol("heartbeat.interval.ms"))]
#[x_kube(validation = rules::remote_assignor_needs_consumer_protocol())]
pub struct Source {
    /// Bootstrap brokers as `host:port`, or `[address]:port` for an IPv6 address; ports 1-65535.
    #[schemars(schema_with = "rules::bootstrap_servers_schema")]
    pub bootstrap_servers: Vec<String>,

    /// Topics to consume (distinct names). Each topic's partitions are spread over the workers.
    #[schemars(schema_with = "rules::topic_list_schema")]
    pub topics: Vec<String>,

    /// Consumer group id. Default: `<namespace>.<name>` of the pipeline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9._\-]+$"), length(min = 1, max = 249))]
    pub group_id: Option<String>,

    /// Where a partition the group never committed on starts: `earliest` (everything retained) or
    /// `latest` (records produced since the pipeline was created, so a partition added later is read
    /// from its start). A committed offset outside the retained log always restarts at the earliest
    /// retained record. Lag is counted from the same start point (docs/api.md, "Offsets and topic
    /// lifecycle").
    #[serde(default)]
    pub start_offset: StartOffset,

    /// The consumer group protocol. `classic`: the original join/sync protocol, with kpipe's
    /// cooperative-sticky assignor on the client (every broker version). `consumer`: the protocol of
    /// KIP-848 (Kafka 4.0 and later, enabled there by default): the broker assigns partitions and
    /// rebalances are incremental without a group-wide barrier. With `consumer` the session timeout,
    /// heartbeat interval and assignor are the broker's (`group.consumer.*`), so
    /// `config.session.timeout.ms` and `config.heartbeat.interval.ms` are rejected, and
    /// `config.group.remote.assignor` may pick the broker's assignor (librdkafka CONFIGURATION.md). Default:
    /// `classic` (not every broker implements `consumer`).
    #[serde(default, skip_serializing_if = "GroupProtocol::is_classic")]
    pub group_protocol: GroupProtocol,

    /// Authentication to the brokers. Credentials only by Secret reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<Auth>,

    /// Extra librdkafka client properties, restricted to an allow-list of tuning knobs (fetch sizes,
    /// timeouts, client.rack, isolation.level, ...). Security, group and offset properties are set by
    /// kpipe and cannot be overridden here.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "rules::client_config_schema")]
    pub config: BTreeMap<String, String>,
}

/// The consumer group protocol (librdkafka `group.protocol`).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum GroupProtocol {
    /// JoinGroup/SyncGroup with a client-side assignor (KIP-429 cooperative rebalancing).
    #[default]
    Classic,
    /// ConsumerGroupHeartbeat with server-side assignment (KIP-848; Kafka 4.0 and later).
    Consumer,
}

impl GroupProtocol {
    /// The default, left out when serialising (a worker configuration written before the field existed hashes the
    /// same, so adding it rolls no worker).
    pub fn is_classic(&self) -> bool {
        *self == Self::Classic
    }

    /// The librdkafka `group.protocol` value.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Classic => "classic",
            Self::Consumer => "consumer",
        }
    }
}

/// Where a consumer group without a committed offset starts.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum StartOffset {
    #[default]
    Earliest,
    Latest,
}

/// Authentication to the Kafka brokers. Credentials only by Secret reference (docs/security.md). The security
/// protocol follows from what is set: `sasl` + `tls` is SASL_SSL, `sasl` alone SASL_PLAINTEXT, `tls` alone SSL.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = rules::plain_needs_tls())]
pub struct Auth {
    /// SASL authentication; the credentials come from a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl: Option<SaslAuth>,
    /// TLS to the brokers. An empty object enables TLS with the system trust store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsAuth>,
}

/// SASL authentication: a username and password (`PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512`, from `secretRef`)
/// or an OAuth 2 bearer token (`OAUTHBEARER`, fetched with the OIDC client-credentials grant described by `oidc`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = rules::sasl_credentials())]
pub struct SaslAuth {
    /// SASL mechanism.
    pub mechanism: SaslMechanism,
    /// Secret (in the pipeline's namespace) holding the username and password. Required for `PLAIN` and
    /// `SCRAM-*`; not allowed with `OAUTHBEARER`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<CredentialsSecretRef>,
    /// OIDC client credentials for `OAUTHBEARER` (required with it, not allowed otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oidc: Option<OidcAuth>,
}

/// OAUTHBEARER tokens from an OpenID Connect / OAuth 2 token endpoint, client-credentials grant
/// (RFC 6749 section 4.4). The client fetches a token before connecting and refreshes it before it expires.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OidcAuth {
    /// The token endpoint, e.g. `https://idp.example.com/oauth2/token` (`http://` only for tests).
    #[schemars(schema_with = "rules::token_endpoint_url_schema")]
    pub token_endpoint_url: String,
    /// Secret (in the pipeline's namespace) holding the client id and client secret.
    pub client_secret_ref: OidcClientSecretRef,
    /// Scope(s) to request, space-separated (RFC 6749 section 3.3). Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024), regex(pattern = r"^[!#-\[\]-~]+( [!#-\[\]-~]+)*$"))]
    pub scope: Option<String>,
    /// SASL extensions sent with the token (RFC 7628), e.g. `logicalCluster: lkc-abc12` for Confluent Cloud: at
    /// most 16; keys letters only (not `auth`), values printable ASCII without `,` or `=`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "rules::sasl_extensions_schema")]
    pub extensions: BTreeMap<String, String>,
}

/// A Secret holding OIDC client credentials.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OidcClientSecretRef {
    /// Name of the Secret in the pipeline's namespace.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub name: String,
    /// Key of the client id in the Secret.
    #[serde(default = "default_client_id_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = rules::SECRET_KEY_PATTERN))]
    pub client_id_key: String,
    /// Key of the client secret in the Secret.
    #[serde(default = "default_client_secret_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = rules::SECRET_KEY_PATTERN))]
    pub client_secret_key: String,
}

fn default_client_id_key() -> String {
    "clientId".into()
}

fn default_client_secret_key() -> String {
    "clientSecret".into()
}

/// SASL mechanism.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
    #[serde(rename = "OAUTHBEARER")]
    OAuthBearer,
}

impl SaslMechanism {
    /// The librdkafka `sasl.mechanism` value.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
            Self::OAuthBearer => "OAUTHBEARER",
        }
    }
}

/// A Secret holding a username and password.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsSecretRef {
    /// Name of the Secret in the pipeline's namespace.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub name: String,
    /// Key of the username in the Secret.
    #[serde(default = "default_username_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = rules::SECRET_KEY_PATTERN))]
    pub username_key: String,
    /// Key of the password in the Secret.
    #[serde(default = "default_password_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = rules::SECRET_KEY_PATTERN))]
    pub password_key: String,
}

fn default_username_key() -> String {
    "username".into()
}

fn default_password_key() -> String {
    "password".into()
}

/// TLS to the brokers.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TlsAuth {
    /// Secret holding the CA certificate (PEM) that signed the brokers' certificates. Default: the
    /// system trust store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
    /// Secret holding a client certificate and key (PEM, keys `tls.crt` and `tls.key`) for mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_secret_ref: Option<LocalSecretRef>,
}

/// A key in a Secret.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret in the pipeline's namespace.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub name: String,
    /// Key in the Secret.
    #[serde(default = "default_ca_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = rules::SECRET_KEY_PATTERN))]
    pub key: String,
}

fn default_ca_key() -> String {
    "ca.crt".into()
}

/// A Secret in the pipeline's namespace.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LocalSecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub name: String,
}

/// What processes the records (exactly one of `http`, `kafka` or `noop`) and the circuit breaker
/// guarding it.
///
/// Deserialised through [`RawProcessorSpec`]: a flattened enum alone would take the first of two
/// processor keys and ignore the other, where the apiserver rejects the object.
#[derive(KubeSchema, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProcessorSpec {
    /// The processor (the `http`, `kafka` or `noop` key).
    #[serde(flatten)]
    pub kind: Processor,
    /// When the processor counts as unavailable and for how long the worker waits before probing
    /// it (http and kafka processors). Unset: on, with the defaults below and `minimumCalls`
    /// derived from `retry.maxAttempts` (docs/api.md, "Failure handling").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
}

/// The wire shape of [`ProcessorSpec`]: every processor key optional, checked to be exactly one.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawProcessorSpec {
    #[serde(default)]
    http: Option<HttpProcessor>,
    #[serde(default)]
    kafka: Option<KafkaProcessor>,
    #[serde(default)]
    noop: Option<NoopProcessor>,
    #[serde(default)]
    circuit_breaker: Option<CircuitBreaker>,
}

impl<'de> Deserialize<'de> for ProcessorSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = RawProcessorSpec::deserialize(deserializer)?;
        let kind = match (raw.http, raw.kafka, raw.noop) {
            (Some(h), None, None) => Processor::Http(h),
            (None, Some(k), None) => Processor::Kafka(k),
            (None, None, Some(n)) => Processor::Noop(n),
            _ => return Err(serde::de::Error::custom(rules::NOOP_HINT)),
        };
        Ok(Self { kind, circuit_breaker: raw.circuit_breaker })
    }
}

impl From<Processor> for ProcessorSpec {
    fn from(kind: Processor) -> Self {
        Self { kind, circuit_breaker: None }
    }
}

/// The processor circuit breaker (docs/api.md, "Failure handling"): when at least `minimumCalls`
/// processor calls in the last `window` finished and at least `failureRateThreshold` percent of
/// them failed because the processor was unavailable (timeout, connection error, HTTP
/// 500/502/503/504, a retryable produce error), the worker opens the circuit: no calls, no
/// attempts spent, nothing dead-lettered. After `openDuration` one call probes the processor;
/// each failed probe doubles the wait, up to `maxOpenDuration`; a successful probe closes it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
#[x_kube(validation = rules::open_duration_order())]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreaker {
    /// `false` turns the breaker off: an unavailable processor spends the records' attempts and
    /// they go to `onFailure` like any other failure.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Sliding time window of call outcomes the failure rate is computed over (1s to 1h).
    #[serde(default = "default_breaker_window")]
    #[x_kube(validation = rules::duration_between(
        "processor.circuitBreaker.window",
        rules::BREAKER_WINDOW_RANGE
    ))]
    pub window: Duration,
    /// Fewest call outcomes in the window before the circuit may open (1 to 10000). Unset:
    /// `min(5, retry.maxAttempts − 1)`, at least 1, so a record cannot exhaust its attempts on an
    /// outage before the circuit opens; a larger value lets a lone failing batch do so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub minimum_calls: Option<u32>,
    /// Percentage (1 to 100) of unavailable outcomes in the window that opens the circuit.
    #[serde(default = "default_failure_rate_threshold")]
    #[schemars(range(min = 1, max = 100))]
    pub failure_rate_threshold: u32,
    /// Wait after the circuit opens before the first probe (100ms to 1h).
    #[serde(default = "default_open_duration")]
    #[x_kube(validation = rules::duration_between(
        "processor.circuitBreaker.openDuration",
        rules::BREAKER_OPEN_RANGE
    ))]
    pub open_duration: Duration,
    /// Longest wait between probes while the processor stays unavailable (100ms to 1h, at least
    /// `openDuration`).
    #[serde(default = "default_max_open_duration")]
    #[x_kube(validation = rules::duration_between(
        "processor.circuitBreaker.maxOpenDuration",
        rules::BREAKER_OPEN_RANGE
    ))]
    pub max_open_duration: Duration,
}

fn default_true() -> bool {
    true
}

fn default_breaker_window() -> Duration {
    Duration::from_secs(10)
}

fn default_failure_rate_threshold() -> u32 {
    50
}

fn default_open_duration() -> Duration {
    Duration::from_secs(5)
}

fn default_max_open_duration() -> Duration {
    Duration::from_secs(60)
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self {
            enabled: true,
            window: default_breaker_window(),
            minimum_calls: None,
            failure_rate_threshold: default_failure_rate_threshold(),
            open_duration: default_open_duration(),
            max_open_duration: default_max_open_duration(),
        }
    }
}

/// The processor itself: exactly one of `http`, `kafka` or `noop`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub enum Processor {
    /// POST batches of records to an HTTP endpoint.
    Http(HttpProcessor),
    /// Forward every record to another Kafka topic (in the source cluster).
    Kafka(KafkaProcessor),
    /// Consume and commit only (benchmarks and smoke tests).
    Noop(NoopProcessor),
}

/// POST batches of records to an HTTP endpoint.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpProcessor {
    /// Endpoint that receives the records, e.g. `http://enricher.shop.svc:8080/records`. The scheme
    /// is `http` or `https` in any case; the host a DNS name, an IPv4 address or `[IPv6]`; no user info.
    #[schemars(schema_with = "rules::http_url_schema")]
    pub url: String,
    /// Wire format. `json`: a JSON batch. `protobuf`: a `kpipe.v1.RecordBatch` message.
    /// `cloudevents`: CloudEvents binary mode, one record per request.
    #[serde(default)]
    pub format: HttpFormat,
    /// Per-request timeout (1ms to 5m). A timeout is a retryable failure.
    #[serde(default = "default_http_timeout")]
    #[x_kube(validation = rules::duration_between("processor.http.timeout", rules::HTTP_TIMEOUT_RANGE))]
    pub timeout: Duration,
    /// Extra request headers (not secret): names are HTTP tokens, values without control characters.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "rules::http_headers_schema")]
    pub headers: BTreeMap<String, String>,
}

fn default_http_timeout() -> Duration {
    Duration::from_secs(5)
}

/// Wire format of the HTTP processor.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum HttpFormat {
    #[default]
    Json,
    Protobuf,
    Cloudevents,
}

/// Forward records to another topic in the source cluster.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KafkaProcessor {
    /// Output topic. Must not be one of the source topics.
    #[schemars(schema_with = "rules::topic_schema")]
    pub topic: String,
    /// `keep` the record key (same partitioning downstream) or `drop` it.
    #[serde(default)]
    pub key: KeyPolicy,
    /// Headers added to every forwarded record (original headers are kept).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub headers: BTreeMap<String, String>,
}

/// Whether a forwarded record keeps its key.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum KeyPolicy {
    #[default]
    Keep,
    Drop,
}

/// Consume and commit only.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct NoopProcessor {}

/// Which records may be processed concurrently.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum Ordering {
    Partition,
    #[default]
    Key,
    Unordered,
}

/// Bounds on records being processed at once.
///
/// `perPartition` and `perWorker` default by processor ([`Concurrency::effective`]): a Kafka forwarder's records in
/// flight cost a produce round trip, not a connection or a request to someone's service, and 256 of them bound it
/// to about a fifth of the rate it reaches with a few thousand (docs/BENCHMARKS.md, "The forwarder after three
/// fixes"). The bytes in flight are bounded worker-wide whatever these are (docs/api.md, "Backpressure").
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[x_kube(validation = rules::concurrency_bounds())]
#[x_kube(validation = rules::uncommitted_bound())]
#[serde(rename_all = "camelCase")]
pub struct Concurrency {
    /// Records in flight per partition (with `partition` ordering effectively 1 batch). Unset: 32, or 1024 for the
    /// `kafka` processor (never more than `perWorker` or `uncommittedPerPartition`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub per_partition: Option<u32>,
    /// Records in flight per worker pod, across all its partitions. Unset: 256, or 8192 for the `kafka` processor
    /// (never less than `perPartition`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub per_worker: Option<u32>,
    /// Records per partition that have been handed to the processor but are not yet below an
    /// acknowledged commit: the most a crash, a lost assignment or a failed commit can re-deliver
    /// per partition the worker owned. A partition that reaches it commits early and waits for the
    /// commit to be acknowledged before it starts more records.
    #[serde(default = "default_uncommitted_per_partition")]
    #[schemars(range(min = 1, max = 1000000))]
    pub uncommitted_per_partition: u32,
}

fn default_uncommitted_per_partition() -> u32 {
    16384
}

/// The concurrency a worker runs with: [`Concurrency`] with the processor's defaults filled in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EffectiveConcurrency {
    /// Records in flight per partition.
    pub per_partition: u32,
    /// Records in flight per worker pod.
    pub per_worker: u32,
    /// Records per partition handed out and not yet below an acknowledged commit.
    pub uncommitted_per_partition: u32,
}

impl Concurrency {
    /// `perPartition` and `perWorker` when unset, for `processor`: (32, 256) for `http` and `noop`, (1024, 8192) for
    /// `kafka`.
    pub fn defaults_for(processor: &Processor) -> (u32, u32) {
        match processor {
            Processor::Kafka(_) => (1024, 8192),
            Processor::Http(_) | Processor::Noop(_) => (32, 256),
        }
    }

    /// The values a worker with `processor` uses. An unset `perWorker` is the default, raised to an explicit
    /// `perPartition`; an unset `perPartition` is the default, lowered to `perWorker` and `uncommittedPerPartition`
    /// (so the two rules between them hold for defaults; explicit values are checked by the CRD's rules).
    pub fn effective(&self, processor: &Processor) -> EffectiveConcurrency {
        let (default_partition, default_worker) = Self::defaults_for(processor);
        let per_worker = self.per_worker.unwrap_or_else(|| default_worker.max(self.per_partition.unwrap_or(0)));
        let per_partition =
            self.per_partition.unwrap_or_else(|| default_partition.min(per_worker).min(self.uncommitted_per_partition));
        EffectiveConcurrency { per_partition, per_worker, uncommitted_per_partition: self.uncommitted_per_partition }
    }
}

impl Default for Concurrency {
    fn default() -> Self {
        Self { per_partition: None, per_worker: None, uncommitted_per_partition: default_uncommitted_per_partition() }
    }
}

/// How records are grouped into processor requests. A batch is sent when it reaches `maxRecords`
/// or `maxBytes`, or `maxWait` after its first record arrived.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Batch {
    /// Most records in one batch.
    #[serde(default = "default_max_records")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_records: u32,
    /// Most bytes (keys, values and headers) in one batch, e.g. `1Mi`: from 1 byte to 1Gi.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: ByteSize,
    /// Longest a batch waits for more records after its first one (at most 1m).
    #[serde(default = "default_max_wait")]
    #[x_kube(validation = rules::duration_at_most("batch.maxWait", rules::MAX_WAIT_MAX))]
    pub max_wait: Duration,
}

fn default_max_records() -> u32 {
    500
}

fn default_max_bytes() -> ByteSize {
    ByteSize::mib(1)
}

fn default_max_wait() -> Duration {
    Duration::from_millis(50)
}

impl Default for Batch {
    fn default() -> Self {
        Self { max_records: default_max_records(), max_bytes: default_max_bytes(), max_wait: default_max_wait() }
    }
}

/// Exponential backoff with full jitter: attempt n waits a random time in
/// [0, min(maxBackoff, initialBackoff × multiplier^(n-1))].
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
#[x_kube(validation = rules::backoff_order())]
#[serde(rename_all = "camelCase")]
pub struct Retry {
    /// Attempts per record, including the first. 1 means no retry.
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_attempts: u32,
    /// Backoff cap for the first retry (at most 1h).
    #[serde(default = "default_initial_backoff")]
    #[x_kube(validation = rules::duration_at_most("retry.initialBackoff", rules::BACKOFF_MAX))]
    pub initial_backoff: Duration,
    /// Largest backoff between attempts (at most 1h).
    #[serde(default = "default_max_backoff")]
    #[x_kube(validation = rules::duration_at_most("retry.maxBackoff", rules::BACKOFF_MAX))]
    pub max_backoff: Duration,
    /// Growth factor of the backoff per attempt.
    #[serde(default = "default_multiplier")]
    #[schemars(range(min = 1.0, max = 10.0))]
    pub multiplier: f64,
    /// Stop retrying a record once it is older than this (by its Kafka timestamp) and apply the
    /// failure policy (at most 8760h). Unset: no age limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = rules::duration_at_most("retry.maxRecordAge", rules::MAX_RECORD_AGE_MAX))]
    pub max_record_age: Option<Duration>,
}

fn default_max_attempts() -> u32 {
    8
}

fn default_initial_backoff() -> Duration {
    Duration::from_millis(100)
}

fn default_max_backoff() -> Duration {
    Duration::from_secs(30)
}

fn default_multiplier() -> f64 {
    2.0
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
            multiplier: default_multiplier(),
            max_record_age: None,
        }
    }
}

/// What happens to a record that keeps failing.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum OnFailure {
    DeadLetter,
    Block,
    Drop,
}

/// The dead-letter topic.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    /// Topic (in the source cluster) that receives failed records with their original key, value
    /// and headers plus `kpipe.*` context headers. Must be neither a source topic nor
    /// `processor.kafka.topic`.
    #[schemars(schema_with = "rules::topic_schema")]
    pub topic: String,
}

/// How the operator sizes the worker Deployment.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = rules::min_le_max_replicas())]
#[x_kube(validation = rules::threshold_xor_drain())]
#[serde(rename_all = "camelCase")]
pub struct Scaling {
    /// Fewest worker pods. 0 allows scale to zero when there is no lag.
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000))]
    pub min_replicas: i32,
    /// Most worker pods. Never more than the partition count is used: an idle consumer is waste.
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Target records of lag per replica: desired = ceil(lag / lagThreshold). Mutually exclusive
    /// with `targetDrainSeconds`. Default when neither is set: 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub lag_threshold: Option<i64>,
    /// Target time to drain the backlog: desired = ceil(lag / (per-replica rate × targetDrainSeconds)),
    /// with the rate measured from committed offsets (lagThreshold 1000 is used until a rate is
    /// known). Mutually exclusive with `lagThreshold`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub target_drain_seconds: Option<i64>,
    /// From zero replicas, wake up when lag exceeds this many records.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub activation_lag: i64,
    /// How often the operator measures lag (also while at zero replicas).
    #[serde(default = "default_poll_interval")]
    #[x_kube(validation = rules::duration_between("scaling.pollInterval", rules::POLL_INTERVAL_RANGE))]
    pub poll_interval: Duration,
    /// Scale down only to the highest desired count seen during this window (damps flapping).
    #[serde(default = "default_scale_down_stabilization")]
    #[x_kube(validation = rules::duration_at_most(
        "scaling.scaleDownStabilization",
        rules::SCALE_DOWN_STABILIZATION_MAX
    ))]
    pub scale_down_stabilization: Duration,
    /// Scale to zero only after lag has been zero for this long.
    #[serde(default = "default_cooldown_to_zero")]
    #[x_kube(validation = rules::duration_at_most("scaling.cooldownToZero", rules::COOLDOWN_TO_ZERO_MAX))]
    pub cooldown_to_zero: Duration,
    /// `even`: round the replica count up so partitions spread evenly over pods (no pod gets more
    /// partitions than another by more than the remainder allows). `any`: use the raw count.
    #[serde(default)]
    pub partition_distribution: PartitionDistribution,
    /// `auto`: the operator sets the worker replicas. `external`: something else (an HPA, KEDA,
    /// `kubectl scale`) drives `spec.replicas` through the scale subresource; the operator passes it
    /// through and only reports lag.
    #[serde(default)]
    pub mode: ScalingMode,
}

fn default_max_replicas() -> i32 {
    10
}

fn default_poll_interval() -> Duration {
    Duration::from_secs(5)
}

fn default_scale_down_stabilization() -> Duration {
    Duration::from_secs(60)
}

fn default_cooldown_to_zero() -> Duration {
    Duration::from_secs(120)
}

/// Default lag per replica when neither `lagThreshold` nor `targetDrainSeconds` is set.
pub const DEFAULT_LAG_THRESHOLD: i64 = 1000;

impl Scaling {
    /// The lag per replica to use when no processing rate is known.
    pub fn effective_lag_threshold(&self) -> i64 {
        self.lag_threshold.unwrap_or(DEFAULT_LAG_THRESHOLD)
    }
}

impl Default for Scaling {
    fn default() -> Self {
        Self {
            min_replicas: 0,
            max_replicas: default_max_replicas(),
            lag_threshold: None,
            target_drain_seconds: None,
            activation_lag: 0,
            poll_interval: default_poll_interval(),
            scale_down_stabilization: default_scale_down_stabilization(),
            cooldown_to_zero: default_cooldown_to_zero(),
            partition_distribution: PartitionDistribution::default(),
            mode: ScalingMode::default(),
        }
    }
}

/// How replicas relate to the partition count.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum PartitionDistribution {
    #[default]
    Even,
    Any,
}

/// Who sets the worker replicas.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum ScalingMode {
    #[default]
    Auto,
    External,
}

/// Pieces of the worker pod template.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct WorkerTemplate {
    /// Worker image. Default: the operator's configured worker image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512), regex(pattern = rules::IMAGE_PATTERN))]
    pub image: Option<String>,
    /// Compute resources of the worker container. Default: the operator's configured defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Extra environment variables of the worker container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub env: Vec<EnvVar>,
    /// Node selector of the worker pods (label keys and values).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "rules::node_selector_schema")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the worker pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub tolerations: Vec<Toleration>,
    /// Affinity of the worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Extra annotations on the worker pods (keys are qualified names).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "rules::pod_annotations_schema")]
    pub pod_annotations: BTreeMap<String, String>,
    /// Extra labels on the worker pods (kpipe's own `app.kubernetes.io/*` labels win). Keys are
    /// qualified names, values label values (at most 63 characters).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "rules::pod_labels_schema")]
    pub pod_labels: BTreeMap<String, String>,
    /// Service account of the worker pods (workers need no Kubernetes API access). Default: `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = rules::DNS_SUBDOMAIN_PATTERN))]
    pub service_account_name: Option<String>,
    /// Use Kafka static group membership (`group.instance.id` = pod name), so a restarted container
    /// rejoins without a rebalance. Off by default: a deleted static member keeps its partitions
    /// until the session times out, which slows scale-down.
    #[serde(default, skip_serializing_if = "is_false")]
    pub static_membership: bool,
}

impl ConsumerPipelineSpec {
    /// The concurrency in force: `concurrency` with this processor's defaults ([`Concurrency::effective`]).
    pub fn effective_concurrency(&self) -> EffectiveConcurrency {
        self.concurrency.effective(&self.processor.kind)
    }

    /// The failure policy in force (see `onFailure`).
    pub fn effective_on_failure(&self) -> OnFailure {
        match (self.on_failure, &self.dead_letter) {
            (Some(policy), _) => policy,
            (None, Some(_)) => OnFailure::DeadLetter,
            (None, None) => OnFailure::Block,
        }
    }
}

impl Source {
    /// The consumer group id: `groupId` or `<namespace>.<name>`.
    pub fn effective_group_id(&self, namespace: &str, name: &str) -> String {
        self.group_id.clone().unwrap_or_else(|| format!("{namespace}.{name}"))
    }
}
