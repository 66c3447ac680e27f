//! Test-support API over a running local test bed (started with `e2e/testbed/up.sh`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), kpipe_e2e::TestBedError> {
//! let bed = kpipe_e2e::TestBed::connect().await?;          // fails with a clear message if no bed is up
//! let ns = bed.temp_namespace("demo").await?;              // deleted on drop; pod logs dumped if the test panics
//! bed.create_topic("orders", 3).await?;
//! bed.produce("orders", 1000).await?;
//! let records = bed.consume("orders", "g1", 1000, std::time::Duration::from_secs(30)).await?;
//! # let _ = (ns, records); Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

/// Signals for [`TestBed::kill_container`] (re-exported from `nix`).
pub use nix::sys::signal::Signal;

/// Errors of the test-support API.
#[derive(Debug, thiserror::Error)]
pub enum TestBedError {
    /// No bed is running (no env file or the API server does not answer).
    #[error("the kpipe test bed is not running ({reason}); start it with `make testbed-up` (e2e/testbed/up.sh)")]
    NotRunning {
        /// Why we think so.
        reason: String,
    },
    /// Kubernetes API failure.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Kafka client failure.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// A wait helper ran out of time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What we waited for.
        what: String,
        /// How long.
        after: Duration,
    },
    /// File access failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Anything else (message says what).
    #[error("{0}")]
    Other(String),
}

/// One consumed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key bytes (empty if none).
    pub key: Vec<u8>,
    /// Value bytes (empty if none).
    pub value: Vec<u8>,
    /// Headers in record order (`None`: a null header value).
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

/// Receives exactly `n` records from `consumer` (of `topic`, for the error) within `timeout`.
async fn receive(
    consumer: &StreamConsumer,
    topic: &str,
    n: usize,
    timeout: Duration,
) -> Result<Vec<Record>, TestBedError> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = match tokio::time::timeout(left, consumer.recv()).await {
            Ok(m) => m?,
            Err(_) => {
                return Err(TestBedError::Timeout {
                    what: format!("{n} records from {topic} (got {})", out.len()),
                    after: timeout,
                });
            }
        };
        out.push(Record {
            partition: msg.partition(),
            offset: msg.offset(),
            key: msg.key().unwrap_or_default().to_vec(),
            value: msg.payload().unwrap_or_default().to_vec(),
            headers: message_headers(&msg),
        });
    }
    Ok(out)
}

/// The headers of a consumed message.
fn message_headers(msg: &impl Message) -> Vec<(String, Option<Vec<u8>>)> {
    use rdkafka::message::Headers;
    msg.headers()
        .map(|hs| hs.iter().map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec))).collect())
        .unwrap_or_default()
}

/// Default location of the bed's env file (`$KPIPE_RUN/env`, else `$KPIPE_CACHE/run/env`, else
/// `${XDG_CACHE_HOME:-$HOME/.cache}/kpipe/run/env`).
pub fn default_env_file() -> PathBuf {
    if let Ok(run) = std::env::var("KPIPE_RUN") {
        return PathBuf::from(run).join("env");
    }
    let cache = std::env::var("KPIPE_CACHE").map(PathBuf::from).unwrap_or_else(|_| {
        std::env::var("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cache"))
            .join("kpipe")
    });
    cache.join("run").join("env")
}

/// Parses `KEY=VALUE` lines (comments and blank lines ignored).
pub fn parse_env(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        .collect()
}

/// A handle on the running test bed.
#[derive(Clone)]
pub struct TestBed {
    env: BTreeMap<String, String>,
    client: Client,
    /// Another Kafka listener (bootstrap + librdkafka security properties) for the Kafka helpers and manifests.
    kafka_via: Option<(String, Vec<(String, String)>)>,
}

impl std::fmt::Debug for TestBed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestBed").field("env", &self.env).finish_non_exhaustive()
    }
}

impl TestBed {
    /// Connects to the running bed described by [`default_env_file`]; fails (never skips) when it is not up.
    pub async fn connect() -> Result<Self, TestBedError> {
        Self::connect_with(&default_env_file()).await
    }

    /// Connects using an explicit env file.
    pub async fn connect_with(env_file: &Path) -> Result<Self, TestBedError> {
        let text = std::fs::read_to_string(env_file).map_err(|e| TestBedError::NotRunning {
            reason: format!("cannot read env file {}: {e}", env_file.display()),
        })?;
        let env = parse_env(&text);
        let kubeconfig = env
            .get("KUBECONFIG")
            .ok_or_else(|| TestBedError::NotRunning { reason: format!("{} has no KUBECONFIG", env_file.display()) })?;
        let kc = Kubeconfig::read_from(kubeconfig)
            .map_err(|e| TestBedError::NotRunning { reason: format!("cannot read kubeconfig {kubeconfig}: {e}") })?;
        let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .map_err(|e| TestBedError::NotRunning { reason: format!("bad kubeconfig {kubeconfig}: {e}") })?;
        let client = Client::try_from(config)?;
        client
            .apiserver_version()
            .await
            .map_err(|e| TestBedError::NotRunning { reason: format!("kube-apiserver does not answer: {e}") })?;
        Ok(Self { env, client, kafka_via: None })
    }

    /// Admin Kubernetes client.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// A variable of the env file (e.g. `KAFKA_HOME`, `KPIPE_NODE`).
    pub fn var(&self, key: &str) -> Option<&str> {
        self.env.get(key).map(String::as_str)
    }

    fn path_var(&self, key: &str) -> PathBuf {
        PathBuf::from(self.var(key).unwrap_or_default())
    }

    /// Kafka bootstrap address (reachable from the host and from pods): the bed's PLAINTEXT listener, or the one
    /// given to [`TestBed::kafka_via`].
    pub fn kafka_bootstrap(&self) -> &str {
        match &self.kafka_via {
            Some((bootstrap, _)) => bootstrap,
            None => self.var("KAFKA_BOOTSTRAP").unwrap_or("10.244.0.1:9092"),
        }
    }

    /// This bed with its Kafka helpers (topics, produce, offsets) and [`TestBed::kafka_bootstrap`] going through
    /// `bootstrap` with the librdkafka security properties `security` (e.g. a secured listener).
    pub fn kafka_via(&self, bootstrap: &str, security: Vec<(String, String)>) -> TestBed {
        TestBed { kafka_via: Some((bootstrap.to_string(), security)), ..self.clone() }
    }

    /// Admin kubeconfig path.
    pub fn kubeconfig(&self) -> PathBuf {
        self.path_var("KUBECONFIG")
    }

    /// kubectl built for the bed's Kubernetes version.
    pub fn kubectl(&self) -> PathBuf {
        self.path_var("KUBECTL")
    }

    /// helm binary.
    pub fn helm(&self) -> PathBuf {
        self.path_var("HELM")
    }

    /// A Kafka CLI wrapper, e.g. `kafka_tool("kafka-consumer-groups")`.
    pub fn kafka_tool(&self, name: &str) -> PathBuf {
        self.path_var("KPIPE_BIN").join(name)
    }

    /// Folder with pod logs (`<ns>_<pod>_<container>.log`).
    pub fn pod_log_dir(&self) -> PathBuf {
        self.path_var("KPIPE_POD_LOGS")
    }

    /// `kubectl --kubeconfig <admin>` command, ready for args.
    pub fn kubectl_cmd(&self) -> std::process::Command {
        let mut c = std::process::Command::new(self.kubectl());
        c.arg("--kubeconfig").arg(self.kubeconfig());
        c
    }

    /// Runs `kubectl --kubeconfig <admin> <args>`; returns stdout, or an error carrying stderr.
    pub fn run_kubectl(&self, args: &[&str]) -> Result<String, TestBedError> {
        let out = self
            .kubectl_cmd()
            .args(args)
            .output()
            .map_err(|source| TestBedError::Io { path: self.kubectl(), source })?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(TestBedError::Other(format!(
                "kubectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }

    /// `helm --kubeconfig <admin>` command, ready for args.
    pub fn helm_cmd(&self) -> std::process::Command {
        let mut c = std::process::Command::new(self.helm());
        c.arg("--kubeconfig").arg(self.kubeconfig());
        c
    }

    /// Waits until exactly `count` pods matching `label_selector` in `namespace` are Ready; returns them.
    pub async fn wait_pods_ready(
        &self,
        namespace: &str,
        label_selector: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<k8s_openapi::api::core::v1::Pod>, TestBedError> {
        use k8s_openapi::api::core::v1::Pod;
        let api = Api::<Pod>::namespaced(self.client.clone(), namespace);
        let lp = kube::api::ListParams::default().labels(label_selector);
        let res = wait_for(&format!("{count} ready pods {label_selector} in {namespace}"), timeout, || {
            let (api, lp) = (api.clone(), lp.clone());
            async move {
                let pods = api.list(&lp).await.ok()?.items;
                let ready = |p: &Pod| {
                    p.metadata.deletion_timestamp.is_none()
                        && p.status
                            .as_ref()
                            .and_then(|s| s.conditions.as_ref())
                            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
                };
                (pods.len() == count && pods.iter().all(ready)).then_some(pods)
            }
        })
        .await;
        if res.is_err() {
            self.dump_pod_logs(namespace);
        }
        res
    }

    /// PID of a running container process (from `containerStatuses[].containerID` = `process://<pid>`), for RSS
    /// measurements and chaos (`kill -9`). `None` if the container is not running.
    pub async fn container_pid(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
    ) -> Result<Option<u32>, TestBedError> {
        let p = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(self.client.clone(), namespace).get(pod).await?;
        Ok(p.status
            .and_then(|s| s.container_statuses)
            .into_iter()
            .flatten()
            .find(|c| c.name == container && c.state.as_ref().is_some_and(|st| st.running.is_some()))
            .and_then(|c| c.container_id)
            .and_then(|id| id.strip_prefix("process://").and_then(|p| p.parse().ok())))
    }

    /// Sends `signal` to a running container's process group (e.g. `SIGKILL` for chaos tests).
    pub async fn kill_container(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
        signal: Signal,
    ) -> Result<(), TestBedError> {
        let pid = self
            .container_pid(namespace, pod, container)
            .await?
            .ok_or_else(|| TestBedError::Other(format!("container {namespace}/{pod}/{container} is not running")))?;
        let pgid = i32::try_from(pid).map_err(|e| TestBedError::Other(e.to_string()))?;
        nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), signal)
            .map_err(|e| TestBedError::Other(format!("kill {signal} {pid}: {e}")))
    }

    /// Creates a namespace `<prefix>-<random>`; it is deleted when the guard drops (or by [`TempNamespace::delete`]).
    pub async fn temp_namespace(&self, prefix: &str) -> Result<TempNamespace, TestBedError> {
        let name = format!("{prefix}-{:08x}", rand::random::<u32>());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"kpipe.io/e2e": "true"}},
        }))
        .map_err(|e| TestBedError::Other(e.to_string()))?;
        Api::<Namespace>::all(self.client.clone()).create(&PostParams::default(), &ns).await?;
        Ok(TempNamespace { bed: self.clone(), name, deleted: false })
    }

    /// Runs `f` with a fresh namespace; dumps pod logs if `f` fails or panics; always deletes the namespace.
    pub async fn with_temp_ns<T, E, F>(&self, prefix: &str, f: F) -> Result<T, TestBedError>
    where
        F: AsyncFnOnce(String) -> Result<T, E>,
        E: std::fmt::Display,
    {
        let ns = self.temp_namespace(prefix).await?;
        let out = f(ns.name().to_string()).await;
        match out {
            Ok(v) => {
                ns.delete().await?;
                Ok(v)
            }
            Err(e) => {
                self.dump_pod_logs(ns.name());
                ns.delete().await?;
                Err(TestBedError::Other(format!("test in namespace failed: {e}")))
            }
        }
    }

    /// Concatenated logs of every pod container of a namespace (from the kubelet's log files).
    pub fn pod_logs(&self, namespace: &str) -> String {
        let mut out = String::new();
        let Ok(rd) = std::fs::read_dir(self.pod_log_dir()) else {
            return out;
        };
        let mut files: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.extension().is_some_and(|e| e == "log")
                    && p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&format!("{namespace}_")))
            })
            .collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            out.push_str(&format!("===== {} =====\n{text}\n", f.display()));
        }
        out
    }

    /// Prints pod list and every pod log of `namespace` to stderr (for failing tests).
    pub fn dump_pod_logs(&self, namespace: &str) {
        if let Ok(o) = self.kubectl_cmd().args(["get", "pods", "-o", "wide", "-n", namespace]).output() {
            eprintln!("===== pods in {namespace} =====\n{}", String::from_utf8_lossy(&o.stdout));
        }
        eprintln!("{}", self.pod_logs(namespace));
    }

    /// Stops the Kafka broker (SIGTERM, then waits up to 60 s for the JVM to exit) — for broker-restart tests.
    pub async fn stop_kafka(&self) -> Result<(), TestBedError> {
        let pid_file = self.path_var("KPIPE_RUN").join("pids").join("kafka.pid");
        let text =
            std::fs::read_to_string(&pid_file).map_err(|source| TestBedError::Io { path: pid_file.clone(), source })?;
        let pid: i32 =
            text.trim().parse().map_err(|_| TestBedError::Other(format!("bad pid in {}", pid_file.display())))?;
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
        let proc_cmdline = PathBuf::from(format!("/proc/{pid}/cmdline"));
        wait_for("the Kafka broker to exit", Duration::from_secs(60), || {
            let p = proc_cmdline.clone();
            async move {
                // Gone, or a zombie (empty cmdline) waiting to be reaped.
                std::fs::read(&p).map(|c| c.is_empty()).unwrap_or(true).then_some(())
            }
        })
        .await
    }

    /// (Re)starts whatever component is down, Kafka included, by running `e2e/testbed/up.sh` (waits for health).
    pub async fn start_kafka(&self) -> Result<(), TestBedError> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("testbed").join("up.sh");
        let out = tokio::process::Command::new(&script)
            .env("KPIPE_RUN", self.path_var("KPIPE_RUN"))
            // Only Kafka is meant to (re)start here; restarting the kubelet would restart every pod on the bed.
            .env("KPIPE_KEEP_KUBELET", "1")
            .output()
            .await
            .map_err(|source| TestBedError::Io { path: script.clone(), source })?;
        if out.status.success() {
            Ok(())
        } else {
            Err(TestBedError::Other(format!("{} failed: {}", script.display(), String::from_utf8_lossy(&out.stderr))))
        }
    }

    /// Stops and starts the Kafka broker (data is kept).
    pub async fn restart_kafka(&self) -> Result<(), TestBedError> {
        self.stop_kafka().await?;
        self.start_kafka().await
    }

    fn kafka_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.kafka_bootstrap());
        for (k, v) in self.kafka_via.iter().flat_map(|(_, security)| security) {
            c.set(k, v);
        }
        c
    }

    /// Kafka admin client.
    pub fn kafka_admin(&self) -> Result<AdminClient<DefaultClientContext>, TestBedError> {
        Ok(self.kafka_config().create()?)
    }

    /// Kafka producer (acks=all, small linger).
    pub fn producer(&self) -> Result<FutureProducer, TestBedError> {
        Ok(self.kafka_config().set("acks", "all").set("linger.ms", "5").set("message.timeout.ms", "30000").create()?)
    }

    /// Creates a topic (replication factor 1) and waits until its metadata shows all partitions.
    pub async fn create_topic(&self, name: &str, partitions: i32) -> Result<(), TestBedError> {
        self.create_topic_with_config(name, partitions, &[]).await
    }

    /// Creates a topic with topic configs (e.g. `("max.message.bytes", "65536")`) and waits until its metadata shows
    /// every partition.
    pub async fn create_topic_with_config(
        &self,
        name: &str,
        partitions: i32,
        config: &[(&str, &str)],
    ) -> Result<(), TestBedError> {
        let admin = self.kafka_admin()?;
        let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        for (k, v) in config {
            topic = topic.set(k, v);
        }
        let res = admin
            .create_topics([&topic], &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))))
            .await?;
        for r in res {
            if let Err((t, code)) = r {
                return Err(TestBedError::Other(format!("create topic {t}: {code}")));
            }
        }
        let cfg = self.kafka_config();
        let topic = name.to_string();
        wait_for(&format!("topic {name} with {partitions} partitions"), Duration::from_secs(30), || {
            let (cfg, topic) = (cfg.clone(), topic.clone());
            async move {
                tokio::task::spawn_blocking(move || -> Option<()> {
                    let c: BaseConsumer = cfg.create().ok()?;
                    let md = c.fetch_metadata(Some(&topic), Duration::from_secs(5)).ok()?;
                    let t = md.topics().first()?;
                    (t.error().is_none() && t.partitions().len() == usize::try_from(partitions).ok()?).then_some(())
                })
                .await
                .ok()
                .flatten()
            }
        })
        .await
    }

    /// Produces `n` records `key-<i>` → `value-<i>` and waits for every acknowledgement.
    pub async fn produce(&self, topic: &str, n: usize) -> Result<(), TestBedError> {
        self.produce_records(
            topic,
            (0..n).map(|i| (format!("key-{i}").into_bytes(), format!("value-{i}").into_bytes())),
        )
        .await
    }

    /// Produces the given `(key, value)` records and waits for every acknowledgement.
    pub async fn produce_records(
        &self,
        topic: &str,
        records: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
    ) -> Result<(), TestBedError> {
        let producer = self.producer()?;
        let mut pending = futures::stream::FuturesUnordered::new();
        for (k, v) in records {
            let fut = producer
                .send_result(FutureRecord::to(topic).key(&k).payload(&v))
                .map_err(|(e, _)| TestBedError::Kafka(e))?;
            pending.push(fut);
            // Keep the local queue bounded.
            while pending.len() >= 10_000 {
                drain_one(&mut pending).await?;
            }
        }
        while !pending.is_empty() {
            drain_one(&mut pending).await?;
        }
        Ok(())
    }

    /// Produces records with headers (`(key, value, headers)`) and waits for every acknowledgement.
    pub async fn produce_with_headers(
        &self,
        topic: &str,
        records: impl IntoIterator<Item = (Vec<u8>, Vec<u8>, Vec<(String, Vec<u8>)>)>,
    ) -> Result<(), TestBedError> {
        use rdkafka::message::{Header, OwnedHeaders};
        let producer = self.producer()?;
        let mut pending = futures::stream::FuturesUnordered::new();
        for (k, v, hs) in records {
            let headers = hs.iter().fold(OwnedHeaders::new(), |acc, (name, value)| {
                acc.insert(Header { key: name, value: Some(value.as_slice()) })
            });
            let fut = producer
                .send_result(FutureRecord::to(topic).key(&k).payload(&v).headers(headers))
                .map_err(|(e, _)| TestBedError::Kafka(e))?;
            pending.push(fut);
        }
        while !pending.is_empty() {
            drain_one(&mut pending).await?;
        }
        Ok(())
    }

    /// Every record of `topic` from the start of each partition up to its end offset now (no consumer group).
    pub async fn read_topic(&self, topic: &str, timeout: Duration) -> Result<Vec<Record>, TestBedError> {
        let ends = self.end_offsets(topic).await?;
        let want: i64 = ends.values().sum();
        let mut tpl = TopicPartitionList::new();
        for p in ends.keys() {
            tpl.add_partition_offset(topic, *p, Offset::Beginning)?;
        }
        let consumer: StreamConsumer = self
            .kafka_config()
            .set("group.id", format!("kpipe-e2e-reader-{:08x}", rand::random::<u32>()))
            .set("enable.auto.commit", "false")
            .set("fetch.max.bytes", "10485760")
            .create()?;
        consumer.assign(&tpl)?;
        receive(&consumer, topic, usize::try_from(want).unwrap_or(0), timeout).await
    }

    /// Consumes exactly `n` records of `topic` as consumer group `group` (from the earliest offset when the
    /// group has none), commits synchronously, and returns them.
    pub async fn consume(
        &self,
        topic: &str,
        group: &str,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<Record>, TestBedError> {
        let consumer: StreamConsumer = self
            .kafka_config()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "10000")
            .create()?;
        consumer.subscribe(&[topic])?;
        let out = receive(&consumer, topic, n, timeout).await?;
        consumer.commit_consumer_state(CommitMode::Sync)?;
        consumer.unsubscribe();
        Ok(out)
    }

    /// Committed offsets of `group` for every partition of `topic` (`None` = no commit).
    pub async fn committed_offsets(
        &self,
        topic: &str,
        group: &str,
    ) -> Result<BTreeMap<i32, Option<i64>>, TestBedError> {
        let cfg = self.kafka_config().set("group.id", group).clone();
        let topic = topic.to_string();
        tokio::task::spawn_blocking(move || -> Result<BTreeMap<i32, Option<i64>>, TestBedError> {
            let c: BaseConsumer = cfg.create()?;
            let md = c.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
            let mut tpl = TopicPartitionList::new();
            for t in md.topics() {
                for p in t.partitions() {
                    tpl.add_partition(&topic, p.id());
                }
            }
            let got = c.committed_offsets(tpl, Duration::from_secs(10))?;
            Ok(got
                .elements()
                .iter()
                .map(|e| {
                    let off = match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    };
                    (e.partition(), off)
                })
                .collect())
        })
        .await
        .map_err(|e| TestBedError::Other(e.to_string()))?
    }

    /// Log-end offsets (high watermarks) of every partition of `topic`.
    pub async fn end_offsets(&self, topic: &str) -> Result<BTreeMap<i32, i64>, TestBedError> {
        let cfg = self.kafka_config();
        let topic = topic.to_string();
        tokio::task::spawn_blocking(move || -> Result<BTreeMap<i32, i64>, TestBedError> {
            let c: BaseConsumer = cfg.create()?;
            let md = c.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
            let mut out = BTreeMap::new();
            for t in md.topics() {
                for p in t.partitions() {
                    let (_, high) = c.fetch_watermarks(&topic, p.id(), Duration::from_secs(10))?;
                    out.insert(p.id(), high);
                }
            }
            Ok(out)
        })
        .await
        .map_err(|e| TestBedError::Other(e.to_string()))?
    }
}

async fn drain_one(
    pending: &mut futures::stream::FuturesUnordered<rdkafka::producer::DeliveryFuture>,
) -> Result<(), TestBedError> {
    use futures::StreamExt;
    match pending.next().await {
        Some(Ok(Ok(_))) | None => Ok(()),
        Some(Ok(Err((e, _)))) => Err(TestBedError::Kafka(e)),
        Some(Err(_)) => Err(TestBedError::Other("producer dropped a delivery future".into())),
    }
}

/// Resident set size of a process in bytes (`VmRSS` of `/proc/<pid>/status`).
pub fn process_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

/// Polls `check` every 200 ms until it returns `Some`, or fails with [`TestBedError::Timeout`].
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T, TestBedError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(TestBedError::Timeout { what: what.to_string(), after: timeout });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A namespace that is deleted when dropped. If the test panics, the pods and their logs are printed first.
pub struct TempNamespace {
    bed: TestBed,
    name: String,
    deleted: bool,
}

impl std::fmt::Debug for TempNamespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TempNamespace").field("name", &self.name).finish()
    }
}

impl TempNamespace {
    /// The namespace name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Deletes the namespace now (without waiting for its pods to terminate).
    pub async fn delete(mut self) -> Result<(), TestBedError> {
        self.deleted = true;
        match Api::<Namespace>::all(self.bed.client()).delete(&self.name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

impl Drop for TempNamespace {
    fn drop(&mut self) {
        if self.deleted {
            return;
        }
        if std::thread::panicking() {
            self.bed.dump_pod_logs(&self.name);
        }
        // Synchronous and runtime-independent: works from Drop inside or outside tokio.
        let _ = self
            .bed
            .kubectl_cmd()
            .args(["delete", "namespace", &self.name, "--wait=false", "--ignore-not-found"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_env_lines() {
        let env = parse_env("# c\nA=1\n\nKAFKA_BOOTSTRAP=10.244.0.1:9092\nX=\"q\"\n");
        assert_eq!(env.get("A").map(String::as_str), Some("1"));
        assert_eq!(env.get("KAFKA_BOOTSTRAP").map(String::as_str), Some("10.244.0.1:9092"));
        assert_eq!(env.get("X").map(String::as_str), Some("q"));
    }
}
