use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written the way Kubernetes and Go write them: `30s`, `2m`, `1h30m`, `500ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct GoDuration(pub Duration);

impl GoDuration {
    /// The duration.
    pub fn get(self) -> Duration {
        self.0
    }

    /// Parse `1h30m`, `45s`, `250ms`, `0s`. Units: h, m, s, ms, us, ns. No sign, no spaces.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not a duration (expected e.g. 30s, 2m, 1h30m, 500ms)");
        if text.is_empty() {
            return Err(bad());
        }
        let mut total = Duration::ZERO;
        let mut rest = text;
        while !rest.is_empty() {
            let digits = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            if digits == 0 {
                return Err(bad());
            }
            let value: u64 = rest[..digits].parse().map_err(|_| bad())?;
            rest = &rest[digits..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            let unit = &rest[..unit_len];
            rest = &rest[unit_len..];
            let part = match unit {
                "h" => value.checked_mul(3600).map(Duration::from_secs),
                "m" => value.checked_mul(60).map(Duration::from_secs),
                "s" => Some(Duration::from_secs(value)),
                "ms" => Some(Duration::from_millis(value)),
                "us" | "µs" => Some(Duration::from_micros(value)),
                "ns" => Some(Duration::from_nanos(value)),
                _ => None,
            }
            .ok_or_else(bad)?;
            total = total.checked_add(part).ok_or_else(bad)?;
        }
        Ok(Self(total))
    }
}

impl fmt::Display for GoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.subsec_nanos() != 0 {
            return write!(f, "{}ms", d.as_millis());
        }
        let secs = d.as_secs();
        let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
        if h > 0 {
            write!(f, "{h}h")?;
        }
        if m > 0 {
            write!(f, "{m}m")?;
        }
        if s > 0 || secs == 0 {
            write!(f, "{s}s")?;
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        GoDuration::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl Serialize for GoDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations() {
        assert_eq!(
            GoDuration::parse("30s").unwrap().get(),
            Duration::from_secs(30)
        );
        assert_eq!(
            GoDuration::parse("1h30m").unwrap().get(),
            Duration::from_secs(5400)
        );
        assert_eq!(
            GoDuration::parse("250ms").unwrap().get(),
            Duration::from_millis(250)
        );
        assert_eq!(GoDuration::parse("0s").unwrap().get(), Duration::ZERO);
        for bad in [
            "",
            "30",
            "s",
            "-1s",
            "1x",
            "1.5s",
            " 1s",
            "99999999999999999999h",
        ] {
            assert!(GoDuration::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn displays_round_trip() {
        for text in ["30s", "1h30m", "2m", "0s", "250ms", "1h0m5s"] {
            let d = GoDuration::parse(text).unwrap();
            assert_eq!(GoDuration::parse(&d.to_string()).unwrap(), d);
        }
        assert_eq!(GoDuration::parse("90s").unwrap().to_string(), "1m30s");
    }
}
