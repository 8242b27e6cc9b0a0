//! `policies/warmup.yaml`: daily volume ramps for new source IPs, and the
//! counting that keeps a source to its ramp at each receiving site.
//!
//! A source's day at a site advances with each day it sent there
//! (`sending_days`) or with the calendar from its start (`calendar_days`).
//! A day whose deferral or bounce rate exceeded `hold_on` does not advance.
//! After the ramp's last day the source is warm and only shaping applies.

use std::collections::BTreeMap;

use anyhow::bail;
use serde::{Deserialize, Serialize};

/// Minimum outcomes in a day before its rates can hold the schedule back,
/// because a few deferrals among ten messages are noise.
pub const HOLD_MIN_ATTEMPTS: u64 = 20;

const DAY: u64 = 86_400;
const HOUR: u64 = 3_600;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Advance {
    #[default]
    SendingDays,
    CalendarDays,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Spread {
    Hourly,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoldOn {
    pub deferral_rate_above: Option<f64>,
    pub bounce_rate_above: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    #[serde(default)]
    pub advance: Advance,
    /// Messages per source IP per site, day 1 first.
    pub daily: Vec<u64>,
    /// Ramps for named sites (shaping's provider names or domains).
    #[serde(default)]
    pub sites: BTreeMap<String, Vec<u64>>,
    #[serde(default)]
    pub spread: Option<Spread>,
    #[serde(default)]
    pub hold_on: HoldOn,
    /// IANA time zone whose midnight ends a day, such as `America/New_York`;
    /// UTC when absent.
    #[serde(default)]
    pub timezone: Option<String>,
    #[serde(skip)]
    zone: Option<jiff::tz::TimeZone>,
}

/// Calendar position of an instant in a schedule's time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    /// Local date, in days since 1970-01-01.
    pub today: i64,
    /// Local hour, 0 to 23.
    pub hour: u64,
    /// Start of the next local day and hour, in seconds since the Unix epoch.
    pub next_day: u64,
    pub next_hour: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WarmupFile {
    #[serde(default)]
    schedules: BTreeMap<String, Schedule>,
}

/// The schedules of `warmup.yaml`, by name.
#[derive(Debug, Clone, Default)]
pub struct Schedules(BTreeMap<String, Schedule>);

impl Schedules {
    pub fn parse(text: &str) -> anyhow::Result<Schedules> {
        if text.trim().is_empty() {
            return Ok(Schedules::default());
        }
        let mut file: WarmupFile = serde_norway::from_str(text)?;
        for (name, schedule) in file.schedules.iter_mut() {
            if let Some(zone) = &schedule.timezone {
                let found = jiff::tz::TimeZone::get(zone).map_err(|error| {
                    anyhow::anyhow!("schedule {name:?}: unknown timezone {zone:?} ({error}); use an IANA name such as Europe/Berlin")
                })?;
                schedule.zone = Some(found);
            }
        }
        for (name, schedule) in &file.schedules {
            let ramps = std::iter::once(("daily".to_string(), &schedule.daily))
                .chain(schedule.sites.iter().map(|(site, ramp)| (format!("sites.{site}"), ramp)));
            for (field, ramp) in ramps {
                if ramp.is_empty() || ramp.contains(&0) {
                    bail!("schedule {name:?}: `{field}` must list at least one day, each above 0");
                }
            }
            for (field, rate) in [
                ("deferral_rate_above", schedule.hold_on.deferral_rate_above),
                ("bounce_rate_above", schedule.hold_on.bounce_rate_above),
            ] {
                if rate.is_some_and(|rate| !(0.0..1.0).contains(&rate)) {
                    bail!("schedule {name:?}: `hold_on.{field}` must be a fraction from 0 to 1, such as 0.10");
                }
            }
        }
        Ok(Schedules(file.schedules))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    pub fn get(&self, name: &str) -> Option<&Schedule> {
        self.0.get(name)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

/// Counters of one source at one site, kept in the spool.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    /// Day the daily counts belong to, in days since the Unix epoch (UTC).
    pub date: i64,
    /// Messages handed to this source for the site on `date`.
    pub sent: u64,
    /// Hour of `date` that `sent_hour` counts, 0 to 23.
    pub hour: u64,
    pub sent_hour: u64,
    /// Outcomes on `date`, for `hold_on`.
    pub attempts: u64,
    pub deferred: u64,
    pub bounced: u64,
    /// Earlier days with mail that advanced the schedule.
    pub sending_days: u32,
    /// Earlier days held back by `hold_on`.
    pub held_days: u32,
}

/// Whether a source may take one more message for a site now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    Allowed,
    /// At the day's (or hour's) cap; capacity returns at this time
    /// (seconds since the Unix epoch).
    Full { until: u64 },
}

/// Progress of a source at a site today.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    /// Day of the schedule, 1-based.
    pub day: u32,
    /// Today's cap; `None` once the source is warm.
    pub cap: Option<u64>,
    pub sent: u64,
}

impl Schedule {
    /// Returns where `now` (seconds since the Unix epoch) falls in the
    /// schedule's time zone.
    pub fn clock(&self, now: u64) -> Clock {
        let utc = Clock {
            today: (now / DAY) as i64,
            hour: (now % DAY) / HOUR,
            next_day: (now / DAY + 1) * DAY,
            next_hour: (now / HOUR + 1) * HOUR,
        };
        let Some(zone) = &self.zone else {
            return utc;
        };
        let local = || -> Result<Clock, jiff::Error> {
            let zoned = jiff::Timestamp::from_second(now as i64)?.to_zoned_datetime(zone.clone());
            let today = zoned.date().to_zoned_datetime(jiff::tz::TimeZone::UTC)?.timestamp().as_second() / DAY as i64;
            let next_day = zoned.tomorrow()?.start_of_day()?.timestamp().as_second();
            let rounding = jiff::ZonedDateTimeRound::new().smallest(jiff::Unit::Hour).mode(jiff::RoundMode::Trunc);
            let next_hour = zoned.round(rounding)?.checked_add(jiff::Span::new().hours(1))?.timestamp().as_second();
            Ok(Clock {
                today,
                hour: zoned.hour() as u64,
                next_day: next_day as u64,
                next_hour: next_hour as u64,
            })
        };
        // Dates far outside jiff's range cannot occur for a real clock.
        local().unwrap_or(utc)
    }

    /// Returns the ramp for `site`.
    fn ramp(&self, site: &str) -> &[u64] {
        self.sites.get(site).unwrap_or(&self.daily)
    }

    /// Moves the counters to `today`. Returns `Some(held)` when a day with
    /// outcomes ended, saying whether `hold_on` kept it from advancing.
    pub fn roll(&self, counters: &mut Counters, today: i64) -> Option<bool> {
        if counters.date >= today {
            return None;
        }
        if counters.date == 0 {
            counters.date = today;
            return None;
        }
        let held = self.held(counters);
        if held {
            counters.held_days += 1;
        } else if counters.sent > 0 {
            counters.sending_days += 1;
        }
        let ended = counters.sent > 0 || counters.attempts > 0;
        *counters = Counters {
            date: today,
            sending_days: counters.sending_days,
            held_days: counters.held_days,
            ..Counters::default()
        };
        ended.then_some(held)
    }

    fn held(&self, counters: &Counters) -> bool {
        if counters.attempts < HOLD_MIN_ATTEMPTS {
            return false;
        }
        let rate = |count: u64| count as f64 / counters.attempts as f64;
        let over = |limit: Option<f64>, count: u64| limit.is_some_and(|limit| rate(count) > limit);
        over(self.hold_on.deferral_rate_above, counters.deferred) || over(self.hold_on.bounce_rate_above, counters.bounced)
    }

    /// Returns the schedule day of counters already rolled to `today`.
    pub fn day(&self, counters: &Counters, started: i64, today: i64) -> u32 {
        match self.advance {
            Advance::SendingDays => counters.sending_days + 1,
            Advance::CalendarDays => {
                let elapsed = (today - started).max(0) as u32;
                elapsed.saturating_sub(counters.held_days) + 1
            }
        }
    }

    pub fn standing(&self, counters: &Counters, started: i64, site: &str, today: i64) -> Standing {
        let day = self.day(counters, started, today);
        let cap = self.ramp(site).get(day as usize - 1).copied();
        Standing {
            day,
            cap,
            sent: counters.sent,
        }
    }

    /// Counts one message for `site` at `now` (seconds since the Unix
    /// epoch) if today's cap (and this hour's, with `spread: hourly`)
    /// allows it.
    pub fn take(&self, counters: &mut Counters, started: i64, site: &str, now: u64) -> Take {
        let clock = self.clock(now);
        let today = clock.today;
        self.roll(counters, today);
        let Some(cap) = self.standing(counters, started, site, today).cap else {
            counters.sent += 1;
            return Take::Allowed;
        };
        if counters.sent >= cap {
            return Take::Full { until: clock.next_day };
        }
        if self.spread == Some(Spread::Hourly) {
            let hour = clock.hour;
            if counters.hour != hour {
                counters.hour = hour;
                counters.sent_hour = 0;
            }
            if counters.sent_hour >= cap.div_ceil(24) {
                return Take::Full { until: clock.next_hour };
            }
            counters.sent_hour += 1;
        }
        counters.sent += 1;
        Take::Allowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY_ONE: i64 = 20_000;

    fn schedule(text: &str) -> Schedule {
        let schedules = Schedules::parse(text).unwrap();
        schedules.0.into_values().next().unwrap()
    }

    fn at(day: i64, hour: u64) -> u64 {
        day as u64 * DAY + hour * HOUR
    }

    /// Sends `count` messages on `day` and returns how many were allowed.
    fn send(schedule: &Schedule, counters: &mut Counters, day: i64, count: u64) -> u64 {
        (0..count)
            .filter(|_| schedule.take(counters, DAY_ONE, "other", at(day, 10)) == Take::Allowed)
            .count() as u64
    }

    #[test]
    fn cap_follows_sending_days() {
        let schedule = schedule("schedules:\n  s:\n    daily: [10, 20]\n");
        let mut counters = Counters::default();
        assert_eq!(send(&schedule, &mut counters, DAY_ONE, 50), 10);
        // A day without mail does not advance a sending-days schedule.
        assert_eq!(send(&schedule, &mut counters, DAY_ONE + 2, 50), 20);
        // After the last day the source is warm.
        assert_eq!(send(&schedule, &mut counters, DAY_ONE + 3, 500), 500);
        assert_eq!(schedule.standing(&counters, DAY_ONE, "other", DAY_ONE + 3).cap, None);
    }

    #[test]
    fn cap_follows_calendar_days() {
        let schedule = schedule("schedules:\n  s:\n    advance: calendar_days\n    daily: [10, 20, 30]\n");
        let mut counters = Counters::default();
        assert_eq!(send(&schedule, &mut counters, DAY_ONE, 50), 10);
        // Two calendar days later the source is on day 3, sent or not.
        assert_eq!(send(&schedule, &mut counters, DAY_ONE + 2, 50), 30);
    }

    #[test]
    fn full_until_next_midnight() {
        let schedule = schedule("schedules:\n  s:\n    daily: [1, 2]\n");
        let mut counters = Counters::default();
        assert_eq!(schedule.take(&mut counters, DAY_ONE, "other", at(DAY_ONE, 5)), Take::Allowed);
        let full = schedule.take(&mut counters, DAY_ONE, "other", at(DAY_ONE, 5));
        assert_eq!(full, Take::Full { until: at(DAY_ONE + 1, 0) });
    }

    #[test]
    fn site_ramp_overrides_daily() {
        let schedule = schedule("schedules:\n  s:\n    daily: [100]\n    sites:\n      google: [3]\n");
        let mut counters = Counters::default();
        let allowed = (0..10)
            .filter(|_| schedule.take(&mut counters, DAY_ONE, "google", at(DAY_ONE, 1)) == Take::Allowed)
            .count();
        assert_eq!(allowed, 3);
    }

    #[test]
    fn hourly_spread_caps_each_hour() {
        let schedule = schedule("schedules:\n  s:\n    daily: [48]\n    spread: hourly\n");
        let mut counters = Counters::default();
        let first_hour = (0..10)
            .filter(|_| schedule.take(&mut counters, DAY_ONE, "other", at(DAY_ONE, 3)) == Take::Allowed)
            .count();
        assert_eq!(first_hour, 2);
        assert_eq!(
            schedule.take(&mut counters, DAY_ONE, "other", at(DAY_ONE, 3)),
            Take::Full { until: at(DAY_ONE, 4) }
        );
        assert_eq!(schedule.take(&mut counters, DAY_ONE, "other", at(DAY_ONE, 4)), Take::Allowed);
    }

    #[test]
    fn high_deferral_rate_holds_the_day() {
        let schedule = schedule("schedules:\n  s:\n    daily: [100, 200]\n    hold_on:\n      deferral_rate_above: 0.10\n");
        let mut counters = Counters::default();
        assert_eq!(send(&schedule, &mut counters, DAY_ONE, 100), 100);
        counters.attempts = 100;
        counters.deferred = 11;
        assert_eq!(schedule.roll(&mut counters, DAY_ONE + 1), Some(true));
        assert_eq!(schedule.standing(&counters, DAY_ONE, "other", DAY_ONE + 1).day, 1);

        // A day under the limit advances.
        assert_eq!(send(&schedule, &mut counters, DAY_ONE + 1, 100), 100);
        counters.attempts = 100;
        counters.deferred = 10;
        assert_eq!(schedule.roll(&mut counters, DAY_ONE + 2), Some(false));
        assert_eq!(schedule.standing(&counters, DAY_ONE, "other", DAY_ONE + 2).day, 2);
    }

    #[test]
    fn few_outcomes_never_hold() {
        let schedule = schedule("schedules:\n  s:\n    daily: [10, 20]\n    hold_on:\n      bounce_rate_above: 0.05\n");
        let mut counters = Counters::default();
        send(&schedule, &mut counters, DAY_ONE, 10);
        counters.attempts = 10;
        counters.bounced = 5;
        assert_eq!(schedule.roll(&mut counters, DAY_ONE + 1), Some(false));
    }

    #[test]
    fn timezone_moves_midnight() {
        let schedule = schedule("schedules:\n  s:\n    daily: [1, 2]\n    timezone: America/New_York\n");
        // 2025-01-01, in winter: 03:00 UTC is 22:00 the day before in New
        // York (EST, UTC-5).
        const WINTER_DAY: i64 = 20_089;
        let clock = schedule.clock(at(WINTER_DAY, 3));
        assert_eq!(clock.today, WINTER_DAY - 1);
        assert_eq!(clock.hour, 22);
        assert_eq!(clock.next_day, at(WINTER_DAY, 5));
        assert_eq!(clock.next_hour, at(WINTER_DAY, 4));

        // The day's cap ends at local midnight, not at UTC midnight.
        let mut counters = Counters::default();
        assert_eq!(schedule.take(&mut counters, WINTER_DAY - 1, "other", at(WINTER_DAY, 3)), Take::Allowed);
        assert_eq!(
            schedule.take(&mut counters, WINTER_DAY - 1, "other", at(WINTER_DAY, 4)),
            Take::Full { until: at(WINTER_DAY, 5) }
        );
        assert_eq!(schedule.take(&mut counters, WINTER_DAY - 1, "other", at(WINTER_DAY, 5)), Take::Allowed);
    }

    #[test]
    fn invalid_schedules_rejected() {
        for (text, expected) in [
            ("schedules:\n  s:\n    daily: []\n", "`daily` must list"),
            ("schedules:\n  s:\n    daily: [1]\n    sites:\n      google: [0]\n", "`sites.google`"),
            ("schedules:\n  s:\n    daily: [1]\n    hold_on:\n      deferral_rate_above: 10\n", "fraction"),
            ("schedules:\n  s:\n    daily: [1]\n    advance: weekly\n", "unknown variant `weekly`"),
            ("schedules:\n  s:\n    daily: [1]\n    timezone: Mars/Olympus\n", "unknown timezone \"Mars/Olympus\""),
        ] {
            let error = format!("{:#}", Schedules::parse(text).unwrap_err());
            assert!(error.contains(expected), "{expected:?} not in {error:?}");
        }
    }
}
