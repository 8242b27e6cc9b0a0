//! The pipeline: what happens to a message between the end of DATA and the
//! spool. It runs once per message, before the `250`; retries resend the
//! stored bytes and never run it again.
//!
//! Stages, in order:
//! 1. routing to an outbound pool (not yet: every message uses the default pool);
//! 2. the trace header ([`trace`]);
//! 3. DKIM signing for the From domain (not yet);
//! 4. the SPF/DMARC alignment verdict (not yet).
//!
//! A stage returns the reply that rejects the message, or lets it pass.

pub mod trace;

use crate::gateway::Submission;
use crate::reply::Reply;
use crate::spool::QueueId;

pub struct Pipeline {
    hostname: String,
}

impl Pipeline {
    pub fn new(hostname: String) -> Pipeline {
        Pipeline { hostname }
    }

    /// Returns the bytes to store and send, or the reply that rejects the message.
    pub fn run(&self, id: &QueueId, submission: &Submission) -> Result<Vec<u8>, Reply> {
        let received = trace::received_header(&self.hostname, id, submission);
        let mut data = Vec::with_capacity(received.len() + submission.content.len());
        data.extend_from_slice(received.as_bytes());
        data.extend_from_slice(&submission.content);
        Ok(data)
    }
}
