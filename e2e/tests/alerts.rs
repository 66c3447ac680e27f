//! The chart's PrometheusRule: rendered with `helm template`, checked and unit-tested with `promtool` on synthetic
//! series (`e2e/alerts/kpipe.test.yaml`), and held to what it promises: every alert the issue asks for exists, each
//! has a case where it fires, a `runbook_url` that points at a section of docs/runbook.md, and uses only metrics the
//! operator and worker really export.
//!
//! Needs `promtool` (Debian package `prometheus`, installed by `make deps`) and the bed's helm (from the test bed's
//! env file). A missing tool fails the test with the reason; it never skips.
//!
//! Run: `cargo test -p kpipe-e2e --test alerts`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kpipe_e2e::bed;
use serde_json::Value;

/// The alerts the chart must ship (issue #16), each with a runbook section.
const REQUIRED: &[&str] = &[
    "KpipeDeadLettersWritten",
    "KpipeDeadLetterWriteFailing",
    "KpipePipelineStalled",
    "KpipeLagGrowing",
    "KpipePipelineDegraded",
    "KpipeWorkersCrashLooping",
    "KpipeOperatorDown",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn promtool(args: &[&str], dir: &Path) -> Output {
    match Command::new("promtool").args(args).current_dir(dir).output() {
        Ok(o) => o,
        Err(e) => panic!(
            "promtool is required to test the chart's alert rules and could not be run ({e}): install Debian's \
             `prometheus` package (`make deps` does)"
        ),
    }
}

/// The PrometheusRule rendered with release `kpipe` in `kpipe-system` (the names the promtool tests expect).
async fn rendered_rule() -> Value {
    let bed = bed().await;
    let chart = root().join("charts/kpipe");
    let out = Command::new(bed.helm())
        .args(["template", "kpipe", chart.to_str().expect("utf-8"), "--namespace", "kpipe-system"])
        .args(["--set", "metrics.prometheusRule.enabled=true", "--show-only", "templates/prometheusrule.yaml"])
        .output()
        .expect("run helm");
    assert!(out.status.success(), "helm template failed:\n{}", text(&out));
    let docs: Vec<Value> = serde_saphyr::from_multiple(&String::from_utf8(out.stdout).expect("utf-8")).expect("yaml");
    let rule = docs.into_iter().find(|d| d["kind"] == "PrometheusRule").expect("a PrometheusRule");
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    rule
}

fn alerts(rule: &Value) -> Vec<&Value> {
    rule["spec"]["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").iter())
        .filter(|r| r.get("alert").is_some())
        .collect()
}

/// Metric names (`kpipe_*`) an expression uses, histogram suffixes folded.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("kpipe_") {
        let start = i + pos;
        let end = start
            + expr[start..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(expr.len() - start);
        let name = &expr[start..end];
        names.insert(
            ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name).to_string(),
        );
        i = end;
    }
    names
}

/// GitHub's anchor for a Markdown heading: lower case, spaces to `-`, punctuation other than `-`/`_` dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn promtool_tests_every_alert_of_the_chart() {
    let rule = rendered_rule().await;
    let dir = std::env::temp_dir().join(format!("kpipe-alerts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    // JSON is YAML: promtool reads the groups as written by helm.
    let rules = serde_json::json!({ "groups": rule["spec"]["groups"] });
    std::fs::write(dir.join("rules.yaml"), serde_json::to_string_pretty(&rules).expect("json")).expect("write");
    let tests = std::fs::read_to_string(root().join("e2e/alerts/kpipe.test.yaml")).expect("test file");
    std::fs::write(dir.join("kpipe.test.yaml"), &tests).expect("write");

    let version = promtool(&["--version"], &dir);
    assert!(version.status.success(), "promtool --version: {}", text(&version));
    let check = promtool(&["check", "rules", "rules.yaml"], &dir);
    assert!(check.status.success(), "promtool check rules:\n{}", text(&check));
    let run = promtool(&["test", "rules", "kpipe.test.yaml"], &dir);
    assert!(run.status.success(), "promtool test rules:\n{}", text(&run));
    assert!(text(&run).contains("SUCCESS"), "{}", text(&run));

    // Every alert is required, and every required alert is there.
    let names: BTreeSet<String> =
        alerts(&rule).iter().map(|a| a["alert"].as_str().expect("name").to_string()).collect();
    let required: BTreeSet<String> = REQUIRED.iter().map(|s| s.to_string()).collect();
    assert_eq!(names, required, "the rule's alerts differ from the required set");

    // Every alert has a test case in which it fires (an empty exp_alerts alone proves nothing).
    let cases: Value = serde_saphyr::from_str(&tests).expect("test yaml");
    let mut fired = BTreeSet::new();
    for t in cases["tests"].as_array().expect("tests") {
        for a in t["alert_rule_test"].as_array().into_iter().flatten() {
            if a["exp_alerts"].as_array().is_some_and(|e| !e.is_empty()) {
                fired.insert(a["alertname"].as_str().expect("alertname").to_string());
            }
        }
    }
    let untested: Vec<&String> = names.difference(&fired).collect();
    assert!(untested.is_empty(), "alerts without a firing promtool case: {untested:?}");

    // runbook_url of each alert points at a section of docs/runbook.md.
    let runbook = std::fs::read_to_string(root().join("docs/runbook.md")).expect("docs/runbook.md");
    let anchors: BTreeSet<String> =
        runbook.lines().filter_map(|l| l.strip_prefix('#')).map(|h| anchor(h.trim_start_matches('#'))).collect();
    let exported: String = ["operator/src/metrics.rs", "worker/src/metrics.rs"]
        .iter()
        .map(|p| std::fs::read_to_string(root().join(p)).unwrap_or_else(|e| panic!("{p}: {e}")))
        .collect();
    for a in alerts(&rule) {
        let name = a["alert"].as_str().expect("name");
        let url = a["annotations"]["runbook_url"].as_str().unwrap_or_else(|| panic!("{name} has no runbook_url"));
        let (page, section) = url.split_once('#').unwrap_or_else(|| panic!("{name}: {url} names no section"));
        assert!(page.ends_with("/docs/runbook.md"), "{name}: {url}");
        assert!(anchors.contains(section), "{name}: docs/runbook.md has no section #{section}");
        assert!(a["labels"]["severity"].as_str().is_some(), "{name} has no severity");
        let expr = a["expr"].as_str().expect("expr");
        for metric in metric_names(expr) {
            assert!(exported.contains(&format!("\"{metric}\"")), "{name} uses {metric}, which no code exports");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
