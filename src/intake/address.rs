//! Checks on envelope addresses at intake, and the recipient domain that
//! delivery groups by.

use crate::reply::Reply;

/// A recipient accepted at RCPT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    /// The address with its domain in A-label form.
    pub address: String,
    /// Lower-cased A-label domain.
    pub domain: String,
}

/// Splits an address at its last `@` and returns the address exactly as
/// given with its domain in lower-cased A-labels (RFC 5890) for routing,
/// or the reply that rejects it. A non-ASCII local part or domain needs
/// SMTPUTF8 (RFC 6531).
pub fn parse_address(address: &str, smtputf8: bool) -> Result<Recipient, Reply> {
    let Some((local, domain)) = address.rsplit_once('@') else {
        return Err(Reply::new(
            501,
            "5.1.3",
            format!("Address <{address}> has no domain; write it as user@domain"),
        ));
    };
    if local.is_empty() {
        return Err(Reply::new(
            501,
            "5.1.3",
            format!("Address <{address}> has an empty local part"),
        ));
    }
    if domain.starts_with('[') {
        return Err(Reply::new(
            550,
            "5.1.2",
            format!("Address literal {domain} is not accepted; use a domain name"),
        ));
    }
    if !local.is_ascii() && !smtputf8 {
        return Err(Reply::new(
            553,
            "5.6.7",
            format!("Address <{address}> has a non-ASCII local part; add SMTPUTF8 to MAIL FROM"),
        ));
    }
    if !domain.is_ascii() && !smtputf8 {
        return Err(Reply::new(
            553,
            "5.6.7",
            format!("Address <{address}> has a non-ASCII domain; add SMTPUTF8 to MAIL FROM, or write the domain in A-labels (xn--)"),
        ));
    }
    let ascii_domain = match idna::domain_to_ascii(domain) {
        Ok(ascii) if is_valid_hostname(&ascii) => ascii,
        _ => {
            return Err(Reply::new(
                501,
                "5.1.2",
                format!("Domain {domain:?} in <{address}> is not a valid domain name"),
            ));
        }
    };
    Ok(Recipient {
        address: address.to_string(),
        domain: ascii_domain.to_ascii_lowercase(),
    })
}

/// Checks a lower-case ASCII domain: dot-separated labels of letters, digits
/// and hyphens, 1 to 63 bytes each, 253 in all (RFC 1035 section 2.3.4).
fn is_valid_hostname(domain: &str) -> bool {
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    !domain.is_empty()
        && domain.len() <= 253
        && domain.contains('.')
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_lowercased() {
        let recipient = parse_address("User@Example.COM", false).unwrap();
        assert_eq!(recipient.domain, "example.com");
        assert_eq!(recipient.address, "User@Example.COM");
    }

    #[test]
    fn idn_domain_kept_and_routed_by_a_label() {
        let recipient = parse_address("user@Bücher.example", true).unwrap();
        assert_eq!(recipient.address, "user@Bücher.example");
        assert_eq!(recipient.domain, "xn--bcher-kva.example");
        assert_eq!(parse_address("user@bücher.example", false).unwrap_err().code, 553);
    }

    #[test]
    fn utf8_local_part_needs_smtputf8() {
        assert_eq!(parse_address("jösé@example.com", false).unwrap_err().code, 553);
        assert!(parse_address("jösé@example.com", true).is_ok());
    }

    #[test]
    fn invalid_domains_rejected() {
        for address in ["a@", "a@-x.example", "a@exa mple.com", "a@[127.0.0.1]", "a@localhost"] {
            assert!(parse_address(address, false).is_err(), "{address}");
        }
    }
}

/// Formats an address for MAIL FROM or RCPT TO, quoting the local part when
/// it is not a dot-atom (RFC 5321 section 4.1.2). The command parser removes
/// the quotes of a quoted local part, so they are put back here.
pub fn smtp_path(address: &str) -> String {
    let Some((local, domain)) = address.rsplit_once('@') else {
        return address.to_string();
    };
    if is_dot_atom(local) {
        return address.to_string();
    }
    let mut quoted = String::with_capacity(local.len() + 2);
    quoted.push('"');
    for c in local.chars() {
        if c == '"' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    format!("{quoted}@{domain}")
}

fn is_dot_atom(local: &str) -> bool {
    !local.is_empty()
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local.chars().all(|c| {
            c.is_ascii_alphanumeric() || !c.is_ascii() || "!#$%&'*+-/=?^_`{|}~.".contains(c)
        })
}

#[cfg(test)]
mod path_tests {
    use super::smtp_path;

    #[test]
    fn dot_atom_unchanged() {
        assert_eq!(smtp_path("first.last+tag@example.com"), "first.last+tag@example.com");
    }

    #[test]
    fn special_local_part_quoted() {
        assert_eq!(smtp_path("john smith@example.com"), "\"john smith\"@example.com");
        assert_eq!(smtp_path("a\"b@example.com"), "\"a\\\"b\"@example.com");
        assert_eq!(smtp_path("a..b@example.com"), "\"a..b\"@example.com");
    }
}
