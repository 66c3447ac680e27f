//! Wiring: builds the clients, processor and tasks from the configuration and runs the worker
//! until the shutdown token fires.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kpipe_api::v1alpha1::{OnFailure, Processor as ProcessorSpec};
use kpipe_api::worker_contract::WorkerConfig;
use rdkafka::consumer::BaseConsumer;
use rdkafka::error::KafkaError;
use tokio_util::sync::CancellationToken;

use crate::aimd::ConcurrencyLimiter;
use crate::backoff::BackoffPolicy;
use crate::breaker::{BreakerSettings, CircuitBreaker};
use crate::consumer::{ConsumerLoop, Dispatch, StartPolicy, WorkerContext};
use crate::health::Health;
use crate::job::JobContext;
use crate::kafka_config::{self, Env};
use crate::metrics::{Metrics, MetricsError};
use crate::partition::PartitionSettings;
use crate::processor::http::{HttpBuildError, HttpProcessor};
use crate::processor::kafka::{DeadLetterSink, KafkaDeadLetter, KafkaForwarder, TopicLimits};
use crate::processor::producer::KafkaProducer;
use crate::processor::{NoopProcessor, Processor};
use crate::scheduler::BatchLimits;
use crate::server::{self, ServerError};
use crate::size;

/// Process-level settings that come from flags/env rather than the config document.
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub listen: SocketAddr,
    pub shutdown_timeout: Duration,
    pub commit_interval: Duration,
    pub env: Env,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error(transparent)]
    Http(#[from] HttpBuildError),
    #[error("cannot create Kafka {what}: {source}")]
    Kafka { what: &'static str, source: KafkaError },
    #[error("cannot start the consumer thread: {0}")]
    Thread(std::io::Error),
    #[error("the consumer thread panicked")]
    ThreadPanicked,
    #[error("cannot subscribe to the source topics: {0}")]
    Subscribe(KafkaError),
}

pub fn partition_settings(config: &WorkerConfig, drain_timeout: Duration) -> PartitionSettings {
    let spec = &config.spec;
    let concurrency = spec.effective_concurrency();
    let per_partition = concurrency.per_partition as usize;
    let per_worker = concurrency.per_worker as usize;
    // A batch never needs more permits than exist, or it would wait forever.
    let max_records = (spec.batch.max_records as usize).clamp(1, per_partition.min(per_worker).max(1));
    let max_bytes = spec.batch.max_bytes.as_u64().max(1);
    PartitionSettings {
        ordering: spec.ordering,
        limits: BatchLimits { max_records, max_bytes, max_wait: spec.batch.max_wait.as_std() },
        per_partition,
        max_pending_records: (2 * max_records).max(per_partition).max(256),
        max_pending_bytes: (2 * max_bytes).max(1 << 20),
        drain_timeout,
        max_uncommitted: (concurrency.uncommitted_per_partition as usize).max(1),
    }
}

/// The pipeline's processor (the kafka forwarder needs `producer`; without one it is a no-op).
pub fn processor_for(
    config: &WorkerConfig,
    producer: Option<&Arc<KafkaProducer>>,
    limits: &Arc<TopicLimits>,
    metrics: &Metrics,
) -> Result<Arc<dyn Processor>, RunError> {
    let spec = &config.spec;
    Ok(match (&spec.processor.kind, producer) {
        (ProcessorSpec::Http(h), _) => {
            Arc::new(HttpProcessor::new(h, &config.namespace, &config.pipeline)?.with_ordering(spec.ordering))
        }
        (ProcessorSpec::Kafka(k), Some(p)) => {
            Arc::new(KafkaForwarder::new(p.clone(), k, limits.clone(), metrics.clone()))
        }
        _ => Arc::new(NoopProcessor),
    })
}

/// Runs the worker until `shutdown` is cancelled (or the consumer fails to start).
pub async fn run(config: WorkerConfig, settings: RunSettings, shutdown: CancellationToken) -> Result<(), RunError> {
    let metrics = Metrics::new()?;
    let health = Arc::new(Health::default());
    let listener = server::bind(settings.listen).await?;
    tracing::info!(listen = %settings.listen, "serving /metrics, /healthz, /readyz");
    // The server outlives the drain after SIGTERM so metrics stay scrapable until the end.
    let server_stop = CancellationToken::new();
    let server = tokio::spawn(server::serve(listener, metrics.clone(), health.clone(), server_stop.clone()));

    let spec = &config.spec;
    let per_worker = spec.effective_concurrency().per_worker;
    let needs_producer = matches!(spec.processor.kind, ProcessorSpec::Kafka(_)) || spec.dead_letter.is_some();
    // Its message.max.bytes is PRODUCER_MESSAGE_MAX_BYTES: the topics' max.message.bytes decides what fits.
    let mut producer_config = kafka_config::producer(&config, &settings.env);
    let (producer, limits): (Option<Arc<KafkaProducer>>, Arc<TopicLimits>) = if needs_producer {
        let admin = producer_config.create().map_err(|source| RunError::Kafka { what: "admin client", source })?;
        let limits = Arc::new(TopicLimits::new(Some(admin)));
        // librdkafka batches records up to batch.size (default 1,000,000) per partition; a batch above a
        // topic's max.message.bytes is refused whole, so batches stay within the smallest target limit.
        let mut targets: Vec<&str> = Vec::new();
        if let ProcessorSpec::Kafka(k) = &spec.processor.kind {
            targets.push(&k.topic);
        }
        if let Some(dl) = &spec.dead_letter {
            targets.push(&dl.topic);
        }
        let smallest = limits.smallest(&targets).await;
        let batch_size = producer_config.get("batch.size").and_then(|v| v.parse::<u64>().ok()).unwrap_or(1_000_000);
        if smallest.saturating_sub(size::BATCH_OVERHEAD) < batch_size {
            let capped = smallest.saturating_sub(size::BATCH_OVERHEAD).max(1);
            tracing::info!(batch_size = capped, "producer batch.size capped by the target topics' max.message.bytes");
            producer_config.set("batch.size", capped.to_string());
        }
        let producer =
            KafkaProducer::new(&producer_config).map_err(|source| RunError::Kafka { what: "producer", source })?;
        (Some(Arc::new(producer)), limits)
    } else {
        (None, Arc::new(TopicLimits::new(None)))
    };
    let processor = processor_for(&config, producer.as_ref(), &limits, &metrics)?;
    // Downstream health gates (crate::breaker, crate::aimd): for processors that can be unavailable.
    let guarded = !matches!(spec.processor.kind, ProcessorSpec::Noop(_));
    let on_failure = spec.effective_on_failure();
    let dead_letter: Option<Arc<dyn DeadLetterSink>> = match (&spec.dead_letter, &producer) {
        (Some(dl), Some(p)) if on_failure == OnFailure::DeadLetter => Some(Arc::new(KafkaDeadLetter {
            producer: p.clone(),
            topic: dl.topic.clone(),
            pipeline: config.pipeline.clone(),
            limits: limits.clone(),
        })),
        _ => None,
    };
    let backoff = BackoffPolicy::from(&spec.retry);
    // `None`: spec.processor.circuitBreaker.enabled is false.
    let breaker_settings = BreakerSettings::from_spec(spec.processor.circuit_breaker.as_ref(), backoff.max_attempts);
    let jobs = Arc::new(JobContext {
        processor,
        dead_letter,
        on_failure,
        backoff,
        metrics: metrics.clone(),
        health: health.clone(),
        breaker: breaker_settings
            .filter(|_| guarded)
            .map(|settings| Arc::new(CircuitBreaker::new(settings, metrics.clone(), health.clone()))),
        limiter: guarded.then(|| Arc::new(ConcurrencyLimiter::new(1, per_worker as usize, metrics.clone()))),
    });
    if !guarded {
        // Not gated (noop): the limit is the configured one.
        metrics.concurrency_limit.set(i64::from(per_worker));
    }
    let dispatch = Arc::new(Dispatch::new(
        tokio::runtime::Handle::current(),
        partition_settings(&config, settings.shutdown_timeout),
        jobs,
        per_worker as usize,
        metrics.clone(),
        health.clone(),
        StartPolicy { start_offset: spec.source.start_offset, started_at_ms: config.started_at_ms },
    ));
    let consumer: BaseConsumer<WorkerContext> = kafka_config::consumer(&config, &settings.env)
        .create_with_context(WorkerContext::new(dispatch.clone(), config.spec.source.group_protocol))
        .map_err(|source| RunError::Kafka { what: "consumer", source })?;
    let consumer_loop = ConsumerLoop {
        consumer: Arc::new(consumer),
        dispatch,
        topics: spec.source.topics.clone(),
        commit_interval: settings.commit_interval,
        shutdown: shutdown.clone(),
    };
    tracing::info!(namespace = %config.namespace, pipeline = %config.pipeline, group = %config.group_id,
        topics = ?spec.source.topics, ordering = ?spec.ordering, on_failure = ?on_failure, "worker starting");
    let thread = std::thread::Builder::new()
        .name("kpipe-consumer".into())
        .spawn(move || consumer_loop.run())
        .map_err(RunError::Thread)?;
    // Wait for the consumer thread without blocking a runtime worker.
    let joined = tokio::task::spawn_blocking(move || thread.join()).await;
    server_stop.cancel();
    if let Some(p) = producer {
        // Anything still queued was not acknowledged, so its record was not committed either.
        let _ = tokio::task::spawn_blocking(move || p.flush(Duration::from_secs(5))).await;
    }
    if let Ok(Err(e)) = server.await {
        tracing::warn!("{e}");
    }
    match joined {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(RunError::Subscribe(e)),
        _ => Err(RunError::ThreadPanicked),
    }
}
