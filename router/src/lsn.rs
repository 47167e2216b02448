//! WAL positions and the read-your-writes token built from them.

use std::fmt;
use std::str::FromStr;

use serde::{Serialize, Serializer};

/// A PostgreSQL WAL position (`pg_lsn`), e.g. `0/3000148`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

/// A text that is not a `pg_lsn`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("failed to parse WAL position {text:?}: expected two hexadecimal numbers as HI/LO")]
pub struct LsnParseError {
    pub text: String,
}

impl FromStr for Lsn {
    type Err = LsnParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = || LsnParseError {
            text: text.to_owned(),
        };
        let (high, low) = text.trim().split_once('/').ok_or_else(error)?;
        let high = u32::from_str_radix(high, 16).map_err(|_| error())?;
        let low = u32::from_str_radix(low, 16).map_err(|_| error())?;
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

impl Lsn {
    /// Bytes from `older` to `self`, 0 when `older` is already ahead.
    pub fn bytes_after(self, older: Lsn) -> u64 {
        self.0.saturating_sub(older.0)
    }
}

/// Read-your-writes token: the primary's WAL insert position right after a write committed.
///
/// Its text form (`Display`/`FromStr`, e.g. `0/3000148`) is meant for a cookie or a header, so
/// that causal reads work across application instances. LSNs keep growing across a promotion
/// (a new timeline continues the numbering), so a token stays meaningful after failover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct WalToken(pub Lsn);

impl fmt::Display for WalToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for WalToken {
    type Err = LsnParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        text.parse().map(WalToken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_round_trip() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!("0/0".parse::<Lsn>().unwrap(), Lsn(0));
    }

    #[test]
    fn rejects_garbage() {
        assert!("16B374D848".parse::<Lsn>().is_err());
        assert!("x/1".parse::<Lsn>().is_err());
        assert!("1/100000000".parse::<Lsn>().is_err());
    }

    #[test]
    fn byte_distance_saturates() {
        assert_eq!(Lsn(100).bytes_after(Lsn(40)), 60);
        assert_eq!(Lsn(40).bytes_after(Lsn(100)), 0);
    }
}
