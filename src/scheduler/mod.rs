//! The scheduler owns delivery timing. Each job is one message's recipients
//! at one domain. A job waits in a timer heap until its time comes. Then
//! the domain's receiving site is found (once per domain, by an MX lookup)
//! and a source of the message's pool is chosen for the job. The job waits
//! in the ready queue of its lane (domain and source) until a delivery
//! connection from that source takes it.
//!
//! Nothing polls: the timer task sleeps until the earliest job is due or a
//! new job is scheduled, and connections are started when jobs become ready
//! and stop when their lane's ready queue is empty. Connection caps per
//! source and site (from the shaping policy) and in total are enforced
//! here. A suspended site's jobs wait in the timer heap until the
//! suspension ends.

pub mod sources;
pub mod throttle;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
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
    pool: String,
}

/// Queue key of ready jobs: one recipient domain, sent from one source.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lane {
    pub domain: String,
    pub pool: String,
    pub source: String,
}

#[derive(Default)]
struct LaneQueue {
    ready: VecDeque<QueueId>,
    connections: usize,
    site: String,
}

#[derive(Default)]
struct State {
    /// Jobs not yet due, by due time (seconds since the Unix epoch).
    timers: BinaryHeap<Reverse<(u64, Job)>>,
    lanes: HashMap<Lane, LaneQueue>,
    /// Due jobs of domains whose site is being looked up.
    unsited: HashMap<String, Vec<Job>>,
    connections: usize,
    /// Open or starting connections per site, from all sources.
    site_connections: HashMap<String, usize>,
    /// Open or starting connections per (site, source).
    source_connections: HashMap<(String, String), usize>,
    /// Lanes with ready jobs that wait for a free connection under the
    /// total cap, oldest first.
    starved: VecDeque<Lane>,
    starved_set: HashSet<Lane>,
}

pub struct Scheduler {
    state: Mutex<State>,
    /// Set at shutdown: no connection starts and none takes another job.
    draining: AtomicBool,
    /// Woken once, when draining starts.
    drain_started: Notify,
    wake: Notify,
    max_connections: usize,
    pub throttles: throttle::Throttles,
    pub sources: sources::Sources,
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
            draining: AtomicBool::new(false),
            drain_started: Notify::new(),
            wake: Notify::new(),
            max_connections,
            throttles: throttle::Throttles::default(),
            sources: sources::Sources::default(),
        }
    }

    /// Schedules delivery of message `id` of `pool` to `domain` not before
    /// `due` (seconds since the Unix epoch; 0 or a past time means now).
    pub fn schedule(&self, gateway: &Arc<Gateway>, id: QueueId, domain: String, pool: String, due: u64) {
        let job = Job { id, domain, pool };
        if due > unix_now() {
            self.wait(job, due);
            return;
        }
        if let Some(lane) = self.make_ready(gateway, job) {
            self.dispatch(gateway, &lane);
        }
    }

    fn wait(&self, job: Job, until: u64) {
        let mut state = self.state.lock().expect("scheduler lock");
        state.timers.push(Reverse((until, job)));
        drop(state);
        self.wake.notify_one();
    }

    /// Moves a due job to a lane's ready queue and returns the lane, or
    /// parks it until its site is known or a source can take it.
    fn make_ready(&self, gateway: &Arc<Gateway>, job: Job) -> Option<Lane> {
        let Some(site) = self.throttles.site_of(&job.domain) else {
            let mut state = self.state.lock().expect("scheduler lock");
            let waiting = state.unsited.entry(job.domain.clone()).or_default();
            waiting.push(job.clone());
            if waiting.len() == 1 {
                tokio::spawn(find_site(gateway.clone(), job.domain));
            }
            return None;
        };
        self.place(gateway, job, &site)
    }

    /// Chooses the job's source for `site` and queues it in that lane.
    fn place(&self, gateway: &Arc<Gateway>, job: Job, site: &str) -> Option<Lane> {
        let policy = gateway.policy.current();
        let view = self.throttles.view(site, None, &policy.shaping);
        if let Some(until) = view.suspended_until {
            self.wait(job, until);
            return None;
        }
        match self.sources.choose(gateway, &policy, &job.id, &job.pool, site) {
            sources::Choice::Source(source) => {
                let lane = Lane {
                    domain: job.domain,
                    pool: job.pool,
                    source,
                };
                let mut state = self.state.lock().expect("scheduler lock");
                let queue = state.lanes.entry(lane.clone()).or_default();
                queue.site = site.to_string();
                queue.ready.push_back(job.id);
                Some(lane)
            }
            sources::Choice::Wait(until) => {
                tracing::debug!(queue_id = %job.id, pool = %job.pool, site, until = %crate::events::format_unix(until), "no source of the pool can take the message now");
                self.wait(job, until);
                None
            }
        }
    }

    /// Runs the timer: moves due jobs on. Never returns.
    pub async fn run_timer(gateway: Arc<Gateway>) {
        let scheduler = &gateway.scheduler;
        loop {
            let (due, sleep) = {
                let mut state = scheduler.state.lock().expect("scheduler lock");
                let now = unix_now();
                let mut due = Vec::new();
                while let Some(Reverse((time, _))) = state.timers.peek() {
                    if *time > now {
                        break;
                    }
                    let Reverse((_, job)) = state.timers.pop().expect("peeked");
                    due.push(job);
                }
                // Wake at the next whole second after the earliest due time.
                let sleep = state
                    .timers
                    .peek()
                    .map(|Reverse((time, _))| Duration::from_secs(time.saturating_sub(now)))
                    .unwrap_or(Duration::from_secs(3600));
                (due, sleep)
            };
            let mut lanes = HashSet::new();
            for job in due {
                lanes.extend(scheduler.make_ready(&gateway, job));
            }
            for lane in lanes {
                scheduler.dispatch(&gateway, &lane);
            }
            let _ = tokio::time::timeout(sleep.max(Duration::from_millis(50)), scheduler.wake.notified()).await;
        }
    }

    /// Starts delivery connections for `lane` while it has ready jobs and
    /// the caps allow.
    fn dispatch(&self, gateway: &Arc<Gateway>, lane: &Lane) {
        if self.draining.load(Ordering::Relaxed) {
            return;
        }
        let site = {
            let state = self.state.lock().expect("scheduler lock");
            match state.lanes.get(lane) {
                Some(queue) => queue.site.clone(),
                None => return,
            }
        };
        let policy = gateway.policy.current();
        let view = self.throttles.view(&site, None, &policy.shaping);
        if let Some(until) = view.suspended_until {
            self.defer_ready(gateway, lane, until);
            return;
        }
        let source_key = (site.clone(), lane.source.clone());
        let starts = {
            let mut state = self.state.lock().expect("scheduler lock");
            let total_free = self.max_connections.saturating_sub(state.connections);
            let site_open = state.site_connections.get(&site).copied().unwrap_or(0);
            let source_open = state.source_connections.get(&source_key).copied().unwrap_or(0);
            let Some(queue) = state.lanes.get_mut(lane) else {
                return;
            };
            let total_cap = view.limits.total_max_connections.unwrap_or(usize::MAX);
            let site_free = view
                .limits
                .max_connections
                .saturating_sub(source_open)
                .min(total_cap.saturating_sub(site_open));
            let needed = queue.ready.len().saturating_sub(queue.connections);
            let starts = needed.min(site_free).min(total_free);
            queue.connections += starts;
            state.connections += starts;
            *state.site_connections.entry(site.clone()).or_default() += starts;
            *state.source_connections.entry(source_key.clone()).or_default() += starts;
            // Waiting for a connection slot anywhere: retry when one closes.
            if needed > starts && state.starved_set.insert(lane.clone()) {
                state.starved.push_back(lane.clone());
            }
            starts
        };
        for _ in 0..starts {
            let gateway = gateway.clone();
            let lane = lane.clone();
            let site = site.clone();
            tokio::spawn(async move {
                crate::delivery::run_connection(gateway, lane, site).await;
            });
        }
    }

    /// Moves every ready job of `lane` back to the timer heap at `until`;
    /// their warmup counts are given back, since they were not attempted.
    pub fn defer_ready(&self, gateway: &Gateway, lane: &Lane, until: u64) {
        let (jobs, site) = {
            let mut state = self.state.lock().expect("scheduler lock");
            let Some(queue) = state.lanes.get_mut(lane) else {
                return;
            };
            let jobs: Vec<QueueId> = queue.ready.drain(..).collect();
            let site = queue.site.clone();
            for id in &jobs {
                let job = Job {
                    id: id.clone(),
                    domain: lane.domain.clone(),
                    pool: lane.pool.clone(),
                };
                state.timers.push(Reverse((until, job)));
            }
            (jobs, site)
        };
        for _ in &jobs {
            self.sources.give_back(gateway, &lane.source, &site);
        }
        self.wake.notify_one();
    }

    /// Takes `lane`'s ready jobs, and `id` if given, away from a source whose
    /// address cannot be bound, and chooses another source for each.
    pub fn reroute(&self, gateway: &Arc<Gateway>, lane: &Lane, id: Option<QueueId>) {
        let (mut jobs, site) = {
            let mut state = self.state.lock().expect("scheduler lock");
            let Some(queue) = state.lanes.get_mut(lane) else {
                return;
            };
            (queue.ready.drain(..).collect::<Vec<_>>(), queue.site.clone())
        };
        jobs.extend(id);
        let mut lanes = HashSet::new();
        for id in jobs {
            self.sources.give_back(gateway, &lane.source, &site);
            let job = Job {
                id,
                domain: lane.domain.clone(),
                pool: lane.pool.clone(),
            };
            lanes.extend(self.place(gateway, job, &site));
        }
        for other in lanes {
            self.dispatch(gateway, &other);
        }
    }

    /// Stops delivery for shutdown: connections end after their current
    /// transaction and no new one starts. Queued jobs stay in the spool.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.drain_started.notify_waiters();
    }

    /// Returns once [`Scheduler::drain`] has been called.
    pub async fn drained(&self) {
        let notified = self.drain_started.notified();
        tokio::pin!(notified);
        // Registered before the check, so a drain between the two still
        // wakes this waiter.
        notified.as_mut().enable();
        if self.draining.load(Ordering::SeqCst) {
            return;
        }
        notified.await;
    }

    /// Returns the number of delivery connections open or starting.
    pub fn open_connections(&self) -> usize {
        self.state.lock().expect("scheduler lock").connections
    }

    /// Returns the number of open connections to `site` from all sources.
    pub fn site_connections(&self, site: &str) -> usize {
        let state = self.state.lock().expect("scheduler lock");
        state.site_connections.get(site).copied().unwrap_or(0)
    }

    /// Returns whether `site` has more connections open than `limits` allow,
    /// from `source` or from all sources, as after a backoff lowered them.
    pub fn over_connection_cap(&self, site: &str, source: &str, limits: &crate::policy::shaping::SiteLimits) -> bool {
        let state = self.state.lock().expect("scheduler lock");
        let from_source = state
            .source_connections
            .get(&(site.to_string(), source.to_string()))
            .copied()
            .unwrap_or(0);
        let from_all = state.site_connections.get(site).copied().unwrap_or(0);
        from_source > limits.max_connections || limits.total_max_connections.is_some_and(|total| from_all > total)
    }

    /// Takes the next ready job of `lane`, for a connection of that lane.
    pub fn next_job(&self, lane: &Lane) -> Option<QueueId> {
        if self.draining.load(Ordering::Relaxed) {
            return None;
        }
        let mut state = self.state.lock().expect("scheduler lock");
        state.lanes.get_mut(lane)?.ready.pop_front()
    }

    /// Records that a connection of `lane` to `site` ended, and hands its
    /// slot to waiting work.
    pub fn connection_closed(&self, gateway: &Arc<Gateway>, lane: &Lane, site: &str) {
        let starved = {
            let mut state = self.state.lock().expect("scheduler lock");
            state.connections -= 1;
            if let Some(open) = state.site_connections.get_mut(site) {
                *open = open.saturating_sub(1);
                if *open == 0 {
                    state.site_connections.remove(site);
                }
            }
            let source_key = (site.to_string(), lane.source.clone());
            if let Some(open) = state.source_connections.get_mut(&source_key) {
                *open = open.saturating_sub(1);
                if *open == 0 {
                    state.source_connections.remove(&source_key);
                }
            }
            if let Some(queue) = state.lanes.get_mut(lane) {
                queue.connections -= 1;
                if queue.connections == 0 && queue.ready.is_empty() {
                    state.lanes.remove(lane);
                }
            }
            let starved: Vec<Lane> = state.starved.drain(..).collect();
            state.starved_set.clear();
            starved
        };
        self.dispatch(gateway, lane);
        for other in starved {
            self.dispatch(gateway, &other);
        }
    }

    /// Returns where a job waits: `Some(None)` in a ready queue,
    /// `Some(Some(due))` in the timer heap, `None` when not queued (being
    /// delivered now, or finished). Scans the queues: for operators, not
    /// for the delivery path.
    pub fn job_position(&self, id: &QueueId, domain: &str) -> Option<Option<u64>> {
        let state = self.state.lock().expect("scheduler lock");
        let ready = state
            .lanes
            .iter()
            .any(|(lane, queue)| lane.domain == domain && queue.ready.contains(id));
        let unsited = state
            .unsited
            .get(domain)
            .is_some_and(|jobs| jobs.iter().any(|job| job.id == *id));
        if ready || unsited {
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
        for (lane, queue) in &state.lanes {
            let entry = stats.entry(lane.domain.clone()).or_insert((0, 0, u64::MAX));
            entry.0 += queue.ready.len();
            for id in &queue.ready {
                entry.2 = entry.2.min(id.received_micros());
            }
        }
        let parked = state.unsited.values().flatten();
        for job in parked.chain(state.timers.iter().map(|Reverse((_, job))| job)) {
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
        let empty = |domain: &str| DomainSummary {
            domain: domain.to_string(),
            ready: 0,
            waiting: 0,
            connections: 0,
        };
        for (lane, queue) in &state.lanes {
            let summary = summaries.entry(&lane.domain).or_insert_with(|| empty(&lane.domain));
            summary.ready += queue.ready.len();
            summary.connections += queue.connections;
        }
        let parked = state.unsited.values().flatten();
        for job in parked.chain(state.timers.iter().map(|Reverse((_, job))| job)) {
            summaries.entry(&job.domain).or_insert_with(|| empty(&job.domain)).waiting += 1;
        }
        let mut list: Vec<DomainSummary> = summaries.into_values().collect();
        list.sort_by(|a, b| a.domain.cmp(&b.domain));
        list
    }
}

/// Looks up the receiving site of `domain` from its MX hosts, then places
/// the jobs that waited for it. A failed lookup places them at the domain
/// itself as the site, uncached, and delivery reports the failure.
async fn find_site(gateway: Arc<Gateway>, domain: String) {
    let config = &gateway.config.delivery;
    let route = config.routes.get(&domain).and_then(|text| crate::delivery::mx::parse_route(text).ok());
    let resolved = crate::delivery::mx::resolve(&gateway.resolver, &gateway.metrics, &domain, config.remote_port, route.as_ref()).await;
    let policy = gateway.policy.current();
    let site = match &resolved {
        Ok(targets) => {
            let hosts: Vec<String> = targets.iter().map(|target| target.mx.clone()).collect();
            let site = policy.shaping.site_for(&domain, &hosts);
            gateway.scheduler.throttles.remember_site(&domain, &site);
            site
        }
        Err(_) => policy.shaping.site_for(&domain, &[]),
    };
    let scheduler = &gateway.scheduler;
    let jobs = {
        let mut state = scheduler.state.lock().expect("scheduler lock");
        state.unsited.remove(&domain).unwrap_or_default()
    };
    let mut lanes = HashSet::new();
    for job in jobs {
        lanes.extend(scheduler.place(&gateway, job, &site));
    }
    for lane in lanes {
        scheduler.dispatch(&gateway, &lane);
    }
}
