//! Source choice inside a pool: smooth weighted round robin among the
//! pool's sources, each warming source held to its schedule's cap per
//! receiving site, and sources whose address cannot be bound set aside.
//!
//! A message counts against a source's warmup cap when it is assigned to
//! the source, before the attempt. Counters live in memory and in the
//! spool's `warmup` tree, so a restart neither resets nor repeats a day.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::gateway::Gateway;
use crate::policy::Policy;
use crate::policy::pools::Source;
use crate::policy::warmup::{Counters, Take};
use crate::spool::QueueId;
use crate::spool::record::unix_now;

/// How long a source whose address cannot be bound is left out.
pub const UNBINDABLE_PAUSE: u64 = 300;

/// Decision for one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// Send it from this source.
    Source(String),
    /// No source can take it now; choose again at this time.
    Wait(u64),
}

#[derive(Default)]
struct State {
    /// Smooth round-robin weights per (pool, site), by source name.
    current: HashMap<(String, String), HashMap<String, i64>>,
    /// Sources left out until a time, after a bind failure.
    paused: HashMap<String, u64>,
    /// Warmup counters per (source, site), loaded from the spool on use.
    counters: HashMap<(String, String), Counters>,
}

#[derive(Default)]
pub struct Sources {
    state: Mutex<State>,
}

impl Sources {
    /// Picks the source for one message of `pool` to `site` and counts it
    /// against that source's warmup cap.
    /// A message of a pool that `pools.yaml` no longer defines (such as
    /// `default`, after the file was added) uses the fallback pool.
    pub fn choose(&self, gateway: &Gateway, policy: &Policy, id: &QueueId, pool: &str, site: &str) -> Choice {
        let now = unix_now();
        let pool = match policy.pools.get(pool) {
            Some(found) => found,
            None => {
                let fallback = &policy.pools.fallback;
                tracing::warn!(queue_id = %id, pool, fallback = %fallback, "queued message names a pool that policies/pools.yaml does not define; sending it from the fallback pool");
                policy.pools.get(fallback).expect("the fallback pool exists")
            }
        };
        let mut state = self.state.lock().expect("sources lock");
        state.paused.retain(|_, until| *until > now);
        let candidates: Vec<&Source> = pool
            .sources
            .iter()
            .filter(|source| !state.paused.contains_key(&source.name))
            .collect();
        if candidates.is_empty() {
            let until = pool
                .sources
                .iter()
                .filter_map(|source| state.paused.get(&source.name).copied())
                .min()
                .unwrap_or(now + UNBINDABLE_PAUSE);
            return Choice::Wait(until);
        }

        // Smooth weighted round robin (as nginx balances upstreams): each
        // turn every candidate gains its weight, and the highest pays the
        // total.
        let total: i64 = candidates.iter().map(|source| i64::from(source.weight)).sum();
        let current = state.current.entry((pool.name.clone(), site.to_string())).or_default();
        let mut order: Vec<(&Source, i64)> = candidates
            .iter()
            .map(|source| {
                let weight = current.entry(source.name.clone()).or_default();
                *weight += i64::from(source.weight);
                (*source, *weight)
            })
            .collect();
        order.sort_by(|a, b| b.1.cmp(&a.1));
        let first = order[0].0;
        *current.get_mut(&first.name).expect("inserted above") -= total;

        let mut earliest = u64::MAX;
        match self.take(&mut state, gateway, policy, first, site, now) {
            Take::Allowed => return Choice::Source(first.name.clone()),
            Take::Full { until } => earliest = earliest.min(until),
        }
        if pool.overflow {
            for (source, _) in &order[1..] {
                if !is_warm(&mut state, gateway, policy, source, site, now) {
                    continue;
                }
                if let Take::Allowed = self.take(&mut state, gateway, policy, source, site, now) {
                    return Choice::Source(source.name.clone());
                }
            }
        }
        Choice::Wait(earliest)
    }

    fn take(&self, state: &mut State, gateway: &Gateway, policy: &Policy, source: &Source, site: &str, now: u64) -> Take {
        let Some((name, started)) = &source.warmup else {
            return Take::Allowed;
        };
        let Some(schedule) = policy.warmup.get(name) else {
            return Take::Allowed;
        };
        let counters = counters(state, gateway, &source.name, site);
        let before = counters.sending_days + counters.held_days;
        let take = schedule.take(counters, *started, site, now);
        let counters = counters.clone();
        if counters.sending_days + counters.held_days != before {
            tracing::info!(source = %source.name, site, day = schedule.day(&counters, *started, schedule.clock(now).today), "warmup day began");
        }
        save(gateway, &source.name, site, &counters);
        let standing = schedule.standing(&counters, *started, site, schedule.clock(now).today);
        let label = policy.shaping.metric_site(site);
        let labels = [source.name.as_str(), label];
        gateway.metrics.warmup_day.with_label_values(&labels).set(i64::from(standing.day));
        gateway.metrics.warmup_cap.with_label_values(&labels).set(standing.cap.unwrap_or(0) as i64);
        gateway.metrics.warmup_sent.with_label_values(&labels).set(standing.sent as i64);
        take
    }

    /// Gives back the warmup count of a message assigned to `source` that
    /// was not attempted from it.
    pub fn give_back(&self, gateway: &Gateway, source: &str, site: &str) {
        let mut state = self.state.lock().expect("sources lock");
        if let Some(counters) = state.counters.get_mut(&(source.to_string(), site.to_string())) {
            counters.sent = counters.sent.saturating_sub(1);
            counters.sent_hour = counters.sent_hour.saturating_sub(1);
            let counters = counters.clone();
            save(gateway, source, site, &counters);
        }
    }

    /// Leaves `source` out of every pool for [`UNBINDABLE_PAUSE`] seconds.
    pub fn pause(&self, source: &str) -> u64 {
        let until = unix_now() + UNBINDABLE_PAUSE;
        let mut state = self.state.lock().expect("sources lock");
        state.paused.insert(source.to_string(), until);
        until
    }

    /// Counts a recipient outcome (`delivered`, `deferred`, `bounced`) of a
    /// warming source at a site, for the schedule's `hold_on` rates.
    pub fn record_outcome(&self, gateway: &Gateway, source: &str, site: &str, outcome: &str) {
        let policy = gateway.policy.current();
        let Some(schedule_name) = policy
            .pools
            .sources()
            .find(|candidate| candidate.name == source)
            .and_then(|candidate| candidate.warmup.as_ref())
            .map(|(name, _)| name.clone())
        else {
            return;
        };
        let Some(schedule) = policy.warmup.get(&schedule_name) else {
            return;
        };
        let mut state = self.state.lock().expect("sources lock");
        let counters = counters(&mut state, gateway, source, site);
        let today = schedule.clock(unix_now()).today;
        if let Some(true) = schedule.roll(counters, today) {
            let label = policy.shaping.metric_site(site);
            gateway.metrics.warmup_holds.with_label_values(&[source, label]).inc();
            tracing::warn!(source, site, "warmup day held back: yesterday's deferral or bounce rate was above hold_on");
        }
        counters.attempts += 1;
        match outcome {
            "deferred" => counters.deferred += 1,
            "bounced" => counters.bounced += 1,
            _ => {}
        }
        let counters = counters.clone();
        save(gateway, source, site, &counters);
    }

    /// Returns each warming source's standing at `site`, for operators:
    /// (source, day, cap, sent today).
    pub fn standings(&self, gateway: &Gateway, policy: &Policy, pool: &str, site: &str) -> Vec<(String, u32, Option<u64>, u64)> {
        let now = unix_now();
        let mut state = self.state.lock().expect("sources lock");
        let mut list = Vec::new();
        let sources = policy.pools.get(pool).or_else(|| policy.pools.get("")).map(|pool| pool.sources.as_slice()).unwrap_or_default();
        for source in sources {
            let Some((name, started)) = &source.warmup else {
                continue;
            };
            let Some(schedule) = policy.warmup.get(name) else {
                continue;
            };
            let today = schedule.clock(now).today;
            let mut counters = counters(&mut state, gateway, &source.name, site).clone();
            schedule.roll(&mut counters, today);
            let standing = schedule.standing(&counters, *started, site, today);
            list.push((source.name.clone(), standing.day, standing.cap, standing.sent));
        }
        list
    }
}

/// Returns whether `source` has no warmup cap at `site` today.
fn is_warm(state: &mut State, gateway: &Gateway, policy: &Policy, source: &Source, site: &str, now: u64) -> bool {
    let Some((name, started)) = &source.warmup else {
        return true;
    };
    let Some(schedule) = policy.warmup.get(name) else {
        return true;
    };
    let today = schedule.clock(now).today;
    let mut counters = counters(state, gateway, &source.name, site).clone();
    schedule.roll(&mut counters, today);
    schedule.standing(&counters, *started, site, today).cap.is_none()
}

fn counters<'a>(state: &'a mut State, gateway: &Gateway, source: &str, site: &str) -> &'a mut Counters {
    state
        .counters
        .entry((source.to_string(), site.to_string()))
        .or_insert_with(|| match gateway.spool.warmup_counters(source, site) {
            Ok(stored) => stored.unwrap_or_default(),
            Err(error) => {
                tracing::error!(source, site, error = %format!("{error:#}"), "cannot read warmup counters; starting from zero");
                Counters::default()
            }
        })
}

fn save(gateway: &Gateway, source: &str, site: &str, counters: &Counters) {
    if let Err(error) = gateway.spool.save_warmup_counters(source, site, counters) {
        tracing::error!(source, site, error = %format!("{error:#}"), "cannot store warmup counters");
    }
}
