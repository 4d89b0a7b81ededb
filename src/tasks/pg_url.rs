//! What a `queue_url` asks of the connection to PostgreSQL, TLS included.
//!
//! The URL is libpq's, so that the one given to `psql` works here. rust-postgres knows
//! neither `sslrootcert` nor the `verify-ca` and `verify-full` modes, so those are taken
//! out here and the rest is left to it. Encryption: `sslmode=require`, `verify-ca` or
//! `verify-full` make it TLS (rustls), and the server's certificate is always verified,
//! the host name included — against the system's roots, or the CA file `sslrootcert`
//! names. That is stricter than libpq's `require`, which encrypts without checking whom
//! to: a queue's password should not go to whoever answers. `disable`, `allow` and
//! `prefer` (libpq's default) speak without TLS, as before.

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A parsed `queue_url`.
pub struct Target {
    pub config: postgres::Config,
    /// Some: TLS, verified against these roots.
    pub tls: Option<Tls>,
}

pub struct Tls {
    /// `sslrootcert`: the CA file the server's certificate must chain to; None: the
    /// system's roots.
    pub root_cert: Option<PathBuf>,
}

/// Parses a `queue_url`; the error is one line.
pub fn parse(url: &str) -> Result<Target, String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, q),
        None => (url, ""),
    };
    let mut kept: Vec<String> = Vec::new();
    let mut mode = None;
    let mut root_cert = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "sslmode" => mode = Some(v.to_string()),
            "sslrootcert" => root_cert = Some(PathBuf::from(percent_decode(v))),
            _ => kept.push(pair.to_string()),
        }
    }
    let tls = match mode.as_deref() {
        None | Some("disable" | "allow" | "prefer") => false,
        Some("require" | "verify-ca" | "verify-full") => true,
        Some(other) => {
            return Err(format!(
                "`queue_url`: unknown sslmode={other:?} (disable, prefer, require, verify-ca or verify-full)"
            ));
        }
    };
    if root_cert.is_some() && !tls {
        return Err(
            "`queue_url`: sslrootcert is given but sslmode does not ask for TLS (add sslmode=verify-full)"
                .into(),
        );
    }
    // rust-postgres insists on TLS with `require`, and falls back to none with `disable`.
    kept.push(format!(
        "sslmode={}",
        if tls { "require" } else { "disable" }
    ));
    let rebuilt = format!("{base}?{}", kept.join("&"));
    let config: postgres::Config = rebuilt
        .parse()
        .map_err(|e| format!("`queue_url` is not a PostgreSQL URL: {e}"))?;
    Ok(Target {
        config,
        tls: tls.then_some(Tls { root_cert }),
    })
}

impl Tls {
    /// The connector: rustls with the roots this URL trusts.
    pub fn connector(&self) -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.root_cert {
            Some(path) => {
                for cert in read_certs(path)? {
                    roots
                        .add(cert)
                        .map_err(|e| format!("`queue_url`: sslrootcert {}: {e}", path.display()))?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                for cert in found.certs {
                    let _ = roots.add(cert);
                }
                if roots.is_empty() {
                    return Err("`queue_url` asks for TLS but this host has no CA certificates (install ca-certificates, or name the server's CA with sslrootcert=FILE)".into());
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
    }
}

/// The certificates of a PEM file; an error if it holds none.
fn read_certs(path: &Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let at =
        |e: &dyn std::fmt::Display| format!("`queue_url`: sslrootcert {}: {e}", path.display());
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
        .map_err(|e| at(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| at(&e))?;
    if certs.is_empty() {
        return Err(at(&"no PEM certificate in it"));
    }
    Ok(certs)
}

/// A failed handshake's message, with what to do about an untrusted certificate.
pub fn explain_tls_error(message: String) -> String {
    if message.contains("certificate") {
        format!(
            "{message} (the server's certificate must chain to a CA this host trusts, for the host name in queue_url: name its CA with sslrootcert=FILE)"
        )
    } else {
        message
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_s_tls_parameters_mean_verified_tls_or_none() {
        let t = parse("postgres://u:p@db.example:5433/q").unwrap();
        assert!(t.tls.is_none());
        assert_eq!(t.config.get_ports(), &[5433]);
        assert!(
            parse("postgres://u@h/q?sslmode=prefer")
                .unwrap()
                .tls
                .is_none()
        );
        for mode in ["require", "verify-ca", "verify-full"] {
            let t = parse(&format!(
                "postgres://u@h/q?sslmode={mode}&connect_timeout=3"
            ))
            .unwrap();
            assert!(t.tls.as_ref().unwrap().root_cert.is_none(), "{mode}");
            assert_eq!(t.config.get_ssl_mode(), postgres::config::SslMode::Require);
            assert_eq!(
                t.config.get_connect_timeout(),
                Some(&std::time::Duration::from_secs(3))
            );
        }
        let t = parse("postgres://u@h/q?sslrootcert=%2Fetc%2Fca.pem&sslmode=verify-full").unwrap();
        assert_eq!(
            t.tls.unwrap().root_cert.as_deref(),
            Some(Path::new("/etc/ca.pem"))
        );
        assert!(
            parse("postgres://u@h/q?sslmode=sometimes")
                .err()
                .unwrap()
                .contains("unknown sslmode")
        );
        assert!(
            parse("postgres://u@h/q?sslrootcert=/x.pem")
                .err()
                .unwrap()
                .contains("does not ask for TLS")
        );
        assert!(
            parse("postgres://u@h/q?frobnicate=1")
                .err()
                .unwrap()
                .contains("not a PostgreSQL URL")
        );
    }

    #[test]
    fn a_root_cert_file_must_hold_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let tls = Tls {
            root_cert: Some(empty.clone()),
        };
        let e = tls.connector().err().unwrap();
        assert!(e.contains("no PEM certificate"), "{e}");
        let missing = Tls {
            root_cert: Some(dir.path().join("missing.pem")),
        };
        assert!(missing.connector().err().unwrap().contains("missing.pem"));
    }
}
