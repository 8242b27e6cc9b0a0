//! Prometheus metrics, all declared here. Label values come from small fixed
//! sets (reasons, outcomes); never a recipient address or queue id.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
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
        }
    }
}

pub struct Metrics {
    pub registry: Registry,
    pub intake_connections: IntCounter,
    pub intake_sessions: IntGauge,
    pub messages_received: IntCounter,
    pub bytes_received: IntCounter,
    rejected: IntCounterVec,
    pub acceptance_seconds: Histogram,
    /// Accepted messages by `result`: signed or unsigned.
    pub dkim_messages: IntCounterVec,
    /// Alignment verdicts of accepted messages by `domain`, `result`, `mode`.
    pub alignment_verdicts: IntCounterVec,
    /// Recipient outcomes by `result`: delivered, deferred, bounced.
    pub delivery_results: IntCounterVec,
    /// Reply classes seen from MX hosts: 2xx, 4xx, 5xx, or `network`.
    pub delivery_replies: IntCounterVec,
    pub delivery_seconds: Histogram,
    pub outbound_connections: IntGauge,
    /// Backoff, suspension and bounce rule matches by `site`, `rule`, `action`.
    pub shaping_transitions: IntCounterVec,
    /// Time deliveries waited on a site's rate limits, by `limit`.
    pub shaping_wait_seconds: prometheus::HistogramVec,
    /// Sites now in backoff and in suspension, by `state`.
    pub sites_throttled: prometheus::IntGaugeVec,
    pub queued_messages: IntGauge,
    pub spool_bytes: IntGauge,
    pub dsn_sent: IntCounter,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let latency_buckets = vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ];
        let metrics = Metrics {
            intake_connections: IntCounter::new(
                "baton_intake_connections_total",
                "SMTP connections accepted by intake",
            )
            .expect("valid metric"),
            intake_sessions: IntGauge::new("baton_intake_sessions", "SMTP sessions now open")
                .expect("valid metric"),
            messages_received: IntCounter::new(
                "baton_messages_received_total",
                "Messages accepted and queued",
            )
            .expect("valid metric"),
            bytes_received: IntCounter::new(
                "baton_received_bytes_total",
                "Bytes of accepted messages, as stored",
            )
            .expect("valid metric"),
            rejected: IntCounterVec::new(
                Opts::new(
                    "baton_messages_rejected_total",
                    "Messages or recipients rejected at intake, by reason",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            acceptance_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "baton_acceptance_seconds",
                    "Time from the end of message data to the 250 reply",
                )
                .buckets(latency_buckets.clone()),
            )
            .expect("valid metric"),
            dkim_messages: IntCounterVec::new(
                Opts::new(
                    "baton_dkim_messages_total",
                    "Accepted messages by DKIM result: signed or unsigned",
                ),
                &["result"],
            )
            .expect("valid metric"),
            alignment_verdicts: IntCounterVec::new(
                Opts::new(
                    "baton_alignment_verdicts_total",
                    "Alignment verdicts of accepted messages by sending domain (configured ones, else other), result and mode",
                ),
                &["domain", "result", "mode"],
            )
            .expect("valid metric"),
            delivery_results: IntCounterVec::new(
                Opts::new(
                    "baton_delivery_recipients_total",
                    "Recipient delivery outcomes, by result",
                ),
                &["result"],
            )
            .expect("valid metric"),
            delivery_replies: IntCounterVec::new(
                Opts::new(
                    "baton_delivery_replies_total",
                    "Final replies per recipient from MX hosts, by class",
                ),
                &["class"],
            )
            .expect("valid metric"),
            delivery_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "baton_delivery_transaction_seconds",
                    "Time of one SMTP transaction to an MX host, MAIL to final reply",
                )
                .buckets(latency_buckets),
            )
            .expect("valid metric"),
            shaping_transitions: IntCounterVec::new(
                Opts::new(
                    "baton_shaping_transitions_total",
                    "Response rule matches by site (providers and configured domains, else other), rule and action",
                ),
                &["site", "rule", "action"],
            )
            .expect("valid metric"),
            shaping_wait_seconds: prometheus::HistogramVec::new(
                HistogramOpts::new(
                    "baton_shaping_wait_seconds",
                    "Time a delivery waited on a site's message or connection rate",
                )
                .buckets(vec![0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0]),
                &["limit"],
            )
            .expect("valid metric"),
            sites_throttled: prometheus::IntGaugeVec::new(
                Opts::new("baton_sites_throttled", "Sites now in backoff or suspension, by state"),
                &["state"],
            )
            .expect("valid metric"),
            outbound_connections: IntGauge::new(
                "baton_outbound_connections",
                "Delivery connections now open",
            )
            .expect("valid metric"),
            queued_messages: IntGauge::new(
                "baton_queue_messages",
                "Messages in the spool with at least one recipient pending",
            )
            .expect("valid metric"),
            spool_bytes: IntGauge::new("baton_spool_bytes", "Bytes the spool takes on disk")
                .expect("valid metric"),
            dsn_sent: IntCounter::new(
                "baton_dsn_queued_total",
                "Delivery status notifications queued to senders",
            )
            .expect("valid metric"),
            registry,
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
            Box::new(self.alignment_verdicts.clone()),
            Box::new(self.delivery_results.clone()),
            Box::new(self.delivery_replies.clone()),
            Box::new(self.delivery_seconds.clone()),
            Box::new(self.outbound_connections.clone()),
            Box::new(self.shaping_transitions.clone()),
            Box::new(self.shaping_wait_seconds.clone()),
            Box::new(self.sites_throttled.clone()),
            Box::new(self.queued_messages.clone()),
            Box::new(self.spool_bytes.clone()),
            Box::new(self.dsn_sent.clone()),
        ];
        for collector in collectors {
            self.registry
                .register(collector)
                .expect("metric names are unique");
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
