//! MTA-STS at real servers: a policy published by TXT record and served
//! over HTTPS, MX hosts with certificates from a test CA, and delivery that
//! refuses clear text, untrusted certificates and unlisted MX hosts.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::dns::TestDns;
use common::gateway::{Gateway, Options, send_message};
use common::loopback;
use common::receiver::{Receiver, Script, free_port_on};
use common::tls::TestCa;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(30);

const CONTENT: &[u8] = b"From: <app@src.example>\r\nSubject: sts\r\n\r\nbody\r\n";

/// Serves `policy` at any path over HTTPS with a certificate for
/// `mta-sts.dest.example` from `ca`; returns the address.
async fn start_policy_server(ca: &TestCa, ip: std::net::IpAddr, policy: &'static str) -> SocketAddr {
    let acceptor = tokio_rustls::TlsAcceptor::from(ca.server_config("mta-sts.dest.example"));
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let mut request = Vec::new();
                let mut buffer = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buffer[..n]),
                    }
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{policy}",
                    policy.len()
                );
                let _ = tls.write_all(response.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    address
}

/// Starts DNS, the policy server and a gateway that trusts `ca`; the MX
/// host is mx.dest.example at 127.0.0.2 on `port`.
async fn start(ca: &TestCa, policy: &'static str, port: u16) -> (TestDns, Gateway) {
    let policy_server = start_policy_server(ca, loopback(4), policy).await;
    let zone = format!(
        "dest.example. MX 10 mx.dest.example.\nmx.dest.example. A 127.0.0.2\n_mta-sts.dest.example. TXT \"v=STSv1; id=1\"\nmta-sts.dest.example. A {}\n",
        policy_server.ip()
    );
    let dns = TestDns::start(&zone).await;
    let folder = tempfile::tempdir().unwrap();
    let ca_path = folder.path().join("ca.pem");
    ca.write(&ca_path);
    let mut options = Options::new(dns.addr, port);
    options.retry = "[1h]";
    options.delivery_extra = format!(
        "    mta_sts_port: {}\n    tls_ca_file: {}\n",
        policy_server.port(),
        ca_path.display()
    );
    options.folder = Some(folder);
    let gateway = Gateway::start(options).await;
    (dns, gateway)
}

const ENFORCE: &str = "version: STSv1\r\nmode: enforce\r\nmx: mx.dest.example\r\nmax_age: 86400\r\n";

#[tokio::test]
async fn enforced_policy_delivers_over_verified_tls() {
    let ca = TestCa::new();
    let port = free_port_on(&[loopback(2)]);
    let script = Script::new().name("mx.dest.example").tls_with(ca.server_config("mx.dest.example"));
    let receiver = Receiver::start(loopback(2), port, script).await.unwrap();
    let (_dns, gateway) = start(&ca, ENFORCE, port).await;

    let reply = send_message(gateway.smtp, "app@src.example", &["user@dest.example"], CONTENT).await;
    assert!(reply.starts_with("250"), "{reply}");
    let messages = receiver.wait_for_messages(1, WAIT).await;
    assert!(messages[0].tls);
    gateway.wait_for_event("delivered", "user@dest.example", WAIT).await;
    assert!(gateway.log().contains("MTA-STS policy fetched"), "{}", gateway.log());
}

#[tokio::test]
async fn enforced_policy_rejects_clear_text() {
    let ca = TestCa::new();
    let port = free_port_on(&[loopback(2)]);
    let receiver = Receiver::start(loopback(2), port, Script::new().name("mx.dest.example")).await.unwrap();
    let (_dns, gateway) = start(&ca, ENFORCE, port).await;

    send_message(gateway.smtp, "app@src.example", &["user@dest.example"], CONTENT).await;
    let event = gateway.wait_for_event("deferred", "user@dest.example", WAIT).await;
    let reply = event["reply"].as_str().unwrap();
    assert!(reply.starts_with("451 4.7.5"), "{reply}");
    assert!(reply.contains("MTA-STS policy of dest.example"), "{reply}");
    assert!(receiver.messages().is_empty());
}

#[tokio::test]
async fn enforced_policy_rejects_untrusted_certificate() {
    let ca = TestCa::new();
    let port = free_port_on(&[loopback(2)]);
    // Self-signed, not from the trusted CA.
    let script = Script::new().name("mx.dest.example").tls();
    let receiver = Receiver::start(loopback(2), port, script).await.unwrap();
    let (_dns, gateway) = start(&ca, ENFORCE, port).await;

    send_message(gateway.smtp, "app@src.example", &["user@dest.example"], CONTENT).await;
    let event = gateway.wait_for_event("deferred", "user@dest.example", WAIT).await;
    let reply = event["reply"].as_str().unwrap();
    assert!(reply.starts_with("451 4.7.5"), "{reply}");
    assert!(reply.contains("certificate"), "{reply}");
    assert!(receiver.messages().is_empty());
}

#[tokio::test]
async fn enforced_policy_rejects_unlisted_mx() {
    let ca = TestCa::new();
    let port = free_port_on(&[loopback(2)]);
    let script = Script::new().name("mx.dest.example").tls_with(ca.server_config("mx.dest.example"));
    let receiver = Receiver::start(loopback(2), port, script).await.unwrap();
    let policy = "version: STSv1\r\nmode: enforce\r\nmx: *.other.example\r\nmax_age: 86400\r\n";
    let (_dns, gateway) = start(&ca, policy, port).await;

    send_message(gateway.smtp, "app@src.example", &["user@dest.example"], CONTENT).await;
    let event = gateway.wait_for_event("deferred", "user@dest.example", WAIT).await;
    let reply = event["reply"].as_str().unwrap();
    assert!(reply.contains("no MX host of dest.example matches its MTA-STS policy"), "{reply}");
    assert!(receiver.messages().is_empty());
}

#[tokio::test]
async fn testing_mode_delivers_as_usual() {
    let ca = TestCa::new();
    let port = free_port_on(&[loopback(2)]);
    let receiver = Receiver::start(loopback(2), port, Script::new().name("mx.dest.example")).await.unwrap();
    let policy = "version: STSv1\r\nmode: testing\r\nmx: mx.dest.example\r\nmax_age: 86400\r\n";
    let (_dns, gateway) = start(&ca, policy, port).await;

    send_message(gateway.smtp, "app@src.example", &["user@dest.example"], CONTENT).await;
    let messages = receiver.wait_for_messages(1, WAIT).await;
    assert!(!messages[0].tls);
}
