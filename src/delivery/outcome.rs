//! Recipient outcomes after an attempt (RFC 5321 section 4.2.1). A 2xx reply
//! delivers the recipient. A 4xx reply or a network error defers it by the
//! `delivery.retry` schedule until `delivery.max_age`, and then it bounces.
//! A 5xx reply bounces it at once. Bounces produce one DSN per attempt.

use std::sync::Arc;

use crate::events::{AttemptInfo, Event, format_unix};
use crate::gateway::Gateway;
use crate::reply::{Class, Reply};
use crate::spool::record::unix_now;
use crate::spool::{EnvelopeRecord, QueueId, RcptState, RecipientRecord};

use super::dsn;

/// The reply one recipient got in one attempt.
pub struct AttemptResult {
    pub index: u32,
    pub record: RecipientRecord,
    pub reply: Reply,
    /// The reply came from the server, not from the gateway.
    pub remote: bool,
    /// A response rule with `action: bounce` matched the reply.
    pub force_bounce: bool,
}

/// Records the results, queues a DSN for bounces, schedules the next
/// attempt for deferred recipients and removes the message once no
/// recipient is pending.
pub async fn apply(
    gateway: &Arc<Gateway>,
    id: &QueueId,
    envelope: &EnvelopeRecord,
    data: &[u8],
    results: Vec<AttemptResult>,
    info: &AttemptInfo,
) -> anyhow::Result<()> {
    let config = &gateway.config.delivery;
    let now = unix_now();
    let expires = envelope.received_at + config.max_age.as_secs();
    let mut updates = Vec::with_capacity(results.len());
    let mut failed = Vec::new();
    let mut next_due: Option<u64> = None;
    let mut domain = String::new();

    for result in results {
        let mut record = result.record;
        let reply = result.reply;
        record.attempts += 1;
        record.last_reply = Some(reply.one_line());
        domain.clone_from(&record.domain);
        let class_label = match (result.remote, reply.class()) {
            (false, _) => "network",
            (true, Class::Positive) => "2xx",
            (true, Class::Transient) => "4xx",
            (true, _) => "5xx",
        };
        let status = reply.status();
        let code = if class_label == "4xx" || class_label == "5xx" { crate::metrics::code_label(&status) } else { "" };
        let site = if info.site.is_empty() { "other" } else { info.site.as_str() };
        gateway.metrics.delivery_replies.with_label_values(&[site, class_label, code]).inc();

        let class = if result.force_bounce { Class::Permanent } else { reply.class() };
        let (event, status) = match class {
            Class::Positive => {
                record.state = RcptState::Delivered;
                ("delivered", None)
            }
            Class::Transient | Class::Intermediate if now < expires => {
                let step = (record.attempts as usize - 1).min(config.retry.len() - 1);
                record.state = RcptState::Deferred;
                record.next_attempt = now + config.retry[step].as_secs().max(1);
                next_due = Some(next_due.map_or(record.next_attempt, |due| due.min(record.next_attempt)));
                ("deferred", None)
            }
            Class::Transient | Class::Intermediate => {
                record.state = RcptState::Bounced;
                // RFC 3463: X.4.7, delivery time expired.
                ("bounced", Some("5.4.7".to_string()))
            }
            Class::Permanent => {
                record.state = RcptState::Bounced;
                // A 4xx reply bounced by a response rule reports a 5.x.x status.
                let status = reply.status();
                let status = if status.starts_with('4') { format!("5{}", &status[1..]) } else { status };
                ("bounced", Some(status))
            }
        };
        gateway
            .metrics
            .delivery_results
            .with_label_values(&[info.pool.as_str(), info.source.as_str(), site, event])
            .inc();
        gateway.scheduler.sources.record_outcome(gateway, &info.source, &info.site_name, event);

        let mut line = Event::outcome(event, id, envelope, &record.address, reply.one_line(), record.attempts, info);
        if record.state == RcptState::Deferred {
            line.next_attempt = Some(format_unix(record.next_attempt));
        }
        gateway.events.log(line);
        // The delivery log has every outcome; the process log only needs
        // the failures at the default level.
        if record.state == RcptState::Delivered {
            tracing::debug!(queue_id = %id, rcpt_domain = %record.domain, mx = info.mx.as_deref().unwrap_or("-"), result = event, reply = %reply.one_line(), "delivery attempt");
        } else {
            tracing::info!(queue_id = %id, rcpt_domain = %record.domain, mx = info.mx.as_deref().unwrap_or("-"), result = event, reply = %reply.one_line(), "delivery attempt");
        }

        if let Some(status) = status {
            let diagnostic = if status == "5.4.7" {
                format!("delivery time expired after {} attempts; last reply: {}", record.attempts, reply.one_line())
            } else {
                reply.one_line()
            };
            failed.push(dsn::Failed {
                recipient: record.address.clone(),
                status,
                diagnostic,
                remote: result.remote,
                remote_mta: info.mx.clone().filter(|_| result.remote),
            });
        }
        updates.push((result.index, record));
    }

    let notification = dsn::build(&gateway.config.hostname, id, envelope, data, &failed);
    gateway.spool.update(id, &updates, notification.as_ref())?;
    if let Some(notification) = &notification {
        // The DSN must be durable before anything depends on it; the
        // recipients' new states are in the same batch.
        gateway.spool.flush().await?;
        gateway.metrics.dsn_sent.inc();
        gateway.events.log(Event::received(notification));
        gateway.queue_new(notification);
    }
    if let Some(due) = next_due {
        gateway
            .scheduler
            .schedule(gateway, id.clone(), domain, envelope.pool.clone(), due);
    }
    if gateway.spool.remove_if_complete(id)? {
        gateway.metrics.queued_messages.dec();
    }
    Ok(())
}
