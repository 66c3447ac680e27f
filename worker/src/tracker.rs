//! Per-partition offset tracker: which offset may be committed.
//!
//! The committed offset is the first offset the partition has *received* that is not yet done.
//! Offsets are not contiguous (compaction, transaction markers, aborted transactions), so the
//! tracker only reasons about offsets it actually received. When everything received is done the
//! commit is one past the last received record, or the consumer's fetch position if that is
//! further (so transaction markers at the log end do not leave a permanent lag of 1).

use std::collections::VecDeque;

/// One received record: its offset, the epoch it was received in, and whether it is done.
#[derive(Debug, Clone, Copy)]
struct Entry {
    offset: i64,
    epoch: u32,
    done: bool,
}

/// Per-partition commit bookkeeping. Offsets normally only increase; an offset *regression* (the
/// consumer was reset or the topic was recreated: Kafka delivers offsets below what was already
/// received) re-bases the tracker instead of rejecting the record, see [`OffsetTracker::received`].
#[derive(Debug, Default, Clone)]
pub struct OffsetTracker {
    /// Received offsets (increasing) from the first one not done. Done entries at the front are
    /// popped, so the front is always the commit point.
    entries: VecDeque<Entry>,
    /// Entries not done yet.
    outstanding: usize,
    /// One past the highest offset received (or observed as fetch position).
    next: Option<i64>,
    /// Received records now below the commit point (all of them done).
    settled: u64,
    /// Incremented by every re-base; records carry the epoch they were received in, so the
    /// completion of a record received before a re-base never marks a record of the same offset
    /// received after it.
    epoch: u32,
}

/// What a re-base did: the partition's offsets went back from `from` (the next offset expected)
/// to `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rebase {
    /// The offset the tracker expected next.
    pub from: i64,
    /// The offset received (or the position observed) below it.
    pub to: i64,
    /// Received records at or above `to` that were not done yet: they are forgotten (their
    /// completion no longer counts); the consumer delivers those offsets again or they no longer
    /// exist (deleted or truncated log).
    pub forgotten: usize,
    /// The epoch records are received in from now on.
    pub epoch: u32,
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// The epoch the next record is received in (see [`Rebase`]).
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// A record with `offset` was handed to the partition, received in [`OffsetTracker::epoch`].
    ///
    /// Offsets increase, except after a reset: an offset below the next expected one re-bases the
    /// tracker (returned, for the caller to count and log) and the record is tracked like any
    /// other. Records received earlier at offsets below `offset` stay tracked (they are still in
    /// the log and the commit must not pass them); those at or above it are forgotten.
    pub fn received(&mut self, offset: i64) -> Option<Rebase> {
        let rebase = self.rebase_below(offset);
        self.entries.push_back(Entry { offset, epoch: self.epoch, done: false });
        self.outstanding += 1;
        self.next = Some(offset + 1);
        rebase
    }

    fn rebase_below(&mut self, offset: i64) -> Option<Rebase> {
        let from = self.next.filter(|next| offset < *next)?;
        let keep = self.entries.partition_point(|e| e.offset < offset);
        let forgotten = self.entries.drain(keep..).filter(|e| !e.done).count();
        self.outstanding -= forgotten;
        self.epoch = self.epoch.wrapping_add(1);
        self.next = Some(offset);
        Some(Rebase { from, to: offset, forgotten, epoch: self.epoch })
    }

    /// The record at `offset`, received in `epoch`, is done (processed, dead-lettered or
    /// dropped). Returns whether it was tracked: unknown, repeated and forgotten records (of an
    /// epoch before a re-base) are ignored.
    pub fn done(&mut self, offset: i64, epoch: u32) -> bool {
        let mut marked = false;
        if let Some(i) = self.index_of(offset)
            && let Some(entry) = self.entries.get_mut(i)
            && !entry.done
            && entry.epoch == epoch
        {
            entry.done = true;
            self.outstanding -= 1;
            marked = true;
        }
        while self.entries.front().is_some_and(|e| e.done) {
            self.entries.pop_front();
            self.settled += 1;
        }
        marked
    }

    /// Where `offset` is in `entries`. Offsets are mostly contiguous (gaps come only from compaction and transaction
    /// markers), so the entry `offset - front` places is checked first: O(1) instead of a binary search per record.
    fn index_of(&self, offset: i64) -> Option<usize> {
        let front = self.entries.front()?.offset;
        let guess = usize::try_from(offset.checked_sub(front)?).ok()?;
        if self.entries.get(guess).is_some_and(|e| e.offset == offset) {
            return Some(guess);
        }
        self.entries.binary_search_by_key(&offset, |e| e.offset).ok()
    }

    /// The consumer's fetch position: every record below it has already been received by this
    /// tracker (the caller guarantees this by sending the position in-band after the records).
    /// A position below the next expected offset is a reset and re-bases the tracker like a
    /// record would.
    pub fn observe_position(&mut self, position: i64) -> Option<Rebase> {
        match self.next {
            Some(next) if position < next => self.rebase_below(position),
            Some(next) if position == next => None,
            _ => {
                self.next = Some(position);
                None
            }
        }
    }

    /// The offset to commit: the first received offset not yet done, else the next position.
    /// `None` before anything was received.
    pub fn committable(&self) -> Option<i64> {
        self.entries.front().map(|e| e.offset).or(self.next)
    }

    /// Records received but not yet done.
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// The offset of the `n`-th received record counted from the commit point (0 = the first one not done).
    pub fn nth_from_commit_point(&self, n: usize) -> Option<i64> {
        self.entries.get(n).map(|e| e.offset)
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

    fn recv(t: &mut OffsetTracker, offsets: impl IntoIterator<Item = i64>) {
        for o in offsets {
            assert_eq!(t.received(o), None, "{o} is in order");
        }
    }

    #[test]
    fn commit_stops_at_first_unfinished_record() {
        let mut t = OffsetTracker::new();
        assert_eq!(t.committable(), None);
        recv(&mut t, [10, 11, 15, 16]);
        assert_eq!(t.committable(), Some(10));
        assert!(t.done(11, 0));
        assert!(t.done(15, 0));
        assert_eq!(t.committable(), Some(10));
        assert!(t.done(10, 0));
        assert_eq!(t.committable(), Some(16), "gap 12..15 (compacted) is skipped");
        assert_eq!(t.settled(), 3, "10, 11 and 15 are below the commit point; the gap counts nothing");
        assert_eq!((t.nth_from_commit_point(0), t.nth_from_commit_point(1)), (Some(16), None));
        assert!(t.done(16, 0));
        assert!(!t.done(16, 0), "a repeated completion is ignored");
        assert_eq!(t.committable(), Some(17));
        assert_eq!(t.settled(), 4);
    }

    #[test]
    fn fetch_position_past_transaction_markers_is_committed_when_idle() {
        let mut t = OffsetTracker::new();
        recv(&mut t, [5]);
        assert_eq!(t.observe_position(8), None);
        assert_eq!(t.committable(), Some(5), "never passes an unfinished record");
        t.done(5, 0);
        assert_eq!(t.committable(), Some(8));
        assert_eq!(t.observe_position(8), None, "the same position again is no reset");
    }

    #[test]
    fn position_alone_before_any_record() {
        let mut t = OffsetTracker::new();
        assert_eq!(t.observe_position(42), None);
        assert_eq!(t.committable(), Some(42));
    }

    /// Issue 13, item 1: 1,000 records consumed, the topic recreated, its offsets 0..99 delivered.
    /// They used to be dropped as "out of order"; now the tracker re-bases and commits the new topic's
    /// offsets, never the old 1000.
    #[test]
    fn recreated_topic_rebases_instead_of_dropping() {
        let mut t = OffsetTracker::new();
        recv(&mut t, 0..1000);
        for o in 0..998 {
            t.done(o, 0);
        }
        assert_eq!(t.committable(), Some(998), "998 and 999 still in flight");
        let rebase = t.received(0).expect("a regression re-bases");
        assert_eq!(rebase, Rebase { from: 1000, to: 0, forgotten: 2, epoch: 1 });
        assert_eq!(t.epoch(), 1);
        assert_eq!(t.outstanding(), 1, "the forgotten in-flight records no longer count");
        assert_eq!(t.committable(), Some(0));
        recv(&mut t, 1..100);
        assert!(!t.done(998, 0), "an in-flight record of the old epoch completes: ignored");
        assert!(!t.done(5, 0), "an old-epoch completion never marks the new record at the same offset");
        assert_eq!(t.committable(), Some(0));
        for o in 0..100 {
            assert!(t.done(o, 1));
        }
        assert_eq!(t.committable(), Some(100), "the new topic's log end, not 1000");
        assert_eq!(t.outstanding(), 0);
    }

    /// A reset into the middle of what was received (a truncated log): records below the new offset are still in
    /// the log and the commit must not pass them; records at or above it come again.
    #[test]
    fn partial_regression_keeps_records_below_the_reset_point() {
        let mut t = OffsetTracker::new();
        recv(&mut t, 900..1000);
        let rebase = t.received(950).unwrap();
        assert_eq!((rebase.from, rebase.to, rebase.forgotten), (1000, 950, 50));
        assert_eq!(t.committable(), Some(900));
        for o in 900..950 {
            assert!(t.done(o, 0), "records below the reset point keep their epoch");
        }
        assert_eq!(t.committable(), Some(950), "waits for the re-delivered record");
        assert!(t.done(950, 1));
        assert_eq!(t.committable(), Some(951));
    }

    #[test]
    fn position_below_the_tracker_rebases() {
        let mut t = OffsetTracker::new();
        recv(&mut t, 0..10);
        (0..10).for_each(|o| {
            t.done(o, 0);
        });
        assert_eq!(t.committable(), Some(10));
        let rebase = t.observe_position(3).unwrap();
        assert_eq!((rebase.to, rebase.forgotten), (3, 0));
        assert_eq!(t.committable(), Some(3), "never beyond the reset position");
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

    /// One step of the re-base model: receive the next offset (possibly after a reset to `reset_to`), or complete
    /// the `pick`-th received record.
    #[derive(Debug, Clone)]
    enum Step {
        Receive { gap: i64 },
        Reset { back: i64 },
        Done { pick: usize },
    }

    fn steps() -> impl Strategy<Value = Vec<Step>> {
        proptest::collection::vec(
            prop_oneof![
                6 => (1i64..3).prop_map(|gap| Step::Receive { gap }),
                1 => (0i64..40).prop_map(|back| Step::Reset { back }),
                5 => any::<usize>().prop_map(|pick| Step::Done { pick }),
            ],
            1..200,
        )
    }

    #[test]
    fn completions_are_found_across_gaps_in_the_offsets() {
        // 10, 11, 15, 16, 17 (a compacted range): the position `offset - front` names the wrong entry or none at all.
        let mut t = OffsetTracker::new();
        for o in [10, 11, 15, 16, 17] {
            t.received(o);
        }
        assert!(t.done(16, 0), "16 is the 4th entry, not the 7th");
        assert!(t.done(15, 0));
        assert!(!t.done(14, 0), "never received");
        assert!(!t.done(16, 0), "already done");
        assert_eq!(t.committable(), Some(10));
        assert!(t.done(10, 0) && t.done(11, 0));
        assert_eq!(t.committable(), Some(17), "10, 11, 15 and 16 done: the commit point is 17");
        assert!(t.done(17, 0));
        assert_eq!((t.committable(), t.outstanding()), (Some(18), 0));
    }

    proptest! {
        #[test]
        fn any_completion_order_never_passes_an_unfinished_record((offsets, order) in offsets_and_order()) {
            let mut t = OffsetTracker::new();
            for &o in &offsets {
                prop_assert_eq!(t.received(o), None);
            }
            let mut done = vec![false; offsets.len()];
            for &i in &order {
                t.done(offsets[i], 0);
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

        /// With resets anywhere: no record is ever refused, the commit never passes a record that is live (received
        /// in the current log view and not done), never exceeds the last offset the consumer delivered + 1, and stale
        /// completions (of records forgotten by a re-base) change nothing.
        #[test]
        fn rebasing_never_refuses_a_record_nor_passes_a_live_one(steps in steps()) {
            let mut t = OffsetTracker::new();
            // The model: live records (offset, epoch, done) in the current view of the log; all records ever
            // received with their epoch (including forgotten ones, whose completion may still arrive).
            let mut live: Vec<(i64, u32, bool)> = Vec::new();
            let mut ever: Vec<(i64, u32)> = Vec::new();
            let mut next = 0i64;
            for step in steps {
                match step {
                    Step::Receive { gap } => {
                        let o = next + gap - 1;
                        prop_assert_eq!(t.received(o), None);
                        live.push((o, t.epoch(), false));
                        ever.push((o, t.epoch()));
                        next = o + 1;
                    }
                    Step::Reset { back } => {
                        let o = (next - 1 - back).max(0);
                        let expected_rebase = o < next;
                        let r = t.received(o);
                        prop_assert_eq!(r.is_some(), expected_rebase && !ever.is_empty());
                        live.retain(|(lo, _, _)| *lo < o);
                        live.push((o, t.epoch(), false));
                        ever.push((o, t.epoch()));
                        next = o + 1;
                    }
                    Step::Done { pick } => {
                        if ever.is_empty() {
                            continue;
                        }
                        let (o, e) = ever[pick % ever.len()];
                        let is_live = live.iter_mut().find(|(lo, le, d)| *lo == o && *le == e && !*d);
                        let was_live = is_live.is_some();
                        if let Some(l) = is_live {
                            l.2 = true;
                        }
                        prop_assert_eq!(t.done(o, e), was_live, "only live records are marked");
                    }
                }
                let c = t.committable().unwrap_or(0);
                if let Some(first) = live.iter().find(|l| !l.2) {
                    prop_assert_eq!(c, first.0, "commit stops at the first live unfinished record");
                } else {
                    prop_assert_eq!(c, next, "everything live done: one past the last delivered offset");
                }
                prop_assert!(c <= next, "never beyond what the consumer delivered");
                prop_assert_eq!(t.outstanding(), live.iter().filter(|l| !l.2).count());
            }
        }
    }
}
