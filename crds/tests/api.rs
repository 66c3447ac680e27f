#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure
//! The ConsumerPipeline API: generated CRD in sync, examples valid, invalid corpus rejected.

mod support;

use kpipe_api::{
    ByteSize, Duration,
    corpus::{invalid_corpus_dir, load_invalid_corpus, load_valid_corpus, valid_corpus_dir},
    rules,
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
fn generated_replay_crd_matches_committed_file_and_chart_copy() {
    let generated = kpipe_api::replay_crd_yaml().expect("replay crd yaml");
    let committed = std::fs::read_to_string(repo_file("deadletterreplay.yaml")).expect("crds/deadletterreplay.yaml");
    assert!(committed == generated, "crds/deadletterreplay.yaml is stale: run `make crds`");
    let copy = std::fs::read_to_string(repo_file("../charts/kpipe/files/deadletterreplay.yaml"))
        .expect("charts/kpipe/files/deadletterreplay.yaml");
    assert!(copy == generated, "the chart's DeadLetterReplay CRD copy is stale: run `make crds`");
    let docs = yaml_documents(&generated);
    assert_eq!(docs.len(), 1);
    let version = &docs[0]["spec"]["versions"][0];
    assert_eq!(docs[0]["spec"]["names"]["shortNames"][0], "dlr");
    assert!(version["subresources"]["status"].is_object(), "status subresource");
    let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(spec["x-kubernetes-validations"][0]["rule"], "self == oldSelf", "spec is immutable");
    let required: Vec<&str> = spec["required"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
    assert_eq!(required, ["parkingTopic", "pipelineRef"]);
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
    assert_eq!(columns, ["Desired", "Replicas", "Lag", "Ready", "Reason", "DeadLetters", "Age"]);
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
    assert_eq!(spec.processor, Processor::Noop(Default::default()).into());
    assert_eq!((spec.concurrency.per_partition, spec.concurrency.per_worker), (None, None));
    let c = spec.effective_concurrency();
    assert_eq!((c.per_partition, c.per_worker, c.uncommitted_per_partition), (32, 256, 16384));
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

fn pipeline_name(doc: &Value) -> &str {
    doc["metadata"]["name"].as_str().unwrap_or_default()
}

#[test]
fn valid_corpus_is_accepted_by_the_schema_and_the_rust_check() {
    let cases = load_valid_corpus(&valid_corpus_dir()).expect("valid corpus");
    assert!(cases.len() >= 10, "the valid corpus must have at least 10 cases, has {}", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let name = case.file.file_name().and_then(|n| n.to_str()).unwrap_or("?").to_string();
        let docs = yaml_documents(&case.manifest);
        assert_eq!(docs.len(), 1, "{name}: one manifest per file");
        let found = rejections(&docs[0]);
        if !found.is_empty() {
            failures.push(format!("{name}: schema rejects it: {found:?}"));
            continue;
        }
        match serde_json::from_value::<ConsumerPipeline>(docs[0].clone()) {
            Err(e) => failures.push(format!("{name}: does not deserialise: {e}")),
            Ok(cp) => {
                if let Err(e) = rules::check(pipeline_name(&docs[0]), &cp.spec) {
                    failures.push(format!("{name}: the Rust check rejects it: {e}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The operator's Rust-side check must reject what the apiserver rejects: every invalid case is
/// refused by deserialisation or by `rules::check`, except unknown fields (the apiserver's strict
/// field validation; serde ignores them).
#[test]
fn invalid_corpus_is_rejected_by_the_rust_check_too() {
    let cases = load_invalid_corpus(&invalid_corpus_dir()).expect("corpus");
    let mut failures = Vec::new();
    for case in &cases {
        let name = case.file.file_name().and_then(|n| n.to_str()).unwrap_or("?").to_string();
        let doc = yaml_documents(&case.manifest).remove(0);
        if rejections(&doc).iter().all(|r| r.message == "unknown field") {
            continue;
        }
        // What the apiserver stores: nulls of non-nullable fields dropped.
        let stored = without_nulls(doc.clone());
        if let Ok(cp) = serde_json::from_value::<ConsumerPipeline>(stored) {
            match rules::check(pipeline_name(&doc), &cp.spec) {
                Ok(()) => failures.push(format!("{name}: accepted by rules::check")),
                Err(e) if !e.field.starts_with(&case.field) && !case.field.starts_with(&e.field) => failures
                    .push(format!("{name}: rules::check names {} ({}), the corpus {}", e.field, e.message, case.field)),
                Err(_) => {}
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn without_nulls(v: Value) -> Value {
    match v {
        Value::Object(map) => {
            Value::Object(map.into_iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k, without_nulls(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(without_nulls).collect()),
        other => other,
    }
}

#[test]
fn bare_noop_is_explained() {
    let doc = yaml_documents(
        "apiVersion: kpipe.io/v1alpha1\nkind: ConsumerPipeline\nmetadata: {name: p}\nspec:\n  source: {bootstrapServers: [k:9092], topics: [t]}\n  processor:\n    noop:\n",
    )
    .remove(0);
    let found = rejections(&doc);
    assert!(found.iter().any(|r| r.field == "spec.processor" && r.message.contains("write `noop: {}`")), "{found:?}");
}

fn unanchored(pattern: &str) -> &str {
    pattern.trim_start_matches('^').trim_end_matches('$')
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

    /// Every URL the schema admits is one the worker's HTTP client (reqwest, on the `url` crate)
    /// parses to an http(s) URL with a host, whatever the case of the scheme, or one the operator's
    /// Rust check rejects (naming the field) before any worker starts: a pattern cannot validate IDNA
    /// (`xn--` labels).
    #[test]
    fn urls_the_schema_accepts_parse_in_the_worker(url in proptest::string::string_regex(unanchored(rules::HTTP_URL_PATTERN)).unwrap()) {
        let parsed = url::Url::parse(&url);
        if parsed.is_err() {
            let spec: kpipe_api::v1alpha1::ConsumerPipelineSpec = serde_json::from_value(serde_json::json!({
                "source": {"bootstrapServers": ["k:9092"], "topics": ["t"]},
                "processor": {"http": {"url": url}}
            })).unwrap();
            let checked = rules::check("p", &spec);
            proptest::prop_assert!(
                checked.as_ref().is_err_and(|e| e.to_string().contains("spec.processor.http.url")),
                "{url:?}: {parsed:?} and the Rust check says {checked:?}"
            );
            return Ok(());
        }
        let parsed = parsed.unwrap();
        proptest::prop_assert!(parsed.scheme() == "http" || parsed.scheme() == "https", "{url:?}");
        proptest::prop_assert!(parsed.host_str().is_some_and(|h| !h.is_empty()), "{url:?}");
    }

    /// The Rust check and the schema agree on bootstrap servers.
    #[test]
    fn bootstrap_servers_rust_and_schema_agree(server in "(\\[[0-9a-f:]{0,8}\\]|[a-z0-9.:_-]{0,12}):[0-9]{0,6}") {
        let doc = serde_json::json!({
            "apiVersion": "kpipe.io/v1alpha1", "kind": "ConsumerPipeline", "metadata": {"name": "p"},
            "spec": {"source": {"bootstrapServers": [server], "topics": ["t"]}, "processor": {"noop": {}}}
        });
        let schema_ok = rejections(&doc).is_empty();
        let cp: ConsumerPipeline = serde_json::from_value(doc).unwrap();
        proptest::prop_assert_eq!(schema_ok, rules::check("p", &cp.spec).is_ok(), "{:?}", server);
    }
}

#[test]
fn upper_case_scheme_and_ipv6_hosts_parse_in_the_worker() {
    let pattern = regex::Regex::new(rules::HTTP_URL_PATTERN).unwrap();
    for url in ["HTTPS://Sink.Shop.svc:443/records", "Http://10.0.0.1", "http://[fd00::1]:8080/records"] {
        assert!(pattern.is_match(url), "{url}");
        let parsed = url::Url::parse(url).unwrap();
        assert!(parsed.scheme() == "https" || parsed.scheme() == "http", "{url}: scheme {}", parsed.scheme());
    }
    for bad in [
        "http://:8080/records",
        "http://user:pw@host/",
        "ftp://host/",
        "http://host:0/",
        "http://host:65536/",
        "http://1.2.3.256/",
        "http://host/a b",
    ] {
        assert!(!pattern.is_match(bad), "{bad}");
    }
}

/// A malformed IDNA label passes the URL pattern (a regex cannot decode punycode) but not the Rust check the
/// operator runs before any worker starts (found by the property test above).
#[test]
fn malformed_idna_hosts_are_rejected_by_the_rust_check() {
    let spec: kpipe_api::v1alpha1::ConsumerPipelineSpec = serde_json::from_value(serde_json::json!({
        "source": {"bootstrapServers": ["k:9092"], "topics": ["t"]},
        "processor": {"http": {"url": "http://xn--aAa._"}}
    }))
    .unwrap();
    let err = rules::check("p", &spec).unwrap_err().to_string();
    assert!(err.contains("spec.processor.http.url") && err.contains("does not parse"), "{err}");
}

/// `perPartition` and `perWorker` default by processor; explicit values win, and defaults never break the rules
/// between the three bounds (perPartition ≤ perWorker, perPartition ≤ uncommittedPerPartition).
#[test]
fn concurrency_defaults_depend_on_the_processor_and_keep_the_bounds_ordered() {
    let effective = |processor: serde_json::Value, concurrency: serde_json::Value| {
        let cp: ConsumerPipeline = serde_json::from_value(serde_json::json!({
            "apiVersion": "kpipe.io/v1alpha1", "kind": "ConsumerPipeline",
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {"source": {"bootstrapServers": ["k:9092"], "topics": ["t"]}, "processor": processor,
                     "concurrency": concurrency}
        }))
        .expect("spec parses");
        let c = cp.spec.effective_concurrency();
        (c.per_partition, c.per_worker, c.uncommitted_per_partition)
    };
    let kafka = serde_json::json!({"kafka": {"topic": "out"}});
    let http = serde_json::json!({"http": {"url": "http://svc/"}});
    let noop = serde_json::json!({"noop": {}});
    assert_eq!(effective(kafka.clone(), serde_json::json!({})), (1024, 8192, 16384));
    assert_eq!(effective(http.clone(), serde_json::json!({})), (32, 256, 16384));
    assert_eq!(effective(noop, serde_json::json!({})), (32, 256, 16384));
    // Explicit values win.
    assert_eq!(effective(kafka.clone(), serde_json::json!({"perWorker": 100, "perPartition": 10})), (10, 100, 16384));
    // An unset perPartition never exceeds perWorker or uncommittedPerPartition.
    assert_eq!(effective(kafka.clone(), serde_json::json!({"perWorker": 64})), (64, 64, 16384));
    assert_eq!(effective(kafka, serde_json::json!({"uncommittedPerPartition": 500})), (500, 8192, 500));
    // An unset perWorker is never below an explicit perPartition.
    assert_eq!(effective(http, serde_json::json!({"perPartition": 1000})), (1000, 1000, 16384));
}
