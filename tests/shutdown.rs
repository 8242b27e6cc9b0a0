//! SIGTERM: intake closes at once, deliveries in flight finish within
//! `delivery.shutdown_grace`, and what is cut off is delivered after the
//! restart.

mod common;

use std::time::{Duration, Instant};

use common::dns::TestDns;
use common::gateway::{Client, Gateway, Options, send_message};
use common::loopback;
use common::receiver::{Receiver, Script, free_port_on};

const ZONE: &str = r#"
dest.example.        MX 10 mx.dest.example.
mx.dest.example.     A 127.0.0.2
"#;

const CONTENT: &[u8] = b"From: <app@src.example>\r\nSubject: drain\r\n\r\nbody\r\n";

// Multi-threaded, because `terminate` blocks its thread while the receiver
// task still has to send its delayed reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_delivery_finish() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let script = Script::new().data_delay(Duration::from_secs(2));
    let receiver = Receiver::start(loopback(2), port, script).await.unwrap();
    let mut gateway = Gateway::start(Options::new(dns.addr, port)).await;

    let reply = send_message(gateway.smtp, "app@src.example", &["user@dest.example"], CONTENT).await;
    assert!(reply.starts_with("250"), "{reply}");
    receiver.wait_for_messages(1, Duration::from_secs(10)).await;

    // The receiver delays its reply by 2 s: the delivery is in flight.
    gateway.signal("-TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = tokio::net::TcpStream::connect(gateway.smtp).await.is_err();
    assert!(refused, "intake still accepts connections after SIGTERM");

    let status = gateway.terminate();
    assert!(status.success(), "exit status {status}");
    let delivered = gateway
        .events()
        .into_iter()
        .any(|event| event["event"] == "delivered" && event["recipients"][0] == "user@dest.example");
    assert!(delivered, "delivery in flight did not finish before the exit; log:\n{}", gateway.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_time_cuts_off_then_restart_delivers() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let script = Script::new().data_delay(Duration::from_secs(8));
    let receiver = Receiver::start(loopback(2), port, script).await.unwrap();
    let mut options = Options::new(dns.addr, port);
    options.delivery_extra = "    shutdown_grace: 1s\n".to_string();
    let mut gateway = Gateway::start(options).await;

    let reply = send_message(gateway.smtp, "app@src.example", &["user@dest.example"], CONTENT).await;
    assert!(reply.starts_with("250"), "{reply}");
    receiver.wait_for_messages(1, Duration::from_secs(10)).await;

    let started = Instant::now();
    let status = gateway.terminate();
    let took = started.elapsed();
    assert!(status.success(), "exit status {status}");
    assert!(took < Duration::from_secs(5), "shutdown took {took:?} with a 1s grace time");
    assert!(gateway.log().contains("grace time over"), "{}", gateway.log());
    assert!(!gateway.events().iter().any(|event| event["event"] == "delivered"));

    // The message is still queued: the restart delivers it.
    gateway.launch().await;
    gateway.wait_for_event("delivered", "user@dest.example", Duration::from_secs(30)).await;
}

/// Delivery connections that wait on a site's connection rate end at once
/// on SIGTERM. The shutdown neither waits for the rate nor tries the site
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_throttle_waits() {
    let dns = TestDns::start(ZONE).await;
    // Nothing listens here, so every attempt fails at connect.
    let port = free_port_on(&[loopback(2)]);
    let folder = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(folder.path().join("policies")).unwrap();
    std::fs::write(
        folder.path().join("policies/shaping.yaml"),
        "default:\n  max_connections: 10\n  max_connection_rate: \"30/min\"\n",
    )
    .unwrap();
    let mut options = Options::new(dns.addr, port);
    options.folder = Some(folder);
    options.delivery_extra = "    shutdown_grace: 30s\n".to_string();
    let mut gateway = Gateway::start(options).await;

    for index in 0..10 {
        let recipient = format!("user{index}@dest.example");
        let reply = send_message(gateway.smtp, "app@src.example", &[recipient.as_str()], CONTENT).await;
        assert!(reply.starts_with("250"), "{reply}");
    }
    // The first connection is allowed at once; the others wait 2 s apart.
    gateway.wait_for_event("deferred", "user0@dest.example", Duration::from_secs(10)).await;
    let attempts_before = attempts(&gateway);

    let started = Instant::now();
    let status = gateway.terminate();
    let took = started.elapsed();
    assert!(status.success(), "exit status {status}");
    assert!(took < Duration::from_secs(3), "shutdown took {took:?}; log:\n{}", gateway.log());
    assert!(
        attempts(&gateway) <= attempts_before + 1,
        "attempts went on after SIGTERM: {} before, {} after; log:\n{}",
        attempts_before,
        attempts(&gateway),
        gateway.log()
    );
}

fn attempts(gateway: &Gateway) -> usize {
    gateway.events().iter().filter(|event| event["event"] == "deferred").count()
}

/// A session waiting for its next command when SIGTERM comes gets a 421
/// (RFC 5321 section 3.8) before the connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_sends_421_to_open_sessions() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let mut gateway = Gateway::start(Options::new(dns.addr, port)).await;
    let (mut client, _) = Client::connect(gateway.smtp).await;
    assert!(client.command("EHLO client.test.example").await.starts_with("250"));
    assert!(client.command("MAIL FROM:<app@src.example>").await.starts_with("250"));

    gateway.signal("-TERM");
    let reply = tokio::time::timeout(Duration::from_secs(5), client.read_reply())
        .await
        .expect("no reply within 5 s of SIGTERM");
    assert!(reply.starts_with("421 4.3.2 "), "{reply}");
    assert_eq!(client.read_reply().await, "<closed>");
    let status = gateway.terminate();
    assert!(status.success(), "exit status {status}");
}
