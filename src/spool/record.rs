//! Records kept in the spool for each message and recipient.

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Queue id: 13 hex digits of microseconds since the Unix epoch, then 5 hex
/// digits of a per-process counter and 2 random ones. Ids sort by arrival
/// time, and two processes started within the same microsecond still differ
/// in the random part.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct QueueId(String);

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl QueueId {
    pub fn generate() -> QueueId {
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let count = COUNTER.fetch_add(1, Ordering::Relaxed) & 0xFFFFF;
        let random: u8 = rand::random();
        QueueId(format!("{micros:013X}{count:05X}{random:02X}"))
    }

    /// Returns the arrival time encoded in the id, in microseconds since
    /// the Unix epoch.
    pub fn received_micros(&self) -> u64 {
        u64::from_str_radix(&self.0[..13], 16).unwrap_or(0)
    }

    /// Parses a queue id an operator typed, in either case.
    pub fn parse(text: &str) -> Option<QueueId> {
        QueueId::from_key_suffix(text.trim().to_ascii_uppercase().as_bytes())
    }

    /// Parses the id part of a spool key; `None` when it is not an id.
    pub fn from_key_suffix(bytes: &[u8]) -> Option<QueueId> {
        let text = std::str::from_utf8(bytes).ok()?;
        let valid = text.len() == 20 && text.bytes().all(|b| b.is_ascii_hexdigit());
        valid.then(|| QueueId(text.to_string()))
    }

}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Envelope data of a message: everything stored apart from its recipients.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EnvelopeRecord {
    /// Envelope sender (MAIL FROM); empty for the null sender `<>`.
    pub sender: String,
    /// Arrival time, seconds since the Unix epoch.
    pub received_at: u64,
    /// Client IP address as text.
    pub client_ip: String,
    /// Name the client gave in EHLO or HELO.
    pub helo: String,
    /// Size of the stored message in bytes.
    pub size: u64,
    /// The client asked for SMTPUTF8 (RFC 6531).
    #[serde(default)]
    pub smtputf8: bool,
    /// The client declared BODY=8BITMIME (RFC 6152).
    #[serde(default)]
    pub eight_bit: bool,
    /// The message is a delivery status notification made by this gateway;
    /// no DSN is ever made about it, so bounces cannot loop.
    #[serde(default)]
    pub is_dsn: bool,
    /// Outbound pool; empty for messages stored before pools existed, and
    /// for DSNs, which use the fallback pool.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pool: String,
}

/// State of one recipient. Only the pending states survive in a stored
/// message for long: the message is removed once every recipient is final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RcptState {
    Queued,
    Deferred,
    Delivered,
    Bounced,
}

impl RcptState {
    pub fn is_pending(self) -> bool {
        matches!(self, RcptState::Queued | RcptState::Deferred)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RcptState::Queued => "queued",
            RcptState::Deferred => "deferred",
            RcptState::Delivered => "delivered",
            RcptState::Bounced => "bounced",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecipientRecord {
    /// Address as given in RCPT TO, with the domain in A-label form.
    pub address: String,
    /// Recipient domain, lower-cased A-labels; delivery groups by it.
    pub domain: String,
    pub state: RcptState,
    /// Delivery attempts made so far.
    pub attempts: u32,
    /// Earliest time of the next attempt, seconds since the Unix epoch.
    pub next_attempt: u64,
    /// Last reply or error seen for this recipient.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reply: Option<String>,
}

impl RecipientRecord {
    pub fn new(address: String, domain: String) -> RecipientRecord {
        RecipientRecord {
            address,
            domain,
            state: RcptState::Queued,
            attempts: 0,
            next_attempt: 0,
            last_reply: None,
        }
    }
}

/// Returns the current time in seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_ids_are_unique_and_sorted() {
        let first = QueueId::generate();
        let second = QueueId::generate();
        assert_ne!(first, second);
        assert!(first.0[..18] < second.0[..18]);
        assert_eq!(QueueId::from_key_suffix(first.0.as_bytes()), Some(first));
    }
}
