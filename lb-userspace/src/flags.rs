//! Values of the agent's flags that are more than a number or a string:
//! parsed by clap through these, so that a bad value is rejected with the
//! flag's name before anything starts.

use std::{fmt, num::ParseIntError, str::FromStr, time::Duration};

/// Whole seconds, at least one (a zero interval would spin).
pub fn seconds_at_least_one(text: &str) -> Result<Duration, ParseIntError> {
    Ok(Duration::from_secs(text.parse::<u64>()?.max(1)))
}

/// Whole seconds, as the nanoseconds flow timestamps are kept in.
pub fn seconds_as_nanoseconds(text: &str) -> Result<u64, ParseIntError> {
    Ok(text.parse::<u64>()? * 1_000_000_000)
}

/// A range of ports, `MIN-MAX`, both ends included, `1 <= MIN <= MAX`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

/// Why a port range did not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PortRangeError {
    #[error("{0:?}: expected MIN-MAX")]
    NoDash(String),
    #[error("{text:?}: {error}")]
    Number { text: String, error: ParseIntError },
    #[error("{0:?}: need 1 <= MIN <= MAX")]
    Order(String),
}

impl FromStr for PortRange {
    type Err = PortRangeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (min, max) = text
            .split_once('-')
            .ok_or_else(|| PortRangeError::NoDash(text.to_owned()))?;
        let number = |part: &str| {
            part.trim()
                .parse::<u16>()
                .map_err(|error| PortRangeError::Number {
                    text: text.to_owned(),
                    error,
                })
        };
        let (min, max) = (number(min)?, number(max)?);
        if min == 0 || min > max {
            return Err(PortRangeError::Order(text.to_owned()));
        }
        Ok(PortRange { min, max })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_need_two_ordered_ports_from_one() {
        assert_eq!(
            "32768-60999".parse(),
            Ok(PortRange {
                min: 32768,
                max: 60999
            })
        );
        assert_eq!(
            " 40000 - 40000".parse(),
            Ok(PortRange {
                min: 40000,
                max: 40000
            })
        );
        for bad in ["", "40000", "0-10", "20-10", "1-70000", "a-b"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn intervals_are_at_least_one_second() {
        assert_eq!(seconds_at_least_one("0"), Ok(Duration::from_secs(1)));
        assert_eq!(seconds_at_least_one("10"), Ok(Duration::from_secs(10)));
        assert!(seconds_at_least_one("-1").is_err());
        assert_eq!(seconds_as_nanoseconds("30"), Ok(30_000_000_000));
    }
}
