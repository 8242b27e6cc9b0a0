//! `policies/senders.yaml`: the domains Baton signs for and how.
//!
//! ```yaml
//! defaults:
//!   headers: [From, To, Subject, Date, Message-ID]
//!   oversign: [From, Subject]
//!   canonicalization: relaxed/relaxed
//!   unsigned: reject
//! domains:
//!   example.com:
//!     selectors: [s2026r, s2026e]
//!     expire_after: 7d
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::bail;
use serde::{Deserialize, Deserializer};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Senders {
    #[serde(default)]
    pub defaults: SenderDefaults,
    /// Signing domains by name (lower-cased when loaded).
    #[serde(default)]
    pub domains: BTreeMap<String, SenderDomain>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SenderDefaults {
    /// Header fields to sign (`h=`); every occurrence present is signed.
    pub headers: Vec<String>,
    /// Header fields signed once more than they occur, so that adding
    /// another one later breaks the signature (RFC 6376 section 8.15).
    pub oversign: Vec<String>,
    /// `header/body` canonicalization: `relaxed` or `simple` each.
    pub canonicalization: String,
    /// Handling of mail whose From domain has no key.
    pub unsigned: Unsigned,
    /// SPF/DMARC alignment check for domains without their own setting.
    pub alignment: AlignmentMode,
    /// Bulk mail must offer one-click unsubscribe (RFC 8058).
    pub require_one_click_unsubscribe: bool,
}

/// Alignment check mode: the handling of a message that would fail DMARC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlignmentMode {
    /// Reject with `550 5.7.1`, naming the failing check and the fix.
    Enforce,
    /// Accept, and log and count the finding.
    Warn,
    /// Skip the check.
    Off,
}

impl AlignmentMode {
    pub fn label(self) -> &'static str {
        match self {
            AlignmentMode::Enforce => "enforce",
            AlignmentMode::Warn => "warn",
            AlignmentMode::Off => "off",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unsigned {
    /// Reject with `550 5.7.1`, naming the domain.
    Reject,
    /// Relay the message without a signature.
    Relay,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SenderDomain {
    /// Selectors that sign; each one adds a DKIM-Signature header. Its key
    /// is `keys/<domain>/<selector>.pem`.
    pub selectors: Vec<String>,
    /// Signature lifetime, written as the `x=` tag; absent means none.
    #[serde(default, deserialize_with = "optional_duration")]
    pub expire_after: Option<Duration>,
    /// Alignment check for this domain; absent means `defaults.alignment`.
    #[serde(default)]
    pub alignment: Option<AlignmentMode>,
    /// One-click unsubscribe for bulk mail; absent means the default.
    #[serde(default)]
    pub require_one_click_unsubscribe: Option<bool>,
}

impl Default for SenderDefaults {
    fn default() -> Self {
        let names = |list: &[&str]| list.iter().map(|name| name.to_string()).collect();
        SenderDefaults {
            headers: names(&[
                "From",
                "To",
                "Cc",
                "Subject",
                "Date",
                "Message-ID",
                "Reply-To",
                "MIME-Version",
                "Content-Type",
                "List-Unsubscribe",
                "List-Unsubscribe-Post",
                "Feedback-ID",
            ]),
            oversign: names(&["From", "Subject", "List-Unsubscribe", "List-Unsubscribe-Post"]),
            canonicalization: "relaxed/relaxed".to_string(),
            unsigned: Unsigned::Reject,
            alignment: AlignmentMode::Warn,
            require_one_click_unsubscribe: false,
        }
    }
}

impl Senders {
    /// Parses the file's text and checks it.
    pub fn parse(text: &str) -> anyhow::Result<Senders> {
        let mut senders: Senders = if text.trim().is_empty() {
            Senders::default()
        } else {
            serde_norway::from_str(text)?
        };
        senders.domains = std::mem::take(&mut senders.domains)
            .into_iter()
            .map(|(domain, settings)| (domain.trim_end_matches('.').to_ascii_lowercase(), settings))
            .collect();
        senders.validate()?;
        Ok(senders)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if !self.defaults.headers.iter().any(|h| h.eq_ignore_ascii_case("from")) {
            bail!("defaults.headers must include From (RFC 6376 section 5.4.1)");
        }
        self.canonicalization()?;
        for (domain, settings) in &self.domains {
            if settings.selectors.is_empty() {
                bail!("domains.{domain}.selectors is empty; list at least one selector");
            }
            for selector in &settings.selectors {
                let valid = !selector.is_empty()
                    && selector.split('.').all(|label| {
                        !label.is_empty() && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    });
                if !valid {
                    bail!("domains.{domain}.selectors: {selector:?} is not a valid selector; use letters, digits and hyphens");
                }
            }
        }
        Ok(())
    }

    /// Returns the header and body canonicalizations.
    pub fn canonicalization(&self) -> anyhow::Result<(Canon, Canon)> {
        let text = self.defaults.canonicalization.as_str();
        let (header, body) = text.split_once('/').unwrap_or((text, "simple"));
        let parse = |name: &str| match name {
            "relaxed" => Ok(Canon::Relaxed),
            "simple" => Ok(Canon::Simple),
            other => bail!(
                "defaults.canonicalization: {other:?} is not relaxed or simple; write for example relaxed/relaxed"
            ),
        };
        Ok((parse(header)?, parse(body)?))
    }

    /// Returns the alignment mode for mail from `domain` (or its
    /// organizational domain, when only that one is configured).
    pub fn alignment_for(&self, domain: &str) -> AlignmentMode {
        let organizational = psl::domain_str(domain).unwrap_or(domain);
        self.domains
            .get(domain)
            .or_else(|| self.domains.get(organizational))
            .and_then(|settings| settings.alignment)
            .unwrap_or(self.defaults.alignment)
    }

    /// Returns whether bulk mail from `domain` must offer one-click
    /// unsubscribe.
    pub fn one_click_required(&self, domain: &str) -> bool {
        let organizational = psl::domain_str(domain).unwrap_or(domain);
        self.domains
            .get(domain)
            .or_else(|| self.domains.get(organizational))
            .and_then(|settings| settings.require_one_click_unsubscribe)
            .unwrap_or(self.defaults.require_one_click_unsubscribe)
    }

    /// Returns the header list for `h=`: the signed headers, then each
    /// oversigned header once more.
    pub fn signed_headers(&self) -> Vec<String> {
        let mut headers = self.defaults.headers.clone();
        headers.extend(self.defaults.oversign.iter().cloned());
        headers
    }
}

/// A DKIM canonicalization algorithm (RFC 6376 section 3.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Canon {
    Simple,
    Relaxed,
}

fn optional_duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(&text)
        .map(Some)
        .map_err(|error| serde::de::Error::custom(format!("invalid duration {text:?} ({error}); write for example 7d")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_shape_parses() {
        let text = r#"
defaults:
  headers: [From, To, Subject]
  oversign: [From]
  canonicalization: relaxed/simple
  unsigned: relay
domains:
  Example.COM:
    selectors: [s2026r, s2026e]
    expire_after: 7d
"#;
        let senders = Senders::parse(text).unwrap();
        assert_eq!(senders.defaults.unsigned, Unsigned::Relay);
        assert_eq!(senders.alignment_for("example.com"), AlignmentMode::Warn);
        assert_eq!(senders.canonicalization().unwrap(), (Canon::Relaxed, Canon::Simple));
        let domain = &senders.domains["example.com"];
        assert_eq!(domain.selectors, vec!["s2026r", "s2026e"]);
        assert_eq!(domain.expire_after, Some(Duration::from_secs(7 * 86400)));
        assert_eq!(senders.signed_headers(), vec!["From", "To", "Subject", "From"]);
    }

    #[test]
    fn alignment_per_domain() {
        let text = "defaults:\n  alignment: off\ndomains:\n  example.com:\n    selectors: [s]\n    alignment: enforce\n";
        let senders = Senders::parse(text).unwrap();
        assert_eq!(senders.alignment_for("example.com"), AlignmentMode::Enforce);
        assert_eq!(senders.alignment_for("news.example.com"), AlignmentMode::Enforce);
        assert_eq!(senders.alignment_for("other.example"), AlignmentMode::Off);
    }

    #[test]
    fn unsigned_defaults_to_reject() {
        let senders = Senders::parse("domains: {}\n").unwrap();
        assert_eq!(senders.defaults.unsigned, Unsigned::Reject);
    }

    #[test]
    fn unknown_field_named() {
        let error = Senders::parse("domains:\n  a.example:\n    selector: [x]\n").unwrap_err();
        assert!(format!("{error:#}").contains("selector"), "{error:#}");
    }

    #[test]
    fn bad_canonicalization_named() {
        let error = Senders::parse("defaults:\n  canonicalization: loose/relaxed\n").unwrap_err();
        assert!(format!("{error:#}").contains("loose"), "{error:#}");
    }
}
