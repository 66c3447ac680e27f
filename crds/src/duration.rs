//! A typed duration that is written like Go's `time.ParseDuration` ("50ms", "1m30s", "2h", ".5s",
//! "1.s", "+5s", "0").
//!
//! Kubernetes users already write durations this way, and CEL's `duration()` accepts the same
//! syntax, so schema rules can compare durations server-side. The accepted language is Go's minus
//! negative values, and the same range: at most 2^63−1 nanoseconds (about 2,562,047 hours).

use std::{borrow::Cow, fmt, str::FromStr, time::Duration as StdDuration};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Regex the apiserver uses to check a duration string (mirrors [`Duration::from_str`]).
pub const DURATION_PATTERN: &str = r"^\+?(0|(([0-9]+(\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h))+)$";

/// A non-negative duration, serialised as a Go-style duration string.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(StdDuration);

/// Why a duration string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationParseError {
    #[error("empty duration")]
    Empty,
    #[error(
        "invalid duration {0:?}: expected a sequence of <number><unit> with unit ns, us, ms, s, m or h (e.g. \"1m30s\")"
    )]
    Invalid(String),
    #[error("duration {0:?} is too large")]
    Overflow(String),
}

impl Duration {
    pub const ZERO: Duration = Duration(StdDuration::ZERO);

    pub const fn from_millis(ms: u64) -> Self {
        Self(StdDuration::from_millis(ms))
    }

    pub const fn from_secs(s: u64) -> Self {
        Self(StdDuration::from_secs(s))
    }

    pub const fn as_std(&self) -> StdDuration {
        self.0
    }

    pub fn as_secs_f64(&self) -> f64 {
        self.0.as_secs_f64()
    }
}

impl From<StdDuration> for Duration {
    fn from(d: StdDuration) -> Self {
        Self(d)
    }
}

impl From<Duration> for StdDuration {
    fn from(d: Duration) -> Self {
        d.0
    }
}

fn unit_nanos(unit: &str) -> Option<u128> {
    Some(match unit {
        "ns" => 1,
        // U+00B5 (micro sign) and U+03BC (Greek mu), as Go accepts both.
        "us" | "µs" | "μs" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => return None,
    })
}

impl FromStr for Duration {
    type Err = DurationParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(DurationParseError::Empty);
        }
        let invalid = || DurationParseError::Invalid(s.to_string());
        // Go accepts a leading sign; a negative duration means nothing here.
        let unsigned = s.strip_prefix('+').unwrap_or(s);
        if unsigned == "0" {
            return Ok(Self::ZERO);
        }
        if unsigned.is_empty() {
            return Err(invalid());
        }
        let mut total: u128 = 0;
        let mut rest = unsigned;
        while !rest.is_empty() {
            let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(invalid)?;
            if num_len == 0 {
                return Err(invalid());
            }
            let (number, after) = rest.split_at(num_len);
            let unit_len = after.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(after.len());
            let (unit, after) = after.split_at(unit_len);
            let scale = unit_nanos(unit).ok_or_else(invalid)?;
            // Go: digits before or after the point (or both): "1.5", ".5", "1."; never "." alone or two points.
            let (int_part, frac_part) = match number.split_once('.') {
                Some((i, f)) if (!i.is_empty() || !f.is_empty()) && !f.contains('.') => (i, f),
                Some(_) => return Err(invalid()),
                None => (number, ""),
            };
            let int: u128 = if int_part.is_empty() {
                0
            } else {
                int_part.parse().map_err(|_| DurationParseError::Overflow(s.to_string()))?
            };
            let mut nanos = int.checked_mul(scale).ok_or_else(|| DurationParseError::Overflow(s.to_string()))?;
            if !frac_part.is_empty() {
                // Fractions beyond nanosecond precision are truncated, as Go does.
                let digits = frac_part.len().min(18);
                let frac: u128 = frac_part[..digits].parse().map_err(|_| invalid())?;
                nanos += frac * scale / 10u128.pow(digits as u32);
            }
            total = total.checked_add(nanos).ok_or_else(|| DurationParseError::Overflow(s.to_string()))?;
            rest = after;
        }
        // Go's (and so the apiserver's CEL) limit: an int64 of nanoseconds.
        if total > i64::MAX as u128 {
            return Err(DurationParseError::Overflow(s.to_string()));
        }
        let secs = u64::try_from(total / 1_000_000_000).map_err(|_| DurationParseError::Overflow(s.to_string()))?;
        Ok(Self(StdDuration::new(secs, (total % 1_000_000_000) as u32)))
    }
}

impl fmt::Display for Duration {
    /// Prints the shortest exact form: "1h2m3s", "50ms", "1.5s", "0s".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nanos = self.0.as_nanos();
        if nanos == 0 {
            return f.write_str("0s");
        }
        if nanos < 1_000_000_000 {
            return if nanos.is_multiple_of(1_000_000) {
                write!(f, "{}ms", nanos / 1_000_000)
            } else if nanos.is_multiple_of(1_000) {
                write!(f, "{}us", nanos / 1_000)
            } else {
                write!(f, "{nanos}ns")
            };
        }
        let secs = self.0.as_secs();
        let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
        if h > 0 {
            write!(f, "{h}h")?;
        }
        if m > 0 {
            write!(f, "{m}m")?;
        }
        let sub = self.0.subsec_nanos();
        if sub > 0 {
            let frac = format!("{:09}", sub);
            write!(f, "{s}.{}s", frac.trim_end_matches('0'))
        } else if s > 0 {
            write!(f, "{s}s")
        } else {
            Ok(())
        }
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = Cow::<str>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "maxLength": 32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_style_durations() {
        let cases = [
            ("50ms", StdDuration::from_millis(50)),
            ("5s", StdDuration::from_secs(5)),
            ("1m30s", StdDuration::from_secs(90)),
            ("2h", StdDuration::from_secs(7200)),
            ("1.5s", StdDuration::from_millis(1500)),
            ("100us", StdDuration::from_micros(100)),
            ("10ns", StdDuration::from_nanos(10)),
            ("0", StdDuration::ZERO),
            ("0s", StdDuration::ZERO),
            // The rest of Go's syntax.
            (".5s", StdDuration::from_millis(500)),
            ("1.s", StdDuration::from_secs(1)),
            ("+5s", StdDuration::from_secs(5)),
            ("+0", StdDuration::ZERO),
            ("1h.5m", StdDuration::from_secs(3630)),
            ("3μs", StdDuration::from_micros(3)),
            ("3µs", StdDuration::from_micros(3)),
            ("2562047h", StdDuration::from_secs(2_562_047 * 3600)),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<Duration>().map(|d| d.as_std()), Ok(want), "{text}");
        }
    }

    #[test]
    fn rejects_malformed_durations() {
        for bad in
            ["", "5", "s", "5 s", "5sec", "-5s", "-0", "+", "+-5s", ".s", "1..5s", "1.2.3s", "5d", "1m30", "2562048h"]
        {
            assert!(bad.parse::<Duration>().is_err(), "{bad:?} should be rejected");
        }
        assert!(matches!("2562048h".parse::<Duration>(), Err(DurationParseError::Overflow(_))));
    }

    #[test]
    fn display_round_trips() {
        for text in ["50ms", "5s", "1m30s", "2h", "1.5s", "1h0m1s", "100us", "0s", "1h1m"] {
            let d: Duration = text.parse().unwrap();
            let again: Duration = d.to_string().parse().unwrap();
            assert_eq!(d, again, "{text} -> {d}");
        }
        assert_eq!(Duration::from_secs(90).to_string(), "1m30s");
        assert_eq!(Duration::from_millis(50).to_string(), "50ms");
    }

    #[test]
    fn pattern_agrees_with_parser() {
        // The schema pattern is what the apiserver enforces; the parser must accept exactly the same
        // strings (up to the range limit, which the CEL bounds of every duration field enforce).
        let pattern = regex::Regex::new(DURATION_PATTERN).unwrap();
        let samples = [
            "50ms", "1m30s", "1.5h", "10us", "0", "+0", "0s", ".5s", "1.s", "+5s", "3μs", "3µs", "1h.5m", "", "5", "s",
            "5 s", "5sec", "-5s", "-0", "+", ".s", "1..5s", "1.2.3s", "5d", "1m30", "00", "0.0s", "++5s", "5S",
        ];
        for text in samples {
            assert_eq!(pattern.is_match(text), text.parse::<Duration>().is_ok(), "{text:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn pattern_and_parser_agree_on_generated_strings(text in "[+\\-]?[0-9.]{0,4}(ns|us|µs|μs|ms|s|m|h|x|)([0-9.]{0,3}(s|m|h|))?") {
            let pattern = regex::Regex::new(DURATION_PATTERN).unwrap();
            proptest::prop_assert_eq!(pattern.is_match(&text), text.parse::<Duration>().is_ok(), "{:?}", text);
        }
    }
}
