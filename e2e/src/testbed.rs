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

/// The kind of cluster a [`TestBed`] drives: `KPIPE_CLUSTER` of its env file (`kind`, else the local bed). The
/// suites are the same on both; only what reaches into the cluster from the host differs (how a Service is reached,
/// how a container is killed, where pod logs are, how the broker is restarted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterKind {
    /// The local process test bed (`e2e/testbed/up.sh`): pods are host processes on the `kpipe0` bridge, images
    /// map to host binaries (`e2e/testbed/images.conf`), ClusterIPs are proxied on the host.
    TestBed,
    /// A kind cluster (`e2e/kind/run.sh`): the real kubelet and containerd in a Docker container, real images,
    /// kube-proxy Service networking; the host reaches Services through NodePorts on the node's address.
    Kind,
}

/// The test-only images the suites run as pods (`e2e/test.Dockerfile`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestImage {
    /// `kpipe-test-sink`: the HTTP sink the pipelines deliver to.
    Sink,
    /// `kpipe-test-http`: a small HTTP server with probes and signal reporting.
    Http,
}

impl TestImage {
    /// The env-file variable naming this image, and the image used when it is unset (the bed's images.conf maps
    /// it to the host binary).
    fn var_and_default(self) -> (&'static str, &'static str) {
        match self {
            TestImage::Sink => ("KPIPE_TEST_SINK_IMAGE", "kpipe/test-sink:latest"),
            TestImage::Http => ("KPIPE_TEST_HTTP_IMAGE", "kpipe/test-http:latest"),
        }
    }
}

/// A name unique to one test run (namespaces, topics, consumer groups), and the other helpers every suite shares
/// with the operator's and worker's tests: one copy, in `kpipe-test-support`.
pub use kpipe_test_support::{free_addr, free_port, http_get, unique_name};

/// Connects to the cluster of the env file ([`default_env_file`]) and panics with the reason when it is not up:
/// the one `bed()` of every suite (never skips).
pub async fn bed() -> TestBed {
    TestBed::connect().await.unwrap_or_else(|e| panic!("{e}"))
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

    /// Kafka bootstrap address for clients on the host (the test process): the bed's PLAINTEXT listener, or the
    /// one given to [`TestBed::kafka_via`].
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

    /// Kafka bootstrap address for pods (pipelines' `source.bootstrapServers`): `KAFKA_BOOTSTRAP_PODS` (on kind the
    /// broker's Service DNS name), else the host's address (the bed's broker listens on the pods' bridge).
    pub fn kafka_bootstrap_pods(&self) -> &str {
        self.var("KAFKA_BOOTSTRAP_PODS").unwrap_or_else(|| self.kafka_bootstrap())
    }

    /// The kind of cluster this is.
    pub fn cluster_kind(&self) -> ClusterKind {
        match self.var("KPIPE_CLUSTER") {
            Some("kind") => ClusterKind::Kind,
            _ => ClusterKind::TestBed,
        }
    }

    /// The image of a test-only pod: the env file's `KPIPE_TEST_SINK_IMAGE` / `KPIPE_TEST_HTTP_IMAGE` (on kind the
    /// images `make images` built and `kind load` loaded), else the name the bed maps to its host binary.
    pub fn test_image(&self, image: TestImage) -> String {
        let (var, default) = image.var_and_default();
        self.var(var).filter(|v| !v.is_empty()).unwrap_or(default).to_string()
    }

    /// An image override of the kpipe release under test: the process environment's `var`, else the env file's
    /// (on kind the loaded `kpipe/operator` / `kpipe/worker` images), else `None` (the chart's default).
    pub fn image_override(&self, var: &str) -> Option<String> {
        std::env::var(var).ok().filter(|v| !v.is_empty()).or_else(|| self.var(var).map(str::to_string))
    }

    /// The Service type that makes a test Service reachable from the host: the bed proxies ClusterIPs on the host;
    /// on kind ClusterIPs live inside the node, so test Services are NodePorts.
    pub fn host_service_type(&self) -> &'static str {
        match self.cluster_kind() {
            ClusterKind::TestBed => "ClusterIP",
            ClusterKind::Kind => "NodePort",
        }
    }

    /// `http://<address>:<port>` at which the test process reaches `port` of `service` (created with
    /// [`TestBed::host_service_type`]): the ClusterIP on the bed, the node address (`KPIPE_NODE_ADDRESS`) and the
    /// port's NodePort on kind.
    pub fn host_url(&self, service: &k8s_openapi::api::core::v1::Service, port: i32) -> Result<String, TestBedError> {
        let name = service.metadata.name.clone().unwrap_or_default();
        let spec = service.spec.as_ref().ok_or_else(|| TestBedError::Other(format!("Service {name} has no spec")))?;
        match self.cluster_kind() {
            ClusterKind::TestBed => {
                let ip = spec
                    .cluster_ip
                    .as_deref()
                    .filter(|ip| !ip.is_empty() && *ip != "None")
                    .ok_or_else(|| TestBedError::Other(format!("Service {name} has no ClusterIP")))?;
                Ok(format!("http://{ip}:{port}"))
            }
            ClusterKind::Kind => {
                let node = self
                    .var("KPIPE_NODE_ADDRESS")
                    .ok_or_else(|| TestBedError::Other("the env file has no KPIPE_NODE_ADDRESS".into()))?;
                let node_port =
                    spec.ports.iter().flatten().find(|p| p.port == port).and_then(|p| p.node_port).ok_or_else(
                        || TestBedError::Other(format!("Service {name} has no NodePort for port {port}")),
                    )?;
                Ok(format!("http://{node}:{node_port}"))
            }
        }
    }

    /// `docker exec <kind node> <args>` (kind only): runs a command in the node container, where crictl and the
    /// containers' processes are.
    fn node_exec(&self, args: &[&str]) -> Result<String, TestBedError> {
        let node = self.var("KPIPE_KIND_NODE").ok_or_else(|| TestBedError::Other("no KPIPE_KIND_NODE".into()))?;
        let docker = self.var("DOCKER").unwrap_or("docker");
        let mut cmd = std::process::Command::new(docker);
        if let Some(host) = self.var("DOCKER_HOST").filter(|h| !h.is_empty()) {
            cmd.env("DOCKER_HOST", host);
        }
        let out = cmd
            .args(["exec", node])
            .args(args)
            .output()
            .map_err(|source| TestBedError::Io { path: PathBuf::from(docker), source })?;
        stdout_or_error(out, || format!("docker exec {node} {}", args.join(" ")))
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
        stdout_or_error(out, || format!("kubectl {}", args.join(" ")))
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
    /// measurements and chaos (`kill -9`). `None` if the container is not running, and always on kind (its
    /// containers' processes live in the node's PID namespace; see [`TestBed::kill_container`]).
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

    /// Sends `signal` to a running container (e.g. `SIGKILL` for chaos tests): on the bed to its process group, on
    /// kind to the container's init process, found with `crictl inspect` in the node (containerd and the real
    /// kubelet then see the exit and restart the container as they would in production).
    pub async fn kill_container(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
        signal: Signal,
    ) -> Result<(), TestBedError> {
        if self.cluster_kind() == ClusterKind::Kind {
            let p = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(self.client.clone(), namespace).get(pod).await?;
            let id = p
                .status
                .and_then(|s| s.container_statuses)
                .into_iter()
                .flatten()
                .find(|c| c.name == container && c.state.as_ref().is_some_and(|st| st.running.is_some()))
                .and_then(|c| c.container_id)
                .and_then(|id| id.split_once("://").map(|(_, id)| id.to_string()))
                .ok_or_else(|| {
                    TestBedError::Other(format!("container {namespace}/{pod}/{container} is not running"))
                })?;
            let script = format!(
                "pid=$(crictl inspect -o go-template --template '{{{{.info.pid}}}}' {id}) && [ \"$pid\" -gt 1 ] && kill -{} \"$pid\"",
                signal as i32
            );
            return self.node_exec(&["sh", "-c", &script]).map(drop);
        }
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
        let name = unique_name(prefix);
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

    /// Concatenated logs of every pod container of a namespace, each after a header `===== <ns>_<pod>_<container>`
    /// (on the bed from the kubelet's log files, on kind from `kubectl logs`).
    pub fn pod_logs(&self, namespace: &str) -> String {
        if self.cluster_kind() == ClusterKind::Kind {
            return self.pod_logs_from_api(namespace);
        }
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

    fn pod_logs_from_api(&self, namespace: &str) -> String {
        let template = r#"{range .items[*]}{.metadata.name}{range .spec.containers[*]}{" "}{.name}{end}{"\n"}{end}"#;
        let Ok(list) = self.run_kubectl(&["get", "pods", "-n", namespace, "-o", &format!("jsonpath={template}")])
        else {
            return String::new();
        };
        let mut out = String::new();
        for line in list.lines() {
            let mut words = line.split_whitespace();
            let Some(pod) = words.next() else { continue };
            for container in words {
                let text = self
                    .run_kubectl(&["logs", "-n", namespace, pod, "-c", container])
                    .unwrap_or_else(|e| e.to_string());
                out.push_str(&format!("===== {namespace}_{pod}_{container} =====\n{text}\n"));
            }
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

    /// Stops the Kafka broker (SIGTERM, then waits up to 60 s for the JVM to exit) — for broker-restart tests. On
    /// kind the broker's StatefulSet is scaled to 0 (its data is on the node and survives).
    pub async fn stop_kafka(&self) -> Result<(), TestBedError> {
        if self.cluster_kind() == ClusterKind::Kind {
            let ns = self.var("KAFKA_NAMESPACE").unwrap_or("kafka");
            self.run_kubectl(&["-n", ns, "scale", "statefulset/kafka", "--replicas=0"])?;
            self.run_kubectl(&["-n", ns, "wait", "--for=delete", "pod/kafka-0", "--timeout=90s"])?;
            return Ok(());
        }
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
    /// On kind: scales the broker's StatefulSet back to 1 and waits until the broker answers from the host.
    pub async fn start_kafka(&self) -> Result<(), TestBedError> {
        if self.cluster_kind() == ClusterKind::Kind {
            let ns = self.var("KAFKA_NAMESPACE").unwrap_or("kafka");
            self.run_kubectl(&["-n", ns, "scale", "statefulset/kafka", "--replicas=1"])?;
            self.run_kubectl(&["-n", ns, "rollout", "status", "statefulset/kafka", "--timeout=180s"])?;
            let cfg = self.kafka_config();
            return wait_for("the Kafka broker to answer after its restart", Duration::from_secs(120), || {
                let cfg = cfg.clone();
                async move {
                    tokio::task::spawn_blocking(move || -> Option<()> {
                        let c: BaseConsumer = cfg.create().ok()?;
                        let md = c.fetch_metadata(None, Duration::from_secs(5)).ok()?;
                        (!md.brokers().is_empty()).then_some(())
                    })
                    .await
                    .ok()
                    .flatten()
                }
            })
            .await;
        }
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

/// A finished command's stdout, or an error naming the command (`what`) with its stderr.
fn stdout_or_error(out: std::process::Output, what: impl FnOnce() -> String) -> Result<String, TestBedError> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(TestBedError::Other(format!("{} failed: {}", what(), String::from_utf8_lossy(&out.stderr).trim())))
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

/// Waits until the object `name` of `api` satisfies `condition` (kube-runtime's watch-based `await_condition`, see
/// `kube::runtime::wait::conditions`), at most `timeout`; returns the object as it then was. `what` names the wait in
/// the timeout error.
pub async fn await_condition<K>(
    api: Api<K>,
    name: &str,
    what: &str,
    timeout: Duration,
    condition: impl kube::runtime::wait::Condition<K>,
) -> Result<K, TestBedError>
where
    K: kube::Resource + Clone + std::fmt::Debug + Send + serde::de::DeserializeOwned + 'static,
{
    match tokio::time::timeout(timeout, kube::runtime::wait::await_condition(api, name, condition)).await {
        Ok(Ok(Some(object))) => Ok(object),
        Ok(Ok(None)) => Err(TestBedError::Other(format!("{what}: {name} was deleted while waiting"))),
        Ok(Err(e)) => Err(TestBedError::Other(format!("{what}: watch failed: {e}"))),
        Err(_) => Err(TestBedError::Timeout { what: what.to_string(), after: timeout }),
    }
}

/// Waits until the object `name` of `api` is gone (kube-runtime's `await_condition` with "absent" as the
/// condition), at most `timeout`. `what` names the wait in the timeout error.
pub async fn await_deleted<K>(api: Api<K>, name: &str, what: &str, timeout: Duration) -> Result<(), TestBedError>
where
    K: kube::Resource + Clone + std::fmt::Debug + Send + serde::de::DeserializeOwned + 'static,
{
    let absent = |object: Option<&K>| object.is_none();
    match tokio::time::timeout(timeout, kube::runtime::wait::await_condition(api, name, absent)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(TestBedError::Other(format!("{what}: watch failed: {e}"))),
        Err(_) => Err(TestBedError::Timeout { what: what.to_string(), after: timeout }),
    }
}

/// Polls `check` every 200 ms until it returns `Some`, or fails with [`TestBedError::Timeout`]. For a condition on
/// one object prefer [`await_condition`] (a watch).
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
