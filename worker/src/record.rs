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

impl Record {
    /// Bytes counted against batch and in-flight byte limits (`batch.maxBytes`, the pending and overflow bounds): key,
    /// value and every header's key and value. Headers count because a record with large headers costs as much
    /// memory and request body as one with a large value.
    pub fn size_bytes(&self) -> u64 {
        let headers: usize = self.headers.iter().map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len)).sum();
        (self.key.as_ref().map_or(0, Vec::len) + self.value.as_ref().map_or(0, Vec::len) + headers) as u64
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
    }
}
