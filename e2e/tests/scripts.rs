//! Tests of the test bed's shell helpers (`e2e/testbed/lib.sh`) that need no running bed.
//!
//! Run: `cargo test -p kpipe-e2e --test scripts`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

fn lib_sh() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testbed").join("lib.sh").display().to_string()
}

/// Runs `snippet` in bash after sourcing lib.sh (which sets `-euo pipefail`); returns the exit status.
fn run_with_lib(snippet: &str) -> i32 {
    let script = format!("source '{}'\n{snippet}", lib_sh());
    let out = Command::new("bash").arg("-c").arg(&script).output().expect("bash runs");
    out.status.code().unwrap_or(-1)
}

/// The bed's health checks pipe long output into a match: `ip addr` of a bridge carrying hundreds of ClusterIPs,
/// a JVM command line, a jar listing. With `grep -q` the writer was killed by SIGPIPE after the first match and
/// `pipefail` failed the check although the line was there (CI: "bridge kpipe0 has no address 10.244.0.1").
#[test]
fn matches_holds_under_pipefail_when_the_writer_outlives_the_match() {
    // 2 MB of output, the match on its first line: the writer is still writing when a match could stop reading.
    let found = run_with_lib("if seq 1 300000 | matches '^1$'; then exit 0; else exit 7; fi");
    assert_eq!(found, 0, "matches must succeed on a long stream whose first line matches");
    // The same check written with `grep -q` fails: this is the hazard the helper exists for.
    let with_grep_q = run_with_lib("if seq 1 300000 | grep -q '^1$'; then exit 0; else exit 7; fi");
    assert_eq!(with_grep_q, 7, "expected grep -q to fail under pipefail (the writer gets SIGPIPE)");
    // And it still tells a missing line apart.
    let missing = run_with_lib("if seq 1 1000 | matches '^x$'; then exit 0; else exit 7; fi");
    assert_eq!(missing, 7);
}

/// No shell script of e2e/ (test bed, benchmarks, demo, kind) pipes into `grep -q` any more.
#[test]
fn no_e2e_script_pipes_into_grep_q() {
    fn scripts(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                scripts(&path, out);
            } else if path.extension().and_then(|e| e.to_str()) == Some("sh") {
                out.push(path);
            }
        }
    }
    let mut paths = Vec::new();
    scripts(Path::new(env!("CARGO_MANIFEST_DIR")), &mut paths);
    assert!(paths.len() >= 10, "found only {paths:?}");
    let mut offenders = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path).unwrap();
        for (n, line) in text.lines().enumerate() {
            if line.contains('|') && line.contains("grep -q") {
                offenders.push(format!("{}:{}: {line}", path.display(), n + 1));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "pipe into `matches` (or grep >/dev/null) instead of `grep -q`:\n{}",
        offenders.join("\n")
    );
}
