//! The claiming window of `worker --window 22:00-06:00 [--timezone Europe/Berlin]`: a daily span
//! of wall-clock time in a timezone (the machine's by default) during which the worker claims.
//! Outside it nothing is claimed; calls already in flight finish and are recorded.
//!
//! Membership is a pure function of an instant, so it is tested without waiting for a clock.
//! A window may cross midnight (`22:00-06:00` is 22:00 to 24:00 and 00:00 to 06:00). Across a
//! DST change the window follows the wall clock, as a person reading it would expect.

use chrono::{DateTime, NaiveTime, Utc};
use chrono_tz::Tz;

/// Why a window or timezone given on the command line was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("window {0:?} is not HH:MM-HH:MM (e.g. 22:00-06:00)")]
    Syntax(String),
    #[error("window {0:?} starts and ends at the same time; leave --window out to claim always")]
    Empty(String),
    #[error("unknown timezone {0:?}; use an IANA name such as Europe/Berlin or UTC")]
    Timezone(String),
}

/// Where the window's wall clock is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zone {
    /// The machine's local time (`TZ`, `/etc/localtime`).
    Local,
    Named(Tz),
}

/// A daily claiming window: from `start` (inclusive) to `end` (exclusive), wall-clock time in
/// `zone`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: NaiveTime,
    pub end: NaiveTime,
    pub zone: Zone,
}

impl Window {
    /// Parses `HH:MM-HH:MM` (seconds allowed: `HH:MM:SS`) and an optional IANA timezone name.
    pub fn parse(spec: &str, timezone: Option<&str>) -> Result<Window, WindowError> {
        let syntax = || WindowError::Syntax(spec.to_owned());
        let (a, b) = spec.trim().split_once('-').ok_or_else(syntax)?;
        let time = |t: &str| {
            let t = t.trim();
            NaiveTime::parse_from_str(t, "%H:%M")
                .or_else(|_| NaiveTime::parse_from_str(t, "%H:%M:%S"))
                .map_err(|_| syntax())
        };
        let (start, end) = (time(a)?, time(b)?);
        if start == end {
            return Err(WindowError::Empty(spec.to_owned()));
        }
        let zone = match timezone {
            None => Zone::Local,
            Some(name) => Zone::Named(
                name.trim()
                    .parse::<Tz>()
                    .map_err(|_| WindowError::Timezone(name.to_owned()))?,
            ),
        };
        Ok(Window { start, end, zone })
    }

    /// The wall-clock time at `at` in the window's zone.
    pub fn local_time(&self, at: DateTime<Utc>) -> NaiveTime {
        match self.zone {
            Zone::Local => at.with_timezone(&chrono::Local).time(),
            Zone::Named(tz) => at.with_timezone(&tz).time(),
        }
    }

    /// Whether claiming is allowed at `at`.
    pub fn contains(&self, at: DateTime<Utc>) -> bool {
        in_window(self.local_time(at), self.start, self.end)
    }
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let zone = match self.zone {
            Zone::Local => "local time".to_owned(),
            Zone::Named(tz) => tz.name().to_owned(),
        };
        write!(
            f,
            "{}-{} {zone}",
            self.start.format("%H:%M"),
            self.end.format("%H:%M")
        )
    }
}

/// Whether wall-clock time `t` lies in `[start, end)`, the span crossing midnight when `end` is
/// not after `start`.
pub fn in_window(t: NaiveTime, start: NaiveTime, end: NaiveTime) -> bool {
    if start < end {
        start <= t && t < end
    } else {
        t >= start || t < end
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn hm(h: u32, m: u32) -> NaiveTime {
        NaiveTime::from_hms_opt(h, m, 0).unwrap()
    }

    #[test]
    fn windows_may_cross_midnight() {
        let (s, e) = (hm(22, 0), hm(6, 0));
        assert!(in_window(hm(22, 0), s, e));
        assert!(in_window(hm(23, 59), s, e));
        assert!(in_window(hm(0, 0), s, e));
        assert!(in_window(hm(5, 59), s, e));
        assert!(!in_window(hm(6, 0), s, e));
        assert!(!in_window(hm(12, 0), s, e));
        assert!(!in_window(hm(21, 59), s, e));
        let (s, e) = (hm(9, 0), hm(17, 30));
        assert!(in_window(hm(9, 0), s, e));
        assert!(!in_window(hm(17, 30), s, e));
        assert!(!in_window(hm(3, 0), s, e));
    }

    #[test]
    fn membership_follows_the_named_zone() {
        let w = Window::parse("22:00-06:00", Some("Europe/Berlin")).unwrap();
        // 21:30 UTC in winter is 22:30 in Berlin: inside. In summer 20:30 UTC is 22:30.
        assert!(w.contains(Utc.with_ymd_and_hms(2026, 1, 10, 21, 30, 0).unwrap()));
        assert!(!w.contains(Utc.with_ymd_and_hms(2026, 1, 10, 20, 30, 0).unwrap()));
        assert!(w.contains(Utc.with_ymd_and_hms(2026, 7, 10, 20, 30, 0).unwrap()));
        // 05:30 UTC in winter is 06:30 in Berlin: closed.
        assert!(!w.contains(Utc.with_ymd_and_hms(2026, 1, 10, 5, 30, 0).unwrap()));
        assert_eq!(w.to_string(), "22:00-06:00 Europe/Berlin");
    }

    #[test]
    fn bad_windows_and_zones_are_refused() {
        assert!(matches!(
            Window::parse("22-06", None),
            Err(WindowError::Syntax(_))
        ));
        assert!(matches!(
            Window::parse("25:00-06:00", None),
            Err(WindowError::Syntax(_))
        ));
        assert!(matches!(
            Window::parse("06:00-06:00", None),
            Err(WindowError::Empty(_))
        ));
        assert!(matches!(
            Window::parse("22:00-06:00", Some("Mars/Olympus")),
            Err(WindowError::Timezone(_))
        ));
        let w = Window::parse(" 22:00 - 06:00:30 ", Some("UTC")).unwrap();
        assert_eq!(w.end, NaiveTime::from_hms_opt(6, 0, 30).unwrap());
    }
}
