//! Side-by-side benchmark of the kpipe worker against what users would pick instead (docs/BENCHMARKS.md), on the
//! test bed's broker, one topic and one data set per comparison, contestants alternating round by round:
//!
//! * **Throughput ceiling** — 12 partitions, `KPIPE_BENCH_RECORDS` (2,000,000) × 100 B and
//!   `KPIPE_BENCH_RECORDS_1K` (1,000,000) × 1 KiB of padded ids (lz4 ≈ 100×), and `KPIPE_BENCH_RECORDS_1K_TEXT`
//!   (1,000,000) × 1 KiB of JSON-like text (`support::Values`), each 0 to skip it: a bare rdkafka `BaseConsumer` (in this process), `kcat` to
//!   /dev/null, Apache Kafka's `ConsumerPerformance`, the seed-style sarama consumer (one `ConsumePartition` per
//!   partition, one goroutine per record, auto-commit), a franz-go group consumer, and `kpipe-worker` with the noop
//!   processor and kpipe's own commits, and with the Kafka processor forwarding every record to a fresh 12-partition
//!   topic (idempotent producer, acks=all; the goal is ≥ 0.5× the noop rate).
//! * **Slow handler** — an HTTP handler taking 20 ms per request: kpipe in partition, key and unordered modes, one
//!   record per request and batched, vs the seed-style worker pool of 8 goroutines.
//!
//! Each contestant reads until it has handled its record count; rates are steady-state (first to last record),
//! "wall" adds start-up and group join, CPU is the whole process (user + system, from `getrusage` of the child).
//! The Go peers are built outside kpipe's dependency graph by `e2e/bench/build-peers.sh` (`KPIPE_PEERS_BIN`).
//!
//! Run: `e2e/bench/peers.sh` (= `make bench-peers`), which builds the peers and writes the report into
//! docs/BENCHMARKS.md; or by hand `KPIPE_PEERS_BIN=... cargo bench -p kpipe-worker --bench peers`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::resource::{UsageWho, getrusage};
use support::*;

/// One contestant's measurement in one round.
#[derive(Clone, Copy, Debug)]
struct Sample {
    records: u64,
    /// First to last record, seconds.
    active_s: f64,
    /// Process start (or consumer creation) to done, seconds.
    wall_s: f64,
    /// user + system CPU seconds of the contestant's process.
    cpu_s: f64,
}

/// CPU seconds used so far by this process's reaped children.
fn children_cpu_s() -> f64 {
    let u = getrusage(UsageWho::RUSAGE_CHILDREN).unwrap();
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    secs(u.user_time()) + secs(u.system_time())
}

fn run_rdkafka_bare(bootstrap: &str, topic: &str, n: u64) -> Sample {
    let run = bare_consume(bootstrap, topic, n);
    Sample { records: n, active_s: run.active_s, wall_s: run.wall_s, cpu_s: run.cpu_s }
}

/// kcat reading every partition from the beginning to its end, one newline per record (counted here).
fn run_kcat(bootstrap: &str, topic: &str, n: u64) -> Sample {
    let cpu0 = children_cpu_s();
    let started = Instant::now();
    let mut child = Command::new("kcat")
        .args(["-C", "-b", bootstrap, "-t", topic, "-o", "beginning", "-e", "-q", "-f", "\\n"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("kcat (Debian package kcat; e2e/bench/peers.sh installs it)");
    let mut out = child.stdout.take().unwrap();
    let (mut count, mut first, mut last) = (0u64, None, None);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let got = out.read(&mut buf).unwrap();
        if got == 0 {
            break;
        }
        let now = Instant::now();
        first.get_or_insert(now);
        count += buf[..got].iter().filter(|&&b| b == b'\n').count() as u64;
        if count >= n && last.is_none() {
            last = Some(now);
        }
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "kcat failed: {status}");
    assert_eq!(count, n, "kcat read {count} of {n}");
    Sample {
        records: n,
        active_s: last.unwrap().duration_since(first.unwrap()).as_secs_f64(),
        wall_s: last.unwrap().duration_since(started).as_secs_f64(),
        cpu_s: children_cpu_s() - cpu0,
    }
}

fn kafka_tool(name: &str) -> PathBuf {
    let run = std::env::var("KPIPE_RUN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/kpipe/run"));
    run.join("bin").join(name)
}

/// Apache Kafka's `ConsumerPerformance` (Java consumer, group, commits): its own fetch time excludes the join.
fn run_consumer_perf(bootstrap: &str, topic: &str, n: u64) -> Sample {
    let cpu0 = children_cpu_s();
    let started = Instant::now();
    let out = Command::new(kafka_tool("kafka-consumer-perf-test"))
        .args(["--bootstrap-server", bootstrap, "--topic", topic, "--messages", &n.to_string()])
        .args(["--group", &unique("peers-perf"), "--timeout", "60000"])
        .env("KAFKA_TOOL_HEAP", "-Xmx1g")
        .output()
        .expect("kafka-consumer-perf-test (written by e2e/testbed/up.sh)");
    let wall_s = started.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ConsumerPerformance failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    // A header line and a value line, comma separated.
    let mut lines = text.lines().filter(|l| l.contains(','));
    let (header, values) = (lines.next().unwrap_or_default(), lines.next().unwrap_or_default());
    let row: BTreeMap<&str, &str> = header.split(',').map(str::trim).zip(values.split(',').map(str::trim)).collect();
    let field = |k: &str| -> f64 {
        row.get(k).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no {k} in ConsumerPerformance output {text}"))
    };
    let records = field("data.consumed.in.nMsg") as u64;
    assert!(records >= n, "ConsumerPerformance read {records} of {n}");
    Sample { records: n, active_s: field("fetch.time.ms") / 1000.0, wall_s, cpu_s: children_cpu_s() - cpu0 }
}

/// A Go peer built by e2e/bench/build-peers.sh; prints one JSON line with its own timings.
fn run_go_peer(binary: &str, args: &[&str], n: u64) -> Sample {
    let dir =
        std::env::var("KPIPE_PEERS_BIN").expect("KPIPE_PEERS_BIN (run e2e/bench/peers.sh, which builds the peers)");
    let cpu0 = children_cpu_s();
    let out = Command::new(PathBuf::from(dir).join(binary))
        .args(args)
        .args(["-records", &n.to_string()])
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("{binary}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{binary} failed: {text}");
    let report: serde_json::Value =
        serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{binary}: {e}: {text}"));
    let get = |k: &str| report[k].as_f64().unwrap_or_else(|| panic!("{binary}: no {k} in {text}"));
    assert!(get("records") as u64 >= n, "{binary} handled {} of {n}", get("records"));
    Sample { records: n, active_s: get("first_to_last_s"), wall_s: get("wall_s"), cpu_s: children_cpu_s() - cpu0 }
}

/// `kpipe-worker` as its own process, followed through its metrics until `n` records are processed.
async fn run_kpipe(bootstrap: &str, topic: &str, n: u64, name: &str, spec: serde_json::Value) -> Sample {
    let cfg = config(bootstrap, name, topic, &unique(name), spec);
    let cpu0 = children_cpu_s();
    let started = Instant::now();
    let w = Worker::start(name, &cfg);
    let run = drive_worker(&w, n, started, Duration::from_secs(900)).await;
    drop(w); // kills and reaps it, so its CPU time shows up in RUSAGE_CHILDREN
    Sample { records: n, active_s: run.active_s, wall_s: run.wall_s, cpu_s: children_cpu_s() - cpu0 }
}

/// Results by contestant, in the order contestants were declared.
#[derive(Default)]
struct Table {
    order: Vec<String>,
    samples: BTreeMap<String, Vec<Sample>>,
}

impl Table {
    /// Records one round of `name` (a contestant declared in `order`).
    fn add(&mut self, name: &str, s: Sample) {
        println!(
            "  {name}: {} records, {:.0} rec/s (first→last {:.2}s, wall {:.2}s), {:.2} CPU-s",
            s.records,
            s.records as f64 / s.active_s,
            s.active_s,
            s.wall_s,
            s.cpu_s
        );
        self.samples.entry(name.to_owned()).or_default().push(s);
    }

    /// Median over the rounds of `f(sample)` (NaN when the contestant did not run).
    fn median_of(&self, name: &str, f: impl Fn(&Sample) -> f64) -> f64 {
        self.samples.get(name).map_or(f64::NAN, |v| median(&v.iter().map(f).collect::<Vec<_>>()))
    }

    /// Records ÷ (first → last record): the steady-state rate.
    fn steady(&self, name: &str) -> f64 {
        self.median_of(name, |s| s.records as f64 / s.active_s)
    }

    /// Records ÷ (process start → last record): the backlog drain rate, start-up and group join included.
    fn drain(&self, name: &str) -> f64 {
        self.median_of(name, |s| s.records as f64 / s.wall_s)
    }

    /// Markdown rows with `primary` (drain or steady rate) compared to `reference`.
    fn markdown(&self, value_bytes: usize, reference: &str, primary: fn(&Table, &str) -> f64) -> String {
        let mut md = format!(
            "| contestant | drain rec/s (start-up included) | steady rec/s (first → last record) | MB/s (drain) | \
             CPU-s per 1M records | vs {reference} | per round: drain / steady rec/s |\n\
             |---|---|---|---|---|---|---|\n"
        );
        let reference = primary(self, reference);
        for name in &self.order {
            let Some(samples) = self.samples.get(name) else { continue };
            let drain = self.drain(name);
            let cpu_per_m = self.median_of(name, |x| x.cpu_s * 1e6 / x.records as f64);
            let rounds: Vec<String> = samples
                .iter()
                .map(|x| format!("{:.0} / {:.0}", x.records as f64 / x.wall_s, x.records as f64 / x.active_s))
                .collect();
            let _ = writeln!(
                md,
                "| {name} | {drain:.0} | {:.0} | {:.1} | {cpu_per_m:.2} | {:.2}× | {} |",
                self.steady(name),
                drain * value_bytes as f64 / 1e6,
                primary(self, name) / reference,
                rounds.join("; ")
            );
        }
        md
    }
}

#[derive(Clone, Copy, Debug)]
enum Contestant {
    Bare,
    Kcat,
    ConsumerPerf,
    Seed,
    Franz,
    KpipeNoop,
    /// The forwarding ceiling: a bare rdkafka consumer handing every record to a bare producer (idempotent,
    /// acks=all) without waiting record by record ([`support::bare_forward`]).
    BareForward,
    /// kpipe's Kafka processor forwarding every record to a 12-partition topic (idempotent producer, acks=all, a
    /// record done only when the broker acknowledged its copy), with its default concurrency (perPartition 1024,
    /// perWorker 8192).
    KpipeForward,
    /// The same with `concurrency` {perPartition 32, perWorker 256}, the defaults of the other processors and of
    /// every processor before 2026-11-30: they bound a forwarder to perWorker ÷ a produce round trip, whatever the
    /// CPU. (Named `kpipeforwardwide` in `KPIPE_BENCH_CONTESTANTS`, as before.)
    KpipeForwardWide,
}

impl Contestant {
    fn name(self) -> &'static str {
        match self {
            Contestant::Bare => "bare rdkafka BaseConsumer",
            Contestant::Kcat => "kcat -C -e (to /dev/null)",
            Contestant::ConsumerPerf => "Kafka ConsumerPerformance (Java)",
            Contestant::Seed => "seed-style sarama (goroutine per record)",
            Contestant::Franz => "franz-go group consumer",
            Contestant::KpipeNoop => "kpipe-worker noop",
            Contestant::BareForward => "bare rdkafka consumer → producer (acks=all, idempotent)",
            Contestant::KpipeForward => "kpipe-worker kafka forwarder (acks=all, idempotent)",
            Contestant::KpipeForwardWide => "kpipe-worker kafka forwarder, perWorker 256 (http's default)",
        }
    }
}

async fn throughput(bootstrap: &str, n: u64, value_bytes: usize, values: Values, rounds: usize, report: &mut String) {
    println!("== throughput: {n} × {value_bytes} B, {} values", values.label());
    // The padded data sets keep their old topic names (`peers-100b-…`, `peers-1024b-…`) for earlier notes' commands.
    let prefix = match values {
        Values::Padded => format!("peers-{value_bytes}b"),
        Values::Text => format!("peers-{value_bytes}b-text"),
    };
    let topic = filled_topic(bootstrap, &prefix, n, value_bytes, values).await;
    let all = [
        Contestant::Bare,
        Contestant::Kcat,
        Contestant::ConsumerPerf,
        Contestant::Seed,
        Contestant::Franz,
        Contestant::KpipeNoop,
        Contestant::BareForward,
        Contestant::KpipeForward,
        Contestant::KpipeForwardWide,
    ];
    // KPIPE_BENCH_CONTESTANTS=bare,kpipe,... runs a subset (for profiling); default all.
    let pick = std::env::var("KPIPE_BENCH_CONTESTANTS").unwrap_or_default();
    let all: Vec<Contestant> = all
        .into_iter()
        .filter(|c| pick.is_empty() || pick.split(',').any(|p| format!("{c:?}").eq_ignore_ascii_case(p.trim())))
        .collect();
    let mut table = Table::default();
    for c in &all {
        table.order.push(c.name().to_owned());
    }
    for round in 0..rounds {
        println!("-- round {} of {rounds}", round + 1);
        // Rotate the order every round so no contestant always runs first (cold page cache) or last.
        for i in 0..all.len() {
            let c = all[(i + round) % all.len()];
            let (b, t) = (bootstrap.to_owned(), topic.clone());
            let sample = match c {
                Contestant::Bare => tokio::task::spawn_blocking(move || run_rdkafka_bare(&b, &t, n)).await.unwrap(),
                Contestant::Kcat => tokio::task::spawn_blocking(move || run_kcat(&b, &t, n)).await.unwrap(),
                Contestant::ConsumerPerf => {
                    tokio::task::spawn_blocking(move || run_consumer_perf(&b, &t, n)).await.unwrap()
                }
                Contestant::Seed => tokio::task::spawn_blocking(move || {
                    run_go_peer("kpipe-peer-seed", &["-brokers", &b, "-topic", &t, "-mode", "noop"], n)
                })
                .await
                .unwrap(),
                Contestant::Franz => tokio::task::spawn_blocking(move || {
                    let group = unique("peers-franz");
                    run_go_peer("kpipe-peer-franz", &["-brokers", &b, "-topic", &t, "-group", &group], n)
                })
                .await
                .unwrap(),
                Contestant::KpipeNoop => run_kpipe(&b, &t, n, "peers-noop", noop_spec()).await,
                Contestant::BareForward => {
                    let out = unique(&format!("peers-bare-forward-{value_bytes}b"));
                    create_topic(&b, &out, 12).await;
                    let run = tokio::task::spawn_blocking(move || bare_forward(&b, &t, &out, n)).await.unwrap();
                    Sample { records: n, active_s: run.active_s, wall_s: run.wall_s, cpu_s: run.cpu_s }
                }
                Contestant::KpipeForward | Contestant::KpipeForwardWide => {
                    // A fresh output topic each round, so every round writes the same amount to an empty log.
                    let out = unique(&format!("peers-forward-{value_bytes}b"));
                    create_topic(&b, &out, 12).await;
                    let mut spec = serde_json::json!({"processor": {"kafka": {"topic": out}}, "onFailure": "drop"});
                    if matches!(c, Contestant::KpipeForwardWide) {
                        spec["concurrency"] = serde_json::json!({"perPartition": 32, "perWorker": 256});
                    }
                    run_kpipe(&b, &t, n, "peers-forward", spec).await
                }
            };
            table.add(c.name(), sample);
        }
    }
    let kpipe = table.drain(Contestant::KpipeNoop.name());
    let forward = table.drain(Contestant::KpipeForward.name());
    let forward_wide = table.drain(Contestant::KpipeForwardWide.name());
    let bare_forward = table.drain(Contestant::BareForward.name());
    let _ = writeln!(
        report,
        "#### Throughput ceiling — {n} × {value_bytes} B{}, 12 partitions, lz4 ({rounds} rounds, order rotated \
         each round)\n\n{}\nDrain rate (records ÷ time from process start to the last record) is the headline: the \
         steady rate depends on how each client batches its first fetch (franz-go receives a large part of the topic \
         in its first fetch, so its first → last time is tiny). Drain-rate ratios: kpipe noop / bare rdkafka = \
         **{:.2}×**; kpipe noop / seed-style sarama = **{:.2}×**; kpipe noop / franz-go = **{:.2}×**; kpipe noop / \
         kcat = **{:.2}×**; kpipe noop / ConsumerPerformance = **{:.2}×**; kpipe forwarder / kpipe noop = \
         **{:.2}×** with its default concurrency (goal ≥ 0.5×), **{:.2}×** with perWorker 256; bare forwarder / bare \
         rdkafka = **{:.2}×**, kpipe forwarder / bare forwarder = **{:.2}×**.\n",
        match values {
            Values::Padded => "",
            Values::Text => " of JSON-like text",
        },
        table.markdown(value_bytes, Contestant::Bare.name(), Table::drain),
        kpipe / table.drain(Contestant::Bare.name()),
        kpipe / table.drain(Contestant::Seed.name()),
        kpipe / table.drain(Contestant::Franz.name()),
        kpipe / table.drain(Contestant::Kcat.name()),
        kpipe / table.drain(Contestant::ConsumerPerf.name()),
        forward / kpipe,
        forward_wide / kpipe,
        bare_forward / table.drain(Contestant::Bare.name()),
        forward / bare_forward,
    );
}

async fn slow(bootstrap: &str, n: u64, seconds: f64, rounds: usize, report: &mut String) {
    let topic = filled_topic(bootstrap, "peers-slow", n, 100, Values::Padded).await;
    let url = slow_handler().await;
    println!("== slow handler (20 ms per request): {n} records on {topic}, handler {url}");
    // (name, ideal records/s, kpipe spec or None for the seed pool). The ideal is records in flight ÷ 20 ms, and kpipe's
    // concurrency limits count records, not requests: partition ordering keeps one batch per partition in flight
    // (12 records, or min(12 × 100, perWorker 256) batched); key and unordered keep up to perWorker = 256. Each
    // contestant reads about `seconds` worth of its ideal rate (capped at the topic size).
    let per_record = serde_json::json!({"maxRecords": 1});
    let batched = serde_json::json!({"maxRecords": 100, "maxWait": "20ms"});
    let wide = serde_json::json!({"perPartition": 256, "perWorker": 256});
    let kpipe = |ordering: &str, batch: &serde_json::Value| {
        Some(serde_json::json!({
            "processor": {"http": {"url": url}},
            "ordering": ordering,
            "concurrency": wide,
            "batch": batch,
            "onFailure": "drop"
        }))
    };
    let contestants: Vec<(&str, f64, Option<serde_json::Value>)> = vec![
        ("kpipe partition, 1 record/request", 12.0 / 0.02, kpipe("partition", &per_record)),
        ("kpipe partition, batches of ≤100", 256.0 / 0.02, kpipe("partition", &batched)),
        ("kpipe key, 1 record/request, concurrency 256", 256.0 / 0.02, kpipe("key", &per_record)),
        ("kpipe key, batches of ≤100, concurrency 256", 256.0 / 0.02, kpipe("key", &batched)),
        ("kpipe unordered, 1 record/request, concurrency 256", 256.0 / 0.02, kpipe("unordered", &per_record)),
        ("kpipe unordered, batches of ≤100, concurrency 256", 256.0 / 0.02, kpipe("unordered", &batched)),
        ("seed-style sarama, pool of 8 goroutines, 1 record/request", 8.0 / 0.02, None),
    ];
    let mut table = Table::default();
    for c in &contestants {
        table.order.push(c.0.to_owned());
    }
    for round in 0..rounds {
        println!("-- round {} of {rounds}", round + 1);
        for i in 0..contestants.len() {
            let (name, ideal, spec) = &contestants[(i + round) % contestants.len()];
            let records = ((ideal * seconds) as u64).clamp(1_000, n);
            let sample = match spec {
                Some(spec) => run_kpipe(bootstrap, &topic, records, "peers-slow", spec.clone()).await,
                None => {
                    let (b, t, u) = (bootstrap.to_owned(), topic.clone(), url.clone());
                    tokio::task::spawn_blocking(move || {
                        let args = ["-brokers", &b, "-topic", &t, "-mode", "http", "-url", &u, "-pool", "8"];
                        run_go_peer("kpipe-peer-seed", &args, records)
                    })
                    .await
                    .unwrap()
                }
            };
            table.add(name, sample);
        }
    }
    let mut ideal_rows = String::new();
    for (name, ideal, _) in &contestants {
        let _ = writeln!(
            ideal_rows,
            "- {name}: {:.0} rec/s = **{:.0} %** of its ideal {ideal:.0} rec/s",
            table.steady(name),
            100.0 * table.steady(name) / ideal
        );
    }
    let seed = contestants.last().unwrap().0;
    let _ = writeln!(
        report,
        "#### Slow handler — 20 ms per request, {n}-record topic, 12 partitions ({rounds} rounds, order rotated)\n\n\
         Each contestant reads about {seconds:.0} s worth of its ideal rate (at least 1,000 records, at most the \
         topic). The ratio column compares steady rates with the seed-style pool; CPU-s per 1M records shows what \
         batching saves.\n\n{}\n{ideal_rows}",
        table.markdown(100, seed, Table::steady),
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let bootstrap = bootstrap();
    let rounds = env_u64("KPIPE_BENCH_ROUNDS", 3) as usize;
    let only = std::env::var("KPIPE_BENCH_ONLY").unwrap_or_default();
    let mut report = String::new();
    if only.is_empty() || only == "throughput" {
        // A record count of 0 skips that data set.
        for (n, value_bytes, values) in [
            (env_u64("KPIPE_BENCH_RECORDS", 2_000_000), 100, Values::Padded),
            (env_u64("KPIPE_BENCH_RECORDS_1K", 1_000_000), 1024, Values::Padded),
            (env_u64("KPIPE_BENCH_RECORDS_1K_TEXT", 1_000_000), 1024, Values::Text),
        ] {
            if n > 0 {
                throughput(&bootstrap, n, value_bytes, values, rounds, &mut report).await;
            }
        }
    }
    if only.is_empty() || only == "slow" {
        let n = env_u64("KPIPE_BENCH_SLOW_RECORDS", 200_000);
        slow(&bootstrap, n, env_u64("KPIPE_BENCH_SLOW_SECONDS", 10) as f64, rounds, &mut report).await;
    }
    println!("\n{report}");
    if let Ok(path) = std::env::var("KPIPE_BENCH_REPORT") {
        std::fs::write(&path, &report).unwrap_or_else(|e| panic!("write {path}: {e}"));
    }
}
