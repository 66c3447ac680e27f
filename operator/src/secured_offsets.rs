//! The offset keeper's Kafka access for every cluster: [`GroupOffsets`] (shared plaintext protocol connections) on
//! plaintext clusters, [`SecuredOffsets`] (librdkafka with the pipeline's SASL/TLS settings from
//! [`kpipe_api::kafka_client::properties`]) on secured ones. Both offer the same three operations the keeper uses:
//! read a group's exact commits, commit as a client outside the group, and read the broker's offset retention.
//!
//! [`SecuredOffsets`] commits through a consumer handle that never subscribes (it never joins the group), so the
//! OffsetCommit carries generation -1 and no member id, which Kafka accepts only while the group has no members —
//! the same rule as the plaintext path. The retention comes from an admin DescribeConfigs of a broker.
//!
//! All calls block; the keeper runs them on tokio's blocking pool.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};

use crate::group_offsets::{
    Commit, Committed, GroupOffsets, GroupOffsetsError, OFFSETS_RETENTION_KEY, OffsetWriteError,
    parse_retention_minutes,
};
use crate::probe::Cluster;

/// `client.id` of the offset keeper's clients.
const KEEPER_CLIENT_ID: &str = "kpipe-operator-offset-keeper";

/// Offset access to one cluster, plaintext or secured.
pub enum OffsetClient {
    /// Shared protocol connections (plaintext clusters).
    Plain(GroupOffsets),
    /// librdkafka clients with the cluster's security settings.
    Secured(Box<SecuredOffsets>),
}

impl OffsetClient {
    /// The client for `cluster`: [`GroupOffsets`] when it is plaintext, else [`SecuredOffsets`].
    pub fn for_cluster(cluster: &Cluster, timeout: Duration) -> Self {
        if cluster.is_secured() {
            Self::Secured(Box::new(SecuredOffsets::new(cluster.clone(), timeout)))
        } else {
            Self::Plain(GroupOffsets::new(cluster.bootstrap_servers.clone(), timeout))
        }
    }

    /// [`GroupOffsets::committed`] / [`SecuredOffsets::committed`].
    pub fn committed(&self, group: &str, partitions: &[(String, i32)]) -> Result<Committed, GroupOffsetsError> {
        match self {
            Self::Plain(o) => o.committed(group, partitions),
            Self::Secured(o) => o.committed(group, partitions),
        }
    }

    /// [`GroupOffsets::commit_empty`] / [`SecuredOffsets::commit_empty`].
    pub fn commit_empty(&self, group: &str, commits: &[((String, i32), Commit)]) -> Result<(), OffsetWriteError> {
        match self {
            Self::Plain(o) => o.commit_empty(group, commits),
            Self::Secured(o) => o.commit_empty(group, commits),
        }
    }

    /// [`GroupOffsets::topic_ids`]; `None` on a secured cluster (librdkafka's metadata API as the Rust client
    /// exposes it carries no topic IDs, so recreated topics there are told apart by their offsets only).
    pub fn topic_ids(&self, topics: &[String]) -> Option<Result<HashMap<String, Option<String>>, GroupOffsetsError>> {
        match self {
            Self::Plain(o) => Some(o.topic_ids(topics)),
            Self::Secured(_) => None,
        }
    }

    /// [`GroupOffsets::offsets_retention`] / [`SecuredOffsets::offsets_retention`].
    pub fn offsets_retention(&self, group: &str) -> Result<Duration, OffsetWriteError> {
        match self {
            Self::Plain(o) => o.offsets_retention(group),
            Self::Secured(o) => o.offsets_retention(group),
        }
    }
}

/// Offset reads and writes on a SASL/TLS cluster through librdkafka: one never-subscribed consumer per group
/// (created on first use) and one admin client.
pub struct SecuredOffsets {
    cluster: Cluster,
    timeout: Duration,
    groups: Mutex<HashMap<String, Arc<BaseConsumer>>>,
    admin: Mutex<Option<Arc<AdminClient<DefaultClientContext>>>>,
}

fn exchange(e: KafkaError) -> GroupOffsetsError {
    GroupOffsetsError::Protocol(e.to_string())
}

impl SecuredOffsets {
    /// Clients for `cluster` (created lazily) whose requests time out after `timeout`.
    pub fn new(cluster: Cluster, timeout: Duration) -> Self {
        Self { cluster, timeout, groups: Mutex::new(HashMap::new()), admin: Mutex::new(None) }
    }

    fn consumer(&self, group: &str) -> Result<Arc<BaseConsumer>, GroupOffsetsError> {
        let mut groups = self.groups.lock().map_err(|e| GroupOffsetsError::Protocol(e.to_string()))?;
        if let Some(c) = groups.get(group) {
            return Ok(c.clone());
        }
        let consumer: BaseConsumer = self
            .cluster
            .client_config(KEEPER_CLIENT_ID, self.timeout)
            .set("group.id", group)
            .create()
            .map_err(exchange)?;
        let consumer = Arc::new(consumer);
        groups.insert(group.to_string(), consumer.clone());
        Ok(consumer)
    }

    fn admin(&self) -> Result<Arc<AdminClient<DefaultClientContext>>, GroupOffsetsError> {
        let mut admin = self.admin.lock().map_err(|e| GroupOffsetsError::Protocol(e.to_string()))?;
        if let Some(a) = admin.as_ref() {
            return Ok(a.clone());
        }
        let mut config = self.cluster.client_config(KEEPER_CLIENT_ID, self.timeout);
        // Consumer-only properties make an admin (producer-type) client warn; it has no use for them.
        config.remove("enable.auto.commit").remove("enable.auto.offset.store");
        let a: Arc<AdminClient<DefaultClientContext>> = Arc::new(config.create().map_err(exchange)?);
        *admin = Some(a.clone());
        Ok(a)
    }

    /// Committed offsets (with their metadata) of `group` for `partitions` (one OffsetFetch).
    pub fn committed(&self, group: &str, partitions: &[(String, i32)]) -> Result<Committed, GroupOffsetsError> {
        let consumer = self.consumer(group)?;
        let mut tpl = TopicPartitionList::new();
        for (t, p) in partitions {
            tpl.add_partition(t, *p);
        }
        let got = consumer.committed_offsets(tpl, self.timeout).map_err(exchange)?;
        Ok(got
            .elements()
            .iter()
            .map(|e| {
                let commit = match e.offset() {
                    Offset::Offset(o) if o >= 0 => Some(Commit { offset: o, metadata: e.metadata().to_string() }),
                    _ => None,
                };
                ((e.topic().to_string(), e.partition()), commit)
            })
            .collect())
    }

    /// Commit `commits` for `group` as a client outside it (generation -1, no member id), metadata unchanged.
    /// A group with members refuses it: [`OffsetWriteError::group_has_members`] is true then.
    pub fn commit_empty(&self, group: &str, commits: &[((String, i32), Commit)]) -> Result<(), OffsetWriteError> {
        if commits.is_empty() {
            return Ok(());
        }
        let consumer = self.consumer(group)?;
        let mut tpl = TopicPartitionList::new();
        for ((t, p), c) in commits {
            let mut e = tpl.add_partition(t, *p);
            e.set_offset(Offset::Offset(c.offset)).map_err(|e| OffsetWriteError::from(exchange(e)))?;
            e.set_metadata(c.metadata.clone());
        }
        consumer.commit(&tpl, CommitMode::Sync).map_err(|e| match e.rdkafka_error_code() {
            Some(code) => OffsetWriteError::Commit { group: group.into(), code: code as i16, failed: commits.len() },
            None => OffsetWriteError::from(exchange(e)),
        })
    }

    /// `offsets.retention.minutes` of a broker of the cluster (admin DescribeConfigs). Every broker of a cluster is
    /// expected to share it; callers cache it.
    pub fn offsets_retention(&self, group: &str) -> Result<Duration, OffsetWriteError> {
        let consumer = self.consumer(group)?;
        let md = consumer.fetch_metadata(None, self.timeout).map_err(|e| OffsetWriteError::from(exchange(e)))?;
        let broker = md.orig_broker_id();
        let err = |detail: String| OffsetWriteError::Config { broker, detail };
        let admin = self.admin()?;
        let opts = AdminOptions::new().request_timeout(Some(self.timeout));
        let results = futures::executor::block_on(admin.describe_configs(&[ResourceSpecifier::Broker(broker)], &opts))
            .map_err(|e| err(e.to_string()))?;
        let resource = results.into_iter().next().ok_or_else(|| err("empty response".into()))?;
        let resource = resource.map_err(|code| err(format!("error {code:?}")))?;
        let value = resource
            .get(OFFSETS_RETENTION_KEY)
            .and_then(|entry| entry.value.clone())
            .ok_or_else(|| err(format!("{OFFSETS_RETENTION_KEY} not returned")))?;
        parse_retention_minutes(&value).ok_or_else(|| err(format!("{OFFSETS_RETENTION_KEY}={value:?}")))
    }
}
