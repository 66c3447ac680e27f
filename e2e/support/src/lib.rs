//! The test-support library of kpipe's tests, shared by the e2e suites (on the local test bed and on kind, through
//! `kpipe_e2e::bed()`), the operator's integration tests and the worker's integration tests (one copy of each helper,
//! in the shape of Linkerd's `linkerd-policy-test` crate):
//!
//! * [`unique_name`]: the one name for namespaces, topics and consumer groups of a test run;
//! * [`free_port`] / [`free_addr`] / [`http_get`]: a port for a process under test and a plain HTTP/1.0 GET of it
//!   (metrics, probes);
//! * [`sink::HttpSink`]: the in-process HTTP endpoint a worker under test delivers kpipe's JSON batches to, with
//!   programmable answers (400, named partial failures, 429 + `Retry-After`, delays), and [`sink::serve`] for the
//!   tests that need an endpoint of another wire format (protobuf, CloudEvents).
//!
//! What needs a cluster (the env file, Kubernetes clients, `await_condition`, temp namespaces, Kafka helpers) lives
//! in `kpipe-e2e`'s `testbed`, which re-exports these helpers.

pub mod sink;

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

pub use sink::{HttpSink, SinkBehavior, SinkRequest, serve};

/// The Kafka broker of the local test bed: `KPIPE_KAFKA_BOOTSTRAP`, else `KAFKA_BOOTSTRAP` from the bed's env file
/// (`$KPIPE_RUN/env`, default `~/.cache/kpipe/run/env`). Panics when no broker is configured or the first one is not
/// reachable: the tests that need Kafka must never silently skip.
pub fn kafka_bootstrap() -> String {
    let from_env = std::env::var("KPIPE_KAFKA_BOOTSTRAP").ok().filter(|s| !s.is_empty());
    let env_file = std::env::var("KPIPE_RUN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/kpipe/run"))
        .join("env");
    let bootstrap = from_env.or_else(|| {
        std::fs::read_to_string(&env_file)
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("KAFKA_BOOTSTRAP=").map(|v| v.trim().to_owned()))
    });
    let Some(bootstrap) = bootstrap else {
        panic!(
            "no Kafka broker configured: set KPIPE_KAFKA_BOOTSTRAP=host:port or bring the test bed up \
             (e2e/testbed/up.sh writes KAFKA_BOOTSTRAP to {})",
            env_file.display()
        );
    };
    let first = bootstrap.split(',').next().unwrap_or_default();
    let reachable = first
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(3)).is_ok());
    assert!(reachable, "Kafka broker {bootstrap} is not reachable (is the test bed up? e2e/testbed/status.sh)");
    bootstrap
}

/// A name unique to one test run: `<prefix>-<8 hex digits>`. Valid as a namespace (when `prefix` is), a Kafka topic
/// and a consumer group.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand::random::<u32>())
}

/// A loopback address with a port free at the time of the call (bound to port 0 and released), for a process the
/// test starts (its `--listen`). Panics when the loopback cannot be bound (a broken test host).
pub fn free_addr() -> SocketAddr {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("cannot bind a loopback port: {e}"))
}

/// The port of [`free_addr`].
pub fn free_port() -> u16 {
    free_addr().port()
}

/// `GET path` on `127.0.0.1:port` as plain HTTP/1.0; the body of any answer, or `None` while nothing answers (a
/// process starting up) or the answer has no body separator.
pub async fn http_get(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await.ok()?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    response.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_differ_and_keep_the_prefix() {
        let (a, b) = (unique_name("t"), unique_name("t"));
        assert_ne!(a, b);
        assert!(a.starts_with("t-") && a.len() == 10, "{a}");
    }

    #[tokio::test]
    async fn http_get_reads_the_body_and_none_when_nothing_listens() {
        let sink = HttpSink::start(SinkBehavior::default()).await;
        assert_eq!(http_get(sink.addr().port(), "/healthz").await.as_deref(), Some("ok"));
        assert_eq!(http_get(free_port(), "/").await, None);
    }
}
