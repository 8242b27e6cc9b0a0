//! The gateway: the shared state every stage reads, and the one path by
//! which a message enters the queue ([`Gateway::receive`]).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::config::Config;
use crate::events::{Event, EventLog};
use crate::intake::address::Recipient;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::reply::Reply;
use crate::scheduler::Scheduler;
use crate::spool::{EnvelopeRecord, NewMessage, QueueId, RecipientRecord, Spool, record};

pub struct Gateway {
    pub config: Config,
    pub spool: Spool,
    pub pipeline: Pipeline,
    pub policy: Arc<crate::policy::PolicyStore>,
    pub scheduler: Scheduler,
    pub events: EventLog,
    pub metrics: Arc<Metrics>,
    pub resolver: crate::dns::Resolver,
    pub tls_acceptor: Option<tokio_rustls::TlsAcceptor>,
    /// Opportunistic STARTTLS: encrypts without checking the certificate.
    pub tls_connector: tokio_rustls::TlsConnector,
    /// Verified TLS, for MX hosts under an enforced MTA-STS policy.
    pub tls_verified: tokio_rustls::TlsConnector,
    pub mta_sts: crate::delivery::mta_sts::MtaSts,
}

/// A message as the client handed it over, before the pipeline runs.
pub struct Submission {
    pub sender: String,
    pub recipients: Vec<Recipient>,
    pub client_ip: IpAddr,
    pub helo: String,
    pub esmtp: bool,
    pub tls: bool,
    pub smtputf8: bool,
    pub eight_bit: bool,
    /// User name the client authenticated as with AUTH, if it did.
    pub auth_user: Option<String>,
    /// Message content: CRLF line ends, dot-stuffing removed.
    pub content: Vec<u8>,
}

impl Gateway {
    /// Runs the pipeline, stores the message durably and queues it for
    /// delivery. Returns the queue id only once the message is on disk;
    /// an error is the reply to give the client instead of `250`.
    pub async fn receive(self: &Arc<Self>, submission: Submission) -> Result<QueueId, Reply> {
        let started = Instant::now();
        let id = QueueId::generate();
        let processed = match self.pipeline.run(&id, &submission).await {
            Ok(processed) => processed,
            Err((reply, reason)) => {
                tracing::info!(queue_id = %id, client_ip = %submission.client_ip, reply = %reply.one_line(), "message rejected by the pipeline");
                self.metrics.reject(reason);
                return Err(reply);
            }
        };
        let data = processed.data;
        let submission_auth_user = submission.auth_user.clone();

        let now = record::unix_now();
        let message = NewMessage {
            id: id.clone(),
            envelope: EnvelopeRecord {
                sender: submission.sender,
                received_at: now,
                client_ip: submission.client_ip.to_string(),
                helo: submission.helo,
                size: data.len() as u64,
                smtputf8: submission.smtputf8,
                eight_bit: submission.eight_bit,
                is_dsn: false,
                pool: processed.pool.clone(),
            },
            recipients: submission
                .recipients
                .into_iter()
                .map(|r| RecipientRecord::new(r.address, r.domain))
                .collect(),
            data,
        };
        if let Err(error) = self.spool.store(&message).await {
            tracing::error!(queue_id = %id, error = %format!("{error:#}"), "spool write failed; message not accepted");
            self.metrics.reject(crate::metrics::RejectReason::SpoolWrite);
            return Err(Reply::new(
                452,
                "4.3.1",
                "Insufficient system storage: the queue write failed; try again later",
            ));
        }

        self.metrics.messages_received.inc();
        self.metrics.bytes_received.inc_by(message.data.len() as u64);
        self.metrics
            .acceptance_seconds
            .observe(started.elapsed().as_secs_f64());
        let signed = if processed.signed_for.is_some() { "signed" } else { "unsigned" };
        self.metrics.dkim_messages.with_label_values(&[signed]).inc();
        for algorithm in &processed.signature_algorithms {
            self.metrics.dkim_signatures.with_label_values(&[algorithm]).inc();
        }
        self.metrics
            .routed_messages
            .with_label_values(&[processed.pool.as_str()])
            .inc();
        let mut event = Event::received(&message);
        event.auth_user = submission_auth_user;
        event.dkim_domain = processed.signed_for;
        if let Some(alignment) = &processed.alignment {
            let result = match &alignment.report {
                Some(report) if report.pass => "pass",
                Some(_) => "fail",
                None => "temperror",
            };
            self.metrics
                .alignment_verdicts
                .with_label_values(&[alignment.metric_domain.as_str(), result, alignment.mode.label()])
                .inc();
            if let Some(report) = &alignment.report
                && !report.pass
            {
                tracing::warn!(queue_id = %id, from_domain = %report.from_domain, findings = %report.failure_text(), "message would fail DMARC; accepted in warn mode");
            }
            event.alignment = Some(serde_json::json!({
                "mode": alignment.mode.label(),
                "result": result,
                "report": alignment.report,
            }));
        }
        self.events.log(event);
        self.queue_new(&message);
        Ok(id)
    }

    /// Queues every recipient domain of a message already in the spool for
    /// delivery now.
    pub fn queue_new(self: &Arc<Self>, message: &NewMessage) {
        self.metrics.queued_messages.inc();
        let mut domains: Vec<&str> = message.recipients.iter().map(|r| r.domain.as_str()).collect();
        domains.sort_unstable();
        domains.dedup();
        for domain in domains {
            self.scheduler
                .schedule(self, message.id.clone(), domain.to_string(), message.envelope.pool.clone(), 0);
        }
    }
}
