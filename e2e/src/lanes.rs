//! The plan of `make integration-test`: which test binaries run side by side on the shared test bed, and which run
//! alone.
//!
//! The bed's suites spend most of their time waiting (a pipeline scaling from zero, a group rebalancing, a
//! retention check): the `lifecycle` suite keeps the two cores about 20 % busy. Run one after the other, as
//! `cargo test` does, they took 62 minutes of CI's 90. Every suite already works in its own namespaces, topics and
//! consumer groups (tests were written to share the bed), so the runner (`kpipe-test-lanes`) runs several binaries
//! at once, each with one test thread, and runs alone only what disturbs the others: a test that restarts the
//! shared broker, for example.
//!
//! Pure parts live here (the cargo message parsing, the plan file, the schedule); the binary does the I/O.
//!
//! # The plan file (`e2e/testbed/lanes.conf`)
//!
//! One entry per line, `#` starts a comment:
//!
//! ```text
//! <package>/<test binary> [filter=<substring>] [alone] [seconds=<n>]
//! ```
//!
//! The binary is named with its package (`kpipe-e2e/pipeline`): `replay` and `failure_handling` are suites of two
//! packages.
//!
//! * `filter=` makes the tests whose names contain the substring a unit of their own (libtest's filter); the rest of
//!   the binary runs as another unit, with `--skip <substring>`.
//! * `alone`: the unit runs while nothing else runs (before the shared units start).
//! * `seconds=`: the unit's expected duration; longer units start first, so no long one is left for the end.
//!   Units without one count as [`DEFAULT_SECONDS`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

/// Expected duration of a unit the plan file gives none for, in seconds.
pub const DEFAULT_SECONDS: u32 = 30;

/// Errors reading cargo's messages or the plan file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LanesError {
    /// A line of `cargo test --no-run --message-format=json` output is not JSON.
    #[error("cargo message on line {line} is not JSON: {message}")]
    CargoMessage {
        /// 1-based line number.
        line: usize,
        /// The parser's message.
        message: String,
    },
    /// A plan-file line does not follow `<package>/<binary> [filter=<s>] [alone] [seconds=<n>]`.
    #[error("lanes.conf line {line}: {message}")]
    Plan {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
}

/// One test executable cargo built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestBinary {
    /// The test target's name (`pipeline` for `e2e/tests/pipeline.rs`).
    pub name: String,
    /// Its package (`kpipe-e2e`).
    pub package: String,
    /// The executable.
    pub executable: PathBuf,
    /// The package's directory: cargo runs test binaries there, and so does the runner.
    pub package_dir: PathBuf,
}

impl TestBinary {
    /// `<package>/<name>` (`kpipe-e2e/pipeline`): how the plan file names it.
    pub fn id(&self) -> String {
        format!("{}/{}", self.package, self.name)
    }
}

/// The integration-test binaries named in `cargo test --no-run --message-format=json` output (one JSON message per
/// line; other lines, such as cargo's own progress on stderr, are not expected here). Only `test` targets count:
/// unit tests of libraries and binaries run earlier, in `make unit-test`.
///
/// Errors: a line that is not JSON.
pub fn test_binaries(cargo_messages: &str) -> Result<Vec<TestBinary>, LanesError> {
    let mut by_id: BTreeMap<String, TestBinary> = BTreeMap::new();
    for (i, line) in cargo_messages.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let message: serde_json::Value =
            serde_json::from_str(line).map_err(|e| LanesError::CargoMessage { line: i + 1, message: e.to_string() })?;
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        let is_test_target = message["target"]["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "test"));
        let (Some(executable), Some(name), Some(manifest)) =
            (message["executable"].as_str(), message["target"]["name"].as_str(), message["manifest_path"].as_str())
        else {
            continue;
        };
        if !is_test_target {
            continue;
        }
        let manifest = PathBuf::from(manifest);
        let package_dir = manifest.parent().map(PathBuf::from).unwrap_or_default();
        let package = package_name(&message).unwrap_or_else(|| package_dir.display().to_string());
        let binary = TestBinary { name: name.to_string(), package, executable: PathBuf::from(executable), package_dir };
        by_id.insert(binary.id(), binary);
    }
    Ok(by_id.into_values().collect())
}

/// The package name from a cargo message's `package_id`: `path+file:///…/e2e#kpipe-e2e@0.1.0` (cargo ≥ 1.77) or
/// `kpipe-e2e 0.1.0 (path+file:///…)` (older cargo).
fn package_name(message: &serde_json::Value) -> Option<String> {
    let id = message["package_id"].as_str()?;
    if let Some((_, rest)) = id.rsplit_once('#') {
        return Some(rest.split('@').next().unwrap_or(rest).to_string());
    }
    id.split_whitespace().next().map(str::to_string)
}

/// One plan-file entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanEntry {
    /// The test binary it is about, as `<package>/<name>` ([`TestBinary::id`]).
    pub binary: String,
    /// The test-name substring that makes a unit of its own, or `None` for the binary's remaining tests.
    pub filter: Option<String>,
    /// The unit must run while nothing else runs.
    pub alone: bool,
    /// Expected duration in seconds, if given.
    pub seconds: Option<u32>,
}

/// Parses the plan file (format in the module docs). Errors name the line and what is wrong with it.
pub fn parse_plan(text: &str) -> Result<Vec<PlanEntry>, LanesError> {
    let mut entries = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let fail = |message: String| LanesError::Plan { line: i + 1, message };
        let mut words = line.split_whitespace();
        let binary = words.next().ok_or_else(|| fail("empty entry".into()))?.to_string();
        let mut entry = PlanEntry { binary, filter: None, alone: false, seconds: None };
        for word in words {
            if word == "alone" {
                entry.alone = true;
            } else if let Some(filter) = word.strip_prefix("filter=") {
                if filter.is_empty() {
                    return Err(fail("filter= needs a test-name substring".into()));
                }
                entry.filter = Some(filter.to_string());
            } else if let Some(seconds) = word.strip_prefix("seconds=") {
                let seconds =
                    seconds.parse().map_err(|_| fail(format!("seconds={seconds}: not a whole number of seconds")))?;
                entry.seconds = Some(seconds);
            } else {
                return Err(fail(format!("unknown word {word:?} (expected filter=<s>, alone or seconds=<n>)")));
            }
        }
        entries.push(entry);
    }
    Ok(entries)
}

/// One run of a test binary: all its tests, the tests matching `filter`, or all but those matching `skip`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    /// The binary.
    pub binary: TestBinary,
    /// libtest filter (run the tests whose names contain it), if any.
    pub filter: Option<String>,
    /// libtest `--skip` substrings: tests other units of this binary run.
    pub skip: Vec<String>,
    /// Runs while nothing else runs.
    pub alone: bool,
    /// Expected duration, seconds.
    pub seconds: u32,
}

impl Unit {
    /// `kpipe-e2e/pipeline`, or `kpipe-e2e/pipeline[chaos]` for a filtered unit: used in logs and log-file names.
    pub fn label(&self) -> String {
        match &self.filter {
            Some(f) => format!("{}[{f}]", self.binary.id()),
            None => self.binary.id(),
        }
    }

    /// The arguments after the executable: the filter, the skips and `--test-threads`.
    pub fn args(&self, test_threads: u32) -> Vec<String> {
        let mut args: Vec<String> = self.filter.iter().cloned().collect();
        for skip in &self.skip {
            args.push("--skip".into());
            args.push(skip.clone());
        }
        args.push(format!("--test-threads={test_threads}"));
        args
    }

    /// The `cargo test` command that re-runs this unit alone.
    pub fn rerun_command(&self, test_threads: u32) -> String {
        format!(
            "cargo test -p {} --test {} -- {}",
            self.binary.package,
            self.binary.name,
            self.args(test_threads).join(" ")
        )
    }
}

/// What runs: first the `alone` units one by one, then the `shared` ones, several at a time, longest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Units that run while nothing else runs, in this order.
    pub alone: Vec<Unit>,
    /// Units that share the bed, longest expected first.
    pub shared: Vec<Unit>,
}

/// Builds the plan of `binaries` from the plan file's `entries`.
///
/// Errors: an entry names a binary cargo did not build (a renamed or removed suite would otherwise silently fall
/// back to sharing), or a binary has two entries with the same filter.
pub fn plan(binaries: &[TestBinary], entries: &[PlanEntry]) -> Result<Plan, LanesError> {
    let ids: Vec<String> = binaries.iter().map(TestBinary::id).collect();
    let known: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
    let mut seen = BTreeSet::new();
    for (i, entry) in entries.iter().enumerate() {
        if !known.contains(entry.binary.as_str()) {
            return Err(LanesError::Plan {
                line: i + 1,
                message: format!("no test binary {:?} was built (known: {known:?})", entry.binary),
            });
        }
        if !seen.insert((entry.binary.as_str(), entry.filter.as_deref())) {
            return Err(LanesError::Plan {
                line: i + 1,
                message: format!("{} has two entries for the same filter", entry.binary),
            });
        }
    }
    let mut alone = Vec::new();
    let mut shared = Vec::new();
    for binary in binaries {
        let id = binary.id();
        let mine: Vec<&PlanEntry> = entries.iter().filter(|e| e.binary == id).collect();
        let filters: Vec<String> = mine.iter().filter_map(|e| e.filter.clone()).collect();
        let rest = mine.iter().find(|e| e.filter.is_none());
        let mut units = vec![Unit {
            binary: binary.clone(),
            filter: None,
            skip: filters,
            alone: rest.is_some_and(|e| e.alone),
            seconds: rest.and_then(|e| e.seconds).unwrap_or(DEFAULT_SECONDS),
        }];
        units.extend(mine.iter().filter(|e| e.filter.is_some()).map(|e| Unit {
            binary: binary.clone(),
            filter: e.filter.clone(),
            skip: Vec::new(),
            alone: e.alone,
            seconds: e.seconds.unwrap_or(DEFAULT_SECONDS),
        }));
        for unit in units {
            if unit.alone { alone.push(unit) } else { shared.push(unit) }
        }
    }
    // Longest first: with greedy lanes this keeps one long suite from starting last and running on its own.
    shared.sort_by(|a, b| b.seconds.cmp(&a.seconds).then_with(|| a.label().cmp(&b.label())));
    Ok(Plan { alone, shared })
}

/// The wall time, in seconds, of running `units` (expected durations) on `lanes` lanes, each taking the next unit
/// as soon as it is free, in order. The runner prints it beside the measured time.
pub fn expected_wall_seconds(units: &[Unit], lanes: usize) -> u32 {
    let mut free_at = vec![0u32; lanes.max(1)];
    for unit in units {
        if let Some(earliest) = free_at.iter_mut().min() {
            *earliest += unit.seconds;
        }
    }
    free_at.into_iter().max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn message(package: &str, name: &str, kinds: &[&str], executable: Option<&str>) -> String {
        serde_json::json!({
            "reason": "compiler-artifact",
            "package_id": format!("path+file:///w/{package}#{package}@0.1.0"),
            "manifest_path": format!("/w/{package}/Cargo.toml"),
            "target": {"name": name, "kind": kinds},
            "profile": {"test": true},
            "executable": executable,
        })
        .to_string()
    }

    /// A `kpipe-e2e` test binary (`kpipe-e2e/<name>` in the plan).
    fn binary(name: &str) -> TestBinary {
        TestBinary {
            name: name.into(),
            package: "kpipe-e2e".into(),
            executable: PathBuf::from(format!("/t/{name}")),
            package_dir: PathBuf::from("/w/e2e"),
        }
    }

    #[test]
    fn only_integration_test_executables_are_units() {
        let out = [
            message("kpipe-e2e", "pipeline", &["test"], Some("/t/pipeline-1")),
            message("kpipe-e2e", "kpipe_e2e", &["lib"], Some("/t/kpipe_e2e-2")),
            message("kpipe-e2e", "kpipe-kubelet", &["bin"], Some("/t/kpipe_kubelet-3")),
            message("kpipe-worker", "breaker10", &["test"], Some("/t/breaker10-4")),
            message("kpipe-worker", "build-script-build", &["custom-build"], None),
            r#"{"reason":"build-finished","success":true}"#.to_string(),
        ]
        .join("\n");
        let found = test_binaries(&out).unwrap();
        let ids: Vec<String> = found.iter().map(TestBinary::id).collect();
        assert_eq!(ids, ["kpipe-e2e/pipeline", "kpipe-worker/breaker10"]);
        assert_eq!(found[0].executable, PathBuf::from("/t/pipeline-1"));
        assert_eq!(found[0].package_dir, PathBuf::from("/w/kpipe-e2e"));
    }

    #[test]
    fn the_old_package_id_form_names_the_package_too() {
        let mut m: serde_json::Value =
            serde_json::from_str(&message("kpipe-worker", "replay", &["test"], Some("/t/r"))).unwrap();
        m["package_id"] = "kpipe-worker 0.1.0 (path+file:///w/worker)".into();
        assert_eq!(test_binaries(&m.to_string()).unwrap()[0].package, "kpipe-worker");
    }

    #[test]
    fn same_named_suites_of_two_packages_are_two_binaries() {
        let out = [
            message("kpipe-e2e", "replay", &["test"], Some("/t/replay-1")),
            message("kpipe-worker", "replay", &["test"], Some("/t/replay-2")),
        ]
        .join("\n");
        let found = test_binaries(&out).unwrap();
        let ids: Vec<(String, &Path)> = found.iter().map(|b| (b.id(), b.executable.as_path())).collect();
        assert_eq!(
            ids,
            [
                ("kpipe-e2e/replay".into(), Path::new("/t/replay-1")),
                ("kpipe-worker/replay".into(), Path::new("/t/replay-2"))
            ]
        );
    }

    #[test]
    fn a_line_that_is_not_json_is_named() {
        let err = test_binaries("{\"reason\":\"x\"}\nwarning: something").unwrap_err();
        assert!(matches!(err, LanesError::CargoMessage { line: 2, .. }), "{err}");
    }

    #[test]
    fn plan_file_words_and_their_errors() {
        let entries = parse_plan(
            "# comment\n\nkpipe-e2e/pipeline filter=chaos alone seconds=120  # restarts the broker\nkpipe-e2e/pipeline seconds=600\n",
        )
        .unwrap();
        assert_eq!(
            entries,
            [
                PlanEntry {
                    binary: "kpipe-e2e/pipeline".into(),
                    filter: Some("chaos".into()),
                    alone: true,
                    seconds: Some(120)
                },
                PlanEntry { binary: "kpipe-e2e/pipeline".into(), filter: None, alone: false, seconds: Some(600) },
            ]
        );
        for (text, needle) in
            [("pipeline seconds=ten", "seconds=ten"), ("pipeline filter=", "filter="), ("pipeline lonely", "lonely")]
        {
            let err = parse_plan(text).unwrap_err().to_string();
            assert!(err.contains("line 1") && err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn a_filtered_entry_splits_its_binary_and_the_rest_skips_it() {
        let binaries = [binary("pipeline"), binary("lifecycle"), binary("testbed")];
        let entries = parse_plan(
            "kpipe-e2e/pipeline filter=chaos alone seconds=130\nkpipe-e2e/pipeline seconds=600\nkpipe-e2e/testbed filter=kafka_restart alone\n",
        )
        .unwrap();
        let plan = plan(&binaries, &entries).unwrap();
        let alone: Vec<(String, Vec<String>)> = plan.alone.iter().map(|u| (u.label(), u.args(1))).collect();
        assert_eq!(
            alone,
            [
                ("kpipe-e2e/pipeline[chaos]".to_string(), vec!["chaos".to_string(), "--test-threads=1".into()]),
                (
                    "kpipe-e2e/testbed[kafka_restart]".to_string(),
                    vec!["kafka_restart".to_string(), "--test-threads=1".into()]
                ),
            ]
        );
        let shared: Vec<(String, Vec<String>, u32)> =
            plan.shared.iter().map(|u| (u.label(), u.args(1), u.seconds)).collect();
        assert_eq!(
            shared,
            [
                (
                    "kpipe-e2e/pipeline".to_string(),
                    vec!["--skip".to_string(), "chaos".into(), "--test-threads=1".into()],
                    600
                ),
                ("kpipe-e2e/lifecycle".to_string(), vec!["--test-threads=1".to_string()], DEFAULT_SECONDS),
                (
                    "kpipe-e2e/testbed".to_string(),
                    vec!["--skip".to_string(), "kafka_restart".into(), "--test-threads=1".into()],
                    DEFAULT_SECONDS
                ),
            ]
        );
        assert_eq!(
            plan.shared[0].rerun_command(1),
            "cargo test -p kpipe-e2e --test pipeline -- --skip chaos --test-threads=1"
        );
    }

    #[test]
    fn every_test_of_a_binary_runs_exactly_once_across_its_units() {
        // A test named in two filters would run twice, once alone and once shared; one in none must still run.
        let tests = ["pipeline_chaos_loses_nothing", "pipeline_happy_path", "pipeline_rebalance_pauses"];
        let entries =
            parse_plan("kpipe-e2e/pipeline filter=chaos alone\nkpipe-e2e/pipeline filter=rebalance\n").unwrap();
        let plan = plan(&[binary("pipeline")], &entries).unwrap();
        let units: Vec<&Unit> = plan.alone.iter().chain(&plan.shared).collect();
        for test in tests {
            let runs = units
                .iter()
                .filter(|u| u.filter.as_ref().is_none_or(|f| test.contains(f.as_str())))
                .filter(|u| !u.skip.iter().any(|s| test.contains(s.as_str())))
                .count();
            assert_eq!(runs, 1, "{test}");
        }
    }

    #[test]
    fn an_entry_for_a_binary_that_was_not_built_is_an_error() {
        let entries = parse_plan("kpipe-e2e/lifecycle seconds=200\nkpipe-e2e/pipelines alone\n").unwrap();
        let err = plan(&[binary("lifecycle")], &entries).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("\"kpipe-e2e/pipelines\""), "{err}");
        let twice = parse_plan("kpipe-e2e/lifecycle seconds=200\nkpipe-e2e/lifecycle alone\n").unwrap();
        assert!(plan(&[binary("lifecycle")], &twice).unwrap_err().to_string().contains("two entries"));
    }

    #[test]
    fn longest_first_on_greedy_lanes() {
        let units: Vec<Unit> = [600, 300, 300, 200, 100]
            .iter()
            .map(|&seconds| Unit { binary: binary("x"), filter: None, skip: vec![], alone: false, seconds })
            .collect();
        assert_eq!(expected_wall_seconds(&units, 1), 1500);
        assert_eq!(expected_wall_seconds(&units, 2), 800); // 600+200 | 300+300+100 → 800, 700
        assert_eq!(expected_wall_seconds(&units, 3), 600);
        assert_eq!(expected_wall_seconds(&[], 3), 0);
    }
}
