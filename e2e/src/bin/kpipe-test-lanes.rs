//! `kpipe-test-lanes`: runs the integration-test binaries cargo built on the shared test bed, several at a time
//! (`make integration-test`). What runs alone and what runs side by side is in `e2e/testbed/lanes.conf`; the rules
//! are in `kpipe_e2e::lanes`.
//!
//! Every unit's output goes to `<logs>/<unit>.log` and is printed whole when the unit ends, so the outputs of units
//! running at once never interleave. Every unit runs even when one fails (like `cargo test --no-fail-fast`); the exit
//! status is 1 when any failed, and the summary names the failures with the `cargo test` command that re-runs each.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use kpipe_e2e::lanes::{self, Unit};

#[derive(Parser, Debug)]
#[command(about = "Run the integration-test binaries on the shared test bed, several at a time")]
struct Args {
    /// Output of `cargo test --no-run --message-format=json` naming the test binaries.
    #[arg(long)]
    cargo_messages: PathBuf,
    /// The plan file: which units run alone, how long each is expected to take.
    #[arg(long)]
    plan: PathBuf,
    /// Units running at once after the `alone` ones (1 = one after the other, like `cargo test`).
    #[arg(long, env = "KPIPE_TEST_LANES", default_value_t = 3)]
    lanes: usize,
    /// `--test-threads` of each test binary.
    #[arg(long, env = "KPIPE_TEST_THREADS", default_value_t = 1)]
    test_threads: u32,
    /// Directory for each unit's log.
    #[arg(long)]
    logs: PathBuf,
}

struct Outcome {
    unit: Unit,
    lane: usize,
    started: Duration,
    took: Duration,
    result: Result<(), String>,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("kpipe-test-lanes: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn say(line: &str) {
    let now = jiff::Zoned::now().strftime("%H:%M:%S");
    println!("[lanes {now}] {line}");
}

fn run(args: Args) -> anyhow::Result<bool> {
    let messages = std::fs::read_to_string(&args.cargo_messages)
        .with_context(|| format!("reading {}", args.cargo_messages.display()))?;
    let binaries = lanes::test_binaries(&messages)?;
    if binaries.is_empty() {
        bail!("{} names no test binary: did `cargo test --no-run` build any?", args.cargo_messages.display());
    }
    let plan_text = std::fs::read_to_string(&args.plan).with_context(|| format!("reading {}", args.plan.display()))?;
    let plan = lanes::plan(&binaries, &lanes::parse_plan(&plan_text)?)?;
    for unit in plan.alone.iter().chain(&plan.shared) {
        check_filter_matches(unit)?;
    }
    std::fs::create_dir_all(&args.logs).with_context(|| format!("creating {}", args.logs.display()))?;
    let lanes = args.lanes.max(1);
    let alone_seconds: u32 = plan.alone.iter().map(|u| u.seconds).sum();
    say(&format!(
        "{} units: {} alone, then {} on {lanes} lanes (expected about {} s)",
        plan.alone.len() + plan.shared.len(),
        plan.alone.len(),
        plan.shared.len(),
        alone_seconds + lanes::expected_wall_seconds(&plan.shared, lanes)
    ));

    let t0 = Instant::now();
    let mut outcomes = Vec::new();
    for unit in plan.alone {
        outcomes.push(run_unit(unit, 1, t0, &args.logs, args.test_threads));
    }
    outcomes.extend(run_lanes(plan.shared, lanes, t0, &args.logs, args.test_threads));
    Ok(summarize(&outcomes, t0.elapsed(), args.test_threads))
}

/// A filtered unit whose filter matches no test is a plan that no longer fits the code (a renamed test): fail
/// before anything runs rather than skip the tests it was meant to isolate.
fn check_filter_matches(unit: &Unit) -> anyhow::Result<()> {
    let Some(filter) = &unit.filter else { return Ok(()) };
    let out = Command::new(&unit.binary.executable)
        .args([filter.as_str(), "--list", "--format=terse"])
        .current_dir(&unit.binary.package_dir)
        .output()
        .with_context(|| format!("listing the tests of {}", unit.binary.executable.display()))?;
    let listed = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !listed.lines().any(|l| l.ends_with(": test")) {
        bail!("lanes.conf: filter {filter:?} of {} matches no test", unit.binary.name);
    }
    Ok(())
}

fn run_lanes(units: Vec<Unit>, lanes: usize, t0: Instant, logs: &Path, test_threads: u32) -> Vec<Outcome> {
    let queue = Arc::new(Mutex::new(VecDeque::from(units)));
    let (done, outcomes) = mpsc::channel();
    let workers: Vec<_> = (1..=lanes)
        .map(|lane| {
            let queue = Arc::clone(&queue);
            let done = done.clone();
            let logs = logs.to_path_buf();
            std::thread::spawn(move || {
                loop {
                    let next = queue.lock().map(|mut q| q.pop_front()).unwrap_or(None);
                    let Some(unit) = next else { break };
                    if done.send(run_unit(unit, lane, t0, &logs, test_threads)).is_err() {
                        break;
                    }
                }
            })
        })
        .collect();
    drop(done);
    let collected: Vec<Outcome> = outcomes.into_iter().collect();
    for worker in workers {
        // A lane thread only ends by running out of units; a panic there would already have lost its unit.
        let _ = worker.join();
    }
    collected
}

fn run_unit(unit: Unit, lane: usize, t0: Instant, logs: &Path, test_threads: u32) -> Outcome {
    let label = unit.label();
    let started = t0.elapsed();
    say(&format!("start {label} (lane {lane})"));
    let log_path = logs.join(format!("{}.log", label.replace(['[', ']', '/'], "_")));
    let result = execute(&unit, &log_path, test_threads);
    let took = t0.elapsed() - started;
    // Print the whole log at once: units on other lanes are printing theirs.
    let log =
        std::fs::read_to_string(&log_path).unwrap_or_else(|e| format!("(log {} unreadable: {e})", log_path.display()));
    let verdict = match &result {
        Ok(()) => "passed".to_string(),
        Err(e) => format!("FAILED ({e})"),
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "\n──── {label} (lane {lane}) {verdict} in {} s ────", took.as_secs());
    let _ = out.write_all(log.as_bytes());
    let _ = writeln!(out, "──── end of {label} ────\n");
    drop(out);
    Outcome { unit, lane, started, took, result }
}

fn execute(unit: &Unit, log_path: &Path, test_threads: u32) -> Result<(), String> {
    let log = File::create(log_path).map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
    let log_err = log.try_clone().map_err(|e| format!("cannot share {}: {e}", log_path.display()))?;
    let status = Command::new(&unit.binary.executable)
        .args(unit.args(test_threads))
        // What `cargo test` gives a test binary: its package directory as working directory and in the env.
        .current_dir(&unit.binary.package_dir)
        .env("CARGO_MANIFEST_DIR", &unit.binary.package_dir)
        .env("CARGO_PKG_NAME", &unit.binary.package)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .status()
        .map_err(|e| format!("cannot run {}: {e}", unit.binary.executable.display()))?;
    if status.success() { Ok(()) } else { Err(format!("exit {status}")) }
}

fn summarize(outcomes: &[Outcome], wall: Duration, test_threads: u32) -> bool {
    let mut sorted: Vec<&Outcome> = outcomes.iter().collect();
    sorted.sort_by_key(|o| o.started);
    let serial: u64 = outcomes.iter().map(|o| o.took.as_secs()).sum();
    println!("\nintegration units (start, lane, seconds, expected, result):");
    for o in &sorted {
        println!(
            "  {:>6} s  lane {}  {:>5} s  (~{:>4} s)  {:<8} {}",
            o.started.as_secs(),
            o.lane,
            o.took.as_secs(),
            o.unit.seconds,
            if o.result.is_ok() { "ok" } else { "FAILED" },
            o.unit.label()
        );
    }
    let failed: Vec<&&Outcome> = sorted.iter().filter(|o| o.result.is_err()).collect();
    println!(
        "integration: {} units in {} s wall ({} s one after the other); {} failed",
        outcomes.len(),
        wall.as_secs(),
        serial,
        failed.len()
    );
    for o in &failed {
        println!("  FAILED {}: re-run with  {}", o.unit.label(), o.unit.rerun_command(test_threads));
    }
    failed.is_empty()
}
