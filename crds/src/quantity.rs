//! Byte sizes written like Kubernetes quantities ("1Mi", "512Ki", "1M", 1048576).

use std::{borrow::Cow, fmt, str::FromStr};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The string forms the parser reads: a positive number of at most 10 digits without leading zeros
/// (so no value overflows), optionally with a suffix.
pub const BYTE_SIZE_SYNTAX: &str = r"^[1-9][0-9]{0,9}(Ki|Mi|Gi|k|M|G)?$";

/// Pattern the apiserver enforces for the string form: [`BYTE_SIZE_SYNTAX`] restricted to values from
/// 1 byte to 1Gi (per suffix, the numbers whose value is at most 1073741824 bytes). A pattern rather
/// than a CEL rule, because the field is an int or a string and CEL would need a type switch.
pub const BYTE_SIZE_PATTERN: &str = concat!(
    "^(",
    // bytes: 1..=1073741824
    "[1-9][0-9]{0,8}|10[0-6][0-9]{7}|107[0-2][0-9]{6}|1073[0-6][0-9]{5}|10737[0-3][0-9]{4}|1073740[0-9]{3}",
    "|1073741[0-7][0-9]{2}|10737418[01][0-9]|107374182[0-4]",
    // k: 1..=1073741
    "|([1-9][0-9]{0,5}|10[0-6][0-9]{4}|107[0-2][0-9]{3}|1073[0-6][0-9]{2}|10737[0-3][0-9]|107374[01])k",
    // Ki: 1..=1048576
    "|([1-9][0-9]{0,5}|10[0-3][0-9]{4}|104[0-7][0-9]{3}|1048[0-4][0-9]{2}|10485[0-6][0-9]|104857[0-6])Ki",
    // M: 1..=1073, Mi: 1..=1024, G and Gi: 1
    "|([1-9][0-9]{0,2}|10[0-6][0-9]|107[0-3])M|([1-9][0-9]{0,2}|10[01][0-9]|102[0-4])Mi|1G|1Gi",
    ")$"
);

/// A size in bytes. Accepts an integer or a string with a binary (Ki, Mi, Gi) or decimal (k, M, G)
/// suffix; serialises back to the shortest exact string.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(u64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid byte size {0:?}: expected an integer optionally followed by Ki, Mi, Gi, k, M or G (e.g. \"1Mi\")")]
pub struct ByteSizeParseError(String);

impl ByteSize {
    pub const fn bytes(n: u64) -> Self {
        Self(n)
    }

    pub const fn kib(n: u64) -> Self {
        Self(n * 1024)
    }

    pub const fn mib(n: u64) -> Self {
        Self(n * 1024 * 1024)
    }

    pub const fn as_u64(&self) -> u64 {
        self.0
    }
}

const SUFFIXES: [(&str, u64); 6] =
    [("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10), ("G", 1_000_000_000), ("M", 1_000_000), ("k", 1_000)];

impl FromStr for ByteSize {
    type Err = ByteSizeParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ByteSizeParseError(s.to_string());
        let (digits, factor) =
            SUFFIXES.iter().find_map(|(suffix, factor)| s.strip_suffix(suffix).map(|d| (d, *factor))).unwrap_or((s, 1));
        // Same language as BYTE_SIZE_SYNTAX: 1 to 10 digits, the first not 0.
        if digits.is_empty()
            || digits.len() > 10
            || digits.starts_with('0')
            || !digits.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(err());
        }
        let n: u64 = digits.parse().map_err(|_| err())?;
        n.checked_mul(factor).map(Self).ok_or_else(err)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (suffix, factor) in SUFFIXES {
            if self.0 != 0 && self.0.is_multiple_of(factor) {
                return write!(f, "{}{suffix}", self.0 / factor);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw<'a> {
            Int(u64),
            Str(Cow<'a, str>),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Int(n) => Ok(Self(n)),
            Raw::Str(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl JsonSchema for ByteSize {
    fn schema_name() -> Cow<'static, str> {
        "ByteSize".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "x-kubernetes-int-or-string": true,
            // Explicit, so kube's OptionalIntOrString transform does not make a defaulted field nullable.
            "nullable": false,
            // Top-level value validations: `pattern` only applies to the string form and `minimum`
            // only to the integer form (anyOf branches without types would each accept the other).
            "pattern": BYTE_SIZE_PATTERN,
            "maxLength": 12,
            "minimum": 1,
            "maximum": crate::rules::MAX_BATCH_BYTES,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_quantities() {
        assert_eq!("1Mi".parse(), Ok(ByteSize::mib(1)));
        assert_eq!("512Ki".parse(), Ok(ByteSize::kib(512)));
        assert_eq!("1M".parse(), Ok(ByteSize::bytes(1_000_000)));
        assert_eq!("2G".parse(), Ok(ByteSize::bytes(2_000_000_000)));
        assert_eq!("100".parse(), Ok(ByteSize::bytes(100)));
        assert_eq!("9999999999Gi".parse(), Ok(ByteSize::bytes(9_999_999_999 << 30)));
        for bad in ["", "Mi", "1.5Mi", "1mi", "-1", "1 Mi", "1MiB", "0", "0Mi", "01Mi", "99999999999Gi"] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn syntax_agrees_with_parser() {
        let syntax = regex::Regex::new(BYTE_SIZE_SYNTAX).unwrap();
        for text in [
            "1",
            "1Mi",
            "512Ki",
            "1G",
            "1k",
            "9999999999Gi",
            "0",
            "0Mi",
            "01",
            "99999999999",
            "1MB",
            "1mi",
            "",
            "Gi",
            "1.5Mi",
            " 1Mi",
            "+1Mi",
        ] {
            assert_eq!(syntax.is_match(text), text.parse::<ByteSize>().is_ok(), "{text:?}");
        }
    }

    /// Whether the schema pattern admits `text`.
    fn pattern_admits(text: &str) -> bool {
        regex::Regex::new(BYTE_SIZE_PATTERN).unwrap().is_match(text)
    }

    fn parses_within_limit(text: &str) -> bool {
        text.parse::<ByteSize>().is_ok_and(|b| (1..=crate::rules::MAX_BATCH_BYTES).contains(&b.as_u64()))
    }

    #[test]
    fn pattern_is_parse_and_at_most_1gi() {
        let limit = crate::rules::MAX_BATCH_BYTES;
        let mut texts: Vec<String> =
            ["0", "01", "1MB", "", "Gi", "99999999999Gi"].iter().map(|s| s.to_string()).collect();
        let suffixes = [
            ("", 1u64),
            ("k", 1000),
            ("Ki", 1024),
            ("M", 1_000_000),
            ("Mi", 1 << 20),
            ("G", 1_000_000_000),
            ("Gi", 1 << 30),
        ];
        for (suffix, factor) in suffixes {
            let edge = limit / factor;
            for n in [1, 2, 9, 10, 99, 100, 999, 1000, edge.saturating_sub(1), edge, edge + 1, edge * 10, 9_999_999_999]
            {
                texts.push(format!("{n}{suffix}"));
            }
            for digits in 1..=10u32 {
                let p = 10u64.pow(digits);
                for n in [p - 1, p, p + 1] {
                    texts.push(format!("{n}{suffix}"));
                }
            }
        }
        for text in &texts {
            assert_eq!(pattern_admits(text), parses_within_limit(text), "{text:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn pattern_is_parse_and_at_most_1gi_generated(text in "[1-9][0-9]{0,9}(Ki|Mi|Gi|k|M|G|)") {
            proptest::prop_assert_eq!(pattern_admits(&text), parses_within_limit(&text), "{:?}", text);
        }
    }
}
