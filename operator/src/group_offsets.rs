//! Committed offsets of any consumer group over a few shared connections, speaking the Kafka
//! protocol directly (FindCoordinator v4, OffsetFetch v8, OffsetCommit v8, DescribeConfigs v4)
//! with the `kafka-protocol` codecs.
//!
//! Besides reading offsets, [`GroupOffsets::commit_empty`] writes them for a group *without
//! members* (generation -1, empty member id: the broker accepts that only while the group is empty
//! and refuses it with `UNKNOWN_MEMBER_ID`/`ILLEGAL_GENERATION` once a consumer has joined, so it can
//! never overwrite a live consumer's position), and [`GroupOffsets::offsets_retention`] reads the
//! coordinator's `offsets.retention.minutes` (KIP-211).
//!
//! librdkafka (rdkafka 0.39) only reads committed offsets for its own `group.id`, which would
//! mean one client per group, and connections and threads growing with the pipeline count. Here
//! a cluster entry keeps one TCP connection per broker, whatever the number of groups. Used for
//! plaintext clusters; SASL/TLS clusters fall back to per-group rdkafka handles.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::describe_configs_request::{DescribeConfigsRequest, DescribeConfigsResource};
use kafka_protocol::messages::describe_configs_response::DescribeConfigsResponse;
use kafka_protocol::messages::find_coordinator_request::FindCoordinatorRequest;
use kafka_protocol::messages::find_coordinator_response::FindCoordinatorResponse;
use kafka_protocol::messages::metadata_request::{MetadataRequest, MetadataRequestTopic};
use kafka_protocol::messages::metadata_response::MetadataResponse;
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequest, OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::offset_commit_response::OffsetCommitResponse;
use kafka_protocol::messages::offset_fetch_request::{
    OffsetFetchRequest, OffsetFetchRequestGroup, OffsetFetchRequestTopics,
};
use kafka_protocol::messages::offset_fetch_response::OffsetFetchResponse;
use kafka_protocol::messages::{ApiKey, GroupId, RequestHeader, ResponseHeader, TopicName};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};

const FIND_COORDINATOR_VERSION: i16 = 4;
const OFFSET_FETCH_VERSION: i16 = 8;
const OFFSET_COMMIT_VERSION: i16 = 8;
const DESCRIBE_CONFIGS_VERSION: i16 = 4;
/// Metadata v10+ returns topic IDs (KIP-516); v12 is supported by Kafka 2.8 through 4.x.
const METADATA_VERSION: i16 = 12;
/// `UNKNOWN_TOPIC_OR_PARTITION`.
const UNKNOWN_TOPIC: i16 = 3;
/// `ConfigResource.Type.BROKER` in the DescribeConfigs request.
const RESOURCE_BROKER: i8 = 4;
/// The broker config that says how long an empty group's offsets are kept (KIP-211).
pub const OFFSETS_RETENTION_KEY: &str = "offsets.retention.minutes";
const MAX_RESPONSE: usize = 64 << 20;

/// Failure of a protocol exchange.
#[derive(Debug, thiserror::Error)]
pub enum GroupOffsetsError {
    #[error("connecting to {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("talking to {addr}: {source}")]
    Io { addr: String, source: std::io::Error },
    #[error("Kafka protocol: {0}")]
    Protocol(String),
    #[error("group coordinator for {group:?} not available (error {code})")]
    Coordinator { group: String, code: i16 },
    #[error("OffsetFetch for group {group:?} failed with error {code}")]
    Fetch { group: String, code: i16 },
}

/// Failure of an offset write ([`GroupOffsets::commit_empty`]) or a config read
/// ([`GroupOffsets::offsets_retention`]).
#[derive(Debug, thiserror::Error)]
pub enum OffsetWriteError {
    /// Finding the coordinator or the exchange itself failed.
    #[error(transparent)]
    Exchange(#[from] GroupOffsetsError),
    /// OffsetCommit refused for some partitions (the first failing partition's code; 25
    /// `UNKNOWN_MEMBER_ID` / 22 `ILLEGAL_GENERATION`: the group has members again).
    #[error("OffsetCommit for group {group:?} failed with error {code} on {failed} partition(s)")]
    Commit { group: String, code: i16, failed: usize },
    /// DescribeConfigs for the coordinator broker failed or did not return the key.
    #[error("DescribeConfigs of broker {broker}: {detail}")]
    Config { broker: i32, detail: String },
}

impl OffsetWriteError {
    /// Whether a commit was refused because consumers are in the group (a worker joined between
    /// the probe and the commit): the group is not idle after all, nothing to repair.
    pub fn group_has_members(&self) -> bool {
        matches!(self, Self::Commit { code: 22 | 25 | 27, .. })
    }
}

/// Shared connections to one cluster.
pub struct GroupOffsets {
    bootstrap: Vec<String>,
    timeout: Duration,
    conns: Mutex<HashMap<String, TcpStream>>,
    /// group → (coordinator address, coordinator node id).
    coordinators: Mutex<HashMap<String, (String, i32)>>,
    correlation: AtomicI32,
}

/// One partition's commit: the offset and its metadata string (empty when none was given).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commit {
    pub offset: i64,
    pub metadata: String,
}

/// Committed offsets: (topic, partition) → commit (`None`: nothing committed).
pub type Committed = HashMap<(String, i32), Option<Commit>>;

impl GroupOffsets {
    pub fn new(bootstrap: Vec<String>, timeout: Duration) -> Self {
        Self {
            bootstrap,
            timeout,
            conns: Mutex::new(HashMap::new()),
            coordinators: Mutex::new(HashMap::new()),
            correlation: AtomicI32::new(1),
        }
    }

    /// Open connections (for metrics and tests).
    pub fn connections(&self) -> usize {
        self.conns.lock().map(|c| c.len()).unwrap_or(0)
    }

    fn connect(&self, addr: &str) -> Result<TcpStream, GroupOffsetsError> {
        let err = |source| GroupOffsetsError::Connect { addr: addr.to_string(), source };
        let sock = addr
            .to_socket_addrs()
            .map_err(err)?
            .next()
            .ok_or_else(|| err(std::io::Error::new(std::io::ErrorKind::NotFound, "address resolves to nothing")))?;
        let s = TcpStream::connect_timeout(&sock, self.timeout).map_err(err)?;
        s.set_read_timeout(Some(self.timeout)).map_err(err)?;
        s.set_write_timeout(Some(self.timeout)).map_err(err)?;
        s.set_nodelay(true).map_err(err)?;
        Ok(s)
    }

    /// One request/response on the shared connection to `addr` (reconnects once on I/O error).
    fn call<Req, Resp>(&self, addr: &str, key: ApiKey, version: i16, req: &Req) -> Result<Resp, GroupOffsetsError>
    where
        Req: Encodable + HeaderVersion,
        Resp: Decodable + HeaderVersion,
    {
        let corr = self.correlation.fetch_add(1, Ordering::Relaxed);
        let mut buf = BytesMut::new();
        let header = RequestHeader::default()
            .with_request_api_key(key as i16)
            .with_request_api_version(version)
            .with_correlation_id(corr)
            .with_client_id(Some(StrBytes::from_static_str("kpipe-operator-lag-probe")));
        header
            .encode(&mut buf, Req::header_version(version))
            .map_err(|e| GroupOffsetsError::Protocol(e.to_string()))?;
        req.encode(&mut buf, version).map_err(|e| GroupOffsetsError::Protocol(e.to_string()))?;
        let mut frame = Vec::with_capacity(buf.len() + 4);
        frame.extend_from_slice(&(buf.len() as i32).to_be_bytes());
        frame.extend_from_slice(&buf);

        let mut conns = self.conns.lock().map_err(|e| GroupOffsetsError::Protocol(e.to_string()))?;
        let mut attempt = 0;
        let body = loop {
            attempt += 1;
            let stream = match conns.get_mut(addr) {
                Some(s) => s,
                None => {
                    let s = self.connect(addr)?;
                    conns.entry(addr.to_string()).or_insert(s)
                }
            };
            match exchange(stream, &frame) {
                Ok(body) => break body,
                Err(source) => {
                    conns.remove(addr);
                    if attempt >= 2 {
                        return Err(GroupOffsetsError::Io { addr: addr.to_string(), source });
                    }
                }
            }
        };
        drop(conns);
        let mut bytes = Bytes::from(body);
        let rh = ResponseHeader::decode(&mut bytes, Resp::header_version(version))
            .map_err(|e| GroupOffsetsError::Protocol(e.to_string()))?;
        if rh.correlation_id != corr {
            if let Ok(mut conns) = self.conns.lock() {
                conns.remove(addr);
            }
            return Err(GroupOffsetsError::Protocol(format!("correlation id {} != {corr}", rh.correlation_id)));
        }
        Resp::decode(&mut bytes, version).map_err(|e| GroupOffsetsError::Protocol(e.to_string()))
    }

    fn coordinator(&self, group: &str) -> Result<String, GroupOffsetsError> {
        self.coordinator_node(group).map(|(addr, _)| addr)
    }

    /// Address and node id of `group`'s coordinator (cached until an error says it moved).
    fn coordinator_node(&self, group: &str) -> Result<(String, i32), GroupOffsetsError> {
        if let Some(found) = self.coordinators.lock().ok().and_then(|c| c.get(group).cloned()) {
            return Ok(found);
        }
        let req = FindCoordinatorRequest::default()
            .with_key_type(0)
            .with_coordinator_keys(vec![StrBytes::from_string(group.to_string())]);
        let mut last = None;
        for server in &self.bootstrap {
            match self.call::<_, FindCoordinatorResponse>(
                server,
                ApiKey::FindCoordinator,
                FIND_COORDINATOR_VERSION,
                &req,
            ) {
                Ok(resp) => {
                    let Some(c) = resp.coordinators.first() else {
                        return Err(GroupOffsetsError::Protocol("empty FindCoordinator response".into()));
                    };
                    if c.error_code != 0 {
                        return Err(GroupOffsetsError::Coordinator { group: group.into(), code: c.error_code });
                    }
                    let addr = format!("{}:{}", c.host.as_str(), c.port);
                    let node = c.node_id.0;
                    if let Ok(mut map) = self.coordinators.lock() {
                        map.insert(group.to_string(), (addr.clone(), node));
                    }
                    return Ok((addr, node));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| GroupOffsetsError::Protocol("no bootstrap servers".into())))
    }

    fn forget_coordinator(&self, group: &str) {
        if let Ok(mut map) = self.coordinators.lock() {
            map.remove(group);
        }
    }

    /// Committed offsets of `group` for the given partitions (one OffsetFetch).
    pub fn committed(&self, group: &str, partitions: &[(String, i32)]) -> Result<Committed, GroupOffsetsError> {
        let addr = self.coordinator(group)?;
        let mut by_topic: HashMap<&str, Vec<i32>> = HashMap::new();
        for (t, p) in partitions {
            by_topic.entry(t.as_str()).or_default().push(*p);
        }
        let topics = by_topic
            .into_iter()
            .map(|(t, ps)| {
                OffsetFetchRequestTopics::default()
                    .with_name(TopicName(StrBytes::from_string(t.to_string())))
                    .with_partition_indexes(ps)
            })
            .collect();
        let req = OffsetFetchRequest::default().with_groups(vec![
            OffsetFetchRequestGroup::default()
                .with_group_id(GroupId(StrBytes::from_string(group.to_string())))
                .with_topics(Some(topics)),
        ]);
        let resp: OffsetFetchResponse = match self.call(&addr, ApiKey::OffsetFetch, OFFSET_FETCH_VERSION, &req) {
            Ok(r) => r,
            Err(e) => {
                self.forget_coordinator(group);
                return Err(e);
            }
        };
        let Some(g) = resp.groups.first() else {
            return Err(GroupOffsetsError::Protocol("empty OffsetFetch response".into()));
        };
        if g.error_code != 0 {
            // NOT_COORDINATOR (16) / COORDINATOR_NOT_AVAILABLE (15) / loading (14): ask again next time.
            self.forget_coordinator(group);
            return Err(GroupOffsetsError::Fetch { group: group.into(), code: g.error_code });
        }
        let mut out = Committed::new();
        for t in &g.topics {
            for p in &t.partitions {
                let commit = (p.error_code == 0 && p.committed_offset >= 0).then(|| Commit {
                    offset: p.committed_offset,
                    metadata: p.metadata.as_ref().map(|m| m.as_str().to_string()).unwrap_or_default(),
                });
                out.insert((t.name.0.as_str().to_string(), p.partition_index), commit);
            }
        }
        Ok(out)
    }
}

impl GroupOffsets {
    /// Commit `commits` for `group` as a client outside the group (OffsetCommit v8 with generation
    /// -1, an empty member id and no instance id), each partition with its metadata unchanged.
    ///
    /// Kafka accepts this only while the group has no members (or does not exist, which creates a
    /// "simple" group whose offsets then expire `offsets.retention.minutes` after their commit);
    /// with members it fails with [`OffsetWriteError::Commit`] and
    /// [`OffsetWriteError::group_has_members`] is true. A metadata string is sent as given
    /// (an empty string for none), so a worker's retry report survives byte for byte.
    pub fn commit_empty(&self, group: &str, commits: &[((String, i32), Commit)]) -> Result<(), OffsetWriteError> {
        if commits.is_empty() {
            return Ok(());
        }
        let addr = self.coordinator(group)?;
        let mut by_topic: HashMap<&str, Vec<OffsetCommitRequestPartition>> = HashMap::new();
        for ((t, p), c) in commits {
            by_topic.entry(t.as_str()).or_default().push(
                OffsetCommitRequestPartition::default()
                    .with_partition_index(*p)
                    .with_committed_offset(c.offset)
                    .with_committed_leader_epoch(-1)
                    .with_committed_metadata(Some(StrBytes::from_string(c.metadata.clone()))),
            );
        }
        let topics = by_topic
            .into_iter()
            .map(|(t, ps)| {
                OffsetCommitRequestTopic::default()
                    .with_name(TopicName(StrBytes::from_string(t.to_string())))
                    .with_partitions(ps)
            })
            .collect();
        let req = OffsetCommitRequest::default()
            .with_group_id(GroupId(StrBytes::from_string(group.to_string())))
            .with_generation_id_or_member_epoch(-1)
            .with_member_id(StrBytes::from_static_str(""))
            .with_group_instance_id(None)
            .with_topics(topics);
        let resp: OffsetCommitResponse = match self.call(&addr, ApiKey::OffsetCommit, OFFSET_COMMIT_VERSION, &req) {
            Ok(r) => r,
            Err(e) => {
                self.forget_coordinator(group);
                return Err(e.into());
            }
        };
        let errors: Vec<i16> =
            resp.topics.iter().flat_map(|t| t.partitions.iter()).map(|p| p.error_code).filter(|c| *c != 0).collect();
        match errors.first() {
            None => Ok(()),
            Some(&code) => {
                if matches!(code, 14..=16) {
                    self.forget_coordinator(group);
                }
                Err(OffsetWriteError::Commit { group: group.into(), code, failed: errors.len() })
            }
        }
    }

    /// The topic ID of each of `topics` (Metadata v12 to a bootstrap broker): `Some(id)` in
    /// [`topic_id_text`] form, `None` for a topic that does not exist. A topic the broker reports
    /// with another error, or without an ID (a broker older than Kafka 2.8), is left out.
    pub fn topic_ids(&self, topics: &[String]) -> Result<HashMap<String, Option<String>>, GroupOffsetsError> {
        let req = MetadataRequest::default()
            .with_topics(Some(
                topics
                    .iter()
                    .map(|t| {
                        MetadataRequestTopic::default().with_name(Some(TopicName(StrBytes::from_string(t.clone()))))
                    })
                    .collect(),
            ))
            .with_allow_auto_topic_creation(false);
        let mut last = None;
        for server in &self.bootstrap {
            match self.call::<_, MetadataResponse>(server, ApiKey::Metadata, METADATA_VERSION, &req) {
                Ok(resp) => {
                    let mut out = HashMap::new();
                    for t in &resp.topics {
                        let Some(name) = t.name.as_ref() else { continue };
                        let id = match t.error_code {
                            0 if !t.topic_id.is_nil() => Some(topic_id_text(t.topic_id.as_bytes())),
                            UNKNOWN_TOPIC => None,
                            _ => continue,
                        };
                        out.insert(name.0.as_str().to_string(), id);
                    }
                    return Ok(out);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| GroupOffsetsError::Protocol("no bootstrap servers".into())))
    }

    /// `offsets.retention.minutes` of the broker coordinating `group` (DescribeConfigs v4 on that
    /// broker), as a duration. Callers cache it: it is a read-only broker config.
    pub fn offsets_retention(&self, group: &str) -> Result<Duration, OffsetWriteError> {
        let (addr, node) = self.coordinator_node(group)?;
        let req = DescribeConfigsRequest::default().with_resources(vec![
            DescribeConfigsResource::default()
                .with_resource_type(RESOURCE_BROKER)
                .with_resource_name(StrBytes::from_string(node.to_string()))
                .with_configuration_keys(Some(vec![StrBytes::from_static_str(OFFSETS_RETENTION_KEY)])),
        ]);
        let resp: DescribeConfigsResponse =
            self.call(&addr, ApiKey::DescribeConfigs, DESCRIBE_CONFIGS_VERSION, &req)?;
        let err = |detail: String| OffsetWriteError::Config { broker: node, detail };
        let Some(r) = resp.results.first() else {
            return Err(err("empty response".into()));
        };
        if r.error_code != 0 {
            let msg = r.error_message.as_ref().map(|m| m.as_str().to_string()).unwrap_or_default();
            return Err(err(format!("error {} {msg}", r.error_code)));
        }
        let value = r
            .configs
            .iter()
            .find(|c| c.name.as_str() == OFFSETS_RETENTION_KEY)
            .and_then(|c| c.value.as_ref())
            .ok_or_else(|| err(format!("{OFFSETS_RETENTION_KEY} not returned")))?;
        parse_retention_minutes(value.as_str()).ok_or_else(|| err(format!("{OFFSETS_RETENTION_KEY}={value:?}")))
    }
}

/// Kafka's text form of a topic ID: the 16 bytes in URL-safe base64 without padding (22 characters),
/// as `kafka-topics --describe` prints it.
pub fn topic_id_text(id: &[u8; 16]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(22);
    for chunk in id.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// `offsets.retention.minutes` as a duration; `None` for a value that is not a positive integer.
pub fn parse_retention_minutes(value: &str) -> Option<Duration> {
    let m: u64 = value.trim().parse().ok()?;
    (m > 0).then(|| Duration::from_secs(m.saturating_mul(60)))
}

fn exchange(stream: &mut TcpStream, frame: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(frame)?;
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let n = i32::from_be_bytes(len);
    if n < 0 || n as usize > MAX_RESPONSE {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad response size {n}")));
    }
    let mut body = vec![0u8; n as usize];
    stream.read_exact(&mut body)?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_minutes_parse() {
        assert_eq!(parse_retention_minutes("10080"), Some(Duration::from_secs(7 * 24 * 3600)));
        assert_eq!(parse_retention_minutes(" 2 "), Some(Duration::from_secs(120)));
        assert_eq!(parse_retention_minutes("0"), None);
        assert_eq!(parse_retention_minutes("-1"), None);
        assert_eq!(parse_retention_minutes("soon"), None);
    }

    /// Kafka prints topic IDs as URL-safe base64 of the 16 bytes, without padding.
    #[test]
    fn topic_ids_print_like_kafka() {
        assert_eq!(topic_id_text(&[0; 16]), "AAAAAAAAAAAAAAAAAAAAAA");
        let id = [0xfb, 0xff, 0xbf, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0xff];
        assert_eq!(topic_id_text(&id), "-_-_AAECAwQFBgcICQoL_w");
    }

    #[test]
    fn members_are_recognised_from_commit_errors() {
        let e = |code| OffsetWriteError::Commit { group: "g".into(), code, failed: 1 };
        assert!(e(25).group_has_members());
        assert!(e(22).group_has_members());
        assert!(!e(15).group_has_members());
    }
}
