//! The worker pods of a pipeline as the operator sees them: how many, how many ready, restarts
//! and crash loops, and a fingerprint of the consumer set. Pure: the controller extracts
//! [`PodView`]s from its Pod cache and passes the clock.
//!
//! Why: "lag not draining because workers crash" must be distinguishable from a poison record
//! (DESIGN.md §3), and every change of the consumer set (a pod added, removed or restarted) is a
//! rebalance, after which the lag tracker's stuck evidence starts over.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kpipe_api::v1alpha1::WorkerSummary;

/// How long after a container restart its pod counts as crash-looping.
pub const RECENT_RESTART: Duration = Duration::from_secs(300);

/// What the operator reads of one worker pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodView {
    pub name: String,
    /// The pod's `Ready` condition is True.
    pub ready: bool,
    /// Restarts of the worker container (summed over containers).
    pub restarts: i32,
    /// A container waits with this reason (e.g. `CrashLoopBackOff`, `ImagePullBackOff`).
    pub waiting_reason: Option<String>,
    /// The last termination of a container: reason and when it finished (Unix seconds).
    pub last_termination: Option<(String, i64)>,
}

impl PodView {
    /// Reads a Pod's status; missing fields read as "not ready, no restarts".
    pub fn from_pod(pod: &Pod) -> Self {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let Some(status) = pod.status.as_ref() else { return Self { name, ..Default::default() } };
        let ready =
            status.conditions.as_ref().is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let mut view = Self { name, ready, ..Default::default() };
        for c in status.container_statuses.iter().flatten() {
            view.restarts += c.restart_count;
            if let Some(reason) = c.state.as_ref().and_then(|s| s.waiting.as_ref()).and_then(|w| w.reason.clone()) {
                view.waiting_reason = Some(reason);
            }
            if let Some(t) = c.last_state.as_ref().and_then(|s| s.terminated.as_ref()) {
                let finished = t.finished_at.as_ref().map(|f| f.0.as_second()).unwrap_or(0);
                if view.last_termination.as_ref().is_none_or(|(_, at)| finished > *at) {
                    let reason = t.reason.clone().unwrap_or_else(|| format!("exit code {}", t.exit_code));
                    view.last_termination = Some((reason, finished));
                }
            }
        }
        view
    }
}

/// The pipeline's worker pods, summed up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerPods {
    pub pods: i32,
    pub ready: i32,
    pub restarts: i32,
    /// Pods that restarted within [`RECENT_RESTART`] or wait in `CrashLoopBackOff`.
    pub crash_looping: i32,
    /// The reason of the most recent container termination.
    pub last_termination_reason: Option<String>,
    /// Changes whenever a pod appears, goes, restarts or flips readiness (see [`crate::lag::Consumers::epoch`]).
    pub epoch: u64,
}

impl WorkerPods {
    /// Summarises `pods` at `now_secs` (Unix seconds).
    pub fn summarize(pods: &[PodView], now_secs: i64) -> Self {
        let mut sorted: Vec<&PodView> = pods.iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        let mut hasher = DefaultHasher::new();
        let mut out = Self { pods: pods.len() as i32, ..Default::default() };
        let mut latest: Option<(&str, i64)> = None;
        for p in sorted {
            (&p.name, p.ready, p.restarts).hash(&mut hasher);
            out.ready += i32::from(p.ready);
            out.restarts += p.restarts;
            let recent = p.last_termination.as_ref().is_some_and(|(_, at)| {
                p.restarts > 0 && now_secs.saturating_sub(*at) <= RECENT_RESTART.as_secs() as i64
            });
            if recent || p.waiting_reason.as_deref() == Some("CrashLoopBackOff") {
                out.crash_looping += 1;
            }
            if let Some((reason, at)) = &p.last_termination
                && latest.is_none_or(|(_, t)| *at > t)
            {
                latest = Some((reason, *at));
            }
        }
        out.last_termination_reason = latest.map(|(r, _)| r.to_string());
        out.epoch = hasher.finish();
        out
    }

    /// `status.workers`.
    pub fn summary(&self) -> WorkerSummary {
        WorkerSummary {
            pods: self.pods,
            restarts: self.restarts,
            crash_looping: self.crash_looping,
            last_termination_reason: self.last_termination_reason.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ready: bool, restarts: i32) -> PodView {
        PodView { name: name.into(), ready, restarts, ..Default::default() }
    }

    #[test]
    fn counts_and_crash_loops() {
        let now = 10_000;
        let pods = [
            pod("a", true, 0),
            PodView { last_termination: Some(("OOMKilled".into(), now - 20)), ..pod("b", false, 3) },
            PodView { waiting_reason: Some("CrashLoopBackOff".into()), ..pod("c", false, 7) },
            PodView { last_termination: Some(("Error".into(), now - 3600)), ..pod("d", true, 1) },
        ];
        let w = WorkerPods::summarize(&pods, now);
        assert_eq!((w.pods, w.ready, w.restarts, w.crash_looping), (4, 2, 11, 2));
        assert_eq!(w.last_termination_reason.as_deref(), Some("OOMKilled"));
        assert_eq!(w.summary().crash_looping, 2);
    }

    #[test]
    fn epoch_changes_with_the_consumer_set_only() {
        let base = [pod("a", true, 0), pod("b", true, 0)];
        let e = |pods: &[PodView]| WorkerPods::summarize(pods, 0).epoch;
        assert_eq!(e(&base), e(&[pod("b", true, 0), pod("a", true, 0)]), "order does not matter");
        assert_ne!(e(&base), e(&[pod("a", true, 1), pod("b", true, 0)]), "a restart");
        assert_ne!(e(&base), e(&[pod("a", true, 0), pod("b", false, 0)]), "readiness flipped");
        assert_ne!(e(&base), e(&[pod("a", true, 0)]), "a pod went away");
        assert_ne!(e(&base), e(&[pod("a", true, 0), pod("c", true, 0)]), "replaced by another pod");
    }
}
