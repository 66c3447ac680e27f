//! `kpipe-operator`: reconciles ConsumerPipelines into worker Deployments and scales them on lag.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use clap::Parser;
use futures::future::join_all;
use k8s_openapi::api::core::v1::ResourceRequirements;
use kpipe_api::v1alpha1::ConsumerPipeline;
use kpipe_operator::build::{MANAGER, WorkerDefaults};
use kpipe_operator::controller::{self, Scope, Settings, Shared};
use kpipe_operator::leader::{self, Elector, LeaderFence, Timing, Transition};
use kpipe_operator::metrics::Metrics;
use kpipe_operator::replay::ReplayController;
use kube::Client;
use kube::api::{Api, ListParams};
use prometheus::{IntCounterVec, Opts};
use tokio::sync::watch;
use tracing::{error, info, warn};

/// Command line and environment of the operator.
#[derive(Parser, Debug, Clone)]
#[command(name = "kpipe-operator", version, about)]
struct Args {
    /// Namespaces to watch (comma-separated). Empty: all namespaces.
    #[arg(long, env = "KPIPE_NAMESPACES", value_delimiter = ',', default_value = "")]
    namespaces: Vec<String>,
    /// Default worker image (a pipeline's spec.worker.image wins).
    #[arg(long, env = "KPIPE_WORKER_IMAGE", default_value = "kpipe/worker:0.1.0")]
    worker_image: String,
    /// imagePullPolicy of worker containers (unset: the cluster default).
    #[arg(long, env = "KPIPE_WORKER_IMAGE_PULL_POLICY")]
    worker_image_pull_policy: Option<String>,
    /// Default worker resources as JSON, e.g. '{"requests":{"cpu":"100m","memory":"64Mi"}}'.
    #[arg(long, env = "KPIPE_WORKER_RESOURCES")]
    worker_resources: Option<String>,
    /// Address of the metrics/health server (/metrics, /healthz, /readyz).
    #[arg(long, env = "KPIPE_OPERATOR_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Run leader election on a coordination Lease; only the leader reconciles.
    #[arg(long, env = "KPIPE_LEADER_ELECTION", default_value_t = false)]
    leader_election: bool,
    /// Name of the leader-election Lease.
    #[arg(long, env = "KPIPE_LEASE_NAME", default_value = "kpipe-operator")]
    lease_name: String,
    /// Namespace of the Lease (default: KPIPE_POD_NAMESPACE / POD_NAMESPACE, else "default").
    #[arg(long, env = "KPIPE_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Lease duration in seconds (a standby takes over this long after the leader dies). The leader
    /// stops writing 2/3 of it after its last successful renew (client-go's 15 s / 10 s / 2 s).
    #[arg(long, env = "KPIPE_LEASE_DURATION", default_value_t = 15)]
    lease_duration: u64,
    /// Identity in the Lease and Events (default: KPIPE_POD_NAME / POD_NAME, else the hostname).
    #[arg(long, env = "KPIPE_IDENTITY")]
    identity: Option<String>,
    /// Field manager for server-side apply.
    #[arg(long, env = "KPIPE_FIELD_MANAGER", default_value = MANAGER)]
    field_manager: String,
    /// Timeout of one Kafka request of the lag probe, in seconds.
    #[arg(long, env = "KPIPE_PROBE_TIMEOUT", default_value_t = 5)]
    probe_timeout: u64,
    /// Polls with lag and an unchanged committed offset before a partition counts as stuck.
    #[arg(long, env = "KPIPE_STUCK_AFTER_POLLS", default_value_t = 6)]
    stuck_after_polls: u32,
    /// Log format: json or text.
    #[arg(long, env = "KPIPE_LOG_FORMAT", default_value = "json")]
    log_format: String,
}

#[derive(Clone)]
struct HttpState {
    metrics: Metrics,
    ready: Arc<AtomicBool>,
}

async fn serve(addr: SocketAddr, state: HttpState, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/metrics", get(|State(s): State<HttpState>| async move { s.metrics.render() }))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(s): State<HttpState>| async move {
                if s.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "starting")
                }
            }),
        )
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    info!(%addr, "metrics and health server listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
        .context("metrics server")
}

fn scopes(namespaces: &[String]) -> Vec<Scope> {
    let list: Vec<String> = namespaces.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    if list.is_empty() { vec![Scope::All] } else { list.into_iter().map(Scope::Namespace).collect() }
}

/// Run the controllers (and the dead-letter reader, `kpipe_operator::deadletters`, and the DeadLetterReplay
/// controller, `kpipe_operator::replay`) until `stop` turns true.
async fn run_controllers(shared: Arc<Shared>, scopes: Vec<Scope>, stop: watch::Receiver<bool>) {
    // The reader was reset with the rest of the term's state (`Shared::reset`): the reconciles of this term register
    // the pipelines again, and counting resumes from the offsets their status records.
    let dead_letters = shared.dead_letters.clone().run(stop.clone());
    let replays = Arc::new(ReplayController::new(
        shared.client.clone(),
        shared.fence.clone(),
        shared.settings.probe_timeout,
        shared.settings.worker.clone(),
    ));
    let replays = replays.run(scopes.clone(), stop.clone());
    let runs = scopes.into_iter().map(|scope| {
        let mut stop = stop.clone();
        controller::run(shared.clone(), scope, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
    });
    futures::future::join3(join_all(runs), dead_letters, replays).await;
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn,rdkafka=warn"));
    if args.log_format == "text" {
        // Colour only on a terminal: text logs in files and `kubectl logs` must not carry escape codes.
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
        tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).init();
    } else {
        tracing_subscriber::fmt().json().with_env_filter(filter).init();
    }
    let resources: Option<ResourceRequirements> = match &args.worker_resources {
        Some(json) if !json.trim().is_empty() => {
            Some(serde_json::from_str(json).context("--worker-resources is not a ResourceRequirements JSON")?)
        }
        _ => None,
    };
    let identity = args
        .identity
        .clone()
        .or_else(|| std::env::var("KPIPE_POD_NAME").ok())
        .or_else(|| std::env::var("POD_NAME").ok())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("kpipe-operator-{}", std::process::id()));

    let metrics = Metrics::new();
    let ready = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = watch::channel(false);
    let server =
        tokio::spawn(serve(args.listen, HttpState { metrics: metrics.clone(), ready: ready.clone() }, stop_rx.clone()));

    let client = Client::try_default().await.context("creating the Kubernetes client")?;
    // The CRD must be installed and readable before anything starts.
    let scopes = scopes(&args.namespaces);
    for scope in &scopes {
        let api: Api<ConsumerPipeline> = match scope {
            Scope::All => Api::all(client.clone()),
            Scope::Namespace(ns) => Api::namespaced(client.clone(), ns),
        };
        api.list(&ListParams::default().limit(1)).await.with_context(|| {
            format!("listing ConsumerPipelines ({scope:?}): is the CRD installed and RBAC granted?")
        })?;
    }
    let settings = Settings {
        field_manager: args.field_manager.clone(),
        worker: WorkerDefaults {
            image: args.worker_image.clone(),
            resources,
            image_pull_policy: args.worker_image_pull_policy.clone(),
        },
        probe_timeout: Duration::from_secs(args.probe_timeout.max(1)),
        stuck_after_polls: args.stuck_after_polls,
    };
    let timing = Timing::for_lease(args.lease_duration.max(2)).context("leader election timing")?;
    let fence = if args.leader_election { LeaderFence::new(timing.renew_deadline) } else { LeaderFence::always() };
    let shared = Arc::new(
        Shared::new(client.clone(), settings, metrics.clone(), Some(identity.clone())).with_fence(fence.clone()),
    );
    {
        let probe = shared.probe.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                probe.evict_idle();
            }
        });
    }
    let signal_tx = stop_tx.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        info!("shutdown signal received");
        let _ = signal_tx.send(true);
    });

    if !args.leader_election {
        ready.store(true, Ordering::Relaxed);
        metrics.leader.set(1);
        run_controllers(shared, scopes, stop_rx.clone()).await;
    } else {
        let lease_ns = args
            .lease_namespace
            .clone()
            .or_else(|| std::env::var("KPIPE_POD_NAMESPACE").ok())
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .unwrap_or_else(|| "default".into());
        let transitions = IntCounterVec::new(
            Opts::new("kpipe_operator_leader_transitions_total", "Leadership acquired or lost by this replica"),
            &["transition"],
        )
        .context("defining kpipe_operator_leader_transitions_total")?;
        metrics.registry.register(Box::new(transitions.clone())).context("registering leader transitions")?;
        let elector = Elector {
            api: leader::lease_api(client.clone(), &lease_ns),
            name: args.lease_name.clone(),
            identity: identity.clone(),
            timing,
            fence: fence.clone(),
        };
        let (leader_tx, mut leader_rx) = watch::channel(false);
        let lease_task = tokio::spawn(elector.run(leader_tx, stop_rx.clone(), move |t| {
            transitions.with_label_values(&[if t == Transition::Acquired { "acquired" } else { "lost" }]).inc();
        }));
        info!(lease = %format!("{lease_ns}/{}", args.lease_name), %identity, ?timing, "leader election started");
        ready.store(true, Ordering::Relaxed);
        let mut stop = stop_rx.clone();
        loop {
            // Standby: wait for leadership or shutdown.
            tokio::select! {
                r = leader_rx.wait_for(|l| *l) => if r.is_err() { warn!("leader election stopped"); break; },
                _ = stop.wait_for(|s| *s) => break,
            }
            // A new term starts from observed state, not from what an earlier term remembered.
            shared.reset();
            info!(%identity, "starting controllers");
            metrics.leader.set(1);
            let (lost_tx, lost_rx) = watch::channel(false);
            let mut controllers = tokio::spawn(run_controllers(shared.clone(), scopes.clone(), lost_rx));
            tokio::select! {
                _ = leader_rx.wait_for(|l| !*l) => warn!(%identity, "stopping controllers"),
                _ = stop.wait_for(|s| *s) => {}
            }
            metrics.leader.set(0);
            let _ = lost_tx.send(true);
            if tokio::time::timeout(Duration::from_secs(10), &mut controllers).await.is_err() {
                // Aborted, never detached: a detached set would keep reconciling beside the next term's.
                error!("controllers did not stop in time; aborting them");
                controllers.abort();
                let _ = controllers.await;
            }
            if *stop.borrow() {
                break;
            }
        }
        // The election loop releases a held lease when `stop` turns true.
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), lease_task).await;
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    info!("stopped");
    Ok(())
}
