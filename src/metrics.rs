//! Prometheus metrics, all declared here. Label values come from bounded
//! sets: reasons and results from code, sites from the shaping policy
//! (providers and configured domains, every other domain as `other`),
//! pools and sources from policy (`default` until pools exist), enhanced
//! status codes as sent by receivers. Never a recipient address or queue id.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Reason intake rejected a message or recipient: the `reason` label value.
#[derive(Debug, Clone, Copy)]
pub enum RejectReason {
    RelayDenied,
    Size,
    Syntax,
    BareLf,
    LineLength,
    SpoolWrite,
    Unsigned,
    Alignment,
    Unsubscribe,
    Pool,
    /// MAIL from a client outside `smtp.relay_networks` that has not
    /// authenticated.
    AuthRequired,
    /// A header section over `smtp.max_header_size` or with more fields
    /// than `smtp.max_header_fields`.
    HeaderLimit,
}

impl RejectReason {
    fn label(self) -> &'static str {
        match self {
            RejectReason::RelayDenied => "relay_denied",
            RejectReason::Size => "size",
            RejectReason::Syntax => "syntax",
            RejectReason::BareLf => "bare_lf",
            RejectReason::LineLength => "line_length",
            RejectReason::SpoolWrite => "spool_write",
            RejectReason::Unsigned => "unsigned",
            RejectReason::Alignment => "alignment",
            RejectReason::Unsubscribe => "unsubscribe",
            RejectReason::Pool => "pool",
            RejectReason::AuthRequired => "auth_required",
            RejectReason::HeaderLimit => "header_limit",
        }
    }
}

pub struct Metrics {
    pub registry: Registry,
    // Intake.
    pub intake_connections: IntCounter,
    pub intake_sessions: IntGauge,
    pub messages_received: IntCounter,
    pub bytes_received: IntCounter,
    rejected: IntCounterVec,
    pub acceptance_seconds: Histogram,
    // Pipeline.
    /// Accepted messages by `result`: signed or unsigned.
    pub dkim_messages: IntCounterVec,
    /// Signatures made by `algorithm`.
    pub dkim_signatures: IntCounterVec,
    /// Alignment verdicts of accepted messages by `domain`, `result`, `mode`.
    pub alignment_verdicts: IntCounterVec,
    /// Accepted messages by `pool`.
    pub routed_messages: IntCounterVec,
    // Queue.
    pub queued_messages: IntGauge,
    /// Queued (message, domain) jobs by `site` and `state` (ready, waiting).
    pub queue_jobs: IntGaugeVec,
    pub queue_oldest_age_seconds: IntGaugeVec,
    pub spool_bytes: IntGauge,
    // Delivery.
    pub delivery_attempts: IntCounterVec,
    /// Recipient outcomes by `pool`, `source`, `site`, `result`.
    pub delivery_results: IntCounterVec,
    /// Final replies per recipient by `site`, `class` (2xx, 4xx, 5xx,
    /// network) and `code` (the enhanced code of a 4xx or 5xx).
    pub delivery_replies: IntCounterVec,
    pub delivery_seconds: HistogramVec,
    /// Transactions by `site` and `tls` (yes or no).
    pub delivery_tls: IntCounterVec,
    pub outbound_connections: IntGaugeVec,
    pub dsn_sent: IntCounter,
    // Shaping.
    /// Backoff, suspension and bounce rule matches by `site`, `rule`, `action`.
    pub shaping_transitions: IntCounterVec,
    /// Time deliveries waited on a site's rate limits, by `limit`.
    pub shaping_wait_seconds: HistogramVec,
    /// Sites now in backoff and in suspension, by `state`.
    pub sites_throttled: IntGaugeVec,
    // Warmup, by `source` and `site`.
    pub warmup_day: IntGaugeVec,
    pub warmup_cap: IntGaugeVec,
    pub warmup_sent: IntGaugeVec,
    pub warmup_holds: IntCounterVec,
    // Webhooks, by `webhook`.
    pub webhook_queued: IntCounterVec,
    pub webhook_posted: IntCounterVec,
    pub webhook_failures: IntCounterVec,
    // DNS.
    pub dns_lookups: IntCounterVec,
    pub dns_lookup_seconds: HistogramVec,
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("valid metric")
}

fn counters(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

fn gauges(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric")
}

fn histograms(name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels).expect("valid metric")
}

/// Latency buckets in seconds, from 1 ms to 10 s.
const LATENCY: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

impl Metrics {
    pub fn new() -> Metrics {
        let metrics = Metrics {
            registry: Registry::new(),
            intake_connections: counter("baton_intake_connections_total", "SMTP connections accepted by intake"),
            intake_sessions: IntGauge::new("baton_intake_sessions", "SMTP sessions now open").expect("valid metric"),
            messages_received: counter("baton_messages_received_total", "Messages accepted and queued"),
            bytes_received: counter("baton_received_bytes_total", "Bytes of accepted messages, as stored"),
            rejected: counters(
                "baton_messages_rejected_total",
                "Messages or recipients rejected at intake, by reason",
                &["reason"],
            ),
            acceptance_seconds: Histogram::with_opts(
                HistogramOpts::new("baton_acceptance_seconds", "Time from the end of message data to the 250 reply")
                    .buckets(LATENCY.to_vec()),
            )
            .expect("valid metric"),
            dkim_messages: counters(
                "baton_dkim_messages_total",
                "Accepted messages by DKIM result: signed or unsigned",
                &["result"],
            ),
            dkim_signatures: counters("baton_dkim_signatures_total", "DKIM signatures made, by algorithm", &["algorithm"]),
            alignment_verdicts: counters(
                "baton_alignment_verdicts_total",
                "Alignment verdicts of accepted messages by sending domain (configured ones, else other), result and mode",
                &["domain", "result", "mode"],
            ),
            routed_messages: counters("baton_routed_messages_total", "Accepted messages by outbound pool", &["pool"]),
            queued_messages: IntGauge::new(
                "baton_queue_messages",
                "Messages in the spool with at least one recipient pending",
            )
            .expect("valid metric"),
            queue_jobs: gauges(
                "baton_queue_jobs",
                "Queued deliveries (one message to one domain) by site and state: ready waits for a connection, waiting for its time",
                &["site", "state"],
            ),
            queue_oldest_age_seconds: gauges(
                "baton_queue_oldest_age_seconds",
                "Age of the oldest queued message, by site",
                &["site"],
            ),
            spool_bytes: IntGauge::new("baton_spool_bytes", "Bytes the spool takes on disk").expect("valid metric"),
            delivery_attempts: counters(
                "baton_delivery_attempts_total",
                "SMTP transactions attempted, by pool, source and site",
                &["pool", "source", "site"],
            ),
            delivery_results: counters(
                "baton_delivery_recipients_total",
                "Recipient delivery outcomes, by pool, source, site and result (delivered, deferred, bounced)",
                &["pool", "source", "site", "result"],
            ),
            delivery_replies: counters(
                "baton_delivery_replies_total",
                "Deciding reply per recipient, by site, class (2xx, 4xx, 5xx, network) and enhanced code",
                &["site", "class", "code"],
            ),
            delivery_seconds: histograms(
                "baton_delivery_transaction_seconds",
                "Time of one SMTP transaction to an MX host, MAIL to final reply, by site",
                &["site"],
                LATENCY,
            ),
            delivery_tls: counters(
                "baton_delivery_tls_total",
                "SMTP transactions by site and whether TLS was used",
                &["site", "tls"],
            ),
            outbound_connections: gauges(
                "baton_outbound_connections",
                "Delivery connections now open, by source and site",
                &["source", "site"],
            ),
            dsn_sent: counter("baton_dsn_queued_total", "Delivery status notifications queued to senders"),
            shaping_transitions: counters(
                "baton_shaping_transitions_total",
                "Response rule matches by site (providers and configured domains, else other), rule and action",
                &["site", "rule", "action"],
            ),
            shaping_wait_seconds: histograms(
                "baton_shaping_wait_seconds",
                "Time a delivery waited on a site's message or connection rate",
                &["limit"],
                &[0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0],
            ),
            sites_throttled: gauges("baton_sites_throttled", "Sites now in backoff or suspension, by state", &["state"]),
            warmup_day: gauges("baton_warmup_day", "Warmup schedule day of a source at a site, from 1", &["source", "site"]),
            warmup_cap: gauges(
                "baton_warmup_cap",
                "Messages a warming source may send to a site today; 0 once the source is warm",
                &["source", "site"],
            ),
            warmup_sent: gauges("baton_warmup_sent", "Messages a warming source sent to a site today", &["source", "site"]),
            warmup_holds: counters(
                "baton_warmup_holds_total",
                "Days a source's warmup did not advance at a site because its deferral or bounce rate was too high",
                &["source", "site"],
            ),
            webhook_queued: counters("baton_webhook_events_queued_total", "Events queued for a webhook", &["webhook"]),
            webhook_posted: counters(
                "baton_webhook_events_posted_total",
                "Events a webhook endpoint accepted with a 2xx answer",
                &["webhook"],
            ),
            webhook_failures: counters(
                "baton_webhook_post_failures_total",
                "Batch posts that failed (network error, timeout or non-2xx answer); the events stay queued",
                &["webhook"],
            ),
            dns_lookups: counters(
                "baton_dns_lookups_total",
                "DNS lookups made for delivery, by record type and result (ok, nxdomain, nodata, error)",
                &["type", "result"],
            ),
            dns_lookup_seconds: histograms(
                "baton_dns_lookup_seconds",
                "Time of DNS lookups made for delivery, by record type",
                &["type"],
                LATENCY,
            ),
        };
        metrics.register_all();
        metrics
    }

    fn register_all(&self) {
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(self.intake_connections.clone()),
            Box::new(self.intake_sessions.clone()),
            Box::new(self.messages_received.clone()),
            Box::new(self.bytes_received.clone()),
            Box::new(self.rejected.clone()),
            Box::new(self.acceptance_seconds.clone()),
            Box::new(self.dkim_messages.clone()),
            Box::new(self.dkim_signatures.clone()),
            Box::new(self.alignment_verdicts.clone()),
            Box::new(self.routed_messages.clone()),
            Box::new(self.queued_messages.clone()),
            Box::new(self.queue_jobs.clone()),
            Box::new(self.queue_oldest_age_seconds.clone()),
            Box::new(self.spool_bytes.clone()),
            Box::new(self.delivery_attempts.clone()),
            Box::new(self.delivery_results.clone()),
            Box::new(self.delivery_replies.clone()),
            Box::new(self.delivery_seconds.clone()),
            Box::new(self.delivery_tls.clone()),
            Box::new(self.outbound_connections.clone()),
            Box::new(self.dsn_sent.clone()),
            Box::new(self.shaping_transitions.clone()),
            Box::new(self.shaping_wait_seconds.clone()),
            Box::new(self.sites_throttled.clone()),
            Box::new(self.warmup_day.clone()),
            Box::new(self.warmup_cap.clone()),
            Box::new(self.warmup_sent.clone()),
            Box::new(self.warmup_holds.clone()),
            Box::new(self.webhook_queued.clone()),
            Box::new(self.webhook_posted.clone()),
            Box::new(self.webhook_failures.clone()),
            Box::new(self.dns_lookups.clone()),
            Box::new(self.dns_lookup_seconds.clone()),
        ];
        for collector in collectors {
            self.registry.register(collector).expect("metric names are unique");
        }
    }

    pub fn reject(&self, reason: RejectReason) {
        self.rejected.with_label_values(&[reason.label()]).inc();
    }

    /// Renders every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buffer);
        String::from_utf8(buffer).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Returns an enhanced status code as a label value, or `other` when the
/// text is not one (keeps the label set bounded).
pub fn code_label(status: &str) -> &str {
    let mut parts = status.split('.');
    let valid = parts.next().is_some_and(|p| p.len() == 1 && p.bytes().all(|b| b.is_ascii_digit()))
        && parts.next().is_some_and(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
        && parts.next().is_some_and(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
        && parts.next().is_none();
    if valid { status } else { "other" }
}
