//! The pipeline: what happens to a message between the end of DATA and the
//! spool. It runs once per message, before the `250`; retries resend the
//! stored bytes and never run it again.
//!
//! Stages, in order:
//! 1. routing to an outbound pool (not yet: every message uses the default pool);
//! 2. the trace header ([`trace`]);
//! 3. DKIM signing for the From domain ([`dkim`]);
//! 4. the SPF/DMARC alignment verdict (not yet).
//!
//! A stage returns the reply that rejects the message, or lets it pass.

pub mod dkim;
pub mod trace;

use std::sync::Arc;

use crate::gateway::Submission;
use crate::policy::PolicyStore;
use crate::reply::Reply;
use crate::spool::QueueId;

pub struct Pipeline {
    hostname: String,
    policy: Arc<PolicyStore>,
}

/// What the pipeline made of a message.
pub struct Processed {
    /// The bytes to store and send.
    pub data: Vec<u8>,
    /// Domain of the DKIM signatures added, if any.
    pub signed_for: Option<String>,
}

impl Pipeline {
    pub fn new(hostname: String, policy: Arc<PolicyStore>) -> Pipeline {
        Pipeline { hostname, policy }
    }

    /// Returns the bytes to store and send, or the reply that rejects the message.
    pub fn run(&self, id: &QueueId, submission: &Submission) -> Result<Processed, Reply> {
        let policy = self.policy.current();
        let from = from_domain(&submission.content);
        let signing = policy.dkim.sign(&submission.content, from.as_deref())?;

        let received = trace::received_header(&self.hostname, id, submission);
        let (signatures, signed_for) = match signing {
            dkim::Signing::Signed { domain, headers } => (headers, Some(domain)),
            dkim::Signing::Unsigned => (Vec::new(), None),
        };
        let extra: usize = signatures.iter().map(String::len).sum();
        let mut data = Vec::with_capacity(received.len() + extra + submission.content.len());
        data.extend_from_slice(received.as_bytes());
        for signature in &signatures {
            data.extend_from_slice(signature.as_bytes());
        }
        data.extend_from_slice(&submission.content);
        Ok(Processed { data, signed_for })
    }
}

/// Returns the domain of the first From address, lower-cased, in A-labels.
pub fn from_domain(message: &[u8]) -> Option<String> {
    let parsed = mail_parser::MessageParser::new().parse_headers(message)?;
    let address = parsed.from()?.first()?.address()?;
    let (_, domain) = address.rsplit_once('@')?;
    idna::domain_to_ascii(domain.trim_end_matches('.')).ok()
}
