//! The TLS side of a non-loopback listener: the PEM certificate chain and key named by
//! `http.tls_cert` and `http.tls_key`, served by rustls (TLS 1.2 and 1.3, ring).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub fn acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("`http.tls_cert` {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("`http.tls_cert` {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "`http.tls_cert` {} holds no PEM certificate",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("`http.tls_key` {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("`http.tls_cert` and `http.tls_key` do not make a pair: {e}"))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}
