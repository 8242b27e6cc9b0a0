//! The gateway's configuration: one YAML file read into typed structs.
//!
//! Every field has a default, so `baton serve` runs with no file at all. An
//! unknown key is an error naming the key and the file, because a misspelt
//! key that is silently ignored is worse than a refusal to start. Relative
//! paths are taken from the directory `baton` was started in.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Name used in EHLO, in Received headers and in DSNs.
    pub hostname: String,
    pub smtp: SmtpConfig,
    pub http: HttpConfig,
    pub spool: SpoolConfig,
    pub dns: DnsConfig,
    pub delivery: DeliveryConfig,
    /// Folder with throttle, warmup, pool and sender policies.
    pub policies: PathBuf,
    /// Folder with DKIM private keys, as `<domain>/<selector>.pem`.
    pub keys: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpConfig {
    /// Addresses the SMTP intake listens on.
    pub listen: Vec<SocketAddr>,
    /// Client networks allowed to relay through the gateway.
    pub relay_networks: Vec<IpNet>,
    /// Largest accepted message, in bytes; advertised with SIZE.
    pub max_message_size: usize,
    /// Maximum recipients per message; more get `452 4.5.3` (RFC 5321 4.5.3.1.10).
    pub max_recipients: usize,
    /// Most concurrent SMTP sessions; more are greeted with `421 4.3.2`.
    pub max_sessions: usize,
    /// Longest accepted command line in bytes, CRLF included.
    pub max_command_line: usize,
    /// Wait for the next command before closing with `421 4.4.2`.
    #[serde(deserialize_with = "duration")]
    pub command_timeout: Duration,
    /// Wait for the next block of message data.
    #[serde(deserialize_with = "duration")]
    pub data_timeout: Duration,
    /// Maximum session time from connect to close.
    #[serde(deserialize_with = "duration")]
    pub session_timeout: Duration,
    /// Failed commands after which the session is closed.
    pub max_errors: u32,
    /// Certificate for STARTTLS and the implicit TLS listeners; absent
    /// means neither is offered.
    pub tls: Option<TlsConfig>,
    /// Addresses that speak TLS from the first byte (RFC 8314, the port 465
    /// style), with the certificate of `tls`.
    pub implicit_tls_listen: Vec<SocketAddr>,
    /// Most concurrent sessions from one client IP address; more are
    /// greeted with `421 4.7.0`.
    pub max_connections_per_ip: usize,
    /// Largest header section of a message in bytes, CRLFs included.
    pub max_header_size: usize,
    /// Most header fields in a message.
    pub max_header_fields: usize,
    /// SMTP AUTH (RFC 4954).
    pub auth: AuthConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// File of user names and argon2 password hashes, managed with
    /// `baton user`; absent means AUTH is not offered.
    pub users_file: Option<PathBuf>,
    /// Client networks that may authenticate without TLS.
    pub cleartext_networks: Vec<IpNet>,
    /// Failed AUTH attempts a client IP address may make in a burst before
    /// AUTH is locked for it.
    pub max_failures: u32,
    /// Time after which a client IP address gets all of its
    /// `max_failures` attempts back; one attempt returns every
    /// `failure_window / max_failures`.
    #[serde(deserialize_with = "duration")]
    pub failure_window: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the certificate chain, leaf first.
    pub certificate: PathBuf,
    /// PEM file with the private key.
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of the HTTP listener (`/healthz`, `/metrics`, `/queue`).
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// Folder holding the queue database and the delivery log.
    pub path: PathBuf,
    /// Memory the queue database may use as page cache, in bytes.
    pub cache_size: u64,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Resolvers to query (UDP, then TCP on truncation); absent or empty
    /// means the system resolver from /etc/resolv.conf.
    pub nameservers: Vec<SocketAddr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Port used at every MX host.
    pub remote_port: u16,
    /// Wait after each temporary failure; the last value repeats.
    #[serde(deserialize_with = "durations")]
    pub retry: Vec<Duration>,
    /// Age after which a recipient still failing temporarily bounces.
    #[serde(deserialize_with = "duration")]
    pub max_age: Duration,
    /// TCP connect timeout per MX address.
    #[serde(deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// Wait for each reply other than the one after the message data.
    #[serde(deserialize_with = "duration")]
    pub command_timeout: Duration,
    /// Wait for the reply after the message data (RFC 5321 4.5.3.2.6: 10 minutes).
    #[serde(deserialize_with = "duration")]
    pub data_timeout: Duration,
    /// Most outbound connections in all. Limits per receiving site are in
    /// `policies/shaping.yaml`.
    pub max_connections: usize,
    /// On SIGTERM, how long deliveries in flight may go on before the
    /// process exits anyway.
    #[serde(deserialize_with = "duration")]
    pub shutdown_grace: Duration,
    /// Apply the MTA-STS policies (RFC 8461) that recipient domains publish.
    pub mta_sts: bool,
    /// TCP port of the HTTPS server of `mta-sts.<domain>`: 443 by RFC 8461;
    /// labs and tests point it at their own server.
    pub mta_sts_port: u16,
    /// Extra trusted CA certificates (PEM) for verified TLS: MTA-STS policy
    /// fetches and MX hosts under an enforced policy. The system's roots are
    /// always trusted.
    pub tls_ca_file: Option<PathBuf>,
    /// Fixed next hops by recipient domain, bypassing MX lookup: a value is
    /// `host` or `host:port`, where host is a name or an IP address.
    pub routes: BTreeMap<String, String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hostname: system_hostname(),
            smtp: SmtpConfig::default(),
            http: HttpConfig::default(),
            spool: SpoolConfig::default(),
            dns: DnsConfig::default(),
            delivery: DeliveryConfig::default(),
            policies: PathBuf::from("./policies"),
            keys: PathBuf::from("./keys"),
        }
    }
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            listen: vec!["127.0.0.1:2525".parse().expect("valid literal")],
            relay_networks: vec![
                "127.0.0.0/8".parse().expect("valid literal"),
                "::1/128".parse().expect("valid literal"),
            ],
            max_message_size: 25 * 1024 * 1024,
            max_recipients: 1000,
            max_sessions: 1000,
            max_command_line: 2048,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(300),
            session_timeout: Duration::from_secs(3600),
            max_errors: 20,
            tls: None,
            implicit_tls_listen: Vec::new(),
            max_connections_per_ip: 100,
            max_header_size: 1024 * 1024,
            max_header_fields: 1000,
            auth: AuthConfig::default(),
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            users_file: None,
            cleartext_networks: Vec::new(),
            max_failures: 5,
            failure_window: Duration::from_secs(300),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:8025".parse().expect("valid literal"),
        }
    }
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            path: PathBuf::from("./data"),
            cache_size: 128 * 1024 * 1024,
        }
    }
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        let minutes = |m: u64| Duration::from_secs(m * 60);
        DeliveryConfig {
            remote_port: 25,
            retry: vec![minutes(1), minutes(5), minutes(15), minutes(30), minutes(60)],
            max_age: Duration::from_secs(3 * 86400),
            connect_timeout: Duration::from_secs(30),
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
            max_connections: 500,
            shutdown_grace: Duration::from_secs(30),
            mta_sts: true,
            mta_sts_port: 443,
            tls_ca_file: None,
            routes: BTreeMap::new(),
        }
    }
}

impl Config {
    /// Reads the configuration from `path`, or returns the defaults when no
    /// path is given.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let config = Self::parse(&text)
            .with_context(|| format!("invalid config file {}", path.display()))?;
        Ok(config)
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> anyhow::Result<Config> {
        let config: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            serde_norway::from_str(text)?
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.hostname.is_empty() || self.hostname.contains(char::is_whitespace) {
            bail!("hostname {:?} is not a host name; set hostname to the gateway's DNS name", self.hostname);
        }
        if self.smtp.listen.is_empty() {
            bail!("smtp.listen is empty; give at least one address such as 127.0.0.1:2525");
        }
        if self.delivery.retry.is_empty() {
            bail!("delivery.retry is empty; give at least one wait such as [1m, 5m, 15m]");
        }
        if self.delivery.retry.iter().any(Duration::is_zero) {
            bail!("delivery.retry contains 0s; every wait must be at least 1s");
        }
        if self.delivery.max_connections == 0 {
            bail!("delivery.max_connections must be at least 1");
        }
        if self.smtp.max_command_line < 512 {
            bail!(
                "smtp.max_command_line is {}; RFC 5321 requires at least 512",
                self.smtp.max_command_line
            );
        }
        self.validate_smtp()?;
        for (domain, target) in &self.delivery.routes {
            crate::delivery::mx::parse_route(target).with_context(|| {
                format!("delivery.routes.{domain}: invalid next hop {target:?}; use host or host:port")
            })?;
        }
        Ok(())
    }

    fn validate_smtp(&self) -> anyhow::Result<()> {
        let smtp = &self.smtp;
        if !smtp.implicit_tls_listen.is_empty() && smtp.tls.is_none() {
            bail!("smtp.implicit_tls_listen needs a certificate; set smtp.tls.certificate and smtp.tls.key");
        }
        if smtp.max_message_size == 0 {
            // Postfix reads 0 as "no limit"; here it would reject every
            // message, so it is refused rather than guessed at.
            bail!("smtp.max_message_size is 0, which would reject every message; give a size in bytes such as 26214400 (25 MiB)");
        }
        if smtp.max_connections_per_ip == 0 {
            bail!("smtp.max_connections_per_ip must be at least 1");
        }
        if smtp.max_header_size == 0 {
            bail!("smtp.max_header_size must be at least 1");
        }
        if smtp.max_header_fields == 0 {
            bail!("smtp.max_header_fields must be at least 1");
        }
        let auth = &smtp.auth;
        if auth.users_file.is_some() && smtp.tls.is_none() && auth.cleartext_networks.is_empty() {
            bail!(
                "smtp.auth.users_file is set, but AUTH is offered only under TLS or from smtp.auth.cleartext_networks; \
                 set smtp.tls or smtp.auth.cleartext_networks"
            );
        }
        if auth.max_failures == 0 {
            bail!("smtp.auth.max_failures must be at least 1");
        }
        if auth.failure_window < Duration::from_secs(1) {
            bail!("smtp.auth.failure_window must be at least 1s");
        }
        Ok(())
    }
}

/// Returns the kernel's host name, or `localhost` when it cannot be read.
fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|error| {
        format!("invalid duration {text:?} ({error}); write a number and a unit, such as 30s, 5m, 2h or 3d")
    })
}

fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

fn durations<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Duration>, D::Error> {
    let texts = Vec::<String>::deserialize(deserializer)?;
    texts
        .iter()
        .map(|text| parse_duration(text).map_err(serde::de::Error::custom))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_text_gives_defaults() {
        let config = Config::parse("").unwrap();
        assert_eq!(config.smtp.listen[0].to_string(), "127.0.0.1:2525");
        assert_eq!(config.http.listen.to_string(), "127.0.0.1:8025");
        assert_eq!(config.delivery.retry.len(), 5);
    }

    #[test]
    fn fixed_shape_parses() {
        let text = r#"
hostname: mta1.example.com
smtp:
  listen: ["127.0.0.1:2525"]
  relay_networks: ["127.0.0.0/8", "::1/128"]
  max_message_size: 26214400
http:
  listen: "127.0.0.1:8025"
spool:
  path: ./data
dns:
  nameservers: ["127.0.0.1:5353"]
delivery:
  remote_port: 25
  retry: [1m, 5m, 15m, 30m, 1h]
  max_age: 3d
policies: ./policies
keys: ./keys
"#;
        let config = Config::parse(text).unwrap();
        assert_eq!(config.hostname, "mta1.example.com");
        assert_eq!(config.dns.nameservers[0].port(), 5353);
        assert_eq!(config.delivery.retry[4], Duration::from_secs(3600));
        assert_eq!(config.delivery.max_age, Duration::from_secs(3 * 86400));
    }

    #[test]
    fn zero_message_size_rejected() {
        let message = format!("{:#}", Config::parse("smtp:\n  max_message_size: 0\n").unwrap_err());
        assert!(message.contains("smtp.max_message_size is 0"), "{message}");
    }

    #[test]
    fn unknown_key_is_named() {
        let error = Config::parse("smtp:\n  lissen: []\n").unwrap_err();
        let message = format!("{error:#}");
        assert!(message.contains("lissen"), "{message}");
    }

    #[test]
    fn bad_duration_is_named() {
        let error = Config::parse("delivery:\n  max_age: 3 fortnights\n").unwrap_err();
        let message = format!("{error:#}");
        assert!(message.contains("3 fortnights"), "{message}");
    }
}
