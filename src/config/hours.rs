//! A backend's hours (`backends[].hours`): when it takes the farm's jobs.
//!
//! Why: a few GPU boxes are often artists' workstations by day and the
//! farm's at night. Outside its hours a backend takes no new jobs (those it
//! runs finish, as in a drain), and at their start it takes jobs again by
//! itself, with nobody to enable it at eight in the evening.
//!
//! The window is in the orchestrator's local time (its `TZ`), `HH:MM` or
//! `HH:MM:SS`, start to end; a window whose end is before its start runs
//! through midnight (`20:00-08:00`).

use std::fmt;
use std::str::FromStr;

use chrono::{Duration, NaiveTime, Timelike};

/// A daily window of local time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hours {
    /// When it starts.
    pub start: NaiveTime,
    /// When it ends (before `start`: the next day).
    pub end: NaiveTime,
}

impl Hours {
    /// Whether `t` falls inside (the start included, the end not).
    pub fn contains(&self, t: NaiveTime) -> bool {
        if self.start < self.end {
            self.start <= t && t < self.end
        } else {
            t >= self.start || t < self.end
        }
    }

    /// How long from `t` until the window's next edge (its start or its
    /// end), so a task can sleep until the change.
    pub fn until_next_edge(&self, t: NaiveTime) -> Duration {
        let day = Duration::days(1);
        let until = |edge: NaiveTime| {
            let d = edge.signed_duration_since(t);
            if d <= Duration::zero() {
                d + day
            } else {
                d
            }
        };
        until(self.start).min(until(self.end))
    }
}

impl FromStr for Hours {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "`{s}`: must be a window of local time as START-END, each HH:MM or HH:MM:SS, like 20:00-08:00"
            )
        };
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let time = |v: &str| {
            let v = v.trim();
            NaiveTime::parse_from_str(v, "%H:%M:%S")
                .or_else(|_| NaiveTime::parse_from_str(v, "%H:%M"))
                .map_err(|_| bad())
        };
        let hours = Hours {
            start: time(a)?,
            end: time(b)?,
        };
        if hours.start == hours.end {
            return Err(format!(
                "`{s}`: starts where it ends; leave hours out for a backend that takes jobs at any time"
            ));
        }
        Ok(hours)
    }
}

impl fmt::Display for Hours {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |t: NaiveTime| {
            if t.second() == 0 {
                t.format("%H:%M").to_string()
            } else {
                t.format("%H:%M:%S").to_string()
            }
        };
        write!(f, "{}-{}", show(self.start), show(self.end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> NaiveTime {
        NaiveTime::parse_from_str(s, "%H:%M:%S").unwrap()
    }

    #[test]
    fn a_night_window_runs_through_midnight_and_a_day_window_does_not() {
        let night: Hours = "20:00-08:00".parse().unwrap();
        for (at, inside) in [
            ("19:59:59", false),
            ("20:00:00", true),
            ("23:59:59", true),
            ("00:00:00", true),
            ("07:59:59", true),
            ("08:00:00", false),
            ("12:00:00", false),
        ] {
            assert_eq!(night.contains(t(at)), inside, "{at}");
        }
        let day: Hours = "09:30-17:45:30".parse().unwrap();
        assert!(!day.contains(t("09:29:59")));
        assert!(day.contains(t("09:30:00")));
        assert!(day.contains(t("17:45:29")));
        assert!(!day.contains(t("17:45:30")));
        assert_eq!(day.to_string(), "09:30-17:45:30");
        assert_eq!(night.to_string(), "20:00-08:00");
    }

    #[test]
    fn the_next_edge_is_the_nearer_of_the_start_and_the_end() {
        let night: Hours = "20:00-08:00".parse().unwrap();
        assert_eq!(night.until_next_edge(t("19:00:00")), Duration::hours(1));
        assert_eq!(night.until_next_edge(t("20:00:00")), Duration::hours(12));
        assert_eq!(night.until_next_edge(t("23:00:00")), Duration::hours(9));
        assert_eq!(night.until_next_edge(t("08:00:00")), Duration::hours(12));
    }

    #[test]
    fn a_window_that_cannot_be_read_says_how_to_write_one() {
        for bad in ["20:00", "8pm-8am", "25:00-08:00", "20:00-20:00"] {
            let e = bad.parse::<Hours>().unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
        assert!("20:00-20:00"
            .parse::<Hours>()
            .unwrap_err()
            .contains("starts where it ends"));
    }
}
