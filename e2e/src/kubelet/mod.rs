//! The kpipe **process kubelet**: a small node agent that runs Pods as local processes.
//!
//! * registers a `Node` (Ready, capacity, addresses) and renews its `Lease` in `kube-node-lease` every 10 s;
//! * binds pending Pods (there is no kube-scheduler in the bed) whose `nodeSelector` matches the node;
//! * runs each bound Pod's containers as processes inside a per-pod network namespace (see [`net`]) and a private
//!   mount namespace where volumes are bind-mounted at their `mountPath` (see [`spec::launcher_script`]);
//! * maps images to executables via [`images::ImageMap`];
//! * reports pod status, probes readiness/liveness, restarts per `restartPolicy` with back-off, and on deletion sends
//!   SIGTERM, waits the grace period, SIGKILLs and removes the Pod.

pub mod images;
pub mod net;
pub mod pod;
pub mod proxy;
pub mod server;
pub mod spec;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use self::pod::PodUpdate;

/// Errors of the process kubelet.
#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    /// A Kubernetes API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// File system access failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// An external command (`ip`, ...) failed.
    #[error("`{cmd}` failed: {msg}")]
    Command {
        /// The command line.
        cmd: String,
        /// stderr or the spawn error.
        msg: String,
    },
    /// The image map file is malformed.
    #[error("image map {path}:{line}: {msg}")]
    ImageMap {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        msg: String,
    },
    /// The pod spec references something missing or unsupported.
    #[error("{0}")]
    PodConfig(String),
    /// Another kubelet already serves this run folder.
    #[error("another kubelet (pid {holder}) already runs for {run_dir}; stop it first (e2e/testbed/down.sh)")]
    AlreadyRunning {
        /// The bed's run folder.
        run_dir: PathBuf,
        /// The pid written by the kubelet holding the lock.
        holder: String,
    },
}

/// Static configuration of a kubelet instance.
#[derive(Debug, Clone)]
pub struct KubeletConfig {
    /// Node name to register.
    pub node_name: String,
    /// The bed's run folder; pods live in `<run_dir>/pods`.
    pub run_dir: PathBuf,
    /// Bridge the pod veths attach to.
    pub bridge: String,
    /// The bridge's (host) address: node IP and default gateway of pods.
    pub bridge_ip: Ipv4Addr,
    /// Prefix length of the pod network.
    pub prefix_len: u8,
    /// API server URL written into pod kubeconfigs (reachable from pod namespaces).
    pub pod_apiserver: String,
    /// CA certificate of the API server (path written into pod kubeconfigs).
    pub ca_file: PathBuf,
    /// Image map file (re-read on every container start).
    pub images: PathBuf,
    /// Repository root (`${REPO}` in the image map).
    pub repo_root: PathBuf,
    /// Cargo target dir (`${TARGET}` in the image map).
    pub target_dir: PathBuf,
    /// First restart back-off.
    pub backoff_initial: Duration,
    /// Maximum restart back-off.
    pub backoff_max: Duration,
    /// HTTPS endpoint for `kubectl logs` (served on `bridge_ip:port`); `None` = no endpoint.
    pub server: Option<ServerTls>,
}

/// TLS material and port of the kubelet endpoint.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// PEM certificate (chain).
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// Port (10250 like a real kubelet).
    pub port: u16,
}

/// State shared by all pod workers.
pub struct Shared {
    /// Admin client.
    pub client: Client,
    /// Configuration.
    pub cfg: KubeletConfig,
    /// Pod IP pool.
    pub ips: Mutex<net::IpAllocator>,
    /// HTTP client for probes.
    pub http: reqwest::Client,
}

fn node_labels(node: &str) -> BTreeMap<String, String> {
    [
        ("kubernetes.io/hostname", node),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", std::env::consts::ARCH),
        ("kpipe.io/process-kubelet", "true"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

async fn register_node(client: &Client, cfg: &KubeletConfig, since: Timestamp) -> Result<Node, KubeletError> {
    let api = Api::<Node>::all(client.clone());
    let node = serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": { "name": cfg.node_name, "labels": node_labels(&cfg.node_name) },
    });
    let pp = PatchParams::apply("kpipe-kubelet").force();
    let created = api.patch(&cfg.node_name, &pp, &Patch::Apply(&node)).await?;
    update_node_status(client, cfg, since).await?;
    Ok(created)
}

async fn update_node_status(client: &Client, cfg: &KubeletConfig, since: Timestamp) -> Result<(), KubeletError> {
    let api = Api::<Node>::all(client.clone());
    let now = Timestamp::now().to_string();
    let since = since.to_string();
    let cond = |ty: &str, status: &str, reason: &str| {
        serde_json::json!({"type": ty, "status": status, "reason": reason, "message": "kpipe process kubelet",
            "lastHeartbeatTime": now, "lastTransitionTime": since})
    };
    let capacity = serde_json::json!({"cpu": "16", "memory": "64Gi", "pods": "250", "ephemeral-storage": "100Gi"});
    let status = serde_json::json!({"status": {
        "conditions": [
            cond("Ready", "True", "KubeletReady"),
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID"),
        ],
        "capacity": capacity, "allocatable": capacity,
        "addresses": [{"type": "InternalIP", "address": cfg.bridge_ip.to_string()}, {"type": "Hostname", "address": cfg.node_name}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": cfg.server.as_ref().map_or(0, |s| s.port)}},
        "nodeInfo": {"architecture": std::env::consts::ARCH, "bootID": "", "containerRuntimeVersion": "process://kpipe-kubelet",
            "kernelVersion": "", "kubeProxyVersion": "", "kubeletVersion": "v1.34.4-kpipe", "machineID": "", "operatingSystem": "linux",
            "osImage": "kpipe process kubelet", "systemUUID": ""},
    }});
    api.patch_status(&cfg.node_name, &PatchParams::default(), &Patch::Merge(&status)).await?;
    Ok(())
}

async fn renew_lease(client: &Client, cfg: &KubeletConfig, node: &Node) -> Result<(), KubeletError> {
    let api = Api::<Lease>::namespaced(client.clone(), "kube-node-lease");
    let owner = OwnerReference {
        api_version: "v1".into(),
        kind: "Node".into(),
        name: cfg.node_name.clone(),
        uid: node.metadata.uid.clone().unwrap_or_default(),
        ..OwnerReference::default()
    };
    let lease = serde_json::json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": cfg.node_name, "namespace": "kube-node-lease", "ownerReferences": [owner]},
        "spec": {"holderIdentity": cfg.node_name, "leaseDurationSeconds": 40,
                 "renewTime": Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()},
    });
    api.patch(&cfg.node_name, &PatchParams::apply("kpipe-kubelet").force(), &Patch::Apply(&lease)).await?;
    Ok(())
}

/// An unbound, not-deleting pod for the default scheduler whose nodeSelector matches our labels.
fn bindable(pod: &Pod, labels: &BTreeMap<String, String>) -> bool {
    let spec = pod.spec.as_ref();
    let sched = spec.and_then(|s| s.scheduler_name.as_deref()).unwrap_or_default();
    spec.is_some_and(|s| s.node_name.is_none())
        && pod.metadata.deletion_timestamp.is_none()
        && (sched.is_empty() || sched == "default-scheduler")
        && selector_matches(pod, labels)
}

fn selector_matches(pod: &Pod, labels: &BTreeMap<String, String>) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_selector.as_ref())
        .is_none_or(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// Binds a pod to the node; on persistent failure reports its uid on `failed` so a later event retries.
async fn bind(client: Client, pod: Pod, node: String, failed: mpsc::UnboundedSender<String>) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let api = Api::<Pod>::namespaced(client, &ns);
    let binding = serde_json::json!({
        "apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": name, "namespace": ns, "uid": pod.metadata.uid},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node},
    });
    for attempt in 0..10u32 {
        match api.create_subresource::<_, serde_json::Value>("binding", &name, &PostParams::default(), &binding).await {
            Ok(_) => {
                info!(pod = %format!("{ns}/{name}"), %node, "bound");
                return;
            }
            // Already bound or gone: nothing to do.
            Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => return,
            Err(e) => {
                warn!(pod = %format!("{ns}/{name}"), error = %e, attempt, "binding failed");
                tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt + 1))).await;
            }
        }
    }
    let _ = failed.send(pod.metadata.uid.clone().unwrap_or_default());
}

/// Watch retry back-off: 200 ms doubling to at most 2 s (kube's default goes to 30 s, which would leave pods
/// unbound for half a minute after an apiserver restart). Reset by the stream after a successful event.
#[derive(Debug)]
struct QuickBackoff {
    next: Duration,
}

impl Default for QuickBackoff {
    fn default() -> Self {
        Self { next: Duration::from_millis(200) }
    }
}

impl Iterator for QuickBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let current = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(2));
        Some(current)
    }
}

impl kube::runtime::utils::Backoff for QuickBackoff {
    fn reset(&mut self) {
        *self = Self::default();
    }
}

struct Worker {
    tx: watch::Sender<PodUpdate>,
}

/// Takes `<run_dir>/kubelet.lock` exclusively for as long as the returned guard lives; fails naming the holder.
fn lock_run_dir(run_dir: &std::path::Path) -> Result<nix::fcntl::Flock<std::fs::File>, KubeletError> {
    let path = run_dir.join("kubelet.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|source| KubeletError::Io { path: path.clone(), source })?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(mut lock) => {
            use std::io::{Seek, Write};
            let _ = lock.set_len(0);
            let _ = lock.rewind();
            let _ = write!(lock, "{}", std::process::id());
            Ok(lock)
        }
        Err((_, _)) => Err(KubeletError::AlreadyRunning {
            run_dir: run_dir.to_path_buf(),
            holder: std::fs::read_to_string(&path).unwrap_or_default().trim().to_owned(),
        }),
    }
}

/// Runs the kubelet until SIGTERM/SIGINT; then stops all pod processes (without deleting the Pods).
pub async fn run(client: Client, cfg: KubeletConfig) -> Result<(), KubeletError> {
    std::fs::create_dir_all(cfg.run_dir.join("pods"))
        .map_err(|source| KubeletError::Io { path: cfg.run_dir.join("pods"), source })?;
    // One kubelet per run folder: a second one would start every pod again (and kill the first one's processes).
    let _single = lock_run_dir(&cfg.run_dir)?;
    pod::kill_stale_processes(&cfg.run_dir);
    net::cleanup_stale_namespaces().await;
    if let Some(tls) = cfg.server.clone() {
        let addr = std::net::SocketAddr::from((cfg.bridge_ip, tls.port));
        let log_dir = cfg.run_dir.join("pods");
        tokio::spawn(async move {
            if let Err(e) = server::serve(addr, &tls.cert, &tls.key, log_dir).await {
                warn!(error = %e, "kubelet endpoint failed (kubectl logs will not work)");
            }
        });
    }
    // Services: ClusterIP proxy + /etc/hosts for pods (see proxy.rs). The hosts file must exist before pods start.
    let hosts = cfg.run_dir.join("hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost\n::1 localhost\n")
        .map_err(|source| KubeletError::Io { path: hosts.clone(), source })?;
    let apiserver = cfg
        .pod_apiserver
        .trim_start_matches("https://")
        .parse::<std::net::SocketAddr>()
        .unwrap_or_else(|_| std::net::SocketAddr::from((cfg.bridge_ip, 6443)));
    tokio::spawn(proxy::run(client.clone(), cfg.bridge.clone(), hosts, apiserver));
    let since = Timestamp::now();
    let node = register_node(&client, &cfg, since).await?;
    renew_lease(&client, &cfg, &node).await?;
    info!(node = %cfg.node_name, "node registered");
    // Readiness marker for e2e/testbed/up.sh and status.sh: "<pid>" of the kubelet that registered the node.
    let marker = cfg.run_dir.join("kubelet.ready");
    std::fs::write(&marker, std::process::id().to_string())
        .map_err(|source| KubeletError::Io { path: marker.clone(), source })?;
    let labels = node_labels(&cfg.node_name);

    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .map_err(|e| KubeletError::PodConfig(format!("http client: {e}")))?;
    let shared = Arc::new(Shared {
        client: client.clone(),
        ips: Mutex::new(net::IpAllocator::new(cfg.bridge_ip, cfg.prefix_len)),
        cfg: cfg.clone(),
        http,
    });

    // Heartbeats.
    let hb = {
        let (client, cfg, node) = (client.clone(), cfg.clone(), node.clone());
        tokio::spawn(async move {
            let mut tick = 0u64;
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                tick += 1;
                if let Err(e) = renew_lease(&client, &cfg, &node).await {
                    warn!(error = %e, "lease renewal failed");
                }
                if tick.is_multiple_of(3)
                    && let Err(e) = update_node_status(&client, &cfg, since).await
                {
                    warn!(error = %e, "node status update failed");
                }
            }
        })
    };

    let mut workers: HashMap<String, Worker> = HashMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<String>();
    let (bind_failed_tx, mut bind_failed_rx) = mpsc::unbounded_channel::<String>();
    let mut sweep = tokio::time::interval(Duration::from_secs(10));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut binding: HashSet<String> = HashSet::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut stream = std::pin::pin!(
        watcher(Api::<Pod>::all(client.clone()), watcher::Config::default()).backoff(QuickBackoff::default())
    );
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| KubeletError::Io { path: "signal(SIGTERM)".into(), source })?;

    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            Some(uid) = done_rx.recv() => { workers.remove(&uid); }
            Some(uid) = bind_failed_rx.recv() => { binding.remove(&uid); }
            _ = sweep.tick() => {
                // Safety net: pods left unbound (e.g. binding failed while the apiserver restarted).
                let lp = kube::api::ListParams::default().fields("spec.nodeName=");
                if let Ok(list) = Api::<Pod>::all(client.clone()).list(&lp).await {
                    for pod in list.items {
                        let uid = pod.metadata.uid.clone().unwrap_or_default();
                        if bindable(&pod, &labels) && binding.insert(uid) {
                            tokio::spawn(bind(client.clone(), pod, cfg.node_name.clone(), bind_failed_tx.clone()));
                        }
                    }
                }
            }
            ev = stream.next() => {
                let Some(ev) = ev else { break };
                let ev = match ev {
                    Ok(ev) => ev,
                    Err(e) => { warn!(error = %e, "pod watch error"); continue; }
                };
                match ev {
                    watcher::Event::Init => seen.clear(),
                    watcher::Event::InitDone => {
                        let gone: Vec<String> = workers.keys().filter(|u| !seen.contains(*u)).cloned().collect();
                        for uid in gone {
                            if let Some(w) = workers.get(&uid) {
                                let mut u = w.tx.borrow().clone();
                                u.gone = true;
                                let _ = w.tx.send(u);
                            }
                        }
                    }
                    watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => {
                        let uid = pod.metadata.uid.clone().unwrap_or_default();
                        seen.insert(uid.clone());
                        let node_name = pod.spec.as_ref().and_then(|s| s.node_name.clone());
                        match node_name {
                            None => {
                                if bindable(&pod, &labels) && binding.insert(uid.clone())
                                {
                                    tokio::spawn(bind(client.clone(), pod, cfg.node_name.clone(), bind_failed_tx.clone()));
                                }
                            }
                            Some(n) if n == cfg.node_name => {
                                binding.remove(&uid);
                                if let Some(w) = workers.get(&uid) {
                                    let _ = w.tx.send(PodUpdate { pod, gone: false });
                                } else {
                                    let phase = pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
                                    let terminal = phase == "Succeeded" || phase == "Failed";
                                    if terminal {
                                        if pod.metadata.deletion_timestamp.is_some() {
                                            let client = client.clone();
                                            tokio::spawn(async move { pod::final_delete(&client, &pod).await });
                                        }
                                        continue;
                                    }
                                    let (tx, rx) = watch::channel(PodUpdate { pod, gone: false });
                                    workers.insert(uid.clone(), Worker { tx });
                                    let (shared, done_tx) = (shared.clone(), done_tx.clone());
                                    tasks.spawn(async move {
                                        pod::run_pod(shared, rx).await;
                                        let _ = done_tx.send(uid);
                                    });
                                }
                            }
                            Some(_) => {}
                        }
                    }
                    watcher::Event::Delete(pod) => {
                        let uid = pod.metadata.uid.clone().unwrap_or_default();
                        binding.remove(&uid);
                        if let Some(w) = workers.get(&uid) {
                            let _ = w.tx.send(PodUpdate { pod, gone: true });
                        }
                    }
                }
            }
        }
    }
    info!("kubelet shutting down: stopping {} pods", workers.len());
    hb.abort();
    workers.clear(); // dropping the senders tells every pod worker to stop its processes
    let _ = tokio::time::timeout(Duration::from_secs(20), async { while tasks.join_next().await.is_some() {} }).await;
    let _ = std::fs::remove_file(&marker);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}, "spec": spec})).unwrap()
    }

    #[test]
    fn a_second_kubelet_on_the_same_run_dir_is_refused() {
        let dir = std::env::temp_dir().join(format!("kpipe-kubelet-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = lock_run_dir(&dir).unwrap();
        let err = lock_run_dir(&dir).unwrap_err();
        assert!(
            matches!(&err, KubeletError::AlreadyRunning { holder, .. } if *holder == std::process::id().to_string()),
            "{err}"
        );
        drop(first);
        assert!(lock_run_dir(&dir).is_ok(), "the lock must be free once its holder is gone");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bindable_pods() {
        let labels = node_labels("n");
        assert!(bindable(&pod(serde_json::json!({"containers": []})), &labels));
        assert!(!bindable(&pod(serde_json::json!({"containers": [], "nodeName": "other"})), &labels));
        assert!(!bindable(&pod(serde_json::json!({"containers": [], "schedulerName": "custom"})), &labels));
        assert!(bindable(
            &pod(serde_json::json!({"containers": [], "nodeSelector": {"kubernetes.io/os": "linux"}})),
            &labels
        ));
        assert!(!bindable(&pod(serde_json::json!({"containers": [], "nodeSelector": {"disk": "ssd"}})), &labels));
    }

    #[test]
    fn quick_backoff_caps_and_resets() {
        use kube::runtime::utils::Backoff;
        let mut b = QuickBackoff::default();
        let v: Vec<u128> = (0..6).filter_map(|_| b.next()).map(|d| d.as_millis()).collect();
        assert_eq!(v, vec![200, 400, 800, 1600, 2000, 2000]);
        b.reset();
        assert_eq!(b.next(), Some(Duration::from_millis(200)));
    }
}
