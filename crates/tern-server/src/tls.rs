//! HTTPS through rustls, and mutual TLS against the device CA.
//!
//! With a `client_ca`, the server asks for a client certificate but does not require one
//! (the management API and token enrollment work without); a certificate that is offered
//! must chain to the device CA, or the handshake fails. The verified certificate reaches
//! the handlers as a [`PeerCert`] request extension (`crate::serve`).

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;
use crate::{Error, Result};

/// The client certificate a TLS connection presented and the device CA verified.
#[derive(Debug, Clone, Default)]
pub struct PeerCert(pub Option<Arc<Vec<u8>>>);

fn tls_err(what: &std::path::Path, e: impl std::fmt::Display) -> Error {
    Error::Config(format!("tls {}: {e}", what.display()))
}

/// The rustls acceptor for `tls`.
pub fn acceptor(tls: &TlsConfig) -> Result<tokio_rustls::TlsAcceptor> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert)
        .map_err(|e| tls_err(&tls.cert, e))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| tls_err(&tls.cert, e))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key).map_err(|e| tls_err(&tls.key, e))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("tls: {e}")))?;
    let builder = match &tls.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).map_err(|e| tls_err(ca, e))? {
                roots.add(c.map_err(|e| tls_err(ca, e))?).map_err(|e| tls_err(ca, e))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| tls_err(ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(certs, key)
        .map_err(|e| tls_err(&tls.cert, e))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// The common name and the raw subject public key of a (verified) device certificate.
pub fn device_identity(der: &[u8]) -> std::result::Result<(String, Vec<u8>), String> {
    use x509_cert::der::Decode;
    let cert = x509_cert::Certificate::from_der(der).map_err(|e| format!("certificate: {e}"))?;
    let tbs = &cert.tbs_certificate;
    // 2.5.4.3: commonName.
    let cn_oid = x509_cert::der::asn1::ObjectIdentifier::new_unwrap("2.5.4.3");
    let cn = tbs
        .subject
        .0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .find(|atv| atv.oid == cn_oid)
        .map(|atv| String::from_utf8_lossy(atv.value.value()).into_owned())
        .ok_or("the certificate has no common name")?;
    let key = tbs.subject_public_key_info.subject_public_key.raw_bytes().to_vec();
    Ok((cn, key))
}
