//! `baton dkim keygen` and `baton dkim check`: make signing keys and check
//! that DNS publishes the matching public keys.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};

use anyhow::{Context, bail};
use aws_lc_rs::encoding::AsDer;
use base64::Engine;
use hickory_resolver::proto::rr::{RData, RecordType};

use crate::config::Config;
use crate::pipeline::dkim::{PrivateKey, key_path, read_key};
use crate::policy::senders::Senders;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Algorithm {
    #[value(name = "rsa-2048")]
    Rsa2048,
    #[value(name = "ed25519")]
    Ed25519,
}

/// Writes a new private key with mode 0600 and prints the TXT record.
pub fn keygen(config: &Config, domain: &str, selector: &str, algorithm: Algorithm) -> anyhow::Result<()> {
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let path = key_path(&config.keys, &domain, selector);
    if path.exists() {
        bail!(
            "{} already exists; pick a new selector (a key rotation publishes the new selector before it signs)",
            path.display()
        );
    }
    let pkcs8 = match algorithm {
        Algorithm::Rsa2048 => aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
            .map_err(|_| anyhow::anyhow!("RSA key generation failed"))?
            .as_der()
            .map_err(|_| anyhow::anyhow!("cannot encode the RSA key"))?
            .as_ref()
            .to_vec(),
        Algorithm::Ed25519 => mail_auth::crypto::Ed25519Key::generate_pkcs8()
            .map_err(|error| anyhow::anyhow!("Ed25519 key generation failed: {error}"))?,
    };
    let folder = path.parent().expect("key path has a folder");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(folder)
        .with_context(|| format!("cannot create {}", folder.display()))?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(pem("PRIVATE KEY", &pkcs8).as_bytes())?;
    drop(file);

    let key = read_key(&path)?;
    println!("Wrote {}", path.display());
    println!();
    println!("Publish this TXT record:");
    println!("{}", zone_line(selector, &domain, &key.txt_record()));
    println!();
    println!("Then list the selector in policies/senders.yaml:");
    println!("  domains:\n    {domain}:\n      selectors: [{selector}]");
    Ok(())
}

fn pem(label: &str, der: &[u8]) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(der);
    let mut text = format!("-----BEGIN {label}-----\n");
    for chunk in encoded.as_bytes().chunks(64) {
        text.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        text.push('\n');
    }
    text.push_str(&format!("-----END {label}-----\n"));
    text
}

/// Formats a zone file line, splitting the text into strings of at most
/// 255 bytes as TXT records require (RFC 1035 section 3.3.14).
fn zone_line(selector: &str, domain: &str, record: &str) -> String {
    let parts: Vec<String> = record
        .as_bytes()
        .chunks(255)
        .map(|chunk| format!("\"{}\"", std::str::from_utf8(chunk).expect("record is ASCII")))
        .collect();
    format!("{selector}._domainkey.{domain}. IN TXT ( {} )", parts.join(" "))
}

/// DNS record of one selector, compared with the private key.
#[derive(Debug, PartialEq, Eq)]
pub enum KeyStatus {
    Matching,
    Missing,
    Revoked,
    Different,
    LookupFailed(String),
}

/// Checks each configured selector's TXT record. Returns an error when any
/// selector is not published with the matching key.
pub async fn check(config: &Config, only_domain: Option<&str>) -> anyhow::Result<()> {
    let senders_path = config.policies.join("senders.yaml");
    let text = std::fs::read_to_string(&senders_path)
        .with_context(|| format!("cannot read {}; it lists the selectors to check", senders_path.display()))?;
    let senders = Senders::parse(&text).with_context(|| format!("invalid {}", senders_path.display()))?;
    let resolver = crate::dns::build(&config.dns)?;
    let only = only_domain.map(|d| d.trim_end_matches('.').to_ascii_lowercase());

    let mut failures = 0;
    let mut checked = 0;
    for (domain, settings) in &senders.domains {
        if only.as_ref().is_some_and(|o| o != domain) {
            continue;
        }
        for selector in &settings.selectors {
            checked += 1;
            let name = format!("{selector}._domainkey.{domain}");
            let key = match read_key(&key_path(&config.keys, domain, selector)) {
                Ok(key) => key,
                Err(error) => {
                    failures += 1;
                    println!("{name}: cannot check: {error:#}");
                    continue;
                }
            };
            let status = lookup_status(&resolver, &name, &key).await;
            match &status {
                KeyStatus::Matching => println!("{name}: published and matching"),
                KeyStatus::Missing => println!(
                    "{name}: missing; no DKIM record is published, so receivers cannot verify mail signed with it. Publish:\n  {}",
                    zone_line(selector, domain, &key.txt_record())
                ),
                KeyStatus::Revoked => println!("{name}: revoked (empty p=); mail signed with it fails DKIM. Publish the key or remove the selector."),
                KeyStatus::Different => println!(
                    "{name}: published with a different key; mail signed with this selector fails DKIM at every receiver. Publish:\n  {}",
                    zone_line(selector, domain, &key.txt_record())
                ),
                KeyStatus::LookupFailed(error) => println!("{name}: lookup failed: {error}"),
            }
            if status != KeyStatus::Matching {
                failures += 1;
            }
        }
    }
    if checked == 0 {
        bail!("no selector to check in {}", senders_path.display());
    }
    if failures > 0 {
        bail!("{failures} of {checked} selectors are not published with their key");
    }
    Ok(())
}

pub async fn lookup_status(resolver: &crate::dns::Resolver, name: &str, key: &PrivateKey) -> KeyStatus {
    let lookup = match resolver.lookup(format!("{name}.").as_str(), RecordType::TXT).await {
        Ok(lookup) => lookup,
        Err(error) if error.is_nx_domain() || error.is_no_records_found() => return KeyStatus::Missing,
        Err(error) => return KeyStatus::LookupFailed(error.to_string()),
    };
    let mut saw_record = false;
    for record in lookup.answers() {
        let RData::TXT(txt) = &record.data else {
            continue;
        };
        let text: String = txt
            .txt_data
            .iter()
            .map(|part| String::from_utf8_lossy(part).into_owned())
            .collect();
        let Some(published) = tag_value(&text, "p") else {
            continue;
        };
        saw_record = true;
        if published.is_empty() {
            return KeyStatus::Revoked;
        }
        let compact: String = published.chars().filter(|c| !c.is_whitespace()).collect();
        if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(compact)
            && key.matches_published(&bytes)
        {
            return KeyStatus::Matching;
        }
    }
    if saw_record { KeyStatus::Different } else { KeyStatus::Missing }
}

/// Returns the value of tag `name` in a DKIM tag list (RFC 6376 section 3.2).
fn tag_value(text: &str, name: &str) -> Option<String> {
    text.split(';').find_map(|tag| {
        let (key, value) = tag.split_once('=')?;
        (key.trim() == name).then(|| value.trim().to_string())
    })
}

