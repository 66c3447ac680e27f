//! Worker benchmark against the test bed's Kafka broker (see docs/BENCHMARKS.md):
//!
//! 1. a 12-partition topic with `KPIPE_BENCH_RECORDS` (default 2,000,000) × 100-byte records;
//! 2. a bare rdkafka `BaseConsumer` reading all of it (records/s from first to last record);
//! 3. the `kpipe-worker` binary with the noop processor on the same topic (records/s from the
//!    first to the last processed record, from its metrics) and its peak RSS while draining;
//! 4. the worker's RSS over time while draining `KPIPE_BENCH_MEMORY_RECORDS` (default 5,000,000) with noop;
//! 5. the worker with an HTTP handler that sleeps 20 ms per request, `key` ordering,
//!    concurrency 256, one record per request, on `KPIPE_BENCH_SLOW_RECORDS` (default 100,000).
//!
//! Run: `cargo bench -p kpipe-worker --bench worker` (bootstrap as for the integration tests).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::time::{Duration, Instant};

use common::*;
use support::*;

/// Returns (records/s, CPU µs per record) of the bare consumer.
fn bare_consumer(bootstrap: &str, topic: &str, n: u64) -> (f64, f64) {
    let run = bare_consume(bootstrap, topic, n);
    (n as f64 / run.active_s, run.cpu_s * 1e6 / n as f64)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let bootstrap = bootstrap();
    let n = env_u64("KPIPE_BENCH_RECORDS", 2_000_000);
    let slow_n = env_u64("KPIPE_BENCH_SLOW_RECORDS", 100_000);
    let only = std::env::var("KPIPE_BENCH_ONLY").unwrap_or_default();
    // Re-use a topic produced by an earlier run (it must hold exactly KPIPE_BENCH_RECORDS).
    let topic = match std::env::var("KPIPE_BENCH_TOPIC") {
        Ok(t) => t,
        Err(_) => filled_topic(&bootstrap, "bench", n, 100, Values::Padded).await,
    };

    let bare = if only.is_empty() || only == "bare" {
        let (b, topic) = (bootstrap.clone(), topic.clone());
        let (bare, cpu) = tokio::task::spawn_blocking(move || bare_consumer(&b, &topic, n)).await.unwrap();
        let hwm = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            })
            .unwrap_or(0.0);
        println!(
            "bare rdkafka BaseConsumer: {bare:.0} records/s, {cpu:.2} CPU-µs/record, peak RSS of the bench process {:.0} MiB",
            hwm / 1024.0
        );
        bare
    } else {
        f64::NAN
    };
    if only == "bare" {
        return;
    }

    if only.is_empty() || only == "noop" {
        let cfg = config(&bootstrap, "bench-noop", &topic, &unique("bench-noop"), noop_spec());
        let w = Worker::start("bench-noop", &cfg);
        let run = drive_worker(&w, n, Instant::now(), Duration::from_secs(600)).await;
        drop(w);
        let (noop, rss, cpu) = (run.rate, run.peak_rss_mib, run.cpu_s * 1e6 / n as f64);
        println!(
            "kpipe-worker noop: {noop:.0} records/s ({:.2}x bare), {cpu:.2} CPU-µs/record (whole process), peak RSS {rss:.0} MiB",
            noop / bare
        );
    }
    if only.is_empty() || only == "memory" {
        memory_over_time(&bootstrap, env_u64("KPIPE_BENCH_MEMORY_RECORDS", 5_000_000)).await;
    }
    if !(only.is_empty() || only == "slow") {
        return;
    }

    // Slow handler: 20 ms per request, one record per request, key ordering, 256 concurrent.
    let slow_topic = filled_topic(&bootstrap, "bench-slow", slow_n, 100, Values::Padded).await;
    let url = slow_handler().await;
    let cfg = config(
        &bootstrap,
        "bench-slow",
        &slow_topic,
        &unique("bench-slow"),
        serde_json::json!({
            "processor": {"http": {"url": url}},
            "ordering": "key",
            "concurrency": {"perPartition": 256, "perWorker": 256},
            "batch": {"maxRecords": 1},
            "onFailure": "drop"
        }),
    );
    let w = Worker::start("bench-slow", &cfg);
    let run = drive_worker(&w, slow_n, Instant::now(), Duration::from_secs(600)).await;
    let (slow, slow_rss) = (run.rate, run.peak_rss_mib);
    drop(w);
    let ideal = 256.0 / 0.020;
    println!(
        "kpipe-worker 20 ms handler, key ordering, concurrency 256, 1 record/request: {slow:.0} records/s \
         ({:.0}% of {ideal:.0}), peak RSS {slow_rss:.0} MiB",
        100.0 * slow / ideal
    );
}

/// RSS of a noop worker draining a large backlog, sampled about once a second (goal: flat, ≤ 128 MiB).
async fn memory_over_time(bootstrap: &str, n: u64) {
    let topic = filled_topic(bootstrap, "bench-memory", n, 100, Values::Padded).await;
    let cfg = config(bootstrap, "bench-memory", &topic, &unique("bench-memory"), noop_spec());
    let w = Worker::start("bench-memory", &cfg);
    let run = drive_worker(&w, n, Instant::now(), Duration::from_secs(900)).await;
    drop(w);
    println!(
        "kpipe-worker noop draining {n} records: {:.0} records/s, peak RSS {:.0} MiB; RSS over time \
         (s: MiB @ records processed):",
        run.rate, run.peak_rss_mib
    );
    let series: Vec<String> =
        run.rss_series.iter().map(|(t, mib, done)| format!("{t:.0}s: {mib:.0} MiB @ {:.1}M", done / 1e6)).collect();
    for line in series.chunks(6) {
        println!("  {}", line.join(" | "));
    }
}
