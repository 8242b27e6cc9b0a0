//! The pipeline: what happens to a message between the end of DATA and the
//! spool. It runs once per message, before the `250`; retries resend the
//! stored bytes and never run it again.
//!
//! Stages, in order:
//! 1. routing to an outbound pool ([`crate::policy::pools`]), which also
//!    removes the header fields that steer it;
//! 2. the trace header ([`trace`]);
//! 3. DKIM signing for the From domain ([`dkim`]);
//! 4. the one-click unsubscribe rule for bulk mail ([`unsubscribe`]);
//! 5. the SPF/DMARC alignment verdict ([`alignment`]).
//!
//! A stage returns the reply that rejects the message, or lets it pass.

pub mod alignment;
pub mod dkim;
pub mod trace;
pub mod unsubscribe;

use std::sync::Arc;

use mail_auth::MessageAuthenticator;

use crate::gateway::Submission;
use crate::metrics::RejectReason;
use crate::policy::PolicyStore;
use crate::policy::pools::{ROUTING_HEADERS, RouteInput};
use crate::policy::senders::AlignmentMode;
use crate::reply::Reply;
use crate::spool::QueueId;

pub struct Pipeline {
    hostname: String,
    policy: Arc<PolicyStore>,
    authenticator: MessageAuthenticator,
}

/// Result of the pipeline for one message.
pub struct Processed {
    /// The bytes to store and send.
    pub data: Vec<u8>,
    /// Domain of the DKIM signatures added, if any.
    pub signed_for: Option<String>,
    /// Algorithm of each signature added (`rsa-sha256`, `ed25519-sha256`).
    pub signature_algorithms: Vec<&'static str>,
    /// The alignment verdict, unless the check is off.
    pub alignment: Option<Alignment>,
    /// The outbound pool the message leaves from.
    pub pool: String,
}

/// An alignment verdict with the mode it was made under.
pub struct Alignment {
    pub mode: AlignmentMode,
    /// Configured sending domain, or `other`: the metric label.
    pub metric_domain: String,
    /// `None` when DNS failed in `warn` mode and the message was accepted.
    pub report: Option<alignment::Report>,
}

impl Pipeline {
    pub fn new(hostname: String, policy: Arc<PolicyStore>, authenticator: MessageAuthenticator) -> Pipeline {
        Pipeline {
            hostname,
            policy,
            authenticator,
        }
    }

    /// Returns the bytes to store and send, or the reply that rejects the
    /// message with the reason for metrics.
    pub async fn run(&self, id: &QueueId, submission: &Submission) -> Result<Processed, (Reply, RejectReason)> {
        let policy = self.policy.current();
        let from = from_domain(&submission.content);
        let fields = header_fields(&submission.content);
        let sender_domain = submission.sender.rsplit_once('@').map(|(_, domain)| domain);
        let route = RouteInput {
            headers: &fields,
            sender_domain,
            from_domain: from.as_deref(),
        };
        let pool = policy.pools.route(&route).map_err(|reply| (reply, RejectReason::Pool))?;
        let stripped = remove_fields(&submission.content, &ROUTING_HEADERS);
        let content: &[u8] = stripped.as_deref().unwrap_or(&submission.content);

        let signing = policy
            .dkim
            .sign(content, from.as_deref())
            .map_err(|reply| (reply, RejectReason::Unsigned))?;
        if let Some(domain) = from.as_deref()
            && let Some(headers_signed) = policy.dkim.one_click_rule(domain)
        {
            let signed = matches!(&signing, dkim::Signing::Signed { headers, .. } if !headers.is_empty());
            unsubscribe::check(content, domain, signed && headers_signed)
                .map_err(|reply| (reply, RejectReason::Unsubscribe))?;
        }

        let received = trace::received_header(&self.hostname, id, submission);
        let (signatures, signed_for) = match signing {
            dkim::Signing::Signed { domain, headers } => (headers, Some(domain)),
            dkim::Signing::Unsigned => (Vec::new(), None),
        };
        let signature_algorithms: Vec<&'static str> = signatures
            .iter()
            .map(|header| if header.contains("a=ed25519-sha256") { "ed25519-sha256" } else { "rsa-sha256" })
            .collect();
        let extra: usize = signatures.iter().map(String::len).sum();
        let mut data = Vec::with_capacity(received.len() + extra + content.len());
        data.extend_from_slice(received.as_bytes());
        for signature in &signatures {
            data.extend_from_slice(signature.as_bytes());
        }
        data.extend_from_slice(content);

        let mode = from
            .as_deref()
            .map_or(policy.dkim.alignment_mode(""), |domain| policy.dkim.alignment_mode(domain));
        if mode == AlignmentMode::Off {
            return Ok(Processed {
                data,
                signed_for,
                signature_algorithms,
                alignment: None,
                pool,
            });
        }
        let metric_domain = policy.dkim.metric_domain(from.as_deref().unwrap_or("")).to_string();
        let source_ips = policy.pools.source_ips(&pool);
        let input = alignment::CheckInput {
            message: &data[received.len()..],
            mail_from: &submission.sender,
            helo: &self.hostname,
            source_ips: &source_ips,
        };
        let report = match alignment::check(&self.authenticator, &input).await {
            Ok(report) => Some(report),
            Err(error) if mode == AlignmentMode::Enforce => {
                return Err((
                    Reply::new(451, "4.4.3", format!("Alignment check could not complete ({error}); try again later")),
                    RejectReason::Alignment,
                ));
            }
            Err(error) => {
                tracing::warn!(queue_id = %id, %error, "alignment check incomplete; accepted in warn mode");
                None
            }
        };
        if mode == AlignmentMode::Enforce
            && let Some(report) = &report
            && !report.pass
        {
            return Err((Reply::new(550, "5.7.1", report.failure_text()), RejectReason::Alignment));
        }
        Ok(Processed {
            data,
            signed_for,
            signature_algorithms,
            alignment: Some(Alignment {
                mode,
                metric_domain,
                report,
            }),
            pool,
        })
    }
}

/// Returns the domain of the first From address, lower-cased, in A-labels.
pub fn from_domain(message: &[u8]) -> Option<String> {
    let parsed = mail_parser::MessageParser::new().parse_headers(message)?;
    let address = parsed.from()?.first()?.address()?;
    let (_, domain) = address.rsplit_once('@')?;
    idna::domain_to_ascii(domain.trim_end_matches('.')).ok()
}

/// Returns the header section's fields as (name, unfolded value).
pub fn header_fields(message: &[u8]) -> Vec<(String, String)> {
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in header_lines(message) {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches(['\r', '\n']);
        if text.starts_with([' ', '\t']) {
            if let Some((_, value)) = fields.last_mut() {
                value.push_str(text);
            }
        } else if let Some((name, value)) = text.split_once(':') {
            fields.push((name.trim().to_string(), value.trim().to_string()));
        }
    }
    fields
}

/// Returns the message without the header fields named in `names` (with
/// their continuation lines), or `None` when it has none of them.
pub fn remove_fields(message: &[u8], names: &[&str]) -> Option<Vec<u8>> {
    let mut kept = Vec::with_capacity(message.len());
    let mut removing = false;
    let mut removed = false;
    let mut header_length = 0;
    for line in header_lines(message) {
        header_length += line.len();
        let continuation = line.first().is_some_and(|b| *b == b' ' || *b == b'\t');
        if !continuation {
            let name = line.split(|b| *b == b':').next().unwrap_or_default();
            removing = names.iter().any(|n| n.as_bytes().eq_ignore_ascii_case(name.trim_ascii()));
        }
        if removing {
            removed = true;
        } else {
            kept.extend_from_slice(line);
        }
    }
    if !removed {
        return None;
    }
    kept.extend_from_slice(&message[header_length..]);
    Some(kept)
}

/// Returns the header section's lines, each with its line end, up to the
/// empty line that ends it.
fn header_lines(message: &[u8]) -> impl Iterator<Item = &[u8]> {
    message
        .split_inclusive(|b| *b == b'\n')
        .take_while(|line| *line != b"\r\n" && *line != b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESSAGE: &[u8] = b"From: a@example.com\r\nX-Baton-Pool: marketing\r\nSubject: hi\r\n there\r\nx-baton-stream: bulk\r\n  folded\r\n\r\nX-Baton-Pool: body line\r\n";

    #[test]
    fn header_fields_unfolded() {
        let fields = header_fields(MESSAGE);
        assert_eq!(fields[1], ("X-Baton-Pool".to_string(), "marketing".to_string()));
        assert_eq!(fields[2], ("Subject".to_string(), "hi there".to_string()));
        assert_eq!(fields.len(), 4);
    }

    #[test]
    fn routing_fields_removed() {
        let stripped = remove_fields(MESSAGE, &ROUTING_HEADERS).unwrap();
        let expected = b"From: a@example.com\r\nSubject: hi\r\n there\r\n\r\nX-Baton-Pool: body line\r\n";
        assert_eq!(String::from_utf8_lossy(&stripped), String::from_utf8_lossy(expected));
        assert_eq!(remove_fields(&stripped, &ROUTING_HEADERS), None);
    }
}
