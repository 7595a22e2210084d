//! A backend's hours (`backends[].hours`): when it takes the farm's jobs.
//!
//! Why: a few GPU boxes are often artists' workstations by day and the
//! farm's at night and at weekends. Outside its hours a backend takes no
//! new jobs (those it runs finish, as in a drain), and at their start it
//! takes jobs again by itself, with nobody to enable it at eight in the
//! evening.
//!
//! The hours are in the orchestrator's local time (its `TZ`): one window or
//! several, comma-separated, each `HH:MM-HH:MM` (or `HH:MM:SS`) every day,
//! or after days (`Mon-Fri 20:00-08:00`), or days alone, all day (`Sat-Sun`).
//! A window whose end is before its start runs through midnight
//! (`20:00-08:00`) and belongs to the day it starts: `Fri 20:00-08:00` ends
//! on Saturday morning. Nights and weekends: `Mon-Fri 20:00-08:00, Sat-Sun`
//! (each weekday night, and from Friday evening to Sunday midnight; add
//! `Sun 20:00-08:00` for Sunday night too).

use std::fmt;
use std::str::FromStr;

use chrono::{Datelike, Duration, NaiveDateTime, NaiveTime, Timelike, Weekday};

/// When a backend takes the farm's jobs: any of its windows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hours {
    windows: Vec<Window>,
}

/// One window: a span of the day on some days (every day when `days` is
/// `None`), or whole days (`span` `None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    /// The first and last day, through Sunday when the last comes first
    /// (`Fri-Mon`).
    days: Option<(Weekday, Weekday)>,
    /// Start and end (an end before the start: the next day).
    span: Option<(NaiveTime, NaiveTime)>,
}

impl Window {
    fn on(&self, day: Weekday) -> bool {
        let Some((first, last)) = self.days else {
            return true;
        };
        let (f, l, d) = (
            first.num_days_from_monday(),
            last.num_days_from_monday(),
            day.num_days_from_monday(),
        );
        if f <= l {
            f <= d && d <= l
        } else {
            d >= f || d <= l
        }
    }

    fn contains(&self, at: NaiveDateTime) -> bool {
        let (day, t) = (at.weekday(), at.time());
        match self.span {
            None => self.on(day),
            Some((start, end)) if start < end => self.on(day) && start <= t && t < end,
            Some((start, end)) => (self.on(day) && t >= start) || (self.on(day.pred()) && t < end),
        }
    }

    /// The times of day at which it may begin or end.
    fn edges(&self) -> [NaiveTime; 2] {
        match self.span {
            Some((start, end)) => [start, end],
            None => [NaiveTime::MIN; 2],
        }
    }
}

impl Hours {
    /// Whether local time `at` falls inside (a start included, an end not).
    pub fn contains(&self, at: NaiveDateTime) -> bool {
        self.windows.iter().any(|w| w.contains(at))
    }

    /// How long from `at` until the next time of day at which a window
    /// begins or ends (on some day: the side may stay as it is), so a task
    /// can sleep until a change.
    pub fn until_next_edge(&self, at: NaiveDateTime) -> Duration {
        let t = at.time();
        let until = |edge: NaiveTime| {
            let d = edge.signed_duration_since(t);
            if d <= Duration::zero() {
                d + Duration::days(1)
            } else {
                d
            }
        };
        self.windows
            .iter()
            .flat_map(Window::edges)
            .map(until)
            .min()
            .unwrap_or(Duration::days(1))
    }
}

impl Hours {
    /// When the hours that hold `at`, or else the next ones, end (windows
    /// that meet or overlap count as one: `Fri 20:00-08:00` and `Sat-Sun`
    /// end on Monday at midnight): how long an operator's enable outside
    /// them lends the backend to the farm.
    pub fn next_end(&self, at: NaiveDateTime) -> NaiveDateTime {
        let day = Duration::days(1);
        let mut spans: Vec<(NaiveDateTime, NaiveDateTime)> = Vec::new();
        for n in -1..=8 {
            let date = at.date() + Duration::days(n);
            for w in self.windows.iter().filter(|w| w.on(date.weekday())) {
                let midnight = date.and_time(NaiveTime::MIN);
                spans.push(match w.span {
                    None => (midnight, midnight + day),
                    Some((start, end)) if start < end => (date.and_time(start), date.and_time(end)),
                    Some((start, end)) => (date.and_time(start), (date + day).and_time(end)),
                });
            }
        }
        spans.sort();
        let mut end: Option<NaiveDateTime> = None;
        for (s, e) in spans {
            match end {
                Some(cur) if s <= cur => end = Some(cur.max(e)),
                Some(cur) if cur > at => return cur,
                _ => end = Some(e),
            }
        }
        end.unwrap_or(at + day)
    }
}

impl FromStr for Hours {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let windows = s
            .split(',')
            .map(|w| window(w.trim()).map_err(|why| format!("`{s}`: {why}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Hours { windows })
    }
}

/// One window's text: `[DAYS ]START-END` or `DAYS`.
fn window(w: &str) -> Result<Window, String> {
    let how = "each window is START-END (HH:MM or HH:MM:SS, like 20:00-08:00), after days (Mon-Fri 20:00-08:00) or days alone for all day (Sat-Sun)";
    let (days, span) = match w.split_once(char::is_whitespace) {
        Some((d, t)) => (Some(d), Some(t.trim())),
        None if w.contains(':') => (None, Some(w)),
        None => (Some(w), None),
    };
    let days = days
        .map(|d| {
            let day = |v: &str| {
                v.parse::<Weekday>()
                    .map_err(|_| format!("`{v}` is not a day (Mon, Tue, … Sun); {how}"))
            };
            match d.split_once('-') {
                Some((a, b)) => Ok((day(a)?, day(b)?)),
                None => day(d).map(|one| (one, one)),
            }
        })
        .transpose()?;
    let span = span
        .map(|t| {
            let bad = || format!("`{t}` is not a span of time; {how}");
            let (a, b) = t.split_once('-').ok_or_else(bad)?;
            let time = |v: &str| {
                let v = v.trim();
                NaiveTime::parse_from_str(v, "%H:%M:%S")
                    .or_else(|_| NaiveTime::parse_from_str(v, "%H:%M"))
                    .map_err(|_| bad())
            };
            let (start, end) = (time(a)?, time(b)?);
            if start == end {
                return Err(format!(
                    "`{t}` starts where it ends; leave hours out for a backend that takes jobs at any time"
                ));
            }
            Ok((start, end))
        })
        .transpose()?;
    if days.is_none() && span.is_none() {
        return Err(format!("an empty window; {how}"));
    }
    Ok(Window { days, span })
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |t: NaiveTime| {
            if t.second() == 0 {
                t.format("%H:%M").to_string()
            } else {
                t.format("%H:%M:%S").to_string()
            }
        };
        let mut parts = Vec::new();
        match self.days {
            Some((a, b)) if a == b => parts.push(a.to_string()),
            Some((a, b)) => parts.push(format!("{a}-{b}")),
            None => {}
        }
        if let Some((start, end)) = self.span {
            parts.push(format!("{}-{}", show(start), show(end)));
        }
        f.write_str(&parts.join(" "))
    }
}

impl fmt::Display for Hours {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let windows: Vec<String> = self.windows.iter().map(Window::to_string).collect();
        f.write_str(&windows.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A time on Monday 7 December 2026 (or `days` later).
    fn at(days: i64, s: &str) -> NaiveDateTime {
        let monday = chrono::NaiveDate::from_ymd_opt(2026, 12, 7).unwrap();
        (monday + Duration::days(days)).and_time(NaiveTime::parse_from_str(s, "%H:%M:%S").unwrap())
    }

    fn t(s: &str) -> NaiveDateTime {
        at(0, s)
    }

    #[test]
    fn a_night_window_runs_through_midnight_and_a_day_window_does_not() {
        let night: Hours = "20:00-08:00".parse().unwrap();
        for (when, inside) in [
            ("19:59:59", false),
            ("20:00:00", true),
            ("23:59:59", true),
            ("00:00:00", true),
            ("07:59:59", true),
            ("08:00:00", false),
            ("12:00:00", false),
        ] {
            assert_eq!(night.contains(t(when)), inside, "{when}");
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
    fn weekday_nights_and_whole_weekends() {
        let hours: Hours = "mon-fri 20:00-08:00, Sat-Sun".parse().unwrap();
        assert_eq!(hours.to_string(), "Mon-Fri 20:00-08:00, Sat-Sun");
        for (day, when, inside) in [
            (0, "07:59:59", false), // Monday morning: Sunday all day ended at midnight
            (0, "12:00:00", false),
            (0, "20:00:00", true),
            (1, "07:59:59", true), // Monday's night, on Tuesday
            (1, "08:00:00", false),
            (4, "19:59:59", false), // Friday
            (4, "20:00:00", true),
            (5, "08:00:00", true),  // Saturday: all day
            (6, "23:59:59", true),  // Sunday
            (7, "00:00:00", false), // Monday again
        ] {
            assert_eq!(hours.contains(at(day, when)), inside, "day {day} {when}");
        }
        // A span of days through Sunday, and one day.
        let long: Hours = "Fri-Mon 10:00-12:00, Wed".parse().unwrap();
        assert_eq!(long.to_string(), "Fri-Mon 10:00-12:00, Wed");
        assert!(long.contains(at(0, "10:00:00")) && long.contains(at(6, "11:00:00")));
        assert!(!long.contains(at(1, "11:00:00")) && long.contains(at(2, "11:00:00")));
        // A night that begins on Sunday ends on Monday morning.
        let sunday: Hours = "Sun 20:00-08:00".parse().unwrap();
        assert!(sunday.contains(at(0, "07:00:00")) && !sunday.contains(at(0, "21:00:00")));
        assert!(sunday.contains(at(6, "21:00:00")));
    }

    #[test]
    fn the_next_edge_is_the_nearest_start_or_end() {
        let night: Hours = "20:00-08:00".parse().unwrap();
        assert_eq!(night.until_next_edge(t("19:00:00")), Duration::hours(1));
        assert_eq!(night.until_next_edge(t("20:00:00")), Duration::hours(12));
        assert_eq!(night.until_next_edge(t("23:00:00")), Duration::hours(9));
        assert_eq!(night.until_next_edge(t("08:00:00")), Duration::hours(12));
        // Whole days change at midnight.
        let weekend: Hours = "Mon-Fri 20:00-08:00, Sat-Sun".parse().unwrap();
        assert_eq!(weekend.until_next_edge(t("21:00:00")), Duration::hours(3));
    }

    #[test]
    fn hours_lent_early_end_with_the_next_hours() {
        let night: Hours = "20:00-08:00".parse().unwrap();
        assert_eq!(night.next_end(at(0, "17:00:00")), at(1, "08:00:00"));
        assert_eq!(night.next_end(at(0, "21:00:00")), at(1, "08:00:00"));
        assert_eq!(night.next_end(at(1, "07:00:00")), at(1, "08:00:00"));
        // Friday's night runs into the weekend: one stretch, to Monday.
        let weekend: Hours = "Mon-Fri 20:00-08:00, Sat-Sun".parse().unwrap();
        assert_eq!(weekend.next_end(at(4, "17:00:00")), at(7, "00:00:00"));
        assert_eq!(weekend.next_end(at(0, "17:00:00")), at(1, "08:00:00"));
        let wednesday: Hours = "Wed 10:00-12:00".parse().unwrap();
        assert_eq!(wednesday.next_end(at(3, "13:00:00")), at(9, "12:00:00"));
    }

    #[test]
    fn a_window_that_cannot_be_read_says_how_to_write_one() {
        for bad in [
            "20:00",
            "8pm-8am",
            "25:00-08:00",
            "20:00-20:00",
            "Mon-Fry 20:00-08:00",
            "Sat-Sun,",
            "Mon 20:00",
        ] {
            let e = bad.parse::<Hours>().unwrap_err();
            assert!(e.contains(bad), "{e}");
            assert!(
                e.contains("Mon-Fri 20:00-08:00") || e.contains("starts where it ends"),
                "{e}"
            );
        }
        assert!("20:00-20:00"
            .parse::<Hours>()
            .unwrap_err()
            .contains("starts where it ends"));
        assert!("Mon-Fry 20:00-08:00"
            .parse::<Hours>()
            .unwrap_err()
            .contains("`Fry` is not a day"));
    }
}
