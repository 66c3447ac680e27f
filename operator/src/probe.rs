//! The lag probe: reads log-start/log-end watermarks and a group's committed offsets from Kafka.
//!
//! Clients are shared: one metadata/watermark client per distinct cluster (bootstrap servers +
//! credentials), used by every pipeline on that cluster; watermarks of all partitions of a
//! pipeline's topics are read with one batched ListOffsets per bound, and the committed offsets
//! of a group with one batched OffsetFetch. librdkafka (rdkafka 0.39) exposes committed offsets
//! only for the client's own `group.id`, so on plaintext clusters the OffsetFetch goes over the
//! cluster's shared protocol connections ([`crate::group_offsets`]); on SASL/TLS clusters each
//! *group* gets a small consumer handle (never subscribed, so it never joins), dropped when idle.
//!
//! All rdkafka calls are blocking; they run on tokio's blocking pool.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Offset, TopicPartitionList};
use sha2::{Digest, Sha256};

use kpipe_api::commit_metadata;
use kpipe_api::kafka_client::{self, Credentials};
use kpipe_api::v1alpha1::Auth;
use kpipe_api::v1alpha1::StartOffset;

use crate::group_offsets::{Commit, GroupOffsets, GroupOffsetsError};
use crate::lag::PartitionOffsets;

/// How to reach one Kafka cluster: brokers, the pipeline's `source.auth` and the values of the Secrets it
/// references (kept in memory only; `Debug` never prints them).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Cluster {
    pub bootstrap_servers: Vec<String>,
    pub auth: Option<Auth>,
    pub credentials: Credentials,
}

impl Cluster {
    /// A cluster reached without SASL or TLS.
    pub fn plaintext(bootstrap_servers: Vec<String>) -> Self {
        Self { bootstrap_servers, ..Default::default() }
    }

    /// Whether the cluster needs SASL or TLS (the shared plaintext protocol connections cannot reach it).
    pub fn is_secured(&self) -> bool {
        kafka_client::security_protocol(self.auth.as_ref()) != "PLAINTEXT"
    }

    /// The security properties of every client of this cluster ([`kafka_client::properties`], shared with the
    /// workers).
    pub fn security_properties(&self) -> Vec<(String, String)> {
        kafka_client::properties(self.auth.as_ref(), &self.credentials)
    }

    /// Identity of the shared client: bootstrap servers (order-insensitive) + a digest of the security
    /// properties, credential values included — a rotated password or renewed certificate is another key, so
    /// the next probe opens a client with the new credentials and the old one is evicted when idle.
    pub fn key(&self) -> String {
        let mut servers = self.bootstrap_servers.clone();
        servers.sort();
        servers.dedup();
        let mut h = Sha256::new();
        for (k, v) in self.security_properties() {
            h.update(k.as_bytes());
            h.update(b"\0");
            h.update(v.as_bytes());
            h.update(b"\0");
        }
        format!("{}#{}", servers.join(","), hex::encode(&h.finalize()[..8]))
    }

    /// librdkafka configuration of a probe client: brokers, no commits or topic creation, and the security
    /// properties.
    pub fn client_config(&self, client_id: &str, timeout: Duration) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.bootstrap_servers.join(","))
            .set("client.id", client_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("allow.auto.create.topics", "false")
            .set("socket.timeout.ms", timeout.as_millis().max(1000).to_string())
            .set("log_level", "3");
        for (k, v) in self.security_properties() {
            c.set(k, v);
        }
        c
    }
}

/// `client.id` of the lag probe's clients.
const PROBE_CLIENT_ID: &str = "kpipe-operator-lag-probe";

/// Why a probe failed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ProbeError {
    #[error("topic {0:?} does not exist")]
    TopicNotFound(String),
    #[error("Kafka brokers {servers} unreachable: {detail}")]
    BrokerUnreachable { servers: String, detail: String },
    #[error("authentication to Kafka failed (check the credentials in the referenced Secret): {0}")]
    Authentication(String),
    /// TLS handshake failed because a certificate was not trusted (the brokers' by the CA of
    /// `auth.tls.caSecretRef`, or the client's by the brokers).
    #[error("TLS certificate verification with the Kafka brokers failed: {0}")]
    CertificateVerifyFailed(String),
    /// TLS handshake failed because a certificate (the brokers' or the client's) has expired.
    #[error("a TLS certificate between kpipe and the Kafka brokers has expired: {0}")]
    CertificateExpired(String),
    /// OAUTHBEARER: no token could be fetched from the OIDC token endpoint.
    #[error("no OAUTHBEARER token from the OIDC token endpoint: {0}")]
    TokenEndpointUnreachable(String),
    /// The group's coordinator is not ready yet (COORDINATOR_LOAD_IN_PROGRESS 14, COORDINATOR_NOT_AVAILABLE
    /// 15, NOT_COORDINATOR 16): normal for a new group on a fresh cluster or during a broker restart.
    #[error("the consumer group's coordinator is not available yet: {0}")]
    CoordinatorPending(String),
    #[error("Kafka request failed: {0}")]
    Kafka(String),
    #[error("probe task failed: {0}")]
    Task(String),
}

impl ProbeError {
    /// CamelCase reason for conditions and Events.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TopicNotFound(_) => "TopicNotFound",
            Self::BrokerUnreachable { .. } => "BrokerUnreachable",
            Self::Authentication(_) => "KafkaAuthenticationFailed",
            Self::CertificateVerifyFailed(_) => "KafkaCertificateVerifyFailed",
            Self::CertificateExpired(_) => "KafkaCertificateExpired",
            Self::TokenEndpointUnreachable(_) => "TokenEndpointUnreachable",
            Self::CoordinatorPending(_) => "CoordinatorPending",
            Self::Kafka(_) | Self::Task(_) => "LagProbeFailed",
        }
    }

    /// A state that is normal for a while (a group or topic being set up) and only a problem when it
    /// persists.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::CoordinatorPending(_))
    }

    fn from_kafka(cluster: &Cluster, e: KafkaError) -> Self {
        let code = e.rdkafka_error_code();
        match code {
            Some(
                RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::OperationTimedOut
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::Resolve,
            ) => Self::BrokerUnreachable { servers: cluster.bootstrap_servers.join(","), detail: e.to_string() },
            Some(
                RDKafkaErrorCode::CoordinatorNotAvailable
                | RDKafkaErrorCode::NotCoordinator
                | RDKafkaErrorCode::CoordinatorLoadInProgress,
            ) => Self::CoordinatorPending(e.to_string()),
            Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed) => {
                Self::Authentication(e.to_string())
            }
            Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => {
                Self::TopicNotFound(e.to_string())
            }
            _ => Self::Kafka(e.to_string()),
        }
    }

    /// A security failure named by what librdkafka reported through its error callback (`reason` is the
    /// error text): an expired or untrusted certificate, a token endpoint that did not give a token, or
    /// rejected credentials. `None`: not a security failure. Such failures surface on a request only as
    /// timeouts or transport errors; the callback says why.
    ///
    /// `own_certificate_expired`: the client certificate this client presents is past its `notAfter`
    /// ([`crate::certificate`]). A broker refuses a client certificate with a TLS alert that does not say why —
    /// Kafka (JSSE) sends `certificate_unknown` for an expired one as for an untrusted one, which OpenSSL reports
    /// as `sslv3 alert certificate unknown` — so a refusal of an expired own certificate is named
    /// `KafkaCertificateExpired`, any other refusal `KafkaCertificateVerifyFailed`.
    pub fn from_client_error(code: RDKafkaErrorCode, reason: &str, own_certificate_expired: bool) -> Option<Self> {
        let text = reason.to_ascii_lowercase();
        let detail = reason.to_string();
        // TLS alerts by which the peer refused this client's certificate (RFC 8446 §6.2).
        let refused_by_peer = [
            "alert certificate unknown",
            "alert bad certificate",
            "alert certificate expired",
            "alert unknown ca",
            "certificate required",
        ]
        .iter()
        .any(|a| text.contains(a));
        if text.contains("certificate has expired")
            || text.contains("certificate expired")
            || (refused_by_peer && own_certificate_expired)
        {
            Some(Self::CertificateExpired(detail))
        } else if refused_by_peer
            || text.contains("certificate verify failed")
            || text.contains("unknown ca")
            || text.contains("bad certificate")
        {
            Some(Self::CertificateVerifyFailed(detail))
        } else if text.contains("oidc") || text.contains("token endpoint") || text.contains("oauthbearer token") {
            Some(Self::TokenEndpointUnreachable(detail))
        } else if matches!(code, RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed)
            || text.contains("authentication failed")
            || text.contains("sasl authentication error")
        {
            Some(Self::Authentication(detail))
        } else {
            None
        }
    }
}

/// The last security failure a cluster's clients reported through librdkafka's error callback, with when.
#[derive(Default)]
struct SecurityErrors {
    last: Mutex<Option<(ProbeError, Instant)>>,
}

impl SecurityErrors {
    fn record(&self, e: ProbeError) {
        if let Ok(mut last) = self.last.lock() {
            *last = Some((e, Instant::now()));
        }
    }

    /// The recorded failure if it happened within `window`.
    fn recent(&self, window: Duration) -> Option<ProbeError> {
        let last = self.last.lock().ok()?;
        last.as_ref().filter(|(_, at)| at.elapsed() <= window).map(|(e, _)| e.clone())
    }

    /// After a successful request: forgets the recorded failure, except a failed token refresh. A request can
    /// succeed on the token the client still holds after its refresh failed; the failure bites when that token
    /// expires, and librdkafka does not report an unchanged error text again, so forgetting it here made the
    /// broker's refusals after the expiry read as unreachable brokers (seen in the e2e `security` token test).
    /// It still ages out with the window.
    fn after_success(&self) {
        if let Ok(mut last) = self.last.lock()
            && !matches!(last.as_ref(), Some((ProbeError::TokenEndpointUnreachable(_), _)))
        {
            *last = None;
        }
    }
}

/// Context of the probe's rdkafka clients: records security failures so a failed request can name its cause.
/// librdkafka reports a failed TLS handshake or SASL exchange in its log (facility `FAIL`, level error) and error
/// callbacks with the cause as text; the request itself only times out. The text is librdkafka's (broker address,
/// mechanism, OpenSSL reason), never a credential.
#[derive(Clone, Default)]
pub struct ProbeContext {
    errors: Arc<SecurityErrors>,
    /// `notAfter` of the client certificate the clients present (mutual TLS), if any.
    client_cert_not_after: Option<jiff::Timestamp>,
}

impl ProbeContext {
    /// The context of `cluster`'s clients.
    pub fn for_cluster(cluster: &Cluster) -> Self {
        let not_after = match &cluster.credentials.client_cert {
            Some(kafka_client::Material::Pem(pem)) => crate::certificate::validity(pem).map(|v| v.not_after),
            _ => None,
        };
        Self { errors: Arc::default(), client_cert_not_after: not_after }
    }

    fn observe(&self, code: RDKafkaErrorCode, text: &str) {
        let expired = self.client_cert_not_after.is_some_and(|t| jiff::Timestamp::now() > t);
        if let Some(e) = ProbeError::from_client_error(code, text, expired) {
            tracing::warn!(reason = e.reason(), "Kafka client: {text}");
            self.errors.record(e);
        }
    }
}

impl rdkafka::ClientContext for ProbeContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        if matches!(level, L::Emerg | L::Alert | L::Critical | L::Error | L::Warning) {
            self.observe(RDKafkaErrorCode::Fail, message);
        }
        tracing::debug!(facility = fac, "librdkafka: {message}");
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.observe(error.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail), reason);
        tracing::debug!(%error, "librdkafka error: {reason}");
    }
}

impl rdkafka::consumer::ConsumerContext for ProbeContext {}

/// A probe client.
type ProbeConsumer = BaseConsumer<ProbeContext>;

struct GroupHandle {
    consumer: Arc<ProbeConsumer>,
    last_used: Instant,
}

struct ClusterClients {
    cluster: Cluster,
    meta: ProbeConsumer,
    /// Security failures reported by any client of this cluster.
    context: ProbeContext,
    /// Plaintext clusters: committed offsets of every group over shared connections.
    shared_offsets: Option<GroupOffsets>,
    groups: Mutex<HashMap<String, GroupHandle>>,
    last_used: Mutex<Instant>,
}

impl ClusterClients {
    /// `result` of a request, with a failure that librdkafka reported only as a timeout or a transport error
    /// replaced by the security failure its clients logged within `window` (wrong password, untrusted or
    /// expired certificate, no token). A success forgets recorded failures.
    fn explain<T>(&self, result: Result<T, ProbeError>, window: Duration) -> Result<T, ProbeError> {
        // librdkafka queues its log and error events (rdkafka sets `log.queue`); they reach the context only when the
        // client's queue is served. None of these clients is subscribed, so serving it yields no messages.
        drain_events(&self.meta);
        if let Ok(groups) = self.groups.lock() {
            for g in groups.values() {
                drain_events(&g.consumer);
            }
        }
        match result {
            Ok(v) => {
                self.context.errors.after_success();
                Ok(v)
            }
            Err(e @ (ProbeError::BrokerUnreachable { .. } | ProbeError::Kafka(_) | ProbeError::Authentication(_))) => {
                Err(self.context.errors.recent(window).unwrap_or(e))
            }
            Err(e) => Err(e),
        }
    }
}

/// How long a security failure a client reported explains a failed request: three request timeouts, and at least
/// 30 s. librdkafka retries a failed OAUTHBEARER token refresh only 10 s later and raises the error again only when
/// its text changed (`rd_kafka_oauthbearer_set_token_failure`, `src/rdkafka_sasl_oauthbearer.c`, librdkafka 2.12),
/// so with a short request timeout the broker's refusals of the expired token would otherwise be reported as
/// unreachable brokers between two token attempts. A successful request forgets the failure at once.
fn security_window(timeout: Duration) -> Duration {
    (timeout * 3).max(Duration::from_secs(30))
}

/// Serve the queued events of a never-subscribed probe client (at most a bounded number per call).
fn drain_events(consumer: &ProbeConsumer) {
    for _ in 0..256 {
        if consumer.poll(Duration::ZERO).is_none() {
            break;
        }
    }
}

/// Shared Kafka clients for every pipeline.
pub struct LagProbe {
    clusters: Mutex<HashMap<String, Arc<ClusterClients>>>,
    timeout: Duration,
    idle_ttl: Duration,
}

/// Counts of live clients (for metrics and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientCounts {
    /// Shared per-cluster clients.
    pub clusters: usize,
    /// Per-group rdkafka handles (only for SASL/TLS clusters).
    pub groups: usize,
    /// Shared protocol connections for committed offsets.
    pub offset_connections: usize,
}

impl LagProbe {
    pub fn new(timeout: Duration) -> Self {
        Self { clusters: Mutex::new(HashMap::new()), timeout, idle_ttl: Duration::from_secs(600) }
    }

    /// How many clients are open.
    pub fn counts(&self) -> ClientCounts {
        let clusters = self.clusters.lock().map(|c| c.values().cloned().collect::<Vec<_>>()).unwrap_or_default();
        ClientCounts {
            clusters: clusters.len(),
            groups: clusters.iter().map(|c| c.groups.lock().map(|g| g.len()).unwrap_or(0)).sum(),
            offset_connections: clusters
                .iter()
                .filter_map(|c| c.shared_offsets.as_ref())
                .map(|o| o.connections())
                .sum(),
        }
    }

    fn clients(&self, cluster: &Cluster) -> Result<Arc<ClusterClients>, ProbeError> {
        let key = cluster.key();
        let mut map = self.clusters.lock().map_err(|e| ProbeError::Task(e.to_string()))?;
        if let Some(c) = map.get(&key) {
            if let Ok(mut t) = c.last_used.lock() {
                *t = Instant::now();
            }
            return Ok(c.clone());
        }
        let context = ProbeContext::for_cluster(cluster);
        let meta: ProbeConsumer = cluster
            .client_config(PROBE_CLIENT_ID, self.timeout)
            .create_with_context(context.clone())
            .map_err(|e| ProbeError::from_kafka(cluster, e))?;
        let shared_offsets =
            (!cluster.is_secured()).then(|| GroupOffsets::new(cluster.bootstrap_servers.clone(), self.timeout));
        let entry = Arc::new(ClusterClients {
            cluster: cluster.clone(),
            meta,
            context,
            shared_offsets,
            groups: Mutex::new(HashMap::new()),
            last_used: Mutex::new(Instant::now()),
        });
        map.insert(key, entry.clone());
        Ok(entry)
    }

    /// Drop per-group handles idle for longer than the TTL and clusters without pipelines.
    pub fn evict_idle(&self) {
        let Ok(mut map) = self.clusters.lock() else { return };
        let ttl = self.idle_ttl;
        map.retain(|_, c| {
            let Ok(mut groups) = c.groups.lock() else { return true };
            groups.retain(|_, g| g.last_used.elapsed() < ttl);
            !groups.is_empty() || c.last_used.lock().map(|t| t.elapsed() < ttl).unwrap_or(false)
        });
    }

    /// Offsets of every partition of `topics` for `group`.
    pub async fn offsets(
        self: &Arc<Self>,
        cluster: Cluster,
        topics: Vec<String>,
        group: String,
    ) -> Result<Vec<PartitionOffsets>, ProbeError> {
        let probe = self.clone();
        tokio::task::spawn_blocking(move || {
            let clients = probe.clients(&cluster)?;
            clients.explain(probe.fetch(&clients, &topics, &group), security_window(probe.timeout))
        })
        .await
        .map_err(|e| ProbeError::Task(e.to_string()))?
    }

    /// [`LagProbe::offsets`], counting from where the workers start: under `startOffset: latest` a partition the
    /// group never committed on is read from its first record produced at or after `started_at_ms` (the pipeline's
    /// creation, ms since the Unix epoch; see `kpipe_api::offsets`). Such a partition is reported with that offset
    /// as its `committed` offset, so its lag — and the wake-up from zero replicas — counts exactly the records the
    /// workers will read, including those of a partition added while the pipeline is scaled to zero. One batched
    /// ListOffsets by timestamp, only for never-committed partitions.
    pub async fn offsets_since(
        self: &Arc<Self>,
        cluster: Cluster,
        topics: Vec<String>,
        group: String,
        start: StartOffset,
        started_at_ms: Option<i64>,
    ) -> Result<Vec<PartitionOffsets>, ProbeError> {
        let probe = self.clone();
        tokio::task::spawn_blocking(move || {
            let clients = probe.clients(&cluster)?;
            let result = probe.fetch(&clients, &topics, &group).and_then(|mut offsets| {
                if let (StartOffset::Latest, Some(ts)) = (start, started_at_ms) {
                    let since = probe.since(&clients, &offsets, ts)?;
                    apply_latest_start(&mut offsets, &since);
                }
                Ok(offsets)
            });
            clients.explain(result, security_window(probe.timeout))
        })
        .await
        .map_err(|e| ProbeError::Task(e.to_string()))?
    }

    /// The first offset at or after `ts` of each never-committed partition of `offsets` (`None`: no such record).
    fn since(
        &self,
        clients: &ClusterClients,
        offsets: &[PartitionOffsets],
        ts: i64,
    ) -> Result<HashMap<(String, i32), Option<i64>>, ProbeError> {
        let cluster = &clients.cluster;
        let mut tpl = TopicPartitionList::new();
        for p in offsets.iter().filter(|p| p.committed.is_none()) {
            tpl.add_partition_offset(&p.topic, p.partition, Offset::Offset(ts))
                .map_err(|e| ProbeError::from_kafka(cluster, e))?;
        }
        if tpl.count() == 0 {
            return Ok(HashMap::new());
        }
        let res = clients.meta.offsets_for_times(tpl, self.timeout).map_err(|e| ProbeError::from_kafka(cluster, e))?;
        let mut out = HashMap::new();
        for e in res.elements() {
            if let Err(err) = e.error() {
                return Err(ProbeError::from_kafka(cluster, err));
            }
            let offset = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            out.insert((e.topic().to_string(), e.partition()), offset);
        }
        Ok(out)
    }

    fn group_consumer(&self, clients: &ClusterClients, group: &str) -> Result<Arc<ProbeConsumer>, ProbeError> {
        let mut groups = clients.groups.lock().map_err(|e| ProbeError::Task(e.to_string()))?;
        if let Some(g) = groups.get_mut(group) {
            g.last_used = Instant::now();
            return Ok(g.consumer.clone());
        }
        let consumer: ProbeConsumer = clients
            .cluster
            .client_config(PROBE_CLIENT_ID, self.timeout)
            .set("group.id", group)
            .create_with_context(clients.context.clone())
            .map_err(|e| ProbeError::from_kafka(&clients.cluster, e))?;
        let consumer = Arc::new(consumer);
        groups.insert(group.to_string(), GroupHandle { consumer: consumer.clone(), last_used: Instant::now() });
        Ok(consumer)
    }

    fn committed(
        &self,
        clients: &ClusterClients,
        group: &str,
        parts: &[(String, i32)],
    ) -> Result<HashMap<(String, i32), Commit>, ProbeError> {
        let cluster = &clients.cluster;
        if let Some(shared) = &clients.shared_offsets {
            match shared.committed(group, parts) {
                Ok(map) => return Ok(map.into_iter().filter_map(|(k, v)| v.map(|c| (k, c))).collect()),
                Err(e @ (GroupOffsetsError::Connect { .. } | GroupOffsetsError::Io { .. })) => {
                    return Err(ProbeError::BrokerUnreachable {
                        servers: cluster.bootstrap_servers.join(","),
                        detail: e.to_string(),
                    });
                }
                Err(
                    e @ (GroupOffsetsError::Coordinator { code: 14..=16, .. }
                    | GroupOffsetsError::Fetch { code: 14..=16, .. }),
                ) => {
                    return Err(ProbeError::CoordinatorPending(e.to_string()));
                }
                Err(e @ (GroupOffsetsError::Coordinator { .. } | GroupOffsetsError::Fetch { .. })) => {
                    return Err(ProbeError::Kafka(e.to_string()));
                }
                Err(e @ GroupOffsetsError::Protocol(_)) => {
                    tracing::warn!(error = %e, "shared offset fetch failed; using a per-group client");
                }
            }
        }
        let consumer = self.group_consumer(clients, group)?;
        let mut tpl = TopicPartitionList::with_capacity(parts.len());
        for (topic, p) in parts {
            tpl.add_partition(topic, *p);
        }
        let committed =
            consumer.committed_offsets(tpl, self.timeout).map_err(|e| ProbeError::from_kafka(cluster, e))?;
        let mut committed_map = HashMap::new();
        for e in committed.elements() {
            if let Offset::Offset(o) = e.offset() {
                let commit = Commit { offset: o, metadata: e.metadata().to_string() };
                committed_map.insert((e.topic().to_string(), e.partition()), commit);
            }
        }
        Ok(committed_map)
    }

    fn fetch(
        &self,
        clients: &ClusterClients,
        topics: &[String],
        group: &str,
    ) -> Result<Vec<PartitionOffsets>, ProbeError> {
        let cluster = &clients.cluster;
        let t = self.timeout;
        let mut parts: Vec<(String, i32)> = Vec::new();
        for topic in topics {
            let md = clients.meta.fetch_metadata(Some(topic), t).map_err(|e| ProbeError::from_kafka(cluster, e))?;
            let Some(mt) = md.topics().iter().find(|m| m.name() == topic) else {
                return Err(ProbeError::TopicNotFound(topic.clone()));
            };
            if mt.error().is_some() || mt.partitions().is_empty() {
                return Err(ProbeError::TopicNotFound(topic.clone()));
            }
            for p in mt.partitions() {
                parts.push((topic.clone(), p.id()));
            }
        }
        let bound = |offset: Offset| -> Result<HashMap<(String, i32), i64>, ProbeError> {
            let mut tpl = TopicPartitionList::with_capacity(parts.len());
            for (topic, p) in &parts {
                tpl.add_partition_offset(topic, *p, offset).map_err(|e| ProbeError::from_kafka(cluster, e))?;
            }
            let res = clients.meta.offsets_for_times(tpl, t).map_err(|e| ProbeError::from_kafka(cluster, e))?;
            let mut out = HashMap::new();
            for e in res.elements() {
                if let Err(err) = e.error() {
                    return Err(ProbeError::from_kafka(cluster, err));
                }
                if let Offset::Offset(o) = e.offset() {
                    out.insert((e.topic().to_string(), e.partition()), o);
                }
            }
            Ok(out)
        };
        let starts = bound(Offset::Beginning)?;
        let ends = bound(Offset::End)?;
        let committed_map = self.committed(clients, group, &parts)?;
        Ok(parts
            .into_iter()
            .map(|key| {
                let log_end = ends.get(&key).copied().unwrap_or(0);
                let log_start = starts.get(&key).copied().unwrap_or(0).min(log_end);
                let commit = committed_map.get(&key);
                let committed = commit.map(|c| c.offset);
                let retry = commit.and_then(|c| commit_metadata::decode(&c.metadata));
                PartitionOffsets {
                    topic: key.0,
                    partition: key.1,
                    log_start,
                    log_end,
                    committed,
                    retry,
                    start_position: false,
                }
            })
            .collect())
    }
}

/// Reports each never-committed partition found in `since` as committed at the offset the workers start at under
/// `latest` (the rule of `kpipe_api::offsets::start_point`): its first record at or after the pipeline's start, or
/// its log end when there is none.
pub fn apply_latest_start(offsets: &mut [PartitionOffsets], since: &HashMap<(String, i32), Option<i64>>) {
    for p in offsets.iter_mut().filter(|p| p.committed.is_none()) {
        if let Some(found) = since.get(&(p.topic.clone(), p.partition)) {
            let position =
                kpipe_api::offsets::PartitionPosition { log_start: p.log_start, log_end: p.log_end, committed: None };
            let start =
                kpipe_api::offsets::start_point(&position, StartOffset::Latest, Some(found.unwrap_or(p.log_end)));
            p.committed = Some(start.offset());
            p.start_position = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_security_failure_explains_requests_until_the_next_token_attempt() {
        // librdkafka's next token attempt comes 10 s after a failure: the window must outlast it at any timeout.
        assert_eq!(security_window(Duration::from_secs(2)), Duration::from_secs(30));
        assert_eq!(security_window(Duration::from_secs(5)), Duration::from_secs(30));
        assert_eq!(security_window(Duration::from_secs(20)), Duration::from_secs(60));
        let errors = SecurityErrors::default();
        errors.record(ProbeError::TokenEndpointUnreachable("no token".into()));
        assert!(errors.recent(security_window(Duration::from_secs(2))).is_some());
        errors.after_success();
        assert!(
            errors.recent(security_window(Duration::from_secs(2))).is_some(),
            "a request that succeeded on the token still held does not undo a failed refresh"
        );
        errors.record(ProbeError::Authentication("wrong password".into()));
        errors.after_success();
        assert!(errors.recent(security_window(Duration::from_secs(2))).is_none(), "a success forgets other failures");
    }

    #[test]
    fn latest_counts_the_records_since_the_pipeline_started() {
        let po = |partition, log_start, log_end, committed| PartitionOffsets {
            topic: "t".into(),
            partition,
            log_start,
            log_end,
            committed,
            ..Default::default()
        };
        let mut offsets = vec![
            po(0, 0, 100, Some(40)),
            po(1, 0, 100, None),
            po(2, 0, 30, None),
            po(3, 10, 50, None),
            po(4, 0, 9, None),
        ];
        let since = HashMap::from([
            (("t".to_string(), 1), Some(90)), // records since the start: 90..100
            (("t".to_string(), 2), Some(0)),  // a partition added after the start: all of it
            (("t".to_string(), 3), None),     // nothing since the start: the log end
            (("t".to_string(), 0), Some(5)),  // committed partitions are left alone
        ]);
        apply_latest_start(&mut offsets, &since);
        let committed: Vec<Option<i64>> = offsets.iter().map(|p| p.committed).collect();
        assert_eq!(committed, vec![Some(40), Some(90), Some(0), Some(50), None]);
        let lags: Vec<i64> = offsets.iter().map(|p| crate::lag::partition_lag(p, StartOffset::Latest)).collect();
        assert_eq!(lags, vec![60, 10, 30, 0, 0], "the lag is exactly what the workers will read");
    }

    #[test]
    fn cluster_key_ignores_order_and_hides_credentials() {
        let auth: Auth = serde_json::from_value(serde_json::json!({
            "sasl": {"mechanism": "SCRAM-SHA-512", "secretRef": {"name": "u"}}, "tls": {}
        }))
        .unwrap();
        let creds =
            |pw: &str| Credentials { username: Some("u".into()), password: Some(pw.into()), ..Default::default() };
        let a = Cluster {
            bootstrap_servers: vec!["b:9092".into(), "a:9092".into()],
            auth: Some(auth),
            credentials: creds("secret-pw"),
        };
        let b = Cluster { bootstrap_servers: vec!["a:9092".into(), "b:9092".into()], ..a.clone() };
        assert_eq!(a.key(), b.key());
        assert!(a.is_secured() && !Cluster::plaintext(vec!["a:1".into()]).is_secured());
        assert!(!a.key().contains("secret-pw"));
        assert!(!format!("{a:?}").contains("secret-pw"));
        let c = Cluster { credentials: creds("other"), ..a.clone() };
        assert_ne!(a.key(), c.key(), "a rotated password needs a new client");
        let config = a.client_config("id", Duration::from_secs(5));
        assert_eq!(config.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(config.get("sasl.password"), Some("secret-pw"));
    }

    #[test]
    fn security_failures_are_named_from_librdkafka_text() {
        let named = |code, text: &str| ProbeError::from_client_error(code, text, false).map(|e| e.reason());
        let fail = RDKafkaErrorCode::Fail;
        assert_eq!(
            named(
                fail,
                "ssl://10.244.0.1:9193/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate \
                 verify failed: broker certificate could not be verified (after 3ms in state SSL_HANDSHAKE)"
            ),
            Some("KafkaCertificateVerifyFailed")
        );
        assert_eq!(
            named(fail, "SSL handshake failed: certificate verify failed: certificate has expired"),
            Some("KafkaCertificateExpired")
        );
        assert_eq!(
            named(fail, "SSL handshake failed: ssl/tls alert certificate expired"),
            Some("KafkaCertificateExpired")
        );
        assert_eq!(named(fail, "SSL handshake failed: tlsv1 alert unknown ca"), Some("KafkaCertificateVerifyFailed"));
        assert_eq!(
            named(
                fail,
                "SASL authentication error: Authentication failed during authentication due to invalid credentials \
                 with SASL mechanism SCRAM-SHA-512 (after 2ms in state AUTH_REQ)"
            ),
            Some("KafkaAuthenticationFailed")
        );
        assert_eq!(named(RDKafkaErrorCode::Authentication, "broker said no"), Some("KafkaAuthenticationFailed"));
        assert_eq!(
            named(fail, "Failed to retrieve OIDC token from \"http://127.0.0.1:1/token\": Couldn't connect to server"),
            Some("TokenEndpointUnreachable")
        );
        assert_eq!(named(fail, "Connect to ipv4#127.0.0.1:1 failed: Connection refused"), None);
    }

    /// What librdkafka reports when Kafka refuses the client certificate (TLS 1.3: after the client's side of the
    /// handshake, as an alert on the first read), named by the client certificate's own validity.
    #[test]
    fn a_refused_client_certificate_is_expired_or_untrusted_by_its_own_validity() {
        // librdkafka 2.12 against Kafka 4.1's mTLS listener with the bed's expired-client.crt.
        let alert = "ssl://10.244.0.1:19095/bootstrap: Receive failed: error:0A000416:SSL routines::ssl/tls alert \
                     certificate unknown: SSL alert number 46 (after 34ms in state APIVERSION_QUERY)";
        let named = |text: &str, expired| {
            ProbeError::from_client_error(RDKafkaErrorCode::Fail, text, expired).map(|e| e.reason())
        };
        assert_eq!(named(alert, true), Some("KafkaCertificateExpired"));
        assert_eq!(named(alert, false), Some("KafkaCertificateVerifyFailed"));
        assert_eq!(
            named("SSL handshake failed: tlsv13 alert certificate required", true),
            Some("KafkaCertificateExpired")
        );
        // The broker's certificate failing our verification is about the broker's certificate, whatever ours is.
        assert_eq!(
            named("SSL handshake failed: certificate verify failed: unable to get local issuer certificate", true),
            Some("KafkaCertificateVerifyFailed")
        );
        // Not a TLS refusal: our certificate's age does not matter.
        assert_eq!(named("Connect to ipv4#127.0.0.1:1 failed: Connection refused", true), None);
    }

    #[test]
    fn the_context_knows_when_its_client_certificate_expires() {
        let pem = "-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n";
        let cluster = |cert: Option<&str>| Cluster {
            credentials: Credentials {
                client_cert: cert.map(|c| kafka_client::Material::Pem(c.to_string())),
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(ProbeContext::for_cluster(&cluster(None)).client_cert_not_after, None);
        assert_eq!(ProbeContext::for_cluster(&cluster(Some(pem))).client_cert_not_after, None);
        // The broker's refusal of the same alert is named by the validity of the certificate the client presents.
        let alert = "ssl://b:9095/bootstrap: Receive failed: error:0A000416:SSL routines::ssl/tls alert certificate \
                     unknown: SSL alert number 46 (after 34ms in state APIVERSION_QUERY)";
        for (start, end, reason) in [
            ("20200101000000Z", "20200102000000Z", "KafkaCertificateExpired"),
            ("20200101000000Z", "20990101000000Z", "KafkaCertificateVerifyFailed"),
        ] {
            let pem = crate::certificate::tests::certificate(start, end);
            let context = ProbeContext::for_cluster(&cluster(Some(&pem)));
            assert!(context.client_cert_not_after.is_some());
            context.observe(RDKafkaErrorCode::Fail, alert);
            assert_eq!(context.errors.recent(Duration::from_secs(60)).map(|e| e.reason()), Some(reason), "{end}");
        }
    }

    #[test]
    fn a_timeout_is_explained_by_a_recent_security_failure() {
        let errors = SecurityErrors::default();
        assert_eq!(errors.recent(Duration::from_secs(1)), None);
        errors.record(ProbeError::CertificateVerifyFailed("x".into()));
        assert_eq!(errors.recent(Duration::from_secs(60)).map(|e| e.reason()), Some("KafkaCertificateVerifyFailed"));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(errors.recent(Duration::from_millis(1)), None, "an old failure does not explain a new timeout");
        errors.after_success();
        assert_eq!(errors.recent(Duration::from_secs(60)), None);
    }

    #[test]
    fn error_reasons() {
        assert_eq!(ProbeError::TopicNotFound("t".into()).reason(), "TopicNotFound");
        let c = Cluster { bootstrap_servers: vec!["x:1".into()], ..Default::default() };
        let e = ProbeError::from_kafka(&c, KafkaError::MetadataFetch(RDKafkaErrorCode::AllBrokersDown));
        assert_eq!(e.reason(), "BrokerUnreachable");
        assert!(!e.is_transient());
        let e = ProbeError::from_kafka(&c, KafkaError::MetadataFetch(RDKafkaErrorCode::CoordinatorNotAvailable));
        assert_eq!((e.reason(), e.is_transient()), ("CoordinatorPending", true));
    }
}
