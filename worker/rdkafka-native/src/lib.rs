//! kpipe's only direct calls into librdkafka's C API. The workspace forbids `unsafe` everywhere else; this crate
//! allows it for two things rust-rdkafka 0.39 does not offer:
//!
//! - **Header copies that never panic on data** ([`copy_headers`]). rust-rdkafka's `Headers::try_get` unwraps the
//!   UTF-8 conversion of a header name. The Kafka protocol does not check header names (Go clients write any bytes),
//!   so one record with a non-UTF-8 header key panicked the consumer thread, and the worker crash-looped on that
//!   record forever. Here a key that is not UTF-8 is converted lossily (U+FFFD) and counted; the value is kept.
//! - **Batch consumption** ([`FetchQueue`]): every assigned partition's fetch queue is forwarded to one queue of our
//!   own, read with `rd_kafka_consume_batch_queue`. A per-message `rd_kafka_queue_poll` wraps each record in an event
//!   (and rust-rdkafka in an `Arc`); a batch takes up to `max` records in one call. Rebalances, errors, statistics and
//!   commit callbacks stay on the consumer queue, served by `BaseConsumer::poll`: served by the batch call they would
//!   bypass rust-rdkafka's rebalance handling (librdkafka would unassign everything instead).
//!
//! Rules kept in this file: every `unsafe` block says why it is sound (`SAFETY:`, enforced by clippy's
//! `undocumented_unsafe_blocks`); messages taken from librdkafka are owned by one type, [`MessageBatch`], which
//! destroys them after the caller's closure has seen them, also when it panics; a [`FetchQueue`] keeps its consumer
//! alive, so its queue is always destroyed before the client it belongs to. `tests/leaks.rs` runs a consumer under
//! valgrind's leak checker.

// The one exception to the workspace's `forbid(unsafe_code)` (Cargo.toml of this crate: `deny`, lifted here).
#![allow(unsafe_code)]

use std::borrow::Cow;
use std::ffi::{CStr, CString, c_char, c_void};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::TopicPartitionList;
use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::BorrowedMessage;
use rdkafka::types::RDKafkaRespErr;

/// A header copied out of a record: its key and its value (`None` is a null value, distinct from an empty one).
pub type Header = (String, Option<Vec<u8>>);

/// The headers of one record, in order, with the number of keys that were not UTF-8 (converted with U+FFFD).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopiedHeaders {
    pub headers: Vec<Header>,
    pub lossy_keys: usize,
}

/// Copies the headers of a consumed message. Never panics: see the crate docs.
pub fn copy_headers(message: &BorrowedMessage<'_>) -> CopiedHeaders {
    // SAFETY: a `BorrowedMessage` keeps its librdkafka message alive for as long as it is borrowed.
    unsafe { copy_headers_raw(message.ptr()) }
}

/// # Safety
/// `message` points to a live `rd_kafka_message_t` for the duration of the call.
unsafe fn copy_headers_raw(message: *const rd::rd_kafka_message_t) -> CopiedHeaders {
    let mut headers: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: the message is live (the caller's promise) and `headers` is a valid out-pointer; the header list it
    // returns is owned by the message and parsed at most once.
    let err = unsafe { rd::rd_kafka_message_headers(message, &mut headers) };
    if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR || headers.is_null() {
        // _NOENT: the record has no headers.
        return CopiedHeaders::default();
    }
    // SAFETY: `headers` is the message's header list, valid while the message is.
    let count = unsafe { rd::rd_kafka_header_cnt(headers) };
    let mut out = CopiedHeaders { headers: Vec::with_capacity(count), lossy_keys: 0 };
    for index in 0..count {
        let mut name: *const c_char = std::ptr::null();
        let mut value: *const c_void = std::ptr::null();
        let mut size = 0usize;
        // SAFETY: `headers` is valid, `index` is below its count, and the three out-pointers are valid.
        let err = unsafe { rd::rd_kafka_header_get_all(headers, index, &mut name, &mut value, &mut size) };
        if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            continue;
        }
        // SAFETY: librdkafka stores every header name NUL-terminated, owned by the header list.
        let name = unsafe { CStr::from_ptr(name) }.to_bytes();
        let key = match String::from_utf8_lossy(name) {
            Cow::Borrowed(key) => key.to_owned(),
            Cow::Owned(key) => {
                out.lossy_keys += 1;
                key
            }
        };
        // SAFETY: a non-null value points to `size` bytes owned by the header list.
        let value =
            (!value.is_null()).then(|| unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) }.to_vec());
        out.headers.push((key, value));
    }
    out
}

/// Why partitions could not be forwarded to a [`FetchQueue`]. Their records then stay on the consumer queue, where
/// `BaseConsumer::poll` returns them: slower, nothing lost.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("topic name {0:?} contains a NUL byte")]
    TopicName(String),
    #[error("librdkafka has no queue for {topic} [{partition}]")]
    NoPartitionQueue { topic: String, partition: i32 },
}

/// One librdkafka queue that assigned partitions' fetch queues forward to, read in batches. See the crate docs.
///
/// Keeps its consumer alive (`Arc`): librdkafka requires a queue to be destroyed before its client. A consumer
/// context that holds the queue (to forward partitions in its rebalance callback) forms a cycle with it, which the
/// owner breaks by dropping the queue before it closes the consumer.
pub struct FetchQueue<C: ConsumerContext + 'static> {
    queue: NonNull<rd::rd_kafka_queue_t>,
    consumer: Arc<BaseConsumer<C>>,
}

// SAFETY: every librdkafka queue operation used here (forward, consume, yield, destroy) takes the queue's own lock,
// and the client it belongs to is thread-safe; the handle itself is a plain pointer librdkafka reference-counts.
unsafe impl<C: ConsumerContext + 'static> Send for FetchQueue<C> {}
// SAFETY: as for `Send`: shared references only call librdkafka's locked queue functions.
unsafe impl<C: ConsumerContext + 'static> Sync for FetchQueue<C> {}

impl<C: ConsumerContext + 'static> FetchQueue<C> {
    /// A new, empty queue of `consumer`'s client. `None` only if librdkafka cannot allocate one.
    pub fn new(consumer: Arc<BaseConsumer<C>>) -> Option<Self> {
        // SAFETY: the client pointer is valid while `consumer` lives, and the queue keeps `consumer`.
        let queue = unsafe { rd::rd_kafka_queue_new(consumer.client().native_ptr()) };
        NonNull::new(queue).map(|queue| Self { queue, consumer })
    }

    /// The consumer this queue belongs to.
    pub fn consumer(&self) -> &Arc<BaseConsumer<C>> {
        &self.consumer
    }

    /// Forwards the fetch queues of `partitions` to this queue. Call it before the partitions are assigned: librdkafka
    /// forwards a partition's queue to the consumer queue when it starts fetching, unless the application forwarded
    /// it already (`RD_KAFKA_Q_F_FWD_APP`), so records fetched before the call would be on the consumer queue.
    /// Forwarding a partition twice is harmless. Stops at the first partition it cannot forward.
    pub fn forward(&self, partitions: &TopicPartitionList) -> Result<(), ForwardError> {
        let client = self.consumer.client().native_ptr();
        for element in partitions.elements() {
            let topic =
                CString::new(element.topic()).map_err(|_| ForwardError::TopicName(element.topic().to_owned()))?;
            // SAFETY: the client is alive (we hold its consumer) and `topic` is NUL-terminated; librdkafka returns a
            // new reference to the partition's queue (creating the partition object if needed) or null.
            let partition_queue =
                unsafe { rd::rd_kafka_queue_get_partition(client, topic.as_ptr(), element.partition()) };
            let Some(partition_queue) = NonNull::new(partition_queue) else {
                return Err(ForwardError::NoPartitionQueue {
                    topic: element.topic().to_owned(),
                    partition: element.partition(),
                });
            };
            // SAFETY: both queues are live references of the same client; the forward holds its own reference to
            // our queue.
            unsafe { rd::rd_kafka_queue_forward(partition_queue.as_ptr(), self.queue.as_ptr()) };
            // SAFETY: releases the reference `rd_kafka_queue_get_partition` returned; the partition keeps its queue
            // and the forward.
            unsafe { rd::rd_kafka_queue_destroy(partition_queue.as_ptr()) };
        }
        Ok(())
    }

    /// Makes a [`FetchQueue::consume`] that is waiting return at once (or the next one, if none is waiting).
    pub fn wake(&self) {
        // SAFETY: the queue is live while `self` is.
        unsafe { rd::rd_kafka_queue_yield(self.queue.as_ptr()) };
    }

    /// Waits up to `timeout` for a first record, then takes what else is queued, up to the batch's capacity, without
    /// waiting, and hands each to `each` in queue order (per partition, offset order); then destroys them. Returns
    /// how many it took. Outdated records (of a partition revoked, paused or seeked since they were fetched) are
    /// dropped by librdkafka, as `poll` does.
    ///
    /// Two calls because `rd_kafka_consume_batch_queue` waits until the batch is full or `timeout` is up: one call
    /// would hold a trickle of records back by up to `timeout`.
    pub fn consume(&self, batch: &mut MessageBatch, timeout: Duration, each: impl FnMut(FetchedMessage<'_>)) -> usize {
        let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        batch.taken.clear();
        let capacity = batch.taken.capacity();
        let first = if timeout_ms > 0 {
            let first = self.take(batch, 0, 1, timeout_ms);
            if first == 0 {
                return 0;
            }
            first
        } else {
            0
        };
        let rest = self.take(batch, first, capacity - first, 0);
        let n = first + rest;
        // SAFETY: the two calls initialised the first `n` (≤ capacity) elements with messages we now own.
        unsafe { batch.taken.set_len(n) };
        batch.hand_out(each);
        n
    }

    /// Takes up to `max` messages into `batch.taken[at..]`, waiting up to `timeout_ms` until there are `max`.
    fn take(&self, batch: &mut MessageBatch, at: usize, max: usize, timeout_ms: i32) -> usize {
        if max == 0 || at + max > batch.taken.capacity() {
            return 0;
        }
        // SAFETY: `at + max` ≤ capacity, so the array from `at` has room for `max` pointers; the queue is live, and
        // librdkafka writes at most `max` of them, returning how many (or -1 on error, with none written).
        let n = unsafe {
            rd::rd_kafka_consume_batch_queue(self.queue.as_ptr(), timeout_ms, batch.taken.as_mut_ptr().add(at), max)
        };
        usize::try_from(n).unwrap_or(0).min(max)
    }
}

impl<C: ConsumerContext + 'static> Drop for FetchQueue<C> {
    fn drop(&mut self) {
        // SAFETY: our reference to the queue, released once; the client is still alive (`self.consumer` is dropped
        // after this body). Partitions still forwarded here keep the queue until they are destroyed; librdkafka
        // discards what they enqueue once the application's handle is gone.
        unsafe { rd::rd_kafka_queue_destroy(self.queue.as_ptr()) };
    }
}

/// Room for the messages of one [`FetchQueue::consume`] call; reused so a batch costs no allocation. Owns the
/// messages while they are handed out and destroys every one of them, whatever the closure does.
pub struct MessageBatch {
    taken: Vec<*mut rd::rd_kafka_message_t>,
}

impl MessageBatch {
    /// Room for up to `max` messages per batch (at least 1).
    pub fn with_capacity(max: usize) -> Self {
        Self { taken: Vec::with_capacity(max.max(1)) }
    }

    fn hand_out(&mut self, mut each: impl FnMut(FetchedMessage<'_>)) {
        // Destroys the messages when the loop ends, also by a panic in `each`.
        struct DestroyAll<'a>(&'a mut Vec<*mut rd::rd_kafka_message_t>);
        impl Drop for DestroyAll<'_> {
            fn drop(&mut self) {
                for message in self.0.drain(..) {
                    // SAFETY: each pointer is a message librdkafka handed to us, destroyed exactly once (drained).
                    unsafe { rd::rd_kafka_message_destroy(message) };
                }
            }
        }
        let owned = DestroyAll(&mut self.taken);
        for &message in owned.0.iter() {
            // SAFETY: the message is live until `owned` drops, after the loop; the reference cannot outlive the
            // closure call (`FetchedMessage<'_>`).
            if let Some(message) = unsafe { message.as_ref() } {
                each(FetchedMessage { message });
            }
        }
    }
}

/// A record (or a per-partition error) from a [`FetchQueue`], valid for one closure call.
pub struct FetchedMessage<'a> {
    message: &'a rd::rd_kafka_message_t,
}

impl FetchedMessage<'_> {
    /// The error librdkafka reports in place of a record (e.g. an offset out of range), if any.
    pub fn error(&self) -> Option<RDKafkaErrorCode> {
        (self.message.err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR).then(|| self.message.err.into())
    }

    /// librdkafka's text for [`FetchedMessage::error`].
    pub fn error_text(&self) -> Cow<'_, str> {
        // SAFETY: the message is live; the string returned is owned by it (or static) and NUL-terminated.
        let text = unsafe { rd::rd_kafka_message_errstr(self.message) };
        if text.is_null() {
            return Cow::Borrowed("");
        }
        // SAFETY: non-null, NUL-terminated, lives as long as the message.
        unsafe { CStr::from_ptr(text) }.to_string_lossy()
    }

    /// The topic name (Kafka topic names are ASCII; anything else is converted lossily).
    pub fn topic(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(self.topic_bytes())
    }

    /// Whether the record's topic is `name`, without allocating.
    pub fn topic_is(&self, name: &str) -> bool {
        self.topic_bytes() == name.as_bytes()
    }

    fn topic_bytes(&self) -> &[u8] {
        if self.message.rkt.is_null() {
            return &[];
        }
        // SAFETY: a message's topic handle lives as long as the message, and its name is NUL-terminated.
        unsafe { CStr::from_ptr(rd::rd_kafka_topic_name(self.message.rkt)) }.to_bytes()
    }

    pub fn partition(&self) -> i32 {
        self.message.partition
    }

    pub fn offset(&self) -> i64 {
        self.message.offset
    }

    /// The record's timestamp in Unix milliseconds (create or log-append time), `None` when the record has none.
    pub fn timestamp_ms(&self) -> Option<i64> {
        let mut kind = rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
        // SAFETY: the message is live and `kind` is a valid out-pointer.
        let ms = unsafe { rd::rd_kafka_message_timestamp(self.message, &mut kind) };
        (ms != -1 && kind != rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE).then_some(ms)
    }

    /// The key; `None` for a null key.
    pub fn key(&self) -> Option<&[u8]> {
        // SAFETY: for a record, `key` points to `key_len` bytes owned by the message (or is null).
        unsafe { bytes(self.message.key, self.message.key_len) }
    }

    /// The value; `None` for a null value (a tombstone).
    pub fn payload(&self) -> Option<&[u8]> {
        if self.error().is_some() {
            // An error message's payload is its error text, not a record value.
            return None;
        }
        // SAFETY: for a record, `payload` points to `len` bytes owned by the message (or is null).
        unsafe { bytes(self.message.payload, self.message.len) }
    }

    /// The headers, copied; see [`copy_headers`].
    pub fn headers(&self) -> CopiedHeaders {
        // SAFETY: the message is live for the lifetime of `self`.
        unsafe { copy_headers_raw(self.message) }
    }
}

/// # Safety
/// `ptr` is null or points to `len` readable bytes that live at least as long as `'a`.
unsafe fn bytes<'a>(ptr: *const c_void, len: usize) -> Option<&'a [u8]> {
    // SAFETY: the caller's promise; a non-null pointer from librdkafka is never dangling for a live message.
    (!ptr.is_null()).then(|| unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len) })
}

/// Test support for kpipe's own tests (feature `testing`): producing what the safe API cannot.
#[cfg(feature = "testing")]
pub mod testing {
    use std::ffi::CString;
    use std::time::Duration;

    use rdkafka::bindings as rd;
    use rdkafka::producer::{BaseProducer, Producer};

    /// Produces one record to `topic` / `partition` with a single header whose name is raw bytes (a header key that is
    /// not UTF-8, as Go clients can write; rust-rdkafka takes header keys as `&str`), then flushes the producer
    /// (up to 30 s). Errors name what failed: a NUL byte in an argument, librdkafka refusing the record, the flush.
    pub fn produce_with_raw_header(
        producer: &BaseProducer,
        topic: &str,
        partition: i32,
        key: &[u8],
        value: &[u8],
        (header_name, header_value): (&[u8], &[u8]),
    ) -> Result<(), String> {
        let topic_c = CString::new(topic).map_err(|e| format!("topic: {e}"))?;
        let name = CString::new(header_name).map_err(|e| format!("header name: {e}"))?;
        let mem = |bytes: &[u8]| rd::rd_kafka_vu_s__bindgen_ty_1 {
            mem: rd::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_1 {
                ptr: bytes.as_ptr().cast_mut().cast(),
                size: bytes.len(),
            },
        };
        let vu = |vtype, u| rd::rd_kafka_vu_t { vtype, u };
        use rd::rd_kafka_vtype_t::*;
        let values = [
            vu(RD_KAFKA_VTYPE_TOPIC, rd::rd_kafka_vu_s__bindgen_ty_1 { cstr: topic_c.as_ptr() }),
            vu(RD_KAFKA_VTYPE_PARTITION, rd::rd_kafka_vu_s__bindgen_ty_1 { i32_: partition }),
            vu(RD_KAFKA_VTYPE_KEY, mem(key)),
            // RD_KAFKA_VTYPE_VALUE without RD_KAFKA_MSG_F_COPY would hand librdkafka our buffer: copy it instead.
            vu(RD_KAFKA_VTYPE_MSGFLAGS, rd::rd_kafka_vu_s__bindgen_ty_1 { i: rd::RD_KAFKA_MSG_F_COPY }),
            vu(RD_KAFKA_VTYPE_VALUE, mem(value)),
            vu(
                RD_KAFKA_VTYPE_HEADER,
                rd::rd_kafka_vu_s__bindgen_ty_1 {
                    header: rd::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_2 {
                        name: name.as_ptr(),
                        val: header_value.as_ptr().cast(),
                        size: header_value.len() as isize,
                    },
                },
            ),
        ];
        // SAFETY: the client is alive; every pointer in `values` outlives the call, and with RD_KAFKA_MSG_F_COPY
        // librdkafka copies the key, value and header instead of keeping our pointers.
        let error = unsafe { rd::rd_kafka_produceva(producer.client().native_ptr(), values.as_ptr(), values.len()) };
        if !error.is_null() {
            // SAFETY: a non-null error from rd_kafka_produceva is ours to read and destroy, once.
            let text =
                unsafe { std::ffi::CStr::from_ptr(rd::rd_kafka_error_string(error)) }.to_string_lossy().into_owned();
            // SAFETY: as above.
            unsafe { rd::rd_kafka_error_destroy(error) };
            return Err(format!("produce: {text}"));
        }
        producer.flush(Duration::from_secs(30)).map_err(|e| format!("flush: {e}"))
    }
}
