//! The delivery log: one JSON line per reception and per recipient outcome,
//! appended to `delivery.log` in the spool folder.
//!
//! Lines are written by one task in arrival order and flushed to the file
//! whenever the queue of lines runs empty. The log is a record for
//! operators, not the queue: losing its last lines in a crash loses no mail.

use std::io::Write;
use std::path::Path;

use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::mpsc;

use crate::spool::{EnvelopeRecord, NewMessage, QueueId};

#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// RFC 3339 time in UTC.
    pub time: String,
    /// `received`, `delivered`, `deferred` or `bounced`.
    pub event: &'static str,
    pub queue_id: String,
    /// Envelope sender; empty for the null sender.
    pub sender: String,
    /// One recipient for outcomes; every recipient for `received`.
    pub recipients: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<String>,
    /// The reply that decided the outcome, as one line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    /// MX host name and IP address of the attempt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mx: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mx_ip: Option<String>,
    /// Attempts made so far, this one included.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// For `deferred`: time of the next attempt (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt: Option<String>,
    /// Arrival time of the message (RFC 3339).
    pub received_at: String,
    /// For `received`: the domain the message was DKIM-signed for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dkim_domain: Option<String>,
    /// For `received`: the alignment verdict with its findings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alignment: Option<serde_json::Value>,
    /// The message is a DSN made by this gateway.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dsn: bool,
    /// For `received`: the user the client authenticated as with AUTH.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_user: Option<String>,
    /// Outbound pool of the message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// For outcomes: the source the attempt left from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// MX host and address of one delivery attempt, for outcome events.
#[derive(Debug, Clone, Default)]
pub struct AttemptInfo {
    pub mx: Option<String>,
    pub mx_ip: Option<String>,
    /// The receiving site as a metric label.
    pub site: String,
    /// The receiving site's name, for warmup counters.
    pub site_name: String,
    pub pool: String,
    /// Name of the source the connection left from.
    pub source: String,
    /// The source address could not be bound, so nothing was attempted.
    pub unbindable: bool,
    /// Shutdown began while the attempt waited on a throttle, so nothing
    /// was attempted.
    pub stopped: bool,
}

impl AttemptInfo {
    /// Info of an attempt that shutdown stopped before it began.
    pub fn stopped() -> AttemptInfo {
        AttemptInfo {
            stopped: true,
            ..AttemptInfo::default()
        }
    }
}

impl Event {
    pub fn received(message: &NewMessage) -> Event {
        Event {
            time: format_time(OffsetDateTime::now_utc()),
            event: "received",
            queue_id: message.id.to_string(),
            sender: message.envelope.sender.clone(),
            recipients: message.recipients.iter().map(|r| r.address.clone()).collect(),
            size: Some(message.envelope.size),
            client_ip: Some(message.envelope.client_ip.clone()),
            reply: None,
            mx: None,
            mx_ip: None,
            attempt: None,
            next_attempt: None,
            received_at: format_unix(message.envelope.received_at),
            dkim_domain: None,
            alignment: None,
            dsn: message.envelope.is_dsn,
            auth_user: None,
            pool: Some(message.envelope.pool.clone()).filter(|pool| !pool.is_empty()),
            source: None,
        }
    }

    pub fn outcome(
        event: &'static str,
        id: &QueueId,
        envelope: &EnvelopeRecord,
        recipient: &str,
        reply: String,
        attempt: u32,
        info: &AttemptInfo,
    ) -> Event {
        Event {
            time: format_time(OffsetDateTime::now_utc()),
            event,
            queue_id: id.to_string(),
            sender: envelope.sender.clone(),
            recipients: vec![recipient.to_string()],
            size: Some(envelope.size),
            client_ip: None,
            reply: Some(reply),
            mx: info.mx.clone(),
            mx_ip: info.mx_ip.clone(),
            attempt: Some(attempt),
            next_attempt: None,
            received_at: format_unix(envelope.received_at),
            dkim_domain: None,
            alignment: None,
            dsn: envelope.is_dsn,
            auth_user: None,
            pool: Some(info.pool.clone()).filter(|pool| !pool.is_empty()),
            source: Some(info.source.clone()).filter(|source| !source.is_empty()),
        }
    }
}

pub fn format_time(time: OffsetDateTime) -> String {
    time.format(&Rfc3339).unwrap_or_default()
}

pub fn format_unix(seconds: u64) -> String {
    OffsetDateTime::from_unix_timestamp(seconds as i64)
        .map(format_time)
        .unwrap_or_default()
}

#[derive(Clone)]
pub struct EventLog {
    sender: mpsc::UnboundedSender<Event>,
    webhooks: Option<std::sync::Arc<crate::webhooks::Dispatcher>>,
}

impl EventLog {
    /// Opens `delivery.log` in `folder` for appending and starts the writer.
    /// Every event also goes to `webhooks`, when given.
    pub fn open(folder: &Path, webhooks: Option<std::sync::Arc<crate::webhooks::Dispatcher>>) -> anyhow::Result<EventLog> {
        let path = folder.join("delivery.log");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|error| anyhow::anyhow!("cannot open delivery log {}: {error}", path.display()))?;
        let (sender, mut receiver) = mpsc::unbounded_channel::<Event>();
        std::thread::Builder::new()
            .name("delivery-log".into())
            .spawn(move || {
                let mut writer = std::io::BufWriter::new(file);
                let mut failed = false;
                while let Some(event) = receiver.blocking_recv() {
                    let mut result = write_line(&mut writer, &event);
                    while let Ok(next) = receiver.try_recv() {
                        result = result.and_then(|_| write_line(&mut writer, &next));
                    }
                    result = result.and_then(|_| writer.flush());
                    // Report the first failure, and again after a recovery.
                    match (result, failed) {
                        (Err(error), false) => {
                            tracing::error!(%error, path = %path.display(), "cannot write the delivery log");
                            failed = true;
                        }
                        (Ok(()), true) => failed = false,
                        _ => {}
                    }
                }
            })?;
        Ok(EventLog { sender, webhooks })
    }

    pub fn log(&self, event: Event) {
        if let Some(webhooks) = &self.webhooks {
            webhooks.enqueue(&event);
        }
        let _ = self.sender.send(event);
    }
}

fn write_line(writer: &mut impl Write, event: &Event) -> std::io::Result<()> {
    serde_json::to_writer(&mut *writer, event)?;
    writer.write_all(b"\n")
}
