//! Implicit TLS listeners (RFC 8314): TLS from the first byte, TLS 1.2 and
//! 1.3, and certificates reloaded without a restart.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::dns::TestDns;
use common::gateway::{Gateway, Options};
use common::loopback;
use common::receiver::{Receiver, Script, free_port_on};
use common::tls::{TlsClient, accept_any_connector, accept_any_connector_with_versions, write_certificate};

const WAIT: Duration = Duration::from_secs(20);

const ZONE: &str = r#"
dest.example.            MX 10 mx1.dest.example.
mx1.dest.example.        A 127.0.0.2
"#;

/// Starts a gateway with a plain listener (STARTTLS) and an implicit TLS
/// listener; returns it with the implicit TLS address.
async fn start_implicit_gateway(dns: &TestDns, port: u16) -> (Gateway, SocketAddr) {
    let folder = tempfile::tempdir().expect("temporary folder");
    let (certificate, key) = write_certificate(folder.path(), "mta.test.example");
    let implicit: SocketAddr = SocketAddr::new(loopback(1), free_port_on(&[loopback(1)]));
    let mut options = Options::new(dns.addr, port);
    options.smtp_extra = format!(
        "    tls:\n        certificate: {}\n        key: {}\n    implicit_tls_listen: [\"{implicit}\"]\n",
        certificate.display(),
        key.display()
    );
    options.folder = Some(folder);
    (Gateway::start(options).await, implicit)
}

/// Replaces the certificate and key in `folder` with a new pair, each by
/// rename, as renewal tools do.
fn renew_certificate(folder: &Path) -> CertificateDer<'static> {
    let staging = folder.join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let (certificate, key) = write_certificate(&staging, "mta.test.example");
    let der = read_certificate(&certificate);
    std::fs::rename(&key, folder.join("tls-key.pem")).unwrap();
    std::fs::rename(&certificate, folder.join("tls-certificate.pem")).unwrap();
    der
}

fn read_certificate(path: &Path) -> CertificateDer<'static> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_file(path).expect("read certificate")
}

/// Connects to the implicit TLS listener and returns the certificate the
/// gateway presented.
async fn presented_certificate(address: SocketAddr) -> CertificateDer<'static> {
    let (mut client, greeting) = TlsClient::connect_implicit(loopback(1), address, &accept_any_connector())
        .await
        .expect("TLS handshake");
    assert!(greeting.starts_with("220 "), "greeting: {greeting}");
    client.command("QUIT").await;
    client.peer_certificate()
}

#[tokio::test]
async fn implicit_tls_relays_message() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let receiver = Receiver::start(loopback(2), port, Script::new()).await.unwrap();
    let (gateway, implicit) = start_implicit_gateway(&dns, port).await;

    let (mut client, greeting) = TlsClient::connect_implicit(loopback(1), implicit, &accept_any_connector())
        .await
        .expect("TLS handshake on the implicit TLS listener");
    assert!(greeting.starts_with("220 mta.test.example"), "greeting: {greeting}");
    let ehlo = client.command("EHLO client.test.example").await;
    assert!(ehlo.starts_with("250-mta.test.example"), "EHLO: {ehlo}");
    assert!(!ehlo.contains("STARTTLS"), "STARTTLS offered under implicit TLS: {ehlo}");
    let starttls = client.command("STARTTLS").await;
    assert!(starttls.starts_with("503 5.5.1"), "STARTTLS under implicit TLS: {starttls}");
    assert_eq!(client.command("MAIL FROM:<sender@dest.example>").await, "250 2.1.0 Ok");
    assert!(client.command("RCPT TO:<rcpt@dest.example>").await.starts_with("250 "));
    assert!(client.command("DATA").await.starts_with("354"));
    let queued = client.command("Subject: implicit TLS\r\n\r\nhello\r\n.").await;
    assert!(queued.starts_with("250 2.0.0 Ok: queued as "), "{queued}");
    client.command("QUIT").await;

    let messages = receiver.wait_for_messages(1, WAIT).await;
    let data = messages[0].data_str();
    assert!(data.contains("with ESMTPS"), "Received header does not record TLS:\n{data}");

    // A client that speaks SMTP in clear text to the TLS port gets no
    // SMTP reply: the handshake fails and the connection closes.
    let mut plain = tokio::net::TcpStream::connect(implicit).await.unwrap();
    plain.write_all(b"EHLO client.test.example\r\n").await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, plain.read_to_end(&mut response))
        .await
        .expect("connection closed within the timeout")
        .unwrap();
    let text = String::from_utf8_lossy(&response);
    assert!(!text.contains("220"), "SMTP greeting in clear text on the TLS port: {text:?}");
    assert!(!text.contains("250"), "SMTP reply in clear text on the TLS port: {text:?}");
    let deadline = Instant::now() + WAIT;
    while !gateway.log().contains("TLS handshake failed") {
        assert!(Instant::now() < deadline, "failed handshake not logged; log:\n{}", gateway.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn tls_twelve_and_thirteen_accepted() {
    let dns = TestDns::start(ZONE).await;
    let (_gateway, implicit) = start_implicit_gateway(&dns, 25).await;

    for (version, expected) in [
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let (mut client, greeting) = TlsClient::connect_implicit(loopback(1), implicit, &accept_any_connector_with_versions(&[version]))
            .await
            .unwrap_or_else(|error| panic!("{expected:?} handshake failed: {error}"));
        assert!(greeting.starts_with("220 "), "{expected:?} greeting: {greeting}");
        assert_eq!(client.protocol_version(), expected);
        client.command("QUIT").await;
    }
}

#[tokio::test]
async fn certificate_reloaded_without_restart() {
    let dns = TestDns::start(ZONE).await;
    let (gateway, implicit) = start_implicit_gateway(&dns, 25).await;
    let folder = gateway.folder.path().to_path_buf();
    let first = read_certificate(&folder.join("tls-certificate.pem"));
    assert_eq!(presented_certificate(implicit).await, first);

    // A renewed certificate is picked up from the file change.
    let second = renew_certificate(&folder);
    assert_ne!(first, second);
    let deadline = Instant::now() + WAIT;
    while presented_certificate(implicit).await != second {
        assert!(Instant::now() < deadline, "renewed certificate not in use after {WAIT:?}; log:\n{}", gateway.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // STARTTLS on the plain listener uses the same certificate.
    let starttls = TlsClient::starttls_from(loopback(1), gateway.smtp).await;
    assert_eq!(starttls.peer_certificate(), second);

    // A broken certificate file fails the reload, on SIGHUP as on change,
    // and the previous certificate stays in use.
    std::fs::write(folder.join("tls-certificate.pem"), "not a certificate\n").unwrap();
    gateway.signal("-HUP");
    let deadline = Instant::now() + WAIT;
    while !gateway.log().contains("TLS certificate reload failed; keeping the previous certificate") {
        assert!(Instant::now() < deadline, "failed reload not logged; log:\n{}", gateway.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = gateway.log();
    let failure = log
        .lines()
        .find(|line| line.contains("TLS certificate reload failed"))
        .unwrap();
    assert!(failure.contains("tls-certificate.pem"), "the log does not name the file: {failure}");
    assert_eq!(presented_certificate(implicit).await, second);

    // Fixing the file brings reloads back.
    let third = renew_certificate(&folder);
    gateway.signal("-HUP");
    let deadline = Instant::now() + WAIT;
    while presented_certificate(implicit).await != third {
        assert!(Instant::now() < deadline, "certificate not reloaded after SIGHUP; log:\n{}", gateway.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn implicit_tls_without_certificate_rejected() {
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("baton.yaml");
    std::fs::write(&path, "smtp:\n  implicit_tls_listen: [\"127.0.0.1:0\"]\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["policy", "check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("smtp.implicit_tls_listen needs a certificate"), "{stderr}");
}
