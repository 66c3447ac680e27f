//! The Kubernetes permissions the operator's code uses, in one place. The chart's ClusterRole
//! (or Role per watched namespace) must grant exactly these; a test of the chart compares with
//! [`RULES`].

/// One RBAC rule: API group ("" = core), resource (with subresource), verbs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    pub api_group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
    /// Where in the code the permission is used.
    pub used_by: &'static str,
}

/// Every (apiGroup, resource, verbs) the operator needs.
pub const RULES: &[Rule] = &[
    Rule {
        api_group: "kpipe.io",
        resource: "consumerpipelines",
        verbs: &["get", "list", "watch"],
        used_by: "controller: primary watch (reflector) and the startup CRD check",
    },
    Rule {
        api_group: "kpipe.io",
        resource: "consumerpipelines/status",
        verbs: &["get", "patch"],
        used_by: "controller: server-side apply of .status",
    },
    Rule {
        api_group: "kpipe.io",
        resource: "deadletterreplays",
        verbs: &["get", "list", "watch"],
        used_by: "replay controller (operator/src/replay): primary watch of DeadLetterReplays",
    },
    Rule {
        api_group: "kpipe.io",
        resource: "deadletterreplays/status",
        verbs: &["get", "patch"],
        used_by: "replay controller: server-side apply of a replay's .status",
    },
    Rule {
        api_group: "batch",
        resource: "jobs",
        verbs: &["get", "list", "watch", "create", "patch"],
        used_by: "replay controller: owned-object watch and server-side apply of the replay Job",
    },
    Rule {
        api_group: "apps",
        resource: "deployments",
        verbs: &["get", "list", "watch", "create", "patch"],
        used_by: "controller: owned-object watch and server-side apply of the worker Deployment",
    },
    Rule {
        api_group: "",
        resource: "configmaps",
        verbs: &["get", "list", "watch", "create", "patch"],
        used_by: "controller: owned-object watch and server-side apply of the worker ConfigMap",
    },
    Rule {
        api_group: "",
        resource: "secrets",
        verbs: &["get", "list", "watch"],
        used_by: "controller: referenced SASL/TLS Secrets (get: key names for validation, values only for the lag probe; \
                  list/watch: metadata-only trigger so a created or rotated Secret reconciles at once)",
    },
    Rule {
        api_group: "",
        resource: "pods",
        verbs: &["list", "watch"],
        used_by: "controller: worker pods' readiness and restarts (crash loops, consumer-set changes), read only",
    },
    Rule {
        api_group: "events.k8s.io",
        resource: "events",
        verbs: &["create", "patch"],
        used_by: "events Recorder (patch aggregates event series)",
    },
    Rule {
        api_group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["get", "create", "patch"],
        used_by: "leader election (operator/src/leader.rs: get, create, merge patch with resourceVersion), only with --leader-election",
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_wildcards_and_no_duplicates() {
        let mut seen = std::collections::BTreeSet::new();
        for r in RULES {
            assert!(!r.resource.contains('*') && !r.verbs.contains(&"*"), "{r:?}");
            assert!(seen.insert((r.api_group, r.resource)), "duplicate {r:?}");
        }
    }
}
