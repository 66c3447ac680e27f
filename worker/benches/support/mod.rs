//! Pieces shared by the worker benchmarks (`benches/worker.rs`, `benches/peers.rs`): filling a topic, reading a
//! process's CPU time and RSS, and following a running `kpipe-worker` through its metrics.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Message};

use crate::common::{Worker, metric, unique};

pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// What a benchmark record's value holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Values {
    /// The record's id in decimal, padded with `x`: lz4 compresses a 1 KiB value about 100× (librdkafka then grows
    /// its decompression buffer several times per batch, docs/BENCHMARKS.md).
    Padded,
    /// JSON-like event text: field names, words of a 128-word vocabulary (16 nouns × 8 verbs) and random numbers
    /// (seeded, so every run produces the same bytes). lz4 compresses 1 KiB values of it about 2.6× (`lz4 -1` on
    /// 3 MB of them), within the 2–4× it achieves on JSON events, and below the 4× librdkafka's decompression
    /// buffer starts at.
    Text,
}

impl Values {
    /// The label in topic names and report headings (`padded`, `text`).
    pub fn label(self) -> &'static str {
        match self {
            Values::Padded => "padded",
            Values::Text => "text",
        }
    }
}

/// Fills `value` (its length is the value size) for record `id` as `values` says; `rng` feeds [`Values::Text`].
fn fill_value(value: &mut [u8], id: u64, values: Values, rng: &mut rand::rngs::StdRng) {
    use rand::Rng;
    use std::io::Write;
    const WORDS: [&str; 16] = [
        "checkout",
        "payment",
        "session",
        "warehouse",
        "shipment",
        "customer",
        "invoice",
        "refund",
        "cart",
        "login",
        "search",
        "review",
        "coupon",
        "address",
        "inventory",
        "delivery",
    ];
    const SUFFIXES: [&str; 8] = ["created", "updated", "failed", "started", "completed", "queued", "retried", "closed"];
    match values {
        Values::Padded => {
            value.fill(b'x');
            let digits = id.to_string();
            let n = digits.len().min(value.len());
            value[..n].copy_from_slice(&digits.as_bytes()[..n]);
        }
        Values::Text => {
            let len = value.len();
            let mut out = std::io::Cursor::new(&mut value[..]);
            let word = |rng: &mut rand::rngs::StdRng| {
                format!("{}_{}", WORDS[rng.random_range(0..WORDS.len())], SUFFIXES[rng.random_range(0..SUFFIXES.len())])
            };
            let _ = write!(
                out,
                "{{\"id\":{id},\"type\":\"{}\",\"user\":\"u-{}\",\"amount\":{}.{:02},\"ts\":{},\"notes\":[",
                word(rng),
                rng.random_range(0..1_000_000u32),
                rng.random_range(0..100_000u32),
                rng.random_range(0..100u32),
                1_764_547_200_000u64 + id * 7 + rng.random_range(0..1_000u64),
            );
            // Words and numbers until the value is full; the write stops at its end.
            while (out.position() as usize) < len {
                let _ = write!(out, "\"{} {} {}\",", word(rng), rng.random_range(0..10_000u32), word(rng));
            }
        }
    }
}

/// Produces `n` records of `value_bytes` bytes (see [`Values`]), keyed `key-<id % keys>`, lz4, and waits for every
/// acknowledgement. Returns how long it took.
pub fn produce_fixed(bootstrap: &str, topic: &str, n: u64, keys: u64, value_bytes: usize, values: Values) -> Duration {
    use rand::SeedableRng;
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "1000000")
        .set("compression.type", "lz4")
        .create()
        .unwrap();
    let started = Instant::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let mut payload = vec![b'x'; value_bytes.max(20)];
    for id in 0..n {
        let key = format!("key-{}", id % keys);
        fill_value(&mut payload, id, values, &mut rng);
        loop {
            match producer.send(BaseRecord::to(topic).key(&key).payload(&payload[..])) {
                Ok(()) => break,
                Err((_, _)) => {
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
        if id % 10_000 == 0 {
            producer.poll(Duration::ZERO);
        }
    }
    producer.flush(Duration::from_secs(300)).unwrap();
    started.elapsed()
}

/// A new 12-partition topic named after `prefix`, filled with `n` records of `value_bytes` bytes (see
/// [`produce_fixed`]); prints how long producing took.
pub async fn filled_topic(bootstrap: &str, prefix: &str, n: u64, value_bytes: usize, values: Values) -> String {
    let topic = unique(prefix);
    crate::common::create_topic(bootstrap, &topic, 12).await;
    let (b, t) = (bootstrap.to_owned(), topic.clone());
    let took =
        tokio::task::spawn_blocking(move || produce_fixed(&b, &t, n, 10_000, value_bytes, values)).await.unwrap();
    println!(
        "produced {n} × {value_bytes} B {} records to {topic} (12 partitions, lz4) in {:.1}s",
        values.label(),
        took.as_secs_f64()
    );
    topic
}

/// The spec of a noop pipeline (kpipe's own commits, nothing else).
pub fn noop_spec() -> serde_json::Value {
    let mut spec = serde_json::json!({"processor": {"noop": {}}, "onFailure": "drop"});
    // KPIPE_BENCH_UNCOMMITTED sets concurrency.uncommittedPerPartition (the default otherwise).
    if let Some(n) = std::env::var("KPIPE_BENCH_UNCOMMITTED").ok().and_then(|v| v.parse::<u64>().ok()) {
        spec["concurrency"] = serde_json::json!({"uncommittedPerPartition": n});
    }
    spec
}

/// user+system CPU seconds of a process (`self` or a pid), from /proc/<pid>/stat.
pub fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// What following a worker to `n` processed records measured.
pub struct WorkerRun {
    /// records/s between the first and the last observed progress.
    pub rate: f64,
    /// Seconds from the first to the last observed progress.
    pub active_s: f64,
    /// Seconds from `started` (the process start) until `n` records were processed.
    pub wall_s: f64,
    pub peak_rss_mib: f64,
    /// user+system CPU seconds of the whole worker process so far.
    pub cpu_s: f64,
    /// (seconds since `started`, RSS MiB, records processed) about once a second.
    pub rss_series: Vec<(f64, f64, f64)>,
}

/// Polls the worker's metrics (every 20 ms) until `n` records are processed.
pub async fn drive_worker(w: &Worker, n: u64, started: Instant, timeout: Duration) -> WorkerRun {
    let deadline = Instant::now() + timeout;
    let mut first: Option<(Instant, f64)> = None;
    let mut peak_rss = 0u64;
    let mut rss_series: Vec<(f64, f64, f64)> = Vec::new();
    loop {
        let m = w.metrics().await;
        let processed = metric(&m, "kpipe_worker_records_processed_total").unwrap_or(0.0);
        let rss = rss_kib(w.child.id());
        peak_rss = peak_rss.max(rss);
        let now = Instant::now();
        let since_start = now.duration_since(started).as_secs_f64();
        if rss_series.last().is_none_or(|last| since_start - last.0 >= 1.0) {
            rss_series.push((since_start, rss as f64 / 1024.0, processed));
        }
        if processed > 0.0 && first.is_none() {
            // The first sample already includes some records; count the rate from there.
            first = Some((now, processed));
        }
        if processed >= n as f64 {
            let commits = metric(&m, "kpipe_worker_commit_duration_seconds_count").unwrap_or(0.0);
            let commit_s = metric(&m, "kpipe_worker_commit_duration_seconds_sum").unwrap_or(0.0);
            println!(
                "  worker commits: {commits:.0}, mean round trip {:.1} ms; waits at concurrency.uncommittedPerPartition: {:.0}",
                1e3 * commit_s / commits.max(1.0),
                metric(&m, "kpipe_worker_commit_waits_total").unwrap_or(0.0)
            );
            let (t0, p0) = first.unwrap();
            let active_s = now.duration_since(t0).as_secs_f64().max(1e-3);
            return WorkerRun {
                rate: (processed - p0) / active_s,
                active_s,
                wall_s: now.duration_since(started).as_secs_f64(),
                peak_rss_mib: peak_rss as f64 / 1024.0,
                cpu_s: cpu_seconds(&w.child.id().to_string()),
                rss_series,
            };
        }
        assert!(now < deadline, "worker processed {processed} of {n} in {timeout:?}; log {}", w.log.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Median of a non-empty sample (NaN when empty).
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 { v[mid] } else { (v[mid - 1] + v[mid]) / 2.0 }
}

/// What a bare librdkafka consumer reading a whole topic measured.
pub struct BareRun {
    /// First to last record, seconds.
    pub active_s: f64,
    /// Consumer creation to the last record, seconds.
    pub wall_s: f64,
    /// user+system CPU seconds this process spent meanwhile.
    pub cpu_s: f64,
}

/// A group consumer in a fresh group (`group` prefix) with the librdkafka tuning the worker applies, reading from the
/// earliest offset with auto-commit.
fn bare_consumer(bootstrap: &str, group: &str) -> BaseConsumer {
    let mut config = ClientConfig::new();
    for (k, v) in kpipe_worker::kafka_config::CONSUMER_TUNING {
        config.set(*k, *v);
    }
    config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique(group))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set_log_level(rdkafka::config::RDKafkaLogLevel::Warning)
        .create()
        .unwrap()
}

/// The ceiling kpipe is measured against: a `BaseConsumer` poll loop with the same librdkafka tuning the worker
/// applies, counting `n` records of `topic` from the beginning (group join included in `wall_s`).
pub fn bare_consume(bootstrap: &str, topic: &str, n: u64) -> BareRun {
    let cpu0 = cpu_seconds("self");
    let started = Instant::now();
    let consumer = bare_consumer(bootstrap, "bench-bare");
    consumer.subscribe(&[topic]).unwrap();
    let (mut count, mut bytes, mut first) = (0u64, 0usize, None);
    let deadline = Instant::now() + Duration::from_secs(600);
    while count < n && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            first.get_or_insert_with(Instant::now);
            bytes += m.payload_len();
            count += 1;
        }
    }
    assert_eq!(count, n, "bare consumer read {count} of {n}");
    std::hint::black_box(bytes);
    let run = BareRun {
        active_s: first.map(|f| f.elapsed()).unwrap_or_default().as_secs_f64(),
        wall_s: started.elapsed().as_secs_f64(),
        cpu_s: 0.0,
    };
    drop(consumer);
    BareRun { cpu_s: cpu_seconds("self") - cpu0, ..run }
}

/// The forwarding ceiling: a `BaseConsumer` poll loop (the worker's librdkafka tuning, auto-commit) handing every
/// record of `topic` to a `BaseProducer` for `out` (idempotent, acks=all, librdkafka's default linger) without
/// waiting for acknowledgements record by record; done when all `n` are acknowledged (`flush`). No ordering, retry
/// or commit guarantee beyond librdkafka's own: what the client library and the broker allow on this machine.
pub fn bare_forward(bootstrap: &str, topic: &str, out: &str, n: u64) -> BareRun {
    let cpu0 = cpu_seconds("self");
    let started = Instant::now();
    let consumer = bare_consumer(bootstrap, "bench-bare-forward");
    let delivered = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let producer: BaseProducer<DeliveryCounter> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("queue.buffering.max.messages", "1000000")
        .create_with_context(DeliveryCounter(delivered.clone()))
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let (mut count, mut first) = (0u64, None);
    let deadline = Instant::now() + Duration::from_secs(600);
    while count < n && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            first.get_or_insert_with(Instant::now);
            let mut record = BaseRecord::to(out).payload(m.payload().unwrap_or_default());
            if let Some(k) = m.key() {
                record = record.key(k);
            }
            if let Some(ts) = m.timestamp().to_millis() {
                record = record.timestamp(ts);
            }
            let mut record = Some(record);
            while let Some(r) = record.take() {
                if let Err((_, r)) = producer.send(r) {
                    producer.poll(Duration::from_millis(1));
                    record = Some(r);
                }
            }
            count += 1;
            if count % 1024 == 0 {
                producer.poll(Duration::ZERO);
            }
        }
    }
    assert_eq!(count, n, "bare forwarder read {count} of {n}");
    producer.flush(Duration::from_secs(120)).unwrap();
    let done = delivered.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(done, n, "bare forwarder had {done} of {n} acknowledged");
    let run = BareRun {
        active_s: first.map(|f| f.elapsed()).unwrap_or_default().as_secs_f64(),
        wall_s: started.elapsed().as_secs_f64(),
        cpu_s: 0.0,
    };
    drop(consumer);
    drop(producer);
    BareRun { cpu_s: cpu_seconds("self") - cpu0, ..run }
}

/// Counts acknowledged deliveries (failures are not counted, so a shortfall shows in [`bare_forward`]'s check).
pub struct DeliveryCounter(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl rdkafka::ClientContext for DeliveryCounter {}

impl rdkafka::producer::ProducerContext for DeliveryCounter {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &rdkafka::message::DeliveryResult<'_>, _: ()) {
        if result.is_ok() {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Serves an HTTP handler that takes 20 ms per request whatever it carries (a kpipe batch or one record); returns
/// its URL.
pub async fn slow_handler() -> String {
    let app = axum::Router::new().route(
        "/records",
        axum::routing::post(|| async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            ""
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/records", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}
