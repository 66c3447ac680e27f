//! Leader election on a `coordination.k8s.io/v1` Lease, safe with two replicas: the leader stops
//! acting *before* a standby can take its lease over.
//!
//! The model is client-go's `leaderelection` (lease duration > renew deadline > retry period;
//! 15 s / 10 s / 2 s by default):
//! - A standby may take the lease once `renewTime + leaseDurationSeconds` has passed on its clock.
//! - The leader counts its leadership from the moment it *sent* its last successful renew (the
//!   `renewTime` it wrote is no later than that), and stops acting `renewDeadline` after it:
//!   [`LeaderFence::may_act`] turns false on its own clock, with no request needed — which is
//!   what matters when the apiserver is unreachable and no renew can succeed or fail quickly.
//! - Every write path (children, status, Events, Kafka offset commits) asks the fence first. The
//!   margin `leaseDuration − renewDeadline` (5 s by default) covers clock drift between replicas
//!   and a write already in flight when the deadline passes.
//! - The loop then steps down (controllers stopped, "lost leadership" logged, transition counted)
//!   and keeps campaigning; a new term starts from observed state.
//!
//! kube-lease-manager 0.13 (used before) reports leadership only through a flag that does not
//! change while the apiserver is unreachable, and exposes no renew times, so the lease loop is
//! kpipe's own. The decision ([`decide`]) and the fence are pure and tested with a fake clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// Timing of the election, in the roles of client-go's `LeaderElectionConfig`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How long a lease is valid after its last renew (written as `leaseDurationSeconds`).
    pub lease_duration: Duration,
    /// How long after its last successful renew (send time) the leader stops acting.
    pub renew_deadline: Duration,
    /// Pause between attempts to acquire or renew.
    pub retry_period: Duration,
}

/// Why a [`Timing`] is unsafe.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TimingError {
    #[error("renew deadline {0:?} must be shorter than the lease duration {1:?}")]
    DeadlineNotBelowDuration(Duration, Duration),
    #[error("retry period {0:?} must be shorter than the renew deadline {1:?}")]
    RetryNotBelowDeadline(Duration, Duration),
    #[error("the lease duration must be at least 2 s")]
    TooShort,
}

impl Timing {
    /// client-go's proportions for a lease of `secs` seconds: renew deadline 2/3 of it, retry
    /// period 2/15 of it (15 s → 10 s and 2 s), the retry period at least 1 s.
    pub fn for_lease(secs: u64) -> Result<Self, TimingError> {
        let lease = Duration::from_secs(secs);
        let t = Self {
            lease_duration: lease,
            renew_deadline: lease * 2 / 3,
            retry_period: (lease * 2 / 15).max(Duration::from_millis(500)),
        };
        t.validate().map(|()| t)
    }

    /// lease duration > renew deadline > retry period, lease ≥ 2 s.
    pub fn validate(&self) -> Result<(), TimingError> {
        if self.lease_duration < Duration::from_secs(2) {
            return Err(TimingError::TooShort);
        }
        if self.renew_deadline >= self.lease_duration {
            return Err(TimingError::DeadlineNotBelowDuration(self.renew_deadline, self.lease_duration));
        }
        if self.retry_period >= self.renew_deadline {
            return Err(TimingError::RetryNotBelowDeadline(self.retry_period, self.renew_deadline));
        }
        Ok(())
    }
}

/// Whether this process may write. Cheap to clone and to ask; shared by every write path.
///
/// Times are the fence's own monotonic clock ([`Instant`] since its creation), so a wall-clock
/// jump cannot extend leadership. `*_at` methods take that clock explicitly (tests use a fake one).
#[derive(Clone, Debug)]
pub struct LeaderFence {
    inner: Arc<FenceInner>,
}

#[derive(Debug)]
struct FenceInner {
    origin: Instant,
    /// No election: always leader.
    always: bool,
    renew_deadline: Duration,
    /// Nanoseconds since `origin` until which the fence lets writes through; 0 = closed.
    valid_until_nanos: std::sync::atomic::AtomicU64,
}

impl LeaderFence {
    /// A fence for a process without leader election: always open.
    pub fn always() -> Self {
        Self::build(true, Duration::ZERO)
    }

    /// A closed fence that opens for `renew_deadline` after each successful renew.
    pub fn new(renew_deadline: Duration) -> Self {
        Self::build(false, renew_deadline)
    }

    fn build(always: bool, renew_deadline: Duration) -> Self {
        Self {
            inner: Arc::new(FenceInner {
                origin: Instant::now(),
                always,
                renew_deadline,
                valid_until_nanos: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    /// The fence's clock now.
    pub fn now(&self) -> Duration {
        self.inner.origin.elapsed()
    }

    /// A renew (or acquire) sent at `sent_at` (fence clock) succeeded.
    pub fn renewed_at(&self, sent_at: Duration) {
        let until = sent_at.saturating_add(self.inner.renew_deadline).as_nanos().min(u128::from(u64::MAX)) as u64;
        self.inner.valid_until_nanos.fetch_max(until, Ordering::AcqRel);
    }

    /// Leadership ended (stepped down, released, or another holder seen): close at once.
    pub fn close(&self) {
        self.inner.valid_until_nanos.store(0, Ordering::Release);
    }

    /// Whether a write may be sent at `now` (fence clock).
    pub fn may_act_at(&self, now: Duration) -> bool {
        self.inner.always || (now.as_nanos() as u64) < self.inner.valid_until_nanos.load(Ordering::Acquire)
    }

    /// Whether a write may be sent now. Every write path asks this right before writing.
    pub fn may_act(&self) -> bool {
        self.may_act_at(self.now())
    }
}

/// The parts of a Lease the decision reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseView {
    pub holder: Option<String>,
    /// `renewTime` as Unix microseconds.
    pub renew_micros: Option<i64>,
    pub duration_secs: Option<i32>,
}

impl LeaseView {
    fn of(lease: &Lease) -> Self {
        let spec = lease.spec.clone().unwrap_or_default();
        Self {
            holder: spec.holder_identity.filter(|h| !h.is_empty()),
            renew_micros: spec.renew_time.map(|t| t.0.as_microsecond()),
            duration_secs: spec.lease_duration_seconds,
        }
    }
}

/// What to do with the Lease this round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseAction {
    /// No Lease exists: create it holding it.
    Create,
    /// We hold it: renew.
    Renew,
    /// Free or expired: take it (a leadership transition).
    Acquire,
    /// Someone else holds a valid lease.
    Follow { holder: String },
}

/// Decide from the Lease as read (`None`: not found), our identity and the wall clock in Unix
/// microseconds. A lease is expired once `renewTime + leaseDurationSeconds` has passed; one with
/// no holder, renew time or duration is free.
pub fn decide(lease: Option<&LeaseView>, me: &str, now_micros: i64) -> LeaseAction {
    let Some(l) = lease else { return LeaseAction::Create };
    match (&l.holder, l.renew_micros, l.duration_secs) {
        (Some(h), _, _) if h == me => LeaseAction::Renew,
        (Some(h), Some(renew), Some(d)) if now_micros < renew.saturating_add(i64::from(d) * 1_000_000) => {
            LeaseAction::Follow { holder: h.clone() }
        }
        _ => LeaseAction::Acquire,
    }
}

/// Transitions for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    Acquired,
    Lost,
}

/// The election loop. Publishes leadership on a watch channel; the fence closes on its own at the
/// renew deadline even when this loop is stuck on an unreachable apiserver.
pub struct Elector {
    pub api: Api<Lease>,
    pub name: String,
    pub identity: String,
    pub timing: Timing,
    pub fence: LeaderFence,
}

impl Elector {
    /// Run until `stop` turns true, sending leadership changes to `leader_tx` and calling
    /// `on_transition`. On stop, a held lease is released (holder cleared, duration 1 s) so a
    /// standby takes over at once.
    pub async fn run(
        self,
        leader_tx: watch::Sender<bool>,
        mut stop: watch::Receiver<bool>,
        on_transition: impl Fn(Transition),
    ) {
        let leading = AtomicBool::new(false);
        let step_down = |why: &str| {
            self.fence.close();
            if leading.swap(false, Ordering::AcqRel) {
                warn!(identity = %self.identity, reason = why, "lost leadership");
                on_transition(Transition::Lost);
                let _ = leader_tx.send(false);
            }
        };
        loop {
            if *stop.borrow() {
                break;
            }
            let sent_at = self.fence.now();
            match tokio::time::timeout(self.timing.retry_period.max(Duration::from_secs(1)), self.round()).await {
                Ok(Ok(true)) => {
                    self.fence.renewed_at(sent_at);
                    if !leading.swap(true, Ordering::AcqRel) {
                        info!(identity = %self.identity, lease = %self.name, "acquired leadership");
                        on_transition(Transition::Acquired);
                        let _ = leader_tx.send(true);
                    }
                }
                Ok(Ok(false)) => step_down("another replica holds the lease"),
                Ok(Err(e)) => debug!(error = %e, "lease round failed"),
                Err(_) => debug!("lease round timed out"),
            }
            // The fence closes by itself; this makes the loop say so and stop the controllers.
            if leading.load(Ordering::Acquire) && !self.fence.may_act() {
                step_down("renew deadline passed without a successful renew");
            }
            tokio::select! {
                _ = tokio::time::sleep(self.timing.retry_period) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        if leading.load(Ordering::Acquire) {
            self.fence.close();
            let _ = leader_tx.send(false);
            if let Err(e) = tokio::time::timeout(Duration::from_secs(3), self.release()).await {
                debug!(error = %e, "lease release timed out");
            }
        }
    }

    /// One read-decide-write round: `Ok(true)` when we hold the lease after it.
    async fn round(&self) -> Result<bool, kube::Error> {
        let now = jiff::Timestamp::now();
        let current = self.api.get_opt(&self.name).await?;
        let view = current.as_ref().map(LeaseView::of);
        let secs = i32::try_from(self.timing.lease_duration.as_secs()).unwrap_or(i32::MAX);
        match decide(view.as_ref(), &self.identity, now.as_microsecond()) {
            LeaseAction::Follow { .. } => Ok(false),
            LeaseAction::Create => {
                let lease = Lease {
                    metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        acquire_time: Some(MicroTime(now)),
                        renew_time: Some(MicroTime(now)),
                        lease_duration_seconds: Some(secs),
                        lease_transitions: Some(0),
                        ..Default::default()
                    }),
                };
                self.api.create(&PostParams::default(), &lease).await.map(|_| true)
            }
            action @ (LeaseAction::Renew | LeaseAction::Acquire) => {
                // A merge patch carrying the resourceVersion read: the apiserver refuses it with a
                // conflict when anyone wrote the Lease since (optimistic concurrency, verb `patch`).
                let Some(lease) = current else { return Ok(false) };
                let rv = lease.metadata.resource_version.clone();
                let mut spec = serde_json::json!({
                    "renewTime": MicroTime(now),
                    "leaseDurationSeconds": secs,
                });
                if action == LeaseAction::Acquire {
                    let transitions = lease.spec.as_ref().and_then(|s| s.lease_transitions).unwrap_or(0);
                    spec["holderIdentity"] = serde_json::json!(self.identity);
                    spec["acquireTime"] = serde_json::json!(MicroTime(now));
                    spec["leaseTransitions"] = serde_json::json!(transitions.saturating_add(1));
                }
                let patch = serde_json::json!({"metadata": {"resourceVersion": rv}, "spec": spec});
                self.api.patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch)).await.map(|_| true)
            }
        }
    }

    async fn release(&self) -> Result<(), kube::Error> {
        let Some(lease) = self.api.get_opt(&self.name).await? else { return Ok(()) };
        if lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) != Some(self.identity.as_str()) {
            return Ok(());
        }
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": lease.metadata.resource_version},
            "spec": {"holderIdentity": null, "leaseDurationSeconds": 1},
        });
        self.api.patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch)).await.map(|_| ())
    }
}

/// Build the Lease API for `namespace`.
pub fn lease_api(client: Client, namespace: &str) -> Api<Lease> {
    Api::namespaced(client, namespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;

    fn view(holder: Option<&str>, renew_s: Option<i64>, dur: Option<i32>) -> LeaseView {
        LeaseView { holder: holder.map(Into::into), renew_micros: renew_s.map(|s| s * S), duration_secs: dur }
    }

    #[test]
    fn timing_keeps_client_go_proportions_and_rejects_unsafe_ones() {
        let t = Timing::for_lease(15).unwrap();
        assert_eq!(
            (t.lease_duration, t.renew_deadline, t.retry_period),
            (Duration::from_secs(15), Duration::from_secs(10), Duration::from_secs(2))
        );
        assert_eq!(Timing::for_lease(1), Err(TimingError::TooShort));
        let bad = Timing { renew_deadline: Duration::from_secs(15), ..t };
        assert!(matches!(bad.validate(), Err(TimingError::DeadlineNotBelowDuration(..))));
        let bad = Timing { retry_period: Duration::from_secs(10), ..t };
        assert!(matches!(bad.validate(), Err(TimingError::RetryNotBelowDeadline(..))));
    }

    #[test]
    fn lease_decisions() {
        assert_eq!(decide(None, "a", 100 * S), LeaseAction::Create);
        assert_eq!(decide(Some(&view(Some("a"), Some(0), Some(15))), "a", 100 * S), LeaseAction::Renew);
        assert_eq!(
            decide(Some(&view(Some("b"), Some(90), Some(15))), "a", 100 * S),
            LeaseAction::Follow { holder: "b".into() }
        );
        // Expired exactly at renewTime + duration.
        assert_eq!(decide(Some(&view(Some("b"), Some(85), Some(15))), "a", 100 * S), LeaseAction::Acquire);
        // Released (no holder) or inconsistent leases are free.
        assert_eq!(decide(Some(&view(None, Some(99), Some(15))), "a", 100 * S), LeaseAction::Acquire);
        assert_eq!(decide(Some(&view(Some("b"), None, Some(15))), "a", 100 * S), LeaseAction::Acquire);
    }

    #[test]
    fn fence_closes_at_the_renew_deadline_on_its_own_clock() {
        let f = LeaderFence::new(Duration::from_secs(10));
        let t = |s: u64| Duration::from_secs(s);
        assert!(!f.may_act_at(t(0)), "closed until the first successful renew");
        f.renewed_at(t(1));
        assert!(f.may_act_at(t(5)) && f.may_act_at(t(10)));
        assert!(!f.may_act_at(t(11)), "no renew for 10 s: stop acting");
        // A late success of an older request never moves the deadline back.
        f.renewed_at(t(3));
        f.renewed_at(t(2));
        assert!(f.may_act_at(t(12)) && !f.may_act_at(t(13)));
        f.close();
        assert!(!f.may_act_at(t(4)));
        assert!(LeaderFence::always().may_act_at(t(1_000_000)));
    }

    /// The safety property on a fake clock: with the apiserver cut right after a renew, the old
    /// leader's fence closes before a standby (same clock) may take the lease.
    #[test]
    fn old_leader_stops_before_a_standby_can_take_over() {
        let timing = Timing::for_lease(15).unwrap();
        let fence = LeaderFence::new(timing.renew_deadline);
        // Renew sent at fence time 100 s = wall 1000 s; the lease records renewTime 1000 s.
        fence.renewed_at(Duration::from_secs(100));
        let lease = view(Some("old"), Some(1000), Some(15));
        let mut closed_at = None;
        let mut takeover_at = None;
        for ms in (0..20_000).step_by(100) {
            let (fence_now, wall) = (Duration::from_millis(100_000 + ms), 1000 * S + ms as i64 * 1000);
            if closed_at.is_none() && !fence.may_act_at(fence_now) {
                closed_at = Some(ms);
            }
            if takeover_at.is_none() && decide(Some(&lease), "standby", wall) == LeaseAction::Acquire {
                takeover_at = Some(ms);
            }
        }
        let (closed, takeover) = (closed_at.unwrap(), takeover_at.unwrap());
        assert_eq!((closed, takeover), (10_000, 15_000));
        assert!(takeover - closed >= 5_000, "margin for clock drift and in-flight writes");
    }
}
