//! Outbound pools and warmup at a real receiver that records each
//! connection's peer address and EHLO name: routing, weights, warmup caps
//! with and without overflow, counters across a restart, and a source
//! whose address cannot be bound.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::dns::TestDns;
use common::gateway::{Client, Gateway, Options};
use common::loopback;
use common::receiver::{Receiver, Received, Script, free_port_on};

const WAIT: Duration = Duration::from_secs(30);

const ZONE: &str = r#"
dest.example.        MX 10 mx.dest.example.
mx.dest.example.     A 127.0.0.2
"#;

/// Shaping loose enough that only pools and warmup decide.
const SHAPING: &str = "default:\n  max_message_rate: 1000/s\n  max_connections: 4\n";

const WARMUP: &str = "schedules:\n  standard:\n    daily: [10, 20, 50]\n";

/// Starts a gateway with `pools` as pools.yaml and the warmup schedule above.
async fn start(dns: &TestDns, port: u16, pools: &str) -> Gateway {
    let folder = tempfile::tempdir().unwrap();
    let policies = folder.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("shaping.yaml"), SHAPING).unwrap();
    std::fs::write(policies.join("warmup.yaml"), WARMUP).unwrap();
    std::fs::write(policies.join("pools.yaml"), pools).unwrap();
    let mut options = Options::new(dns.addr, port);
    options.folder = Some(folder);
    Gateway::start(options).await
}

/// Sends `count` messages with `headers` over one session.
async fn send_many(gateway: &Gateway, sender: &str, headers: &str, count: usize) {
    let (mut client, _) = Client::connect(gateway.smtp).await;
    for index in 0..count {
        let content = format!("From: <{sender}>\r\n{headers}Subject: n{index}\r\n\r\nbody\r\n");
        let reply = client.send(sender, &["user@dest.example"], content.as_bytes()).await;
        assert!(reply.starts_with("250"), "{reply}");
        client.command("RSET").await;
    }
}

/// Counts messages by the address they came from.
fn by_peer(messages: &[Received]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for message in messages {
        *counts.entry(message.peer.ip().to_string()).or_default() += 1;
    }
    counts
}

/// Returns the value of one metric line, such as `baton_warmup_sent{source="m2",site="other"}`.
async fn metric(gateway: &Gateway, series: &str) -> Option<f64> {
    let (_, body) = gateway.http_get("/metrics").await;
    body.lines()
        .find(|line| line.starts_with(series))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

#[tokio::test]
async fn routing_by_header_and_sender_domain() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let receiver = Receiver::start(loopback(2), port, Script::new()).await.unwrap();
    let pools = r#"
pools:
  transactional:
    sources:
      - { name: t1, ip: 127.0.0.10, ehlo: t1.mta.test }
  marketing:
    sources:
      - { name: m1, ip: 127.0.0.11, ehlo: m1.mta.test }
routing:
  - { header: X-Baton-Pool, pool_from_value: true }
  - { header: X-Baton-Stream, equals: marketing, pool: marketing }
  - { sender_domain: news.example.com, pool: marketing }
  - { pool: transactional }
"#;
    let gateway = start(&dns, port, pools).await;
    let cases = [
        ("app@src.example", "", "127.0.0.10", "t1.mta.test"),
        ("app@src.example", "X-Baton-Stream: marketing\r\n", "127.0.0.11", "m1.mta.test"),
        ("app@src.example", "X-Baton-Stream: alerts\r\n", "127.0.0.10", "t1.mta.test"),
        ("promo@news.example.com", "", "127.0.0.11", "m1.mta.test"),
        ("promo@news.example.com", "X-Baton-Pool: transactional\r\n", "127.0.0.10", "t1.mta.test"),
    ];
    let (mut client, _) = Client::connect(gateway.smtp).await;
    for (index, (sender, headers, _, _)) in cases.iter().enumerate() {
        let content = format!("From: <{sender}>\r\n{headers}Subject: case {index}\r\n\r\nbody\r\n");
        let reply = client.send(sender, &["user@dest.example"], content.as_bytes()).await;
        assert!(reply.starts_with("250"), "{reply}");
        client.command("RSET").await;
    }
    let messages = receiver.wait_for_messages(cases.len(), WAIT).await;
    for (index, (sender, headers, peer, ehlo)) in cases.iter().enumerate() {
        let subject = format!("Subject: case {index}\r\n");
        let message = messages
            .iter()
            .find(|message| message.data_str().contains(&subject))
            .unwrap_or_else(|| panic!("case {index} did not arrive"));
        assert_eq!(message.peer.ip().to_string(), *peer, "case {index}: {sender} with {headers:?}");
        assert_eq!(message.helo, *ehlo, "case {index}");
        assert!(!message.data_str().contains("X-Baton-"), "routing header left in:\n{}", message.data_str());
    }

    // A pool that does not exist is rejected at intake, naming the pool.
    let (mut client, _) = Client::connect(gateway.smtp).await;
    let content = "From: <app@src.example>\r\nX-Baton-Pool: bulk\r\nSubject: x\r\n\r\nbody\r\n";
    let reply = client.send("app@src.example", &["user@dest.example"], content.as_bytes()).await;
    assert!(reply.starts_with("550 5.7.0"), "{reply}");
    assert!(reply.contains("\"bulk\""), "{reply}");
}

#[tokio::test]
async fn weights_honoured_over_99_messages() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let receiver = Receiver::start(loopback(2), port, Script::new()).await.unwrap();
    let pools = r#"
pools:
  bulk:
    sources:
      - { name: m1, ip: 127.0.0.11, ehlo: m1.mta.test, weight: 2 }
      - { name: m2, ip: 127.0.0.12, ehlo: m2.mta.test }
"#;
    let gateway = start(&dns, port, pools).await;
    send_many(&gateway, "app@src.example", "", 99).await;
    let messages = receiver.wait_for_messages(99, WAIT).await;
    let counts = by_peer(&messages);
    assert_eq!(counts.get("127.0.0.11"), Some(&66), "{counts:?}");
    assert_eq!(counts.get("127.0.0.12"), Some(&33), "{counts:?}");
    for message in &messages {
        let expected = if message.peer.ip() == loopback(11) { "m1.mta.test" } else { "m2.mta.test" };
        assert_eq!(message.helo, expected);
    }
    drop(gateway);
}

const WARMING: &str = r#"
pools:
  bulk:
    overflow: OVERFLOW
    sources:
      - { name: m1, ip: 127.0.0.11, ehlo: m1.mta.test }
      - { name: m2, ip: 127.0.0.12, ehlo: m2.mta.test, warmup: { schedule: standard, started: 2026-01-01 } }
"#;

#[tokio::test]
async fn cold_source_surplus_overflows() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let receiver = Receiver::start(loopback(2), port, Script::new()).await.unwrap();
    let gateway = start(&dns, port, &WARMING.replace("OVERFLOW", "true")).await;
    send_many(&gateway, "app@src.example", "", 100).await;
    let messages = receiver.wait_for_messages(100, WAIT).await;
    let counts = by_peer(&messages);
    assert_eq!(counts.get("127.0.0.12"), Some(&10), "{counts:?}");
    assert_eq!(counts.get("127.0.0.11"), Some(&90), "{counts:?}");
    let labels = "{site=\"other\",source=\"m2\"}";
    assert_eq!(metric(&gateway, &format!("baton_warmup_sent{labels}")).await, Some(10.0));
    assert_eq!(metric(&gateway, &format!("baton_warmup_cap{labels}")).await, Some(10.0));
    assert_eq!(metric(&gateway, &format!("baton_warmup_day{labels}")).await, Some(1.0));
}

#[tokio::test]
async fn without_overflow_surplus_waits_across_restart() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let receiver = Receiver::start(loopback(2), port, Script::new()).await.unwrap();
    let mut gateway = start(&dns, port, &WARMING.replace("OVERFLOW", "false")).await;
    send_many(&gateway, "app@src.example", "", 100).await;
    let messages = receiver.wait_for_messages(60, WAIT).await;
    let counts = by_peer(&messages);
    assert_eq!(counts.get("127.0.0.11"), Some(&50), "{counts:?}");
    assert_eq!(counts.get("127.0.0.12"), Some(&10), "{counts:?}");

    // The other 40 wait for tomorrow; nothing bounces because of warmup.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(receiver.messages().len(), 60);
    let list = String::from_utf8_lossy(&gateway.command(&["queue", "list"]).stdout).to_string();
    assert!(list.contains("dest.example"), "{list}");
    assert!(!gateway.events().iter().any(|event| event["event"] == "bounced"));

    // A restart keeps today's count: m2 sends nothing more today. The
    // waiting messages get a new choice of source, so m1 (warm) takes its
    // share of them and the rest waits again.
    gateway.terminate();
    gateway.launch().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let messages = receiver.messages();
    let counts = by_peer(&messages);
    assert_eq!(counts.get("127.0.0.12"), Some(&10), "{counts:?}");
    assert!(messages.len() < 100, "{counts:?}");
    assert!(!gateway.events().iter().any(|event| event["event"] == "bounced"));
    let sent = metric(&gateway, "baton_warmup_sent{site=\"other\",source=\"m2\"}").await;
    assert_eq!(sent, Some(10.0));
}

#[tokio::test]
async fn unbindable_source_skipped() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let receiver = Receiver::start(loopback(2), port, Script::new()).await.unwrap();
    // 192.0.2.1 (TEST-NET-1) is on no interface here, so binding to it
    // fails before any packet is sent.
    let pools = r#"
pools:
  bulk:
    sources:
      - { name: gone, ip: 192.0.2.1, ehlo: gone.mta.test }
      - { name: m1, ip: 127.0.0.11, ehlo: m1.mta.test }
"#;
    let gateway = start(&dns, port, pools).await;
    send_many(&gateway, "app@src.example", "", 20).await;
    let messages = receiver.wait_for_messages(20, WAIT).await;
    assert!(messages.iter().all(|message| message.peer.ip() == loopback(11)));
    assert!(gateway.log().contains("source address cannot be bound"), "{}", gateway.log());
    let deferred = gateway.events().into_iter().filter(|event| event["event"] == "deferred").count();
    assert_eq!(deferred, 0);
}

#[tokio::test]
async fn connection_cap_holds_per_source() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let script = Script::new().data_delay(Duration::from_millis(300));
    let receiver = Receiver::start(loopback(2), port, script).await.unwrap();
    let folder = tempfile::tempdir().unwrap();
    let policies = folder.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    // One connection per source IP, as receivers count them: two sources
    // may hold two connections to the site, never more.
    std::fs::write(policies.join("shaping.yaml"), "default:\n  max_message_rate: 1000/s\n  max_connections: 1\n").unwrap();
    let pools = "pools:\n  bulk:\n    sources:\n      - { name: m1, ip: 127.0.0.11 }\n      - { name: m2, ip: 127.0.0.12 }\n";
    std::fs::write(policies.join("pools.yaml"), pools).unwrap();
    let mut options = Options::new(dns.addr, port);
    options.folder = Some(folder);
    let gateway = Gateway::start(options).await;

    send_many(&gateway, "app@src.example", "", 12).await;
    let messages = receiver.wait_for_messages(12, WAIT).await;
    assert_eq!(receiver.max_concurrent(), 2);
    let counts = by_peer(&messages);
    assert_eq!(counts.get("127.0.0.11"), Some(&6), "{counts:?}");
    assert_eq!(counts.get("127.0.0.12"), Some(&6), "{counts:?}");
}

#[tokio::test]
async fn mail_queued_before_pools_uses_fallback_pool() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    // The first attempt is deferred, so the message is still queued when
    // pools.yaml appears.
    let attempts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = attempts.clone();
    let script = Script::new().rcpt(move |_| {
        let first = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
        first.then(|| "451 4.3.0 try again".to_string())
    });
    let receiver = Receiver::start(loopback(2), port, script).await.unwrap();
    let folder = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(folder.path().join("policies")).unwrap();
    let mut options = Options::new(dns.addr, port);
    options.retry = "[2s]";
    options.folder = Some(folder);
    let mut gateway = Gateway::start(options).await;

    send_many(&gateway, "app@src.example", "", 1).await;
    let deferred = gateway.wait_for_event("deferred", "user@dest.example", WAIT).await;
    let id = deferred["queue_id"].as_str().unwrap().to_string();
    gateway.terminate();

    // Offline, queue explain reads the spool.
    let output = gateway.command(&["queue", "explain", &id]);
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(output.status.success(), "{text}{}", String::from_utf8_lossy(&output.stderr));
    assert!(text.contains(&id), "{text}");
    // Queue ids are hex digits, so one typed in lower case is the same id.
    let output = gateway.command(&["queue", "explain", &id.to_lowercase()]);
    assert!(output.status.success(), "lower-case id: {}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains(&id));

    // The message was stored in pool `default`, which pools.yaml does not
    // define: it leaves from the fallback pool.
    let pools = "pools:\n  main:\n    sources:\n      - { name: m1, ip: 127.0.0.11, ehlo: m1.mta.test }\nrouting:\n  - { pool: main }\n";
    std::fs::write(gateway.config_path().parent().unwrap().join("policies/pools.yaml"), pools).unwrap();
    gateway.launch().await;
    let messages = receiver.wait_for_messages(1, WAIT).await;
    assert_eq!(messages[0].peer.ip(), loopback(11), "{}", gateway.log());
    assert_eq!(messages[0].helo, "m1.mta.test");
    assert!(gateway.log().contains("sending it from the fallback pool"), "{}", gateway.log());
}
