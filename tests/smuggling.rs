//! SMTP smuggling: end-of-data markers that a lenient receiver would take
//! for `CRLF . CRLF`, sent to the real gateway over raw TCP, and
//! dot-stuffing on the way out to the receiving server.
//!
//! The gateway replies to a bare LF or bare CR in message data with `521`
//! and closes the connection, so a smuggled second message must never be read
//! as commands, whether the bytes arrive in one TCP write or in two.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::dns::TestDns;
use common::gateway::{Client, Gateway, Options, send_message};
use common::loopback;
use common::receiver::{Receiver, Script, free_port_on};

const WAIT: Duration = Duration::from_secs(20);

const ZONE: &str = r#"
dest.example.            MX 10 mx1.dest.example.
mx1.dest.example.        A 127.0.0.2
"#;

/// Every end-of-data look-alike that is not `CRLF . CRLF`.
const VARIANTS: [(&str, &[u8]); 7] = [
    ("LF . LF", b"\n.\n"),
    ("LF . CRLF", b"\n.\r\n"),
    ("CRLF . LF", b"\r\n.\n"),
    ("CR . CR", b"\r.\r"),
    ("CR . CRLF", b"\r.\r\n"),
    ("CRLF . CR", b"\r\n.\r"),
    ("LF . CR", b"\n.\r"),
];

/// Returns the data after `354`: a short message, the fake end `variant`,
/// a smuggled transaction, and the real end of data.
fn smuggling_payload(variant: &[u8]) -> Vec<u8> {
    let mut payload = b"Subject: legit\r\n\r\nhello".to_vec();
    payload.extend_from_slice(variant);
    payload.extend_from_slice(b"MAIL FROM:<evil@dest.example>\r\nRCPT TO:<smuggled@dest.example>\r\nDATA\r\n");
    payload.extend_from_slice(b"Subject: smuggled\r\n\r\nevil\r\n.\r\n");
    payload
}

/// Opens a session and runs EHLO, MAIL, RCPT and DATA up to `354`.
async fn open_data(gateway: SocketAddr) -> TcpStream {
    let (mut client, greeting) = Client::connect(gateway).await;
    assert!(greeting.starts_with("220"), "greeting: {greeting}");
    let ehlo = client.command("EHLO client.test.example").await;
    assert!(ehlo.starts_with("250"), "EHLO: {ehlo}");
    let mail = client.command("MAIL FROM:<sender@dest.example>").await;
    assert!(mail.starts_with("250"), "MAIL: {mail}");
    let rcpt = client.command("RCPT TO:<rcpt@dest.example>").await;
    assert!(rcpt.starts_with("250"), "RCPT: {rcpt}");
    let data = client.command("DATA").await;
    assert!(data.starts_with("354"), "DATA: {data}");
    client.into_stream()
}

/// Writes `parts` as separate TCP writes, with a pause between them so the
/// gateway reads each part on its own, and returns everything the gateway
/// sends until it closes. A write or read that fails because the gateway
/// already closed ends the exchange. When the gateway keeps the connection
/// open, the output ends with `<still open>`.
async fn send_parts(stream: TcpStream, parts: &[&[u8]]) -> String {
    let (mut reader, mut writer) = stream.into_split();
    let reading = tokio::spawn(async move {
        let mut received = Vec::new();
        let mut buffer = [0u8; 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(5), reader.read(&mut buffer)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => received.extend_from_slice(&buffer[..n]),
                Err(_) => {
                    received.extend_from_slice(b"<still open>");
                    break;
                }
            }
        }
        received
    });
    for (index, part) in parts.iter().enumerate() {
        if index > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if writer.write_all(part).await.is_err() {
            break;
        }
    }
    let received = reading.await.expect("reader task");
    String::from_utf8_lossy(&received).into_owned()
}

/// Checks that the output after `354` is one `521 5.5.2` reply and nothing
/// else: no `250` for the legitimate message and no reply to a smuggled
/// command.
fn assert_rejected(output: &str, case: &str) {
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(lines.len(), 1, "{case}: expected one reply, got {output:?}");
    assert!(lines[0].starts_with("521 5.5.2 "), "{case}: expected 521 5.5.2, got {output:?}");
}

/// Sends one legitimate message, waits until it arrives and checks that it
/// is the only message the gateway ever accepted or delivered.
async fn assert_only_control_message(gateway: &Gateway, receiver: &Receiver) {
    let control = b"Subject: control\r\n\r\nafter the attacks\r\n";
    let reply = send_message(gateway.smtp, "sender@dest.example", &["control@dest.example"], control).await;
    assert!(reply.starts_with("250 "), "control message: {reply}");
    let messages = receiver.wait_for_messages(1, WAIT).await;
    gateway.wait_for_event("delivered", "control@dest.example", WAIT).await;
    assert_eq!(messages.len(), 1, "receiver got more than the control message: {messages:#?}");
    assert_eq!(messages[0].rcpt_to, vec!["control@dest.example"]);
    assert!(messages[0].data.ends_with(control));
    assert_eq!(gateway.received_count(1).await, 1, "events: {:#?}", gateway.events());
    let commands = receiver.commands();
    assert!(
        !commands.iter().any(|command| command.contains("smuggled") || command.contains("evil")),
        "smuggled command reached the receiver: {commands:?}"
    );
}

async fn start() -> (TestDns, Receiver, Gateway) {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let receiver = Receiver::start(loopback(2), port, Script::new()).await.unwrap();
    let gateway = Gateway::start(Options::new(dns.addr, port)).await;
    (dns, receiver, gateway)
}

#[tokio::test]
async fn smuggling_in_one_write_rejected() {
    let (_dns, receiver, gateway) = start().await;

    for (name, variant) in VARIANTS {
        let stream = open_data(gateway.smtp).await;
        let payload = smuggling_payload(variant);
        let output = send_parts(stream, &[&payload]).await;
        assert_rejected(&output, name);
    }

    assert_eq!(gateway.received_count(0).await, 0, "events: {:#?}", gateway.events());
    assert_only_control_message(&gateway, &receiver).await;
}

#[tokio::test]
async fn smuggling_split_at_every_byte_rejected() {
    let (_dns, receiver, gateway) = start().await;

    let mut cases = 0;
    for (name, variant) in VARIANTS {
        let payload = smuggling_payload(variant);
        for split in 1..payload.len() {
            let stream = open_data(gateway.smtp).await;
            let (first, second) = payload.split_at(split);
            let output = send_parts(stream, &[first, second]).await;
            assert_rejected(&output, &format!("{name}, split after byte {split}"));
            cases += 1;
        }
    }

    assert!(cases > 7 * 60, "only {cases} split cases ran");
    assert_eq!(gateway.received_count(0).await, 0, "events: {:#?}", gateway.events());
    assert_only_control_message(&gateway, &receiver).await;
}

/// Body lines that are `.`, start with `.` or consist of dots only. A
/// relay that does not dot-stuff them ends the data early at the receiver,
/// and one that stuffs twice adds dots.
fn dotted_message() -> Vec<u8> {
    let mut message = String::new();
    message.push_str("From: <sender@dest.example>\r\n");
    message.push_str("To: <rcpt@dest.example>\r\n");
    message.push_str("Subject: dots\r\n");
    message.push_str("\r\n");
    message.push_str(".\r\n");
    message.push_str("..\r\n");
    message.push_str("...\r\n");
    message.push_str(".leading dot\r\n");
    message.push_str("..two leading dots\r\n");
    message.push_str(". dot and space\r\n");
    message.push_str("a dot . in the middle\r\n");
    message.push_str("\r\n");
    message.push_str(".\r\n");
    message.push_str("MAIL FROM:<not-a-command@dest.example>\r\n");
    message.push_str(".\r\n");
    message.into_bytes()
}

/// Checks that every LF in `data` is preceded by CR and every CR followed
/// by LF.
fn assert_crlf_only(data: &[u8]) {
    for (index, &byte) in data.iter().enumerate() {
        if byte == b'\n' {
            assert!(index > 0, "bare LF at byte 0");
            assert_eq!(data[index - 1], b'\r', "bare LF at byte {index}");
        }
        if byte == b'\r' {
            assert_eq!(data.get(index + 1), Some(&b'\n'), "bare CR at byte {index}");
        }
    }
}

#[tokio::test]
async fn dot_lines_arrive_byte_exact_after_data() {
    let (_dns, receiver, gateway) = start().await;

    let content = dotted_message();
    let reply = send_message(gateway.smtp, "sender@dest.example", &["rcpt@dest.example"], &content).await;
    assert!(reply.starts_with("250 "), "{reply}");

    let messages = receiver.wait_for_messages(1, WAIT).await;
    let received = &messages[0];
    assert!(!received.bare_lf, "receiver saw a bare LF");
    assert_crlf_only(&received.data);
    assert!(
        received.data.ends_with(&content),
        "content changed in transit:\n{}",
        received.data_str()
    );
    assert_eq!(receiver.messages().len(), 1);
}

#[tokio::test]
async fn dot_lines_arrive_byte_exact_after_bdat() {
    let (_dns, receiver, gateway) = start().await;

    // BDAT carries the content unstuffed, so the gateway alone is
    // responsible for stuffing it on the way out. The content ends in a
    // `.` line without CRLF, which the gateway completes.
    let mut content = dotted_message();
    content.extend_from_slice(b".");
    let (mut client, greeting) = Client::connect(gateway.smtp).await;
    assert!(greeting.starts_with("220"), "{greeting}");
    assert!(client.command("EHLO client.test.example").await.starts_with("250"));
    assert!(client.command("MAIL FROM:<sender@dest.example>").await.starts_with("250"));
    assert!(client.command("RCPT TO:<rcpt@dest.example>").await.starts_with("250"));
    client.write(format!("BDAT {} LAST\r\n", content.len()).as_bytes()).await;
    client.write(&content).await;
    let reply = client.read_reply().await;
    assert!(reply.starts_with("250 "), "{reply}");
    client.command("QUIT").await;

    let messages = receiver.wait_for_messages(1, WAIT).await;
    let received = &messages[0];
    assert!(!received.bare_lf, "receiver saw a bare LF");
    assert_crlf_only(&received.data);
    let mut expected = content.clone();
    expected.extend_from_slice(b"\r\n");
    assert!(
        received.data.ends_with(&expected),
        "content changed in transit:\n{}",
        received.data_str()
    );
    assert_eq!(receiver.messages().len(), 1);
}
