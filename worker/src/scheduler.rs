//! Ordering scheduler and batcher for one partition: decides which received records may go to
//! the processor next, grouped into batches. Pure (the clock is passed in).
//!
//! - `partition`: one batch at a time, in offset order.
//! - `key`: a record may start once no earlier record with the same key is pending or in flight.
//!   Records of one key may share a batch (they are sent in offset order). Records without a key
//!   carry no ordering constraint.
//! - `unordered`: any record may start.
//!
//! In every mode at most `per_partition` records are in flight. A batch is ready when it reaches
//! `max_records` or `max_bytes`, or once its oldest record has waited `max_wait`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kpipe_api::v1alpha1::Ordering;

use crate::record::Record;

/// The keys are already hashes: use them as they are.
#[derive(Default)]
struct KeyHashHasher(u64);

impl Hasher for KeyHashHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type KeyHashMap<V> = HashMap<u64, V, BuildHasherDefault<KeyHashHasher>>;
type KeyHashSet = HashSet<u64, BuildHasherDefault<KeyHashHasher>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub max_records: usize,
    pub max_bytes: u64,
    pub max_wait: Duration,
}

#[derive(Debug)]
struct Pending {
    record: Arc<Record>,
    arrived: Instant,
    key: Option<u64>,
}

/// What the partition task should do next.
#[derive(Debug, PartialEq)]
pub enum Next {
    /// Send this batch now.
    Ready(Vec<Arc<Record>>),
    /// Records are eligible but the batch is not full: check again at this instant.
    WaitUntil(Instant),
    /// Nothing can start (no records, ordering constraints or the concurrency limit).
    Idle,
}

#[derive(Debug)]
pub struct Scheduler {
    ordering: Ordering,
    limits: BatchLimits,
    per_partition: usize,
    pending: VecDeque<Pending>,
    pending_bytes: u64,
    /// [`Record::overhead_bytes`] of the pending records.
    pending_overhead: u64,
    in_flight_records: usize,
    in_flight_keys: KeyHashMap<usize>,
}

impl Scheduler {
    pub fn new(ordering: Ordering, limits: BatchLimits, per_partition: usize) -> Self {
        let per_partition = per_partition.max(1);
        let limits = BatchLimits { max_records: limits.max_records.clamp(1, per_partition), ..limits };
        Self {
            ordering,
            limits,
            per_partition,
            pending: VecDeque::new(),
            pending_bytes: 0,
            pending_overhead: 0,
            in_flight_records: 0,
            in_flight_keys: KeyHashMap::default(),
        }
    }

    pub fn push(&mut self, record: Arc<Record>, now: Instant) {
        self.pending_bytes += record.size_bytes();
        self.pending_overhead += record.overhead_bytes();
        let key = if self.ordering == Ordering::Key { record.key_hash() } else { None };
        self.pending.push_back(Pending { record, arrived: now, key });
    }

    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    pub fn pending_bytes(&self) -> u64 {
        self.pending_bytes
    }

    /// What the pending records hold in memory ([`Record::buffered_bytes`] summed).
    pub fn pending_buffered_bytes(&self) -> u64 {
        self.pending_bytes + self.pending_overhead
    }

    /// Forgets the records not yet started at or above `offset` (the partition's offsets went back there: the
    /// consumer delivers them again, or they no longer exist). Returns how many were removed. Records below it and
    /// records in flight are untouched.
    pub fn discard_from(&mut self, offset: i64) -> usize {
        let before = self.pending.len();
        let (mut bytes, mut overhead) = (0u64, 0u64);
        self.pending.retain(|p| {
            let keep = p.record.offset < offset;
            if !keep {
                bytes += p.record.size_bytes();
                overhead += p.record.overhead_bytes();
            }
            keep
        });
        self.pending_bytes -= bytes;
        self.pending_overhead -= overhead;
        before - self.pending.len()
    }

    /// Offset of the newest record not yet started.
    pub fn last_pending_offset(&self) -> Option<i64> {
        self.pending.back().map(|p| p.record.offset)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight_records
    }

    /// Picks the next batch (marking its records in flight when ready).
    pub fn next(&mut self, now: Instant) -> Next {
        self.next_within(now, usize::MAX, None)
    }

    /// Like [`Scheduler::next`], with at most `room` records: the worker-wide in-flight budget left. A batch cut
    /// short by `room` is sent at once, like any capacity-limited batch: waiting for whole batches would leave part
    /// of `perWorker` idle (with batches of 100 and perWorker 256 only two fit). Batches are never cut below half of
    /// `maxRecords`, so a saturated worker does not degrade into many tiny batches (the caller then waits for the
    /// budget, as with a whole batch). No record at or above `horizon` starts (the partition's uncommitted bound); a
    /// batch cut short by it is sent at once too.
    pub fn next_within(&mut self, now: Instant, room: usize, horizon: Option<i64>) -> Next {
        let room = room.max(self.limits.max_records.div_ceil(2));
        let capacity = self.per_partition.saturating_sub(self.in_flight_records).min(self.limits.max_records).min(room);
        if capacity == 0 || self.pending.is_empty() {
            return Next::Idle;
        }
        if self.ordering == Ordering::Partition && self.in_flight_records > 0 {
            return Next::Idle;
        }
        let mut picked: Vec<usize> = Vec::new();
        let mut bytes = 0u64;
        let mut full = false;
        let mut blocked_keys = KeyHashSet::default();
        let mut oldest: Option<Instant> = None;
        for (i, p) in self.pending.iter().enumerate() {
            // Pending records are in offset order: everything from here on is beyond the horizon.
            if horizon.is_some_and(|h| p.record.offset >= h) {
                full = true;
                break;
            }
            if let Some(k) = p.key
                && (self.in_flight_keys.contains_key(&k) || blocked_keys.contains(&k))
            {
                continue;
            }
            let size = p.record.size_bytes();
            if !picked.is_empty() && bytes + size > self.limits.max_bytes {
                full = true;
                // Later records of this key must wait behind it.
                if let Some(k) = p.key {
                    blocked_keys.insert(k);
                }
                break;
            }
            picked.push(i);
            bytes += size;
            oldest = Some(oldest.map_or(p.arrived, |o| o.min(p.arrived)));
            if picked.len() >= capacity || bytes >= self.limits.max_bytes {
                full = true;
                break;
            }
            if self.ordering == Ordering::Partition && i + 1 != picked.len() {
                break;
            }
        }
        let Some(oldest) = oldest else { return Next::Idle };
        // Capacity-limited batches (fewer than max_records allowed) are "full" too: waiting would
        // not make them bigger.
        let due = oldest + self.limits.max_wait;
        if !full && now < due {
            return Next::WaitUntil(due);
        }
        let mut batch = Vec::with_capacity(picked.len());
        for (removed, i) in picked.into_iter().enumerate() {
            if let Some(p) = self.pending.remove(i - removed) {
                self.pending_bytes -= p.record.size_bytes();
                self.pending_overhead -= p.record.overhead_bytes();
                if let Some(k) = p.key {
                    *self.in_flight_keys.entry(k).or_insert(0) += 1;
                }
                batch.push(p.record);
            }
        }
        self.in_flight_records += batch.len();
        Next::Ready(batch)
    }

    /// The records of a batch are finished (done or abandoned): release their keys and slots.
    pub fn complete(&mut self, records: &[Arc<Record>]) {
        self.in_flight_records = self.in_flight_records.saturating_sub(records.len());
        if self.ordering != Ordering::Key {
            return;
        }
        for r in records {
            if let Some(k) = r.key_hash()
                && let Some(n) = self.in_flight_keys.get_mut(&k)
            {
                *n -= 1;
                if *n == 0 {
                    self.in_flight_keys.remove(&k);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::test_record;

    fn limits(max_records: usize) -> BatchLimits {
        BatchLimits { max_records, max_bytes: 1 << 20, max_wait: Duration::from_millis(50) }
    }

    fn offsets(n: &Next) -> Vec<i64> {
        match n {
            Next::Ready(b) => b.iter().map(|r| r.offset).collect(),
            _ => vec![],
        }
    }

    #[test]
    fn discarding_from_an_offset_keeps_the_records_below_it_and_those_in_flight() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(Ordering::Key, limits(2), 256);
        for o in 0..6 {
            s.push(Arc::new(test_record(o, Some(&format!("k{o}")), "vv")), t0);
        }
        assert_eq!(offsets(&s.next(t0)), vec![0, 1]);
        assert_eq!(s.discard_from(4), 2);
        assert_eq!((s.pending_len(), s.pending_bytes(), s.last_pending_offset()), (2, 8, Some(3)));
        let overhead = crate::record::RECORD_OVERHEAD_BYTES;
        assert_eq!(s.pending_buffered_bytes(), 8 + 2 * overhead, "the memory of the two left");
        assert_eq!(s.in_flight(), 2, "records in flight are not the scheduler's to forget");
        s.push(Arc::new(test_record(4, Some("k4"), "vv")), t0);
        assert_eq!(offsets(&s.next(t0)), vec![2, 3]);
        assert_eq!(s.pending_buffered_bytes(), 4 + overhead, "started records leave the count");
        assert_eq!(offsets(&s.next(t0 + Duration::from_secs(1))), vec![4]);
    }

    #[test]
    fn a_batch_cut_short_by_the_worker_budget_goes_at_once_but_not_below_half() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(Ordering::Key, limits(10), 256);
        for o in 0..22 {
            s.push(Arc::new(test_record(o, Some(&format!("k{o}")), "v")), t0);
        }
        // 7 records of budget left worker-wide: a 7-record batch now, not a wait for 10.
        assert_eq!(offsets(&s.next_within(t0, 7, None)), (0..7).collect::<Vec<_>>());
        // Less than half a batch of budget: half a batch (the caller waits for the budget).
        assert_eq!(offsets(&s.next_within(t0, 2, None)), (7..12).collect::<Vec<_>>());
        assert_eq!(offsets(&s.next_within(t0, usize::MAX, None)), (12..22).collect::<Vec<_>>());
        assert_eq!(s.next_within(t0, 0, None), Next::Idle);
    }

    #[test]
    fn nothing_at_or_beyond_the_horizon_starts() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(Ordering::Key, limits(10), 256);
        s.push(Arc::new(test_record(0, Some("a"), "v")), t0);
        assert_eq!(offsets(&s.next_within(t0 + Duration::from_secs(1), usize::MAX, Some(1))), vec![0]);
        for (o, k) in [(1, "a"), (2, "b"), (3, "c"), (4, "d")] {
            s.push(Arc::new(test_record(o, Some(k), "v")), t0);
        }
        // Cut by the horizon: sent at once (waiting cannot make it bigger), not held for maxWait.
        assert_eq!(offsets(&s.next_within(t0, usize::MAX, Some(3))), vec![2]);
        assert_eq!(s.next_within(t0, usize::MAX, Some(3)), Next::Idle, "1 waits behind its key, 3 is beyond");
        assert_eq!(s.last_pending_offset(), Some(4));
        s.complete(&[Arc::new(test_record(0, Some("a"), "v"))]);
        // The record behind its key is below the horizon, so it can always start: the commit point can advance.
        assert_eq!(offsets(&s.next_within(t0, usize::MAX, Some(3))), vec![1]);
        assert_eq!(offsets(&s.next_within(t0, usize::MAX, Some(4))), vec![3]);
        assert!(matches!(s.next_within(t0, usize::MAX, Some(5)), Next::WaitUntil(_)), "not cut: waits for maxWait");
    }

    #[test]
    fn batch_is_sent_when_full() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(Ordering::Unordered, limits(3), 100);
        for o in 0..5 {
            s.push(Arc::new(test_record(o, None, "v")), t0);
        }
        assert_eq!(offsets(&s.next(t0)), vec![0, 1, 2]);
        assert_eq!(s.next(t0), Next::WaitUntil(t0 + Duration::from_millis(50)));
        assert_eq!(offsets(&s.next(t0 + Duration::from_millis(50))), vec![3, 4]);
        assert_eq!(s.next(t0), Next::Idle);
    }

    #[test]
    fn max_wait_counts_from_first_record() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(Ordering::Unordered, limits(10), 100);
        s.push(Arc::new(test_record(0, None, "v")), t0);
        s.push(Arc::new(test_record(1, None, "v")), t0 + Duration::from_millis(40));
        assert_eq!(s.next(t0 + Duration::from_millis(45)), Next::WaitUntil(t0 + Duration::from_millis(50)));
        assert_eq!(offsets(&s.next(t0 + Duration::from_millis(50))), vec![0, 1]);
    }

    #[test]
    fn max_bytes_closes_a_batch_but_an_oversized_record_still_goes_alone() {
        let t0 = Instant::now();
        let l = BatchLimits { max_records: 100, max_bytes: 10, max_wait: Duration::from_millis(50) };
        let mut s = Scheduler::new(Ordering::Unordered, l, 100);
        s.push(Arc::new(test_record(0, None, "12345")), t0);
        s.push(Arc::new(test_record(1, None, "1234")), t0);
        s.push(Arc::new(test_record(2, None, "123456789012345")), t0);
        assert_eq!(offsets(&s.next(t0)), vec![0, 1]);
        assert_eq!(offsets(&s.next(t0)), vec![2]);
    }

    #[test]
    fn partition_ordering_runs_one_batch_at_a_time() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(Ordering::Partition, limits(2), 100);
        for o in 0..4 {
            s.push(Arc::new(test_record(o, Some("k"), "v")), t0);
        }
        let b = s.next(t0);
        assert_eq!(offsets(&b), vec![0, 1]);
        assert_eq!(s.next(t0 + Duration::from_secs(1)), Next::Idle);
        if let Next::Ready(b) = b {
            s.complete(&b);
        }
        assert_eq!(offsets(&s.next(t0)), vec![2, 3]);
    }

    #[test]
    fn key_ordering_holds_back_keys_in_flight_only() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(1);
        let mut s = Scheduler::new(Ordering::Key, limits(2), 100);
        s.push(Arc::new(test_record(0, Some("a"), "v")), t0);
        s.push(Arc::new(test_record(1, Some("a"), "v")), t0);
        s.push(Arc::new(test_record(2, Some("b"), "v")), t0);
        s.push(Arc::new(test_record(3, Some("a"), "v")), t0);
        s.push(Arc::new(test_record(4, Some("c"), "v")), t0);
        let first = s.next(t0);
        assert_eq!(offsets(&first), vec![0, 1]);
        // "a" is in flight: 3 must wait; b and c may go.
        let second = s.next(later);
        assert_eq!(offsets(&second), vec![2, 4]);
        assert_eq!(s.next(later), Next::Idle);
        if let Next::Ready(b) = first {
            s.complete(&b);
        }
        assert_eq!(offsets(&s.next(later)), vec![3]);
    }

    #[test]
    fn key_ordering_a_key_cut_off_by_max_bytes_blocks_its_later_records() {
        let t0 = Instant::now();
        let l = BatchLimits { max_records: 10, max_bytes: 6, max_wait: Duration::ZERO };
        let mut s = Scheduler::new(Ordering::Key, l, 100);
        s.push(Arc::new(test_record(0, Some("a"), "1234")), t0);
        s.push(Arc::new(test_record(1, Some("b"), "1234")), t0);
        s.push(Arc::new(test_record(2, Some("b"), "1")), t0);
        let b = s.next(t0);
        assert_eq!(offsets(&b), vec![0]);
    }

    #[test]
    fn per_partition_concurrency_limits_in_flight_records() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(Ordering::Unordered, limits(10), 3);
        for o in 0..10 {
            s.push(Arc::new(test_record(o, None, "v")), t0);
        }
        assert_eq!(offsets(&s.next(t0)), vec![0, 1, 2]);
        assert_eq!(s.next(t0), Next::Idle);
        assert_eq!(s.in_flight(), 3);
        assert_eq!(s.pending_len(), 7);
    }

    #[test]
    fn records_without_key_are_unconstrained_under_key_ordering() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(Ordering::Key, limits(1), 100);
        s.push(Arc::new(test_record(0, None, "v")), t0);
        s.push(Arc::new(test_record(1, None, "v")), t0);
        assert_eq!(offsets(&s.next(t0)), vec![0]);
        assert_eq!(offsets(&s.next(t0)), vec![1]);
    }

    mod props {
        use std::collections::HashMap;

        use proptest::prelude::*;

        use super::*;

        #[derive(Debug, Clone)]
        enum Op {
            Push(u8),
            Next,
            /// Completes the in-flight batch at this index (modulo the count).
            Complete(usize),
            Tick,
        }

        fn ops() -> impl Strategy<Value = Vec<Op>> {
            proptest::collection::vec(
                prop_oneof![
                    3 => (0u8..6).prop_map(Op::Push),
                    3 => Just(Op::Next),
                    2 => (0usize..8).prop_map(Op::Complete),
                    1 => Just(Op::Tick),
                ],
                1..200,
            )
        }

        fn ordering() -> impl Strategy<Value = Ordering> {
            prop_oneof![Just(Ordering::Partition), Just(Ordering::Key), Just(Ordering::Unordered)]
        }

        proptest! {
            /// For any interleaving: in-flight records never exceed the per-partition limit, no
            /// batch exceeds maxRecords, `partition` ordering has one batch in flight and starts
            /// records in offset order, `key` ordering never runs two records of a key in
            /// different batches at once and starts each key's records in offset order, and
            /// every pushed record is eventually sent exactly once.
            #[test]
            fn ordering_and_limits_hold(ordering in ordering(), ops in ops(), per_partition in 1usize..10, max_records in 1usize..6) {
                let t0 = Instant::now();
                let mut now = t0;
                let l = BatchLimits { max_records, max_bytes: 1 << 20, max_wait: Duration::from_millis(10) };
                let mut s = Scheduler::new(ordering, l, per_partition);
                let mut next_offset = 0i64;
                let mut in_flight: Vec<Vec<Arc<Record>>> = Vec::new();
                let mut started: Vec<(i64, String)> = Vec::new();
                let check = |batch: &Vec<Arc<Record>>, in_flight: &Vec<Vec<Arc<Record>>>, started: &mut Vec<(i64, String)>| -> Result<(), TestCaseError> {
                    prop_assert!(batch.len() <= max_records);
                    if ordering == Ordering::Partition {
                        prop_assert!(in_flight.is_empty());
                    }
                    if ordering == Ordering::Key {
                        for r in batch {
                            let k = r.key.clone();
                            prop_assert!(!in_flight.iter().flatten().any(|o| o.key == k), "key in two batches");
                        }
                    }
                    for r in batch {
                        let key = String::from_utf8(r.key.clone().unwrap_or_default()).unwrap_or_default();
                        if ordering != Ordering::Unordered {
                            let same = |k: &String| ordering == Ordering::Partition || *k == key;
                            prop_assert!(started.iter().filter(|(_, k)| same(k)).all(|(o, _)| *o < r.offset), "out of order start");
                        }
                        started.push((r.offset, key));
                    }
                    Ok(())
                };
                for op in ops {
                    match op {
                        Op::Push(k) => {
                            let key = format!("k{k}");
                            s.push(Arc::new(crate::record::test_record(next_offset, Some(&key), "v")), now);
                            next_offset += 1;
                        }
                        Op::Next => {
                            if let Next::Ready(b) = s.next(now) {
                                check(&b, &in_flight, &mut started)?;
                                in_flight.push(b);
                            }
                        }
                        Op::Complete(i) => {
                            if !in_flight.is_empty() {
                                let b = in_flight.remove(i % in_flight.len());
                                s.complete(&b);
                            }
                        }
                        Op::Tick => now += Duration::from_millis(10),
                    }
                    prop_assert!(s.in_flight() <= per_partition);
                    prop_assert_eq!(s.in_flight(), in_flight.iter().map(Vec::len).sum::<usize>());
                }
                // Drain: complete everything, advance time, and everything gets sent once.
                for _ in 0..(next_offset as usize + 2) * 2 {
                    for b in in_flight.drain(..) {
                        s.complete(&b);
                    }
                    now += Duration::from_millis(10);
                    while let Next::Ready(b) = s.next(now) {
                        check(&b, &in_flight, &mut started)?;
                        in_flight.push(b);
                    }
                }
                let mut counts: HashMap<i64, usize> = HashMap::new();
                for (o, _) in &started {
                    *counts.entry(*o).or_default() += 1;
                }
                prop_assert_eq!(counts.len() as i64, next_offset);
                prop_assert!(counts.values().all(|&c| c == 1));
            }
        }
    }
}
