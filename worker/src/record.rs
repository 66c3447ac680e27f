//! The owned form of a consumed Kafka record, shared between the partition task, the processor
//! and the dead-letter writer.

use std::sync::Arc;

/// A record copied out of librdkafka's buffers so it can cross tasks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Shared by every record of the topic (one allocation per topic, not per record).
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// Milliseconds since the Unix epoch, when the record carries a timestamp.
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// Headers in their original order; a header may have no value.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// The partition tracker's epoch the record was received in (set by the partition task; 0 until then). After
    /// an offset regression re-based the tracker, completions of records of an earlier epoch are not counted.
    pub epoch: u32,
}

/// Memory a record waiting in the worker takes beyond its key, value and headers: the `Record` itself inside a chunk
/// or behind the scheduler's `Arc`, the scheduler's entry for it, and the allocator's rounding of its key and value
/// (an estimate, checked against the struct sizes by a unit test). The worker-wide bound on buffered records counts
/// it, so a backlog of tiny records is bounded by what it really holds, not by its payload bytes alone.
pub const RECORD_OVERHEAD_BYTES: u64 = 224;

/// Memory each header of a waiting record takes beyond its name and value bytes: its `(String, Option<Vec<u8>>)`
/// entry and the allocator's rounding of its name and value (checked by a unit test). Without it, records with many
/// small headers (30 headers with empty names: 0 bytes by `size_bytes`) held 477 MiB within the bound.
pub const HEADER_OVERHEAD_BYTES: u64 = 80;

impl Record {
    /// Bytes counted against batch and in-flight byte limits (`batch.maxBytes`, the pending bounds): key,
    /// value and every header's key and value. Headers count because a record with large headers costs as much
    /// memory and request body as one with a large value.
    pub fn size_bytes(&self) -> u64 {
        let headers: usize = self.headers.iter().map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len)).sum();
        (self.key.as_ref().map_or(0, Vec::len) + self.value.as_ref().map_or(0, Vec::len) + headers) as u64
    }

    /// Memory the record takes while it waits in the worker (fetched, not yet started): [`Record::size_bytes`] plus
    /// [`Record::overhead_bytes`]. Counted against the worker-wide buffer bound (`kpipe_worker_buffered_bytes`).
    pub fn buffered_bytes(&self) -> u64 {
        self.size_bytes() + self.overhead_bytes()
    }

    /// The bookkeeping part of [`Record::buffered_bytes`]: [`RECORD_OVERHEAD_BYTES`] and [`HEADER_OVERHEAD_BYTES`] per
    /// header.
    pub fn overhead_bytes(&self) -> u64 {
        RECORD_OVERHEAD_BYTES + self.headers.len() as u64 * HEADER_OVERHEAD_BYTES
    }

    /// Hash of the key used by `key` ordering. Records without a key have no ordering
    /// constraint (Kafka spreads them over partitions anyway). A hash collision only costs
    /// parallelism, never ordering.
    pub fn key_hash(&self) -> Option<u64> {
        // FNV-1a: keys are short and not attacker-chosen hash-table keys here (a collision only
        // serialises two keys), so a cheap hash beats SipHash.
        self.key
            .as_ref()
            .map(|k| k.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)))
    }
}

#[cfg(test)]
pub(crate) fn test_record(offset: i64, key: Option<&str>, value: &str) -> Record {
    Record {
        topic: "t".into(),
        partition: 0,
        offset,
        timestamp_ms: Some(1_700_000_000_000),
        key: key.map(|k| k.as_bytes().to_vec()),
        value: Some(value.as_bytes().to_vec()),
        headers: vec![],
        epoch: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_size_counts_key_value_and_headers() {
        let mut r = test_record(0, Some("key"), "value");
        assert_eq!(r.size_bytes(), 3 + 5);
        r.headers = vec![("trace".into(), Some(vec![0; 100])), ("empty".into(), None)];
        assert_eq!(r.size_bytes(), 3 + 5 + 5 + 100 + 5);
        assert_eq!(r.buffered_bytes(), r.size_bytes() + RECORD_OVERHEAD_BYTES + 2 * HEADER_OVERHEAD_BYTES);
    }

    #[test]
    fn the_overhead_estimate_covers_what_a_waiting_record_holds() {
        // In a chunk: the record inline in `Input`; in the scheduler: an `Arc` (two counters) and its entry (the Arc
        // pointer, an `Instant`, the key hash); key and value: at most 16 bytes of rounding each (mimalloc's small
        // size classes are 8 or 16 bytes apart below 1 KiB and within 12.5 % above).
        let in_chunk = std::mem::size_of::<crate::partition::Input>();
        let in_scheduler = std::mem::size_of::<Record>() + 16 + 40;
        let rounding = 2 * 16;
        assert!(
            in_chunk.max(in_scheduler) + rounding <= RECORD_OVERHEAD_BYTES as usize,
            "chunk {in_chunk} B, scheduler {in_scheduler} B, rounding {rounding} B, estimate {RECORD_OVERHEAD_BYTES} B"
        );
        // A header: its entry in the record's vector, and the rounding of its name's and value's allocations.
        let header = std::mem::size_of::<(String, Option<Vec<u8>>)>() + rounding;
        assert!(header <= HEADER_OVERHEAD_BYTES as usize, "header {header} B, estimate {HEADER_OVERHEAD_BYTES} B");
    }
}
