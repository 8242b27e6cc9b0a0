//! Delivery: one task per outbound connection to a recipient domain. It
//! takes that domain's ready jobs from the scheduler one after another and
//! sends them over the same SMTP connection while it stays usable.
//!
//! Delivery only reads the spool's stored bytes; it never runs the pipeline.
//! Every outcome goes back to the spool through [`outcome::apply`].

pub mod client;
pub mod dsn;
pub mod mta_sts;
pub mod mx;
pub mod outcome;

use std::sync::Arc;
use std::time::Instant;

use client::{Client, Envelope, Failure, Timeouts};
use mx::{RouteError, Target};

use crate::events::AttemptInfo;
use crate::policy::shaping::Action;
use crate::scheduler::Lane;
use crate::scheduler::throttle::SiteView;
use crate::gateway::Gateway;
use crate::intake::address::smtp_path;
use crate::reply::Reply;
use crate::spool::record::unix_now;
use crate::spool::{QueueId, RecipientRecord};

/// Runs one delivery connection for `lane` (a domain, from one source)
/// until its ready queue is empty. The scheduler counted the connection at
/// `site` before starting it.
pub async fn run_connection(gateway: Arc<Gateway>, lane: Lane, site: String) {
    let policy = gateway.policy.current();
    // Source names are unique across pools, and a message whose pool is
    // gone was given a source of the fallback pool.
    let source = policy.pools.sources().find(|source| source.name == lane.source).cloned();
    let mut worker = Worker {
        gateway: gateway.clone(),
        lane: lane.clone(),
        bind: source.as_ref().and_then(|source| source.ip),
        ehlo: source
            .and_then(|source| source.ehlo)
            .unwrap_or_else(|| gateway.config.hostname.clone()),
        targets: None,
        client: None,
        label: policy.shaping.metric_site(&site).to_string(),
        site: site.clone(),
        connection_permitted: false,
        sts: None,
    };

    // Wait for the site's connection rate before taking a job, so a job
    // never waits here while an open connection could send it.
    let view = gateway.scheduler.throttles.view(&site, Some(&lane.source), &policy.shaping);
    let permitted = match &view.connections {
        Some(limiter) => worker.wait_for(limiter, &site, "connection").await,
        None => true,
    };
    worker.connection_permitted = permitted;
    drop(policy);

    while permitted && let Some(id) = gateway.scheduler.next_job(&lane) {
        match worker.deliver(&id).await {
            Ok(Flow::Continue) => {}
            Ok(Flow::Stop) => break,
            Ok(Flow::Unbindable) => {
                gateway.scheduler.reroute(&gateway, &lane, Some(id));
                break;
            }
            Err(error) => {
                // The spool could not be read or written. Try the job again
                // later rather than forget it.
                tracing::error!(queue_id = %id, rcpt_domain = %lane.domain, error = %format!("{error:#}"), "delivery failed on a spool error; retrying in 60s");
                gateway
                    .scheduler
                    .schedule(&gateway, id, lane.domain.clone(), lane.pool.clone(), unix_now() + 60);
            }
        }
    }

    worker.close().await;
    gateway.scheduler.connection_closed(&gateway, &lane, &site);
}

/// Whether a connection goes on to the next job.
enum Flow {
    Continue,
    /// The site is at its connection cap: this connection ends.
    Stop,
    /// The source address cannot be bound: the lane's jobs need another
    /// source.
    Unbindable,
}

struct Worker {
    gateway: Arc<Gateway>,
    lane: Lane,
    /// Address to bind outbound connections to; `None` lets the system choose.
    bind: Option<std::net::IpAddr>,
    /// Name to greet with.
    ehlo: String,
    /// Resolved once per connection task; hickory caches by TTL across tasks.
    targets: Option<Result<Vec<Target>, RouteError>>,
    client: Option<Client>,
    /// The receiving site this connection is counted at.
    site: String,
    /// The site as a metric label.
    label: String,
    /// The site's connection rate already allowed the next connect.
    connection_permitted: bool,
    /// The domain's MTA-STS policy, looked up once per connection task.
    sts: Option<Option<Arc<mta_sts::Policy>>>,
}

/// TLS requirement of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsMode {
    /// STARTTLS when offered, any certificate, clear text when it fails.
    Opportunistic,
    /// STARTTLS required, any certificate (`require_tls` in shaping).
    Required,
    /// STARTTLS required with a certificate valid for the MX host name
    /// (an enforced MTA-STS policy).
    Verified,
}

impl Worker {
    async fn deliver(&mut self, id: &QueueId) -> anyhow::Result<Flow> {
        let spool = &self.gateway.spool;
        let Some(message) = spool.load(id)? else {
            return Ok(Flow::Continue);
        };
        let now = unix_now();
        let due: Vec<(u32, RecipientRecord)> = message
            .recipients
            .into_iter()
            .filter(|(_, r)| r.domain == self.lane.domain && r.state.is_pending() && r.next_attempt <= now)
            .collect();
        if due.is_empty() {
            return Ok(Flow::Continue);
        }
        let Some(data) = spool.message_data(id)? else {
            anyhow::bail!("message data missing from the spool");
        };

        let policy = self.gateway.policy.current();
        let targets = self.targets().await;
        let site = self.site.clone();
        let current = self
            .gateway
            .scheduler
            .throttles
            .view(&site, Some(&self.lane.source), &policy.shaping);
        if let Some(until) = current.suspended_until {
            self.gateway
                .scheduler
                .schedule(&self.gateway, id.clone(), self.lane.domain.clone(), self.lane.pool.clone(), until);
            return Ok(Flow::Continue);
        }
        let view = Some((site, current));

        let (mut replies, mut info) = match &targets {
            Ok(targets) => {
                let (site, current) = view.as_ref().expect("set for resolved targets");
                self.attempt(&message.envelope, &due, &data, targets, site, current).await
            }
            Err(RouteError::Permanent(reply)) | Err(RouteError::Temporary(reply)) => {
                let replies = due.iter().map(|_| (reply.clone(), false)).collect();
                (replies, AttemptInfo::default())
            }
        };
        if info.unbindable {
            return Ok(Flow::Unbindable);
        }
        if info.stopped {
            // Shutting down: the recipients stay queued as they were.
            return Ok(Flow::Stop);
        }

        info.site = self.label.clone();
        info.site_name = self.site.clone();
        info.pool = self.lane.pool.clone();
        info.source = self.lane.source.clone();
        let mut bounce = vec![false; replies.len()];
        let mut flow = Flow::Continue;
        if let Some((site, _)) = &view {
            self.react_to_replies(site, &policy.shaping, &mut replies, &mut bounce);
            let now_view = self.gateway.scheduler.throttles.view(site, None, &policy.shaping);
            // A backoff may have lowered the cap below the connections open.
            if self
                .gateway
                .scheduler
                .over_connection_cap(site, &self.lane.source, &now_view.limits)
            {
                flow = Flow::Stop;
            }
        }
        let results = due
            .into_iter()
            .zip(replies)
            .zip(bounce)
            .map(|(((index, record), (reply, remote)), force_bounce)| outcome::AttemptResult {
                index,
                record,
                reply,
                remote,
                force_bounce,
            })
            .collect();
        outcome::apply(&self.gateway, id, &message.envelope, &data, results, &info).await?;
        Ok(flow)
    }

    /// Applies the first response rule that matches a 4xx or 5xx reply from
    /// the server: a backoff or suspension for the site, or a bounce of the
    /// recipients that got the reply.
    fn react_to_replies(
        &self,
        site: &str,
        shaping: &crate::policy::shaping::Shaping,
        replies: &mut [(Reply, bool)],
        bounce: &mut [bool],
    ) {
        let mut throttled = false;
        for (index, (reply, remote)) in replies.iter().enumerate() {
            if !*remote || reply.code < 400 {
                continue;
            }
            let Some(rule) = shaping.match_reply(site, &reply.status(), &reply.text()) else {
                continue;
            };
            let metric_site = shaping.metric_site(site);
            match rule.action {
                Action::Bounce => {
                    bounce[index] = true;
                    self.gateway
                        .metrics
                        .shaping_transitions
                        .with_label_values(&[metric_site, &rule.name(), rule.action.label()])
                        .inc();
                }
                Action::Backoff | Action::Suspend if !throttled => {
                    throttled = true;
                    self.gateway.scheduler.throttles.apply(site, rule, shaping, &reply.one_line());
                    self.gateway
                        .metrics
                        .shaping_transitions
                        .with_label_values(&[metric_site, &rule.name(), rule.action.label()])
                        .inc();
                }
                _ => {}
            }
        }
    }

    async fn targets(&mut self) -> Result<Vec<Target>, RouteError> {
        if self.targets.is_none() {
            let config = &self.gateway.config.delivery;
            let route = config
                .routes
                .get(&self.lane.domain)
                .and_then(|text| mx::parse_route(text).ok());
            let resolved = mx::resolve(
                &self.gateway.resolver,
                &self.gateway.metrics,
                &self.lane.domain,
                config.remote_port,
                route.as_ref(),
            )
            .await;
            if let Err(RouteError::Temporary(reply) | RouteError::Permanent(reply)) = &resolved {
                tracing::info!(rcpt_domain = %self.lane.domain, reply = %reply.one_line(), "no route");
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
        site: &str,
        view: &SiteView,
    ) -> (Vec<(Reply, bool)>, AttemptInfo) {
        let every = |reply: Reply, remote: bool| due.iter().map(|_| (reply.clone(), remote)).collect::<Vec<_>>();

        let mut tls_mode = if view.limits.require_tls { TlsMode::Required } else { TlsMode::Opportunistic };
        let mut allowed: Vec<Target> = targets.to_vec();
        if let Some(policy) = self.sts_policy().await {
            let matching: Vec<Target> = targets.iter().filter(|target| policy.allows(&target.mx)).cloned().collect();
            match policy.mode {
                mta_sts::Mode::Enforce if matching.is_empty() => {
                    let text = format!(
                        "no MX host of {} matches its MTA-STS policy (mx: {})",
                        self.lane.domain,
                        policy.mx.join(", ")
                    );
                    return (every(Reply::new(451, "4.7.5", text), false), AttemptInfo::default());
                }
                mta_sts::Mode::Enforce => {
                    allowed = matching;
                    tls_mode = TlsMode::Verified;
                }
                mta_sts::Mode::Testing if matching.len() < targets.len() => {
                    tracing::info!(rcpt_domain = %self.lane.domain, "MTA-STS policy in testing mode lists not every MX host; delivering as usual");
                }
                _ => {}
            }
        }
        let targets = allowed.as_slice();

        for round in 0..2 {
            let reused = self.client.is_some();
            if self.client.is_none() {
                if let Some(limiter) = &view.connections
                    && !self.connection_permitted
                    && !self.wait_for(limiter, site, "connection").await
                {
                    return (Vec::new(), AttemptInfo::stopped());
                }
                self.connection_permitted = false;
                match self.connect(targets, tls_mode).await {
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
                ..AttemptInfo::default()
            };
            // Addresses go out as the client gave them; only for a server
            // without SMTPUTF8 is an IDN domain written in A-labels.
            let utf8 = client.extensions.smtputf8;
            let sender = smtp_path(&wire_address(&envelope.sender, utf8));
            let paths: Vec<String> = due.iter().map(|(_, r)| smtp_path(&wire_address(&r.address, utf8))).collect();
            let recipients: Vec<&str> = paths.iter().map(String::as_str).collect();
            let request = Envelope {
                sender: &sender,
                recipients: &recipients,
                eight_bit: envelope.eight_bit,
                smtputf8: envelope.smtputf8,
            };
            if let Some(reply) = check_server_limits(client, &request, data) {
                return (every(reply, false), info);
            }
            if let Some(limiter) = &view.messages {
                let limiter = limiter.clone();
                if !self.wait_for(&limiter, site, "message").await {
                    return (Vec::new(), AttemptInfo::stopped());
                }
            }
            let metrics = &self.gateway.metrics;
            metrics
                .delivery_attempts
                .with_label_values(&[self.lane.pool.as_str(), self.lane.source.as_str(), self.label.as_str()])
                .inc();
            let client = self.client.as_mut().expect("connected above");
            let started = Instant::now();
            match client.send(&request, data).await {
                Ok(replies) => {
                    metrics
                        .delivery_seconds
                        .with_label_values(&[self.label.as_str()])
                        .observe(started.elapsed().as_secs_f64());
                    let tls = if client.tls { "yes" } else { "no" };
                    metrics.delivery_tls.with_label_values(&[self.label.as_str(), tls]).inc();
                    let max = view.limits.max_messages_per_connection;
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

    /// Returns the domain's MTA-STS policy, looked up once per connection
    /// task; `None` when MTA-STS is off or the domain has no policy.
    async fn sts_policy(&mut self) -> Option<Arc<mta_sts::Policy>> {
        if !self.gateway.config.delivery.mta_sts {
            return None;
        }
        if self.sts.is_none() {
            let policy = self.gateway.mta_sts.policy(&self.gateway.resolver, &self.lane.domain).await;
            self.sts = Some(policy);
        }
        self.sts.clone().flatten()
    }

    /// Waits until `limiter` allows one more event, and records the wait.
    /// Waits until `limiter` allows the next connection or message.
    /// Returns false, at once, when shutdown starts during the wait.
    async fn wait_for(&self, limiter: &crate::scheduler::throttle::Limiter, site: &str, what: &'static str) -> bool {
        let started = Instant::now();
        let allowed = tokio::select! {
            _ = limiter.until_ready() => true,
            _ = self.gateway.scheduler.drained() => false,
        };
        if !allowed {
            return false;
        }
        let waited = started.elapsed();
        if waited.as_millis() > 0 {
            tracing::trace!(site, what, waited_ms = waited.as_millis() as u64, "throttle wait");
        }
        self.gateway
            .metrics
            .shaping_wait_seconds
            .with_label_values(&[what])
            .observe(waited.as_secs_f64());
        true
    }

    /// Connects to the first target that accepts, in order. A TLS handshake
    /// failure is retried once in clear text on the same address, unless the
    /// site's shaping policy has `require_tls`: then a host without TLS is
    /// skipped like one that is down.
    async fn connect(&self, targets: &[Target], tls_mode: TlsMode) -> Result<Client, (Failure, AttemptInfo)> {
        let require_tls = tls_mode != TlsMode::Opportunistic;
        let connector = match tls_mode {
            TlsMode::Verified => &self.gateway.tls_verified,
            _ => &self.gateway.tls_connector,
        };
        let config = &self.gateway.config;
        let timeouts = Timeouts {
            connect: config.delivery.connect_timeout,
            command: config.delivery.command_timeout,
            data: config.delivery.data_timeout,
        };
        let mut last = None;
        // A bound source reaches only addresses of its own family.
        let reachable: Vec<&Target> = targets
            .iter()
            .filter(|target| self.bind.is_none_or(|ip| ip.is_ipv4() == target.address.is_ipv4()))
            .collect();
        if reachable.is_empty() {
            let family = if self.bind.is_some_and(|ip| ip.is_ipv4()) { "IPv4" } else { "IPv6" };
            let text = format!("no MX address of {} is reachable from {family} source {}", self.lane.domain, self.lane.source);
            return Err((Failure::Network(text), AttemptInfo::default()));
        }
        for target in reachable {
            let info = AttemptInfo {
                mx: Some(target.mx.clone()),
                mx_ip: Some(target.address.ip().to_string()),
                ..AttemptInfo::default()
            };
            let mut result = Client::connect(
                &target.mx,
                target.address,
                self.bind,
                &self.ehlo,
                Some(connector),
                timeouts,
            )
            .await;
            if let Err(Failure::Tls(error)) = &result
                && !require_tls
            {
                tracing::info!(mx = %target.mx, ip = %target.address.ip(), %error, "STARTTLS failed; retrying without TLS");
                result = Client::connect(&target.mx, target.address, self.bind, &self.ehlo, None, timeouts).await;
            }
            if let Err(Failure::Unbindable(text)) = &result {
                let until = self.gateway.scheduler.sources.pause(&self.lane.source);
                tracing::warn!(source = %self.lane.source, pool = %self.lane.pool, error = %text, until = %crate::events::format_unix(until), "source address cannot be bound; its mail goes to the pool's other sources");
                let info = AttemptInfo {
                    unbindable: true,
                    ..info
                };
                return Err((result.err().expect("matched an error"), info));
            }
            if let Ok(client) = &result
                && require_tls
                && !client.tls
            {
                let reason = match tls_mode {
                    TlsMode::Verified => format!("the MTA-STS policy of {}", self.lane.domain),
                    _ => format!("site {} by policies/shaping.yaml", self.site),
                };
                let text = format!(
                    "TLS is required for {reason}, but {}[{}] offered no STARTTLS or refused it",
                    target.mx,
                    target.address.ip()
                );
                if let Ok(client) = result {
                    client.quit().await;
                }
                result = Err(Failure::Tls(text));
            }
            match result {
                Ok(client) => {
                    self.gateway
                        .metrics
                        .outbound_connections
                        .with_label_values(&[self.lane.source.as_str(), self.label.as_str()])
                        .inc();
                    return Ok(client);
                }
                Err(failure) => {
                    tracing::info!(rcpt_domain = %self.lane.domain, mx = %target.mx, ip = %target.address.ip(), reply = %failure.to_reply().one_line(), "MX unusable; trying the next");
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
            self.gateway
                .metrics
                .outbound_connections
                .with_label_values(&[self.lane.source.as_str(), self.label.as_str()])
                .dec();
        }
    }

    async fn close(&mut self) {
        if let Some(client) = self.client.take() {
            self.gateway
                .metrics
                .outbound_connections
                .with_label_values(&[self.lane.source.as_str(), self.label.as_str()])
                .dec();
            client.quit().await;
        }
    }
}

/// Returns `address` as it goes to a server: unchanged, except that for a
/// server without SMTPUTF8 a non-ASCII domain is converted to A-labels
/// (the same name, RFC 5890). A non-ASCII local part stays, and
/// [`check_server_limits`] then fails the recipient.
fn wire_address(address: &str, server_utf8: bool) -> std::borrow::Cow<'_, str> {
    if server_utf8 || address.is_ascii() {
        return std::borrow::Cow::Borrowed(address);
    }
    match address.rsplit_once('@') {
        Some((local, domain)) if !domain.is_ascii() => match idna::domain_to_ascii(domain) {
            Ok(ascii) => std::borrow::Cow::Owned(format!("{local}@{ascii}")),
            Err(_) => std::borrow::Cow::Borrowed(address),
        },
        _ => std::borrow::Cow::Borrowed(address),
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
