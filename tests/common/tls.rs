//! TLS helpers for tests: a self-signed certificate for the gateway's
//! STARTTLS, and a client connector that accepts any server certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName};

/// Writes a self-signed certificate for `name` and its key as PEM files
/// into `folder`; returns the certificate and key paths.
pub fn write_certificate(folder: &Path, name: &str) -> (PathBuf, PathBuf) {
    let certified = rcgen::generate_simple_self_signed(vec![name.to_string()]).expect("generate certificate");
    let certificate = folder.join("tls-certificate.pem");
    let key = folder.join("tls-key.pem");
    std::fs::write(&certificate, certified.cert.pem()).expect("write certificate");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("write key");
    (certificate, key)
}

/// Returns a TLS client that accepts any server certificate but still checks
/// the handshake signatures: the gateway's own opportunistic connector.
pub fn accept_any_connector() -> tokio_rustls::TlsConnector {
    baton::tls::opportunistic_connector()
}

/// A certificate authority for tests whose certificates Baton trusts
/// through `delivery.tls_ca_file`.
pub struct TestCa {
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
    pem: String,
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Baton test CA");
        let key = rcgen::KeyPair::generate().expect("CA key");
        let pem = params.self_signed(&key).expect("CA certificate").pem();
        TestCa { params, key, pem }
    }

    /// Writes the CA certificate as PEM to `path`.
    pub fn write(&self, path: &Path) {
        std::fs::write(path, &self.pem).expect("write CA certificate");
    }

    /// Returns a server configuration with a certificate for `name`
    /// signed by this CA.
    pub fn server_config(&self, name: &str) -> Arc<rustls::ServerConfig> {
        let key = rcgen::KeyPair::generate().expect("server key");
        let params = rcgen::CertificateParams::new(vec![name.to_string()]).expect("server parameters");
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let certificate = params.signed_by(&key, &issuer).expect("server certificate");
        let chain = vec![certificate.der().clone()];
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("aws-lc-rs supports the default protocol versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("certificate and key match");
        Arc::new(config)
    }
}

/// An SMTP client over TLS: after STARTTLS, or on an implicit TLS port.
pub struct TlsClient {
    stream: tokio::io::BufReader<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
}

/// Connects to `address` from the loopback address `source`.
async fn connect_tcp_from(source: std::net::IpAddr, address: std::net::SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("TCP socket");
    socket.bind(std::net::SocketAddr::new(source, 0)).expect("bind the source address");
    socket.connect(address).await.expect("connect to baton")
}

/// Reads one SMTP reply, all lines joined by newlines; `<closed>` when the
/// connection closes first.
async fn read_smtp_reply<S: tokio::io::AsyncBufRead + Unpin>(stream: &mut S) -> String {
    use tokio::io::AsyncBufReadExt;
    let mut reply = String::new();
    loop {
        let mut line = String::new();
        let read = tokio::time::timeout(std::time::Duration::from_secs(30), stream.read_line(&mut line))
            .await
            .expect("reply within 30s");
        match read {
            Ok(0) | Err(_) => return if reply.is_empty() { "<closed>".to_string() } else { reply },
            Ok(_) => {}
        }
        reply.push_str(&line);
        if line.len() < 4 || line.as_bytes()[3] != b'-' {
            return reply.trim_end().to_string();
        }
    }
}

impl TlsClient {
    /// Connects from `source`, sends EHLO and STARTTLS and completes the
    /// handshake. Panics when any step fails.
    pub async fn starttls_from(source: std::net::IpAddr, address: std::net::SocketAddr) -> TlsClient {
        use tokio::io::AsyncWriteExt;
        let mut plain = tokio::io::BufReader::new(connect_tcp_from(source, address).await);
        let greeting = read_smtp_reply(&mut plain).await;
        assert!(greeting.starts_with("220 "), "greeting: {greeting}");
        plain.get_mut().write_all(b"EHLO client.test.example\r\n").await.expect("write EHLO");
        let ehlo = read_smtp_reply(&mut plain).await;
        assert!(ehlo.contains("STARTTLS"), "EHLO: {ehlo}");
        plain.get_mut().write_all(b"STARTTLS\r\n").await.expect("write STARTTLS");
        let ready = read_smtp_reply(&mut plain).await;
        assert!(ready.starts_with("220 "), "STARTTLS: {ready}");
        let server_name = ServerName::try_from("mta.test.example").expect("valid name");
        let tls = accept_any_connector()
            .connect(server_name, plain.into_inner())
            .await
            .expect("TLS handshake after STARTTLS");
        TlsClient {
            stream: tokio::io::BufReader::new(tls),
        }
    }

    /// Connects from `source` to an implicit TLS port with `connector` and
    /// returns the client with the greeting, or the handshake error.
    pub async fn connect_implicit(
        source: std::net::IpAddr,
        address: std::net::SocketAddr,
        connector: &tokio_rustls::TlsConnector,
    ) -> std::io::Result<(TlsClient, String)> {
        let tcp = connect_tcp_from(source, address).await;
        let server_name = ServerName::try_from("mta.test.example").expect("valid name");
        let tls = connector.connect(server_name, tcp).await?;
        let mut client = TlsClient {
            stream: tokio::io::BufReader::new(tls),
        };
        let greeting = client.read_reply().await;
        Ok((client, greeting))
    }

    pub async fn read_reply(&mut self) -> String {
        read_smtp_reply(&mut self.stream).await
    }

    pub async fn write(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.stream.get_mut().write_all(bytes).await.expect("write to baton");
    }

    /// Sends one command line (CRLF added) and returns the reply.
    pub async fn command(&mut self, line: &str) -> String {
        self.write(format!("{line}\r\n").as_bytes()).await;
        self.read_reply().await
    }

    /// Returns the leaf certificate the server presented.
    pub fn peer_certificate(&self) -> CertificateDer<'static> {
        let (_, connection) = self.stream.get_ref().get_ref();
        connection.peer_certificates().expect("server sent certificates")[0].clone().into_owned()
    }

    /// Returns the negotiated TLS version.
    pub fn protocol_version(&self) -> rustls::ProtocolVersion {
        let (_, connection) = self.stream.get_ref().get_ref();
        connection.protocol_version().expect("handshake complete")
    }
}

/// Returns a TLS client like [`accept_any_connector`] that offers only
/// the given TLS versions.
pub fn accept_any_connector_with_versions(
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> tokio_rustls::TlsConnector {
    baton::tls::opportunistic_connector_with_versions(versions)
}
