//! kpipe worker: consumes a pipeline's topics as a member of its consumer group, processes each
//! assigned partition in its own task (ordering, batching, retries, dead-lettering), and commits
//! only offsets whose records are all done.
//!
//! Pure decision components (offset tracker, scheduler/batcher, backoff, failure classification)
//! are separate modules with their own tests; Kafka and HTTP I/O stay in `consumer`, `processor`
//! and `server`.

pub mod aimd;
pub mod backoff;
pub mod breaker;
pub mod classify;
pub mod config;
pub mod consumer;
pub mod health;
pub mod job;
pub mod kafka_config;
pub mod metrics;
pub mod partition;
pub mod processor;
pub mod record;
pub mod replay;
pub mod retry_after;
pub mod run;
pub mod scheduler;
pub mod server;
pub mod size;
pub mod tracker;
pub mod window;

/// Generated from `proto/kpipe/v1/records.proto`.
#[allow(clippy::all)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/kpipe.v1.rs"));
}
