//! Circuit breaker for the processor: when the downstream is unavailable (timeouts, connection
//! errors, HTTP 500/502/503/504, retryable produce errors — [`crate::classify::FailureClass::is_unavailable`]), stop
//! sending, stop spending the records' attempt budgets, and probe at a bounded interval until it is
//! back. The DLQ is for bad records, not for a downstream that is down (DESIGN.md §2).
//!
//! States (the usual closed → open → half-open cycle):
//! - **closed**: calls go through; each call's outcome (unavailable or not) enters a sliding time
//!   window. When the window holds at least `min_calls` outcomes and the unavailable share reaches
//!   `failure_ratio`, the circuit opens.
//! - **open**: no call goes out until `open_for(n)` has passed, n = times it re-opened in a row:
//!   `min(initial_open × 2ⁿ, max_open)`.
//! - **half-open**: exactly one call (a real batch, the *probe*) goes out; the others wait. The
//!   probe succeeding closes the circuit (the window starts empty); failing re-opens it with the
//!   next longer interval. A probe that never reports (its job was abandoned) is replaced after
//!   `max_open`.
//!
//! [`Breaker`] is the pure state machine (the clock is passed in); [`CircuitBreaker`] is the shared,
//! async gate the jobs await before each processor call. While the circuit is open, jobs wait at the
//! gate holding their records, so partitions stop taking records and the consumer pauses them by its
//! ordinary backpressure; nothing is dead-lettered and no attempt is counted
//! ([`CircuitBreaker::record`] tells the job whether a failure counts).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::health::Health;
use crate::metrics::Metrics;

/// Breaker thresholds (`spec.processor.circuitBreaker`, [`BreakerSettings::from_spec`]). Defaults:
/// 10 s window, at least 5 calls, 50 % unavailable, first probe after 5 s, then 10 s, 20 s, ... up
/// to 60 s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerSettings {
    /// Sliding window of call outcomes considered while closed.
    pub window: Duration,
    /// Fewest outcomes in the window before it may open.
    pub min_calls: usize,
    /// Share of unavailable outcomes in the window that opens it, in (0, 1].
    pub failure_ratio: f64,
    /// Wait before the first probe after opening.
    pub initial_open: Duration,
    /// Longest wait between probes.
    pub max_open: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(10),
            min_calls: 5,
            failure_ratio: 0.5,
            initial_open: Duration::from_secs(5),
            max_open: Duration::from_secs(60),
        }
    }
}

impl BreakerSettings {
    /// The defaults, with `min_calls` at most `max_attempts − 1` (and at least 1): the circuit opens
    /// before a record can exhaust `retry.maxAttempts` on unavailability alone (its failing calls
    /// are enough to open it, and the call that opens it is not counted).
    pub fn for_max_attempts(max_attempts: u32) -> Self {
        let d = Self::default();
        let cap = max_attempts.saturating_sub(1).max(1) as usize;
        Self { min_calls: d.min_calls.min(cap), ..d }
    }

    /// The settings `spec.processor.circuitBreaker` asks for, or `None` when it turns the breaker
    /// off (`enabled: false`). Unset: [`Self::for_max_attempts`]. Set: its fields, with
    /// `minimumCalls` defaulting as in [`Self::for_max_attempts`] and the failure rate threshold a
    /// percentage (1–100, clamped here too: a worker can be run by hand on a config the apiserver
    /// never saw).
    pub fn from_spec(spec: Option<&kpipe_api::v1alpha1::CircuitBreaker>, max_attempts: u32) -> Option<Self> {
        let derived = Self::for_max_attempts(max_attempts);
        let Some(cb) = spec else { return Some(derived) };
        if !cb.enabled {
            return None;
        }
        let initial_open = cb.open_duration.as_std();
        Some(Self {
            window: cb.window.as_std(),
            min_calls: cb.minimum_calls.map_or(derived.min_calls, |n| n.max(1) as usize),
            failure_ratio: f64::from(cb.failure_rate_threshold.clamp(1, 100)) / 100.0,
            initial_open,
            max_open: cb.max_open_duration.as_std().max(initial_open),
        })
    }
}

/// The breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    /// No calls until `until`.
    Open {
        until: Instant,
    },
    /// One probe in flight since `since`.
    HalfOpen {
        since: Instant,
    },
}

impl State {
    /// Gauge value of `kpipe_worker_circuit_state`: 0 closed, 1 open, 2 half-open.
    pub fn gauge(&self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::Open { .. } => 1,
            Self::HalfOpen { .. } => 2,
        }
    }
}

/// What a caller may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Call the processor; `probe` when this call decides whether the circuit closes.
    Go { probe: bool },
    /// Not before this instant (open), or until the probe reports (half-open).
    WaitUntil(Instant),
}

/// A state change caused by a reported outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    None,
    Opened,
    Closed,
}

/// The pure state machine.
#[derive(Debug)]
pub struct Breaker {
    settings: BreakerSettings,
    state: State,
    /// (when, unavailable) of calls that reported while closed, oldest first.
    outcomes: VecDeque<(Instant, bool)>,
    /// How many of `outcomes` are unavailable (kept with them: no scan of the window per call).
    unavailable: usize,
    /// Times the circuit opened in a row without closing (sets the probe interval).
    reopened: u32,
}

impl Breaker {
    pub fn new(settings: BreakerSettings) -> Self {
        Self { settings, state: State::Closed, outcomes: VecDeque::new(), unavailable: 0, reopened: 0 }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Open or half-open: the downstream is considered unavailable.
    pub fn is_open(&self) -> bool {
        self.state != State::Closed
    }

    /// Wait before the next probe after opening `n` times in a row (n = 0 the first time).
    pub fn open_for(&self, n: u32) -> Duration {
        let factor = 2f64.powi(n.min(30) as i32);
        self.settings.initial_open.mul_f64(factor).min(self.settings.max_open)
    }

    /// May a call go out at `now`?
    pub fn admit(&mut self, now: Instant) -> Admit {
        match self.state {
            State::Closed => Admit::Go { probe: false },
            State::Open { until } if now >= until => {
                self.state = State::HalfOpen { since: now };
                Admit::Go { probe: true }
            }
            State::Open { until } => Admit::WaitUntil(until),
            State::HalfOpen { since } if now >= since + self.settings.max_open => {
                // The probe never reported: send another.
                self.state = State::HalfOpen { since: now };
                Admit::Go { probe: true }
            }
            State::HalfOpen { since } => Admit::WaitUntil(since + self.settings.max_open),
        }
    }

    fn open(&mut self, now: Instant) {
        self.state = State::Open { until: now + self.open_for(self.reopened) };
        self.reopened = self.reopened.saturating_add(1);
        self.outcomes.clear();
        self.unavailable = 0;
    }

    /// Reports a call's outcome: `unavailable` when it failed with an unavailability class
    /// (see [`crate::classify::FailureClass::is_unavailable`]), `probe` as admitted.
    pub fn record(&mut self, now: Instant, unavailable: bool, probe: bool) -> Transition {
        match self.state {
            State::HalfOpen { .. } if probe => {
                if unavailable {
                    self.open(now);
                    Transition::None
                } else {
                    self.state = State::Closed;
                    self.reopened = 0;
                    self.outcomes.clear();
                    self.unavailable = 0;
                    Transition::Closed
                }
            }
            // Calls that started before the circuit opened: their outcome says nothing new.
            State::Open { .. } | State::HalfOpen { .. } => Transition::None,
            State::Closed => {
                self.outcomes.push_back((now, unavailable));
                self.unavailable += usize::from(unavailable);
                while self
                    .outcomes
                    .front()
                    .is_some_and(|(t, _)| now.saturating_duration_since(*t) > self.settings.window)
                {
                    if let Some((_, u)) = self.outcomes.pop_front() {
                        self.unavailable -= usize::from(u);
                    }
                }
                let total = self.outcomes.len();
                let bad = self.unavailable;
                if total >= self.settings.min_calls.max(1)
                    && bad as f64 >= self.settings.failure_ratio * total as f64
                    && bad > 0
                {
                    self.open(now);
                    Transition::Opened
                } else {
                    Transition::None
                }
            }
        }
    }
}

/// The worker-wide gate around processor calls (see the module docs).
pub struct CircuitBreaker {
    inner: Mutex<Breaker>,
    changed: Notify,
    metrics: Metrics,
    health: std::sync::Arc<Health>,
}

impl CircuitBreaker {
    pub fn new(settings: BreakerSettings, metrics: Metrics, health: std::sync::Arc<Health>) -> Self {
        Self { inner: Mutex::new(Breaker::new(settings)), changed: Notify::new(), metrics, health }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until a call may go out; returns whether it is the probe.
    pub async fn admit(&self) -> bool {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let decision = {
                let mut b = self.lock();
                let d = b.admit(Instant::now());
                self.metrics.circuit_state.set(b.state().gauge());
                d
            };
            match decision {
                Admit::Go { probe } => return probe,
                Admit::WaitUntil(t) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(t) => {}
                        _ = &mut notified => {}
                    }
                }
            }
        }
    }

    /// Reports a call's outcome (`unavailable`: nothing succeeded and the failures are the
    /// downstream's, [`crate::classify::FailureClass::is_unavailable`]). Returns whether the call's unavailability
    /// failures count against the records' budgets: false when the circuit is open after this report
    /// (the failure is the downstream's, and the records wait for it to recover).
    pub fn record(&self, unavailable: bool, probe: bool) -> bool {
        let mut b = self.lock();
        let transition = b.record(Instant::now(), unavailable, probe);
        self.metrics.circuit_state.set(b.state().gauge());
        let open = b.is_open();
        drop(b);
        match transition {
            Transition::Opened => {
                self.metrics.circuit_opened.inc();
                self.health.set_circuit_open(true);
                tracing::warn!(
                    "processor unavailable: circuit opened; partitions wait for it to recover, no attempts are spent"
                );
                self.changed.notify_waiters();
            }
            Transition::Closed => {
                self.health.set_circuit_open(false);
                tracing::info!("processor recovered: circuit closed");
                self.changed.notify_waiters();
            }
            Transition::None if probe => self.changed.notify_waiters(),
            Transition::None => {}
        }
        !open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> BreakerSettings {
        BreakerSettings {
            window: Duration::from_secs(10),
            min_calls: 4,
            failure_ratio: 0.5,
            initial_open: Duration::from_secs(5),
            max_open: Duration::from_secs(60),
        }
    }

    #[test]
    fn the_spec_sets_the_knobs_and_unset_fields_keep_the_defaults() {
        use kpipe_api::v1alpha1::CircuitBreaker as Spec;
        assert_eq!(BreakerSettings::from_spec(None, 3), Some(BreakerSettings::for_max_attempts(3)));
        assert_eq!(
            BreakerSettings::from_spec(Some(&Spec::default()), 3),
            Some(BreakerSettings::for_max_attempts(3)),
            "an empty circuitBreaker object is the defaults"
        );
        assert_eq!(BreakerSettings::from_spec(Some(&Spec { enabled: false, ..Spec::default() }), 8), None);
        let spec = Spec {
            enabled: true,
            window: kpipe_api::Duration::from_secs(30),
            minimum_calls: Some(20),
            failure_rate_threshold: 80,
            open_duration: kpipe_api::Duration::from_millis(500),
            max_open_duration: kpipe_api::Duration::from_secs(10),
        };
        assert_eq!(
            BreakerSettings::from_spec(Some(&spec), 8),
            Some(BreakerSettings {
                window: Duration::from_secs(30),
                min_calls: 20,
                failure_ratio: 0.8,
                initial_open: Duration::from_millis(500),
                max_open: Duration::from_secs(10),
            })
        );
        let nonsense = Spec {
            minimum_calls: Some(0),
            failure_rate_threshold: 0,
            max_open_duration: kpipe_api::Duration::from_millis(100),
            ..spec
        };
        let s = BreakerSettings::from_spec(Some(&nonsense), 8).unwrap();
        assert_eq!((s.min_calls, s.failure_ratio, s.max_open), (1, 0.01, Duration::from_millis(500)));
    }

    #[test]
    fn min_calls_never_lets_a_record_exhaust_its_attempts_first() {
        assert_eq!(BreakerSettings::for_max_attempts(8).min_calls, 5);
        assert_eq!(BreakerSettings::for_max_attempts(3).min_calls, 2);
        assert_eq!(BreakerSettings::for_max_attempts(1).min_calls, 1);
        assert_eq!(BreakerSettings::for_max_attempts(0).min_calls, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_the_failure_ratio_only_with_enough_calls() {
        let t = Instant::now();
        let mut b = Breaker::new(settings());
        assert_eq!(b.record(t, true, false), Transition::None);
        assert_eq!(b.record(t, true, false), Transition::None);
        assert_eq!(b.record(t, true, false), Transition::None, "3 calls < min_calls");
        assert_eq!(b.record(t, false, false), Transition::Opened, "3 of 4 unavailable");
        assert!(b.is_open());
        assert_eq!(b.admit(t + Duration::from_secs(1)), Admit::WaitUntil(t + Duration::from_secs(5)));
    }

    #[tokio::test(start_paused = true)]
    async fn successes_keep_it_closed_and_old_failures_age_out() {
        let t = Instant::now();
        let mut b = Breaker::new(settings());
        for _ in 0..3 {
            b.record(t, true, false);
        }
        for i in 0..4 {
            assert_eq!(b.record(t + Duration::from_secs(11 + i), false, false), Transition::None);
        }
        assert_eq!(b.state(), State::Closed, "the failures left the window");
        assert_eq!(b.record(t + Duration::from_secs(15), true, false), Transition::None, "1 of 5");
        assert_eq!(b.admit(t), Admit::Go { probe: false });
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_sends_one_probe_and_backs_off_while_it_fails() {
        let t = Instant::now();
        let mut b = Breaker::new(settings());
        for _ in 0..4 {
            b.record(t, true, false);
        }
        let at5 = t + Duration::from_secs(5);
        assert_eq!(b.admit(at5), Admit::Go { probe: true });
        assert_eq!(b.admit(at5), Admit::WaitUntil(at5 + Duration::from_secs(60)), "one probe at a time");
        assert_eq!(b.record(at5, false, false), Transition::None, "a late non-probe outcome changes nothing");
        assert_eq!(b.record(at5, true, true), Transition::None);
        assert_eq!(b.state(), State::Open { until: at5 + Duration::from_secs(10) }, "second interval doubles");
        let at15 = at5 + Duration::from_secs(10);
        assert_eq!(b.admit(at15), Admit::Go { probe: true });
        assert_eq!(b.record(at15, false, true), Transition::Closed);
        assert_eq!(b.admit(at15), Admit::Go { probe: false });
        assert_eq!(b.open_for(0), Duration::from_secs(5), "the interval starts over after closing");
    }

    #[tokio::test(start_paused = true)]
    async fn the_probe_interval_is_bounded_and_a_lost_probe_is_replaced() {
        let b = Breaker::new(settings());
        assert_eq!(b.open_for(3), Duration::from_secs(40));
        assert_eq!(b.open_for(4), Duration::from_secs(60));
        assert_eq!(b.open_for(u32::MAX), Duration::from_secs(60));
        let t = Instant::now();
        let mut b = Breaker::new(settings());
        for _ in 0..4 {
            b.record(t, true, false);
        }
        let at5 = t + Duration::from_secs(5);
        assert_eq!(b.admit(at5), Admit::Go { probe: true });
        assert_eq!(b.admit(at5 + Duration::from_secs(60)), Admit::Go { probe: true }, "the first probe was lost");
    }

    #[tokio::test(start_paused = true)]
    async fn the_gate_holds_calls_while_open_and_failures_do_not_count() {
        let m = Metrics::new().unwrap();
        let h = std::sync::Arc::new(Health::default());
        let cb = std::sync::Arc::new(CircuitBreaker::new(settings(), m.clone(), h.clone()));
        for _ in 0..3 {
            assert!(!cb.admit().await);
            assert!(cb.record(true, false), "closed: failures count");
        }
        assert!(!cb.admit().await);
        assert!(!cb.record(true, false), "this failure opened it: not counted");
        assert_eq!(m.circuit_state.get(), 1);
        assert_eq!(m.circuit_opened.get(), 1);
        assert!(h.circuit_open());
        let started = Instant::now();
        assert!(cb.admit().await, "the first call after the wait is the probe");
        assert!(started.elapsed() >= Duration::from_secs(5));
        assert!(cb.record(false, true), "probe succeeded: closed");
        assert_eq!(m.circuit_state.get(), 0);
        assert!(!h.circuit_open());
    }
}
