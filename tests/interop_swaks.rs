//! Interop with swaks, a widely used SMTP test client, as the sending
//! application: plain, pipelined, with an attachment, and over STARTTLS.
//! `.ci/run` installs swaks; these tests fail when it is missing.

mod common;

use std::process::Command;
use std::time::Duration;

use common::dns::TestDns;
use common::gateway::{Gateway, Options};
use common::loopback;
use common::receiver::{Receiver, Script, free_port_on};

const WAIT: Duration = Duration::from_secs(20);
const ZONE: &str = "dest.example. MX 10 mx.dest.example.\nmx.dest.example. A 127.0.0.2\n";

fn swaks(args: &[&str]) -> std::process::Output {
    Command::new("swaks")
        .args(args)
        .output()
        .expect("swaks is not installed; run .ci/run or apt-get install swaks libnet-ssleay-perl")
}

#[tokio::test]
async fn swaks_attachment_relayed() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let receiver = Receiver::start(loopback(2), port, Script::new()).await.unwrap();
    let gateway = Gateway::start(Options::new(dns.addr, port)).await;

    let folder = tempfile::tempdir().unwrap();
    let attachment = folder.path().join("report.csv");
    std::fs::write(&attachment, "id,value\n1,ünïcödé\n2,.leading dot\n").unwrap();
    let server = gateway.smtp.to_string();
    let output = swaks(&[
        "--server", &server,
        "--from", "app@src.example",
        "--to", "user@dest.example",
        "--header", "Subject: swaks attachment",
        "--body", "See the attached report.",
        "--attach", attachment.to_str().unwrap(),
        "--pipeline",
    ]);
    let transcript = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "swaks failed:\n{transcript}");
    assert!(transcript.contains("<-  250 2.0.0 Ok: queued as"), "{transcript}");

    let messages = receiver.wait_for_messages(1, WAIT).await;
    let text = messages[0].data_str();
    assert!(text.contains("Subject: swaks attachment\r\n"), "{text}");
    assert!(text.contains("See the attached report."), "{text}");
    assert!(text.contains("filename=\"report.csv\"\r\n"), "{text}");
    assert!(text.contains("aWQsdmFsdWUKMSzDvG7Dr2PDtmTDqQoyLC5sZWFkaW5nIGRvdAo=\r\n"), "{text}");
    assert!(!messages[0].bare_lf);
}

#[tokio::test]
async fn swaks_starttls_intake() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let receiver = Receiver::start(loopback(2), port, Script::new()).await.unwrap();

    let folder = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["mta.test.example".to_string()]).unwrap();
    let certificate = folder.path().join("cert.pem");
    let key = folder.path().join("key.pem");
    std::fs::write(&certificate, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let mut options = Options::new(dns.addr, port);
    options.smtp_extra = format!(
        "    tls:\n        certificate: {}\n        key: {}",
        certificate.display(),
        key.display()
    );
    let gateway = Gateway::start(options).await;

    let server = gateway.smtp.to_string();
    let output = swaks(&[
        "--server", &server,
        "--from", "app@src.example",
        "--to", "user@dest.example",
        "--tls",
        "--header", "Subject: over tls",
    ]);
    let transcript = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "swaks failed:\n{transcript}");
    assert!(transcript.contains("TLS started"), "{transcript}");

    let messages = receiver.wait_for_messages(1, WAIT).await;
    let text = messages[0].data_str();
    assert!(text.contains("with ESMTPS id"), "Received header must record TLS: {text}");
}
