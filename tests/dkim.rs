//! DKIM signing through the whole gateway, verified by two independent
//! implementations: dkimpy (`tests/dkim_verify.py`, Debian's python3-dkim)
//! and mail-auth's verifier, both reading keys from the tests' DNS server.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::dns::TestDns;
use common::gateway::{Client, Gateway, Options, send_message};
use common::keys::{Prepared, keygen, prepare, write_senders};
use common::loopback;
use common::receiver::{Receiver, Script, free_port_on};

const WAIT: Duration = Duration::from_secs(20);
const BASE_ZONE: &str = "dest.example. MX 10 mx.dest.example.\nmx.dest.example. A 127.0.0.2\n";

/// Verifies every signature with dkimpy; returns its report lines. The
/// child runs asynchronously so this runtime's DNS server can answer it.
async fn dkimpy_verify(dns: &TestDns, message: &[u8]) -> (bool, String) {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("/usr/bin/python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/dkim_verify.py"))
        .args(["--dns", &dns.addr.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 with dkimpy is needed; run .ci/run or apt-get install python3-dkim python3-dnspython");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(message).await.unwrap();
    drop(stdin);
    let output = child.wait_with_output().await.unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), report)
}

/// Verifies every signature with mail-auth; returns one result per signature.
async fn mail_auth_verify(dns: &TestDns, message: &[u8]) -> Vec<String> {
    use mail_auth::hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
    let mut udp = ConnectionConfig::udp();
    udp.port = dns.addr.port();
    let mut tcp = ConnectionConfig::tcp();
    tcp.port = dns.addr.port();
    let server = NameServerConfig::new(dns.addr.ip(), true, vec![udp, tcp]);
    let authenticator =
        mail_auth::MessageAuthenticator::new(ResolverConfig::from_name_servers(vec![server]), ResolverOpts::default())
            .unwrap();
    let parsed = mail_auth::AuthenticatedMessage::parse(message).expect("parsable message");
    authenticator
        .verify_dkim(mail_auth::Parameters::new(&parsed))
        .await
        .iter()
        .map(|output| format!("{:?}", output.result()))
        .collect()
}

fn signature_count(message: &[u8]) -> usize {
    String::from_utf8_lossy(message)
        .lines()
        .filter(|line| line.to_ascii_lowercase().starts_with("dkim-signature:"))
        .count()
}

const TWO_SELECTORS: &str = "domains:\n  src.example:\n    selectors: [rsa1, ed1]\n";

async fn start(prepared: Prepared, dns: &TestDns, port: u16) -> Gateway {
    let mut options = Options::new(dns.addr, port);
    options.folder = Some(prepared.folder);
    Gateway::start(options).await
}

#[test]
fn keygen_key_mode_and_record() {
    let folder = tempfile::tempdir().unwrap();
    let line = keygen(folder.path(), "src.example", "s1", "rsa-2048");
    assert!(line.starts_with("s1._domainkey.src.example. TXT \"v=DKIM1; k=rsa; p=MII"), "{line}");
    let key = folder.path().join("keys/src.example/s1.pem");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let folder_mode = std::fs::metadata(key.parent().unwrap()).unwrap().permissions().mode() & 0o777;
    assert_eq!(folder_mode, 0o700);

    let ed = keygen(folder.path(), "src.example", "e1", "ed25519");
    assert!(ed.contains("k=ed25519; p="), "{ed}");
}

#[test]
fn keygen_keeps_existing_key() {
    let folder = tempfile::tempdir().unwrap();
    keygen(folder.path(), "src.example", "s1", "ed25519");
    let before = std::fs::read(folder.path().join("keys/src.example/s1.pem")).unwrap();
    let config = folder.path().join("keygen.yaml");
    let output = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["--config", config.to_str().unwrap(), "dkim", "keygen", "--domain", "src.example", "--selector", "s1"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("already exists"));
    assert_eq!(std::fs::read(folder.path().join("keys/src.example/s1.pem")).unwrap(), before);
}

#[tokio::test]
async fn relayed_mail_has_two_valid_signatures() {
    let prepared = prepare(BASE_ZONE, &[("src.example", "rsa1", "rsa-2048"), ("src.example", "ed1", "ed25519")]);
    write_senders(prepared.folder.path(), TWO_SELECTORS);
    let dns = TestDns::start(&prepared.zone).await;
    let port = free_port_on(&[loopback(2)]);
    let receiver = Receiver::start(loopback(2), port, Script::new()).await.unwrap();
    let gateway = start(prepared, &dns, port).await;

    let content = b"From: App <app@src.example>\r\nTo: <user@dest.example>\r\nSubject: signed\r\nDate: Fri, 04 Dec 2026 10:00:00 +0000\r\nMessage-ID: <1@src.example>\r\n\r\nHello.\r\n";
    let reply = send_message(gateway.smtp, "bounce@src.example", &["user@dest.example"], content).await;
    assert!(reply.starts_with("250"), "{reply}");
    let message = receiver.wait_for_messages(1, WAIT).await.remove(0);

    assert_eq!(signature_count(&message.data), 2);
    let text = message.data_str();
    assert!(text.contains("a=rsa-sha256"), "{text}");
    assert!(text.contains("a=ed25519-sha256"), "{text}");
    let (ok, report) = dkimpy_verify(&dns, &message.data).await;
    assert!(ok, "dkimpy: {report}");
    assert_eq!(report.matches(": pass").count(), 2, "{report}");
    let results = mail_auth_verify(&dns, &message.data).await;
    assert_eq!(results, vec!["Pass", "Pass"], "mail-auth");

    let received = gateway.wait_for_event("received", "user@dest.example", WAIT).await;
    assert_eq!(received["dkim_domain"], "src.example");
}

/// Messages covering the hard cases of DKIM canonicalization and MIME.
fn corpus() -> Vec<(&'static str, Vec<u8>)> {
    let head = "From: App <app@src.example>\r\nTo: <user@dest.example>\r\nDate: Fri, 04 Dec 2026 10:00:00 +0000\r\n";
    let with = |extra_headers: &str, body: &str| format!("{head}{extra_headers}\r\n{body}").into_bytes();
    let long_line = "word ".repeat(190);
    let attachment: String = (0..40)
        .map(|i| format!("{}\r\n", "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAx".chars().cycle().skip(i).take(76).collect::<String>()))
        .collect();
    vec![
        ("plain", with("Subject: plain\r\n", "Hello.\r\n")),
        ("empty body", with("Subject: empty body\r\n", "")),
        ("only blank lines", with("Subject: blank lines\r\n", "\r\n\r\n\r\n")),
        ("trailing blank lines", with("Subject: trailing\r\n", "text\r\n\r\n\r\n")),
        ("trailing whitespace", with("Subject: ws\r\n", "text   \r\nmore\t\t\r\n  \r\n")),
        ("whitespace-only trailing lines", with("Subject: ws lines\r\n", "text\r\n \r\n\t\r\n")),
        ("folded subject", with("Subject: a subject\r\n that is folded\r\n\tover three lines\r\n", "body\r\n")),
        ("folded after colon", with("Subject:\r\n folded right after the colon\r\n", "body\r\n")),
        ("utf-8 header", with("Subject: Grüße aus Köln – 日本語\r\n", "body\r\n")),
        ("8-bit body", with("Subject: 8bit\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n", "Ça va? Ünïcödé ✓\r\n")),
        ("leading dots", with("Subject: dots\r\n", ".one dot\r\n..two dots\r\n.\r\n...\r\n")),
        ("duplicate subject", with("Subject: first\r\nSubject: second\r\n", "body\r\n")),
        ("duplicate to", with("Subject: two to\r\nTo: <other@dest.example>\r\n", "body\r\n")),
        ("long header", with(&format!("Subject: long\r\nX-Long: {}\r\n\t{}\r\n", "x".repeat(900), "y".repeat(900)), "body\r\n")),
        ("long body lines", with("Subject: long lines\r\n", &format!("{long_line}\r\n{long_line}\r\n"))),
        ("mixed case names", with("SUBJECT: upper\r\nmessage-id: <lower@src.example>\r\n", "body\r\n")),
        ("spaces in header", with("Subject:    many   spaces   \r\n", "body\r\n")),
        ("list unsubscribe", with("Subject: news\r\nList-Unsubscribe: <https://src.example/u/1>, <mailto:u@src.example>\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n", "news\r\n")),
        ("multipart alternative", with(
            "Subject: alt\r\nMIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=\"alt\"\r\n",
            "--alt\r\nContent-Type: text/plain\r\n\r\nplain\r\n--alt\r\nContent-Type: text/html\r\n\r\n<p>html</p>\r\n--alt--\r\n",
        )),
        ("multipart attachment", with(
            "Subject: attachment\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"mix\"\r\n",
            &format!("--mix\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n--mix\r\nContent-Type: application/octet-stream; name=\"a.bin\"\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"a.bin\"\r\n\r\n{attachment}--mix--\r\n"),
        )),
        ("nested multipart", with(
            "Subject: nested\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"outer\"\r\n",
            "--outer\r\nContent-Type: multipart/alternative; boundary=\"inner\"\r\n\r\n--inner\r\nContent-Type: text/plain\r\n\r\nhi\r\n--inner--\r\n--outer\r\nContent-Type: message/rfc822\r\n\r\nFrom: x@y.example\r\nSubject: inner\r\n\r\ninner body\r\n--outer--\r\n",
        )),
        ("no subject", format!("{head}\r\nbody without subject\r\n").into_bytes()),
    ]
}

#[tokio::test]
async fn corpus_verifies_with_dkimpy() {
    let prepared = prepare(BASE_ZONE, &[("src.example", "rsa1", "rsa-2048"), ("src.example", "ed1", "ed25519")]);
    write_senders(prepared.folder.path(), TWO_SELECTORS);
    let dns = TestDns::start(&prepared.zone).await;
    let port = free_port_on(&[loopback(2)]);
    let receiver = Receiver::start(loopback(2), port, Script::new()).await.unwrap();
    let gateway = start(prepared, &dns, port).await;

    let corpus = corpus();
    assert!(corpus.len() >= 20);
    for (name, content) in &corpus {
        let reply = send_message(gateway.smtp, "bounce@src.example", &[&format!("{}@dest.example", name.replace(' ', "-"))], content).await;
        assert!(reply.starts_with("250"), "{name}: {reply}");
    }
    let messages = receiver.wait_for_messages(corpus.len(), Duration::from_secs(60)).await;
    for message in &messages {
        let name = &message.rcpt_to[0];
        assert_eq!(signature_count(&message.data), 2, "{name}");
        let (ok, report) = dkimpy_verify(&dns, &message.data).await;
        assert!(ok, "{name}: dkimpy: {report}");
        let results = mail_auth_verify(&dns, &message.data).await;
        assert_eq!(results, vec!["Pass", "Pass"], "{name}: mail-auth");
    }
}

#[tokio::test]
async fn body_without_final_crlf_verifies() {
    let prepared = prepare(BASE_ZONE, &[("src.example", "rsa1", "rsa-2048")]);
    write_senders(prepared.folder.path(), "domains:\n  src.example:\n    selectors: [rsa1]\n");
    let dns = TestDns::start(&prepared.zone).await;
    let port = free_port_on(&[loopback(2)]);
    let receiver = Receiver::start(loopback(2), port, Script::new()).await.unwrap();
    let gateway = start(prepared, &dns, port).await;

    // BDAT carries content without a final CRLF; DATA cannot.
    let content = b"From: <app@src.example>\r\nSubject: no final crlf\r\n\r\nlast line";
    let (mut client, _) = Client::connect(gateway.smtp).await;
    client.command("EHLO client.test.example").await;
    client.command("MAIL FROM:<app@src.example>").await;
    client.command("RCPT TO:<user@dest.example>").await;
    client.write(format!("BDAT {} LAST\r\n", content.len()).as_bytes()).await;
    client.write(content).await;
    let reply = client.read_reply().await;
    assert!(reply.starts_with("250"), "{reply}");

    let message = receiver.wait_for_messages(1, WAIT).await.remove(0);
    let (ok, report) = dkimpy_verify(&dns, &message.data).await;
    assert!(ok, "dkimpy: {report}");
}

#[tokio::test]
async fn unknown_sender_domain_rejected() {
    let prepared = prepare(BASE_ZONE, &[("src.example", "ed1", "ed25519")]);
    write_senders(prepared.folder.path(), "domains:\n  src.example:\n    selectors: [ed1]\n");
    let dns = TestDns::start(&prepared.zone).await;
    let gateway = start(prepared, &dns, 25).await;

    let (mut client, _) = Client::connect(gateway.smtp).await;
    client.command("EHLO client.test.example").await;
    client.command("MAIL FROM:<app@other.example>").await;
    client.command("RCPT TO:<user@dest.example>").await;
    client.command("DATA").await;
    client.write(b"From: <app@other.example>\r\nSubject: x\r\n\r\nbody\r\n.\r\n").await;
    let reply = client.read_reply().await;
    assert!(reply.starts_with("550 5.7.1 No DKIM key for sender domain other.example"), "{reply}");
}

#[tokio::test]
async fn unsigned_relay_policy_relays() {
    let prepared = prepare(BASE_ZONE, &[("src.example", "ed1", "ed25519")]);
    write_senders(
        prepared.folder.path(),
        "defaults:\n  unsigned: relay\ndomains:\n  src.example:\n    selectors: [ed1]\n",
    );
    let dns = TestDns::start(&prepared.zone).await;
    let port = free_port_on(&[loopback(2)]);
    let receiver = Receiver::start(loopback(2), port, Script::new()).await.unwrap();
    let gateway = start(prepared, &dns, port).await;

    let content = b"From: <app@other.example>\r\nSubject: x\r\n\r\nbody\r\n";
    let reply = send_message(gateway.smtp, "app@other.example", &["user@dest.example"], content).await;
    assert!(reply.starts_with("250"), "{reply}");
    let message = receiver.wait_for_messages(1, WAIT).await.remove(0);
    assert_eq!(signature_count(&message.data), 0);
}

#[tokio::test]
async fn subdomain_signed_by_organizational_domain() {
    let prepared = prepare(BASE_ZONE, &[("src.example", "ed1", "ed25519")]);
    write_senders(prepared.folder.path(), "domains:\n  src.example:\n    selectors: [ed1]\n");
    let dns = TestDns::start(&prepared.zone).await;
    let port = free_port_on(&[loopback(2)]);
    let receiver = Receiver::start(loopback(2), port, Script::new()).await.unwrap();
    let gateway = start(prepared, &dns, port).await;

    let content = b"From: <news@news.src.example>\r\nSubject: newsletter\r\n\r\nbody\r\n";
    send_message(gateway.smtp, "bounce@news.src.example", &["user@dest.example"], content).await;
    let message = receiver.wait_for_messages(1, WAIT).await.remove(0);
    assert!(message.data_str().contains("d=src.example;"), "{}", message.data_str());
    let (ok, report) = dkimpy_verify(&dns, &message.data).await;
    assert!(ok, "dkimpy: {report}");
}

#[tokio::test]
async fn existing_signature_not_repeated() {
    let prepared = prepare(BASE_ZONE, &[("src.example", "ed1", "ed25519")]);
    write_senders(prepared.folder.path(), "domains:\n  src.example:\n    selectors: [ed1]\n");
    let dns = TestDns::start(&prepared.zone).await;
    let port = free_port_on(&[loopback(2)]);
    let receiver = Receiver::start(loopback(2), port, Script::new()).await.unwrap();
    let gateway = start(prepared, &dns, port).await;

    let content = b"From: <app@src.example>\r\nSubject: twice\r\n\r\nbody\r\n";
    send_message(gateway.smtp, "app@src.example", &["first@dest.example"], content).await;
    let first = receiver.wait_for_messages(1, WAIT).await.remove(0);
    assert_eq!(signature_count(&first.data), 1);

    // Relay the signed message again, as a forwarding loop through the gateway would.
    send_message(gateway.smtp, "app@src.example", &["second@dest.example"], &first.data).await;
    let messages = receiver.wait_for_messages(2, WAIT).await;
    assert_eq!(signature_count(&messages[1].data), 1, "{}", messages[1].data_str());
}

#[tokio::test]
async fn dkim_check_reports_each_selector() {
    let prepared = prepare(BASE_ZONE, &[
        ("src.example", "good", "ed25519"),
        ("src.example", "stale", "rsa-2048"),
        ("src.example", "unpublished", "ed25519"),
    ]);
    write_senders(prepared.folder.path(), "domains:\n  src.example:\n    selectors: [good, stale, unpublished]\n");
    // Publish a different key for "stale" and none for "unpublished".
    let other = tempfile::tempdir().unwrap();
    let wrong = keygen(other.path(), "src.example", "stale", "rsa-2048");
    let zone: String = prepared
        .zone
        .lines()
        .filter(|line| !line.starts_with("stale.") && !line.starts_with("unpublished."))
        .map(|line| format!("{line}\n"))
        .collect::<String>()
        + &wrong;
    let dns = TestDns::start(&zone).await;
    let config = prepared.folder.path().join("check.yaml");
    std::fs::write(
        &config,
        format!(
            "dns:\n  nameservers: [\"{}\"]\npolicies: {}\nkeys: {}\n",
            dns.addr,
            prepared.folder.path().join("policies").display(),
            prepared.folder.path().join("keys").display()
        ),
    )
    .unwrap();

    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["--config", config.to_str().unwrap(), "dkim", "check"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "{stdout}");
    assert!(stdout.contains("good._domainkey.src.example: published and matching"), "{stdout}");
    assert!(stdout.contains("stale._domainkey.src.example: published with a different key"), "{stdout}");
    assert!(stdout.contains("unpublished._domainkey.src.example: missing"), "{stdout}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("2 of 3 selectors"));
}

#[tokio::test]
async fn readable_key_file_refused() {
    let prepared = prepare(BASE_ZONE, &[("src.example", "ed1", "ed25519")]);
    write_senders(prepared.folder.path(), "domains:\n  src.example:\n    selectors: [ed1]\n");
    let key = prepared.folder.path().join("keys/src.example/ed1.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = prepared.folder.path().join("serve.yaml");
    std::fs::write(
        &config,
        format!(
            "smtp:\n  listen: [\"127.0.0.1:0\"]\nhttp:\n  listen: \"127.0.0.1:0\"\nspool:\n  path: {}\npolicies: {}\nkeys: {}\n",
            prepared.folder.path().join("data").display(),
            prepared.folder.path().join("policies").display(),
            prepared.folder.path().join("keys").display()
        ),
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["--config", config.to_str().unwrap(), "serve"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("ed1.pem is readable by group or others; run chmod 600"), "{stderr}");
}

#[tokio::test]
async fn senders_reloaded_on_sighup() {
    let prepared = prepare(BASE_ZONE, &[("src.example", "ed1", "ed25519"), ("other.example", "o1", "ed25519")]);
    write_senders(prepared.folder.path(), "domains:\n  src.example:\n    selectors: [ed1]\n");
    let folder = prepared.folder.path().to_path_buf();
    let dns = TestDns::start(&prepared.zone).await;
    let port = free_port_on(&[loopback(2)]);
    let receiver = Receiver::start(loopback(2), port, Script::new()).await.unwrap();
    let gateway = start(prepared, &dns, port).await;

    let content = b"From: <app@other.example>\r\nSubject: reload\r\n\r\nbody\r\n";
    let (mut client, _) = Client::connect(gateway.smtp).await;
    client.command("EHLO client.test.example").await;
    client.command("MAIL FROM:<app@other.example>").await;
    client.command("RCPT TO:<user@dest.example>").await;
    client.command("DATA").await;
    client.write(b"From: <app@other.example>\r\nSubject: reload\r\n\r\nbody\r\n.\r\n").await;
    assert!(client.read_reply().await.starts_with("550 5.7.1"));

    // A broken file keeps the last good policy.
    write_senders(&folder, "domains: [not, a, map]\n");
    gateway.signal("-HUP");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let reply = send_message(gateway.smtp, "app@src.example", &["a@dest.example"], b"From: <app@src.example>\r\n\r\nx\r\n").await;
    assert!(reply.starts_with("250"), "the last good policy still signs: {reply}");

    write_senders(
        &folder,
        "domains:\n  src.example:\n    selectors: [ed1]\n  other.example:\n    selectors: [o1]\n",
    );
    gateway.signal("-HUP");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let reply = send_message(gateway.smtp, "app@other.example", &["b@dest.example"], content).await;
    assert!(reply.starts_with("250"), "{reply}");
    let messages = receiver.wait_for_messages(2, WAIT).await;
    let signed = messages.iter().find(|m| m.rcpt_to[0] == "b@dest.example").unwrap();
    assert!(signed.data_str().contains("d=other.example;"));
    assert!(gateway.log().contains("policy reload failed; keeping the previous policies"));
}
