//! Event webhooks: `policies/events.yaml` lists HTTP endpoints and the
//! event types each wants. Events are queued in the spool's `webhooks`
//! tree and posted in batches, as a JSON array, by one sender task per
//! endpoint. A batch leaves the spool only after the endpoint responded
//! with 2xx. Events therefore wait out an endpoint that is down, and a
//! restart, and are delivered at least once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use serde::Deserialize;
use tokio::sync::Notify;

use crate::events::Event;
use crate::metrics::Metrics;
use crate::policy::PolicyStore;
use crate::spool::Spool;

/// Event types a webhook can ask for.
pub const EVENT_TYPES: [&str; 4] = ["received", "delivered", "deferred", "bounced"];

/// Maximum wait between two tries of a failing endpoint.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Time allowed for one POST, connect to response.
const POST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsFile {
    #[serde(default)]
    webhooks: Vec<Webhook>,
}

/// One endpoint of `events.yaml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    /// Unique name; the spool queue and metrics use it.
    pub name: String,
    /// `http://` or `https://` URL that batches are posted to.
    pub url: String,
    /// Event types to send; all of them when absent.
    #[serde(default)]
    pub events: Option<Vec<String>>,
    /// Maximum number of events in one POST.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Extra request headers, such as `Authorization`. Never logged.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

fn default_batch_size() -> usize {
    100
}

impl Webhook {
    fn wants(&self, event: &str) -> bool {
        self.events.as_ref().is_none_or(|events| events.iter().any(|e| e == event))
    }
}

/// The webhooks of `events.yaml`; empty without the file.
#[derive(Debug, Clone, Default)]
pub struct Webhooks {
    pub hooks: Vec<Webhook>,
}

impl Webhooks {
    pub fn parse(text: &str) -> anyhow::Result<Webhooks> {
        if text.trim().is_empty() {
            return Ok(Webhooks::default());
        }
        let file: EventsFile = serde_norway::from_str(text)?;
        let mut names = HashSet::new();
        for hook in &file.webhooks {
            if hook.name.is_empty() || hook.name.contains(['\0', '/']) {
                bail!("webhook name {:?} is invalid; use letters, digits, dots, dashes or underscores", hook.name);
            }
            if !names.insert(hook.name.as_str()) {
                bail!("webhook name {:?} is used twice; give every webhook a unique name", hook.name);
            }
            let url = reqwest::Url::parse(&hook.url)
                .map_err(|error| anyhow::anyhow!("webhook {:?}: invalid url {:?} ({error})", hook.name, hook.url))?;
            if !matches!(url.scheme(), "http" | "https") {
                bail!("webhook {:?}: url {:?} must start with http:// or https://", hook.name, hook.url);
            }
            for event in hook.events.iter().flatten() {
                if !EVENT_TYPES.contains(&event.as_str()) {
                    bail!("webhook {:?}: unknown event type {event:?}; use {}", hook.name, EVENT_TYPES.join(", "));
                }
            }
            if !(1..=10_000).contains(&hook.batch_size) {
                bail!("webhook {:?}: batch_size {} is out of range; use 1 to 10000", hook.name, hook.batch_size);
            }
        }
        Ok(Webhooks { hooks: file.webhooks })
    }

    pub fn get(&self, name: &str) -> Option<&Webhook> {
        self.hooks.iter().find(|hook| hook.name == name)
    }
}

/// Queues events for the webhooks and runs one sender per endpoint.
pub struct Dispatcher {
    spool: Spool,
    policy: Arc<PolicyStore>,
    metrics: Arc<Metrics>,
    client: reqwest::Client,
    /// Wake-ups of the running senders, by webhook name.
    senders: Mutex<HashMap<String, Arc<Notify>>>,
}

impl Dispatcher {
    pub fn new(spool: Spool, policy: Arc<PolicyStore>, metrics: Arc<Metrics>) -> anyhow::Result<Arc<Dispatcher>> {
        let client = reqwest::Client::builder()
            .timeout(POST_TIMEOUT)
            .user_agent(concat!("baton/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Arc::new(Dispatcher {
            spool,
            policy,
            metrics,
            client,
            senders: Mutex::new(HashMap::new()),
        }))
    }

    /// Starts a sender for every webhook with queued events, so events
    /// stored before a restart go out.
    pub fn resume(self: &Arc<Self>) -> anyhow::Result<()> {
        for name in self.spool.webhook_names()? {
            self.wake(&name);
        }
        Ok(())
    }

    /// Queues `event` for every webhook that wants its type.
    pub fn enqueue(self: &Arc<Self>, event: &Event) {
        let policy = self.policy.current();
        let wanted: Vec<&Webhook> = policy.webhooks.hooks.iter().filter(|hook| hook.wants(event.event)).collect();
        if wanted.is_empty() {
            return;
        }
        let value = match serde_json::to_value(event) {
            Ok(value) => value,
            Err(error) => {
                tracing::error!(%error, queue_id = %event.queue_id, "cannot encode event for webhooks");
                return;
            }
        };
        for hook in wanted {
            if let Err(error) = self.spool.push_webhook_event(&hook.name, &value) {
                tracing::error!(webhook = %hook.name, queue_id = %event.queue_id, error = %format!("{error:#}"), "cannot queue event for webhook");
                continue;
            }
            self.metrics.webhook_queued.with_label_values(&[hook.name.as_str()]).inc();
            self.wake(&hook.name);
        }
    }

    /// Wakes the sender of `name`, starting it when it is not running.
    fn wake(self: &Arc<Self>, name: &str) {
        let mut senders = self.senders.lock().expect("webhook senders lock");
        if let Some(notify) = senders.get(name) {
            notify.notify_one();
            return;
        }
        let notify = Arc::new(Notify::new());
        senders.insert(name.to_string(), notify.clone());
        tokio::spawn(self.clone().send_loop(name.to_string(), notify));
    }

    /// Posts the queued events of one webhook, oldest first, until the
    /// webhook is removed from `events.yaml`.
    async fn send_loop(self: Arc<Self>, name: String, notify: Arc<Notify>) {
        let mut backoff = Duration::from_secs(1);
        let mut failing = false;
        loop {
            let policy = self.policy.current();
            let Some(hook) = policy.webhooks.get(&name).cloned() else {
                self.drop_queue(&name);
                return;
            };
            drop(policy);
            let batch = match self.spool.webhook_batch(&name, hook.batch_size) {
                Ok(batch) => batch,
                Err(error) => {
                    tracing::error!(webhook = %name, error = %format!("{error:#}"), "cannot read queued webhook events; retrying in 60s");
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    continue;
                }
            };
            if batch.is_empty() {
                // The timeout also notices a removed webhook without events.
                let _ = tokio::time::timeout(Duration::from_secs(60), notify.notified()).await;
                continue;
            }
            let count = batch.len();
            match self.post(&hook, &batch).await {
                Ok(()) => {
                    if failing {
                        tracing::info!(webhook = %name, "webhook endpoint accepts events again");
                        failing = false;
                    }
                    backoff = Duration::from_secs(1);
                    let keys = batch.into_iter().map(|(key, _)| key);
                    if let Err(error) = self.spool.remove_webhook_events(keys) {
                        tracing::error!(webhook = %name, error = %format!("{error:#}"), "cannot remove posted webhook events; they will be posted again");
                    }
                    self.metrics.webhook_posted.with_label_values(&[name.as_str()]).inc_by(count as u64);
                }
                Err(error) => {
                    self.metrics.webhook_failures.with_label_values(&[name.as_str()]).inc();
                    tracing::warn!(webhook = %name, events = count, %error, retry_in = %humantime::format_duration(backoff), "webhook post failed; events stay queued");
                    failing = true;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Posts one batch. Any response status but 2xx is a failure.
    async fn post(&self, hook: &Webhook, batch: &[(Vec<u8>, serde_json::Value)]) -> Result<(), String> {
        let events: Vec<&serde_json::Value> = batch.iter().map(|(_, event)| event).collect();
        let mut request = self.client.post(&hook.url).json(&events);
        for (name, value) in &hook.headers {
            request = request.header(name, value);
        }
        match request.send().await {
            Ok(response) if response.status().is_success() => Ok(()),
            Ok(response) => Err(format!("endpoint answered HTTP {}", response.status())),
            // The URL may carry a secret, so it stays out of the log.
            Err(error) => Err(error.without_url().to_string()),
        }
    }

    /// Deletes the queue of a webhook that `events.yaml` no longer lists.
    fn drop_queue(&self, name: &str) {
        self.senders.lock().expect("webhook senders lock").remove(name);
        match self.spool.clear_webhook_events(name) {
            Ok(0) => {}
            Ok(dropped) => tracing::warn!(webhook = %name, dropped, "webhook removed from policies/events.yaml; its queued events were dropped"),
            Err(error) => tracing::error!(webhook = %name, error = %format!("{error:#}"), "cannot drop the events of a removed webhook"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_parses() {
        let text = "webhooks:\n  - name: crm\n    url: https://hooks.example.com/baton\n    events: [delivered, bounced]\n    headers:\n      Authorization: Bearer x\n";
        let webhooks = Webhooks::parse(text).unwrap();
        let hook = webhooks.get("crm").unwrap();
        assert!(hook.wants("bounced"));
        assert!(!hook.wants("received"));
        assert_eq!(hook.batch_size, 100);
    }

    #[test]
    fn invalid_files_name_the_problem() {
        let cases = [
            ("webhooks:\n  - { name: a, url: ftp://x }\n", "must start with http"),
            ("webhooks:\n  - { name: a, url: http://x, events: [opened] }\n", "unknown event type \"opened\""),
            ("webhooks:\n  - { name: a, url: http://x }\n  - { name: a, url: http://y }\n", "used twice"),
            ("webhooks:\n  - { name: a, url: http://x, batch_size: 0 }\n", "batch_size 0"),
            ("webhooks:\n  - { name: a, url: http://x, retries: 3 }\n", "unknown field `retries`"),
        ];
        for (text, expected) in cases {
            let error = format!("{:#}", Webhooks::parse(text).unwrap_err());
            assert!(error.contains(expected), "{expected:?} not in {error:?}");
        }
    }
}
