//! State behind `/healthz` and `/readyz`.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use kpipe_api::commit_metadata::RetryReport;

/// A record waiting for another attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Retrying {
    attempts: u32,
    /// First failure, Unix milliseconds.
    since_ms: u64,
}

#[derive(Default)]
pub struct Health {
    /// Subscribed to the source topics after reaching the brokers.
    subscribed: AtomicBool,
    /// Why the brokers are unreachable, while they are.
    broker_error: Mutex<Option<String>>,
    /// Records stalled by the `block` failure policy: (topic, partition, offset) → last error.
    blocked: Mutex<BTreeMap<(String, i32, i64), String>>,
    /// Records that failed and wait for another attempt (or for their dead-letter write), until they
    /// are done: reported to the operator through the commit metadata.
    retrying: Mutex<BTreeMap<(String, i32, i64), Retrying>>,
    /// When the processor circuit breaker opened, Unix milliseconds; 0 while it is closed.
    circuit_open_since_ms: AtomicU64,
    /// Records whose dead-letter write failed several times in a row: (topic, partition, offset) →
    /// last error.
    dead_letter_failing: Mutex<BTreeMap<(String, i32, i64), String>>,
    /// Retry state a previous owner of a partition reported at its commit point (read from the
    /// committed offset's metadata at assignment): (topic, partition, offset) → state, taken by the
    /// job that starts the record so its budget continues where it was.
    inherited: Mutex<HashMap<(String, i32, i64), Retrying>>,
    /// Entries in `inherited`: the hot path only looks there when this is not zero.
    inherited_len: AtomicUsize,
}

/// Readiness verdict and a human-readable detail.
pub struct Readiness {
    pub ready: bool,
    pub detail: String,
}

impl Health {
    pub fn set_subscribed(&self) {
        self.subscribed.store(true, Ordering::Relaxed);
    }

    pub fn set_broker_error(&self, error: Option<String>) {
        if let Ok(mut e) = self.broker_error.lock() {
            *e = error;
        }
    }

    pub fn has_broker_error(&self) -> bool {
        self.broker_error.lock().map(|e| e.is_some()).unwrap_or(false)
    }

    pub fn block(&self, topic: &str, partition: i32, offset: i64, error: String) {
        if let Ok(mut b) = self.blocked.lock() {
            b.insert((topic.to_owned(), partition, offset), error);
        }
    }

    pub fn unblock(&self, topic: &str, partition: i32, offset: i64) {
        if let Ok(mut b) = self.blocked.lock() {
            b.remove(&(topic.to_owned(), partition, offset));
        }
    }

    /// The processor circuit breaker opened (`true`) or closed.
    pub fn set_circuit_open(&self, open: bool) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(1).max(1);
        self.circuit_open_since_ms.store(if open { now } else { 0 }, Ordering::Relaxed);
    }

    pub fn circuit_open(&self) -> bool {
        self.circuit_open_since_ms.load(Ordering::Relaxed) != 0
    }

    /// The dead-letter write of a record keeps failing (`Some(error)`), or succeeded (`None`).
    pub fn dead_letter_failing(&self, topic: &str, partition: i32, offset: i64, error: Option<String>) {
        if let Ok(mut d) = self.dead_letter_failing.lock() {
            let key = (topic.to_owned(), partition, offset);
            match error {
                Some(e) => {
                    d.insert(key, e);
                }
                None => {
                    d.remove(&key);
                }
            }
        }
    }

    /// A partition was assigned with a previous owner's retry report at its commit point: the record's
    /// failed attempts and first failure continue here (`retry.maxAttempts` and `maxRecordAge` mean
    /// what they say across rebalances, restarts and scale events). Reports without failed attempts
    /// (only an open circuit) carry nothing to continue.
    pub fn inherit(&self, topic: &str, partition: i32, report: &RetryReport) {
        if report.attempts == 0 {
            return;
        }
        let state = Retrying { attempts: report.attempts, since_ms: report.since_ms };
        let key = (topic.to_owned(), partition, report.offset);
        tracing::info!(
            topic,
            partition,
            offset = report.offset,
            attempts = report.attempts,
            "continuing the attempt budget of a record the previous owner was retrying"
        );
        if let Ok(mut r) = self.retrying.lock() {
            r.insert(key.clone(), state);
        }
        if let Ok(mut i) = self.inherited.lock() {
            i.insert(key, state);
            self.inherited_len.store(i.len(), Ordering::Release);
        }
    }

    /// The inherited (failed attempts, first failure in Unix ms) of a record about to start, if any
    /// (taken: asked once per record).
    pub fn take_inherited(&self, topic: &str, partition: i32, offset: i64) -> Option<(u32, u64)> {
        if self.inherited_len.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut i = self.inherited.lock().ok()?;
        let state = i.remove(&(topic.to_owned(), partition, offset))?;
        self.inherited_len.store(i.len(), Ordering::Release);
        Some((state.attempts, state.since_ms))
    }

    /// A record failed and will be tried again (`attempts` failures so far, the first at `since_ms`).
    pub fn retrying(&self, topic: &str, partition: i32, offset: i64, attempts: u32, since_ms: u64) {
        if let Ok(mut r) = self.retrying.lock() {
            r.insert((topic.to_owned(), partition, offset), Retrying { attempts, since_ms });
        }
    }

    /// A record that was retried is done (processed, dead-lettered or dropped).
    pub fn settled(&self, topic: &str, partition: i32, offset: i64) {
        if let Ok(mut r) = self.retrying.lock() {
            r.remove(&(topic.to_owned(), partition, offset));
        }
    }

    /// Forgets the retry state of a partition that is no longer assigned (its records were abandoned
    /// or finished; a later assignment starts its own count).
    pub fn forget_partition(&self, topic: &str, partition: i32) {
        let in_partition = |k: &(String, i32, i64)| k.0 == topic && k.1 == partition;
        if let Ok(mut r) = self.retrying.lock() {
            r.retain(|k, _| !in_partition(k));
        }
        if let Ok(mut b) = self.blocked.lock() {
            b.retain(|k, _| !in_partition(k));
        }
        if let Ok(mut d) = self.dead_letter_failing.lock() {
            d.retain(|k, _| !in_partition(k));
        }
        if let Ok(mut i) = self.inherited.lock() {
            i.retain(|k, _| !in_partition(k));
            self.inherited_len.store(i.len(), Ordering::Release);
        }
    }

    /// The retry state of the record at `commit_point` of a partition, if that record is being
    /// retried, or if the processor circuit breaker is open (then every partition with a commit point
    /// waits for the processor: `attempts` is the record's, 0 if it never failed, and `sinceMs` the
    /// earlier of its first failure and the circuit's opening): what the worker reports to the operator
    /// in the commit metadata ([`kpipe_api::commit_metadata`]). `now_ms` stamps the report.
    pub fn retry_report(&self, topic: &str, partition: i32, commit_point: i64, now_ms: u64) -> Option<RetryReport> {
        // An inherited budget below the commit point belongs to a record that is done or will never come
        // (compacted away): dropped here, once per commit, so the per-record lookup stops once none is left.
        if self.inherited_len.load(Ordering::Acquire) != 0
            && let Ok(mut i) = self.inherited.lock()
        {
            i.retain(|(t, p, o), _| !(t == topic && *p == partition && *o < commit_point));
            self.inherited_len.store(i.len(), Ordering::Release);
        }
        let key = (topic.to_owned(), partition, commit_point);
        let state = self.retrying.lock().ok()?.get(&key).copied();
        let open_since = self.circuit_open_since_ms.load(Ordering::Relaxed);
        let (attempts, since_ms) = match (state, open_since) {
            (Some(s), 0) => (s.attempts, s.since_ms),
            (Some(s), open) => (s.attempts, s.since_ms.min(open)),
            (None, 0) => return None,
            (None, open) => (0, open),
        };
        let blocked = self.blocked.lock().map(|b| b.contains_key(&key)).unwrap_or(false);
        let dead_letter_failing = self.dead_letter_failing.lock().map(|d| d.contains_key(&key)).unwrap_or(false);
        Some(RetryReport {
            offset: commit_point,
            attempts,
            since_ms,
            at_ms: now_ms,
            blocked,
            circuit_open: open_since != 0,
            dead_letter_failing,
        })
    }

    /// Not ready until subscribed, or while the brokers are unreachable. Records stalled by the
    /// `block` policy keep the worker ready (restarting it would not help) but are listed.
    pub fn readiness(&self) -> Readiness {
        let mut lines = Vec::new();
        let mut ready = true;
        if !self.subscribed.load(Ordering::Relaxed) {
            ready = false;
            lines.push("not subscribed yet".to_owned());
        }
        if let Ok(e) = self.broker_error.lock()
            && let Some(e) = e.as_ref()
        {
            ready = false;
            lines.push(format!("brokers unreachable: {e}"));
        }
        if self.circuit_open() {
            lines.push("processor unavailable: circuit open, waiting for it to recover".to_owned());
        }
        if let Ok(d) = self.dead_letter_failing.lock() {
            for ((t, p, o), e) in d.iter().take(20) {
                lines.push(format!("dead-letter write failing: {t}/{p}@{o}: {e}"));
            }
        }
        if let Ok(b) = self.blocked.lock() {
            for ((t, p, o), e) in b.iter().take(20) {
                lines.push(format!("blocked: {t}/{p}@{o}: {e}"));
            }
            if b.len() > 20 {
                lines.push(format!("... and {} more blocked records", b.len() - 20));
            }
        }
        if lines.is_empty() {
            lines.push("ok".to_owned());
        }
        Readiness { ready, detail: lines.join("\n") + "\n" }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_reports_why() {
        let h = Health::default();
        assert!(!h.readiness().ready);
        h.set_subscribed();
        assert!(h.readiness().ready);
        h.set_broker_error(Some("all brokers down".into()));
        let r = h.readiness();
        assert!(!r.ready && r.detail.contains("all brokers down"));
        h.set_broker_error(None);
        h.block("t", 1, 5, "http_500".into());
        let r = h.readiness();
        assert!(r.ready && r.detail.contains("blocked: t/1@5"), "{}", r.detail);
        h.unblock("t", 1, 5);
        assert_eq!(h.readiness().detail, "ok\n");
    }

    #[test]
    fn retry_report_is_about_the_commit_point_only() {
        let h = Health::default();
        h.retrying("t", 1, 7, 2, 1_000);
        h.retrying("t", 1, 9, 1, 2_000);
        assert_eq!(h.retry_report("t", 1, 5, 9_000), None, "the head record is not retrying");
        let r = h.retry_report("t", 1, 7, 9_000).unwrap();
        assert_eq!((r.offset, r.attempts, r.since_ms, r.at_ms, r.blocked), (7, 2, 1_000, 9_000, false));
        h.block("t", 1, 7, "http_500".into());
        assert!(h.retry_report("t", 1, 7, 9_000).unwrap().blocked);
        h.settled("t", 1, 7);
        assert_eq!(h.retry_report("t", 1, 7, 9_000), None);
        assert_eq!(h.retry_report("t", 2, 9, 9_000), None, "other partition");
        h.forget_partition("t", 1);
        assert_eq!(h.retry_report("t", 1, 9, 9_000), None);
        assert!(!h.readiness().detail.contains("blocked:"), "blocked records of a revoked partition are gone");
    }

    #[test]
    fn an_inherited_budget_is_reported_and_taken_once() {
        let h = Health::default();
        assert_eq!(h.take_inherited("t", 0, 5), None);
        let r = RetryReport { offset: 5, attempts: 3, since_ms: 1_000, at_ms: 2_000, ..Default::default() };
        h.inherit("t", 0, &r);
        h.inherit("t", 1, &RetryReport { attempts: 0, ..r });
        let now = h.retry_report("t", 0, 5, 9_000).unwrap();
        assert_eq!((now.attempts, now.since_ms, now.at_ms), (3, 1_000, 9_000), "reported on at once");
        assert_eq!(h.take_inherited("t", 1, 5), None, "an open-circuit-only report carries no attempts");
        assert_eq!(h.take_inherited("t", 0, 4), None);
        assert_eq!(h.take_inherited("t", 0, 5), Some((3, 1_000)));
        assert_eq!(h.take_inherited("t", 0, 5), None, "taken once");
        // An inherited offset the commit point passed (the record never came) is dropped.
        h.inherit("t", 0, &r);
        h.retry_report("t", 0, 9, 9_000);
        assert_eq!(h.take_inherited("t", 0, 5), None, "passed, so gone");
        h.inherit("t", 0, &r);
        h.forget_partition("t", 0);
        assert_eq!(h.take_inherited("t", 0, 5), None, "revoked");
    }

    #[test]
    fn an_open_circuit_is_reported_for_every_partition_and_dead_letter_failures_are_flagged() {
        let h = Health::default();
        h.retrying("t", 1, 7, 2, 1_000);
        h.set_circuit_open(true);
        assert!(h.circuit_open());
        let r = h.retry_report("t", 0, 3, 9_000).unwrap();
        assert!(r.circuit_open && r.attempts == 0 && r.since_ms > 1_000, "{r:?}");
        let r = h.retry_report("t", 1, 7, 9_000).unwrap();
        assert_eq!((r.attempts, r.since_ms, r.circuit_open), (2, 1_000, true));
        h.set_circuit_open(false);
        assert_eq!(h.retry_report("t", 0, 3, 9_000), None);
        h.dead_letter_failing("t", 1, 7, Some("topic missing".into()));
        assert!(h.retry_report("t", 1, 7, 9_000).unwrap().dead_letter_failing);
        assert!(h.readiness().detail.contains("dead-letter write failing: t/1@7"));
        h.dead_letter_failing("t", 1, 7, None);
        assert!(!h.retry_report("t", 1, 7, 9_000).unwrap().dead_letter_failing);
    }
}
