//! Delivery shaping measured at real receivers: rates, connection caps,
//! messages per connection, shared provider limits, throttling replies,
//! suspension, reloads, `policy check` and `queue explain`.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::dns::TestDns;
use common::gateway::{Client, Gateway, Options};
use common::loopback;
use common::receiver::{Receiver, Script, free_port_on};

const WAIT: Duration = Duration::from_secs(30);

const ZONE: &str = r#"
dest.example.        MX 10 mx.dest.example.
mx.dest.example.     A 127.0.0.2
a.example.           MX 10 mx1.prov.example.
b.example.           MX 10 mx2.prov.example.
mx1.prov.example.    A 127.0.0.3
mx2.prov.example.    A 127.0.0.3
"#;

/// Starts a gateway with `shaping` as its policies/shaping.yaml.
async fn start(dns: &TestDns, port: u16, shaping: &str) -> Gateway {
    let folder = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(folder.path().join("policies")).unwrap();
    std::fs::write(folder.path().join("policies/shaping.yaml"), shaping).unwrap();
    let mut options = Options::new(dns.addr, port);
    options.folder = Some(folder);
    Gateway::start(options).await
}

/// Sends `count` messages to `recipient` over one session.
async fn send_many(gateway: &Gateway, recipient: &str, count: usize) {
    let (mut client, _) = Client::connect(gateway.smtp).await;
    for index in 0..count {
        let content = format!("From: <app@src.example>\r\nSubject: n{index}\r\n\r\nbody\r\n");
        let reply = client.send("app@src.example", &[recipient], content.as_bytes()).await;
        assert!(reply.starts_with("250"), "{reply}");
        client.command("RSET").await;
    }
}

/// Returns the time from the first to the last arrival, in seconds.
fn span(messages: &[common::receiver::Received]) -> f64 {
    let first = messages.iter().map(|m| m.at).min().unwrap();
    let last = messages.iter().map(|m| m.at).max().unwrap();
    (last - first).as_secs_f64()
}

#[tokio::test]
async fn message_rate_holds_within_ten_percent() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let receiver = Receiver::start(loopback(2), port, Script::new()).await.unwrap();
    let gateway = start(&dns, port, "domains:\n  dest.example:\n    max_message_rate: 10/s\n    max_connections: 3\n").await;

    send_many(&gateway, "user@dest.example", 31).await;
    let messages = receiver.wait_for_messages(31, WAIT).await;
    // 31 messages at 10/s, burst 1: 30 intervals of 100 ms.
    let seconds = span(&messages);
    assert!((2.7..=3.3).contains(&seconds), "31 messages took {seconds:.2}s, expected 3.0s ±10%");
}

#[tokio::test]
async fn connection_cap_never_exceeded() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let script = Script::new().data_delay(Duration::from_millis(200));
    let receiver = Receiver::start(loopback(2), port, script).await.unwrap();
    let gateway = start(&dns, port, "domains:\n  dest.example:\n    max_connections: 2\n    max_message_rate: 1000/s\n").await;

    send_many(&gateway, "user@dest.example", 12).await;
    receiver.wait_for_messages(12, WAIT).await;
    assert_eq!(receiver.max_concurrent(), 2, "the cap is 2 and 12 slow messages should use both");
}

#[tokio::test]
async fn messages_per_connection_honoured() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let receiver = Receiver::start(loopback(2), port, Script::new()).await.unwrap();
    let gateway = start(
        &dns,
        port,
        "domains:\n  dest.example:\n    max_connections: 1\n    max_messages_per_connection: 3\n    max_message_rate: 1000/s\n",
    )
    .await;

    send_many(&gateway, "user@dest.example", 9).await;
    let messages = receiver.wait_for_messages(9, WAIT).await;
    let mut per_connection: HashMap<std::net::SocketAddr, usize> = HashMap::new();
    for message in &messages {
        *per_connection.entry(message.peer).or_default() += 1;
    }
    assert!(per_connection.values().all(|&count| count <= 3), "{per_connection:?}");
    assert!(per_connection.len() >= 3, "{per_connection:?}");
}

#[tokio::test]
async fn provider_domains_share_limits() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(3)]);
    let script = Script::new().data_delay(Duration::from_millis(100));
    let receiver = Receiver::start(loopback(3), port, script).await.unwrap();
    let shaping = "providers:\n  testprov:\n    mx_suffixes: [\".prov.example\"]\n    max_connections: 1\n    max_message_rate: 1000/s\n";
    let gateway = start(&dns, port, shaping).await;

    send_many(&gateway, "user@a.example", 4).await;
    send_many(&gateway, "user@b.example", 4).await;
    receiver.wait_for_messages(8, WAIT).await;
    assert_eq!(receiver.max_concurrent(), 1, "a.example and b.example share the provider's one connection");
}

#[tokio::test]
async fn mixed_case_domains_share_site() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let script = Script::new().data_delay(Duration::from_millis(100));
    let receiver = Receiver::start(loopback(2), port, script).await.unwrap();
    let gateway = start(&dns, port, "domains:\n  DEST.example:\n    max_connections: 1\n    max_message_rate: 1000/s\n").await;

    send_many(&gateway, "one@DEST.Example", 3).await;
    send_many(&gateway, "two@dest.EXAMPLE", 3).await;
    let messages = receiver.wait_for_messages(6, WAIT).await;
    assert_eq!(receiver.max_concurrent(), 1);
    // Addresses go out as given; only routing folds the case.
    let mut recipients: Vec<&str> = messages.iter().map(|m| m.rcpt_to[0].as_str()).collect();
    recipients.sort();
    recipients.dedup();
    assert_eq!(recipients, vec!["one@DEST.Example", "two@dest.EXAMPLE"]);
}

#[tokio::test]
async fn throttle_reply_backs_off_then_recovers() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let script = Script::new().data(|count, _| {
        (count == 0).then(|| "421-4.7.28 [127.0.0.1] Our system has detected an unusual rate of\n421 4.7.28 unsolicited mail originating from your IP address. - gsmtp".to_string())
    });
    let receiver = Receiver::start(loopback(2), port, script).await.unwrap();
    let shaping = r#"
domains:
  dest.example:
    max_message_rate: 100/s
responses:
  - match: '4\.7\.28'
    action: backoff
    max_message_rate: 1/s
    max_connections: 1
    duration: 3s
"#;
    let gateway = start(&dns, port, shaping).await;

    send_many(&gateway, "user@dest.example", 1).await;
    gateway.wait_for_event("deferred", "user@dest.example", WAIT).await;
    send_many(&gateway, "user@dest.example", 3).await;
    let messages = receiver.wait_for_messages(4, WAIT).await;
    let mut times: Vec<_> = messages.iter().map(|m| m.at).collect();
    times.sort();
    let gaps: Vec<f64> = times.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect();
    assert!(gaps.iter().take(2).all(|gap| *gap >= 0.85), "backoff spaces messages 1s apart: {gaps:?}");

    let log = gateway.log();
    assert!(log.contains("site throttled by a response rule"), "{log}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    // After the backoff ends, the normal rate applies again.
    send_many(&gateway, "user@dest.example", 5).await;
    let messages = receiver.wait_for_messages(9, WAIT).await;
    let mut recent: Vec<_> = messages.iter().map(|m| m.at).collect();
    recent.sort();
    let last_five = &recent[recent.len() - 5..];
    let seconds = (last_five[4] - last_five[0]).as_secs_f64();
    assert!(seconds < 0.8, "after the backoff 5 messages took {seconds:.2}s");
    assert!(gateway.log().contains("site back to normal limits"));
    let (_, metrics) = gateway.http_get("/metrics").await;
    assert!(
        metrics.contains("baton_shaping_transitions_total{action=\"backoff\",rule=\"1:4\\\\.7\\\\.28\",site=\"dest.example\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn suspension_holds_site_then_delivers() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let script = Script::new().data(|count, _| {
        (count == 0).then(|| "421 4.7.0 [TSS04] Messages from 127.0.0.1 temporarily deferred due to unexpected volume or user complaints".to_string())
    });
    let receiver = Receiver::start(loopback(2), port, script).await.unwrap();
    let shaping = "responses:\n  - match: 'TSS04'\n    action: suspend\n    duration: 3s\n";
    let mut options_gateway = start(&dns, port, shaping).await;
    let gateway = &mut options_gateway;

    send_many(gateway, "first@dest.example", 1).await;
    gateway.wait_for_event("deferred", "first@dest.example", WAIT).await;
    let connections_at_suspension = receiver.connections();
    send_many(gateway, "second@dest.example", 1).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(receiver.connections(), connections_at_suspension, "nothing is sent to a suspended site");

    let explain = {
        let list = gateway.command(&["queue", "list"]);
        let text = String::from_utf8_lossy(&list.stdout).into_owned();
        let id = text
            .lines()
            .find(|line| line.len() > 20 && line.as_bytes()[20] == b' ' && line[..20].bytes().all(|b| b.is_ascii_hexdigit()))
            .map(|line| line[..20].to_string())
            .expect("a queue id in queue list");
        let output = gateway.command(&["queue", "explain", &id]);
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    assert!(explain.contains("site dest.example: suspended by rule 1:TSS04 until"), "{explain}");

    receiver.wait_for_messages(2, WAIT).await;
}

#[tokio::test]
async fn reload_changes_rate_of_running_gateway() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let receiver = Receiver::start(loopback(2), port, Script::new()).await.unwrap();
    let gateway = start(&dns, port, "domains:\n  dest.example:\n    max_message_rate: 2/s\n").await;

    send_many(&gateway, "user@dest.example", 5).await;
    let slow = receiver.wait_for_messages(5, WAIT).await;
    let slow_span = span(&slow);
    assert!(slow_span >= 1.8, "5 messages at 2/s took {slow_span:.2}s");

    let shaping = gateway.folder.path().join("policies/shaping.yaml");
    std::fs::write(&shaping, "domains:\n  dest.example:\n    max_message_rate: 100/s\n").unwrap();
    gateway.signal("-HUP");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    send_many(&gateway, "user@dest.example", 5).await;
    let all = receiver.wait_for_messages(10, WAIT).await;
    let fast_span = span(&all[5..]);
    assert!(fast_span < 0.8, "5 messages at 100/s took {fast_span:.2}s");
}

#[test]
fn policy_check_names_file_and_line() {
    let folder = tempfile::tempdir().unwrap();
    let policies = folder.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("shaping.yaml"), "default:\n  max_connections: 4\n  max_mesage_rate: 10/s\n").unwrap();
    let config = folder.path().join("baton.yaml");
    std::fs::write(&config, format!("policies: {}\nkeys: {}\n", policies.display(), folder.path().join("keys").display())).unwrap();

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["--config", config.to_str().unwrap(), "policy", "check"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("shaping.yaml"), "{stderr}");
    assert!(stderr.contains("max_mesage_rate"), "{stderr}");
    assert!(stderr.contains("line 3"), "{stderr}");

    std::fs::write(policies.join("shaping.yaml"), "default:\n  max_connections: 4\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["--config", config.to_str().unwrap(), "policy", "check"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains(": ok ("));

    // A folder that is not there is an error, not an empty policy.
    std::fs::remove_dir_all(&policies).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["--config", config.to_str().unwrap(), "policy", "check"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "missing folder passed the check");
    assert!(stderr.contains("policies folder"), "{stderr}");
    assert!(stderr.contains("not found"), "{stderr}");
}

#[tokio::test]
async fn require_tls_defers_clear_text_hosts() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2), loopback(3)]);
    // dest.example's host has no TLS; the provider's host (a.example) has.
    let plain = Receiver::start(loopback(2), port, Script::new()).await.unwrap();
    let secure = Receiver::start(loopback(3), port, Script::new().tls()).await.unwrap();
    let shaping = "domains:\n  dest.example:\n    require_tls: true\nproviders:\n  prov:\n    mx_suffixes: [.prov.example]\n    require_tls: true\n";
    let gateway = start(&dns, port, shaping).await;

    let content = b"From: <app@src.example>\r\nSubject: tls\r\n\r\nbody\r\n";
    let reply = common::gateway::send_message(gateway.smtp, "app@src.example", &["user@dest.example", "user@a.example"], content).await;
    assert!(reply.starts_with("250"), "{reply}");

    let deferred = gateway.wait_for_event("deferred", "user@dest.example", WAIT).await;
    let text = deferred["reply"].as_str().unwrap();
    assert!(text.starts_with("451 4.7.5"), "{text}");
    assert!(text.contains("TLS is required for site dest.example"), "{text}");
    assert!(plain.messages().is_empty(), "message sent in clear text");

    let messages = secure.wait_for_messages(1, WAIT).await;
    assert!(messages[0].tls, "message to a.example was sent without TLS");
    gateway.wait_for_event("delivered", "user@a.example", WAIT).await;
}
