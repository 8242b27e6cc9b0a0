//! Delivery: one task per outbound connection to a recipient domain. It
//! takes that domain's ready jobs from the scheduler one after another and
//! sends them over the same SMTP connection while it stays usable.
//!
//! Delivery only reads the spool's stored bytes; it never runs the pipeline.
//! Every outcome goes back to the spool through [`outcome::apply`].

pub mod client;
pub mod dsn;
pub mod mx;
pub mod outcome;

use std::sync::Arc;
use std::time::Instant;

use client::{Client, Envelope, Failure, Timeouts};
use mx::{RouteError, Target};

use crate::events::AttemptInfo;
use crate::gateway::Gateway;
use crate::intake::address::smtp_path;
use crate::reply::Reply;
use crate::spool::record::unix_now;
use crate::spool::{QueueId, RecipientRecord};

/// Runs one delivery connection for `domain` until its ready queue is empty.
pub async fn run_connection(gateway: Arc<Gateway>, domain: String) {
    let mut worker = Worker {
        gateway: gateway.clone(),
        domain: domain.clone(),
        targets: None,
        client: None,
    };
    while let Some(id) = gateway.scheduler.next_job(&domain) {
        if let Err(error) = worker.deliver(&id).await {
            // The spool could not be read or written. Try the job again
            // later rather than forget it.
            tracing::error!(queue_id = %id, rcpt_domain = %domain, error = %format!("{error:#}"), "delivery failed on a spool error; retrying in 60s");
            gateway
                .scheduler
                .schedule(&gateway, id, domain.clone(), unix_now() + 60);
        }
    }
    worker.close().await;
    gateway.scheduler.connection_closed(&gateway, &domain);
}

struct Worker {
    gateway: Arc<Gateway>,
    domain: String,
    /// Resolved once per connection task; hickory caches by TTL across tasks.
    targets: Option<Result<Vec<Target>, RouteError>>,
    client: Option<Client>,
}

impl Worker {
    async fn deliver(&mut self, id: &QueueId) -> anyhow::Result<()> {
        let spool = &self.gateway.spool;
        let Some(message) = spool.load(id)? else {
            return Ok(());
        };
        let now = unix_now();
        let due: Vec<(u32, RecipientRecord)> = message
            .recipients
            .into_iter()
            .filter(|(_, r)| r.domain == self.domain && r.state.is_pending() && r.next_attempt <= now)
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        let Some(data) = spool.message_data(id)? else {
            anyhow::bail!("message data missing from the spool");
        };

        let (replies, info) = match self.targets().await {
            Ok(targets) => self.attempt(&message.envelope, &due, &data, &targets).await,
            Err(RouteError::Permanent(reply)) | Err(RouteError::Temporary(reply)) => {
                let replies = due.iter().map(|_| (reply.clone(), false)).collect();
                (replies, AttemptInfo::default())
            }
        };
        let results = due
            .into_iter()
            .zip(replies)
            .map(|((index, record), (reply, remote))| outcome::AttemptResult {
                index,
                record,
                reply,
                remote,
            })
            .collect();
        outcome::apply(&self.gateway, id, &message.envelope, &data, results, &info).await
    }

    async fn targets(&mut self) -> Result<Vec<Target>, RouteError> {
        if self.targets.is_none() {
            let config = &self.gateway.config.delivery;
            let route = config
                .routes
                .get(&self.domain)
                .and_then(|text| mx::parse_route(text).ok());
            let resolved = mx::resolve(
                &self.gateway.resolver,
                &self.domain,
                config.remote_port,
                route.as_ref(),
            )
            .await;
            if let Err(RouteError::Temporary(reply) | RouteError::Permanent(reply)) = &resolved {
                tracing::info!(rcpt_domain = %self.domain, reply = %reply.one_line(), "no route");
            }
            self.targets = Some(resolved);
        }
        self.targets.clone().expect("set above")
    }

    /// Sends one message to the due recipients. Returns a reply for each
    /// recipient, in order, with whether the reply came from the server.
    async fn attempt(
        &mut self,
        envelope: &crate::spool::EnvelopeRecord,
        due: &[(u32, RecipientRecord)],
        data: &[u8],
        targets: &[Target],
    ) -> (Vec<(Reply, bool)>, AttemptInfo) {
        let sender = smtp_path(&envelope.sender);
        let paths: Vec<String> = due.iter().map(|(_, r)| smtp_path(&r.address)).collect();
        let recipients: Vec<&str> = paths.iter().map(String::as_str).collect();
        let request = Envelope {
            sender: &sender,
            recipients: &recipients,
            eight_bit: envelope.eight_bit,
            smtputf8: envelope.smtputf8,
        };
        let every = |reply: Reply, remote: bool| due.iter().map(|_| (reply.clone(), remote)).collect::<Vec<_>>();

        for round in 0..2 {
            let reused = self.client.is_some();
            if self.client.is_none() {
                match self.connect(targets).await {
                    Ok(client) => self.client = Some(client),
                    Err((failure, info)) => {
                        let remote = matches!(failure, Failure::Rejected(_));
                        return (every(failure.to_reply(), remote), info);
                    }
                }
            }
            let client = self.client.as_mut().expect("connected above");
            let info = AttemptInfo {
                mx: Some(client.mx.clone()),
                mx_ip: Some(client.address.ip().to_string()),
            };
            if let Some(reply) = check_server_limits(client, &request, data) {
                return (every(reply, false), info);
            }
            let started = Instant::now();
            match client.send(&request, data).await {
                Ok(replies) => {
                    self.gateway
                        .metrics
                        .delivery_seconds
                        .observe(started.elapsed().as_secs_f64());
                    let max = self.gateway.config.delivery.max_messages_per_connection;
                    if !client.reusable || client.transactions >= max {
                        self.close().await;
                    }
                    return (per_recipient(&replies, due.len()), info);
                }
                Err(failure) => {
                    let data_sent = client.data_sent;
                    self.drop_client();
                    // A reused connection fails at once when the server closed
                    // it while idle, so try a fresh one. Not after the data went
                    // out, because the retry could deliver the message twice.
                    if reused && round == 0 && !data_sent {
                        continue;
                    }
                    return (every(failure.to_reply(), false), info);
                }
            }
        }
        unreachable!("the second round always returns")
    }

    /// Connects to the first target that accepts, in order. A TLS handshake
    /// failure is retried once in clear text on the same address.
    async fn connect(&self, targets: &[Target]) -> Result<Client, (Failure, AttemptInfo)> {
        let config = &self.gateway.config;
        let timeouts = Timeouts {
            connect: config.delivery.connect_timeout,
            command: config.delivery.command_timeout,
            data: config.delivery.data_timeout,
        };
        let mut last = None;
        for target in targets {
            let info = AttemptInfo {
                mx: Some(target.mx.clone()),
                mx_ip: Some(target.address.ip().to_string()),
            };
            let mut result = Client::connect(
                &target.mx,
                target.address,
                &config.hostname,
                Some(&self.gateway.tls_connector),
                timeouts,
            )
            .await;
            if let Err(Failure::Tls(error)) = &result {
                tracing::info!(mx = %target.mx, ip = %target.address.ip(), %error, "STARTTLS failed; retrying without TLS");
                result = Client::connect(&target.mx, target.address, &config.hostname, None, timeouts).await;
            }
            match result {
                Ok(client) => {
                    self.gateway.metrics.outbound_connections.inc();
                    return Ok(client);
                }
                Err(failure) => {
                    tracing::info!(rcpt_domain = %self.domain, mx = %target.mx, ip = %target.address.ip(), reply = %failure.to_reply().one_line(), "MX unusable; trying the next");
                    last = Some((failure, info));
                }
            }
        }
        // `resolve` never returns an empty list, so `last` is set.
        let (failure, info) = last.expect("at least one target");
        // A refusal at greeting or EHLO is no verdict on the recipient: the
        // next attempt may reach a healthier host (as Postfix's
        // smtp_skip_5xx_greeting does).
        let failure = match failure {
            Failure::Rejected(reply) if reply.code >= 500 => Failure::Network(format!(
                "all MX hosts refused the session; last: {}",
                reply.one_line()
            )),
            other => other,
        };
        Err((failure, info))
    }

    fn drop_client(&mut self) {
        if self.client.take().is_some() {
            self.gateway.metrics.outbound_connections.dec();
        }
    }

    async fn close(&mut self) {
        if let Some(client) = self.client.take() {
            self.gateway.metrics.outbound_connections.dec();
            client.quit().await;
        }
    }
}

/// Checks what the server declared before sending anything: SIZE and
/// SMTPUTF8 support. Returns the permanent failure when the message cannot
/// be sent to this server.
fn check_server_limits(client: &Client, envelope: &Envelope<'_>, data: &[u8]) -> Option<Reply> {
    if let Some(limit) = client.extensions.size
        && limit > 0
        && data.len() > limit
    {
        return Some(Reply::new(
            552,
            "5.3.4",
            format!("Message of {} bytes exceeds the SIZE limit of {limit} declared by {}", data.len(), client.mx),
        ));
    }
    let needs_utf8 = !envelope.sender.is_ascii() || envelope.recipients.iter().any(|r| !r.is_ascii());
    if needs_utf8 && !client.extensions.smtputf8 {
        return Some(Reply::new(
            553,
            "5.6.7",
            format!("{} does not support SMTPUTF8, which a non-ASCII address requires (RFC 6531)", client.mx),
        ));
    }
    None
}

/// Picks each recipient's deciding reply: MAIL's when MAIL failed, its own
/// RCPT reply when that failed, else the reply after the data.
fn per_recipient(replies: &client::TransactionReplies, count: usize) -> Vec<(Reply, bool)> {
    (0..count)
        .map(|index| {
            if !replies.mail.is_positive() {
                return (replies.mail.clone(), true);
            }
            match replies.recipients.get(index) {
                Some(reply) if !reply.is_positive() => (reply.clone(), true),
                Some(_) => match &replies.data {
                    Some(reply) => (reply.clone(), true),
                    None => (Reply::new(451, "4.4.2", "No reply after the message data"), false),
                },
                None => (Reply::new(451, "4.4.2", "No reply to RCPT"), false),
            }
        })
        .collect()
}
