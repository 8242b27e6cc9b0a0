//! TLS set-up shared by intake (STARTTLS and implicit TLS server) and
//! delivery (STARTTLS client). Everything uses aws-lc-rs, the provider mail-auth also uses.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::Context;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, SignatureScheme};

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// TLS versions intake accepts: 1.2 and 1.3 (RFC 8996 deprecates 1.0 and
/// 1.1, which rustls does not implement anyway).
const SERVER_VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Builds the acceptor for STARTTLS and the implicit TLS listeners from PEM
/// files.
///
/// Called within a Tokio runtime, it also starts a task that reads the
/// files again on SIGHUP and when either file changes, so a renewed
/// certificate is used without a restart. A reload that fails is logged
/// and the previous certificate stays in use.
pub fn server_acceptor(certificate: &Path, key: &Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let provider = provider();
    let resolver = Arc::new(ReloadingCertificate {
        certificate: certificate.to_path_buf(),
        key: key.to_path_buf(),
        current: RwLock::new(Arc::new(load_certified_key(certificate, key, &provider)?)),
        provider: provider.clone(),
    });
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(SERVER_VERSIONS)?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    if tokio::runtime::Handle::try_current().is_ok() {
        tokio::spawn(resolver.watch());
    }
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Reads a certificate chain and its private key, and checks that they
/// belong together.
fn load_certified_key(certificate: &Path, key: &Path, provider: &CryptoProvider) -> anyhow::Result<CertifiedKey> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(certificate)
        .with_context(|| format!("cannot read certificate file {}", certificate.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("invalid PEM in certificate file {}", certificate.display()))?;
    if chain.is_empty() {
        anyhow::bail!(
            "certificate file {} contains no CERTIFICATE block",
            certificate.display()
        );
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("cannot read a private key from {}", key.display()))?;
    CertifiedKey::from_der(chain, key_der, provider).with_context(|| {
        format!(
            "certificate {} and key {} do not form a usable pair",
            certificate.display(),
            key.display()
        )
    })
}

/// The server certificate, replaced in place by a reload.
#[derive(Debug)]
struct ReloadingCertificate {
    certificate: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    provider: Arc<CryptoProvider>,
}

impl ResolvesServerCert for ReloadingCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().expect("certificate lock").clone())
    }
}

impl ReloadingCertificate {
    fn reload(&self) {
        match load_certified_key(&self.certificate, &self.key, &self.provider) {
            Ok(certified) => {
                *self.current.write().expect("certificate lock") = Arc::new(certified);
                tracing::info!(certificate = %self.certificate.display(), "TLS certificate reloaded");
            }
            Err(error) => {
                tracing::error!(error = %format!("{error:#}"), "TLS certificate reload failed; keeping the previous certificate");
            }
        }
    }

    /// Reloads on SIGHUP and when the certificate or key file changes. The
    /// folders are watched, not the files, because renewal tools replace
    /// files by rename or switch symbolic links. Changes are gathered for
    /// half a second so that writing both files causes one reload.
    async fn watch(self: Arc<Self>) {
        let names: Vec<_> = [&self.certificate, &self.key]
            .iter()
            .filter_map(|path| path.file_name().map(|name| name.to_os_string()))
            .collect();
        let mut folders: Vec<PathBuf> = [&self.certificate, &self.key]
            .iter()
            .map(|path| match path.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
                _ => PathBuf::from("."),
            })
            .collect();
        folders.dedup();
        let folders = folders.into_iter().map(|folder| (folder, notify::RecursiveMode::NonRecursive)).collect();
        let relevant = move |event: &notify::Event| {
            event
                .paths
                .iter()
                .any(|path| path.file_name().is_some_and(|name| names.iter().any(|n| n == name)))
        };
        crate::watch::reload_on_change("certificate", folders, relevant, || self.reload()).await;
    }
}

/// Builds the connector for opportunistic STARTTLS to MX hosts.
///
/// Opportunistic TLS (RFC 7435) encrypts without authenticating: MX hosts
/// commonly present certificates that do not match their name, and refusing
/// them would send the mail in clear text instead. So the certificate is not
/// verified here; domains with an enforced MTA-STS policy get
/// [`verified_client_config`] instead. NOTE: DANE is not implemented.
pub fn opportunistic_connector() -> tokio_rustls::TlsConnector {
    opportunistic_connector_with_versions(rustls::DEFAULT_VERSIONS)
}

/// Builds an opportunistic connector that offers only `versions`; tests
/// use it to check which versions a listener accepts.
pub fn opportunistic_connector_with_versions(versions: &[&'static rustls::SupportedProtocolVersion]) -> tokio_rustls::TlsConnector {
    let provider = provider();
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .expect("aws-lc-rs supports TLS 1.2 and 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    // The handshake signature is still checked, so the peer must hold the
    // key of the certificate it sent.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Builds the client configuration for verified TLS: the system's root
/// certificates plus those in `extra_ca` (PEM), when given.
pub fn verified_client_config(extra_ca: Option<&Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut extra = Vec::new();
    if let Some(path) = extra_ca {
        for certificate in CertificateDer::pem_file_iter(path).with_context(|| format!("cannot read CA file {}", path.display()))? {
            extra.push(certificate.with_context(|| format!("invalid PEM in CA file {}", path.display()))?);
        }
        if extra.is_empty() {
            anyhow::bail!("CA file {} contains no CERTIFICATE block", path.display());
        }
    }
    let provider = provider();
    let verifier = rustls_platform_verifier::Verifier::new_with_extra_roots(extra, provider.clone())
        .context("cannot load the trusted root certificates")?;
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("aws-lc-rs supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(Arc::new(config))
}
