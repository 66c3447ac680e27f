//! The ConsumerPipeline API against the real kube-apiserver of the local test bed: the generated CRD is accepted
//! (structural, CEL within the cost budget), every manifest of the invalid corpus is rejected with the field named,
//! every manifest of the valid corpus (edge cases) and the examples are accepted, and `kubectl explain` /
//! `kubectl get cpl` read like documentation.
//!
//! Run: `cargo test -p kpipe-e2e --test api` (needs `make testbed-up`; fails with the reason otherwise).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use kpipe_api::corpus::{invalid_corpus_dir, load_invalid_corpus, load_valid_corpus, valid_corpus_dir};
use kpipe_e2e::testbed::wait_for;
use kpipe_e2e::{TestBed, bed};

fn repo(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Installs (server-side apply) the generated CRD and waits until it is Established.
async fn install_crd(bed: &TestBed) {
    kpipe_e2e::scenario::install_crd(bed)
        .unwrap_or_else(|e| panic!("the apiserver did not take the generated CRD: {e}"));
}

#[tokio::test]
async fn api_invalid_corpus_is_rejected_by_the_apiserver_naming_the_field() {
    let bed = bed().await;
    install_crd(&bed).await;
    let ns = bed.temp_namespace("api-corpus").await.expect("namespace");
    let cases = load_invalid_corpus(&invalid_corpus_dir()).expect("corpus");
    assert!(cases.len() >= 20, "corpus has {} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        // kubectl's default strict field validation, as a user would run it.
        let out = bed
            .kubectl_cmd()
            .args(["apply", "--dry-run=server", "-n", ns.name(), "-f"])
            .arg(&case.file)
            .output()
            .expect("run kubectl");
        let said = text(&out);
        let name = case.file.file_name().and_then(|n| n.to_str()).unwrap_or("?").to_string();
        if out.status.success() {
            failures.push(format!("{name}: accepted, expected a rejection naming {}", case.field));
        } else if !said.contains(&case.field) {
            failures.push(format!("{name}: rejection does not name {}:\n{said}", case.field));
        } else if let Some(message) = &case.message
            && !said.contains(message.as_str())
        {
            failures.push(format!("{name}: rejection lacks {message:?}:\n{said}"));
        }
    }
    ns.delete().await.expect("delete namespace");
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[tokio::test]
async fn api_valid_corpus_is_accepted_by_the_apiserver() {
    let bed = bed().await;
    install_crd(&bed).await;
    let ns = bed.temp_namespace("api-valid").await.expect("namespace");
    let cases = load_valid_corpus(&valid_corpus_dir()).expect("valid corpus");
    assert!(cases.len() >= 10, "valid corpus has {} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        // A real create (not a dry run), with kubectl's strict field validation: stored, defaults filled in.
        let out =
            bed.kubectl_cmd().args(["create", "-n", ns.name(), "-f"]).arg(&case.file).output().expect("run kubectl");
        if !out.status.success() {
            let name = case.file.file_name().and_then(|n| n.to_str()).unwrap_or("?").to_string();
            failures.push(format!("{name}: rejected:\n{}", text(&out)));
        }
    }
    // What the apiserver stored reads back as the Rust types and passes the operator's check.
    let list = bed.kubectl_cmd().args(["get", "cpl", "-n", ns.name(), "-o", "json"]).output().expect("kubectl");
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).expect("cpl list json");
    let items = list["items"].as_array().cloned().unwrap_or_default();
    for item in &items {
        let name = item["metadata"]["name"].as_str().unwrap_or_default().to_string();
        match serde_json::from_value::<kpipe_api::v1alpha1::ConsumerPipeline>(item.clone()) {
            Err(e) => failures.push(format!("{name}: stored object does not deserialise: {e}")),
            Ok(cp) => {
                if let Err(e) = kpipe_api::rules::check(&name, &cp.spec) {
                    failures.push(format!("{name}: stored object fails rules::check: {e}"));
                }
            }
        }
    }
    ns.delete().await.expect("delete namespace");
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
    assert_eq!(items.len(), cases.len(), "every valid case is stored");
}

#[tokio::test]
async fn api_examples_are_accepted_and_readable() {
    let bed = bed().await;
    install_crd(&bed).await;
    let ns = bed.temp_namespace("api-examples").await.expect("namespace");
    for example in std::fs::read_dir(repo("crds/examples")).expect("examples") {
        let path = example.expect("entry").path();
        // The examples name their own namespaces; apply them into the temporary one instead.
        let manifest: String = std::fs::read_to_string(&path)
            .expect("read example")
            .lines()
            .filter(|l| !l.trim_start().starts_with("namespace:"))
            .map(|l| format!("{l}\n"))
            .collect();
        let mut child = bed
            .kubectl_cmd()
            .args(["apply", "-n", ns.name(), "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("kubectl");
        std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), manifest.as_bytes()).expect("write");
        let out = child.wait_with_output().expect("kubectl");
        assert!(out.status.success(), "{}: {}", path.display(), text(&out));
    }
    // Defaults are filled in by the apiserver from the schema.
    let got = bed
        .kubectl_cmd()
        .args(["get", "cpl", "clicks-router", "-n", ns.name(), "-o", "jsonpath={.spec.concurrency}"])
        .output()
        .expect("kubectl");
    // perPartition and perWorker default by processor (the worker fills them in), so the schema leaves them unset
    // where the manifest does (the forwarder example; the HTTP example sets them).
    assert_eq!(String::from_utf8_lossy(&got.stdout), r#"{"uncommittedPerPartition":16384}"#, "{}", text(&got));
    let defaults = bed
        .kubectl_cmd()
        .args([
            "get",
            "cpl",
            "clicks-router",
            "-n",
            ns.name(),
            "-o",
            "jsonpath={.spec.batch.maxWait} {.spec.scaling.pollInterval}",
        ])
        .output()
        .expect("kubectl");
    assert_eq!(String::from_utf8_lossy(&defaults.stdout), "50ms 5s", "{}", text(&defaults));
    // Printer columns.
    let table = wait_for("kubectl get cpl lists the pipelines", Duration::from_secs(20), || async {
        let out = bed.kubectl_cmd().args(["get", "cpl", "-n", ns.name()]).output().ok()?;
        let t = String::from_utf8_lossy(&out.stdout).to_string();
        t.contains("payments-audit").then_some(t)
    })
    .await
    .expect("pipelines listed");
    let header: Vec<&str> = table.lines().next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(header, ["NAME", "DESIRED", "REPLICAS", "LAG", "READY", "REASON", "DEADLETTERS", "AGE"], "{table}");
    // kubectl explain reads like documentation.
    let explain = bed.kubectl_cmd().args(["explain", "consumerpipeline.spec.scaling"]).output().expect("kubectl");
    let explain = text(&explain);
    for needle in
        ["cooldownToZero", "lagThreshold", "Scale to zero only after lag has been zero", "partitionDistribution"]
    {
        assert!(explain.contains(needle), "kubectl explain lacks {needle:?}:\n{explain}");
    }
    ns.delete().await.expect("delete namespace");
}
