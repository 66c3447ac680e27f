//! `kpipe-worker`: runs one ConsumerPipeline's worker. See `kpipe_worker` for the design.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use kpipe_api::worker_contract::{
    ENV_CONFIG, ENV_LISTEN, ENV_OIDC_CLIENT_ID, ENV_OIDC_CLIENT_SECRET, ENV_POD_NAME, ENV_SASL_PASSWORD,
    ENV_SASL_USERNAME, ENV_SHUTDOWN_TIMEOUT,
};
use kpipe_worker::config::{load_config, parse_duration_env};
use kpipe_worker::kafka_config::Env;
use kpipe_worker::run::{RunSettings, run};
use tokio_util::sync::CancellationToken;

// Records are allocated on the consumer thread and freed on runtime threads; mimalloc handles
// that pattern with less CPU and far less fragmentation (flat RSS) than glibc's per-thread arenas.
// With the `override` feature it is also malloc/free for the C libraries (librdkafka allocates
// and frees several blocks per consumed record: 13 % of the worker's instructions went to glibc's
// allocator, docs/BENCHMARKS.md "Fewer stalls, pauses and allocator work"). Its v2 line returns
// freed memory within 10 ms where v3 keeps it for a second, and `no_thp` keeps transparent huge
// pages from inflating RSS: a noop drain's peak RSS was 123 MiB with v2, 135-146 MiB with v3.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "kpipe-worker", version, about = "kpipe worker: processes a ConsumerPipeline's records")]
struct Args {
    /// Path of the worker configuration document (JSON as written by the operator; `.yaml`/`.yml`
    /// files are read as YAML).
    #[arg(long, env = ENV_CONFIG, default_value = "/etc/kpipe/config/pipeline.json")]
    config: PathBuf,
    /// Address of the /metrics, /healthz and /readyz server.
    #[arg(long, env = ENV_LISTEN, default_value = "0.0.0.0:9090")]
    listen: SocketAddr,
    /// After SIGTERM (and on partition revocation), how long in-flight batches may finish before
    /// they are abandoned uncommitted. Keep it below the pod's termination grace period.
    #[arg(long, env = ENV_SHUTDOWN_TIMEOUT, default_value = "20s")]
    shutdown_timeout: String,
    /// How often done offsets are committed. Commits are synchronous, sent by a committer thread so the poll
    /// thread never waits for the broker; partitions near their uncommitted bound ask for one earlier.
    #[arg(long, env = "KPIPE_COMMIT_INTERVAL", default_value = "1s")]
    commit_interval: String,
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,librdkafka=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stdout);
    // Human-readable on a terminal, JSON lines for log collectors otherwise.
    if std::io::stdout().is_terminal() {
        builder.init();
    } else {
        builder.json().flatten_event(true).init();
    }
}

fn main() -> ExitCode {
    init_tracing();
    let args = Args::parse();
    let config = match load_config(&args.config) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("kpipe-worker: {e}");
            return ExitCode::from(2);
        }
    };
    let durations = parse_duration_env(ENV_SHUTDOWN_TIMEOUT, &args.shutdown_timeout)
        .and_then(|s| parse_duration_env("KPIPE_COMMIT_INTERVAL", &args.commit_interval).map(|c| (s, c)));
    let (shutdown_timeout, commit_interval) = match durations {
        Ok(d) => d,
        Err(e) => {
            eprintln!("kpipe-worker: {e}");
            return ExitCode::from(2);
        }
    };
    let settings = RunSettings {
        listen: args.listen,
        shutdown_timeout,
        commit_interval: commit_interval.max(Duration::from_millis(10)),
        env: Env {
            sasl_username: std::env::var(ENV_SASL_USERNAME).ok(),
            sasl_password: std::env::var(ENV_SASL_PASSWORD).ok(),
            oidc_client_id: std::env::var(ENV_OIDC_CLIENT_ID).ok(),
            oidc_client_secret: std::env::var(ENV_OIDC_CLIENT_SECRET).ok(),
            pod_name: std::env::var(ENV_POD_NAME).ok(),
        },
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kpipe-worker: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Replay mode (a DeadLetterReplay's Job): re-process the dead letters once and exit.
    if let Ok(plan) = std::env::var(kpipe_api::replay::ENV_REPLAY_PLAN) {
        let replayed = runtime.block_on(kpipe_worker::replay::run(config, &plan, settings.env));
        return match replayed {
            Ok(p) => {
                println!(
                    "replay finished: replayed {} succeeded {} failedAgain {} skipped {}",
                    p.replayed, p.succeeded, p.failed_again, p.skipped
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!("{e}");
                eprintln!("kpipe-worker: replay: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let result = runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(wait_for_signal(shutdown.clone()));
        run(config, settings, shutdown).await
    });
    match result {
        Ok(()) => {
            tracing::info!("worker stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("kpipe-worker: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn wait_for_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            tracing::error!("cannot install signal handlers");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
        _ = shutdown.cancelled() => return,
    }
    shutdown.cancel();
}
