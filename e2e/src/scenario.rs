//! Building blocks of the end-to-end scenarios, the demo and the benchmarks: install kpipe with Helm into a test
//! namespace (namespaced mode, so concurrent tests never share an operator), run the HTTP sink as a pod, apply
//! pipelines and read their status, find worker processes for chaos.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kpipe_api::v1alpha1::{ConsumerPipeline, ConsumerPipelineStatus};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use serde_json::json;

use crate::testbed::{TestBed, TestBedError, TestImage, await_condition, wait_for};

fn other(e: impl std::fmt::Display) -> TestBedError {
    TestBedError::Other(e.to_string())
}

/// The repository root (the chart, CRD and binaries live there).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(mut cmd: Command, what: &str) -> Result<String, TestBedError> {
    let out = cmd.output().map_err(|e| other(format!("{what}: cannot run: {e}")))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() { Ok(text) } else { Err(other(format!("{what} failed:\n{text}"))) }
}

/// Applies the generated CRDs (server-side) and waits until they are Established.
pub fn install_crd(bed: &TestBed) -> Result<(), TestBedError> {
    for file in ["crds/consumerpipeline.yaml", "crds/deadletterreplay.yaml"] {
        let mut apply = bed.kubectl_cmd();
        apply.args(["apply", "--server-side", "--force-conflicts", "-f"]).arg(repo_root().join(file));
        run(apply, "kubectl apply CRD")?;
    }
    wait_crds_established(bed, &["consumerpipelines.kpipe.io", "deadletterreplays.kpipe.io"])
}

/// Waits (up to 60 s) until every named CRD reports Established=True. Polls instead of `kubectl wait
/// --for=condition`, which fails at once when it reads a CRD whose status has no conditions yet.
pub fn wait_crds_established(bed: &TestBed, names: &[&str]) -> Result<(), TestBedError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for name in names {
        loop {
            let out = bed
                .kubectl_cmd()
                .args(["get", "crd", name, "-o", r#"jsonpath={.status.conditions[?(@.type=="Established")].status}"#])
                .output()
                .map_err(|e| other(format!("kubectl get crd {name}: {e}")))?;
            if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "True" {
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err(other(format!(
                    "CRD {name} not Established after 60s: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(())
}

/// Options of a kpipe Helm release installed for one test.
#[derive(Debug, Clone)]
pub struct Install {
    /// Operator replicas (2 for leader-election tests).
    pub replicas: u32,
    /// Extra `--set` values.
    pub sets: Vec<String>,
}

impl Default for Install {
    fn default() -> Self {
        Self { replicas: 1, sets: Vec::new() }
    }
}

/// Installs kpipe into `namespace`, watching only that namespace, and waits for the operator to be ready.
/// The CRD is installed once, cluster-wide, by [`install_crd`] (a release per test must not own it).
pub fn install_kpipe(bed: &TestBed, namespace: &str, opts: &Install) -> Result<(), TestBedError> {
    install_crd(bed)?;
    let mut helm = Command::new(bed.helm());
    helm.env("KUBECONFIG", bed.kubeconfig())
        .args(["upgrade", "--install", "kpipe"])
        .arg(repo_root().join("charts/kpipe"))
        .args(["--namespace", namespace, "--wait", "--timeout", "180s"])
        .args(["--set", &format!("watchNamespaces={{{namespace}}}")])
        .args(["--set", "crds.install=false", "--set", "logging.format=text"])
        .args(["--set", &format!("replicas={}", opts.replicas)])
        .args(["--set", "logging.level=info\\,kpipe_operator=debug"]);
    for (key, image) in image_overrides(bed) {
        let (repository, tag) = split_image(&image);
        helm.args(["--set", &format!("{key}.repository={repository}"), "--set", &format!("{key}.tag={tag}")]);
    }
    for s in &opts.sets {
        helm.args(["--set", s]);
    }
    run(helm, "helm install kpipe")?;
    Ok(())
}

/// Env var naming the operator image of test releases (default: the chart's, which the bed's kubelet maps to
/// `$CARGO_TARGET_DIR/release/kpipe-operator` of the bed's checkout). `file:///abs/path:tag` runs
/// `/abs/path:tag`: the chart always renders `repository:tag`, so give the binary that name with a hard link
/// (`ln -f kpipe-operator kpipe-operator:e2e`; the kubelet copies the file into the pod, a relative symlink would
/// dangle there).
pub const ENV_OPERATOR_IMAGE: &str = "KPIPE_E2E_OPERATOR_IMAGE";
/// Env var naming the default worker image of test releases; same form as [`ENV_OPERATOR_IMAGE`].
pub const ENV_WORKER_IMAGE: &str = "KPIPE_E2E_WORKER_IMAGE";

/// Env var naming the image of test sinks, overriding the bed's ([`TestBed::test_image`]); same form as
/// [`ENV_OPERATOR_IMAGE`], for a sink built in another tree.
pub const ENV_SINK_IMAGE: &str = "KPIPE_E2E_SINK_IMAGE";

fn sink_image(bed: &TestBed) -> String {
    std::env::var(ENV_SINK_IMAGE).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| bed.test_image(TestImage::Sink))
}

/// `(chart value prefix, image)` for the image overrides set in the environment or the env file
/// ([`TestBed::image_override`]).
fn image_overrides(bed: &TestBed) -> Vec<(&'static str, String)> {
    [("image", ENV_OPERATOR_IMAGE), ("worker.image", ENV_WORKER_IMAGE)]
        .into_iter()
        .filter_map(|(key, var)| bed.image_override(var).map(|v| (key, v)))
        .collect()
}

/// Splits an image reference into repository and tag (`latest` when it has none).
pub fn split_image(image: &str) -> (&str, &str) {
    match image.rsplit_once(':') {
        Some((repository, tag)) if !tag.contains('/') && !repository.is_empty() && repository != "file" => {
            (repository, tag)
        }
        _ => (image, "latest"),
    }
}

/// `helm uninstall` of the test release.
pub fn uninstall_kpipe(bed: &TestBed, namespace: &str) -> Result<(), TestBedError> {
    let mut helm = Command::new(bed.helm());
    helm.env("KUBECONFIG", bed.kubeconfig()).args(["uninstall", "kpipe", "--namespace", namespace, "--wait"]);
    run(helm, "helm uninstall kpipe")?;
    Ok(())
}

/// The HTTP sink pod of a test.
#[derive(Debug, Clone)]
pub struct Sink {
    /// `http://<name>.<namespace>.svc:8080/records`, the address pipelines use.
    pub url: String,
    base: String,
}

impl Sink {
    /// Every delivered id in arrival order (duplicates included).
    pub async fn ids(&self) -> Result<Vec<String>, TestBedError> {
        let body = reqwest::get(format!("{}/ids", self.base)).await.map_err(other)?.text().await.map_err(other)?;
        Ok(body.lines().map(str::to_string).collect())
    }

    /// Starts (`true`) or ends an outage: the sink answers 503 to every request meanwhile.
    pub async fn set_outage(&self, on: bool) -> Result<(), TestBedError> {
        self.post(&format!("/outage/{}", if on { "start" } else { "end" })).await
    }

    /// Starts rate limiting: the sink answers 429 with `Retry-After: <seconds>` until [`Sink::set_outage`]`(false)`.
    pub async fn start_rate_limit(&self, retry_after_secs: u32) -> Result<(), TestBedError> {
        self.post(&format!("/outage/start?status=429&retry_after={retry_after_secs}")).await
    }

    async fn post(&self, path: &str) -> Result<(), TestBedError> {
        let url = format!("{}{path}", self.base);
        let resp = reqwest::Client::new().post(url).send().await.map_err(other)?;
        if !resp.status().is_success() {
            return Err(other(format!("sink outage switch answered {}", resp.status())));
        }
        Ok(())
    }

    /// The CloudEvents the sink parsed with the CloudEvents SDK, decoded, in arrival order (see `kpipe-test-sink`).
    pub async fn events(&self) -> Result<Vec<serde_json::Value>, TestBedError> {
        reqwest::get(format!("{}/events", self.base)).await.map_err(other)?.json().await.map_err(other)
    }

    /// `{"requests","records","unique","rejected","malformed","outOfOrder"}`.
    pub async fn stats(&self) -> Result<serde_json::Value, TestBedError> {
        reqwest::get(format!("{}/stats", self.base)).await.map_err(other)?.json().await.map_err(other)
    }
}

/// Runs `kpipe-test-sink` with `args` as a one-replica Deployment `name` and returns its address once ready.
pub async fn deploy_sink(bed: &TestBed, namespace: &str, name: &str, args: &[&str]) -> Result<Sink, TestBedError> {
    let deployment: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{
                    "name": "sink", "image": sink_image(bed), "imagePullPolicy": "IfNotPresent",
                    "args": args,
                    "ports": [{"containerPort": 8080, "name": "http"}],
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1},
                }]},
            },
        },
    }))
    .map_err(other)?;
    Api::<Deployment>::namespaced(bed.client(), namespace)
        .patch(name, &PatchParams::apply("kpipe-e2e").force(), &Patch::Apply(&deployment))
        .await?;
    // A Service gives the sink a stable address: pods reach it by name, the test process at
    // [`TestBed::host_url`] (the ClusterIP the bed proxies on the host, a NodePort on kind).
    let service: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name},
        "spec": {"type": bed.host_service_type(), "selector": {"app": name},
                 "ports": [{"name": "http", "port": 8080, "targetPort": 8080}]},
    }))
    .map_err(other)?;
    let services: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(bed.client(), namespace);
    let service = services.patch(name, &PatchParams::apply("kpipe-e2e").force(), &Patch::Apply(&service)).await?;
    let base = bed.host_url(&service, 8080)?;
    // Every replica of the sink ready (the Deployment controller's "complete" condition), watched, not polled.
    let deployments: Api<Deployment> = Api::namespaced(bed.client(), namespace);
    await_condition(
        deployments,
        name,
        &format!("sink {name} ready"),
        Duration::from_secs(90),
        kube::runtime::wait::conditions::is_deployment_completed(),
    )
    .await?;
    // The host's path to the Service works once it has the endpoint.
    wait_for(&format!("sink {name} answers on {base}"), Duration::from_secs(60), || {
        let base = base.clone();
        async move { reqwest::get(format!("{base}/healthz")).await.ok()?.status().is_success().then_some(()) }
    })
    .await?;
    Ok(Sink { url: format!("http://{name}.{namespace}.svc:8080/records"), base })
}

/// Applies a ConsumerPipeline given as JSON (server-side apply, field manager `kpipe-e2e`).
pub async fn apply_pipeline(bed: &TestBed, namespace: &str, pipeline: serde_json::Value) -> Result<(), TestBedError> {
    let cp: ConsumerPipeline = serde_json::from_value(pipeline).map_err(other)?;
    let name = cp.metadata.name.clone().ok_or_else(|| other("pipeline without a name"))?;
    Api::<ConsumerPipeline>::namespaced(bed.client(), namespace)
        .patch(&name, &PatchParams::apply("kpipe-e2e").force(), &Patch::Apply(&cp))
        .await?;
    Ok(())
}

/// Merge-patches a pipeline's spec (e.g. `{"scaling": {"maxReplicas": 1}}`).
pub async fn patch_pipeline_spec(
    bed: &TestBed,
    namespace: &str,
    name: &str,
    spec: serde_json::Value,
) -> Result<(), TestBedError> {
    Api::<ConsumerPipeline>::namespaced(bed.client(), namespace)
        .patch(name, &PatchParams::default(), &Patch::Merge(json!({"spec": spec})))
        .await?;
    Ok(())
}

/// The pipeline's current status (default when it has none yet).
pub async fn pipeline_status(
    bed: &TestBed,
    namespace: &str,
    name: &str,
) -> Result<ConsumerPipelineStatus, TestBedError> {
    let cp = Api::<ConsumerPipeline>::namespaced(bed.client(), namespace).get(name).await?;
    Ok(cp.status.unwrap_or_default())
}

/// Waits (kube-runtime's watch-based `await_condition`) until the status of the pipeline `name` satisfies `reached`,
/// at most `timeout`; returns that status. `what` names the wait in the timeout error.
pub async fn await_pipeline_status(
    bed: &TestBed,
    namespace: &str,
    name: &str,
    what: &str,
    timeout: Duration,
    reached: impl Fn(&ConsumerPipelineStatus) -> bool,
) -> Result<ConsumerPipelineStatus, TestBedError> {
    let api = Api::<ConsumerPipeline>::namespaced(bed.client(), namespace);
    let matches = |cp: Option<&ConsumerPipeline>| cp.is_some_and(|cp| reached(&cp.status.clone().unwrap_or_default()));
    let cp = await_condition(api, name, what, timeout, matches).await?;
    Ok(cp.status.unwrap_or_default())
}

/// `(type, status, reason)` of a condition.
pub fn condition(status: &ConsumerPipelineStatus, type_: &str) -> Option<(String, String)> {
    status.condition(type_).map(|c| (c.status.clone(), c.reason.clone()))
}

/// `spec.replicas` of the pipeline's worker Deployment(s) (sum; 0 when none exists yet).
pub async fn worker_replicas(bed: &TestBed, namespace: &str, pipeline: &str) -> Result<i32, TestBedError> {
    let list = Api::<Deployment>::namespaced(bed.client(), namespace)
        .list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={pipeline}")))
        .await?;
    Ok(list.items.iter().filter_map(|d| d.spec.as_ref()?.replicas).sum())
}

/// Events about `object` in `namespace` as `(type, reason, note)`, oldest first.
pub async fn events_for(
    bed: &TestBed,
    namespace: &str,
    object: &str,
) -> Result<Vec<(String, String, String)>, TestBedError> {
    use k8s_openapi::api::events::v1::Event;
    let mut events: Vec<Event> = Api::<Event>::namespaced(bed.client(), namespace)
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(object))
        .collect();
    events.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0).or(e.metadata.creation_timestamp.as_ref().map(|t| t.0)));
    Ok(events
        .into_iter()
        .map(|e| (e.type_.unwrap_or_default(), e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect())
}

/// Ids `<prefix>-<i>` for `i` in `range`, as `(key, value)` records keyed by `i % keys`.
pub fn id_records(prefix: &str, range: std::ops::Range<usize>, keys: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    range.map(|i| (format!("k{}", i % keys.max(1)).into_bytes(), format!("{prefix}-{i:08}").into_bytes())).collect()
}

/// `(key, value)` records to produce.
pub type KeyValues = Vec<(Vec<u8>, Vec<u8>)>;

/// `n` records keyed `k<i % 50>`, every hundredth a poison record (1 %): values `poison-<i>` (those with
/// `i % 100 == 7`) and `ok-<i>`. Returns the records, the poison values and the good values.
pub fn one_percent_poison(n: usize) -> (KeyValues, BTreeSet<String>, BTreeSet<String>) {
    let (mut poison, mut ok) = (BTreeSet::new(), BTreeSet::new());
    let records = (0..n)
        .map(|i| {
            let value = if i % 100 == 7 { format!("poison-{i:05}") } else { format!("ok-{i:05}") };
            if i % 100 == 7 {
                poison.insert(value.clone())
            } else {
                ok.insert(value.clone())
            };
            (format!("k{}", i % 50).into_bytes(), value.into_bytes())
        })
        .collect();
    (records, poison, ok)
}

/// A namespace with kpipe installed (namespaced mode) and an HTTP sink `sink` started with `sink_args`. Panics
/// with the namespace's pod logs when either does not come up (for tests and benchmarks).
pub async fn setup_with_sink(
    bed: &TestBed,
    prefix: &str,
    install: &Install,
    sink_args: &[&str],
) -> Result<(crate::TempNamespace, Sink), TestBedError> {
    let ns = bed.temp_namespace(prefix).await?;
    if let Err(e) = install_kpipe(bed, ns.name(), install) {
        bed.dump_pod_logs(ns.name());
        return Err(e);
    }
    let sink = deploy_sink(bed, ns.name(), "sink", sink_args).await?;
    Ok((ns, sink))
}

/// A ConsumerPipeline manifest reading `topic` from the cluster's broker (its address for pods) into `sink`, scaling 0..6 with short
/// intervals; `extra` is merged over the spec (objects merge key by key, anything else replaces).
pub fn pipeline_manifest(
    name: &str,
    bed: &TestBed,
    topic: &str,
    sink: &Sink,
    extra: serde_json::Value,
) -> serde_json::Value {
    let mut spec = json!({
        "source": {"bootstrapServers": [bed.kafka_bootstrap_pods()], "topics": [topic], "startOffset": "earliest"},
        "processor": {"http": {"url": sink.url, "timeout": "5s"}},
        "scaling": {"minReplicas": 0, "maxReplicas": 6, "pollInterval": "2s", "scaleDownStabilization": "10s",
                    "cooldownToZero": "15s", "lagThreshold": 5000},
    });
    merge_json(&mut spec, extra);
    json!({"apiVersion": "kpipe.io/v1alpha1", "kind": "ConsumerPipeline", "metadata": {"name": name}, "spec": spec})
}

/// JSON merge: objects key by key, `null` removes the key, anything else replaces.
pub fn merge_json(base: &mut serde_json::Value, extra: serde_json::Value) {
    match (base, extra) {
        (serde_json::Value::Object(b), serde_json::Value::Object(e)) => {
            for (k, v) in e {
                if v.is_null() {
                    b.remove(&k);
                } else {
                    merge_json(b.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
        }
        (b, e) => *b = e,
    }
}

/// A topic name unique to one test run: `<prefix>-<8 hex digits>` ([`crate::unique_name`]).
pub fn unique_topic(prefix: &str) -> String {
    crate::unique_name(prefix)
}

/// Waits until the sink has every id of `expected`; returns all delivered ids (duplicates included), or an error
/// naming how many are missing after `timeout`.
pub async fn wait_delivered(
    sink: &Sink,
    expected: &std::collections::BTreeSet<String>,
    timeout: Duration,
) -> Result<Vec<String>, TestBedError> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let ids = sink.ids().await.unwrap_or_default();
        let got: std::collections::BTreeSet<&String> = ids.iter().collect();
        if expected.iter().all(|id| got.contains(id)) {
            return Ok(ids);
        }
        if std::time::Instant::now() > deadline {
            let missing: Vec<&String> = expected.iter().filter(|id| !got.contains(id)).take(10).collect();
            return Err(other(format!(
                "{} of {} ids not delivered after {timeout:?}, e.g. {missing:?}",
                expected.iter().filter(|id| !got.contains(id)).count(),
                expected.len()
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits until the pipeline has no worker pod left, not only `spec.replicas` 0: on a real kubelet a scaled-down worker
/// keeps consuming and committing until its SIGTERM arrives and it has drained (the process bed stopped it at once).
pub async fn wait_workers_gone(
    bed: &TestBed,
    namespace: &str,
    pipeline: &str,
    timeout: Duration,
) -> Result<(), TestBedError> {
    wait_for(&format!("the worker pods of {pipeline} to be gone"), timeout, || async {
        worker_pods(bed, namespace, pipeline).await.is_empty().then_some(())
    })
    .await
}

/// Names of the pipeline's worker pods (any phase).
pub async fn worker_pods(bed: &TestBed, namespace: &str, pipeline: &str) -> Vec<String> {
    let pods: Api<Pod> = Api::namespaced(bed.client(), namespace);
    let list = pods.list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={pipeline}"))).await;
    list.map(|l| l.items.into_iter().filter_map(|p| p.metadata.name).collect()).unwrap_or_default()
}
