//! The Received header Baton adds to each message (RFC 5321 section 4.4).

use time::OffsetDateTime;
use time::format_description::well_known::Rfc2822;

use crate::gateway::Submission;
use crate::spool::QueueId;

/// Builds the Received header, folded, with its final CRLF.
pub fn received_header(hostname: &str, id: &QueueId, submission: &Submission) -> String {
    // RFC 3848 protocol names (A for an authenticated client); UTF8
    // variants per RFC 6531 section 3.7.3. The user name stays out of the
    // header, which every recipient can read.
    let base = match (submission.smtputf8, submission.esmtp) {
        (true, _) => "UTF8SMTP",
        (false, true) => "ESMTP",
        (false, false) => "SMTP",
    };
    let tls = if submission.tls { "S" } else { "" };
    let auth = if submission.auth_user.is_some() && base != "SMTP" { "A" } else { "" };
    let protocol = format!("{base}{tls}{auth}");
    let helo: String = submission
        .helo
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(255)
        .collect();
    let date = OffsetDateTime::now_utc()
        .format(&Rfc2822)
        .unwrap_or_else(|_| "Thu, 01 Jan 1970 00:00:00 +0000".to_string());
    let mut header = format!(
        "Received: from {helo} ([{}])\r\n\tby {hostname} (Baton) with {protocol} id {id}",
        submission.client_ip
    );
    // Naming the recipient is only safe when there is one (RFC 5321 7.2).
    if let [recipient] = submission.recipients.as_slice() {
        header.push_str(&format!("\r\n\tfor <{}>", recipient.address));
    }
    header.push_str(&format!(";\r\n\t{date}\r\n"));
    header
}
