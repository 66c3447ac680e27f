#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Idle groups keep their place, against a real Kafka broker whose `offsets.retention.minutes` is 1
//! (and whose expiry check runs every 2 s). That config is read-only on a running broker, so the
//! test starts its own single-node broker from the bed's Kafka (`KAFKA_HOME`, set by the bed's env
//! file) instead of restarting the shared one: tests/support/short-retention-kafka.sh.
//!
//! Run: `set -a; source ~/.cache/kpipe/run/env; set +a;
//!       cargo test -p kpipe-operator --test idle_offsets_kafka -- --nocapture` (about 2 minutes).

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kpipe_operator::group_offsets::{Commit, GroupOffsets};
use kpipe_operator::keepalive::{OffsetBook, OffsetKeeper};
use kpipe_operator::probe::{Cluster, LagProbe};
use kpipe_test_support::free_port;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

struct Broker {
    child: Child,
    bootstrap: String,
    _dir: std::path::PathBuf,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

async fn start_broker() -> Broker {
    assert!(std::env::var("KAFKA_HOME").is_ok(), "KAFKA_HOME not set: source ~/.cache/kpipe/run/env first");
    let dir = std::env::temp_dir().join(format!("kpipe-idle-kafka-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (port, cport) = (free_port(), free_port());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/short-retention-kafka.sh");
    let child = Command::new(script)
        .args([dir.to_str().unwrap(), &port.to_string(), &cport.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let broker = Broker { child, bootstrap: format!("127.0.0.1:{port}"), _dir: dir };
    let deadline = Instant::now() + Duration::from_secs(90);
    while std::net::TcpStream::connect(&broker.bootstrap).is_err() {
        assert!(Instant::now() < deadline, "private broker did not listen");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    broker
}

fn config(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    c
}

/// Commit `offsets` with `metadata` for `group`: as a group member (a classic consumer group that
/// is then left empty) or as a client outside any group (a simple group).
fn commit(bootstrap: &str, group: &str, topic: &str, offsets: &[(i32, i64)], metadata: &str, member: bool) {
    let c: BaseConsumer = config(bootstrap).set("group.id", group).set("enable.auto.commit", "false").create().unwrap();
    if member {
        c.subscribe(&[topic]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while c.assignment().unwrap().count() < offsets.len() {
            assert!(Instant::now() < deadline, "no assignment for {group}");
            let _ = c.poll(Duration::from_millis(200));
        }
    }
    let mut tpl = TopicPartitionList::new();
    for (p, o) in offsets {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*o)).unwrap();
        tpl.find_partition(topic, *p).unwrap().set_metadata(metadata);
    }
    c.commit(&tpl, CommitMode::Sync).unwrap();
    if member {
        c.unsubscribe();
        // The close leaves the group: it is Empty from now on and its retention clock runs.
    }
}

fn exact(go: &GroupOffsets, group: &str, topic: &str, n: i32) -> HashMap<i32, Option<Commit>> {
    let parts: Vec<(String, i32)> = (0..n).map(|p| (topic.to_string(), p)).collect();
    go.committed(group, &parts).unwrap().into_iter().map(|((_, p), c)| (p, c)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_groups_keep_their_offsets_past_retention_and_lost_ones_are_restored() {
    let broker = start_broker().await;
    let bs = broker.bootstrap.clone();
    let topic = "idle-orders";
    let admin: AdminClient<DefaultClientContext> = config(&bs).create().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = admin.create_topics(&[NewTopic::new(topic, 3, TopicReplication::Fixed(1))], &AdminOptions::new()).await;
        if matches!(&r, Ok(v) if v.iter().all(|x| x.is_ok())) {
            break;
        }
        assert!(Instant::now() < deadline, "cannot create topic: {r:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let producer: FutureProducer = config(&bs).create().unwrap();
    for i in 0..30 {
        let payload = format!("r{i}");
        producer
            .send(FutureRecord::<(), _>::to(topic).partition(i % 3).payload(&payload), Duration::from_secs(10))
            .await
            .unwrap();
    }

    // A worker's retry report rides in the commit metadata: it must survive byte for byte.
    let meta = "{\"kpipe\":1,\"retry\":{\"offset\":4,\"attempt\":3}}\u{1}\u{7f}é";
    let want: Vec<(i32, i64)> = vec![(0, 4), (1, 5), (2, 6)];
    // classic: a consumer group left empty; simple: commits from outside a group; deleted: classic,
    // then an admin deletes the group (offsets gone at once).
    let groups = ["idle-classic", "idle-simple", "idle-deleted"];
    commit(&bs, groups[0], topic, &want, meta, true);
    commit(&bs, groups[1], topic, &want, meta, false);
    commit(&bs, groups[2], topic, &want, meta, true);

    let registry = prometheus::Registry::new();
    let keeper = OffsetKeeper::new(Duration::from_secs(5), &registry);
    let probe = Arc::new(LagProbe::new(Duration::from_secs(5)));
    let cluster = Cluster { bootstrap_servers: vec![bs.clone()], ..Default::default() };
    let go = GroupOffsets::new(vec![bs.clone()], Duration::from_secs(5));
    assert_eq!(go.offsets_retention(groups[0]).unwrap(), Duration::from_secs(60), "DescribeConfigs");

    let mut books: Vec<OffsetBook> = vec![OffsetBook::default(); 3];
    let mut restored: Vec<Vec<String>> = vec![Vec::new(); 3];
    let mut refreshed = [0usize; 3];
    let started = Instant::now();
    let mut deleted = false;
    // Idle for well past retention (60 s) plus the expiry check (2 s): 100 s of 2 s polls.
    while started.elapsed() < Duration::from_secs(100) {
        if !deleted && started.elapsed() > Duration::from_secs(10) {
            let r = admin.delete_groups(&[groups[2]], &AdminOptions::new()).await.unwrap();
            assert!(r.iter().all(|x| x.is_ok()), "{r:?}");
            deleted = true;
        }
        for (i, g) in groups.iter().enumerate() {
            let mut offs = probe.offsets(cluster.clone(), vec![topic.into()], g.to_string()).await.unwrap();
            let now = started.elapsed();
            let t = keeper.tend(&cluster, g, &mut offs, true, now, &mut books[i]).await;
            assert!(t.error.is_none() && t.not_restored.is_empty(), "{g}: {t:?}");
            restored[i].extend(t.restored.iter().map(|l| l.to_string()));
            refreshed[i] += t.refreshed;
            // What the scaler sees is always the kept position: lag from 4/5/6, never from startOffset.
            let mut seen: Vec<(i32, Option<i64>)> = offs.iter().map(|o| (o.partition, o.committed)).collect();
            seen.sort();
            assert_eq!(seen, want.iter().map(|(p, o)| (*p, Some(*o))).collect::<Vec<_>>(), "{g} at {now:?}");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    for (i, g) in groups.iter().enumerate() {
        println!("{g}: refreshed {} partition commits, restored {:?}", refreshed[i], restored[i]);
        let got = exact(&go, g, topic, 3);
        for (p, o) in &want {
            assert_eq!(got[p], Some(Commit { offset: *o, metadata: meta.into() }), "{g} partition {p}");
        }
    }
    // Refreshes keep a simple group's offsets alive: nothing to restore there.
    assert!(refreshed[1] > 0 && restored[1].is_empty(), "simple group: {:?}", restored[1]);
    // The deleted group's offsets were restored, naming each partition.
    assert_eq!(restored[2].len(), 3, "{:?}", restored[2]);
    assert!(restored[2].iter().any(|s| s.starts_with("idle-orders/0 (was 4, found none)")), "{:?}", restored[2]);
    let counted: u64 = keeper.restored_total.with_label_values(&["ns", "x"]).get();
    assert_eq!(counted, 0, "the controller counts restores per pipeline, the keeper does not guess labels");

    // A group with a member is never written to by the keeper: the broker refuses it.
    let member: BaseConsumer =
        config(&bs).set("group.id", groups[1]).set("enable.auto.commit", "false").create().unwrap();
    member.subscribe(&[topic]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while member.assignment().unwrap().count() < 3 {
        assert!(Instant::now() < deadline, "no assignment");
        let _ = member.poll(Duration::from_millis(200));
    }
    let err = go
        .commit_empty(groups[1], &[((topic.to_string(), 0), Commit { offset: 0, metadata: String::new() })])
        .unwrap_err();
    assert!(err.group_has_members(), "{err}");
    assert_eq!(exact(&go, groups[1], topic, 3)[&0].as_ref().map(|c| c.offset), Some(4));
    drop(member);
    drop(broker);
}
