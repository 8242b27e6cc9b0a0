//! DKIM signing (RFC 6376) with the keys of the message's From domain.
//!
//! Keys live in `keys/<domain>/<selector>.pem`, and `policies/senders.yaml`
//! lists which domains sign and with which selectors. A message is signed
//! for its From domain, or for the organizational domain of From when only
//! that one has keys (still aligned under relaxed DMARC). Signing happens
//! once, before the message is spooled, over the exact bytes that are sent.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, bail};
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::KeyPair as _;
use base64::Engine;
use mail_auth::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::headers::HeaderWriter;
use mail_auth::dkim::{Canonicalization, DkimSigner};
use mail_auth::signer::Ready;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;

use crate::policy::senders::{AlignmentMode, Canon, Senders, Unsigned};
use crate::reply::Reply;

/// Smallest RSA key that signs without a warning, in bits (RFC 8301 section 3.2).
const RSA_MIN_BITS: usize = 2048;
/// Smallest RSA key accepted at all, in bits.
const RSA_LEGACY_BITS: usize = 1024;

/// A private key read from a PEM file.
pub enum PrivateKey {
    Rsa { key: RsaKey<Sha256>, bits: usize, spki: Vec<u8>, pkcs1: Vec<u8> },
    Ed25519 { key: Ed25519Key, public: Vec<u8> },
}

impl PrivateKey {
    /// Returns the `p=` value to publish: the SubjectPublicKeyInfo for RSA
    /// (what OpenSSL-based verifiers expect), the raw key for Ed25519
    /// (RFC 8463 section 4.2).
    pub fn public_record_key(&self) -> &[u8] {
        match self {
            PrivateKey::Rsa { spki, .. } => spki,
            PrivateKey::Ed25519 { public, .. } => public,
        }
    }

    /// Checks whether a published `p=` value is this key's public key.
    pub fn matches_published(&self, published: &[u8]) -> bool {
        match self {
            PrivateKey::Rsa { spki, pkcs1, .. } => published == spki.as_slice() || published == pkcs1.as_slice(),
            PrivateKey::Ed25519 { public, .. } => published == public.as_slice(),
        }
    }

    pub fn algorithm(&self) -> &'static str {
        match self {
            PrivateKey::Rsa { .. } => "rsa",
            PrivateKey::Ed25519 { .. } => "ed25519",
        }
    }

    /// Returns the DNS TXT record text (`v=DKIM1; k=...; p=...`).
    pub fn txt_record(&self) -> String {
        let encoded = base64::engine::general_purpose::STANDARD.encode(self.public_record_key());
        format!("v=DKIM1; k={}; p={encoded}", self.algorithm())
    }
}

/// Reads a private key file, checking its permissions and size.
pub fn read_key(path: &Path) -> anyhow::Result<PrivateKey> {
    use std::os::unix::fs::PermissionsExt;
    let metadata = std::fs::metadata(path).with_context(|| format!("cannot read key file {}", path.display()))?;
    if metadata.permissions().mode() & 0o077 != 0 {
        bail!(
            "key file {} is readable by group or others; run chmod 600 {}",
            path.display(),
            path.display()
        );
    }
    let pem = std::fs::read(path).with_context(|| format!("cannot read key file {}", path.display()))?;
    let der = PrivateKeyDer::from_pem_slice(&pem).with_context(|| {
        format!("key file {} holds no PEM private key (PKCS#1 RSA or PKCS#8)", path.display())
    })?;
    parse_key(der).with_context(|| format!("key file {}", path.display()))
}

fn parse_key(der: PrivateKeyDer<'_>) -> anyhow::Result<PrivateKey> {
    let rsa = match &der {
        PrivateKeyDer::Pkcs1(pkcs1) => Some(aws_lc_rs::rsa::KeyPair::from_der(pkcs1.secret_pkcs1_der())),
        PrivateKeyDer::Pkcs8(pkcs8) => {
            if let Ok(key) = Ed25519Key::from_pkcs8_maybe_unchecked_der(pkcs8.secret_pkcs8_der()) {
                let public = key.public_key();
                return Ok(PrivateKey::Ed25519 { key, public });
            }
            Some(aws_lc_rs::rsa::KeyPair::from_pkcs8(pkcs8.secret_pkcs8_der()))
        }
        _ => None,
    };
    let Some(Ok(pair)) = rsa else {
        bail!("not an RSA or Ed25519 private key; DKIM supports rsa-sha256 and ed25519-sha256");
    };
    let bits = pair.public_modulus_len() * 8;
    if bits < RSA_LEGACY_BITS {
        bail!("RSA key of {bits} bits is too weak for DKIM (RFC 8301); make a 2048-bit key with baton dkim keygen");
    }
    let spki = pair
        .public_key()
        .as_der()
        .map_err(|_| anyhow::anyhow!("cannot encode the RSA public key"))?
        .as_ref()
        .to_vec();
    let key = RsaKey::<Sha256>::from_key_der(der.clone_key()).map_err(|error| anyhow::anyhow!("{error}"))?;
    let pkcs1 = key.public_key();
    Ok(PrivateKey::Rsa { key, bits, spki, pkcs1 })
}

enum Signer {
    Rsa(DkimSigner<RsaKey<Sha256>, Ready>),
    Ed25519(DkimSigner<Ed25519Key, Ready>),
}

/// One selector of a signing domain, ready to sign.
struct SelectorKey {
    selector: String,
    signer: Signer,
}

/// The signing state built from `senders.yaml` and the keys folder.
pub struct DkimPolicy {
    /// `None` when there is no `senders.yaml`: mail is relayed unsigned.
    senders: Option<Senders>,
    domains: BTreeMap<String, Vec<SelectorKey>>,
    /// Domains already warned about as unsigned, so each is logged once.
    warned: Mutex<HashSet<String>>,
}

/// Outcome of signing one message.
#[derive(Debug)]
pub enum Signing {
    /// DKIM-Signature header fields to put on top, each ending in CRLF.
    Signed { domain: String, headers: Vec<String> },
    /// Relayed unsigned, as the policy allows.
    Unsigned,
}

impl DkimPolicy {
    /// Loads `senders.yaml` from `policies` and every key it names from
    /// `keys`. Any missing or bad key fails the load.
    pub fn load(policies: &Path, keys: &Path) -> anyhow::Result<DkimPolicy> {
        let path = policies.join("senders.yaml");
        let senders = match std::fs::read_to_string(&path) {
            Ok(text) => Some(Senders::parse(&text).with_context(|| format!("invalid {}", path.display()))?),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
            Err(error) => return Err(error).with_context(|| format!("cannot read {}", path.display())),
        };
        let mut domains = BTreeMap::new();
        if let Some(senders) = &senders {
            let (header_canon, body_canon) = senders.canonicalization()?;
            let headers = senders.signed_headers();
            for (domain, settings) in &senders.domains {
                let mut selectors = Vec::new();
                for selector in &settings.selectors {
                    let key_path = key_path(keys, domain, selector);
                    let key = read_key(&key_path).with_context(|| {
                        format!("{} lists selector {selector} for {domain}", path.display())
                    })?;
                    if let PrivateKey::Rsa { bits, .. } = &key
                        && *bits < RSA_MIN_BITS
                    {
                        tracing::warn!(domain, selector, bits, "RSA key shorter than 2048 bits; receivers may treat the signature as weak (RFC 8301)");
                    }
                    let signer = build_signer(key, domain, selector, &headers, header_canon, body_canon, settings.expire_after);
                    selectors.push(SelectorKey {
                        selector: selector.clone(),
                        signer,
                    });
                }
                domains.insert(domain.clone(), selectors);
            }
        }
        Ok(DkimPolicy {
            senders,
            domains,
            warned: Mutex::new(HashSet::new()),
        })
    }

    /// Returns the alignment mode for mail from `domain`: `off` without a
    /// `senders.yaml`, so a first run makes no DNS queries for it.
    pub fn alignment_mode(&self, domain: &str) -> AlignmentMode {
        match &self.senders {
            Some(senders) => senders.alignment_for(domain),
            None => AlignmentMode::Off,
        }
    }

    /// Returns whether bulk mail from `domain` must offer one-click
    /// unsubscribe, and whether the signature covers both headers.
    pub fn one_click_rule(&self, domain: &str) -> Option<bool> {
        let senders = self.senders.as_ref()?;
        if !senders.one_click_required(domain) {
            return None;
        }
        let signed = senders.signed_headers();
        let covers = |name: &str| signed.iter().any(|h| h.eq_ignore_ascii_case(name));
        Some(covers("List-Unsubscribe") && covers("List-Unsubscribe-Post"))
    }

    /// Returns `domain` if it is a configured signing domain, else `other`:
    /// a bounded metric label.
    pub fn metric_domain<'a>(&self, domain: &'a str) -> &'a str {
        if self.domains.contains_key(domain) { domain } else { "other" }
    }

    /// Returns the number of signing domains and selectors, for logs.
    pub fn summary(&self) -> (usize, usize) {
        (self.domains.len(), self.domains.values().map(Vec::len).sum())
    }

    /// Signs `message` for its From domain. Returns the reply that rejects
    /// the message when the policy requires a signature it cannot make.
    pub fn sign(&self, message: &[u8], from_domain: Option<&str>) -> Result<Signing, Reply> {
        let Some(from_domain) = from_domain else {
            if self.senders.is_none() {
                return Ok(Signing::Unsigned);
            }
            return Err(Reply::new(
                550,
                "5.7.1",
                "Message has no From header with an address; DKIM signing needs the From domain",
            ));
        };
        let Some(senders) = &self.senders else {
            self.warn_unsigned(from_domain, "no policies/senders.yaml");
            return Ok(Signing::Unsigned);
        };

        let organizational = psl::domain_str(from_domain).unwrap_or(from_domain);
        let (domain, selectors) = match self.domains.get_key_value(from_domain) {
            Some(found) => found,
            None => match self.domains.get_key_value(organizational) {
                Some(found) => found,
                None => {
                    return match senders.defaults.unsigned {
                        Unsigned::Relay => {
                            self.warn_unsigned(from_domain, "no key for this domain and unsigned: relay");
                            Ok(Signing::Unsigned)
                        }
                        Unsigned::Reject => Err(Reply::new(
                            550,
                            "5.7.1",
                            format!(
                                "No DKIM key for sender domain {from_domain}; add the domain to policies/senders.yaml with a key in keys/{from_domain}/, or set unsigned: relay"
                            ),
                        )),
                    };
                }
            },
        };

        let existing = existing_signatures(message);
        let mut headers = Vec::with_capacity(selectors.len());
        for selector in selectors {
            if existing.contains(&(domain.clone(), selector.selector.to_ascii_lowercase())) {
                continue;
            }
            let signature = match &selector.signer {
                Signer::Rsa(signer) => signer.sign(message).map(|s| s.to_header()),
                Signer::Ed25519(signer) => signer.sign(message).map(|s| s.to_header()),
            };
            match signature {
                Ok(header) => headers.push(header),
                Err(error) => {
                    tracing::error!(domain = %domain, selector = %selector.selector, %error, "DKIM signing failed");
                    return Err(Reply::new(
                        451,
                        "4.3.0",
                        format!("DKIM signing for {domain} failed; try again later"),
                    ));
                }
            }
        }
        Ok(Signing::Signed {
            domain: domain.clone(),
            headers,
        })
    }

    fn warn_unsigned(&self, domain: &str, reason: &str) {
        let mut warned = self.warned.lock().expect("warned lock");
        if warned.insert(domain.to_string()) {
            tracing::warn!(domain, reason, "relaying mail unsigned");
        }
    }
}

pub fn key_path(keys: &Path, domain: &str, selector: &str) -> PathBuf {
    keys.join(domain).join(format!("{selector}.pem"))
}

fn build_signer(
    key: PrivateKey,
    domain: &str,
    selector: &str,
    headers: &[String],
    header_canon: Canon,
    body_canon: Canon,
    expire_after: Option<Duration>,
) -> Signer {
    let canon = |c: Canon| match c {
        Canon::Relaxed => Canonicalization::Relaxed,
        Canon::Simple => Canonicalization::Simple,
    };
    let expiration = expire_after.unwrap_or(Duration::ZERO);
    match key {
        PrivateKey::Rsa { key, .. } => Signer::Rsa(
            DkimSigner::from_key(key)
                .domain(domain)
                .selector(selector)
                .headers(headers.iter().cloned())
                .header_canonicalization(canon(header_canon))
                .body_canonicalization(canon(body_canon))
                .expiration(expiration),
        ),
        PrivateKey::Ed25519 { key, .. } => Signer::Ed25519(
            DkimSigner::from_key(key)
                .domain(domain)
                .selector(selector)
                .headers(headers.iter().cloned())
                .header_canonicalization(canon(header_canon))
                .body_canonicalization(canon(body_canon))
                .expiration(expiration),
        ),
    }
}

/// Returns the `(d=, s=)` pairs of the DKIM-Signature fields already in the
/// header section, lower-cased.
fn existing_signatures(message: &[u8]) -> HashSet<(String, String)> {
    let mut found = HashSet::new();
    for field in header_fields(message) {
        let Some((name, value)) = field.split_once(':') else {
            continue;
        };
        if !name.trim().eq_ignore_ascii_case("DKIM-Signature") {
            continue;
        }
        let mut domain = None;
        let mut selector = None;
        for tag in value.split(';') {
            let Some((key, tag_value)) = tag.split_once('=') else {
                continue;
            };
            let tag_value: String = tag_value.chars().filter(|c| !c.is_whitespace()).collect();
            match key.trim() {
                "d" => domain = Some(tag_value.to_ascii_lowercase()),
                "s" => selector = Some(tag_value.to_ascii_lowercase()),
                _ => {}
            }
        }
        if let (Some(domain), Some(selector)) = (domain, selector) {
            found.insert((domain, selector));
        }
    }
    found
}

/// Splits the header section into unfolded fields.
fn header_fields(message: &[u8]) -> Vec<String> {
    let end = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(message.len(), |p| p + 2);
    let text = String::from_utf8_lossy(&message[..end]);
    let mut fields: Vec<String> = Vec::new();
    for line in text.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = fields.last_mut() {
                last.push_str(line);
            }
        } else if !line.is_empty() {
            fields.push(line.to_string());
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn existing_signature_found() {
        let message = b"DKIM-Signature: v=1; a=rsa-sha256; d=Example.com;\r\n\ts=sel1; h=from; bh=x; b=y\r\nFrom: a@example.com\r\n\r\nbody\r\n";
        let found = existing_signatures(message);
        assert!(found.contains(&("example.com".to_string(), "sel1".to_string())));
        assert_eq!(found.len(), 1);
    }

    #[test]
    fn body_lines_are_not_headers() {
        let message = b"From: a@example.com\r\n\r\nDKIM-Signature: d=example.com; s=x\r\n";
        assert!(existing_signatures(message).is_empty());
    }
}
