//! Committed offsets of any consumer group over a few shared connections, speaking the Kafka
//! protocol directly (FindCoordinator v4, OffsetFetch v8) with the `kafka-protocol` codecs.
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
use kafka_protocol::messages::find_coordinator_request::FindCoordinatorRequest;
use kafka_protocol::messages::find_coordinator_response::FindCoordinatorResponse;
use kafka_protocol::messages::offset_fetch_request::{
    OffsetFetchRequest, OffsetFetchRequestGroup, OffsetFetchRequestTopics,
};
use kafka_protocol::messages::offset_fetch_response::OffsetFetchResponse;
use kafka_protocol::messages::{ApiKey, GroupId, RequestHeader, ResponseHeader, TopicName};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};

const FIND_COORDINATOR_VERSION: i16 = 4;
const OFFSET_FETCH_VERSION: i16 = 8;
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

/// Shared connections to one cluster.
pub struct GroupOffsets {
    bootstrap: Vec<String>,
    timeout: Duration,
    conns: Mutex<HashMap<String, TcpStream>>,
    coordinators: Mutex<HashMap<String, String>>,
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
        if let Some(addr) = self.coordinators.lock().ok().and_then(|c| c.get(group).cloned()) {
            return Ok(addr);
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
                    if let Ok(mut map) = self.coordinators.lock() {
                        map.insert(group.to_string(), addr.clone());
                    }
                    return Ok(addr);
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
