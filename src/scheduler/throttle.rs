//! Runtime throttle state per receiving site: the rate limiters that space
//! messages and connections, and the backoff or suspension a throttling
//! reply put the site in.
//!
//! Limits come from the current shaping policy each time they are read, so
//! a reload takes effect on the next message. Waiting on a limiter is a
//! timer, never a poll.
//!
//! Rates and connection caps hold per source IP per site, as receivers count
//! them, while a backoff or suspension applies to the whole site.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::policy::shaping::{Action, Rate, ResponseRule, Shaping, SiteLimits};
use crate::spool::record::unix_now;

pub type Limiter = DefaultDirectRateLimiter;

/// How long a domain's site is remembered before the MX hosts are matched again.
const SITE_CACHE_TIME: Duration = Duration::from_secs(300);

#[derive(Debug, Clone)]
pub enum Mode {
    Normal,
    Backoff { until: u64, rule: String, limits: SiteLimits },
    Suspended { until: u64, rule: String },
}

struct SiteState {
    /// Limits the limiters were built for (normal or backoff).
    built_for: SiteLimits,
    /// Message and connection rate limiters, by source name.
    limiters: HashMap<String, (Option<Arc<Limiter>>, Option<Arc<Limiter>>)>,
    mode: Mode,
}

/// Current state of a site, as the scheduler and delivery read it.
#[derive(Clone)]
pub struct SiteView {
    pub limits: SiteLimits,
    pub suspended_until: Option<u64>,
    pub messages: Option<Arc<Limiter>>,
    pub connections: Option<Arc<Limiter>>,
    pub mode: Mode,
}

#[derive(Default)]
pub struct Throttles {
    sites: Mutex<HashMap<String, SiteState>>,
    domain_sites: Mutex<HashMap<String, (String, Instant)>>,
}

fn limiter(rate: Option<Rate>, burst: u32) -> Option<Arc<Limiter>> {
    let rate = rate?;
    let interval = rate.interval().max(Duration::from_nanos(1));
    let quota = Quota::with_period(interval)?.allow_burst(NonZeroU32::new(burst.max(1)).expect("at least 1"));
    Some(Arc::new(RateLimiter::direct(quota)))
}

impl Throttles {
    /// Returns the cached site of a recipient domain.
    pub fn site_of(&self, domain: &str) -> Option<String> {
        let cache = self.domain_sites.lock().expect("site cache lock");
        cache
            .get(domain)
            .filter(|(_, expires)| *expires > Instant::now())
            .map(|(site, _)| site.clone())
    }

    pub fn remember_site(&self, domain: &str, site: &str) {
        let mut cache = self.domain_sites.lock().expect("site cache lock");
        cache.insert(domain.to_string(), (site.to_string(), Instant::now() + SITE_CACHE_TIME));
    }

    /// Returns the site's current limits, ending an expired backoff or
    /// suspension, with the rate limiters of `source` when given. Limiters
    /// are rebuilt when the policy or the mode changed the limits.
    pub fn view(&self, site: &str, source: Option<&str>, shaping: &Shaping) -> SiteView {
        let normal = shaping.limits(site).clone();
        let mut sites = self.sites.lock().expect("throttle lock");
        let state = sites.entry(site.to_string()).or_insert_with(|| SiteState {
            built_for: normal.clone(),
            limiters: HashMap::new(),
            mode: Mode::Normal,
        });
        let now = unix_now();
        let expired = match &state.mode {
            Mode::Backoff { until, rule, .. } | Mode::Suspended { until, rule } if *until <= now => Some(rule.clone()),
            _ => None,
        };
        if let Some(rule) = expired {
            tracing::info!(site, rule, "site back to normal limits");
            state.mode = Mode::Normal;
        }
        let wanted = match &state.mode {
            Mode::Backoff { limits, .. } => limits.clone(),
            _ => normal.clone(),
        };
        if wanted != state.built_for {
            state.limiters.clear();
            state.built_for = wanted.clone();
        }
        let (messages, connections) = match source {
            Some(source) => state
                .limiters
                .entry(source.to_string())
                .or_insert_with(|| {
                    (
                        limiter(wanted.max_message_rate, wanted.max_burst),
                        limiter(wanted.max_connection_rate, 1),
                    )
                })
                .clone(),
            None => (None, None),
        };
        let suspended_until = match &state.mode {
            Mode::Suspended { until, .. } => Some(*until),
            _ => None,
        };
        SiteView {
            limits: wanted,
            suspended_until,
            messages,
            connections,
            mode: state.mode.clone(),
        }
    }

    /// Puts the site in backoff or suspension by `rule`. Returns the end
    /// time, or `None` for a bounce rule (nothing changes for the site).
    pub fn apply(&self, site: &str, rule: &ResponseRule, shaping: &Shaping, reply: &str) -> Option<u64> {
        let until = unix_now() + rule.duration.as_secs().max(1);
        let mode = match rule.action {
            Action::Bounce => return None,
            Action::Suspend => Mode::Suspended { until, rule: rule.name() },
            Action::Backoff => {
                let mut limits = shaping.limits(site).clone();
                if let Some(rate) = rule.max_message_rate {
                    limits.max_message_rate = Some(rate);
                    limits.max_burst = 1;
                }
                if let Some(connections) = rule.max_connections {
                    limits.max_connections = connections;
                }
                Mode::Backoff { until, rule: rule.name(), limits }
            }
        };
        // Make sure the site has state, then switch its mode.
        self.view(site, None, shaping);
        let mut sites = self.sites.lock().expect("throttle lock");
        if let Some(state) = sites.get_mut(site) {
            state.mode = mode;
        }
        tracing::warn!(
            site,
            rule = %rule.name(),
            action = rule.action.label(),
            until = %crate::events::format_unix(until),
            reply,
            "site throttled by a response rule"
        );
        Some(until)
    }

    /// Counts sites in backoff and in suspension now.
    pub fn counts(&self) -> (usize, usize) {
        let sites = self.sites.lock().expect("throttle lock");
        let now = unix_now();
        let mut backoff = 0;
        let mut suspended = 0;
        for state in sites.values() {
            match &state.mode {
                Mode::Backoff { until, .. } if *until > now => backoff += 1,
                Mode::Suspended { until, .. } if *until > now => suspended += 1,
                _ => {}
            }
        }
        (backoff, suspended)
    }
}

/// Describes a site's state in one line, for `queue explain`.
pub fn describe(site: &str, view: &SiteView, active: usize) -> String {
    let total = view
        .limits
        .total_max_connections
        .map_or(String::new(), |total| format!(" (at most {total} from all sources)"));
    let rate = view
        .limits
        .max_message_rate
        .map_or("no message rate limit".to_string(), |rate| format!("{rate} messages"));
    let mode = match &view.mode {
        Mode::Normal => "normal limits".to_string(),
        Mode::Backoff { until, rule, .. } => format!("in backoff by rule {rule} until {}", crate::events::format_unix(*until)),
        Mode::Suspended { until, rule } => format!("suspended by rule {rule} until {}", crate::events::format_unix(*until)),
    };
    format!(
        "site {site}: {mode}; per source IP {rate}, {} connections{total}; {active} open now; {} messages per connection",
        view.limits.max_connections,
        view.limits.max_messages_per_connection
    )
}
