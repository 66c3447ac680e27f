//! Per-partition offset tracker: which offset may be committed.
//!
//! The committed offset is the first offset the partition has *received* that is not yet done.
//! Offsets are not contiguous (compaction, transaction markers, aborted transactions), so the
//! tracker only reasons about offsets it actually received. When everything received is done the
//! commit is one past the last received record, or the consumer's fetch position if that is
//! further (so transaction markers at the log end do not leave a permanent lag of 1).

use std::collections::VecDeque;

#[derive(Debug, Default, Clone)]
pub struct OffsetTracker {
    /// Received offsets (increasing) with their done flag, from the first one not done. Done
    /// entries at the front are popped, so the front is always the commit point.
    entries: VecDeque<(i64, bool)>,
    /// Entries not done yet.
    outstanding: usize,
    /// One past the highest offset received (or observed as fetch position).
    next: Option<i64>,
    /// Received records now below the commit point (all of them done).
    settled: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TrackerError {
    #[error("offset {offset} received out of order (next expected >= {next})")]
    OutOfOrder { offset: i64, next: i64 },
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// A record with `offset` was handed to the partition. Offsets must increase.
    pub fn received(&mut self, offset: i64) -> Result<(), TrackerError> {
        if let Some(next) = self.next
            && offset < next
        {
            return Err(TrackerError::OutOfOrder { offset, next });
        }
        self.entries.push_back((offset, false));
        self.outstanding += 1;
        self.next = Some(offset + 1);
        Ok(())
    }

    /// The record at `offset` is done (processed, dead-lettered or dropped). Unknown or repeated
    /// offsets are ignored.
    pub fn done(&mut self, offset: i64) {
        if let Ok(i) = self.entries.binary_search_by_key(&offset, |e| e.0)
            && let Some(entry) = self.entries.get_mut(i)
            && !entry.1
        {
            entry.1 = true;
            self.outstanding -= 1;
        }
        while self.entries.front().is_some_and(|e| e.1) {
            self.entries.pop_front();
            self.settled += 1;
        }
    }

    /// The consumer's fetch position: every record below it has already been received by this
    /// tracker (the caller guarantees this by sending the position in-band after the records).
    pub fn observe_position(&mut self, position: i64) {
        if self.next.is_none_or(|next| position > next) {
            self.next = Some(position);
        }
    }

    /// The offset to commit: the first received offset not yet done, else the next position.
    /// `None` before anything was received.
    pub fn committable(&self) -> Option<i64> {
        self.entries.front().map(|e| e.0).or(self.next)
    }

    /// Records received but not yet done.
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// The offset of the `n`-th received record counted from the commit point (0 = the first one not done).
    pub fn nth_from_commit_point(&self, n: usize) -> Option<i64> {
        self.entries.get(n).map(|e| e.0)
    }

    /// How many received records lie below [`OffsetTracker::committable`], ever (monotonic).
    pub fn settled(&self) -> u64 {
        self.settled
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn commit_stops_at_first_unfinished_record() {
        let mut t = OffsetTracker::new();
        assert_eq!(t.committable(), None);
        for o in [10, 11, 15, 16] {
            t.received(o).unwrap();
        }
        assert_eq!(t.committable(), Some(10));
        t.done(11);
        t.done(15);
        assert_eq!(t.committable(), Some(10));
        t.done(10);
        assert_eq!(t.committable(), Some(16), "gap 12..15 (compacted) is skipped");
        assert_eq!(t.settled(), 3, "10, 11 and 15 are below the commit point; the gap counts nothing");
        assert_eq!((t.nth_from_commit_point(0), t.nth_from_commit_point(1)), (Some(16), None));
        t.done(16);
        assert_eq!(t.committable(), Some(17));
        assert_eq!(t.settled(), 4);
    }

    #[test]
    fn fetch_position_past_transaction_markers_is_committed_when_idle() {
        let mut t = OffsetTracker::new();
        t.received(5).unwrap();
        t.observe_position(8);
        assert_eq!(t.committable(), Some(5), "never passes an unfinished record");
        t.done(5);
        assert_eq!(t.committable(), Some(8));
        t.observe_position(7);
        assert_eq!(t.committable(), Some(8), "position never moves back");
    }

    #[test]
    fn position_alone_before_any_record() {
        let mut t = OffsetTracker::new();
        t.observe_position(42);
        assert_eq!(t.committable(), Some(42));
    }

    #[test]
    fn out_of_order_receive_is_rejected() {
        let mut t = OffsetTracker::new();
        t.received(5).unwrap();
        assert_eq!(t.received(5), Err(TrackerError::OutOfOrder { offset: 5, next: 6 }));
        t.observe_position(10);
        assert!(t.received(9).is_err());
        t.received(10).unwrap();
    }

    fn offsets_and_order() -> impl Strategy<Value = (Vec<i64>, Vec<usize>)> {
        (0i64..1000, proptest::collection::vec(1i64..4, 1..60)).prop_flat_map(|(start, gaps)| {
            let offsets: Vec<i64> = gaps
                .iter()
                .scan(start, |o, g| {
                    *o += g;
                    Some(*o)
                })
                .collect();
            let n = offsets.len();
            (Just(offsets), Just((0..n).collect::<Vec<_>>()).prop_shuffle())
        })
    }

    proptest! {
        #[test]
        fn any_completion_order_never_passes_an_unfinished_record((offsets, order) in offsets_and_order()) {
            let mut t = OffsetTracker::new();
            for &o in &offsets {
                t.received(o).unwrap();
            }
            let mut done = vec![false; offsets.len()];
            for &i in &order {
                t.done(offsets[i]);
                done[i] = true;
                let c = t.committable().unwrap();
                for (j, &o) in offsets.iter().enumerate() {
                    if !done[j] {
                        prop_assert!(c <= o, "commit {c} passes unfinished {o}");
                    }
                }
                // And it is as far as allowed: every received offset below it is done.
                let first_unfinished = offsets.iter().zip(&done).find(|(_, d)| !**d).map(|(o, _)| *o);
                prop_assert_eq!(c, first_unfinished.unwrap_or(offsets[offsets.len() - 1] + 1));
            }
            prop_assert_eq!(t.committable(), Some(offsets[offsets.len() - 1] + 1));
            prop_assert_eq!(t.outstanding(), 0);
            prop_assert_eq!(t.settled(), offsets.len() as u64);
        }
    }
}
