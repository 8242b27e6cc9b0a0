//! The scheduler owns delivery timing. Each job is one message's recipients
//! at one domain. A job waits in a timer heap until its time comes, then in
//! its domain's ready queue until a delivery connection takes it.
//!
//! Nothing polls: the timer task sleeps until the earliest job is due or a
//! new job is scheduled, and connections are started when jobs become ready
//! and stop when their domain's ready queue is empty. Connection caps per
//! receiving site (from the shaping policy) and in total are enforced here;
//! a suspended site's jobs wait in the timer heap until the suspension ends.

pub mod throttle;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::gateway::Gateway;
use crate::spool::QueueId;
use crate::spool::record::unix_now;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Job {
    id: QueueId,
    domain: String,
}

#[derive(Default)]
struct DomainQueue {
    ready: VecDeque<QueueId>,
    connections: usize,
}

#[derive(Default)]
struct State {
    /// Jobs not yet due, by due time (seconds since the Unix epoch).
    timers: BinaryHeap<Reverse<(u64, Job)>>,
    domains: HashMap<String, DomainQueue>,
    connections: usize,
    /// Open or starting connections per site, once the site is known.
    site_connections: HashMap<String, usize>,
    /// Domains with ready jobs that wait for a free connection under the
    /// total cap, oldest first.
    starved: VecDeque<String>,
    starved_set: HashSet<String>,
}

pub struct Scheduler {
    state: Mutex<State>,
    wake: Notify,
    max_connections: usize,
    pub throttles: throttle::Throttles,
}

/// Snapshot of one domain's queue, for `baton queue list`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DomainSummary {
    pub domain: String,
    pub ready: usize,
    pub waiting: usize,
    pub connections: usize,
}

impl Scheduler {
    pub fn new(max_connections: usize) -> Scheduler {
        Scheduler {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            max_connections,
            throttles: throttle::Throttles::default(),
        }
    }

    /// Schedules delivery of message `id` to `domain` not before `due`
    /// (seconds since the Unix epoch; 0 or a past time means now).
    pub fn schedule(&self, gateway: &Arc<Gateway>, id: QueueId, domain: String, due: u64) {
        if due > unix_now() {
            let mut state = self.state.lock().expect("scheduler lock");
            state.timers.push(Reverse((due, Job { id, domain })));
            drop(state);
            self.wake.notify_one();
            return;
        }
        {
            let mut state = self.state.lock().expect("scheduler lock");
            state.domains.entry(domain.clone()).or_default().ready.push_back(id);
        }
        self.dispatch(gateway, &domain);
    }

    /// Runs the timer: moves due jobs to their ready queues. Never returns.
    pub async fn run_timer(gateway: Arc<Gateway>) {
        let scheduler = &gateway.scheduler;
        loop {
            let (due_domains, sleep) = {
                let mut state = scheduler.state.lock().expect("scheduler lock");
                let now = unix_now();
                let mut due_domains = HashSet::new();
                while let Some(Reverse((due, _))) = state.timers.peek() {
                    if *due > now {
                        break;
                    }
                    let Reverse((_, job)) = state.timers.pop().expect("peeked");
                    state.domains.entry(job.domain.clone()).or_default().ready.push_back(job.id);
                    due_domains.insert(job.domain);
                }
                // Wake at the next whole second after the earliest due time.
                let sleep = state
                    .timers
                    .peek()
                    .map(|Reverse((due, _))| Duration::from_secs(due.saturating_sub(now)))
                    .unwrap_or(Duration::from_secs(3600));
                (due_domains, sleep)
            };
            for domain in due_domains {
                scheduler.dispatch(&gateway, &domain);
            }
            let _ = tokio::time::timeout(sleep.max(Duration::from_millis(50)), scheduler.wake.notified()).await;
        }
    }

    /// Starts delivery connections for `domain` while it has ready jobs and
    /// the caps allow. Until the domain's site is known, one connection
    /// starts and finds it.
    fn dispatch(&self, gateway: &Arc<Gateway>, domain: &str) {
        let site = self.throttles.site_of(domain);
        let view = site.as_ref().map(|site| {
            let policy = gateway.policy.current();
            self.throttles.view(site, &policy.shaping)
        });
        if let Some(until) = view.as_ref().and_then(|v| v.suspended_until) {
            self.defer_ready(domain, until);
            return;
        }
        let starts = {
            let mut state = self.state.lock().expect("scheduler lock");
            let total_free = self.max_connections.saturating_sub(state.connections);
            let site_open = site.as_ref().map_or(0, |s| state.site_connections.get(s).copied().unwrap_or(0));
            let Some(queue) = state.domains.get_mut(domain) else {
                return;
            };
            let site_free = match &view {
                Some(view) => view.limits.connection_cap().saturating_sub(site_open),
                None => 1usize.saturating_sub(queue.connections),
            };
            let needed = queue.ready.len().saturating_sub(queue.connections);
            let allowed = needed.min(site_free);
            let starts = allowed.min(total_free);
            queue.connections += starts;
            state.connections += starts;
            if let Some(site) = &site {
                *state.site_connections.entry(site.clone()).or_default() += starts;
            }
            // Waiting for a connection slot anywhere: retry when one closes.
            if needed > starts && state.starved_set.insert(domain.to_string()) {
                state.starved.push_back(domain.to_string());
            }
            starts
        };
        for _ in 0..starts {
            let gateway = gateway.clone();
            let domain = domain.to_string();
            let site = site.clone();
            tokio::spawn(async move {
                crate::delivery::run_connection(gateway, domain, site).await;
            });
        }
    }

    /// Moves every ready job of `domain` to the timer heap at `until`.
    pub fn defer_ready(&self, domain: &str, until: u64) {
        let mut state = self.state.lock().expect("scheduler lock");
        let Some(queue) = state.domains.get_mut(domain) else {
            return;
        };
        let jobs: Vec<QueueId> = queue.ready.drain(..).collect();
        for id in jobs {
            state.timers.push(Reverse((until, Job { id, domain: domain.to_string() })));
        }
        drop(state);
        self.wake.notify_one();
    }

    /// Counts a connection that found its site after it started. Returns
    /// false when the site is at its cap; the connection must then end.
    pub fn enter_site(&self, site: &str, cap: usize) -> bool {
        let mut state = self.state.lock().expect("scheduler lock");
        let open = state.site_connections.entry(site.to_string()).or_default();
        if *open >= cap {
            return false;
        }
        *open += 1;
        true
    }

    /// Puts a job back at the front of its domain's ready queue.
    pub fn requeue_front(&self, domain: &str, id: QueueId) {
        let mut state = self.state.lock().expect("scheduler lock");
        state.domains.entry(domain.to_string()).or_default().ready.push_front(id);
    }

    /// Returns the number of open connections to `site`.
    pub fn site_connections(&self, site: &str) -> usize {
        let state = self.state.lock().expect("scheduler lock");
        state.site_connections.get(site).copied().unwrap_or(0)
    }

    /// Takes the next ready job of `domain`, for a connection to that domain.
    pub fn next_job(&self, domain: &str) -> Option<QueueId> {
        let mut state = self.state.lock().expect("scheduler lock");
        state.domains.get_mut(domain)?.ready.pop_front()
    }

    /// Records that a connection to `domain` (counted at `site`, if it got
    /// that far) ended, and hands its slot to waiting work.
    pub fn connection_closed(&self, gateway: &Arc<Gateway>, domain: &str, site: Option<&str>) {
        let starved = {
            let mut state = self.state.lock().expect("scheduler lock");
            state.connections -= 1;
            if let Some(site) = site
                && let Some(open) = state.site_connections.get_mut(site)
            {
                *open = open.saturating_sub(1);
                if *open == 0 {
                    state.site_connections.remove(site);
                }
            }
            if let Some(queue) = state.domains.get_mut(domain) {
                queue.connections -= 1;
                if queue.connections == 0 && queue.ready.is_empty() {
                    state.domains.remove(domain);
                }
            }
            let starved: Vec<String> = state.starved.drain(..).collect();
            state.starved_set.clear();
            starved
        };
        self.dispatch(gateway, domain);
        for other in starved {
            self.dispatch(gateway, &other);
        }
    }

    /// Returns where a job waits: `Some(None)` in its domain's ready queue,
    /// `Some(Some(due))` in the timer heap, `None` when not queued (being
    /// delivered now, or finished). Scans the queues: for operators, not
    /// for the delivery path.
    pub fn job_position(&self, id: &QueueId, domain: &str) -> Option<Option<u64>> {
        let state = self.state.lock().expect("scheduler lock");
        if state.domains.get(domain).is_some_and(|q| q.ready.contains(id)) {
            return Some(None);
        }
        state
            .timers
            .iter()
            .filter(|Reverse((_, job))| job.id == *id && job.domain == domain)
            .map(|Reverse((due, _))| *due)
            .min()
            .map(Some)
    }

    /// Returns, per domain, the counts of ready and waiting jobs and the
    /// oldest job's arrival time (microseconds since the Unix epoch, read
    /// from its queue id). Scans the queues: for metrics scrapes, not for
    /// the delivery path.
    pub fn domain_stats(&self) -> HashMap<String, (usize, usize, u64)> {
        let state = self.state.lock().expect("scheduler lock");
        let mut stats: HashMap<String, (usize, usize, u64)> = HashMap::new();
        for (domain, queue) in &state.domains {
            let entry = stats.entry(domain.clone()).or_insert((0, 0, u64::MAX));
            entry.0 += queue.ready.len();
            for id in &queue.ready {
                entry.2 = entry.2.min(id.received_micros());
            }
        }
        for Reverse((_, job)) in state.timers.iter() {
            let entry = stats.entry(job.domain.clone()).or_insert((0, 0, u64::MAX));
            entry.1 += 1;
            entry.2 = entry.2.min(job.id.received_micros());
        }
        stats
    }

    /// Returns per-domain counts of ready and waiting jobs.
    pub fn summary(&self) -> Vec<DomainSummary> {
        let state = self.state.lock().expect("scheduler lock");
        let mut summaries: HashMap<&str, DomainSummary> = HashMap::new();
        for (domain, queue) in &state.domains {
            summaries.insert(
                domain,
                DomainSummary {
                    domain: domain.clone(),
                    ready: queue.ready.len(),
                    waiting: 0,
                    connections: queue.connections,
                },
            );
        }
        for Reverse((_, job)) in state.timers.iter() {
            summaries
                .entry(&job.domain)
                .or_insert_with(|| DomainSummary {
                    domain: job.domain.clone(),
                    ready: 0,
                    waiting: 0,
                    connections: 0,
                })
                .waiting += 1;
        }
        let mut list: Vec<DomainSummary> = summaries.into_values().collect();
        list.sort_by(|a, b| a.domain.cmp(&b.domain));
        list
    }
}
