//! `Retry-After` (RFC 9110 §10.2.3): how long a server that answered 429 (RFC 6585 §4) or 503
//! asks the client to wait before the next request. Pure: the response's arrival time is passed in.
//!
//! The field is either a non-negative number of seconds (`Retry-After: 120`) or an HTTP-date
//! (`Retry-After: Fri, 31 Dec 1999 23:59:59 GMT`, IMF-fixdate or the obsolete RFC 850 / asctime
//! forms, parsed by the `httpdate` crate). A date in the past means "now" (zero wait). Values that
//! are neither are ignored (the normal backoff applies), and every wait is capped at [`MAX_WAIT`] so
//! a misconfigured server cannot park a partition for days.

use std::time::{Duration, SystemTime};

/// The longest wait honoured, 15 minutes. Longer requests are cut to this (the record is tried
/// again then; the server may answer with another `Retry-After`).
pub const MAX_WAIT: Duration = Duration::from_secs(15 * 60);

/// The wait a `Retry-After` value asks for, measured from `now` (the response's arrival, wall
/// clock); `None` when the value is not a valid delay-seconds or HTTP-date.
pub fn parse(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    let wait = if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        // delay-seconds = 1*DIGIT; a number too large for u64 is "very long".
        Duration::from_secs(v.parse::<u64>().unwrap_or(u64::MAX).min(MAX_WAIT.as_secs()))
    } else {
        let at = httpdate::parse_http_date(v).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(wait.min(MAX_WAIT))
}

/// Whether a response status carries a `Retry-After` kpipe honours: 429 Too Many Requests and 503
/// Service Unavailable (RFC 9110 §10.2.3 names 503 and 3xx; RFC 6585 §4 adds 429; a redirect is not a
/// failure kpipe retries).
pub fn applies_to(status: u16) -> bool {
    matches!(status, 429 | 503)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn delay_seconds() {
        let now = at(1_000_000_000);
        assert_eq!(parse("20", now), Some(Duration::from_secs(20)));
        assert_eq!(parse(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(parse("99999999999999999999999", now), Some(MAX_WAIT), "overflow is long, capped");
        assert_eq!(parse("3600", now), Some(MAX_WAIT));
    }

    #[test]
    fn http_dates_in_all_three_forms() {
        // 1994-11-06 08:49:37 UTC = 784111777.
        let now = at(784_111_777 - 30);
        assert_eq!(parse("Sun, 06 Nov 1994 08:49:37 GMT", now), Some(Duration::from_secs(30)));
        assert_eq!(parse("Sunday, 06-Nov-94 08:49:37 GMT", now), Some(Duration::from_secs(30)));
        assert_eq!(parse("Sun Nov  6 08:49:37 1994", now), Some(Duration::from_secs(30)));
        assert_eq!(parse("Sun, 06 Nov 1994 08:49:37 GMT", at(784_111_777 + 5)), Some(Duration::ZERO), "in the past");
    }

    #[test]
    fn garbage_is_ignored() {
        let now = at(0);
        for v in ["", "-5", "1.5", "soon", "Sun, 06 Nov 1994", "20s"] {
            assert_eq!(parse(v, now), None, "{v:?}");
        }
    }

    #[test]
    fn statuses() {
        assert!(applies_to(429) && applies_to(503));
        assert!(!applies_to(500) && !applies_to(502) && !applies_to(301));
    }
}
