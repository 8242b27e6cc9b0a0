//! End-to-end tests of the relay core: the real `baton` binary, a real DNS
//! server with test zones and real receiving SMTP servers on 127.0.0.x.

mod common;

use std::time::Duration;

use common::dns::TestDns;
use common::gateway::{Client, Gateway, Options, send_message};
use common::loopback;
use common::receiver::{Receiver, Script, free_port_on};

const WAIT: Duration = Duration::from_secs(20);

const ZONE: &str = r#"
dest.example.            MX 10 mx1.dest.example.
mx1.dest.example.        A 127.0.0.2
src.example.             MX 10 mx.src.example.
mx.src.example.          A 127.0.0.3
nullmx.example.          MX 0 .
amx.example.             A 127.0.0.4
failover.example.        MX 10 dead.failover.example.
failover.example.        MX 20 live.failover.example.
dead.failover.example.   A 127.0.0.5
live.failover.example.   A 127.0.0.6
busy.example.            MX 10 busy.busy.example.
busy.example.            MX 20 calm.busy.example.
busy.busy.example.       A 127.0.0.7
calm.busy.example.       A 127.0.0.8
broken.example.          SERVFAIL
"#;

/// Builds a message with MIME parts, an attachment, 8-bit text, a long
/// folded header and a line that starts with a dot.
fn multipart_message() -> Vec<u8> {
    let mut message = String::new();
    message.push_str("From: Sender <sender@src.example>\r\n");
    message.push_str("To: <rcpt@dest.example>\r\n");
    message.push_str("Subject: Quarterly report with a long subject line that is folded\r\n");
    message.push_str(" onto a second line and\r\n\ta third one\r\n");
    message.push_str("MIME-Version: 1.0\r\n");
    message.push_str("Content-Type: multipart/mixed; boundary=\"b1\"\r\n");
    message.push_str("\r\n");
    message.push_str("--b1\r\n");
    message.push_str("Content-Type: text/plain; charset=utf-8\r\n");
    message.push_str("Content-Transfer-Encoding: 8bit\r\n\r\n");
    message.push_str("Grüße aus Köln, ça va? 日本語\r\n");
    message.push_str(".a line starting with a dot\r\n");
    message.push_str("..two dots\r\n");
    message.push_str("\r\n--b1\r\n");
    message.push_str("Content-Type: application/octet-stream; name=\"data.bin\"\r\n");
    message.push_str("Content-Transfer-Encoding: base64\r\n");
    message.push_str("Content-Disposition: attachment; filename=\"data.bin\"\r\n\r\n");
    let attachment: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 256) as u8).collect();
    for chunk in attachment.chunks(57) {
        message.push_str(&base64(chunk));
        message.push_str("\r\n");
    }
    message.push_str("--b1--\r\n");
    message.into_bytes()
}

fn base64(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn simple_message(subject: &str) -> Vec<u8> {
    format!("From: <sender@src.example>\r\nTo: <rcpt@dest.example>\r\nSubject: {subject}\r\n\r\nHello.\r\n").into_bytes()
}

#[tokio::test]
async fn multipart_body_arrives_intact() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let receiver = Receiver::start(loopback(2), port, Script::new()).await.unwrap();
    let gateway = Gateway::start(Options::new(dns.addr, port)).await;

    let content = multipart_message();
    let reply = send_message(gateway.smtp, "sender@src.example", &["rcpt@dest.example"], &content).await;
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");

    let messages = receiver.wait_for_messages(1, WAIT).await;
    let received = &messages[0];
    assert_eq!(received.mail_from, "sender@src.example");
    assert_eq!(received.rcpt_to, vec!["rcpt@dest.example"]);
    assert!(!received.bare_lf);
    assert!(received.data.starts_with(b"Received: from client.test.example ([127.0.0.1])\r\n\tby mta.test.example (Baton) with ESMTP id "));
    assert!(received.data.ends_with(&content), "content changed in transit");
    assert_eq!(received.helo, "mta.test.example");
}

#[tokio::test]
async fn delivered_event_logged() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let _receiver = Receiver::start(loopback(2), port, Script::new()).await.unwrap();
    let gateway = Gateway::start(Options::new(dns.addr, port)).await;

    let reply = send_message(gateway.smtp, "sender@src.example", &["rcpt@dest.example"], &simple_message("log")).await;
    let queue_id = reply.rsplit(' ').next().unwrap().to_string();
    let event = gateway.wait_for_event("delivered", "rcpt@dest.example", WAIT).await;
    assert_eq!(event["queue_id"], queue_id.as_str());
    assert_eq!(event["sender"], "sender@src.example");
    assert_eq!(event["mx"], "mx1.dest.example");
    assert_eq!(event["mx_ip"], "127.0.0.2");
    assert_eq!(event["attempt"], 1);
    assert!(event["reply"].as_str().unwrap().starts_with("250"));
    let received = gateway.events().into_iter().find(|e| e["event"] == "received").unwrap();
    assert_eq!(received["queue_id"], queue_id.as_str());
}

#[tokio::test]
async fn temporary_failure_retried() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let script = Script::new().data(|count, _| (count == 0).then(|| "451 4.3.0 try again later".to_string()));
    let receiver = Receiver::start(loopback(2), port, script).await.unwrap();
    let gateway = Gateway::start(Options::new(dns.addr, port)).await;

    send_message(gateway.smtp, "sender@src.example", &["rcpt@dest.example"], &simple_message("retry")).await;
    let deferred = gateway.wait_for_event("deferred", "rcpt@dest.example", WAIT).await;
    assert_eq!(deferred["reply"], "451 4.3.0 try again later");
    assert!(deferred["next_attempt"].is_string());

    let messages = receiver.wait_for_messages(1, WAIT).await;
    assert_eq!(messages.len(), 1);
    let delivered = gateway.wait_for_event("delivered", "rcpt@dest.example", WAIT).await;
    assert_eq!(delivered["attempt"], 2);
}

#[tokio::test]
async fn expired_recipient_bounces() {
    let dns = TestDns::start(ZONE).await;
    let ips = [loopback(2), loopback(3)];
    let port = free_port_on(&ips);
    let _dest = Receiver::start(ips[0], port, Script::new().data_reply("451 4.3.0 still busy")).await.unwrap();
    let source = Receiver::start(ips[1], port, Script::new()).await.unwrap();
    let mut options = Options::new(dns.addr, port);
    options.max_age = "2s";
    let gateway = Gateway::start(options).await;

    send_message(gateway.smtp, "sender@src.example", &["rcpt@dest.example"], &simple_message("expire")).await;
    let bounced = gateway.wait_for_event("bounced", "rcpt@dest.example", WAIT).await;
    assert_eq!(bounced["reply"], "451 4.3.0 still busy");
    let dsn = &source.wait_for_messages(1, WAIT).await[0];
    let text = dsn.data_str();
    assert!(text.contains("Status: 5.4.7\r\n"), "{text}");
    assert!(text.contains("delivery time expired"), "{text}");
}

#[tokio::test]
async fn permanent_failure_sends_dsn() {
    let dns = TestDns::start(ZONE).await;
    let ips = [loopback(2), loopback(3)];
    let port = free_port_on(&ips);
    let dest = Receiver::start(ips[0], port, Script::new().rcpt_reply("nobody@dest.example", "550 5.1.1 no such user"))
        .await
        .unwrap();
    let source = Receiver::start(ips[1], port, Script::new()).await.unwrap();
    let gateway = Gateway::start(Options::new(dns.addr, port)).await;

    let content = simple_message("bounce me");
    send_message(gateway.smtp, "sender@src.example", &["nobody@dest.example"], &content).await;
    let bounced = gateway.wait_for_event("bounced", "nobody@dest.example", WAIT).await;
    assert_eq!(bounced["reply"], "550 5.1.1 no such user");

    let dsn = &source.wait_for_messages(1, WAIT).await[0];
    assert_eq!(dsn.mail_from, "", "a DSN uses the null sender");
    assert_eq!(dsn.rcpt_to, vec!["sender@src.example"]);
    let text = dsn.data_str();
    assert!(text.contains("Content-Type: multipart/report; report-type=delivery-status;"), "{text}");
    assert!(text.contains("Final-Recipient: rfc822; nobody@dest.example\r\n"), "{text}");
    assert!(text.contains("Action: failed\r\n"), "{text}");
    assert!(text.contains("Status: 5.1.1\r\n"), "{text}");
    assert!(text.contains("Remote-MTA: dns; mx1.dest.example\r\n"), "{text}");
    assert!(text.contains("Diagnostic-Code: smtp; 550 5.1.1 no such user\r\n"), "{text}");
    assert!(text.contains("Subject: bounce me\r\n"), "original headers are returned: {text}");
    assert!(dest.messages().is_empty());
}

#[tokio::test]
async fn null_sender_bounce_makes_no_dsn() {
    let dns = TestDns::start(ZONE).await;
    let ips = [loopback(2), loopback(3)];
    let port = free_port_on(&ips);
    let _dest = Receiver::start(ips[0], port, Script::new().data_reply("554 5.7.1 rejected")).await.unwrap();
    let source = Receiver::start(ips[1], port, Script::new()).await.unwrap();
    let gateway = Gateway::start(Options::new(dns.addr, port)).await;

    send_message(gateway.smtp, "", &["rcpt@dest.example"], &simple_message("null sender")).await;
    gateway.wait_for_event("bounced", "rcpt@dest.example", WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(source.connections(), 0, "no DSN may be sent for a null-sender message");
}

#[tokio::test]
async fn null_mx_bounces_at_once() {
    let dns = TestDns::start(ZONE).await;
    let ips = [loopback(3)];
    let port = free_port_on(&ips);
    let source = Receiver::start(ips[0], port, Script::new()).await.unwrap();
    let gateway = Gateway::start(Options::new(dns.addr, port)).await;

    send_message(gateway.smtp, "sender@src.example", &["user@nullmx.example"], &simple_message("null mx")).await;
    let bounced = gateway.wait_for_event("bounced", "user@nullmx.example", WAIT).await;
    assert!(bounced["reply"].as_str().unwrap().starts_with("556 5.1.10"), "{bounced}");
    assert_eq!(bounced["attempt"], 1);
    let dsn = &source.wait_for_messages(1, WAIT).await[0];
    assert!(dsn.data_str().contains("Status: 5.1.10\r\n"));
}

#[tokio::test]
async fn missing_mx_falls_back_to_address() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(4)]);
    let receiver = Receiver::start(loopback(4), port, Script::new()).await.unwrap();
    let gateway = Gateway::start(Options::new(dns.addr, port)).await;

    send_message(gateway.smtp, "sender@src.example", &["user@amx.example"], &simple_message("a record")).await;
    let messages = receiver.wait_for_messages(1, WAIT).await;
    assert_eq!(messages[0].rcpt_to, vec!["user@amx.example"]);
}

#[tokio::test]
async fn dead_mx_fails_over() {
    let dns = TestDns::start(ZONE).await;
    let ips = [loopback(5), loopback(6)];
    let port = free_port_on(&ips);
    // Nothing listens on 127.0.0.5: the preferred MX refuses connections.
    let live = Receiver::start(ips[1], port, Script::new()).await.unwrap();
    let gateway = Gateway::start(Options::new(dns.addr, port)).await;

    send_message(gateway.smtp, "sender@src.example", &["user@failover.example"], &simple_message("failover")).await;
    live.wait_for_messages(1, WAIT).await;
    let delivered = gateway.wait_for_event("delivered", "user@failover.example", WAIT).await;
    assert_eq!(delivered["mx"], "live.failover.example");
    assert_eq!(delivered["attempt"], 1);
}

#[tokio::test]
async fn busy_greeting_fails_over() {
    let dns = TestDns::start(ZONE).await;
    let ips = [loopback(7), loopback(8)];
    let port = free_port_on(&ips);
    let busy = Receiver::start(ips[0], port, Script::new().greeting("421 4.3.2 too busy")).await.unwrap();
    let calm = Receiver::start(ips[1], port, Script::new()).await.unwrap();
    let gateway = Gateway::start(Options::new(dns.addr, port)).await;

    send_message(gateway.smtp, "sender@src.example", &["user@busy.example"], &simple_message("busy")).await;
    calm.wait_for_messages(1, WAIT).await;
    assert_eq!(busy.connections(), 1);
    assert!(busy.messages().is_empty());
}

#[tokio::test]
async fn dns_failure_defers() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let gateway = Gateway::start(Options::new(dns.addr, port)).await;

    send_message(gateway.smtp, "sender@src.example", &["user@broken.example"], &simple_message("servfail")).await;
    let deferred = gateway.wait_for_event("deferred", "user@broken.example", WAIT).await;
    assert!(deferred["reply"].as_str().unwrap().starts_with("451 4.4.3"), "{deferred}");
}

#[tokio::test]
async fn pipelined_rcpts_partly_rejected() {
    let dns = TestDns::start(ZONE).await;
    let ips = [loopback(2), loopback(3)];
    let port = free_port_on(&ips);
    let dest = Receiver::start(ips[0], port, Script::new().rcpt_reply("b@dest.example", "550 5.1.1 unknown user b"))
        .await
        .unwrap();
    let source = Receiver::start(ips[1], port, Script::new()).await.unwrap();
    let gateway = Gateway::start(Options::new(dns.addr, port)).await;

    let recipients = ["a@dest.example", "b@dest.example", "c@dest.example"];
    send_message(gateway.smtp, "sender@src.example", &recipients, &simple_message("three")).await;
    let messages = dest.wait_for_messages(1, WAIT).await;
    assert_eq!(messages.len(), 1, "one transaction for the three recipients");
    assert_eq!(messages[0].rcpt_to, vec!["a@dest.example", "c@dest.example"]);

    // The gateway pipelined MAIL, the RCPTs and DATA (RFC 2920).
    let commands = dest.commands();
    let mail = commands.iter().position(|c| c.starts_with("MAIL FROM")).unwrap();
    assert!(commands[mail + 1].starts_with("RCPT TO:<a@"));
    assert!(commands[mail + 3].starts_with("RCPT TO:<c@"));
    assert_eq!(commands[mail + 4], "DATA");

    let dsn = &source.wait_for_messages(1, WAIT).await[0];
    let text = dsn.data_str();
    assert!(text.contains("Final-Recipient: rfc822; b@dest.example"), "{text}");
    assert!(!text.contains("Final-Recipient: rfc822; a@dest.example"), "{text}");
}

#[tokio::test]
async fn sequential_without_pipelining() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let dest = Receiver::start(loopback(2), port, Script::new().no_pipelining()).await.unwrap();
    let gateway = Gateway::start(Options::new(dns.addr, port)).await;

    send_message(gateway.smtp, "sender@src.example", &["a@dest.example", "b@dest.example"], &simple_message("seq")).await;
    let messages = dest.wait_for_messages(1, WAIT).await;
    assert_eq!(messages[0].rcpt_to.len(), 2);
}

#[tokio::test]
async fn opportunistic_starttls_used() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let dest = Receiver::start(loopback(2), port, Script::new().tls()).await.unwrap();
    let gateway = Gateway::start(Options::new(dns.addr, port)).await;

    send_message(gateway.smtp, "sender@src.example", &["a@dest.example"], &simple_message("tls")).await;
    let messages = dest.wait_for_messages(1, WAIT).await;
    assert!(messages[0].tls, "the message went in clear text");
}

#[tokio::test]
async fn connection_reused_for_queued_messages() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let dest = Receiver::start(loopback(2), port, Script::new()).await.unwrap();
    let folder = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(folder.path().join("policies")).unwrap();
    std::fs::write(folder.path().join("policies/shaping.yaml"), "default:\n  max_connections: 1\n  max_message_rate: 100/s\n").unwrap();
    let mut options = Options::new(dns.addr, port);
    options.folder = Some(folder);
    let gateway = Gateway::start(options).await;

    let (mut client, _) = Client::connect(gateway.smtp).await;
    for index in 0..10 {
        let reply = client.send("sender@src.example", &["a@dest.example"], &simple_message(&format!("n{index}"))).await;
        assert!(reply.starts_with("250"), "{reply}");
        client.command("RSET").await;
    }
    dest.wait_for_messages(10, WAIT).await;
    assert!(dest.connections() < 10, "{} connections for 10 messages", dest.connections());
}

#[tokio::test]
async fn queued_mail_survives_restart() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let mut options = Options::new(dns.addr, port);
    options.retry = "[1s]";
    let mut gateway = Gateway::start(options).await;

    // No receiver yet: the message is deferred and stays queued.
    let content = simple_message("restart");
    let reply = send_message(gateway.smtp, "sender@src.example", &["rcpt@dest.example"], &content).await;
    assert!(reply.starts_with("250"), "{reply}");
    gateway.wait_for_event("deferred", "rcpt@dest.example", WAIT).await;
    gateway.kill();

    let receiver = Receiver::start(loopback(2), port, Script::new()).await.unwrap();
    gateway.launch().await;
    let messages = receiver.wait_for_messages(1, WAIT).await;
    assert!(messages[0].data.ends_with(&content));
}

#[tokio::test]
async fn queue_list_shows_deferred() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let _dest = Receiver::start(loopback(2), port, Script::new().data_reply("452 4.2.2 mailbox full")).await.unwrap();
    let mut options = Options::new(dns.addr, port);
    options.retry = "[1h]";
    let mut gateway = Gateway::start(options).await;

    send_message(gateway.smtp, "sender@src.example", &["rcpt@dest.example"], &simple_message("list")).await;
    gateway.wait_for_event("deferred", "rcpt@dest.example", WAIT).await;

    let output = gateway.command(&["queue", "list"]);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(text.contains("1 messages, 1 recipients pending"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("dest.example") && l.contains(" 1 ")), "{text}");
    assert!(text.contains("deferred  <rcpt@dest.example>  attempts 1"), "{text}");
    assert!(text.contains("last reply: 452 4.2.2 mailbox full"), "{text}");

    // With the gateway stopped, the command reads the spool itself.
    assert!(gateway.terminate().success());
    let output = gateway.command(&["queue", "list"]);
    let offline = String::from_utf8_lossy(&output.stdout);
    assert!(offline.contains("deferred  <rcpt@dest.example>  attempts 1"), "{offline}");

    // A reader that closes the pipe first, as `| head` does, is no error.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["queue", "list", "--config"])
        .arg(gateway.config_path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run baton");
    drop(child.stdout.take());
    let output = child.wait_with_output().expect("wait for baton");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "exit status {}: {stderr}", output.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test]
async fn bare_lf_in_data_rejected() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let dest = Receiver::start(loopback(2), port, Script::new()).await.unwrap();
    let gateway = Gateway::start(Options::new(dns.addr, port)).await;

    let (mut client, _) = Client::connect(gateway.smtp).await;
    client.command("EHLO client.test.example").await;
    client.command("MAIL FROM:<sender@src.example>").await;
    client.command("RCPT TO:<rcpt@dest.example>").await;
    client.command("DATA").await;
    client
        .write(b"Subject: smuggle\r\n\r\nfirst\n.\nMAIL FROM:<evil@src.example>\nRCPT TO:<victim@dest.example>\nDATA\nforged\n.\n")
        .await;
    let reply = client.read_reply().await;
    assert!(reply.starts_with("521 5.5.2"), "{reply}");
    assert!(reply.contains("bare LF"), "{reply}");
    assert_eq!(client.read_reply().await, "<closed>");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(dest.connections(), 0, "nothing may be delivered");
}

#[tokio::test]
async fn relay_denied_outside_networks() {
    let dns = TestDns::start(ZONE).await;
    let mut options = Options::new(dns.addr, 25);
    options.relay_networks = r#"["127.0.0.9/32"]"#;
    let gateway = Gateway::start(options).await;

    let (mut client, _) = Client::connect_from(loopback(1), gateway.smtp).await;
    client.command("EHLO client.test.example").await;
    client.command("MAIL FROM:<sender@src.example>").await;
    let reply = client.command("RCPT TO:<rcpt@dest.example>").await;
    assert!(reply.starts_with("550 5.7.1 Relay access denied: client 127.0.0.1"), "{reply}");

    let (mut allowed, _) = Client::connect_from(loopback(9), gateway.smtp).await;
    allowed.command("EHLO client.test.example").await;
    allowed.command("MAIL FROM:<sender@src.example>").await;
    let reply = allowed.command("RCPT TO:<rcpt@dest.example>").await;
    assert!(reply.starts_with("250"), "{reply}");
}

#[tokio::test]
async fn oversize_message_rejected() {
    let dns = TestDns::start(ZONE).await;
    let gateway = Gateway::start(Options::new(dns.addr, 25)).await;

    let (mut client, _) = Client::connect(gateway.smtp).await;
    let ehlo = client.command("EHLO client.test.example").await;
    assert!(ehlo.contains("250-SIZE 1000000"), "{ehlo}");
    let reply = client.command("MAIL FROM:<sender@src.example> SIZE=2000000").await;
    assert!(reply.starts_with("552 5.3.4"), "{reply}");

    client.command("MAIL FROM:<sender@src.example>").await;
    client.command("RCPT TO:<rcpt@dest.example>").await;
    client.command("DATA").await;
    let line = "x".repeat(998) + "\r\n";
    let mut body = Vec::new();
    while body.len() < 1_100_000 {
        body.extend_from_slice(line.as_bytes());
    }
    body.extend_from_slice(b".\r\n");
    client.write(&body).await;
    let reply = client.read_reply().await;
    assert!(reply.starts_with("552 5.3.4"), "{reply}");
    // The session goes on after the rejection.
    assert!(client.command("NOOP").await.starts_with("250"));
}

#[tokio::test]
async fn long_line_rejected() {
    let dns = TestDns::start(ZONE).await;
    let gateway = Gateway::start(Options::new(dns.addr, 25)).await;

    let (mut client, _) = Client::connect(gateway.smtp).await;
    client.command("EHLO client.test.example").await;
    client.command("MAIL FROM:<sender@src.example>").await;
    client.command("RCPT TO:<rcpt@dest.example>").await;
    client.command("DATA").await;
    let body = format!("Subject: long\r\n\r\n{}\r\n.\r\n", "y".repeat(999));
    client.write(body.as_bytes()).await;
    let reply = client.read_reply().await;
    assert!(reply.starts_with("550 5.6.0"), "{reply}");
    assert!(reply.contains("999"), "{reply}");
}

#[tokio::test]
async fn bdat_message_delivered() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let dest = Receiver::start(loopback(2), port, Script::new()).await.unwrap();
    let gateway = Gateway::start(Options::new(dns.addr, port)).await;

    let (mut client, _) = Client::connect(gateway.smtp).await;
    let ehlo = client.command("EHLO client.test.example").await;
    assert!(ehlo.contains("CHUNKING"), "{ehlo}");
    client.command("MAIL FROM:<sender@src.example>").await;
    client.command("RCPT TO:<rcpt@dest.example>").await;
    let first = b"Subject: chunks\r\n\r\n.dot line\r\n";
    client.write(format!("BDAT {}\r\n", first.len()).as_bytes()).await;
    client.write(first).await;
    assert!(client.read_reply().await.starts_with("250"));
    let last = b"end\r\n";
    client.write(format!("BDAT {} LAST\r\n", last.len()).as_bytes()).await;
    client.write(last).await;
    let reply = client.read_reply().await;
    assert!(reply.starts_with("250 2.0.0 Ok: queued as"), "{reply}");

    let messages = dest.wait_for_messages(1, WAIT).await;
    assert!(messages[0].data.ends_with(b"Subject: chunks\r\n\r\n.dot line\r\nend\r\n"));
}

#[tokio::test]
async fn health_and_metrics_served() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let _dest = Receiver::start(loopback(2), port, Script::new()).await.unwrap();
    let gateway = Gateway::start(Options::new(dns.addr, port)).await;

    let (status, body) = gateway.http_get("/healthz").await;
    assert!(status.contains("200"), "{status}");
    assert_eq!(body.trim(), "ok");

    send_message(gateway.smtp, "sender@src.example", &["rcpt@dest.example"], &simple_message("metrics")).await;
    gateway.wait_for_event("delivered", "rcpt@dest.example", WAIT).await;
    let (_, metrics) = gateway.http_get("/metrics").await;
    assert!(metrics.contains("baton_messages_received_total 1"), "{metrics}");
    assert!(
        metrics.contains("baton_delivery_recipients_total{pool=\"default\",result=\"delivered\",site=\"other\",source=\"default\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn unknown_config_key_named() {
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("bad.yaml");
    std::fs::write(&path, "smtp:\n  listen: [\"127.0.0.1:0\"]\n  relay_netwrks: []\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("relay_netwrks"), "{stderr}");
    assert!(stderr.contains("bad.yaml"), "{stderr}");
}

#[tokio::test]
async fn idn_addresses_sent_as_given() {
    // The zone has A-labels, as DNS does: bücher and müller.
    let zone = "xn--bcher-kva.example. MX 10 mx.xn--bcher-kva.example.\nmx.xn--bcher-kva.example. A 127.0.0.9\nxn--mller-kva.example. MX 10 mx.xn--mller-kva.example.\nmx.xn--mller-kva.example. A 127.0.0.10\n";
    let dns = TestDns::start(zone).await;
    let port = free_port_on(&[loopback(9), loopback(10)]);
    let modern = Receiver::start(loopback(9), port, Script::new()).await.unwrap();
    // A server without SMTPUTF8.
    let old = Receiver::start(loopback(10), port, Script::new().ehlo_reply("250-mx.old hello\n250 8BITMIME")).await.unwrap();
    let gateway = Gateway::start(Options::new(dns.addr, port)).await;

    let (mut client, _) = Client::connect(gateway.smtp).await;
    client.command("EHLO client.example").await;
    assert!(client.command("MAIL FROM:<app@src.example> SMTPUTF8").await.starts_with("250"));
    assert!(client.command("RCPT TO:<J\u{f6}rg@B\u{fc}cher.example>").await.starts_with("250"));
    assert!(client.command("RCPT TO:<user@m\u{fc}ller.example>").await.starts_with("250"));
    assert!(client.command("DATA").await.starts_with("354"));
    let reply = client.command("From: <app@src.example>\r\nSubject: idn\r\n\r\nbody\r\n.").await;
    assert!(reply.starts_with("250"), "{reply}");

    // Exactly as given where the server takes SMTPUTF8.
    let messages = modern.wait_for_messages(1, WAIT).await;
    assert_eq!(messages[0].rcpt_to, vec!["J\u{f6}rg@B\u{fc}cher.example".to_string()]);
    // A-labels for a server without it; the local part is ASCII.
    let messages = old.wait_for_messages(1, WAIT).await;
    assert_eq!(messages[0].rcpt_to, vec!["user@xn--mller-kva.example".to_string()]);

    // Without SMTPUTF8 a non-ASCII domain is rejected, never rewritten.
    client.command("RSET").await;
    assert!(client.command("MAIL FROM:<app@src.example>").await.starts_with("250"));
    let reply = client.command("RCPT TO:<user@m\u{fc}ller.example>").await;
    assert!(reply.starts_with("553 5.6.7"), "{reply}");
}
