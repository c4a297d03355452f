//! TUF's date-time: `YYYY-MM-DDTHH:MM:SSZ`, always UTC.
//!
//! Time is an input to the core: callers pass the reference time; nothing here reads a clock.

use time::format_description::BorrowedFormatItem;
use time::macros::format_description;
use time::{OffsetDateTime, PrimitiveDateTime};

const FORMAT: &[BorrowedFormatItem<'static>] = format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");

/// A point in time, UTC, second precision, as metadata records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DateTime(i64);

impl DateTime {
    /// From seconds since the Unix epoch.
    pub fn from_unix(secs: i64) -> Self {
        DateTime(secs)
    }

    /// Seconds since the Unix epoch.
    pub fn unix(self) -> i64 {
        self.0
    }

    /// Parse the strict TUF form. Fractional seconds and offsets other than `Z` are refused.
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = PrimitiveDateTime::parse(s, FORMAT)
            .map_err(|e| format!("`{}` is not YYYY-MM-DDTHH:MM:SSZ ({e})", crate::text::shown(s)))?;
        Ok(DateTime(t.assume_utc().unix_timestamp()))
    }

    /// This time plus `secs` seconds (saturating).
    pub fn plus_secs(self, secs: i64) -> Self {
        DateTime(self.0.saturating_add(secs))
    }
}

impl std::fmt::Display for DateTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match OffsetDateTime::from_unix_timestamp(self.0) {
            Ok(t) => match t.format(FORMAT) {
                Ok(s) => f.write_str(&s),
                Err(_) => write!(f, "@{}", self.0),
            },
            Err(_) => write!(f, "@{}", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let t = DateTime::parse("1985-10-21T01:21:00Z").unwrap();
        assert_eq!(t.unix(), 498_705_660);
        assert_eq!(t.to_string(), "1985-10-21T01:21:00Z");
    }

    #[test]
    fn strict() {
        for bad in [
            "1985-10-21T01:21:00",
            "1985-10-21T01:21:00.5Z",
            "1985-10-21 01:21:00Z",
            "",
        ] {
            assert!(DateTime::parse(bad).is_err(), "{bad}");
        }
    }
}
