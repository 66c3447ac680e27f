//! Adaptive concurrency: an AIMD (additive increase, multiplicative decrease — the TCP congestion
//! control rule, RFC 5681 §3.1) limit on the records in processor calls at once, per worker.
//!
//! - Starts at `max` (`concurrency.perWorker`), so a healthy downstream sees no change.
//! - Each successful call of `n` records adds `n / limit` (about +1 per limit's worth of records
//!   completed), up to `max`.
//! - An overload signal (HTTP 429 or 503, a timeout: [`crate::classify::FailureClass::is_overload`]) multiplies the
//!   limit by `decrease` (0.5), down to `min` (1), at most once per `cooldown` (calls in flight when
//!   the first signal arrived report the same overload).
//!
//! Calls that fail while the circuit breaker is open ([`crate::breaker`]) change nothing: an outage is
//! not overload, and must not leave the limit at its floor when the downstream comes back.
//!
//! A call of more records than the current limit still goes, alone (the limit is never below one
//! call). [`Aimd`] is the pure rule; [`ConcurrencyLimiter`] the async gate, with the gauge
//! `kpipe_worker_concurrency_limit`.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::metrics::Metrics;

/// The pure AIMD rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Aimd {
    limit: f64,
    min: f64,
    max: f64,
    decrease: f64,
    cooldown: Duration,
    last_decrease: Option<Instant>,
}

impl Aimd {
    /// Limits in records: `min` ≥ 1, `max` ≥ `min`; starts at `max`.
    pub fn new(min: usize, max: usize) -> Self {
        let min = min.max(1) as f64;
        let max = (max as f64).max(min);
        Self { limit: max, min, max, decrease: 0.5, cooldown: Duration::from_millis(500), last_decrease: None }
    }

    /// The current limit, in records (at least 1).
    pub fn limit(&self) -> usize {
        self.limit.floor().max(1.0) as usize
    }

    /// A call of `records` records succeeded.
    pub fn on_success(&mut self, records: usize) {
        self.limit = (self.limit + records as f64 / self.limit).min(self.max);
    }

    /// A call reported overload at `now`. Returns whether the limit went down.
    pub fn on_overload(&mut self, now: Instant) -> bool {
        if self.last_decrease.is_some_and(|t| now.saturating_duration_since(t) < self.cooldown) {
            return false;
        }
        self.last_decrease = Some(now);
        let before = self.limit;
        self.limit = (self.limit * self.decrease).max(self.min);
        self.limit < before
    }
}

#[derive(Debug)]
struct Gate {
    aimd: Aimd,
    in_use: usize,
}

/// The worker-wide gate around processor calls.
pub struct ConcurrencyLimiter {
    gate: Mutex<Gate>,
    released: Notify,
    metrics: Metrics,
}

/// Records admitted for one call; given back on drop.
pub struct Admission<'a> {
    limiter: &'a ConcurrencyLimiter,
    records: usize,
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        let mut g = self.limiter.lock();
        g.in_use = g.in_use.saturating_sub(self.records);
        drop(g);
        self.limiter.released.notify_waiters();
    }
}

impl ConcurrencyLimiter {
    pub fn new(min: usize, max: usize, metrics: Metrics) -> Self {
        let aimd = Aimd::new(min, max);
        metrics.concurrency_limit.set(aimd.limit() as i64);
        Self { gate: Mutex::new(Gate { aimd, in_use: 0 }), released: Notify::new(), metrics }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until a call of `records` records fits under the limit (or nothing else is in a call).
    pub async fn acquire(&self, records: usize) -> Admission<'_> {
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut g = self.lock();
                let want = records.min(g.aimd.limit()).max(1);
                if g.in_use == 0 || g.in_use + want <= g.aimd.limit() {
                    g.in_use += want;
                    return Admission { limiter: self, records: want };
                }
            }
            notified.await;
        }
    }

    /// Reports a finished call of `records` records: `overload` when any of its failures is a sign
    /// of overload ([`crate::classify::FailureClass::is_overload`]).
    pub fn record(&self, records: usize, overload: bool) {
        let mut g = self.lock();
        if overload {
            if g.aimd.on_overload(Instant::now()) {
                tracing::info!(limit = g.aimd.limit(), "downstream overloaded: concurrency limit lowered");
            }
        } else {
            g.aimd.on_success(records);
        }
        self.metrics.concurrency_limit.set(g.aimd.limit() as i64);
    }

    pub fn limit(&self) -> usize {
        self.lock().aimd.limit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::FailureClass;

    #[tokio::test(start_paused = true)]
    async fn halves_on_overload_once_per_cooldown_and_grows_back_additively() {
        let mut a = Aimd::new(1, 256);
        assert_eq!(a.limit(), 256);
        let t = Instant::now();
        assert!(a.on_overload(t));
        assert_eq!(a.limit(), 128);
        assert!(!a.on_overload(t + Duration::from_millis(100)), "same burst of overload");
        assert!(a.on_overload(t + Duration::from_millis(600)));
        assert_eq!(a.limit(), 64);
        // 64 records completed at limit 64: +1.
        a.on_success(64);
        assert_eq!(a.limit(), 65);
        for _ in 0..10_000 {
            a.on_success(100);
        }
        assert_eq!(a.limit(), 256, "never above max");
    }

    #[tokio::test(start_paused = true)]
    async fn never_below_min() {
        let mut a = Aimd::new(4, 16);
        let mut t = Instant::now();
        for _ in 0..20 {
            t += Duration::from_secs(1);
            a.on_overload(t);
        }
        assert_eq!(a.limit(), 4);
        assert_eq!(Aimd::new(0, 0).limit(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_gate_admits_within_the_limit_and_a_big_call_alone() {
        let m = Metrics::new().unwrap();
        let l = std::sync::Arc::new(ConcurrencyLimiter::new(1, 10, m.clone()));
        let a = l.acquire(6).await;
        let b = l.acquire(4).await;
        let waiting = tokio::spawn({
            let l = l.clone();
            async move {
                let _c = l.acquire(1).await;
            }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiting.is_finished(), "10 of 10 in use");
        drop(a);
        waiting.await.unwrap();
        drop(b);
        l.record(5, FailureClass::HttpStatus(429).is_overload());
        assert_eq!(l.limit(), 5);
        assert_eq!(m.concurrency_limit.get(), 5);
        let _big = l.acquire(500).await;
        l.record(5, false);
        assert_eq!(l.limit(), 6);
    }
}
