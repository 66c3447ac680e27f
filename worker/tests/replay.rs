//! Replay mode against the test bed's real Kafka broker and a real HTTP endpoint (issue #16): a pipeline
//! dead-letters 1 % poison records (the endpoint answers 400 to them); the endpoint is "fixed" (one record still
//! fails) and a replay worker (`KPIPE_REPLAY_PLAN`) re-processes the dead letters: every one reaches the endpoint
//! exactly as the original record (key, value, headers, coordinates) with `kpipe.replay` added, the one that fails
//! again is parked with the replay's context (never written to the dead-letter topic again), the progress in the
//! replay group's commit metadata has the right counts, running the replay again delivers nothing, and a replay
//! killed mid-way (SIGKILL) resumes and finishes with exact counts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::*;
use kpipe_api::replay::{Progress, ReplayPlan, Selection, decode_progress};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// The endpoint (the shared in-process sink): keeps every record it accepts and answers 400 to batches holding a
/// record whose value is in `poison`, optionally slowly.
async fn endpoint(poison: BTreeSet<String>, delay: Duration) -> (String, HttpSink) {
    let sink =
        HttpSink::start(SinkBehavior { poison: poison.into_iter().collect(), delay, ..Default::default() }).await;
    (sink.url(), sink)
}

/// 1,000 records with keys and headers; every hundredth (`p007`, `p107`, ...) is poison.
async fn produce_source(bootstrap: &str, topic: &str) -> BTreeSet<String> {
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", bootstrap).create().unwrap();
    let mut poison = BTreeSet::new();
    for i in 0..1000u32 {
        let value = if i % 100 == 7 { format!("p{i:03}") } else { format!("ok{i:03}") };
        if value.starts_with('p') {
            poison.insert(value.clone());
        }
        let trace = format!("trace-{i}");
        let headers = OwnedHeaders::new()
            .insert(Header { key: "trace", value: Some(&trace) })
            .insert(Header { key: "flag", value: None::<&[u8]> });
        let key = format!("key-{}", i % 7);
        producer
            .send(FutureRecord::to(topic).key(&key).payload(&value).headers(headers), Duration::from_secs(30))
            .await
            .unwrap();
    }
    poison
}

fn end_offsets(bootstrap: &str, topic: &str) -> BTreeMap<i32, i64> {
    let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", bootstrap).create().unwrap();
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    md.topics()[0]
        .partitions()
        .iter()
        .map(|p| (p.id(), c.fetch_watermarks(topic, p.id(), Duration::from_secs(10)).unwrap().1))
        .collect()
}

fn progress(bootstrap: &str, group: &str, topic: &str, partitions: &[i32]) -> Progress {
    let c: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", bootstrap).set("group.id", group).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition(topic, *p);
    }
    let committed = c.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    committed
        .elements()
        .iter()
        .filter(|e| matches!(e.offset(), Offset::Offset(_)))
        .filter_map(|e| decode_progress(e.metadata()))
        .fold(Progress::default(), Progress::plus)
}

struct Setup {
    bootstrap: String,
    name: String,
    dlq: String,
    parking: String,
    poison: BTreeSet<String>,
    /// Pipeline config for the replay (the endpoint's URL is set per run).
    config: serde_json::Value,
}

/// Runs a pipeline until its 10 poison records are dead-lettered, then stops it.
async fn dead_lettered(prefix: &str) -> Setup {
    let bootstrap = bootstrap();
    let name = unique(prefix);
    let (src, dlq, parking) = (format!("{name}-src"), format!("{name}-dlq"), format!("{name}-parked"));
    create_topic(&bootstrap, &src, 2).await;
    create_topic(&bootstrap, &dlq, 2).await;
    create_topic(&bootstrap, &parking, 1).await;
    let poison = produce_source(&bootstrap, &src).await;
    let (url, seen) = endpoint(poison.clone(), Duration::ZERO).await;
    let spec = |url: &str| {
        serde_json::json!({
            "processor": {"http": {"url": url, "timeout": "5s"}},
            "deadLetter": {"topic": dlq},
            "batch": {"maxRecords": 1},
            "retry": {"maxAttempts": 2, "initialBackoff": "10ms", "maxBackoff": "20ms"},
        })
    };
    let pipeline = config(&bootstrap, &name, &src, &format!("{name}-group"), spec(&url));
    let mut w = Worker::start(&name, &pipeline);
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen.records().len() < 990 || end_offsets(&bootstrap, &dlq).values().sum::<i64>() < 10 {
        assert!(Instant::now() < deadline, "pipeline did not finish; log {}", w.log.display());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    w.signal(15);
    w.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(end_offsets(&bootstrap, &dlq).values().sum::<i64>(), 10, "1 % of 1,000 dead-lettered");
    let replay_config = config(&bootstrap, &name, &src, &format!("{name}-group"), spec("http://unset"));
    Setup { bootstrap, name, dlq, parking, poison, config: replay_config }
}

fn plan(s: &Setup, replay: &str) -> ReplayPlan {
    ReplayPlan {
        replay: format!("test/{replay}"),
        dead_letter_topic: s.dlq.clone(),
        parking_topic: s.parking.clone(),
        group_id: format!("{}-{replay}", s.name),
        end_offsets: end_offsets(&s.bootstrap, &s.dlq),
        selection: Selection { pipeline: s.name.clone(), ..Default::default() },
    }
}

fn replay_worker(s: &Setup, url: &str, plan: &ReplayPlan) -> Worker {
    let mut config = s.config.clone();
    config["spec"]["processor"]["http"]["url"] = serde_json::json!(url);
    Worker::start_with_env(
        &format!("{}-replay", s.name),
        &config,
        &[("KPIPE_REPLAY_PLAN", &serde_json::to_string(plan).unwrap())],
    )
}

fn header(r: &serde_json::Value, key: &str) -> Option<String> {
    r["headers"]
        .as_array()?
        .iter()
        .find(|h| h["key"] == key)
        .map(|h| h["value"].as_str().unwrap_or("<none>").to_string())
}

#[tokio::test]
async fn kafka_replay_delivers_originals_parks_what_fails_again_and_is_idempotent() {
    let s = dead_lettered("replay").await;
    // The sink is fixed, except for one record that still fails.
    let still_bad = "p507".to_string();
    let (url, seen) = endpoint(BTreeSet::from([still_bad.clone()]), Duration::ZERO).await;
    let plan = plan(&s, "r1");
    let mut w = replay_worker(&s, &url, &plan);
    assert_eq!(w.wait_exit(Duration::from_secs(120)).await, Some(0), "replay exit; log {}", w.log.display());

    let got = seen.records();
    let values: Vec<&str> = got.iter().map(|r| r["value"].as_str().unwrap()).collect();
    let expected: BTreeSet<&str> = s.poison.iter().map(String::as_str).filter(|v| *v != still_bad).collect();
    assert_eq!(values.len(), 9, "each replayed once: {values:?}");
    assert_eq!(values.iter().copied().collect::<BTreeSet<_>>(), expected);
    for r in &got {
        let v = r["value"].as_str().unwrap();
        let i: u32 = v[1..].parse().unwrap();
        assert_eq!(r["key"], format!("key-{}", i % 7), "original key");
        assert_eq!(header(r, "trace").as_deref(), Some(format!("trace-{i}").as_str()), "original header");
        assert_eq!(header(r, "flag").as_deref(), Some("<none>"), "original header without a value");
        assert_eq!(header(r, "kpipe.replay").as_deref(), Some("test/r1"));
        let keys: Vec<&str> = r["headers"].as_array().unwrap().iter().map(|h| h["key"].as_str().unwrap()).collect();
        assert_eq!(keys, ["trace", "flag", "kpipe.replay"], "context headers stripped, order kept");
        assert!(r["topic"].as_str().unwrap().ends_with("-src"), "original coordinates: {r}");
        assert!(r["offset"].as_i64().unwrap() >= 0 && r["timestamp"].as_i64().is_some());
    }
    let parked = read_topic(&s.bootstrap, &s.parking, 1, Duration::from_secs(20));
    assert_eq!(parked.len(), 1);
    let p = &parked[0];
    assert_eq!(p.value, still_bad);
    assert_eq!(p.headers.get("kpipe.replay").map(String::as_str), Some("test/r1"));
    assert_eq!(p.headers.get("kpipe.replay.error.class").map(String::as_str), Some("http_400"));
    assert_eq!(p.headers.get("kpipe.error.class").map(String::as_str), Some("http_400"), "dead letter's own context");
    assert_eq!(p.headers.get("trace").map(String::as_str), Some("trace-507"));
    assert_eq!(end_offsets(&s.bootstrap, &s.dlq).values().sum::<i64>(), 10, "nothing written back to the DLQ");
    let parts: Vec<i32> = plan.end_offsets.keys().copied().collect();
    assert_eq!(
        progress(&s.bootstrap, &plan.group_id, &s.dlq, &parts),
        Progress { replayed: 10, succeeded: 9, failed_again: 1, skipped: 0 }
    );

    // The same replay again: its group is at the end, nothing is delivered or parked twice.
    let mut again = replay_worker(&s, &url, &plan);
    assert_eq!(again.wait_exit(Duration::from_secs(60)).await, Some(0));
    assert_eq!(seen.records().len(), 9, "re-running delivered something again");
    assert_eq!(read_topic(&s.bootstrap, &s.parking, 2, Duration::from_secs(3)).len(), 1);
}

#[tokio::test]
async fn kafka_replay_killed_midway_resumes_and_finishes_with_exact_counts() {
    let s = dead_lettered("replaykill").await;
    let (url, seen) = endpoint(BTreeSet::new(), Duration::from_millis(400)).await;
    let plan = plan(&s, "r2");
    let mut w = replay_worker(&s, &url, &plan);
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.records().len() < 3 {
        assert!(Instant::now() < deadline, "replay did not start; log {}", w.log.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    w.signal(9);
    w.wait_exit(Duration::from_secs(10)).await;
    let before = seen.records().len();
    assert!(before < 10, "killed too late ({before} delivered)");
    let mut resumed = replay_worker(&s, &url, &plan);
    assert_eq!(resumed.wait_exit(Duration::from_secs(120)).await, Some(0), "log {}", resumed.log.display());
    let got = seen.records();
    let values: BTreeSet<&str> = got.iter().map(|r| r["value"].as_str().unwrap()).collect();
    assert_eq!(values, s.poison.iter().map(String::as_str).collect(), "every dead letter delivered");
    let duplicates = got.len() - values.len();
    println!("killed after {before}, {} deliveries for 10 dead letters ({duplicates} duplicates)", got.len());
    assert!(duplicates <= 1, "at most the record in flight is delivered again: {duplicates}");
    let parts: Vec<i32> = plan.end_offsets.keys().copied().collect();
    assert_eq!(
        progress(&s.bootstrap, &plan.group_id, &s.dlq, &parts),
        Progress { replayed: 10, succeeded: 10, failed_again: 0, skipped: 0 },
        "counts are exact across the kill"
    );
}
