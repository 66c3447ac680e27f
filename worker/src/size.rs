//! Size rules for records kpipe produces (forwarded records and dead letters). Pure.
//!
//! A Kafka topic refuses a record batch larger than its `max.message.bytes` (default: the broker's
//! `message.max.bytes`, 1,048,588 bytes). kpipe sends each record in its own size check against that
//! limit, estimating the record's size in a v2 record batch from above (KIP-98 message format): the
//! batch header ([`BATCH_OVERHEAD`]), the record's own framing with every varint at its widest, key,
//! value and headers. Compression is not counted, so a record that would only fit compressed is
//! treated as too large (the safe side: it is never refused by the broker after kpipe judged it fits).
//!
//! A dead letter that does not fit is reduced step by step ([`Shape`]): first the value is left out,
//! then the original headers, then the key — never truncated half-way, so a consumer of the DLQ can
//! never mistake a partial payload for the record. The reduced record carries `kpipe.payload.truncated:
//! true`, `kpipe.payload.omitted` (`value`, `value,headers` or `value,headers,key`) and
//! `kpipe.payload.bytes` (the original value's size) besides the usual context headers, so the
//! original can be found by its coordinates (`kpipe.original.topic/partition/offset`).

use crate::record::Record;

/// Record batch v2 header (61 bytes) plus a record's framing with every varint at its widest
/// (length 5, attributes 1, timestamp delta 10, offset delta 5, key length 5, value length 5,
/// header count 5).
pub const BATCH_OVERHEAD: u64 = 61 + 36;
/// Per header: key length and value length varints at their widest.
pub const HEADER_OVERHEAD: u64 = 10;

/// Upper bound of the size of one record alone in a v2 record batch, in bytes.
pub fn record_size<'a>(
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
) -> u64 {
    let len = |b: Option<&[u8]>| b.map_or(0, |b| b.len() as u64);
    BATCH_OVERHEAD
        + len(key)
        + len(value)
        + headers.into_iter().map(|(k, v)| HEADER_OVERHEAD + k.len() as u64 + len(v)).sum::<u64>()
}

/// What of the original record a dead letter carries, largest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Shape {
    /// Key, value and headers as they were.
    Full,
    /// Key and headers; no value.
    NoValue,
    /// Key only.
    NoValueNoHeaders,
    /// Nothing of the original but its coordinates (context headers).
    Bare,
}

impl Shape {
    /// The next smaller shape, if any.
    pub fn smaller(self) -> Option<Self> {
        match self {
            Self::Full => Some(Self::NoValue),
            Self::NoValue => Some(Self::NoValueNoHeaders),
            Self::NoValueNoHeaders => Some(Self::Bare),
            Self::Bare => None,
        }
    }

    /// `kpipe.payload.omitted` of a reduced dead letter; `None` for [`Shape::Full`].
    pub fn omitted(self) -> Option<&'static str> {
        match self {
            Self::Full => None,
            Self::NoValue => Some("value"),
            Self::NoValueNoHeaders => Some("value,headers"),
            Self::Bare => Some("value,headers,key"),
        }
    }

    pub fn keeps_value(self) -> bool {
        self == Self::Full
    }

    pub fn keeps_headers(self) -> bool {
        self <= Self::NoValue
    }

    pub fn keeps_key(self) -> bool {
        self <= Self::NoValueNoHeaders
    }
}

/// The headers a dead letter of `shape` adds to say what it left out (none for [`Shape::Full`]).
pub fn truncation_headers(record: &Record, shape: Shape) -> Vec<(String, Vec<u8>)> {
    match shape.omitted() {
        None => Vec::new(),
        Some(omitted) => vec![
            ("kpipe.payload.truncated".to_owned(), b"true".to_vec()),
            ("kpipe.payload.omitted".to_owned(), omitted.as_bytes().to_vec()),
            ("kpipe.payload.bytes".to_owned(), record.value.as_ref().map_or(0, Vec::len).to_string().into_bytes()),
        ],
    }
}

/// Size of the dead letter of `record` in `shape` with the `context` headers.
pub fn dead_letter_size(record: &Record, context: &[(String, Vec<u8>)], shape: Shape) -> u64 {
    let extra = truncation_headers(record, shape);
    let original = record.headers.iter().filter(|_| shape.keeps_headers()).map(|(k, v)| (k.as_str(), v.as_deref()));
    let added = context.iter().chain(extra.iter()).map(|(k, v)| (k.as_str(), Some(v.as_slice())));
    record_size(
        record.key.as_deref().filter(|_| shape.keeps_key()),
        record.value.as_deref().filter(|_| shape.keeps_value()),
        original.chain(added),
    )
}

/// The largest shape, no larger than `at_most`, whose dead letter fits in `limit` bytes; the smallest
/// ([`Shape::Bare`]) when none does (it carries a bounded amount: the context headers).
pub fn dead_letter_shape(record: &Record, context: &[(String, Vec<u8>)], limit: u64, at_most: Shape) -> Shape {
    let mut shape = at_most;
    while dead_letter_size(record, context, shape) > limit {
        match shape.smaller() {
            Some(s) => shape = s,
            None => break,
        }
    }
    shape
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::test_record;

    fn context() -> Vec<(String, Vec<u8>)> {
        vec![("kpipe.original.offset".into(), b"42".to_vec())]
    }

    fn big(value: usize, header: usize, key: usize) -> Record {
        let mut r = test_record(42, None, "");
        r.key = Some(vec![b'k'; key]);
        r.value = Some(vec![b'v'; value]);
        r.headers = vec![("h".into(), Some(vec![b'h'; header]))];
        r
    }

    #[test]
    fn size_counts_every_part_from_above() {
        let r = big(1000, 100, 10);
        let full = dead_letter_size(&r, &context(), Shape::Full);
        assert_eq!(full, BATCH_OVERHEAD + 10 + 1000 + (HEADER_OVERHEAD + 1 + 100) + (HEADER_OVERHEAD + 21 + 2));
        assert!(dead_letter_size(&r, &context(), Shape::NoValue) < full - 1000 + 200, "value gone, markers added");
        assert_eq!(record_size(None, None, []), BATCH_OVERHEAD);
    }

    #[test]
    fn just_under_the_limit_goes_whole_just_over_drops_the_value() {
        let r = big(1_000_000, 10, 10);
        let full = dead_letter_size(&r, &context(), Shape::Full);
        assert_eq!(dead_letter_shape(&r, &context(), full, Shape::Full), Shape::Full);
        assert_eq!(dead_letter_shape(&r, &context(), full - 1, Shape::Full), Shape::NoValue);
        assert_eq!(dead_letter_shape(&r, &context(), full, Shape::NoValue), Shape::NoValue, "never grows back");
    }

    #[test]
    fn huge_headers_then_keys_are_dropped_too_and_bare_is_the_floor() {
        let r = big(10, 5_000, 10);
        assert_eq!(dead_letter_shape(&r, &context(), 1_000, Shape::Full), Shape::NoValueNoHeaders);
        let r = big(10, 10, 5_000);
        assert_eq!(dead_letter_shape(&r, &context(), 1_000, Shape::Full), Shape::Bare);
        assert_eq!(dead_letter_shape(&r, &context(), 1, Shape::Full), Shape::Bare);
        let h = truncation_headers(&r, Shape::Bare);
        assert_eq!(h[0], ("kpipe.payload.truncated".into(), b"true".to_vec()));
        assert_eq!(h[1].1, b"value,headers,key");
        assert_eq!(h[2].1, b"10");
        assert!(truncation_headers(&r, Shape::Full).is_empty());
    }
}
