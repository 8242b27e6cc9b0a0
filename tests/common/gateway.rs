//! Runs the real `baton` binary for a test: a config file and spool in a
//! temporary folder, SMTP and HTTP on free loopback ports, and a small SMTP
//! client to talk to it.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Settings a test may change; the rest of the config is fixed.
pub struct Options {
    /// DNS server the gateway queries.
    pub dns: SocketAddr,
    /// `delivery.remote_port`: the port of every test receiver.
    pub remote_port: u16,
    pub retry: &'static str,
    pub max_age: &'static str,
    pub relay_networks: &'static str,
    /// Extra lines for the `smtp:` section, indented by four spaces.
    pub smtp_extra: String,
    /// Extra lines for the `delivery:` section, indented by four spaces.
    pub delivery_extra: String,
    /// Folder to run in, prepared by the test (with `policies/` and
    /// `keys/`); a new empty one when `None`.
    pub folder: Option<tempfile::TempDir>,
}

impl Options {
    pub fn new(dns: SocketAddr, remote_port: u16) -> Options {
        Options {
            dns,
            remote_port,
            retry: "[1s]",
            max_age: "1h",
            relay_networks: r#"["127.0.0.0/8", "::1/128"]"#,
            smtp_extra: String::new(),
            delivery_extra: String::new(),
            folder: None,
        }
    }
}

pub struct Gateway {
    pub smtp: SocketAddr,
    pub http: SocketAddr,
    pub folder: tempfile::TempDir,
    config_path: PathBuf,
    child: Option<Child>,
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port on 127.0.0.1")
}

impl Gateway {
    pub async fn start(mut options: Options) -> Gateway {
        let folder = match options.folder.take() {
            Some(folder) => folder,
            None => tempfile::tempdir().expect("temporary folder"),
        };
        let smtp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = format!(
            r#"hostname: mta.test.example
smtp:
    listen: ["{smtp}"]
    relay_networks: {relay}
    max_message_size: 1000000
{smtp_extra}
http:
    listen: "{http}"
spool:
    path: {spool}
dns:
    nameservers: ["{dns}"]
delivery:
    remote_port: {port}
    retry: {retry}
    max_age: {max_age}
    connect_timeout: 2s
    command_timeout: 10s
{delivery_extra}
policies: {policies}
keys: {keys}
"#,
            relay = options.relay_networks,
            smtp_extra = options.smtp_extra,
            spool = folder.path().join("data").display(),
            dns = options.dns,
            port = options.remote_port,
            retry = options.retry,
            max_age = options.max_age,
            delivery_extra = options.delivery_extra,
            policies = folder.path().join("policies").display(),
            keys = folder.path().join("keys").display(),
        );
        let config_path = folder.path().join("baton.yaml");
        std::fs::write(&config_path, config).expect("write config");
        let mut gateway = Gateway {
            smtp,
            http,
            folder,
            config_path,
            child: None,
        };
        gateway.launch().await;
        gateway
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn spool_path(&self) -> PathBuf {
        self.folder.path().join("data")
    }

    /// Starts the process and waits for its SMTP greeting.
    pub async fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.folder.path().join("baton.log"))
            .expect("open log");
        let child = Command::new(env!("CARGO_BIN_EXE_baton"))
            .arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .env("BATON_LOG", "debug,hickory=info,sled=info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start baton");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(stream) = TcpStream::connect(self.smtp).await {
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                if reader.read_line(&mut line).await.is_ok() && line.starts_with("220") {
                    let _ = reader.get_mut().write_all(b"QUIT\r\n").await;
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("baton exited with {status}; log:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "baton did not greet within 20s; log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the process with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (such as `-HUP`) to the process.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let status = Command::new("kill").arg(signal).arg(pid).status().expect("run kill");
        assert!(status.success());
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        child.wait().expect("wait for baton")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.folder.path().join("baton.log")).unwrap_or_default()
    }

    /// Returns the delivery log lines as JSON values.
    pub fn events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.spool_path().join("delivery.log"))
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).expect("delivery log line is JSON"))
            .collect()
    }

    /// Counts the `received` events once the delivery log has caught up.
    ///
    /// The gateway writes its log after the `250`, so a count read right
    /// after the reply can miss the newest message. This waits until at
    /// least `expected` events are there (at most 10 s), then a further
    /// 200 ms for any extra event, and returns the count.
    pub async fn received_count(&self, expected: usize) -> usize {
        let count = || self.events().iter().filter(|event| event["event"] == "received").count();
        let deadline = Instant::now() + Duration::from_secs(10);
        while count() < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        count()
    }

    /// Waits until the delivery log has an event of `kind` for `recipient`.
    pub async fn wait_for_event(&self, kind: &str, recipient: &str, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self.events().into_iter().find(|event| {
                event["event"] == kind
                    && event["recipients"].as_array().is_some_and(|r| r.iter().any(|a| a == recipient))
            });
            if let Some(event) = found {
                return event;
            }
            assert!(
                Instant::now() < deadline,
                "no {kind} event for {recipient} within {timeout:?}; events: {:#?}\nlog:\n{}",
                self.events(),
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs `baton` with `args` and this gateway's config; returns stdout.
    pub fn command(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_baton"))
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .output()
            .expect("run baton")
    }

    /// Fetches `path` from the HTTP listener; returns status line and body.
    pub async fn http_get(&self, path: &str) -> (String, String) {
        let mut stream = TcpStream::connect(self.http).await.expect("connect to HTTP");
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut response).await.unwrap();
        let text = String::from_utf8_lossy(&response).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        (head.lines().next().unwrap_or("").to_string(), body.to_string())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- baton log ---\n{}", self.log());
        }
    }
}

/// A plain SMTP client for sending to the gateway in tests.
pub struct Client {
    reader: BufReader<TcpStream>,
}

impl Client {
    /// Connects and returns the client with the greeting.
    pub async fn connect(address: SocketAddr) -> (Client, String) {
        let stream = TcpStream::connect(address).await.expect("connect to baton");
        let mut client = Client {
            reader: BufReader::new(stream),
        };
        let greeting = client.read_reply().await;
        (client, greeting)
    }

    /// Connects from a chosen loopback source address.
    pub async fn connect_from(source: std::net::IpAddr, address: SocketAddr) -> (Client, String) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(source, 0)).unwrap();
        let stream = socket.connect(address).await.expect("connect to baton");
        let mut client = Client {
            reader: BufReader::new(stream),
        };
        let greeting = client.read_reply().await;
        (client, greeting)
    }

    /// Reads one reply, all lines joined by newlines.
    pub async fn read_reply(&mut self) -> String {
        let mut reply = String::new();
        loop {
            let mut line = String::new();
            let read = tokio::time::timeout(Duration::from_secs(30), self.reader.read_line(&mut line))
                .await
                .expect("reply within 30s")
                .expect("read reply");
            if read == 0 {
                return if reply.is_empty() { "<closed>".to_string() } else { reply };
            }
            reply.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return reply.trim_end().to_string();
            }
        }
    }

    /// Returns the TCP stream, for tests that go on with raw bytes. Panics
    /// when the gateway sent bytes that were not read yet.
    pub fn into_stream(self) -> TcpStream {
        let unread = self.reader.buffer();
        assert!(unread.is_empty(), "unread bytes from the gateway: {:?}", String::from_utf8_lossy(unread));
        self.reader.into_inner()
    }

    pub async fn write(&mut self, bytes: &[u8]) {
        self.reader.get_mut().write_all(bytes).await.expect("write to baton");
    }

    /// Sends one command line (CRLF added) and returns the reply.
    pub async fn command(&mut self, line: &str) -> String {
        self.write(format!("{line}\r\n").as_bytes()).await;
        self.read_reply().await
    }

    /// Sends a whole message: EHLO, MAIL, RCPTs, DATA with dot-stuffing.
    /// Returns the reply after the data; panics on any earlier failure.
    pub async fn send(&mut self, from: &str, to: &[&str], content: &[u8]) -> String {
        let ehlo = self.command("EHLO client.test.example").await;
        assert!(ehlo.starts_with("250"), "EHLO: {ehlo}");
        let mail = self.command(&format!("MAIL FROM:<{from}>")).await;
        assert!(mail.starts_with("250"), "MAIL: {mail}");
        for recipient in to {
            let rcpt = self.command(&format!("RCPT TO:<{recipient}>")).await;
            assert!(rcpt.starts_with("250"), "RCPT {recipient}: {rcpt}");
        }
        let data = self.command("DATA").await;
        assert!(data.starts_with("354"), "DATA: {data}");
        let mut stuffed = Vec::with_capacity(content.len() + 16);
        let mut line_start = true;
        for &byte in content {
            if line_start && byte == b'.' {
                stuffed.push(b'.');
            }
            stuffed.push(byte);
            line_start = byte == b'\n';
        }
        stuffed.extend_from_slice(b".\r\n");
        self.write(&stuffed).await;
        self.read_reply().await
    }
}

/// Sends one message over a new connection; returns the final reply.
pub async fn send_message(address: SocketAddr, from: &str, to: &[&str], content: &[u8]) -> String {
    let (mut client, greeting) = Client::connect(address).await;
    assert!(greeting.starts_with("220"), "greeting: {greeting}");
    let reply = client.send(from, to, content).await;
    client.command("QUIT").await;
    reply
}
