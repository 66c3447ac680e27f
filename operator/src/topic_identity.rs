//! Source topics keep their identity (issue 13) and the idle-offsets record survives operator restarts
//! (issue 20), both through `status.topics`.
//!
//! **Recreated topics.** Kafka tells a deleted-and-recreated topic from the old one by its topic ID
//! (KIP-516; Metadata v10+). The operator records, per source topic, the ID the group's committed
//! offsets belong to (`status.topics[].topicId`, so it survives restarts and leader changes). When
//! the broker reports another ID for a topic:
//! 1. a Warning Event [`TOPIC_RECREATED`] and the condition `TopicRecreated=True` say so;
//! 2. the Deployment is held at 0 replicas ([`hold`]), so no worker consumes with offsets of the old
//!    topic (librdkafka would apply them to the new one: records below the old position skipped);
//! 3. once no worker pod is left, the group's committed offsets of that topic are set to the new
//!    topic's log start with an OffsetCommit as a client outside the group (generation -1, which Kafka
//!    refuses while the group has members, so a worker still leaving is retried next poll);
//! 4. the new ID is recorded in status in the same reconcile, still at zero replicas; scaling resumes
//!    at the next poll, after that record is durable (an operator that restarts in between repeats the
//!    reset, which is idempotent while the workers are held).
//!
//! Throughout, the operator's in-memory state of the old topic is discarded: the offset book
//! ([`crate::keepalive`], which would otherwise "restore" the old offsets onto the new topic) and the
//! lag tracker's partitions.
//!
//! Why OffsetCommit at the log start and not OffsetDelete: a commit states exactly where the workers
//! start (every record of the new topic, whatever `startOffset` says and whatever the producers'
//! clocks did to a timestamp lookup), it is the primitive the offset keeper already uses, and the
//! offset book records it like any other commit. OffsetDelete would leave the start to `startOffset`.
//!
//! **Persisted record.** [`TopicState::for_status`] writes the offset book's record
//! ([`crate::keepalive::OffsetBook::export`]) into `status.topics[].committedOffsets` while the
//! pipeline is idle (while workers run the record moves every poll and is not needed: a restore only
//! happens while idle), and [`TopicState::before_keepalive`] loads it into a fresh book.
//!
//! The decisions ([`compare`], [`step`], [`ids_to_record`], [`records`], [`hold`]) are pure;
//! [`TopicState::before_keepalive`] does the I/O.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::api::core::v1::ObjectReference;
use kpipe_api::v1alpha1::{ConsumerPipelineStatus, TopicRecord};
use kube::runtime::events::EventType;
use tracing::{debug, warn};

use crate::controller::Shared;
use crate::group_offsets::Commit;
use crate::keepalive::{Key, OffsetBook};
use crate::lag::{LagTracker, PartitionOffsets};
use crate::probe::Cluster;
use crate::scaler::{Decision, Reason};

/// Reason of the Warning Event and the condition raised when a source topic was recreated.
pub const TOPIC_RECREATED: &str = "TopicRecreated";

/// A source topic whose ID on the broker differs from the recorded one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recreated {
    pub topic: String,
    /// The ID the group's committed offsets belong to (recorded in status).
    pub old_id: String,
    /// The ID the broker reports now.
    pub new_id: String,
}

impl std::fmt::Display for Recreated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (topic ID {} → {})", self.topic, self.old_id, self.new_id)
    }
}

/// The recorded topic IDs of a status.
pub fn recorded_ids(status: Option<&ConsumerPipelineStatus>) -> BTreeMap<String, String> {
    status
        .map(|s| s.topics.iter().filter_map(|t| Some((t.name.clone(), t.topic_id.clone()?))).collect())
        .unwrap_or_default()
}

/// The topics whose ID on the broker (`observed`: `None` = the topic does not exist) differs from the
/// recorded one, in topic order. A topic without a recorded ID, or that does not exist now, is not
/// recreated (yet).
pub fn compare(recorded: &BTreeMap<String, String>, observed: &HashMap<String, Option<String>>) -> Vec<Recreated> {
    let mut out: Vec<Recreated> = observed
        .iter()
        .filter_map(|(topic, id)| {
            let (old, new) = (recorded.get(topic)?, id.as_ref()?);
            (old != new).then(|| Recreated { topic: topic.clone(), old_id: old.clone(), new_id: new.clone() })
        })
        .collect();
    out.sort_by(|a, b| a.topic.cmp(&b.topic));
    out
}

/// What to do this poll about recreated topics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// No topic was recreated.
    Nothing,
    /// Keep (or bring) the workers at zero: some may still consume with the old offsets.
    Hold,
    /// No worker is left: commit these (every partition of the recreated topics at its log start).
    Reset(Vec<(Key, Commit)>),
}

/// The step for `recreated` topics. `idle`: no worker pod exists and none is wanted. A recreated topic
/// whose partitions the probe did not report is held until they are.
pub fn step(recreated: &[Recreated], idle: bool, offsets: &[PartitionOffsets]) -> Step {
    if recreated.is_empty() {
        return Step::Nothing;
    }
    if !idle {
        return Step::Hold;
    }
    let mut commits = Vec::new();
    for r in recreated {
        let parts: Vec<&PartitionOffsets> = offsets.iter().filter(|p| p.topic == r.topic).collect();
        if parts.is_empty() {
            return Step::Hold;
        }
        for p in parts {
            commits.push(((p.topic.clone(), p.partition), Commit { offset: p.log_start, metadata: String::new() }));
        }
    }
    Step::Reset(commits)
}

/// The topic ID to record for each of `topics` (the spec's source topics): the recorded one, the new ID
/// of a topic whose reset is `done`, the observed ID of a topic seen for the first time, else none (a
/// topic the broker did not describe this poll keeps its recorded ID: a recreate must never be recorded
/// without its reset).
pub fn ids_to_record(
    topics: &[String],
    recorded: &BTreeMap<String, String>,
    observed: &HashMap<String, Option<String>>,
    done: &[Recreated],
) -> BTreeMap<String, Option<String>> {
    topics
        .iter()
        .map(|topic| {
            let now = observed.get(topic).cloned().flatten();
            let id = match (recorded.get(topic), now) {
                (Some(_), Some(new)) if done.iter().any(|d| &d.topic == topic && d.new_id == new) => Some(new),
                (Some(old), _) => Some(old.clone()),
                (None, now) => now,
            };
            (topic.clone(), id)
        })
        .collect()
}

/// `status.topics`: one record per topic of `ids` (sorted by name), with the idle offset record of the
/// topic when `idle_offsets` is given (the pipeline is idle), else the previous status's offsets for the
/// same topic ID. A topic whose ID changed keeps no offsets (they belong to the old topic).
pub fn records(
    ids: &BTreeMap<String, Option<String>>,
    idle_offsets: Option<&BTreeMap<String, Vec<i64>>>,
    previous: &[TopicRecord],
) -> Vec<TopicRecord> {
    ids.iter()
        .map(|(name, id)| {
            let committed_offsets = match idle_offsets {
                Some(book) => book.get(name).cloned().unwrap_or_default(),
                None => previous
                    .iter()
                    .find(|r| &r.name == name && &r.topic_id == id)
                    .map(|r| r.committed_offsets.clone())
                    .unwrap_or_default(),
            };
            TopicRecord { name: name.clone(), topic_id: id.clone(), committed_offsets }
        })
        .collect()
}

/// The scaler's decision, or zero replicas while a recreated topic's old offsets are being discarded.
pub fn hold(decision: Decision, state: &TopicState) -> Decision {
    if state.recreated.is_empty() {
        return decision;
    }
    let topics: Vec<String> = state.recreated.iter().map(|r| r.topic.clone()).collect();
    Decision {
        desired: 0,
        reason: Reason::TopicRecreated,
        message: format!(
            "{} recreated: workers held at zero until the group's offsets are moved to the new topic's log start",
            topics.join(", ")
        ),
    }
}

/// What status shows of the topics this poll.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ForStatus {
    /// `status.topics` (None: keep the previous value).
    pub records: Option<Vec<TopicRecord>>,
    /// The `TopicRecreated` condition's message while it is True.
    pub recreated: Option<String>,
}

/// A pipeline's in-memory state of its topics' identity (per operator process and leadership term).
#[derive(Clone, Debug, Default)]
pub struct TopicState {
    /// Whether the persisted offset record was loaded into the offset book.
    loaded: bool,
    /// Topic IDs to record this poll (None: not read this poll).
    ids: Option<BTreeMap<String, Option<String>>>,
    /// Whether the pipeline was idle this poll (the offset record is persisted only then).
    idle: bool,
    /// Topics recreated and not reset yet (or reset this poll, not yet recorded).
    recreated: Vec<Recreated>,
    /// (topic, new ID) pairs whose Warning Event was published.
    announced: BTreeSet<(String, String)>,
    /// Polls in a row whose status came back without the `topics` this operator wrote.
    missing_polls: u32,
    /// Why the last attempt to move a recreated topic's offsets to its log start failed (cleared when one
    /// succeeds): the workers stay held at zero meanwhile, so status and an Event must say why.
    reset_error: Option<String>,
}

/// Polls in a row after which a status without `topics` means the installed CRD does not keep the field.
const PRUNED_AFTER_POLLS: u32 = 3;

/// Whether the installed CRD does not keep `status.topics`: records were written for `missing_polls` polls in
/// a row and never came back (or the apiserver refused them). Then nothing is recorded (writing it every poll
/// would only load the apiserver).
pub fn pruned(missing_polls: u32) -> bool {
    missing_polls >= PRUNED_AFTER_POLLS
}

/// Whether the apiserver refused a status apply because its CRD does not declare `status.topics` (an operator
/// newer than the installed CRD: server-side apply refuses undeclared fields instead of pruning them).
pub fn refused_for_topics(err: &kube::Error) -> bool {
    match err {
        kube::Error::Api(s) => s.message.contains(".status.topics") && s.message.contains("not declared"),
        _ => false,
    }
}

impl TopicState {
    /// Before the offset keeper runs: load the persisted offset record (first poll of this term), read
    /// the topics' IDs, and for recreated topics discard the old topic's state, raise the Event and,
    /// once no worker is left, move the group's offsets to the new log start (updating `offsets`).
    #[allow(clippy::too_many_arguments)]
    pub async fn before_keepalive(
        &mut self,
        shared: &Shared,
        cluster: &Cluster,
        group: &str,
        status: Option<&ConsumerPipelineStatus>,
        offsets: &mut [PartitionOffsets],
        idle: bool,
        book: &mut OffsetBook,
        tracker: Option<&mut LagTracker>,
        oref: &ObjectReference,
    ) {
        let recorded = recorded_ids(status);
        let wrote = self.ids.as_ref().is_some_and(|ids| !ids.is_empty()) && !pruned(self.missing_polls);
        let came_back = status.is_some_and(|s| !s.topics.is_empty());
        let before = self.missing_polls;
        self.missing_polls = match (wrote, came_back) {
            (_, true) => 0,
            (true, false) => before + 1,
            (false, false) => before,
        };
        if !pruned(before) && pruned(self.missing_polls) {
            warn!(
                group,
                "status.topics is not in the installed ConsumerPipeline CRD (an older CRD prunes it): recreated topics \
                 are not detected and the idle-offsets record is not persisted until the CRD is upgraded"
            );
        }
        if !self.loaded {
            self.loaded = true;
            let persisted = status.map(|s| s.topics.as_slice()).unwrap_or_default();
            let n = book.import(persisted.iter().map(|t| (t.name.as_str(), t.committed_offsets.as_slice())));
            if n > 0 {
                debug!(group, partitions = n, "loaded the recorded idle offsets from status");
            }
        }
        self.idle = idle;
        let topics: Vec<String> =
            offsets.iter().map(|p| p.topic.clone()).collect::<BTreeSet<_>>().into_iter().collect();
        let observed = match shared.keeper.topic_ids(cluster, &topics).await {
            Some(Ok(ids)) => ids,
            Some(Err(e)) => {
                debug!(group, error = %e, "cannot read topic IDs; retried next poll");
                self.ids = None;
                return;
            }
            None => {
                self.ids = None;
                self.recreated.clear();
                return;
            }
        };
        self.recreated = compare(&recorded, &observed);
        let mut tracker = tracker;
        for r in &self.recreated {
            book.forget_topic(&r.topic);
            if let Some(t) = tracker.as_deref_mut() {
                t.forget_topic(&r.topic);
            }
            if self.announced.insert((r.topic.clone(), r.new_id.clone())) {
                let note = format!(
                    "topic {r} was deleted and recreated: the group's committed offsets of the old topic are \
                     discarded; workers are held at zero until they start at the new topic's log start"
                );
                warn!(group, "{note}");
                shared.event(oref, EventType::Warning, TOPIC_RECREATED, note, "DiscardOffsets").await;
            }
        }
        let mut done = Vec::new();
        if let Step::Reset(commits) = step(&self.recreated, idle, offsets) {
            match shared.keeper.commit_idle(cluster, group, commits.clone()).await {
                Ok(true) => {
                    for ((topic, partition), c) in &commits {
                        if let Some(p) = offsets.iter_mut().find(|p| &p.topic == topic && p.partition == *partition) {
                            p.committed = Some(c.offset);
                            p.start_position = false;
                        }
                    }
                    let list = commits.iter().map(|((t, p), c)| format!("{t}/{p}@{}", c.offset)).collect::<Vec<_>>();
                    let note = format!(
                        "committed offsets set to the recreated topics' log start ({}); scaling resumes next poll",
                        list.join(", ")
                    );
                    shared.event(oref, EventType::Normal, TOPIC_RECREATED, note, "ResetOffsets").await;
                    done = self.recreated.clone();
                }
                Ok(false) => {}
                Err(e) => {
                    let error = e.to_string();
                    warn!(group, %error, "moving a recreated topic's offsets failed; retried next poll");
                    if self.reset_error.as_deref() != Some(error.as_str()) {
                        let note = format!(
                            "cannot commit the recreated topics' log-start offsets ({error}); workers stay at zero \
                             and it is retried every poll"
                        );
                        shared.event(oref, EventType::Warning, TOPIC_RECREATED, note, "ResetOffsets").await;
                    }
                    self.reset_error = Some(error);
                }
            }
        }
        if self.recreated.is_empty() || !done.is_empty() {
            self.reset_error = None;
        }
        self.ids = Some(ids_to_record(&topics, &recorded, &observed, &done));
        self.announced.retain(|(t, id)| self.recreated.iter().any(|r| &r.topic == t && &r.new_id == id));
    }

    /// After a status apply: when the apiserver refused it for `status.topics` (an older CRD), stop recording
    /// them (warned once) and return `status` without them, to be written again. `None`: nothing to retry.
    pub fn without_topics_if_refused<T>(
        &mut self,
        written: &Result<T, kube::Error>,
        status: &ConsumerPipelineStatus,
    ) -> Option<ConsumerPipelineStatus> {
        let refused = written.as_ref().err().is_some_and(refused_for_topics);
        if !refused {
            return None;
        }
        if !pruned(self.missing_polls) {
            warn!(
                "the installed ConsumerPipeline CRD has no status.topics (older than this operator): recreated \
                 topics are not detected and the idle-offsets record is not persisted until the CRD is upgraded"
            );
        }
        self.missing_polls = PRUNED_AFTER_POLLS;
        Some(ConsumerPipelineStatus { topics: Vec::new(), ..status.clone() })
    }

    /// What status shows: the records (topic IDs and, while idle, `book`'s offsets) and the condition.
    pub fn for_status(&self, book: &OffsetBook, previous: Option<&ConsumerPipelineStatus>) -> ForStatus {
        let exported = self.idle.then(|| book.export());
        let previous = previous.map(|s| s.topics.as_slice()).unwrap_or_default();
        ForStatus {
            records: self
                .ids
                .as_ref()
                .filter(|_| !pruned(self.missing_polls))
                .map(|ids| records(ids, exported.as_ref(), previous)),
            recreated: (!self.recreated.is_empty()).then(|| {
                let list: Vec<String> = self.recreated.iter().map(|r| r.to_string()).collect();
                let mut message = format!(
                    "deleted and recreated: {}; the old topic's committed offsets are discarded and the workers \
                     held at zero until the group starts at the new topic's log start",
                    list.join(", ")
                );
                if let Some(error) = &self.reset_error {
                    message.push_str(&format!("; committing that start failed: {error} (retried every poll)"));
                }
                message
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn po(topic: &str, partition: i32, log_start: i64, log_end: i64, committed: Option<i64>) -> PartitionOffsets {
        PartitionOffsets { topic: topic.into(), partition, log_start, log_end, committed, ..Default::default() }
    }

    fn ids(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(t, i)| (t.to_string(), i.to_string())).collect()
    }

    fn observed(pairs: &[(&str, Option<&str>)]) -> HashMap<String, Option<String>> {
        pairs.iter().map(|(t, i)| (t.to_string(), i.map(str::to_string))).collect()
    }

    #[test]
    fn a_changed_id_is_a_recreated_topic_and_nothing_else_is() {
        let recorded = ids(&[("a", "A1"), ("b", "B1"), ("gone", "G1")]);
        let now = observed(&[("a", Some("A1")), ("b", Some("B2")), ("gone", None), ("new", Some("N1"))]);
        assert_eq!(
            compare(&recorded, &now),
            vec![Recreated { topic: "b".into(), old_id: "B1".into(), new_id: "B2".into() }]
        );
        assert!(compare(&BTreeMap::new(), &now).is_empty(), "first sight records, never resets");
    }

    /// The decision of the case: recreated while workers run → hold; no worker left → reset every
    /// partition of that topic (only that topic) to the new log start, whatever the group committed before.
    #[test]
    fn recreated_topics_are_held_then_reset_to_the_new_log_start() {
        let r = vec![Recreated { topic: "b".into(), old_id: "B1".into(), new_id: "B2".into() }];
        let offsets = [po("a", 0, 0, 50, Some(40)), po("b", 0, 0, 1500, Some(1000)), po("b", 1, 3, 9, None)];
        assert_eq!(step(&[], true, &offsets), Step::Nothing);
        assert_eq!(step(&r, false, &offsets), Step::Hold);
        let c = |offset| Commit { offset, metadata: String::new() };
        assert_eq!(step(&r, true, &offsets), Step::Reset(vec![(("b".into(), 0), c(0)), (("b".into(), 1), c(3))]));
        assert_eq!(step(&r, true, &offsets[..1]), Step::Hold, "partitions not probed yet");
    }

    fn opt_ids(pairs: &[(&str, Option<&str>)]) -> BTreeMap<String, Option<String>> {
        pairs.iter().map(|(t, i)| (t.to_string(), i.map(str::to_string))).collect()
    }

    #[test]
    fn the_new_id_is_recorded_only_once_the_reset_is_done() {
        let topics: Vec<String> = ["a", "b", "c", "d", "e"].iter().map(|t| t.to_string()).collect();
        let recorded = ids(&[("a", "A1"), ("b", "B1"), ("dropped", "D1"), ("e", "E1")]);
        // e: the broker did not describe it this poll (e.g. no leader yet right after a recreate).
        let now = observed(&[("a", Some("A1")), ("b", Some("B2")), ("c", Some("C1")), ("d", None)]);
        let pending = ids_to_record(&topics, &recorded, &now, &[]);
        let want = [("a", Some("A1")), ("b", Some("B1")), ("c", Some("C1")), ("d", None), ("e", Some("E1"))];
        assert_eq!(pending, opt_ids(&want));
        let done = [Recreated { topic: "b".into(), old_id: "B1".into(), new_id: "B2".into() }];
        let want = [("a", Some("A1")), ("b", Some("B2")), ("c", Some("C1")), ("d", None), ("e", Some("E1"))];
        assert_eq!(ids_to_record(&topics, &recorded, &now, &done), opt_ids(&want));
        // Recorded while gone: the old ID stays until the topic is back.
        let gone = ids_to_record(&topics, &ids(&[("d", "D0")]), &now, &[]);
        assert_eq!(gone.get("d"), Some(&Some("D0".to_string())));
    }

    #[test]
    fn offsets_are_persisted_while_idle_and_kept_otherwise() {
        let idsm = opt_ids(&[("a", Some("A1")), ("b", Some("B2"))]);
        let previous = vec![
            TopicRecord { name: "a".into(), topic_id: Some("A1".into()), committed_offsets: vec![4, 5] },
            TopicRecord { name: "b".into(), topic_id: Some("B1".into()), committed_offsets: vec![1000] },
        ];
        let busy = records(&idsm, None, &previous);
        assert_eq!(busy[0].committed_offsets, vec![4, 5], "busy: the last idle record stays");
        assert!(busy[1].committed_offsets.is_empty(), "offsets of an older topic ID are dropped");
        let book = BTreeMap::from([("a".to_string(), vec![6, 5])]);
        let idle = records(&idsm, Some(&book), &previous);
        assert_eq!(idle[0].committed_offsets, vec![6, 5]);
        assert_eq!(idle[1], TopicRecord { name: "b".into(), topic_id: Some("B2".into()), committed_offsets: vec![] });
    }

    #[test]
    fn a_status_refused_for_its_topics_is_written_again_without_them() {
        let refused = |message: &str| -> Result<(), kube::Error> {
            Err(kube::Error::Api(
                serde_json::from_value(serde_json::json!({"status": "Failure", "message": message, "reason": "",
                    "code": 500}))
                .unwrap(),
            ))
        };
        let status = ConsumerPipelineStatus {
            replicas: 2,
            topics: vec![TopicRecord { name: "a".into(), topic_id: Some("A1".into()), committed_offsets: vec![] }],
            ..Default::default()
        };
        let mut s = TopicState { ids: Some(opt_ids(&[("a", Some("A1"))])), ..Default::default() };
        assert_eq!(s.without_topics_if_refused(&Ok(()), &status), None);
        assert_eq!(s.without_topics_if_refused(&refused("conflict"), &status), None);
        let msg = "failed to create typed patch object (/; kpipe.io/v1alpha1, Kind=ConsumerPipeline): .status.topics: \
                   field not declared in schema";
        let again = s.without_topics_if_refused(&refused(msg), &status).unwrap();
        assert_eq!(again, ConsumerPipelineStatus { replicas: 2, ..Default::default() });
        assert_eq!(s.for_status(&OffsetBook::default(), None).records, None, "not recorded any more");
    }

    #[test]
    fn a_crd_that_prunes_the_records_stops_the_writes_after_three_polls() {
        assert!(!pruned(0) && !pruned(2));
        assert!(pruned(3));
        let s = TopicState { ids: Some(opt_ids(&[("a", Some("A1"))])), missing_polls: 3, ..Default::default() };
        assert_eq!(s.for_status(&OffsetBook::default(), None).records, None, "keep the previous status as it is");
    }

    #[test]
    fn hold_overrides_the_scaler_only_while_a_recreate_is_pending() {
        let d = Decision { desired: 3, reason: Reason::ScaleUp, message: "lag".into() };
        let mut s = TopicState::default();
        assert_eq!(hold(d.clone(), &s), d);
        s.recreated = vec![Recreated { topic: "b".into(), old_id: "B1".into(), new_id: "B2".into() }];
        let held = hold(d, &s);
        assert_eq!((held.desired, held.reason), (0, Reason::TopicRecreated));
        assert!(s.for_status(&OffsetBook::default(), None).recreated.unwrap().contains("b (topic ID B1 → B2)"));
    }

    /// A reset that keeps failing (e.g. the operator may not commit the group's offsets) keeps the workers
    /// at zero: the condition names the failure instead of only saying they are held.
    #[test]
    fn a_failing_reset_is_named_in_the_condition() {
        let mut s = TopicState {
            recreated: vec![Recreated { topic: "b".into(), old_id: "B1".into(), new_id: "B2".into() }],
            reset_error: Some("Group authorization failed".into()),
            ..Default::default()
        };
        let m = s.for_status(&OffsetBook::default(), None).recreated.unwrap();
        assert!(m.contains("committing that start failed: Group authorization failed"), "{m}");
        s.reset_error = None;
        assert!(!s.for_status(&OffsetBook::default(), None).recreated.unwrap().contains("failed"));
    }
}
