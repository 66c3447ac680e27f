//! Retry schedule: exponential backoff with full jitter, a cap, an attempt budget and an optional
//! record-age budget. Pure: the random draw and the clock are passed in.

use std::time::Duration;

use kpipe_api::v1alpha1::Retry;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackoffPolicy {
    pub max_attempts: u32,
    pub initial: Duration,
    pub max: Duration,
    pub multiplier: f64,
    pub max_record_age: Option<Duration>,
}

/// Why a record gets no further retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    AttemptsExhausted,
    RecordTooOld,
}

impl From<&Retry> for BackoffPolicy {
    fn from(r: &Retry) -> Self {
        Self {
            max_attempts: r.max_attempts.max(1),
            initial: r.initial_backoff.as_std(),
            max: r.max_backoff.as_std(),
            multiplier: r.multiplier.max(1.0),
            max_record_age: r.max_record_age.map(|d| d.as_std()),
        }
    }
}

impl BackoffPolicy {
    /// Upper bound of the wait before retry number `retry` (1 = first retry):
    /// min(max, initial × multiplier^(retry-1)).
    pub fn ceiling(&self, retry: u32) -> Duration {
        let exp = self.multiplier.powi(retry.saturating_sub(1).min(1024) as i32);
        let secs = self.initial.as_secs_f64() * exp;
        if !secs.is_finite() || secs >= self.max.as_secs_f64() {
            self.max
        } else {
            Duration::from_secs_f64(secs.max(0.0))
        }
    }

    /// Full jitter: a uniform draw `unit` in [0, 1) scales the ceiling.
    pub fn delay(&self, retry: u32, unit: f64) -> Duration {
        self.ceiling(retry).mul_f64(unit.clamp(0.0, 1.0))
    }

    /// After `attempts` failed attempts of a record aged `age`, may it be tried again?
    pub fn may_retry(&self, attempts: u32, age: Option<Duration>) -> Result<(), GiveUp> {
        if attempts >= self.max_attempts {
            return Err(GiveUp::AttemptsExhausted);
        }
        if let (Some(limit), Some(age)) = (self.max_record_age, age)
            && age > limit
        {
            return Err(GiveUp::RecordTooOld);
        }
        Ok(())
    }
}

/// A uniform draw in [0, 1) from the thread RNG.
pub fn jitter_unit() -> f64 {
    rand::random::<f64>()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn policy() -> BackoffPolicy {
        BackoffPolicy {
            max_attempts: 5,
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
            multiplier: 2.0,
            max_record_age: Some(Duration::from_secs(60)),
        }
    }

    #[test]
    fn ceiling_grows_exponentially_then_caps() {
        let p = policy();
        assert_eq!(p.ceiling(1), Duration::from_millis(100));
        assert_eq!(p.ceiling(2), Duration::from_millis(200));
        assert_eq!(p.ceiling(4), Duration::from_millis(800));
        assert_eq!(p.ceiling(6), Duration::from_secs(2));
        assert_eq!(p.ceiling(u32::MAX), Duration::from_secs(2));
    }

    #[test]
    fn budgets() {
        let p = policy();
        assert_eq!(p.may_retry(1, None), Ok(()));
        assert_eq!(p.may_retry(5, None), Err(GiveUp::AttemptsExhausted));
        assert_eq!(p.may_retry(1, Some(Duration::from_secs(61))), Err(GiveUp::RecordTooOld));
        assert_eq!(p.may_retry(1, Some(Duration::from_secs(59))), Ok(()));
    }

    #[test]
    fn from_spec_defaults() {
        let p = BackoffPolicy::from(&Retry::default());
        assert_eq!(p.max_attempts, 8);
        assert_eq!(p.ceiling(1), Duration::from_millis(100));
        assert_eq!(p.max, Duration::from_secs(30));
    }

    proptest! {
        #[test]
        fn delay_is_within_zero_and_ceiling(retry in 0u32..200, unit in 0.0f64..1.0, mult in 1.0f64..10.0) {
            let p = BackoffPolicy { multiplier: mult, ..policy() };
            let d = p.delay(retry, unit);
            prop_assert!(d <= p.ceiling(retry));
            prop_assert!(d <= p.max);
            prop_assert!(p.ceiling(retry) <= p.ceiling(retry + 1));
        }
    }
}
