//! MTA-STS (RFC 8461): a recipient domain that publishes a policy accepts
//! mail only at its listed MX hosts, over TLS with a certificate valid for
//! the MX host name.
//!
//! The `_mta-sts.<domain>` TXT record shows whether a policy exists and
//! gives its id. The policy itself comes from
//! `https://mta-sts.<domain>/.well-known/mta-sts.txt` and is cached for its
//! `max_age`; it is fetched again when the TXT id changes. When a fetch
//! fails, a cached policy that has not expired stays in force (RFC 8461
//! section 5.1).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::dns::Resolver;

/// Largest policy body read; RFC 8461 section 3.3 allows 64 KiB.
const MAX_POLICY_BYTES: usize = 64 * 1024;

/// Longest `max_age` honoured, one year (RFC 8461 section 3.2).
const MAX_AGE_LIMIT: u64 = 31_557_600;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    Testing,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    /// MX host patterns, lower-case; `*.` matches one leftmost label.
    pub mx: Vec<String>,
    pub max_age: u64,
    /// The TXT record id the policy was fetched under.
    pub id: String,
}

impl Policy {
    /// Returns whether `host` is an MX host the policy allows.
    pub fn allows(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.mx.iter().any(|pattern| match pattern.strip_prefix("*.") {
            Some(suffix) => host
                .split_once('.')
                .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
            None => *pattern == host,
        })
    }
}

/// Parses a policy body (RFC 8461 section 3.2).
pub fn parse_policy(text: &str, id: &str) -> Result<Policy, String> {
    let mut version = None;
    let mut mode = None;
    let mut mx = Vec::new();
    let mut max_age = None;
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            return Err(format!("invalid policy line {line:?}: expected key: value"));
        };
        let value = value.trim();
        match key.trim() {
            "version" => version = Some(value.to_string()),
            "mode" => {
                mode = Some(match value {
                    "enforce" => Mode::Enforce,
                    "testing" => Mode::Testing,
                    "none" => Mode::None,
                    other => return Err(format!("invalid mode {other:?}")),
                })
            }
            "mx" => mx.push(value.trim_end_matches('.').to_ascii_lowercase()),
            "max_age" => {
                let seconds: u64 = value.parse().map_err(|_| format!("invalid max_age {value:?}"))?;
                max_age = Some(seconds.min(MAX_AGE_LIMIT));
            }
            // Unknown keys are ignored, for extensions.
            _ => {}
        }
    }
    if version.as_deref() != Some("STSv1") {
        return Err("missing \"version: STSv1\"".to_string());
    }
    let mode = mode.ok_or("missing mode")?;
    let max_age = max_age.ok_or("missing max_age")?;
    if mode != Mode::None && mx.is_empty() {
        return Err("no mx lines".to_string());
    }
    Ok(Policy {
        mode,
        mx,
        max_age,
        id: id.to_string(),
    })
}

/// Returns the id of a `v=STSv1` TXT record, or `None` when there is none
/// or more than one (RFC 8461 section 3.1).
pub fn txt_id(records: &[String]) -> Option<String> {
    let mut found = records.iter().filter(|record| record.trim_start().starts_with("v=STSv1"));
    let record = found.next()?;
    if found.next().is_some() {
        return None;
    }
    record
        .split(';')
        .filter_map(|field| field.trim().split_once('='))
        .find(|(key, _)| key.trim() == "id")
        .map(|(_, value)| value.trim().to_string())
        .filter(|id| !id.is_empty())
}

/// Lets the HTTP client look names up with the gateway's resolver
/// (`dns.nameservers`), not the system's.
struct HttpResolver(Resolver);

impl reqwest::dns::Resolve for HttpResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let resolver = self.0.clone();
        Box::pin(async move {
            let lookup = resolver.lookup_ip(format!("{}.", name.as_str())).await?;
            let addresses: Vec<std::net::SocketAddr> = lookup.iter().map(|ip| std::net::SocketAddr::new(ip, 0)).collect();
            let addresses: reqwest::dns::Addrs = Box::new(addresses.into_iter());
            Ok(addresses)
        })
    }
}

/// Fetches and caches the policies of recipient domains.
pub struct MtaSts {
    client: reqwest::Client,
    port: u16,
    cache: Mutex<HashMap<String, (Arc<Policy>, Instant)>>,
}

impl MtaSts {
    /// Builds the fetcher. Policy hosts are looked up with `resolver`, the
    /// gateway's own, and verified with `tls`.
    pub fn new(tls: Arc<rustls::ClientConfig>, resolver: Resolver, port: u16) -> anyhow::Result<MtaSts> {
        let client = reqwest::Client::builder()
            .dns_resolver(Arc::new(HttpResolver(resolver)))
            .tls_backend_preconfigured((*tls).clone())
            .https_only(true)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(60))
            .user_agent(concat!("baton/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(MtaSts {
            client,
            port,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Returns the policy in force for `domain`, if any.
    pub async fn policy(&self, resolver: &Resolver, domain: &str) -> Option<Arc<Policy>> {
        let cached = {
            let cache = self.cache.lock().expect("MTA-STS cache lock");
            cache
                .get(domain)
                .filter(|(_, expires)| *expires > Instant::now())
                .map(|(policy, _)| policy.clone())
        };
        let name = format!("_mta-sts.{domain}.");
        let id = match resolver.txt_lookup(name.as_str()).await {
            Ok(lookup) => txt_id(&crate::pipeline::alignment::txt_strings(lookup.answers())),
            Err(_) => None,
        };
        let Some(id) = id else {
            // No record, or DNS failed: a cached policy still holds.
            return cached;
        };
        if let Some(policy) = &cached
            && policy.id == id
        {
            return cached;
        }
        match self.fetch(domain, &id).await {
            Ok(policy) => {
                let policy = Arc::new(policy);
                let expires = Instant::now() + Duration::from_secs(policy.max_age);
                tracing::info!(rcpt_domain = domain, mode = ?policy.mode, id = %policy.id, "MTA-STS policy fetched");
                self.cache
                    .lock()
                    .expect("MTA-STS cache lock")
                    .insert(domain.to_string(), (policy.clone(), expires));
                Some(policy)
            }
            Err(error) => {
                tracing::warn!(rcpt_domain = domain, %error, "MTA-STS policy fetch failed; using the cached policy if any");
                cached
            }
        }
    }

    async fn fetch(&self, domain: &str, id: &str) -> Result<Policy, String> {
        let url = format!("https://mta-sts.{domain}:{}/.well-known/mta-sts.txt", self.port);
        let response = self.client.get(&url).send().await.map_err(|error| format!("GET {url} failed: {error}"))?;
        if !response.status().is_success() {
            return Err(format!("GET {url} answered HTTP {}", response.status()));
        }
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_ascii_lowercase();
        if !content_type.starts_with("text/plain") {
            return Err(format!("GET {url} returned Content-Type {content_type:?}, not text/plain"));
        }
        let body = response.bytes().await.map_err(|error| format!("GET {url} failed: {error}"))?;
        if body.len() > MAX_POLICY_BYTES {
            return Err(format!("policy at {url} is larger than 64 KiB"));
        }
        parse_policy(&String::from_utf8_lossy(&body), id).map_err(|error| format!("invalid policy at {url}: {error}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_parses() {
        let text = "version: STSv1\r\nmode: enforce\r\nmx: mx1.example.com\r\nmx: *.mx.example.net.\r\nmax_age: 86400\r\n";
        let policy = parse_policy(text, "20260101").unwrap();
        assert_eq!(policy.mode, Mode::Enforce);
        assert_eq!(policy.max_age, 86400);
        assert!(policy.allows("MX1.example.com."));
        assert!(policy.allows("a.mx.example.net"));
        assert!(!policy.allows("a.b.mx.example.net"));
        assert!(!policy.allows("mx.example.net"));
        assert!(!policy.allows("mx2.example.com"));
    }

    #[test]
    fn invalid_policies_rejected() {
        for (text, expected) in [
            ("mode: enforce\nmx: a\nmax_age: 1\n", "version"),
            ("version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n", "invalid mode"),
            ("version: STSv1\nmode: enforce\nmax_age: 1\n", "no mx"),
            ("version: STSv1\nmode: enforce\nmx: a\n", "max_age"),
        ] {
            let error = parse_policy(text, "1").unwrap_err();
            assert!(error.contains(expected), "{expected:?} not in {error:?}");
        }
    }

    #[test]
    fn txt_record_id() {
        assert_eq!(txt_id(&["v=STSv1; id=20260101T00;".to_string()]), Some("20260101T00".to_string()));
        assert_eq!(txt_id(&["v=spf1 -all".to_string()]), None);
        let two = ["v=STSv1; id=1".to_string(), "v=STSv1; id=2".to_string()];
        assert_eq!(txt_id(&two), None);
    }
}
