//! STARTTLS command and reply injection (RFC 3207 section 4.2): plaintext
//! sent after STARTTLS, in the same TCP segment, must not be taken as
//! protected input once TLS is up. Tested on both sides of the gateway: its
//! SMTP server and its delivery client.

mod common;

use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use common::dns::TestDns;
use common::gateway::{Gateway, Options};
use common::loopback;
use common::receiver::{Receiver, Script, free_port_on};
use common::tls::{accept_any_connector, write_certificate};

const WAIT: Duration = Duration::from_secs(20);

const ZONE: &str = r#"
dest.example.            MX 10 mx1.dest.example.
mx1.dest.example.        A 127.0.0.2
"#;

/// Starts a gateway that offers STARTTLS with a self-signed certificate.
async fn start_tls_gateway(dns: &TestDns, port: u16) -> Gateway {
    let folder = tempfile::tempdir().expect("temporary folder");
    let (certificate, key) = write_certificate(folder.path(), "mta.test.example");
    let mut options = Options::new(dns.addr, port);
    options.smtp_extra = format!(
        "    tls:\n        certificate: {}\n        key: {}\n",
        certificate.display(),
        key.display()
    );
    options.folder = Some(folder);
    Gateway::start(options).await
}

/// Reads one reply, all lines joined by newlines, from a buffered stream.
async fn read_reply<S: tokio::io::AsyncRead + Unpin>(reader: &mut BufReader<S>) -> String {
    let mut reply = String::new();
    loop {
        let mut line = String::new();
        let read = tokio::time::timeout(WAIT, reader.read_line(&mut line))
            .await
            .expect("reply within the timeout")
            .expect("read reply");
        assert!(read > 0, "connection closed after {reply:?}");
        reply.push_str(&line);
        if line.len() < 4 || line.as_bytes()[3] != b'-' {
            return reply.trim_end().to_string();
        }
    }
}

async fn command<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut BufReader<S>,
    line: &str,
) -> String {
    stream.get_mut().write_all(format!("{line}\r\n").as_bytes()).await.expect("write command");
    read_reply(stream).await
}

/// Connects in plaintext and sends EHLO; returns the stream ready for
/// STARTTLS.
async fn connect_plain(gateway: &Gateway) -> BufReader<TcpStream> {
    let stream = TcpStream::connect(gateway.smtp).await.expect("connect to baton");
    let mut stream = BufReader::new(stream);
    let greeting = read_reply(&mut stream).await;
    assert!(greeting.starts_with("220 "), "greeting: {greeting}");
    let ehlo = command(&mut stream, "EHLO client.test.example").await;
    assert!(ehlo.lines().any(|line| line == "250-STARTTLS" || line == "250 STARTTLS"), "EHLO: {ehlo}");
    stream
}

#[tokio::test]
async fn pipelined_command_after_starttls_discarded() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let receiver = Receiver::start(loopback(2), port, Script::new()).await.unwrap();
    let gateway = start_tls_gateway(&dns, port).await;

    let mut plain = connect_plain(&gateway).await;
    plain
        .get_mut()
        .write_all(b"STARTTLS\r\nMAIL FROM:<injected@dest.example>\r\n")
        .await
        .unwrap();
    let ready = read_reply(&mut plain).await;
    assert!(ready.starts_with("220 "), "STARTTLS: {ready}");
    assert!(plain.buffer().is_empty(), "plaintext after 220: {:?}", String::from_utf8_lossy(plain.buffer()));

    let server_name = ServerName::try_from("mta.test.example").unwrap();
    let tls = accept_any_connector()
        .connect(server_name, plain.into_inner())
        .await
        .expect("TLS handshake");
    let mut tls = BufReader::new(tls);

    // A server that kept the pipelined MAIL would reply to it now, before
    // any command was sent over TLS.
    let mut early = [0u8; 512];
    match tokio::time::timeout(Duration::from_secs(1), tls.read(&mut early)).await {
        Err(_) => {}
        Ok(Ok(n)) => panic!(
            "reply to the injected command over TLS: {:?}",
            String::from_utf8_lossy(&early[..n])
        ),
        Ok(Err(error)) => panic!("TLS session failed: {error}"),
    }

    let ehlo = command(&mut tls, "EHLO client.test.example").await;
    assert!(ehlo.starts_with("250-mta.test.example"), "EHLO over TLS: {ehlo}");
    assert!(!ehlo.contains("STARTTLS"), "STARTTLS offered again under TLS: {ehlo}");
    let mail = command(&mut tls, "MAIL FROM:<sender@dest.example>").await;
    assert_eq!(mail, "250 2.1.0 Ok", "a transaction from the injected MAIL is open");
    let rcpt = command(&mut tls, "RCPT TO:<rcpt@dest.example>").await;
    assert!(rcpt.starts_with("250 "), "RCPT: {rcpt}");
    let data = command(&mut tls, "DATA").await;
    assert!(data.starts_with("354 "), "DATA: {data}");
    let queued = command(&mut tls, "Subject: over TLS\r\n\r\nhello\r\n.").await;
    assert!(queued.starts_with("250 2.0.0 Ok: queued as "), "{queued}");
    let quit = command(&mut tls, "QUIT").await;
    assert!(quit.starts_with("221 "), "QUIT: {quit}");

    let messages = receiver.wait_for_messages(1, WAIT).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].mail_from, "sender@dest.example");
    assert_eq!(gateway.received_count(1).await, 1, "events: {:#?}", gateway.events());
    assert!(
        gateway.log().contains("client sent data after STARTTLS before the TLS handshake; discarded"),
        "the discarded bytes are not logged"
    );
}

#[tokio::test]
async fn plaintext_during_handshake_fails_it() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let _receiver = Receiver::start(loopback(2), port, Script::new()).await.unwrap();
    let gateway = start_tls_gateway(&dns, port).await;

    // The command arrives after the gateway read STARTTLS and sent 220, so
    // it is not in the gateway's buffer but comes where the TLS
    // ClientHello is expected.
    let mut plain = connect_plain(&gateway).await;
    plain.get_mut().write_all(b"STARTTLS\r\n").await.unwrap();
    let ready = read_reply(&mut plain).await;
    assert!(ready.starts_with("220 "), "STARTTLS: {ready}");
    plain
        .get_mut()
        .write_all(b"MAIL FROM:<injected@dest.example>\r\n")
        .await
        .unwrap();

    let server_name = ServerName::try_from("mta.test.example").unwrap();
    let handshake = accept_any_connector().connect(server_name, plain.into_inner());
    let result = tokio::time::timeout(WAIT, handshake).await.expect("handshake ends within the timeout");
    assert!(result.is_err(), "TLS handshake succeeded after plaintext injection");

    // The gateway still serves other clients.
    let plain = connect_plain(&gateway).await;
    drop(plain);
    assert_eq!(gateway.received_count(0).await, 0);
}

#[tokio::test]
async fn injected_reply_after_220_ignored() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    // The receiver sends its 220 and an extra reply in one write, as a
    // man in the middle injecting a reply would. A client that keeps the
    // extra line reads it as the reply to its EHLO over TLS, and every
    // later reply goes to the wrong command.
    let script = Script::new().tls().starttls_reply("220 2.0.0 go ahead\n250 2.0.0 injected");
    let receiver = Receiver::start(loopback(2), port, script).await.unwrap();
    let gateway = Gateway::start(Options::new(dns.addr, port)).await;

    let (mut client, greeting) = common::gateway::Client::connect(gateway.smtp).await;
    assert!(greeting.starts_with("220"), "{greeting}");
    let reply = client
        .send("sender@dest.example", &["rcpt@dest.example"], b"Subject: injected\r\n\r\nhello\r\n")
        .await;
    assert!(reply.starts_with("250 "), "{reply}");
    client.command("QUIT").await;

    let delivered = gateway.wait_for_event("delivered", "rcpt@dest.example", WAIT).await;
    assert_eq!(delivered["reply"], "250 2.0.0 queued", "delivered on a reply meant for another command");
    let messages = receiver.wait_for_messages(1, WAIT).await;
    assert_eq!(messages.len(), 1);
    assert!(messages[0].tls, "message was not sent under TLS");
    assert!(messages[0].data.ends_with(b"Subject: injected\r\n\r\nhello\r\n"));

    let commands = receiver.commands();
    let verbs: Vec<String> = commands
        .iter()
        .map(|command| command.split(' ').next().unwrap_or("").to_ascii_uppercase())
        .collect();
    let expected = ["EHLO", "STARTTLS", "EHLO", "MAIL", "RCPT", "DATA"];
    assert!(verbs.len() >= expected.len(), "commands: {commands:?}");
    assert_eq!(&verbs[..expected.len()], expected, "commands: {commands:?}");
    assert!(
        gateway.log().contains("server sent data after its 220 reply to STARTTLS; discarded"),
        "the discarded bytes are not logged"
    );
}
