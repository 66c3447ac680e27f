//! Helpers for the worker's integration tests against a real Kafka broker: broker discovery, topics, producing ids
//! and running the worker binary. Unique names, ports and the HTTP sink come from `kpipe-test-support` (shared with
//! the operator's tests and the e2e suites).
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code, unused_imports)]

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use kpipe_test_support::sink::{HttpSink, SinkBehavior, SinkRequest, ids, serve};
pub use kpipe_test_support::{free_addr, kafka_bootstrap as bootstrap, unique_name as unique};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

pub async fn create_topic(bootstrap: &str, name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", bootstrap).create().unwrap();
    let res = admin
        .create_topics(&[NewTopic::new(name, partitions, TopicReplication::Fixed(1))], &AdminOptions::new())
        .await
        .unwrap();
    for r in res {
        r.unwrap();
    }
    // Wait until the metadata shows every partition.
    let probe: BaseConsumer = ClientConfig::new().set("bootstrap.servers", bootstrap).create().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let md = probe.fetch_metadata(Some(name), Duration::from_secs(5)).unwrap();
        if md.topics().first().is_some_and(|t| t.partitions().len() == partitions as usize && t.error().is_none()) {
            return;
        }
        assert!(Instant::now() < deadline, "topic {name} did not appear");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Produces ids `from..to` as values (decimal strings), keyed `key-<id % keys>`.
pub async fn produce_ids(bootstrap: &str, topic: &str, ids: std::ops::Range<u64>, keys: u64) {
    produce_padded_ids(bootstrap, topic, ids, keys, 0).await;
}

/// Like [`produce_ids`], each value padded to `value_bytes` after a newline (the sink's id is the first line);
/// `value_bytes` 0: no padding.
pub async fn produce_padded_ids(
    bootstrap: &str,
    topic: &str,
    ids: std::ops::Range<u64>,
    keys: u64,
    value_bytes: usize,
) {
    produce_padded_ids_to(bootstrap, topic, None, ids, keys, value_bytes).await;
}

/// Like [`produce_padded_ids`], to `partition` (`None`: the partitioner's choice by key).
pub async fn produce_padded_ids_to(
    bootstrap: &str,
    topic: &str,
    partition: Option<i32>,
    ids: std::ops::Range<u64>,
    keys: u64,
    value_bytes: usize,
) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("message.max.bytes", "4000000")
        .create()
        .unwrap();
    let mut futs = Vec::new();
    for id in ids {
        let producer = producer.clone();
        let topic = topic.to_owned();
        futs.push(async move {
            let key = format!("key-{}", id % keys);
            let mut value = id.to_string();
            if value_bytes > 0 {
                value.push('\n');
                let pad = value_bytes.saturating_sub(value.len());
                value.extend(std::iter::repeat_n('x', pad));
            }
            let mut record = FutureRecord::to(&topic).key(&key).payload(&value);
            if let Some(p) = partition {
                record = record.partition(p);
            }
            producer.send(record, Duration::from_secs(30)).await.unwrap();
        });
        if futs.len() >= 1000 {
            futures::future::join_all(std::mem::take(&mut futs)).await;
        }
    }
    futures::future::join_all(futs).await;
}

/// The first line of a value: the id the test producers put there.
pub fn first_line(v: &str) -> &str {
    v.split('\n').next().unwrap_or_default()
}

/// A record read back from an output topic.
#[derive(Debug, Clone)]
pub struct ReadRecord {
    pub key: Option<Vec<u8>>,
    pub value: String,
    pub headers: BTreeMap<String, String>,
}

/// Reads `expected` records from every partition of `topic` from the beginning (or until timeout).
pub fn read_topic(bootstrap: &str, topic: &str, expected: usize, timeout: Duration) -> Vec<ReadRecord> {
    read_topic_with(bootstrap, topic, expected, timeout, |m| {
        let headers = kpipe_rdkafka_native::copy_headers(m)
            .headers
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v.unwrap_or_default()).into_owned()))
            .collect();
        ReadRecord {
            key: m.key().map(<[u8]>::to_vec),
            value: String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
            headers,
        }
    })
}

/// Reads `topic` from the beginning of every partition until `expected` records (each made by `each`) or `timeout`.
pub fn read_topic_with<T>(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    timeout: Duration,
    mut each: impl FnMut(&rdkafka::message::BorrowedMessage<'_>) -> T,
) -> Vec<T> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < expected && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            out.push(each(&m));
        }
    }
    out
}

/// The ids the sink accepted, as the numbers these tests produce (decimal values), with how often each was accepted.
pub fn accepted(sink: &HttpSink) -> HashMap<u64, u32> {
    sink.accepted().into_iter().map(|(id, n)| (id.parse().unwrap_or(u64::MAX), n)).collect()
}

/// A running `kpipe-worker` process.
pub struct Worker {
    pub child: Child,
    pub listen: SocketAddr,
    pub log: PathBuf,
}

/// The operator's configuration document for a test pipeline.
pub fn config(
    bootstrap: &str,
    name: &str,
    topic: &str,
    group: &str,
    spec_extra: serde_json::Value,
) -> serde_json::Value {
    let mut spec = serde_json::json!({
        "source": {
            "bootstrapServers": bootstrap.split(',').collect::<Vec<_>>(),
            "topics": [topic],
            "config": {"session.timeout.ms": "6000", "heartbeat.interval.ms": "1000"}
        },
    });
    if let (Some(s), Some(extra)) = (spec.as_object_mut(), spec_extra.as_object()) {
        for (k, v) in extra {
            s.insert(k.clone(), v.clone());
        }
    }
    serde_json::json!({"namespace": "test", "pipeline": name, "groupId": group, "spec": spec})
}

/// `config` with `source.groupProtocol` set to `protocol` (`classic` or `consumer`). Under `consumer` the session
/// timeout and heartbeat interval are the broker's (`group.consumer.*`), so the client overrides [`config`] sets
/// for quick failure detection are removed (librdkafka refuses them with `group.protocol=consumer`).
pub fn with_group_protocol(mut config: serde_json::Value, protocol: &str) -> serde_json::Value {
    let source = &mut config["spec"]["source"];
    source["groupProtocol"] = serde_json::Value::String(protocol.to_owned());
    if protocol == "consumer"
        && let Some(client) = source.get_mut("config").and_then(|c| c.as_object_mut())
    {
        client.remove("session.timeout.ms");
        client.remove("heartbeat.interval.ms");
    }
    config
}

impl Worker {
    pub fn start(name: &str, config: &serde_json::Value) -> Worker {
        Self::start_with_env(name, config, &[])
    }

    /// Like [`Worker::start`]; `env` overrides the defaults set here.
    pub fn start_with_env(name: &str, config: &serde_json::Value, env: &[(&str, &str)]) -> Worker {
        let dir = std::env::temp_dir().join("kpipe-worker-tests");
        std::fs::create_dir_all(&dir).unwrap();
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
        let cfg = dir.join(format!("{name}-{nanos}.json"));
        std::fs::write(&cfg, serde_json::to_vec_pretty(config).unwrap()).unwrap();
        let log = dir.join(format!("{name}-{nanos}.log"));
        let listen = free_addr();
        let log_file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_kpipe-worker"))
            .env("KPIPE_CONFIG", &cfg)
            .env("KPIPE_LISTEN", listen.to_string())
            .env("KPIPE_SHUTDOWN_TIMEOUT", "10s")
            .env("KPIPE_COMMIT_INTERVAL", "200ms")
            .env("KPIPE_POD_NAME", name)
            .env("RUST_LOG", "info,librdkafka=warn")
            .envs(env.iter().copied())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap();
        eprintln!("started worker {name} pid {} (log {})", child.id(), log.display());
        Worker { child, listen, log }
    }

    pub fn signal(&self, sig: i32) {
        send_signal(self.child.id(), sig);
    }

    /// Waits for exit; returns the exit status code (None when killed by a signal).
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < deadline, "worker did not exit in {timeout:?}; log {}", self.log.display());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The worker's /metrics text (empty while it is not listening yet).
    pub async fn metrics(&self) -> String {
        match reqwest::get(format!("http://{}/metrics", self.listen)).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    pub async fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(r) = reqwest::get(format!("http://{}/readyz", self.listen)).await
                && r.status().is_success()
            {
                return;
            }
            assert!(Instant::now() < deadline, "worker not ready in {timeout:?}; log {}", self.log.display());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The workspace forbids unsafe code (no libc::kill), so signals go through kill(1).
fn send_signal(pid: u32, sig: i32) {
    let status = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().unwrap();
    assert!(status.success(), "kill -{sig} {pid} failed");
}

/// Metric value from Prometheus text: the sum of every sample of `name` over all its label sets (a labelled
/// counter's total, e.g. dead letters of every class); `None` when there is no sample.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(None, |sum, v| Some(sum.unwrap_or(0.0) + v))
}

pub fn report_duplicates(accepted: &HashMap<u64, u32>) -> usize {
    accepted.values().filter(|&&n| n > 1).map(|&n| (n - 1) as usize).sum()
}
