//! `/metrics` after real traffic: each metric family with its labels and
//! values, from a gateway that signed, delivered, deferred and bounced mail.

mod common;

use std::time::Duration;

use common::dns::TestDns;
use common::gateway::{Client, Gateway, Options, send_message};
use common::keys::{prepare, write_senders};
use common::loopback;
use common::receiver::{Receiver, Script, free_port_on};

const WAIT: Duration = Duration::from_secs(20);
const ZONE: &str = "dest.example. MX 10 mx.dest.example.\nmx.dest.example. A 127.0.0.2\n";

/// Returns the value of the sample line that starts with `series` (name and
/// labels exactly as Prometheus prints them).
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

#[tokio::test]
async fn metric_families_after_traffic() {
    let prepared = prepare(ZONE, &[("src.example", "ed1", "ed25519")]);
    write_senders(prepared.folder.path(), "defaults:\n  alignment: warn\ndomains:\n  src.example:\n    selectors: [ed1]\n");
    std::fs::write(
        prepared.folder.path().join("policies/shaping.yaml"),
        "domains:\n  dest.example:\n    max_message_rate: 100/s\n",
    )
    .unwrap();
    let dns = TestDns::start(&prepared.zone).await;
    let port = free_port_on(&[loopback(2)]);
    let script = Script::new()
        .tls()
        .rcpt_reply("gone@dest.example", "550 5.1.1 no such user")
        .rcpt_reply("later@dest.example", "451 4.2.1 try later");
    let _receiver = Receiver::start(loopback(2), port, script).await.unwrap();
    let mut options = Options::new(dns.addr, port);
    options.folder = Some(prepared.folder);
    let gateway = Gateway::start(options).await;

    let content = b"From: <app@src.example>\r\nSubject: m\r\n\r\nbody\r\n";
    for recipient in ["ok@dest.example", "gone@dest.example", "later@dest.example"] {
        let reply = send_message(gateway.smtp, "app@src.example", &[recipient], content).await;
        assert!(reply.starts_with("250"), "{reply}");
    }
    // A rejected recipient: a domain that is not a valid host name.
    let (mut client, _) = Client::connect(gateway.smtp).await;
    client.command("EHLO client.test.example").await;
    client.command("MAIL FROM:<app@src.example>").await;
    assert!(client.command("RCPT TO:<x@bad_domain.example>").await.starts_with("501"));
    gateway.wait_for_event("delivered", "ok@dest.example", WAIT).await;
    gateway.wait_for_event("bounced", "gone@dest.example", WAIT).await;
    gateway.wait_for_event("deferred", "later@dest.example", WAIT).await;

    let (status, metrics) = gateway.http_get("/metrics").await;
    assert!(status.contains("200"), "{status}");
    let checks: &[(&str, f64)] = &[
        ("baton_messages_received_total", 3.0),
        ("baton_messages_rejected_total{reason=\"syntax\"}", 1.0),
        ("baton_dkim_messages_total{result=\"signed\"}", 3.0),
        ("baton_dkim_signatures_total{algorithm=\"ed25519-sha256\"}", 3.0),
        ("baton_routed_messages_total{pool=\"default\"}", 3.0),
        ("baton_alignment_verdicts_total{domain=\"src.example\",mode=\"warn\",result=\"pass\"}", 3.0),
        ("baton_delivery_recipients_total{pool=\"default\",result=\"delivered\",site=\"dest.example\",source=\"default\"}", 1.0),
        ("baton_delivery_recipients_total{pool=\"default\",result=\"bounced\",site=\"dest.example\",source=\"default\"}", 1.0),
        ("baton_delivery_recipients_total{pool=\"default\",result=\"deferred\",site=\"dest.example\",source=\"default\"}", 1.0),
        ("baton_delivery_replies_total{class=\"2xx\",code=\"\",site=\"dest.example\"}", 1.0),
        ("baton_delivery_replies_total{class=\"5xx\",code=\"5.1.1\",site=\"dest.example\"}", 1.0),
        ("baton_delivery_replies_total{class=\"4xx\",code=\"4.2.1\",site=\"dest.example\"}", 1.0),
        ("baton_delivery_tls_total{site=\"dest.example\",tls=\"yes\"}", 3.0),
        ("baton_delivery_attempts_total{pool=\"default\",site=\"dest.example\",source=\"default\"}", 3.0),
        ("baton_dsn_queued_total", 1.0),
        // One lookup finds the site, one is made by the delivery connection
        // (and served from the resolver's cache).
        ("baton_dns_lookups_total{result=\"ok\",type=\"MX\"}", 2.0),
        ("baton_queue_jobs{site=\"dest.example\",state=\"waiting\"}", 1.0),
    ];
    for (series, expected) in checks {
        let value = sample(&metrics, series);
        assert_eq!(value, Some(*expected), "{series}\n{metrics}");
    }
    let present = [
        "baton_acceptance_seconds_count 3",
        "baton_intake_connections_total",
        "baton_delivery_transaction_seconds_count{site=\"dest.example\"}",
        "baton_queue_oldest_age_seconds{site=\"dest.example\"}",
        "baton_spool_bytes",
        "baton_queue_messages",
        "baton_shaping_wait_seconds_count{limit=\"message\"}",
        "baton_sites_throttled{state=\"backoff\"} 0",
        "baton_dns_lookup_seconds_count{type=\"MX\"}",
    ];
    for series in present {
        assert!(metrics.contains(series), "{series}\n{metrics}");
    }
    // No recipient address or queue id appears in any label.
    for line in metrics.lines().filter(|line| !line.starts_with('#')) {
        assert!(!line.contains('@'), "address in a label: {line}");
    }
}
