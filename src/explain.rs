//! `baton queue explain`: why a message is still queued, per recipient:
//! its state and last reply, the receiving site and the limit or rule that
//! delays it, and when it will next be tried.

use std::fmt::Write;
use std::sync::Arc;

use crate::events::format_unix;
use crate::gateway::Gateway;
use crate::scheduler::throttle::describe;
use crate::spool::{QueueId, QueuedMessage};
use crate::spool::record::unix_now;

/// Explains a message using the running gateway's scheduler state.
pub fn explain_running(gateway: &Arc<Gateway>, id: &QueueId) -> anyhow::Result<Option<String>> {
    let Some(message) = gateway.spool.load(id)? else {
        return Ok(None);
    };
    let policy = gateway.policy.current();
    let mut text = header(&message);
    let pool = if message.envelope.pool.is_empty() { policy.pools.fallback.as_str() } else { message.envelope.pool.as_str() };
    let _ = writeln!(text, "  pool {pool}");
    let now = unix_now();
    for (_, recipient) in &message.recipients {
        text.push_str(&recipient_line(recipient, now));
        if !recipient.state.is_pending() {
            continue;
        }
        match gateway.scheduler.throttles.site_of(&recipient.domain) {
            Some(site) => {
                let view = gateway.scheduler.throttles.view(&site, None, &policy.shaping);
                let open = gateway.scheduler.site_connections(&site);
                let _ = writeln!(text, "    {}", describe(&site, &view, open));
                for (source, day, cap, sent) in gateway.scheduler.sources.standings(gateway, &policy, pool, &site) {
                    let standing = match cap {
                        Some(cap) => format!("day {day}, {sent} of {cap} sent today"),
                        None => format!("warm after {} days", day - 1),
                    };
                    let _ = writeln!(text, "    warmup of source {source} at {site}: {standing}");
                }
            }
            None => {
                let _ = writeln!(text, "    site not known yet: no delivery to {} has resolved its MX hosts since the start", recipient.domain);
            }
        }
        let position = match gateway.scheduler.job_position(id, &recipient.domain) {
            Some(None) => "ready: waiting for a connection to the site".to_string(),
            Some(Some(due)) => format!("waiting in the timer until {} (in {}s)", format_unix(due), due.saturating_sub(now)),
            None => "being delivered now".to_string(),
        };
        let _ = writeln!(text, "    {position}");
    }
    Ok(Some(text))
}

/// Explains a message from the spool alone, when no gateway is running.
pub fn explain_offline(message: &QueuedMessage) -> String {
    let mut text = header(message);
    text.push_str("  (no gateway is running: site limits and timers are not shown)\n");
    let now = unix_now();
    for (_, recipient) in &message.recipients {
        text.push_str(&recipient_line(recipient, now));
    }
    text
}

fn header(message: &QueuedMessage) -> String {
    let sender = if message.envelope.sender.is_empty() { "<>".to_string() } else { format!("<{}>", message.envelope.sender) };
    format!(
        "{} from {sender}, received {}, {} bytes\n",
        message.id,
        format_unix(message.envelope.received_at),
        message.envelope.size
    )
}

fn recipient_line(recipient: &crate::spool::RecipientRecord, now: u64) -> String {
    let mut line = format!("  <{}>: {}, {} attempts", recipient.address, recipient.state.as_str(), recipient.attempts);
    if recipient.state.is_pending() {
        if recipient.next_attempt > now {
            let _ = write!(line, ", next attempt {} (in {}s)", format_unix(recipient.next_attempt), recipient.next_attempt - now);
        } else {
            line.push_str(", due now");
        }
    }
    if let Some(reply) = &recipient.last_reply {
        let _ = write!(line, "; last reply: {reply}");
    }
    line.push('\n');
    line
}
