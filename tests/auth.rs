//! SMTP AUTH (RFC 4954): relaying only from smtp.relay_networks or after
//! AUTH, AUTH only under TLS or from smtp.auth.cleartext_networks, the
//! lockout after failed attempts, the users file and `baton user`.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine;

use common::dns::TestDns;
use common::gateway::{Client, Gateway, Options};
use common::loopback;
use common::receiver::{Receiver, Script, free_port_on};
use common::tls::{TlsClient, write_certificate};

const WAIT: Duration = Duration::from_secs(20);

const ZONE: &str = r#"
dest.example.            MX 10 mx1.dest.example.
mx1.dest.example.        A 127.0.0.2
other.example.           MX 10 mx1.other.example.
mx1.other.example.       A 127.0.0.2
"#;

const ALICE_PASSWORD: &str = "correct horse battery staple";

fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Encodes the PLAIN initial response for `name` and `password`.
fn plain(name: &str, password: &str) -> String {
    base64(format!("\0{name}\0{password}").as_bytes())
}

/// Writes a users file with mode 0600.
fn write_users(path: &Path, users: &[(&str, &str)]) {
    let mut text = String::new();
    for (name, password) in users {
        let hash = baton::users::hash_password(password.as_bytes()).expect("hash password");
        text.push_str(&format!("{name}:{hash}\n"));
    }
    std::fs::write(path, text).expect("write users file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod users file");
}

/// Starts a gateway with STARTTLS, relaying only for 127.0.0.9, and a
/// users file with alice. `auth_extra` contains more `smtp.auth` lines,
/// indented by eight spaces.
async fn start_auth_gateway(dns: &TestDns, port: u16, auth_extra: &str) -> Gateway {
    let folder = tempfile::tempdir().expect("temporary folder");
    let (certificate, key) = write_certificate(folder.path(), "mta.test.example");
    let users = folder.path().join("users");
    write_users(&users, &[("alice", ALICE_PASSWORD)]);
    let mut options = Options::new(dns.addr, port);
    options.relay_networks = r#"["127.0.0.9/32"]"#;
    options.smtp_extra = format!(
        "    tls:\n        certificate: {}\n        key: {}\n    auth:\n        users_file: {}\n{auth_extra}",
        certificate.display(),
        key.display(),
        users.display(),
    );
    options.folder = Some(folder);
    Gateway::start(options).await
}

/// Recipients an open relay might let through: plain, postmaster, a source
/// route and the percent hack.
const RECIPIENTS: &[&str] = &[
    "RCPT TO:<rcpt@dest.example>",
    "RCPT TO:<postmaster@dest.example>",
    "RCPT TO:<Postmaster>",
    "RCPT TO:<@dest.example:rcpt@other.example>",
    "RCPT TO:<rcpt%other.example@dest.example>",
];

#[tokio::test]
async fn open_relay_refused_without_auth() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let receiver = Receiver::start(loopback(2), port, Script::new()).await.unwrap();
    let gateway = start_auth_gateway(&dns, port, "").await;

    // Clear text, outside smtp.relay_networks.
    let (mut client, _) = Client::connect_from(loopback(5), gateway.smtp).await;
    let ehlo = client.command("EHLO client.test.example").await;
    assert!(!ehlo.contains("AUTH"), "AUTH offered in clear text: {ehlo}");
    let mail = client.command("MAIL FROM:<sender@dest.example>").await;
    assert!(mail.starts_with("530 5.7.0 Authentication required"), "{mail}");
    assert!(mail.contains("send STARTTLS, then AUTH"), "{mail}");
    for rcpt in RECIPIENTS {
        let reply = client.command(rcpt).await;
        assert!(reply.starts_with('5'), "{rcpt} in clear text: {reply}");
    }
    let data = client.command("DATA").await;
    assert!(data.starts_with("503"), "DATA: {data}");
    client.command("QUIT").await;

    // Under TLS, still without AUTH.
    let mut tls = TlsClient::starttls_from(loopback(5), gateway.smtp).await;
    let ehlo = tls.command("EHLO client.test.example").await;
    assert!(ehlo.contains("250-AUTH PLAIN LOGIN") || ehlo.contains("250 AUTH PLAIN LOGIN"), "{ehlo}");
    let mail = tls.command("MAIL FROM:<sender@dest.example>").await;
    assert!(mail.starts_with("530 5.7.0 Authentication required"), "{mail}");
    assert!(mail.contains("send AUTH"), "{mail}");
    for rcpt in RECIPIENTS {
        let reply = tls.command(rcpt).await;
        assert!(reply.starts_with('5'), "{rcpt} under TLS: {reply}");
    }

    // The same client after AUTH relays.
    let auth = tls.command(&format!("AUTH PLAIN {}", plain("alice", ALICE_PASSWORD))).await;
    assert_eq!(auth, "235 2.7.0 Authentication successful");
    assert_eq!(tls.command("MAIL FROM:<sender@dest.example>").await, "250 2.1.0 Ok");
    for rcpt in ["RCPT TO:<rcpt@dest.example>", "RCPT TO:<rcpt@other.example>"] {
        let reply = tls.command(rcpt).await;
        assert!(reply.starts_with("250 "), "{rcpt} after AUTH: {reply}");
    }
    assert!(tls.command("DATA").await.starts_with("354"));
    let queued = tls.command("Subject: after AUTH\r\n\r\nhello\r\n.").await;
    assert!(queued.starts_with("250 2.0.0 Ok: queued as "), "{queued}");
    tls.command("QUIT").await;

    let messages = receiver.wait_for_messages(1, WAIT).await;
    assert_eq!(messages[0].mail_from, "sender@dest.example");
    let data = messages[0].data_str();
    assert!(data.contains("with ESMTPSA"), "Received header does not record AUTH:\n{data}");
    assert!(!data.contains("alice"), "user name in the message:\n{data}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(gateway.received_count(1).await, 1, "events: {:#?}", gateway.events());
    let received = gateway.events().into_iter().find(|event| event["event"] == "received").unwrap();
    assert_eq!(received["auth_user"], "alice");
}

#[tokio::test]
async fn mechanisms_and_failures_over_starttls() {
    let dns = TestDns::start(ZONE).await;
    let gateway = start_auth_gateway(&dns, 25, "        max_failures: 20\n").await;
    let wrong_password = "Tr0ub4dor&3";

    // PLAIN with an initial response, and with an authorization identity
    // equal to the user.
    let mut tls = TlsClient::starttls_from(loopback(5), gateway.smtp).await;
    tls.command("EHLO client.test.example").await;
    let reply = tls.command(&format!("AUTH PLAIN {}", plain("alice", ALICE_PASSWORD))).await;
    assert_eq!(reply, "235 2.7.0 Authentication successful");
    let again = tls.command(&format!("AUTH PLAIN {}", plain("alice", ALICE_PASSWORD))).await;
    assert!(again.starts_with("503 5.5.1"), "second AUTH: {again}");

    let mut tls = TlsClient::starttls_from(loopback(5), gateway.smtp).await;
    tls.command("EHLO client.test.example").await;
    let response = base64(format!("alice\0alice\0{ALICE_PASSWORD}").as_bytes());
    assert_eq!(tls.command(&format!("AUTH PLAIN {response}")).await, "235 2.7.0 Authentication successful");

    // PLAIN after an empty challenge.
    let mut tls = TlsClient::starttls_from(loopback(5), gateway.smtp).await;
    tls.command("EHLO client.test.example").await;
    assert_eq!(tls.command("AUTH PLAIN").await, "334");
    let reply = tls.command(&plain("alice", ALICE_PASSWORD)).await;
    assert_eq!(reply, "235 2.7.0 Authentication successful");

    // LOGIN, with and without the user name as initial response.
    let mut tls = TlsClient::starttls_from(loopback(5), gateway.smtp).await;
    tls.command("EHLO client.test.example").await;
    assert_eq!(tls.command("AUTH LOGIN").await, "334 VXNlcm5hbWU6");
    assert_eq!(tls.command(&base64(b"alice")).await, "334 UGFzc3dvcmQ6");
    let reply = tls.command(&base64(ALICE_PASSWORD.as_bytes())).await;
    assert_eq!(reply, "235 2.7.0 Authentication successful");
    let mut tls = TlsClient::starttls_from(loopback(5), gateway.smtp).await;
    tls.command("EHLO client.test.example").await;
    assert_eq!(tls.command(&format!("AUTH LOGIN {}", base64(b"alice"))).await, "334 UGFzc3dvcmQ6");
    let reply = tls.command(&base64(ALICE_PASSWORD.as_bytes())).await;
    assert_eq!(reply, "235 2.7.0 Authentication successful");

    // Failures: wrong password, unknown user, another authorization
    // identity, cancel, malformed responses, unknown mechanism.
    let mut tls = TlsClient::starttls_from(loopback(5), gateway.smtp).await;
    tls.command("EHLO client.test.example").await;
    let wrong = tls.command(&format!("AUTH PLAIN {}", plain("alice", wrong_password))).await;
    assert_eq!(wrong, "535 5.7.8 Authentication credentials invalid");
    let unknown = tls.command(&format!("AUTH PLAIN {}", plain("mallory", ALICE_PASSWORD))).await;
    assert_eq!(unknown, "535 5.7.8 Authentication credentials invalid");
    let other = base64(format!("alice\0mallory\0{wrong_password}").as_bytes());
    let reply = tls.command(&format!("AUTH PLAIN {other}")).await;
    assert_eq!(reply, "535 5.7.8 Authentication credentials invalid");
    assert_eq!(tls.command("AUTH LOGIN").await, "334 VXNlcm5hbWU6");
    assert_eq!(tls.command("*").await, "501 5.0.0 Authentication cancelled");
    let reply = tls.command("AUTH PLAIN not-base64!").await;
    assert!(reply.starts_with("501 5.5.2"), "{reply}");
    let reply = tls.command(&format!("AUTH PLAIN {}", base64(b"no separators"))).await;
    assert!(reply.starts_with("501 5.5.2"), "{reply}");
    let reply = tls.command("AUTH CRAM-MD5").await;
    assert!(reply.starts_with("504 5.5.4"), "{reply}");
    let mail = tls.command("MAIL FROM:<sender@dest.example>").await;
    assert!(mail.starts_with("530 5.7.0"), "MAIL after failed AUTH: {mail}");

    // The log names user and client for each outcome, and contains no
    // password in any form the client sent it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = gateway.log();
    assert!(
        log.lines().any(|line| line.contains("AUTH succeeded") && line.contains("\"alice\"") && line.contains("127.0.0.5")),
        "no success line with user and IP:\n{log}"
    );
    assert!(
        log.lines().any(|line| line.contains("AUTH failed") && line.contains("\"alice\"") && line.contains("127.0.0.5")),
        "no failure line for alice with IP:\n{log}"
    );
    assert!(
        log.lines().any(|line| line.contains("AUTH failed") && line.contains("\"mallory\"")),
        "no failure line for the unknown user:\n{log}"
    );
    for secret in [ALICE_PASSWORD, wrong_password] {
        assert!(!log.contains(secret), "password {secret:?} in the log:\n{log}");
        assert!(!log.contains(&base64(secret.as_bytes())), "base64 password {secret:?} in the log:\n{log}");
        assert!(!log.contains(&plain("alice", secret)), "PLAIN response with {secret:?} in the log:\n{log}");
    }
    assert!(!log.contains(&other), "PLAIN response in the log:\n{log}");
}

#[tokio::test]
async fn cleartext_auth_needs_tls_or_network() {
    let dns = TestDns::start(ZONE).await;
    let gateway = start_auth_gateway(&dns, 25, "        cleartext_networks: [\"127.0.0.6/32\"]\n").await;

    let (mut client, _) = Client::connect_from(loopback(5), gateway.smtp).await;
    let ehlo = client.command("EHLO client.test.example").await;
    assert!(!ehlo.contains("AUTH"), "AUTH offered in clear text: {ehlo}");
    let reply = client.command(&format!("AUTH PLAIN {}", plain("alice", ALICE_PASSWORD))).await;
    assert!(reply.starts_with("538 5.7.11"), "{reply}");
    let mail = client.command("MAIL FROM:<sender@dest.example>").await;
    assert!(mail.starts_with("530 5.7.0"), "{mail}");

    let (mut trusted, _) = Client::connect_from(loopback(6), gateway.smtp).await;
    let ehlo = trusted.command("EHLO client.test.example").await;
    assert!(ehlo.contains("AUTH PLAIN LOGIN"), "AUTH not offered to smtp.auth.cleartext_networks: {ehlo}");
    let reply = trusted.command(&format!("AUTH PLAIN {}", plain("alice", ALICE_PASSWORD))).await;
    assert_eq!(reply, "235 2.7.0 Authentication successful");
    assert_eq!(trusted.command("MAIL FROM:<sender@dest.example>").await, "250 2.1.0 Ok");
    let rcpt = trusted.command("RCPT TO:<rcpt@dest.example>").await;
    assert!(rcpt.starts_with("250 "), "{rcpt}");
}

#[tokio::test]
async fn failed_auth_locks_client_ip() {
    let dns = TestDns::start(ZONE).await;
    let gateway = start_auth_gateway(&dns, 25, "        max_failures: 3\n        failure_window: 10m\n").await;

    let mut tls = TlsClient::starttls_from(loopback(5), gateway.smtp).await;
    tls.command("EHLO client.test.example").await;
    for attempt in 1..=3 {
        let reply = tls.command(&format!("AUTH PLAIN {}", plain("alice", &format!("guess {attempt}")))).await;
        assert!(reply.starts_with("535 5.7.8"), "attempt {attempt}: {reply}");
    }
    // Locked: even the right password is not checked.
    let locked = tls.command(&format!("AUTH PLAIN {}", plain("alice", ALICE_PASSWORD))).await;
    assert!(locked.starts_with("454 4.7.0 Too many failed AUTH attempts from 127.0.0.5"), "{locked}");

    // The lockout follows the IP address to a new connection.
    let mut again = TlsClient::starttls_from(loopback(5), gateway.smtp).await;
    again.command("EHLO client.test.example").await;
    let locked = again.command(&format!("AUTH PLAIN {}", plain("alice", ALICE_PASSWORD))).await;
    assert!(locked.starts_with("454 4.7.0"), "new connection: {locked}");

    // Another client is not affected.
    let mut other = TlsClient::starttls_from(loopback(6), gateway.smtp).await;
    other.command("EHLO client.test.example").await;
    let reply = other.command(&format!("AUTH PLAIN {}", plain("alice", ALICE_PASSWORD))).await;
    assert_eq!(reply, "235 2.7.0 Authentication successful");

    let log = gateway.log();
    assert!(
        log.lines().any(|line| line.contains("AUTH locked for the client") && line.contains("127.0.0.5")),
        "lockout not logged:\n{log}"
    );
}

#[tokio::test]
async fn users_file_reloaded_while_running() {
    let dns = TestDns::start(ZONE).await;
    let gateway = start_auth_gateway(&dns, 25, "").await;

    let mut tls = TlsClient::starttls_from(loopback(5), gateway.smtp).await;
    tls.command("EHLO client.test.example").await;
    let reply = tls.command(&format!("AUTH PLAIN {}", plain("bob", "bob's password"))).await;
    assert!(reply.starts_with("535"), "bob before he was added: {reply}");

    let output = run_with_stdin(
        &["user", "add", "bob", "--config", gateway.config_path().to_str().unwrap()],
        "bob's password\n",
    );
    assert!(output.status.success(), "user add: {}", String::from_utf8_lossy(&output.stderr));

    let reply = tls.command(&format!("AUTH PLAIN {}", plain("bob", "bob's password"))).await;
    assert_eq!(reply, "235 2.7.0 Authentication successful");
}

/// Runs `baton` with `args`, writing `stdin` to its standard input.
fn run_with_stdin(args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start baton");
    // A command that rejects its arguments may exit before reading stdin.
    if let Err(error) = child.stdin.take().expect("stdin").write_all(stdin.as_bytes()) {
        assert_eq!(error.kind(), std::io::ErrorKind::BrokenPipe, "write stdin: {error}");
    }
    child.wait_with_output().expect("wait for baton")
}

/// Writes a config file with `users_file` and a certificate; returns the
/// config path and the users file path.
fn write_user_config(folder: &Path) -> (PathBuf, PathBuf) {
    let (certificate, key) = write_certificate(folder, "mta.test.example");
    let users = folder.join("users");
    let config = folder.join("baton.yaml");
    std::fs::write(
        &config,
        format!(
            "hostname: mta.test.example\nsmtp:\n  listen: [\"127.0.0.1:0\"]\n  tls:\n    certificate: {}\n    key: {}\n  auth:\n    users_file: {}\nhttp:\n  listen: \"127.0.0.1:0\"\nspool:\n  path: {}\npolicies: {}\nkeys: {}\n",
            certificate.display(),
            key.display(),
            users.display(),
            folder.join("data").display(),
            folder.join("policies").display(),
            folder.join("keys").display(),
        ),
    )
    .expect("write config");
    (config, users)
}

#[test]
fn user_commands_manage_file() {
    let folder = tempfile::tempdir().unwrap();
    let (config, users) = write_user_config(folder.path());
    let config = config.to_str().unwrap();

    let output = run_with_stdin(&["user", "add", "alice", "--config", config], "alice's secret\n");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let mode = std::fs::metadata(&users).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "users file mode {mode:o}");
    let text = std::fs::read_to_string(&users).unwrap();
    assert!(text.starts_with("alice:$argon2id$"), "{text}");
    assert!(!text.contains("alice's secret"), "password stored in clear: {text}");
    let hash = text.trim_end().split_once(':').unwrap().1.to_string();
    assert!(baton::users::verify_password(&hash, b"alice's secret"));

    let output = run_with_stdin(&["user", "add", "bob", "--config", config], "bob's secret\r\n");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let output = run_with_stdin(&["user", "list", "--config", config], "");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "alice\nbob\n");

    // A second add sets a new password.
    let output = run_with_stdin(&["user", "add", "alice", "--config", config], "new secret\n");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("changed the password of alice"));
    let text = std::fs::read_to_string(&users).unwrap();
    let alice = text.lines().find(|line| line.starts_with("alice:")).unwrap();
    assert!(baton::users::verify_password(&alice["alice:".len()..], b"new secret"));

    let output = run_with_stdin(&["user", "remove", "alice", "--config", config], "");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let output = run_with_stdin(&["user", "list", "--config", config], "");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "bob\n");
    let output = run_with_stdin(&["user", "remove", "alice", "--config", config], "");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("not found"));

    // No password on the command line, and no empty password.
    let before = std::fs::read_to_string(&users).unwrap();
    let output = run_with_stdin(&["user", "add", "carol", "carols-secret", "--config", config], "x\n");
    assert!(!output.status.success(), "a password on the command line was accepted");
    let output = run_with_stdin(&["user", "add", "carol", "--config", config], "\n");
    assert!(!output.status.success(), "an empty password was accepted");
    assert!(String::from_utf8_lossy(&output.stderr).contains("password is empty"));
    assert_eq!(std::fs::read_to_string(&users).unwrap(), before);
}

#[test]
fn users_file_readable_by_others_rejected() {
    let folder = tempfile::tempdir().unwrap();
    let (config, users) = write_user_config(folder.path());
    write_users(&users, &[("alice", ALICE_PASSWORD)]);
    std::fs::set_permissions(&users, std::fs::Permissions::from_mode(0o640)).unwrap();

    let mut serve = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = serve.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = serve.kill();
            let _ = serve.wait();
            panic!("baton serve is running with a users file of mode 0640");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "baton serve exited 0 with a users file of mode 0640");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut serve.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains(&users.display().to_string()), "{stderr}");
    assert!(stderr.contains("chmod 600"), "{stderr}");

    let list = run_with_stdin(&["user", "list", "--config", config.to_str().unwrap()], "");
    assert!(!list.status.success(), "baton user list read a users file of mode 0640");
    let stderr = String::from_utf8_lossy(&list.stderr);
    assert!(stderr.contains("chmod 600"), "{stderr}");
}
