//! The scheduler owns delivery timing. Each job is one message's recipients
//! at one domain. A job waits in a timer heap until its time comes, then in
//! its domain's ready queue until a delivery connection takes it.
//!
//! Nothing polls: the timer task sleeps until the earliest job is due or a
//! new job is scheduled, and connections are started when jobs become ready
//! and stop when their domain's ready queue is empty. Per-domain and total
//! connection caps are enforced here.

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
    /// Domains with ready jobs that wait for a free connection under the
    /// total cap, oldest first.
    starved: VecDeque<String>,
    starved_set: HashSet<String>,
}

pub struct Scheduler {
    state: Mutex<State>,
    wake: Notify,
    max_connections: usize,
    max_per_domain: usize,
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
    pub fn new(max_connections: usize, max_per_domain: usize) -> Scheduler {
        Scheduler {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            max_connections,
            max_per_domain,
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
    /// the caps allow.
    fn dispatch(&self, gateway: &Arc<Gateway>, domain: &str) {
        let starts = {
            let mut state = self.state.lock().expect("scheduler lock");
            let total_free = self.max_connections.saturating_sub(state.connections);
            let Some(queue) = state.domains.get_mut(domain) else {
                return;
            };
            let needed = queue
                .ready
                .len()
                .saturating_sub(queue.connections)
                .min(self.max_per_domain.saturating_sub(queue.connections));
            let starts = needed.min(total_free);
            queue.connections += starts;
            let starved = needed > starts;
            state.connections += starts;
            if starved && state.starved_set.insert(domain.to_string()) {
                state.starved.push_back(domain.to_string());
            }
            starts
        };
        for _ in 0..starts {
            let gateway = gateway.clone();
            let domain = domain.to_string();
            tokio::spawn(async move {
                crate::delivery::run_connection(gateway, domain).await;
            });
        }
    }

    /// Takes the next ready job of `domain`, for a connection to that domain.
    pub fn next_job(&self, domain: &str) -> Option<QueueId> {
        let mut state = self.state.lock().expect("scheduler lock");
        state.domains.get_mut(domain)?.ready.pop_front()
    }

    /// Records that a connection to `domain` ended, and hands its slot to
    /// waiting work.
    pub fn connection_closed(&self, gateway: &Arc<Gateway>, domain: &str) {
        let starved = {
            let mut state = self.state.lock().expect("scheduler lock");
            state.connections -= 1;
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
