//! Runs a real Prometheus server (Debian's package, `/usr/bin/prometheus`)
//! on a free loopback port with its storage in a temporary folder, and
//! queries its HTTP API.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::loopback;
use super::receiver::free_port_on;

pub const PROMETHEUS: &str = "/usr/bin/prometheus";
pub const PROMTOOL: &str = "/usr/bin/promtool";

/// Panics unless the prometheus and promtool binaries are installed.
pub fn require_binaries() {
    for path in [PROMETHEUS, PROMTOOL] {
        assert!(
            Path::new(path).exists(),
            "{path} not found: run .ci/run, which installs the Debian package prometheus"
        );
    }
}

/// A running Prometheus server. Killed when dropped.
pub struct Prometheus {
    pub addr: SocketAddr,
    folder: tempfile::TempDir,
    child: Option<Child>,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` every second as job `job`, with
    /// `rule_files` evaluated every second, and waits until it is ready.
    pub async fn start(job: &str, target: SocketAddr, rule_files: &[PathBuf]) -> Prometheus {
        require_binaries();
        assert!(target.ip().is_loopback(), "scrape target {target} is not loopback");
        let folder = tempfile::tempdir().expect("temporary folder");

        let port = free_port_on(&[loopback(1)]);
        let addr = SocketAddr::new(loopback(1), port);
        let rules: Vec<String> = rule_files.iter().map(|path| format!("  - \"{}\"\n", path.display())).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n{rules}\
             scrape_configs:\n  - job_name: {job}\n    static_configs:\n      - targets: [\"{target}\"]\n",
            rules = rules.concat(),
        );
        let config_path = folder.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");

        let log = std::fs::File::create(folder.path().join("prometheus.log")).expect("create prometheus.log");
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", folder.path().join("tsdb").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");

        let mut prometheus = Prometheus {
            addr,
            folder,
            child: Some(child),
        };
        prometheus.wait_ready().await;
        prometheus
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((status, _)) = http_request(self.addr, "GET", "/-/ready", "").await
                && status.contains(" 200")
            {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("prometheus exited with {status}; log:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "prometheus not ready within 30s; log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.folder.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Evaluates `expr` at the current time through `/api/v1/query`.
    /// Returns the HTTP status line and the JSON body (which has `status`
    /// `success` or `error` with `error` text).
    pub async fn query(&self, expr: &str) -> (String, serde_json::Value) {
        let body = format!("query={}", form_encode(expr));
        self.request("POST", "/api/v1/query", &body).await
    }

    /// Sends a GET to an API path such as `/api/v1/rules`.
    pub async fn get(&self, path: &str) -> (String, serde_json::Value) {
        self.request("GET", path, "").await
    }

    async fn request(&self, method: &str, path: &str, body: &str) -> (String, serde_json::Value) {
        let (status, text) = http_request(self.addr, method, path, body)
            .await
            .unwrap_or_else(|error| panic!("{method} {path} to prometheus failed: {error}"));
        let json = serde_json::from_str(&text)
            .unwrap_or_else(|error| panic!("{method} {path}: response is not JSON ({error}): {status}\n{text}"));
        (status, json)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- prometheus log ---\n{}", self.log());
        }
    }
}

/// Sends one HTTP/1.0 request (so the reply is never chunked) and returns
/// the status line and the body.
async fn http_request(addr: SocketAddr, method: &str, path: &str, body: &str) -> std::io::Result<(String, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut response))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no complete response within 30s"))??;
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Ok((head.lines().next().unwrap_or("").to_string(), body.to_string()))
}

/// Percent-encodes `text` for an `application/x-www-form-urlencoded` body.
pub fn form_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(byte as char),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}
