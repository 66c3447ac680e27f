//! The in-process HTTP sink: the endpoint a worker under test delivers kpipe's JSON batches to
//! (`POST /records`, `{"pipeline":..,"records":[{"topic","partition","offset","key","value",..}]}`).
//!
//! A record's id is the first line of its value (tests produce ids as values, sometimes padded after a newline to a
//! given size). The sink answers as its [`SinkBehavior`] says, in this order: after `delay`, `400` to every request
//! (`reject_all`) or to a batch holding a `poison` id (the whole batch fails, as a non-retryable answer does), `429`
//! with `Retry-After` to the first `throttle` requests, else `200`, naming the `fail_once` ids (the first time each is
//! seen) and the `fail_always` ids in `{"failed":[{"partition","offset","error"}]}` (a partial batch failure) and
//! accepting the rest. It keeps every request ([`SinkRequest`]), every accepted record and how often each id was
//! accepted. The sink the e2e suites run as a pod is the `kpipe-test-sink` binary of `kpipe-e2e`.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::routing::{get, post};

/// How the sink answers (see the module docs for the order of the checks).
#[derive(Debug, Default, Clone)]
pub struct SinkBehavior {
    /// Answer 400 to every request.
    pub reject_all: bool,
    /// Ids whose batch gets a 400 (the whole batch).
    pub poison: HashSet<String>,
    /// Ids named as failed (retryable) in a 200 answer the first time they are seen.
    pub fail_once: HashSet<String>,
    /// Ids named as failed (retryable) in every 200 answer.
    pub fail_always: HashSet<String>,
    /// How many requests (from now) get 429 with `Retry-After: retry_after`.
    pub throttle: u32,
    /// The `Retry-After` value of a 429 (seconds or an HTTP date).
    pub retry_after: String,
    /// Delay before answering each request.
    pub delay: Duration,
}

/// The ids of `values` as a set (for [`SinkBehavior`]'s id sets).
pub fn ids<T: ToString>(values: impl IntoIterator<Item = T>) -> HashSet<String> {
    values.into_iter().map(|v| v.to_string()).collect()
}

/// One request the sink answered.
#[derive(Debug, Clone)]
pub struct SinkRequest {
    /// When it was answered.
    pub at: Instant,
    /// The ids of its records, in order.
    pub ids: Vec<String>,
    /// The HTTP status of the answer.
    pub status: u16,
}

#[derive(Debug, Default)]
struct Ledger {
    behavior: SinkBehavior,
    accepted: HashMap<String, u32>,
    records: Vec<serde_json::Value>,
    requests: Vec<SinkRequest>,
    seen_fail_once: HashSet<String>,
}

type Shared = Arc<Mutex<Ledger>>;

/// A running sink on a loopback port (served until the test's runtime ends).
#[derive(Debug, Clone)]
pub struct HttpSink {
    addr: SocketAddr,
    ledger: Shared,
}

impl HttpSink {
    /// Starts a sink on a free loopback port.
    pub async fn start(behavior: SinkBehavior) -> HttpSink {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), behavior).await
    }

    /// Starts a sink on `addr` (a port chosen before, e.g. to start the worker while nothing answers there yet).
    pub async fn start_on(addr: SocketAddr, behavior: SinkBehavior) -> HttpSink {
        let ledger: Shared = Arc::new(Mutex::new(Ledger { behavior, ..Ledger::default() }));
        let app = Router::new()
            .route("/records", post(records))
            .route("/healthz", get(|| async { "ok" }))
            .with_state(ledger.clone());
        let addr = serve(addr, app).await;
        HttpSink { addr, ledger }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL of its batch endpoint, `http://<addr>/records`.
    pub fn url(&self) -> String {
        format!("http://{}/records", self.addr)
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        // A test that panicked while holding the lock has failed already; its data is still what the sink saw.
        self.ledger.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Changes how the sink answers from the next request on.
    pub fn update(&self, change: impl FnOnce(&mut SinkBehavior)) {
        change(&mut self.ledger().behavior);
    }

    /// Every accepted id with how often it was accepted.
    pub fn accepted(&self) -> HashMap<String, u32> {
        self.ledger().accepted.clone()
    }

    /// How many distinct ids were accepted.
    pub fn accepted_distinct(&self) -> usize {
        self.ledger().accepted.len()
    }

    /// Every accepted record (as the worker sent it), in arrival order.
    pub fn records(&self) -> Vec<serde_json::Value> {
        self.ledger().records.clone()
    }

    /// Every request answered, in order.
    pub fn requests(&self) -> Vec<SinkRequest> {
        self.ledger().requests.clone()
    }

    /// Waits until `n` distinct ids were accepted; false after `timeout`.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.accepted_distinct() >= n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }
}

/// Deliveries beyond the first of every id of `accepted` (as [`HttpSink::accepted`] counts them).
pub fn duplicate_deliveries(accepted: &HashMap<String, u32>) -> usize {
    accepted.values().map(|&n| n.saturating_sub(1) as usize).sum()
}

/// Serves `app` on `addr` (port 0: a free port) for the rest of the test's runtime; returns the bound address. For
/// endpoints of another wire format than [`HttpSink`]'s (protobuf, CloudEvents). Panics when `addr` cannot be bound.
pub async fn serve(addr: SocketAddr, app: Router) -> SocketAddr {
    let listener =
        tokio::net::TcpListener::bind(addr).await.unwrap_or_else(|e| panic!("test endpoint cannot bind {addr}: {e}"));
    let bound = listener.local_addr().unwrap_or_else(|e| panic!("test endpoint has no address: {e}"));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("test endpoint on {bound} stopped: {e}");
        }
    });
    bound
}

/// The first line of a record's value: its id.
fn id_of(record: &serde_json::Value) -> String {
    record["value"].as_str().unwrap_or_default().split('\n').next().unwrap_or_default().to_string()
}

async fn records(State(ledger): State<Shared>, body: Bytes) -> (StatusCode, HeaderMap, String) {
    let lock = || ledger.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let batch: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return (StatusCode::BAD_REQUEST, HeaderMap::new(), format!("not a kpipe JSON batch: {e}")),
    };
    let records = batch["records"].as_array().cloned().unwrap_or_default();
    let ids: Vec<String> = records.iter().map(id_of).collect();
    let delay = lock().behavior.delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut l = lock();
    let mut headers = HeaderMap::new();
    let mut failed = Vec::new();
    let status = if l.behavior.reject_all || ids.iter().any(|id| l.behavior.poison.contains(id)) {
        StatusCode::BAD_REQUEST
    } else if l.behavior.throttle > 0 {
        l.behavior.throttle -= 1;
        if let Ok(v) = HeaderValue::from_str(&l.behavior.retry_after) {
            headers.insert(axum::http::header::RETRY_AFTER, v);
        }
        StatusCode::TOO_MANY_REQUESTS
    } else {
        for (record, id) in records.into_iter().zip(&ids) {
            let fail = l.behavior.fail_always.contains(id)
                || (l.behavior.fail_once.contains(id) && l.seen_fail_once.insert(id.clone()));
            if fail {
                failed.push(
                    serde_json::json!({"partition": record["partition"], "offset": record["offset"], "error": "try again"}),
                );
            } else {
                *l.accepted.entry(id.clone()).or_insert(0) += 1;
                l.records.push(record);
            }
        }
        StatusCode::OK
    };
    l.requests.push(SinkRequest { at: Instant::now(), ids, status: status.as_u16() });
    let body = if failed.is_empty() { String::new() } else { serde_json::json!({ "failed": failed }).to_string() };
    (status, headers, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn post(sink: &HttpSink, values: &[&str]) -> (u16, String) {
        let records: Vec<serde_json::Value> = values
            .iter()
            .enumerate()
            .map(|(i, v)| serde_json::json!({"topic": "t", "partition": 0, "offset": i, "value": v}))
            .collect();
        let body = serde_json::json!({"pipeline": "p", "records": records}).to_string();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(sink.addr()).await.unwrap_or_else(|e| panic!("{e}"));
        let req = format!(
            "POST /records HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap_or_else(|e| panic!("{e}"));
        let mut resp = String::new();
        s.read_to_string(&mut resp).await.unwrap_or_else(|e| panic!("{e}"));
        let status = resp.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        (status, resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
    }

    #[tokio::test]
    async fn answers_as_its_behavior_says_and_keeps_what_it_saw() {
        let sink = HttpSink::start(SinkBehavior {
            poison: ids([9]),
            fail_once: ids([2]),
            throttle: 1,
            retry_after: "1".into(),
            ..SinkBehavior::default()
        })
        .await;
        assert_eq!(post(&sink, &["1"]).await.0, 429, "throttled first");
        assert_eq!(post(&sink, &["1", "9"]).await.0, 400, "poison fails the batch");
        let (status, body) = post(&sink, &["1", "2\npadding", "3"]).await;
        assert_eq!(status, 200);
        assert!(body.contains("\"offset\":1"), "2 named failed once: {body}");
        assert_eq!(post(&sink, &["2"]).await, (200, String::new()), "then accepted");
        let accepted = sink.accepted();
        assert_eq!(accepted.len(), 3);
        assert_eq!(duplicate_deliveries(&accepted), 0);
        assert_eq!(sink.records().len(), 3);
        let statuses: Vec<u16> = sink.requests().iter().map(|r| r.status).collect();
        assert_eq!(statuses, [429, 400, 200, 200]);
        sink.update(|b| b.reject_all = true);
        assert_eq!(post(&sink, &["4"]).await.0, 400);
    }
}
