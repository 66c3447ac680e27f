#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure
//! The ConsumerPipeline API: generated CRD in sync, examples valid, invalid corpus rejected.

mod support;

use kpipe_api::{
    ByteSize, Duration,
    corpus::{invalid_corpus_dir, load_invalid_corpus},
    v1alpha1::{ConsumerPipeline, OnFailure, Ordering, Processor, ScalingMode, StartOffset},
};
use kube::CustomResourceExt;
use serde_json::Value;
use support::rejections;

fn repo_file(rel: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn yaml_documents(text: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(text).expect("valid YAML").into_iter().filter(|v| !v.is_null()).collect()
}

#[test]
fn generated_crd_matches_committed_file() {
    let committed = std::fs::read_to_string(repo_file("consumerpipeline.yaml")).expect("crds/consumerpipeline.yaml");
    let generated = kpipe_api::crd_yaml().expect("crd yaml");
    assert!(
        committed == generated,
        "crds/consumerpipeline.yaml is stale: run `make crds` (cargo run -p kpipe-api --bin crdgen > crds/consumerpipeline.yaml)"
    );
}

#[test]
fn chart_crd_copy_matches_generated() {
    // The chart renders its CRD from this copy; it must never drift from the generated one.
    let chart_copy = repo_file("../charts/kpipe/files/consumerpipeline.yaml");
    let generated = kpipe_api::crd_yaml().expect("crd yaml");
    let copy = std::fs::read_to_string(&chart_copy).expect("charts/kpipe/files/consumerpipeline.yaml");
    assert!(copy == generated, "the chart's CRD copy is stale: run `make crds`");
}

#[test]
fn crd_has_subresources_columns_and_names() {
    let crd = ConsumerPipeline::crd();
    assert_eq!(crd.spec.group, "kpipe.io");
    assert_eq!(crd.spec.names.short_names.as_deref(), Some(&["cpl".to_string()][..]));
    assert_eq!(crd.spec.scope, "Namespaced");
    let version = &crd.spec.versions[0];
    assert_eq!(version.name, "v1alpha1");
    let sub = version.subresources.as_ref().expect("subresources");
    assert!(sub.status.is_some(), "status subresource");
    let scale = sub.scale.as_ref().expect("scale subresource");
    assert_eq!(scale.spec_replicas_path, ".spec.replicas");
    assert_eq!(scale.status_replicas_path, ".status.replicas");
    assert_eq!(scale.label_selector_path.as_deref(), Some(".status.selector"));
    let columns: Vec<&str> = version.additional_printer_columns.iter().flatten().map(|c| c.name.as_str()).collect();
    assert_eq!(columns, ["Desired", "Replicas", "Lag", "Ready", "Reason", "Age"]);
}

/// Structural-schema rules the apiserver enforces that a derive can silently break.
#[test]
fn schema_is_structural() {
    fn walk(v: &Value, path: &str, problems: &mut Vec<String>) {
        let Some(obj) = v.as_object() else { return };
        let is_int_or_string = obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
        let preserves = obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
        if !obj.contains_key("type") && !is_int_or_string && !preserves && !path.ends_with("/oneOf") {
            problems.push(format!("{path}: no type"));
        }
        for key in ["anyOf", "oneOf", "allOf"] {
            for (i, branch) in obj.get(key).and_then(Value::as_array).into_iter().flatten().enumerate() {
                for forbidden in ["type", "description", "default", "nullable", "additionalProperties"] {
                    if branch.get(forbidden).is_some() {
                        problems.push(format!("{path}/{key}[{i}]: '{forbidden}' inside {key}"));
                    }
                }
            }
        }
        if let Some(props) = obj.get("properties").and_then(Value::as_object) {
            for (name, child) in props {
                walk(child, &format!("{path}.{name}"), problems);
            }
        }
        if let Some(items) = obj.get("items") {
            walk(items, &format!("{path}[]"), problems);
        }
        if let Some(additional) = obj.get("additionalProperties").filter(|a| a.is_object()) {
            walk(additional, &format!("{path}{{}}"), problems);
        }
    }
    let mut problems = Vec::new();
    let schema = support::crd_schema();
    walk(&schema["properties"]["spec"], "spec", &mut problems);
    walk(&schema["properties"]["status"], "status", &mut problems);
    assert!(problems.is_empty(), "non-structural schema parts:\n{}", problems.join("\n"));
}

#[test]
fn every_field_is_documented() {
    fn walk(v: &Value, path: &str, missing: &mut Vec<String>) {
        if let Some(props) = v.get("properties").and_then(Value::as_object) {
            for (name, child) in props {
                let p = format!("{path}.{name}");
                if child.get("description").and_then(Value::as_str).is_none_or(str::is_empty) {
                    missing.push(p.clone());
                }
                walk(child, &p, missing);
            }
        }
        if let Some(items) = v.get("items") {
            walk(items, path, missing);
        }
    }
    let mut missing = Vec::new();
    let schema = support::crd_schema();
    // Embedded Kubernetes types (resources, env, tolerations, affinity, conditions) bring their own docs.
    walk(&schema["properties"]["spec"], "spec", &mut missing);
    walk(&schema["properties"]["status"], "status", &mut missing);
    assert!(missing.is_empty(), "fields without a description (kubectl explain text):\n{}", missing.join("\n"));
}

#[test]
fn examples_are_valid_and_parse() {
    let dir = repo_file("examples");
    let mut pipelines = 0;
    for entry in std::fs::read_dir(&dir).expect("examples dir") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read example");
        for doc in yaml_documents(&text) {
            if doc["kind"] != "ConsumerPipeline" {
                continue;
            }
            let problems = rejections(&doc);
            assert!(problems.is_empty(), "{}: {problems:?}", path.display());
            let cp: ConsumerPipeline =
                serde_json::from_value(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(!cp.spec.source.topics.is_empty());
            pipelines += 1;
        }
    }
    assert!(pipelines >= 3, "expected at least 3 example pipelines, found {pipelines}");
}

#[test]
fn minimal_spec_gets_documented_defaults() {
    let cp: ConsumerPipeline = serde_json::from_value(serde_json::json!({
        "apiVersion": "kpipe.io/v1alpha1", "kind": "ConsumerPipeline",
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": {"source": {"bootstrapServers": ["k:9092"], "topics": ["t"]}, "processor": {"noop": {}}}
    }))
    .expect("minimal spec parses");
    let spec = &cp.spec;
    assert!(!spec.suspend);
    assert_eq!(spec.ordering, Ordering::Key);
    assert_eq!(spec.source.start_offset, StartOffset::Earliest);
    assert_eq!(spec.source.effective_group_id("ns", "p"), "ns.p");
    assert_eq!(spec.processor, Processor::Noop(Default::default()));
    assert_eq!((spec.concurrency.per_partition, spec.concurrency.per_worker), (32, 256));
    assert_eq!(spec.batch.max_records, 500);
    assert_eq!(spec.batch.max_bytes, ByteSize::mib(1));
    assert_eq!(spec.batch.max_wait, Duration::from_millis(50));
    assert_eq!(spec.retry.max_attempts, 8);
    assert_eq!(spec.retry.initial_backoff, Duration::from_millis(100));
    assert_eq!(spec.retry.max_backoff, Duration::from_secs(30));
    assert_eq!(spec.effective_on_failure(), OnFailure::Block, "no DLQ configured: never lose, block");
    assert_eq!((spec.scaling.min_replicas, spec.scaling.max_replicas), (0, 10));
    assert_eq!(spec.scaling.effective_lag_threshold(), 1000);
    assert_eq!(spec.scaling.poll_interval, Duration::from_secs(5));
    assert_eq!(spec.scaling.cooldown_to_zero, Duration::from_secs(120));
    assert_eq!(spec.scaling.mode, ScalingMode::Auto);
    // The schema's defaults are the same values (what the apiserver fills in).
    let schema = support::crd_schema();
    let scaling = &schema["properties"]["spec"]["properties"]["scaling"]["properties"];
    assert_eq!(scaling["pollInterval"]["default"], "5s");
    assert_eq!(scaling["maxReplicas"]["default"], 10);
}

#[test]
fn invalid_corpus_is_rejected_naming_the_field() {
    let cases = load_invalid_corpus(&invalid_corpus_dir()).expect("corpus");
    assert!(cases.len() >= 20, "the corpus must have at least 20 cases, has {}", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let docs = yaml_documents(&case.manifest);
        assert_eq!(docs.len(), 1, "{}: one manifest per file", case.file.display());
        let found = rejections(&docs[0]);
        let matching = found
            .iter()
            .find(|r| r.field == case.field && case.message.as_ref().is_none_or(|m| r.message.contains(m.as_str())));
        if matching.is_none() {
            failures.push(format!(
                "{}: expected a rejection of {} {}, got {found:?}",
                case.file.file_name().and_then(|n| n.to_str()).unwrap_or("?"),
                case.field,
                case.message.as_deref().map(|m| format!("saying {m:?}")).unwrap_or_default()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn corpus_cases_are_valid_once_fixed() {
    // Guards against a corpus case failing for a reason other than the one it documents: the base
    // manifest every case mutates must itself be accepted.
    let base = serde_json::json!({
        "apiVersion": "kpipe.io/v1alpha1", "kind": "ConsumerPipeline", "metadata": {"name": "ok"},
        "spec": {
            "source": {"bootstrapServers": ["kafka.kafka:9092"], "topics": ["orders"]},
            "processor": {"http": {"url": "http://sink.shop.svc:8080/records"}},
            "onFailure": "deadLetter", "deadLetter": {"topic": "orders-dlq"}
        }
    });
    assert!(rejections(&base).is_empty(), "{:?}", rejections(&base));
}
