//! The operator as a real process for the tests against the local test bed (one copy; the rest of the test support
//! is `kpipe-test-support` and `kpipe_e2e::testbed`).
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use kpipe_test_support::{free_port, http_get};

/// A running `kpipe-operator` process watching one namespace; killed when dropped.
pub struct Operator {
    child: Child,
    /// The port of its `--listen` address (metrics, probes) on 127.0.0.1.
    pub port: u16,
    /// Its log (stdout and stderr), `$TMPDIR/op-<namespace>-<port>.log`.
    pub log: PathBuf,
}

impl Operator {
    /// Starts the operator of this build (or `KPIPE_TEST_OPERATOR_BIN`, e.g. a control run against an operator
    /// without a fix) with `kubeconfig`, watching `namespace`, with `extra` arguments; text logs at debug level
    /// (`KPIPE_TEST_OPERATOR_LOG` replaces the filter, e.g. `info,kpipe_operator=debug,kube=debug` to see requests).
    pub fn start(kubeconfig: &Path, namespace: &str, extra: &[&str]) -> Operator {
        let port = free_port();
        let log = std::env::temp_dir().join(format!("op-{namespace}-{port}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let binary =
            std::env::var("KPIPE_TEST_OPERATOR_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_kpipe-operator").into());
        let child = Command::new(binary)
            .env("KUBECONFIG", kubeconfig)
            .env(
                "RUST_LOG",
                std::env::var("KPIPE_TEST_OPERATOR_LOG").unwrap_or_else(|_| "info,kpipe_operator=debug".into()),
            )
            .args(["--namespaces", namespace, "--listen", &format!("127.0.0.1:{port}"), "--log-format", "text"])
            .args(extra)
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        Operator { child, port, log }
    }

    /// Kills the process (SIGKILL, a crash: no lease release, no graceful shutdown).
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
    }

    /// The value of the first `/metrics` line starting with `line_prefix` (a name, or a name with labels); `None`
    /// while the operator does not answer or has no such line.
    pub async fn metric(&self, line_prefix: &str) -> Option<f64> {
        let body = http_get(self.port, "/metrics").await?;
        body.lines().find(|l| l.starts_with(line_prefix)).and_then(|l| l.rsplit(' ').next())?.parse().ok()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
