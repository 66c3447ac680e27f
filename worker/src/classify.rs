//! Failure classification: which processor errors are worth retrying.

use std::fmt;
use std::time::Duration;

/// What went wrong with a record (or the whole batch it was in).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureClass {
    /// The request did not complete in time.
    Timeout,
    /// Could not connect / the connection broke.
    Connection,
    /// The endpoint answered with a non-2xx status.
    HttpStatus(u16),
    /// The endpoint answered 2xx but named this record as failed.
    Rejected { permanent: bool },
    /// The endpoint's answer could not be understood.
    BadResponse,
    /// Producing to the output topic failed.
    Produce { retryable: bool },
    /// The record could not be encoded for the processor, or the request for it could not even be
    /// built (e.g. a header value the HTTP client refuses). Permanent: retrying cannot change it.
    Encode,
    /// Not attempted: an earlier record of the same key failed in the same call, so sending this one
    /// would break key order. Retried with its key; never counted as an attempt.
    Deferred,
}

impl FailureClass {
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Timeout | Self::Connection | Self::BadResponse => true,
            Self::HttpStatus(s) => matches!(*s, 408 | 409 | 429) || (500..600).contains(s),
            Self::Rejected { permanent } => !permanent,
            Self::Produce { retryable } => *retryable,
            Self::Encode => false,
            Self::Deferred => true,
        }
    }

    /// A failure that says the downstream is unavailable rather than that this record is bad:
    /// timeouts, connection errors, HTTP 500/502/503/504 and retryable produce errors. These feed
    /// the circuit breaker ([`crate::breaker`]). 429 is throttling (handled by `Retry-After` and
    /// adaptive concurrency), other statuses and named rejections are about the records.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Timeout | Self::Connection => true,
            Self::HttpStatus(s) => matches!(*s, 500 | 502 | 503 | 504),
            Self::Produce { retryable } => *retryable,
            Self::Rejected { .. } | Self::BadResponse | Self::Encode | Self::Deferred => false,
        }
    }

    /// A sign of overload that should shrink the adaptive concurrency limit ([`crate::aimd`]):
    /// HTTP 429 and 503, and timeouts.
    pub fn is_overload(&self) -> bool {
        matches!(self, Self::Timeout | Self::HttpStatus(429 | 503))
    }

    /// Low-cardinality label for metrics and the `kpipe.error.class` header.
    pub fn label(&self) -> String {
        match self {
            Self::Timeout => "timeout".into(),
            Self::Connection => "connection".into(),
            Self::HttpStatus(s) => format!("http_{s}"),
            Self::Rejected { .. } => "rejected".into(),
            Self::BadResponse => "bad_response".into(),
            Self::Produce { .. } => "produce".into(),
            Self::Encode => "encode".into(),
            Self::Deferred => "deferred".into(),
        }
    }

    /// Coarse label for metrics (HTTP statuses grouped by hundreds).
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Connection => "connection",
            Self::HttpStatus(s) if (400..500).contains(s) => "http_4xx",
            Self::HttpStatus(s) if (500..600).contains(s) => "http_5xx",
            Self::HttpStatus(_) => "http_other",
            Self::Rejected { .. } => "rejected",
            Self::BadResponse => "bad_response",
            Self::Produce { .. } => "produce",
            Self::Encode => "encode",
            Self::Deferred => "deferred",
        }
    }
}

/// A failed record: class plus a human-readable message, and how long the server asked to wait
/// before the next try (`Retry-After`, RFC 9110 §10.2.3), if it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub class: FailureClass,
    pub message: String,
    /// The server's `Retry-After` on a 429 or 503, already resolved to a wait from the response's
    /// arrival ([`crate::retry_after::parse`]). The next try of the record waits at least this long,
    /// and the failure is not counted against `retry.maxAttempts` (the server asked to come back
    /// later; nothing is wrong with the record).
    pub retry_after: Option<Duration>,
}

impl Failure {
    pub fn new(class: FailureClass, message: impl Into<String>) -> Self {
        Self { class, message: message.into(), retry_after: None }
    }

    /// The same failure with the server's requested wait.
    pub fn with_retry_after(mut self, wait: Option<Duration>) -> Self {
        self.retry_after = wait;
        self
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.class.label(), self.message)
    }
}

/// Classifies a reqwest error.
///
/// A request the client could not build (`is_builder`: an invalid header name or value, a bad URL)
/// is [`FailureClass::Encode`], permanent: it would fail the same way on every retry and never
/// reached the network, so it must not count as a connection error.
pub fn classify_reqwest(err: &reqwest::Error) -> FailureClass {
    if err.is_builder() {
        FailureClass::Encode
    } else if err.is_timeout() {
        FailureClass::Timeout
    } else if let Some(status) = err.status() {
        FailureClass::HttpStatus(status.as_u16())
    } else if err.is_connect() || err.is_request() || err.is_body() {
        FailureClass::Connection
    } else if err.is_decode() {
        FailureClass::BadResponse
    } else {
        FailureClass::Connection
    }
}

/// The [`Failure`] for an HTTP client error: its class ([`classify_reqwest`]) and a message that
/// names the cause.
///
/// reqwest's own `Display` stops at "error sending request for url (…)"; the cause a user can act
/// on ("Connection refused", "dns error", a TLS verification failure) sits in the `source()` chain,
/// so the message is the error followed by each source, `": "`-separated, repeats skipped. The
/// message reaches logs and the dead-letter topic's `kpipe.error.message` header; credentials in a
/// URL (`https://user:secret@host/`) never appear in it, because reqwest moves them into the
/// `Authorization` header before sending (the test below holds it to that).
pub fn reqwest_failure(err: &reqwest::Error) -> Failure {
    let mut message = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    Failure::new(classify_reqwest(err), message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_statuses() {
        for s in [408, 409, 429, 500, 502, 503, 504, 599] {
            assert!(FailureClass::HttpStatus(s).is_retryable(), "{s}");
        }
        for s in [400, 401, 403, 404, 410, 413, 422, 300] {
            assert!(!FailureClass::HttpStatus(s).is_retryable(), "{s}");
        }
    }

    #[test]
    fn other_classes() {
        assert!(FailureClass::Timeout.is_retryable());
        assert!(FailureClass::Connection.is_retryable());
        assert!(FailureClass::Rejected { permanent: false }.is_retryable());
        assert!(!FailureClass::Rejected { permanent: true }.is_retryable());
        assert!(!FailureClass::Encode.is_retryable());
        assert_eq!(FailureClass::HttpStatus(404).label(), "http_404");
        assert_eq!(FailureClass::HttpStatus(404).metric_label(), "http_4xx");
        assert!(FailureClass::Deferred.is_retryable());
    }

    #[test]
    fn unavailability_and_overload() {
        for c in [
            FailureClass::Timeout,
            FailureClass::Connection,
            FailureClass::HttpStatus(503),
            FailureClass::HttpStatus(502),
            FailureClass::Produce { retryable: true },
        ] {
            assert!(c.is_unavailable(), "{c:?}");
        }
        for c in [
            FailureClass::HttpStatus(429),
            FailureClass::HttpStatus(400),
            FailureClass::Rejected { permanent: false },
            FailureClass::Encode,
            FailureClass::Deferred,
            FailureClass::BadResponse,
        ] {
            assert!(!c.is_unavailable(), "{c:?}");
        }
        assert!(FailureClass::HttpStatus(429).is_overload());
        assert!(FailureClass::Timeout.is_overload());
        assert!(!FailureClass::Connection.is_overload());
    }

    #[tokio::test]
    async fn an_unbuildable_request_is_a_permanent_encode_failure() {
        let client = reqwest::Client::new();
        let err = client.post("http://127.0.0.1:9/").header("ce-partitionkey", "a\u{1}b").send().await.unwrap_err();
        assert_eq!(classify_reqwest(&err), FailureClass::Encode, "{err:?}");
        assert!(!classify_reqwest(&err).is_retryable());
    }

    #[tokio::test]
    async fn a_connection_failure_names_its_cause_and_hides_url_credentials() {
        // A port nothing listens on: bind one, note it, drop the listener.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let client = reqwest::Client::new();
        let err = client.post(format!("http://alice:s3cret@127.0.0.1:{port}/batch")).send().await.unwrap_err();
        let failure = reqwest_failure(&err);
        assert_eq!(failure.class, FailureClass::Connection, "{failure:?}");
        assert!(!failure.message.contains("s3cret"), "{}", failure.message);
        assert!(!failure.message.contains("alice"), "{}", failure.message);
        assert!(failure.message.contains(&format!("127.0.0.1:{port}/batch")), "{}", failure.message);
        assert!(failure.message.to_lowercase().contains("refused"), "the cause is named: {}", failure.message);
    }
}
