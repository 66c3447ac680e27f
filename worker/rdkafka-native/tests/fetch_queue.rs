//! The fetch queue and header copies against the test bed's Kafka broker, and the same run under valgrind's leak
//! checker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kpipe_rdkafka_native::{FetchQueue, MessageBatch};
use kpipe_test_support::{kafka_bootstrap, unique_name};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, Message, TopicPartitionList};

const PARTITIONS: i32 = 3;
const RECORDS: usize = 2_000;
/// Set in the environment of the copy of this test binary that runs under valgrind.
const UNDER_VALGRIND: &str = "KPIPE_UNDER_VALGRIND";

/// A consumer context that forwards partitions to the fetch queue before it assigns them (eager assignor).
#[derive(Default)]
struct Forwarding {
    fetch: Mutex<Option<Arc<FetchQueue<Forwarding>>>>,
}

impl ClientContext for Forwarding {}

impl ConsumerContext for Forwarding {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        if err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS {
            if let Some(fetch) = self.fetch.lock().unwrap().clone() {
                fetch.forward(tpl).unwrap();
            }
            consumer.assign(tpl).unwrap();
        } else {
            consumer.unassign().unwrap();
        }
    }
}

/// Produces `RECORDS` records over the partitions (key `k<i>`, value `<i>`, header `id` = `<i>`; every 100th has a
/// null value and a header with a null value) and one more on partition 0 with a header key of invalid UTF-8.
fn produce(bootstrap: &str, topic: &str) {
    let producer: BaseProducer = ClientConfig::new().set("bootstrap.servers", bootstrap).create().unwrap();
    for i in 0..RECORDS {
        let (key, value) = (format!("k{i}"), i.to_string());
        let mut headers = OwnedHeaders::new().insert(Header { key: "id", value: Some(value.as_bytes()) });
        let mut record = BaseRecord::to(topic).key(&key).partition((i % PARTITIONS as usize) as i32);
        if i.is_multiple_of(100) {
            headers = headers.insert::<[u8]>(Header { key: "nothing", value: None });
        } else {
            record = record.payload(&value);
        }
        let record = record.headers(headers);
        producer.send(record).map_err(|(e, _)| e).unwrap();
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    kpipe_rdkafka_native::testing::produce_with_raw_header(
        &producer,
        topic,
        0,
        b"bad",
        b"",
        (b"bad-\xff\xfe", b"kept"),
    )
    .unwrap();
}

/// A record as handed over: offset, key, value, headers.
type SeenRecord = (i64, Option<Vec<u8>>, Option<Vec<u8>>, Vec<kpipe_rdkafka_native::Header>);

struct Seen {
    /// Per partition, in the order handed over.
    records: HashMap<i32, Vec<SeenRecord>>,
    lossy_keys: usize,
    largest_batch: usize,
    /// How long the consumer waited for a lone record produced after the others.
    lone_wait: Duration,
}

/// Reads the topic through a fetch queue until every record arrived (or 60 s passed), serving events with `poll`.
fn consume(bootstrap: &str, topic: &str) -> Seen {
    let consumer: BaseConsumer<Forwarding> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique_name("fetch-queue"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create_with_context(Forwarding::default())
        .unwrap();
    let consumer = Arc::new(consumer);
    let fetch = Arc::new(FetchQueue::new(consumer.clone()).expect("a fetch queue"));
    *consumer.context().fetch.lock().unwrap() = Some(fetch.clone());
    consumer.subscribe(&[topic]).unwrap();
    let mut seen = Seen { records: HashMap::new(), lossy_keys: 0, largest_batch: 0, lone_wait: Duration::ZERO };
    let mut batch = MessageBatch::with_capacity(256);
    let mut total = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while total < RECORDS + 1 && Instant::now() < deadline {
        let n = fetch.consume(&mut batch, Duration::from_millis(100), |m| {
            assert_eq!(m.error(), None, "{}", m.error_text());
            assert!(m.topic_is(topic));
            let headers = m.headers();
            seen.lossy_keys += headers.lossy_keys;
            seen.records.entry(m.partition()).or_default().push((
                m.offset(),
                m.key().map(<[u8]>::to_vec),
                m.payload().map(<[u8]>::to_vec),
                headers.headers,
            ));
            assert!(m.timestamp_ms().is_some_and(|t| t > 1_700_000_000_000));
        });
        seen.largest_batch = seen.largest_batch.max(n);
        total += n;
        // Rebalances arrive here; a record never does (every partition is forwarded before it is assigned).
        if let Some(result) = consumer.poll(Duration::ZERO) {
            panic!("a record or error on the consumer queue: {:?}", result.map(|m| (m.partition(), m.offset())));
        }
    }
    // A lone record comes back as soon as it arrives, not when the wait is up (one `rd_kafka_consume_batch_queue`
    // call waits until the batch is full).
    let producer: BaseProducer = ClientConfig::new().set("bootstrap.servers", bootstrap).create().unwrap();
    producer.send(BaseRecord::to(topic).key("lone").payload("lone").partition(1)).map_err(|(e, _)| e).unwrap();
    producer.flush(Duration::from_secs(30)).unwrap();
    let started = Instant::now();
    let mut lone = 0;
    while lone == 0 && started.elapsed() < Duration::from_secs(20) {
        lone = fetch.consume(&mut batch, Duration::from_secs(20), |m| assert_eq!(m.key(), Some(b"lone".as_slice())));
        let _ = consumer.poll(Duration::ZERO);
    }
    seen.lone_wait = started.elapsed();
    assert_eq!(lone, 1);
    // Break the cycle (consumer → context → queue → consumer), then destroy the queue before its client.
    consumer.context().fetch.lock().unwrap().take();
    drop(fetch);
    consumer.unsubscribe();
    // A message never destroyed keeps the client from closing: fail instead of hanging.
    let (closed, close) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(consumer);
        let _ = closed.send(());
    });
    close.recv_timeout(Duration::from_secs(60)).expect("the consumer closes within 60 s");
    seen
}

fn create_topic(bootstrap: &str, topic: &str) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", bootstrap).create().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let created = runtime
        .block_on(
            admin.create_topics(&[NewTopic::new(topic, PARTITIONS, TopicReplication::Fixed(1))], &AdminOptions::new()),
        )
        .unwrap();
    for result in created {
        result.unwrap();
    }
}

#[test]
fn a_fetch_queue_hands_over_every_record_in_order_with_its_headers() {
    let bootstrap = kafka_bootstrap();
    let topic = unique_name("fetch-queue");
    create_topic(&bootstrap, &topic);
    produce(&bootstrap, &topic);
    let seen = consume(&bootstrap, &topic);
    let total: usize = seen.records.values().map(Vec::len).sum();
    assert_eq!(total, RECORDS + 1, "every record, once");
    for (partition, records) in &seen.records {
        // Per partition: every offset from 0, in order.
        let offsets: Vec<i64> = records.iter().map(|r| r.0).collect();
        assert_eq!(offsets, (0..records.len() as i64).collect::<Vec<_>>(), "partition {partition}");
        for (offset, key, value, headers) in records {
            if *partition == 0 && *offset == records.len() as i64 - 1 {
                // The last record of partition 0: the header key of invalid UTF-8, converted, its value kept.
                assert_eq!(key.as_deref(), Some(b"bad".as_slice()));
                assert_eq!(value.as_deref(), Some(b"".as_slice()), "an empty value stays empty, not null");
                assert_eq!(headers, &vec![("bad-\u{fffd}\u{fffd}".to_owned(), Some(b"kept".to_vec()))]);
                continue;
            }
            let i: usize =
                std::str::from_utf8(&key.clone().unwrap()).unwrap().strip_prefix('k').unwrap().parse().unwrap();
            assert_eq!(i % PARTITIONS as usize, *partition as usize);
            let id = ("id".to_owned(), Some(i.to_string().into_bytes()));
            if i.is_multiple_of(100) {
                assert_eq!(value, &None, "a null value stays null");
                assert_eq!(headers, &vec![id, ("nothing".to_owned(), None)], "a null header value stays null");
            } else {
                assert_eq!(value.as_deref(), Some(i.to_string().as_bytes()));
                assert_eq!(headers, &vec![id]);
            }
        }
    }
    assert_eq!(seen.lossy_keys, 1);
    assert!(seen.largest_batch > 1, "records came in batches (largest {})", seen.largest_batch);
    assert!(seen.lone_wait < Duration::from_secs(10), "a lone record waited {:?} of a 20 s wait", seen.lone_wait);
}

/// Runs the test above in a copy of this test binary under valgrind's memcheck: any message or queue not destroyed
/// (a definite leak) or any invalid memory access fails it.
#[test]
fn the_fetch_queue_leaks_nothing_under_valgrind() {
    if std::env::var_os(UNDER_VALGRIND).is_some() {
        return; // the copy under valgrind runs only the scenario
    }
    let bootstrap = kafka_bootstrap();
    let valgrind = Command::new("valgrind").arg("--version").output();
    assert!(
        valgrind.is_ok_and(|o| o.status.success()),
        "valgrind is not installed (e2e/testbed/install-deps.sh installs it; `make test` runs that)"
    );
    let dir = std::env::temp_dir().join(unique_name("fetch-queue-valgrind"));
    std::fs::create_dir_all(&dir).unwrap();
    let (out_path, err_path) = (dir.join("stdout"), dir.join("stderr"));
    let mut child = Command::new("valgrind")
        .args([
            "--tool=memcheck",
            "--leak-check=full",
            "--show-leak-kinds=definite",
            "--errors-for-leak-kinds=definite",
            "--error-exitcode=97",
        ])
        .arg(format!("--suppressions={}/tests/valgrind.supp", env!("CARGO_MANIFEST_DIR")))
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "a_fetch_queue_hands_over_every_record_in_order_with_its_headers", "--test-threads=1"])
        .env(UNDER_VALGRIND, "1")
        .env("KPIPE_KAFKA_BOOTSTRAP", &bootstrap)
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    // A message never destroyed also keeps librdkafka's client from closing: the run then hangs instead of
    // reporting the leak.
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let report = std::fs::read_to_string(&err_path).unwrap_or_default();
    let tail: String =
        report.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    let status =
        status.unwrap_or_else(|| panic!("hung for 2 min under valgrind (a client that cannot close):\n{tail}"));
    assert!(status.success(), "under valgrind: {status:?}\n{tail}");
    assert!(
        report.contains("definitely lost: 0 bytes") || report.contains("All heap blocks were freed"),
        "no leak summary:\n{tail}"
    );
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    assert!(stdout.contains("1 passed"), "the scenario ran and passed:\n{stdout}");
}
