//! PostgreSQL write-ahead log positions (`pg_lsn`).
//!
//! An LSN is a 64-bit byte position in the WAL stream, written by PostgreSQL as two hexadecimal
//! halves `X/Y` (high and low 32 bits). It is serialized in JSON as that same string so that
//! status documents read like `psql` output and never lose precision in JavaScript clients.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A WAL position. Ordered like the WAL itself; `Lsn::ZERO` (`0/0`) is PostgreSQL's "invalid".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LsnParseError {
    #[error("failed to parse LSN {input:?}: expected two hexadecimal halves `X/Y`")]
    MissingSlash { input: String },
    #[error("failed to parse LSN {input:?}: {half} half is not a 32-bit hexadecimal number")]
    BadHalf { input: String, half: &'static str },
}

impl Lsn {
    pub const ZERO: Lsn = Lsn(0);

    /// Bytes of WAL from `earlier` up to `self`; 0 when `earlier` is not before `self`
    /// (a replica reported ahead of a stale primary reading is "caught up", not negative).
    pub fn bytes_since(self, earlier: Lsn) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// Signed distance `self - other` in bytes.
    pub fn diff(self, other: Lsn) -> i128 {
        i128::from(self.0) - i128::from(other.0)
    }
}

impl FromStr for Lsn {
    type Err = LsnParseError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let trimmed = input.trim();
        let (high, low) = trimmed
            .split_once('/')
            .ok_or_else(|| LsnParseError::MissingSlash {
                input: input.to_string(),
            })?;
        let parse_half = |text: &str, half: &'static str| {
            if text.is_empty() || text.len() > 8 {
                return Err(LsnParseError::BadHalf {
                    input: input.to_string(),
                    half,
                });
            }
            u32::from_str_radix(text, 16).map_err(|_| LsnParseError::BadHalf {
                input: input.to_string(),
                half,
            })
        };
        let high = parse_half(high, "high")?;
        let low = parse_half(low, "low")?;
        Ok(Lsn((u64::from(high) << 32) | u64::from(low)))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_formats_like_postgres() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!("0/0".parse::<Lsn>().unwrap(), Lsn::ZERO);
        assert_eq!("0/3000148".parse::<Lsn>().unwrap().to_string(), "0/3000148");
    }

    #[test]
    fn rejects_malformed_input() {
        for bad in ["", "16B374D848", "x/1", "1/", "/1", "1/123456789", "1/2/3"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn differences_in_bytes() {
        let a: Lsn = "0/3000000".parse().unwrap();
        let b: Lsn = "1/0".parse().unwrap();
        assert_eq!(b.bytes_since(a), 0x1_0000_0000 - 0x300_0000);
        assert_eq!(a.bytes_since(b), 0);
        assert_eq!(a.diff(b), -(0x1_0000_0000 - 0x300_0000));
        assert!(a < b);
    }

    #[test]
    fn serde_uses_the_postgres_text_form() {
        let lsn: Lsn = "A/FF".parse().unwrap();
        let json = serde_json::to_string(&lsn).unwrap();
        assert_eq!(json, "\"A/FF\"");
        assert_eq!(serde_json::from_str::<Lsn>(&json).unwrap(), lsn);
        assert!(serde_json::from_str::<Lsn>("\"nope\"").is_err());
    }

    proptest! {
        #[test]
        fn display_parse_roundtrip(value: u64) {
            let lsn = Lsn(value);
            prop_assert_eq!(lsn.to_string().parse::<Lsn>().unwrap(), lsn);
        }

        #[test]
        fn order_matches_numeric_order(a: u64, b: u64) {
            prop_assert_eq!(Lsn(a).cmp(&Lsn(b)), a.cmp(&b));
            prop_assert_eq!(Lsn(a).diff(Lsn(b)), i128::from(a) - i128::from(b));
        }
    }
}
