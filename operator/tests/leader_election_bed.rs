#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Leader election against the test bed's real kube-apiserver: two electors on one Lease, the
//! leader's apiserver connection going through a proxy the test blackholes (connections hang, as
//! with a network partition). The old leader's fence must close before the standby acquires, and
//! the standby must lead within one lease duration (plus a retry) of the cut.
//!
//! Run: `set -a; source ~/.cache/kpipe/run/env; set +a;
//!       cargo test -p kpipe-operator --test leader_election_bed -- --nocapture`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kpipe_operator::leader::{Elector, LeaderFence, Timing, Transition};
use kube::api::{Api, DeleteParams};
use kube::{Client, Config};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A TCP proxy to the apiserver that can be switched to a blackhole (accepts, never forwards, and
/// drops the forwarding of connections already open), or made to delay each new connection.
struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
    epoch: watch::Sender<u32>,
    /// Each new connection waits 0..=this many ms (spread over the connections) before it is forwarded.
    jitter_ms: Arc<AtomicU32>,
}

pub(crate) async fn proxy(upstream: String) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let cut = Arc::new(AtomicBool::new(false));
    let jitter_ms = Arc::new(AtomicU32::new(0));
    let (epoch, _) = watch::channel(0u32);
    let (c, e, jitter) = (cut.clone(), epoch.clone(), jitter_ms.clone());
    tokio::spawn(async move {
        let mut held = Vec::new();
        let mut accepted = 0u32;
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else { return };
            if c.load(Ordering::SeqCst) {
                held.push(inbound); // blackhole: the client waits until its own timeout
                continue;
            }
            // Delays spread over 0..=max by a fixed stride, so which of several concurrent requests is answered
            // first depends on the order the client happened to open its connections in.
            accepted = accepted.wrapping_add(1);
            let max = jitter.load(Ordering::SeqCst);
            let delay = Duration::from_millis(u64::from(accepted.wrapping_mul(7) % 11) * u64::from(max) / 10);
            let upstream = upstream.clone();
            let mut cancelled = e.subscribe();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let Ok(mut out) = TcpStream::connect(&upstream).await else { return };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut out) => {}
                    _ = cancelled.changed() => {
                        // Keep both sockets open but silent: a hang, not a reset.
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    }
                }
            });
        }
    });
    Proxy { port, cut, epoch, jitter_ms }
}

impl Proxy {
    fn set_jitter(&self, max: Duration) {
        self.jitter_ms.store(u32::try_from(max.as_millis()).unwrap(), Ordering::SeqCst);
    }

    fn set_cut(&self, on: bool) {
        self.cut.store(on, Ordering::SeqCst);
        if on {
            self.epoch.send_modify(|e| *e += 1);
        }
    }
}

async fn client_via(port: Option<u16>) -> Client {
    let mut config = Config::infer().await.expect("KUBECONFIG of the test bed");
    if let Some(port) = port {
        config.cluster_url = format!("https://127.0.0.1:{port}").parse().unwrap();
    }
    config.read_timeout = Some(Duration::from_secs(2));
    config.connect_timeout = Some(Duration::from_secs(2));
    Client::try_from(config).unwrap()
}

struct Run {
    fence: LeaderFence,
    leader: watch::Receiver<bool>,
    lost: Arc<AtomicU32>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

fn start(client: Client, lease: &str, identity: &str, timing: Timing) -> Run {
    let fence = LeaderFence::new(timing.renew_deadline);
    let elector = Elector {
        api: Api::namespaced(client, "default"),
        name: lease.into(),
        identity: identity.into(),
        timing,
        fence: fence.clone(),
    };
    let (leader_tx, leader) = watch::channel(false);
    let (stop, stop_rx) = watch::channel(false);
    let lost = Arc::new(AtomicU32::new(0));
    let l = lost.clone();
    let task = tokio::spawn(elector.run(leader_tx, stop_rx, move |t| {
        if t == Transition::Lost {
            l.fetch_add(1, Ordering::SeqCst);
        }
    }));
    Run { fence, leader, lost, stop, task }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_leader_stops_acting_before_the_standby_takes_over() {
    let apiserver = std::env::var("KPIPE_APISERVER").expect("source ~/.cache/kpipe/run/env first");
    let upstream = apiserver.trim_start_matches("https://").to_string();
    let p = proxy(upstream).await;
    let lease = format!("kpipe-leader-test-{}", std::process::id());
    let timing = Timing::for_lease(6).unwrap();

    let mut a = start(client_via(Some(p.port)).await, &lease, "replica-a", timing);
    tokio::time::timeout(Duration::from_secs(10), a.leader.wait_for(|l| *l)).await.unwrap().unwrap();
    let mut b = start(client_via(None).await, &lease, "replica-b", timing);
    // b follows while a renews.
    tokio::time::sleep(timing.lease_duration + timing.retry_period).await;
    assert!(*a.leader.borrow() && a.fence.may_act() && !*b.leader.borrow() && !b.fence.may_act());

    // Cut a off; sample both fences every 20 ms: never both open.
    p.set_cut(true);
    let cut_at = Instant::now();
    let (mut a_closed, mut b_open) = (None, None);
    while b_open.is_none() && cut_at.elapsed() < Duration::from_secs(30) {
        let (fa, fb) = (a.fence.may_act(), b.fence.may_act());
        assert!(!(fa && fb), "both replicas may write at {:?} after the cut", cut_at.elapsed());
        if !fa && a_closed.is_none() {
            a_closed = Some(cut_at.elapsed());
        }
        if fb {
            b_open = Some(cut_at.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (a_closed, b_open) = (a_closed.unwrap(), b_open.expect("standby never took over"));
    println!("cut → old leader fenced after {a_closed:?}, standby leading after {b_open:?}");
    assert!(a_closed <= timing.renew_deadline + Duration::from_millis(100), "{a_closed:?}");
    assert!(b_open >= timing.lease_duration - timing.retry_period, "took over too early: {b_open:?}");
    assert!(b_open <= timing.lease_duration + 2 * timing.retry_period + Duration::from_secs(1), "{b_open:?}");
    tokio::time::timeout(Duration::from_secs(5), a.leader.wait_for(|l| !*l)).await.unwrap().unwrap();
    assert_eq!(a.lost.load(Ordering::SeqCst), 1, "a logged and counted 'lost leadership'");

    // Reconnected, a sees b's valid lease and stays a follower.
    p.set_cut(false);
    tokio::time::sleep(timing.lease_duration).await;
    assert!(!a.fence.may_act() && !*a.leader.borrow() && b.fence.may_act());
    let api: Api<Lease> = Api::namespaced(client_via(None).await, "default");
    let spec = api.get(&lease).await.unwrap().spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("replica-b"));
    assert_eq!(spec.lease_transitions, Some(1));

    // b stops: it releases the lease, and a takes over within a few retries, not a lease duration.
    let _ = b.stop.send(true);
    tokio::time::timeout(Duration::from_secs(5), &mut b.task).await.unwrap().unwrap();
    let released = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), a.leader.wait_for(|l| *l)).await.unwrap().unwrap();
    println!("released → a leading after {:?}", released.elapsed());
    let _ = a.stop.send(true);
    tokio::time::timeout(Duration::from_secs(5), &mut a.task).await.unwrap().unwrap();
    let _ = api.delete(&lease, &DeleteParams::default()).await;
}

mod operators {
    //! Two operator processes (this build) with leader election; replica a reaches the apiserver
    //! through the blackholing proxy. Each replica writes with its own field manager, so every
    //! write the apiserver applied is attributable in `managedFields`.

    use std::time::{Duration, Instant};

    use k8s_openapi::api::apps::v1::Deployment;
    use kpipe_api::v1alpha1::ConsumerPipeline;
    use kpipe_e2e::testbed::{TestBed, await_condition, wait_for};
    use kube::api::{Api, ListParams, PostParams};

    use crate::common::Operator;

    /// An operator `id` of the lease in `ns` (6 s lease), with its own field manager.
    fn start(kubeconfig: &std::path::Path, ns: &str, id: &str) -> Operator {
        let extra = ["--leader-election", "--lease-namespace", ns, "--lease-duration", "6", "--identity", id];
        Operator::start(kubeconfig, ns, &[&extra[..], &["--field-manager", &format!("kpipe-{id}")]].concat())
    }

    fn pipeline(name: &str, bootstrap: &str, topic: &str) -> ConsumerPipeline {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "kpipe.io/v1alpha1", "kind": "ConsumerPipeline", "metadata": {"name": name},
            "spec": {"source": {"bootstrapServers": [bootstrap], "topics": [topic]}, "processor": {"noop": {}},
                     "scaling": {"pollInterval": "1s"}}
        }))
        .unwrap()
    }

    /// A proxy to the bed's apiserver and a kubeconfig (`$TMPDIR/kubeconfig-<name>`) that goes through it.
    async fn proxied(bed: &TestBed, name: &str) -> (super::Proxy, std::path::PathBuf) {
        let apiserver = bed.var("KPIPE_APISERVER").unwrap().to_string();
        let p = super::proxy(apiserver.trim_start_matches("https://").to_string()).await;
        let kubeconfig = std::env::temp_dir().join(format!("kubeconfig-{name}"));
        let text = std::fs::read_to_string(bed.kubeconfig()).unwrap();
        std::fs::write(&kubeconfig, text.replace(&apiserver, &format!("https://127.0.0.1:{}", p.port))).unwrap();
        (p, kubeconfig)
    }

    /// (manager, time) of every managedFields entry of the namespace's pipelines and Deployments.
    async fn writes(client: &kube::Client, ns: &str) -> Vec<(String, String, jiff::Timestamp)> {
        let mut out = Vec::new();
        let cps: Api<ConsumerPipeline> = Api::namespaced(client.clone(), ns);
        let deps: Api<Deployment> = Api::namespaced(client.clone(), ns);
        let metas: Vec<_> = cps
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|o| o.metadata)
            .chain(deps.list(&ListParams::default()).await.unwrap().items.into_iter().map(|o| o.metadata))
            .collect();
        for m in metas {
            for f in m.managed_fields.unwrap_or_default() {
                if let (Some(manager), Some(t)) = (f.manager, f.time) {
                    out.push((m.name.clone().unwrap_or_default(), manager, t.0));
                }
            }
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_operators_never_both_write_when_the_leader_is_cut_off() {
        let bed = TestBed::connect().await.unwrap();
        let ns_guard = bed.temp_namespace("op-ha").await.unwrap();
        let ns = ns_guard.name().to_string();
        let topic = format!("{ns}-in");
        bed.create_topic(&topic, 2).await.unwrap();
        let (p, kc_a) = proxied(&bed, &format!("{ns}-a")).await;

        let a = start(&kc_a, &ns, "op-a");
        wait_for("a leads", Duration::from_secs(30), || async {
            (a.metric("kpipe_operator_leader ").await? == 1.0).then_some(())
        })
        .await
        .unwrap();
        let b = start(&bed.kubeconfig(), &ns, "op-b");
        let client = bed.client();
        let cps: Api<ConsumerPipeline> = Api::namespaced(client.clone(), &ns);
        let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let exists = |d: Option<&Deployment>| d.is_some();
        cps.create(&PostParams::default(), &pipeline("one", bed.kafka_bootstrap(), &topic)).await.unwrap();
        await_condition(deps.clone(), "one-worker", "one-worker", Duration::from_secs(30), exists).await.unwrap();
        // a also wrote the pipeline's status (after its children) before the cut: the writes checked below.
        let written_by_a = |cp: Option<&ConsumerPipeline>| {
            cp.and_then(|cp| cp.metadata.managed_fields.as_ref())
                .is_some_and(|fields| fields.iter().any(|f| f.manager.as_deref() == Some("kpipe-op-a")))
        };
        await_condition(cps.clone(), "one", "one's status written by a", Duration::from_secs(30), written_by_a)
            .await
            .unwrap();
        assert_eq!(b.metric("kpipe_operator_leader ").await, Some(0.0));

        p.set_cut(true);
        let cut = Instant::now();
        let cut_wall = jiff::Timestamp::now();
        wait_for("b leads", Duration::from_secs(30), || async {
            (b.metric("kpipe_operator_leader ").await? == 1.0).then_some(())
        })
        .await
        .unwrap();
        let b_leads = cut.elapsed();
        let b_leads_wall = jiff::Timestamp::now();
        // Scaling continues under the new leader: a new pipeline gets its children from b.
        cps.create(&PostParams::default(), &pipeline("two", bed.kafka_bootstrap(), &topic)).await.unwrap();
        await_condition(deps.clone(), "two-worker", "two-worker", Duration::from_secs(30), exists).await.unwrap();
        let two = cut.elapsed();
        println!("cut → b leading after {b_leads:?}; new pipeline's Deployment after {two:?}");
        assert!(two <= Duration::from_secs(6 + 2 + 3), "new leader acted {two:?} after the cut (6 s lease)");

        // a reconnects: it must see b's lease and stay fenced.
        p.set_cut(false);
        tokio::time::sleep(Duration::from_secs(8)).await;
        assert_eq!(a.metric("kpipe_operator_leader ").await, Some(0.0));
        assert_eq!(a.metric("kpipe_operator_leader_transitions_total{transition=\"lost\"}").await, Some(1.0));
        let log_a = std::fs::read_to_string(&a.log).unwrap();
        assert!(log_a.contains("acquired leadership") && log_a.contains("lost leadership"), "{log_a}");

        // Every write a made was applied before b led (managedFields times have 1 s resolution), and b
        // wrote nothing before it led.
        let all = writes(&client, &ns).await;
        for (object, manager, t) in &all {
            if manager == "kpipe-op-a" {
                assert!(*t <= b_leads_wall, "{object}: a wrote at {t} after b led at {b_leads_wall}");
            }
            if manager == "kpipe-op-b" {
                assert!(*t >= cut_wall - jiff::SignedDuration::from_secs(1), "{object}: b wrote at {t} before the cut");
            }
        }
        assert!(all.iter().any(|(o, m, _)| o == "two" && m == "kpipe-op-b"), "{all:?}");
        assert!(all.iter().any(|(o, m, _)| o == "one" && m == "kpipe-op-a"), "{all:?}");
    }

    /// A new leader term, like a restart, starts with every pipeline reconciled at once while the caches of their
    /// children are still listing. Whatever order the lists complete in, no reconcile may sleep past the moment its
    /// caches are ready. (kube-runtime 5.0's `Store::wait_until_ready` wakes only its last concurrent waiter: with
    /// two reconciles waiting for the Deployment cache, one slept its whole 30 s timeout; `cache_ready`.) The
    /// operator's apiserver connections go through a proxy that delays each new connection by 0–1.5 s, so the
    /// order of the first lists changes from start to start; four starts with four pipelines.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_starting_operator_reconciles_every_pipeline_whichever_cache_lists_last() {
        let bed = TestBed::connect().await.unwrap();
        let ns_guard = bed.temp_namespace("op-start").await.unwrap();
        let ns = ns_guard.name().to_string();
        let topic = format!("{ns}-in");
        bed.create_topic(&topic, 1).await.unwrap();
        let (p, kc) = proxied(&bed, &format!("{ns}-jitter")).await;
        p.set_jitter(Duration::from_millis(1500));

        let cps: Api<ConsumerPipeline> = Api::namespaced(bed.client(), &ns);
        let names = ["p1", "p2", "p3", "p4"];
        for name in names {
            cps.create(&PostParams::default(), &pipeline(name, bed.kafka_bootstrap(), &topic)).await.unwrap();
        }
        let mut took = Vec::new();
        for start in 0..4 {
            let op = Operator::start(&kc, &ns, &[]);
            let started = Instant::now();
            // A pipeline's gauges appear with its first reconcile that got past its caches.
            let every = wait_for("every pipeline reconciled", Duration::from_secs(12), || async {
                for name in names {
                    let series =
                        format!("kpipe_operator_pipeline_worker_restarts{{namespace=\"{ns}\",pipeline=\"{name}\"}}");
                    op.metric(&series).await?;
                }
                Some(())
            })
            .await;
            let log = std::fs::read_to_string(&op.log).unwrap_or_default();
            let synced: Vec<&str> = log.lines().filter(|l| l.contains("cache synced")).collect();
            assert!(every.is_ok(), "start {start}: not every pipeline reconciled within 12 s; caches: {synced:#?}");
            took.push(started.elapsed());
        }
        println!("operator start → every pipeline reconciled: {took:?}");
    }
}
