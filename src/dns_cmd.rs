//! `baton dns check`: for each sending domain, the SPF, DKIM and DMARC
//! records to publish next to what DNS has now, and for each source IP
//! whether its PTR name resolves back to it and matches its EHLO name.
//! Exits with an error when something must be fixed, so it can run in CI.

use std::net::IpAddr;

use anyhow::{Context, bail};
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{MessageAuthenticator, Parameters, SpfResult};

use crate::config::Config;
use crate::dkim_cmd::{KeyStatus, lookup_status};
use crate::pipeline::alignment::{count_spf_records, lookup_dmarc, organizational, spf_mechanisms, spf_result_name};
use crate::pipeline::dkim::{key_path, read_key};
use crate::policy::pools::Source;
use crate::policy::senders::Senders;

/// Collects report lines and counts the problems among them.
#[derive(Default)]
struct Report {
    lines: Vec<String>,
    problems: usize,
}

impl Report {
    fn ok(&mut self, what: &str, text: String) {
        self.lines.push(format!("  {what:<6} ok        {text}"));
    }

    fn problem(&mut self, what: &str, state: &str, text: String) {
        self.problems += 1;
        self.lines.push(format!("  {what:<6} {state:<9} {text}"));
    }
}

pub async fn check(config: &Config, only_domain: Option<&str>) -> anyhow::Result<()> {
    let senders_path = config.policies.join("senders.yaml");
    let text = std::fs::read_to_string(&senders_path)
        .with_context(|| format!("cannot read {}; it lists the sending domains to check", senders_path.display()))?;
    let senders = Senders::parse(&text).with_context(|| format!("invalid {}", senders_path.display()))?;
    let pools_path = config.policies.join("pools.yaml");
    let (pools, _) = crate::policy::load_pools(&config.policies)?;
    let mut sources: Vec<Source> = Vec::new();
    for source in pools.sources() {
        if source.ip.is_some() && !sources.iter().any(|known| known.ip == source.ip) {
            sources.push(source.clone());
        }
    }
    let ips: Vec<IpAddr> = sources.iter().filter_map(|source| source.ip).collect();
    let authenticator = crate::dns::build_authenticator(&config.dns)?;
    let only = only_domain.map(|d| d.trim_end_matches('.').to_ascii_lowercase());

    let mut report = Report::default();
    let mut domains = 0;
    for (domain, settings) in &senders.domains {
        if only.as_ref().is_some_and(|o| o != domain) {
            continue;
        }
        domains += 1;
        report.lines.push(domain.clone());
        check_spf(&authenticator, &config.hostname, domain, &ips, &mut report).await;
        for selector in &settings.selectors {
            let name = format!("{selector}._domainkey.{domain}");
            match read_key(&key_path(&config.keys, domain, selector)) {
                Ok(key) => match lookup_status(authenticator.resolver(), &name, &key).await {
                    KeyStatus::Matching => report.ok("DKIM", name.clone()),
                    KeyStatus::Missing => report.problem("DKIM", "missing", format!("{name}; publish: {}", key.txt_record())),
                    KeyStatus::Revoked => report.problem("DKIM", "revoked", format!("{name} has an empty p=; publish: {}", key.txt_record())),
                    KeyStatus::Different => report.problem("DKIM", "mismatch", format!("{name} publishes another key; mail signed with it fails DKIM everywhere; publish: {}", key.txt_record())),
                    KeyStatus::LookupFailed(error) => report.problem("DKIM", "error", format!("{name}: {error}")),
                },
                Err(error) => report.problem("DKIM", "error", format!("{name}: {error:#}")),
            }
        }
        let organizational_domain = organizational(domain);
        match lookup_dmarc(authenticator.resolver(), domain, &organizational_domain).await {
            Ok(Some(record)) => report.ok(
                "DMARC",
                format!("p={} at _dmarc.{}", record.policy, record.domain),
            ),
            Ok(None) => report.problem(
                "DMARC",
                "missing",
                format!("publish at _dmarc.{organizational_domain}: v=DMARC1; p=none; rua=mailto:dmarc@{organizational_domain}"),
            ),
            Err(error) => report.problem("DMARC", "error", error),
        }
    }
    if domains == 0 {
        bail!("no sending domain to check in {}", senders_path.display());
    }

    if sources.is_empty() {
        report.lines.push(format!("no source IPs: {} is missing or lists none, so SPF and PTR were not checked", pools_path.display()));
    }
    for source in &sources {
        check_ptr(authenticator.resolver(), source, &mut report).await;
    }

    for line in &report.lines {
        println!("{line}");
    }
    if report.problems > 0 {
        bail!("{} problems to fix", report.problems);
    }
    Ok(())
}

async fn check_spf(authenticator: &MessageAuthenticator, hostname: &str, domain: &str, ips: &[IpAddr], report: &mut Report) {
    let wanted = format!("v=spf1 {} -all", spf_mechanisms(ips));
    if ips.is_empty() {
        return;
    }
    match count_spf_records(authenticator.resolver(), domain).await {
        Ok(0) => return report.problem("SPF", "missing", format!("publish at {domain}: {wanted}")),
        Ok(1) => {}
        Ok(count) => {
            return report.problem("SPF", "permerror", format!("{domain} has {count} SPF records; merge them into one, such as: {wanted}"));
        }
        Err(error) => return report.problem("SPF", "error", error),
    }
    let mut denied = Vec::new();
    for ip in ips {
        let sender = format!("postmaster@{domain}");
        let output = authenticator
            .check_host(Parameters::new(SpfParameters::mail_from(*ip, hostname, hostname, &sender)))
            .await;
        match output.result() {
            SpfResult::Pass => {}
            SpfResult::PermError => {
                return report.problem("SPF", "permerror", format!("the SPF record of {domain} is invalid or needs over 10 DNS lookups; publish: {wanted}"));
            }
            SpfResult::TempError => return report.problem("SPF", "error", format!("DNS lookup failed for the SPF record of {domain}")),
            result => denied.push(format!("{ip} ({})", spf_result_name(result))),
        }
    }
    if denied.is_empty() {
        report.ok("SPF", format!("allows every source IP ({})", spf_mechanisms(ips)));
    } else {
        report.problem("SPF", "mismatch", format!("does not allow {}; add {} or publish: {wanted}", denied.join(", "), spf_mechanisms(ips)));
    }
}

/// Checks forward-confirmed reverse DNS: the PTR name of the source IP
/// must resolve back to it, and should be its EHLO name.
async fn check_ptr(resolver: &crate::dns::Resolver, source: &Source, report: &mut Report) {
    let Some(ip) = source.ip else {
        return;
    };
    let ehlo = source.ehlo.as_deref().unwrap_or("");
    report.lines.push(format!("source {} (ehlo {})", ip, if ehlo.is_empty() { "not set" } else { ehlo }));
    let names: Vec<String> = match resolver.reverse_lookup(ip).await {
        Ok(lookup) => lookup
            .answers()
            .iter()
            .filter_map(|record| match &record.data {
                hickory_resolver::proto::rr::RData::PTR(ptr) => Some(ptr.0.to_ascii().trim_end_matches('.').to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
        Err(error) if error.is_nx_domain() || error.is_no_records_found() => Vec::new(),
        Err(error) => return report.problem("PTR", "error", format!("reverse lookup of {} failed: {error}", ip)),
    };
    let Some(name) = names.first() else {
        return report.problem("PTR", "missing", format!("{} has no PTR record; publish one naming {}", ip, if ehlo.is_empty() { "the EHLO name" } else { ehlo }));
    };
    let forward = match resolver.lookup_ip(format!("{name}.").as_str()).await {
        Ok(lookup) => lookup.iter().collect::<Vec<IpAddr>>(),
        Err(_) => Vec::new(),
    };
    if !forward.contains(&ip) {
        return report.problem("PTR", "mismatch", format!("{name} does not resolve back to {}; add an address record for {name}", ip));
    }
    if !ehlo.is_empty() && !name.eq_ignore_ascii_case(ehlo.trim_end_matches('.')) {
        return report.problem("PTR", "mismatch", format!("PTR name {name} differs from EHLO name {ehlo}; make them the same"));
    }
    report.ok("PTR", name.clone());
}
