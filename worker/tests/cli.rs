//! The worker binary's behaviour without a broker: bad configuration and unreachable brokers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn write_config(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join("kpipe-worker-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}-{}.json", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn malformed_config_exits_non_zero_naming_the_field() {
    let path = write_config(
        "bad",
        r#"{"namespace":"n","pipeline":"p","groupId":"g","spec":{"source":{"bootstrapServers":["k:9092"],"topics":["t"]},
            "processor":{"noop":{}},"retry":{"maxBackoff":"forever"}}}"#,
    );
    let out = Command::new(env!("CARGO_BIN_EXE_kpipe-worker")).env("KPIPE_CONFIG", &path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("spec.retry.maxBackoff"), "{stderr}");
}

#[test]
fn missing_config_file_is_reported() {
    let out = Command::new(env!("CARGO_BIN_EXE_kpipe-worker"))
        .env("KPIPE_CONFIG", "/nonexistent/pipeline.json")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/pipeline.json"));
}

#[tokio::test]
async fn unreachable_broker_is_not_ready_with_the_reason_and_sigterm_still_exits() {
    let path = write_config(
        "unreachable",
        r#"{"namespace":"n","pipeline":"p","groupId":"g","spec":{"source":{"bootstrapServers":["127.0.0.1:1"],"topics":["t"]},
            "processor":{"noop":{}},"onFailure":"drop"}}"#,
    );
    let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kpipe-worker"))
        .env("KPIPE_CONFIG", &path)
        .env("KPIPE_LISTEN", listen.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let detail = loop {
        if let Ok(r) = reqwest::get(format!("http://{listen}/readyz")).await {
            let status = r.status();
            let body = r.text().await.unwrap();
            if status == 503 && body.contains("brokers") {
                break body;
            }
        }
        assert!(Instant::now() < deadline, "readyz never reported the unreachable broker");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(detail.contains("brokers unreachable"), "{detail}");
    let health = reqwest::get(format!("http://{listen}/healthz")).await.unwrap();
    assert!(health.status().is_success(), "liveness does not depend on the broker");
    let metrics = reqwest::get(format!("http://{listen}/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("kpipe_worker_records_consumed_total 0"));
    assert!(Command::new("kill").arg("-15").arg(child.id().to_string()).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert_eq!(status.code(), Some(0));
            break;
        }
        assert!(Instant::now() < deadline, "worker ignored SIGTERM while waiting for brokers");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
