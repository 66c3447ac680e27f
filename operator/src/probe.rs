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
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Offset, TopicPartitionList};
use sha2::{Digest, Sha256};

use kpipe_api::commit_metadata;
use kpipe_api::v1alpha1::StartOffset;

use crate::group_offsets::{Commit, GroupOffsets, GroupOffsetsError};
use crate::lag::PartitionOffsets;

/// SASL credentials (values from the referenced Secret; never logged).
#[derive(Clone, PartialEq, Eq)]
pub struct Sasl {
    pub mechanism: String,
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Sasl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sasl").field("mechanism", &self.mechanism).finish_non_exhaustive()
    }
}

/// TLS material (PEM).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Tls {
    pub ca_pem: Option<String>,
    pub cert_pem: Option<String>,
    pub key_pem: Option<String>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("ca", &self.ca_pem.is_some())
            .field("client_cert", &self.cert_pem.is_some())
            .finish()
    }
}

/// How to reach one Kafka cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cluster {
    pub bootstrap_servers: Vec<String>,
    pub sasl: Option<Sasl>,
    pub tls: Option<Tls>,
}

impl Cluster {
    /// Identity of the shared client: bootstrap servers (order-insensitive) + a digest of the
    /// credentials.
    pub fn key(&self) -> String {
        let mut servers = self.bootstrap_servers.clone();
        servers.sort();
        servers.dedup();
        let mut h = Sha256::new();
        if let Some(s) = &self.sasl {
            h.update(format!("sasl\0{}\0{}\0{}", s.mechanism, s.username, s.password).as_bytes());
        }
        if let Some(t) = &self.tls {
            h.update(b"tls\0");
            for part in [&t.ca_pem, &t.cert_pem, &t.key_pem] {
                h.update(part.as_deref().unwrap_or("-").as_bytes());
                h.update(b"\0");
            }
        }
        format!("{}#{}", servers.join(","), hex::encode(&h.finalize()[..8]))
    }

    /// librdkafka settings for a client of this cluster (`socket.timeout.ms` from `timeout`).
    pub fn client_config(&self, timeout: Duration) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.bootstrap_servers.join(","))
            .set("client.id", "kpipe-operator-lag-probe")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("allow.auto.create.topics", "false")
            .set("socket.timeout.ms", timeout.as_millis().max(1000).to_string())
            .set("log_level", "3");
        let protocol = match (&self.sasl, &self.tls) {
            (Some(_), Some(_)) => "SASL_SSL",
            (Some(_), None) => "SASL_PLAINTEXT",
            (None, Some(_)) => "SSL",
            (None, None) => "PLAINTEXT",
        };
        c.set("security.protocol", protocol);
        if let Some(s) = &self.sasl {
            c.set("sasl.mechanism", &s.mechanism).set("sasl.username", &s.username).set("sasl.password", &s.password);
        }
        if let Some(t) = &self.tls {
            if let Some(ca) = &t.ca_pem {
                c.set("ssl.ca.pem", ca);
            }
            if let (Some(cert), Some(key)) = (&t.cert_pem, &t.key_pem) {
                c.set("ssl.certificate.pem", cert).set("ssl.key.pem", key);
            }
        }
        c
    }
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ProbeError {
    #[error("topic {0:?} does not exist")]
    TopicNotFound(String),
    #[error("Kafka brokers {servers} unreachable: {detail}")]
    BrokerUnreachable { servers: String, detail: String },
    #[error("authentication to Kafka failed: {0}")]
    Authentication(String),
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
}

struct GroupHandle {
    consumer: Arc<BaseConsumer>,
    last_used: Instant,
}

struct ClusterClients {
    cluster: Cluster,
    meta: BaseConsumer,
    /// Plaintext clusters: committed offsets of every group over shared connections.
    shared_offsets: Option<GroupOffsets>,
    groups: Mutex<HashMap<String, GroupHandle>>,
    last_used: Mutex<Instant>,
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
        let meta: BaseConsumer =
            cluster.client_config(self.timeout).create().map_err(|e| ProbeError::from_kafka(cluster, e))?;
        let shared_offsets = (cluster.sasl.is_none() && cluster.tls.is_none())
            .then(|| GroupOffsets::new(cluster.bootstrap_servers.clone(), self.timeout));
        let entry = Arc::new(ClusterClients {
            cluster: cluster.clone(),
            meta,
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
            probe.fetch(&clients, &topics, &group)
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
            let mut offsets = probe.fetch(&clients, &topics, &group)?;
            if let (StartOffset::Latest, Some(ts)) = (start, started_at_ms) {
                let since = probe.since(&clients, &offsets, ts)?;
                apply_latest_start(&mut offsets, &since);
            }
            Ok(offsets)
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

    fn group_consumer(&self, clients: &ClusterClients, group: &str) -> Result<Arc<BaseConsumer>, ProbeError> {
        let mut groups = clients.groups.lock().map_err(|e| ProbeError::Task(e.to_string()))?;
        if let Some(g) = groups.get_mut(group) {
            g.last_used = Instant::now();
            return Ok(g.consumer.clone());
        }
        let consumer: BaseConsumer = clients
            .cluster
            .client_config(self.timeout)
            .set("group.id", group)
            .create()
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
        let a = Cluster {
            bootstrap_servers: vec!["b:9092".into(), "a:9092".into()],
            sasl: Some(Sasl { mechanism: "PLAIN".into(), username: "u".into(), password: "secret-pw".into() }),
            tls: None,
        };
        let b = Cluster { bootstrap_servers: vec!["a:9092".into(), "b:9092".into()], ..a.clone() };
        assert_eq!(a.key(), b.key());
        assert!(!a.key().contains("secret-pw"));
        assert!(!format!("{a:?}").contains("secret-pw"));
        let c = Cluster {
            sasl: Some(Sasl { mechanism: "PLAIN".into(), username: "u".into(), password: "other".into() }),
            ..a.clone()
        };
        assert_ne!(a.key(), c.key(), "different credentials need a different client");
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
