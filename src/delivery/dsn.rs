//! Delivery status notifications (RFC 3464) for bounced recipients.
//!
//! A DSN goes to the envelope sender with the null sender `<>`, so it can
//! never cause another DSN; no DSN is made for a message that is itself one.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc2822;

use crate::intake::address::parse_address;
use crate::spool::{EnvelopeRecord, NewMessage, QueueId, RecipientRecord, record};

/// One failed recipient as the DSN reports it.
pub struct Failed {
    pub recipient: String,
    /// Enhanced status code (RFC 3463), such as `5.1.1`.
    pub status: String,
    /// The reply that decided the failure, as one line.
    pub diagnostic: String,
    /// True when `diagnostic` came from the remote server, false when the
    /// gateway made it (DNS failure, timeout, expiry).
    pub remote: bool,
    /// MX host that gave the reply.
    pub remote_mta: Option<String>,
}

/// Builds the DSN for `failed` recipients of message `id`. Returns `None`
/// when the sender is the null sender or cannot receive mail.
pub fn build(
    hostname: &str,
    id: &QueueId,
    envelope: &EnvelopeRecord,
    original: &[u8],
    failed: &[Failed],
) -> Option<NewMessage> {
    if envelope.sender.is_empty() || envelope.is_dsn || failed.is_empty() {
        return None;
    }
    let sender = parse_address(&envelope.sender, true).ok()?;
    let dsn_id = QueueId::generate();
    let boundary = format!("{dsn_id}/{hostname}");
    let now = OffsetDateTime::now_utc();
    let date = now.format(&Rfc2822).unwrap_or_default();
    let arrival = OffsetDateTime::from_unix_timestamp(envelope.received_at as i64)
        .ok()
        .and_then(|t| t.format(&Rfc2822).ok())
        .unwrap_or_default();

    let mut text = String::new();
    text.push_str(&format!("Received: by {hostname} (Baton) id {dsn_id}; {date}\r\n"));
    text.push_str(&format!("From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n"));
    text.push_str(&format!("To: <{}>\r\n", sender.address));
    text.push_str("Subject: Undelivered Mail Returned to Sender\r\n");
    text.push_str(&format!("Date: {date}\r\n"));
    text.push_str(&format!("Message-ID: <{dsn_id}@{hostname}>\r\n"));
    text.push_str("Auto-Submitted: auto-replied\r\n");
    text.push_str("MIME-Version: 1.0\r\n");
    text.push_str(&format!(
        "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n"
    ));
    text.push_str("\r\n");
    text.push_str("This is a MIME-encapsulated message.\r\n\r\n");

    text.push_str(&format!("--{boundary}\r\n"));
    text.push_str("Content-Type: text/plain; charset=us-ascii\r\n\r\n");
    text.push_str(&format!(
        "This is the mail system at host {hostname}.\r\n\r\n\
         Your message could not be delivered to one or more recipients.\r\n\
         The reasons are given below.\r\n\r\n"
    ));
    for failure in failed {
        text.push_str(&format!("<{}>: {}\r\n", failure.recipient, failure.diagnostic));
    }
    text.push_str("\r\n");

    text.push_str(&format!("--{boundary}\r\n"));
    text.push_str("Content-Type: message/delivery-status\r\n\r\n");
    text.push_str(&format!("Reporting-MTA: dns; {hostname}\r\n"));
    text.push_str(&format!("X-Baton-Queue-ID: {id}\r\n"));
    text.push_str(&format!("Arrival-Date: {arrival}\r\n"));
    for failure in failed {
        text.push_str("\r\n");
        text.push_str(&format!("Final-Recipient: rfc822; {}\r\n", failure.recipient));
        text.push_str("Action: failed\r\n");
        text.push_str(&format!("Status: {}\r\n", failure.status));
        if let Some(mta) = &failure.remote_mta {
            text.push_str(&format!("Remote-MTA: dns; {mta}\r\n"));
        }
        let kind = if failure.remote { "smtp" } else { "X-Baton" };
        text.push_str(&format!("Diagnostic-Code: {kind}; {}\r\n", failure.diagnostic));
    }
    text.push_str("\r\n");

    text.push_str(&format!("--{boundary}\r\n"));
    text.push_str("Content-Type: text/rfc822-headers\r\n\r\n");
    let mut data = text.into_bytes();
    data.extend_from_slice(original_headers(original));
    if !data.ends_with(b"\r\n") {
        data.extend_from_slice(b"\r\n");
    }
    data.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());

    Some(NewMessage {
        id: dsn_id,
        envelope: EnvelopeRecord {
            sender: String::new(),
            received_at: record::unix_now(),
            client_ip: "127.0.0.1".to_string(),
            helo: hostname.to_string(),
            size: data.len() as u64,
            smtputf8: envelope.smtputf8,
            eight_bit: envelope.eight_bit,
            is_dsn: true,
            pool: String::new(),
        },
        recipients: vec![RecipientRecord::new(sender.address, sender.domain)],
        data,
    })
}

/// Returns the header section of a message, up to the blank line.
fn original_headers(message: &[u8]) -> &[u8] {
    match message.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(end) => &message[..end + 2],
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(sender: &str) -> EnvelopeRecord {
        EnvelopeRecord {
            sender: sender.into(),
            received_at: 1_700_000_000,
            ..EnvelopeRecord::default()
        }
    }

    fn failure() -> Failed {
        Failed {
            recipient: "nobody@dest.example".into(),
            status: "5.1.1".into(),
            diagnostic: "550 5.1.1 no such user".into(),
            remote: true,
            remote_mta: Some("mx.dest.example".into()),
        }
    }

    #[test]
    fn dsn_reports_each_failure() {
        let original = b"Subject: hello\r\nFrom: a@src.example\r\n\r\nsecret body\r\n";
        let dsn = build("mta.example", &QueueId::generate(), &envelope("a@src.example"), original, &[failure()]).unwrap();
        let text = String::from_utf8(dsn.data).unwrap();
        assert!(text.contains("Final-Recipient: rfc822; nobody@dest.example\r\n"));
        assert!(text.contains("Status: 5.1.1\r\n"));
        assert!(text.contains("Diagnostic-Code: smtp; 550 5.1.1 no such user\r\n"));
        assert!(text.contains("Subject: hello\r\n"));
        assert!(!text.contains("secret body"));
        assert!(!text.replace("\r\n", "").contains('\n'));
        assert_eq!(dsn.envelope.sender, "");
        assert!(dsn.envelope.is_dsn);
        assert_eq!(dsn.recipients[0].address, "a@src.example");
    }

    #[test]
    fn no_dsn_for_null_sender_or_dsn() {
        let id = QueueId::generate();
        assert!(build("mta.example", &id, &envelope(""), b"", &[failure()]).is_none());
        let mut bounce = envelope("a@src.example");
        bounce.is_dsn = true;
        assert!(build("mta.example", &id, &bounce, b"", &[failure()]).is_none());
    }
}
