//! `kpipe-test-sink`: the HTTP processor endpoint the end-to-end suites and the demo run as a pod.
//!
//! It accepts kpipe's JSON batches (`{"pipeline":..,"records":[{topic,partition,offset,key,value,..}]}`) and
//! CloudEvents binary-mode requests (one record per request, the body is the value), records the id of every
//! delivered record (its value), and can be told to reject some records:
//!
//! * `--poison-prefix P --poison-mode status400`: a request containing a record whose value starts with P is answered
//!   400 (non-retryable: the worker's failure policy applies to the whole request — use batch.maxRecords 1);
//! * `--poison-mode named`: 200 with `{"failed":[{"partition":..,"offset":..,"permanent":true}]}` naming only the
//!   poison records (partial batch failure);
//! * `--fail-first N`: answer 503 to the first N requests (retry path);
//! * `--delay-ms D`: sleep D ms per request (slow handler);
//! * `POST /outage/start` / `POST /outage/end`: answer 503 to every request in between (a downstream outage);
//!   `POST /outage/start?status=429&retry_after=2` answers 429 with `Retry-After: 2` instead (rate limiting).
//!
//! CloudEvents requests are parsed by the CloudEvents SDK (`cloudevents-sdk`, HTTP binding, binary content mode);
//! a request it refuses is answered 400 and counted as `malformed`. Every parsed event is kept, with its attribute and
//! extension values percent-decoded as the HTTP binding §3.1.3.2 asks of a receiver (the SDK leaves that to the
//! application), and `GET /events` returns them as JSON in arrival order: `[{"id","source","type","subject",
//! "datacontenttype","extensions":{..},"data":..}]` (`data` as UTF-8 text, or `dataBase64`). Per `partitionkey` the
//! sink checks that offsets (from `subject`) arrive in increasing order and counts `outOfOrder` otherwise.
//!
//! `GET /ids` returns every delivered id, one per line, in arrival order (duplicates included);
//! `GET /stats` returns `{"requests":..,"records":..,"unique":..,"rejected":..,"malformed":..,"outOfOrder":..}`; `/healthz` is the probe.
//! With `--out FILE` every delivered id is also appended to FILE.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use clap::{Parser, ValueEnum};
use serde::Deserialize;
use tokio::sync::Mutex;

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum PoisonMode {
    Status400,
    Named,
}

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value = "0.0.0.0:8080", env = "SINK_LISTEN")]
    listen: String,
    #[arg(long, env = "SINK_OUT")]
    out: Option<std::path::PathBuf>,
    #[arg(long, env = "SINK_POISON_PREFIX")]
    poison_prefix: Option<String>,
    #[arg(long, value_enum, default_value = "status400", env = "SINK_POISON_MODE")]
    poison_mode: PoisonMode,
    #[arg(long, default_value_t = 0, env = "SINK_FAIL_FIRST")]
    fail_first: u64,
    #[arg(long, default_value_t = 0, env = "SINK_DELAY_MS")]
    delay_ms: u64,
}

#[derive(Default)]
struct Ledger {
    ids: Vec<String>,
    unique: HashSet<String>,
    requests: u64,
    rejected: u64,
    file: Option<std::fs::File>,
    /// CloudEvents requests the SDK refused.
    malformed: u64,
    /// Every CloudEvent delivered, decoded (see the module docs), in arrival order.
    events: Vec<serde_json::Value>,
    /// Highest offset seen per `partitionkey` (the topic/partition of `subject` prefixed).
    last_offset_per_key: HashMap<String, i64>,
    /// Events that arrived after a later offset of the same key.
    out_of_order: u64,
}

/// A CloudEvents attribute value as sent (percent-encoded, HTTP binding §3.1.3.2), decoded; the raw text when it is
/// not valid percent-encoded UTF-8.
fn ce_decode(value: &str) -> String {
    percent_encoding::percent_decode_str(value).decode_utf8().map(|v| v.into_owned()).unwrap_or_else(|_| value.into())
}

/// Parses a binary-mode CloudEvents request with the SDK and decodes it as `GET /events` shows it.
fn decode_cloudevent(headers: &HeaderMap, body: &[u8]) -> Result<serde_json::Value, String> {
    use cloudevents::event::{AttributesReader, Data};
    let event = cloudevents::binding::http::to_event(headers, body.to_vec()).map_err(|e| e.to_string())?;
    let extensions: serde_json::Map<String, serde_json::Value> =
        event.iter_extensions().map(|(k, v)| (k.to_string(), ce_decode(&v.to_string()).into())).collect();
    let mut out = serde_json::json!({
        "id": ce_decode(event.id()),
        "source": ce_decode(&event.source().to_string()),
        "type": ce_decode(event.ty()),
        "subject": event.subject().map(ce_decode),
        "time": event.time().map(|t| t.to_rfc3339()),
        "datacontenttype": event.datacontenttype(),
        "extensions": extensions,
    });
    let bytes: Vec<u8> = match event.data() {
        Some(Data::Binary(b)) => b.clone(),
        Some(Data::String(s)) => s.clone().into_bytes(),
        Some(Data::Json(j)) => j.to_string().into_bytes(),
        None => Vec::new(),
    };
    match String::from_utf8(bytes) {
        Ok(text) => out["data"] = text.into(),
        Err(e) => {
            use base64::Engine;
            out["dataBase64"] = base64::engine::general_purpose::STANDARD.encode(e.as_bytes()).into();
        }
    }
    Ok(out)
}

struct Sink {
    args: Args,
    ledger: Mutex<Ledger>,
    /// Between `POST /outage/start` and `POST /outage/end`: every request gets this status (and Retry-After).
    outage: std::sync::Mutex<Option<Outage>>,
}

/// What the sink answers during an outage.
#[derive(Deserialize, Clone, Debug)]
struct Outage {
    #[serde(default = "default_outage_status")]
    status: u16,
    /// `Retry-After` header value, if any.
    retry_after: Option<String>,
}

fn default_outage_status() -> u16 {
    503
}

#[derive(Deserialize)]
struct Batch {
    #[serde(default)]
    records: Vec<BatchRecord>,
}

#[derive(Deserialize)]
struct BatchRecord {
    #[serde(default)]
    partition: i32,
    #[serde(default)]
    offset: i64,
    #[serde(default)]
    value: Option<String>,
}

async fn records(State(sink): State<Arc<Sink>>, headers: HeaderMap, body: Bytes) -> axum::response::Response {
    if sink.args.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(sink.args.delay_ms)).await;
    }
    let request_no = {
        let mut ledger = sink.ledger.lock().await;
        ledger.requests += 1;
        ledger.requests
    };
    if request_no <= sink.args.fail_first {
        return (StatusCode::SERVICE_UNAVAILABLE, "warming up".to_string()).into_response();
    }
    let outage = sink.outage.lock().ok().and_then(|o| o.clone());
    if let Some(o) = outage {
        sink.ledger.lock().await.rejected += 1;
        let status = StatusCode::from_u16(o.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let mut resp = (status, "outage".to_string()).into_response();
        if let Some(v) = o.retry_after.and_then(|v| axum::http::HeaderValue::from_str(&v).ok()) {
            resp.headers_mut().insert(axum::http::header::RETRY_AFTER, v);
        }
        return resp;
    }
    // CloudEvents binary mode carries one record per request, with ce-* headers and the value as the body.
    let mut event: Option<serde_json::Value> = None;
    let batch: Vec<BatchRecord> = if headers.contains_key("ce-specversion") || headers.contains_key("ce-id") {
        let decoded = match decode_cloudevent(&headers, &body) {
            Ok(d) => d,
            Err(e) => {
                sink.ledger.lock().await.malformed += 1;
                return (StatusCode::BAD_REQUEST, format!("malformed CloudEvent: {e}")).into_response();
            }
        };
        // subject is "<topic>/<partition>/<offset>".
        let subject = decoded["subject"].as_str().unwrap_or_default().to_string();
        let mut parts = subject.rsplitn(3, '/');
        let offset = parts.next().and_then(|v| v.parse().ok()).unwrap_or(-1);
        let partition = parts.next().and_then(|v| v.parse().ok()).unwrap_or(-1);
        let value = decoded["data"].as_str().map(str::to_string);
        event = Some(decoded);
        vec![BatchRecord { partition, offset, value }]
    } else {
        match serde_json::from_slice::<Batch>(&body) {
            Ok(b) => b.records,
            Err(e) => return (StatusCode::BAD_REQUEST, format!("not a kpipe JSON batch: {e}")).into_response(),
        }
    };
    let is_poison = |r: &BatchRecord| {
        sink.args.poison_prefix.as_deref().is_some_and(|p| r.value.as_deref().is_some_and(|v| v.starts_with(p)))
    };
    let poison: Vec<&BatchRecord> = batch.iter().filter(|r| is_poison(r)).collect();
    if !poison.is_empty() && sink.args.poison_mode == PoisonMode::Status400 {
        sink.ledger.lock().await.rejected += batch.len() as u64;
        return (StatusCode::BAD_REQUEST, format!("{} poison record(s)", poison.len())).into_response();
    }
    let failed: Vec<serde_json::Value> = poison
        .iter()
        .map(
            |r| serde_json::json!({"partition": r.partition, "offset": r.offset, "permanent": true, "error": "poison"}),
        )
        .collect();
    let mut ledger = sink.ledger.lock().await;
    ledger.rejected += failed.len() as u64;
    if let (Some(ev), Some(r)) = (event, batch.first()) {
        if let Some(key) = ev["extensions"]["partitionkey"].as_str() {
            let topic = ev["subject"].as_str().and_then(|s| s.rsplitn(3, '/').nth(2)).unwrap_or_default();
            let slot = format!("{topic}/{}/{key}", r.partition);
            let last = ledger.last_offset_per_key.get(&slot).copied().unwrap_or(-1);
            if r.offset < last {
                ledger.out_of_order += 1;
            }
            ledger.last_offset_per_key.insert(slot, last.max(r.offset));
        }
        ledger.events.push(ev);
    }
    let mut appended = String::new();
    for r in batch.iter().filter(|r| !is_poison(r)) {
        let id = r.value.clone().unwrap_or_default();
        appended.push_str(&id);
        appended.push('\n');
        ledger.unique.insert(id.clone());
        ledger.ids.push(id);
    }
    if let Some(file) = ledger.file.as_mut()
        && let Err(e) = file.write_all(appended.as_bytes()).and_then(|()| file.flush())
    {
        return (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot record ids: {e}")).into_response();
    }
    (StatusCode::OK, serde_json::json!({"failed": failed}).to_string()).into_response()
}

async fn ids(State(sink): State<Arc<Sink>>) -> String {
    let ledger = sink.ledger.lock().await;
    let mut out = String::with_capacity(ledger.ids.len() * 12);
    for id in &ledger.ids {
        out.push_str(id);
        out.push('\n');
    }
    out
}

async fn events(State(sink): State<Arc<Sink>>) -> String {
    serde_json::Value::from(sink.ledger.lock().await.events.clone()).to_string()
}

async fn stats(State(sink): State<Arc<Sink>>) -> String {
    let ledger = sink.ledger.lock().await;
    serde_json::json!({
        "requests": ledger.requests,
        "records": ledger.ids.len(),
        "unique": ledger.unique.len(),
        "rejected": ledger.rejected,
        "malformed": ledger.malformed,
        "outOfOrder": ledger.out_of_order,
    })
    .to_string()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let file = match &args.out {
        Some(path) => Some(std::fs::OpenOptions::new().create(true).append(true).open(path)?),
        None => None,
    };
    let listen = args.listen.clone();
    let sink = Arc::new(Sink {
        args,
        ledger: Mutex::new(Ledger { file, ..Ledger::default() }),
        outage: std::sync::Mutex::new(None),
    });
    let start_outage = |State(sink): State<Arc<Sink>>, Query(o): Query<Outage>| async move {
        let text = format!("outage started: {o:?}\n");
        if let Ok(mut slot) = sink.outage.lock() {
            *slot = Some(o);
        }
        text
    };
    let end_outage = |State(sink): State<Arc<Sink>>| async move {
        if let Ok(mut slot) = sink.outage.lock() {
            *slot = None;
        }
        "outage ended\n"
    };
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/records", post(records))
        .route("/", post(records))
        .route("/ids", get(ids))
        .route("/stats", get(stats))
        .route("/events", get(events))
        .route("/outage/start", post(start_outage))
        .route("/outage/end", post(end_outage))
        .with_state(sink);
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("kpipe-test-sink listening on {listen}");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = tokio::signal::ctrl_c() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        })
        .await?;
    Ok(())
}
