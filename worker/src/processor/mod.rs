//! Processors: what a batch of records is handed to.

pub mod http;
pub mod kafka;
pub mod producer;

use std::sync::Arc;

use futures::future::BoxFuture;

use crate::classify::Failure;
use crate::record::Record;

/// Result of one processor call for a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOutcome {
    /// Every record succeeded except the listed ones (indices into the batch).
    Partial(Vec<(usize, Failure)>),
    /// The whole batch failed.
    Failed(Failure),
}

impl BatchOutcome {
    pub fn ok() -> Self {
        Self::Partial(Vec::new())
    }
}

pub trait Processor: Send + Sync {
    fn process<'a>(&'a self, records: &'a [Arc<Record>]) -> BoxFuture<'a, BatchOutcome>;
}

/// Counts and completes (benchmarks and smoke tests).
pub struct NoopProcessor;

impl Processor for NoopProcessor {
    fn process<'a>(&'a self, _records: &'a [Arc<Record>]) -> BoxFuture<'a, BatchOutcome> {
        Box::pin(async { BatchOutcome::ok() })
    }
}
