//! The alignment check: would this message pass DMARC at the receiver?
//!
//! Run before the `250`, on the signed bytes. DMARC (RFC 7489) passes when
//! DKIM passes for a domain aligned with the From domain, or SPF passes for
//! an aligned MAIL FROM domain. The gateway knows both sides, so it can
//! check them before queueing:
//! - DKIM: the signatures are verified against the published keys, exactly
//!   as a receiver would (a key record that does not match fails here).
//! - SPF: the MAIL FROM domain's record is evaluated (mail-auth: include,
//!   redirect, macros, the 10-lookup limit) for every source IP the message
//!   may leave from. NOTE: mail-auth 0.15.1 does not apply the void-lookup
//!   limit (RFC 7208 section 4.6.4), so a record with more than two void
//!   lookups before its match is still evaluated, not a permerror.
//!
//! Organizational domains come from the public suffix list (psl), never
//! from string suffixes. A DNS failure is a temporary error, never a guess.

use std::net::IpAddr;

use mail_auth::spf::verify::SpfParameters;
use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator, Parameters, SpfResult};
use serde::Serialize;

use crate::dns::Resolver;

/// One thing found wrong or missing, with the fix.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// `from`, `dmarc`, `dkim` or `spf`.
    pub check: &'static str,
    /// Problem and fix, as one sentence for an SMTP reply.
    pub text: String,
}

/// The verdict and what led to it.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub from_domain: String,
    /// DMARC would pass for every source IP.
    pub pass: bool,
    pub dkim_aligned: bool,
    /// SPF passed, aligned, for every source IP (false when not checked).
    pub spf_aligned: bool,
    /// The published DMARC policy (`p=`, or `sp=` for a subdomain), if any.
    pub policy: Option<String>,
    pub findings: Vec<Finding>,
}

impl Report {
    /// Returns the findings that explain a failed verdict, as one reply text.
    pub fn failure_text(&self) -> String {
        let reasons: Vec<&str> = self
            .findings
            .iter()
            .filter(|f| f.check != "dmarc")
            .map(|f| f.text.as_str())
            .collect();
        format!("DMARC would fail for {}: {}", self.from_domain, reasons.join("; "))
    }
}

/// Parts of one message the check reads.
pub struct CheckInput<'a> {
    /// The message as it will be sent, signatures included.
    pub message: &'a [u8],
    /// Envelope sender; empty for the null sender.
    pub mail_from: &'a str,
    /// EHLO name the gateway uses outbound (SPF's HELO identity).
    pub helo: &'a str,
    /// Every source IP the message may leave from; empty when no pools
    /// are configured, which skips SPF.
    pub source_ips: &'a [IpAddr],
}

/// A published DMARC record (RFC 7489 section 6.3), as far as alignment
/// needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmarcRecord {
    /// Domain the record was found at.
    pub domain: String,
    pub policy: String,
    pub subdomain_policy: Option<String>,
    pub strict_dkim: bool,
    pub strict_spf: bool,
    pub percent: u8,
}

/// Runs the check. `Err` is a temporary failure (DNS timeout or SERVFAIL)
/// to be answered with `451 4.4.3`.
pub async fn check(authenticator: &MessageAuthenticator, input: &CheckInput<'_>) -> Result<Report, String> {
    let mut findings = Vec::new();

    // 1. Exactly one From address (RFC 7489 section 6.6.1).
    let from_domain = match single_from_domain(input.message) {
        Ok(domain) => domain,
        Err(text) => {
            return Ok(Report {
                from_domain: String::new(),
                pass: false,
                dkim_aligned: false,
                spf_aligned: false,
                policy: None,
                findings: vec![Finding { check: "from", text }],
            });
        }
    };
    let from_org = organizational(&from_domain);

    // 2. The DMARC record: at the From domain, else at its organizational domain.
    let dmarc = lookup_dmarc(authenticator.resolver(), &from_domain, &from_org).await?;
    let (strict_dkim, strict_spf) = dmarc.as_ref().map_or((false, false), |r| (r.strict_dkim, r.strict_spf));
    if dmarc.is_none() {
        findings.push(Finding {
            check: "dmarc",
            text: format!(
                "no DMARC record at _dmarc.{from_domain} or _dmarc.{from_org}; publish one such as \"v=DMARC1; p=none; rua=mailto:dmarc@{from_org}\" (Gmail and Yahoo require it from bulk senders)"
            ),
        });
    }
    let aligned = |domain: &str, strict: bool| {
        if strict {
            domain.eq_ignore_ascii_case(&from_domain)
        } else {
            organizational(domain) == from_org
        }
    };

    // 3. DKIM: verify the signatures as a receiver would.
    let parsed = AuthenticatedMessage::parse(input.message)
        .ok_or_else(|| "the message could not be parsed for DKIM verification".to_string())?;
    let outputs = authenticator.verify_dkim(Parameters::new(&parsed)).await;
    let mut dkim_aligned = false;
    let mut saw_aligned_signature = false;
    for output in &outputs {
        let Some(signature) = output.signature() else {
            continue;
        };
        if !aligned(&signature.d, strict_dkim) {
            continue;
        }
        saw_aligned_signature = true;
        let record = format!("{}._domainkey.{}", signature.s, signature.d);
        match output.result() {
            DkimResult::Pass => dkim_aligned = true,
            DkimResult::TempError(error) => return Err(format!("DNS lookup of {record} failed: {error}")),
            DkimResult::PermError(_) => findings.push(Finding {
                check: "dkim",
                text: format!("DKIM key record {record} is missing or invalid; publish the record printed by baton dkim keygen (baton dkim check shows it)"),
            }),
            DkimResult::Fail(_) | DkimResult::Neutral(_) => findings.push(Finding {
                check: "dkim",
                text: format!("DKIM signature for {} does not verify against {record}; the published key does not match keys/{}/{}.pem, publish the record baton dkim check prints", signature.d, signature.d, signature.s),
            }),
            DkimResult::None => {}
        }
    }
    if !saw_aligned_signature {
        let mode = if strict_dkim { "strict" } else { "relaxed" };
        findings.push(Finding {
            check: "dkim",
            text: format!("no DKIM signature aligned ({mode}) with From domain {from_domain}; add a key for {from_domain} to policies/senders.yaml"),
        });
    }

    // 4. SPF for the MAIL FROM domain (the HELO name for the null sender).
    let spf_domain = match input.mail_from.rsplit_once('@') {
        Some((_, domain)) => domain.to_ascii_lowercase(),
        None => input.helo.to_ascii_lowercase(),
    };
    let mut spf_aligned = false;
    if input.source_ips.is_empty() {
        findings.push(Finding {
            check: "spf",
            text: "SPF not checked: no source IPs in policies/pools.yaml".to_string(),
        });
    } else if !aligned(&spf_domain, strict_spf) {
        let mode = if strict_spf { "strict" } else { "relaxed" };
        findings.push(Finding {
            check: "spf",
            text: format!("MAIL FROM domain {spf_domain} is not aligned ({mode}) with From domain {from_domain}; use a bounce address under {from_domain}"),
        });
    } else if count_spf_records(authenticator.resolver(), &spf_domain).await? > 1 {
        findings.push(Finding {
            check: "spf",
            text: format!("{spf_domain} publishes several SPF records, which is a permerror (RFC 7208 section 4.5); merge them into one record"),
        });
    } else {
        spf_aligned = true;
        for ip in input.source_ips {
            let sender = if input.mail_from.is_empty() { "" } else { input.mail_from };
            let parameters = SpfParameters::mail_from(*ip, input.helo, input.helo, sender);
            let output = authenticator.check_host(Parameters::new(parameters)).await;
            let fix = match ip {
                IpAddr::V4(_) => format!("add ip4:{ip} to its SPF record"),
                IpAddr::V6(_) => format!("add ip6:{ip} to its SPF record"),
            };
            match output.result() {
                SpfResult::Pass => {}
                SpfResult::TempError => return Err(format!("DNS lookup for the SPF record of {spf_domain} failed")),
                SpfResult::None => {
                    spf_aligned = false;
                    findings.push(Finding {
                        check: "spf",
                        text: format!("{spf_domain} has no SPF record; publish \"v=spf1 {} -all\"", spf_mechanisms(input.source_ips)),
                    });
                    break;
                }
                SpfResult::PermError => {
                    spf_aligned = false;
                    findings.push(Finding {
                        check: "spf",
                        text: format!("SPF record of {spf_domain} is invalid (permerror: a syntax error, several SPF records, or over 10 DNS lookups); fix it to one record within the limits"),
                    });
                    break;
                }
                result => {
                    spf_aligned = false;
                    findings.push(Finding {
                        check: "spf",
                        text: format!("SPF for {spf_domain} does not allow {ip} ({}); {fix}", spf_result_name(result)),
                    });
                }
            }
        }
    }

    let policy = dmarc.as_ref().map(|record| {
        if from_domain != record.domain {
            record.subdomain_policy.clone().unwrap_or_else(|| record.policy.clone())
        } else {
            record.policy.clone()
        }
    });
    Ok(Report {
        from_domain,
        pass: dkim_aligned || spf_aligned,
        dkim_aligned,
        spf_aligned,
        policy,
        findings,
    })
}

pub fn spf_result_name(result: SpfResult) -> &'static str {
    match result {
        SpfResult::Pass => "pass",
        SpfResult::Fail => "fail",
        SpfResult::SoftFail => "softfail",
        SpfResult::Neutral => "neutral",
        SpfResult::TempError => "temperror",
        SpfResult::PermError => "permerror",
        SpfResult::None => "none",
    }
}

/// Returns `ip4:`/`ip6:` mechanisms for the source IPs.
pub fn spf_mechanisms(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(|ip| match ip {
            IpAddr::V4(_) => format!("ip4:{ip}"),
            IpAddr::V6(_) => format!("ip6:{ip}"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Returns the organizational domain from the public suffix list:
/// `sub.example.co.uk` gives `example.co.uk`.
pub fn organizational(domain: &str) -> String {
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    psl::domain_str(&domain).map(str::to_string).unwrap_or(domain)
}

/// Returns the domain of the only From address, or the reason there is not
/// exactly one.
fn single_from_domain(message: &[u8]) -> Result<String, String> {
    let parsed = mail_parser::MessageParser::new()
        .parse_headers(message)
        .ok_or_else(|| "the header section could not be parsed".to_string())?;
    let from_fields = parsed
        .headers()
        .iter()
        .filter(|header| matches!(header.name(), mail_parser::HeaderName::From))
        .count();
    if from_fields != 1 {
        return Err(format!("the message has {from_fields} From header fields; it must have exactly one (RFC 5322 section 3.6)"));
    }
    let addresses: Vec<String> = parsed
        .from()
        .map(|from| from.mailboxes().filter_map(|mailbox| mailbox.address().map(str::to_string)).collect())
        .unwrap_or_default();
    match addresses.as_slice() {
        [address] => match address.rsplit_once('@') {
            Some((_, domain)) if !domain.is_empty() => idna::domain_to_ascii(domain.trim_end_matches('.'))
                .map_err(|_| format!("the From domain {domain:?} is not a valid domain name")),
            _ => Err(format!("the From address {address:?} has no domain")),
        },
        [] => Err("the From header holds no address; put exactly one sender address in From".to_string()),
        several => Err(format!(
            "the From header holds {} addresses; DMARC needs exactly one, so keep one address in From",
            several.len()
        )),
    }
}

/// Counts the SPF records at `domain`. mail-auth 0.15 evaluates the first
/// one when there are several, but RFC 7208 section 4.5 makes that a
/// permerror, so the check counts them itself.
// NOTE: only the MAIL FROM domain is counted; an included or redirected
// domain with several records is still evaluated by its first one.
pub async fn count_spf_records(resolver: &Resolver, domain: &str) -> Result<usize, String> {
    let name = format!("{}.", domain.trim_end_matches('.'));
    match resolver.txt_lookup(name.as_str()).await {
        Ok(lookup) => Ok(txt_strings(lookup.answers())
            .iter()
            .filter(|text| {
                let lower = text.to_ascii_lowercase();
                lower == "v=spf1" || lower.starts_with("v=spf1 ")
            })
            .count()),
        Err(error) if error.is_nx_domain() || error.is_no_records_found() => Ok(0),
        Err(error) => Err(format!("DNS lookup of the SPF record of {domain} failed: {error}")),
    }
}

/// Returns each TXT record's text, its character-strings concatenated.
pub(crate) fn txt_strings(records: &[hickory_resolver::proto::rr::Record]) -> Vec<String> {
    records
        .iter()
        .filter_map(|record| match &record.data {
            hickory_resolver::proto::rr::RData::TXT(txt) => Some(
                txt.txt_data
                    .iter()
                    .map(|part| String::from_utf8_lossy(part).into_owned())
                    .collect::<String>(),
            ),
            _ => None,
        })
        .collect()
}

/// Looks up the DMARC record at `_dmarc.<from>`, then at the organizational
/// domain (RFC 7489 section 6.6.3). NXDOMAIN or no record means none.
pub async fn lookup_dmarc(resolver: &Resolver, from_domain: &str, from_org: &str) -> Result<Option<DmarcRecord>, String> {
    let mut candidates = vec![from_domain.to_string()];
    if from_org != from_domain {
        candidates.push(from_org.to_string());
    }
    for domain in candidates {
        let name = format!("_dmarc.{domain}.");
        let lookup = match resolver.txt_lookup(name.as_str()).await {
            Ok(lookup) => lookup,
            Err(error) if error.is_nx_domain() || error.is_no_records_found() => continue,
            Err(error) => return Err(format!("DNS lookup of {name} failed: {error}")),
        };
        let records: Vec<String> = txt_strings(lookup.answers())
            .into_iter()
            .filter(|text| text.trim_start().starts_with("v=DMARC1"))
            .collect();
        // Several DMARC records mean none applies (RFC 7489 section 6.6.3).
        if let [text] = records.as_slice() {
            if let Some(record) = parse_dmarc(&domain, text) {
                return Ok(Some(record));
            }
        }
    }
    Ok(None)
}

/// Parses a DMARC record; `None` when it has no valid `p=` tag.
pub fn parse_dmarc(domain: &str, text: &str) -> Option<DmarcRecord> {
    let mut record = DmarcRecord {
        domain: domain.to_string(),
        policy: String::new(),
        subdomain_policy: None,
        strict_dkim: false,
        strict_spf: false,
        percent: 100,
    };
    for tag in text.split(';') {
        let Some((name, value)) = tag.split_once('=') else {
            continue;
        };
        let value = value.trim().to_ascii_lowercase();
        match name.trim() {
            "p" if matches!(value.as_str(), "none" | "quarantine" | "reject") => record.policy = value,
            "sp" if matches!(value.as_str(), "none" | "quarantine" | "reject") => record.subdomain_policy = Some(value),
            "adkim" => record.strict_dkim = value == "s",
            "aspf" => record.strict_spf = value == "s",
            "pct" => record.percent = value.parse::<u8>().ok().filter(|p| *p <= 100).unwrap_or(100),
            _ => {}
        }
    }
    (!record.policy.is_empty()).then_some(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn organizational_uses_public_suffix_list() {
        assert_eq!(organizational("sub.example.co.uk"), "example.co.uk");
        assert_eq!(organizational("a.b.example.com"), "example.com");
        assert_eq!(organizational("Example.COM."), "example.com");
    }

    #[test]
    fn dmarc_tags_parsed() {
        let record = parse_dmarc("example.com", "v=DMARC1; p=reject; sp=none; adkim=s; aspf=r; pct=50").unwrap();
        assert_eq!(record.policy, "reject");
        assert_eq!(record.subdomain_policy.as_deref(), Some("none"));
        assert!(record.strict_dkim);
        assert!(!record.strict_spf);
        assert_eq!(record.percent, 50);
        assert!(parse_dmarc("example.com", "v=DMARC1; rua=mailto:x@example.com").is_none());
    }

    #[test]
    fn from_must_hold_one_address() {
        assert_eq!(single_from_domain(b"From: a@Example.com\r\n\r\n").unwrap(), "example.com");
        assert!(single_from_domain(b"From: a@x.example, b@y.example\r\n\r\n").unwrap_err().contains("2 addresses"));
        assert!(single_from_domain(b"From: a@x.example\r\nFrom: b@x.example\r\n\r\n").unwrap_err().contains("2 From header fields"));
        assert!(single_from_domain(b"Subject: none\r\n\r\n").unwrap_err().contains("0 From"));
    }
}
