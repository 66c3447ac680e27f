//! Wakes librdkafka's fetchers after partitions are resumed.
//!
//! librdkafka serves a resume on its main thread and does not wake the broker thread that fetches the partition
//! (librdkafka 2.12: `rd_kafka_toppar_pause_resume` in rdkafka_partition.c). A broker thread whose partitions were all
//! paused has nothing to fetch, so it sleeps until I/O, an operation for it, or its 1 s idle timeout
//! (`rd_kafka_broker_consumer_serve` in rdkafka_broker.c), and only then sees the resumed partitions. A worker whose
//! every partition was paused for backpressure (a saturated `concurrency.perWorker`) therefore idled up to 1 s after
//! each resume: a Kafka forwarder spent more than half its time so (measured: 2M records in 15.0 s, 6.1 s with the
//! fetchers woken; docs/BENCHMARKS.md).
//!
//! Any request through a broker thread makes it look at its partitions again. After a resume, a ListOffsets request
//! for the resumed partitions (latest offsets; librdkafka sends one request per partition leader) wakes exactly the
//! broker threads that fetch them. It runs on its own thread, since it waits for the brokers' replies, and requests
//! that arrive meanwhile are merged into the next one. A failed request changes nothing: the broker thread then
//! wakes at its timeout, as without this.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};

/// How long one wake-up request may wait for the brokers' replies.
const WAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// Partitions (topic, partition) that were just resumed.
pub(super) type Resumed = Vec<(String, i32)>;

/// A thread that wakes the broker threads fetching resumed partitions.
pub(super) struct FetchWaker {
    requests: Sender<Resumed>,
    thread: JoinHandle<()>,
}

impl FetchWaker {
    /// Starts the thread; `None` when the OS refuses one (resumed partitions then wait for librdkafka's timeout).
    pub(super) fn start<C: ConsumerContext + 'static>(consumer: Arc<BaseConsumer<C>>) -> Option<Self> {
        let (requests, received) = channel::<Resumed>();
        let thread = std::thread::Builder::new()
            .name("kpipe-fetch-waker".into())
            .spawn(move || serve(&consumer, &received))
            .map_err(|e| tracing::warn!("cannot start the fetch waker thread: {e}"))
            .ok()?;
        Some(Self { requests, thread })
    }

    /// Asks for the fetchers of `resumed` to be woken (returns at once).
    pub(super) fn wake(&self, resumed: Resumed) {
        if !resumed.is_empty() {
            // The thread ends only when this sender is dropped.
            let _ = self.requests.send(resumed);
        }
    }

    /// Ends the thread after the request it is serving; it holds a consumer handle, so this comes before the
    /// consumer is closed.
    pub(super) fn stop(self) {
        drop(self.requests);
        if self.thread.join().is_err() {
            tracing::error!("fetch waker thread panicked");
        }
    }
}

fn serve<C: ConsumerContext>(consumer: &BaseConsumer<C>, requests: &Receiver<Resumed>) {
    while let Ok(mut resumed) = requests.recv() {
        while let Ok(more) = requests.try_recv() {
            resumed.extend(more);
        }
        let tpl = latest_offsets_request(resumed);
        if let Err(e) = consumer.offsets_for_times(tpl, WAKE_TIMEOUT) {
            tracing::debug!("waking the fetchers of resumed partitions: {e}");
        }
    }
}

/// The ListOffsets request for `resumed` (each partition once; `Offset::End` asks for the latest offset).
fn latest_offsets_request(mut resumed: Resumed) -> TopicPartitionList {
    resumed.sort_unstable();
    resumed.dedup();
    let mut tpl = TopicPartitionList::with_capacity(resumed.len());
    for (topic, partition) in &resumed {
        // Only fails for a logical offset librdkafka cannot represent; `End` is one it can.
        let _ = tpl.add_partition_offset(topic, *partition, Offset::End);
    }
    tpl
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wake_up_names_each_resumed_partition_once_at_its_latest_offset() {
        let tpl = latest_offsets_request(vec![("b".into(), 1), ("a".into(), 2), ("b".into(), 1), ("a".into(), 0)]);
        let listed: Vec<(String, i32, Offset)> =
            tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition(), e.offset())).collect();
        assert_eq!(
            listed,
            vec![("a".into(), 0, Offset::End), ("a".into(), 2, Offset::End), ("b".into(), 1, Offset::End)]
        );
    }
}
