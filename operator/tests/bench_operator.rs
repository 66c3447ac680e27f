#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Operator benchmark on the test bed: N ConsumerPipelines (default 1000, `KPIPE_BENCH_PIPELINES`)
//! against one broker. Reports the time until all are Ready, the operator's steady-state RSS, the
//! TCP connections it holds to the broker, and the reaction time from a backlog to a changed
//! Deployment replica count.
//!
//! `cargo build --release -p kpipe-operator` (the bench uses the release binary when present),
//! then `cargo test -p kpipe-operator --release --test bench_operator -- --ignored --nocapture`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use k8s_openapi::api::apps::v1::Deployment;
use kpipe_api::v1alpha1::ConsumerPipeline;
use kpipe_e2e::testbed::{TestBed, wait_for};
use kpipe_test_support::{free_port, http_get};
use kube::Api;
use kube::api::{ListParams, PostParams};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn operator_binary() -> String {
    let release = format!("{}/../target/release/kpipe-operator", env!("CARGO_MANIFEST_DIR"));
    if std::path::Path::new(&release).exists() { release } else { env!("CARGO_BIN_EXE_kpipe-operator").to_string() }
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.count()).unwrap_or(0)
}

/// Established TCP connections of `pid` to `port` (from /proc: socket inodes ∩ /proc/net/tcp).
fn connections_to(pid: u32, port: u16) -> usize {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter_map(|l| {
                    let s = l.to_string_lossy().to_string();
                    s.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')).map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    let port_hex = format!(":{port:04X}");
    let mut n = 0;
    for file in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() > 9 && cols[2].ends_with(&port_hex) && cols[3] == "01" && inodes.contains(cols[9]) {
                n += 1;
            }
        }
    }
    n
}

#[tokio::test]
#[ignore = "benchmark: needs the local test bed"]
async fn many_pipelines_one_broker() {
    let n: usize = std::env::var("KPIPE_BENCH_PIPELINES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let bed = TestBed::connect().await.unwrap();
    let ns = bed.temp_namespace("op-bench").await.unwrap();
    let ns = ns.name().to_string();
    let topic = format!("{ns}-in");
    bed.create_topic(&topic, 4).await.unwrap();
    // p0000 alone reads the hot topic, so the reaction phase wakes one pipeline, not all.
    let hot = format!("{ns}-hot");
    bed.create_topic(&hot, 4).await.unwrap();
    let kafka_port: u16 = bed.kafka_bootstrap().rsplit(':').next().unwrap().parse().unwrap();
    let port = free_port();
    let log = std::fs::File::create(std::env::temp_dir().join(format!("op-bench-{ns}.log"))).unwrap();
    let op = Proc(
        Command::new(operator_binary())
            .env("KUBECONFIG", bed.kubeconfig())
            .env("RUST_LOG", std::env::var("KPIPE_BENCH_LOG").unwrap_or_else(|_| "info".into()))
            .args(["--namespaces", &ns, "--listen", &format!("127.0.0.1:{port}"), "--log-format", "text"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = op.0.id();
    let client = bed.client();
    let cps: Api<ConsumerPipeline> = Api::namespaced(client.clone(), &ns);
    let started = Instant::now();
    stream::iter(0..n)
        .for_each_concurrent(16, |i| {
            let cps = cps.clone();
            let topic = if i == 0 { hot.clone() } else { topic.clone() };
            let (ns, bootstrap) = (ns.clone(), bed.kafka_bootstrap().to_string());
            async move {
                let cp: ConsumerPipeline = serde_json::from_value(serde_json::json!({
                    "apiVersion": "kpipe.io/v1alpha1", "kind": "ConsumerPipeline",
                    "metadata": {"name": format!("p{i:04}"), "namespace": ns},
                    "spec": {"source": {"bootstrapServers": [bootstrap], "topics": [topic]}, "processor": {"noop": {}}}
                }))
                .unwrap();
                cps.create(&PostParams::default(), &cp).await.unwrap();
            }
        })
        .await;
    let created = started.elapsed();
    let all_ready = wait_for(&format!("{n} pipelines Ready"), Duration::from_secs(600), || async {
        let list = cps.list(&ListParams::default()).await.ok()?;
        let ready = list
            .items
            .iter()
            .filter(|cp| cp.status.as_ref().and_then(|s| s.condition("Ready")).is_some_and(|c| c.status == "True"))
            .count();
        (ready == n).then_some(())
    })
    .await;
    let ready_after = started.elapsed();
    all_ready.unwrap();
    // Steady state: a few poll intervals.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let rss = rss_mib(pid);
    let conns = connections_to(pid, kafka_port);
    let nthreads = threads(pid);

    // Scale reaction: backlog on one pipeline's group.
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    bed.produce(&hot, 2000).await.unwrap();
    let produced = Instant::now();
    wait_for("first Deployment scaled up", Duration::from_secs(60), || async {
        let d = deps.get("p0000-worker").await.ok()?;
        (d.spec?.replicas? > 0).then_some(())
    })
    .await
    .unwrap();
    let reaction = produced.elapsed();
    let metrics = http_get(port, "/metrics").await.unwrap_or_default();
    for l in metrics.lines().filter(|l| {
        l.starts_with("kpipe_operator_probe_duration_seconds_sum")
            || l.starts_with("kpipe_operator_probe_duration_seconds_count")
            || l.starts_with("kpipe_operator_reconcile_duration_seconds_sum")
            || l.starts_with("kpipe_operator_reconcile_duration_seconds_count")
            || l.starts_with("kpipe_operator_reconciles_total")
            || l.starts_with("kpipe_operator_kafka_clients")
    }) {
        println!("METRIC {l}");
    }
    println!(
        "BENCH pipelines={n} created_in={created:.1?} all_ready_in={ready_after:.1?} rss_mib={rss:.1} \
         kafka_connections={conns} threads={nthreads} scale_reaction={reaction:.2?}"
    );
}
