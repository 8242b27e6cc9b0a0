//! The HTTP listener: `/healthz`, `/metrics` (Prometheus text format) and
//! `/queue` (the queue as JSON, read by `baton queue list`).

use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};

use crate::gateway::Gateway;
use crate::scheduler::DomainSummary;
use crate::spool::QueuedMessage;

pub fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/queue", get(queue))
        .route("/queue/{id}", get(explain))
        .with_state(gateway)
}

async fn metrics(State(gateway): State<Arc<Gateway>>) -> Response {
    gateway
        .metrics
        .spool_bytes
        .set(gateway.spool.size_on_disk() as i64);
    update_queue_gauges(&gateway);
    let (backoff, suspended) = gateway.scheduler.throttles.counts();
    gateway.metrics.sites_throttled.with_label_values(&["backoff"]).set(backoff as i64);
    gateway.metrics.sites_throttled.with_label_values(&["suspended"]).set(suspended as i64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        gateway.metrics.render(),
    )
        .into_response()
}

/// Sets the queue gauges by site from the scheduler's queues.
fn update_queue_gauges(gateway: &Gateway) {
    let policy = gateway.policy.current();
    let now_micros = crate::spool::record::unix_now() * 1_000_000;
    let mut by_site: std::collections::HashMap<String, (i64, i64, u64)> = std::collections::HashMap::new();
    for (domain, (ready, waiting, oldest)) in gateway.scheduler.domain_stats() {
        let site = match gateway.scheduler.throttles.site_of(&domain) {
            Some(site) => policy.shaping.metric_site(&site).to_string(),
            None => policy.shaping.metric_site(&domain).to_string(),
        };
        let entry = by_site.entry(site).or_insert((0, 0, u64::MAX));
        entry.0 += ready as i64;
        entry.1 += waiting as i64;
        entry.2 = entry.2.min(oldest);
    }
    let metrics = &gateway.metrics;
    metrics.queue_jobs.reset();
    metrics.queue_oldest_age_seconds.reset();
    for (site, (ready, waiting, oldest)) in by_site {
        metrics.queue_jobs.with_label_values(&[site.as_str(), "ready"]).set(ready);
        metrics.queue_jobs.with_label_values(&[site.as_str(), "waiting"]).set(waiting);
        let age = now_micros.saturating_sub(oldest) / 1_000_000;
        metrics.queue_oldest_age_seconds.with_label_values(&[site.as_str()]).set(age as i64);
    }
}

#[derive(Deserialize)]
struct QueueParams {
    /// Maximum number of messages to list; default 1000.
    limit: Option<usize>,
}

/// The queue as `/queue` returns it and `baton queue list` prints it.
#[derive(Serialize, Deserialize)]
pub struct QueueListing {
    pub domains: Vec<DomainSummary>,
    pub messages: Vec<MessageListing>,
    /// True when `limit` cut the message list short.
    pub truncated: bool,
}

#[derive(Serialize, Deserialize)]
pub struct MessageListing {
    pub id: String,
    pub sender: String,
    pub received_at: u64,
    pub size: u64,
    pub recipients: Vec<crate::spool::RecipientRecord>,
}

impl From<QueuedMessage> for MessageListing {
    fn from(message: QueuedMessage) -> Self {
        MessageListing {
            id: message.id.to_string(),
            sender: message.envelope.sender,
            received_at: message.envelope.received_at,
            size: message.envelope.size,
            recipients: message.recipients.into_iter().map(|(_, r)| r).collect(),
        }
    }
}

/// Reads up to `limit` messages from the spool.
pub fn list_spool(spool: &crate::spool::Spool, limit: usize) -> anyhow::Result<(Vec<MessageListing>, bool)> {
    let mut messages = Vec::new();
    for message in spool.scan() {
        if messages.len() == limit {
            return Ok((messages, true));
        }
        messages.push(MessageListing::from(message?));
    }
    Ok((messages, false))
}

async fn explain(State(gateway): State<Arc<Gateway>>, axum::extract::Path(id): axum::extract::Path<String>) -> Response {
    let Some(queue_id) = crate::spool::QueueId::parse(&id) else {
        return (StatusCode::BAD_REQUEST, format!("{id:?} is not a queue id; queue ids are 20 hex digits, as baton queue list shows\n")).into_response();
    };
    match crate::explain::explain_running(&gateway, &queue_id) {
        Ok(Some(text)) => text.into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, format!("{id} is not in the queue (delivered, bounced or never queued)\n")).into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot read the spool: {error:#}\n")).into_response(),
    }
}

async fn queue(State(gateway): State<Arc<Gateway>>, Query(params): Query<QueueParams>) -> Response {
    let limit = params.limit.unwrap_or(1000);
    let spool = gateway.spool.clone();
    let listed = tokio::task::spawn_blocking(move || list_spool(&spool, limit)).await;
    match listed {
        Ok(Ok((messages, truncated))) => axum::Json(QueueListing {
            domains: gateway.scheduler.summary(),
            messages,
            truncated,
        })
        .into_response(),
        Ok(Err(error)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot read the spool: {error:#}\n")).into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, format!("queue listing failed: {error}\n")).into_response(),
    }
}
