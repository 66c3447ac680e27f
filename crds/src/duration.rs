//! A typed duration that is written like Go's `time.ParseDuration` ("50ms", "1m30s", "2h").
//!
//! Kubernetes users already write durations this way, and CEL's `duration()` accepts the same
//! syntax, so schema rules can compare durations server-side.

use std::{borrow::Cow, fmt, str::FromStr, time::Duration as StdDuration};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Regex the apiserver uses to check a duration string (mirrors [`Duration::from_str`]).
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$";

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
        "us" | "µs" => 1_000,
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
        if s == "0" {
            return Ok(Self::ZERO);
        }
        let invalid = || DurationParseError::Invalid(s.to_string());
        let mut total: u128 = 0;
        let mut rest = s;
        while !rest.is_empty() {
            let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(invalid)?;
            if num_len == 0 {
                return Err(invalid());
            }
            let (number, after) = rest.split_at(num_len);
            let unit_len = after.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(after.len());
            let (unit, after) = after.split_at(unit_len);
            let scale = unit_nanos(unit).ok_or_else(invalid)?;
            let (int_part, frac_part) = match number.split_once('.') {
                Some((i, f)) if !i.is_empty() && !f.is_empty() => (i, f),
                Some(_) => return Err(invalid()),
                None => (number, ""),
            };
            let int: u128 = int_part.parse().map_err(|_| DurationParseError::Overflow(s.to_string()))?;
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
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<Duration>().map(|d| d.as_std()), Ok(want), "{text}");
        }
    }

    #[test]
    fn rejects_malformed_durations() {
        for bad in ["", "5", "s", "5 s", "5sec", "-5s", "1.s", ".5s", "5d", "1m30"] {
            assert!(bad.parse::<Duration>().is_err(), "{bad:?} should be rejected");
        }
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
    fn pattern_agrees_with_parser_on_examples() {
        // The schema pattern is what the apiserver enforces; keep it in step with the parser.
        let accepted = ["50ms", "1m30s", "1.5h", "10us"];
        for a in accepted {
            assert!(a.parse::<Duration>().is_ok());
        }
        assert!(DURATION_PATTERN.starts_with('^') && DURATION_PATTERN.ends_with('$'));
    }
}
