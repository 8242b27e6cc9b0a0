//! `baton queue list`: the queue per recipient domain, then per message.
//!
//! It queries the running gateway over HTTP. When none responds, it opens
//! the spool itself, because the queue database allows one process at a time.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::Context;

use crate::config::Config;
use crate::events::format_unix;
use crate::http::{MessageListing, QueueListing, list_spool};

pub fn list(config: &Config, limit: usize) -> anyhow::Result<()> {
    let (messages, truncated) = match fetch(config, limit) {
        Ok(listing) => (listing.messages, listing.truncated),
        Err(error) if is_connection_refused(&error) => {
            let spool = crate::spool::Spool::open(&config.spool.path, 16 * 1024 * 1024)?;
            list_spool(&spool, limit)?
        }
        Err(error) => return Err(error),
    };
    print_out(&render(&messages, truncated, crate::spool::record::unix_now()))
}

/// Writes `text` to stdout. A reader that closed the pipe early, as
/// `| head` does, is not an error.
fn print_out(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Err(error) if error.kind() != std::io::ErrorKind::BrokenPipe => Err(error.into()),
        _ => Ok(()),
    }
}

fn is_connection_refused(error: &anyhow::Error) -> bool {
    error
        .downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// Prints why a message waits, from the running gateway or the spool.
pub fn explain(config: &Config, id: &str) -> anyhow::Result<()> {
    let Some(queue_id) = crate::spool::QueueId::parse(id) else {
        anyhow::bail!("{id:?} is not a queue id; queue ids are 20 hex digits, as baton queue list shows");
    };
    match get(config, &format!("/queue/{queue_id}")) {
        Ok(body) => {
            print_out(&String::from_utf8_lossy(&body))
        }
        Err(error) if is_connection_refused(&error) => {
            let spool = crate::spool::Spool::open(&config.spool.path, 16 * 1024 * 1024)?;
            match spool.load(&queue_id)? {
                Some(message) => {
                    print_out(&crate::explain::explain_offline(&message))
                }
                None => anyhow::bail!("{queue_id} is not in the queue (delivered, bounced or never queued)"),
            }
        }
        Err(error) => Err(error),
    }
}

/// Fetches `/queue` from the running gateway.
fn fetch(config: &Config, limit: usize) -> anyhow::Result<QueueListing> {
    let body = get(config, &format!("/queue?limit={limit}"))?;
    serde_json::from_slice(&body).context("invalid queue listing from the gateway")
}

/// Sends a plain HTTP/1.1 GET for `path` to the gateway; returns the body
/// of a 200 response.
fn get(config: &Config, path: &str) -> anyhow::Result<Vec<u8>> {
    let address = config.http.listen;
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("invalid HTTP response from the gateway")?;
    let head = String::from_utf8_lossy(&response[..split]);
    let body = &response[split + 4..];
    if !head.starts_with("HTTP/1.1 200") {
        anyhow::bail!(
            "the gateway at {address} returned {}: {}",
            head.lines().next().unwrap_or(""),
            String::from_utf8_lossy(body).trim()
        );
    }
    Ok(body.to_vec())
}

/// Formats the listing: a table per domain, then each message.
pub fn render(messages: &[MessageListing], truncated: bool, now: u64) -> String {
    let mut out = String::new();
    let mut domains: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    let mut pending_total = 0;
    for message in messages {
        for recipient in message.recipients.iter().filter(|r| r.state.is_pending()) {
            let entry = domains.entry(&recipient.domain).or_insert((0, u64::MAX));
            entry.0 += 1;
            entry.1 = entry.1.min(recipient.next_attempt);
            pending_total += 1;
        }
    }
    out.push_str(&format!(
        "{} messages, {} recipients pending{}\n\n",
        messages.len(),
        pending_total,
        if truncated { " (list cut at --limit)" } else { "" }
    ));
    if messages.is_empty() {
        return out;
    }
    out.push_str(&format!("{:<40} {:>8}  {}\n", "DOMAIN", "PENDING", "NEXT ATTEMPT"));
    for (domain, (count, next)) in &domains {
        out.push_str(&format!("{domain:<40} {count:>8}  {}\n", describe_time(*next, now)));
    }
    out.push('\n');
    for message in messages {
        let sender = if message.sender.is_empty() { "<>".to_string() } else { format!("<{}>", message.sender) };
        out.push_str(&format!(
            "{}  {}  {} bytes  from {}\n",
            message.id,
            format_unix(message.received_at),
            message.size,
            sender
        ));
        for recipient in &message.recipients {
            out.push_str(&format!(
                "    {:<9} <{}>  attempts {}  next {}\n",
                recipient.state.as_str(),
                recipient.address,
                recipient.attempts,
                if recipient.state.is_pending() { describe_time(recipient.next_attempt, now) } else { "-".to_string() },
            ));
            if let Some(reply) = &recipient.last_reply {
                out.push_str(&format!("              last reply: {reply}\n"));
            }
        }
    }
    out
}

fn describe_time(time: u64, now: u64) -> String {
    if time <= now {
        "now".to_string()
    } else {
        format!("{} (in {}s)", format_unix(time), time - now)
    }
}
