#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The dead-letter reader (`kpipe_operator::deadletters::read_topic`) against the test bed's real Kafka broker: it
//! counts a pipeline's dead letters by class in a topic shared with another pipeline, reads only what was appended
//! on the next pass, bounds a pass, and starts over when the topic is recreated; a new leader that starts from the
//! counts and `readOffsets` of the status reads only what was appended and ends with the exact counts of a full
//! recount. Kafka only (no apiserver).
//! Run: `cargo test -p kpipe-operator --test dead_letters_kafka`.

use std::collections::BTreeMap;
use std::time::Duration;

use kpipe_e2e::testbed::TestBed;
use kpipe_operator::deadletters::{Tally, dead_letter_consumer, read_topic, seed};
use kpipe_operator::probe::Cluster;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

async fn dead_letters(bootstrap: &str, topic: &str, letters: &[(&str, &str)]) {
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", bootstrap).create().unwrap();
    for (i, (pipeline, class)) in letters.iter().enumerate() {
        let headers = OwnedHeaders::new()
            .insert(Header { key: "kpipe.original.topic", value: Some("src") })
            .insert(Header { key: "kpipe.error.class", value: Some(*class) })
            .insert(Header { key: "kpipe.pipeline", value: Some(*pipeline) });
        let key = format!("k{i}");
        producer
            .send(FutureRecord::to(topic).key(&key).payload("v").headers(headers), Duration::from_secs(10))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn counts_a_pipelines_dead_letters_incrementally_and_restarts_on_a_recreated_topic() {
    let bed = TestBed::connect().await.unwrap();
    let bootstrap = bed.kafka_bootstrap().to_string();
    let topic = format!("dlq-count-{}", std::process::id());
    bed.create_topic(&topic, 2).await.unwrap();
    dead_letters(&bootstrap, &topic, &[("orders", "http_400"), ("orders", "timeout"), ("billing", "http_400")]).await;
    dead_letters(&bootstrap, &topic, &[("orders", "http_400")]).await;
    let cluster = Cluster { bootstrap_servers: vec![bootstrap.clone()], ..Default::default() };
    let mut tally = Tally::default();
    // One consumer for every pass, as the reader keeps it: each pass re-assigns what it reads.
    let consumer = std::sync::Arc::new(dead_letter_consumer(&cluster, Duration::from_secs(10)).expect("consumer"));
    let read = |tally: &mut Tally, max: usize| {
        let (consumer, topic) = (consumer.clone(), topic.clone());
        let mut t = tally.clone();
        let r = std::thread::spawn(move || {
            read_topic(&consumer, &topic, "orders", &mut t, Duration::from_secs(10), max).map(|()| t)
        })
        .join()
        .unwrap();
        *tally = r.expect("read");
    };
    read(&mut tally, 1000);
    assert_eq!(tally.total, 3, "{tally:?}");
    assert_eq!(tally.by_class, BTreeMap::from([("http_400".into(), 2), ("timeout".into(), 1)]));
    assert_eq!(tally.read.values().sum::<i64>(), 4, "the whole topic read");

    // Only what is appended is read on the next pass.
    dead_letters(&bootstrap, &topic, &[("orders", "rejected"), ("billing", "timeout")]).await;
    read(&mut tally, 1000);
    assert_eq!(tally.total, 4);
    assert_eq!(tally.by_class.get("rejected"), Some(&1));
    assert_eq!(tally.read.values().sum::<i64>(), 6);

    // A record with a header key that is not UTF-8 (another producer's) is read past, not a panic of the reader.
    let producer: rdkafka::producer::BaseProducer =
        ClientConfig::new().set("bootstrap.servers", &bootstrap).create().unwrap();
    kpipe_rdkafka_native::testing::produce_with_raw_header(&producer, &topic, 0, b"k", b"v", (b"bad-\xff", b"x"))
        .unwrap();
    read(&mut tally, 1000);
    assert_eq!(tally.total, 4, "not a dead letter of the pipeline");
    assert_eq!(tally.read.values().sum::<i64>(), 7, "read past it");

    // A pass is bounded; the next one continues.
    dead_letters(&bootstrap, &topic, &[("orders", "encode"); 5]).await;
    read(&mut tally, 2);
    assert_eq!(tally.total, 6, "two records per pass");
    read(&mut tally, 1000);
    assert_eq!(tally.total, 9);
    assert_eq!(tally.by_class.get("encode"), Some(&5));

    // A recreated topic (log ends below what was read) is counted from scratch.
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", &bootstrap).create().unwrap();
    admin.delete_topics(&[&topic], &AdminOptions::new()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    bed.create_topic(&topic, 2).await.unwrap();
    dead_letters(&bootstrap, &topic, &[("orders", "timeout")]).await;
    read(&mut tally, 1000);
    assert_eq!(tally.total, 1, "{tally:?}");
    assert_eq!(tally.by_class, BTreeMap::from([("timeout".into(), 1)]));
}

/// One pass of [`read_topic`] over `topic` for pipeline "orders", at most `max` records, on a thread of its own.
fn pass(cluster: &Cluster, topic: &str, tally: &Tally, max: usize) -> Tally {
    let consumer = dead_letter_consumer(cluster, Duration::from_secs(10)).expect("consumer");
    let (topic, mut t) = (topic.to_string(), tally.clone());
    std::thread::spawn(move || {
        read_topic(&consumer, &topic, "orders", &mut t, Duration::from_secs(10), max).map(|()| t)
    })
    .join()
    .unwrap()
    .expect("read")
}

#[tokio::test]
async fn a_new_leader_resumes_from_the_status_and_the_counts_stay_exact() {
    let bed = TestBed::connect().await.unwrap();
    let bootstrap = bed.kafka_bootstrap().to_string();
    let topic = format!("dlq-resume-{}", std::process::id());
    bed.create_topic(&topic, 2).await.unwrap();
    let cluster = Cluster { bootstrap_servers: vec![bootstrap.clone()], ..Default::default() };
    dead_letters(&bootstrap, &topic, &[("orders", "http_400"), ("billing", "timeout"), ("orders", "timeout")]).await;
    // The old leader's last status write.
    let status = pass(&cluster, &topic, &Tally::default(), 1000).summary(&topic, None);
    assert_eq!(status.total, 2);
    dead_letters(&bootstrap, &topic, &[("orders", "rejected"), ("orders", "http_400"), ("billing", "x")]).await;
    // The new leader starts from that status; a pass of exactly the 3 appended records completes the counts.
    let (seeded, _) = seed(Some(&status), &topic);
    let resumed = pass(&cluster, &topic, &seeded, 3);
    let recount = pass(&cluster, &topic, &Tally::default(), 1000);
    assert_eq!(resumed, recount, "resumed counts equal a full recount");
    assert_eq!(resumed.total, 4);
    assert_eq!(
        resumed.by_class,
        BTreeMap::from([("http_400".into(), 2), ("rejected".into(), 1), ("timeout".into(), 1)])
    );
    assert_eq!(resumed.read.values().sum::<i64>(), 6);
}
