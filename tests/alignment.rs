//! The SPF/DMARC alignment check at intake, against the tests' DNS server:
//! SPF results and limits, DMARC alignment modes, public-suffix domains,
//! enforce and warn, and DNS failures.

mod common;

use std::time::Duration;

use common::dns::TestDns;
use common::gateway::{Client, Gateway, Options};
use common::keys::{prepare, write_senders};

/// The source IP every message may leave from (TEST-NET-1, only ever used
/// as an SPF input; nothing connects to it).
const SOURCE_IP: &str = "192.0.2.10";

const ZONE: &str = r#"
dest.example.                 MX 10 mx.dest.example.
mx.dest.example.              A 127.0.0.2

spf-pass.example.             TXT "v=spf1 ip4:192.0.2.10 -all"
spf-fail.example.             TXT "v=spf1 ip4:198.51.100.1 -all"
spf-softfail.example.         TXT "v=spf1 ~all"
spf-neutral.example.          TXT "v=spf1 ?all"
spf-none.example.             A 127.0.0.9
spf-include.example.          TXT "v=spf1 include:_spf.inc1.example -all"
_spf.inc1.example.            TXT "v=spf1 include:_spf.inc2.example -all"
_spf.inc2.example.            TXT "v=spf1 ip4:192.0.2.0/24 -all"
spf-redirect.example.         TXT "v=spf1 redirect=_spf.redir.example"
_spf.redir.example.           TXT "v=spf1 ip4:192.0.2.10 -all"
spf-macro.example.            TXT "v=spf1 exists:%{i}._ip.%{d} -all"
192.0.2.10._ip.spf-macro.example. A 127.0.0.2
spf-loop.example.             TXT "v=spf1 include:spf-loop.example -all"
spf-two.example.              TXT "v=spf1 ip4:192.0.2.10 -all"
spf-two.example.              TXT "v=spf1 -all"
spf-servfail.example.         SERVFAIL
spf-lookups.example.          TXT "v=spf1 include:l1.lim.example include:l2.lim.example include:l3.lim.example include:l4.lim.example include:l5.lim.example include:l6.lim.example " "include:l7.lim.example include:l8.lim.example include:l9.lim.example include:l10.lim.example include:l11.lim.example ip4:192.0.2.10 -all"
l1.lim.example.               TXT "v=spf1 ip4:203.0.113.1"
l2.lim.example.               TXT "v=spf1 ip4:203.0.113.2"
l3.lim.example.               TXT "v=spf1 ip4:203.0.113.3"
l4.lim.example.               TXT "v=spf1 ip4:203.0.113.4"
l5.lim.example.               TXT "v=spf1 ip4:203.0.113.5"
l6.lim.example.               TXT "v=spf1 ip4:203.0.113.6"
l7.lim.example.               TXT "v=spf1 ip4:203.0.113.7"
l8.lim.example.               TXT "v=spf1 ip4:203.0.113.8"
l9.lim.example.               TXT "v=spf1 ip4:203.0.113.9"
l10.lim.example.              TXT "v=spf1 ip4:203.0.113.10"
l11.lim.example.              TXT "v=spf1 ip4:203.0.113.11"

brand.co.uk.                  TXT "v=spf1 ip4:192.0.2.10 -all"
_dmarc.brand.co.uk.           TXT "v=DMARC1; p=reject"
other.co.uk.                  TXT "v=spf1 ip4:192.0.2.10 -all"

_dmarc.strict.example.        TXT "v=DMARC1; p=reject; adkim=s; aspf=s"
bounce.strict.example.        TXT "v=spf1 ip4:192.0.2.10 -all"
_dmarc.relaxed.example.       TXT "v=DMARC1; p=quarantine; sp=none"
bounce.relaxed.example.       TXT "v=spf1 ip4:192.0.2.10 -all"
"#;

const SENDERS: &str = r#"
defaults:
  unsigned: relay
  alignment: enforce
domains:
  signed.example:
    selectors: [k1]
    require_one_click_unsubscribe: true
  wrongkey.example:
    selectors: [k1]
  warned.example:
    selectors: [k1]
    alignment: warn
"#;

struct Setup {
    gateway: Gateway,
    _dns: TestDns,
}

async fn setup() -> Setup {
    let prepared = prepare(
        ZONE,
        &[
            ("signed.example", "k1", "ed25519"),
            ("wrongkey.example", "k1", "ed25519"),
            ("warned.example", "k1", "ed25519"),
        ],
    );
    // Publish a key that is not wrongkey.example's own.
    let other = tempfile::tempdir().unwrap();
    let wrong = common::keys::keygen(other.path(), "wrongkey.example", "k1", "ed25519");
    let zone: String = prepared
        .zone
        .lines()
        .filter(|line| !line.starts_with("k1._domainkey.wrongkey.example."))
        .map(|line| format!("{line}\n"))
        .collect::<String>()
        + &wrong
        + "\n";
    write_senders(prepared.folder.path(), SENDERS);
    std::fs::write(
        prepared.folder.path().join("policies/pools.yaml"),
        format!("pools:\n  default:\n    sources:\n      - {{ name: s1, ip: {SOURCE_IP}, ehlo: mta.test.example }}\n"),
    )
    .unwrap();
    let dns = TestDns::start(&zone).await;
    let mut options = Options::new(dns.addr, 25);
    options.folder = Some(prepared.folder);
    let gateway = Gateway::start(options).await;
    Setup { gateway, _dns: dns }
}

/// Sends one message and returns the reply after the data.
async fn submit(gateway: &Gateway, mail_from: &str, from_header: &str) -> String {
    submit_with(gateway, mail_from, from_header, "").await
}

/// Sends one message with extra header lines and returns the final reply.
async fn submit_with(gateway: &Gateway, mail_from: &str, from_header: &str, extra_headers: &str) -> String {
    let (mut client, _) = Client::connect(gateway.smtp).await;
    client.command("EHLO client.test.example").await;
    let mail = client.command(&format!("MAIL FROM:<{mail_from}>")).await;
    assert!(mail.starts_with("250"), "{mail}");
    client.command("RCPT TO:<user@dest.example>").await;
    client.command("DATA").await;
    client
        .write(format!("From: {from_header}\r\nTo: <user@dest.example>\r\nSubject: alignment\r\n{extra_headers}\r\nbody\r\n.\r\n").as_bytes())
        .await;
    client.read_reply().await
}

#[tokio::test]
async fn spf_results_decide_unsigned_mail() {
    let setup = setup().await;
    let cases = [
        ("spf-pass.example", "250 "),
        ("spf-include.example", "250 "),
        ("spf-redirect.example", "250 "),
        ("spf-macro.example", "250 "),
        ("spf-fail.example", "550 5.7.1 DMARC would fail for spf-fail.example: no DKIM signature aligned (relaxed) with From domain spf-fail.example; add a key for spf-fail.example to policies/senders.yaml; SPF for spf-fail.example does not allow 192.0.2.10 (fail); add ip4:192.0.2.10 to its SPF record"),
        ("spf-softfail.example", "550 5.7.1 DMARC would fail for spf-softfail.example: "),
        ("spf-neutral.example", "550 5.7.1 DMARC would fail for spf-neutral.example: "),
        ("spf-none.example", "550 5.7.1 DMARC would fail for spf-none.example: "),
        ("spf-loop.example", "550 5.7.1 DMARC would fail for spf-loop.example: "),
        ("spf-two.example", "550 5.7.1 DMARC would fail for spf-two.example: "),
        ("spf-lookups.example", "550 5.7.1 DMARC would fail for spf-lookups.example: "),
    ];
    for (domain, expected) in cases {
        let reply = submit(&setup.gateway, &format!("bounce@{domain}"), &format!("<app@{domain}>")).await;
        assert!(reply.starts_with(expected), "{domain}: {reply}");
    }
}

#[tokio::test]
async fn spf_failure_replies_name_the_result() {
    let setup = setup().await;
    let cases = [
        ("spf-softfail.example", "SPF for spf-softfail.example does not allow 192.0.2.10 (softfail); add ip4:192.0.2.10 to its SPF record"),
        ("spf-neutral.example", "(neutral)"),
        ("spf-none.example", "spf-none.example has no SPF record; publish \"v=spf1 ip4:192.0.2.10 -all\""),
        ("spf-loop.example", "SPF record of spf-loop.example is invalid (permerror"),
        ("spf-two.example", "spf-two.example publishes several SPF records, which is a permerror (RFC 7208 section 4.5); merge them into one record"),
        ("spf-lookups.example", "SPF record of spf-lookups.example is invalid (permerror"),
    ];
    for (domain, expected) in cases {
        let reply = submit(&setup.gateway, &format!("bounce@{domain}"), &format!("<app@{domain}>")).await;
        assert!(reply.contains(expected), "{domain}: {reply}");
    }
}

#[tokio::test]
async fn dns_failure_gives_temporary_reply() {
    let setup = setup().await;
    let reply = submit(&setup.gateway, "bounce@spf-servfail.example", "<app@spf-servfail.example>").await;
    assert!(reply.starts_with("451 4.4.3 Alignment check could not complete"), "{reply}");
}

#[tokio::test]
async fn public_suffix_decides_alignment() {
    let setup = setup().await;
    // mail.brand.co.uk and brand.co.uk share the organizational domain brand.co.uk.
    let reply = submit(&setup.gateway, "bounce@brand.co.uk", "<news@mail.brand.co.uk>").await;
    assert!(reply.starts_with("250"), "{reply}");
    // other.co.uk is a different organization, although both end in co.uk.
    let reply = submit(&setup.gateway, "bounce@other.co.uk", "<news@brand.co.uk>").await;
    assert!(
        reply.contains("MAIL FROM domain other.co.uk is not aligned (relaxed) with From domain brand.co.uk"),
        "{reply}"
    );
}

#[tokio::test]
async fn strict_and_relaxed_spf_alignment() {
    let setup = setup().await;
    let reply = submit(&setup.gateway, "x@bounce.relaxed.example", "<app@relaxed.example>").await;
    assert!(reply.starts_with("250"), "relaxed: {reply}");
    let reply = submit(&setup.gateway, "x@bounce.strict.example", "<app@strict.example>").await;
    assert!(
        reply.contains("MAIL FROM domain bounce.strict.example is not aligned (strict) with From domain strict.example"),
        "strict: {reply}"
    );
}

#[tokio::test]
async fn signed_mail_passes_without_spf() {
    let setup = setup().await;
    // No SPF record at signed.example, but the aligned DKIM signature passes.
    let reply = submit(&setup.gateway, "bounce@signed.example", "<app@signed.example>").await;
    assert!(reply.starts_with("250"), "{reply}");
    let event = setup.gateway.wait_for_event("received", "user@dest.example", Duration::from_secs(5)).await;
    assert_eq!(event["alignment"]["result"], "pass");
    assert_eq!(event["alignment"]["report"]["dkim_aligned"], true);
    assert_eq!(event["alignment"]["report"]["findings"][0]["check"], "dmarc", "{event}");
}

#[tokio::test]
async fn mismatched_dkim_record_rejected() {
    let setup = setup().await;
    let reply = submit(&setup.gateway, "bounce@wrongkey.example", "<app@wrongkey.example>").await;
    assert!(reply.starts_with("550 5.7.1 DMARC would fail for wrongkey.example"), "{reply}");
    assert!(
        reply.contains("DKIM signature for wrongkey.example does not verify against k1._domainkey.wrongkey.example"),
        "{reply}"
    );
}

#[tokio::test]
async fn from_with_two_addresses_rejected() {
    let setup = setup().await;
    let reply = submit(&setup.gateway, "bounce@spf-pass.example", "<a@spf-pass.example>, <b@spf-pass.example>").await;
    assert!(reply.contains("the From header holds 2 addresses"), "{reply}");
}

#[tokio::test]
async fn warn_mode_accepts_and_logs() {
    let setup = setup().await;
    // warned.example signs with a published key, so DMARC passes on DKIM
    // even though the MAIL FROM domain is unaligned; the verdict is counted
    // under the domain's own label and its warn mode.
    let reply = submit(&setup.gateway, "bounce@spf-fail.example", "<app@warned.example>").await;
    assert!(reply.starts_with("250"), "{reply}");

    let (_, metrics) = setup.gateway.http_get("/metrics").await;
    assert!(
        metrics.contains("baton_alignment_verdicts_total{domain=\"warned.example\",mode=\"warn\",result=\"pass\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn warn_mode_logs_failure() {
    let prepared = prepare(ZONE, &[]);
    write_senders(prepared.folder.path(), "defaults:\n  unsigned: relay\n  alignment: warn\n");
    std::fs::write(
        prepared.folder.path().join("policies/pools.yaml"),
        format!("pools:\n  default:\n    sources:\n      - {{ ip: {SOURCE_IP} }}\n"),
    )
    .unwrap();
    let dns = TestDns::start(&prepared.zone).await;
    let mut options = Options::new(dns.addr, 25);
    options.folder = Some(prepared.folder);
    let gateway = Gateway::start(options).await;

    let reply = submit(&gateway, "bounce@spf-fail.example", "<app@spf-fail.example>").await;
    assert!(reply.starts_with("250"), "{reply}");
    let event = gateway.wait_for_event("received", "user@dest.example", Duration::from_secs(5)).await;
    assert_eq!(event["alignment"]["result"], "fail");
    assert_eq!(event["alignment"]["mode"], "warn");
    let findings = event["alignment"]["report"]["findings"].to_string();
    assert!(findings.contains("does not allow 192.0.2.10 (fail)"), "{findings}");
    assert!(gateway.log().contains("message would fail DMARC; accepted in warn mode"));
    let (_, metrics) = gateway.http_get("/metrics").await;
    assert!(
        metrics.contains("baton_alignment_verdicts_total{domain=\"other\",mode=\"warn\",result=\"fail\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn subdomain_policy_reported() {
    let setup = setup().await;
    let reply = submit(&setup.gateway, "x@bounce.relaxed.example", "<app@news.relaxed.example>").await;
    assert!(reply.starts_with("250"), "{reply}");
    let event = setup.gateway.wait_for_event("received", "user@dest.example", Duration::from_secs(5)).await;
    assert_eq!(event["alignment"]["report"]["policy"], "none", "sp= applies to a subdomain: {event}");
}

const DNS_CHECK_ZONE: &str = r#"
good.example.                     TXT "v=spf1 ip4:192.0.2.10 -all"
_dmarc.good.example.              TXT "v=DMARC1; p=reject"
bad.example.                      TXT "v=spf1 ip4:198.51.100.7 -all"
10.2.0.192.in-addr.arpa.          PTR t1.mta.test.example.
t1.mta.test.example.              A 192.0.2.10
11.2.0.192.in-addr.arpa.          PTR elsewhere.test.example.
elsewhere.test.example.           A 198.51.100.9
"#;

/// Runs `baton dns check` with a config for the prepared folder.
async fn dns_check(folder: &std::path::Path, dns: &TestDns, args: &[&str]) -> (bool, String) {
    let config = folder.join("check.yaml");
    std::fs::write(
        &config,
        format!(
            "hostname: mta.test.example\ndns:\n  nameservers: [\"{}\"]\npolicies: {}\nkeys: {}\n",
            dns.addr,
            folder.join("policies").display(),
            folder.join("keys").display()
        ),
    )
    .unwrap();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["--config", config.to_str().unwrap(), "dns", "check"])
        .args(args)
        .output()
        .await
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

#[tokio::test]
async fn dns_check_correct_and_broken_domains() {
    let prepared = prepare(DNS_CHECK_ZONE, &[("good.example", "k1", "ed25519"), ("bad.example", "k1", "ed25519")]);
    let other = tempfile::tempdir().unwrap();
    let wrong = common::keys::keygen(other.path(), "bad.example", "k1", "ed25519");
    let zone: String = prepared
        .zone
        .lines()
        .filter(|line| !line.starts_with("k1._domainkey.bad.example."))
        .map(|line| format!("{line}\n"))
        .collect::<String>()
        + &wrong
        + "\n";
    write_senders(
        prepared.folder.path(),
        "domains:\n  good.example:\n    selectors: [k1]\n  bad.example:\n    selectors: [k1]\n",
    );
    let pools = prepared.folder.path().join("policies/pools.yaml");
    std::fs::write(&pools, "pools:\n  p:\n    sources:\n      - { ip: 192.0.2.10, ehlo: t1.mta.test.example }\n").unwrap();
    let dns = TestDns::start(&zone).await;
    let folder = prepared.folder.path();

    let (ok, text) = dns_check(folder, &dns, &["--domain", "good.example"]).await;
    assert!(ok, "{text}");
    assert!(text.contains("  SPF    ok        allows every source IP (ip4:192.0.2.10)"), "{text}");
    assert!(text.contains("  DKIM   ok        k1._domainkey.good.example"), "{text}");
    assert!(text.contains("  DMARC  ok        p=reject at _dmarc.good.example"), "{text}");
    assert!(text.contains("  PTR    ok        t1.mta.test.example"), "{text}");

    let (ok, text) = dns_check(folder, &dns, &["--domain", "bad.example"]).await;
    assert!(!ok, "{text}");
    assert!(text.contains("  SPF    mismatch  does not allow 192.0.2.10 (fail); add ip4:192.0.2.10 or publish: v=spf1 ip4:192.0.2.10 -all"), "{text}");
    assert!(text.contains("  DKIM   mismatch  k1._domainkey.bad.example publishes another key"), "{text}");
    assert!(text.contains("  DMARC  missing   publish at _dmarc.bad.example: v=DMARC1; p=none"), "{text}");
    assert!(text.contains("3 problems to fix"), "{text}");

    // A source whose PTR name points elsewhere and differs from its EHLO name.
    std::fs::write(&pools, "pools:\n  p:\n    sources:\n      - { ip: 192.0.2.11, ehlo: t2.mta.test.example }\n").unwrap();
    let (ok, text) = dns_check(folder, &dns, &["--domain", "good.example"]).await;
    assert!(!ok, "{text}");
    assert!(text.contains("  PTR    mismatch  elsewhere.test.example does not resolve back to 192.0.2.11"), "{text}");
}

#[tokio::test]
async fn bulk_mail_needs_one_click_unsubscribe() {
    let setup = setup().await;
    let reply = submit_with(&setup.gateway, "bounce@signed.example", "<news@signed.example>", "Precedence: bulk\r\n").await;
    assert!(
        reply.starts_with("550 5.7.1 Bulk mail from signed.example must offer one-click unsubscribe (RFC 8058)"),
        "{reply}"
    );
    let headers = "X-Baton-Stream: marketing\r\nList-Unsubscribe: <https://signed.example/u/1>\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n";
    let reply = submit_with(&setup.gateway, "bounce@signed.example", "<news@signed.example>", headers).await;
    assert!(reply.starts_with("250"), "{reply}");
}
