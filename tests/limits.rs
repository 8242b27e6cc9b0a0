//! Intake limits: connections per client IP, header section size and field
//! count, and the older session limits (timeouts, errors, sessions, command
//! line length, recipients).

mod common;

use std::time::{Duration, Instant};

use common::dns::TestDns;
use common::gateway::{Client, Gateway, Options};
use common::loopback;

const ZONE: &str = r#"
dest.example.            MX 10 mx1.dest.example.
mx1.dest.example.        A 127.0.0.2
"#;

/// Starts a gateway with extra `smtp:` lines (indented by four spaces).
async fn start_gateway(dns: &TestDns, smtp_extra: &str) -> Gateway {
    let mut options = Options::new(dns.addr, 25);
    options.smtp_extra = smtp_extra.to_string();
    let gateway = Gateway::start(options).await;
    // Let the start-up probe's session end, so it takes no session or
    // connection slot from the test.
    tokio::time::sleep(Duration::from_millis(300)).await;
    gateway
}

/// Opens a transaction with one recipient, ready for DATA or BDAT.
async fn open_transaction(client: &mut Client) {
    assert!(client.command("EHLO client.test.example").await.starts_with("250"));
    assert!(client.command("MAIL FROM:<sender@dest.example>").await.starts_with("250"));
    assert!(client.command("RCPT TO:<rcpt@dest.example>").await.starts_with("250"));
}

/// Sends `content` with DATA (no line of it may start with a dot).
async fn send_data(client: &mut Client, content: &[u8]) -> String {
    assert!(client.command("DATA").await.starts_with("354"));
    client.write(content).await;
    client.write(b".\r\n").await;
    client.read_reply().await
}

/// Sends `content` in one BDAT LAST chunk.
async fn send_bdat(client: &mut Client, content: &[u8]) -> String {
    client.write(format!("BDAT {} LAST\r\n", content.len()).as_bytes()).await;
    client.write(content).await;
    client.read_reply().await
}

/// Builds a message with `fields` header fields of `field_size` bytes each, CRLF
/// included (at least 12).
fn message_with_headers(fields: usize, field_size: usize) -> Vec<u8> {
    let mut message = Vec::new();
    for number in 0..fields {
        let prefix = format!("X-H{number:05}: ");
        let value = "v".repeat(field_size - prefix.len() - 2);
        message.extend_from_slice(format!("{prefix}{value}\r\n").as_bytes());
    }
    message.extend_from_slice(b"\r\nbody\r\n");
    message
}

#[tokio::test]
async fn connections_per_ip_limited() {
    let dns = TestDns::start(ZONE).await;
    let gateway = start_gateway(&dns, "    max_connections_per_ip: 2\n").await;

    let (first, greeting) = Client::connect_from(loopback(3), gateway.smtp).await;
    assert!(greeting.starts_with("220 "), "{greeting}");
    let (_second, greeting) = Client::connect_from(loopback(3), gateway.smtp).await;
    assert!(greeting.starts_with("220 "), "{greeting}");
    let (mut third, greeting) = Client::connect_from(loopback(3), gateway.smtp).await;
    assert!(greeting.starts_with("421 4.7.0"), "third connection from 127.0.0.3: {greeting}");
    assert!(greeting.contains("Too many connections from 127.0.0.3"), "{greeting}");
    assert_eq!(third.read_reply().await, "<closed>");

    // Another address has its own count.
    let (_other, greeting) = Client::connect_from(loopback(4), gateway.smtp).await;
    assert!(greeting.starts_with("220 "), "127.0.0.4: {greeting}");

    // A closed session frees its place.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (mut client, greeting) = Client::connect_from(loopback(3), gateway.smtp).await;
        if greeting.starts_with("220 ") {
            client.command("QUIT").await;
            break;
        }
        assert!(Instant::now() < deadline, "place not freed after close: {greeting}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn header_section_size_limited() {
    let dns = TestDns::start(ZONE).await;
    let gateway = start_gateway(&dns, "    max_header_size: 4000\n").await;
    let (mut client, _) = Client::connect(gateway.smtp).await;

    // 40 fields of 100 bytes: exactly 4000 bytes.
    open_transaction(&mut client).await;
    let reply = send_data(&mut client, &message_with_headers(40, 100)).await;
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "header section at the limit: {reply}");

    open_transaction(&mut client).await;
    let reply = send_data(&mut client, &message_with_headers(41, 100)).await;
    assert!(reply.starts_with("552 5.3.4"), "DATA: {reply}");
    assert!(reply.contains("4100 bytes; the limit is 4000 bytes"), "DATA: {reply}");

    open_transaction(&mut client).await;
    let reply = send_bdat(&mut client, &message_with_headers(41, 100)).await;
    assert!(reply.starts_with("552 5.3.4"), "BDAT: {reply}");

    // One folded field counts all its lines.
    open_transaction(&mut client).await;
    let folded = format!("Subject: x\r\n{}\r\nbody\r\n", " folded continuation line\r\n".repeat(200));
    let reply = send_data(&mut client, folded.as_bytes()).await;
    assert!(reply.starts_with("552 5.3.4"), "folded field: {reply}");

    assert!(client.command("NOOP").await.starts_with("250"), "session closed after the rejection");
    assert_eq!(gateway.received_count(1).await, 1, "events: {:#?}", gateway.events());
    let (_, metrics) = gateway.http_get("/metrics").await;
    assert!(metrics.contains("baton_messages_rejected_total{reason=\"header_limit\"} 3"), "{metrics}");
}

#[tokio::test]
async fn header_field_count_limited() {
    let dns = TestDns::start(ZONE).await;
    let gateway = start_gateway(&dns, "    max_header_fields: 50\n").await;
    let (mut client, _) = Client::connect(gateway.smtp).await;

    open_transaction(&mut client).await;
    let reply = send_data(&mut client, &message_with_headers(50, 20)).await;
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "50 fields: {reply}");

    open_transaction(&mut client).await;
    let reply = send_data(&mut client, &message_with_headers(51, 20)).await;
    assert!(reply.starts_with("554 5.6.0"), "DATA: {reply}");
    assert!(reply.contains("51 header fields; the limit is 50"), "DATA: {reply}");

    open_transaction(&mut client).await;
    let reply = send_bdat(&mut client, &message_with_headers(51, 20)).await;
    assert!(reply.starts_with("554 5.6.0"), "BDAT: {reply}");

    // Lines after the empty line are body, however they look.
    open_transaction(&mut client).await;
    let mut message = b"Subject: body lines\r\n\r\n".to_vec();
    message.extend_from_slice(&message_with_headers(100, 20));
    let reply = send_data(&mut client, &message).await;
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "header-like body lines: {reply}");
    assert_eq!(gateway.received_count(2).await, 2, "events: {:#?}", gateway.events());
}

#[tokio::test]
async fn command_timeout_closes() {
    let dns = TestDns::start(ZONE).await;
    let gateway = start_gateway(&dns, "    command_timeout: 1s\n").await;

    let (mut client, _) = Client::connect(gateway.smtp).await;
    assert!(client.command("EHLO client.test.example").await.starts_with("250"));
    let started = Instant::now();
    let reply = client.read_reply().await;
    assert!(reply.starts_with("421 4.4.2 Timeout waiting for a command"), "{reply}");
    assert!(started.elapsed() >= Duration::from_millis(900), "closed after {:?}", started.elapsed());
    assert_eq!(client.read_reply().await, "<closed>");
}

#[tokio::test]
async fn data_timeout_closes() {
    let dns = TestDns::start(ZONE).await;
    let gateway = start_gateway(&dns, "    data_timeout: 1s\n").await;

    let (mut client, _) = Client::connect(gateway.smtp).await;
    open_transaction(&mut client).await;
    assert!(client.command("DATA").await.starts_with("354"));
    client.write(b"Subject: stalled\r\n\r\npart of the body").await;
    let reply = client.read_reply().await;
    assert!(reply.starts_with("421 4.4.2 Timeout waiting for message data"), "DATA: {reply}");
    assert_eq!(client.read_reply().await, "<closed>");

    let (mut client, _) = Client::connect(gateway.smtp).await;
    open_transaction(&mut client).await;
    client.write(b"BDAT 100 LAST\r\nonly part of the chunk").await;
    let reply = client.read_reply().await;
    assert!(reply.starts_with("421 4.4.2 Timeout waiting for BDAT data"), "BDAT: {reply}");
    assert_eq!(client.read_reply().await, "<closed>");
    assert_eq!(gateway.received_count(0).await, 0);
}

#[tokio::test]
async fn session_timeout_closes_busy_session() {
    let dns = TestDns::start(ZONE).await;
    let gateway = start_gateway(&dns, "    session_timeout: 2s\n").await;

    let (mut client, _) = Client::connect(gateway.smtp).await;
    let started = Instant::now();
    let reply = loop {
        let reply = client.command("NOOP").await;
        if !reply.starts_with("250") {
            break reply;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "session still open after 10s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(reply.starts_with("421 4.4.2"), "{reply}");
    assert!(started.elapsed() >= Duration::from_millis(1800), "closed after {:?}", started.elapsed());
}

#[tokio::test]
async fn max_errors_closes_session() {
    let dns = TestDns::start(ZONE).await;
    let gateway = start_gateway(&dns, "    max_errors: 3\n").await;

    let (mut client, _) = Client::connect(gateway.smtp).await;
    for attempt in 1..=2 {
        let reply = client.command("FROB").await;
        assert!(reply.starts_with("500 5.5.2"), "error {attempt}: {reply}");
    }
    let reply = client.command("FROB").await;
    assert!(reply.starts_with("500 5.5.2"), "error 3: {reply}");
    let closing = client.read_reply().await;
    assert!(closing.starts_with("421 4.7.0 Too many errors"), "{closing}");
    assert_eq!(client.read_reply().await, "<closed>");
}

#[tokio::test]
async fn max_sessions_limited() {
    let dns = TestDns::start(ZONE).await;
    let gateway = start_gateway(&dns, "    max_sessions: 2\n").await;

    let (_first, greeting) = Client::connect_from(loopback(3), gateway.smtp).await;
    assert!(greeting.starts_with("220 "), "{greeting}");
    let (_second, greeting) = Client::connect_from(loopback(4), gateway.smtp).await;
    assert!(greeting.starts_with("220 "), "{greeting}");
    let (_third, greeting) = Client::connect_from(loopback(5), gateway.smtp).await;
    assert!(greeting.starts_with("421 4.3.2"), "third session: {greeting}");
}

#[tokio::test]
async fn long_command_line_rejected() {
    let dns = TestDns::start(ZONE).await;
    let gateway = start_gateway(&dns, "    max_command_line: 512\n").await;

    let (mut client, _) = Client::connect(gateway.smtp).await;
    let at_limit = format!("NOOP {}", "x".repeat(512 - "NOOP \r\n".len()));
    assert!(client.command(&at_limit).await.starts_with("250"), "512-byte line rejected");
    let reply = client.command(&format!("NOOP {}", "x".repeat(600))).await;
    assert!(reply.starts_with("500 5.5.2 Command line longer than 512 bytes"), "{reply}");
    assert!(client.command("NOOP").await.starts_with("250"), "session closed after a long line");
}

#[tokio::test]
async fn max_recipients_limited() {
    let dns = TestDns::start(ZONE).await;
    let gateway = start_gateway(&dns, "    max_recipients: 2\n").await;

    let (mut client, _) = Client::connect(gateway.smtp).await;
    client.command("EHLO client.test.example").await;
    client.command("MAIL FROM:<sender@dest.example>").await;
    assert!(client.command("RCPT TO:<one@dest.example>").await.starts_with("250"));
    assert!(client.command("RCPT TO:<two@dest.example>").await.starts_with("250"));
    let reply = client.command("RCPT TO:<three@dest.example>").await;
    assert!(reply.starts_with("452 4.5.3"), "{reply}");
}
