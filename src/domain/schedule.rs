//! Payout schedules and their periods. Pure: `now` is always passed in.
//!
//! A schedule cuts time into half-open periods `[start, end)` at 00:00 UTC:
//! daily, weekly on a weekday, bi-weekly on a weekday (every other week,
//! counted from the week of 1970-01-05), monthly on a day of the month (1-28,
//! so every month has it), every N days from an anchor date, or manual (no periods: an operator closes one by
//! running `payoutctl settle --payee X`). A period is *closed* once `now`
//! has reached its end; settlement pays every closed period, one by one, in
//! order ([`Schedule::next_period`]).
//!
//! **Per earning** (`per_earning`, the booking worker's release per
//! booking): every instant is its own period, one microsecond long (the
//! database's resolution), so an earning's period closes the moment it is
//! released, not at the next boundary; settlement pays such a payee one
//! earning per payout (the earliest released first, see
//! `services::settlement`), even when several share an instant.

use std::{fmt, str::FromStr};

use chrono::{
    DateTime, Datelike, Days, DurationRound, Months, NaiveDate, TimeDelta, TimeZone, Utc, Weekday,
};
use serde::{Deserialize, Serialize};

/// When a payee is paid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Schedule {
    /// Every day.
    Daily,
    /// Every week; periods start on this weekday.
    Weekly(Weekday),
    /// Every other week; periods start on this weekday.
    BiWeekly(Weekday),
    /// Every month; periods start on this day of the month (1-28).
    Monthly(u32),
    /// Every `days` days, periods starting at 00:00 UTC on `anchor` (and
    /// every `days` days before and after it): `every:<days>:<YYYY-MM-DD>`.
    Every {
        /// Length of a period in days (1..=366).
        days: u32,
        /// A date on which a period starts.
        anchor: NaiveDate,
    },
    /// One payout per earning, due the moment it is released: periods are
    /// single instants (one microsecond).
    PerEarning,
    /// Only when an operator settles the payee by hand.
    Manual,
}

/// A half-open interval of time `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Period {
    /// First instant of the period.
    pub start: DateTime<Utc>,
    /// First instant after the period.
    pub end: DateTime<Utc>,
}

impl Period {
    /// Whether `t` lies in the period.
    pub fn contains(&self, t: DateTime<Utc>) -> bool {
        self.start <= t && t < self.end
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} .. {}",
            self.start.format("%Y-%m-%dT%H:%MZ"),
            self.end.format("%Y-%m-%dT%H:%MZ")
        )
    }
}

/// Why a schedule was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// Not a schedule at all.
    #[error(
        "schedule {0:?} is not one of daily, weekly:<mon..sun>, biweekly:<mon..sun>, monthly:<1..28>, every:<days>:<YYYY-MM-DD>, per_earning, manual"
    )]
    Unknown(String),
    /// A custom schedule with a bad number of days.
    #[error("schedule {0:?}: the number of days must be between 1 and 366")]
    Days(String),
}

fn midnight(d: NaiveDate) -> DateTime<Utc> {
    Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).expect("midnight exists"))
}

/// The Monday bi-weekly periods count from.
fn biweekly_anchor(wd: Weekday) -> NaiveDate {
    NaiveDate::from_ymd_opt(1970, 1, 5).expect("valid date")
        + Days::new(u64::from(wd.num_days_from_monday()))
}

impl Schedule {
    /// The period containing `t`; `None` for a manual schedule.
    pub fn period_containing(&self, t: DateTime<Utc>) -> Option<Period> {
        let date = t.date_naive();
        let (start, end) = match *self {
            Schedule::Manual => return None,
            Schedule::PerEarning => {
                let start = t.duration_trunc(TimeDelta::microseconds(1)).unwrap_or(t);
                return Some(Period {
                    start,
                    end: start + TimeDelta::microseconds(1),
                });
            }
            Schedule::Daily => (date, date + Days::new(1)),
            Schedule::Weekly(wd) => {
                let back =
                    (7 + date.weekday().num_days_from_monday() - wd.num_days_from_monday()) % 7;
                let start = date - Days::new(u64::from(back));
                (start, start + Days::new(7))
            }
            Schedule::BiWeekly(wd) => {
                let anchor = biweekly_anchor(wd);
                let cycles = (date - anchor).num_days().div_euclid(14);
                let start = anchor + chrono::Duration::days(cycles * 14);
                (start, start + Days::new(14))
            }
            Schedule::Every { days, anchor } => {
                let n = i64::from(days.max(1));
                let cycles = (date - anchor).num_days().div_euclid(n);
                let start = anchor + chrono::Duration::days(cycles * n);
                (start, start + chrono::Duration::days(n))
            }
            Schedule::Monthly(day) => {
                let this_month = date
                    .with_day(day)
                    .expect("day 1..=28 exists in every month");
                let start = if date.day() >= day {
                    this_month
                } else {
                    this_month - Months::new(1)
                };
                (start, start + Months::new(1))
            }
        };
        Some(Period {
            start: midnight(start),
            end: midnight(end),
        })
    }

    /// The latest period that has ended at or before `now`; `None` for manual.
    pub fn last_closed(&self, now: DateTime<Utc>) -> Option<Period> {
        let open = self.period_containing(now)?;
        self.period_containing(open.start - chrono::Duration::nanoseconds(1))
    }

    /// The next period to settle, given the end of the last settled one
    /// (`after`) and the earliest time something became payable (`first`):
    /// the period containing the later of the two, starting no earlier than
    /// `after`. After a manual settlement or a change of schedule `after` may
    /// fall inside a period: the next one then runs from `after` to that
    /// period's end, so periods never overlap and none is skipped. `None`
    /// for manual. A function of its arguments only: never of when it is asked.
    pub fn next_period(
        &self,
        after: Option<DateTime<Utc>>,
        first: DateTime<Utc>,
    ) -> Option<Period> {
        let t = after.map_or(first, |a| a.max(first));
        let p = self.period_containing(t)?;
        let start = after.map_or(p.start, |a| a.max(p.start));
        Some(Period { start, end: p.end })
    }

    /// Whether periods close by themselves (everything but manual).
    pub fn is_automatic(&self) -> bool {
        !matches!(self, Schedule::Manual)
    }
}

fn weekday_name(wd: Weekday) -> &'static str {
    match wd {
        Weekday::Mon => "mon",
        Weekday::Tue => "tue",
        Weekday::Wed => "wed",
        Weekday::Thu => "thu",
        Weekday::Fri => "fri",
        Weekday::Sat => "sat",
        Weekday::Sun => "sun",
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Daily => f.write_str("daily"),
            Schedule::Weekly(wd) => write!(f, "weekly:{}", weekday_name(*wd)),
            Schedule::BiWeekly(wd) => write!(f, "biweekly:{}", weekday_name(*wd)),
            Schedule::Monthly(d) => write!(f, "monthly:{d}"),
            Schedule::Every { days, anchor } => {
                write!(f, "every:{days}:{}", anchor.format("%Y-%m-%d"))
            }
            Schedule::PerEarning => f.write_str("per_earning"),
            Schedule::Manual => f.write_str("manual"),
        }
    }
}

impl FromStr for Schedule {
    type Err = ScheduleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ScheduleError::Unknown(s.to_string());
        let lower = s.trim().to_ascii_lowercase();
        let (kind, arg) = match lower.split_once(':') {
            Some((k, a)) => (k, Some(a)),
            None => (lower.as_str(), None),
        };
        let weekday = |a: Option<&str>| -> Result<Weekday, ScheduleError> {
            a.and_then(|a| a.parse::<Weekday>().ok()).ok_or_else(bad)
        };
        match kind {
            "daily" if arg.is_none() => Ok(Schedule::Daily),
            "manual" if arg.is_none() => Ok(Schedule::Manual),
            "per_earning" | "per-earning" if arg.is_none() => Ok(Schedule::PerEarning),
            "weekly" => Ok(Schedule::Weekly(weekday(arg)?)),
            "biweekly" | "bi-weekly" => Ok(Schedule::BiWeekly(weekday(arg)?)),
            "every" => {
                let (n, date) = arg.and_then(|a| a.split_once(':')).ok_or_else(bad)?;
                let days: u32 = n.parse().map_err(|_| bad())?;
                if !(1..=366).contains(&days) {
                    return Err(ScheduleError::Days(s.to_string()));
                }
                let anchor = NaiveDate::parse_from_str(date, "%Y-%m-%d").map_err(|_| bad())?;
                Ok(Schedule::Every { days, anchor })
            }
            "monthly" => {
                let day: u32 = arg.and_then(|a| a.parse().ok()).ok_or_else(bad)?;
                if (1..=28).contains(&day) {
                    Ok(Schedule::Monthly(day))
                } else {
                    Err(bad())
                }
            }
            _ => Err(bad()),
        }
    }
}

impl TryFrom<String> for Schedule {
    type Error = ScheduleError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Schedule> for String {
    fn from(s: Schedule) -> String {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn schedules_parse_and_print_the_same() {
        for s in [
            "daily",
            "weekly:fri",
            "biweekly:mon",
            "monthly:1",
            "monthly:28",
            "every:10:2026-11-02",
            "per_earning",
            "manual",
        ] {
            assert_eq!(s.parse::<Schedule>().unwrap().to_string(), s);
        }
        assert_eq!(
            "Weekly:Friday".parse::<Schedule>(),
            Ok(Schedule::Weekly(Weekday::Fri))
        );
        for bad in [
            "weekly",
            "monthly:29",
            "monthly:0",
            "hourly",
            "daily:1",
            "weekly:fun",
            "every:10",
            "every:x:2026-11-02",
            "every:10:2026-13-01",
        ] {
            assert!(bad.parse::<Schedule>().is_err(), "{bad}");
        }
        assert_eq!(
            "every:0:2026-11-02"
                .parse::<Schedule>()
                .unwrap_err()
                .to_string(),
            "schedule \"every:0:2026-11-02\": the number of days must be between 1 and 366"
        );
    }

    #[test]
    fn weekly_periods_start_on_the_weekday_at_midnight_utc() {
        // 2026-11-25 is a Wednesday.
        let s = Schedule::Weekly(Weekday::Fri);
        let p = s.period_containing(at("2026-11-25T13:00:00Z")).unwrap();
        assert_eq!(p.start, at("2026-11-20T00:00:00Z"));
        assert_eq!(p.end, at("2026-11-27T00:00:00Z"));
        let closed = s.last_closed(at("2026-11-25T13:00:00Z")).unwrap();
        assert_eq!(closed.end, p.start);
        assert_eq!(closed.start, at("2026-11-13T00:00:00Z"));
        // At the boundary itself the period just ended is closed.
        let on = s.last_closed(at("2026-11-27T00:00:00Z")).unwrap();
        assert_eq!(on.end, at("2026-11-27T00:00:00Z"));
    }

    #[test]
    fn daily_biweekly_and_monthly_periods() {
        let t = at("2026-03-10T08:00:00Z");
        let d = Schedule::Daily.period_containing(t).unwrap();
        assert_eq!(
            (d.start, d.end),
            (at("2026-03-10T00:00:00Z"), at("2026-03-11T00:00:00Z"))
        );
        let b = Schedule::BiWeekly(Weekday::Mon)
            .period_containing(t)
            .unwrap();
        assert_eq!((b.end - b.start).num_days(), 14);
        assert_eq!(b.start.weekday(), Weekday::Mon);
        assert!(b.contains(t));
        let next = Schedule::BiWeekly(Weekday::Mon)
            .period_containing(b.end)
            .unwrap();
        assert_eq!(next.start, b.end);
        let m = Schedule::Monthly(15).period_containing(t).unwrap();
        assert_eq!(
            (m.start, m.end),
            (at("2026-02-15T00:00:00Z"), at("2026-03-15T00:00:00Z"))
        );
        let m1 = Schedule::Monthly(1)
            .last_closed(at("2026-01-01T00:00:00Z"))
            .unwrap();
        assert_eq!(
            (m1.start, m1.end),
            (at("2025-12-01T00:00:00Z"), at("2026-01-01T00:00:00Z"))
        );
        assert_eq!(Schedule::Manual.last_closed(t), None);
    }

    #[test]
    fn consecutive_periods_tile_time_without_gaps() {
        for s in [
            Schedule::Daily,
            Schedule::Weekly(Weekday::Sun),
            Schedule::BiWeekly(Weekday::Thu),
            Schedule::Monthly(28),
            "every:10:2026-11-02".parse().unwrap(),
        ] {
            let mut p = s.period_containing(at("2025-12-30T12:00:00Z")).unwrap();
            for _ in 0..40 {
                let next = s.period_containing(p.end).unwrap();
                assert_eq!(next.start, p.end, "{s}");
                assert!(next.end > next.start);
                p = next;
            }
        }
    }

    #[test]
    fn the_next_period_follows_the_last_settled_one_whenever_it_is_asked() {
        let s = Schedule::Weekly(Weekday::Fri);
        let first = at("2026-11-08T10:00:00Z");
        let p = s.next_period(None, first).unwrap();
        assert_eq!(
            (p.start, p.end),
            (at("2026-11-06T00:00:00Z"), at("2026-11-13T00:00:00Z"))
        );
        // Work released before the last settled end belongs to the next period.
        let q = s.next_period(Some(p.end), first).unwrap();
        assert_eq!((q.start, q.end), (p.end, at("2026-11-20T00:00:00Z")));
        // Empty periods are skipped to the one holding the work.
        let r = s
            .next_period(Some(p.end), at("2026-11-28T00:00:00Z"))
            .unwrap();
        assert_eq!(r.start, at("2026-11-27T00:00:00Z"));
        // After a manual settlement mid-week, the rest of the week.
        let m = s
            .next_period(Some(at("2026-11-15T00:00:00Z")), first)
            .unwrap();
        assert_eq!(
            (m.start, m.end),
            (at("2026-11-15T00:00:00Z"), at("2026-11-20T00:00:00Z"))
        );
        assert_eq!(Schedule::Manual.next_period(None, first), None);
    }

    #[test]
    fn a_custom_schedule_cuts_periods_of_n_days_from_its_anchor() {
        let s: Schedule = "every:10:2026-11-02".parse().unwrap();
        let p = s.period_containing(at("2026-11-13T05:00:00Z")).unwrap();
        assert_eq!(
            (p.start, p.end),
            (at("2026-11-12T00:00:00Z"), at("2026-11-22T00:00:00Z"))
        );
        let before = s.period_containing(at("2026-10-30T00:00:00Z")).unwrap();
        assert_eq!(before.start, at("2026-10-23T00:00:00Z"));
    }

    #[test]
    fn per_earning_periods_are_single_instants_that_close_at_the_release() {
        let s: Schedule = "per_earning".parse().unwrap();
        let released = at("2026-11-13T05:00:00.123456789Z");
        let p = s.period_containing(released).unwrap();
        assert_eq!(p.start, at("2026-11-13T05:00:00.123456Z"));
        assert_eq!(p.end, at("2026-11-13T05:00:00.123457Z"));
        assert!(p.contains(released));
        // Not the next daily boundary: closed one microsecond after the release.
        assert_eq!(s.last_closed(p.end), Some(p));
        // After a settled instant, the next one is the work's own instant...
        let later = at("2026-11-14T09:30:00Z");
        let q = s.next_period(Some(p.end), later).unwrap();
        assert_eq!(q.start, later);
        // ... or, for work released before it (a late import), the instant right after.
        let r = s.next_period(Some(p.end), released).unwrap();
        assert_eq!(r.start, p.end);
        assert!(s.is_automatic());
    }
}
