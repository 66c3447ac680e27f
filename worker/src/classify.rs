//! Failure classification: which processor errors are worth retrying.

use std::fmt;

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
    /// The record could not be encoded for the processor.
    Encode,
}

impl FailureClass {
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Timeout | Self::Connection | Self::BadResponse => true,
            Self::HttpStatus(s) => matches!(*s, 408 | 409 | 429) || (500..600).contains(s),
            Self::Rejected { permanent } => !permanent,
            Self::Produce { retryable } => *retryable,
            Self::Encode => false,
        }
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
        }
    }
}

/// A failed record: class plus a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub class: FailureClass,
    pub message: String,
}

impl Failure {
    pub fn new(class: FailureClass, message: impl Into<String>) -> Self {
        Self { class, message: message.into() }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.class.label(), self.message)
    }
}

/// Classifies a reqwest error.
pub fn classify_reqwest(err: &reqwest::Error) -> FailureClass {
    if err.is_timeout() {
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
    }
}
