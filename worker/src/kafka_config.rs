//! librdkafka client properties derived from the worker configuration.

use kpipe_api::kafka_client::{self, Credentials, Material};
use kpipe_api::v1alpha1::GroupProtocol;
use kpipe_api::worker_contract::WorkerConfig;
use rdkafka::ClientConfig;

/// Credentials and identity that come from the environment, not the config document.
#[derive(Clone, Default)]
pub struct Env {
    pub sasl_username: Option<String>,
    pub sasl_password: Option<String>,
    pub oidc_client_id: Option<String>,
    pub oidc_client_secret: Option<String>,
    pub pod_name: Option<String>,
}

impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env").field("pod_name", &self.pod_name).finish_non_exhaustive()
    }
}

/// Properties shared by the consumer and producers: brokers, passthrough tuning, security (from
/// [`kafka_client::properties`], the function the operator's clients use too).
pub fn common(config: &WorkerConfig, env: &Env) -> ClientConfig {
    let mut c = ClientConfig::new();
    // Passthrough first so kpipe's own settings below win.
    for (k, v) in &config.spec.source.config {
        c.set(k, v);
    }
    c.set("bootstrap.servers", config.spec.source.bootstrap_servers.join(","));
    c.set("client.id", format!("kpipe-worker.{}.{}", config.namespace, config.pipeline));
    let credentials = Credentials {
        username: env.sasl_username.clone(),
        password: env.sasl_password.clone(),
        client_id: env.oidc_client_id.clone(),
        client_secret: env.oidc_client_secret.clone(),
        ca: config.tls_ca_file.clone().map(Material::File),
        client_cert: config.tls_client_cert_file.clone().map(Material::File),
        client_key: config.tls_client_key_file.clone().map(Material::File),
    };
    for (k, v) in kafka_client::properties(config.spec.source.auth.as_ref(), &credentials) {
        c.set(k, v);
    }
    c
}

/// Consumer defaults (each overridable through `spec.source.config`): a modest prefetch so RSS
/// stays flat with any backlog, a short back-off when that prefetch is full so fetching
/// resumes as soon as the partition tasks have taken records (librdkafka's default of 1 s makes
/// throughput bursty), and a short long-poll: librdkafka keeps one fetch in flight per broker, so a
/// partition resumed after a backpressure pause waits until the broker answers a fetch for the
/// worker's other partitions, which it holds for `fetch.wait.max.ms` when they have no new records
/// (librdkafka's default 500 ms stalled a fast pipeline after every resume: 14 stalls of 460-510 ms in a noop drain
/// with 14 pauses; worker test `resume_latency`). The cost is an
/// empty fetch every 100 ms per broker while the worker is idle.
pub const CONSUMER_TUNING: &[(&str, &str)] = &[
    ("queued.max.messages.kbytes", "8192"),
    ("queued.min.messages", "10000"),
    ("fetch.max.bytes", "4194304"),
    ("max.partition.fetch.bytes", "262144"),
    ("fetch.queue.backoff.ms", "10"),
    ("fetch.wait.max.ms", "100"),
];

/// librdkafka's period of metadata refreshes (new partitions, deleted topics), in milliseconds.
pub const METADATA_REFRESH: &str = "topic.metadata.refresh.interval.ms";

/// Consumer properties: group membership (`source.groupProtocol`), explicit commits, resets to the earliest
/// retained record and a metadata refresh every `scaling.pollInterval` (1 s to 5 min).
pub fn consumer(config: &WorkerConfig, env: &Env) -> ClientConfig {
    let mut c = common(config, env);
    c.set("group.id", &config.group_id);
    let protocol = config.spec.source.group_protocol;
    c.set("group.protocol", protocol.as_str());
    match protocol {
        // Incremental (KIP-429) rebalances: a member keeps the partitions it is not asked to give up.
        GroupProtocol::Classic => {
            c.set("partition.assignment.strategy", "cooperative-sticky");
        }
        // The broker assigns, always incrementally, and owns the session timeout and heartbeat interval:
        // librdkafka refuses a consumer that sets any of them (the API rejects them too; this guards a worker
        // run by hand).
        GroupProtocol::Consumer => {
            for (key, _) in kpipe_api::rules::BROKER_SIDE_WITH_CONSUMER_PROTOCOL {
                c.remove(key);
            }
        }
    }
    // kpipe commits explicitly from its own tracker, always synchronously: periodic and early commits on the
    // committer thread (their acknowledgement moves each partition's uncommitted window), final ones on revoke and
    // at shutdown.
    c.set("enable.auto.commit", "false");
    c.set("enable.auto.offset.store", "false");
    c.set("enable.partition.eof", "false");
    // `startOffset` is applied by the worker itself when a partition is assigned (explicit start offsets, see
    // `kpipe_api::offsets::start_point`). What librdkafka resets on its own — a fetch position found out of range
    // while consuming (retention passed it, the topic was recreated), or a start it had to resolve because the
    // lookups failed — goes to the earliest retained record, whatever `startOffset` says: never to the end, which
    // would skip records nobody processed.
    c.set("auto.offset.reset", "earliest");
    // New partitions (and deleted or recreated topics) are noticed within one pollInterval, the period at which the
    // operator sees them (librdkafka's default is 5 minutes). Overridable through `spec.source.config`.
    if !config.spec.source.config.contains_key(METADATA_REFRESH) {
        let poll_ms = config.spec.scaling.poll_interval.as_std().as_millis().clamp(1_000, 300_000);
        c.set(METADATA_REFRESH, poll_ms.to_string());
    }
    // Stats carry the per-partition high watermark for the lag gauge.
    c.set("statistics.interval.ms", "5000");
    // Keep prefetch memory modest so RSS stays flat with any backlog (overridable passthrough).
    for (key, value) in CONSUMER_TUNING {
        if !config.spec.source.config.contains_key(*key) {
            c.set(*key, *value);
        }
    }
    if config.spec.worker.static_membership
        && let Some(pod) = &env.pod_name
    {
        c.set("group.instance.id", pod);
    }
    c
}

pub fn producer(config: &WorkerConfig, env: &Env) -> ClientConfig {
    let mut c = common(config, env);
    for k in [
        "fetch.min.bytes",
        "fetch.max.bytes",
        "fetch.wait.max.ms",
        "max.partition.fetch.bytes",
        "queued.max.messages.kbytes",
        "queued.min.messages",
        "isolation.level",
        "client.rack",
        "session.timeout.ms",
        "heartbeat.interval.ms",
        "max.poll.interval.ms",
        "group.remote.assignor",
    ] {
        c.remove(k);
    }
    c.set("enable.idempotence", "true");
    c.set("acks", "all");
    // The topics' max.message.bytes decides what fits (crate::size), neither librdkafka's 1,000,000 default nor a
    // `message.max.bytes` in spec.source.config (a consumer tuning knob there, paired with fetch.max.bytes): with the
    // user's 100,000 a 200 kB record that fits its topic was refused locally, taken for "fits alone: retryable", and
    // stalled the partition behind an open circuit for good (breaker10b::a_users_message_max_bytes_does_not_stall_
    // the_forwarder).
    c.set("message.max.bytes", crate::processor::kafka::PRODUCER_MESSAGE_MAX_BYTES.to_string());
    // No linger: a record is done only when acknowledged, and a partition starts only so many records before its
    // commit (`uncommittedPerPartition`, `perWorker`), so every millisecond of linger is a millisecond of each round
    // trip. Under load librdkafka still batches what arrives while requests are in flight. Measured with `make
    // bench-peers`' forwarder (docs/BENCHMARKS.md): 112k rec/s against 38k at 5 ms, with less CPU per record.
    c.set("linger.ms", "0");
    c
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn cfg(extra: &str) -> WorkerConfig {
        let text = format!(
            r#"{{"namespace":"ns","pipeline":"p","groupId":"g","tlsCaFile":"/ca.crt",
            "spec":{{"source":{{"bootstrapServers":["a:1","b:2"],"topics":["t"],
            "config":{{"fetch.min.bytes":"10","enable.auto.commit":"true"}},
            "auth":{{"sasl":{{"mechanism":"SCRAM-SHA-512","secretRef":{{"name":"s"}}}},"tls":{{}}}}}},
            "processor":{{"noop":{{}}}},"onFailure":"drop"{extra}}}}}"#
        );
        crate::config::parse_config(Path::new("c.json"), &text).unwrap()
    }

    #[test]
    fn consumer_properties() {
        let env = Env {
            sasl_username: Some("u".into()),
            sasl_password: Some("pw".into()),
            pod_name: Some("pod-1".into()),
            ..Default::default()
        };
        let c = consumer(&cfg(""), &env);
        assert_eq!(c.get("bootstrap.servers"), Some("a:1,b:2"));
        assert_eq!(c.get("enable.auto.commit"), Some("false"), "kpipe settings win over passthrough");
        assert_eq!(c.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(c.get("partition.assignment.strategy"), Some("cooperative-sticky"));
        assert_eq!(c.get("fetch.min.bytes"), Some("10"));
        assert_eq!(c.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(c.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(c.get("sasl.password"), Some("pw"));
        assert_eq!(c.get("ssl.ca.location"), Some("/ca.crt"));
        assert_eq!(c.get("group.instance.id"), None, "static membership is off by default");
        assert_eq!(c.get("auto.offset.reset"), Some("earliest"), "out-of-range positions never reset to the end");
        assert_eq!(c.get(METADATA_REFRESH), Some("5000"), "new partitions within one pollInterval (default 5s)");
        let latest = consumer(&cfg(r#","scaling":{"pollInterval":"2s"}"#), &env);
        assert_eq!(latest.get(METADATA_REFRESH), Some("2000"));
        let c = consumer(&cfg(r#","worker":{"staticMembership":true}"#), &env);
        assert_eq!(c.get("group.instance.id"), Some("pod-1"));
    }

    #[test]
    fn group_protocols() {
        let classic = consumer(&cfg(""), &Env::default());
        assert_eq!(classic.get("group.protocol"), Some("classic"), "classic is the default");
        assert_eq!(classic.get("partition.assignment.strategy"), Some("cooperative-sticky"));
        let mut with_session = cfg("");
        with_session.spec.source.config.insert("session.timeout.ms".into(), "30000".into());
        with_session.spec.source.config.insert("heartbeat.interval.ms".into(), "2000".into());
        assert_eq!(consumer(&with_session, &Env::default()).get("session.timeout.ms"), Some("30000"));
        with_session.spec.source.group_protocol = GroupProtocol::Consumer;
        let c = consumer(&with_session, &Env::default());
        assert_eq!(c.get("group.protocol"), Some("consumer"));
        // librdkafka refuses each of these with group.protocol=consumer.
        for key in
            ["partition.assignment.strategy", "session.timeout.ms", "heartbeat.interval.ms", "group.protocol.type"]
        {
            assert_eq!(c.get(key), None, "{key}");
        }
        // And librdkafka accepts the result (the test's security settings aside: they need files and credentials).
        let mut c = c.clone();
        for key in ["sasl.mechanism", "ssl.ca.location"] {
            c.remove(key);
        }
        c.set("security.protocol", "PLAINTEXT");
        let created: Result<rdkafka::consumer::BaseConsumer, _> = c.create();
        assert!(created.is_ok(), "{:?}", created.err());
    }

    #[test]
    fn producer_is_idempotent() {
        let p = producer(&cfg(""), &Env::default());
        assert_eq!(p.get("enable.idempotence"), Some("true"));
        assert_eq!(p.get("linger.ms"), Some("0"), "no linger: records wait for their acknowledgement anyway");
        assert_eq!(p.get("acks"), Some("all"));
        assert_eq!(p.get("fetch.min.bytes"), None);
    }

    #[test]
    fn the_producers_message_max_bytes_is_the_workers_not_the_sources() {
        let mut c = cfg("");
        c.spec.source.config.insert("message.max.bytes".into(), "100000".into());
        let limit = crate::processor::kafka::PRODUCER_MESSAGE_MAX_BYTES.to_string();
        assert_eq!(producer(&c, &Env::default()).get("message.max.bytes"), Some(limit.as_str()));
        assert_eq!(consumer(&c, &Env::default()).get("message.max.bytes"), Some("100000"));
    }
}
