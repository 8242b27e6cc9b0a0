//! TLS set-up shared by intake (STARTTLS server) and delivery (STARTTLS
//! client). Everything uses aws-lc-rs, the provider mail-auth also uses.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Builds the STARTTLS acceptor from PEM files.
pub fn server_acceptor(certificate: &Path, key: &Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
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
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("cannot read a private key from {}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("certificate and key do not form a usable pair")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Builds the connector for opportunistic STARTTLS to MX hosts.
///
/// Opportunistic TLS (RFC 7435) encrypts without authenticating: MX hosts
/// commonly present certificates that do not match their name, and refusing
/// them would send the mail in clear text instead. So the certificate is not
/// verified here; domains with an enforced MTA-STS policy get
/// [`verified_client_config`] instead. NOTE: DANE is not implemented.
pub fn opportunistic_connector() -> tokio_rustls::TlsConnector {
    let provider = provider();
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("aws-lc-rs supports the default protocol versions")
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
