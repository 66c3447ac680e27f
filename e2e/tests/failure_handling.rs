//! Failure handling on the local test bed, as users run it (`minReplicas: 0`, a dead-letter topic, the default
//! retry policy): a downstream that rate-limits (429 + Retry-After) or is down for minutes gets every record
//! delivered and none dead-lettered; while it is down the pipeline says `ProcessorUnavailable` and does not add
//! pods for the lag that waits for it (DESIGN.md §2 "Downstream health").
//!
//! Run: `cargo test -p kpipe-e2e --test failure_handling -- --nocapture` (needs `make testbed-up` and release
//! builds).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use kpipe_api::v1alpha1::condition::{DEGRADED, STALLED};
use kpipe_e2e::scenario::{
    self, Install, apply_pipeline, condition, events_for, id_records, pipeline_manifest, pipeline_status, unique_topic,
    wait_delivered, worker_replicas,
};
use kpipe_e2e::testbed::wait_for;
use kpipe_e2e::{TestBed, bed};
use serde_json::json;

/// `(key, value)` records.
type Records = Vec<(Vec<u8>, Vec<u8>)>;

fn ids(prefix: &str, range: std::ops::Range<usize>) -> (Records, BTreeSet<String>) {
    let records = id_records(prefix, range, 50);
    let expected = records.iter().map(|(_, v)| String::from_utf8(v.clone()).unwrap()).collect();
    (records, expected)
}

/// Records in the dead-letter topic (sum of its partitions' log ends).
async fn dead_letters(bed: &TestBed, dlq: &str) -> i64 {
    bed.end_offsets(dlq).await.expect("dlq end offsets").values().sum()
}

#[tokio::test]
async fn a_rate_limited_downstream_gets_everything_delivered_and_nothing_dead_lettered() {
    let bed = bed().await;
    let (ns, sink) =
        scenario::setup_with_sink(&bed, "e2e-429", &Install::default(), &[]).await.unwrap_or_else(|e| panic!("{e}"));
    let topic = unique_topic("ratelimited");
    let dlq = format!("{topic}-dlq");
    bed.create_topic(&topic, 4).await.expect("topic");
    bed.create_topic(&dlq, 1).await.expect("dlq");
    apply_pipeline(
        &bed,
        ns.name(),
        pipeline_manifest("limited", &bed, &topic, &sink, json!({"deadLetter": {"topic": dlq}})),
    )
    .await
    .expect("apply");
    sink.start_rate_limit(2).await.expect("rate limit");
    let (records, expected) = ids("limited", 0..500);
    bed.produce_records(&topic, records).await.expect("produce");
    // Far longer than the default retry budget would last without Retry-After (8 attempts in ~13 s).
    tokio::time::sleep(Duration::from_secs(30)).await;
    let rejected = sink.stats().await.expect("stats")["rejected"].as_u64().unwrap_or(0);
    sink.set_outage(false).await.expect("end rate limit");
    let delivered = wait_delivered(&sink, &expected, Duration::from_secs(120)).await.unwrap_or_else(|e| panic!("{e}"));
    let dead = dead_letters(&bed, &dlq).await;
    println!(
        "429 + Retry-After: 2 for 30 s: {rejected} requests answered 429, {} of 500 delivered ({} duplicates), {dead} \
         dead-lettered",
        expected.len(),
        delivered.len() - expected.len()
    );
    assert!(rejected > 0, "the sink never rate-limited");
    assert_eq!(dead, 0, "a downstream that only asked to slow down must not fill the DLQ");
    ns.delete().await.expect("delete");
}

#[tokio::test]
async fn a_downstream_down_for_three_minutes_loses_nothing_and_buys_no_pods() {
    let bed = bed().await;
    let (ns, sink) =
        scenario::setup_with_sink(&bed, "e2e-down", &Install::default(), &[]).await.unwrap_or_else(|e| panic!("{e}"));
    let topic = unique_topic("down");
    let dlq = format!("{topic}-dlq");
    bed.create_topic(&topic, 6).await.expect("topic");
    bed.create_topic(&dlq, 1).await.expect("dlq");
    // lagThreshold 500: the plain lag rule would ask for 6 pods for the lag that builds up below.
    apply_pipeline(
        &bed,
        ns.name(),
        pipeline_manifest(
            "down",
            &bed,
            &topic,
            &sink,
            json!({"deadLetter": {"topic": dlq}, "scaling": {"minReplicas": 0, "maxReplicas": 6, "lagThreshold": 500}}),
        ),
    )
    .await
    .expect("apply");
    sink.set_outage(true).await.expect("outage");
    let (first, mut expected) = ids("down", 0..300);
    bed.produce_records(&topic, first).await.expect("produce");
    let woke = wait_for("woken by the first records", Duration::from_secs(60), || async {
        let r = worker_replicas(&bed, ns.name(), "down").await.ok()?;
        (r > 0).then_some(r)
    })
    .await
    .expect("activation");
    let started = Instant::now();
    let (mut most, mut unavailable_seen, mut degraded_seen) = (woke, false, false);
    let mut more_produced = false;
    while started.elapsed() < Duration::from_secs(180) {
        if !more_produced && started.elapsed() > Duration::from_secs(60) {
            // More lag while the downstream is down: more pods cannot help it.
            let (more, more_ids) = ids("down", 300..3_000);
            bed.produce_records(&topic, more).await.expect("produce more");
            expected.extend(more_ids);
            more_produced = true;
        }
        most = most.max(worker_replicas(&bed, ns.name(), "down").await.unwrap_or(0));
        if let Ok(s) = pipeline_status(&bed, ns.name(), "down").await {
            unavailable_seen |= condition(&s, STALLED) == Some(("True".into(), "ProcessorUnavailable".into()));
            degraded_seen |= condition(&s, DEGRADED) == Some(("True".into(), "ProcessorUnavailable".into()));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let dead_during = dead_letters(&bed, &dlq).await;
    sink.set_outage(false).await.expect("recover");
    let recovered = Instant::now();
    let delivered = wait_delivered(&sink, &expected, Duration::from_secs(180)).await.unwrap_or_else(|e| panic!("{e}"));
    let delivered_in = recovered.elapsed();
    let dead = dead_letters(&bed, &dlq).await;
    let events = events_for(&bed, ns.name(), "down").await.expect("events");
    let reasons: Vec<&str> = events.iter().map(|e| e.1.as_str()).collect();
    println!(
        "down 3 min: {} records, woke with {woke} pod(s), at most {most} while down; {dead_during} dead-lettered \
         during, {dead} after; all delivered {delivered_in:?} after recovery ({} duplicates); \
         ProcessorUnavailable in Stalled {unavailable_seen}, Degraded {degraded_seen}; events {reasons:?}",
        expected.len(),
        delivered.len() - expected.len()
    );
    assert_eq!(dead, 0, "a downstream outage must not fill the DLQ");
    assert!(unavailable_seen && degraded_seen, "status never said ProcessorUnavailable");
    assert!(reasons.contains(&"ProcessorUnavailable"), "no ProcessorUnavailable Event: {events:?}");
    assert_eq!(most, woke, "replicas grew while the downstream was down");
    ns.delete().await.expect("delete");
}

/// `max.message.bytes` of the small topics of the size tests.
const SMALL_LIMIT: usize = 64 * 1024;
/// Size estimate of a record's framing in a v2 batch (worker/src/size.rs `BATCH_OVERHEAD`).
const FRAMING: usize = 97;

/// A record whose key is its id and whose value starts with `<id>|`, padded to `len` bytes.
fn sized(id: &str, len: usize) -> (Vec<u8>, Vec<u8>) {
    let mut value = format!("{id}|").into_bytes();
    value.resize(len.max(value.len()), b'x');
    (id.as_bytes().to_vec(), value)
}

/// The id a delivered value starts with.
fn id_of(value: &[u8]) -> String {
    let text = String::from_utf8_lossy(value);
    text.split('|').next().unwrap_or_default().to_string()
}

/// What must become of each record of a size test, by id.
#[derive(Default)]
struct Fates {
    records: Records,
    /// Delivered (forwarded or accepted by the sink).
    delivered: BTreeSet<String>,
    /// Dead-lettered with its value.
    whole: BTreeSet<String>,
    /// Dead-lettered as a reference record: id → original value size.
    reference: std::collections::BTreeMap<String, usize>,
}

impl Fates {
    /// Adds the record `sized(id, len)`, expected to be `d`elivered, dead-lettered `w`hole or as a `r`eference.
    fn add(&mut self, id: String, len: usize, fate: char) {
        self.records.push(sized(&id, len));
        match fate {
            'd' => self.delivered.insert(id),
            'w' => self.whole.insert(id),
            _ => self.reference.insert(id, len).is_none(),
        };
    }
}

fn header<'a>(r: &'a kpipe_e2e::testbed::Record, name: &str) -> Option<&'a str> {
    r.headers.iter().find(|(k, _)| k == name).and_then(|(_, v)| v.as_deref()).and_then(|v| std::str::from_utf8(v).ok())
}

/// Checks the dead-letter topic holds exactly the records `whole` (value kept) and `reference` (id → original value
/// size; reference records: no value, `kpipe.payload.truncated=true`, `omitted=value`, the original size, key and
/// coordinates kept), once each.
async fn check_dead_letters(
    bed: &TestBed,
    dlq: &str,
    topic: &str,
    whole: &BTreeSet<String>,
    reference: &std::collections::BTreeMap<String, usize>,
) {
    let dead = bed.read_topic(dlq, Duration::from_secs(60)).await.expect("read dlq");
    let mut seen = BTreeSet::new();
    for r in &dead {
        let id = String::from_utf8(r.key.clone()).expect("key is the id");
        assert!(seen.insert(id.clone()), "{id} dead-lettered twice");
        assert_eq!(header(r, "kpipe.original.topic"), Some(topic), "{id}");
        assert!(header(r, "kpipe.original.offset").is_some_and(|o| o.parse::<i64>().is_ok()), "{id}");
        assert!(header(r, "kpipe.error.class").is_some(), "{id}: no error class");
        if let Some(size) = reference.get(&id) {
            assert_eq!(header(r, "kpipe.payload.truncated"), Some("true"), "{id}: not a reference record");
            assert_eq!(header(r, "kpipe.payload.omitted"), Some("value"), "{id}");
            assert_eq!(header(r, "kpipe.payload.bytes"), Some(size.to_string().as_str()), "{id}");
            assert!(r.value.is_empty(), "{id}: a reference record carries no value");
        } else {
            assert!(whole.contains(&id), "{id} dead-lettered but should not be");
            assert_eq!(header(r, "kpipe.payload.truncated"), None, "{id}: fits, must be whole");
            assert_eq!(id_of(&r.value), id, "{id}: value kept");
        }
    }
    let want: BTreeSet<String> = whole.iter().cloned().chain(reference.keys().cloned()).collect();
    assert_eq!(seen, want, "dead-lettered ids");
}

/// Waits until the pipeline's group has committed every partition of `topic` up to its end: no record blocks it.
async fn wait_committed_to_end(bed: &TestBed, topic: &str, group: &str) {
    let ends = bed.end_offsets(topic).await.expect("end offsets");
    wait_for(&format!("group {group} committed {topic} to its end {ends:?}"), Duration::from_secs(120), || async {
        let committed = bed.committed_offsets(topic, group).await.ok()?;
        ends.iter().all(|(p, end)| committed.get(p).copied().flatten() == Some(*end)).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn records_over_the_output_and_dlq_limits_never_block_the_forward_processor() {
    let bed = bed().await;
    let (ns, sink) = scenario::setup_with_sink(&bed, "e2e-size-fwd", &Install::default(), &[])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let topic = unique_topic("sizefwd");
    let (out, dlq) = (format!("{topic}-out"), format!("{topic}-dlq"));
    // The output topic takes half of what the DLQ takes, so a record can be too large for the output yet fit the DLQ.
    let out_limit = SMALL_LIMIT / 2;
    bed.create_topic(&topic, 2).await.expect("topic");
    bed.create_topic_with_config(&out, 2, &[("max.message.bytes", &out_limit.to_string())]).await.expect("out");
    bed.create_topic_with_config(&dlq, 1, &[("max.message.bytes", &SMALL_LIMIT.to_string())]).await.expect("dlq");
    apply_pipeline(
        &bed,
        ns.name(),
        pipeline_manifest(
            "sizefwd",
            &bed,
            &topic,
            &sink,
            json!({"processor": {"http": null, "kafka": {"topic": out}}, "deadLetter": {"topic": dlq}}),
        ),
    )
    .await
    .expect("apply");
    // Ids are 10 bytes ("f-<8 digits>"), the key is the id.
    let key = 10;
    let id = |i: usize| format!("f-{i:08}");
    let mut f = Fates::default();
    for i in 0..20 {
        f.add(id(i), 100, 'd');
    }
    f.add(id(20), out_limit - FRAMING - key - 16, 'd'); // just under the output topic's limit: forwarded
    f.add(id(21), out_limit - FRAMING - key + 16, 'w'); // just over it: permanent failure, fits the DLQ whole
    f.add(id(22), SMALL_LIMIT - FRAMING - key - 2_000, 'w'); // just under the DLQ's limit with the context headers
    f.add(id(23), SMALL_LIMIT - FRAMING, 'r'); // just over the DLQ's limit: reference record
    f.add(id(24), 300 * 1024, 'r'); // far over both
    for i in 25..45 {
        f.add(id(i), 100, 'd');
    }
    let Fates { records, delivered: delivered_ids, whole, reference } = f;
    bed.produce_records(&topic, records).await.expect("produce");
    let group = format!("{}.sizefwd", ns.name());
    wait_committed_to_end(&bed, &topic, &group).await;
    let forwarded = bed.read_topic(&out, Duration::from_secs(60)).await.expect("read output");
    let forwarded_ids: BTreeSet<String> = forwarded.iter().map(|r| id_of(&r.value)).collect();
    assert_eq!(forwarded.len(), forwarded_ids.len(), "duplicates in the output");
    assert_eq!(forwarded_ids, delivered_ids, "forwarded ids");
    check_dead_letters(&bed, &dlq, &topic, &whole, &reference).await;
    let logs = bed.pod_logs(ns.name());
    println!(
        "forward with output limit {out_limit} B and DLQ limit {SMALL_LIMIT} B: {} forwarded, {} dead-lettered whole, \
         {} as reference records, committed to the end; dead letters the broker refused as too large: {}",
        forwarded_ids.len(),
        whole.len(),
        reference.len(),
        logs.matches("dead letter refused as too large").count()
    );
    ns.delete().await.expect("delete");
}

#[tokio::test]
async fn records_over_the_dlq_limit_never_block_the_http_processor() {
    let bed = bed().await;
    // The sink rejects records whose value starts with "poison" permanently (partial batch failure).
    let (ns, sink) = scenario::setup_with_sink(
        &bed,
        "e2e-size-http",
        &Install::default(),
        &["--poison-prefix", "poison", "--poison-mode", "named"],
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let topic = unique_topic("sizehttp");
    let dlq = format!("{topic}-dlq");
    bed.create_topic(&topic, 2).await.expect("topic");
    bed.create_topic_with_config(&dlq, 1, &[("max.message.bytes", &SMALL_LIMIT.to_string())]).await.expect("dlq");
    apply_pipeline(
        &bed,
        ns.name(),
        pipeline_manifest("sizehttp", &bed, &topic, &sink, json!({"deadLetter": {"topic": dlq}})),
    )
    .await
    .expect("apply");
    let key = "poison-00000000".len();
    let mut f = Fates::default();
    for i in 0..20 {
        f.add(format!("ok-{i:08}"), 100, 'd');
    }
    f.add("ok-big-00000000".into(), 200 * 1024, 'd'); // large but fine for the sink: delivered
    f.add("poison-00000001".into(), 100, 'w');
    f.add("poison-00000002".into(), SMALL_LIMIT - FRAMING - key - 2_000, 'w'); // just under the DLQ's limit
    f.add("poison-00000003".into(), SMALL_LIMIT - FRAMING - key + 16, 'r'); // just over it: reference record
    f.add("poison-00000004".into(), 300 * 1024, 'r');
    for i in 20..40 {
        f.add(format!("ok-{i:08}"), 100, 'd');
    }
    let Fates { records, delivered: delivered_ids, whole, reference } = f;
    bed.produce_records(&topic, records).await.expect("produce");
    let group = format!("{}.sizehttp", ns.name());
    wait_committed_to_end(&bed, &topic, &group).await;
    let ids: BTreeSet<String> = sink.ids().await.expect("ids").iter().map(|v| id_of(v.as_bytes())).collect();
    assert_eq!(ids, delivered_ids, "delivered ids");
    check_dead_letters(&bed, &dlq, &topic, &whole, &reference).await;
    println!(
        "http with DLQ limit {SMALL_LIMIT} B: {} delivered, {} dead-lettered whole, {} as reference records, \
         committed to the end",
        ids.len(),
        whole.len(),
        reference.len()
    );
    ns.delete().await.expect("delete");
}

#[tokio::test]
async fn cloudevents_with_binary_keys_and_non_ascii_headers_parse_with_the_sdk_in_key_order() {
    use base64::Engine;
    let bed = bed().await;
    let (ns, sink) =
        scenario::setup_with_sink(&bed, "e2e-ce", &Install::default(), &[]).await.unwrap_or_else(|e| panic!("{e}"));
    let topic = unique_topic("ce");
    let dlq = format!("{topic}-dlq");
    bed.create_topic(&topic, 2).await.expect("topic");
    bed.create_topic(&dlq, 1).await.expect("dlq");
    apply_pipeline(
        &bed,
        ns.name(),
        pipeline_manifest(
            "ce",
            &bed,
            &topic,
            &sink,
            json!({"processor": {"http": {"format": "cloudevents"}}, "deadLetter": {"topic": dlq}}),
        ),
    )
    .await
    .expect("apply");
    // Confluent wire-format keys (magic byte 0, schema id 1, then binary), a non-ASCII UTF-8 key and a plain one.
    let keys: Vec<Vec<u8>> = vec![
        vec![0, 0, 0, 1, 0xff, 0x00, 0x7f],
        vec![0, 0, 0, 1, 0x80, 0x0a, 0x0d],
        "ключ-ü €".as_bytes().to_vec(),
        b"plain key".to_vec(),
    ];
    let regions = ["Zürich ☃", "naïve \"quoted\" 100%", "東京", "plain"];
    let per_key = 60;
    let mut records = Vec::new();
    // id → (key, region, sequence number within its key)
    let mut want: std::collections::BTreeMap<String, (Vec<u8>, String, usize)> = std::collections::BTreeMap::new();
    for seq in 0..per_key {
        for (k, key) in keys.iter().enumerate() {
            let id = format!("ce-{k}-{seq:04}");
            let region = regions[k].to_string();
            let headers = vec![("ce_region".to_string(), region.clone().into_bytes())];
            records.push((key.clone(), id.clone().into_bytes(), headers));
            want.insert(id, (key.clone(), region, seq));
        }
    }
    bed.produce_with_headers(&topic, records).await.expect("produce");
    let expected: BTreeSet<String> = want.keys().cloned().collect();
    wait_delivered(&sink, &expected, Duration::from_secs(120)).await.unwrap_or_else(|e| panic!("{e}"));
    let events = sink.events().await.expect("events");
    let stats = sink.stats().await.expect("stats");
    assert_eq!(stats["malformed"], 0, "requests the CloudEvents SDK refused: {stats}");
    let source = format!("/kpipe/{}/ce", ns.name());
    let mut last_seq: std::collections::BTreeMap<Vec<u8>, usize> = std::collections::BTreeMap::new();
    let mut out_of_order = 0;
    for ev in &events {
        let data = ev["data"].as_str().expect("data is the id");
        let (key, region, seq) = want.get(data).unwrap_or_else(|| panic!("unknown event {ev}"));
        let subject = ev["subject"].as_str().expect("subject");
        assert!(subject.starts_with(&format!("{topic}/")), "{ev}");
        // id is "<topic>-<partition>-<offset>", subject "<topic>/<partition>/<offset>" (topic names have no '/').
        assert_eq!(ev["id"].as_str(), Some(subject.replace('/', "-").as_str()), "{ev}");
        assert_eq!(ev["source"], source.as_str(), "{ev}");
        assert_eq!(ev["type"], "io.kpipe.record", "{ev}");
        let ext = &ev["extensions"];
        let sent_key = ext["partitionkey"].as_str().expect("partitionkey");
        let decoded = if ext["kpipekeyencoding"] == "base64" {
            base64::engine::general_purpose::STANDARD.decode(sent_key).expect("base64 key")
        } else {
            sent_key.as_bytes().to_vec()
        };
        assert_eq!(&decoded, key, "{ev}: the key round-trips");
        assert_eq!(ext["region"].as_str(), Some(region.as_str()), "{ev}: the non-ASCII header round-trips");
        let last = last_seq.entry(key.clone()).or_insert(0);
        if *seq < *last {
            out_of_order += 1;
        }
        *last = (*last).max(*seq);
    }
    let dead = dead_letters(&bed, &dlq).await;
    println!(
        "cloudevents: {} records of {} keys, {} events parsed by the SDK, 0 malformed, {out_of_order} same-key \
         records out of order (sink: {}), {dead} dead-lettered",
        expected.len(),
        keys.len(),
        events.len(),
        stats["outOfOrder"]
    );
    assert_eq!(out_of_order, 0, "same-key records arrived out of order");
    assert_eq!(stats["outOfOrder"], 0, "the sink saw same-key records out of offset order");
    assert_eq!(dead, 0, "nothing may be dead-lettered");
    ns.delete().await.expect("delete");
}
