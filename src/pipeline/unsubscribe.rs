//! One-click unsubscribe (RFC 8058) for bulk mail, where the sending
//! domain's policy requires it. Gmail and Yahoo require it from bulk
//! senders. Mail counts as bulk when it carries `Precedence: bulk` or
//! `X-Baton-Stream: marketing`.

use crate::reply::Reply;

/// Checks a bulk message for `List-Unsubscribe` with an https URI and
/// `List-Unsubscribe-Post: List-Unsubscribe=One-Click`, both covered by the
/// DKIM signature (`signed`). Mail that is not bulk passes.
pub fn check(message: &[u8], domain: &str, signed: bool) -> Result<(), Reply> {
    let Some(parsed) = mail_parser::MessageParser::new().parse_headers(message) else {
        return Ok(());
    };
    let value = |name: &str| -> Option<String> {
        parsed
            .headers()
            .iter()
            .find(|header| header.name().as_str().eq_ignore_ascii_case(name))
            .and_then(|header| header.value().as_text().map(|text| text.trim().to_string()))
    };
    let bulk = value("Precedence").is_some_and(|v| v.eq_ignore_ascii_case("bulk"))
        || value("X-Baton-Stream").is_some_and(|v| v.eq_ignore_ascii_case("marketing"));
    if !bulk {
        return Ok(());
    }
    let unsubscribe = raw_header(message, "List-Unsubscribe").unwrap_or_default();
    let has_https = unsubscribe
        .split(',')
        .any(|uri| uri.trim().trim_start_matches('<').to_ascii_lowercase().starts_with("https://"));
    let post = raw_header(message, "List-Unsubscribe-Post").unwrap_or_default();
    let one_click = post.trim() == "List-Unsubscribe=One-Click";

    let problem = if !has_https {
        "it has no List-Unsubscribe header with an https URI; add List-Unsubscribe: <https://...>"
    } else if !one_click {
        "it has no List-Unsubscribe-Post: List-Unsubscribe=One-Click header; add it"
    } else if !signed {
        "its List-Unsubscribe headers are not covered by a DKIM signature; list both in defaults.headers of policies/senders.yaml"
    } else {
        return Ok(());
    };
    Err(Reply::new(
        550,
        "5.7.1",
        format!("Bulk mail from {domain} must offer one-click unsubscribe (RFC 8058), but {problem}"),
    ))
}

/// Returns the unfolded value of the first header field `name`.
fn raw_header(message: &[u8], name: &str) -> Option<String> {
    let end = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(message.len(), |p| p + 2);
    let text = String::from_utf8_lossy(&message[..end]);
    let mut value: Option<String> = None;
    for line in text.split("\r\n") {
        if let Some(current) = value.as_mut() {
            if line.starts_with([' ', '\t']) {
                current.push_str(line);
                continue;
            }
            return value;
        }
        if let Some((field, rest)) = line.split_once(':')
            && field.trim_end().eq_ignore_ascii_case(name)
        {
            value = Some(rest.trim().to_string());
        }
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    const BULK: &str = "From: a@example.com\r\nPrecedence: bulk\r\n";

    #[test]
    fn transactional_mail_passes() {
        assert!(check(b"From: a@example.com\r\n\r\nbody\r\n", "example.com", false).is_ok());
    }

    #[test]
    fn bulk_without_header_rejected() {
        let message = format!("{BULK}\r\nbody\r\n");
        let reply = check(message.as_bytes(), "example.com", true).unwrap_err();
        assert!(reply.text().contains("no List-Unsubscribe header with an https URI"));
    }

    #[test]
    fn bulk_without_post_rejected() {
        let message = format!("{BULK}List-Unsubscribe: <mailto:u@example.com>,\r\n <https://example.com/u>\r\n\r\nbody\r\n");
        let reply = check(message.as_bytes(), "example.com", true).unwrap_err();
        assert!(reply.text().contains("List-Unsubscribe-Post"));
    }

    #[test]
    fn complete_bulk_passes() {
        let message = format!(
            "{BULK}List-Unsubscribe: <https://example.com/u>\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n\r\nbody\r\n"
        );
        assert!(check(message.as_bytes(), "example.com", true).is_ok());
        let unsigned = check(message.as_bytes(), "example.com", false).unwrap_err();
        assert!(unsigned.text().contains("not covered by a DKIM signature"));
    }

    #[test]
    fn marketing_stream_is_bulk() {
        let message = b"From: a@example.com\r\nX-Baton-Stream: marketing\r\n\r\nbody\r\n";
        assert!(check(message, "example.com", true).is_err());
    }
}
