//! The Helm chart: lint with default and non-default values, values.schema.json rejects bad values, the rendered
//! manifests (defaults, namespaced mode, monitoring on) are accepted by the real apiserver (server dry-run) and meet
//! the "restricted" Pod Security Standard, the rendered CRD is the generated one, and RBAC has no wildcards.
//!
//! Run: `cargo test -p kpipe-e2e --test chart` (needs `make testbed-up`; fails with the reason otherwise).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use kpipe_e2e::{TestBed, bed};
use kube::CustomResourceExt;
use serde_json::Value;

fn chart() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/kpipe")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn helm(bed: &TestBed, args: &[&str]) -> Output {
    Command::new(bed.helm()).args(args).env("KUBECONFIG", bed.kubeconfig()).output().expect("run helm")
}

fn render(bed: &TestBed, namespace: &str, sets: &[&str]) -> String {
    let chart = chart();
    let mut args = vec!["template", "kpipe", chart.to_str().expect("utf-8 path"), "--namespace", namespace];
    for s in sets {
        args.extend(["--set", s]);
    }
    let out = helm(bed, &args);
    assert!(out.status.success(), "helm template {sets:?} failed:\n{}", text(&out));
    String::from_utf8(out.stdout).expect("utf-8")
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml).expect("yaml").into_iter().filter(|v| !v.is_null()).collect()
}

fn kubectl_stdin(bed: &TestBed, args: &[&str], input: &str) -> Output {
    let mut child = bed
        .kubectl_cmd()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), input.as_bytes()).expect("write");
    child.wait_with_output().expect("kubectl")
}

const VALUE_SETS: &[&[&str]] = &[
    &[],
    &["watchNamespaces={team-a,team-b}"],
    &[
        "metrics.serviceMonitor.enabled=true",
        "metrics.podMonitor.enabled=true",
        "metrics.prometheusRule.enabled=true",
        "dashboard.enabled=true",
    ],
    &["replicas=2", "logging.format=text", "worker.image.tag=dev", "serviceAccount.name=custom-sa"],
    &["crds.install=false", "leaderElection.enabled=false", "metrics.service.enabled=false"],
];

#[tokio::test]
async fn chart_lints_strictly_with_default_and_other_values() {
    let bed = bed().await;
    let chart = chart();
    for sets in VALUE_SETS {
        let mut args = vec!["lint", "--strict", chart.to_str().expect("utf-8")];
        for s in *sets {
            args.extend(["--set", s]);
        }
        let out = helm(&bed, &args);
        assert!(out.status.success(), "helm lint {sets:?}:\n{}", text(&out));
    }
}

#[tokio::test]
async fn chart_values_schema_rejects_bad_values() {
    let bed = bed().await;
    let chart = chart();
    let bad: &[(&str, &str)] = &[
        ("replicas=0", "replicas"),
        ("logging.format=xml", "format"),
        ("metrics.port=80", "port"),
        ("watchNamespaces={Team_A}", "watchNamespaces"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("unknownKey=1", "unknownKey"),
        ("worker.resources.requests.gpu=1", "gpu"),
    ];
    for (set, named) in bad {
        let out = helm(&bed, &["template", "kpipe", chart.to_str().expect("utf-8"), "--set", set]);
        let said = text(&out);
        assert!(!out.status.success(), "helm accepted bad value {set}");
        assert!(said.contains(named), "rejection of {set} does not name {named}:\n{said}");
    }
    // A cross-field rule the schema cannot express is enforced by the templates.
    let out = helm(
        &bed,
        &[
            "template",
            "kpipe",
            chart.to_str().expect("utf-8"),
            "--set",
            "replicas=2",
            "--set",
            "leaderElection.enabled=false",
        ],
    );
    assert!(!out.status.success() && text(&out).contains("leaderElection"), "{}", text(&out));
}

#[tokio::test]
async fn chart_renders_manifests_the_apiserver_accepts() {
    let bed = bed().await;
    let release_ns = bed.temp_namespace("chart-rel").await.expect("namespace");
    let team_a = bed.temp_namespace("chart-a").await.expect("namespace");
    let team_b = bed.temp_namespace("chart-b").await.expect("namespace");
    // The restricted Pod Security Standard is enforced where the operator runs.
    let out = bed
        .kubectl_cmd()
        .args(["label", "namespace", release_ns.name(), "pod-security.kubernetes.io/enforce=restricted", "--overwrite"])
        .output()
        .expect("kubectl");
    assert!(out.status.success(), "{}", text(&out));
    // prometheus-operator is not part of the bed: minimal CRDs so ServiceMonitor/PodMonitor/PrometheusRule can be
    // validated (the rules themselves are checked by promtool in e2e/tests/alerts.rs).
    let monitoring_crds = ["servicemonitors:ServiceMonitor", "podmonitors:PodMonitor", "prometheusrules:PrometheusRule"]
        .iter()
        .map(|pair| {
            let (plural, kind) = pair.split_once(':').expect("pair");
            format!(
                "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata: {{name: {plural}.monitoring.coreos.com}}\nspec:\n  group: monitoring.coreos.com\n  scope: Namespaced\n  names: {{plural: {plural}, kind: {kind}}}\n  versions: [{{name: v1, served: true, storage: true, schema: {{openAPIV3Schema: {{type: object, x-kubernetes-preserve-unknown-fields: true}}}}}}]\n---\n"
            )
        })
        .collect::<String>();
    let out = kubectl_stdin(&bed, &["apply", "--server-side", "-f", "-"], &monitoring_crds);
    assert!(out.status.success(), "{}", text(&out));
    kpipe_e2e::scenario::wait_crds_established(
        &bed,
        &[
            "servicemonitors.monitoring.coreos.com",
            "podmonitors.monitoring.coreos.com",
            "prometheusrules.monitoring.coreos.com",
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));

    let namespaced = format!("watchNamespaces={{{},{}}}", team_a.name(), team_b.name());
    let variants: Vec<Vec<&str>> = vec![
        vec![],
        vec![namespaced.as_str()],
        vec![
            "metrics.serviceMonitor.enabled=true",
            "metrics.podMonitor.enabled=true",
            "metrics.prometheusRule.enabled=true",
            "dashboard.enabled=true",
        ],
    ];
    for sets in &variants {
        let manifests = render(&bed, release_ns.name(), sets);
        let out = kubectl_stdin(&bed, &["apply", "--dry-run=server", "-f", "-"], &manifests);
        let said = text(&out);
        assert!(out.status.success(), "apiserver rejected the chart rendered with {sets:?}:\n{said}");
        assert!(!said.contains("would violate PodSecurity"), "operator pod is not 'restricted' ({sets:?}):\n{said}");
        let docs = documents(&manifests);
        let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
        if sets.iter().any(|s| s.starts_with("metrics.prometheusRule.enabled=true")) {
            assert!(kinds.contains(&"PrometheusRule"), "{kinds:?}");
        }
        if sets.iter().any(|s| s.starts_with("watchNamespaces")) {
            assert!(!kinds.contains(&"ClusterRole"), "namespaced mode must not grant cluster-wide access: {kinds:?}");
            let roles: Vec<&str> = docs
                .iter()
                .filter(|d| {
                    d["kind"] == "Role" && !d["metadata"]["name"].as_str().unwrap_or("").ends_with("leader-election")
                })
                .filter_map(|d| d["metadata"]["namespace"].as_str())
                .collect();
            assert_eq!(roles, [team_a.name(), team_b.name()]);
        } else {
            assert!(kinds.contains(&"ClusterRole") && kinds.contains(&"ClusterRoleBinding"), "{kinds:?}");
        }
    }
    for ns in [release_ns, team_a, team_b] {
        ns.delete().await.expect("delete namespace");
    }
}

#[tokio::test]
async fn chart_crd_is_the_generated_one_and_kept_on_uninstall() {
    let bed = bed().await;
    let docs = documents(&render(&bed, "kpipe-system", &[]));
    let rendered = docs.iter().find(|d| d["kind"] == "CustomResourceDefinition").expect("chart renders the CRD");
    let generated = serde_json::to_value(kpipe_api::all_crds().remove(0)).expect("crd json");
    // Numbers may change representation through Helm (100000.0 -> 100000); compare semantically.
    fn normalise(v: &Value) -> Value {
        match v {
            Value::Number(n) => n.as_f64().map(Value::from).unwrap_or(Value::Null),
            Value::Array(a) => Value::Array(a.iter().map(normalise).collect()),
            Value::Object(o) => Value::Object(o.iter().map(|(k, v)| (k.clone(), normalise(v))).collect()),
            other => other.clone(),
        }
    }
    assert_eq!(normalise(&rendered["spec"]), normalise(&generated["spec"]), "chart CRD differs from the generated CRD");
    assert_eq!(rendered["metadata"]["annotations"]["helm.sh/resource-policy"], "keep");
    let replay = docs
        .iter()
        .find(|d| d["kind"] == "CustomResourceDefinition" && d["metadata"]["name"] == "deadletterreplays.kpipe.io")
        .expect("chart renders the DeadLetterReplay CRD");
    let generated = serde_json::to_value(kpipe_api::v1alpha1::DeadLetterReplay::crd()).expect("crd json");
    assert_eq!(normalise(&replay["spec"]), normalise(&generated["spec"]), "chart replay CRD differs");
    assert_eq!(replay["metadata"]["annotations"]["helm.sh/resource-policy"], "keep");
}

#[tokio::test]
async fn chart_rbac_has_no_wildcards() {
    let bed = bed().await;
    for sets in VALUE_SETS {
        for doc in documents(&render(&bed, "kpipe-system", sets)) {
            if !matches!(doc["kind"].as_str(), Some("ClusterRole" | "Role")) {
                continue;
            }
            for rule in doc["rules"].as_array().expect("rules") {
                for key in ["apiGroups", "resources", "verbs"] {
                    let items = rule[key].as_array().expect("list");
                    assert!(
                        !items.iter().any(|i| i == "*"),
                        "wildcard in {key} of {}: {rule}",
                        doc["metadata"]["name"]
                    );
                }
                assert!(rule.get("resourceNames").is_none() || rule["resourceNames"].as_array().is_some());
            }
        }
    }
}

/// The chart grants exactly the (apiGroup, resource, verb) triples the operator's code uses — never fewer (403s)
/// and never more (least privilege).
#[tokio::test]
async fn chart_rbac_equals_what_the_operator_uses() {
    let bed = bed().await;
    let mut granted = BTreeSet::new();
    for doc in documents(&render(&bed, "kpipe-system", &[])) {
        if !matches!(doc["kind"].as_str(), Some("ClusterRole" | "Role")) {
            continue;
        }
        for rule in doc["rules"].as_array().expect("rules") {
            for group in rule["apiGroups"].as_array().expect("groups") {
                for resource in rule["resources"].as_array().expect("resources") {
                    for verb in rule["verbs"].as_array().expect("verbs") {
                        granted.insert((
                            group.as_str().unwrap_or_default().to_string(),
                            resource.as_str().unwrap_or_default().to_string(),
                            verb.as_str().unwrap_or_default().to_string(),
                        ));
                    }
                }
            }
        }
    }
    let used: BTreeSet<(String, String, String)> = kpipe_operator::rbac::RULES
        .iter()
        .flat_map(|r| r.verbs.iter().map(|v| (r.api_group.to_string(), r.resource.to_string(), v.to_string())))
        .collect();
    let missing: Vec<_> = used.difference(&granted).collect();
    let extra: Vec<_> = granted.difference(&used).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "chart RBAC differs from operator/src/rbac.rs: missing {missing:?}, extra {extra:?}"
    );
}

/// Metric names a dashboard expression uses (histogram series suffixes folded into the metric name).
fn dashboard_metrics() -> BTreeSet<String> {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(chart().join("files/dashboard.json")).expect("dashboard"))
            .expect("dashboard is JSON");
    let mut names = BTreeSet::new();
    let mut exprs = Vec::new();
    fn collect(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(o) => {
                for (k, v) in o {
                    match (k.as_str(), v) {
                        ("expr", Value::String(e)) => out.push(e.clone()),
                        ("query", Value::String(e)) => out.push(e.clone()),
                        _ => collect(v, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| collect(v, out)),
            _ => {}
        }
    }
    collect(&dashboard, &mut exprs);
    for e in exprs {
        let bytes = e.as_bytes();
        let mut i = 0;
        while let Some(pos) = e[i..].find("kpipe_") {
            let start = i + pos;
            let end =
                start + e[start..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(e.len() - start);
            let name = &e[start..end];
            let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
            names.insert(base.to_string());
            i = end.max(start + 1).min(bytes.len());
        }
    }
    names
}

/// The dashboard only uses metrics the operator and worker really export.
#[test]
fn chart_dashboard_uses_only_exported_metrics() {
    let root = chart().join("../..");
    let sources: String = ["operator/src/metrics.rs", "worker/src/metrics.rs"]
        .iter()
        .map(|p| std::fs::read_to_string(root.join(p)).unwrap_or_else(|e| panic!("{p}: {e}")))
        .collect();
    let names = dashboard_metrics();
    assert!(names.len() >= 15, "dashboard uses too few metrics: {names:?}");
    let unknown: Vec<&String> = names.iter().filter(|n| !sources.contains(&format!("\"{n}\""))).collect();
    assert!(unknown.is_empty(), "dashboard uses metrics no code exports: {unknown:?}");
}
