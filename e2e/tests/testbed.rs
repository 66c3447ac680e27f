//! Acceptance tests of the local test bed itself (real etcd, kube-apiserver, kube-controller-manager, Kafka and the
//! process kubelet; no mocks). They need a running bed (`make testbed-up`) and FAIL with the reason when it is not up.
//!
//! Run: `cargo test -p kpipe-e2e --test testbed`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kpipe_e2e::testbed::{await_condition, await_deleted, wait_for};
use kpipe_e2e::{TempNamespace, TestBed, bed};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::conditions;
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use serde_json::json;

const TEST_HTTP: &str = env!("CARGO_BIN_EXE_kpipe-test-http");

fn image() -> String {
    format!("file://{TEST_HTTP}")
}

async fn create<K>(bed: &TestBed, ns: &TempNamespace, value: serde_json::Value) -> K
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let obj: K = serde_json::from_value(value).expect("valid object");
    Api::<K>::namespaced(bed.client(), ns.name()).create(&PostParams::default(), &obj).await.expect("create object")
}

/// The pod's phase (`Pending`, `Running`, `Succeeded`, `Failed`).
fn phase(pod: Option<&Pod>) -> Option<&str> {
    pod?.status.as_ref()?.phase.as_deref()
}

/// The status of the pod's first container.
fn first_container(pod: Option<&Pod>) -> Option<&k8s_openapi::api::core::v1::ContainerStatus> {
    pod?.status.as_ref()?.container_statuses.as_ref()?.first()
}

/// Runs a one-shot pod (restartPolicy Never) of the test binary and returns its log once it has Succeeded.
async fn run_to_completion(
    bed: &TestBed,
    ns: &TempNamespace,
    name: &str,
    spec_extra: serde_json::Value,
    args: &[&str],
) -> String {
    let mut spec = json!({
        "restartPolicy": "Never",
        "containers": [{"name": "main", "image": image(), "args": args}],
    });
    if let (Some(s), Some(extra)) = (spec.as_object_mut(), spec_extra.as_object()) {
        for (k, v) in extra {
            s.insert(k.clone(), v.clone());
        }
    }
    let _: Pod =
        create(bed, ns, json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec})).await;
    let pods = Api::<Pod>::namespaced(bed.client(), ns.name());
    let finished = |p: Option<&Pod>| matches!(phase(p), Some("Succeeded" | "Failed"));
    let pod =
        await_condition(pods, name, &format!("pod {name} to finish"), Duration::from_secs(60), finished).await.unwrap();
    let phase = phase(Some(&pod)).unwrap_or_default().to_string();
    let log =
        std::fs::read_to_string(bed.pod_log_dir().join(format!("{}_{name}_main.log", ns.name()))).unwrap_or_default();
    assert_eq!(phase, "Succeeded", "pod {name} failed; log:\n{log}");
    log
}

#[tokio::test(flavor = "multi_thread")]
async fn testbed_deployment_ready_via_probe_and_sigterm_on_scale_to_zero() {
    let bed = bed().await;
    let ns = bed.temp_namespace("tb-deploy").await.unwrap();
    let sigterm_file = std::env::temp_dir().join(format!("kpipe-e2e-{}.sigterm", ns.name()));
    let _ = std::fs::remove_file(&sigterm_file);
    let _: Deployment = create(
        &bed,
        &ns,
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {
                        "terminationGracePeriodSeconds": 10,
                        "containers": [{
                            "name": "web", "image": image(),
                            "ports": [{"name": "http", "containerPort": 8080}],
                            "env": [
                                {"name": "SIGTERM_FILE", "value": sigterm_file.display().to_string()},
                                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                            ],
                            "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 1},
                            "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 2},
                        }],
                    },
                },
            },
        }),
    )
    .await;

    let deployments = Api::<Deployment>::namespaced(bed.client(), ns.name());
    let pods = Api::<Pod>::namespaced(bed.client(), ns.name());
    let ready = bed.wait_pods_ready(ns.name(), "app=web", 2, Duration::from_secs(60)).await.unwrap();
    let two_ready = |d: Option<&Deployment>| d.and_then(|d| d.status.as_ref()?.ready_replicas) == Some(2);
    let what = "deployment web to report 2 ready replicas";
    await_condition(deployments.clone(), "web", what, Duration::from_secs(30), two_ready).await.unwrap();

    let mut names = BTreeSet::new();
    let mut ips = BTreeSet::new();
    for p in &ready {
        let name = p.metadata.name.clone().unwrap();
        let st = p.status.clone().unwrap();
        let cs = &st.container_statuses.clone().unwrap()[0];
        assert!(cs.ready, "container of {name} not ready");
        let ready = st.conditions.unwrap().into_iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.status, "True");
        // A real process per pod.
        let pid: u32 = cs.container_id.clone().unwrap().trim_start_matches("process://").parse().unwrap();
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists(), "process {pid} of {name} not running");
        // Own network identity: both listen on :8080 without colliding, each answers with its own name.
        let ip = st.pod_ip.clone().unwrap();
        assert_ne!(ip, bed.var("KPIPE_BRIDGE_IP").unwrap());
        let body = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get(format!("http://{ip}:8080/"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(body, name);
        names.insert(name);
        ips.insert(ip);
    }
    assert_eq!(ips.len(), 2, "pods must have distinct IPs");

    deployments.patch("web", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 0}}))).await.unwrap();
    wait_for("all web pods to be removed", Duration::from_secs(60), || {
        let pods = pods.clone();
        async move { pods.list(&ListParams::default()).await.ok()?.items.is_empty().then_some(()) }
    })
    .await
    .unwrap();
    let seen = std::fs::read_to_string(&sigterm_file).unwrap_or_default();
    for n in &names {
        assert!(seen.contains(&format!("SIGTERM {n} ")), "pod {n} did not observe SIGTERM; file:\n{seen}");
    }
    let _ = std::fs::remove_file(&sigterm_file);
    ns.delete().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn testbed_kafka_10k_records_with_consumer_group_offsets() {
    let bed = bed().await;
    let topic = format!("tb-10k-{:08x}", rand::random::<u32>());
    let group = format!("{topic}-group");
    bed.create_topic(&topic, 3).await.unwrap();
    bed.produce(&topic, 10_000).await.unwrap();
    let end = bed.end_offsets(&topic).await.unwrap();
    assert_eq!(end.values().sum::<i64>(), 10_000, "log-end offsets {end:?}");

    let records = bed.consume(&topic, &group, 10_000, Duration::from_secs(60)).await.unwrap();
    let keys: BTreeSet<Vec<u8>> = records.iter().map(|r| r.key.clone()).collect();
    assert_eq!(keys.len(), 10_000, "every record exactly once");
    let mut per_partition: BTreeMap<i32, i64> = BTreeMap::new();
    for r in &records {
        let e = per_partition.entry(r.partition).or_insert(-1);
        assert!(r.offset > *e, "offsets increase within partition {}", r.partition);
        *e = r.offset;
        assert_eq!(
            String::from_utf8_lossy(&r.value).trim_start_matches("value-"),
            String::from_utf8_lossy(&r.key).trim_start_matches("key-")
        );
    }

    let committed = bed.committed_offsets(&topic, &group).await.unwrap();
    assert_eq!(committed.len(), 3);
    for (p, off) in &committed {
        assert_eq!(Some(end[p]), *off, "partition {p}: committed offset must equal log end");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn testbed_pod_service_account_rbac_is_enforced() {
    let bed = bed().await;
    let ns = bed.temp_namespace("tb-rbac").await.unwrap();
    let _: ServiceAccount =
        create(&bed, &ns, json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "limited"}})).await;
    let _: Role = create(
        &bed,
        &ns,
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "pod-reader"},
               "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]}),
    )
    .await;
    let _: RoleBinding = create(
        &bed,
        &ns,
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "limited-pod-reader"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
               "subjects": [{"kind": "ServiceAccount", "name": "limited", "namespace": ns.name()}]}),
    )
    .await;
    let sa = json!({"serviceAccountName": "limited"});
    let secrets = format!("/api/v1/namespaces/{}/secrets", ns.name());
    let pods = format!("/api/v1/namespaces/{}/pods", ns.name());
    let denied = run_to_completion(&bed, &ns, "denied", sa.clone(), &["kube-get", &secrets]).await;
    assert!(denied.contains("KUBE_STATUS=403"), "listing secrets must be forbidden; log:\n{denied}");
    let allowed = run_to_completion(&bed, &ns, "allowed", sa, &["kube-get", &pods]).await;
    assert!(allowed.contains("KUBE_STATUS=200"), "listing pods is granted by the Role; log:\n{allowed}");
    ns.delete().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn testbed_pod_network_volumes_and_env() {
    let bed = bed().await;
    let ns = bed.temp_namespace("tb-pod").await.unwrap();
    let _: ConfigMap = create(
        &bed,
        &ns,
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"config.yaml": "hello: world", "mode": "fast"}}),
    )
    .await;
    let _: Secret = create(
        &bed,
        &ns,
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}, "stringData": {"password": "s3cret"}}),
    )
    .await;
    let spec = json!({
        "volumes": [
            {"name": "cfg", "configMap": {"name": "cfg"}},
            {"name": "creds", "secret": {"secretName": "creds"}},
            {"name": "scratch", "emptyDir": {}},
        ],
        "containers": [{
            "name": "main", "image": image(),
            "args": ["show", "--file", "/etc/kpipe-test/config.yaml", "--file", "/etc/kpipe-test-creds/password",
                     "--file", "/var/run/secrets/kubernetes.io/serviceaccount/namespace",
                     "--env", "MODE", "--env", "PASSWORD", "--env", "POD_IP", "--env", "POD_NS", "--env", "GREETING"],
            "env": [
                {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode"}}},
                {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "GREETING", "value": "mode-$(MODE)"},
            ],
            "volumeMounts": [
                {"name": "cfg", "mountPath": "/etc/kpipe-test", "readOnly": true},
                {"name": "creds", "mountPath": "/etc/kpipe-test-creds", "readOnly": true},
                {"name": "scratch", "mountPath": "/tmp/kpipe-test-scratch"},
            ],
        }],
    });
    let log = run_to_completion(&bed, &ns, "show", spec, &[]).await;
    for want in [
        "FILE /etc/kpipe-test/config.yaml hello: world",
        "FILE /etc/kpipe-test-creds/password s3cret",
        &format!("FILE /var/run/secrets/kubernetes.io/serviceaccount/namespace {}", ns.name()),
        "ENV MODE=fast",
        "ENV PASSWORD=s3cret",
        &format!("ENV POD_NS={}", ns.name()),
        "ENV GREETING=mode-fast",
        "ENV POD_IP=10.",
    ] {
        assert!(log.contains(want), "missing {want:?} in pod output:\n{log}");
    }
    // The bind mounts live in the pod's private mount namespace only.
    assert!(!std::path::Path::new("/etc/kpipe-test/config.yaml").exists(), "volume leaked to the host mount namespace");

    // From inside its network namespace a pod reaches Kafka and the kube-apiserver at the bed's addresses.
    let kafka = bed.kafka_bootstrap().to_string();
    let api = bed.var("KPIPE_APISERVER").unwrap().trim_start_matches("https://").to_string();
    for (name, addr) in [("kafka", kafka), ("api", api)] {
        let log = run_to_completion(&bed, &ns, &format!("reach-{name}"), json!({}), &["tcp-connect", &addr]).await;
        assert!(log.contains(&format!("TCP_OK {addr}")), "pod cannot reach {addr}:\n{log}");
    }
    // Isolation: the host's loopback (Kafka's controller listener is bound to 127.0.0.1 only) is not the pod's...
    let log = run_to_completion(&bed, &ns, "isolated", json!({}), &["tcp-connect", "127.0.0.1:9093"]).await;
    assert!(log.contains("TCP_FAIL 127.0.0.1:9093"), "pod network namespace is not isolated:\n{log}");
    // ...unless the pod asks for hostNetwork, in which case its IP is the node address.
    let log =
        run_to_completion(&bed, &ns, "hostnet", json!({"hostNetwork": true}), &["tcp-connect", "127.0.0.1:9093"]).await;
    assert!(log.contains("TCP_OK 127.0.0.1:9093"), "hostNetwork pod must share the host network:\n{log}");
    let hostnet = Api::<Pod>::namespaced(bed.client(), ns.name()).get("hostnet").await.unwrap();
    assert_eq!(hostnet.status.unwrap().pod_ip.as_deref(), bed.var("KPIPE_BRIDGE_IP"));
    ns.delete().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn testbed_kubectl_version_and_helm() {
    let bed = bed().await;
    let out = bed.kubectl_cmd().args(["get", "--raw", "/version"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "kubectl failed: {}", String::from_utf8_lossy(&out.stderr));
    let expected = bed.var("K8S_VERSION").unwrap();
    assert!(text.contains(&format!("\"gitVersion\": \"{expected}\"")), "unexpected /version: {text}");

    let out = std::process::Command::new(bed.helm()).arg("version").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("Version:\"v3."), "helm version: {text}");
    let out = std::process::Command::new(bed.helm())
        .args(["list", "--all-namespaces", "--kubeconfig"])
        .arg(bed.kubeconfig())
        .output()
        .unwrap();
    assert!(out.status.success(), "helm list against the bed failed: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread")]
async fn testbed_restart_policy_backoff_and_sigkill_after_grace() {
    let bed = bed().await;
    let ns = bed.temp_namespace("tb-restart").await.unwrap();
    let pods = Api::<Pod>::namespaced(bed.client(), ns.name());
    let sh = |name: &str, policy: &str, script: &str, grace: i64| {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
               "spec": {"restartPolicy": policy, "terminationGracePeriodSeconds": grace,
                        "containers": [{"name": "main", "image": "busybox:1.36", "command": ["/bin/sh", "-c", script]}]}})
    };
    let _: Pod = create(&bed, &ns, sh("crash", "Always", "echo run; exit 3", 1)).await;
    let _: Pod = create(&bed, &ns, sh("once", "OnFailure", "echo done", 1)).await;
    let _: Pod = create(
        &bed,
        &ns,
        sh("stubborn", "Always", "trap 'echo got-term' TERM; echo up; while true; do sleep 0.2; done", 2),
    )
    .await;

    // restartPolicy Always: restarted with back-off, restart count and last exit code reported.
    let restarted_twice = |p: Option<&Pod>| {
        first_container(p).is_some_and(|cs| {
            let last = cs.last_state.as_ref().and_then(|s| s.terminated.as_ref());
            cs.restart_count >= 2 && last.is_some_and(|t| t.exit_code == 3) && phase(p) == Some("Running")
        })
    };
    let what = "crash to be restarted twice with exit code 3";
    await_condition(pods.clone(), "crash", what, Duration::from_secs(60), restarted_twice).await.unwrap();
    // Chaos: kill -9 of a running container → restarted, exit code 137 / signal 9 reported.
    let _: Pod = create(&bed, &ns, sh("victim", "Always", "echo alive; while true; do sleep 0.2; done", 1)).await;
    let pid = wait_for("victim to run", Duration::from_secs(30), || {
        let bed = bed.clone();
        let ns = ns.name().to_string();
        async move { bed.container_pid(&ns, "victim", "main").await.ok().flatten() }
    })
    .await
    .unwrap();
    assert!(kpipe_e2e::testbed::process_rss_bytes(pid).unwrap() > 0);
    bed.kill_container(ns.name(), "victim", "main", kpipe_e2e::testbed::Signal::SIGKILL).await.unwrap();
    let restarted_after_kill = |p: Option<&Pod>| {
        first_container(p).is_some_and(|cs| {
            let last = cs.last_state.as_ref().and_then(|s| s.terminated.as_ref());
            let running = cs.state.as_ref().is_some_and(|s| s.running.is_some());
            cs.restart_count == 1 && last.is_some_and(|t| t.exit_code == 137 && t.signal == Some(9)) && running
        })
    };
    let what = "victim to be restarted after SIGKILL";
    await_condition(pods.clone(), "victim", what, Duration::from_secs(30), restarted_after_kill).await.unwrap();
    // OnFailure + exit 0: Succeeded without restarts.
    let succeeded =
        |p: Option<&Pod>| phase(p) == Some("Succeeded") && first_container(p).is_some_and(|cs| cs.restart_count == 0);
    await_condition(pods.clone(), "once", "once to succeed", Duration::from_secs(30), succeeded).await.unwrap();

    // A process that ignores SIGTERM is SIGKILLed after terminationGracePeriodSeconds.
    await_condition(pods.clone(), "stubborn", "stubborn to run", Duration::from_secs(30), conditions::is_pod_running())
        .await
        .unwrap();
    let log_path = bed.pod_log_dir().join(format!("{}_stubborn_main.log", ns.name()));
    wait_for("stubborn to log", Duration::from_secs(10), || {
        let p = log_path.clone();
        async move { std::fs::read_to_string(p).ok()?.contains("up").then_some(()) }
    })
    .await
    .unwrap();
    let t0 = std::time::Instant::now();
    pods.delete("stubborn", &Default::default()).await.unwrap();
    await_deleted(pods.clone(), "stubborn", "stubborn to be removed", Duration::from_secs(30)).await.unwrap();
    let took = t0.elapsed();
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(log.contains("got-term"), "SIGTERM was not delivered first; log:\n{log}");
    assert!(took >= Duration::from_millis(1900), "killed before the grace period ({took:?})");
    assert!(took < Duration::from_secs(10), "not killed after the grace period ({took:?})");
    ns.delete().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn testbed_kubectl_logs_through_the_kubelet_endpoint() {
    let bed = bed().await;
    let ns = bed.temp_namespace("tb-logs").await.unwrap();
    run_to_completion(&bed, &ns, "hello", json!({}), &["show", "--env", "HOSTNAME"]).await;
    let out = bed.kubectl_cmd().args(["logs", "-n", ns.name(), "hello", "--tail", "1"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "kubectl logs failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(text.trim(), "ENV HOSTNAME=hello");
    ns.delete().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn testbed_init_containers_run_first() {
    let bed = bed().await;
    let ns = bed.temp_namespace("tb-init").await.unwrap();
    let spec = json!({
        "volumes": [{"name": "work", "emptyDir": {}}],
        "initContainers": [{"name": "prep", "image": "busybox:1.36", "command": ["/bin/sh", "-c", "echo prepared > /tmp/kpipe-e2e-work/marker"],
                            "volumeMounts": [{"name": "work", "mountPath": "/tmp/kpipe-e2e-work"}]}],
        "containers": [{"name": "main", "image": image(), "args": ["show", "--file", "/tmp/kpipe-e2e-work/marker"],
                        "volumeMounts": [{"name": "work", "mountPath": "/tmp/kpipe-e2e-work"}]}],
    });
    let log = run_to_completion(&bed, &ns, "with-init", spec, &[]).await;
    assert!(log.contains("FILE /tmp/kpipe-e2e-work/marker prepared"), "init container output not visible:\n{log}");
    let pod = Api::<Pod>::namespaced(bed.client(), ns.name()).get("with-init").await.unwrap();
    let init = pod.status.unwrap().init_container_statuses.unwrap();
    assert_eq!(init[0].state.as_ref().unwrap().terminated.as_ref().unwrap().exit_code, 0);

    // A failing init container with restartPolicy Never fails the pod; the main container never starts.
    let _: Pod = create(
        &bed,
        &ns,
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bad-init"},
               "spec": {"restartPolicy": "Never",
                        "initContainers": [{"name": "prep", "image": "busybox:1.36", "command": ["/bin/sh", "-c", "exit 7"]}],
                        "containers": [{"name": "main", "image": image()}]}}),
    )
    .await;
    let pods = Api::<Pod>::namespaced(bed.client(), ns.name());
    let failed = |p: Option<&Pod>| phase(p) == Some("Failed");
    let pod = await_condition(pods, "bad-init", "bad-init to fail", Duration::from_secs(30), failed).await.unwrap();
    let st = pod.status.unwrap();
    let main = &st.container_statuses.unwrap()[0];
    assert!(main.state.as_ref().unwrap().waiting.is_some(), "main container must not have started: {main:?}");
    ns.delete().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn testbed_with_temp_ns_cleans_up() {
    let bed = bed().await;
    let name = bed
        .with_temp_ns("tb-scoped", async |ns: String| -> Result<String, kpipe_e2e::TestBedError> {
            let out = bed.run_kubectl(&["get", "namespace", &ns, "-o", "name"])?;
            assert_eq!(out.trim(), format!("namespace/{ns}"));
            Ok(ns)
        })
        .await
        .unwrap();
    let ns = bed.client();
    let gone = Api::<k8s_openapi::api::core::v1::Namespace>::all(ns).get_opt(&name).await.unwrap();
    assert!(gone.is_none_or(|n| n.metadata.deletion_timestamp.is_some()), "namespace {name} not deleted");
    assert!(bed.run_kubectl(&["get", "pods", "-n", "does-not-matter", "--bogus-flag"]).is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn testbed_multi_container_pod_shares_network_namespace() {
    let bed = bed().await;
    let ns = bed.temp_namespace("tb-multi").await.unwrap();
    let _: Pod = create(
        &bed,
        &ns,
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "duo"},
               "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 2, "containers": [
                   {"name": "server", "image": image(), "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1}},
                   {"name": "sidecar", "image": "busybox:1.36", "command": ["/bin/bash", "-c",
                       "until (echo > /dev/tcp/127.0.0.1/8080) 2>/dev/null; do sleep 0.2; done; echo sidecar-reached-server"]},
               ]}}),
    )
    .await;
    let pods = Api::<Pod>::namespaced(bed.client(), ns.name());
    let server_ready_sidecar_done = |p: Option<&Pod>| {
        let cs = p.and_then(|p| p.status.as_ref()?.container_statuses.as_ref());
        let named = |name: &str| cs.and_then(|cs| cs.iter().find(|c| c.name == name));
        let done =
            named("sidecar").and_then(|c| c.state.as_ref()?.terminated.as_ref()).is_some_and(|t| t.exit_code == 0);
        named("server").is_some_and(|c| c.ready) && done
    };
    let what = "sidecar done and server ready";
    let pod = await_condition(pods, "duo", what, Duration::from_secs(60), server_ready_sidecar_done).await.unwrap();
    let statuses = pod.status.and_then(|s| s.container_statuses).unwrap();
    assert_eq!(statuses.len(), 2);
    let log = std::fs::read_to_string(bed.pod_log_dir().join(format!("{}_duo_sidecar.log", ns.name()))).unwrap();
    assert!(log.contains("sidecar-reached-server"), "sidecar log:\n{log}");
    ns.delete().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn testbed_services_resolve_and_proxy_to_ready_pods() {
    let bed = bed().await;
    let ns = bed.temp_namespace("tb-svc").await.unwrap();
    let _: Deployment = create(
        &bed,
        &ns,
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
               "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                        "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{
                            "name": "web", "image": image(), "ports": [{"name": "http", "containerPort": 8080}],
                            "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                            "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 1}}]}}}}),
    )
    .await;
    let svc: k8s_openapi::api::core::v1::Service = create(
        &bed,
        &ns,
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
               "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}),
    )
    .await;
    let ready = bed.wait_pods_ready(ns.name(), "app=web", 2, Duration::from_secs(60)).await.unwrap();
    let names: BTreeSet<String> = ready.iter().filter_map(|p| p.metadata.name.clone()).collect();
    // From a pod: the Service DNS name resolves (pod /etc/hosts) and the ClusterIP forwards to a ready pod.
    let url = format!("http://web.{}.svc/", ns.name());
    let log = run_to_completion(&bed, &ns, "client", json!({}), &["http-get", &url]).await;
    let served_by = log.lines().find_map(|l| l.strip_prefix("HTTP 200 ")).unwrap_or_default().to_string();
    assert!(names.contains(&served_by), "{url} not served by a web pod; log:\n{log}");
    // From the host: the ClusterIP answers too.
    let cluster_ip = svc.spec.unwrap().cluster_ip.unwrap();
    let body = wait_for("the ClusterIP to answer from the host", Duration::from_secs(30), || {
        let url = format!("http://{cluster_ip}:80/");
        async move {
            let c = reqwest::Client::builder().no_proxy().build().ok()?;
            c.get(url).send().await.ok()?.text().await.ok()
        }
    })
    .await
    .unwrap();
    assert!(names.contains(&body), "unexpected body {body:?}");
    ns.delete().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn testbed_connect_fails_loudly_without_a_bed() {
    let err = TestBed::connect_with(std::path::Path::new("/nonexistent/kpipe/env")).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("not running") && msg.contains("up.sh"), "unhelpful error: {msg}");
}

/// The broker-restart helper keeps data. It restarts the shared broker, so `make integration-test` runs it while no
/// other suite runs (`alone` in e2e/testbed/lanes.conf).
#[tokio::test(flavor = "multi_thread")]
async fn testbed_kafka_restart_keeps_data() {
    let bed = bed().await;
    let topic = format!("tb-restart-{:08x}", rand::random::<u32>());
    bed.create_topic(&topic, 1).await.unwrap();
    bed.produce(&topic, 100).await.unwrap();
    let t0 = std::time::Instant::now();
    bed.restart_kafka().await.unwrap();
    eprintln!("broker restarted in {:?}", t0.elapsed());
    bed.produce(&topic, 100).await.unwrap();
    assert_eq!(bed.end_offsets(&topic).await.unwrap()[&0], 200);
}
