//! Autoscaling reaction benchmark on the local test bed (ignored by default; run by `make bench-scaling`):
//! kpipe installed with Helm, a pipeline idle at 0 replicas, then a small burst. Measured per round, from the
//! moment the burst is acknowledged by the broker:
//!
//! * backlog → Deployment `spec.replicas` changed (the operator's decision),
//! * → first worker pod Ready (pod start on this bed),
//! * → first record delivered to the sink (0 → first record processed),
//!
//! for the default `pollInterval` (5 s) and a short one (1 s). The pipeline returns to 0 between rounds
//! (`cooldownToZero` 5 s), and the burst lands at a random point of the poll cycle, as it would in production.
//!
//! Run: `cargo test -p kpipe-e2e --release --test bench_scaling -- --ignored --nocapture`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kpipe_api::v1alpha1::condition::READY;
use kpipe_e2e::bed;
use kpipe_e2e::scenario::{
    Install, apply_pipeline, condition, id_records, pipeline_manifest, pipeline_status, setup_with_sink,
};
use kpipe_e2e::testbed::wait_for;
use kube::Api;
use kube::api::ListParams;
use serde_json::json;

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Whether a worker pod of `pipeline` reports Ready.
async fn first_pod_ready(pods: &Api<Pod>, pipeline: &str) -> bool {
    let Ok(list) = pods.list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={pipeline}"))).await
    else {
        return false;
    };
    list.items.iter().any(|p| {
        p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    })
}

#[derive(Debug, Default, Clone, Copy)]
struct Round {
    replicas_changed_s: f64,
    pod_ready_s: f64,
    first_record_s: f64,
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark: run by `make bench-scaling`"]
async fn bench_scale_from_zero_reaction() {
    let rounds: usize = std::env::var("KPIPE_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let bed = bed().await;
    let (ns, sink) = setup_with_sink(&bed, "bench-scale", &Install::default(), &[]).await.unwrap();
    let deployments: Api<Deployment> = Api::namespaced(bed.client(), ns.name());
    let pods: Api<Pod> = Api::namespaced(bed.client(), ns.name());
    let mut report = String::from(
        "| pollInterval | backlog → replicas changed (median, max) | → first pod Ready | → first record \
         delivered (median, max) | goal: replicas ≤ poll + 1 s; first record ≤ poll + pod start + 2 s |\n\
         |---|---|---|---|---|\n",
    );
    for (label, poll) in [("5s (default)", None), ("1s", Some("1s"))] {
        let name = format!("react-{}", label.chars().take_while(char::is_ascii_digit).collect::<String>());
        let topic = format!("{}-{name}", ns.name());
        bed.create_topic(&topic, 12).await.unwrap();
        let mut scaling = json!({"cooldownToZero": "5s", "scaleDownStabilization": "5s"});
        scaling["pollInterval"] = poll.map_or(serde_json::Value::Null, |p| json!(p));
        apply_pipeline(&bed, ns.name(), pipeline_manifest(&name, &bed, &topic, &sink, json!({"scaling": scaling})))
            .await
            .unwrap();
        let mut results = Vec::new();
        for round in 0..rounds {
            // Idle at zero: Ready, no replicas, no pods left from the previous round.
            wait_for(&format!("{name} idle at 0 replicas"), Duration::from_secs(180), || async {
                let s = pipeline_status(&bed, ns.name(), &name).await.ok()?;
                let d = deployments.get(&format!("{name}-worker")).await.ok()?;
                let idle = condition(&s, READY).map(|c| c.0).as_deref() == Some("True")
                    && d.spec.as_ref()?.replicas == Some(0)
                    && !first_pod_ready(&pods, &name).await;
                idle.then_some(())
            })
            .await
            .unwrap_or_else(|e| {
                bed.dump_pod_logs(ns.name());
                panic!("{e}")
            });
            // Land the burst at a random point of the poll cycle.
            tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 5000)).await;
            let before = sink.ids().await.unwrap().len();
            let prefix = format!("{name}-r{round}");
            bed.produce_records(&topic, id_records(&prefix, 0..200, 50)).await.unwrap();
            let t0 = Instant::now();
            let mut r = Round::default();
            let deadline = t0 + Duration::from_secs(120);
            while r.first_record_s == 0.0 {
                let now = t0.elapsed().as_secs_f64();
                if r.replicas_changed_s == 0.0
                    && deployments
                        .get(&format!("{name}-worker"))
                        .await
                        .ok()
                        .and_then(|d| d.spec?.replicas)
                        .is_some_and(|n| n > 0)
                {
                    r.replicas_changed_s = now;
                }
                if r.pod_ready_s == 0.0 && first_pod_ready(&pods, &name).await {
                    r.pod_ready_s = now;
                }
                if sink.ids().await.map(|ids| ids.len() > before).unwrap_or(false) {
                    r.first_record_s = now;
                }
                assert!(Instant::now() < deadline, "{name} round {round}: no record delivered in 120 s: {r:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // Polling order can see the record before the Ready condition: never report a later pod start.
            if r.pod_ready_s == 0.0 || r.pod_ready_s > r.first_record_s {
                r.pod_ready_s = r.first_record_s;
            }
            println!("{name} round {}: {r:?}", round + 1);
            results.push(r);
        }
        let col = |f: fn(&Round) -> f64| -> (f64, f64) {
            let v: Vec<f64> = results.iter().map(f).collect();
            (median(&v), v.iter().copied().fold(0.0, f64::max))
        };
        let (rc, rc_max) = col(|r| r.replicas_changed_s);
        let (pr, _) = col(|r| r.pod_ready_s);
        let (fr, fr_max) = col(|r| r.first_record_s);
        let poll_s = poll.map_or(5.0, |p| p.trim_end_matches('s').parse().unwrap());
        let pod_start = median(&results.iter().map(|r| r.pod_ready_s - r.replicas_changed_s).collect::<Vec<_>>());
        let met = rc_max <= poll_s + 1.0 && fr <= poll_s + pod_start + 2.0;
        report.push_str(&format!(
            "| {label} | {rc:.2} s, {rc_max:.2} s | {pr:.2} s (pod start {pod_start:.2} s) | {fr:.2} s, {fr_max:.2} s \
             | {} |\n",
            if met { "met" } else { "**not met**" }
        ));
    }
    println!(
        "\n{rounds} rounds per poll interval, 200-record burst on 12 partitions, times from the burst acknowledged:\n"
    );
    println!("{report}");
    if let Ok(path) = std::env::var("KPIPE_BENCH_REPORT") {
        std::fs::write(
            &path,
            format!(
                "{rounds} rounds per poll interval; 200-record burst on 12 partitions; times \
            from the burst being acknowledged by the broker.\n\n{report}"
            ),
        )
        .unwrap();
    }
    ns.delete().await.unwrap();
}
